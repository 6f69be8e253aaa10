"""MulT (Tsai et al., 2019): six directional crossmodal transformers and three self-attention
memories, with the same batch API and heads as HDAF, as the baseline of Table 2."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import nn

from .hdaf_model import MODALITIES, _ConfigMixin


@dataclass
class MulTConfig(_ConfigMixin):
    input_dims: Dict[str, int] = field(default_factory=lambda: {"text": 300, "audio": 74, "vision": 35})
    d_model: int = 40            # MulT's MOSEI setting
    num_heads: int = 8
    layers: int = 4              # crossmodal blocks
    mem_layers: int = 3          # self-attention memories (MulT's code uses 3)
    dropout: float = 0.1
    num_classes: int = 6
    head: str = "softmax"


def _sinusoid(T: int, d: int, device, dtype) -> torch.Tensor:
    pos = torch.arange(T, device=device, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(T, d, device=device)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div[: d // 2])
    return pe.to(dtype)


class _Block(nn.Module):
    """Pre-norm transformer block; cross-attention when a source sequence is given."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.nq, self.nkv, self.nf = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Dropout(dropout), nn.Linear(4 * d, d))

    def forward(self, x, x_mask, src=None, src_mask=None):
        if src is None:
            src, src_mask = x, x_mask
        q, kv = self.nq(x), self.nkv(src)
        pad = src_mask
        if pad is not None:  # a fully padded source row would give NaN: let it see position 0
            pad = pad.clone()
            pad[pad.all(1), 0] = False
        x = x + self.attn(q, kv, kv, key_padding_mask=pad, need_weights=False)[0]
        return x + self.ff(self.nf(x))


class MulT(nn.Module):
    def __init__(self, config: MulTConfig):
        super().__init__()
        self.config = c = config
        d = c.d_model
        self.proj = nn.ModuleDict({m: nn.Conv1d(c.input_dims[m], d, 1, bias=False) for m in MODALITIES})
        self.cross = nn.ModuleDict({
            f"{s}_to_{t}": nn.ModuleList([_Block(d, c.num_heads, c.dropout) for _ in range(c.layers)])
            for t in MODALITIES for s in MODALITIES if s != t})
        self.mem = nn.ModuleDict({
            t: nn.ModuleList([_Block(2 * d, c.num_heads, c.dropout) for _ in range(c.mem_layers)])
            for t in MODALITIES})
        self.proj1, self.proj2 = nn.Linear(6 * d, 6 * d), nn.Linear(6 * d, 6 * d)
        self.out = nn.Linear(6 * d, c.num_classes)

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, object]:
        d = self.config.d_model
        xs, masks = {}, {}
        for m in MODALITIES:
            x = self.proj[m](batch[m].transpose(1, 2)).transpose(1, 2)
            xs[m] = x * math.sqrt(d) + _sinusoid(x.shape[1], d, x.device, x.dtype)
            masks[m] = batch.get(f"{m}_mask")
        lasts = []
        for t in MODALITIES:
            outs = []
            for s in MODALITIES:
                if s == t:
                    continue
                h = xs[t]
                for blk in self.cross[f"{s}_to_{t}"]:
                    h = blk(h, masks[t], xs[s], masks[s])
                outs.append(h)
            h = torch.cat(outs, -1)
            for blk in self.mem[t]:
                h = blk(h, masks[t])
            # the last valid step of the target sequence (MulT takes the last element)
            if masks[t] is None:
                lasts.append(h[:, -1])
            else:
                n = (~masks[t]).sum(1).clamp_min(1) - 1
                lasts.append(h[torch.arange(h.shape[0], device=h.device), n])
        z = torch.cat(lasts, -1)
        z = z + self.proj2(torch.relu(self.proj1(z)))
        return {"logits": self.out(z)}
