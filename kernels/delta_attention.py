"""Fused Triton kernels of the delta-attention operator (spec: ``docs/delta_attention.md``).

Registers ``hdaf::triton_delta_attention_forward`` and ``hdaf::triton_delta_attention_backward``
(``torch.library.triton_op``, the signatures of the C++ ``hdaf::delta_attention_*`` op), their
fake implementations (:func:`hdaf.ops.fake_forward` / :func:`hdaf.ops.fake_backward`) and the
autograd formula (:func:`hdaf.ops.register_delta_autograd`).

Kernels (one program per tile of ``BLOCK_M`` queries or ``BLOCK_N`` keys of one (batch, head)):

* ``_fwd_kernel``: flash-style online softmax in float32 over the *band* of key blocks that the
  window / causal mask leaves visible (cost O(T·window)); the bias ``P[j,r(i,j)] - P[i,r(i,j)]``
  is gathered from ``P`` inside the tile (vector loads when a whole tile is clipped to one
  bucket), never materialised as a T×T tensor. Writes ``out`` and ``lse`` (``-inf`` and
  ``out = 0`` for a query with no visible key). Key blocks that are entirely padding are skipped
  too (a scalar test per tile).
* ``_bwd_preprocess_kernel``: ``D_i = dout_i·out_i`` (float32).
* ``_bwd_dkdv_kernel`` (one program per key block): ``dk``, ``dv`` and the *key rows* of ``dP``
  (``+scale·dS_ij`` into ``dP[j, r(i,j)]``).
* ``_bwd_dq_kernel`` (one program per query block): ``dq`` and the *query rows* of ``dP``
  (``-scale·dS_ij`` into ``dP[i, r(i,j)]``).

Row ownership makes every write of a program land in rows no other program writes. Inside a
program, unclipped buckets never collide (for a fixed row, each unclipped bucket ``r`` belongs
to exactly one partner position), so they are written with plain stores; the two clipped
buckets ``0`` and ``R-1``, where many partners collide, are summed by in-register reductions
and stored once at the end. The key-row and query-row halves go into two float32 buffers that
are added afterwards, and with a shared ``P`` (``Hp = 1``) the per-head buffers are summed over
heads with ``torch.sum``.

Determinism: no atomics are used, so forward and backward are bitwise deterministic for a given
block configuration. On a GPU the block sizes are autotuned (per sequence-length / window /
head-dim bucket, dtype and device); two processes that pick different configurations may differ
in the last bits (summation order), as with any autotuned kernel.

Supported: float16, bfloat16, float32 (float32 ``tl.dot`` runs with ``input_precision="ieee"``,
i.e. no TF32); head dims ``Dk, Dv <= 128`` (padded to a power of two with masks), ``Dk != Dv``.
float64 is rejected with a TypeError (Triton's ``tl.dot`` has no float64). CPU tensors run only
under the Triton interpreter, with one small fixed block configuration and the very same
launcher code (``triton_op`` runs CPU tensors there). ``TRITON_INTERPRET=1`` must be set before
``triton.language`` is first imported — ``import torch._dynamo`` (hence ``import hdaf``) imports
it — or importing this module raises an ImportError saying so. Under the interpreter (only),
bfloat16 ``tl.dot`` operands are widened to float32, working around an interpreter bug.
Tracing with ``torch.compile`` / ``opcheck``'s ``test_aot_dispatch_dynamic`` needs a GPU (the
interpreter cannot run the functionalised kernels on FakeTensor-backed storages).
"""
from __future__ import annotations

import collections
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


# ----------------------------------------------------------------------------------------------
# Block-size configurations
# ----------------------------------------------------------------------------------------------

def _configs(kind: str):
    if INTERPRET:  # the interpreter runs each program in numpy: small fixed tiles, no tuning
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    if kind == "fwd":
        shapes = [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3),
                  (64, 32, 4, 2), (32, 32, 4, 2), (16, 16, 2, 2)]
    else:  # backward kernels keep more accumulators live: smaller tiles
        shapes = [(64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2), (16, 16, 2, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in shapes]


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles larger than the sequence, and the largest float32 tiles (shared memory)."""
    args = {**named_args, **kwargs}
    t = max(16, args["T_KEY"])
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= t and c.kwargs["BLOCK_N"] <= t]
    if args.get("IEEE"):
        keep = [c for c in keep if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


_TUNE_KEY = ["T_KEY", "W_KEY", "BLOCK_DK", "BLOCK_DV", "HAS_PAD", "IEEE"]


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _bias_tile(p_base, stride_pt, stride_pr, offs_m, offs_n, m0, n0, T, L, U,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """float32 [BLOCK_M, BLOCK_N]: P[j, r(i,j)] - P[i, r(i,j)] (0 outside [0,T)²)."""
    mask_m = offs_m < T
    mask_n = offs_n < T
    d_min = n0 - (m0 + BLOCK_M - 1)  # smallest j - i in the tile
    d_max = n0 + BLOCK_N - 1 - m0  # largest j - i in the tile
    # (each branch uses its own names: the compiler wants one type per name across branches)
    if d_min >= U:  # the whole tile falls in the top bucket R-1 = L+U
        hk = tl.load(p_base + offs_n * stride_pt + (L + U) * stride_pr, mask=mask_n, other=0.0)
        hq = tl.load(p_base + offs_m * stride_pt + (L + U) * stride_pr, mask=mask_m, other=0.0)
        bias = hk.to(tl.float32)[None, :] - hq.to(tl.float32)[:, None]
    elif d_max <= -L:  # the whole tile falls in bucket 0
        lk = tl.load(p_base + offs_n * stride_pt, mask=mask_n, other=0.0)
        lq = tl.load(p_base + offs_m * stride_pt, mask=mask_m, other=0.0)
        bias = lk.to(tl.float32)[None, :] - lq.to(tl.float32)[:, None]
    else:  # gather both scalars per pair
        d = offs_n[None, :] - offs_m[:, None]
        r = tl.minimum(tl.maximum(d, -L), U) + L
        valid = mask_m[:, None] & mask_n[None, :]
        gk = tl.load(p_base + offs_n[None, :] * stride_pt + r * stride_pr, mask=valid, other=0.0)
        gq = tl.load(p_base + offs_m[:, None] * stride_pt + r * stride_pr, mask=valid, other=0.0)
        bias = gk.to(tl.float32) - gq.to(tl.float32)
    return bias


@triton.jit
def _visible_tile(pad_base, stride_padt, offs_m, offs_n, T, lo, hi, HAS_PAD: tl.constexpr):
    """bool [BLOCK_M, BLOCK_N]: key j visible from query i (band, bounds, padding)."""
    d = offs_n[None, :] - offs_m[:, None]
    mask_n = offs_n < T
    vis = (d >= lo) & (d <= hi) & (offs_m[:, None] < T) & mask_n[None, :]
    if HAS_PAD:
        pad = tl.load(pad_base + offs_n * stride_padt, mask=mask_n, other=1)
        vis = vis & (pad == 0)[None, :]
    return vis


# The interpreter (triton 3.8) computes tl.dot of bfloat16 operands wrongly; there, and only
# there, bfloat16 operands are widened to float32 first (exact: bf16 products fit in float32).
_WIDEN_BF16_DOT = tl.constexpr(INTERPRET)


@triton.jit
def _any_key(pad_base, stride_padt, offs_n, T, HAS_PAD: tl.constexpr):
    """Scalar: the key block holds at least one key that is in range and not padding."""
    if HAS_PAD:
        pad = tl.load(pad_base + offs_n * stride_padt, mask=offs_n < T, other=1)
        n = tl.sum((pad == 0).to(tl.int32), 0)
    else:
        n = tl.sum((offs_n < T).to(tl.int32), 0)
    return n > 0


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if _WIDEN_BF16_DOT and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _fwd_kernel(Q, K, V, P, PAD, OUT, LSE,
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
    q_base = Q + off_b * sqb + off_h * sqh
    k_base = K + off_b * skb + off_h * skh
    v_base = V + off_b * svb + off_h * svh
    p_base = P + off_b * spb + off_h * sph
    pad_base = PAD + off_b * spadb

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < T
    q = tl.load(q_base + offs_m[:, None] * sqt + offs_dk[None, :] * sqd,
                mask=mask_m[:, None] & (offs_dk < DK)[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # only the key blocks that intersect the band m0+lo <= j <= m0+BLOCK_M-1+hi
    start_n = (tl.maximum(m0 + lo, 0) // BLOCK_N) * BLOCK_N
    end_n = tl.minimum(m0 + BLOCK_M + hi, T)
    for n0 in range(start_n, end_n, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if _any_key(pad_base, spadt, offs_n, T, HAS_PAD):  # skip fully padded key blocks
            mask_n = offs_n < T
            kT = tl.load(k_base + offs_n[None, :] * skt + offs_dk[:, None] * skd,
                         mask=mask_n[None, :] & (offs_dk < DK)[:, None], other=0.0)
            qk = _dot(q, kT, IEEE)
            bias = _bias_tile(p_base, spt, spr, offs_m, offs_n, m0, n0, T, L, U, BLOCK_M, BLOCK_N)
            vis = _visible_tile(pad_base, spadt, offs_m, offs_n, T, lo, hi, HAS_PAD)
            s = tl.where(vis, (qk + bias) * qk_scale, float("-inf"))  # log2 domain
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_n[:, None] * svt + offs_dv[None, :] * svd,
                        mask=mask_n[:, None] & (offs_dv < DV)[None, :], other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
            m_i = m_new

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
def _bwd_probs(q, kT, p_base, spt, spr, pad_base, spadt, lse2, offs_m, offs_n, m0, n0,
               T, L, U, lo, hi, qk_scale, HAS_PAD: tl.constexpr, IEEE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """p_ij = exp(logit_ij - lse_i) on the tile, 0 where not visible."""
    qk = _dot(q, kT, IEEE)
    bias = _bias_tile(p_base, spt, spr, offs_m, offs_n, m0, n0, T, L, U, BLOCK_M, BLOCK_N)
    vis = _visible_tile(pad_base, spadt, offs_m, offs_n, T, lo, hi, HAS_PAD)
    vis = vis & (lse2 != float("-inf"))[:, None]
    lse_safe = tl.where(lse2 == float("-inf"), 0.0, lse2)
    return tl.where(vis, tl.exp2((qk + bias) * qk_scale - lse_safe[:, None]), 0.0)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, P, PAD, DO, LSE, DELTA, DK_OUT, DV_OUT, DPK,
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
    q_base = Q + off_b * sqb + off_h * sqh
    k_base = K + off_b * skb + off_h * skh
    v_base = V + off_b * svb + off_h * svh
    p_base = P + off_b * spb + off_h * sph
    do_base = DO + off_b * sdb + off_h * sdh
    pad_base = PAD + off_b * spadb
    lse_base = LSE + off_b * slb + off_h * slh
    delta_base = DELTA + pid_bh.to(tl.int64) * T
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

    dk = tl.zeros([BLOCK_N, BLOCK_DK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    acc_lo = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum of dS over the i in bucket 0
    acc_hi = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum of dS over the i in bucket R-1

    # only the query blocks that intersect the band n0-hi <= i <= n0+BLOCK_N-1-lo
    start_m = (tl.maximum(n0 - hi, 0) // BLOCK_M) * BLOCK_M
    end_m = tl.minimum(n0 + BLOCK_N - lo, T)
    end_m = tl.where(_any_key(pad_base, spadt, offs_n, T, HAS_PAD), end_m, start_m)  # all padding
    for m0 in range(start_m, end_m, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < T
        q = tl.load(q_base + offs_m[:, None] * sqt + offs_dk[None, :] * sqd,
                    mask=mask_m[:, None] & mask_dk[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdt + offs_dv[None, :] * sdd,
                     mask=mask_m[:, None] & mask_dv[None, :], other=0.0)
        lse = tl.load(lse_base + offs_m * slt, mask=mask_m, other=float("-inf"))
        Di = tl.load(delta_base + offs_m, mask=mask_m, other=0.0)
        p = _bwd_probs(q, kT, p_base, spt, spr, pad_base, spadt, lse * 1.4426950408889634,
                       offs_m, offs_n, m0, n0, T, L, U, lo, hi, qk_scale, HAS_PAD, IEEE,
                       BLOCK_M, BLOCK_N)
        dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
        dp = _dot(do, vT, IEEE)
        ds = p * (dp - Di[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)

        d = offs_n[None, :] - offs_m[:, None]
        lower = d <= -L
        upper = (d >= U) & (d > -L)
        acc_lo += tl.sum(tl.where(lower, ds, 0.0), 0)
        acc_hi += tl.sum(tl.where(upper, ds, 0.0), 0)
        if (n0 + BLOCK_N - 1 - m0 > -L) & (n0 - (m0 + BLOCK_M - 1) < U):  # unclipped pairs
            mid = (d > -L) & (d < U) & mask_m[:, None] & mask_n[None, :]
            tl.store(dp_base + offs_n[None, :] * R + (d + L), ds * scale, mask=mid)

    if R == 1:
        tl.store(dp_base + offs_n * R, (acc_lo + acc_hi) * scale, mask=mask_n)
    else:
        tl.store(dp_base + offs_n * R, acc_lo * scale, mask=mask_n)
        tl.store(dp_base + offs_n * R + (R - 1), acc_hi * scale, mask=mask_n)
    gk_base = DK_OUT + off_b * sgkb + off_h * sgkh
    gv_base = DV_OUT + off_b * sgvb + off_h * sgvh
    tl.store(gk_base + offs_n[:, None] * sgkt + offs_dk[None, :] * sgkd,
             (dk * scale).to(DK_OUT.dtype.element_ty), mask=mask_n[:, None] & mask_dk[None, :])
    tl.store(gv_base + offs_n[:, None] * sgvt + offs_dv[None, :] * sgvd,
             dv.to(DV_OUT.dtype.element_ty), mask=mask_n[:, None] & mask_dv[None, :])


@triton.jit
def _bwd_dq_kernel(Q, K, V, P, PAD, DO, LSE, DELTA, DQ_OUT, DPQ,
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
    q_base = Q + off_b * sqb + off_h * sqh
    k_base = K + off_b * skb + off_h * skh
    v_base = V + off_b * svb + off_h * svh
    p_base = P + off_b * spb + off_h * sph
    do_base = DO + off_b * sdb + off_h * sdh
    pad_base = PAD + off_b * spadb
    R = L + U + 1
    dp_base = DPQ + pid_bh.to(tl.int64) * T * R  # contiguous float32 [B*H, T, R]

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < T
    mask_dk = offs_dk < DK
    mask_dv = offs_dv < DV
    q = tl.load(q_base + offs_m[:, None] * sqt + offs_dk[None, :] * sqd,
                mask=mask_m[:, None] & mask_dk[None, :], other=0.0)
    do = tl.load(do_base + offs_m[:, None] * sdt + offs_dv[None, :] * sdd,
                 mask=mask_m[:, None] & mask_dv[None, :], other=0.0)
    lse = tl.load(LSE + off_b * slb + off_h * slh + offs_m * slt, mask=mask_m, other=float("-inf"))
    lse2 = lse * 1.4426950408889634
    Di = tl.load(DELTA + pid_bh.to(tl.int64) * T + offs_m, mask=mask_m, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_DK], dtype=tl.float32)
    acc_lo = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_M], dtype=tl.float32)

    start_n = (tl.maximum(m0 + lo, 0) // BLOCK_N) * BLOCK_N
    end_n = tl.minimum(m0 + BLOCK_M + hi, T)
    for n0 in range(start_n, end_n, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if _any_key(pad_base, spadt, offs_n, T, HAS_PAD):  # skip fully padded key blocks
            mask_n = offs_n < T
            kT = tl.load(k_base + offs_n[None, :] * skt + offs_dk[:, None] * skd,
                         mask=mask_n[None, :] & mask_dk[:, None], other=0.0)
            vT = tl.load(v_base + offs_n[None, :] * svt + offs_dv[:, None] * svd,
                         mask=mask_n[None, :] & mask_dv[:, None], other=0.0)
            p = _bwd_probs(q, kT, p_base, spt, spr, pad_base, spadt, lse2, offs_m, offs_n, m0, n0,
                           T, L, U, lo, hi, qk_scale, HAS_PAD, IEEE, BLOCK_M, BLOCK_N)
            dp = _dot(do, vT, IEEE)
            ds = p * (dp - Di[:, None])
            dq += _dot(ds.to(kT.dtype), tl.trans(kT), IEEE)

            d = offs_n[None, :] - offs_m[:, None]
            lower = d <= -L
            upper = (d >= U) & (d > -L)
            acc_lo += tl.sum(tl.where(lower, ds, 0.0), 1)
            acc_hi += tl.sum(tl.where(upper, ds, 0.0), 1)
            if (n0 + BLOCK_N - 1 - m0 > -L) & (n0 - (m0 + BLOCK_M - 1) < U):  # unclipped pairs
                mid = (d > -L) & (d < U) & mask_m[:, None] & mask_n[None, :]
                tl.store(dp_base + offs_m[:, None] * R + (d + L), -ds * scale, mask=mid)

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
                           prune_configs_by={"early_config_prune": _prune_configs})(kernel)


_fwd = _autotune("fwd", _fwd_kernel)
_bwd_dkdv = _autotune("bwd", _bwd_dkdv_kernel)
_bwd_dq = _autotune("bwd", _bwd_dq_kernel)


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


def _common(q, v, P, key_padding_mask, L, U, window_left, window_right):
    """Launch arguments shared by the kernels."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    lo = -T if window_left < 0 else -min(window_left, T)
    hi = T if window_right < 0 else min(window_right, T)
    if key_padding_mask is None:
        pad, pad_strides, has_pad = q, (0, 0), False  # never read
    else:
        pad = key_padding_mask.view(torch.uint8)
        pad_strides, has_pad = pad.stride(), True
    sP = P.stride()
    p_strides = (sP[0], 0 if P.shape[1] == 1 else sP[1], sP[2], sP[3])
    meta = dict(H=H, T=T, DK=Dk, DV=Dv, L=L, U=U, lo=lo, hi=hi,
                T_KEY=triton.next_power_of_2(T),
                W_KEY=triton.next_power_of_2(min(hi - lo + 1, 2 * T)),
                HAS_PAD=has_pad, IEEE=q.dtype == torch.float32,
                BLOCK_DK=max(16, triton.next_power_of_2(Dk)),
                BLOCK_DV=max(16, triton.next_power_of_2(Dv)))
    return pad, pad_strides, p_strides, meta


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
    pad, pad_strides, p_strides, meta = _common(q, v, P, key_padding_mask, L, U,
                                                window_left, window_right)

    def grid(m):
        return (triton.cdiv(T, m["BLOCK_M"]), B * H)

    _count("fwd")
    wrap_triton(_fwd)[grid](q, k, v, P, pad, out, lse,
                            *q.stride(), *k.stride(), *v.stride(), *p_strides, *pad_strides,
                            *out.stride(), *lse.stride(),
                            qk_scale=scale * _LOG2E, **meta)
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
    pad, pad_strides, p_strides, meta = _common(q, v, P, key_padding_mask, L, U,
                                                window_left, window_right)
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    dP_key = torch.zeros((B, H, T, R), dtype=torch.float32, device=q.device)
    dP_query = torch.zeros((B, H, T, R), dtype=torch.float32, device=q.device)

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

    _count("bwd_dkdv")
    wrap_triton(_bwd_dkdv)[grid_n](q, k, v, P, pad, grad_out, lse, delta, dk, dv, dP_key,
                                   *common, *dk.stride(), *dv.stride(),
                                   scale=scale, qk_scale=scale * _LOG2E, **meta)
    _count("bwd_dq")
    wrap_triton(_bwd_dq)[grid_m](q, k, v, P, pad, grad_out, lse, delta, dq, dP_query,
                                 *common, *dq.stride(),
                                 scale=scale, qk_scale=scale * _LOG2E, **meta)
    dP = dP_key.add_(dP_query)
    if P.shape[1] == 1 and H != 1:
        dP = dP.sum(dim=1, keepdim=True)
    return dq, dk, dv, dP.to(P.dtype)


triton_delta_attention_forward.register_fake(_ops.fake_forward)
triton_delta_attention_backward.register_fake(_ops.fake_backward)
_ops.register_delta_autograd("hdaf::triton_delta_attention_forward",
                             "hdaf::triton_delta_attention_backward")
