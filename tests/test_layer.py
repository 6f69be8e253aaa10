"""The layers: hdaf.DeltaMultiheadAttention called exactly as nn.MultiheadAttention is, inside
nn.TransformerEncoderLayer / nn.TransformerDecoderLayer and user blocks; hdaf.DeltaAttention,
the (x, key_padding_mask) layer of HDAF's own model."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hdaf

E, H = 16, 4


def reference(mod, x, pad=None, causal=False):
    """DeltaMultiheadAttention's forward from the spec, for batch-first x [B,T,E]: T×T logits."""
    B, T, _ = x.shape
    D = E // H
    q, k, v = F.linear(x, mod.in_proj_weight, mod.in_proj_bias).view(B, T, 3, H, D).permute(
        2, 0, 3, 1, 4)
    feats = mod.delta_proj(x) if mod.delta_proj is not None else x
    i = torch.arange(T)
    offset = i[None, :] - i[:, None]  # j - i
    r = offset.clamp(-mod.L, mod.U) + mod.L
    diff = feats[:, None, :, :] - feats[:, :, None, :]  # [B,i,j,Dr]: x_j - x_i
    if mod.rpe.dim() == 2:
        bias = torch.einsum("bijd,dij->bij", diff, mod.rpe[:, r])[:, None]
    else:
        bias = torch.einsum("bijd,hdij->bhij", diff, mod.rpe[:, :, r])
    logits = (q @ k.transpose(-1, -2) + bias) / math.sqrt(D)
    visible = torch.ones(T, T, dtype=torch.bool)
    if mod.window is not None:
        visible &= (offset >= -mod.window[0]) & (offset <= mod.window[1])
    if causal:
        visible &= offset <= 0
    visible = visible.expand(B, 1, T, T)
    if pad is not None:
        visible = visible & ~pad[:, None, None, :]
    # A query with no visible key gets 0 (the spec), where softmax gives NaN.
    out = logits.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0) @ v
    return mod.out_proj(out.transpose(1, 2).reshape(B, T, E))


def delta_mha(batch_first=True, seed=0, **kw):
    """A float64 DeltaMultiheadAttention with a nonzero delta term."""
    torch.manual_seed(seed)
    mod = hdaf.DeltaMultiheadAttention(E, H, batch_first=batch_first, **kw).double()
    with torch.no_grad():
        mod.rpe.normal_(std=0.5)
    return mod


def padding(B, T, lengths):
    return torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None]


# ---- DeltaMultiheadAttention on its own ---------------------------------------------------------

@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("opts", [{}, {"delta_dim": 5, "share_rpe_across_heads": False,
                                       "max_distance": (2, 3)},
                                  {"max_distance": 3, "window": (4, 2), "bias": False}])
def test_matches_the_spec_with_masks(batch_first, opts):
    mod = delta_mha(batch_first, **opts)
    B, T = 3, 9
    x = torch.randn(B, T, E, dtype=torch.float64)
    pad = padding(B, T, [9, 6, 3])
    causal = nn.Transformer.generate_square_subsequent_mask(T, dtype=torch.float64)
    xin = x if batch_first else x.transpose(0, 1)
    for kw, want in (({}, reference(mod, x)),
                     ({"key_padding_mask": pad}, reference(mod, x, pad)),
                     ({"attn_mask": causal, "key_padding_mask": pad}, reference(mod, x, pad, True)),
                     ({"is_causal": True}, reference(mod, x, causal=True))):
        out, weights = mod(xin, xin, xin, need_weights=False, **kw)
        assert weights is None
        out = out if batch_first else out.transpose(0, 1)
        torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10, msg=lambda m: f"{kw}: {m}")
    assert mod.last_backend == "cpu"


@pytest.mark.parametrize("mask", ["none", "padding bool", "padding float", "is_causal",
                                  "causal bool", "causal float", "causal [B*H,T,T]", "empty",
                                  "unbatched"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_at_w_zero_it_is_nn_multihead_attention(mask, batch_first):
    """Built from nn.MultiheadAttention's state_dict, w = 0: the same outputs and gradients."""
    torch.manual_seed(0)
    B, T = 3, 7
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first).double()
    mod = hdaf.DeltaMultiheadAttention(E, H, batch_first=batch_first).double()
    mod.load_state_dict(mha.state_dict())
    x = torch.randn((B, T, E) if batch_first else (T, B, E), dtype=torch.float64)
    pad = padding(B, T, [7, 5, 2])
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    kw = {"none": {},
          "padding bool": {"key_padding_mask": pad},
          "padding float": {"key_padding_mask": torch.zeros(B, T).masked_fill(pad, -math.inf)},
          "is_causal": {"attn_mask": causal, "is_causal": True},
          "causal bool": {"attn_mask": causal},
          "causal float": {"attn_mask": nn.Transformer.generate_square_subsequent_mask(T)},
          "causal [B*H,T,T]": {"attn_mask": causal.expand(B * H, T, T)},
          "empty": {"attn_mask": torch.zeros(T, T, dtype=torch.bool)},
          "unbatched": {}}[mask]
    if mask == "unbatched":
        x = x[0] if batch_first else x[:, 0]
    outs = []
    for m in (mha, mod):
        xi = x.clone().requires_grad_()
        out = m(xi, xi, xi, need_weights=False, **kw)[0]
        out.pow(2).sum().backward()
        outs.append([out, xi.grad] + [p.grad for _, p in sorted(m.named_parameters())
                                      if _ != "rpe"])
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)
    assert mod.rpe.grad.abs().max() > 0  # w learns from the first step


def test_key_equal_to_query_but_another_tensor():
    """key/value equal to query by value (not the same object): accepted, and the gradient
    reaches each input through its own projection, as in nn.MultiheadAttention."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True).double()
    mod = hdaf.DeltaMultiheadAttention.from_mha(mha)
    x = torch.randn(2, 6, E, dtype=torch.float64)
    grads = []
    for m in (mha, mod):
        xi = x.clone().requires_grad_()
        m(xi, xi.detach(), xi.detach(), need_weights=False)[0].sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-12, rtol=1e-10)


def test_float32_default_backend_against_float64():
    mod = delta_mha(max_distance=4)
    x = torch.randn(2, 33, E, dtype=torch.float64)
    pad = padding(2, 33, [33, 20])
    want = reference(mod, x, pad, causal=True)
    got = mod.float()(x.float(), x.float(), x.float(), key_padding_mask=pad, is_causal=True,
                      need_weights=False)[0]
    torch.testing.assert_close(got, want.float(), atol=2e-5, rtol=1e-4)


def test_state_dict_of_nn_multihead_attention_loads_unchanged():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, bias=False, batch_first=True)
    for kw in ({}, {"delta_dim": 4}):
        mod = hdaf.DeltaMultiheadAttention(E, H, bias=False, batch_first=True, **kw)
        delta_keys = set(mod.state_dict()) - set(mha.state_dict())
        assert delta_keys == ({"rpe"} if not kw else {"rpe", "delta_proj.weight"})
        proj = None if not kw else mod.delta_proj.weight.detach().clone()
        assert mod.load_state_dict(mha.state_dict()) is not None  # strict: nothing missing
        assert mod.rpe.abs().max() == 0
        if proj is not None:  # the delta weights kept their values
            torch.testing.assert_close(mod.delta_proj.weight, proj, atol=0, rtol=0)
        torch.testing.assert_close(mod.in_proj_weight, mha.in_proj_weight, atol=0, rtol=0)
    # Some delta weights but not all: the others are reported, not filled in.
    partial = {**mha.state_dict(), "rpe": torch.ones_like(mod.rpe)}
    with pytest.raises(RuntimeError, match=r'Missing key\(s\).*"delta_proj.weight"'):
        mod.load_state_dict(partial)
    # The other way: nn.MultiheadAttention takes a DeltaMultiheadAttention's weights.
    result = mha.load_state_dict(mod.state_dict(), strict=False)
    assert set(result.unexpected_keys) == {"rpe", "delta_proj.weight"} and not result.missing_keys


def test_drop_in_replacement_trains_in_a_user_block():
    """A pre-norm block written for nn.MultiheadAttention, given DeltaMultiheadAttention."""

    class EncoderBlock(nn.Module):
        def __init__(self, attn: nn.Module):
            super().__init__()
            self.attn, self.norm1, self.norm2 = attn, nn.LayerNorm(E), nn.LayerNorm(E)
            self.ff = nn.Sequential(nn.Linear(E, 2 * E), nn.GELU(), nn.Linear(2 * E, E))

        def forward(self, x, key_padding_mask=None):
            h = self.norm1(x)
            x = x + self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)[0]
            return x + self.ff(self.norm2(x))

    torch.manual_seed(0)
    T, B = 12, 4
    mha = EncoderBlock(nn.MultiheadAttention(E, H, batch_first=True))
    block = EncoderBlock(hdaf.DeltaMultiheadAttention(E, H, batch_first=True, max_distance=4,
                                                      window=6))
    head = nn.Linear(E, 1)
    x = torch.randn(B, T, E)
    mask = padding(B, T, [T, 8, T, T])
    # The target depends on changes over time: the sum of |x_t - x_{t-1}| over the first feature.
    y = (x[:, 1:, 0] - x[:, :-1, 0]).abs().sum(1, keepdim=True)
    assert mha(x, mask).shape == block(x, mask).shape == (B, T, E)
    opt = torch.optim.Adam(list(block.parameters()) + list(head.parameters()), lr=1e-2)
    losses = []
    for _ in range(30):
        out = head(block(x, mask).masked_fill(mask[..., None], 0).mean(1))
        loss = nn.functional.mse_loss(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert block.attn.last_backend == "cpu"
    assert block.attn.rpe.abs().max() > 0


# ---- inside nn.TransformerEncoderLayer / nn.TransformerDecoderLayer -----------------------------

@pytest.fixture
def fast_path_calls(monkeypatch):
    """Records the calls of the encoder's fused inference paths, which bypass self_attn.forward:
    the in_proj_weight handed to torch._transformer_encoder_layer_fwd, and "nested" for each
    nested-tensor conversion of nn.TransformerEncoder."""
    calls = []
    fused, nested = torch._transformer_encoder_layer_fwd, torch._nested_tensor_from_mask

    def spy_fused(*args, **kwargs):
        calls.append(args[3])
        return fused(*args, **kwargs)

    def spy_nested(*args, **kwargs):
        calls.append("nested")
        return nested(*args, **kwargs)
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", spy_fused)
    monkeypatch.setattr(torch, "_nested_tensor_from_mask", spy_nested)
    return calls


def encoder_layer(batch_first, norm_first=False):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=batch_first,
                                       norm_first=norm_first).double()
    ref = copy.deepcopy(layer)
    layer.self_attn = hdaf.DeltaMultiheadAttention.from_mha(layer.self_attn)
    return layer, ref


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_train_and_eval_apply_the_delta_term(batch_first, norm_first,
                                                           fast_path_calls):
    layer, ref = encoder_layer(batch_first, norm_first)
    B, T = 3, 8
    x = torch.randn((B, T, E) if batch_first else (T, B, E), dtype=torch.float64)
    pad = padding(B, T, [8, 5, 3])
    valid = ~pad if batch_first else ~pad.T
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    cases = [{"src_key_padding_mask": pad}, {"src_mask": causal},
             {"src_mask": causal, "is_causal": True, "src_key_padding_mask": pad}]
    # w = 0: the original layer's outputs, in training and in inference (ref may take its fast
    # path there, which leaves padded rows undefined: compare the others).
    for kw in cases:
        for train in (True, False):
            layer.train(train), ref.train(train)
            with torch.no_grad():
                got, want = layer(x, **kw), ref(x, **kw)
            torch.testing.assert_close(got[valid], want[valid], atol=1e-12, rtol=1e-10)
    # w != 0: inference computes exactly what training computes (dropout is 0), so the delta
    # term is applied on both paths, and it changes the output.
    with torch.no_grad():
        layer.self_attn.rpe.normal_(std=0.5)
    for kw in cases:
        layer.train()
        train_out = layer(x, **kw)
        layer.eval()
        with torch.no_grad():
            eval_out = layer(x, **kw)
        torch.testing.assert_close(eval_out, train_out, atol=1e-12, rtol=1e-10)
        assert (eval_out - ref.eval()(x, **kw))[valid].abs().max() > 1e-3
    assert not any(w is layer.self_attn.in_proj_weight for w in fast_path_calls)
    if batch_first:  # the unconverted layer does take it: the spy would have seen ours
        assert any(w is ref.self_attn.in_proj_weight for w in fast_path_calls)


def test_encoder_stack_built_around_the_module(fast_path_calls):
    layer, ref_layer = encoder_layer(batch_first=True)
    with pytest.warns(UserWarning, match="_qkv_same_embed_dim was not True"):
        enc = nn.TransformerEncoder(layer, 2)
    assert not enc.use_nested_tensor
    ref = nn.TransformerEncoder(ref_layer, 2, enable_nested_tensor=False)
    x = torch.randn(3, 8, E, dtype=torch.float64)
    pad = padding(3, 8, [8, 5, 3])
    enc.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(enc(x, src_key_padding_mask=pad),
                                   ref(x, src_key_padding_mask=pad), atol=1e-12, rtol=1e-10)
    assert "nested" not in fast_path_calls
    assert not any(w is m.self_attn.in_proj_weight for w in fast_path_calls for m in enc.layers)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_module_swapped_into_a_built_encoder_says_how_to_fix_nested_input():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 32, 0.0, batch_first=True), 1).eval()
    enc.layers[0].self_attn = hdaf.DeltaMultiheadAttention.from_mha(enc.layers[0].self_attn)
    x, pad = torch.randn(2, 5, E), padding(2, 5, [5, 3])
    with torch.no_grad(), pytest.raises(ValueError, match="set that encoder's use_nested_tensor = False"):
        enc(x, src_key_padding_mask=pad)
    enc.use_nested_tensor = False
    with torch.no_grad():
        assert enc(x, src_key_padding_mask=pad).shape == (2, 5, E)


@pytest.mark.parametrize("batch_first", [True, False])
def test_decoder_layer_causal_self_attention(batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(E, H, 32, dropout=0.0, batch_first=batch_first).double()
    ref = copy.deepcopy(layer)
    layer.self_attn = hdaf.DeltaMultiheadAttention.from_mha(layer.self_attn)
    B, T, S = 3, 7, 5
    shape = (lambda n: (B, n, E)) if batch_first else (lambda n: (n, B, E))
    tgt, memory = torch.randn(shape(T), dtype=torch.float64), torch.randn(shape(S), dtype=torch.float64)
    kw = {"tgt_mask": torch.ones(T, T, dtype=torch.bool).triu(1),
          "tgt_is_causal": True, "tgt_key_padding_mask": padding(B, T, [7, 6, 4]),
          "memory_key_padding_mask": padding(B, S, [5, 5, 2])}
    for train in (True, False):
        layer.train(train), ref.train(train)
        torch.testing.assert_close(layer(tgt, memory, **kw), ref(tgt, memory, **kw),
                                   atol=1e-12, rtol=1e-10)
    with torch.no_grad():
        layer.self_attn.rpe.normal_(std=0.5)
    assert (layer(tgt, memory, **kw) - ref(tgt, memory, **kw)).abs().max() > 1e-3


def test_torch_compile_fullgraph_in_an_encoder_layer():
    """One graph with padding and a causal mask given with is_causal (mask values are checked
    in eager mode only; a causal attn_mask without the hint is recognised by value, which breaks
    the graph)."""
    layer, _ = encoder_layer(batch_first=True)
    layer.float()
    with torch.no_grad():
        layer.self_attn.rpe.normal_(std=0.5)
    T = 7
    x = torch.randn(2, T, E)
    kw = {"src_key_padding_mask": padding(2, T, [7, 4]),
          "src_mask": torch.ones(T, T, dtype=torch.bool).triu(1), "is_causal": True}
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    outs = []
    for mod in (layer, compiled):
        layer.zero_grad()
        out = mod(x, **kw)
        out.pow(2).sum().backward()
        outs.append((out, layer.self_attn.rpe.grad.clone()))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-4, rtol=1e-4)


# ---- errors -------------------------------------------------------------------------------------

def test_constructor_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="num_heads must be a positive int dividing embed_dim=10, got 3"):
        hdaf.DeltaMultiheadAttention(10, 3)
    with pytest.raises(ValueError, match=r"no attention-probability dropout .* got dropout=0.1"):
        hdaf.DeltaMultiheadAttention(E, H, dropout=0.1)
    with pytest.raises(ValueError, match="add_bias_kv=True"):
        hdaf.DeltaMultiheadAttention(E, H, add_bias_kv=True)
    with pytest.raises(ValueError, match="add_zero_attn=True"):
        hdaf.DeltaMultiheadAttention(E, H, add_zero_attn=True)
    with pytest.raises(ValueError, match="kdim must be None or embed_dim=16, got kdim=8"):
        hdaf.DeltaMultiheadAttention(E, H, kdim=8)
    with pytest.raises(ValueError, match="vdim must be None or embed_dim=16, got vdim=8"):
        hdaf.DeltaMultiheadAttention(E, H, vdim=8)
    with pytest.raises(ValueError, match="backend must be one of"):
        hdaf.DeltaMultiheadAttention(E, H, backend="fast")
    with pytest.raises(ValueError, match="self-attention: kdim must be None or embed_dim=16, got kdim=8"):
        hdaf.DeltaMultiheadAttention.from_mha(nn.MultiheadAttention(E, H, kdim=8, vdim=8))
    with pytest.raises(TypeError, match=r"unknown delta option\(s\) \['causal'\]"):
        hdaf.DeltaMultiheadAttention.from_mha(nn.MultiheadAttention(E, H), causal=True)
    with pytest.warns(UserWarning, match="attention-probability dropout p=0.2 set to 0"):
        assert hdaf.DeltaMultiheadAttention.from_mha(nn.MultiheadAttention(E, H, 0.2)).dropout == 0


def test_forward_refuses_what_it_cannot_do():
    mod = hdaf.DeltaMultiheadAttention(E, H, batch_first=True)
    T = 6
    x = torch.randn(2, T, E)
    with pytest.raises(ValueError, match="never forms attention weights.*need_weights=False"):
        mod(x, x, x)
    with pytest.raises(ValueError, match="self-attention: key must be query.*cross-attention"):
        mod(x, torch.randn(2, 4, E), torch.randn(2, 4, E), need_weights=False)
    with pytest.raises(ValueError, match="self-attention: key must be query.*cross-attention"):
        mod(x, torch.randn_like(x), torch.randn_like(x), need_weights=False)
    band = (torch.arange(T)[None, :] - torch.arange(T)[:, None]).abs() > 2
    with pytest.raises(ValueError, match=r"attn_mask \(torch.bool, shape \(6, 6\), 12 of 36 "
                                         r"positions masked\) is not supported.*window="):
        mod(x, x, x, need_weights=False, attn_mask=band)
    with pytest.raises(ValueError, match="values other than 0 and -inf"):
        mod(x, x, x, need_weights=False, attn_mask=torch.randn(T, T))
    with pytest.raises(ValueError, match="values other than 0 and -inf"):
        mod(x, x, x, need_weights=False, key_padding_mask=torch.randn(2, T))
    with pytest.raises(ValueError, match="is_causal=True but the attn_mask .* is not the causal mask"):
        mod(x, x, x, need_weights=False, attn_mask=band, is_causal=True)
    with pytest.raises(ValueError, match=r"attn_mask must be \[T,T\]=\(6, 6\) or \[B\*H,T,T\]"):
        mod(x, x, x, need_weights=False, attn_mask=torch.zeros(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_padding_mask must be \[B,T\]=\(2, 6\), got \(2, 5\)"):
        mod(x, x, x, need_weights=False, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"query must be \[B,T,E\] .* with E=16, got \(2, 6, 8\)"):
        y = torch.randn(2, 6, 8)
        mod(y, y, y, need_weights=False)


# ---- DeltaAttention: attn(x, key_padding_mask) -> out --------------------------------------------

def test_delta_attention_seq_first_layout_and_padding_invariance():
    torch.manual_seed(0)
    layer = hdaf.DeltaAttention(8, 2, batch_first=False, delta_dim=5, share_rpe_across_heads=False,
                                max_distance=(1, 3)).double()
    assert layer.rpe.shape == (2, 5, 5)
    x = torch.randn(6, 3, 8, dtype=torch.double)  # [T,B,E]
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, 4:] = True
    out = layer(x, key_padding_mask=mask)
    assert out.shape == (6, 3, 8)
    x2 = x.clone()
    x2[4:, 0] = 1e3  # change only padded positions of batch 0
    out2 = layer(x2, key_padding_mask=mask)
    torch.testing.assert_close(out[:4, 0], out2[:4, 0], atol=1e-12, rtol=0)


def test_delta_attention_use_delta_false_is_plain_attention():
    torch.manual_seed(0)
    layer = hdaf.DeltaAttention(8, 2, use_delta=False).double()
    x = torch.randn(2, 5, 8, dtype=torch.double)
    q, k, v = layer.in_proj(x).view(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
    ref = nn.functional.scaled_dot_product_attention(q, k, v)
    ref = layer.out_proj(ref.transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(layer(x), ref)


def test_delta_attention_argument_errors():
    with pytest.raises(ValueError, match="num_heads must be a positive int dividing embed_dim=10, got 3"):
        hdaf.DeltaAttention(10, 3)
    layer = hdaf.DeltaAttention(8, 2)
    with pytest.raises(ValueError, match=r"x must be \[B,T,E\] with E=8, got \(2, 5, 7\)"):
        layer(torch.randn(2, 5, 7))
