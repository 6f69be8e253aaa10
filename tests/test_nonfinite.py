"""Non-finite values and edge cases (docs/delta_attention.md, "Non-finite values and edge
cases"), one named test per disagreement between backends that tests/test_fuzz_backends.py
found, on every backend available here."""
from __future__ import annotations

import pytest
import torch

import hdaf
from conftest import GRAD_NAMES, TOL
from hdaf.dispatch import unavailable_reason

NAN, INF = float("nan"), float("inf")
BACKENDS = [b for b in ("naive", "gather", "cpu", "triton")
            if unavailable_reason(b, torch.device("cpu")) is None]


def _inputs(dtype, B=2, H=2, T=40, Dk=4, Dv=3, Dr=3, R=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
            for s in ((B, H, T, Dk), (B, H, T, Dk), (B, H, T, Dv), (B, T, Dr), (Dr, R))]


def _dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64  # Triton has no float64


def _run(backend, inputs, **kw):
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = hdaf.delta_attention(*leaves, backend=backend, **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64).to(out.dtype)
    return out.detach(), dict(zip(GRAD_NAMES, torch.autograd.grad(out, leaves, dout)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_query_row_is_nan_not_zero(backend):
    """A NaN logit makes its row NaN: the CPU kernel's row maximum used to skip NaN, so the row
    looked fully masked and came out 0 (its gradients too), hiding the NaN."""
    inputs = _inputs(_dtype(backend))
    inputs[0][0, 1, 7, 2] = NAN
    out, g = _run(backend, inputs)
    assert torch.isnan(out[0, 1, 7]).all()
    assert torch.isfinite(out[0, 0]).all() and torch.isfinite(out[1]).all()
    assert torch.isfinite(out[0, 1, :7]).all() and torch.isfinite(out[0, 1, 8:]).all()
    assert torch.isnan(g["q"][0, 1, 7]).all() and torch.isfinite(g["q"][1]).all()
    assert torch.isnan(g["v"][0, 1]).any() and torch.isfinite(g["v"][1]).all()


def test_online_softmax_lse_of_a_nan_score_is_nan():
    """The shared online-softmax header (CPU and CUDA kernels): a NaN score gives a NaN lse,
    not the -inf of a fully masked row."""
    scores = torch.zeros(2, 9, dtype=torch.float64)
    scores[0, 4] = NAN
    visible = torch.ones(2, 9, dtype=torch.bool)
    lse = torch.ops.hdaf._common_online_lse(scores, visible, 4)
    assert torch.isnan(lse[0]) and torch.isfinite(lse[1])


@pytest.mark.parametrize("value", [NAN, INF])
@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_keys_never_matter(backend, value):
    """k and v at padding keys: the kernels multiplied whole tiles (0·NaN = NaN), so a NaN or
    Inf there made every output of the batch element NaN; the references' gradients took it
    too (dk of padding keys, through q @ kᵀ's backward). Now nothing changes and dk = dv = 0
    there."""
    dtype = _dtype(backend)
    inputs = _inputs(dtype)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, 30:] = True
    mask[1, 5:8] = True  # a hole
    ref_out, ref_g = _run(backend, inputs, key_padding_mask=mask)
    dirty = [t.clone() for t in inputs]
    for t in dirty[1:3]:
        t[0, :, 33] = value
        t[1, :, 6] = value
    out, g = _run(backend, dirty, key_padding_mask=mask)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    for name in GRAD_NAMES:
        torch.testing.assert_close(g[name], ref_g[name], **TOL[dtype], msg=name)
    assert (g["k"][0, :, 30:] == 0).all() and (g["v"][1, :, 5:8] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_row_stays_zero_with_nan_query(backend):
    """A query that sees no key (window (0, 1) over two padding keys) outputs 0 and passes no
    gradient, whatever its q holds: the references multiplied its NaN q by zero dlogits into
    every dk (0·NaN)."""
    dtype = _dtype(backend)
    inputs = _inputs(dtype)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[1, 10:12] = True
    kw = dict(key_padding_mask=mask, window=(0, 1))
    ref_out, ref_g = _run(backend, inputs, **kw)
    inputs[0][1, :, 10] = NAN
    out, g = _run(backend, inputs, **kw)
    assert (out[1, :, 10] == 0).all() and (g["q"][1, :, 10] == 0).all()
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    for name in GRAD_NAMES:
        torch.testing.assert_close(g[name], ref_g[name], **TOL[dtype], msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_x_rows_in_no_visible_pair_never_matter(backend):
    """x at a padding key whose own query sees nothing (here: the whole batch element 1 is
    padding from position 20 on, and those queries see only padding under window (0, 3)):
    dw = xᵀ·dP multiplied the NaN row by its zero dP row."""
    dtype = _dtype(backend)
    inputs = _inputs(dtype)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[1, 20:] = True
    kw = dict(key_padding_mask=mask, window=(0, 3))
    ref_out, ref_g = _run(backend, inputs, **kw)
    inputs[3][1, 30] = NAN
    out, g = _run(backend, inputs, **kw)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    for name in GRAD_NAMES:
        torch.testing.assert_close(g[name], ref_g[name], **TOL[dtype], msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["B=0", "Dk=0", "Dv=0", "Dr=0", "scale=0", "expanded_xw"])
def test_edge_cases_match_naive(backend, case):
    dtype = _dtype(backend)
    shape = dict(B=0) if case == "B=0" else dict(Dk=0) if case == "Dk=0" else (
        dict(Dv=0) if case == "Dv=0" else dict(Dr=0) if case == "Dr=0" else {})
    inputs = _inputs(dtype, T=9, **shape)
    kw = dict(scale=0.0) if case == "scale=0" else {}
    if case == "expanded_xw":  # stride-0 per-head x and w, gradients summed over the heads
        x0, w0 = inputs[3], inputs[4]
        leaves = [t.clone().requires_grad_() for t in inputs]
        args = leaves[:3] + [leaves[3][:, None].expand(2, 2, 9, 3), leaves[4][None].expand(2, 3, 5)]
        out = hdaf.delta_attention(*args, backend=backend)
        out.sum().backward()
        ref = [t.detach().double().requires_grad_() for t in (*inputs[:3], x0, w0)]
        ref_out = hdaf.delta_attention(*ref, backend="naive")
        ref_out.sum().backward()
        torch.testing.assert_close(out.double(), ref_out, **TOL[dtype])
        for a, b in zip(leaves, ref):
            torch.testing.assert_close(a.grad.double(), b.grad, **TOL[dtype])
        return
    out, g = _run(backend, inputs, **kw)
    ref_out, ref_g = _run("naive", [t.double() for t in inputs], **kw)
    assert out.shape == ref_out.shape
    torch.testing.assert_close(out.double(), ref_out, **TOL[dtype])
    for name in GRAD_NAMES:
        torch.testing.assert_close(g[name].double(), ref_g[name], **TOL[dtype], msg=name)
    if case == "scale=0":
        for name in ("q", "k", "x", "w"):
            assert (g[name] == 0).all(), name


def _triton_case(case):
    dtype = torch.float32
    if case == "nan_row_reaches_unused_dw_column":  # one pair, bucket 0 of R = 2
        inputs = _inputs(dtype, B=1, H=1, T=1, Dk=1, Dv=1, Dr=1, R=2)
        inputs[0][0, 0, 0, 0] = NAN
        return inputs, dict(max_distance=(0, 1))
    if case == "nan_in_unused_far_column_reaches_dq":  # one pair, bucket 1 of R = 2
        inputs = _inputs(dtype, B=1, H=1, T=1, Dk=1, Dv=1, Dr=1, R=2)
        inputs[4][0, 0] = NAN
        return inputs, dict(max_distance=(1, 0))
    # x at a padding hole (a padding key between real ones) whose query is live: only that
    # query's row may be NaN; the kernels read P there as a key (0·NaN) for every row
    inputs = _inputs(dtype)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[1, 5:8] = True
    inputs[3][1, 6] = NAN
    return inputs, dict(key_padding_mask=mask)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton (or its interpreter) not available")
@pytest.mark.parametrize("case", [
    "nan_row_reaches_unused_dw_column",
    "nan_in_unused_far_column_reaches_dq",
    "padding_x_row_reaches_other_rows"])
def test_triton_known_disagreements(case):
    """Reproducers of what the fuzzer found in the Triton kernels: each asserts the spec (the
    non-finite set of the naive reference, which follows it here)."""
    inputs, kw = _triton_case(case)
    out, g = _run("triton", inputs, **kw)
    ref_out, ref_g = _run("naive", [t.double() for t in inputs], **kw)
    got, ref = {"nan_row_reaches_unused_dw_column": (g["w"], ref_g["w"]),
                "nan_in_unused_far_column_reaches_dq": (g["q"], ref_g["q"]),
                "padding_x_row_reaches_other_rows": (out, ref_out)}[case]
    assert torch.equal(torch.isfinite(got), torch.isfinite(ref))


@pytest.mark.parametrize("name", ["q", "k", "v", "x"])
@pytest.mark.parametrize("backend", [b for b in ("naive", "gather", "cpu") if b in BACKENDS])
def test_packed_sequences_are_independent_under_nan(backend, name):
    """A NaN in one sequence of a packed batch stays in it: the naive reference's one
    block-diagonal attention multiplied it by the zero probabilities of the other sequences
    (0·NaN) in its forward (v) and backward (q, k)."""
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    shapes = {"q": (12, 2, 4), "k": (12, 2, 4), "v": (12, 2, 3), "x": (12, 3), "w": (3, 5)}
    inputs = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    inputs[name][2] = NAN  # a row of sequence 0
    leaves = [inputs[n].requires_grad_() for n in "qkvxw"]
    out = hdaf.delta_attention_varlen(*leaves, cu, cu, 7, 7, backend=backend)
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    assert torch.isnan(out[:5]).any()
    assert torch.isfinite(out[5:]).all()
    for n, t in zip("qkvx", grads[:4]):
        assert torch.isfinite(t[5:]).all(), n


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton (or its interpreter) not available")
@pytest.mark.parametrize("T", [5, 70])
@pytest.mark.parametrize("max_distance", [(0, 1), (2, 2), (1, 4)])
@pytest.mark.parametrize("name", ["q", "k", "x"])
@pytest.mark.parametrize("row", ["first", "last"])
def test_triton_nan_row_reaches_only_its_pairs_buckets(T, max_distance, name, row):
    """A NaN in one row of q, k or x: the Triton backward's band tiles took dS of the partners
    past the end of the sequence (NaN·0 in q·k) into the clipped sums and the dP buffer, so dw
    columns of buckets no real pair of that row uses came out NaN (the last query row, whose
    forward offsets all point past the end, showed it for every window)."""
    R = sum(max_distance) + 1
    inputs = _inputs(torch.float32, B=1, H=1, T=T, Dk=4, Dv=3, Dr=2, R=R)
    i = 0 if row == "first" else T - 1
    target = {"q": inputs[0][0, 0, i], "k": inputs[1][0, 0, i], "x": inputs[3][0, i]}[name]
    target[0] = NAN
    out, g = _run("triton", inputs, max_distance=max_distance)
    ref_out, ref_g = _run("naive", [t.double() for t in inputs], max_distance=max_distance)
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref_out))
    for key in GRAD_NAMES:
        assert torch.equal(torch.isfinite(g[key]), torch.isfinite(ref_g[key])), key
