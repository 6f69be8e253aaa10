"""One block of delta attention at global positions, and the merge of partial results: the
steps that context-parallel attention (:mod:`hdaf.distributed`) is made of.

A *block* is a run of ``Tq`` queries at global positions ``q_start + i`` against a run of ``Tk``
keys at ``k_start + j`` (docs/delta_attention.md, "Global positions"). Its forward returns the
partial output and log-sum-exp over its keys; :func:`merge_partial` combines the blocks of a
query run into the result over all its keys; the backward of each block takes that merged
``out`` and ``lse`` (as flash-attention's backward does), so the per-block gradients add up to
the gradients of the merged output.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import dispatch as _backends
from . import ops as _ops  # noqa: F401  (registers fake + autograd of the compiled ops)
from .reference import delta_attention_block_gather, delta_attention_block_gather_backward


def resolve_block_backend(backend: str, q: torch.Tensor, v: torch.Tensor) -> str:
    """The concrete backend for blocks of these tensors (``"naive"`` computes them with the
    ``"gather"`` reference: a block is given ``P``, not ``x`` and ``w``)."""
    what = "query and key blocks at global positions"
    name = _backends.resolve(backend, q.device, q.dtype, max(q.shape[-1], v.shape[-1]),
                             features={"offsets": what})
    return "gather" if name == "naive" else name


def band(window_left: int, window_right: int, span: int) -> Tuple[int, int]:
    """``(lo, hi)``: the visible offsets ``lo <= j - t_i <= hi``; an unbounded side (-1) reaches
    past every offset of a sequence of ``span`` positions."""
    lo = -span if window_left < 0 else -window_left
    hi = span if window_right < 0 else window_right
    return lo, hi


def _op(name: str, direction: str):
    if name == "triton":
        return getattr(torch.ops.hdaf, f"triton_delta_attention_block_{direction}")
    return getattr(torch.ops.hdaf, f"delta_attention_block_{direction}")


def block_forward(name: str, q, k, v, P_q, P_k, key_padding_mask: Optional[torch.Tensor],
                  q_start: int, k_start: int, L: int, U: int, window_left: int,
                  window_right: int, scale: float):
    """``(out [B,H,Tq,Dv], lse [B,H,Tq])`` of one block with backend ``name`` (resolved:
    "gather", "cpu" or "triton"). ``window_left/right``: -1 unbounded, causal folded in."""
    if name == "gather":
        lo, hi = band(window_left, window_right, q.shape[2] + k.shape[2] + abs(q_start - k_start))
        return delta_attention_block_gather(q, k, v, P_q, P_k, q_start=q_start, k_start=k_start,
                                            L=L, U=U, lo=lo, hi=hi,
                                            key_padding_mask=key_padding_mask, scale=scale)
    return _op(name, "forward")(q.contiguous(), k.contiguous(), v.contiguous(),
                                P_q.contiguous(), P_k.contiguous(), key_padding_mask, q_start,
                                k_start, L, U, window_left, window_right, scale)


def block_backward(name: str, grad_out, q, k, v, P_q, P_k,
                   key_padding_mask: Optional[torch.Tensor], out, lse, q_start: int,
                   k_start: int, L: int, U: int, window_left: int, window_right: int,
                   scale: float):
    """``(dq, dk, dv, dP_q, dP_k)`` of one block, given the ``out`` and ``lse`` merged over all
    key blocks of its queries."""
    if name == "gather":
        lo, hi = band(window_left, window_right, q.shape[2] + k.shape[2] + abs(q_start - k_start))
        return delta_attention_block_gather_backward(
            grad_out, q, k, v, P_q, P_k, out, lse, q_start=q_start, k_start=k_start, L=L, U=U,
            lo=lo, hi=hi, key_padding_mask=key_padding_mask, scale=scale)
    return _op(name, "backward")(grad_out.contiguous(), q.contiguous(), k.contiguous(),
                                 v.contiguous(), P_q.contiguous(), P_k.contiguous(),
                                 key_padding_mask, out.contiguous(), lse.contiguous(), q_start,
                                 k_start, L, U, window_left, window_right, scale)


def merge_partial(out: Optional[torch.Tensor], lse: Optional[torch.Tensor],
                  block_out: torch.Tensor, block_lse: torch.Tensor):
    """The running ``(out, lse)`` of a query run merged with one more block's partial result:
    ``lse' = log(e^lse + e^lse_b)``, ``out' = e^(lse - lse')·out + e^(lse_b - lse')·out_b``, in
    ``lse``'s dtype (float32, float64 for float64 inputs). A row whose ``lse`` and ``lse_b`` are
    both ``-inf`` (no visible key yet) stays ``out = 0``, ``lse = -inf``, never NaN. ``out=None``
    starts a run."""
    acc = block_lse.dtype
    block_out = block_out.to(acc)
    if out is None:
        return block_out, block_lse
    new = torch.logaddexp(lse, block_lse)
    safe = torch.where(new == float("-inf"), torch.zeros((), dtype=acc, device=new.device), new)
    return (torch.exp(lse - safe)[..., None] * out
            + torch.exp(block_lse - safe)[..., None] * block_out), new
