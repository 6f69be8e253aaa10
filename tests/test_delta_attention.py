"""hdaf.delta_attention: every CPU backend against the "naive" reference, forward and all five
gradients, over every configuration axis of docs/delta_attention.md."""
from __future__ import annotations

import itertools

import pytest
import torch

import hdaf
from hdaf import dispatch

from conftest import GRAD_NAMES, TOL, assert_close, grads, make_inputs

CPU_BACKENDS = ["gather", "cpu"]

# (name, make_inputs kwargs, delta_attention kwargs)
CONFIGS = [
    ("T1", dict(T=1), dict()),
    ("T7_shared", dict(T=7), dict()),
    ("T7_perhead_x", dict(T=7, per_head_x=True), dict()),
    ("T7_perhead_w", dict(T=7, per_head_w=True), dict()),
    ("T7_perhead_xw", dict(T=7, per_head_x=True, per_head_w=True), dict()),
    ("T7_asym", dict(T=7, R=6), dict(max_distance=(1, 4))),
    ("T7_asym_zero", dict(T=7, R=4), dict(max_distance=(3, 0))),
    ("T7_paper", dict(T=7, R=5), hdaf.paper_preset(5)),
    ("T7_window", dict(T=7), dict(window=2)),
    ("T7_window_asym", dict(T=7), dict(window=(0, 3))),
    ("T7_causal", dict(T=7), dict(causal=True)),
    ("T7_causal_window", dict(T=7), dict(causal=True, window=(2, 5))),
    ("T7_pad", dict(T=7, pad_lengths=[4, 7]), dict()),
    ("T7_fully_masked_batch", dict(T=7, pad_lengths=[0, 5]), dict()),
    ("T7_empty_rows", dict(T=7, pad_lengths=[2, 7]), dict(causal=True, window=(0, 0))),
    ("T7_dk_ne_dv", dict(T=7, Dk=8, Dv=3), dict()),
    ("T7_scale", dict(T=7), dict(scale=0.37)),
    ("T63_mix", dict(T=63, Dk=16, Dv=12, per_head_w=True, pad_lengths=[50, 63], R=9), dict(window=(20, 7))),
    ("T63_causal_pad", dict(T=63, per_head_x=True, pad_lengths=[0, 31]), dict(causal=True)),
    ("T300_window", dict(T=300, B=1, H=2, pad_lengths=[280], R=11), dict(window=40, max_distance=5)),
    ("T300_full", dict(T=300, B=1, H=2, Dk=16, Dv=8, R=6), dict(max_distance=(2, 3))),
    ("T300_paper", dict(T=300, B=1, H=1, R=33), hdaf.paper_preset(33)),
]


def _run(backend, q, k, v, x, w, mask, kw):
    out = hdaf.delta_attention(q, k, v, x, w, key_padding_mask=mask, backend=backend, **kw)
    return (out,) + grads(out, (q, k, v, x, w))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,inp,kw", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_matches_naive_float64(backend, name, inp, kw):
    q, k, v, x, w, mask = make_inputs(**inp)
    ref = _run("naive", q, k, v, x, w, mask, kw)
    got = _run(backend, q, k, v, x, w, mask, kw)
    for label, r, g in zip(("out",) + GRAD_NAMES, ref, got):
        assert_close(f"{backend}/{name}/{label}", r, g, torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,inp,kw", [CONFIGS[i] for i in (2, 6, 11, 13, 17, 19)],
                         ids=[CONFIGS[i][0] for i in (2, 6, 11, 13, 17, 19)])
def test_matches_naive_float32(backend, name, inp, kw):
    q, k, v, x, w, mask = make_inputs(**inp)
    ref = _run("naive", q, k, v, x, w, mask, kw)
    q32, k32, v32, x32, w32 = (t.detach().float().requires_grad_() for t in (q, k, v, x, w))
    got = _run(backend, q32, k32, v32, x32, w32, mask, kw)
    for label, r, g in zip(("out",) + GRAD_NAMES, ref, got):
        # dw sums O(B·T²) terms: its float32 error grows with that count, so compare it
        # relative to its own scale.
        scale = max(1.0, r.abs().max().item()) if label == "w" else 1.0
        assert_close(f"{backend}/{name}/{label}", r / scale, g.double() / scale, torch.float32)


def test_bfloat16_computes_in_float32():
    q, k, v, x, w, mask = make_inputs(T=33, pad_lengths=[20, 33], requires_grad=False)
    ref = hdaf.delta_attention(q, k, v, x, w, key_padding_mask=mask, backend="naive")
    args = [t.bfloat16() for t in (q, k, v, x, w)]
    out = hdaf.delta_attention(*args, key_padding_mask=mask, backend="cpu")
    assert out.dtype == torch.bfloat16
    assert_close("bf16/out", ref, out.double(), torch.bfloat16)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fully_masked_rows_give_zero_output_and_gradient(backend):
    q, k, v, x, w, mask = make_inputs(T=9, pad_lengths=[0, 9])
    out, dq, dk, dv, dx, dw = _run(backend, q, k, v, x, w, mask, {})
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    for g in (dq[0], dk[0], dv[0], dx[0]):
        assert torch.equal(g, torch.zeros_like(g)) and torch.isfinite(g).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kw,inp", [
    (dict(), dict(T=5)),
    (dict(window=(1, 2), causal=True, max_distance=(2, 1)), dict(T=6, R=4, per_head_w=True, pad_lengths=[2])),
    (dict(), dict(T=4, per_head_x=True, Dk=3, Dv=2)),
])
def test_gradcheck(backend, kw, inp):
    inp = {"Dk": 4, **inp}
    q, k, v, x, w, mask = make_inputs(B=1, H=2, Dr=3, **inp)
    fn = lambda *a: hdaf.delta_attention(*a, key_padding_mask=mask, backend=backend, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, x, w), eps=1e-6, atol=1e-7)


def test_opcheck_forward_and_backward():
    for per_head, mask_lengths in ((False, None), (True, [3, 5])):
        q, k, v, x, w, mask = make_inputs(T=5, per_head_w=per_head, pad_lengths=mask_lengths)
        P = hdaf.reference.delta_projection(x, w).detach().requires_grad_()
        args = (q, k, v, P, mask, 3, 3, -1, 1, 0.5)
        torch.library.opcheck(torch.ops.hdaf.delta_attention_forward, args)
        out, lse = torch.ops.hdaf.delta_attention_forward(*args)
        # The backward op runs on saved (non-differentiable) tensors.
        q, k, v, P, out = (t.detach() for t in (q, k, v, P, out))
        bargs = (torch.randn_like(out), q, k, v, P, mask, out, lse, 3, 3, -1, 1, 0.5)
        torch.library.opcheck(torch.ops.hdaf.delta_attention_backward, bargs)


def test_torch_compile_fullgraph_traces_through_the_op():
    q, k, v, x, w, mask = make_inputs(T=16, pad_lengths=[16, 9])

    def f(q, k, v, x, w):
        return hdaf.delta_attention(q, k, v, x, w, key_padding_mask=mask, window=4, backend="cpu").sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v, x, w), (q, k, v, x, w))
    ref = torch.autograd.grad(f(q, k, v, x, w), (q, k, v, x, w))
    for name, r, g in zip(GRAD_NAMES, ref, got):
        assert_close(name, r, g, torch.float64)


def test_cpu_and_auto_are_served_by_the_compiled_kernel(monkeypatch):
    """Fails if a PyTorch reference (the fallback) served the call instead of the C++ op."""
    def refuse(*a, **k):
        raise AssertionError("a PyTorch reference ran instead of the compiled kernel")

    monkeypatch.setattr(hdaf.functional, "delta_attention_gather", refuse)
    monkeypatch.setattr(hdaf.functional, "delta_attention_naive", refuse)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("hdaf::delta_attention_forward", "CPU")
    q, k, v, x, w, _ = make_inputs(T=8)
    for backend in ("cpu", "auto"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = hdaf.delta_attention(q, k, v, x, w, backend=backend)
            out.sum().backward()
        names = {e.name for e in prof.events()}
        assert "hdaf::delta_attention_forward" in names, backend
        assert "hdaf::delta_attention_backward" in names, backend
    assert dispatch.resolve("auto", torch.device("cpu")) == "cpu"


def test_deterministic_bitwise():
    q, k, v, x, w, mask = make_inputs(B=2, H=4, T=150, Dk=16, R=9, pad_lengths=[150, 77],
                                      dtype=torch.float32)
    runs = [_run("cpu", q, k, v, x, w, mask, dict(window=(40, 3))) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_auto_falls_back_with_a_warning_naming_why(monkeypatch):
    monkeypatch.setattr(hdaf.ops, "_C", None)
    monkeypatch.setattr(hdaf.ops, "EXTENSION_ERROR", "ImportError: simulated")
    monkeypatch.setattr(dispatch, "_warned", set())
    q, k, v, x, w, _ = make_inputs(T=5)
    with pytest.warns(RuntimeWarning, match="falls back.*gather.*simulated"):
        out = hdaf.delta_attention(q, k, v, x, w)
    ref = hdaf.delta_attention(q, k, v, x, w, backend="naive")
    assert_close("fallback", ref, out, torch.float64)
    with pytest.raises(RuntimeError, match="backend='cpu' is not available.*simulated"):
        hdaf.delta_attention(q, k, v, x, w, backend="cpu")


def test_unavailable_backends_say_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, x, w, _ = make_inputs(T=5)
    with pytest.raises(RuntimeError, match="Triton needs a GPU, or the interpreter"):
        hdaf.delta_attention(q, k, v, x, w, backend="triton")
    with pytest.raises(RuntimeError, match="'cuda' backend runs CUDA tensors, got tensors on cpu"):
        hdaf.delta_attention(q, k, v, x, w, backend="cuda")


def test_non_contiguous_inputs_are_accepted():
    q, k, v, x, w, mask = make_inputs(T=12, Dk=6, pad_lengths=[12, 5], requires_grad=False)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    wt = w.t().contiguous().t()
    assert not qt.is_contiguous() and not xt.is_contiguous() and not wt.is_contiguous()
    ref = hdaf.delta_attention(q, k, v, x, w, key_padding_mask=mask, backend="naive")
    got = hdaf.delta_attention(qt, k, v, xt, wt, key_padding_mask=mask, backend="cpu")
    assert_close("noncontig", ref, got, torch.float64)


BAD = [
    (lambda a: {**a, "q": a["q"][0]}, ValueError, r"q must be 4-D, got shape \(3, 7, 8\)"),
    (lambda a: {**a, "k": a["k"][:, :, :5], "v": a["v"][:, :, :5]}, ValueError, r"q has Tq=7 queries but k has Tk=5 keys: Tq <= Tk is required.*\(2, 3, 7, 8\).*\(2, 3, 5, 8\)"),
    (lambda a: {**a, "k": a["k"][:1]}, ValueError, r"k must be \[B,Hkv,Tk,Dk\] with B=2, Dk=8 as in q \(2, 3, 7, 8\), got \(1, 3, 7, 8\)"),
    (lambda a: {**a, "v": a["v"][:1]}, ValueError, r"v must be \[B,Hkv,Tk,Dv\] with B=2, Tk=7 as in k \(2, 3, 7, 8\), got \(1, 3, 7, 8\)"),
    (lambda a: {**a, "v": a["v"][:, :1]}, ValueError, r"k and v must have the same number of key/value heads, got k \(2, 3, 7, 8\) and v \(2, 1, 7, 8\)"),
    (lambda a: {**a, "k": a["k"][:, :2], "v": a["v"][:, :2]}, ValueError, r"the query heads H=3 must be a multiple of the key/value heads Hkv=2"),
    (lambda a: {**a, "x": a["x"][:, :6]}, ValueError, r"x must be \[B,Tk,Dr\] with B=2, Tk=7.*got \(2, 6, 5\)"),
    (lambda a: {**a, "x": a["x"][0]}, ValueError, r"x must be 3-D or 4-D, got shape \(7, 5\)"),
    (lambda a: {**a, "w": a["w"][:4]}, ValueError, r"w must be \[Dr,R\] with Dr=5.*got \(4, 7\)"),
    (lambda a: {**a, "w": a["w"].expand(2, 5, 7)}, ValueError, r"w must be \[H,Dr,R\] with H=3, Dr=5.*got \(2, 5, 7\)"),
    (lambda a: {**a, "max_distance": (2, 2)}, ValueError, r"max_distance=\(L, U\)=\(2, 2\) needs R = L\+U\+1 = 5.*R=7"),
    (lambda a: {**a, "w": a["w"][:, :6]}, ValueError, r"odd number of buckets R.*R=6"),
    (lambda a: {**a, "window": -1}, ValueError, r"window must be non-negative, got \(-1, -1\)"),
    (lambda a: {**a, "window": (1, 2, 3)}, TypeError, r"window must be None, an int or a pair of ints, got \(1, 2, 3\)"),
    (lambda a: {**a, "max_distance": -3}, ValueError, r"max_distance must be non-negative"),
    (lambda a: {**a, "v": a["v"].float()}, TypeError, r"v has dtype torch.float32 but q has torch.float64"),
    (lambda a: {**a, "x": a["x"].to("meta")}, ValueError, r"x is on meta but q is on cpu"),
    (lambda a: {**{n: t[:, :, :0] if t.dim() == 4 else t for n, t in a.items() if n in "qkv"},
                **{n: a[n] for n in ("x", "w")}, "x": a["x"][:, :0]}, ValueError, r"T must be at least 1"),
    (lambda a: {**a, "key_padding_mask": torch.zeros(2, 7)}, TypeError, r"key_padding_mask must have dtype torch.bool.*got torch.float32"),
    (lambda a: {**a, "key_padding_mask": torch.zeros(2, 6, dtype=torch.bool)}, ValueError, r"key_padding_mask must be \[B,Tk\]=\(2, 7\), got \(2, 6\)"),
    (lambda a: {**a, "causal": 1}, TypeError, r"causal must be a bool, got int 1"),
    (lambda a: {**a, "scale": "big"}, TypeError, r"scale must be a finite float or None, got 'big'"),
    (lambda a: {**a, "backend": "fast"}, ValueError, r"backend must be one of .*got 'fast'"),
    (lambda a: {**a, "q": a["q"].numpy()}, TypeError, r"q must be a torch.Tensor, got ndarray"),
]


@pytest.mark.parametrize("mutate,exc,msg", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input_errors_name_the_argument(mutate, exc, msg):
    q, k, v, x, w, _ = make_inputs(requires_grad=False)
    args = mutate(dict(q=q, k=k, v=v, x=x, w=w))
    with pytest.raises(exc, match=msg):
        hdaf.delta_attention(**args)


def test_kernel_rejects_inconsistent_arguments_directly():
    q, k, v, x, w, _ = make_inputs(requires_grad=False)
    P = hdaf.reference.delta_projection(x, w)
    with pytest.raises(RuntimeError, match=r"P has R=7 buckets but L=1, U=1 need R = L\+U\+1 = 3"):
        torch.ops.hdaf.delta_attention_forward(q, k, v, P, None, 1, 1, -1, -1, 1.0)
    with pytest.raises(RuntimeError, match=r"key_padding_mask must be bool"):
        torch.ops.hdaf.delta_attention_forward(q, k, v, P, torch.zeros(2, 7), 3, 3, -1, -1, 1.0)


@pytest.mark.parametrize("Dk,Dv", [(160, 8), (8, 160), (129, 129)])
def test_cuda_head_dim_limit_is_enforced_by_the_shared_checks(Dk, Dv):
    """Dk=160 on CUDA must raise, not crash (on an H100 it once segfaulted). The CUDA op first runs
    hdaf::check_forward_args (csrc/delta_attention_checks.cpp, host-compiled); the test hook runs
    that very function with the CUDA limits, so the rejection is tested without a GPU. The CPU
    kernel takes any head dim."""
    q, k, v, x, w, _ = make_inputs(B=1, H=1, T=5, Dk=Dk, Dv=Dv, requires_grad=False)
    P = hdaf.reference.delta_projection(x, w)
    args = (q, k, v, P, None, 3, 3, -1, -1, 0.1)
    with pytest.raises(RuntimeError, match=rf"hdaf delta_attention \(CUDA\): head dims up to 128 "
                                           rf"are supported, got Dk={Dk} and Dv={Dv}"):
        torch.ops.hdaf._check_forward_args(*args, "cuda")
    assert torch.ops.hdaf._check_forward_args(*args, "cpu") == [1, 1, 1, 5, Dk, Dv, 7, 1, 5]
    q128, _, v128, _, _, _ = make_inputs(B=1, H=1, T=5, Dk=128, requires_grad=False)
    bf = lambda t: t.to(torch.bfloat16)  # noqa: E731  (the CUDA kernels' dtypes)
    assert torch.ops.hdaf._check_forward_args(bf(q128), bf(q128), bf(v128), bf(P), None, 3, 3, -1,
                                              -1, 0.1, "cuda")[4:6] == [128, 128]
    out, _ = torch.ops.hdaf.delta_attention_forward(*args)
    for backend in ("cpu", "auto"):  # the public path on CPU: served, and right
        got = hdaf.delta_attention(q, k, v, x, w, scale=0.1, backend=backend)
        ref = hdaf.delta_attention(q, k, v, x, w, scale=0.1, backend="naive")
        assert_close(f"Dk={Dk} {backend}", ref, got)
    assert_close("op", got, out)


HOOK_BAD = [  # (argument changes, message): the same checks serve the CPU and the CUDA op
    (dict(L=1, U=1), r"P has R=7 buckets but L=1, U=1 need R = L\+U\+1 = 3"),
    (dict(mask=torch.zeros(2, 7)), r"key_padding_mask must be bool \(True marks padding\), got Float"),
    (dict(mask=torch.zeros(2, 6, dtype=torch.bool)), r"key_padding_mask must be \[B,Tk\]=\[2, 7\], got \[2, 6\]"),
    (dict(wl=-2), r"window_left/window_right must be >= -1 \(-1: unbounded\), got -2, -1"),
    (dict(scale=float("inf")), r"scale must be finite, got inf"),
    (dict(v=lambda a: a["v"].float()), r"v has dtype Float but q has Double"),
    (dict(k=lambda a: a["k"][:, :, :6], v=lambda a: a["v"][:, :, :6]), r"q has Tq=7 queries but k has Tk=6 keys: Tq <= Tk is required"),
    (dict(k=lambda a: a["k"][:, :, :, :5]), r"k must be \[B,Hkv,Tk,Dk\] with B=2, Dk=8 as in q, got \[2, 3, 7, 5\]"),
    (dict(v=lambda a: a["v"][:, :2]), r"v must be \[B,Hkv,Tk,Dv\] with \[B,Hkv,Tk\]=\[2, 3, 7\] as in k, got \[2, 2, 7, 8\]"),
    (dict(k=lambda a: a["k"][:, :2], v=lambda a: a["v"][:, :2]), r"the query heads H=3 must be a multiple of the key/value heads Hkv=2 \(q \[2, 3, 7, 8\], k \[2, 2, 7, 8\]\)"),
    (dict(P=lambda a: a["P"][:, :, :6]), r"P must be \[B,Hp,Tk,R\] with B=2, Hp in \{1, 3\}, Tk=7, got \[2, 1, 6, 7\]"),
    (dict(q=lambda a: a["q"].int(), k=lambda a: a["k"].int(), v=lambda a: a["v"].int(),
          P=lambda a: a["P"].int()), r"q must be float16, bfloat16, float32 or float64, got Int"),
]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("change,msg", HOOK_BAD, ids=[f"bad{i}" for i in range(len(HOOK_BAD))])
def test_shared_checks_name_the_argument_and_the_value(change, msg, device):
    q, k, v, x, w, _ = make_inputs(requires_grad=False)
    a = dict(q=q, k=k, v=v, P=hdaf.reference.delta_projection(x, w), mask=None, L=3, U=3, wl=-1,
             wr=-1, scale=1.0)
    a.update({n: c(a) if callable(c) else c for n, c in change.items()})
    with pytest.raises(RuntimeError, match=rf"\({device.upper()}\): .*{msg}"):
        torch.ops.hdaf._check_forward_args(*a.values(), device)


def test_paper_preset_is_upper_triangular_with_unclipped_offsets():
    preset = hdaf.paper_preset(4)
    assert preset == {"max_distance": (0, 3), "window": (0, 3)}
    q, k, v, x, w, _ = make_inputs(T=6, R=4, requires_grad=False)
    # Key 5 is outside the window of query 0 and 1; the first query sees keys 0..3 only:
    v2 = v.clone()
    v2[:, :, 4:] += 100.0
    a = hdaf.delta_attention(q, k, v, x, w, backend="cpu", **preset)
    b = hdaf.delta_attention(q, k, v2, x, w, backend="cpu", **preset)
    assert torch.equal(a[:, :, 0], b[:, :, 0])
    assert not torch.equal(a[:, :, 1], b[:, :, 1])


def test_double_backward_raises_a_clear_error():
    q, k, v, x, w, _ = make_inputs(T=5)
    out = hdaf.delta_attention(q, k, v, x, w, backend="cpu")
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="first-order gradients only"):
        dq.sum().backward()
