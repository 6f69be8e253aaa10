"""Add hdaf delta attention to a pretrained ``transformers`` model: BERT-family encoders and
decoder LLMs (Llama, Mistral, Qwen2, Qwen3, GPT-2), with KV-cache generation for the decoders.

    import hdaf.integrations.transformers as hdaf_tf
    model = AutoModelForCausalLM.from_pretrained(path)      # or AutoModel for an encoder
    hdaf_tf.add_delta_attention(model, max_distance=32, share_rpe_across_heads=True)
    model.generate(ids, attention_mask=mask, max_new_tokens=20)

How it plugs in (docs/integrations.md has the longer story):

* **Attention function.** ``transformers`` (v5; tested with 5.24) calls self-attention through
  its registered ``AttentionInterface``: ``fn(module, query, key, value, attention_mask,
  scaling=, dropout=, **kwargs)`` with ``query [B,H,Tq,D]``, ``key/value [B,Hkv,Tk,D]`` already
  projected by the model's own linears (and, in decoders, rotated by the model's rotary embedding
  and appended to its KV cache); the model applies its own output projection after.
  This module registers ``"hdaf_delta"`` there (and an ``AttentionMaskInterface`` entry, see
  below) and switches the model to it with ``model.set_attn_implementation``: no class is patched.
  Grouped-query heads (``Hkv | H``) go to the operator as they are, without copying k/v.
* **The delta input ``x``.** The attention function receives projected q/k/v, not the layer's
  input. A forward pre-hook on each converted self-attention module passes that module's input
  ``hidden_states [B,T,E]`` on as the keyword ``hdaf_hidden_states`` (and the cache it was given
  as ``hdaf_cache``), which the model forwards untouched to the attention function. There
  ``x = hidden_states @ Wx`` (``Wx [E,Dr]``, learned, no bias: a bias cancels in
  ``x_j - x_i``), following the paper's delta-RPE on the layer input.
* **Decoders and the KV cache.** Decoder layers call the operator with ``causal=True``; the
  model's sliding window ``W`` (Mistral, Qwen2/3 sliding layers) becomes ``window=(W-1, 0)``.
  With a cache, the new ``Tq`` tokens are the operator's query block at the end of the ``Tk``
  cached keys, and ``x`` must cover all ``Tk`` positions: each layer stores its ``x`` rows on the
  cache object (``cache.hdaf_delta_x[layer_idx] = (rows [B,n,Dr], end position)``), appends the
  new ones and keeps what the key cache keeps. A fresh cache (each ``generate()`` call makes one)
  starts empty; ``crop`` is followed through the end position; beam search's ``reorder_cache``
  and the batch-selection methods are wrapped on that cache instance to act on the rows too.
  Only growing caches (``DynamicCache`` and its sliding-window layers) are supported: a static
  cache raises ``NotImplementedError``.
* **Identity at conversion.** ``w`` starts at zero, so the delta term is 0 and the converted
  model computes exactly the original softmax attention: outputs equal to float32 tolerance.
  (At ``w = 0`` the gradient reaching ``Wx`` is 0 too; ``w`` gets a gradient at once and ``Wx``
  from the first step on — hence ``Wx`` keeps a random init.)
* **Masks.** The mask entry hands the attention function the padding mask as ``[B,1,1,Tk]`` bool
  (no ``Tq×Tk`` tensor) for a bidirectional mask and for a causal or sliding-window causal mask
  (the operator applies causal and window itself); it becomes hdaf's ``key_padding_mask [B,Tk]``
  (True = padding; ``generate()``'s left padding included — a padded query that sees no key gets
  output 0). Other masks (overlays, packed sequences) are materialized and checked: an encoder
  accepts pure key padding only, a decoder causal ∧ window ∧ key padding only; anything else
  (or an additive bias that is not 0/-inf) raises ``ValueError`` instead of being dropped.
* **Dropout.** The fused kernels have no dropout on attention probabilities: the conversion sets
  the converted modules' attention-probability dropout to 0 (with a warning when it was > 0).
  Hidden-state dropout elsewhere in the model is untouched.
* **Saving.** ``save_pretrained`` writes the added weights with the others and the settings as
  ``config.hdaf_delta_attention``; :func:`from_pretrained` rebuilds the converted model from
  such a folder. ``state_dict()`` / ``load_state_dict`` on a model converted with the same
  settings works too.
"""
from __future__ import annotations

import copy
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
CACHE_KWARG = "hdaf_cache"
CONFIG_KEY = "hdaf_delta_attention"

# Self-attention modules that call the AttentionInterface with the layer's own q/k/v projections
# (tests/test_integrations_transformers.py converts each one).
_SUPPORTED = (
    ("transformers.models.bert.modeling_bert", "BertSelfAttention"),
    ("transformers.models.roberta.modeling_roberta", "RobertaSelfAttention"),
    ("transformers.models.electra.modeling_electra", "ElectraSelfAttention"),
    ("transformers.models.distilbert.modeling_distilbert", "DistilBertSelfAttention"),
)


# Causal self-attention of decoder LLMs: q/k/v [B,H|Hkv,T,D] after the model's rotary embedding
# and cache update, ``layer_idx`` on the module, the model's cache passed to the module's forward.
_SUPPORTED_DECODERS = (
    ("transformers.models.llama.modeling_llama", "LlamaAttention"),
    ("transformers.models.mistral.modeling_mistral", "MistralAttention"),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2Attention"),
    ("transformers.models.qwen3.modeling_qwen3", "Qwen3Attention"),
    ("transformers.models.gpt2.modeling_gpt2", "GPT2Attention"),
)


def _supported_classes(table=_SUPPORTED) -> Tuple[type, ...]:
    classes = []
    for module_name, class_name in table:
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
                 device=None, dtype=None, causal: bool = False):
        super().__init__()
        self.L, self.U, self.window, self.backend, self.causal = L, U, window, backend, causal
        self.proj = nn.Linear(embed_dim, delta_dim, bias=False, device=device, dtype=dtype)
        R = L + U + 1
        shape = (delta_dim, R) if share_rpe_across_heads else (num_heads, delta_dim, R)
        self.rpe = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return (f"max_distance=({self.L}, {self.U}), window={self.window}, causal={self.causal}, "
                f"backend={self.backend!r}")


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

    query: (batch, nheads, q_len, headdim); key/value: (batch, kv_heads, kv_len, headdim[_v]) with
    ``kv_heads | nheads`` and, for decoders, ``q_len <= kv_len`` (the new tokens are the last
    ``q_len`` of the cached keys). attention_mask: 4-D bool or additive — key padding only for
    encoders; for decoders key padding ``[B,1,1,kv_len]`` from the registered mask function, or a
    materialized causal/sliding mask that is checked. Returns ``(out [B,q_len,H,Dv], None)`` (no
    attention weights: the fused kernels never form them).
    """
    params = getattr(module, "hdaf_delta", None)
    hidden = kwargs.get(HIDDEN_STATES_KWARG)
    if not isinstance(params, DeltaParams) or hidden is None:
        raise RuntimeError(f"{type(module).__name__} called attn_implementation="
                           f"{ATTN_IMPLEMENTATION!r} but was not converted by hdaf's "
                           "add_delta_attention (no delta weights / hidden states on the module)")
    if dropout:
        raise ValueError(f"hdaf delta attention has no attention-probability dropout, got "
                         f"dropout={dropout} from {type(module).__name__}; set it to 0")
    B, _, T, _ = query.shape
    Tk = key.shape[2]
    x = params.proj(hidden.to(params.proj.weight.dtype)).to(query.dtype)  # [B,T,Dr], new tokens
    if not params.causal:
        if Tk != T:
            raise ValueError(f"hdaf delta attention is self-attention over one sequence: query has "
                             f"T={T} but key has {Tk} (a cache or cross-attention?)")
        pad = _key_padding_mask(attention_mask, B, T)
        window = params.window
    else:
        window = _decoder_window(params.window, kwargs.get("sliding_window"))
        cache = kwargs.get(CACHE_KWARG)
        if cache is not None:
            x = _cached_delta_features(cache, module.layer_idx, x, Tk)
        elif Tk != T:
            raise ValueError(f"hdaf delta attention: query has T={T} but key has {Tk} and no cache "
                             "was passed to the attention module")
        pad = _decoder_padding_mask(attention_mask, B, T, Tk, window)
    out = delta_attention(query, key, value, x, params.rpe.to(query.dtype),
                          max_distance=(params.L, params.U), window=window, causal=params.causal,
                          key_padding_mask=pad, scale=scaling, backend=params.backend)
    return out.transpose(1, 2).contiguous(), None


def _decoder_window(window: Optional[Tuple[int, int]], sliding_window: Optional[int]):
    """The user's window combined with the model's sliding window ``W`` (a key ``j`` is seen by
    query ``t`` when ``t - W < j <= t``, i.e. the operator's ``(W - 1, 0)`` with ``causal``)."""
    if sliding_window is None:
        return window
    left = int(sliding_window) - 1
    if window is None:
        return (left, 0)
    return (min(window[0], left), window[1])


# Cache methods that change the batch, and what each does to a stored [B,n,Dr] tensor.
_BATCH_OPS = {
    "reorder_cache": lambda t, beam_idx: t.index_select(0, beam_idx.to(t.device)),
    "batch_select_indices": lambda t, indices: t[indices],
    "batch_repeat_interleave": lambda t, repeats: t.repeat_interleave(repeats, dim=0),
}


def _delta_store(cache) -> dict:
    """``cache.hdaf_delta_x``: layer_idx → (x rows [B,n,Dr], absolute end position).

    Created on first use; the cache's batch operations (beam search's ``reorder_cache``,
    ``batch_select_indices``, ``batch_repeat_interleave``) are wrapped on this instance so they
    apply to the stored rows too.
    """
    store = cache.__dict__.get("hdaf_delta_x")
    if store is None:
        store = cache.hdaf_delta_x = {}
        for name, op in _BATCH_OPS.items():
            original = getattr(cache, name, None)
            if original is None:
                continue

            def wrapped(arg, *rest, _original=original, _op=op):
                result = _original(arg, *rest)
                for k, (rows, end) in list(store.items()):
                    store[k] = (_op(rows, arg), end)
                return result
            setattr(cache, name, wrapped)
    return store


def _cached_delta_features(cache, layer_idx: int, x_new: torch.Tensor, Tk: int) -> torch.Tensor:
    """x for all ``Tk`` keys the cache returned: stored rows of earlier calls, then ``x_new``.

    Rows are kept per layer on the cache object with the absolute position after their last row,
    so a new cache — every ``generate()`` call makes one — starts empty, a cropped cache
    (assisted decoding) is followed, and a sliding-window cache keeps only its window. The keys
    returned by the layer's ``update`` are the last ``Tk`` of the ``S`` positions it has seen
    (``S = layer.get_seq_length()``), the new ``T`` tokens last.
    """
    from transformers.cache_utils import DynamicLayer

    cache = getattr(cache, "self_attention_cache", cache)  # an EncoderDecoderCache
    layers = getattr(cache, "layers", None)
    layer = layers[layer_idx] if layers is not None and layer_idx < len(layers) else None
    if not isinstance(layer, DynamicLayer):
        raise NotImplementedError(
            f"hdaf delta attention caches its delta features beside a growing key/value cache "
            f"(DynamicCache, generate()'s default); got {type(layer).__name__} in "
            f"{type(cache).__name__}: a static or offloaded cache is not supported")
    store = _delta_store(cache)
    B, T = x_new.shape[:2]
    S = int(layer.get_seq_length())
    lo, hi = S - Tk, S - T  # absolute positions of the past keys needed
    x = x_new
    if hi > lo:
        rows, end = store.get(layer_idx, (None, None))
        start = None if rows is None else end - rows.shape[1]
        if rows is None or rows.shape[0] != B or lo < start or hi > end:
            have = "none" if rows is None else f"positions {start}..{end - 1} for batch {rows.shape[0]}"
            raise RuntimeError(
                f"hdaf delta attention: layer {layer_idx}'s cache returned keys for positions "
                f"{lo}..{S - 1} (batch {B}) but its stored delta features cover {have}; the "
                "cache was filled or changed outside the converted model's forward")
        x = torch.cat([rows[:, lo - start:hi - start].to(x_new.dtype), x_new], dim=1)
    store[layer_idx] = (x, S)
    return x


def _decoder_padding_mask(mask: Optional[torch.Tensor], B: int, Tq: int, Tk: int,
                          window: Optional[Tuple[int, int]]) -> Optional[torch.Tensor]:
    """A decoder's attention_mask → key_padding_mask [B,Tk] (True = padding).

    ``[B,1,1,Tk]`` (from :func:`_mask_interface`) is key padding as it stands. A materialized
    ``[B,1,Tq,Tk]`` mask (a case the mask function did not recognise) must equal causal ∧ window ∧
    key padding with the queries at the end of the keys; a key no query sees counts as padding
    (equivalent there). Anything else raises ``ValueError``.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-1] != Tk \
            or mask.shape[0] not in (1, B) or mask.shape[2] not in (1, Tq):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"hdaf delta attention: expected a 4-D attention_mask [B,1,Tq,Tk] with "
                         f"B={B}, Tq={Tq}, Tk={Tk}, got {got}")
    if mask.dtype == torch.bool:
        keep = mask
    else:
        keep = mask > torch.finfo(mask.dtype).min / 2
        if not bool(torch.all((mask == 0) | ~keep)):
            raise ValueError("hdaf delta attention: the additive attention_mask carries values other "
                             "than 0 and -inf (an attention bias); only causal masks with key "
                             "padding and the model's sliding window are supported")
    if keep.shape[1] == 1 and keep.shape[2] == 1:
        return ~keep[:, 0, 0, :].expand(B, Tk)
    keep = keep.expand(B, -1, Tq, Tk)
    if not bool(torch.equal(keep, keep[:, :1].expand_as(keep))):
        raise ValueError("hdaf delta attention: the attention_mask differs between heads")
    keep = keep[:, 0]
    pad = ~keep.any(dim=1)  # [B,Tk]
    t = torch.arange(Tq, device=keep.device)[:, None] + (Tk - Tq)
    j = torch.arange(Tk, device=keep.device)[None, :]
    vis = j <= t
    if window is not None:
        vis = vis & (j >= t - window[0]) & (j <= t + window[1])
    if not bool(torch.equal(keep, vis[None] & ~pad[:, None, :])):
        raise ValueError("hdaf delta attention: the attention_mask is not causal attention with key "
                         "padding (and the model's sliding window) over queries at the end of the "
                         "keys (packed sequences or a custom mask?); it is not supported")
    return pad


def _sliding_window_of(mask_function) -> Optional[int]:
    """W when ``mask_function`` is transformers' ``sliding_window_causal_mask_function(W)``."""
    from transformers import masking_utils as mu

    if getattr(mask_function, "__qualname__", "") != "and_masks.<locals>.and_mask":
        return None
    cells = [c.cell_contents for c in (mask_function.__closure__ or ())]
    if len(cells) != 1 or not isinstance(cells[0], tuple) or len(cells[0]) != 2:
        return None
    overlay, causal = cells[0]
    if causal is not mu.causal_mask_function or getattr(overlay, "__qualname__", "") != \
            "sliding_window_overlay.<locals>.inner_mask" or len(overlay.__closure__ or ()) != 1:
        return None
    window = overlay.__closure__[0].cell_contents
    return window if isinstance(window, int) else None


def _key_padding_mask_interface(batch_size: int, q_length: int, kv_length: int, q_offset=0,
                                kv_offset=0, mask_function=None, attention_mask=None, **kwargs):
    """The ``"hdaf_delta"`` entry of ``AttentionMaskInterface``: ``[B,1,1,kv_len]`` bool, True =
    attend, or None (no padding).

    Key padding alone for a plain bidirectional mask, and for a causal or sliding-window causal
    mask whose queries end where the keys end (the operator applies causal and window itself).
    Anything else (overlays, packed sequences, static caches) is materialized by ``sdpa_mask``
    and then accepted or rejected by the attention function.
    """
    from transformers import masking_utils as mu

    ints = isinstance(q_offset, int) and isinstance(kv_offset, int)
    plain = ints and not kwargs.get("use_vmap")
    if plain and mask_function is mu.bidirectional_mask_function:
        plain = q_offset == 0 and kv_offset == 0 and q_length == kv_length
    elif plain and (mask_function is mu.causal_mask_function or (
            kwargs.get("local_size") is not None
            and _sliding_window_of(mask_function) == kwargs.get("local_size"))):
        plain = q_offset + q_length == kv_offset + kv_length
    else:
        plain = False
    if not plain:
        return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                            q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                            attention_mask=attention_mask, **kwargs)
    padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is None:
        return None
    return padding[:, kv_offset:kv_offset + kv_length].bool()[:, None, None, :]


def register() -> None:
    """Register ``"hdaf_delta"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, delta_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _key_padding_mask_interface)


def _pass_hidden_states(module, args, kwargs):
    """Forward pre-hook: hand the layer's input on to the attention function as a keyword."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None and len(args) > 1 and not isinstance(args[1], torch.Tensor):
        cache = args[1]  # GPT2Attention(hidden_states, cache, ...)
    return args, {**kwargs, HIDDEN_STATES_KWARG: hidden, CACHE_KWARG: cache}


def _find_attention(model: nn.Module) -> Dict[str, nn.Module]:
    """Qualified name → supported self-attention module; raises naming any attention it can't take."""
    encoders, decoders = _supported_classes(), _supported_classes(_SUPPORTED_DECODERS)
    found, unknown = {}, []
    modules = dict(model.named_modules())
    for name, m in modules.items():
        if isinstance(m, decoders):
            if getattr(m, "is_cross_attention", False) or not getattr(m, "is_causal", True):
                raise ValueError(f"cannot convert {name or 'the model'} ({type(m).__name__}): it is "
                                 "cross-attention; hdaf converts self-attention only")
            found[name] = m
        elif isinstance(m, encoders):
            if getattr(m, "is_causal", False) or getattr(getattr(m, "config", None), "is_decoder", False):
                raise ValueError(f"cannot convert {name or 'the model'} ({type(m).__name__}): it is "
                                 "causal (config.is_decoder=True); hdaf converts these encoder "
                                 "classes as bidirectional encoders only")
            found[name] = m
        elif "Attention" in type(m).__name__:
            # Wrappers (e.g. BertAttention around BertSelfAttention) are fine; leaves are not.
            inner = [c for c in m.modules() if c is not m and "Attention" in type(c).__name__]
            if not inner:
                unknown.append(f"{name or '<root>'} ({type(m).__name__})")
    known = ", ".join(c for _, c in _SUPPORTED + _SUPPORTED_DECODERS)
    if unknown:
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        raise ValueError(f"cannot convert {type(model).__name__}: module {unknown[0]}{more} is not "
                         f"a self-attention hdaf recognises (supported: {known})")
    if not found:
        raise ValueError(f"cannot convert {type(model).__name__}: it has no self-attention module "
                         f"hdaf recognises (supported: {known})")
    return found


def _layer_shape(m: nn.Module):
    """(embed_dim, num_heads, head_dim, weight for device/dtype, causal) of a supported module."""
    if hasattr(m, "q_proj"):  # Llama, Mistral, Qwen2, Qwen3
        return (m.q_proj.in_features, m.config.num_attention_heads, m.head_dim, m.q_proj.weight, True)
    if hasattr(m, "c_attn"):  # GPT-2 (Conv1D: weight [E, 3E])
        return (m.embed_dim, m.num_heads, m.head_dim, m.c_attn.weight, True)
    q_proj = m.query if hasattr(m, "query") else m.q_lin
    heads = getattr(m, "num_attention_heads", None) or m.n_heads
    return (q_proj.in_features, heads, m.attention_head_size, q_proj.weight, False)


def _drop_attention_dropout(m: nn.Module) -> Optional[float]:
    """Set the module's attention-probability dropout to 0; the old p when it was > 0."""
    if isinstance(getattr(m, "attention_dropout", None), float):  # Llama-style: a float
        p, m.attention_dropout = m.attention_dropout, 0.0
        return p or None
    drop = getattr(m, "dropout", None) or getattr(m, "attn_dropout", None)  # an nn.Dropout
    if drop is not None and drop.p > 0:
        p, drop.p = drop.p, 0.0
        return p
    return None


def _own_config(model: nn.Module) -> None:
    """Give ``model`` its own copy of its config (sub-configs included) and point every module
    that held one of them at the copy. Models built from one config object share it, and the
    conversion sets the attention implementation and the delta settings on the config: on the
    shared object they would switch the other models too."""
    copies: dict = {}  # id(original) -> copy, filled by deepcopy for everything it copies
    model.config = copy.deepcopy(model.config, copies)
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and id(config) in copies:
            m.config = copies[id(config)]


def add_delta_attention(model: nn.Module, max_distance: IntOrPair = 32, delta_dim: Optional[int] = None,
                        share_rpe_across_heads: bool = True, window: IntOrPair = None,
                        backend: str = "auto") -> nn.Module:
    """Convert every self-attention of a pretrained encoder or decoder ``model`` to hdaf delta
    attention.

    In place; returns ``model``. The model's own q/k/v/output projections and padding mask are
    reused; each layer gains ``hdaf_delta.proj`` (``Wx [E,Dr]``, random) and ``hdaf_delta.rpe``
    (``w``, zeros), so outputs are unchanged until ``w`` is trained. The model gets its own copy
    of its config first, so other models built from the same config object are not changed.

    Args:
        model: a ``transformers.PreTrainedModel`` whose self-attention is one of
            BertSelfAttention, RobertaSelfAttention, ElectraSelfAttention, DistilBertSelfAttention
            (bidirectional), or LlamaAttention, MistralAttention, Qwen2Attention, Qwen3Attention,
            GPT2Attention (causal, with KV-cache generation; any head on top: ``AutoModel``,
            ``...ForSequenceClassification``, ``...ForCausalLM``, ...).
        max_distance: ``m`` or ``(L, U)``: relative offsets clipped to ``[-L, U]``, ``R = L+U+1``.
        delta_dim: ``Dr``, the width of ``x``; default the head dimension.
        share_rpe_across_heads: one ``w [Dr,R]`` for all heads, else ``[H,Dr,R]``.
        window: None, or ``w`` / ``(Wl, Wr)``: attend only to ``-Wl <= j-i <= Wr`` (changes
            outputs); in a decoder it is combined with causal and the model's sliding window.
        backend: passed to :func:`hdaf.delta_attention`; ``"auto"`` picks the compiled kernel.

    Raises ``TypeError`` for a non-``transformers`` model and ``ValueError`` naming the module it
    does not recognise (e.g. T5's ``T5Attention``), cross-attention, or a BERT-family decoder.
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
    _own_config(model)
    dropped = set()
    for m in attention.values():
        embed, heads, head_dim, ref, causal = _layer_shape(m)
        m.hdaf_delta = DeltaParams(embed, heads, delta_dim or head_dim, L, U, share_rpe_across_heads,
                                   win, backend, device=ref.device, dtype=ref.dtype, causal=causal)
        p = _drop_attention_dropout(m)
        if p:
            dropped.add(p)
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
