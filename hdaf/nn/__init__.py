"""Reusable layers built on the delta-attention op.

``DeltaAttention``: ``attn(x, key_padding_mask) -> out``, the layer of HDAF's own model.
``DeltaMultiheadAttention``: ``nn.MultiheadAttention``'s interface and weights, for self-attention
in other models; ``convert_mha(model)`` swaps every self-attention ``nn.MultiheadAttention`` of a
model for one, in place, keeping the outputs.
"""
from .convert import convert_mha
from .delta_attention import DeltaAttention
from .multihead_attention import DeltaMultiheadAttention

__all__ = ["DeltaAttention", "DeltaMultiheadAttention", "convert_mha"]
