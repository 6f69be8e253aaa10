"""hdaf.convert_mha: every self-attention nn.MultiheadAttention of a model becomes
hdaf.DeltaMultiheadAttention in place, with w = 0, so the model's outputs do not change."""
import copy
import warnings

import pytest
import torch
from torch import nn

import hdaf

E, H = 16, 4
# torch's own notices about its nested-tensor path, raised by the unconverted references
pytestmark = [pytest.mark.filterwarnings("ignore:enable_nested_tensor is True"),
              pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")]


def padding(B, T, lengths):
    return torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None]


def convert_quietly(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no report expected
        return hdaf.convert_mha(model, **kw)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_outputs_unchanged(dtype, tol, batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=batch_first)
    model = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(E)).to(dtype)
    ref = copy.deepcopy(model)
    names = convert_quietly(model)
    assert names == ["layers.0.self_attn", "layers.1.self_attn"]
    assert all(type(m.self_attn) is hdaf.DeltaMultiheadAttention for m in model.layers)
    assert not model.use_nested_tensor
    B, T = 3, 10
    x = torch.randn((B, T, E) if batch_first else (T, B, E), dtype=dtype)
    pad = padding(B, T, [10, 7, 4])
    valid = ~pad if batch_first else ~pad.T
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    for kw in ({}, {"src_key_padding_mask": pad}, {"mask": causal, "is_causal": True},
               {"mask": causal, "src_key_padding_mask": pad}):
        for train in (True, False):
            model.train(train), ref.train(train)
            torch.testing.assert_close(model(x, **kw), ref(x, **kw), atol=tol, rtol=tol)
            with torch.no_grad():  # inference: ref may take its nested-tensor path (padded rows 0)
                got, want = model(x, **kw), ref(x, **kw)
            torch.testing.assert_close(got[valid], want[valid], atol=tol, rtol=tol)


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_converts_self_attention_and_reports_cross_attention(batch_first):
    torch.manual_seed(0)
    model = nn.Transformer(E, H, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32,
                           dropout=0.0, batch_first=batch_first).double()
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"left 2 nn.MultiheadAttention module\(s\) as they are: "
                                         r"decoder.layers.0.multihead_attn \(cross-attention"):
        names = hdaf.convert_mha(model, max_distance=4)
    assert names == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn",
                     "decoder.layers.0.self_attn", "decoder.layers.1.self_attn"]
    assert all(type(m.multihead_attn) is nn.MultiheadAttention for m in model.decoder.layers)
    B, S, T = 3, 9, 6
    shape = (lambda n: (B, n, E)) if batch_first else (lambda n: (n, B, E))
    src, tgt = torch.randn(shape(S), dtype=torch.float64), torch.randn(shape(T), dtype=torch.float64)
    kw = {"src_key_padding_mask": padding(B, S, [9, 5, 2]),
          "memory_key_padding_mask": padding(B, S, [9, 5, 2]),
          "tgt_key_padding_mask": padding(B, T, [6, 6, 3]),
          "tgt_mask": nn.Transformer.generate_square_subsequent_mask(T).bool(), "tgt_is_causal": True}
    for train in (True, False):
        model.train(train), ref.train(train)
        torch.testing.assert_close(model(src, tgt, **kw), ref(src, tgt, **kw), atol=1e-12, rtol=1e-10)
    # Named in exclude, the cross-attention is left without a warning.
    again = nn.Transformer(E, H, 1, 1, 32, dropout=0.0)
    assert convert_quietly(again, exclude=["decoder.layers.0.multihead_attn"]) == [
        "encoder.layers.0.self_attn", "decoder.layers.0.self_attn"]


def test_vit_b_16():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None).eval()
    model.heads = nn.Identity()  # the random-init classifier is zero: compare the features
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = model(x)
        names = convert_quietly(model)
        got = model(x)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        model.encoder.layers[0].self_attention.rpe.normal_(std=0.1)
        assert (model(x) - want).abs().max() > 1e-3
    assert names == [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(12)]


def test_attention_dropout_is_dropped_with_a_warning():
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 32, batch_first=True), 2,
                                  enable_nested_tensor=False)  # dropout=0.1 everywhere
    ref = copy.deepcopy(model).eval()
    with pytest.warns(UserWarning, match=r"attention-probability dropout p=\[0.1\] set to 0"):
        hdaf.convert_mha(model)
    assert model.layers[0].self_attn.dropout == 0.0 and model.layers[0].dropout.p == 0.1
    x = torch.randn(2, 5, E)
    torch.testing.assert_close(model.eval()(x), ref(x), atol=2e-6, rtol=2e-6)


def test_delta_options_and_training_moves_w():
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True),
                                  2, enable_nested_tensor=False).double()
    ref = copy.deepcopy(model)
    convert_quietly(model, delta_dim=6, max_distance=(2, 3), share_rpe_across_heads=False,
                    window=5, backend="naive")
    attn = model.layers[1].self_attn
    assert attn.rpe.shape == (H, 6, 6) and attn.delta_proj.weight.shape == (6, E)
    x = torch.randn(2, 9, E, dtype=torch.float64)
    # A window changes which keys are visible, so compare a sequence that fits inside it.
    torch.testing.assert_close(model(x[:, :6]), ref(x[:, :6]), atol=1e-12, rtol=1e-10)
    assert attn.last_backend == "naive"
    # A plain model's state_dict still loads (the delta weights keep their values).
    model.load_state_dict(ref.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).pow(2).mean().backward()
    assert attn.rpe.grad.abs().max() > 0
    opt.step()
    assert (model(x[:, :6]) - ref(x[:, :6])).abs().max() > 1e-6


def test_custom_model_with_cross_attention_needs_exclude():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = nn.MultiheadAttention(E, H, batch_first=True)
            self.cross = nn.MultiheadAttention(E, H, batch_first=True)

        def forward(self, x, memory):
            x = x + self.self_attn(x, x, x, need_weights=False)[0]
            return x + self.cross(x, memory, memory, need_weights=False)[0]

    torch.manual_seed(0)
    model = Block()
    ref = copy.deepcopy(model)
    x, memory = torch.randn(2, 5, E), torch.randn(2, 7, E)
    everything = copy.deepcopy(model)
    assert convert_quietly(everything) == ["self_attn", "cross"]
    with pytest.raises(ValueError, match="self-attention: key must be query.*cross-attention.*exclude"):
        everything(x, memory)
    assert convert_quietly(model, exclude=["cross"]) == ["self_attn"]
    torch.testing.assert_close(model(x, memory), ref(x, memory), atol=2e-6, rtol=2e-6)


def test_shared_module_is_converted_once_and_unsupported_ones_are_reported():
    torch.manual_seed(0)
    shared = nn.MultiheadAttention(E, H)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared),
                           "kv": nn.MultiheadAttention(E, H, kdim=8, vdim=8),
                           "bias_kv": nn.MultiheadAttention(E, H, add_bias_kv=True)})
    with pytest.warns(UserWarning, match=r"kv \(cross-attention: kdim=8, vdim=8 differ from "
                                         r"embed_dim=16\); bias_kv \(add_bias_kv=True is not"):
        names = hdaf.convert_mha(model)
    assert names == ["a", "b.0"] and model["a"] is model["b"][0]
    assert type(model["kv"]) is nn.MultiheadAttention
    assert convert_quietly(nn.Sequential(nn.Linear(2, 2))) == []


def test_argument_errors():
    with pytest.raises(TypeError, match="for one module use DeltaMultiheadAttention.from_mha"):
        hdaf.convert_mha(nn.MultiheadAttention(E, H))
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 32), 1, enable_nested_tensor=False)
    with pytest.raises(TypeError, match=r"unknown delta option\(s\) \['max_dist'\]"):
        hdaf.convert_mha(model, max_dist=4)
    with pytest.raises(ValueError, match=r"exclude names no nn.MultiheadAttention .*\['layers.0'\]"):
        hdaf.convert_mha(model, exclude=["layers.0"])
    assert hdaf.nn.convert_mha is hdaf.convert_mha
