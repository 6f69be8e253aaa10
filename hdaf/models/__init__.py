"""The hierarchical delta-attention model (HDAF) and the MulT baseline (docs/model.md)."""
from __future__ import annotations

from torch import nn

from .hdaf_model import EMOTIONS, HDAF, MODALITIES, HDAFConfig
from .mult import MulT, MulTConfig

__all__ = ["HDAF", "HDAFConfig", "MulT", "MulTConfig", "build_model", "count_parameters",
           "EMOTIONS", "MODALITIES"]


def build_model(name: str, config: dict = None) -> nn.Module:
    """``name``: "hdaf" or "mult"; ``config``: keys of HDAFConfig / MulTConfig."""
    if name == "hdaf":
        return HDAF(HDAFConfig.from_dict(config))
    if name == "mult":
        return MulT(MulTConfig.from_dict(config))
    raise ValueError(f"model name must be 'hdaf' or 'mult', got {name!r}")


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
