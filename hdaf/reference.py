"""Pure-PyTorch references of the delta-attention operator (docs/delta_attention.md).

All are differentiable by autograd and serve as the oracles every kernel is tested against:

* :func:`delta_attention_naive` is the paper's literal formula (eq. 11): it materializes the
  ``[B,(H),Tq,Tk,Dr]`` tensor of feature differences ``x_j - x_{t_i}`` and contracts it with the
  gathered columns of ``w``. It is the baseline to beat, in time and in memory.
* :func:`delta_attention_gather` uses the key identity ``(x_j - x_{t_i})·w[:, r] = P[j,r] - P[t_i,r]``
  with ``P = x·w``: a gathered ``[B,(H),Tq,Tk]`` bias and a masked softmax.
* :func:`delta_attention_varlen_naive` computes a packed batch as one block-diagonal attention
  over all its tokens (positions restart per sequence, pairs across sequences invisible);
  :func:`delta_attention_varlen_gather` loops over the sequences with the gather reference.

Grouped-query heads are computed by repeating k and v per query head (the kernels never copy
them). The query block stands at the end of the keys: query i is at position ``t_i = Tk - Tq + i``.
All take arguments already normalised by :func:`hdaf.functional.delta_attention` (``L, U`` and
the band ``lo <= j - t_i <= hi``, causal folded in).
"""
from __future__ import annotations

from typing import Optional

import torch


def offsets(T: int, device, Tk: Optional[int] = None, q_start: Optional[int] = None,
            k_start: int = 0) -> torch.Tensor:
    """``[T,Tk]`` int64 ``j - t_i`` in global positions: query i at ``q_start + i``, key j at
    ``k_start + j``. Defaults: ``Tk = T`` and the queries at the end of the keys,
    ``q_start = k_start + Tk - T``."""
    Tk = T if Tk is None else Tk
    q_start = k_start + Tk - T if q_start is None else q_start
    pos_q = torch.arange(T, device=device) + q_start
    pos_k = torch.arange(Tk, device=device) + k_start
    return pos_k[None, :] - pos_q[:, None]


def relative_buckets(T: int, L: int, U: int, device, Tk: Optional[int] = None,
                     q_start: Optional[int] = None, k_start: int = 0) -> torch.Tensor:
    """``[T,Tk]`` int64 with ``r(i,j) = clamp(j - t_i, -L, U) + L``, ``t_i = Tk - T + i``
    (``Tk`` defaults to ``T``: ``t_i = i``); global positions as in :func:`offsets`."""
    return offsets(T, device, Tk, q_start, k_start).clamp(-L, U) + L


def visibility(T: int, lo: int, hi: int, key_padding_mask: Optional[torch.Tensor], device,
               Tk: Optional[int] = None, q_start: Optional[int] = None, k_start: int = 0):
    """Bool ``[B or 1, 1, T, Tk]``: True where key j is visible from query i (``lo <= j - t_i <= hi``);
    global positions as in :func:`offsets`."""
    d = offsets(T, device, Tk, q_start, k_start)
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


def repeat_kv(t: torch.Tensor, H: int, dim: int = 1) -> torch.Tensor:
    """Key/value heads repeated to the H query heads (head h reads head ``h // (H / Hkv)``)."""
    Hkv = t.shape[dim]
    return t if Hkv == H else t.repeat_interleave(H // Hkv, dim=dim)


def delta_attention_naive(q, k, v, x, w, *, L: int, U: int, lo: int, hi: int,
                          key_padding_mask=None, scale: float) -> torch.Tensor:
    """The paper's formula, materializing ``x_j - x_{t_i}`` for every pair: O(Tq·Tk·Dr) memory.

    q: [B,H,Tq,Dk]; k: [B,Hkv,Tk,Dk]; v: [B,Hkv,Tk,Dv]; x: [B,Tk,Dr] or [B,H,Tk,Dr];
    w: [Dr,R] or [H,Dr,R]. Returns [B,H,Tq,Dv].
    """
    H, Tq, Tk = q.shape[1], q.shape[-2], k.shape[-2]
    k, v = repeat_kv(k, H), repeat_kv(v, H)
    if x.dim() == 3:
        x = x[:, None]  # [B,1,Tk,Dr]
    if w.dim() == 2:
        w = w[None]  # [1,Dr,R]
    r = relative_buckets(Tq, L, U, q.device, Tk)  # [Tq,Tk]
    vis = visibility(Tq, lo, hi, key_padding_mask, q.device, Tk)
    q, k, v, x_key, x_query = _firewall(q, k, v, x, x[..., Tk - Tq:, :], vis, key_padding_mask)
    diff = x_key[..., None, :, :] - x_query[..., :, None, :]  # [B,Hx,Tq(i),Tk(j),Dr] = x_j - x_{t_i}
    w_ij = w.transpose(-1, -2)[:, r]  # [Hw,Tq,Tk,Dr] = w[:, r(i,j)]
    rpe = (diff * w_ij[None]).sum(-1)  # [B,max(Hx,Hw),Tq,Tk]
    logits = scale * (q @ k.transpose(-1, -2) + rpe)
    return _masked_softmax_attention(logits, vis, v)


def idle_rows(key_padding_mask: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``[B,Tk]`` bool: positions that enter no visible pair, a padding key whose own query (if
    the position has one: ``j >= Tk - Tq``) sees no key. ``live``: ``[B,Tq]``, queries with a
    visible key. Their ``x`` rows are set to 0 before ``P = x·w``: that matmul's backward
    (``dw = xᵀ·dP``) would otherwise multiply a NaN there by its zero ``dP`` row."""
    Tk, Tq = key_padding_mask.shape[-1], live.shape[-1]
    return key_padding_mask & ~torch.nn.functional.pad(live, (Tk - Tq, 0), value=False)


def without_idle_rows(x: torch.Tensor, idle: torch.Tensor) -> torch.Tensor:
    """``x`` (``[B,Tk,Dr]`` or ``[B,H,Tk,Dr]``) with the rows of ``idle`` ``[B,Tk]`` set to 0."""
    idle = idle[:, :, None] if x.dim() == 3 else idle[:, None, :, None]
    return x.masked_fill(idle, 0)


def _firewall(q, k, v, x_key, x_query, vis, key_padding_mask):
    """Inputs no visible pair reads, replaced by 0 through a ``where`` (which also gives them
    gradient 0): the rows of padding keys in ``k``, ``v`` and ``x`` (as a key), and the rows of
    fully masked queries in ``q`` and ``x`` (as a query). A NaN or Inf there then never reaches
    an output or a gradient through a product with a zero probability (0·NaN = NaN), as the
    spec requires (docs/delta_attention.md, "Non-finite values and edge cases")."""
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, :, None]  # [B,1,Tk,1]
        k, v, x_key = (torch.where(keep, t, zero) for t in (k, v, x_key))
    live = vis.any(dim=-1)[..., None]  # [B or 1,1,Tq,1]: rows with a visible key
    q, x_query = torch.where(live, q, zero), torch.where(live, x_query, zero)
    return q, k, v, x_key, x_query


def delta_attention_gather(q, k, v, x, w, *, L: int, U: int, lo: int, hi: int,
                           key_padding_mask=None, scale: float) -> torch.Tensor:
    """``P = x·w`` and a gathered ``[B,(H),Tq,Tk]`` bias ``P[j,r(i,j)] - P[t_i,r(i,j)]``."""
    H, Tq, Tk = q.shape[1], q.shape[-2], k.shape[-2]
    k, v = repeat_kv(k, H), repeat_kv(v, H)
    r = relative_buckets(Tq, L, U, q.device, Tk)  # [Tq,Tk]
    vis = visibility(Tq, lo, hi, key_padding_mask, q.device, Tk)
    if key_padding_mask is not None:
        x = without_idle_rows(x, idle_rows(key_padding_mask, vis.any(-1)[:, 0]))
    P = delta_projection(x, w)  # [B,Hp,Tk,R]
    q, k, v, P_key, P_query = _firewall(q, k, v, P, P[..., Tk - Tq:, :], vis, key_padding_mask)
    B, Hp = P.shape[0], P.shape[1]
    idx = r.expand(B, Hp, Tq, Tk)
    # P_i[b,h,i,j] = P[b,h,t_i,r(i,j)]; P_j[b,h,i,j] = P[b,h,j,r(i,j)] (gather from P transposed)
    p_query = torch.gather(P_query, -1, idx)
    p_key = torch.gather(P_key.transpose(-1, -2), -2, idx)
    logits = scale * (q @ k.transpose(-1, -2) + (p_key - p_query))
    return _masked_softmax_attention(logits, vis, v)


def delta_projection(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``P = x·w`` as ``[B,Hp,T,R]``: ``Hp = 1`` when both are shared across heads, else H."""
    if x.dim() == 3:
        x = x[:, None]  # [B,1,T,Dr]
    if w.dim() == 2:
        w = w[None]  # [1,Dr,R]
    return x @ w  # broadcast: [B,max(Hx,Hw),T,R]


def varlen_projection(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``P = x·w`` of a packed batch as ``[Total_k,Hp,R]`` (``Hp = 1`` when both are shared)."""
    if x.dim() == 2:
        x = x[:, None]  # [Total_k,1,Dr]
    if w.dim() == 2:
        w = w[None]  # [1,Dr,R]
    return (x.transpose(0, 1) @ w).transpose(0, 1)  # [Hp,Total_k,R] -> [Total_k,Hp,R]


def _sequence_positions(cu_q: torch.Tensor, cu_k: torch.Tensor):
    """Per packed token: its sequence and its position in it (queries at ``Tk_b - Tq_b + i``)."""
    lq, lk = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
    seq_q = torch.repeat_interleave(torch.arange(lq.numel(), device=cu_q.device), lq)
    seq_k = torch.repeat_interleave(torch.arange(lk.numel(), device=cu_k.device), lk)
    pos_k = torch.arange(seq_k.numel(), device=cu_k.device) - cu_k[seq_k]
    pos_q = torch.arange(seq_q.numel(), device=cu_q.device) - cu_q[seq_q] + (lk - lq)[seq_q]
    return seq_q, pos_q, seq_k, pos_k


def delta_attention_varlen_naive(q, k, v, x, w, cu_seqlens_q, cu_seqlens_k, *, L: int, U: int,
                                 lo: int, hi: int, scale: float) -> torch.Tensor:
    """A packed batch as one attention over all its tokens, the paper's formula materialized:
    pairs of different sequences are invisible, positions restart in every sequence.

    q: [Total_q,H,Dk]; k: [Total_k,Hkv,Dk]; v: [Total_k,Hkv,Dv]; x: [Total_k,Dr] or
    [Total_k,H,Dr]; w: [Dr,R] or [H,Dr,R]. Returns [Total_q,H,Dv]. O(Total_q·Total_k·Dr) memory.
    """
    H = q.shape[1]
    cu_q, cu_k = cu_seqlens_q.long(), cu_seqlens_k.long()
    seq_q, pos_q, seq_k, pos_k = _sequence_positions(cu_q, cu_k)
    qh = q.transpose(0, 1)  # [H,Total_q,Dk]
    kh = repeat_kv(k, H).transpose(0, 1)
    vh = repeat_kv(v, H).transpose(0, 1)
    xh = (x[:, None] if x.dim() == 2 else x).transpose(0, 1)  # [Hx,Total_k,Dr]
    wh = w[None] if w.dim() == 2 else w  # [Hw,Dr,R]
    x_query = xh[:, cu_k[seq_q] + pos_q]  # [Hx,Total_q,Dr]: x at each query's own key row
    d = pos_k[None, :] - pos_q[:, None]  # [Total_q,Total_k]
    r = d.clamp(-L, U) + L
    vis = (seq_q[:, None] == seq_k[None, :]) & (d >= lo) & (d <= hi)
    # Every product pair by pair, each factor of a hidden pair replaced by 0 first: a NaN in
    # one sequence then never reaches another through 0·NaN (the sequences are as independent
    # as separate calls, docs/delta_attention.md), at O(Total_q·Total_k·D) memory like diff.
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    pair = vis[..., None]  # [Total_q,Total_k,1]

    def pairs(a_i, b_j):  # [..,Total_q,D], [..,Total_k,D] -> [..,Total_q,Total_k,D] each
        return (torch.where(pair, a_i[..., :, None, :], zero),
                torch.where(pair, b_j[..., None, :, :], zero))

    qi, kj = pairs(qh, kh)
    xi, xj = pairs(x_query, xh)
    rpe = ((xj - xi) * torch.where(pair, wh.transpose(-1, -2)[:, r], zero)).sum(-1)
    logits = scale * ((qi * kj).sum(-1) + rpe)  # [H,Total_q,Total_k]
    neg_inf = torch.finfo(logits.dtype).min
    probs = torch.softmax(logits.masked_fill(~vis, neg_inf), dim=-1)
    probs = torch.where(vis & vis.any(-1, keepdim=True), probs, zero)
    vj = torch.where(pair, vh[..., None, :, :], zero)  # [H,Total_q,Total_k,Dv]
    out = (probs[..., None] * vj).sum(-2)  # [H,Total_q,Dv]
    return out.transpose(0, 1)


def delta_attention_varlen_gather(q, k, v, x, w, cu_seqlens_q, cu_seqlens_k, *, L: int, U: int,
                                  lo: int, hi: int, scale: float) -> torch.Tensor:
    """A packed batch as a loop of :func:`delta_attention_gather` calls, one per sequence."""
    H, Dv = q.shape[1], v.shape[-1]
    outs = []
    for (q0, q1), (k0, k1) in zip(_spans(cu_seqlens_q), _spans(cu_seqlens_k)):
        if q1 == q0:
            continue
        xs = x[k0:k1]
        xs = xs[None] if x.dim() == 2 else xs.transpose(0, 1)[None]  # [1,Tk,Dr] or [1,H,Tk,Dr]
        out = delta_attention_gather(
            q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None],
            v[k0:k1].transpose(0, 1)[None], xs, w, L=L, U=U, lo=lo, hi=hi, scale=scale)
        outs.append(out[0].transpose(0, 1))  # [Tq_b,H,Dv]
    if not outs:
        # no query anywhere: an empty output that is still part of the graph, so backward gives
        # the spec's empty/zero gradients instead of failing (the 0 never meets a value)
        return q.new_zeros((0, H, Dv)) + sum(t.sum() for t in (q, k, v, x, w)) * 0
    return torch.cat(outs, dim=0)


def _spans(cu: torch.Tensor):
    c = cu.tolist()
    return list(zip(c[:-1], c[1:]))


def _block_logits(q, k, P_q, P_k, *, q_start: int, k_start: int, L: int, U: int, scale: float):
    """Logits ``[B,H,Tq,Tk]`` of a block at global positions (query i at ``q_start + i``, key j
    at ``k_start + j``): ``scale·(q_i·k_j + P_k[j, r] - P_q[i, r])``, differentiable."""
    H, Tq, Tk = q.shape[1], q.shape[-2], k.shape[-2]
    r = relative_buckets(Tq, L, U, q.device, Tk, q_start, k_start)  # [Tq,Tk]
    B, Hp = P_k.shape[0], P_k.shape[1]
    idx = r.expand(B, Hp, Tq, Tk)
    bias = torch.gather(P_k.transpose(-1, -2), -2, idx) - torch.gather(P_q, -1, idx)
    return scale * (q @ repeat_kv(k, H).transpose(-1, -2) + bias)


def delta_attention_block_gather(q, k, v, P_q, P_k, *, q_start: int, k_start: int, L: int,
                                 U: int, lo: int, hi: int, key_padding_mask=None,
                                 scale: float):
    """One block of the operator at global positions (docs/delta_attention.md, "Global
    positions"): ``(out [B,H,Tq,Dv], lse [B,H,Tq])``, ``lse`` float64 for float64 inputs and
    float32 otherwise, ``-inf`` for a row with no visible key of the block. ``out`` is
    differentiable (its own softmax over the block); ``lse`` is not.

    q: [B,H,Tq,Dk]; k: [B,Hkv,Tk,Dk]; v: [B,Hkv,Tk,Dv]; P_q: [B,Hp,Tq,R], the queries' own rows
    of ``P = x·w``; P_k: [B,Hp,Tk,R], the keys' rows; visible pairs ``lo <= j - t_i <= hi``.
    """
    H, Tq, Tk = q.shape[1], q.shape[-2], k.shape[-2]
    logits = _block_logits(q, k, P_q, P_k, q_start=q_start, k_start=k_start, L=L, U=U,
                           scale=scale)
    vis = visibility(Tq, lo, hi, key_padding_mask, q.device, Tk, q_start, k_start)
    out = _masked_softmax_attention(logits, vis, repeat_kv(v, H))
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        lse = torch.logsumexp(logits.to(acc).masked_fill(~vis, float("-inf")), dim=-1)
    return out, lse


def delta_attention_block_gather_backward(grad_out, q, k, v, P_q, P_k, out, lse, *,
                                          q_start: int, k_start: int, L: int, U: int, lo: int,
                                          hi: int, key_padding_mask=None, scale: float):
    """The backward of one block given the ``out`` and ``lse`` merged over *all* key blocks of
    its queries (flash-attention's backward): ``p = exp(logit - lse)``, ``D = dout·out``,
    ``dS = p·(dout·v - D)``; returns ``(dq, dk, dv, dP_q, dP_k)``. Summed over the key blocks,
    these are the gradients of the merged output."""
    H, Tq, Tk = q.shape[1], q.shape[-2], k.shape[-2]
    inputs = [t.detach().requires_grad_(True) for t in (q, k, P_q, P_k)]
    vis = visibility(Tq, lo, hi, key_padding_mask, q.device, Tk, q_start, k_start)
    with torch.enable_grad():
        logits = _block_logits(*inputs, q_start=q_start, k_start=k_start, L=L, U=U, scale=scale)
        zero = torch.zeros((), dtype=lse.dtype, device=q.device)
        # hidden pairs (and rows with lse = -inf, which see nothing anywhere) get p = 0
        p = torch.where(vis, torch.exp(logits.detach().to(lse.dtype) - lse[..., None]), zero)
        p = p.to(q.dtype)
        vh = repeat_kv(v, H)
        dv = p.transpose(-1, -2) @ grad_out  # [B,H,Tk,Dv]
        D = (grad_out * out).sum(-1, keepdim=True)
        dS = p * (grad_out @ vh.transpose(-1, -2) - D)
        dq, dk, dPq, dPk = torch.autograd.grad(logits, inputs, dS)
    G = H // k.shape[1]
    if G > 1:  # the query heads of a group, summed into their key/value head
        dv = dv.unflatten(1, (k.shape[1], G)).sum(2)
    return dq, dk, dv, dPq, dPk
