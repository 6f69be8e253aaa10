"""``hdaf.delta_attention`` and ``hdaf.delta_attention_varlen``: argument checks, defaults, and
the call into a backend."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import torch

from . import dispatch as _backends
from . import ops as _ops  # noqa: F401  (registers fake + autograd of the compiled op)
from .reference import (delta_attention_gather, delta_attention_naive, delta_attention_varlen_gather,
                        delta_attention_varlen_naive, delta_projection, idle_rows,
                        varlen_projection, without_idle_rows)

IntOrPair = Union[int, Sequence[int], None]


def paper_preset(num_buckets: int) -> dict:
    """The paper's own setting (§4.1): offsets ``0 … R-1``, query i attends key j only when i <= j.

    ``hdaf.delta_attention(q, k, v, x, w, **hdaf.paper_preset(R))`` with ``w`` of ``R`` columns.
    """
    if not isinstance(num_buckets, numbers.Integral) or num_buckets < 1:
        raise ValueError(f"paper_preset: num_buckets must be a positive int, got {num_buckets!r}")
    return {"max_distance": (0, int(num_buckets) - 1), "window": (0, int(num_buckets) - 1)}


def _pair(name: str, value, allow_none: bool = True) -> Optional[Tuple[int, int]]:
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be None, an int or a pair of ints, got bool {value!r}")
    if isinstance(value, numbers.Integral):
        value = (int(value), int(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(e, numbers.Integral) and not isinstance(e, bool) for e in value):
        value = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be None, an int or a pair of ints, got {value!r}")
    if value[0] < 0 or value[1] < 0:
        raise ValueError(f"{name} must be non-negative, got {value}")
    return value


def _check_tensor(name: str, t, ranks: Tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ranks:
        want = " or ".join(f"{r}-D" for r in ranks)
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)} ({t.dim()}-D)")


def _check_dtypes_devices(q, named) -> None:
    for name, t in named.items():
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: all of q, k, v, x, w "
                            "must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: all inputs must "
                             "be on one device")


def _check_heads(q_shape, k_shape, v_shape, layout: str, head_dim: int) -> Tuple[int, int]:
    """(H, Hkv) with Hkv dividing H; k and v agree. ``head_dim``: the heads' axis in the shapes."""
    H, Hkv = q_shape[head_dim], k_shape[head_dim]
    if v_shape[head_dim] != Hkv:
        raise ValueError(f"k and v must have the same number of key/value heads, got k "
                         f"{tuple(k_shape)} and v {tuple(v_shape)} ({layout})")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"the query heads H={H} must be a multiple of the key/value heads "
                         f"Hkv={Hkv} (q {tuple(q_shape)}, k {tuple(k_shape)}; {layout})")
    return H, Hkv


def _check_xw(x, w, lead: Tuple[int, ...], H: int, x_names: Tuple[str, str]) -> int:
    """x is ``lead + (Dr,)`` (shared) or the per-head form; w ``[Dr,R]`` or ``[H,Dr,R]``. Returns R."""
    shared, per_head = x_names
    if x.dim() == len(lead) + 1:
        if tuple(x.shape[:-1]) != lead:
            raise ValueError(f"x must be {shared} (or {per_head}), got {tuple(x.shape)}")
    elif not _per_head_x_ok(x, lead, H):
        raise ValueError(f"x must be {per_head} (or {shared}), got {tuple(x.shape)}")
    Dr = x.shape[-1]
    if w.dim() == 2 and w.shape[0] != Dr:
        raise ValueError(f"w must be [Dr,R] with Dr={Dr} (x's last dim), got {tuple(w.shape)}")
    if w.dim() == 3 and w.shape[:2] != (H, Dr):
        raise ValueError(f"w must be [H,Dr,R] with H={H}, Dr={Dr}, got {tuple(w.shape)}")
    R = w.shape[-1]
    if R == 0:
        raise ValueError(f"w must have at least one bucket column, got shape {tuple(w.shape)}")
    return R


def _delta_term(x, w, max_distance, k, rows: Tuple[int, ...]):
    """``(x, w, max_distance, plain)``. Given both ``x`` and ``w``, they unchanged and
    ``plain=False``. Given neither (no delta term), ``plain=True`` and a zero term every backend
    computes: ``x`` of zero width ``rows + (0,)`` and ``w`` ``[0, 1]`` (one bucket), so
    ``P = x·w = 0`` and the bias is exactly 0; the backends of
    :data:`hdaf.dispatch.PLAIN_PATH` then skip it altogether. ``max_distance`` is unused there
    (checked only)."""
    if x is None and w is None:
        _pair("max_distance", max_distance)
        return k.new_zeros(rows + (0,)), k.new_zeros((0, 1)), None, True
    if x is None or w is None:
        raise TypeError("x and w must both be tensors (the delta term) or both be None (no delta "
                        f"term), got x={_what(x)} and w={_what(w)}")
    return x, w, max_distance, False


def _what(t) -> str:
    return f"a tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else repr(t)


def _plain_projection(P: torch.Tensor, plain: bool, backend: str) -> torch.Tensor:
    """``P`` for the kernels: without the delta term, with no bucket column for the backends
    whose kernels have a plain path (R = 0 selects it; they then read no ``P`` at all)."""
    return P[..., :0] if plain and backend in _backends.PLAIN_PATH else P


def _per_head_x_ok(x, lead, H) -> bool:
    if len(lead) == 2:  # padded: [B,H,Tk,Dr]
        return tuple(x.shape[:3]) == (lead[0], H, lead[1])
    return tuple(x.shape[:2]) == (lead[0], H)  # packed: [Total_k,H,Dr]


def _options(w, Dk, max_distance, window, causal, scale, backend):
    """``(L, U, Wl, Wr, scale)`` from the keyword options, causal folded into ``Wr``."""
    R = w.shape[-1]
    if max_distance is None:
        if R % 2 == 0:
            raise ValueError(f"max_distance=None needs an odd number of buckets R (L = U = (R-1)/2), "
                             f"got w with R={R}; pass max_distance=(L, U) with L+U+1 = R")
        L = U = (R - 1) // 2
    else:
        L, U = _pair("max_distance", max_distance)
        if L + U + 1 != R:
            raise ValueError(f"max_distance=(L, U)=({L}, {U}) needs R = L+U+1 = {L + U + 1} "
                             f"buckets, but w has R={R} (shape {tuple(w.shape)})")
    win = _pair("window", window)
    Wl, Wr = (-1, -1) if win is None else win
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__} {causal!r}")
    if causal:
        Wr = 0 if Wr < 0 else min(Wr, 0)
    if scale is None:
        scale = 1.0 / math.sqrt(Dk) if Dk > 0 else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    if not isinstance(backend, str) or backend not in _backends.BACKENDS:
        raise ValueError(f"backend must be one of {_backends.BACKENDS}, got {backend!r}")
    return L, U, Wl, Wr, float(scale)


def _normalize(q, k, v, x, w, max_distance, window, causal, key_padding_mask, scale, backend):
    """Check every argument; return ``(L, U, Wl, Wr, scale)`` with causal folded into ``Wr``."""
    _check_tensor("q", q, (4,))
    _check_tensor("k", k, (4,))
    _check_tensor("v", v, (4,))
    _check_tensor("x", x, (3, 4))
    _check_tensor("w", w, (2, 3))
    B, H, Tq, Dk = q.shape
    if k.shape[0] != B or k.shape[3] != Dk:
        raise ValueError(f"k must be [B,Hkv,Tk,Dk] with B={B}, Dk={Dk} as in q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    _, Hkv, Tk, _ = k.shape
    if v.shape[0] != B or v.shape[2] != Tk:
        raise ValueError(f"v must be [B,Hkv,Tk,Dv] with B={B}, Tk={Tk} as in k {tuple(k.shape)}, "
                         f"got {tuple(v.shape)}")
    _check_heads(q.shape, k.shape, v.shape, "q [B,H,Tq,Dk], k and v [B,Hkv,Tk,D]", 1)
    if Tq == 0:
        raise ValueError(f"the sequence length T must be at least 1, got q of shape {tuple(q.shape)}")
    if Tq > Tk:
        raise ValueError(f"q has Tq={Tq} queries but k has Tk={Tk} keys: Tq <= Tk is required "
                         f"(the queries are the last Tq positions), got q {tuple(q.shape)} and "
                         f"k {tuple(k.shape)}")
    _check_xw(x, w, (B, Tk), H, (f"[B,Tk,Dr] with B={B}, Tk={Tk}", f"[B,H,Tk,Dr] with B={B}, "
                                 f"H={H}, Tk={Tk}"))
    _check_dtypes_devices(q, {"q": q, "k": k, "v": v, "x": x, "w": w})
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError("key_padding_mask must be a bool torch.Tensor [B,Tk] or None, "
                            f"got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must have dtype torch.bool (True marks padding), "
                            f"got {key_padding_mask.dtype}")
        if key_padding_mask.shape != (B, Tk):
            raise ValueError(f"key_padding_mask must be [B,Tk]=({B}, {Tk}), "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    return _options(w, Dk, max_distance, window, causal, scale, backend)


def _features(H: int, Hkv: int, Tq: int, Tk: int, varlen: bool = False) -> dict:
    """What a call needs beyond plain self-attention: ``{tag: what it has}`` for the tags of
    ``hdaf.dispatch.FEATURES``."""
    out = {}
    if Hkv != H:
        out["gqa"] = f"q with H={H} heads and k, v with Hkv={Hkv}"
    if Tq != Tk:
        out["tq<tk"] = f"Tq={Tq} queries and Tk={Tk} keys"
    if varlen:
        out["varlen"] = "a packed batch"
    return out


def shape_only(t: torch.Tensor) -> bool:
    """True for tensors without data: the meta device, or fake tensors outside torch.compile's
    tracing (under tracing the backend's own op must reach the graph, so those go the usual way)."""
    if t.device.type == "meta":
        return True
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(t, FakeTensor) and not torch.compiler.is_compiling()


def _kernel_projection(x, w, L: int, Tq: int, Tk: int) -> torch.Tensor:
    """``P = x·w`` for the kernels, ``[B,Hp,Tk,R]``. Key rows ``j < Tk - Tq - L`` are read in
    column 0 only (``j - t_i < -L`` for every query; docs/delta_attention.md), so for a short
    query block those rows get that column alone (zeros elsewhere): a decoding step costs
    ``Tk·Dr`` for ``P``, not ``Tk·Dr·R``."""
    far = Tk - Tq - L
    R = w.shape[-1]
    if far < 256 or R == 1:  # nothing worth saving
        return delta_projection(x, w)
    P_far = delta_projection(x[..., :far, :], w[..., :1])  # [B,Hp,far,1]
    P_near = delta_projection(x[..., far:, :], w)  # [B,Hp,Tk-far,R]
    P = P_near.new_zeros(P_near.shape[:-2] + (Tk, R))  # one allocation, written twice
    P[..., :far, :1] = P_far
    P[..., far:, :] = P_near
    return P


def _padding_firewall(q, k, v, x, key_padding_mask, Wl: int, Wr: int):
    """The rows of ``k`` and ``v`` at padding keys, of ``q`` at queries with no visible key, and
    of ``x`` at positions in no visible pair (:func:`hdaf.reference.idle_rows`) set to 0 before a
    kernel runs (gradient 0 there, through ``masked_fill``). A kernel
    multiplies whole tiles, so a NaN or Inf in such a row would otherwise reach other rows of
    its tile through a zero probability (0·NaN = NaN): the spec's rule that padding keys and
    fully masked rows never matter (docs/delta_attention.md, "Non-finite values and edge
    cases"). O(B·T·D), once per call."""
    B, _, Tq, _ = q.shape
    Tk = k.shape[2]
    pad = key_padding_mask[:, None, :, None]
    k, v = k.masked_fill(pad, 0), v.masked_fill(pad, 0)
    # live[b, i]: some non-padding key j with -Wl <= j - t_i <= Wr (prefix sums over the keys)
    seen = torch.nn.functional.pad((~key_padding_mask).to(torch.int32).cumsum(-1), (1, 0))
    t = torch.arange(Tq, device=q.device) + (Tk - Tq)
    first = (t - Wl).clamp(0, Tk) if Wl >= 0 else torch.zeros_like(t)
    end = (t + Wr + 1).clamp(0, Tk) if Wr >= 0 else torch.full_like(t, Tk)
    live = (seen[:, end] - seen[:, first]) > 0  # [B,Tq]
    x = without_idle_rows(x, idle_rows(key_padding_mask, live))
    return q.masked_fill(~live[:, None, :, None], 0), k, v, x


def delta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    x: Optional[torch.Tensor] = None, w: Optional[torch.Tensor] = None, *,
                    max_distance: IntOrPair = None, window: IntOrPair = None,
                    causal: bool = False, key_padding_mask: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """Multi-head attention whose logits carry the delta relative-position term.

    ``logit_ij = scale * (q_i·k_j + (x_j - x_{t_i})·w[:, r(i,j)])``,
    ``r(i,j) = clamp(j - t_i, -L, U) + L``, where query i stands at position
    ``t_i = Tk - Tq + i`` (the queries are the last Tq of the Tk positions; ``t_i = i`` for
    self-attention). The normative spec, with the backward, is ``docs/delta_attention.md``.

    Args:
        q: (batch, nheads, seqlen_q, headdim_k).
        k: (batch, nheads_kv, seqlen_k, headdim_k); nheads_kv divides nheads (grouped-query
            attention: query head h reads key/value head ``h // (nheads / nheads_kv)``), and
            seqlen_q <= seqlen_k (e.g. seqlen_q = 1: one decoding step against a KV cache).
        v: (batch, nheads_kv, seqlen_k, headdim_v); headdim_v may differ from headdim_k.
        x: (batch, seqlen_k, delta_dim) shared by all heads, or (batch, nheads, seqlen_k,
            delta_dim): one row per key position (the query rows are its last seqlen_q).
            None (with ``w`` None): no delta term, plain attention; backends with a plain path
            (``hdaf.dispatch.PLAIN_PATH``: "triton") then run it, the others add a zero term.
            A ``w`` of zeros is still a delta term (it has a gradient): see
            docs/delta_attention.md, "Without the delta term".
        w: (delta_dim, R) shared by all heads, or (nheads, delta_dim, R); None with ``x``.
        max_distance: ``m`` means ``(m, m)``; ``(L, U)`` with ``L + U + 1 == R``.
            None: ``L = U = (R-1)/2`` (R must be odd). Unused without the delta term.
        window: None (unbounded), ``w`` meaning ``(w, w)``, or ``(Wl, Wr)``: key j is visible from
            query i only when ``-Wl <= j - t_i <= Wr``. Kernels skip invisible tiles: O(T·window).
        causal: key j is visible from query i only when ``j <= t_i``.
        key_padding_mask: (batch, seqlen_k) bool, True marks a padding key to ignore.
        scale: logit scale, default ``1/sqrt(headdim_k)``.
        backend: "auto" (the compiled kernel measured fastest for the device, dtype and head
            dim, see ``hdaf.dispatch.auto_candidates``; the "gather" reference with a one-time
            warning when none is available), "naive", "gather", "cpu", "triton", "cuda" ("cuda":
            float16 / bfloat16 with headdim_k == headdim_v in {64, 128}; NotImplementedError
            naming the backends to use otherwise).

    Returns:
        (batch, nheads, seqlen_q, headdim_v). A query with no visible key gets 0 (and gradient 0).

    Usage: tests/test_delta_attention.py, tests/test_gqa_varlen.py.
    """
    _check_tensor("k", k, (4,))
    x, w, max_distance, plain = _delta_term(x, w, max_distance, k, (k.shape[0], k.shape[2]))
    L, U, Wl, Wr, scale = _normalize(q, k, v, x, w, max_distance, window, causal,
                                     key_padding_mask, scale, backend)
    B, H, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if shape_only(q):  # meta / fake tensors: the op's fake implementation gives the shapes
        if _ops._C is not None:
            out, _lse = torch.ops.hdaf.delta_attention_forward(
                q, k, v, delta_projection(x, w), key_padding_mask, L, U, Wl, Wr, scale)
            return out
        return _ops.fake_forward(q, k, v, None, key_padding_mask, L, U, Wl, Wr, scale)[0]
    features = _features(H, Hkv, Tq, Tk)
    name = _backends.resolve(backend, q.device, q.dtype, max(q.shape[-1], v.shape[-1]),
                             features=features)
    if name in ("naive", "gather"):
        lo = -(Tk - 1) if Wl < 0 else -Wl
        hi = (Tk - 1) if Wr < 0 else Wr
        fn = delta_attention_naive if name == "naive" else delta_attention_gather
        return fn(q, k, v, x, w, L=L, U=U, lo=lo, hi=hi, key_padding_mask=key_padding_mask,
                  scale=scale)
    if key_padding_mask is not None:
        q, k, v, x = _padding_firewall(q, k, v, x, key_padding_mask, Wl, Wr)
    P = _plain_projection(_kernel_projection(x, w, L, Tq, Tk), plain, name)
    if name == "triton":
        fwd = torch.ops.hdaf.triton_delta_attention_forward
    else:  # "cpu" and "cuda" are the two dispatch keys of the one compiled op
        fwd = torch.ops.hdaf.delta_attention_forward
    out, _lse = fwd(q.contiguous(), k.contiguous(), v.contiguous(), P.contiguous(),
                    key_padding_mask, L, U, Wl, Wr, scale)
    return out


def _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, Total_q: int,
                      Total_k: int, device) -> None:
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be an int32 torch.Tensor [B+1], got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must have dtype torch.int32, got {cu.dtype}")
        if cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"{name} must be 1-D [B+1], got shape {tuple(cu.shape)}")
        if cu.device != device:
            raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both be [B+1], got shapes "
                         f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(m).__name__} {m!r}")
        if m < 0:
            raise ValueError(f"{name} must be >= 0, got {m}")
    if torch.compiler.is_compiling() or shape_only(cu_seqlens_q) or shape_only(cu_seqlens_k):
        return  # no values to read (meta / fake), or reading them would break the graph; the op
        # checks them when it runs
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for name, cu, total, tname, m, mname in (
            ("cu_seqlens_q", cq, Total_q, "Total_q", max_seqlen_q, "max_seqlen_q"),
            ("cu_seqlens_k", ck, Total_k, "Total_k", max_seqlen_k, "max_seqlen_k")):
        if cu[0] != 0:
            raise ValueError(f"{name}[0] must be 0, got {name}={cu}")
        if cu[-1] != total:
            raise ValueError(f"{name}[-1] must be {tname}={total}, got {name}={cu}")
        lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
        if any(n < 0 for n in lengths):
            raise ValueError(f"{name} must be non-decreasing, got {name}={cu}")
        if lengths and max(lengths) > m:
            raise ValueError(f"{mname}={m} is smaller than the longest sequence of {name}, "
                             f"{max(lengths)} (lengths {lengths})")
    for b, (tq, tk) in enumerate(zip(_lengths(cq), _lengths(ck))):
        if tq > tk:
            raise ValueError(f"sequence {b} has Tq={tq} queries but Tk={tk} keys: Tq <= Tk is "
                             f"required in every sequence (cu_seqlens_q={cq}, cu_seqlens_k={ck})")


def _lengths(cu):
    return [b - a for a, b in zip(cu[:-1], cu[1:])]


def delta_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           x: Optional[torch.Tensor], w: Optional[torch.Tensor], cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                           max_distance: IntOrPair = None, window: IntOrPair = None,
                           causal: bool = False, scale: Optional[float] = None,
                           backend: str = "auto") -> torch.Tensor:
    """:func:`delta_attention` over a packed batch of sequences of different lengths.

    Sequence b owns query rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and key rows
    ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``; positions restart at 0 in every sequence, query i of
    sequence b stands at ``Tk_b - Tq_b + i``, and nothing attends across sequences. The result
    equals the per-sequence calls of :func:`delta_attention` concatenated, for
    ``Σ_b Tq_b·Tk_b`` work instead of ``B·max_seqlen_q·max_seqlen_k``. Spec:
    docs/delta_attention.md, "Packed batches".

    Args:
        q: (total_q, nheads, headdim_k): the queries of all sequences, one after the other.
        k: (total_k, nheads_kv, headdim_k); nheads_kv divides nheads.
        v: (total_k, nheads_kv, headdim_v).
        x: (total_k, delta_dim) shared by all heads, or (total_k, nheads, delta_dim); None
            (with ``w`` None): no delta term, as in :func:`delta_attention`.
        w: (delta_dim, R) shared by all heads, or (nheads, delta_dim, R); None with ``x``.
        cu_seqlens_q: (batch + 1,) int32 on q's device, 0 first, total_q last, non-decreasing.
        cu_seqlens_k: (batch + 1,) int32, likewise; every sequence has Tq_b <= Tk_b (a sequence
            of length 0 is allowed and produces nothing).
        max_seqlen_q, max_seqlen_k: at least the longest query / key length (as in
            flash-attention; the kernels may size their grids by them).
        max_distance, window, causal, scale, backend: as in :func:`delta_attention` (there is no
            key padding mask: a packed batch has none). ``"triton"`` needs its varlen op
            (``hdaf::triton_delta_attention_varlen_*``).

    Returns:
        (total_q, nheads, headdim_v).

    Usage: tests/test_gqa_varlen.py.
    """
    _check_tensor("q", q, (3,))
    _check_tensor("k", k, (3,))
    _check_tensor("v", v, (3,))
    x, w, max_distance, plain = _delta_term(x, w, max_distance, k, (k.shape[0],))
    _check_tensor("x", x, (2, 3))
    _check_tensor("w", w, (2, 3))
    Total_q, H, Dk = q.shape
    Total_k = k.shape[0]
    if k.shape[2] != Dk:
        raise ValueError(f"k must be [Total_k,Hkv,Dk] with Dk={Dk} as in q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if v.shape[0] != Total_k:
        raise ValueError(f"v must be [Total_k,Hkv,Dv] with Total_k={Total_k} as in k "
                         f"{tuple(k.shape)}, got {tuple(v.shape)}")
    _, Hkv = _check_heads(q.shape, k.shape, v.shape, "q [Total_q,H,Dk], k and v [Total_k,Hkv,D]",
                          1)
    _check_xw(x, w, (Total_k,), H, (f"[Total_k,Dr] with Total_k={Total_k}",
                                    f"[Total_k,H,Dr] with Total_k={Total_k}, H={H}"))
    _check_dtypes_devices(q, {"q": q, "k": k, "v": v, "x": x, "w": w})
    _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, Total_q, Total_k,
                      q.device)
    L, U, Wl, Wr, scale = _options(w, Dk, max_distance, window, causal, scale, backend)
    if shape_only(q):  # meta / fake tensors: the op's fake implementation gives the shapes
        args = (cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), L, U, Wl, Wr,
                scale)
        if _ops._C is not None:
            return torch.ops.hdaf.delta_attention_varlen_forward(
                q, k, v, varlen_projection(x, w), *args)[0]
        return _ops.fake_varlen_forward(q, k, v, None, *args)[0]
    features = _features(H, Hkv, 0, 0, varlen=True)
    name = _backends.resolve(backend, q.device, q.dtype, max(Dk, v.shape[-1]),
                             features=features)
    if name in ("naive", "gather"):
        big = max(int(max_seqlen_k), 1)
        lo = -big if Wl < 0 else -Wl
        hi = big if Wr < 0 else Wr
        fn = delta_attention_varlen_naive if name == "naive" else delta_attention_varlen_gather
        return fn(q, k, v, x, w, cu_seqlens_q, cu_seqlens_k, L=L, U=U, lo=lo, hi=hi, scale=scale)
    P = _plain_projection(varlen_projection(x, w), plain, name)
    if name == "triton":
        fwd = torch.ops.hdaf.triton_delta_attention_varlen_forward
    else:
        fwd = torch.ops.hdaf.delta_attention_varlen_forward
    out, _lse = fwd(q.contiguous(), k.contiguous(), v.contiguous(), P.contiguous(),
                    cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), L, U, Wl,
                    Wr, scale)
    return out
