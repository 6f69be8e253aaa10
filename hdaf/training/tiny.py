"""A tiny stand-in model with the ``hdaf.models`` interface, for pipeline smoke tests.

``model.name: hdaf.training.tiny:build``.  Masked mean of a per-step MLP per modality, a
unimodal head each, a small correlation ("dcca") projection and a fused head; it has
``stage_parameters`` for the staged schedule and dropout (so resume tests exercise RNG state).
"""
from __future__ import annotations

import torch
from torch import nn


class TinyModel(nn.Module):
    def __init__(self, config: dict, dims: dict):
        super().__init__()
        h = int(config.get("hidden", 16))
        r = int(config.get("dcca_dim", 4))
        self.config = dict(config, head=config.get("head", "softmax"))
        self.enc = nn.ModuleDict({m: nn.Linear(d, h) for m, d in dims.items()})
        self.uni = nn.ModuleDict({m: nn.Linear(h, 6) for m in dims})
        self.dcca = nn.ModuleDict({m: nn.Linear(h, r) for m in dims})
        self.drop = nn.Dropout(float(config.get("dropout", 0.1)))
        self.fuse = nn.Linear(r * len(dims), 6)

    def stage_parameters(self, stage: str):
        return {"unimodal": list(self.enc.parameters()) + list(self.uni.parameters()),
                "dcca": list(self.dcca.parameters()), "fusion": list(self.fuse.parameters())}[stage]

    def forward(self, batch: dict) -> dict:
        z = {}
        for m in self.enc:
            x = self.drop(torch.relu(self.enc[m](batch[m])))
            keep = (~batch[m + "_mask"]).to(x.dtype).unsqueeze(-1)
            z[m] = (x * keep).sum(1) / keep.sum(1).clamp(min=1)
        c = {m: self.dcca[m](z[m]) for m in z}
        ms = list(c)
        cca = sum(((c[a] - c[b]) ** 2).mean() for i, a in enumerate(ms) for b in ms[i + 1:])
        return {"logits": self.fuse(torch.cat([c[m] for m in ms], -1)),
                "unimodal_logits": {m: self.uni[m](z[m]) for m in z}, "cca_loss": cca}


def build(config: dict, dims: dict) -> TinyModel:
    return TinyModel(config, dims)
