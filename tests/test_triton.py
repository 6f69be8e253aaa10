"""The Triton kernels (kernels/delta_attention.py) against the float64 "naive" oracle.

Without a CUDA GPU the kernels run on CPU tensors under the Triton interpreter, which must be
switched on (``TRITON_INTERPRET=1``) before ``triton.language`` is first imported — and
``import hdaf`` imports it (through ``torch._dynamo``). This module sets the variable at its top;
when that came too late (conftest.py imported hdaf first), the whole module is re-run in a fresh
process started with the variable (``test_suite_in_a_fresh_interpreter_process``). Setting
``TRITON_INTERPRET=1`` at the top of conftest.py, or in the environment, avoids the second
process. The interpreter is slow, so those tests use small B, H, D, T, mostly float32.

Accuracy rule (per output / gradient): it passes when it is within ``conftest.TOL[dtype]`` of the
float64 reference, or else — the flash-attention rule — when its max error against the float64
reference is at most twice the error of the same-dtype PyTorch implementation (the "naive"
reference run in that dtype) plus the rounding error of storing the exact result in that dtype.

The tests marked ``requires_cuda`` run the compiled kernels on a GPU (float16 / bfloat16 /
float32, T up to 8192) and are skipped elsewhere.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Must happen before the kernels module is imported (@triton.jit reads it at definition).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import itertools  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (e.g. the CPU build of torch)")

import triton  # noqa: E402

import hdaf  # noqa: E402
import hdaf.functional  # noqa: E402
import hdaf.reference  # noqa: E402
from conftest import TOL, assert_close, grads, make_inputs, requires_cuda  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Without a GPU the interpreter must be on before triton.language is first imported, and
# `import hdaf` (in conftest.py) already imports it through torch._dynamo. If this module came
# too late, every test here is run instead in a fresh process that starts with
# TRITON_INTERPRET=1 (test_suite_in_a_fresh_interpreter_process); setting the variable at the
# top of conftest.py, or in the environment, avoids that second process.
KERNELS_ERROR = None
try:
    from hdaf.kernels import delta_attention as K  # noqa: E402
except ImportError as exc:
    K = None
    KERNELS_ERROR = f"{type(exc).__name__}: {exc}"
    if ON_GPU or os.environ.get("HDAF_TRITON_SUBPROCESS") == "1":
        pytest.fail(f"the Triton kernels failed to import: {KERNELS_ERROR}", pytrace=False)
else:
    if not ON_GPU and not K.INTERPRET:
        KERNELS_ERROR = ("hdaf.kernels.delta_attention was imported before TRITON_INTERPRET=1 "
                         "was set")


@pytest.fixture(autouse=True)
def _kernels_usable_in_this_process(request):
    here = request.node.name == "test_suite_in_a_fresh_interpreter_process"
    if KERNELS_ERROR is not None and not here:
        pytest.skip(f"run by test_suite_in_a_fresh_interpreter_process ({KERNELS_ERROR})")


def test_suite_in_a_fresh_interpreter_process():
    if KERNELS_ERROR is None:
        pytest.skip("the Triton kernels run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1", HDAF_TRITON_SUBPROCESS="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          os.path.abspath(__file__)], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-8000:] + res.stderr[-2000:]
    assert " passed" in res.stdout, res.stdout[-3000:]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def check(name, ref64, got, same_dtype_torch, dtype):
    """TOL[dtype] against the float64 reference, else the flash-attention rule (module doc)."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    got64 = got.detach().double()
    if torch.allclose(got64, ref64, **TOL[dtype]):
        return
    err = (got64 - ref64).abs().max().item()
    torch_err = (same_dtype_torch.detach().double() - ref64).abs().max().item()
    quant = (ref64.to(dtype).double() - ref64).abs().max().item()
    assert err <= 2 * torch_err + quant, (
        f"{name}: max error {err:.3e} vs the float64 reference exceeds TOL[{dtype}] and twice "
        f"the same-dtype PyTorch error {torch_err:.3e} (+ rounding {quant:.3e})")


def run_all(dtype, *, B, H, T, Dk, Dv=None, Dr=3, L=2, U=2, window=None, causal=False,
            mask=None, pad_lengths=None, per_head_x=False, per_head_w=False, seed=0,
            reference="naive"):
    """Forward + all five gradients for triton, the float64 reference and the dtype reference."""
    R = L + U + 1
    q, k, v, x, w, m = make_inputs(B=B, H=H, T=T, Dk=Dk, Dv=Dv, Dr=Dr, R=R, per_head_x=per_head_x,
                                   per_head_w=per_head_w, dtype=torch.float64, device=DEVICE,
                                   pad_lengths=pad_lengths, seed=seed, requires_grad=False)
    if isinstance(mask, torch.Tensor):
        m = mask.to(DEVICE)
    kw = dict(max_distance=(L, U), window=window, causal=causal, key_padding_mask=m)

    def fwd_bwd(d, backend):
        inputs = [t.to(d).requires_grad_() for t in (q, k, v, x, w)]
        out = hdaf.delta_attention(*inputs, backend=backend, **kw)
        return [out.detach()] + [g.detach() for g in grads(out, inputs, seed=seed + 1)]

    got = fwd_bwd(dtype, "triton")
    ref64 = fwd_bwd(torch.float64, reference)
    lo = fwd_bwd(dtype, reference)
    return got, ref64, lo, m


NAMES = ("out", "dq", "dk", "dv", "dx", "dw")


def check_all(got, ref64, lo, dtype, tag=""):
    for name, a, b, c in zip(NAMES, got, ref64, lo):
        check(f"{tag}{name}", b, a, c, dtype)


# ----------------------------------------------------------------------------------------------
# interpreter (or GPU) float32: forward and the five gradients against the naive oracle
# ----------------------------------------------------------------------------------------------

def _lead_pad(B, T, n):
    """batch 0: the first n keys are padding; batch 1 (if any): every key is padding."""
    m = torch.zeros(B, T, dtype=torch.bool)
    m[0, :n] = True
    if B > 1:
        m[1:] = True
    return m


CASES = {
    # T = 1: every pair in one (clipped) bucket
    "T1": dict(B=2, H=2, T=1, Dk=8, L=3, U=3),
    "T7_plain": dict(B=2, H=2, T=7, Dk=8, L=2, U=2),
    # causal, per-head x, asymmetric buckets, Dk != Dv
    "T7_causal_phx_asym_dkdv": dict(B=2, H=2, T=7, Dk=4, Dv=12, L=4, U=1, causal=True,
                                    per_head_x=True),
    # R = 1 (L = U = 0): both clipped buckets are column 0; per-head w
    "T7_R1_window_phw": dict(B=1, H=2, T=7, Dk=8, L=0, U=0, window=(2, 1), per_head_w=True),
    # the paper preset with causal: only j == i visible; padded queries get empty rows
    "T7_paper_causal_pad": dict(B=2, H=2, T=7, Dk=8, L=0, U=3, window=(0, 3), causal=True,
                                pad_lengths=[5, 7]),
    # sliding window, asymmetric buckets, per-head w, a batch element whose every key is padding
    "T63_window_pad_allpad": dict(B=2, H=1, T=63, Dk=16, Dv=8, L=2, U=6, window=(5, 3),
                                  per_head_w=True, pad_lengths=[63, 0]),
    # causal + window + leading padding: queries 0..11 of batch 0 see no key; batch 1 all padding
    "T63_causal_window_leadpad_phxw": dict(B=2, H=2, T=63, Dk=8, Dv=4, L=4, U=4, window=9,
                                           causal=True, mask=_lead_pad(2, 63, 12),
                                           per_head_x=True, per_head_w=True),
    # unbounded band over 4x4 tiles; tiles whose pairs sit one offset inside the clip limits
    # (j-i = U-1 or -L+1 at a tile corner, with 16x16 tiles) and fully clipped tiles; padding
    "T63_full_pad": dict(B=1, H=2, T=63, Dk=8, L=2, U=18, pad_lengths=[50]),
    # one-sided window (future only) with L = 0
    "T40_future_window": dict(B=1, H=1, T=40, Dk=8, Dv=16, L=0, U=5, window=(0, 17)),
    # head dims at the limit, not powers of two
    "T7_headdim_128_100": dict(B=1, H=1, T=7, Dk=128, Dv=100, L=2, U=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_float32_forward_and_grads_match_naive(case):
    params = dict(CASES[case])
    got, ref64, lo, mask = run_all(torch.float32, **params)
    check_all(got, ref64, lo, torch.float32, tag=f"{case}: ")

    # rows with no visible key: output exactly 0 and no gradient to their query
    T = params["T"]
    window = hdaf.functional._pair("window", params.get("window"))
    Wl, Wr = (-1, -1) if window is None else window
    if params.get("causal"):
        Wr = 0 if Wr < 0 else min(Wr, 0)
    lo_, hi_ = (-(T - 1) if Wl < 0 else -Wl), ((T - 1) if Wr < 0 else Wr)
    vis = hdaf.reference.visibility(T, lo_, hi_, mask, DEVICE)  # [B or 1,1,T,T]
    empty = ~vis.any(-1)  # [B or 1,1,T]
    empty = empty.expand(got[0].shape[0], got[0].shape[1], T)
    if case in ("T7_paper_causal_pad", "T63_window_pad_allpad", "T63_causal_window_leadpad_phxw"):
        assert empty.any(), f"{case} is meant to have fully masked rows"
    if empty.any():
        assert (got[0][empty] == 0).all(), f"{case}: fully masked rows must give 0"
        assert (got[1][empty] == 0).all(), f"{case}: fully masked rows must give dq = 0"


def _tile_kinds(T, L, U, lo, hi, block_q, block_k):
    """Which tile kinds (far-low, band, far-high) a program walk meets: the same classification
    as the kernels (far-low: every pair j - i <= -L; far-high: every pair j - i >= U)."""
    kinds = set()
    for m0 in range(0, T, block_q):
        for n0 in range(0, T, block_k):
            d_min, d_max = n0 - (m0 + block_q - 1), n0 + block_k - 1 - m0
            if d_max < lo or d_min > hi:
                continue  # outside the window: skipped
            kinds.add("far_lo" if d_max <= -L else "far_hi" if d_min >= U else "band")
    return kinds


def _interior_pad(B, T):
    """batch 0: keys 20..29 and the last 9 keys are padding (a hole); batch 1: none."""
    m = torch.zeros(B, T, dtype=torch.bool)
    m[0, 20:30] = True
    m[0, T - 9:] = True
    return m


SPLIT_CASES = {
    # no window: far-low and far-high tiles on both sides of the band, padding with a hole
    "T100_far_both_sides_holepad_phx": dict(B=2, H=2, T=100, Dk=8, Dv=12, L=3, U=10,
                                            mask=_interior_pad(2, 100), per_head_x=True),
    # causal with a window reaching past the clip limit L; per-head w; leading padding
    "T90_causal_window_leadpad_phw": dict(B=2, H=1, T=90, Dk=8, L=6, U=2, window=(40, 0),
                                          causal=True, mask=_lead_pad(2, 90, 5), per_head_w=True),
    # R = 1: both far kinds clip to the one bucket
    "T70_R1_window": dict(B=1, H=2, T=70, Dk=8, L=0, U=0, window=(30, 25)),
}
TILE_SHAPES = [(16, 16), (32, 16), (16, 32), (32, 32)]


@pytest.mark.parametrize("tiles", TILE_SHAPES, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_far_and_band_tiles_match_naive_for_several_tile_shapes(case, tiles):
    """The far-low / band / far-high split of all three kernels, for several tile shapes (forced
    instead of autotuned), forward and five gradients against the float64 oracle."""
    params = dict(SPLIT_CASES[case])
    bm, bn = tiles
    T, L, U = params["T"], params["L"], params["U"]
    Wl, Wr = params.get("window") or (T, T)
    if params.get("causal"):
        Wr = min(Wr, 0)
    kinds = _tile_kinds(T, L, U, -Wl, Wr, bm, bn)  # the same tiles for every kernel's walk
    assert kinds >= ({"band", "far_lo", "far_hi"} if Wr > U + bm + bn else {"band", "far_lo"})
    with K.forced_configs(fwd=(bm, bn, 1, 1), dkdv=(bm, bn, 1, 1), dq=(bm, bn, 1, 1)):
        got, ref64, lo, _ = run_all(torch.float32, **params)
    check_all(got, ref64, lo, torch.float32, tag=f"{case} {bm}x{bn}: ")


def test_key_span_of_padding_masks():
    m = torch.tensor([[True, False, True, False, True],
                      [True, True, True, True, True],
                      [False, False, False, False, False]])
    assert K._key_span(m).tolist() == [[1, 4], [0, 0], [0, 5]]
    assert K._key_span(m).dtype == torch.int32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_smoke(dtype):
    """float16 / bfloat16 inputs (the interpreter widens bfloat16 tl.dot operands to float32)."""
    got, ref64, lo, _ = run_all(dtype, B=1, H=2, T=20, Dk=8, L=2, U=2, window=(6, 3),
                                pad_lengths=[14])
    check_all(got, ref64, lo, dtype)
    for t, r in zip(got, ref64):
        assert t.dtype == dtype


def test_layer_with_triton_backend_matches_naive():
    """hdaf.DeltaAttention(backend="triton"): output, input and parameter gradients."""
    import copy

    torch.manual_seed(0)
    layer = hdaf.DeltaAttention(32, 2, max_distance=(3, 2), window=(5, 2), delta_dim=6,
                                backend="triton").to(DEVICE)
    x = torch.randn(2, 20, 32, device=DEVICE)
    mask = torch.arange(20, device=DEVICE)[None, :] >= torch.tensor([20, 13], device=DEVICE)[:, None]

    def run(mod, dtype, backend):
        mod = copy.deepcopy(mod).to(dtype)
        mod.backend = backend
        xi = x.to(dtype).requires_grad_()
        out = mod(xi, key_padding_mask=mask)
        params = [xi] + list(mod.parameters())
        return [out.detach()] + [g.detach() for g in grads(out, params)], mod

    got, mod = run(layer, torch.float32, "triton")
    assert mod.last_backend == "triton"
    ref64, _ = run(layer, torch.float64, "naive")
    lo, _ = run(layer, torch.float32, "naive")
    names = ["out", "dx"] + [f"d{n}" for n, _ in layer.named_parameters()]
    for name, a, b, c in zip(names, got, ref64, lo):
        check(f"layer {name}", b, a, c, torch.float32)


def test_op_outputs_lse_and_empty_rows():
    """The op itself: lse against a float64 logsumexp, -inf (and out = 0) for empty rows."""
    B, H, T, L, U, scale = 2, 2, 9, 2, 3, 0.37
    q, k, v, x, w, _ = make_inputs(B=B, H=H, T=T, Dk=8, Dv=6, R=L + U + 1, dtype=torch.float64,
                                   requires_grad=False)
    mask = _lead_pad(B, T, 3)
    P = hdaf.reference.delta_projection(x, w)
    f32 = [t.float().to(DEVICE) for t in (q, k, v, P)]
    out, lse = torch.ops.hdaf.triton_delta_attention_forward(*f32, mask.to(DEVICE), L, U, 4, 0,
                                                             scale)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == (B, H, T, 6) and lse.shape == (B, H, T)
    r = hdaf.reference.relative_buckets(T, L, U, "cpu")
    idx = r.expand(B, 1, T, T)
    bias = torch.gather(P.transpose(-1, -2), -2, idx) - torch.gather(P, -1, idx)
    logits = scale * (q @ k.transpose(-1, -2) + bias)
    vis = hdaf.reference.visibility(T, -4, 0, mask, "cpu")
    ref_lse = torch.logsumexp(logits.masked_fill(~vis, float("-inf")), -1)
    empty = torch.isinf(ref_lse)
    assert empty[0, :, :3].all() and empty[1].all() and not empty[0, :, 3:].any()
    lse = lse.cpu().double()
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] < 0).all()
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], **TOL[torch.float32])
    assert (out.cpu()[empty] == 0).all()


def test_non_contiguous_op_inputs_and_shared_P_broadcast():
    """Strided inputs go to the kernels as they are (no copies needed) and give the same result."""
    B, H, T, L, U = 1, 2, 10, 2, 2
    q, k, v, x, w, mask = make_inputs(B=B, H=H, T=T, Dk=8, R=L + U + 1, dtype=torch.float32,
                                      device=DEVICE, pad_lengths=[8], requires_grad=False)
    P = hdaf.reference.delta_projection(x, w)  # [B,1,T,R]
    args = (mask, L, U, -1, 3, 0.3)
    out, lse = torch.ops.hdaf.triton_delta_attention_forward(q, k, v, P, *args)

    def strided(t):
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)

    qs, ks, vs, Ps = (strided(t) for t in (q, k, v, P))
    assert not qs.is_contiguous() and not Ps.is_contiguous()
    out2, lse2 = torch.ops.hdaf.triton_delta_attention_forward(qs, ks, vs, Ps, *args)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    torch.testing.assert_close(lse2, lse, rtol=0, atol=0)
    g = torch.randn_like(out)
    grads_c = torch.ops.hdaf.triton_delta_attention_backward(g, q, k, v, P, mask, out, lse,
                                                             L, U, -1, 3, 0.3)
    grads_s = torch.ops.hdaf.triton_delta_attention_backward(strided(g), qs, ks, vs, Ps, mask,
                                                             strided(out), lse, L, U, -1, 3, 0.3)
    for a, b in zip(grads_c, grads_s):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert grads_c[3].shape == P.shape


def test_backward_reuses_key_columns_only_for_unchanged_inputs():
    """The forward's KCOL serves the backward of the same P, mask and scale; a P changed in
    place, another mask or another scale gets KCOL built afresh (results stay exact)."""
    q, k, v, x, w, mask = make_inputs(B=1, H=2, T=9, Dk=8, R=5, dtype=torch.float32,
                                      device=DEVICE, pad_lengths=[7])
    P = torch.randn(1, 1, 9, 5, device=DEVICE, requires_grad=True)
    op, op_bwd = K.triton_delta_attention_forward, K.triton_delta_attention_backward
    out, lse = op(q, k, v, P, mask, 2, 2, -1, -1, 0.3)
    with torch.no_grad():
        P.mul_(-1.5)  # a new version: the forward's KCOL is stale
    K.builds.clear()
    for m, scale in ((mask, 0.3), (None, 0.3), (mask, 0.7)):
        K.builds.clear()
        got = op(q, k, v, P, m, 2, 2, -1, -1, scale)[0]
        want = op(q, k, v, P.detach().clone(), m, 2, 2, -1, -1, scale)[0]
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert K.builds["key_columns"] == 2
    out, lse = op(q, k, v, P, mask, 2, 2, -1, -1, 0.3)
    K.builds.clear()
    do = torch.randn_like(out)
    g = op_bwd(do, q, k, v, P, mask, out, lse, 2, 2, -1, -1, 0.3)
    assert K.builds["key_columns"] == 0  # taken from the forward
    g_fresh = op_bwd(do, q, k, v, P, mask, out, lse, 2, 2, -1, -1, 0.3)
    assert K.builds["key_columns"] == 1  # the backward took it out: built again
    for a, b in zip(g, g_fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_triton_kernels_ran_not_a_fallback(monkeypatch):
    """The launches are counted, and the PyTorch references are made to raise."""
    def boom(*a, **k):
        raise AssertionError("a PyTorch reference was called instead of the Triton kernels")

    for mod in (hdaf.functional, hdaf.reference):
        monkeypatch.setattr(mod, "delta_attention_naive", boom)
        monkeypatch.setattr(mod, "delta_attention_gather", boom)
    q, k, v, x, w, mask = make_inputs(B=1, H=2, T=9, Dk=8, R=5, dtype=torch.float32,
                                      device=DEVICE, pad_lengths=[7])
    K.launch_counts.clear()
    K.builds.clear()
    out = hdaf.delta_attention(q, k, v, x, w, key_padding_mask=mask, backend="triton")
    assert dict(K.launch_counts) == {"fwd": 1}
    out.sum().backward()
    assert dict(K.launch_counts) == {"fwd": 1, "bwd_preprocess": 1, "bwd_dkdv": 1, "bwd_dq": 1}
    # the backward took the forward's key columns instead of building them again
    assert dict(K.builds) == {"key_columns": 1} and len(K._KCOL_OF) == 0
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v, x, w))
    if not ON_GPU:
        assert type(K._fwd.fn).__name__ == "InterpretedFunction"


def test_no_delta_path_is_plain_attention():
    """use_delta=False compiles the delta term out (no P traffic): forward, lse and dq/dk/dv equal
    the operator with a zero bias, over padding, a causal window and fully masked rows."""
    B, H, T, L, U, scale = 2, 2, 40, 3, 4, 0.3
    q, k, v, x, w, _ = make_inputs(B=B, H=H, T=T, Dk=8, Dv=12, R=L + U + 1, dtype=torch.float32,
                                   device=DEVICE, requires_grad=False)
    mask = _lead_pad(B, T, 5).to(DEVICE)
    P = torch.randn(B, 1, T, L + U + 1, device=DEVICE)  # ignored without the delta term
    out, lse = K._forward(q, k, v, P, mask, L, U, 9, 0, scale, use_delta=False)
    g = torch.randn_like(out)
    dq, dk, dv, dP = K._backward(g, q, k, v, P, mask, out, lse, L, U, 9, 0, scale,
                                 use_delta=False)
    assert torch.equal(dP, torch.zeros_like(P))
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = hdaf.delta_attention(*ref_in, x.double(), torch.zeros_like(w).double(),
                               max_distance=(L, U), window=(9, 0), key_padding_mask=mask,
                               scale=scale, backend="naive")
    ref_grads = torch.autograd.grad(ref, ref_in, g.double())
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (ref, *ref_grads)):
        torch.testing.assert_close(a.double(), b.detach(), msg=lambda m: f"{name}: {m}",
                                   **TOL[torch.float32])


def _spy_use_delta(monkeypatch):
    """The (kernel kind, USE_DELTA) of every forward, dK/dV and dQ launch, in order."""
    seen, launch = [], K._launch

    def spy(kind, grid, *args, **meta):
        seen.append((kind, meta["USE_DELTA"]))
        return launch(kind, grid, *args, **meta)

    monkeypatch.setattr(K, "_launch", spy)
    return seen


PLAIN_LAUNCHES = [("fwd", False), ("dkdv", False), ("dq", False)]


def test_public_calls_without_the_delta_term_run_the_plain_path(monkeypatch):
    """x = w = None, padded (grouped heads, Tq < Tk, padding, a causal window) and packed: every
    kernel launch is compiled with USE_DELTA=False (the plain path), and forward and dq, dk, dv
    match the float64 reference with a zero term. A zero w that requires grad is a delta term:
    the delta kernels run, and its gradient (not zero) matches the reference."""
    seen = _spy_use_delta(monkeypatch)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64)
               for s in ((2, 4, 9, 8), (2, 2, 20, 8), (2, 2, 20, 8)))
    x = torch.randn(2, 20, 5, generator=g, dtype=torch.float64)
    zero_w = torch.zeros(5, 7, dtype=torch.float64)
    mask = (torch.arange(20)[None, :] < torch.tensor([3, 0])[:, None]).to(DEVICE)
    kw = dict(max_distance=3, causal=True, window=(12, 0), key_padding_mask=mask)

    def run(dtype, backend, xw):
        ins = [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v) + xw]
        out = hdaf.delta_attention(*ins[:3], *(ins[3:] or (None, None)), backend=backend, **kw)
        return [out.detach()] + [gr.detach() for gr in grads(out, ins, seed=6)]

    got = run(torch.float32, "triton", ())
    assert seen == PLAIN_LAUNCHES
    ref = [run(d, "naive", (torch.zeros_like(x), zero_w)) for d in (torch.float64, torch.float32)]
    check_all(got, *ref, torch.float32, tag="no delta term: ")

    seen.clear()
    got = run(torch.float32, "triton", (x, zero_w))
    assert seen == [("fwd", True), ("dkdv", True), ("dq", True)]
    ref = [run(d, "naive", (x, zero_w)) for d in (torch.float64, torch.float32)]
    assert ref[0][-1].abs().max() > 0.1  # dw at w = 0
    check_all(got, *ref, torch.float32, tag="zero w: ")

    seen.clear()
    cu_q = torch.tensor([0, 3, 3, 12], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 20, 24, 33], dtype=torch.int32, device=DEVICE)
    qp, kp, vp = (torch.randn(n, h, 8, generator=g, dtype=torch.float64)
                  for n, h in ((12, 4), (33, 2), (33, 2)))

    def run_varlen(dtype, backend, xw):
        ins = [t.to(DEVICE, dtype).requires_grad_() for t in (qp, kp, vp) + xw]
        out = hdaf.delta_attention_varlen(*ins[:3], *(ins[3:] or (None, None)), cu_q, cu_k, 9,
                                          20, causal=True, backend=backend)
        return [out.detach()] + [gr.detach() for gr in grads(out, ins, seed=7)]

    got = run_varlen(torch.float32, "triton", ())
    assert seen == PLAIN_LAUNCHES
    zeros = (torch.zeros(33, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64))
    check_all(got, *[run_varlen(d, "naive", zeros) for d in (torch.float64, torch.float32)],
              torch.float32, tag="packed, no delta term: ")


def test_layer_without_the_delta_term_runs_the_plain_path(monkeypatch):
    """DeltaAttention(use_delta=False, backend="triton"): the plain path serves forward and
    backward, output and every used parameter's gradient match the float64 layer, and the unused
    w (rpe) gets no gradient."""
    import copy

    torch.manual_seed(1)
    layer = hdaf.DeltaAttention(16, 2, max_distance=2, use_delta=False, backend="triton")
    x = torch.randn(2, 11, 16)
    mask = torch.arange(11)[None, :] >= torch.tensor([11, 6])[:, None]
    seen = _spy_use_delta(monkeypatch)

    def run(dtype, backend):
        mod = copy.deepcopy(layer).to(DEVICE, dtype)
        mod.backend = backend
        xi = x.to(DEVICE, dtype).requires_grad_()
        out = mod(xi, key_padding_mask=mask.to(DEVICE))
        assert torch.autograd.grad(out.sum(), mod.rpe, allow_unused=True,
                                   retain_graph=True) == (None,)
        params = [xi] + [p for n, p in mod.named_parameters() if n != "rpe"]
        return [out.detach()] + [g.detach() for g in grads(out, params)]

    got = run(torch.float32, "triton")
    assert seen == PLAIN_LAUNCHES
    for name, a, b, c in zip(["out", "dx"] + [n for n, _ in layer.named_parameters() if n != "rpe"],
                             got, run(torch.float64, "naive"), run(torch.float32, "naive")):
        check(f"layer {name}", b, a, c, torch.float32)


def test_capture_launches_records_and_runs_nothing():
    """capture_launches (the static profile's entry point) records each kernel launch with its
    arguments, pruned autotune list and hot-loop kinds, and launches nothing."""
    B, H, T, L, U = 1, 2, 300, 2, 2
    q = torch.zeros(B, H, T, 64)
    P = torch.zeros(B, 1, T, L + U + 1)
    lse = torch.zeros(B, H, T)
    K.launch_counts.clear()
    with K.capture_launches() as launches:
        K._forward(q, q, q, P, None, L, U, -1, -1, 0.125)
        K._backward(q, q, q, q, P, None, q, lse, L, U, -1, -1, 0.125)
    assert not K.launch_counts
    assert [ln.kind for ln in launches] == ["fwd", "dkdv", "dq"]
    for ln in launches:
        assert ln.configs and all(len(c) == 4 for c in ln.configs)
        assert ln.loop_kinds == K.LOOP_KINDS[ln.kind]
        # every kernel parameter but the two tile sizes is supplied, by position or by name
        supplied = set(ln.kernel.arg_names[:len(ln.args)]) | set(ln.kwargs)
        assert supplied == set(ln.kernel.arg_names) - {"BLOCK_M", "BLOCK_N"}
        if not K.INTERPRET:
            assert set(ln.configs) <= set(K.autotune_shapes(ln.kind, 64))


def test_autotune_lists_keep_each_configuration_to_its_head_dims():
    """A configuration listed for head dims up to 64 (it spills at 128) is never tried at 128."""
    for kind in ("fwd", "dkdv", "dq"):
        every = K.autotune_shapes(kind)
        at_128 = K.autotune_shapes(kind, 128)
        assert at_128 and set(at_128) <= set(every)
        prune = K._make_prune(kind)
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
                   for m, n, w, st in every]
        kept = prune(configs, dict(T_KEY=4096, BLOCK_DK=128, BLOCK_DV=128, IEEE=False))
        kept = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                for c in kept]
        assert set(kept) <= set(at_128), (kind, kept, at_128)
    assert (64, 128, 8, 2) in K.autotune_shapes("dkdv", 64)
    assert (64, 128, 8, 2) not in K.autotune_shapes("dkdv", 128)


def _grouped_end_aligned_reference(q, k, v, P, mask, L, U, lo, hi, scale, g):
    """float64 naive reference for grouped heads and an end-aligned query block: k/v repeated
    over each group, and the Tq queries as the last rows of a full self-attention whose first
    Tk - Tq query rows are zero and receive no output gradient (so they add nothing to any
    gradient). P enters as x = P, w = I (x·w = P), so dx is dP."""
    B, H, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = H // Hkv
    R = L + U + 1
    q_full = torch.cat([q.new_zeros(B, H, Tk - Tq, q.shape[-1]), q], 2)
    k_rep, v_rep = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    x = P if P.shape[1] > 1 else P[:, 0]
    w = torch.eye(R, dtype=P.dtype).expand(H, R, R) if P.shape[1] > 1 else torch.eye(R,
                                                                                     dtype=P.dtype)
    out = hdaf.reference.delta_attention_naive(q_full, k_rep, v_rep, x, w, L=L, U=U, lo=lo,
                                               hi=hi, key_padding_mask=mask, scale=scale)
    g_full = torch.cat([g.new_zeros(B, H, Tk - Tq, g.shape[-1]), g], 2)
    dq, dk, dv, dx = torch.autograd.grad(out, (q_full, k_rep, v_rep, x), g_full)
    dk = dk.view(B, Hkv, G, Tk, -1).sum(2)
    dv = dv.view(B, Hkv, G, Tk, -1).sum(2)
    dP = dx if P.shape[1] > 1 else dx[:, None]
    return out[:, :, Tk - Tq:], dq[:, :, Tk - Tq:], dk, dv, dP


GROUPED_CASES = {
    # grouped heads (H=4 over Hkv=2), Tq = Tk, per-head P, padding with a fully padded element
    "gqa_T63_pad_phP": dict(B=2, H=4, Hkv=2, Tq=63, Tk=63, L=2, U=6, window=None,
                            causal=False, pad=[63, 0], per_head=True),
    # multi-query (Hkv=1), a 3-query block at the end of 40 keys, causal window
    "mqa_Tq3_Tk40_causal_window": dict(B=1, H=4, Hkv=1, Tq=3, Tk=40, L=3, U=3, window=(9, 0),
                                       causal=True, pad=None, per_head=False),
    # decoding: one query after 70 keys, padding at the front, keys far on both sides
    "decode_Tq1_Tk70_leadpad": dict(B=2, H=2, Hkv=2, Tq=1, Tk=70, L=4, U=5, window=None,
                                    causal=True, pad="lead", per_head=False),
    # a 7-query block, unbounded, grouped heads, per-head P
    "gqa_Tq7_Tk50": dict(B=1, H=2, Hkv=1, Tq=7, Tk=50, L=6, U=2, window=None, causal=False,
                         pad=None, per_head=True),
    # T = 1: one query, one key, grouped heads
    "gqa_T1": dict(B=2, H=2, Hkv=1, Tq=1, Tk=1, L=2, U=2, window=None, causal=True, pad=None,
                   per_head=False),
    # T = 300, three queries at the end, Hkv = H, a window, padding
    "Tq3_Tk300_window_pad": dict(B=1, H=2, Hkv=2, Tq=3, Tk=300, L=5, U=5, window=(60, 20),
                                 causal=False, pad=[260], per_head=True),
}


def _check_grouped(c, tag, tile_list=((16, 16), (32, 32))):
    """Output and the four gradients of the op on one GROUPED_CASES-style case against the
    float64 reference on repeated k/v, at forced tiles; returns the last call's launches."""
    B, H, Hkv, Tq, Tk, L, U = (c[n] for n in ("B", "H", "Hkv", "Tq", "Tk", "L", "U"))
    R = L + U + 1
    g = torch.Generator().manual_seed(c.get("seed", 0))
    q = torch.randn(B, H, Tq, 8, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Tk, 8, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Tk, 12, generator=g, dtype=torch.float64)
    P = torch.randn(B, H if c["per_head"] else 1, Tk, R, generator=g, dtype=torch.float64)
    go = torch.randn(B, H, Tq, 12, generator=g, dtype=torch.float64)
    mask = None
    if c["pad"] == "lead":
        mask = torch.zeros(B, Tk, dtype=torch.bool)
        mask[:, :min(30, Tk - 1)] = True
    elif c["pad"] is not None:
        mask = torch.arange(Tk)[None, :] >= torch.tensor(c["pad"])[:, None]
    Wl, Wr = c["window"] or (-1, -1)
    if c["causal"]:
        Wr = 0
    lo = -(Tk - 1) if Wl < 0 else -Wl
    hi = (Tk - 1) if Wr < 0 else Wr
    scale = 0.3
    ref = _grouped_end_aligned_reference(*(t.clone().requires_grad_() for t in (q, k, v, P)),
                                         mask, L, U, lo, hi, scale, go)
    ref = [t.detach() for t in ref]
    for tiles in tile_list:
        cfg = (*tiles, 1, 1)
        ins = [t.float().to(DEVICE).requires_grad_() for t in (q, k, v, P)]
        m = None if mask is None else mask.to(DEVICE)
        with K.forced_configs(fwd=cfg, dkdv=cfg, dq=cfg):
            out, _ = torch.ops.hdaf.triton_delta_attention_forward(*ins, m, L, U, Wl, Wr, scale)
            grads_ = torch.autograd.grad(out, ins, go.float().to(DEVICE))
        for name, a, b in zip(("out", "dq", "dk", "dv", "dP"), (out, *grads_), ref):
            assert a.shape == b.shape, (name, a.shape, b.shape)
            torch.testing.assert_close(a.double().cpu(), b, msg=lambda m_: f"{tag} {tiles} "
                                       f"{name}: {m_}", **TOL[torch.float32])
    with K.capture_launches() as launches:
        K._forward(*ins, m, L, U, Wl, Wr, scale)
    return launches


@pytest.mark.parametrize("case", list(GROUPED_CASES))
def test_grouped_heads_and_end_aligned_queries_match_naive(case):
    """The op with k/v [B,Hkv,Tk,D] and q [B,H,Tq,D] (query i at position Tk - Tq + i): output
    and the four gradients against the float64 reference on repeated k/v, for the far, band and
    masked tiles of forced 16x16 and 32x32 tiles."""
    _check_grouped(GROUPED_CASES[case], case)


def _stacked_cases():
    """G x Tq x odd Tk, each with a rotating mix of padding, window, causal and shared or
    per-head P (every feature meets every G)."""
    cases = {}
    feats = [dict(pad=None, window=None, causal=True, per_head=False),
             dict(pad="lead", window=None, causal=False, per_head=True),
             dict(pad=None, window=(20, 5), causal=False, per_head=False),
             dict(pad="tail", window=(40, 0), causal=True, per_head=True)]
    for n, (G, Tq, Tk) in enumerate(itertools.product((1, 2, 4), (1, 3), (1, 7, 63, 300))):
        if Tq > Tk:
            continue
        f = dict(feats[n % len(feats)])
        if f["pad"] == "tail":  # batch 1: the last third of the keys are padding
            f["pad"] = [Tk, max(1, Tk - Tk // 3)]
        Hkv = 2 if G < 4 else 1
        cases[f"G{G}_Tq{Tq}_Tk{Tk}"] = dict(B=2, H=G * Hkv, Hkv=Hkv, Tq=Tq, Tk=Tk, L=3, U=4,
                                           seed=n, **f)
    # 8 heads x 3 queries = 24 rows: two 16-row programs, the second starting inside a head
    cases["G8_Tq3_Tk63_two_programs"] = dict(B=1, H=8, Hkv=1, Tq=3, Tk=63, L=3, U=4,
                                             pad=None, window=None, causal=False,
                                             per_head=True)
    return cases


STACKED_CASES = _stacked_cases()


@pytest.mark.parametrize("case", list(STACKED_CASES))
def test_stacked_decoding_matches_naive_and_reads_each_kv_head_once(case):
    """Short query blocks (decoding) stack the G·Tq queries of a key/value head's query heads
    into one program's rows: output and every gradient against the float64 reference, and the
    forward launch is the stacked one (one program group per key/value head, not per query
    head)."""
    c = STACKED_CASES[case]
    launches = _check_grouped(c, case, tile_list=((16, 16),))
    (fwd,) = [ln for ln in launches if ln.kind == "fwd"]
    assert fwd.kwargs["STACK"] is True
    G, cfg = c["H"] // c["Hkv"], dict(BLOCK_M=16, BLOCK_N=16)
    assert fwd.grid(cfg) == (triton.cdiv(G * c["Tq"], 16), c["B"] * c["Hkv"], 1)


VARLEN_CASES = {
    # lengths {0, 1, 7, 63, ...} mixed, Tq = Tk, grouped heads, causal window, shared P
    "mixed_lengths_gqa_causal_window": dict(q_lens=[0, 1, 7, 63, 40], k_lens=[0, 1, 7, 63, 40],
                                            H=4, Hkv=2, L=3, U=5, window=(9, 0), per_head=False),
    # query blocks shorter than their keys (decode-like), per-head P, unbounded
    "end_aligned_blocks_phP": dict(q_lens=[1, 3, 0, 7], k_lens=[30, 3, 5, 70], H=2, Hkv=1,
                                   L=4, U=2, window=None, per_head=True),
    # a 300-long sequence among short and empty ones, Hkv = H
    "with_300": dict(q_lens=[300, 0, 1, 7], k_lens=[300, 0, 1, 7], H=2, Hkv=2, L=3, U=3,
                     window=(40, 0), per_head=False),
}


@pytest.mark.parametrize("case", list(VARLEN_CASES))
def test_varlen_equals_per_sequence_calls(case):
    """The packed-batch op against the padded op called on each sequence alone (itself checked
    against the float64 reference above): output, lse and the four gradients; nothing attends
    across sequences, a length-0 sequence produces nothing."""
    c = VARLEN_CASES[case]
    H, Hkv, L, U = c["H"], c["Hkv"], c["L"], c["U"]
    R = L + U + 1
    Wl, Wr = c["window"] or (-1, -1)
    g = torch.Generator().manual_seed(1)
    tq, tk = sum(c["q_lens"]), sum(c["k_lens"])
    q = torch.randn(tq, H, 8, generator=g)
    k = torch.randn(tk, Hkv, 8, generator=g)
    v = torch.randn(tk, Hkv, 12, generator=g)
    P = torch.randn(tk, H if c["per_head"] else 1, R, generator=g)
    go = torch.randn(tq, H, 12, generator=g)
    cu = [torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)
          for lens in (c["q_lens"], c["k_lens"])]
    ins = [t.to(DEVICE).requires_grad_() for t in (q, k, v, P)]
    for tiles in ((16, 16), (32, 32)):
        cfg = (*tiles, 1, 1)
        with K.forced_configs(fwd=cfg, dkdv=cfg, dq=cfg):
            out, lse = torch.ops.hdaf.triton_delta_attention_varlen_forward(
                *ins, cu[0].to(DEVICE), cu[1].to(DEVICE), max(c["q_lens"]), max(c["k_lens"]), L,
                U, Wl, Wr, 0.3)
            grads_ = torch.autograd.grad(out, ins, go.to(DEVICE))
            assert out.shape == (tq, H, 12) and lse.shape == (H, tq)
            ref_g = [torch.zeros_like(t) for t in ins]
            for b, (q0, q1, k0, k1) in enumerate(zip(cu[0][:-1], cu[0][1:], cu[1][:-1],
                                                     cu[1][1:])):
                if q1 == q0:
                    continue
                seq = [t[a:z].detach().transpose(0, 1)[None].requires_grad_()
                       for t, a, z in ((ins[0], q0, q1), (ins[1], k0, k1), (ins[2], k0, k1),
                                       (ins[3], k0, k1))]
                o, l_ = torch.ops.hdaf.triton_delta_attention_forward(*seq, None, L, U, Wl, Wr,
                                                                      0.3)
                gs = torch.autograd.grad(o, seq, go[q0:q1].to(DEVICE).transpose(0, 1)[None])
                tag = f"{case} {tiles} sequence {b}"
                torch.testing.assert_close(out[q0:q1], o[0].transpose(0, 1), msg=tag)
                torch.testing.assert_close(lse[:, q0:q1], l_[0], msg=tag)
                for r, gr, a, z in zip(ref_g, gs, (q0, k0, k0, k0), (q1, k1, k1, k1)):
                    r[a:z] = gr[0].transpose(0, 1)
            for name, a, b in zip(("dq", "dk", "dv", "dP"), grads_, ref_g):
                torch.testing.assert_close(a, b, msg=f"{case} {tiles} {name}")


def test_public_varlen_and_grouped_calls_run_the_triton_kernels():
    """hdaf.delta_attention_varlen / hdaf.delta_attention with grouped heads and a short query
    block, backend="triton": the Triton kernels serve them (launch counts) and match "naive"
    in float64, forward and the five gradients."""
    g = torch.Generator().manual_seed(2)
    lens_q, lens_k = [3, 0, 9], [20, 4, 9]
    cu_q = torch.tensor([0, 3, 3, 12], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 20, 24, 33], dtype=torch.int32, device=DEVICE)
    q = torch.randn(12, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(33, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(33, 2, 8, generator=g, dtype=torch.float64)
    x = torch.randn(33, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64) * 0.3
    kw = dict(max_distance=3, causal=True)

    def run(dtype, backend):
        ins = [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v, x, w)]
        out = hdaf.delta_attention_varlen(*ins, cu_q, cu_k, max(lens_q), max(lens_k),
                                          backend=backend, **kw)
        return [out.detach()] + [gr.detach() for gr in grads(out, ins, seed=3)]

    K.launch_counts.clear()
    got = run(torch.float32, "triton")
    assert K.launch_counts["fwd"] == 1 and K.launch_counts["bwd_dq"] == 1
    ref64, lo = run(torch.float64, "naive"), run(torch.float32, "naive")
    check_all(got, ref64, lo, torch.float32, tag="varlen: ")

    qb = torch.randn(2, 4, 3, 8, generator=g, dtype=torch.float64)
    kb = torch.randn(2, 2, 11, 8, generator=g, dtype=torch.float64)
    vb = torch.randn(2, 2, 11, 8, generator=g, dtype=torch.float64)
    xb = torch.randn(2, 11, 5, generator=g, dtype=torch.float64)

    def run_grouped(dtype, backend):
        ins = [t.to(DEVICE, dtype).requires_grad_() for t in (qb, kb, vb, xb, w)]
        out = hdaf.delta_attention(*ins, backend=backend, window=(6, 2), **{"max_distance": 3})
        return [out.detach()] + [gr.detach() for gr in grads(out, ins, seed=4)]

    K.launch_counts.clear()
    got = run_grouped(torch.float32, "triton")
    assert K.launch_counts["fwd"] == 1
    check_all(got, run_grouped(torch.float64, "naive"), run_grouped(torch.float32, "naive"),
              torch.float32, tag="grouped, Tq < Tk: ")


@pytest.mark.parametrize("Tq,window,pad", [(1, None, True), (3, (300, 0), False),
                                            (20, (40, 40), True)],
                         ids=["Tq1_pad", "Tq3_causal_window", "Tq20_window_pad"])
def test_decoding_split_keys_match_one_pass(Tq, window, pad):
    """Flash-decoding: the forward split into 256-key ranges (three or more programs per query
    block) combines to the one-pass result, output and lse (rows that see no key: 0 and -inf),
    and the backward from it gives the same gradients."""
    g = torch.Generator().manual_seed(5)
    B, H, Hkv, Tk, L, U = 2, 4, 2, 700, 6, 3
    q = torch.randn(B, H, Tq, 8, generator=g)
    k = torch.randn(B, Hkv, Tk, 8, generator=g)
    v = torch.randn(B, Hkv, Tk, 12, generator=g)
    P = torch.randn(B, 1, Tk, L + U + 1, generator=g)
    mask = None
    if pad:
        mask = torch.zeros(B, Tk, dtype=torch.bool)
        mask[0, :450] = True
        mask[1, 300:] = True  # batch 1: the last 400 keys are padding
    Wl, Wr = window or (-1, -1)
    ins = [t.to(DEVICE).requires_grad_() for t in (q, k, v, P)]
    m = None if mask is None else mask.to(DEVICE)
    go = torch.randn(B, H, Tq, 12, generator=g).to(DEVICE)
    results = []
    for splits in (1, 3):
        with K.forced_configs(fwd=(16, 16, 1, 1), dkdv=(16, 16, 1, 1), dq=(16, 16, 1, 1),
                              splits=splits):
            out, lse = torch.ops.hdaf.triton_delta_attention_forward(*ins, m, L, U, Wl, Wr, 0.3)
            results.append([out, lse, *torch.autograd.grad(out, ins, go)])
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dP"), *results):
        torch.testing.assert_close(b, a, msg=f"split {name}", **TOL[torch.float32])
    if window == (40, 40):  # the keys within 40 of the last 20 queries of batch 1 are padding
        assert (results[1][1][1] == float("-inf")).any()


def test_backends_report_triton_available():
    assert "triton" in hdaf.backends()["available"][DEVICE]


def test_float64_is_rejected_with_a_clear_type_error():
    q, k, v, x, w, _ = make_inputs(B=1, H=1, T=4, Dk=8, R=5, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        hdaf.delta_attention(q, k, v, x, w, backend="triton")


def test_launcher_validates_shapes():
    q, k, v, x, w, _ = make_inputs(B=1, H=1, T=4, Dk=129, R=5, dtype=torch.float32,
                                   device=DEVICE, requires_grad=False)
    P = hdaf.reference.delta_projection(x, w)
    with pytest.raises(ValueError, match="head dims up to 128"):
        torch.ops.hdaf.triton_delta_attention_forward(q, k, v, P, None, 2, 2, -1, -1, 0.1)
    q, k, v, x, w, _ = make_inputs(B=1, H=1, T=4, Dk=8, R=5, dtype=torch.float32,
                                   device=DEVICE, requires_grad=False)
    P = hdaf.reference.delta_projection(x, w)
    with pytest.raises(ValueError, match=r"P must be \[B,Hp,Tk,R\]"):
        torch.ops.hdaf.triton_delta_attention_forward(q, k, v, P, None, 1, 2, -1, -1, 0.1)
    # grouped heads: Hkv must divide H; the query block: Tq <= Tk
    q3 = torch.zeros(1, 3, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"Hkv dividing H=3, got \(1, 2, 4, 8\)"):
        torch.ops.hdaf.triton_delta_attention_forward(q3, torch.zeros(1, 2, 4, 8, device=DEVICE),
                                                      torch.zeros(1, 2, 4, 8, device=DEVICE), P,
                                                      None, 2, 2, -1, -1, 0.1)
    with pytest.raises(ValueError, match=r"Tq=5 queries but k has only Tk=4 keys"):
        torch.ops.hdaf.triton_delta_attention_forward(torch.zeros(1, 1, 5, 8, device=DEVICE), k, v,
                                                      P, None, 2, 2, -1, -1, 0.1)


def test_cpu_without_interpreter_says_triton_needs_a_gpu():
    """In a fresh process without TRITON_INTERPRET: the public function and the op both refuse."""
    code = textwrap.dedent("""
        import torch, hdaf
        x = torch.randn(1, 1, 4, 8)
        try:
            hdaf.delta_attention(x, x, x, torch.randn(1, 4, 2), torch.randn(2, 3), backend="triton")
        except RuntimeError as e:
            print("PUBLIC:", e)
        from hdaf.kernels import delta_attention as K
        try:
            P = torch.randn(1, 1, 4, 3)
            K.triton_delta_attention_forward(x, x, x, P, None, 1, 1, -1, -1, 1.0)
        except RuntimeError as e:
            print("OP:", e)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    public = [ln for ln in lines if ln.startswith("PUBLIC:")]
    op = [ln for ln in lines if ln.startswith("OP:")]
    assert public and "Triton needs a GPU, or the interpreter" in public[0], res.stdout
    assert op and "Triton needs a GPU, or the interpreter" in op[0], res.stdout


def test_opcheck_schema_fake_autograd():
    """torch.library.opcheck (the parts that run under the interpreter; all of them on a GPU)."""
    B, H, T, L, U = 1, 2, 9, 2, 2
    q, k, v, x, w, mask = make_inputs(B=B, H=H, T=T, Dk=8, R=L + U + 1, dtype=torch.float32,
                                      device=DEVICE, pad_lengths=[6], requires_grad=False)
    P = hdaf.reference.delta_projection(x, w)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), P.requires_grad_(), mask,
            L, U, 3, 0, 0.3)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if ON_GPU:  # the interpreter cannot run the functionalised (torch.compile) path
        utils = utils + ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(torch.ops.hdaf.triton_delta_attention_forward.default, args,
                          test_utils=utils)


# ----------------------------------------------------------------------------------------------
# Blocks at global positions (docs/delta_attention.md, "Global positions"): the Triton block ops
# against the float64 gather reference, the blocks merged into the full Triton call, and the ring
# of hdaf.distributed with backend="triton"
# ----------------------------------------------------------------------------------------------

from test_delta_attention_block import CASES as BLOCK_CASES  # noqa: E402
from test_delta_attention_block import _block_inputs  # noqa: E402

#: (Tq, Tk, q_start, k_start, window_left, window_right, tiles): odd sizes, Tq > Tk, one query,
#: one key, 63-row blocks crossing several 16- and 32-row tiles with every tile kind
BLOCK_SIZES = [(1, 7, 9, 0, -1, -1, None), (7, 1, 0, 3, -1, -1, None), (9, 4, 1, 3, -1, -1, None),
               (63, 7, 0, 40, 5, 2, None), (7, 63, 50, 0, -1, 0, None),
               (63, 63, 20, 0, 30, 8, (16, 16)), (63, 33, 0, 17, -1, -1, (32, 32)),
               (1, 63, 62, 0, 20, 0, None)]


def _check_triton_block(Tq, Tk, q_start, k_start, wl, wr, Hp=1, B=2, H=4, Hkv=2, D=3, seed=0,
                        all_padding=False):
    """Forward (out, lse) and every gradient of the Triton block op against the float64 gather
    reference; rows that see no key: out 0, lse -inf, zero gradients."""
    ins = _block_inputs(B=B, H=H, Hkv=Hkv, Tq=Tq, Tk=Tk, D=D, Hp=Hp, seed=seed)
    mask = ins[-1]
    if all_padding:
        mask[-1] = True  # the last element has only padding keys
    ref = [t.detach().requires_grad_(True) for t in ins[:-1]]
    got = [t.detach().float().to(DEVICE).requires_grad_(True) for t in ins[:-1]]
    args = (q_start, k_start, 2, 2, wl, wr, 0.7)
    out, lse = hdaf.block.block_forward("triton", *got, mask.to(DEVICE), *args)
    want, want_lse = hdaf.block.block_forward("gather", *ref, mask, *args)
    tag = f"Tq={Tq} Tk={Tk} q_start={q_start} k_start={k_start} window=({wl},{wr}) Hp={Hp}"
    assert lse.dtype == torch.float32
    assert torch.equal(lse.isinf().cpu(), want_lse.isinf()), tag
    empty = want_lse.isinf()
    assert (out.cpu()[empty] == 0).all() and (lse.cpu()[empty] == float("-inf")).all(), tag
    assert_close(f"{tag} out", want, out.cpu(), torch.float32)
    assert_close(f"{tag} lse", want_lse[~empty], lse.cpu()[~empty], torch.float32)
    dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed + 1),
                       dtype=torch.float64)
    g_want = torch.autograd.grad(want, ref, dout)
    g_got = torch.autograd.grad(out, got, dout.float().to(DEVICE))
    for name, w, g in zip(("q", "k", "v", "P_q", "P_k"), g_want, g_got):
        assert_close(f"{tag} d{name}", w, g.cpu(), torch.float32)
    assert (g_got[0].cpu()[empty] == 0).all(), f"{tag}: dq of rows without keys"
    return empty


@pytest.mark.parametrize("Hp", [1, 4])
@pytest.mark.parametrize("q_start,k_start,wl,wr", BLOCK_CASES)
def test_triton_block_matches_the_reference(q_start, k_start, wl, wr, Hp):
    """Queries after, before and among the keys; windows that hide the whole block; causal;
    padding; grouped heads; shared and per-head P."""
    empty = _check_triton_block(5, 7, q_start, k_start, wl, wr, Hp=Hp)
    if (q_start, k_start, wl, wr) == (30, 0, 3, 3):  # the window hides every key
        assert empty.all()


@pytest.mark.parametrize("case", BLOCK_SIZES, ids=lambda c: "Tq{}_Tk{}_q{}_k{}".format(*c[:4]))
def test_triton_block_sizes_and_tiles(case):
    *case, tiles = case
    if tiles is None:
        _check_triton_block(*case, B=1, H=2, Hkv=1, all_padding=False)
        return
    cfg = (*tiles, 1, 1)
    with K.forced_configs(fwd=cfg, dkdv=cfg, dq=cfg):
        _check_triton_block(*case, B=2, H=2, Hkv=1, Hp=2, D=8, all_padding=True)


def test_triton_blocks_merged_equal_the_full_triton_call():
    """One query run against three key blocks (the first hidden from the last rows by the
    window): the merged forward and the summed block backward (given the merged out and lse)
    equal one call of the end-aligned Triton op, every gradient included."""
    g = torch.Generator().manual_seed(5)
    B, H, T, D, R, n, Tq = 1, 2, 21, 8, 5, 7, 9
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(DEVICE) for _ in range(3))
    P = torch.randn(B, 1, T, R, generator=g).to(DEVICE)
    q = q[:, :, T - Tq:].contiguous()
    args, scale = (2, 2, 8, 0), D ** -0.5
    leaves = [t.requires_grad_(True) for t in (q, k, v, P)]
    want, want_lse = torch.ops.hdaf.triton_delta_attention_forward(q, k, v, P, None, *args, scale)
    dout = torch.randn(want.shape, generator=g).to(DEVICE)
    want_grads = torch.autograd.grad(want, leaves, dout)
    Pq = P.detach()[:, :, T - Tq:]
    blocks = [(slice(j, j + n), j) for j in range(0, T, n)]
    out = lse = None
    with torch.no_grad():
        for ks, k0 in blocks:
            o, l_ = hdaf.block.block_forward("triton", q, k[:, :, ks], v[:, :, ks], Pq,
                                             P[:, :, ks], None, T - Tq, k0, *args, scale)
            out, lse = hdaf.block.merge_partial(out, lse, o, l_)
    assert_close("out", want, out, torch.float32)
    assert_close("lse", want_lse, lse, torch.float32)
    dq, dk, dv, dP = 0, [], [], torch.zeros_like(P)
    for ks, k0 in blocks:
        gq, gk, gv, gPq, gPk = hdaf.block.block_backward(
            "triton", dout, q, k[:, :, ks], v[:, :, ks], Pq, P[:, :, ks], None, out, lse,
            T - Tq, k0, *args, scale)
        dq = dq + gq
        dk.append(gk)
        dv.append(gv)
        dP[:, :, ks] += gPk
        dP[:, :, T - Tq:] += gPq
    got = (dq, torch.cat(dk, 2), torch.cat(dv, 2), dP)
    for name, w, g_ in zip(("q", "k", "v", "P"), want_grads, got):
        assert_close(f"d{name}", w, g_, torch.float32)


def test_block_auto_and_explicit_backends_take_the_triton_ops(monkeypatch):
    """backend="triton" resolves for blocks (the op is registered), and its launches run."""
    assert hasattr(torch.ops.hdaf, "triton_delta_attention_block_forward")
    assert hdaf.dispatch.feature_reason("triton", {"offsets": "blocks"}) is None
    q = torch.zeros(1, 1, 2, 8, device=DEVICE)
    assert hdaf.block.resolve_block_backend("triton", q, q) == "triton"
    if ON_GPU:
        assert hdaf.block.resolve_block_backend("auto", q, q) == "triton"
    K.launch_counts.clear()
    _check_triton_block(3, 4, 2, 0, -1, -1, B=1, H=2, Hkv=2)
    assert dict(K.launch_counts) == {"fwd": 1, "bwd_preprocess": 1, "bwd_dkdv": 1, "bwd_dq": 1}


def test_block_errors_name_the_argument():
    q, k, v, Pq, Pk, mask = (t.detach().float() for t in _block_inputs(B=1, H=2, Hkv=1, Tq=3,
                                                                         Tk=4))
    op = torch.ops.hdaf.triton_delta_attention_block_forward
    with pytest.raises(ValueError, match="P_q must be"):
        op(q, k, v, Pq[:, :, :2], Pk, None, 0, 0, 2, 2, -1, -1, 1.0)
    with pytest.raises(ValueError, match="P_k must be"):
        op(q, k, v, Pq, Pk[:, :, :3], None, 0, 0, 2, 2, -1, -1, 1.0)
    with pytest.raises(ValueError, match="q_start and k_start"):
        op(q, k, v, Pq, Pk, None, -1, 0, 2, 2, -1, -1, 1.0)
    with pytest.raises(TypeError, match="float64"):
        op(q.double(), k.double(), v.double(), Pq.double(), Pk.double(), None, 0, 0, 2, 2, -1,
           -1, 1.0)


def _ring_worker(rank, world, store_path, result_dir):
    """One rank of a W=2 ring with backend="triton" in float32: every block goes through the
    Triton block ops (the spies fail on any other backend), the shards of the output and of
    every gradient equal the float64 single-process operator, and two runs are bitwise equal."""
    import test_distributed as TD
    from hdaf import block
    try:
        TD._init(rank, world, store_path)
        names = []
        for fn in ("block_forward", "block_backward"):
            def spy(name, *a, _orig=getattr(block, fn), **kw):
                names.append(name)
                return _orig(name, *a, **kw)
            setattr(block, fn, spy)
        K.launch_counts.clear()
        cases = [TD._case(B=2, T=12, causal=True, pad=True, H=2, Hkv=1),
                 TD._case("contiguous", B=2, T=12, window=(3, 2), H=2, Hkv=2, per_head_x=True)]
        for case in cases:
            TD._check_case(dict(case, backend="triton"), None, dtype=torch.float32, D=8,
                           tol=TOL[torch.float32])
        assert names and set(names) == {"triton"}, f"blocks ran on {sorted(set(names))}"
        assert K.launch_counts["fwd"] > 0 and K.launch_counts["bwd_dq"] > 0
        TD.dist.barrier()
        TD.dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(result_dir, f"rank{rank}.err"), "w") as f:
            import traceback
            f.write(traceback.format_exc())
        raise


def test_ring_with_the_triton_backend(tmp_path, monkeypatch):
    """hdaf.distributed.ring_delta_attention(..., backend="triton") at world size 2 (gloo; the
    spawned ranks inherit TRITON_INTERPRET=1 from this process's environment)."""
    import test_distributed as TD
    if not ON_GPU:
        assert os.environ.get("TRITON_INTERPRET") == "1"
    # The ranks import this module, and with it `conftest`, from this process's sys.path: put
    # tests/ first, since other test modules put bench/ (which has its own conftest.py) before it
    monkeypatch.syspath_prepend(os.path.dirname(os.path.abspath(__file__)))
    try:
        TD._spawn(_ring_worker, 2, tmp_path, str(tmp_path))
    except Exception:
        errs = sorted(tmp_path.glob("rank*.err"))
        raise AssertionError("\n".join(e.read_text() for e in errs) or "a rank failed")


# ----------------------------------------------------------------------------------------------
# GPU only: compiled kernels, half precision, long sequences
# ----------------------------------------------------------------------------------------------

GPU_CASES = {
    "T128_plain": dict(B=2, H=2, T=128, Dk=64, Dr=8, L=8, U=8),
    "T1000_causal_pad_phx_dkdv": dict(B=2, H=2, T=1000, Dk=64, Dv=32, Dr=8, L=16, U=4,
                                      causal=True, pad_lengths=[1000, 777], per_head_x=True),
    "T1000_window_allpad_phw": dict(B=2, H=2, T=1000, Dk=128, Dv=128, Dr=8, L=32, U=32,
                                    window=(100, 60), pad_lengths=[900, 0], per_head_w=True),
    "T1000_paper": dict(B=1, H=4, T=1000, Dk=32, Dr=8, L=0, U=15, window=(0, 15)),
    # mostly far tiles on both sides of a 129-bucket band (the benchmark's shape, shortened)
    "T2048_far_tiles": dict(B=1, H=2, T=2048, Dk=64, Dr=8, L=64, U=64, pad_lengths=[1900]),
}


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_matches_naive(case, dtype):
    got, ref64, lo, _ = run_all(dtype, reference="gather", **GPU_CASES[case])
    check_all(got, ref64, lo, dtype, tag=f"{case}: ")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("params", [
    dict(window=(256, 256)),
    dict(causal=True, pad_lengths=[7000]),
], ids=["window256", "causal_pad"])
def test_gpu_long_sequence_8192(dtype, params):
    # the "gather" reference: identical math to "naive" without the T×T×Dr tensor
    got, ref64, lo, _ = run_all(dtype, B=1, H=2, T=8192, Dk=64, Dr=4, L=16, U=16,
                                reference="gather", **params)
    check_all(got, ref64, lo, dtype, tag=f"T8192 {params}: ")


@requires_cuda
def test_gpu_small_cases_match_naive_float32():
    for case in ("T1", "T7_causal_phx_asym_dkdv", "T7_R1_window_phw", "T63_window_pad_allpad",
                 "T63_causal_window_leadpad_phxw", "T7_headdim_128_100"):
        got, ref64, lo, _ = run_all(torch.float32, **CASES[case])
        check_all(got, ref64, lo, torch.float32, tag=f"{case}: ")


@requires_cuda
def test_gpu_backward_is_deterministic():
    q, k, v, x, w, mask = make_inputs(B=2, H=4, T=1500, Dk=64, Dr=8, R=17, dtype=torch.bfloat16,
                                      device="cuda", pad_lengths=[1500, 1100])
    runs = []
    for _ in range(2):
        out = hdaf.delta_attention(q, k, v, x, w, window=(300, 100), key_padding_mask=mask,
                                   backend="triton")
        runs.append([out] + list(grads(out, (q, k, v, x, w))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@requires_cuda
def test_gpu_torch_compile_matches_eager():
    q, k, v, x, w, mask = make_inputs(B=2, H=2, T=300, Dk=64, Dr=8, R=9, dtype=torch.float16,
                                      device="cuda", pad_lengths=[300, 200])

    def f(q, k, v, x, w):
        return hdaf.delta_attention(q, k, v, x, w, causal=True, key_padding_mask=mask,
                                    backend="triton")

    eager = [f(q, k, v, x, w)]
    eager += list(grads(eager[0], (q, k, v, x, w)))
    comp = [torch.compile(f)(q, k, v, x, w)]
    comp += list(grads(comp[0], (q, k, v, x, w)))
    for name, a, b in zip(NAMES, eager, comp):
        torch.testing.assert_close(b, a, msg=lambda m: f"{name}: {m}", **TOL[torch.float16])


# This exact call (forward alone suffices) hit an illegal memory access on an H100 (2026-11-24)
# while the autotuner benchmarked the configurations of an earlier forward kernel. Every
# configuration of every kernel is run on it one by one, each in a child process, so a memory
# fault names the configuration instead of poisoning this process's CUDA context.
PADDED_CAUSAL_FP16_CASE = dict(B=2, H=2, T=1000, Dk=64, Dv=32, Dr=8, L=16, U=4, causal=True,
                    pad_lengths=[1000, 777], per_head_x=True)
_EVERY_CONFIG_CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
import hdaf
from hdaf.kernels import delta_attention as K
from conftest import make_inputs, grads
kind, cfg = sys.argv[1], tuple(int(c) for c in sys.argv[2].split(","))
q, k, v, x, w, m = make_inputs(dtype=torch.float16, device="cuda", **{case!r})
kw = dict(max_distance=(16, 4), causal=True, key_padding_mask=m)
ref = hdaf.delta_attention(*(t.float() for t in (q, k, v, x, w)), backend="gather", **kw)
with K.forced_configs(**{{kind: cfg}}):
    out = hdaf.delta_attention(q, k, v, x, w, backend="triton", **kw)
    gs = grads(out, (q, k, v, x, w))
torch.cuda.synchronize()
assert all(torch.isfinite(g).all() for g in gs)
torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)
print("OK")
"""


@requires_cuda
@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq"])
def test_gpu_padded_causal_fp16_every_config(kind):
    case = {k: v for k, v in PADDED_CAUSAL_FP16_CASE.items() if k not in ("L", "U", "causal")}
    case["R"] = PADDED_CAUSAL_FP16_CASE["L"] + PADDED_CAUSAL_FP16_CASE["U"] + 1
    code = _EVERY_CONFIG_CHILD.format(tests=os.path.dirname(os.path.abspath(__file__)), case=case)
    failed = []
    for cfg in K.autotune_shapes(kind):
        res = subprocess.run([sys.executable, "-c", code, kind, ",".join(map(str, cfg))],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
        out_of_resources = "OutOfResources" in res.stderr
        if res.returncode != 0 and not out_of_resources:
            failed.append(f"{kind} {cfg}: {res.stderr[-600:]}")
    assert not failed, "\n".join(failed)


@requires_cuda
def test_gpu_padded_causal_fp16_autotuned():
    got, ref64, lo, _ = run_all(torch.float16, reference="gather", **PADDED_CAUSAL_FP16_CASE)
    check_all(got, ref64, lo, torch.float16, tag="padded causal fp16 case: ")
