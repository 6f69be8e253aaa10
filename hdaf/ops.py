"""The ``hdaf`` custom ops: fake (meta) implementations and autograd.

The schema of ``hdaf::delta_attention_forward`` / ``hdaf::delta_attention_backward`` is defined
once, in C++ (``csrc/delta_attention.cpp``); the CPU kernel (``csrc/cpu``) and the CUDA kernels
(``csrc/cuda``) implement it per dispatch key. The Triton kernels register ops of the same
signature under ``hdaf::triton_delta_attention_*`` (``kernels/delta_attention.py``), and reuse
:func:`register_delta_autograd` and the fake functions below.
"""
from __future__ import annotations

import torch

try:  # the compiled extension registers the schema and its CPU (and CUDA) kernels
    from . import _C  # noqa: F401

    EXTENSION_ERROR = None
except ImportError as exc:  # pragma: no cover - exercised when the build was skipped
    _C = None
    EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fake_forward(q, k, v, P, key_padding_mask, L, U, window_left, window_right, scale):
    B, H, T, _ = q.shape
    out = q.new_empty((B, H, T, v.shape[-1]))
    lse = q.new_empty((B, H, T), dtype=lse_dtype(q.dtype))
    return out, lse


def fake_backward(grad_out, q, k, v, P, key_padding_mask, out, lse, L, U,
                  window_left, window_right, scale):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(P))


def register_delta_autograd(forward_op: str, backward_op: str) -> None:
    """Make ``forward_op`` differentiable by calling ``backward_op`` (same schema family)."""
    backward = None

    def setup_context(ctx, inputs, output):
        q, k, v, P, key_padding_mask, L, U, wl, wr, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, P, key_padding_mask, out, lse)
        ctx.params = (L, U, wl, wr, scale)
        ctx.mark_non_differentiable(lse)

    def backward_fn(ctx, grad_out, _grad_lse):
        nonlocal backward
        if backward is None:
            ns, name = backward_op.split("::")
            backward = getattr(getattr(torch.ops, ns), name).default
        q, k, v, P, key_padding_mask, out, lse = ctx.saved_tensors
        dq, dk, dv, dP = backward(grad_out.contiguous(), q, k, v, P, key_padding_mask, out, lse,
                                  *ctx.params)
        return dq, dk, dv, dP, None, None, None, None, None, None

    torch.library.register_autograd(forward_op, backward_fn, setup_context=setup_context)

    def double_backward(ctx, *grads):
        raise NotImplementedError(f"{backward_op} is not differentiable: hdaf.delta_attention "
                                  "supports first-order gradients only (no double backward)")

    def no_context(ctx, inputs, output):
        pass

    torch.library.register_autograd(backward_op, double_backward, setup_context=no_context)


if _C is not None:
    torch.library.register_fake("hdaf::delta_attention_forward")(fake_forward)
    torch.library.register_fake("hdaf::delta_attention_backward")(fake_backward)
    register_delta_autograd("hdaf::delta_attention_forward", "hdaf::delta_attention_backward")
