"""hdaf: fused delta attention and the hierarchical delta-attention multimodal model.

``hdaf.delta_attention`` is the operator (spec: docs/delta_attention.md), ``hdaf.DeltaAttention``
the drop-in layer, ``hdaf.backends()`` reports what was compiled and what each device uses.
"""
from .dispatch import backends
from .functional import delta_attention, paper_preset
from .nn.delta_attention import DeltaAttention

__version__ = "0.1.0"
__all__ = ["delta_attention", "paper_preset", "DeltaAttention", "backends", "__version__"]
