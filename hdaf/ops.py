"""The ``hdaf`` custom ops: fake (meta) implementations and autograd.

The schemas of ``hdaf::delta_attention_forward`` / ``_backward``, of the packed-batch
``hdaf::delta_attention_varlen_forward`` / ``_backward`` and of the global-position
``hdaf::delta_attention_block_forward`` / ``_backward`` are defined once, in C++
(``csrc/delta_attention.cpp``); the CPU kernel (``csrc/cpu``) implements all six, the CUDA
kernels (``csrc/cuda``) the first four, per dispatch key (the block ops refuse CUDA tensors).
The Triton kernels register ops of the same signatures under ``hdaf::triton_delta_attention_*``
(``kernels/delta_attention.py``: the padded, packed-batch and block ops), and reuse
:func:`register_delta_autograd` / :func:`register_varlen_autograd` /
:func:`register_block_autograd` and the fake functions below.
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
    """q [B,H,Tq,Dk], v [B,Hkv,Tk,Dv] -> out [B,H,Tq,Dv], lse [B,H,Tq]."""
    B, H, Tq, _ = q.shape
    out = q.new_empty((B, H, Tq, v.shape[-1]))
    lse = q.new_empty((B, H, Tq), dtype=lse_dtype(q.dtype))
    return out, lse


def fake_backward(grad_out, q, k, v, P, key_padding_mask, out, lse, L, U,
                  window_left, window_right, scale):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(P))


def fake_varlen_forward(q, k, v, P, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, L, U,
                        window_left, window_right, scale):
    """q [Total_q,H,Dk], v [Total_k,Hkv,Dv] -> out [Total_q,H,Dv], lse [H,Total_q]."""
    Total_q, H, _ = q.shape
    out = q.new_empty((Total_q, H, v.shape[-1]))
    lse = q.new_empty((H, Total_q), dtype=lse_dtype(q.dtype))
    return out, lse


def fake_varlen_backward(grad_out, q, k, v, P, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, out, lse, L, U, window_left, window_right, scale):
    """Gradients of q, k, v, P's shapes, contiguous (whatever the inputs' strides)."""
    dense = torch.contiguous_format
    return tuple(torch.empty_like(t, memory_format=dense) for t in (q, k, v, P))


def fake_block_forward(q, k, v, P_q, P_k, key_padding_mask, q_start, k_start, L, U, window_left,
                       window_right, scale):
    """The block op (global positions): the shapes of :func:`fake_forward`."""
    return fake_forward(q, k, v, P_k, key_padding_mask, L, U, window_left, window_right, scale)


def fake_block_backward(grad_out, q, k, v, P_q, P_k, key_padding_mask, out, lse, q_start,
                        k_start, L, U, window_left, window_right, scale):
    return tuple(torch.empty_like(t) for t in (q, k, v, P_q, P_k))


def _op(qualname: str):
    ns, name = qualname.split("::")
    return getattr(getattr(torch.ops, ns), name).default


def _register_no_double_backward(backward_op: str) -> None:
    def double_backward(ctx, *grads):
        raise NotImplementedError(f"{backward_op} is not differentiable: hdaf.delta_attention "
                                  "supports first-order gradients only (no double backward)")

    def no_context(ctx, inputs, output):
        pass

    torch.library.register_autograd(backward_op, double_backward, setup_context=no_context)


def _register_autograd(forward_op: str, backward_op: str, n_tensors: int, n_grads: int,
                       scalars_before_out: int = 0) -> None:
    """Make ``forward_op`` (its first ``n_tensors`` inputs tensors, the rest scalars; outputs
    ``(out, lse)``) differentiable by calling ``backward_op`` with ``grad_out``, the tensors, the
    first ``scalars_before_out`` scalars, ``out``, ``lse`` and the other scalars; its outputs
    are the gradients of the first ``n_grads`` inputs."""
    backward = None

    def setup_context(ctx, inputs, output):
        out, lse = output
        ctx.save_for_backward(*inputs[:n_tensors], out, lse)
        ctx.scalars = tuple(inputs[n_tensors:])
        ctx.mark_non_differentiable(lse)

    def backward_fn(ctx, grad_out, _grad_lse):
        nonlocal backward
        if backward is None:
            backward = _op(backward_op)
        *tensors, out, lse = ctx.saved_tensors
        before, after = ctx.scalars[:scalars_before_out], ctx.scalars[scalars_before_out:]
        grads = backward(grad_out.contiguous(), *tensors, *before, out, lse, *after)
        return tuple(grads) + (None,) * (n_tensors + len(ctx.scalars) - n_grads)

    torch.library.register_autograd(forward_op, backward_fn, setup_context=setup_context)
    _register_no_double_backward(backward_op)


def register_delta_autograd(forward_op: str, backward_op: str) -> None:
    """Make ``forward_op`` differentiable by calling ``backward_op`` (the
    ``delta_attention_forward/backward`` schemas): gradients of q, k, v, P."""
    _register_autograd(forward_op, backward_op, n_tensors=5, n_grads=4)


def register_block_autograd(forward_op: str, backward_op: str) -> None:
    """Make the block ``forward_op`` (``delta_attention_block_*`` schemas) differentiable through
    its own ``out``: the backward op with that block's ``out`` and ``lse``; gradients of q, k,
    v, P_q, P_k. (A context-parallel ring calls the backward op itself, with the out and lse
    merged over all key blocks.)"""
    _register_autograd(forward_op, backward_op, n_tensors=6, n_grads=5)


def register_varlen_autograd(forward_op: str, backward_op: str) -> None:
    """Make the packed-batch ``forward_op`` differentiable by calling ``backward_op`` (the
    ``delta_attention_varlen_*`` schemas, whose backward takes max_seqlen_q/k before out)."""
    _register_autograd(forward_op, backward_op, n_tensors=6, n_grads=4, scalars_before_out=2)


if _C is not None:
    torch.library.register_fake("hdaf::delta_attention_forward")(fake_forward)
    torch.library.register_fake("hdaf::delta_attention_backward")(fake_backward)
    register_delta_autograd("hdaf::delta_attention_forward", "hdaf::delta_attention_backward")
    torch.library.register_fake("hdaf::delta_attention_varlen_forward")(fake_varlen_forward)
    torch.library.register_fake("hdaf::delta_attention_varlen_backward")(fake_varlen_backward)
    register_varlen_autograd("hdaf::delta_attention_varlen_forward",
                             "hdaf::delta_attention_varlen_backward")
    torch.library.register_fake("hdaf::delta_attention_block_forward")(fake_block_forward)
    torch.library.register_fake("hdaf::delta_attention_block_backward")(fake_block_backward)
    register_block_autograd("hdaf::delta_attention_block_forward",
                            "hdaf::delta_attention_block_backward")
