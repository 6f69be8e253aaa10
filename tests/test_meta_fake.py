"""Meta and fake tensors: shapes without compute, for the public functions and the layers
(docs/delta_attention.md, "Non-finite values and edge cases")."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import hdaf


def _dense(device, B=2, H=4, Hkv=2, Tq=7, Tk=10, Dk=8, Dv=6, Dr=3, R=5):
    g = dict(device=device)
    return (torch.randn(B, H, Tq, Dk, requires_grad=True, **g), torch.randn(B, Hkv, Tk, Dk, **g),
            torch.randn(B, Hkv, Tk, Dv, **g), torch.randn(B, Tk, Dr, **g), torch.randn(Dr, R, **g))


def _packed(device):
    g = dict(device=device)
    cu_q = torch.tensor([0, 3, 8], dtype=torch.int32, **g)
    cu_k = torch.tensor([0, 5, 12], dtype=torch.int32, **g)
    return (torch.randn(8, 4, 8, requires_grad=True, **g), torch.randn(12, 2, 8, **g),
            torch.randn(12, 2, 6, **g), torch.randn(12, 3, **g), torch.randn(3, 5, **g),
            cu_q, cu_k, 5, 7)


@pytest.mark.parametrize("backend", ["auto", "naive", "gather", "cpu", "triton", "cuda"])
def test_meta_tensors_give_shapes_without_warning(backend):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "falls back to gather" warning
        mask = torch.zeros(2, 10, dtype=torch.bool, device="meta")
        out = hdaf.delta_attention(*_dense("meta"), causal=True, window=3, key_padding_mask=mask,
                                   backend=backend)
        assert out.device.type == "meta" and out.shape == (2, 4, 7, 6)
        out.sum().backward()  # the fake backward gives the gradients' shapes
        packed = _packed("meta")
        out = hdaf.delta_attention_varlen(*packed, backend=backend)
        assert out.device.type == "meta" and out.shape == (8, 4, 6)
        out.sum().backward()
        assert packed[0].grad.shape == packed[0].shape


def test_meta_tensors_still_check_arguments():
    q, k, v, x, w = _dense("meta")
    with pytest.raises(ValueError, match="Tq <= Tk"):
        hdaf.delta_attention(torch.randn(2, 4, 11, 8, device="meta"), k, v, x, w)
    with pytest.raises(ValueError, match="backend must be one of"):
        hdaf.delta_attention(q, k, v, x, w, backend="bogus")


def test_fake_tensor_mode():
    with FakeTensorMode():
        out = hdaf.delta_attention(*_dense("cpu"), causal=True)
        assert out.shape == (2, 4, 7, 6)
        out = hdaf.delta_attention_varlen(*_packed("cpu"))  # cu_seqlens values are not read
        assert out.shape == (8, 4, 6)
        layer = hdaf.DeltaAttention(16, 4, max_distance=2)
        assert layer(torch.randn(2, 9, 16)).shape == (2, 9, 16)


@pytest.mark.parametrize("cls", ["DeltaAttention", "DeltaMultiheadAttention"])
def test_layer_built_on_meta_materialises_with_to_empty(cls):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.device("meta"):
            model = torch.nn.Sequential(getattr(hdaf, cls)(16, 4, max_distance=2, batch_first=True),
                                        torch.nn.LayerNorm(16))
        x = torch.randn(2, 9, 16, device="meta")
        out = model(x) if cls == "DeltaAttention" else model[1](model[0](x, x, x, need_weights=False)[0])
        assert out.device.type == "meta" and out.shape == (2, 9, 16)
        assert model[0].last_backend == "fake"
    model = model.to_empty(device="cpu")
    with torch.no_grad():  # to_empty leaves whatever memory held: make that deterministic
        for p in model.parameters():
            p.fill_(float("nan"))
    model[0].reset_parameters()  # every parameter, as construction initialises it
    model[1].reset_parameters()
    x = torch.randn(2, 9, 16)
    out = model(x) if cls == "DeltaAttention" else model[1](model[0](x, x, x, need_weights=False)[0])
    assert torch.isfinite(out).all() and model[0].last_backend == "cpu"
    out.sum().backward()
