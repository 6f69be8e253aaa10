"""``DeltaAttention``: multi-head self-attention with the delta relative-position term.

A drop-in for ``torch.nn.MultiheadAttention`` in self-attention blocks; one call of
:func:`hdaf.delta_attention` per forward.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..block import resolve_block_backend
from ..dispatch import resolve
from ..distributed import LAYOUTS, ring_delta_attention
from ..functional import IntOrPair, _pair, delta_attention, shape_only


def set_context_parallel(layer: nn.Module, group, layout: str) -> None:
    """Check and store a layer's context-parallel settings (``group=None``: off)."""
    if layout not in LAYOUTS:
        raise ValueError(f"context_parallel_layout must be one of {LAYOUTS}, got {layout!r}")
    layer.context_parallel_group, layer.context_parallel_layout = group, layout


def attend(layer: nn.Module, q, k, v, x, w, causal: bool, key_padding_mask) -> torch.Tensor:
    """The attention call of both layers: :func:`hdaf.delta_attention`, or with a
    ``context_parallel_group`` :func:`hdaf.distributed.ring_delta_attention` on the shards.
    Resolves the backend once: it both serves the call and is reported as ``last_backend``
    (meta / fake inputs: "fake", the op's fake implementation gives the shapes)."""
    cp = layer.context_parallel_group is not None
    if shape_only(q):
        layer.last_backend = "fake"
    else:
        layer.last_backend = (resolve_block_backend(layer.backend, q, v) if cp
                              else resolve(layer.backend, q.device, q.dtype, q.shape[-1]))
    options = dict(max_distance=(layer.L, layer.U), window=layer.window, causal=causal,
                   key_padding_mask=key_padding_mask,
                   backend=layer.backend if layer.last_backend == "fake" else layer.last_backend)
    if cp:
        return ring_delta_attention(q, k, v, x, w, group=layer.context_parallel_group,
                                    layout=layer.context_parallel_layout, **options)
    return delta_attention(q, k, v, x, w, **options)


class DeltaAttention(nn.Module):
    """Self-attention whose logits add ``(x_j - x_i)·w[:, r(j-i)]`` (the paper's eq. 10–12).

    Args:
        embed_dim: model dimension E (input and output).
        num_heads: number of heads H; E must be divisible by H.
        bias: add biases to the input and output projections.
        batch_first: inputs are (batch, seq, feature) when True, (seq, batch, feature) otherwise.
        dropout: dropout on the output (after the output projection).
        delta_dim: features whose changes form the bias, Dr. Default E: the layer input itself;
            otherwise a linear projection of the input to Dr.
        max_distance: ``m`` or ``(L, U)``: offsets are clipped to ``[-L, U]``; ``R = L+U+1``
            relative buckets, each a column of ``w``.
        window: None, ``w`` or ``(Wl, Wr)``: key j visible from query i only when
            ``-Wl <= j-i <= Wr`` (the kernels then cost O(T·window)).
        causal: key j visible from query i only when ``j <= i``.
        share_rpe_across_heads: one ``w [Dr,R]`` for all heads (paper default), else ``[H,Dr,R]``.
        backend: passed to :func:`hdaf.delta_attention` ("auto" picks the compiled kernel).
        use_delta: False drops the delta term (plain attention: the ablation). The operator is
            then called without one (``x`` and ``w`` None), so the kernels run their plain
            path; ``rpe`` and ``delta_proj`` stay (checkpoints keep their keys) but are unused.
        context_parallel_group: a ``torch.distributed`` process group (``group.WORLD`` for the
            default one) the sequence is sharded over; then ``forward`` takes this rank's shard
            of ``x`` and ``key_padding_mask`` (:func:`hdaf.distributed.shard`) and returns its
            shard of the output, through :func:`hdaf.distributed.ring_delta_attention`. None:
            single-device attention. :func:`hdaf.distributed.context_parallel` sets it on every
            layer of a model.
        context_parallel_layout: the shards' layout, "zigzag" or "contiguous".

    Shapes: ``forward(x [B,T,E], key_padding_mask [B,T] bool, True = padding) -> [B,T,E]``.
    After a call, ``last_backend`` names the backend that served it.
    """

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, batch_first: bool = True,
                 dropout: float = 0.0, delta_dim: Optional[int] = None,
                 max_distance: IntOrPair = 16, window: IntOrPair = None, causal: bool = False,
                 share_rpe_across_heads: bool = True, backend: str = "auto",
                 use_delta: bool = True, device=None, dtype=None,
                 context_parallel_group=None, context_parallel_layout: str = "zigzag"):
        super().__init__()
        if not isinstance(embed_dim, int) or embed_dim <= 0:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
        if not isinstance(num_heads, int) or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"num_heads must be a positive int dividing embed_dim={embed_dim}, "
                             f"got {num_heads!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.L, self.U = _pair("max_distance", max_distance)
        self.window = _pair("window", window)
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first, self.causal, self.backend = batch_first, causal, backend
        self.use_delta = use_delta
        self.delta_dim = delta_dim or embed_dim
        self.share_rpe_across_heads = share_rpe_across_heads
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.delta_proj = (nn.Linear(embed_dim, self.delta_dim, bias=bias, **factory)
                           if self.delta_dim != embed_dim else None)
        R = self.L + self.U + 1
        shape = (self.delta_dim, R) if share_rpe_across_heads else (num_heads, self.delta_dim, R)
        self.rpe = nn.Parameter(torch.empty(shape, **factory))
        self.dropout = nn.Dropout(dropout)
        self.last_backend: Optional[str] = None
        set_context_parallel(self, context_parallel_group, context_parallel_layout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.xavier_uniform_(self.out_proj.weight)
        for lin in (self.in_proj, self.out_proj, self.delta_proj):
            if lin is not None and lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if self.delta_proj is not None:
            nn.init.xavier_uniform_(self.delta_proj.weight)
        # Small: at init the delta term is a gentle perturbation of the content logits.
        nn.init.normal_(self.rpe, std=1.0 / math.sqrt(self.delta_dim) * 0.1)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            layout = "[B,T,E]" if self.batch_first else "[T,B,E]"
            raise ValueError(f"x must be {layout} with E={self.embed_dim}, got {got}")
        if not self.batch_first:
            x = x.transpose(0, 1)
        B, T, E = x.shape
        H, D = self.num_heads, self.head_dim
        q, k, v = self.in_proj(x).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        feats, w = None, None  # no delta term: the kernels' plain path
        if self.use_delta:
            feats = self.delta_proj(x) if self.delta_proj is not None else x
            w = self.rpe
        out = attend(self, q, k, v, feats, w, self.causal, key_padding_mask)
        out = self.dropout(self.out_proj(out.transpose(1, 2).reshape(B, T, E)))
        return out if self.batch_first else out.transpose(0, 1)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, delta_dim={self.delta_dim}, "
                f"max_distance=({self.L}, {self.U}), window={self.window}, causal={self.causal}, "
                f"shared_rpe={self.share_rpe_across_heads}, use_delta={self.use_delta}, "
                f"backend={self.backend!r}")
