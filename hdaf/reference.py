"""Pure-PyTorch references of the delta-attention operator (docs/delta_attention.md).

Both are differentiable by autograd and serve as the oracles every kernel is tested against:

* :func:`delta_attention_naive` is the paper's literal formula (eq. 11): it materializes the
  ``[B,(H),T,T,Dr]`` tensor of feature differences ``x_j - x_i`` and contracts it with the
  gathered columns of ``w``. It is the baseline to beat, in time and in memory.
* :func:`delta_attention_gather` uses the key identity ``(x_j - x_i)·w[:, r] = P[j,r] - P[i,r]``
  with ``P = x·w``: a gathered ``[B,(H),T,T]`` bias and a masked softmax.

Both take arguments already normalised by :func:`hdaf.functional.delta_attention`
(``L, U`` and the band ``lo <= j-i <= hi``, causal folded in).
"""
from __future__ import annotations

from typing import Optional

import torch


def relative_buckets(T: int, L: int, U: int, device) -> torch.Tensor:
    """``[T,T]`` int64 with ``r(i,j) = clamp(j-i, -L, U) + L``."""
    pos = torch.arange(T, device=device)
    return (pos[None, :] - pos[:, None]).clamp(-L, U) + L


def visibility(T: int, lo: int, hi: int, key_padding_mask: Optional[torch.Tensor], device):
    """Bool ``[B or 1, 1, T, T]``: True where key j is visible from query i."""
    pos = torch.arange(T, device=device)
    d = pos[None, :] - pos[:, None]
    vis = (d >= lo) & (d <= hi)
    vis = vis[None, None]
    if key_padding_mask is not None:
        vis = vis & ~key_padding_mask[:, None, None, :]
    return vis


def _masked_softmax_attention(logits, vis, v):
    # A fully masked row must give output 0 and gradient 0: mask with -inf, then replace
    # the NaN rows of softmax by 0 through a where that blocks their gradient.
    neg_inf = torch.finfo(logits.dtype).min
    logits = logits.masked_fill(~vis, neg_inf)
    probs = torch.softmax(logits, dim=-1)
    any_visible = vis.any(dim=-1, keepdim=True)
    probs = torch.where(vis & any_visible, probs, torch.zeros((), dtype=probs.dtype, device=probs.device))
    return probs.to(v.dtype) @ v


def delta_attention_naive(q, k, v, x, w, *, L: int, U: int, lo: int, hi: int,
                          key_padding_mask=None, scale: float) -> torch.Tensor:
    """The paper's formula, materializing ``x_j - x_i`` for every pair: O(T²·Dr) memory.

    q, k: [B,H,T,Dk]; v: [B,H,T,Dv]; x: [B,T,Dr] or [B,H,T,Dr]; w: [Dr,R] or [H,Dr,R].
    Returns [B,H,T,Dv].
    """
    T = q.shape[-2]
    if x.dim() == 3:
        x = x[:, None]  # [B,1,T,Dr]
    if w.dim() == 2:
        w = w[None]  # [1,Dr,R]
    r = relative_buckets(T, L, U, q.device)  # [T,T]
    diff = x[..., None, :, :] - x[..., :, None, :]  # [B,Hx,T(i),T(j),Dr] = x_j - x_i
    w_ij = w.transpose(-1, -2)[:, r]  # [Hw,T,T,Dr] = w[:, r(i,j)]
    rpe = (diff * w_ij[None]).sum(-1)  # [B,max(Hx,Hw),T,T]
    logits = scale * (q @ k.transpose(-1, -2) + rpe)
    vis = visibility(T, lo, hi, key_padding_mask, q.device)
    return _masked_softmax_attention(logits, vis, v)


def delta_attention_gather(q, k, v, x, w, *, L: int, U: int, lo: int, hi: int,
                           key_padding_mask=None, scale: float) -> torch.Tensor:
    """``P = x·w`` and a gathered ``[B,(H),T,T]`` bias ``P[j,r(i,j)] - P[i,r(i,j)]``."""
    T = q.shape[-2]
    P = delta_projection(x, w)  # [B,Hp,T,R]
    r = relative_buckets(T, L, U, q.device)  # [T,T]
    B, Hp = P.shape[0], P.shape[1]
    idx = r.expand(B, Hp, T, T)
    # P_i[b,h,i,j] = P[b,h,i,r(i,j)]; P_j[b,h,i,j] = P[b,h,j,r(i,j)] (gather from P transposed)
    p_query = torch.gather(P, -1, idx)
    p_key = torch.gather(P.transpose(-1, -2), -2, idx)
    logits = scale * (q @ k.transpose(-1, -2) + (p_key - p_query))
    vis = visibility(T, lo, hi, key_padding_mask, q.device)
    return _masked_softmax_attention(logits, vis, v)


def delta_projection(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``P = x·w`` as ``[B,Hp,T,R]``: ``Hp = 1`` when both are shared across heads, else H."""
    if x.dim() == 3:
        x = x[:, None]  # [B,1,T,Dr]
    if w.dim() == 2:
        w = w[None]  # [1,Dr,R]
    return x @ w  # broadcast: [B,max(Hx,Hw),T,R]
