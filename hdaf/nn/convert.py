"""``convert_mha``: swap every self-attention ``nn.MultiheadAttention`` of a model for
:class:`DeltaMultiheadAttention`, in place, keeping the model's outputs."""
from __future__ import annotations

import warnings
from typing import Dict, Iterable, List, Optional

from torch import nn

from .multihead_attention import DELTA_OPTIONS, DeltaMultiheadAttention


def _why_left(parent: nn.Module, attr: str, mha: nn.MultiheadAttention) -> Optional[str]:
    """Why this ``nn.MultiheadAttention`` cannot become delta self-attention, or None."""
    if isinstance(parent, nn.TransformerDecoderLayer) and attr == "multihead_attn":
        return "cross-attention: nn.TransformerDecoderLayer.multihead_attn attends to the memory"
    if not mha._qkv_same_embed_dim:
        return (f"cross-attention: kdim={mha.kdim}, vdim={mha.vdim} differ from "
                f"embed_dim={mha.embed_dim}")
    if mha.bias_k is not None:
        return "add_bias_kv=True is not supported"
    if mha.add_zero_attn:
        return "add_zero_attn=True is not supported"
    return None


def convert_mha(model: nn.Module, *, exclude: Iterable[str] = (), **delta_options) -> List[str]:
    """Replace every self-attention ``nn.MultiheadAttention`` in ``model`` by a
    :class:`DeltaMultiheadAttention` with its weights and ``w = 0``, in place.

    The converted model computes what the original did (attention-probability dropout aside,
    see below) until training moves ``w``. Build the optimizer after converting: the new modules
    hold new parameter tensors.

    Args:
        model: any ``nn.Module`` (not an ``nn.MultiheadAttention`` itself: use
            ``DeltaMultiheadAttention.from_mha`` for one).
        exclude: qualified names (as in ``model.named_modules()``) of ``nn.MultiheadAttention``
            modules to leave alone, e.g. a custom model's cross-attention, which cannot be told
            apart from self-attention without running it.
        delta_options: ``delta_dim``, ``max_distance``, ``window``, ``share_rpe_across_heads``,
            ``backend`` (see :class:`DeltaMultiheadAttention`).

    Returns:
        The qualified names of the converted modules (a module shared by several parents is
        converted once and listed under each name); ``[]`` when there is nothing to convert.

    Left as they are and reported in one ``UserWarning``: ``nn.TransformerDecoderLayer``'s
    ``multihead_attn`` and any ``nn.MultiheadAttention`` with kdim/vdim != embed_dim (both
    cross-attention), ``add_bias_kv=True`` or ``add_zero_attn=True``. Modules named in
    ``exclude`` are left without a warning. A converted module later called with
    ``key`` != ``query`` raises ``ValueError`` saying it is cross-attention.

    Attention-probability dropout (``nn.MultiheadAttention(dropout=p)``, e.g. ``nn.Transformer``'s
    default 0.1) has no counterpart in the fused kernels: it is dropped, with a ``UserWarning``.
    Every ``nn.TransformerEncoder`` holding a converted layer gets ``use_nested_tensor = False``:
    its nested-tensor inference path skips ``self_attn``'s forward.

    Usage: tests/test_convert.py.
    """
    if isinstance(model, nn.MultiheadAttention):
        raise TypeError("convert_mha replaces nn.MultiheadAttention modules inside a model; for one "
                        "module use DeltaMultiheadAttention.from_mha(mha, **delta_options)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_mha expects an nn.Module, got {type(model).__name__}")
    unknown = sorted(set(delta_options) - set(DELTA_OPTIONS))
    if unknown:
        raise TypeError(f"unknown delta option(s) {unknown}; the options are {list(DELTA_OPTIONS)}")
    if isinstance(exclude, str):
        exclude = [exclude]
    exclude = set(exclude)
    mha_names = {n for n, m in model.named_modules(remove_duplicate=False)
                 if isinstance(m, nn.MultiheadAttention)}
    if exclude - mha_names:
        raise ValueError(f"exclude names no nn.MultiheadAttention of {type(model).__name__}: "
                         f"{sorted(exclude - mha_names)} (its modules: {sorted(mha_names)})")

    converted: List[str] = []
    left: Dict[str, str] = {}
    new_for: Dict[int, DeltaMultiheadAttention] = {}  # id(old module) -> its replacement
    dropped = set()
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for attr, child in list(parent.named_children()):
            name = f"{parent_name}.{attr}" if parent_name else attr
            if any(child is done for done in new_for.values()):  # under a shared parent
                converted.append(name)
            if not isinstance(child, nn.MultiheadAttention):
                continue
            if name in exclude:
                continue
            reason = _why_left(parent, attr, child)
            if reason is not None:
                left[name] = reason
                continue
            if id(child) not in new_for:
                if child.dropout > 0:
                    dropped.add(child.dropout)
                # Dropout is reported once for the model below, not per module.
                new_for[id(child)] = DeltaMultiheadAttention._copy_of(child, delta_options)
            setattr(parent, attr, new_for[id(child)])
            converted.append(name)

    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and any(
                isinstance(c, DeltaMultiheadAttention) for c in m.modules()):
            m.use_nested_tensor = False
    if left:
        listed = "; ".join(f"{n} ({why})" for n, why in left.items())
        warnings.warn(f"convert_mha left {len(left)} nn.MultiheadAttention module(s) as they are: "
                      f"{listed}. Name them in exclude= to leave them without this warning",
                      UserWarning, stacklevel=2)
    if dropped:
        warnings.warn(f"convert_mha: attention-probability dropout p={sorted(dropped)} set to 0 in "
                      "the converted modules (the fused delta-attention kernels have none); other "
                      "dropout in the model is unchanged", UserWarning, stacklevel=2)
    return converted
