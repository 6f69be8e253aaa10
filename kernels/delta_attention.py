"""Fused Triton kernels of the delta-attention operator (spec: ``docs/delta_attention.md``).

Registers ``hdaf::triton_delta_attention_forward`` and ``hdaf::triton_delta_attention_backward``
(``torch.library.triton_op``, the signatures of the C++ ``hdaf::delta_attention_*`` op), their
fake implementations (:func:`hdaf.ops.fake_forward` / :func:`hdaf.ops.fake_backward`) and the
autograd formula (:func:`hdaf.ops.register_delta_autograd`).

Kernels (one program per tile of ``BLOCK_M`` queries or ``BLOCK_N`` keys of one (batch, head)):

* ``_fwd_kernel``: flash-style online softmax in float32 (exp2, ``log2(e)·scale`` folded into one
  multiplier, the bias added in float32) over the key blocks that the window / causal mask and
  the padding range leave visible (cost O(T·window)). Writes ``out`` and ``lse`` (``-inf`` and
  ``out = 0`` for a query with no visible key).
* ``_bwd_preprocess_kernel``: ``D_i = dout_i·out_i`` (float32).
* ``_bwd_dkdv_kernel`` (one program per key block): ``dk``, ``dv`` and the *key rows* of ``dP``
  (``+scale·dS_ij`` into ``dP[j, r(i,j)]``).
* ``_bwd_dq_kernel`` (one program per query block): ``dq`` and the *query rows* of ``dP``
  (``-scale·dS_ij`` into ``dP[i, r(i,j)]``), as flash-attention 2's separate dQ pass.

**Band tiles and far tiles.** With ``P = x·w`` the bias of a pair is
``P[j, r(i,j)] − P[i, r(i,j)]``. A tile whose every pair has ``j − i <= −L`` (*far-low*) or
``j − i >= U`` (*far-high*) sits in one clipped bucket ``e`` (``0`` or ``R−1``): its bias is a key
column vector ``P[j, e]`` minus a query row vector ``P[i, e]``; the program loads its own row
vector once, and one column vector per tile: no gather. Only the *band* tiles, which cross
``−L < j − i < U``, gather both scalars per pair. Each kernel walks its tiles in three loops
(far-low, band, far-high, or the reverse for the key-block programs), each compiled for its
kind (``MODE``), so no tile pays for a branch. In the backward, ``dP`` of a far tile reduces to
a row sum (query rows) or a column sum (key rows) into the clipped bucket.

**Masks.** A tile is masked only when it crosses a window / causal edge or the end of the
sequence, or when the call has a padding mask. Key blocks outside each batch element's span of
non-padding keys ``[kv_lo, kv_hi)`` (computed on the host from ``key_padding_mask``) are skipped
by the loop bounds; no kernel reduces a mask vector inside a loop. (Issue 10: the old forward
summed the padding vector of every key tile to a scalar inside its loop, ``_any_key``;
compute-sanitizer on an H100 placed an out-of-range shared-memory access in that kernel at
Triton's ``_sum_combine`` while autotuning a padded, causal, Dk != Dv, float16 call. That
in-loop scalar reduction is gone; see ``tests/test_triton.py::test_gpu_issue10_regression_*``.)

**Ownership and determinism.** Every write of a program lands in rows no other program writes.
Inside a program, unclipped buckets never collide (for a fixed row, each unclipped bucket ``r``
belongs to exactly one partner position), so they are written with plain stores; the clipped
buckets ``0`` and ``R−1``, where many partners collide, are summed in registers and stored once
at the end. The key-row and query-row halves go into the two halves of one float32 buffer that
one ``torch.sum`` adds (over heads too when ``P`` is shared, ``Hp = 1``). No atomics: forward
and backward are bitwise deterministic for a given block configuration. On a GPU the block sizes
are autotuned (per sequence-length / window / head-dim bucket, dtype and device); two processes
that pick different configurations may differ in the last bits (summation order), as with any
autotuned kernel; :func:`forced_configs` pins them.

**Configurations** (``_FWD_SHAPES``, ``_DKDV_SHAPES``, ``_DQ_SHAPES``) are chosen for sm_80 /
sm_90: 64–128 × 64–128 tiles, 4–8 warps, 2–4 stages, with small tiles kept for short sequences
and float32; ``_prune`` drops tiles larger than the sequence and those whose estimated shared
memory exceeds ``_SMEM_BUDGET``. They have not been timed on a GPU in this project's sessions.

Supported: float16, bfloat16, float32 (float32 ``tl.dot`` runs with ``input_precision="ieee"``,
i.e. no TF32); head dims ``Dk, Dv <= 128`` (padded to a power of two with masks), ``Dk != Dv``.
float64 is rejected with a TypeError (Triton's ``tl.dot`` has no float64). CPU tensors run only
under the Triton interpreter, with one small fixed block configuration (or the ones
:func:`forced_configs` sets) and the very same launcher code (``triton_op`` runs CPU tensors
there). ``TRITON_INTERPRET=1`` must be set before ``triton.language`` is first imported —
``import torch._dynamo`` (hence ``import hdaf``) imports it — or importing this module raises an
ImportError saying so. Under the interpreter (only), bfloat16 ``tl.dot`` operands are widened
to float32, working around an interpreter bug. Tracing with ``torch.compile`` / ``opcheck``'s
``test_aot_dispatch_dynamic`` needs a GPU (the interpreter cannot run the functionalised
kernels on FakeTensor-backed storages).
"""
from __future__ import annotations

import collections
import contextlib
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from hdaf import ops as _ops

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET:
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction

    if not isinstance(tl.zeros, _InterpretedFunction):
        raise ImportError(
            "TRITON_INTERPRET=1 was set after triton.language had been imported (torch._dynamo, "
            "which `import hdaf` loads, imports it), so Triton's own library functions are not "
            "interpretable: set TRITON_INTERPRET=1 before importing torch / hdaf")
MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)

#: Kernel launches made by the launchers in eager mode, by kernel name (tests use it to prove
#: that the Triton kernels, not a fallback, served a call). Not updated under torch.compile.
launch_counts: collections.Counter = collections.Counter()

# Tile kinds (the MODE of the inner loops).
_FAR_LO: tl.constexpr = tl.constexpr(0)  # every pair has j - i <= -L: bucket 0
_BAND: tl.constexpr = tl.constexpr(1)  # pairs on both sides of a clip limit: gather
_FAR_HI: tl.constexpr = tl.constexpr(2)  # every pair has j - i >= U: bucket R-1


# ----------------------------------------------------------------------------------------------
# Block-size configurations
# ----------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages). The forward and dQ programs own BLOCK_M queries and
# loop over keys; the dK/dV programs own BLOCK_N keys and loop over queries (flash-attention 2's
# shapes: wide program tiles, narrower loop tiles in the backward). The last entries are for
# short sequences and float32, which _prune keeps when nothing larger fits.
_FWD_SHAPES = [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4), (64, 64, 4, 4),
               (64, 128, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2), (16, 16, 2, 2)]
_DKDV_SHAPES = [(64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 2),
                (32, 32, 4, 2), (16, 16, 2, 1)]
_DQ_SHAPES = [(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2),
              (32, 32, 4, 2), (16, 16, 2, 1)]
#: Estimated shared memory a configuration may use (bytes): below sm_80's 164 KiB opt-in limit
#: with room for Triton's layout-conversion scratch.
_SMEM_BUDGET = 144 * 1024


def _smem_estimate(kind, bm, bn, stages, bdk, bdv, elem):
    """Bytes of the pipelined operand tiles plus the program's resident tiles."""
    if kind == "fwd":  # K and V tiles per stage, the Q tile resident
        return stages * bn * (bdk + bdv) * elem + bm * bdk * elem
    if kind == "dkdv":  # Q and dO tiles per stage, K and V resident
        return stages * bm * (bdk + bdv) * elem + bn * (bdk + bdv) * elem
    return stages * bn * (bdk + bdv) * elem + bm * (bdk + bdv) * elem  # dq: K, V per stage


def _make_prune(kind):
    def prune(configs, named_args, **kwargs):
        """Drop tiles larger than the sequence, large float32 tiles, and shared-memory misfits."""
        args = {**named_args, **kwargs}
        t = max(16, args["T_KEY"])
        elem = 4 if args.get("IEEE") else 2
        keep = []
        for c in configs:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            if bm > t or bn > t:
                continue
            if args.get("IEEE") and (bm * bn > 64 * 64 or c.num_stages > 2):
                continue
            if _smem_estimate(kind, bm, bn, c.num_stages, args["BLOCK_DK"], args["BLOCK_DV"],
                              elem) > _SMEM_BUDGET:
                continue
            keep.append(c)
        return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return prune


def _configs(kind: str):
    if INTERPRET:  # the interpreter runs each program in numpy: small fixed tiles, no tuning
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    shapes = {"fwd": _FWD_SHAPES, "dkdv": _DKDV_SHAPES, "dq": _DQ_SHAPES}[kind]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in shapes]


_TUNE_KEY = ["T_KEY", "W_KEY", "BLOCK_DK", "BLOCK_DV", "HAS_PAD", "IEEE"]

#: Per kernel kind, a configuration that replaces autotuning (see :func:`forced_configs`).
_FORCED: dict = {}


@contextlib.contextmanager
def forced_configs(fwd=None, dkdv=None, dq=None):
    """Run the kernels with fixed configurations instead of the autotuned ones (eager only).

    Each argument is ``None`` (keep autotuning) or ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``.
    Tests use it to walk far and band tiles of several shapes under the interpreter, and the GPU
    check to run every configuration of the autotune lists one by one (so a bad one is named).
    """
    saved = dict(_FORCED)
    for kind, cfg in (("fwd", fwd), ("dkdv", dkdv), ("dq", dq)):
        if cfg is not None:
            bm, bn, warps, stages = cfg
            _FORCED[kind] = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)


def autotune_shapes(kind: str):
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples autotuning picks from on a GPU."""
    return list({"fwd": _FWD_SHAPES, "dkdv": _DKDV_SHAPES, "dq": _DQ_SHAPES}[kind])


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------

# The interpreter (triton 3.8) computes tl.dot of bfloat16 operands wrongly; there, and only
# there, bfloat16 operands are widened to float32 first (exact: bf16 products fit in float32).
_WIDEN_BF16_DOT = tl.constexpr(INTERPRET)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if _WIDEN_BF16_DOT and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _band_bias(p_base, spt, spr, offs_m, offs_n, mask_m, mask_n, L, U):
    """float32 [BLOCK_M, BLOCK_N]: P[j, r(i,j)] - P[i, r(i,j)], gathered per pair."""
    d = offs_n[None, :] - offs_m[:, None]
    r = tl.minimum(tl.maximum(d, -L), U) + L
    valid = mask_m[:, None] & mask_n[None, :]
    gk = tl.load(p_base + offs_n[None, :] * spt + r * spr, mask=valid, other=0.0)
    gq = tl.load(p_base + offs_m[:, None] * spt + r * spr, mask=valid, other=0.0)
    return gk.to(tl.float32) - gq.to(tl.float32)


@triton.jit
def _edge(L, U, MODE: tl.constexpr):
    """The clipped bucket of a far tile: 0 (far-low) or R-1 (far-high)."""
    if MODE == _FAR_LO:
        return 0
    else:
        return L + U


@triton.jit
def _window_vis(offs_m, offs_n, T, lo, hi):
    """bool [BLOCK_M, BLOCK_N]: lo <= j - i <= hi and j < T."""
    d = offs_n[None, :] - offs_m[:, None]
    return (d >= lo) & (d <= hi) & (offs_n < T)[None, :]


@triton.jit
def _mask_keys(s, pad_base, spadt, offs_m, offs_n, m0, n0, T, lo, hi, HAS_PAD: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """-inf where key j is not visible from query i. Only tiles crossing a window edge or the end
    of the sequence are masked, and every tile when there is a padding mask."""
    if HAS_PAD:
        pad = tl.load(pad_base + offs_n * spadt, mask=offs_n < T, other=1)
        vis = _window_vis(offs_m, offs_n, T, lo, hi) & (pad == 0)[None, :]
        s = tl.where(vis, s, float("-inf"))
    else:
        crosses = (n0 - (m0 + BLOCK_M - 1) < lo) | (n0 + BLOCK_N - 1 - m0 > hi) | (n0 + BLOCK_N > T)
        if crosses:
            s = tl.where(_window_vis(offs_m, offs_n, T, lo, hi), s, float("-inf"))
    return s


@triton.jit
def _key_range(KV, off_b, T, HAS_PAD: tl.constexpr):
    """[kv_lo, kv_hi): the span of the batch element's non-padding keys ([0, T) without a mask)."""
    if HAS_PAD:
        kv_lo = tl.load(KV + off_b * 2)
        kv_hi = tl.load(KV + off_b * 2 + 1)
    else:
        kv_lo = 0
        kv_hi = T
    return kv_lo, kv_hi


@triton.jit
def _split(start, end, first_band, first_far_hi, BLOCK: tl.constexpr):
    """Split [start, end) (start a multiple of BLOCK) into the block-aligned runs
    [start, a) far, [a, b) band, [b, end) far, where the band starts at the first block whose
    start is >= first_band and the second far run at the first block start >= first_far_hi."""
    a = tl.maximum((tl.maximum(first_band, 0) + BLOCK - 1) // BLOCK * BLOCK, start)
    a = tl.minimum(a, end)
    b = tl.maximum((tl.maximum(first_far_hi, 0) + BLOCK - 1) // BLOCK * BLOCK, a)
    b = tl.minimum(b, end)
    return a, b


@triton.jit
def _key_tile_logits(q, prow, k_base, p_base, pad_base, skt, skd, spt, spr, spadt, offs_m,
                     mask_m, offs_dk, m0, n0, T, DK, L, U, lo, hi, qk_scale, MODE: tl.constexpr,
                     HAS_PAD: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """A key tile seen from a query block: (offs_n, kT, masked log2-domain logits). prow is the
    block's own P[i, e] (far tiles); the key column P[j, e] is one vector load."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < T
    kT = tl.load(k_base + offs_n[None, :] * skt + offs_dk[:, None] * skd,
                 mask=mask_n[None, :] & (offs_dk < DK)[:, None], other=0.0)
    qk = _dot(q, kT, IEEE)
    if MODE == _BAND:
        bias = _band_bias(p_base, spt, spr, offs_m, offs_n, mask_m, mask_n, L, U)
    else:
        pcol = tl.load(p_base + offs_n * spt + _edge(L, U, MODE) * spr, mask=mask_n, other=0.0)
        bias = pcol.to(tl.float32)[None, :] - prow[:, None]
    s = _mask_keys((qk + bias) * qk_scale, pad_base, spadt, offs_m, offs_n, m0, n0, T, lo, hi,
                   HAS_PAD, BLOCK_M, BLOCK_N)
    return offs_n, kT, s


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _fwd_loop(acc, l_i, m_i, q, prow, k_base, v_base, p_base, pad_base,
              skt, skd, svt, svd, spt, spr, spadt, offs_m, mask_m, offs_dk, offs_dv, m0,
              n_start, n_end, T, DK, DV, L, U, lo, hi, qk_scale,
              MODE: tl.constexpr, HAS_PAD: tl.constexpr, IEEE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n, kT, s = _key_tile_logits(q, prow, k_base, p_base, pad_base, skt, skd, spt, spr,
                                         spadt, offs_m, mask_m, offs_dk, m0, n0, T, DK, L, U, lo,
                                         hi, qk_scale, MODE, HAS_PAD, IEEE, BLOCK_M, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * svt + offs_dv[None, :] * svd,
                    mask=(offs_n < T)[:, None] & (offs_dv < DV)[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, P, PAD, KV, OUT, LSE,
                sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
                spb, sph, spt, spr, spadb, spadt, sob, soh, sot, sod, slb, slh, slt,
                H, T, DK, DV, L, U, lo, hi, qk_scale, T_KEY, W_KEY,
                HAS_PAD: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    k_base = K + off_b * skb + off_h * skh
    v_base = V + off_b * svb + off_h * svh
    p_base = P + off_b * spb + off_h * sph
    pad_base = PAD + off_b * spadb

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < T
    q = tl.load(Q + off_b * sqb + off_h * sqh + offs_m[:, None] * sqt + offs_dk[None, :] * sqd,
                mask=mask_m[:, None] & (offs_dk < DK)[None, :], other=0.0)
    # the query rows of the two clipped buckets, read once for all far tiles
    prow_lo = tl.load(p_base + offs_m * spt, mask=mask_m, other=0.0).to(tl.float32)
    prow_hi = tl.load(p_base + offs_m * spt + (L + U) * spr, mask=mask_m, other=0.0).to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # key blocks meeting the band m0+lo <= j <= m0+BLOCK_M-1+hi and the non-padding span
    kv_lo, kv_hi = _key_range(KV, off_b, T, HAS_PAD)
    start_n = tl.maximum(tl.maximum(m0 + lo, kv_lo), 0) // BLOCK_N * BLOCK_N
    end_n = tl.minimum(tl.minimum(m0 + BLOCK_M + hi, T), kv_hi)
    # far-low: j - i <= -L for the whole tile; far-high: j - i >= U for the whole tile
    band_n, far_hi_n = _split(start_n, end_n, m0 - L - BLOCK_N + 2, m0 + BLOCK_M - 1 + U, BLOCK_N)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, prow_lo, k_base, v_base, p_base, pad_base,
                              skt, skd, svt, svd, spt, spr, spadt, offs_m, mask_m, offs_dk,
                              offs_dv, m0, start_n, band_n, T, DK, DV, L, U, lo, hi, qk_scale,
                              _FAR_LO, HAS_PAD, IEEE, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, prow_lo, k_base, v_base, p_base, pad_base,
                              skt, skd, svt, svd, spt, spr, spadt, offs_m, mask_m, offs_dk,
                              offs_dv, m0, band_n, far_hi_n, T, DK, DV, L, U, lo, hi, qk_scale,
                              _BAND, HAS_PAD, IEEE, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, prow_hi, k_base, v_base, p_base, pad_base,
                              skt, skd, svt, svd, spt, spr, spadt, offs_m, mask_m, offs_dk,
                              offs_dv, m0, far_hi_n, end_n, T, DK, DV, L, U, lo, hi, qk_scale,
                              _FAR_HI, HAS_PAD, IEEE, BLOCK_M, BLOCK_N)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = m_i + tl.log2(tl.where(empty, 1.0, l_i))  # log2 domain
    lse = tl.where(empty, float("-inf"), lse2 * 0.6931471805599453)
    o_base = OUT + off_b * sob + off_h * soh
    tl.store(o_base + offs_m[:, None] * sot + offs_dv[None, :] * sod, out.to(OUT.dtype.element_ty),
             mask=mask_m[:, None] & (offs_dv < DV)[None, :])
    tl.store(LSE + off_b * slb + off_h * slh + offs_m * slt, lse, mask=mask_m)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _bwd_preprocess_kernel(OUT, DO, DELTA, sob, soh, sot, sod, sdb, sdh, sdt, sdd,
                           H, T, DV, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m < T)[:, None] & (offs_dv < DV)[None, :]
    o = tl.load(OUT + off_b * sob + off_h * soh + offs_m[:, None] * sot + offs_dv[None, :] * sod,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * sdb + off_h * sdh + offs_m[:, None] * sdt + offs_dv[None, :] * sdd,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _lse2_for_probs(LSE_ROW, offs_m, mask_m, slt):
    """log2-domain lse with +inf for rows that see no key (and rows past T): exp2(s - lse2) is then
    exactly 0 there, with no per-element select."""
    lse = tl.load(LSE_ROW + offs_m * slt, mask=mask_m, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _band_dP(ds, offs_m, offs_n, mask_m, mask_n, L, U, acc_lo, acc_hi, dp_rows, scale,
             AXIS: tl.constexpr):
    """A band tile's share of dP: the clipped pairs summed into acc_lo / acc_hi along AXIS, the
    unclipped ones stored (one partner per row and bucket) at dp_rows + r."""
    d = offs_n[None, :] - offs_m[:, None]
    acc_lo += tl.sum(tl.where(d <= -L, ds, 0.0), AXIS)
    acc_hi += tl.sum(tl.where((d >= U) & (d > -L), ds, 0.0), AXIS)
    mid = (d > -L) & (d < U) & mask_m[:, None] & mask_n[None, :]
    tl.store(dp_rows + (d + L), ds * scale, mask=mid)
    return acc_lo, acc_hi


@triton.jit
def _dkdv_loop(dk, dv, acc_lo, acc_hi, kT, vT, pcol, q_base, do_base, lse_base, delta_base,
               p_base, dp_base, sqt, sqd, sdt, sdd, slt, spt, spr, offs_n, mask_n, kvalid,
               offs_dk, offs_dv, n0, m_start, m_end, T, DK, DV, L, U, lo, hi, scale, qk_scale,
               MODE: tl.constexpr, IEEE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    R = L + U + 1
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < T
        q = tl.load(q_base + offs_m[:, None] * sqt + offs_dk[None, :] * sqd,
                    mask=mask_m[:, None] & (offs_dk < DK)[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdt + offs_dv[None, :] * sdd,
                     mask=mask_m[:, None] & (offs_dv < DV)[None, :], other=0.0)
        lse2 = _lse2_for_probs(lse_base, offs_m, mask_m, slt)
        Di = tl.load(delta_base + offs_m, mask=mask_m, other=0.0)
        qk = _dot(q, kT, IEEE)
        if MODE == _BAND:
            bias = _band_bias(p_base, spt, spr, offs_m, offs_n, mask_m, mask_n, L, U)
        else:  # the key block's own P[j, e] (pcol) minus one row vector per tile
            prow = tl.load(p_base + offs_m * spt + _edge(L, U, MODE) * spr, mask=mask_m,
                           other=0.0)
            bias = pcol[None, :] - prow.to(tl.float32)[:, None]
        s = (qk + bias) * qk_scale
        # window / causal edges; padded or out-of-range keys are zeroed once, after the loops
        if (n0 - (m0 + BLOCK_M - 1) < lo) | (n0 + BLOCK_N - 1 - m0 > hi):
            s = tl.where(_window_vis(offs_m, offs_n, T, lo, hi), s, float("-inf"))
        p = tl.exp2(s - lse2[:, None])
        dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
        dp = _dot(do, vT, IEEE)
        ds = p * (dp - Di[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
        if MODE == _FAR_LO:
            acc_lo += tl.sum(ds, 0)
        elif MODE == _FAR_HI:
            acc_hi += tl.sum(ds, 0)
        else:
            acc_lo, acc_hi = _band_dP(ds, offs_m, offs_n, mask_m, mask_n & kvalid, L, U,
                                      acc_lo, acc_hi, dp_base + offs_n[None, :] * R, scale, 0)
    return dk, dv, acc_lo, acc_hi


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, P, PAD, KV, DO, LSE, DELTA, DK_OUT, DV_OUT, DPK,
                     sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
                     spb, sph, spt, spr, spadb, spadt, sdb, sdh, sdt, sdd, slb, slh, slt,
                     sgkb, sgkh, sgkt, sgkd, sgvb, sgvh, sgvt, sgvd,
                     H, T, DK, DV, L, U, lo, hi, scale, qk_scale, T_KEY, W_KEY,
                     HAS_PAD: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per key block: dk, dv and the key rows of dP (dP[j, r(i,j)] += scale·dS_ij)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    k_base = K + off_b * skb + off_h * skh
    v_base = V + off_b * svb + off_h * svh
    p_base = P + off_b * spb + off_h * sph
    R = L + U + 1
    dp_base = DPK + pid_bh.to(tl.int64) * T * R  # contiguous float32 [B*H, T, R]

    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_n = offs_n < T
    mask_dk = offs_dk < DK
    mask_dv = offs_dv < DV
    kT = tl.load(k_base + offs_n[None, :] * skt + offs_dk[:, None] * skd,
                 mask=mask_n[None, :] & mask_dk[:, None], other=0.0)
    vT = tl.load(v_base + offs_n[None, :] * svt + offs_dv[:, None] * svd,
                 mask=mask_n[None, :] & mask_dv[:, None], other=0.0)
    pcol_lo = tl.load(p_base + offs_n * spt, mask=mask_n, other=0.0).to(tl.float32)
    pcol_hi = tl.load(p_base + offs_n * spt + (L + U) * spr, mask=mask_n, other=0.0).to(tl.float32)
    kvalid = mask_n
    if HAS_PAD:
        pad = tl.load(PAD + off_b * spadb + offs_n * spadt, mask=mask_n, other=1)
        kvalid = kvalid & (pad == 0)

    dk = tl.zeros([BLOCK_N, BLOCK_DK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    acc_lo = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum of dS over the i in bucket 0
    acc_hi = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum of dS over the i in bucket R-1

    # query blocks meeting the band n0-hi <= i <= n0+BLOCK_N-1-lo; none when the key block lies
    # outside the non-padding span
    kv_lo, kv_hi = _key_range(KV, off_b, T, HAS_PAD)
    start_m = tl.maximum(n0 - hi, 0) // BLOCK_M * BLOCK_M
    end_m = tl.minimum(n0 + BLOCK_N - lo, T)
    end_m = tl.where((n0 < kv_hi) & (n0 + BLOCK_N > kv_lo), end_m, start_m)
    # ascending i: far-high (j - i >= U) first, then the band, then far-low (j - i <= -L)
    band_m, far_lo_m = _split(start_m, end_m, n0 - U - BLOCK_M + 2, n0 + BLOCK_N - 1 + L, BLOCK_M)
    q_base = Q + off_b * sqb + off_h * sqh
    do_base = DO + off_b * sdb + off_h * sdh
    lse_base = LSE + off_b * slb + off_h * slh
    delta_base = DELTA + pid_bh.to(tl.int64) * T
    dk, dv, acc_lo, acc_hi = _dkdv_loop(
        dk, dv, acc_lo, acc_hi, kT, vT, pcol_hi, q_base, do_base, lse_base, delta_base, p_base,
        dp_base, sqt, sqd, sdt, sdd, slt, spt, spr, offs_n, mask_n, kvalid, offs_dk, offs_dv, n0,
        start_m, band_m, T, DK, DV, L, U, lo, hi, scale, qk_scale, _FAR_HI, IEEE, BLOCK_M, BLOCK_N)
    dk, dv, acc_lo, acc_hi = _dkdv_loop(
        dk, dv, acc_lo, acc_hi, kT, vT, pcol_hi, q_base, do_base, lse_base, delta_base, p_base,
        dp_base, sqt, sqd, sdt, sdd, slt, spt, spr, offs_n, mask_n, kvalid, offs_dk, offs_dv, n0,
        band_m, far_lo_m, T, DK, DV, L, U, lo, hi, scale, qk_scale, _BAND, IEEE, BLOCK_M, BLOCK_N)
    dk, dv, acc_lo, acc_hi = _dkdv_loop(
        dk, dv, acc_lo, acc_hi, kT, vT, pcol_lo, q_base, do_base, lse_base, delta_base, p_base,
        dp_base, sqt, sqd, sdt, sdd, slt, spt, spr, offs_n, mask_n, kvalid, offs_dk, offs_dv, n0,
        far_lo_m, end_m, T, DK, DV, L, U, lo, hi, scale, qk_scale, _FAR_LO, IEEE, BLOCK_M, BLOCK_N)

    # A padding key gets no gradient; whatever its columns accumulated (it was never masked in
    # the loops) is dropped here, and its band dP stores were masked out.
    acc_lo = tl.where(kvalid, acc_lo, 0.0)
    acc_hi = tl.where(kvalid, acc_hi, 0.0)
    if R == 1:
        tl.store(dp_base + offs_n * R, (acc_lo + acc_hi) * scale, mask=mask_n)
    else:
        tl.store(dp_base + offs_n * R, acc_lo * scale, mask=mask_n)
        tl.store(dp_base + offs_n * R + (R - 1), acc_hi * scale, mask=mask_n)
    dk = tl.where(kvalid[:, None], dk * scale, 0.0)
    dv = tl.where(kvalid[:, None], dv, 0.0)
    gk_base = DK_OUT + off_b * sgkb + off_h * sgkh
    gv_base = DV_OUT + off_b * sgvb + off_h * sgvh
    tl.store(gk_base + offs_n[:, None] * sgkt + offs_dk[None, :] * sgkd,
             dk.to(DK_OUT.dtype.element_ty), mask=mask_n[:, None] & mask_dk[None, :])
    tl.store(gv_base + offs_n[:, None] * sgvt + offs_dv[None, :] * sgvd,
             dv.to(DV_OUT.dtype.element_ty), mask=mask_n[:, None] & mask_dv[None, :])


@triton.jit
def _dq_loop(dq, acc_lo, acc_hi, q, do, lse2, Di, prow, k_base, v_base, p_base, pad_base,
             dp_base, skt, skd, svt, svd, spt, spr, spadt, offs_m, mask_m, offs_dk, offs_dv, m0,
             n_start, n_end, T, DK, DV, L, U, lo, hi, scale, qk_scale,
             MODE: tl.constexpr, HAS_PAD: tl.constexpr, IEEE: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    R = L + U + 1
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n, kT, s = _key_tile_logits(q, prow, k_base, p_base, pad_base, skt, skd, spt, spr,
                                         spadt, offs_m, mask_m, offs_dk, m0, n0, T, DK, L, U, lo,
                                         hi, qk_scale, MODE, HAS_PAD, IEEE, BLOCK_M, BLOCK_N)
        mask_n = offs_n < T
        vT = tl.load(v_base + offs_n[None, :] * svt + offs_dv[:, None] * svd,
                     mask=mask_n[None, :] & (offs_dv < DV)[:, None], other=0.0)
        p = tl.exp2(s - lse2[:, None])
        dp = _dot(do, vT, IEEE)
        ds = p * (dp - Di[:, None])
        dq += _dot(ds.to(kT.dtype), tl.trans(kT), IEEE)
        if MODE == _FAR_LO:
            acc_lo += tl.sum(ds, 1)
        elif MODE == _FAR_HI:
            acc_hi += tl.sum(ds, 1)
        else:
            acc_lo, acc_hi = _band_dP(ds, offs_m, offs_n, mask_m, mask_n, L, U, acc_lo, acc_hi,
                                      dp_base + offs_m[:, None] * R, -scale, 1)
    return dq, acc_lo, acc_hi


@triton.jit
def _bwd_dq_kernel(Q, K, V, P, PAD, KV, DO, LSE, DELTA, DQ_OUT, DPQ,
                   sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
                   spb, sph, spt, spr, spadb, spadt, sdb, sdh, sdt, sdd, slb, slh, slt,
                   sgqb, sgqh, sgqt, sgqd,
                   H, T, DK, DV, L, U, lo, hi, scale, qk_scale, T_KEY, W_KEY,
                   HAS_PAD: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per query block: dq and the query rows of dP (dP[i, r(i,j)] -= scale·dS_ij)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    k_base = K + off_b * skb + off_h * skh
    v_base = V + off_b * svb + off_h * svh
    p_base = P + off_b * spb + off_h * sph
    pad_base = PAD + off_b * spadb
    R = L + U + 1
    dp_base = DPQ + pid_bh.to(tl.int64) * T * R  # contiguous float32 [B*H, T, R]

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < T
    mask_dk = offs_dk < DK
    q = tl.load(Q + off_b * sqb + off_h * sqh + offs_m[:, None] * sqt + offs_dk[None, :] * sqd,
                mask=mask_m[:, None] & mask_dk[None, :], other=0.0)
    do = tl.load(DO + off_b * sdb + off_h * sdh + offs_m[:, None] * sdt + offs_dv[None, :] * sdd,
                 mask=mask_m[:, None] & (offs_dv < DV)[None, :], other=0.0)
    lse2 = _lse2_for_probs(LSE + off_b * slb + off_h * slh, offs_m, mask_m, slt)
    Di = tl.load(DELTA + pid_bh.to(tl.int64) * T + offs_m, mask=mask_m, other=0.0)
    prow_lo = tl.load(p_base + offs_m * spt, mask=mask_m, other=0.0).to(tl.float32)
    prow_hi = tl.load(p_base + offs_m * spt + (L + U) * spr, mask=mask_m, other=0.0).to(tl.float32)

    dq = tl.zeros([BLOCK_M, BLOCK_DK], dtype=tl.float32)
    acc_lo = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_M], dtype=tl.float32)

    kv_lo, kv_hi = _key_range(KV, off_b, T, HAS_PAD)
    start_n = tl.maximum(tl.maximum(m0 + lo, kv_lo), 0) // BLOCK_N * BLOCK_N
    end_n = tl.minimum(tl.minimum(m0 + BLOCK_M + hi, T), kv_hi)
    band_n, far_hi_n = _split(start_n, end_n, m0 - L - BLOCK_N + 2, m0 + BLOCK_M - 1 + U, BLOCK_N)
    dq, acc_lo, acc_hi = _dq_loop(dq, acc_lo, acc_hi, q, do, lse2, Di, prow_lo, k_base, v_base,
                                  p_base, pad_base, dp_base, skt, skd, svt, svd, spt, spr, spadt,
                                  offs_m, mask_m, offs_dk, offs_dv, m0, start_n, band_n, T, DK,
                                  DV, L, U, lo, hi, scale, qk_scale, _FAR_LO, HAS_PAD, IEEE,
                                  BLOCK_M, BLOCK_N)
    dq, acc_lo, acc_hi = _dq_loop(dq, acc_lo, acc_hi, q, do, lse2, Di, prow_lo, k_base, v_base,
                                  p_base, pad_base, dp_base, skt, skd, svt, svd, spt, spr, spadt,
                                  offs_m, mask_m, offs_dk, offs_dv, m0, band_n, far_hi_n, T, DK,
                                  DV, L, U, lo, hi, scale, qk_scale, _BAND, HAS_PAD, IEEE,
                                  BLOCK_M, BLOCK_N)
    dq, acc_lo, acc_hi = _dq_loop(dq, acc_lo, acc_hi, q, do, lse2, Di, prow_hi, k_base, v_base,
                                  p_base, pad_base, dp_base, skt, skd, svt, svd, spt, spr, spadt,
                                  offs_m, mask_m, offs_dk, offs_dv, m0, far_hi_n, end_n, T, DK,
                                  DV, L, U, lo, hi, scale, qk_scale, _FAR_HI, HAS_PAD, IEEE,
                                  BLOCK_M, BLOCK_N)

    if R == 1:
        tl.store(dp_base + offs_m * R, -(acc_lo + acc_hi) * scale, mask=mask_m)
    else:
        tl.store(dp_base + offs_m * R, -acc_lo * scale, mask=mask_m)
        tl.store(dp_base + offs_m * R + (R - 1), -acc_hi * scale, mask=mask_m)
    gq_base = DQ_OUT + off_b * sgqb + off_h * sgqh
    tl.store(gq_base + offs_m[:, None] * sgqt + offs_dk[None, :] * sgqd,
             (dq * scale).to(DQ_OUT.dtype.element_ty), mask=mask_m[:, None] & mask_dk[None, :])


# Autotuned on a GPU; one fixed small configuration under the interpreter (no benchmarking).
# Every kernel is idempotent (plain stores into its own rows), so re-running it while tuning is
# harmless.
def _autotune(kind, kernel):
    return triton.autotune(_configs(kind), key=_TUNE_KEY,
                           prune_configs_by={"early_config_prune": _make_prune(kind)})(kernel)


_fwd = _autotune("fwd", _fwd_kernel)
_bwd_dkdv = _autotune("dkdv", _bwd_dkdv_kernel)
_bwd_dq = _autotune("dq", _bwd_dq_kernel)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _count(name: str) -> None:
    if not torch.compiler.is_compiling():
        launch_counts[name] += 1


def _check(q, k, v, P, key_padding_mask, L, U, window_left, window_right, what: str):
    for name, t in (("q", q), ("k", k), ("v", v), ("P", P)):
        if t.dim() != 4:
            raise ValueError(f"{what}: {name} must be 4-D, got shape {tuple(t.shape)}")
    if q.dtype not in _SUPPORTED:
        raise TypeError(f"{what}: the Triton kernels support float16, bfloat16 and float32 "
                        f"inputs, got {q.dtype}" + (" (Triton's tl.dot has no float64; use "
                                                    "backend='cpu' or 'cuda')"
                                                    if q.dtype == torch.float64 else ""))
    for name, t in (("k", k), ("v", v), ("P", P)):
        if t.dtype != q.dtype:
            raise TypeError(f"{what}: {name} has dtype {t.dtype} but q has {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{what}: {name} is on {t.device} but q is on {q.device}")
    if q.device.type == "cpu" and not INTERPRET:
        raise RuntimeError(f"{what}: Triton needs a GPU, or the interpreter for CPU tensors "
                           "(set TRITON_INTERPRET=1 before importing triton); got CPU tensors")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{what}: the Triton kernels run CUDA tensors (or CPU tensors under "
                         f"TRITON_INTERPRET=1), got tensors on {q.device}")
    B, H, T, Dk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"{what}: k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{what}: v must be [B,H,T,Dv] with [B,H,T]={tuple(q.shape[:3])}, "
                         f"got {tuple(v.shape)}")
    Dv = v.shape[-1]
    if Dk > MAX_HEAD_DIM or Dv > MAX_HEAD_DIM:
        raise ValueError(f"{what}: the Triton kernels support head dims up to {MAX_HEAD_DIM}, "
                         f"got Dk={Dk}, Dv={Dv}")
    if L < 0 or U < 0:
        raise ValueError(f"{what}: L and U must be non-negative, got L={L}, U={U}")
    R = L + U + 1
    if P.shape[0] != B or P.shape[1] not in (1, H) or P.shape[2] != T or P.shape[3] != R:
        raise ValueError(f"{what}: P must be [B,Hp,T,R] = [{B},1 or {H},{T},{R}] (R = L+U+1), "
                         f"got {tuple(P.shape)}")
    if window_left < -1 or window_right < -1:
        raise ValueError(f"{what}: window_left/window_right must be >= 0, or -1 for unbounded; "
                         f"got {window_left}, {window_right}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, T):
            raise ValueError(f"{what}: key_padding_mask must be a bool [B,T]=[{B},{T}] tensor, got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"{what}: key_padding_mask is on {key_padding_mask.device} but q is "
                             f"on {q.device}")


def _key_span(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """int32 [B, 2]: the first and one past the last non-padding key of each batch element
    ([0, 0] when every key is padding); the kernels skip key blocks outside it."""
    valid = ~key_padding_mask
    T = valid.shape[1]
    first = valid.to(torch.uint8).argmax(1)
    end = T - valid.flip(1).to(torch.uint8).argmax(1)
    span = torch.stack((first, end), 1)
    return torch.where(valid.any(1, keepdim=True), span, 0).to(torch.int32).contiguous()


def _launch(kind, tuned, raw, grid, *args, **meta):
    """Launch the autotuned kernel, or the raw one with the configuration forced_configs set."""
    _count({"fwd": "fwd", "dkdv": "bwd_dkdv", "dq": "bwd_dq"}[kind])
    forced = _FORCED.get(kind)
    if forced is None or torch.compiler.is_compiling():
        wrap_triton(tuned)[grid](*args, **meta)
    else:
        raw[grid(forced)](*args, **meta, **forced)


def _common(q, v, P, key_padding_mask, L, U, window_left, window_right):
    """Launch arguments shared by the kernels."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    lo = -T if window_left < 0 else -min(window_left, T)
    hi = T if window_right < 0 else min(window_right, T)
    if key_padding_mask is None:
        pad, pad_strides, kv, has_pad = q, (0, 0), q, False  # never read
    else:
        pad = key_padding_mask.view(torch.uint8)
        pad_strides, kv, has_pad = pad.stride(), _key_span(key_padding_mask), True
    sP = P.stride()
    p_strides = (sP[0], 0 if P.shape[1] == 1 else sP[1], sP[2], sP[3])
    meta = dict(H=H, T=T, DK=Dk, DV=Dv, L=L, U=U, lo=lo, hi=hi,
                T_KEY=triton.next_power_of_2(T),
                W_KEY=triton.next_power_of_2(min(hi - lo + 1, 2 * T)),
                HAS_PAD=has_pad, IEEE=q.dtype == torch.float32,
                BLOCK_DK=max(16, triton.next_power_of_2(Dk)),
                BLOCK_DV=max(16, triton.next_power_of_2(Dv)))
    return pad, kv, pad_strides, p_strides, meta


@triton_op("hdaf::triton_delta_attention_forward", mutates_args=())
def triton_delta_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   P: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                                   L: int, U: int, window_left: int, window_right: int,
                                   scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out [B,H,T,Dv] in q's dtype, lse [B,H,T] float32); see docs/delta_attention.md."""
    _check(q, k, v, P, key_padding_mask, L, U, window_left, window_right,
           "hdaf::triton_delta_attention_forward")
    B, H, T, _ = q.shape
    out = q.new_empty((B, H, T, v.shape[-1]))
    lse = q.new_empty((B, H, T), dtype=torch.float32)
    if B * H * T == 0:
        return out, lse
    pad, kv, pad_strides, p_strides, meta = _common(q, v, P, key_padding_mask, L, U,
                                                    window_left, window_right)

    def grid(m):
        return (triton.cdiv(T, m["BLOCK_M"]), B * H)

    _launch("fwd", _fwd, _fwd_kernel, grid, q, k, v, P, pad, kv, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *p_strides, *pad_strides,
            *out.stride(), *lse.stride(), qk_scale=scale * _LOG2E, **meta)
    return out, lse


@triton_op("hdaf::triton_delta_attention_backward", mutates_args=())
def triton_delta_attention_backward(
        grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        P: torch.Tensor, key_padding_mask: Optional[torch.Tensor], out: torch.Tensor,
        lse: torch.Tensor, L: int, U: int, window_left: int, window_right: int,
        scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_q, grad_k, grad_v, grad_P) with grad_P of P's shape; deterministic (no atomics)."""
    what = "hdaf::triton_delta_attention_backward"
    _check(q, k, v, P, key_padding_mask, L, U, window_left, window_right, what)
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    if grad_out.shape != (B, H, T, Dv) or out.shape != (B, H, T, Dv):
        raise ValueError(f"{what}: grad_out and out must be [B,H,T,Dv]={(B, H, T, Dv)}, got "
                         f"{tuple(grad_out.shape)} and {tuple(out.shape)}")
    if lse.shape != (B, H, T) or lse.dtype != torch.float32:
        raise ValueError(f"{what}: lse must be float32 [B,H,T]={(B, H, T)}, got {lse.dtype} "
                         f"{tuple(lse.shape)}")
    grad_out = grad_out.to(q.dtype)
    R = L + U + 1
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if B * H * T == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(P)
    pad, kv, pad_strides, p_strides, meta = _common(q, v, P, key_padding_mask, L, U,
                                                    window_left, window_right)
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    # the key-row half [0] and the query-row half [1] of dP, per head; summed once at the end
    dP_halves = torch.zeros((2, B, H, T, R), dtype=torch.float32, device=q.device)

    block_pre = 16 if INTERPRET else 64
    _count("bwd_preprocess")
    wrap_triton(_bwd_preprocess_kernel)[(triton.cdiv(T, block_pre), B * H)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), H, T, Dv,
        BLOCK_M=block_pre, BLOCK_DV=meta["BLOCK_DV"])

    common = (*q.stride(), *k.stride(), *v.stride(), *p_strides, *pad_strides,
              *grad_out.stride(), *lse.stride())

    def grid_n(m):
        return (triton.cdiv(T, m["BLOCK_N"]), B * H)

    def grid_m(m):
        return (triton.cdiv(T, m["BLOCK_M"]), B * H)

    _launch("dkdv", _bwd_dkdv, _bwd_dkdv_kernel, grid_n, q, k, v, P, pad, kv, grad_out, lse,
            delta, dk, dv, dP_halves[0], *common, *dk.stride(), *dv.stride(),
            scale=scale, qk_scale=scale * _LOG2E, **meta)
    _launch("dq", _bwd_dq, _bwd_dq_kernel, grid_m, q, k, v, P, pad, kv, grad_out, lse, delta,
            dq, dP_halves[1], *common, *dq.stride(),
            scale=scale, qk_scale=scale * _LOG2E, **meta)
    if P.shape[1] == 1 and H != 1:  # P shared by the heads: one reduction over halves and heads
        dP = dP_halves.sum(dim=(0, 2)).unsqueeze(1)
    else:
        dP = dP_halves.sum(dim=0)
    return dq, dk, dv, dP.to(P.dtype)


triton_delta_attention_forward.register_fake(_ops.fake_forward)
triton_delta_attention_backward.register_fake(_ops.fake_backward)
_ops.register_delta_autograd("hdaf::triton_delta_attention_forward",
                             "hdaf::triton_delta_attention_backward")
