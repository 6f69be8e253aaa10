"""Blocks at global positions (docs/delta_attention.md, "Global positions"): the C++ op against
the gather reference, forward and every gradient, for queries before, after and among the keys;
the single-device operator as the special case; blocks merged into the full operator; the
merge's -inf rows; the ops' opcheck; the refusal of the cuda backend."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_close

import hdaf
from hdaf import block, dispatch
from hdaf.reference import delta_projection

DT = torch.float64


def _block_inputs(B=2, H=4, Hkv=2, Tq=5, Tk=7, D=3, R=5, Hp=1, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=DT).requires_grad_(True)

    mask = torch.rand(B, Tk, generator=g) < 0.25
    return (rnd(B, H, Tq, D), rnd(B, Hkv, Tk, D), rnd(B, Hkv, Tk, D), rnd(B, Hp, Tq, R),
            rnd(B, Hp, Tk, R), mask)


# (q_start, k_start, window_left, window_right): queries after, before, among the keys; windows
# narrower than the gap (nothing visible), causal, one-sided
CASES = [(10, 0, -1, -1), (0, 10, -1, -1), (3, 5, 2, 1), (7, 7, -1, 0), (20, 0, -1, 0),
         (0, 3, 4, 4), (30, 0, 3, 3), (2, 0, 0, 6)]


@pytest.mark.parametrize("Hp", [1, 4])
@pytest.mark.parametrize("q_start,k_start,wl,wr", CASES)
def test_cpu_block_matches_the_reference(q_start, k_start, wl, wr, Hp):
    q, k, v, Pq, Pk, mask = _block_inputs(Hp=Hp)
    args = (mask, q_start, k_start, 2, 2, wl, wr, 0.7)
    out, lse = block.block_forward("cpu", q, k, v, Pq, Pk, *args)
    ref, ref_lse = block.block_forward("gather", q, k, v, Pq, Pk, *args)
    assert_close("out", ref, out)
    assert torch.equal(lse.isinf(), ref_lse.isinf())
    assert_close("lse", ref_lse[ref_lse.isfinite()], lse[lse.isfinite()])
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, Pq, Pk), dout)
    want = torch.autograd.grad(ref, (q, k, v, Pq, Pk), dout)
    # the backward given the block's own out and lse is the autograd of its own softmax
    by_op = block.block_backward("gather", dout, q, k, v, Pq, Pk, *args[:1], out.detach(), lse,
                                 *args[1:])
    for name, w, g, b in zip(("q", "k", "v", "P_q", "P_k"), want, got, by_op):
        assert_close(f"d{name}", w, g)
        assert_close(f"d{name} (reference backward)", w, b)


def test_single_device_operator_is_the_end_aligned_block():
    g = torch.Generator().manual_seed(3)
    B, H, Tq, Tk, D, Dr, R = 2, 2, 4, 9, 3, 2, 5
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=DT) for T in (Tq, Tk, Tk))
    x, w = torch.randn(B, Tk, Dr, generator=g, dtype=DT), torch.randn(Dr, R, generator=g, dtype=DT)
    want = hdaf.delta_attention(q, k, v, x, w, window=(3, 1), backend="cpu")
    P = delta_projection(x, w)
    got, _ = block.block_forward("cpu", q, k, v, P[:, :, Tk - Tq:], P, None, Tk - Tq, 0, 2, 2, 3,
                                 1, D ** -0.5)
    assert_close("out", want, got)


@pytest.mark.parametrize("name", ["cpu", "gather"])
def test_blocks_merged_equal_the_full_operator(name):
    """A sequence cut into three key blocks: merged forward and summed per-block backward (with
    the merged out and lse) equal one call, every gradient included; the first block of the
    last rows is fully masked by the window (running lse -inf)."""
    g = torch.Generator().manual_seed(5)
    B, H, T, D, Dr, R, n = 1, 2, 12, 3, 2, 5, 4
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=DT, requires_grad=True)
               for _ in range(3))
    x = torch.randn(B, T, Dr, generator=g, dtype=DT, requires_grad=True)
    w = torch.randn(Dr, R, generator=g, dtype=DT, requires_grad=True)
    kw = dict(window=(5, 0), max_distance=2)
    want = hdaf.delta_attention(q, k, v, x, w, backend="gather", **kw)
    dout = torch.randn(want.shape, generator=g, dtype=DT)
    want_grads = torch.autograd.grad(want, (q, k, v, x, w), dout)
    P = delta_projection(x, w).detach()
    scale, qs = D ** -0.5, slice(8, 12)
    out = lse = None
    blocks = [(slice(j, j + n), j) for j in range(0, T, n)]
    for ks, k0 in blocks:
        o, l = block.block_forward(name, q[:, :, qs], k[:, :, ks], v[:, :, ks], P[:, :, qs],
                                   P[:, :, ks], None, 8, k0, 2, 2, 5, 0, scale)
        out, lse = block.merge_partial(out, lse, o, l)
    assert_close("out", want[:, :, qs], out.to(DT))
    dq = 0
    for ks, k0 in blocks:
        gq, gk, gv, _, _ = block.block_backward(name, dout[:, :, qs], q[:, :, qs], k[:, :, ks],
                                                v[:, :, ks], P[:, :, qs], P[:, :, ks], None,
                                                out.to(DT), lse, 8, k0, 2, 2, 5, 0, scale)
        dq = dq + gq
    assert_close("dq", want_grads[0][:, :, qs], dq)


def test_merge_keeps_rows_without_keys_at_zero():
    out = torch.zeros(1, 1, 2, 3)
    lse = torch.full((1, 1, 2), float("-inf"))
    o, l = block.merge_partial(None, None, out, lse)
    o, l = block.merge_partial(o, l, out, lse)
    assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(l).all()
    o, l = block.merge_partial(o, l, torch.ones(1, 1, 2, 3), torch.tensor([[[0.5, float("-inf")]]]))
    assert torch.equal(o[0, 0, 0], torch.ones(3)) and l[0, 0, 0] == 0.5
    assert torch.equal(o[0, 0, 1], torch.zeros(3)) and torch.isneginf(l[0, 0, 1])


def test_opcheck_block_ops():
    q, k, v, Pq, Pk, mask = (t.detach() for t in _block_inputs(Hp=4))
    fwd = (q, k, v, Pq, Pk, mask, 9, 2, 2, 2, 4, 0, 0.5)
    torch.library.opcheck(torch.ops.hdaf.delta_attention_block_forward, fwd)
    out, lse = torch.ops.hdaf.delta_attention_block_forward(*fwd)
    torch.library.opcheck(torch.ops.hdaf.delta_attention_block_backward,
                          (torch.randn_like(out), q, k, v, Pq, Pk, mask, out, lse, 9, 2, 2, 2, 4,
                           0, 0.5))


def test_block_errors_name_the_argument():
    q, k, v, Pq, Pk, mask = (t.detach() for t in _block_inputs())
    with pytest.raises(RuntimeError, match=r"P_q must be \[B,Hp,Tq,R\]"):
        torch.ops.hdaf.delta_attention_block_forward(q, k, v, Pk, Pk, mask, 0, 0, 2, 2, -1, -1,
                                                     1.0)
    reason = dispatch.feature_reason("cuda", {"offsets": "q_start=8, k_start=0"})
    assert "global positions" in reason and "backend='cuda'" in reason
    with pytest.raises(RuntimeError, match="'cuda' backend runs CUDA tensors"):
        block.resolve_block_backend("cuda", q, v)
    assert block.resolve_block_backend("auto", q, v) == "cpu"
    assert block.resolve_block_backend("naive", q, v) == "gather"
