"""``hdaf.delta_attention``: argument checks, defaults, and the call into a backend."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import torch

from . import dispatch as _backends
from . import ops as _ops  # noqa: F401  (registers fake + autograd of the compiled op)
from .reference import delta_attention_gather, delta_attention_naive, delta_projection

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


def _normalize(q, k, v, x, w, max_distance, window, causal, key_padding_mask, scale, backend):
    """Check every argument; return ``(L, U, Wl, Wr, scale)`` with causal folded into ``Wr``."""
    _check_tensor("q", q, (4,))
    _check_tensor("k", k, (4,))
    _check_tensor("v", v, (4,))
    _check_tensor("x", x, (3, 4))
    _check_tensor("w", w, (2, 3))
    B, H, T, Dk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape [B,H,T,Dk]={tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B,H,T,Dv] with [B,H,T]={tuple(q.shape[:3])} as in q, "
                         f"got {tuple(v.shape)}")
    if T == 0:
        raise ValueError(f"the sequence length T must be at least 1, got q of shape {tuple(q.shape)}")
    if x.dim() == 3 and x.shape[:2] != (B, T):
        raise ValueError(f"x must be [B,T,Dr] with B={B}, T={T} (or [B,H,T,Dr]), got {tuple(x.shape)}")
    if x.dim() == 4 and x.shape[:3] != (B, H, T):
        raise ValueError(f"x must be [B,H,T,Dr] with B={B}, H={H}, T={T} (or [B,T,Dr]), "
                         f"got {tuple(x.shape)}")
    Dr = x.shape[-1]
    if w.dim() == 2 and w.shape[0] != Dr:
        raise ValueError(f"w must be [Dr,R] with Dr={Dr} (x's last dim), got {tuple(w.shape)}")
    if w.dim() == 3 and w.shape[:2] != (H, Dr):
        raise ValueError(f"w must be [H,Dr,R] with H={H}, Dr={Dr}, got {tuple(w.shape)}")
    R = w.shape[-1]
    if R == 0:
        raise ValueError(f"w must have at least one bucket column, got shape {tuple(w.shape)}")

    named = {"q": q, "k": k, "v": v, "x": x, "w": w}
    for name, t in named.items():
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: all of q, k, v, x, w "
                            "must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: all inputs must "
                             "be on one device")

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

    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError("key_padding_mask must be a bool torch.Tensor [B,T] or None, "
                            f"got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must have dtype torch.bool (True marks padding), "
                            f"got {key_padding_mask.dtype}")
        if key_padding_mask.shape != (B, T):
            raise ValueError(f"key_padding_mask must be [B,T]=({B}, {T}), "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")

    if scale is None:
        scale = 1.0 / math.sqrt(Dk) if Dk > 0 else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    if not isinstance(backend, str) or backend not in _backends.BACKENDS:
        raise ValueError(f"backend must be one of {_backends.BACKENDS}, got {backend!r}")
    return L, U, Wl, Wr, float(scale)


def delta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor,
                    w: torch.Tensor, *, max_distance: IntOrPair = None, window: IntOrPair = None,
                    causal: bool = False, key_padding_mask: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """Multi-head self-attention whose logits carry the delta relative-position term.

    ``logit_ij = scale * (q_i·k_j + (x_j - x_i)·w[:, r(i,j)])``, ``r(i,j) = clamp(j-i, -L, U) + L``;
    the normative spec, with the backward, is ``docs/delta_attention.md``.

    Args:
        q: (batch, nheads, seqlen, headdim_k).
        k: (batch, nheads, seqlen, headdim_k).
        v: (batch, nheads, seqlen, headdim_v); headdim_v may differ from headdim_k.
        x: (batch, seqlen, delta_dim) shared by all heads, or (batch, nheads, seqlen, delta_dim).
        w: (delta_dim, R) shared by all heads, or (nheads, delta_dim, R).
        max_distance: ``m`` means ``(m, m)``; ``(L, U)`` with ``L + U + 1 == R``.
            None: ``L = U = (R-1)/2`` (R must be odd).
        window: None (unbounded), ``w`` meaning ``(w, w)``, or ``(Wl, Wr)``: key j is visible from
            query i only when ``-Wl <= j-i <= Wr``. Kernels skip invisible tiles: O(T·window).
        causal: key j is visible from query i only when ``j <= i``.
        key_padding_mask: (batch, seqlen) bool, True marks a padding key to ignore.
        scale: logit scale, default ``1/sqrt(headdim_k)``.
        backend: "auto" (the compiled kernel measured fastest for the device, dtype and head
            dim, see ``hdaf.dispatch.auto_candidates``; the "gather" reference with a one-time
            warning when none is available), "naive", "gather", "cpu", "triton", "cuda".

    Returns:
        (batch, nheads, seqlen, headdim_v). A query with no visible key gets 0 (and gradient 0).

    Usage: tests/test_delta_attention.py.
    """
    L, U, Wl, Wr, scale = _normalize(q, k, v, x, w, max_distance, window, causal,
                                     key_padding_mask, scale, backend)
    name = _backends.resolve(backend, q.device, q.dtype, max(q.shape[-1], v.shape[-1]))
    if name in ("naive", "gather"):
        T = q.shape[-2]
        lo = -(T - 1) if Wl < 0 else -Wl
        hi = (T - 1) if Wr < 0 else Wr
        fn = delta_attention_naive if name == "naive" else delta_attention_gather
        return fn(q, k, v, x, w, L=L, U=U, lo=lo, hi=hi, key_padding_mask=key_padding_mask,
                  scale=scale)
    P = delta_projection(x, w)
    if name == "triton":
        fwd = torch.ops.hdaf.triton_delta_attention_forward
    else:  # "cpu" and "cuda" are the two dispatch keys of the one compiled op
        fwd = torch.ops.hdaf.delta_attention_forward
    out, _lse = fwd(q.contiguous(), k.contiguous(), v.contiguous(), P.contiguous(),
                    key_padding_mask, L, U, Wl, Wr, scale)
    return out
