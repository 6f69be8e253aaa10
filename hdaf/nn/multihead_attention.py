"""``DeltaMultiheadAttention``: ``nn.MultiheadAttention``'s interface, delta attention inside.

Same constructor arguments, forward signature, parameter names and ``state_dict`` keys as
``torch.nn.MultiheadAttention``, so it replaces one in self-attention without touching the
caller (``nn.TransformerEncoderLayer``, ``nn.TransformerDecoderLayer``'s ``self_attn``,
torchvision's ViT, user code). One call of :func:`hdaf.delta_attention` per forward.
"""
from __future__ import annotations

import numbers
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ..dispatch import BACKENDS
from ..functional import IntOrPair, _pair
from .delta_attention import attend, set_context_parallel

# Delta options a caller (or hdaf.nn.convert_mha) may set beside nn.MultiheadAttention's own.
DELTA_OPTIONS = ("delta_dim", "max_distance", "window", "share_rpe_across_heads", "backend")


class DeltaMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` for self-attention, with the delta term in the logits.

    ``logit_ij = (q_i·k_j + (x_j - x_i)·w[:, r(j-i)]) / sqrt(head_dim)`` (docs/delta_attention.md),
    with ``q, k, v`` from ``in_proj_weight`` exactly as in ``nn.MultiheadAttention`` and ``x`` the
    layer's input ``query`` (``delta_dim=None``) or ``query · Wxᵀ`` (``Wx = delta_proj.weight``).
    ``w`` (``rpe``) starts at zero: a freshly built layer, or one that loaded an
    ``nn.MultiheadAttention`` ``state_dict``, computes exactly that module's attention until ``w``
    is trained.

    Args (``nn.MultiheadAttention``'s, same order and defaults):
        embed_dim, num_heads: E and H; E must be divisible by H.
        dropout: must be 0: the fused kernels never form the attention probabilities, so there
            is none to drop (``hdaf.nn.convert_mha`` sets it to 0 with a warning).
        bias: biases in the input and output projections.
        add_bias_kv, add_zero_attn: must be False (no extra key/value rows in delta attention).
        kdim, vdim: None or ``embed_dim`` (self-attention).
        batch_first: (batch, seq, feature) when True, else (seq, batch, feature).
    Delta options (keyword only):
        delta_dim: ``Dr``. None: ``x`` is the layer input (``Dr = E``); an int ``!= E``: ``x =
            query · Wxᵀ`` with ``delta_proj = Linear(E, Dr, bias=False)`` (a bias would cancel in
            ``x_j - x_i``).
        max_distance: ``m`` or ``(L, U)``: offsets clipped to ``[-L, U]``, ``R = L+U+1`` buckets.
        window: None, ``w`` or ``(Wl, Wr)``: key j visible from query i only when
            ``-Wl <= j-i <= Wr`` (the kernels then cost O(T·window)).
        share_rpe_across_heads: one ``w [Dr,R]`` for all heads, else ``[H,Dr,R]``.
        backend: passed to :func:`hdaf.delta_attention` ("auto" picks the compiled kernel).
        context_parallel_group, context_parallel_layout: as in :class:`hdaf.DeltaAttention`:
            with a group, ``forward`` takes and returns this rank's shard of the sequence.

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (out, None)``:
        query: ``[B,T,E]`` (batch_first) or ``[T,B,E]``, or unbatched ``[T,E]``.
        key: must be ``query`` (the same tensor, or an equal one); anything else is
            cross-attention and raises ``ValueError``.
        value: a tensor of ``query``'s shape (normally ``query`` itself).
        key_padding_mask: ``[B,T]``, bool (True = padding) or float 0/-inf.
        need_weights: must be False (no weights are formed); ``average_attn_weights`` is unused.
        attn_mask: None, or the causal mask ``[T,T]`` / ``[B*H,T,T]``: bool True exactly above
            the diagonal, or float -inf there and 0 elsewhere (``nn.Transformer.
            generate_square_subsequent_mask``). An all-False / all-zero mask means no mask.
            Any other mask or an additive bias raises ``ValueError``.
        is_causal: True makes the attention causal (with or without ``attn_mask``).
    Mask values are checked in eager mode; under ``torch.compile`` they are not (a check would
    break the graph), a float mask's entries <= dtype-min/2 count as masked, and
    ``is_causal=True`` is trusted without looking at ``attn_mask``.
    A query with no visible key gets 0, where ``nn.MultiheadAttention`` gives NaN.
    After a call, ``last_backend`` names the backend that served it.
    """

    # nn.MultiheadAttention's own flag, read by nn.TransformerEncoderLayer and
    # nn.TransformerEncoder to choose their fused inference path
    # (torch._transformer_encoder_layer_fwd, nested tensors), which reads in_proj_weight
    # directly and would skip this module's forward and the delta term. False keeps them on the
    # path that calls self_attn. The weights are still stored as nn.MultiheadAttention stores
    # them when the flag is True (in_proj_weight [3E,E]).
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False,
                 kdim: Optional[int] = None, vdim: Optional[int] = None, batch_first: bool = False,
                 device=None, dtype=None, *, delta_dim: Optional[int] = None,
                 max_distance: IntOrPair = 16, window: IntOrPair = None,
                 share_rpe_across_heads: bool = True, backend: str = "auto",
                 context_parallel_group=None, context_parallel_layout: str = "zigzag"):
        super().__init__()
        if not isinstance(embed_dim, numbers.Integral) or embed_dim <= 0:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
        if not isinstance(num_heads, numbers.Integral) or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"num_heads must be a positive int dividing embed_dim={embed_dim}, "
                             f"got {num_heads!r}")
        if dropout != 0:
            raise ValueError(f"DeltaMultiheadAttention has no attention-probability dropout (the "
                             f"fused kernels never form the probabilities), got dropout={dropout!r}; "
                             "pass dropout=0.0 (hdaf.nn.convert_mha does so, with a warning)")
        if add_bias_kv:
            raise ValueError("DeltaMultiheadAttention does not support add_bias_kv=True (learned "
                             "extra key/value rows have no position for the delta term)")
        if add_zero_attn:
            raise ValueError("DeltaMultiheadAttention does not support add_zero_attn=True")
        for name, dim in (("kdim", kdim), ("vdim", vdim)):
            if dim is not None and dim != embed_dim:
                raise ValueError(f"DeltaMultiheadAttention is self-attention: {name} must be None "
                                 f"or embed_dim={embed_dim}, got {name}={dim!r}")
        if delta_dim is not None and (not isinstance(delta_dim, numbers.Integral)
                                      or isinstance(delta_dim, bool) or delta_dim <= 0):
            raise ValueError(f"delta_dim must be a positive int or None, got {delta_dim!r}")
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.L, self.U = _pair("max_distance", max_distance)
        self.window = _pair("window", window)
        factory = {"device": device, "dtype": dtype}

        # nn.MultiheadAttention's attributes, by the names its callers read.
        self.embed_dim, self.kdim, self.vdim = embed_dim, embed_dim, embed_dim
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = 0.0, batch_first
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
        self.register_parameter("q_proj_weight", None)
        self.register_parameter("k_proj_weight", None)
        self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory)

        # The delta weights.
        self.delta_dim = delta_dim or embed_dim
        self.share_rpe_across_heads, self.backend = share_rpe_across_heads, backend
        if self.delta_dim != embed_dim:
            self.delta_proj = nn.Linear(embed_dim, self.delta_dim, bias=False, **factory)
        else:
            self.register_module("delta_proj", None)
        R = self.L + self.U + 1
        shape = (self.delta_dim, R) if share_rpe_across_heads else (num_heads, self.delta_dim, R)
        self.rpe = nn.Parameter(torch.zeros(shape, **factory))
        self.last_backend: Optional[str] = None
        set_context_parallel(self, context_parallel_group, context_parallel_layout)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # nn.MultiheadAttention's init; w = 0 (the delta term starts at 0); Wx keeps Linear's
        # default random init, since at w = 0 its gradient is 0 and it must not start at 0 too.
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        nn.init.zeros_(self.rpe)

    def reset_parameters(self) -> None:
        """Initialise every parameter as construction does, the output projection and ``Wx``
        included (``_reset_parameters``, nn.MultiheadAttention's hook, leaves them as they are):
        what a module materialised with ``to_empty`` from the meta device needs."""
        self.out_proj.reset_parameters()
        if self.delta_proj is not None:
            self.delta_proj.reset_parameters()
        self._reset_parameters()

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, **delta_options) -> "DeltaMultiheadAttention":
        """A ``DeltaMultiheadAttention`` with ``mha``'s settings and weights (copied) and ``w = 0``,
        so it computes what ``mha`` computes. ``mha``'s attention-probability dropout, which has
        no counterpart here, is dropped with a ``UserWarning``.

        ``delta_options``: ``delta_dim``, ``max_distance``, ``window``, ``share_rpe_across_heads``,
        ``backend``. Raises ``ValueError`` for an ``mha`` it cannot stand in for (kdim/vdim !=
        embed_dim, add_bias_kv, add_zero_attn).
        """
        new = cls._copy_of(mha, delta_options)
        if mha.dropout > 0:
            warnings.warn(f"from_mha: attention-probability dropout p={mha.dropout} set to 0 (the "
                          "fused delta-attention kernels have none)", UserWarning, stacklevel=2)
        return new

    @classmethod
    def _copy_of(cls, mha: nn.MultiheadAttention, delta_options: dict) -> "DeltaMultiheadAttention":
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"from_mha expects an nn.MultiheadAttention, got {type(mha).__name__}")
        unknown = sorted(set(delta_options) - set(DELTA_OPTIONS))
        if unknown:
            raise TypeError(f"unknown delta option(s) {unknown}; the options are {list(DELTA_OPTIONS)}")
        ref = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, 0.0, bias=mha.in_proj_bias is not None,
                  add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn,
                  kdim=mha.kdim, vdim=mha.vdim, batch_first=mha.batch_first,
                  device=ref.device, dtype=ref.dtype, **delta_options)
        new.load_state_dict(mha.state_dict())
        for name, p in mha.named_parameters():
            new.get_parameter(name).requires_grad_(p.requires_grad)
        return new.train(mha.training)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A plain nn.MultiheadAttention state_dict (no delta weights under this prefix) loads
        # strictly: the delta weights keep their current values, as BatchNorm fills in an old
        # checkpoint's missing num_batches_tracked. A state_dict with only some of them still
        # reports the others missing.
        delta = {f"{prefix}{name}": t for name, t in self._delta_state().items()}
        if prefix + "in_proj_weight" in state_dict and not any(k in state_dict for k in delta):
            for key, t in delta.items():
                state_dict[key] = t.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _delta_state(self):
        out = {"rpe": self.rpe}
        if self.delta_proj is not None:
            out["delta_proj.weight"] = self.delta_proj.weight
        return out

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, None]:
        if need_weights:
            raise ValueError("DeltaMultiheadAttention never forms attention weights (the fused "
                             "kernels do not); call it with need_weights=False, as "
                             "nn.TransformerEncoderLayer/DecoderLayer do")
        self._check_inputs(query, key, value)
        fused = key is query and value is query  # one input-projection matmul
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None and key_padding_mask.dim() == 1:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, T, E = query.shape
        H, D = self.num_heads, self.head_dim
        causal = _is_causal(attn_mask, is_causal, T, B * H)
        pad = _key_padding(key_padding_mask, B, T, query.device)

        if fused:
            qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
            q, k, v = qkv.reshape(B, T, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            ws = self.in_proj_weight.chunk(3)
            bs = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
            q, k, v = (F.linear(t, w, b).reshape(B, T, H, D).transpose(1, 2)
                       for t, w, b in zip((query, key, value), ws, bs))
        x = self.delta_proj(query) if self.delta_proj is not None else query
        # Under autocast q is in the autocast dtype; the op takes one dtype for all inputs.
        x, w = x.to(q.dtype), self.rpe.to(q.dtype)
        out = attend(self, q, k, v, x, w, causal, pad)
        out = self.out_proj(out.transpose(1, 2).reshape(B, T, E))
        if unbatched:
            return out.squeeze(0), None
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _check_inputs(self, query, key, value) -> None:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.is_nested:
                raise ValueError(
                    f"DeltaMultiheadAttention got a nested tensor as {name}: an nn.TransformerEncoder "
                    "built before its layers' self_attn was replaced takes its nested-tensor fast "
                    "path, which drops key_padding_mask; set that encoder's use_nested_tensor = "
                    "False (hdaf.nn.convert_mha does)")
        layout = "[B,T,E]" if self.batch_first else "[T,B,E]"
        if query.dim() not in (2, 3) or query.shape[-1] != self.embed_dim:
            raise ValueError(f"query must be {layout} (or unbatched [T,E]) with E={self.embed_dim}, "
                             f"got {tuple(query.shape)}")
        if key is not query and (key.shape != query.shape or not torch.equal(key, query)):
            raise ValueError(
                f"DeltaMultiheadAttention is self-attention: key must be query, got a different "
                f"key (query {tuple(query.shape)}, key {tuple(key.shape)}). That is "
                "cross-attention: keep an nn.MultiheadAttention there (hdaf.nn.convert_mha(model, "
                "exclude=[name]) leaves it as it is)")
        if value.shape != query.shape:
            raise ValueError(f"value must have query's shape {tuple(query.shape)}, "
                             f"got {tuple(value.shape)}")

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"batch_first={self.batch_first}, bias={self.in_proj_bias is not None}, "
                f"delta_dim={self.delta_dim}, max_distance=({self.L}, {self.U}), "
                f"window={self.window}, shared_rpe={self.share_rpe_across_heads}, "
                f"backend={self.backend!r}")


def _blocked(mask: torch.Tensor, name: str) -> torch.Tensor:
    """bool ``True`` = not attended, from a bool mask or an additive float one (0 / -inf)."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be bool or floating point, got dtype {mask.dtype}")
    # -inf, or the dtype's lowest value as some code writes it: masked. 0: attended.
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    # The value check is data-dependent: eager only, so that torch.compile traces one graph.
    if not torch.compiler.is_compiling() and not bool(torch.all((mask == 0) | blocked)):
        raise ValueError(f"{name} is an additive float mask with values other than 0 and -inf (an "
                         "attention bias); delta attention takes masks only, not biases")
    return blocked


def _key_padding(mask: Optional[torch.Tensor], B: int, T: int,
                 device: torch.device) -> Optional[torch.Tensor]:
    """``key_padding_mask`` as hdaf's ``[B,T]`` bool, True = padding key."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor [B,T] or None, "
                        f"got {type(mask).__name__}")
    if mask.shape != (B, T):
        raise ValueError(f"key_padding_mask must be [B,T]=({B}, {T}), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"key_padding_mask is on {mask.device} but query is on {device}")
    return _blocked(mask, "key_padding_mask")


def _is_causal(attn_mask: Optional[torch.Tensor], is_causal: bool, T: int, BH: int) -> bool:
    """Whether the call is causal; raises for an ``attn_mask`` that is neither causal nor empty."""
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__} {is_causal!r}")
    if attn_mask is None:
        return is_causal
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.shape not in ((T, T), (BH, T, T)):
        raise ValueError(f"attn_mask must be [T,T]=({T}, {T}) or [B*H,T,T]=({BH}, {T}, {T}), "
                         f"got {tuple(attn_mask.shape)}")
    blocked = _blocked(attn_mask, "attn_mask")
    if is_causal and torch.compiler.is_compiling():
        return True  # the hint is trusted: checking the mask's values would break the graph
    upper = torch.ones(T, T, dtype=torch.bool, device=blocked.device).triu_(1)
    if torch.equal(blocked, upper.expand_as(blocked)):
        return True
    what = (f"attn_mask ({attn_mask.dtype}, shape {tuple(attn_mask.shape)}, "
            f"{int(blocked.sum())} of {blocked.numel()} positions masked)")
    if is_causal:
        raise ValueError(f"is_causal=True but the {what} is not the causal mask (masked exactly "
                         "above the diagonal)")
    if not bool(blocked.any()):
        return False
    raise ValueError(f"{what} is not supported: delta attention takes a causal mask (is_causal=True, "
                     "or masked exactly above the diagonal), an empty one, or key_padding_mask; for "
                     "a banded mask build the layer with window=(Wl, Wr) and pass no attn_mask")
