"""Triton backend of the delta-attention operator: launchers, autotune lists, op registration.

Spec: ``docs/delta_attention.md``. The kernels live beside this file, one file per family:

* ``delta_attention_tiles.py``: the band/far tile split and the helpers the kernels share;
* ``delta_attention_fwd.py``: the forward (``out``, ``lse``);
* ``delta_attention_bwd.py``: the backward (row vectors, then dK/dV, then dQ with dP).

This module registers ``hdaf::triton_delta_attention_forward`` and
``hdaf::triton_delta_attention_backward`` (``torch.library.triton_op``, the signatures of the C++
``hdaf::delta_attention_*`` ops), their fake implementations (:func:`hdaf.ops.fake_forward` /
:func:`hdaf.ops.fake_backward`) and the autograd formula (:func:`hdaf.ops.register_delta_autograd`);
likewise the packed-batch ``..._varlen_*`` and the global-position ``..._block_*`` ops (a block
is the same kernels with the queries at ``q_start − k_start + i`` and their rows of P after the
keys', :class:`_Layout`).

**Host-side vectors.** With ``P = x·w`` and ``c = scale·log2 e``, the launcher builds
``KCOL [B, Hp, 3, T]`` (float32): ``c·P[j, 0]``, ``c·P[j, R−1]`` and ``0``, each ``−inf`` at
padding keys. A far tile's bias is then one contiguous vector load; padding costs no mask.
Key blocks outside each batch element's span of non-padding keys are skipped by loop bounds
(computed on the host, :func:`_key_span`); no kernel reduces a mask inside a loop.

**Without the delta term** (a ``P`` with no bucket column, R = 0, or ``use_delta=False``) the
kernels compile their plain path: flash attention with no ``P`` traffic, and ``grad_P`` is 0.

**Determinism.** No atomics: every program writes its own rows, and the two halves of ``dP``
(key rows, query rows) are added by one ``torch.sum``. Results are bitwise reproducible for a
given block configuration; on a GPU the configuration is autotuned per (sequence-length bucket,
window bucket, head dims, padding, dtype), and :func:`forced_configs` pins it.

Supported: float16, bfloat16, float32 (float32 ``tl.dot`` runs with ``input_precision="ieee"``,
no TF32); head dims ``Dk, Dv <= 128`` (padded to a power of two with masks), ``Dk != Dv``.
float64 is rejected with a TypeError (Triton's ``tl.dot`` has no float64). CPU tensors run only
under the Triton interpreter, with one small fixed block configuration (or the ones
:func:`forced_configs` sets) and the very same launcher code. ``TRITON_INTERPRET=1`` must be set
before ``triton.language`` is first imported — ``import torch._dynamo`` (hence ``import hdaf``)
imports it — or importing this module raises an ImportError saying so. Tracing with
``torch.compile`` needs a GPU (the interpreter cannot run the functionalised kernels on
FakeTensor-backed storages).

:func:`capture_launches` records the launches a call would make instead of making them; the
static machine-code profile (``bench/static_profile.py``) compiles exactly those.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
from typing import Callable, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from torch.utils.weak import WeakIdKeyDictionary

from hdaf import ops as _ops

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET:
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction

    if not isinstance(tl.zeros, _InterpretedFunction):
        raise ImportError(
            "TRITON_INTERPRET=1 was set after triton.language had been imported (torch._dynamo, "
            "which `import hdaf` loads, imports it), so Triton's own library functions are not "
            "interpretable: set TRITON_INTERPRET=1 before importing torch / hdaf")

from .delta_attention_bwd import bwd_dkdv_kernel, bwd_dq_kernel, bwd_rows_kernel  # noqa: E402
from .delta_attention_fwd import fwd_kernel  # noqa: E402
from .delta_attention_tiles import gather_tile  # noqa: E402

MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)

#: Kernel launches made by the launchers in eager mode, by kernel name (tests use it to prove
#: that the Triton kernels, not a fallback, served a call). Not updated under torch.compile.
launch_counts: collections.Counter = collections.Counter()

#: Host-side arrays the launchers built, by name ("key_columns": KCOL), in eager mode.
builds: collections.Counter = collections.Counter()

#: The hot loops of each kernel, in program order (the static profile labels them with this).
#: "masked": tiles crossing a window / causal edge (never met without a window); "far" / "band":
#: the unmasked tile kinds; "plain": no delta term.
LOOP_KINDS = dict.fromkeys(("fwd", "dkdv", "dq"), ("masked", "far", "band", "far", "masked"))
LOOP_KINDS_NO_DELTA = dict.fromkeys(("fwd", "dkdv", "dq"), ("masked", "plain", "masked"))



def loop_tile_shapes(kind: str, loop_kinds, block_m: int, block_n: int):
    """(BLOCK_M, BLOCK_N) of each hot loop's tile, for a program configuration: the gathering
    loops ("band", "masked") narrow the loop dimension (keys in the forward and dQ, queries in
    dK/dV) to ``gather_tile``. The static profile counts each loop's MACs from these."""
    shapes = []
    for lk in loop_kinds:
        gathers = lk in ("band", "masked")
        if kind == "dkdv":
            shapes.append((gather_tile(block_m) if gathers else block_m, block_n))
        else:
            shapes.append((block_m, gather_tile(block_n) if gathers else block_n))
    return shapes


# ----------------------------------------------------------------------------------------------
# Block-size configurations
# ----------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages, largest head dim): BLOCK_M queries and BLOCK_N keys
# per tile. The forward and dQ programs own BLOCK_M queries and loop over key tiles; the dK/dV
# programs own BLOCK_N keys (the matrix instructions' M dimension) and loop over query tiles.
# Each list is ordered best first by the static sm_90 profile (bench/static_profile.py), and no
# entry spills in a hot loop at the head dims it is kept for (a configuration whose registers
# overflow at head dim 128 is listed for head dims up to 64 only). Every entry gives each
# tl.dot an M dimension of at least 64 per warpgroup, so all of them lower to wgmma on sm_90
# (smaller tiles would fall back to mma.sync); _prune keeps the smallest entry when nothing
# else fits (short sequences, float32).
_FWD_SHAPES = [(128, 128, 8, 3, 64), (128, 64, 8, 2, 128), (128, 64, 8, 3, 128),
               (64, 64, 4, 3, 128), (64, 32, 4, 2, 128)]
_DKDV_SHAPES = [(64, 128, 8, 2, 64), (32, 128, 8, 2, 128), (32, 64, 4, 2, 64)]
_DQ_SHAPES = [(64, 64, 4, 2, 64), (128, 64, 8, 2, 64), (128, 32, 8, 2, 128), (64, 32, 4, 2, 128)]
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
        """Drop tiles larger than the sequence or than the configuration's head-dim limit, large
        float32 tiles, and shared-memory misfits."""
        args = {**named_args, **kwargs}
        t = max(16, args["T_KEY"])
        tq = max(16, args.get("Q_KEY", t))  # BLOCK_M tiles queries in every kernel
        elem = 4 if args.get("IEEE") else 2
        head_dim = max(args["BLOCK_DK"], args["BLOCK_DV"])
        keep = []
        for c in configs:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            if bm > tq or bn > t or head_dim > _MAX_HEAD_DIM_OF.get((kind, bm, bn, c.num_warps,
                                                                   c.num_stages), MAX_HEAD_DIM):
                continue
            if args.get("IEEE") and (bm * bn > 64 * 64 or c.num_stages > 2):
                continue
            if _smem_estimate(kind, bm, bn, c.num_stages, args["BLOCK_DK"], args["BLOCK_DV"],
                              elem) > _SMEM_BUDGET:
                continue
            keep.append(c)
        return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return prune


_SHAPES = {"fwd": _FWD_SHAPES, "dkdv": _DKDV_SHAPES, "dq": _DQ_SHAPES}
_MAX_HEAD_DIM_OF = {(kind, *shape[:4]): shape[4] for kind, shapes in _SHAPES.items()
                    for shape in shapes}


def _configs(kind: str):
    if INTERPRET:  # the interpreter runs each program in numpy: small fixed tiles, no tuning
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in autotune_shapes(kind)]


_TUNE_KEY = ["T_KEY", "Q_KEY", "W_KEY", "DK", "DV", "HAS_PAD", "USE_DELTA", "SPLIT", "STACK",
             "IEEE"]

#: Per kernel kind, a configuration that replaces autotuning (see :func:`forced_configs`).
_FORCED: dict = {}


@contextlib.contextmanager
def forced_configs(fwd=None, dkdv=None, dq=None, splits=None):
    """Run the kernels with fixed configurations instead of the autotuned ones (eager only).

    Each of fwd, dkdv, dq is ``None`` (keep autotuning) or ``(BLOCK_M, BLOCK_N, num_warps,
    num_stages)``; ``splits`` fixes how many key ranges the forward splits into (flash-decoding;
    padded batches only), instead of the rule in :func:`_decode_splits`.
    Tests use it to walk far and band tiles of several shapes under the interpreter, and the GPU
    check to run every configuration of the autotune lists one by one (so a bad one is named).
    """
    saved = dict(_FORCED)
    if splits is not None:
        _FORCED["splits"] = int(splits)
    for kind, cfg in (("fwd", fwd), ("dkdv", dkdv), ("dq", dq)):
        if cfg is not None:
            bm, bn, warps, stages = cfg
            _FORCED[kind] = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)


def autotune_shapes(kind: str, head_dim: Optional[int] = None):
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples autotuning picks from on a GPU (for
    head dims up to ``head_dim`` when given)."""
    return [shape[:4] for shape in _SHAPES[kind] if head_dim is None or head_dim <= shape[4]]


# Autotuned on a GPU; one fixed small configuration under the interpreter (no benchmarking).
# Every kernel is idempotent (plain stores into its own rows), so re-running it while tuning is
# harmless.
def _autotune(kind, kernel):
    return triton.autotune(_configs(kind), key=_TUNE_KEY,
                           prune_configs_by={"early_config_prune": _make_prune(kind)})(kernel)


_fwd = _autotune("fwd", fwd_kernel)
_bwd_dkdv = _autotune("dkdv", bwd_dkdv_kernel)
_bwd_dq = _autotune("dq", bwd_dq_kernel)
_RAW = {"fwd": fwd_kernel, "dkdv": bwd_dkdv_kernel, "dq": bwd_dq_kernel}
_TUNED = {"fwd": _fwd, "dkdv": _bwd_dkdv, "dq": _bwd_dq}

# ----------------------------------------------------------------------------------------------
# Launch capture (static profile)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    """One kernel launch as the launcher would make it (see :func:`capture_launches`)."""
    kind: str  # "fwd", "dkdv", "dq"
    kernel: object  # the raw triton.JITFunction
    args: tuple  # positional arguments
    kwargs: dict  # keyword arguments and constexprs, without BLOCK_M / BLOCK_N
    configs: List[Tuple[int, int, int, int]]  # what autotuning would try for this call
    loop_kinds: Tuple[str, ...]  # the kernel's hot loops in program order
    grid: Callable[[dict], tuple]


_CAPTURE: Optional[list] = None
_CAPTURE_SMS: Optional[int] = None  # the multiprocessors a captured launch is planned for


@contextlib.contextmanager
def capture_launches(multiprocessors: Optional[int] = None):
    """Record the launches of the Triton ops instead of running them (tensors on any device).

    Yields a list of :class:`Launch`. ``bench/static_profile.py`` compiles each captured launch
    ahead of time, specialised from its real arguments, so the profile follows the launcher.
    ``multiprocessors``: plan the launches as on a GPU with that many multiprocessors (the
    split-key decoding rule depends on it); without it, as on the tensors' device.
    """
    global _CAPTURE, _CAPTURE_SMS
    saved, _CAPTURE = _CAPTURE, []
    saved_sms, _CAPTURE_SMS = _CAPTURE_SMS, multiprocessors
    try:
        yield _CAPTURE
    finally:
        _CAPTURE, _CAPTURE_SMS = saved, saved_sms


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _count(name: str) -> None:
    if not torch.compiler.is_compiling():
        launch_counts[name] += 1


def _check(q, k, v, P, key_padding_mask, L, U, window_left, window_right, what: str,
           check_lengths: bool = True):
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
    if _CAPTURE is None:
        if q.device.type == "cpu" and not INTERPRET:
            raise RuntimeError(f"{what}: Triton needs a GPU, or the interpreter for CPU tensors "
                               "(set TRITON_INTERPRET=1 before importing triton); got CPU "
                               "tensors")
        if q.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{what}: the Triton kernels run CUDA tensors (or CPU tensors under "
                             f"TRITON_INTERPRET=1), got tensors on {q.device}")
    B, H, Tq, Dk = q.shape
    if k.shape[0] != B or k.shape[3] != Dk or k.shape[1] < 1 or H % k.shape[1]:
        raise ValueError(f"{what}: k must be [B,Hkv,Tk,Dk] with B={B}, Dk={Dk} and Hkv dividing "
                         f"H={H}, got {tuple(k.shape)}")
    Hkv, T = k.shape[1], k.shape[2]
    if Tq > T and check_lengths:
        raise ValueError(f"{what}: q has Tq={Tq} queries but k has only Tk={T} keys (the query "
                         f"block stands at the end of the keys: Tq <= Tk)")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{what}: v must be [B,Hkv,Tk,Dv] with [B,Hkv,Tk]={tuple(k.shape[:3])}, "
                         f"got {tuple(v.shape)}")
    Dv = v.shape[-1]
    if Dk > MAX_HEAD_DIM or Dv > MAX_HEAD_DIM:
        raise ValueError(f"{what}: the Triton kernels support head dims up to {MAX_HEAD_DIM}, "
                         f"got Dk={Dk}, Dv={Dv}")
    if L < 0 or U < 0:
        raise ValueError(f"{what}: L and U must be non-negative, got L={L}, U={U}")
    R = L + U + 1
    if (P.shape[0] != B or P.shape[1] not in (1, H) or P.shape[3] not in (R, 0)
            or (check_lengths and P.shape[2] != T)):
        raise ValueError(f"{what}: P must be [B,Hp,Tk,R] = [{B},1 or {H},{T},{R}] (R = L+U+1, "
                         f"or R = 0: no delta term), got {tuple(P.shape)}")
    if window_left < -1 or window_right < -1:
        raise ValueError(f"{what}: window_left/window_right must be >= 0, or -1 for unbounded; "
                         f"got {window_left}, {window_right}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, T):
            raise ValueError(f"{what}: key_padding_mask must be a bool [B,Tk]=[{B},{T}] tensor, got "
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


#: The row vectors KCOL and ROWS are padded to a multiple of this (the largest tile), so the
#: kernels load them without masks.
_ROW_PAD = 256


def _padded_length(T: int) -> int:
    return triton.cdiv(T, _ROW_PAD) * _ROW_PAD


def _launch(kind, grid, *args, **meta):
    """Launch the autotuned kernel, or the raw one with the configuration forced_configs set;
    under capture_launches, record the launch instead."""
    if _CAPTURE is not None:
        named = dict(zip(_RAW[kind].arg_names, args), **meta)
        configs = _make_prune(kind)(_configs(kind), named)
        loops = (LOOP_KINDS if meta["USE_DELTA"] else LOOP_KINDS_NO_DELTA)[kind]
        _CAPTURE.append(Launch(kind, _RAW[kind], args, dict(meta),
                               [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                 c.num_stages) for c in configs], loops, grid))
        return
    _count({"fwd": "fwd", "dkdv": "bwd_dkdv", "dq": "bwd_dq"}[kind])
    forced = _FORCED.get(kind)
    if forced is None or torch.compiler.is_compiling():
        wrap_triton(_TUNED[kind])[grid](*args, **meta)
    else:
        _RAW[kind][grid(forced)](*args, **meta, **forced)


@dataclasses.dataclass
class _Layout:
    """Where each batch element (or packed sequence) lies in the tensors: the kernels read
    (batch, head, row, column) strides; a packed batch has batch stride 0 and per-sequence start
    rows from cu_seqlens (VARLEN)."""
    B: int
    H: int
    Hkv: int
    Tq: int  # queries per element (packed: the longest sequence)
    T: int  # keys per element (packed: the longest sequence)
    cu_q: Optional[torch.Tensor] = None
    cu_k: Optional[torch.Tensor] = None
    #: A block at global positions: query i stands at key position ``qoff + i`` (any sign, past
    #: the keys too), and P holds the T key rows followed by the Tq queries' own rows.
    qoff: Optional[int] = None

    @property
    def varlen(self) -> bool:
        return self.cu_q is not None

    @property
    def block(self) -> bool:
        return self.qoff is not None

    @property
    def query_offset(self) -> int:
        """Query 0's position relative to key 0 (end-aligned: T − Tq); the kernels' QOFF."""
        return self.qoff if self.block else self.T - self.Tq

    @property
    def query_row(self) -> int:
        """The row of P holding query 0's own row (end-aligned: its key position); QROW."""
        return self.T if self.block else self.T - self.Tq

    def strides(self, t: torch.Tensor) -> tuple:
        """(batch, head, row, column) strides of q/k/v/out-like tensors."""
        if self.varlen:  # [Total, heads, D]
            return (0, t.stride(1), t.stride(0), t.stride(2))
        return t.stride()

    def lse_strides(self, lse: torch.Tensor) -> tuple:
        """(batch, head, row) strides of lse: [B,H,Tq], or [H,Total_q] packed."""
        return (0, lse.stride(0), lse.stride(1)) if self.varlen else lse.stride()

    def p_strides(self, P: torch.Tensor) -> tuple:
        """(batch, head, row) strides of P: [B,Hp,T,R], or [Total_k,Hp,R] packed; a head
        stride of 0 when P is shared by the heads."""
        shared = P.shape[1] == 1
        if self.varlen:
            return (0, 0 if shared else P.stride(1), P.stride(0))
        return (P.stride(0), 0 if shared else P.stride(1), P.stride(2))


def _sequence_rows(cu: torch.Tensor):
    """(sequence, position) of every row of a packed tensor."""
    lengths = (cu[1:] - cu[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
    pos = torch.arange(seq.numel(), device=cu.device) - cu[:-1].long()[seq]
    return seq, pos


def _key_columns(P, key_padding_mask, qk_scale, use_delta, tp, lay):
    """float32 [B, Hp, 3, tp]: c·P[:, 0], c·P[:, R−1] and 0 per key position, each -inf at
    padding keys and at the positions that pad every element's keys to a whole number of
    tiles (for a packed batch: per sequence)."""
    R, Hp = P.shape[-1], P.shape[1]
    kcol = torch.full((lay.B, Hp, 3, tp), float("-inf"), dtype=torch.float32, device=P.device)
    if lay.varlen:  # P [Total_k, Hp, R]
        ends = P[..., [0, R - 1]].float() * qk_scale if use_delta else None
        seq, pos = _sequence_rows(lay.cu_k)
        kcol[seq, :, 2, pos] = 0.0
        kcol[seq, :, :2, pos] = ends if use_delta else 0.0
        return kcol
    T = lay.T  # a block's P holds its queries' rows after the keys': not key columns
    if use_delta:
        kcol[..., :2, :T] = P[:, :, :T, [0, R - 1]].float().transpose(-1, -2) * qk_scale
    else:
        kcol[..., :2, :T] = 0.0
    kcol[..., 2, :T] = 0.0
    if key_padding_mask is not None:
        kcol[..., :T].masked_fill_(key_padding_mask[:, None, None, :], float("-inf"))
    return kcol


#: KCOL as the forward built it, by the caller's P (held weakly), for the backward of the same
#: call: with the scale, padding mask and layout unchanged it is the same array. Only kept for a
#: P that requires grad, and taken out by the backward that uses it.
_KCOL_OF = WeakIdKeyDictionary()


def _key_columns_once(owner, P, key_padding_mask, qk_scale, use_delta, tp, lay, backward):
    """:func:`_key_columns`, or the forward's KCOL for the same inputs (``owner``: the P the
    caller passed, before any copy; the entry is checked against its version and against the
    very mask / cu_seqlens tensors and their versions)."""
    if _CAPTURE is not None or torch.compiler.is_compiling():  # no state across traced calls
        return _key_columns(P, key_padding_mask, qk_scale, use_delta, tp, lay)
    deps = tuple((t, t._version) for t in (key_padding_mask, lay.cu_k) if t is not None)
    key = (owner._version, qk_scale, use_delta, tp, lay.B, lay.T, lay.varlen)
    hit = _KCOL_OF.pop(owner, None) if backward else _KCOL_OF.get(owner)
    if (hit is not None and hit[0] == key and len(hit[1]) == len(deps)
            and all(a is b and va == vb for (a, va), (b, vb) in zip(hit[1], deps))):
        return hit[2]
    builds["key_columns"] += 1
    kcol = _key_columns(P, key_padding_mask, qk_scale, use_delta, tp, lay)
    if not backward and owner.requires_grad:
        _KCOL_OF[owner] = (key, deps, kcol)
    return kcol


def _band_reach() -> int:
    """How far past the clip limits a band run's offsets reach: the largest
    max(BLOCK_M, stacked rows) + BLOCK_N − 3 of any configuration a launch may run (a band run
    of a BLOCK_M × BLOCK_N program holds offsets j − i in [−L − reach, U + reach])."""
    sizes = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for kind in _SHAPES
             for c in _configs(kind)]
    sizes += [(f["BLOCK_M"], f["BLOCK_N"]) for kind, f in _FORCED.items() if kind != "splits"]
    return max(max(bm, _STACK_MAX_TQ) + bn for bm, bn in sizes) - 3


def _shear(P, pk, lay, L, U, tpq):
    """(S, DMIN): the band tiles' bias, one float32 per (query, offset), so that an unmasked
    band tile loads one value per pair instead of gathering two rows of P and clamping:
    ``S[b, h, i, d − DMIN] = PK[t + d, r(d)] − P[QROW + i, r(d)]`` for query i at key position
    ``t = QOFF + i`` (:class:`_Layout`: ``Tk − Tq + i`` end-aligned) whose own row of P is
    ``QROW + i``, ``r(d) = clamp(d, −L, U) + L``, d in [DMIN, −DMIN + U − L]
    (:func:`_band_reach`); 0 where ``t + d`` lies outside the keys or i past the queries. S is
    [B, Hp, tpq, W] (W = R + 2·reach). PK is P with padding keys' rows zeroed, as the
    gathering loops read it."""
    R = L + U + 1
    reach = _band_reach()
    dmin = -L - reach
    dev = P.device
    d = torch.arange(dmin, dmin + R + 2 * reach, device=dev)
    r = d.clamp(-L, U) + L
    qi = torch.arange(tpq, device=dev)
    Hp = P.shape[1]
    if lay.varlen:  # P [Total_k, Hp, R]
        k0, tk = lay.cu_k[:-1].long(), (lay.cu_k[1:] - lay.cu_k[:-1]).long()
        tq = (lay.cu_q[1:] - lay.cu_q[:-1]).long()
        qoff = qrow0 = tk - tq
        flat_p, flat_pk = P, pk
    else:  # P [B, Hp, rows, R] -> [B*rows, Hp, R] (rows: T, or T + Tq for a block)
        B, rows = P.shape[0], P.shape[2]
        k0 = torch.arange(B, device=dev) * rows
        tk = torch.full((B,), lay.T, device=dev)
        tq = torch.full((B,), lay.Tq, device=dev)
        qoff = torch.full((B,), lay.query_offset, device=dev)
        qrow0 = torch.full((B,), lay.query_row, device=dev)
        flat_p = P.transpose(1, 2).reshape(B * rows, Hp, R)
        flat_pk = flat_p if pk is P else pk.transpose(1, 2).reshape(B * rows, Hp, R)
    last = max(flat_p.shape[0] - 1, 0)
    pos = qoff[:, None] + qi  # [B, tpq]
    j = pos[:, :, None] + d  # [B, tpq, W]
    valid = (qi < tq[:, None])[:, :, None] & (j >= 0) & (j < tk[:, None, None])
    krow = (k0[:, None, None] + j).clamp(0, last)
    qrow = (k0[:, None] + qrow0[:, None] + qi).clamp(0, last)[:, :, None]
    gk = flat_pk[krow, :, r].float()  # [B, tpq, W, Hp]
    gq = flat_p[qrow, :, r].float()
    S = torch.where(valid[..., None], gk - gq, 0.0)
    return S.permute(0, 3, 1, 2).contiguous(), dmin


def _common(q, v, P, key_padding_mask, L, U, window_left, window_right, scale, use_delta, lay,
            owner, backward=False):
    """Launch arguments shared by the kernels (``owner``: the P the caller passed, whose
    forward KCOL the backward reuses)."""
    Dk, Dv = q.shape[-1], v.shape[-1]
    T, Tq = lay.T, lay.Tq
    # a window side that reaches every pair is no window: offsets beyond ±2·ext put no tile on
    # an edge. The pairs' offsets j − (QOFF + i) lie in [−first, last]: within ±(T − 1) for
    # end-aligned queries (packed too), exactly that range for a block.
    first, last = T - 1, T - 1
    if lay.block:
        first, last = lay.qoff + Tq - 1, T - 1 - lay.qoff
    ext = max(T, first, last)
    lo = -2 * ext if window_left < 0 or window_left >= first else -window_left
    hi = 2 * ext if window_right < 0 or window_right >= last else window_right
    if key_padding_mask is None:
        kv, has_pad = q, False  # never read
    else:
        kv, has_pad = _key_span(key_padding_mask), True
    # rows of the query-side vectors, and of the key-side ones and dP: every tile a program
    # touches, past the end of the queries too (they sit at positions T - Tq + i)
    # (a block's query rows of dP have their own buffer: its key-side rows are the keys')
    tpq = _padded_length(Tq)
    if lay.block:
        tp = _padded_length(T)
    else:
        tp = _padded_length(T + _ROW_PAD if lay.varlen else max(T, T - Tq + tpq))
    kcol = _key_columns_once(owner, P, key_padding_mask, scale * _LOG2E, use_delta, tp, lay,
                             backward)
    sC = kcol.stride()
    c_strides = (sC[0], 0 if kcol.shape[1] == 1 else sC[1])
    cu_q, cu_k = (lay.cu_q, lay.cu_k) if lay.varlen else (kv, kv)  # never read unless VARLEN
    # the key rows band tiles gather: P with padding keys' rows zeroed, so that a non-finite
    # P row of a padding key (whose query is live) reaches no other row through 0·NaN
    pk = P
    if key_padding_mask is not None and use_delta:
        pad = key_padding_mask
        if P.shape[2] > T:  # a block's query rows follow the keys': never zeroed
            pad = torch.nn.functional.pad(pad, (0, P.shape[2] - T))
        pk = P.masked_fill(pad[:, None, :, None], 0.0)
    if use_delta:
        sh, dmin = _shear(P, pk, lay, L, U, tpq)
    else:
        sh, dmin = kcol, 0  # never read
    c_strides += (sh.stride(0), 0 if sh.shape[1] == 1 else sh.stride(1))
    meta = dict(H=lay.H, G=lay.H // lay.Hkv, T=T, TQ=Tq, TP=tp, SW=sh.shape[-1], DMIN=dmin, L=L,
                U=U, lo=lo, hi=hi, OFF=lay.qoff if lay.block else 0,
                T_KEY=triton.next_power_of_2(T), Q_KEY=triton.next_power_of_2(Tq),
                W_KEY=triton.next_power_of_2(min(hi - lo + 1, 2 * T)),
                HAS_PAD=has_pad, USE_DELTA=use_delta, VARLEN=lay.varlen, BLOCK=lay.block,
                IEEE=q.dtype == torch.float32, DK=Dk, DV=Dv,
                BLOCK_DK=max(16, triton.next_power_of_2(Dk)),
                BLOCK_DV=max(16, triton.next_power_of_2(Dv)))
    return kv, (kcol, sh), pk, c_strides, cu_q, cu_k, tpq, meta


#: Keys per split of a decoding forward: a multiple of every key tile.
_SPLIT_QUANTUM = 256

#: Query blocks up to this long are stacked (decoding, short speculative blocks): a forward
#: program holds the G·Tq queries of one key/value head's G query heads, so each key/value tile
#: is read once per key/value head, not once per query head.
_STACK_MAX_TQ = 16


def _stacks(lay) -> bool:
    """Whether the forward stacks the query heads of a group into one program's rows."""
    return lay.Tq <= _STACK_MAX_TQ


def _forward_rows(lay) -> Tuple[int, int]:
    """(rows per program group, program groups per element): (G·Tq, Hkv) stacked, else (Tq, H)."""
    if _stacks(lay):
        return lay.Tq * (lay.H // lay.Hkv), lay.Hkv
    return lay.Tq, lay.H


def _decode_splits(lay, device) -> int:
    """How many key ranges a forward splits into (flash-decoding): more than one only when the
    query blocks alone leave most of the GPU's multiprocessors idle and the keys are long."""
    if "splits" in _FORCED:
        return 1 if lay.varlen else _FORCED["splits"]
    planned = _CAPTURE is not None and _CAPTURE_SMS is not None
    if lay.varlen or lay.T < 4 * _SPLIT_QUANTUM or (
            not planned and (INTERPRET or device.type != "cuda")):
        return 1
    sms = (_CAPTURE_SMS if planned
           else torch.cuda.get_device_properties(device).multi_processor_count)
    rows, groups = _forward_rows(lay)
    programs = lay.B * groups * triton.cdiv(rows, 64)
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(lay.T, 2 * _SPLIT_QUANTUM), triton.cdiv(2 * sms, programs)))


def _combine_splits(part, Dv, out, lse):
    """out and lse from the splits' partial results: PART [splits, B*H, Tq, BLOCK_DV + 2]."""
    m, l_sum, acc = part[..., -2], part[..., -1], part[..., :Dv]
    top = m.amax(0)
    top = torch.where(top == float("-inf"), 0.0, top)
    wgt = torch.exp2(m - top)  # 0 for a split that saw no key of the row
    total = (l_sum * wgt).sum(0)
    empty = total == 0
    safe = torch.where(empty, 1.0, total)
    o = (acc * wgt[..., None]).sum(0) / safe[..., None]
    lse_ = torch.where(empty, float("-inf"), (top + torch.log2(safe)) * 0.6931471805599453)
    out.copy_(o.view(out.shape))
    lse.copy_(lse_.view(lse.shape))


def _run_forward(q, k, v, P, key_padding_mask, L, U, window_left, window_right, scale, use_delta,
                 lay, out, lse, owner=None):
    """``owner``: the P tensor the caller passed, whose KCOL the backward may reuse (default
    ``P``; a block passes its P_k, ``P`` being P_k's rows followed by P_q's)."""
    use_delta = use_delta and P.shape[-1] > 0  # P without a bucket column: the plain path
    owner, P = P if owner is None else owner, P.contiguous()
    kv, key_arrays, pk, c_strides, cu_q, cu_k, _, meta = _common(q, v, P, key_padding_mask, L, U,
                                                           window_left, window_right, scale,
                                                           use_delta, lay, owner)
    splits = _decode_splits(lay, q.device)
    split_n = triton.cdiv(triton.cdiv(lay.T, splits), _SPLIT_QUANTUM) * _SPLIT_QUANTUM
    splits = triton.cdiv(lay.T, split_n)
    part = kv  # never read without SPLIT
    if splits > 1:
        part = torch.empty((splits, lay.B * lay.H, lay.Tq, meta["BLOCK_DV"] + 2),
                           dtype=torch.float32, device=q.device)

    rows, groups = _forward_rows(lay)

    def grid(m):
        return (triton.cdiv(rows, m["BLOCK_M"]), lay.B * groups, splits)

    meta["Q_KEY"] = triton.next_power_of_2(rows)  # the rows BLOCK_M tiles
    _launch("fwd", grid, q, k, v, P, pk, *key_arrays, kv, out, lse, cu_q, cu_k, part,
            *lay.strides(q), *lay.strides(k), *lay.strides(v), *lay.p_strides(P), *c_strides,
            *lay.strides(out), *lay.lse_strides(lse), qk_scale=scale * _LOG2E, SPLIT_N=split_n,
            SPLIT=splits > 1, STACK=_stacks(lay), **meta)
    if splits > 1 and _CAPTURE is None:
        _combine_splits(part, v.shape[-1], out, lse)


def _run_backward(grad_out, q, k, v, P, key_padding_mask, out, lse, L, U, window_left,
                  window_right, scale, use_delta, lay, owner=None):
    """(dq, dk, dv, dP per query head and key position [B, H, TP, R] summed over its two
    halves, or None without the delta term). A block (``lay.block``) gets its two halves
    apart instead: (key rows [B, H, TP, R], query rows [B, H, TPQ, R] by query index)."""
    B, H, Hkv, Tq, T = lay.B, lay.H, lay.Hkv, lay.Tq, lay.T
    R = L + U + 1
    use_delta = use_delta and P.shape[-1] > 0  # P without a bucket column: the plain path
    owner, P = P if owner is None else owner, P.contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    kv, key_arrays, pk, c_strides, cu_q, cu_k, tpq, meta = _common(q, v, P, key_padding_mask, L, U,
                                                             window_left, window_right, scale,
                                                             use_delta, lay, owner, True)
    qk_scale = scale * _LOG2E
    # per query: D, lse2 + c·P[t_i, 0], lse2 + c·P[t_i, R-1], lse2; rows no query fills (past
    # the end of each element's queries) see no key: D = 0, the others +inf
    rows = torch.full((B, H, 4, tpq), float("inf"), dtype=torch.float32, device=q.device)
    rows[:, :, 0] = 0.0
    # the key-row half [0] and the query-row half [1] of dP, per query head, by key position;
    # padded to TP rows (band tiles store without a row mask). A block's query rows are no key
    # positions: its query half is [B, H, TPQ, R] by query index.
    TP = meta["TP"]
    if lay.block:
        dP_halves = tuple(torch.zeros((B, H, rows, R) if use_delta else (1, 1, 1, 1),
                                      dtype=torch.float32, device=q.device) for rows in (TP, tpq))
    else:
        dP_halves = torch.zeros((2, B, H, TP, R) if use_delta else (2, 1, 1, 1, 1),
                                dtype=torch.float32, device=q.device)
    p_strides = lay.p_strides(P)

    block_rows = 16 if INTERPRET else 64
    if _CAPTURE is None:
        _count("bwd_preprocess")
        wrap_triton(bwd_rows_kernel)[(triton.cdiv(Tq, block_rows), B * H)](
            out, grad_out, lse, P, rows, cu_q, cu_k, *lay.strides(out), *lay.strides(grad_out),
            *lay.lse_strides(lse), *p_strides, H, T, Tq, tpq, R, qk_scale, meta["OFF"],
            USE_DELTA=use_delta, VARLEN=lay.varlen, BLOCK=lay.block, DV=v.shape[-1],
            BLOCK_M=block_rows,
            BLOCK_DV=meta["BLOCK_DV"])

    common = (*lay.strides(q), *lay.strides(k), *lay.strides(v), *p_strides, *c_strides,
              *lay.strides(grad_out))

    def grid_n(m):  # one program per key block of each (element, key/value head)
        return (triton.cdiv(T, m["BLOCK_N"]), B * Hkv)

    def grid_m(m):
        return (triton.cdiv(Tq, m["BLOCK_M"]), B * H)

    _launch("dkdv", grid_n, q, k, v, P, pk, *key_arrays, kv, grad_out, rows, dk, dv, dP_halves[0],
            cu_q, cu_k, *common, *lay.strides(dk), *lay.strides(dv), scale=scale, qk_scale=qk_scale,
            TPQ=tpq, GROUPED=Hkv != H, **meta)
    _launch("dq", grid_m, q, k, v, P, pk, *key_arrays, kv, grad_out, rows, dq, dP_halves[1], cu_q,
            cu_k, *common, *lay.strides(dq), scale=scale, qk_scale=qk_scale, TPQ=tpq, **meta)
    if not use_delta:
        return dq, dk, dv, None
    return dq, dk, dv, (dP_halves if lay.block else dP_halves.sum(0))


def _forward(q, k, v, P, key_padding_mask, L, U, window_left, window_right, scale,
             use_delta=True):
    _check(q, k, v, P, key_padding_mask, L, U, window_left, window_right,
           "hdaf::triton_delta_attention_forward")
    B, H, Tq, _ = q.shape
    out = q.new_empty((B, H, Tq, v.shape[-1]))
    lse = q.new_empty((B, H, Tq), dtype=torch.float32)
    if B * H * Tq == 0:
        return out, lse
    lay = _Layout(B, H, k.shape[1], Tq, k.shape[2])
    _run_forward(q, k, v, P, key_padding_mask, L, U, window_left, window_right, scale, use_delta,
                 lay, out, lse)
    return out, lse


def _check_out_lse(grad_out, out, lse, shape, what):
    """grad_out and out of ``shape`` [B,H,Tq,Dv], lse float32 [B,H,Tq] (the padded backwards)."""
    if grad_out.shape != shape or out.shape != shape:
        raise ValueError(f"{what}: grad_out and out must be [B,H,Tq,Dv]={shape}, got "
                         f"{tuple(grad_out.shape)} and {tuple(out.shape)}")
    if lse.shape != shape[:3] or lse.dtype != torch.float32:
        raise ValueError(f"{what}: lse must be float32 [B,H,Tq]={shape[:3]}, got {lse.dtype} "
                         f"{tuple(lse.shape)}")


def _backward(grad_out, q, k, v, P, key_padding_mask, out, lse, L, U, window_left, window_right,
              scale, use_delta=True):
    what = "hdaf::triton_delta_attention_backward"
    _check(q, k, v, P, key_padding_mask, L, U, window_left, window_right, what)
    B, H, Tq, Dk = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    Dv = v.shape[-1]
    _check_out_lse(grad_out, out, lse, (B, H, Tq, Dv), what)
    if B * H * Tq == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(P)
    lay = _Layout(B, H, Hkv, Tq, T)
    dq, dk, dv, dP = _run_backward(grad_out.to(q.dtype), q, k, v, P, key_padding_mask, out, lse,
                                   L, U, window_left, window_right, scale, use_delta, lay)
    if dP is None:
        return dq, dk, dv, torch.zeros_like(P)
    dP = dP[:, :, :T]  # [B, H, T, R]
    if P.shape[1] == 1 and H != 1:  # P shared by the heads
        dP = dP.sum(1, keepdim=True)
    return dq, dk, dv, dP.to(P.dtype)


def _check_block(q, k, v, P_q, P_k, key_padding_mask, q_start, k_start, L, U, window_left,
                 window_right, what):
    """The rules of the padded op (on P_k, whose rows are the keys'), without Tq <= Tk, plus
    P_q's shape and the global positions."""
    _check(q, k, v, P_k, key_padding_mask, L, U, window_left, window_right, what,
           check_lengths=False)
    B, H, Tq = q.shape[:3]
    Hp, T, Rp = P_k.shape[1:]
    if P_k.shape[2] != k.shape[2]:
        raise ValueError(f"{what}: P_k must be [B,Hp,Tk,R] with Tk={k.shape[2]} (k's keys), got "
                         f"{tuple(P_k.shape)}")
    if P_q.dim() != 4 or tuple(P_q.shape) != (B, Hp, Tq, Rp):
        raise ValueError(f"{what}: P_q must be [B,Hp,Tq,R]=[{B},{Hp},{Tq},{Rp}] (P_k's heads and "
                         f"buckets, q's queries), got {tuple(P_q.shape)}")
    if P_q.dtype != q.dtype or P_q.device != q.device:
        raise TypeError(f"{what}: P_q must have q's dtype and device ({q.dtype} on {q.device}), "
                        f"got {P_q.dtype} on {P_q.device}")
    if q_start < 0 or k_start < 0:
        raise ValueError(f"{what}: q_start and k_start must be >= 0, got q_start={q_start}, "
                         f"k_start={k_start}")


def _block_layout(q, k, q_start, k_start):
    return _Layout(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2],
                   qoff=q_start - k_start)


def _block_rows(P_q, P_k):
    """P for a block's kernels: the key rows, then the queries' own rows (QROW = Tk)."""
    return torch.cat((P_k, P_q), 2)


def _block_forward(q, k, v, P_q, P_k, key_padding_mask, q_start, k_start, L, U, window_left,
                   window_right, scale):
    _check_block(q, k, v, P_q, P_k, key_padding_mask, q_start, k_start, L, U, window_left,
                 window_right, "hdaf::triton_delta_attention_block_forward")
    B, H, Tq, _ = q.shape
    out = q.new_zeros((B, H, Tq, v.shape[-1]))
    lse = q.new_full((B, H, Tq), float("-inf"), dtype=torch.float32)
    if B * H * Tq == 0 or k.shape[2] == 0:  # no key: out 0, lse -inf
        return out, lse
    _run_forward(q, k, v, _block_rows(P_q, P_k), key_padding_mask, L, U, window_left,
                 window_right, scale, True, _block_layout(q, k, q_start, k_start), out, lse,
                 owner=P_k)
    return out, lse


def _block_backward(grad_out, q, k, v, P_q, P_k, key_padding_mask, out, lse, q_start, k_start,
                    L, U, window_left, window_right, scale):
    what = "hdaf::triton_delta_attention_block_backward"
    _check_block(q, k, v, P_q, P_k, key_padding_mask, q_start, k_start, L, U, window_left,
                 window_right, what)
    B, H, Tq, _ = q.shape
    Dv = v.shape[-1]
    _check_out_lse(grad_out, out, lse, (B, H, Tq, Dv), what)
    zeros = tuple(torch.zeros_like(t, memory_format=torch.contiguous_format)
                  for t in (q, k, v, P_q, P_k))
    if B * H * Tq == 0 or k.shape[2] == 0:
        return zeros
    dq, dk, dv, halves = _run_backward(
        grad_out.to(q.dtype), q.contiguous(), k.contiguous(), v.contiguous(),
        _block_rows(P_q, P_k), key_padding_mask, out.contiguous(), lse.contiguous(), L, U,
        window_left, window_right, scale, True, _block_layout(q, k, q_start, k_start), owner=P_k)
    if halves is None:
        return dq, dk, dv, zeros[3], zeros[4]
    dP_k, dP_q = halves[0][:, :, :k.shape[2]], halves[1][:, :, :Tq]
    if P_k.shape[1] == 1 and H != 1:  # P shared by the heads
        dP_k, dP_q = dP_k.sum(1, keepdim=True), dP_q.sum(1, keepdim=True)
    return dq, dk, dv, dP_q.to(P_q.dtype), dP_k.to(P_k.dtype)


def _check_varlen(q, k, v, P, cu_q, cu_k, L, U, what):
    for name, t, dim in (("q", q, 3), ("k", k, 3), ("v", v, 3), ("P", P, 3)):
        if t.dim() != dim:
            raise ValueError(f"{what}: {name} must be {dim}-D, got shape {tuple(t.shape)}")
    # the per-element rules (dtypes, devices, head dims, head ratio, P's columns) are those of
    # the padded op: check them on [1, heads, rows, D] views
    _check(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
           P.transpose(0, 1)[None], None, L, U, -1, -1, what, check_lengths=False)
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if cu.dim() != 1 or cu.dtype != torch.int32 or cu.device != q.device:
            raise ValueError(f"{what}: {name} must be a 1-D int32 tensor on {q.device}, got "
                             f"{cu.dtype} {tuple(cu.shape)} on {cu.device}")
    if cu_q.numel() != cu_k.numel() or cu_q.numel() < 1:
        raise ValueError(f"{what}: cu_seqlens_q and cu_seqlens_k must both have B+1 >= 1 "
                         f"entries, got {cu_q.numel()} and {cu_k.numel()}")
    if P.shape[0] != k.shape[0]:
        raise ValueError(f"{what}: P must be [Total_k,Hp,R] with Total_k={k.shape[0]}, got "
                         f"{tuple(P.shape)}")


def _varlen_forward(q, k, v, P, cu_q, cu_k, max_q, max_k, L, U, window_left, window_right,
                    scale, use_delta=True):
    _check_varlen(q, k, v, P, cu_q, cu_k, L, U, "hdaf::triton_delta_attention_varlen_forward")
    Total_q, H, _ = q.shape
    out = q.new_zeros((Total_q, H, v.shape[-1]))
    lse = q.new_full((H, Total_q), float("-inf"), dtype=torch.float32)
    B = cu_q.numel() - 1
    if Total_q == 0 or B == 0 or max_q <= 0 or max_k <= 0:
        return out, lse
    lay = _Layout(B, H, k.shape[1], int(max_q), int(max_k), cu_q, cu_k)
    _run_forward(q, k, v, P, None, L, U, window_left, window_right, scale, use_delta, lay, out,
                 lse)
    return out, lse


def _varlen_backward(grad_out, q, k, v, P, cu_q, cu_k, max_q, max_k, out, lse, L, U,
                     window_left, window_right, scale, use_delta=True):
    what = "hdaf::triton_delta_attention_varlen_backward"
    _check_varlen(q, k, v, P, cu_q, cu_k, L, U, what)
    Total_q, H, _ = q.shape
    if grad_out.shape != out.shape or out.shape != (Total_q, H, v.shape[-1]):
        raise ValueError(f"{what}: grad_out and out must be [Total_q,H,Dv]="
                         f"{(Total_q, H, v.shape[-1])}, got {tuple(grad_out.shape)} and "
                         f"{tuple(out.shape)}")
    if lse.shape != (H, Total_q) or lse.dtype != torch.float32:
        raise ValueError(f"{what}: lse must be float32 [H,Total_q]={(H, Total_q)}, got "
                         f"{lse.dtype} {tuple(lse.shape)}")
    B = cu_q.numel() - 1
    zeros = tuple(torch.zeros_like(t, memory_format=torch.contiguous_format)
                  for t in (q, k, v, P))
    if Total_q == 0 or B == 0 or max_q <= 0 or max_k <= 0:
        return zeros
    lay = _Layout(B, H, k.shape[1], int(max_q), int(max_k), cu_q, cu_k)
    dq, dk, dv, dP = _run_backward(grad_out.to(q.dtype), q.contiguous(), k.contiguous(),
                                   v.contiguous(), P, None, out, lse, L, U, window_left,
                                   window_right, scale, use_delta, lay)
    if dP is None:
        return dq, dk, dv, zeros[3]
    seq, pos = _sequence_rows(cu_k)
    dP = dP[seq, :, pos]  # [Total_k, H, R]
    if P.shape[1] == 1 and H != 1:
        dP = dP.sum(1, keepdim=True)
    return dq, dk, dv, dP.to(P.dtype)


@triton_op("hdaf::triton_delta_attention_forward", mutates_args=())
def triton_delta_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   P: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                                   L: int, U: int, window_left: int, window_right: int,
                                   scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out [B,H,T,Dv] in q's dtype, lse [B,H,T] float32); see docs/delta_attention.md."""
    return _forward(q, k, v, P, key_padding_mask, L, U, window_left, window_right, scale)


@triton_op("hdaf::triton_delta_attention_backward", mutates_args=())
def triton_delta_attention_backward(
        grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        P: torch.Tensor, key_padding_mask: Optional[torch.Tensor], out: torch.Tensor,
        lse: torch.Tensor, L: int, U: int, window_left: int, window_right: int,
        scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_q, grad_k, grad_v, grad_P) with grad_P of P's shape; deterministic (no atomics)."""
    return _backward(grad_out, q, k, v, P, key_padding_mask, out, lse, L, U, window_left,
                     window_right, scale)


@triton_op("hdaf::triton_delta_attention_varlen_forward", mutates_args=())
def triton_delta_attention_varlen_forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, P: torch.Tensor,
        cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
        max_seqlen_k: int, L: int, U: int, window_left: int, window_right: int,
        scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed batch: (out [Total_q,H,Dv], lse [H,Total_q] float32); docs/delta_attention.md."""
    return _varlen_forward(q, k, v, P, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           L, U, window_left, window_right, scale)


@triton_op("hdaf::triton_delta_attention_varlen_backward", mutates_args=())
def triton_delta_attention_varlen_backward(
        grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        P: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
        max_seqlen_q: int, max_seqlen_k: int, out: torch.Tensor, lse: torch.Tensor, L: int,
        U: int, window_left: int, window_right: int,
        scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed batch: (grad_q, grad_k, grad_v, grad_P); deterministic (no atomics)."""
    return _varlen_backward(grad_out, q, k, v, P, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                            max_seqlen_k, out, lse, L, U, window_left, window_right, scale)


@triton_op("hdaf::triton_delta_attention_block_forward", mutates_args=())
def triton_delta_attention_block_forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, P_q: torch.Tensor, P_k: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor], q_start: int, k_start: int, L: int, U: int,
        window_left: int, window_right: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """One block at global positions: (out [B,H,Tq,Dv], lse [B,H,Tq] float32); see
    docs/delta_attention.md, "Global positions"."""
    return _block_forward(q, k, v, P_q, P_k, key_padding_mask, q_start, k_start, L, U,
                          window_left, window_right, scale)


@triton_op("hdaf::triton_delta_attention_block_backward", mutates_args=())
def triton_delta_attention_block_backward(
        grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        P_q: torch.Tensor, P_k: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
        out: torch.Tensor, lse: torch.Tensor, q_start: int, k_start: int, L: int, U: int,
        window_left: int, window_right: int, scale: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_q, grad_k, grad_v, grad_P_q, grad_P_k) of one block given the out and lse merged
    over all key blocks of its queries; deterministic (no atomics)."""
    return _block_backward(grad_out, q, k, v, P_q, P_k, key_padding_mask, out, lse, q_start,
                           k_start, L, U, window_left, window_right, scale)


triton_delta_attention_forward.register_fake(_ops.fake_forward)
triton_delta_attention_backward.register_fake(_ops.fake_backward)
_ops.register_delta_autograd("hdaf::triton_delta_attention_forward",
                             "hdaf::triton_delta_attention_backward")
triton_delta_attention_varlen_forward.register_fake(_ops.fake_varlen_forward)
triton_delta_attention_varlen_backward.register_fake(_ops.fake_varlen_backward)
_ops.register_varlen_autograd("hdaf::triton_delta_attention_varlen_forward",
                              "hdaf::triton_delta_attention_varlen_backward")
triton_delta_attention_block_forward.register_fake(_ops.fake_block_forward)
triton_delta_attention_block_backward.register_fake(_ops.fake_block_backward)
_ops.register_block_autograd("hdaf::triton_delta_attention_block_forward",
                             "hdaf::triton_delta_attention_block_backward")
