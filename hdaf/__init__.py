"""hdaf: fused delta attention and the hierarchical delta-attention multimodal model.

``hdaf.delta_attention`` is the operator (spec: docs/delta_attention.md) and
``hdaf.delta_attention_varlen`` its form for packed batches of sequences of different lengths,
``hdaf.DeltaAttention`` the layer of HDAF's own model, ``hdaf.DeltaMultiheadAttention`` the ``nn.MultiheadAttention``
replacement and ``hdaf.convert_mha(model)`` the one-call conversion of a model's self-attention;
``hdaf.backends()`` reports what was compiled and what each device uses;
``hdaf.distributed`` runs the operator on a sequence sharded over the ranks of a
``torch.distributed`` process group (context parallelism).
"""
from . import distributed
from .dispatch import backends
from .functional import delta_attention, delta_attention_varlen, paper_preset
from .nn import DeltaAttention, DeltaMultiheadAttention, convert_mha

__version__ = "0.1.0"
__all__ = ["delta_attention", "delta_attention_varlen", "paper_preset", "DeltaAttention",
           "DeltaMultiheadAttention", "convert_mha", "backends", "__version__"]
