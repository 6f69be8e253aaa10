"""Shared test helpers: inputs for the operator, dtype-tied tolerances, one device helper."""
from __future__ import annotations

import os

import torch

# Triton's interpreter must be switched on before triton.language is first imported, and
# `import hdaf` imports it (through torch._dynamo): without a GPU, the Triton tests run the
# kernels on CPU tensors under the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import hdaf  # noqa: E402,F401

# Tolerances tied to dtype (absolute and relative), for outputs and gradients of O(1) size.
TOL = {
    torch.float64: dict(atol=1e-9, rtol=1e-7),
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, dtype: torch.dtype = None):
    dtype = dtype or got.dtype
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    torch.testing.assert_close(got.to(ref.dtype), ref, msg=lambda m: f"{name}: {m}", **TOL[dtype])


def make_inputs(B=2, H=3, T=7, Dk=8, Dv=None, Dr=5, R=7, per_head_x=False, per_head_w=False,
                dtype=torch.float64, device="cpu", pad_lengths=None, seed=0, requires_grad=True):
    """Random operator inputs. pad_lengths: per-batch count of real tokens (rest padded)."""
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or Dk

    def rnd(*shape):
        t = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
        return t.requires_grad_(requires_grad)

    q, k, v = rnd(B, H, T, Dk), rnd(B, H, T, Dk), rnd(B, H, T, Dv)
    x = rnd(B, H, T, Dr) if per_head_x else rnd(B, T, Dr)
    w = rnd(H, Dr, R) if per_head_w else rnd(Dr, R)
    mask = None
    if pad_lengths is not None:
        pos = torch.arange(T)
        mask = (pos[None, :] >= torch.tensor(pad_lengths)[:, None]).to(device)
    return q, k, v, x, w, mask


def grads(out: torch.Tensor, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(out, inputs, dout.to(out.device), allow_unused=False)


GRAD_NAMES = ("q", "k", "v", "x", "w")


def device_for_tests() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
