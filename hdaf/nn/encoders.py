"""Blocks of the HDAF model: masked pooling, the unimodal delta self-attention encoder, the DCCA
projector, and resampling of unaligned sequences to a common length."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .delta_attention import DeltaAttention


def masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over time of ``x [B,T,D]`` ignoring positions where ``mask [B,T]`` is True."""
    if mask is None:
        return x.mean(1)
    keep = (~mask).to(x.dtype).unsqueeze(-1)
    return (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)


def _zero_padding(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return x if mask is None else x.masked_fill(mask.unsqueeze(-1), 0.0)


class MaskedConv1d(nn.Conv1d):
    """``Conv1d`` over ``[B,T,C]`` that zeroes padded positions before and after the conv, so
    padding content never leaks into real positions."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = super().forward(_zero_padding(x, mask).transpose(1, 2)).transpose(1, 2)
        return _zero_padding(y, mask)


class UnimodalEncoder(nn.Module):
    """Conv1D temporal front end (eq. 9) → delta self-attention (eq. 10–12) → feed-forward.

    ``forward(x [B,T,in_dim], mask [B,T]) -> (h [B,T,d_model], logits [B,num_classes] or None)``.
    """

    def __init__(self, in_dim: int, d_model: int, num_heads: int, kernel_size: int = 3,
                 max_distance=16, window=None, share_rpe_across_heads: bool = True,
                 use_delta: bool = True, dropout: float = 0.1, num_classes: Optional[int] = 6,
                 backend: str = "auto"):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (same-length conv), got {kernel_size}")
        self.conv = MaskedConv1d(in_dim, d_model, kernel_size, padding=kernel_size // 2)
        self.attn = DeltaAttention(d_model, num_heads, max_distance=max_distance, window=window,
                                   share_rpe_across_heads=share_rpe_across_heads,
                                   use_delta=use_delta, dropout=dropout, backend=backend)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(2 * d_model, d_model))
        self.head = nn.Linear(d_model, num_classes) if num_classes else None

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        h = self.conv(x, mask)
        h = self.norm1(h + self.attn(h, key_padding_mask=mask))
        h = _zero_padding(self.norm2(h + self.ff(h)), mask)
        logits = self.head(masked_mean(h, mask)) if self.head is not None else None
        return h, logits


class DCCAProjector(nn.Module):
    """The 2-layer convolutional DCCA encoder of one view: ``[B,T,d_in] -> [B,T,d_r]``."""

    def __init__(self, d_in: int, d_r: int, hidden: Optional[int] = None, kernel_size: int = 3):
        super().__init__()
        hidden = hidden or max(d_r, d_in // 2)
        self.c1 = MaskedConv1d(d_in, hidden, kernel_size, padding=kernel_size // 2)
        self.c2 = MaskedConv1d(hidden, d_r, kernel_size, padding=kernel_size // 2)

    def forward(self, x, mask=None):
        return self.c2(torch.relu(self.c1(x, mask)), mask)


def resample_valid(x: torch.Tensor, mask: Optional[torch.Tensor], length: int) -> torch.Tensor:
    """Linear interpolation of each sequence's *valid* positions onto ``length`` points.

    ``x [B,T,D]``, ``mask [B,T]`` (True = padding; valid positions form a prefix or any subset:
    they are taken in order). Returns ``[B,length,D]``; a sequence with no valid position gives 0.
    """
    B, T, D = x.shape
    if mask is None:
        mask = torch.zeros(B, T, dtype=torch.bool, device=x.device)
    valid = ~mask
    n = valid.sum(1)  # [B]
    # Order of valid positions first (stable), then the padded ones.
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices  # [B,T]
    xs = torch.gather(x, 1, order.unsqueeze(-1).expand(B, T, D))
    pos = (torch.arange(length, device=x.device, dtype=x.dtype) + 0.5)[None] * \
        n.clamp_min(1).to(x.dtype)[:, None] / length - 0.5  # [B,length]
    pos = torch.minimum(pos.clamp_min(0), (n.clamp_min(1) - 1).to(x.dtype)[:, None])
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, (n.clamp_min(1) - 1)[:, None])
    frac = (pos - lo.to(x.dtype)).unsqueeze(-1)
    g = lambda idx: torch.gather(xs, 1, idx.unsqueeze(-1).expand(B, length, D))  # noqa: E731
    out = g(lo) * (1 - frac) + g(hi) * frac
    return out * (n > 0).to(x.dtype)[:, None, None]
