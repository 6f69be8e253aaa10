"""Add hdaf delta attention to a pretrained BERT-family encoder from Hugging Face ``transformers``.

    import hdaf.integrations.transformers as hdaf_tf
    model = AutoModel.from_pretrained(path)
    hdaf_tf.add_delta_attention(model, max_distance=32, share_rpe_across_heads=True)

How it plugs in (docs/integrations.md has the longer story):

* **Attention function.** ``transformers`` (v5; tested with 5.24) calls self-attention through
  its registered ``AttentionInterface``: ``fn(module, query, key, value, attention_mask,
  scaling=, dropout=, **kwargs)`` with ``query/key/value [B,H,T,D]`` already projected by the
  model's own ``query/key/value`` linears; the model applies its own output projection after.
  This module registers ``"hdaf_delta"`` there (and an ``AttentionMaskInterface`` entry, see
  below) and switches the model to it with ``model.set_attn_implementation``: no class is patched.
* **The delta input ``x``.** The attention function receives projected q/k/v, not the layer's
  input. A forward pre-hook on each converted self-attention module passes that module's input
  ``hidden_states [B,T,E]`` on as the keyword ``hdaf_hidden_states``, which the model forwards
  untouched to the attention function. There ``x = hidden_states @ Wx`` (``Wx [E,Dr]``, learned,
  no bias: a bias cancels in ``x_j - x_i``), following the paper's delta-RPE on the layer input.
* **Identity at conversion.** ``w`` starts at zero, so the delta term is 0 and the converted
  model computes exactly the original softmax attention: outputs equal to float32 tolerance.
  (At ``w = 0`` the gradient reaching ``Wx`` is 0 too; ``w`` gets a gradient at once and ``Wx``
  from the first step on — hence ``Wx`` keeps a random init.)
* **Masks.** The mask entry hands the attention function the padding mask as ``[B,1,1,T]`` bool
  (no ``T×T`` tensor); it becomes hdaf's ``key_padding_mask [B,T]`` (True = padding). A mask that
  is not pure key padding (causal, sliding window, per-query, or an additive bias that is not
  0/-inf) raises ``ValueError`` instead of being silently dropped.
* **Dropout.** The fused kernels have no dropout on attention probabilities: the conversion sets
  the converted modules' attention-probability dropout to 0 (with a warning when it was > 0).
  Hidden-state dropout elsewhere in the model is untouched.
* **Saving.** ``save_pretrained`` writes the added weights with the others and the settings as
  ``config.hdaf_delta_attention``; :func:`from_pretrained` rebuilds the converted model from
  such a folder. ``state_dict()`` / ``load_state_dict`` on a model converted with the same
  settings works too.
"""
from __future__ import annotations

import importlib
import json
import os
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..functional import IntOrPair, _pair, delta_attention

ATTN_IMPLEMENTATION = "hdaf_delta"
HIDDEN_STATES_KWARG = "hdaf_hidden_states"
CONFIG_KEY = "hdaf_delta_attention"

# Self-attention modules that call the AttentionInterface with the layer's own q/k/v projections
# (tests/test_integrations_transformers.py converts each one).
_SUPPORTED = (
    ("transformers.models.bert.modeling_bert", "BertSelfAttention"),
    ("transformers.models.roberta.modeling_roberta", "RobertaSelfAttention"),
    ("transformers.models.electra.modeling_electra", "ElectraSelfAttention"),
    ("transformers.models.distilbert.modeling_distilbert", "DistilBertSelfAttention"),
)


def _supported_classes() -> Tuple[type, ...]:
    classes = []
    for module_name, class_name in _SUPPORTED:
        try:
            classes.append(getattr(importlib.import_module(module_name), class_name))
        except (ImportError, AttributeError):  # an older/newer transformers without it
            continue
    return tuple(classes)


class DeltaParams(nn.Module):
    """The weights one converted attention layer adds: ``Wx`` (``proj``) and ``w`` (``rpe``).

    ``proj``: ``Linear(E, Dr, bias=False)``, default (random) init. ``rpe``: ``[Dr,R]`` shared by
    the heads or ``[H,Dr,R]``, zeros. ``R = L + U + 1``.
    """

    def __init__(self, embed_dim: int, num_heads: int, delta_dim: int, L: int, U: int,
                 share_rpe_across_heads: bool, window: Optional[Tuple[int, int]], backend: str,
                 device=None, dtype=None):
        super().__init__()
        self.L, self.U, self.window, self.backend = L, U, window, backend
        self.proj = nn.Linear(embed_dim, delta_dim, bias=False, device=device, dtype=dtype)
        R = L + U + 1
        shape = (delta_dim, R) if share_rpe_across_heads else (num_heads, delta_dim, R)
        self.rpe = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"max_distance=({self.L}, {self.U}), window={self.window}, backend={self.backend!r}"


def _key_padding_mask(mask: Optional[torch.Tensor], B: int, T: int) -> Optional[torch.Tensor]:
    """The 4-D mask ``transformers`` passes → hdaf's ``[B,T]`` bool, True = padding key."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-1] != T \
            or mask.shape[0] not in (1, B):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"hdaf delta attention: expected a 4-D attention_mask [B,1,Tq,T] with "
                         f"B={B}, T={T}, got {got}")
    if mask.dtype == torch.bool:
        keep = mask
    else:  # additive: 0 = attend, a large negative number = masked; anything else is a bias
        keep = mask > torch.finfo(mask.dtype).min / 2
        if not bool(torch.all((mask == 0) | ~keep)):
            raise ValueError("hdaf delta attention: the additive attention_mask carries values other "
                             "than 0 and -inf (an attention bias); only key padding is supported")
    if keep.shape[1] != 1 or keep.shape[2] != 1:
        # Only a materialized mask gets here (the registered mask function gives [B,1,1,T]).
        if not bool(torch.equal(keep, keep[:, :1, :1, :].expand_as(keep))):
            raise ValueError("hdaf delta attention: the attention_mask differs between queries or "
                             "heads (a causal, sliding-window or custom mask); hdaf's conversion of "
                             "transformers models supports key-padding masks only")
    return ~keep[:, 0, 0, :].expand(B, T)


def delta_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                            scaling: Optional[float] = None, dropout: float = 0.0, **kwargs):
    """The ``"hdaf_delta"`` entry of ``transformers.AttentionInterface``.

    query, key: (batch, nheads, seqlen, headdim); value: (batch, nheads, seqlen, headdim_v);
    attention_mask: 4-D bool or additive, key padding only. Returns ``(out [B,T,H,Dv], None)``
    (no attention weights: the fused kernels never form them).
    """
    params = getattr(module, "hdaf_delta", None)
    hidden = kwargs.get(HIDDEN_STATES_KWARG)
    if not isinstance(params, DeltaParams) or hidden is None:
        raise RuntimeError(f"{type(module).__name__} called attn_implementation="
                           f"{ATTN_IMPLEMENTATION!r} but was not converted by hdaf's "
                           "add_delta_attention (no delta weights / hidden states on the module)")
    if dropout:
        raise ValueError(f"hdaf delta attention has no attention-probability dropout, got "
                         f"dropout={dropout} from {type(module).__name__}; set its dropout.p = 0")
    B, _, T, _ = query.shape
    if key.shape[2] != T:
        raise ValueError(f"hdaf delta attention is self-attention over one sequence: query has "
                         f"T={T} but key has {key.shape[2]} (a cache or cross-attention?)")
    pad = _key_padding_mask(attention_mask, B, T)
    x = params.proj(hidden.to(params.proj.weight.dtype)).to(query.dtype)
    out = delta_attention(query, key, value, x, params.rpe.to(query.dtype),
                          max_distance=(params.L, params.U), window=params.window,
                          key_padding_mask=pad, scale=scaling, backend=params.backend)
    return out.transpose(1, 2).contiguous(), None


def _key_padding_mask_interface(batch_size: int, q_length: int, kv_length: int, q_offset=0,
                                kv_offset=0, mask_function=None, attention_mask=None, **kwargs):
    """The ``"hdaf_delta"`` entry of ``AttentionMaskInterface``: ``[B,1,1,T]`` bool, True = attend.

    Plain bidirectional masks only; anything else (causal, overlays, caches) is materialized by
    ``sdpa_mask`` and then rejected or accepted by :func:`_key_padding_mask`.
    """
    from transformers import masking_utils as mu

    plain = (mask_function is mu.bidirectional_mask_function and not kwargs.get("use_vmap")
             and isinstance(q_offset, int) and isinstance(kv_offset, int)
             and q_offset == 0 and kv_offset == 0 and q_length == kv_length)
    if not plain:
        return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                            q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                            attention_mask=attention_mask, **kwargs)
    padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    return None if padding is None else padding[:, None, None, :]


def register() -> None:
    """Register ``"hdaf_delta"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, delta_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _key_padding_mask_interface)


def _pass_hidden_states(module, args, kwargs):
    """Forward pre-hook: hand the layer's input on to the attention function as a keyword."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    return args, {**kwargs, HIDDEN_STATES_KWARG: hidden}


def _find_attention(model: nn.Module) -> Dict[str, nn.Module]:
    """Qualified name → supported self-attention module; raises naming any attention it can't take."""
    supported = _supported_classes()
    found, unknown = {}, []
    modules = dict(model.named_modules())
    for name, m in modules.items():
        if isinstance(m, supported):
            if getattr(m, "is_causal", False) or getattr(getattr(m, "config", None), "is_decoder", False):
                raise ValueError(f"cannot convert {name or 'the model'} ({type(m).__name__}): it is "
                                 "causal (config.is_decoder=True); hdaf's transformers integration "
                                 "converts bidirectional encoders only")
            found[name] = m
        elif "Attention" in type(m).__name__:
            # Wrappers (e.g. BertAttention around BertSelfAttention) are fine; leaves are not.
            inner = [c for c in m.modules() if c is not m and "Attention" in type(c).__name__]
            if not inner:
                unknown.append(f"{name or '<root>'} ({type(m).__name__})")
    known = ", ".join(c for _, c in _SUPPORTED)
    if unknown:
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        raise ValueError(f"cannot convert {type(model).__name__}: module {unknown[0]}{more} is not "
                         f"a self-attention hdaf recognises (supported: {known})")
    if not found:
        raise ValueError(f"cannot convert {type(model).__name__}: it has no self-attention module "
                         f"hdaf recognises (supported: {known})")
    return found


def add_delta_attention(model: nn.Module, max_distance: IntOrPair = 32, delta_dim: Optional[int] = None,
                        share_rpe_across_heads: bool = True, window: IntOrPair = None,
                        backend: str = "auto") -> nn.Module:
    """Convert every self-attention of a pretrained BERT-family ``model`` to hdaf delta attention.

    In place; returns ``model``. The model's own q/k/v/output projections and padding mask are
    reused; each layer gains ``hdaf_delta.proj`` (``Wx [E,Dr]``, random) and ``hdaf_delta.rpe``
    (``w``, zeros), so outputs are unchanged until ``w`` is trained.

    Args:
        model: a ``transformers.PreTrainedModel`` whose self-attention is one of
            BertSelfAttention, RobertaSelfAttention, ElectraSelfAttention, DistilBertSelfAttention
            (any head on top: ``AutoModel``, ``...ForSequenceClassification``, ...).
        max_distance: ``m`` or ``(L, U)``: relative offsets clipped to ``[-L, U]``, ``R = L+U+1``.
        delta_dim: ``Dr``, the width of ``x``; default the head dimension.
        share_rpe_across_heads: one ``w [Dr,R]`` for all heads, else ``[H,Dr,R]``.
        window: None, or ``w`` / ``(Wl, Wr)``: attend only to ``-Wl <= j-i <= Wr`` (changes outputs).
        backend: passed to :func:`hdaf.delta_attention`; ``"auto"`` picks the compiled kernel.

    Raises ``TypeError`` for a non-``transformers`` model and ``ValueError`` naming the module it
    does not recognise (e.g. GPT-2's ``GPT2Attention``, BERT's cross-attention) or a decoder.
    Usage: tests/test_integrations_transformers.py, examples/finetune_minilm_delta.py.
    """
    try:
        from transformers import PreTrainedModel
    except ImportError as exc:  # pragma: no cover - transformers is an optional dependency
        raise ImportError("hdaf.integrations.transformers needs `pip install transformers`") from exc
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"add_delta_attention expects a transformers PreTrainedModel, "
                        f"got {type(model).__name__}")
    L, U = _pair("max_distance", max_distance)
    win = _pair("window", window)
    if delta_dim is not None and (not isinstance(delta_dim, int) or delta_dim <= 0):
        raise ValueError(f"delta_dim must be a positive int or None, got {delta_dim!r}")
    from .. import dispatch
    if backend not in dispatch.BACKENDS:
        raise ValueError(f"backend must be one of {dispatch.BACKENDS}, got {backend!r}")
    attention = _find_attention(model)
    done = [n for n, m in attention.items() if hasattr(m, "hdaf_delta")]
    if done:
        raise ValueError(f"{type(model).__name__} is already converted ({done[0]} has hdaf_delta)")

    register()
    dropped = set()
    for m in attention.values():
        heads = getattr(m, "num_attention_heads", None) or m.n_heads
        q_proj = m.query if hasattr(m, "query") else m.q_lin
        ref = q_proj.weight
        m.hdaf_delta = DeltaParams(q_proj.in_features, heads, delta_dim or m.attention_head_size,
                                   L, U, share_rpe_across_heads, win, backend,
                                   device=ref.device, dtype=ref.dtype)
        if m.dropout.p > 0:
            dropped.add(m.dropout.p)
            m.dropout.p = 0.0
        m.register_forward_pre_hook(_pass_hidden_states, with_kwargs=True)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    wrong = [n for n, m in attention.items() if m.config._attn_implementation != ATTN_IMPLEMENTATION]
    if wrong:
        raise RuntimeError(f"set_attn_implementation({ATTN_IMPLEMENTATION!r}) did not reach {wrong[0]}")
    if dropped:
        warnings.warn(f"add_delta_attention: attention-probability dropout p={sorted(dropped)} set to "
                      "0 (the fused delta-attention kernels have none); hidden dropout is unchanged",
                      UserWarning, stacklevel=2)
    setattr(model.config, CONFIG_KEY, {
        "max_distance": [L, U], "delta_dim": delta_dim, "share_rpe_across_heads": share_rpe_across_heads,
        "window": list(win) if win is not None else None, "backend": backend})
    return model


def delta_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters :func:`add_delta_attention` added (``Wx`` and ``w`` of every layer), e.g. for
    their own optimizer parameter group."""
    return [p for m in model.modules() if isinstance(m, DeltaParams) for p in m.parameters()]


def _checkpoint_tensors(folder: str) -> Dict[str, torch.Tensor]:
    """The delta tensors of a ``save_pretrained`` folder (single or sharded safetensors)."""
    from safetensors import safe_open

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: from_pretrained reads safetensors checkpoints "
                                    "written by save_pretrained")
        with safe_open(path, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys() if ".hdaf_delta." in k})
    return out


def from_pretrained(model_class, path: str, backend: Optional[str] = None, **kwargs) -> nn.Module:
    """Load a model saved by ``save_pretrained`` after :func:`add_delta_attention`, converted and
    with its delta weights. ``model_class``: e.g. ``AutoModel``; ``kwargs`` go to its
    ``from_pretrained``; ``backend`` overrides the saved one.
    """
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the base load reports the delta weights as "unexpected"
    try:
        model = model_class.from_pretrained(path, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
    settings = getattr(model.config, CONFIG_KEY, None)
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: config has no {CONFIG_KEY!r} entry; it was not saved from a model "
                         "converted by add_delta_attention")
    settings = dict(settings, **({"backend": backend} if backend is not None else {}))
    settings["max_distance"] = tuple(settings["max_distance"])
    if settings.get("window") is not None:
        settings["window"] = tuple(settings["window"])
    with warnings.catch_warnings():  # the dropout notice was given when the model was converted
        warnings.simplefilter("ignore", UserWarning)
        add_delta_attention(model, **settings)
    want = {k for k in model.state_dict() if ".hdaf_delta." in k}
    saved = _checkpoint_tensors(path)
    prefix = getattr(model, "base_model_prefix", "") + "."

    def strip(k):  # a checkpoint saved from the base model loads into a model with a head
        return k.removeprefix(prefix)
    by_suffix = {strip(k): v for k, v in saved.items()}
    missing = [k for k in want if strip(k) not in by_suffix]
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} delta weight(s), e.g. {missing[0]}")
    model.load_state_dict({k: by_suffix[strip(k)] for k in want}, strict=False)
    return model
