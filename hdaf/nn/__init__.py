"""Reusable layers built on the delta-attention op."""
from .delta_attention import DeltaAttention

__all__ = ["DeltaAttention"]
