"""Context-parallel delta attention on ``torch.distributed``: a sequence too long for one
device, split over the ranks of a process group.

* :func:`shard` / :func:`unshard` split a full sequence over the ranks and put it back
  together. ``layout="zigzag"`` cuts it into ``2W`` chunks and gives rank ``r`` chunks ``r`` and
  ``2W-1-r`` (under a causal mask every rank then has the same work); ``"contiguous"`` gives
  rank ``r`` chunk ``r`` of ``W``.
* :func:`ring_delta_attention` computes :func:`hdaf.delta_attention` on the shards: every rank
  passes its shard of the inputs and gets its shard of the output, equal to
  ``shard(hdaf.delta_attention(full inputs))``, with gradients for every input.

The ring (docs/delta_attention.md, "Global positions"): each rank computes its queries against
one shard of keys at a time, as blocks at their global positions, and merges the partial
``(out, lse)`` in float32 (float64 for float64 inputs). Meanwhile the keys, values and the key
rows of ``P = x·w`` move one rank on (``batch_isend_irecv``, posted before the block computes).
The backward walks the same ring with the merged ``out`` and ``lse``; the gradients of the keys'
side (dK, dV and the key rows of dP) travel with them and return to their owner. Blocks that
the window or the causal mask hides entirely are skipped, and so are the ring steps after the
last one any rank needs (a causal window narrower than a shard needs one step). Grouped-query
heads travel as their ``Hkv`` heads.

A rank that fails makes the others fail: every wait on another rank raises a ``RuntimeError``
naming this function, the peer and the step when the process group's timeout expires or the
peer's connection closes.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from . import block as _block
from .functional import IntOrPair, _check_tensor, _delta_term, _normalize
from .reference import delta_projection

LAYOUTS = ("zigzag", "contiguous")


def _world(group) -> Tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("hdaf.distributed needs an initialised default process group "
                           "(torch.distributed.init_process_group)")
    return dist.get_world_size(group), dist.get_rank(group)


def _check_layout(layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def chunks_of(rank: int, world: int, layout: str) -> List[int]:
    """The chunks rank ``rank`` holds, in its local order, of the ``2W`` (zigzag) or ``W``
    (contiguous) chunks of the sequence."""
    return [rank, 2 * world - 1 - rank] if layout == "zigzag" else [rank]


def _num_chunks(world: int, layout: str) -> int:
    return 2 * world if layout == "zigzag" else world


def shard(t: torch.Tensor, dim: int, group, layout: str = "zigzag") -> torch.Tensor:
    """This rank's shard of ``t``, a full sequence along ``dim``: chunks ``r`` and ``2W-1-r`` of
    ``2W`` (``"zigzag"``) or chunk ``r`` of ``W`` (``"contiguous"``), concatenated along ``dim``.
    Differentiable (a slice). ``group``: the process group (None: the default group)."""
    _check_layout(layout)
    W, rank = _world(group)
    n = _num_chunks(W, layout)
    T = t.shape[dim]
    if T % n != 0:
        raise ValueError(f"shard: the length {T} of dim {dim} (shape {tuple(t.shape)}) must be "
                         f"divisible by {n} = {'2W' if layout == 'zigzag' else 'W'} for "
                         f"layout={layout!r} over W={W} ranks")
    C = T // n
    return torch.cat([t.narrow(dim, c * C, C) for c in chunks_of(rank, W, layout)], dim)


def unshard(t: torch.Tensor, dim: int, group, layout: str = "zigzag") -> torch.Tensor:
    """The full sequence from every rank's shard ``t`` (an all-gather; the inverse of
    :func:`shard`), on every rank. Not differentiable: for checks and outputs."""
    _check_layout(layout)
    W, _ = _world(group)
    per = len(chunks_of(0, W, layout))
    if t.shape[dim] % per != 0:
        raise ValueError(f"unshard: the shard's length {t.shape[dim]} along dim {dim} must be "
                         f"divisible by {per} for layout={layout!r}")
    t = t.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(W)]
    _wait(dist.all_gather(parts, t, group=group, async_op=True), "unshard", "all_gather")
    C = t.shape[dim] // per
    chunks = [None] * _num_chunks(W, layout)
    for r, part in enumerate(parts):
        for i, c in enumerate(chunks_of(r, W, layout)):
            chunks[c] = part.narrow(dim, i * C, C)
    return torch.cat(chunks, dim)


def _wait(work, who: str, what: str):
    """Wait for ``work``; a peer that failed, left or timed out becomes a clear error."""
    try:
        return work.wait()
    except Exception as exc:  # gloo / nccl raise RuntimeError or DistBackendError
        raise RuntimeError(
            f"{who}: {what} did not complete ({type(exc).__name__}: {exc}); another rank of the "
            "process group probably failed or stopped calling it (every rank must call it with "
            "the same shapes and options)") from exc


@dataclasses.dataclass
class _Plan:
    """What every rank computes and sends, derived from shapes and options alone (hence the
    same on every rank)."""
    group: object
    world: int
    rank: int
    layout: str
    n: int  # local sequence length
    backend: str
    L: int
    U: int
    Wl: int
    Wr: int
    scale: float
    steps: int = 0  # ring steps after the local one

    def segments(self, rank: int) -> List[Tuple[int, int, int]]:
        """(first local row, global position, length) of each chunk rank ``rank`` holds."""
        cs = chunks_of(rank, self.world, self.layout)
        C = self.n // len(cs)
        return [(i * C, c * C, C) for i, c in enumerate(cs)]

    def visible(self, q_pos: int, nq: int, k_pos: int, nk: int) -> bool:
        """Whether any pair of these query and key runs is inside the window/causal band."""
        d_min, d_max = k_pos - (q_pos + nq - 1), k_pos + nk - 1 - q_pos
        return (self.Wl < 0 or d_max >= -self.Wl) and (self.Wr < 0 or d_min <= self.Wr)

    def pairs(self, src: int):
        """The visible (query segment, key segment) pairs of this rank's queries against the
        keys of rank ``src``."""
        return [(qs, ks) for qs in self.segments(self.rank) for ks in self.segments(src)
                if self.visible(qs[1], qs[2], ks[1], ks[2])]

    def last_step(self) -> int:
        """The last ring step any rank computes a block in (0: only its own keys)."""
        last = 0
        for s in range(1, self.world):
            for r in range(self.world):
                src = (r - s) % self.world
                if any(self.visible(q[1], q[2], k[1], k[2]) for q in self.segments(r)
                       for k in self.segments(src)):
                    last = s
        return last


class _Exchange:
    """One packed message to ``dst`` and one from ``src`` (the same shapes), posted now."""

    def __init__(self, plan: _Plan, tensors: Sequence[torch.Tensor], dst: int, src: int,
                 what: str):
        self.shapes = [t.shape for t in tensors]
        self.what = f"{what} (rank {plan.rank} sending to rank {dst}, receiving from rank {src})"
        send = torch.cat([t.reshape(-1) for t in tensors])
        self.recv = torch.empty_like(send)
        g = plan.group
        to_global = (lambda r: r) if g is None else (lambda r: dist.get_global_rank(g, r))
        ops = [dist.P2POp(dist.isend, send, to_global(dst), g),
               dist.P2POp(dist.irecv, self.recv, to_global(src), g)]
        self.works = dist.batch_isend_irecv(ops)
        self.send = send  # kept alive until the wait

    def wait(self) -> List[torch.Tensor]:
        for work in self.works:
            _wait(work, "ring_delta_attention", self.what)
        out, at = [], 0
        for shape in self.shapes:
            size = shape.numel()
            out.append(self.recv[at:at + size].view(shape))
            at += size
        return out


def _rows(t: torch.Tensor, seg) -> torch.Tensor:
    return t[:, :, seg[0]:seg[0] + seg[2]]


def _key_mask(masks, src: int, seg):
    return None if masks is None else masks[src][:, seg[0]:seg[0] + seg[2]]


def _ring_forward(plan: _Plan, q, k, v, P, masks):
    p = plan
    acc = [(None, None)] * len(p.segments(p.rank))
    mine = p.segments(p.rank)
    cur = (k, v, P)
    for s in range(p.steps + 1):
        src = (p.rank - s) % p.world
        nxt = None
        if s < p.steps:  # posted before this step's blocks compute
            nxt = _Exchange(p, cur, (p.rank + 1) % p.world, (p.rank - 1) % p.world,
                            f"forward step {s + 1}")
        kc, vc, Pc = cur
        for qs, ks in p.pairs(src):
            i = mine.index(qs)
            o, l = _block.block_forward(p.backend, _rows(q, qs), _rows(kc, ks), _rows(vc, ks),
                                        _rows(P, qs), _rows(Pc, ks), _key_mask(masks, src, ks),
                                        qs[1], ks[1], p.L, p.U, p.Wl, p.Wr, p.scale)
            acc[i] = _block.merge_partial(*acc[i], o, l)
        if nxt is not None:
            cur = tuple(nxt.wait())
    B, H, _, Dv = q.shape[0], q.shape[1], q.shape[2], v.shape[-1]
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs, lses = [], []
    for (o, l), seg in zip(acc, mine):
        if o is None:  # no visible key anywhere: output 0, lse -inf
            o = q.new_zeros((B, H, seg[2], Dv), dtype=lse_dtype)
            l = q.new_full((B, H, seg[2]), float("-inf"), dtype=lse_dtype)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, 2).to(q.dtype), torch.cat(lses, 2)


def _ring_backward(plan: _Plan, dout, q, k, v, P, out, lse, masks):
    p = plan
    acc_t = lse.dtype
    dq = torch.zeros(q.shape, dtype=acc_t, device=q.device)
    dPq = torch.zeros(P.shape, dtype=acc_t, device=q.device)
    cur = (k, v, P)
    incoming = None  # the key-side gradients of this step's shard, from the previous rank
    for s in range(p.steps + 1):
        src = (p.rank - s) % p.world
        nxt = None
        if s < p.steps:
            nxt = _Exchange(p, cur, (p.rank + 1) % p.world, (p.rank - 1) % p.world,
                            f"backward step {s + 1}")
        kc, vc, Pc = cur
        mine = [torch.zeros(t.shape, dtype=acc_t, device=q.device) for t in cur]  # dk, dv, dPk
        for qs, ks in p.pairs(src):
            gq, gk, gv, gPq, gPk = _block.block_backward(
                p.backend, _rows(dout, qs), _rows(q, qs), _rows(kc, ks), _rows(vc, ks),
                _rows(P, qs), _rows(Pc, ks), _key_mask(masks, src, ks), _rows(out, qs),
                lse[:, :, qs[0]:qs[0] + qs[2]], qs[1], ks[1], p.L, p.U, p.Wl, p.Wr, p.scale)
            _rows(dq, qs).add_(gq)
            _rows(dPq, qs).add_(gPq)
            for acc, g in zip(mine, (gk, gv, gPk)):
                _rows(acc, ks).add_(g)
        if incoming is not None:
            mine = [a + m for a, m in zip(incoming.wait(), mine)]
        if s < p.steps:
            incoming = _Exchange(p, mine, (p.rank + 1) % p.world, (p.rank - 1) % p.world,
                                 f"backward gradients of step {s + 1}")
        elif s > 0:  # home: the owner of this shard is `s` ranks back
            mine = _Exchange(p, mine, (p.rank - s) % p.world, (p.rank + s) % p.world,
                             "backward gradients returning to their owner").wait()
        if nxt is not None:
            cur = tuple(nxt.wait())
    dk, dv, dPk = mine
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), (dPq + dPk).to(P.dtype)


class _RingDeltaAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, P, plan, masks):
        out, lse = _ring_forward(plan, q, k, v, P, masks)
        ctx.save_for_backward(q, k, v, P, out, lse)
        ctx.plan, ctx.masks = plan, masks
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, P, out, lse = ctx.saved_tensors
        grads = _ring_backward(ctx.plan, dout.contiguous(), q, k, v, P, out, lse, ctx.masks)
        return grads + (None, None)


def _agree(plan: _Plan, q, k, v, P, has_mask: bool) -> None:
    """Every rank must pass the same shapes and options: compared through one all-gather, so a
    mismatch is a clear error on every rank instead of a hang or garbage."""
    code = LAYOUTS.index(plan.layout)
    meta = torch.tensor([*q.shape, *k.shape, v.shape[-1], *P.shape, int(has_mask), plan.L,
                         plan.U, plan.Wl, plan.Wr, code, hash(plan.scale) % (1 << 62)],
                        dtype=torch.int64)
    if dist.get_backend(plan.group) == "nccl":
        meta = meta.to(q.device)
    every = [torch.empty_like(meta) for _ in range(plan.world)]
    _wait(dist.all_gather(every, meta, group=plan.group, async_op=True), "ring_delta_attention",
          "the check that every rank passes the same shapes and options")
    for r, m in enumerate(every):
        if not torch.equal(m, meta):
            raise ValueError(
                f"ring_delta_attention: rank {r} passed different shapes or options than rank "
                f"{plan.rank} ({m.tolist()} vs {meta.tolist()}: q, k, v's last dim, P = x·w, "
                "key_padding_mask given, L, U, window, layout, scale); every rank passes its "
                "shard of the same call")


def ring_delta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         x: Optional[torch.Tensor], w: Optional[torch.Tensor], *, group,
                         layout: str = "zigzag",
                         max_distance: IntOrPair = None, window: IntOrPair = None,
                         causal: bool = False, key_padding_mask: Optional[torch.Tensor] = None,
                         scale: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """:func:`hdaf.delta_attention` over a sequence sharded across the ranks of ``group``.

    Every rank passes its shard (:func:`shard` with the same ``layout``) of each sequence input
    and gets its shard of the output: the result equals
    ``shard(hdaf.delta_attention(full inputs), 2, group, layout)``, gradients included (the
    shards of the single-device gradients; ``w``'s gradient on each rank is its own share, and
    the shares sum over the ranks to the single-device gradient, as DDP's all-reduce expects).

    Args:
        q: (batch, nheads, seqlen / W, headdim_k), this rank's shard.
        k, v: (batch, nheads_kv, seqlen / W, headdim), this rank's shard; nheads_kv divides
            nheads (the ring moves the nheads_kv heads).
        x: (batch, seqlen / W, delta_dim) or (batch, nheads, seqlen / W, delta_dim), the shard.
        w: (delta_dim, R) or (nheads, delta_dim, R), the full parameter on every rank.
            ``x`` and ``w`` both None: no delta term (plain attention), as in
            :func:`hdaf.delta_attention`.
        group: the process group the sequence is sharded over (None: the default group).
        layout: "zigzag" (chunks r and 2W-1-r of 2W; balanced under causal) or "contiguous".
        max_distance, window, causal, scale, backend: as in :func:`hdaf.delta_attention`
            (``backend``: "auto", "cpu", "triton" or "gather"/"naive"; "cuda" refuses global
            positions).
        key_padding_mask: (batch, seqlen / W) bool, this rank's shard (True: padding).

    Returns:
        (batch, nheads, seqlen / W, headdim_v), this rank's shard of the output.

    Usage: tests/test_distributed.py, examples/context_parallel.py.
    """
    _check_layout(layout)
    W, rank = _world(group)
    _check_tensor("k", k, (4,))
    x, w, max_distance, _ = _delta_term(x, w, max_distance, k, (k.shape[0], k.shape[2]))
    L, U, Wl, Wr, scale = _normalize(q, k, v, x, w, max_distance, window, causal,
                                     key_padding_mask, scale, backend)
    n = q.shape[2]
    if k.shape[2] != n:
        raise ValueError(f"ring_delta_attention: q and k must be shards of one sequence (the same "
                         f"length), got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if layout == "zigzag" and n % 2:
        raise ValueError(f"ring_delta_attention: layout='zigzag' holds two chunks per rank, so "
                         f"the shard length must be even, got {n} (q {tuple(q.shape)})")
    plan = _Plan(group, W, rank, layout, n, _block.resolve_block_backend(backend, q, v), L, U,
                 Wl, Wr, scale)
    plan.steps = plan.last_step()
    P = delta_projection(x, w)
    _agree(plan, q, k, v, P, key_padding_mask is not None)
    masks = None
    if key_padding_mask is not None:
        # padding keys never matter (docs/delta_attention.md): zero their k, v rows here, where
        # they are local; every rank needs every shard's mask (B·T bools, gathered once)
        pad = key_padding_mask[:, None, :, None]
        k, v = k.masked_fill(pad, 0), v.masked_fill(pad, 0)
        m = key_padding_mask.to(torch.uint8).contiguous()
        every = [torch.empty_like(m) for _ in range(W)]
        _wait(dist.all_gather(every, m, group=group, async_op=True), "ring_delta_attention",
              "the all-gather of key_padding_mask")
        masks = [e.bool() for e in every]
    return _RingDeltaAttention.apply(q, k, v, P, plan, masks)


def context_parallel(model: torch.nn.Module, group, layout: str = "zigzag") -> List[str]:
    """Set ``context_parallel_group`` (and the layout) on every ``hdaf.DeltaAttention`` and
    ``hdaf.DeltaMultiheadAttention`` of ``model``; ``group=None`` switches it off. Returns the
    layers' names. Their forward then takes this rank's shard of the sequence (:func:`shard`)."""
    _check_layout(layout)
    from .nn.delta_attention import set_context_parallel

    names = []
    for name, module in model.named_modules():
        if hasattr(module, "context_parallel_group"):
            set_context_parallel(module, group, layout)
            names.append(name)
    return names


__all__ = ["shard", "unshard", "ring_delta_attention", "context_parallel", "LAYOUTS"]
