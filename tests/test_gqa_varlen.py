"""Grouped-query heads, a query block at the end of the keys (Tq < Tk) and packed batches
(``hdaf.delta_attention_varlen``): every non-Triton backend that takes them against "naive" in
float64, forward and all five gradients; the structural identities (GQA = repeated k/v, varlen =
per-sequence calls concatenated, Tq < Tk = the last rows of the full call); the ops' opcheck and
torch.compile; the argument errors; and what the dispatch sends to the "cuda" backend (its
kernels are tested in tests/test_cuda.py and, on the CPU, by host emulation)."""
from __future__ import annotations

import os

import pytest
import torch

import hdaf
from hdaf import dispatch
from hdaf.reference import delta_projection, varlen_projection

from conftest import GRAD_NAMES, assert_close, grads

BACKENDS = ["gather", "cpu"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_gqa(B=2, H=4, Hkv=2, Tq=7, Tk=7, Dk=8, Dv=None, Dr=5, R=7, per_head_x=False,
             per_head_w=False, pad_lengths=None, dtype=torch.float64, seed=0, requires_grad=True):
    """q [B,H,Tq,Dk], k/v [B,Hkv,Tk,D], x [B,(H),Tk,Dr], w [(H),Dr,R]; pad_lengths: real keys."""
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or Dk

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(
            requires_grad)

    q, k, v = rnd(B, H, Tq, Dk), rnd(B, Hkv, Tk, Dk), rnd(B, Hkv, Tk, Dv)
    x = rnd(B, H, Tk, Dr) if per_head_x else rnd(B, Tk, Dr)
    w = rnd(H, Dr, R) if per_head_w else rnd(Dr, R)
    mask = None
    if pad_lengths is not None:
        mask = torch.arange(Tk)[None, :] >= torch.tensor(pad_lengths)[:, None]
    return q, k, v, x, w, mask


def cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def make_varlen(lq, lk, H=4, Hkv=2, Dk=8, Dv=None, Dr=5, R=7, per_head_x=False,
                per_head_w=False, dtype=torch.float64, seed=0, requires_grad=True):
    """Packed q [Σlq,H,Dk], k/v [Σlk,Hkv,D], x [Σlk,(H),Dr], w, cu_seqlens_q/k, max lengths."""
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or Dk

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(
            requires_grad)

    Tq, Tk = sum(lq), sum(lk)
    q, k, v = rnd(Tq, H, Dk), rnd(Tk, Hkv, Dk), rnd(Tk, Hkv, Dv)
    x = rnd(Tk, H, Dr) if per_head_x else rnd(Tk, Dr)
    w = rnd(H, Dr, R) if per_head_w else rnd(Dr, R)
    return q, k, v, x, w, cu(lq), cu(lk), max(lq), max(lk)


def run(backend, q, k, v, x, w, mask, kw):
    out = hdaf.delta_attention(q, k, v, x, w, key_padding_mask=mask, backend=backend, **kw)
    return (out,) + grads(out, (q, k, v, x, w))


def run_varlen(backend, q, k, v, x, w, cq, ck, mq, mk, kw):
    out = hdaf.delta_attention_varlen(q, k, v, x, w, cq, ck, mq, mk, backend=backend, **kw)
    return (out,) + grads(out, (q, k, v, x, w))


def compare(tag, ref, got, dtype=torch.float64):
    for label, r, g in zip(("out",) + GRAD_NAMES, ref, got):
        assert_close(f"{tag}/{label}", r, g, dtype)


# ---- padded calls: (name, make_gqa kwargs, delta_attention kwargs) ------------------------------
# T in {1, 7, 63, 300}, Tq in {1, 3, Tk}, Hkv in {1, 2, H}, with padding, causal, windows, shared
# and per-head x and w, and fully masked rows. Tk = 300 with Tq <= 3 also checks the pruned P of
# the kernel path (key rows far before the queries computed in column 0 only).
PADDED = [
    ("T1_mqa", dict(Tq=1, Tk=1, Hkv=1), dict()),
    ("T7_q1_gqa_causal", dict(Tq=1, Tk=7), dict(causal=True)),
    ("T7_q3_mha_window_phx", dict(Tq=3, Tk=7, Hkv=4, per_head_x=True), dict(window=(2, 1))),
    ("T7_qT_mqa_phw_pad", dict(Tq=7, Tk=7, Hkv=1, per_head_w=True, pad_lengths=[4, 7]), dict()),
    ("T7_q3_empty_rows", dict(Tq=3, Tk=7, pad_lengths=[5, 7]), dict(causal=True, window=(0, 0))),
    ("T7_q3_asym_dkdv", dict(Tq=3, Tk=7, Dk=6, Dv=3, R=6), dict(max_distance=(1, 4), scale=0.4)),
    ("T63_q3_gqa_causal_pad_phxw", dict(Tq=3, Tk=63, per_head_x=True, per_head_w=True,
                                        pad_lengths=[40, 63]), dict(causal=True)),
    ("T63_qT_gqa_window_pad", dict(Tq=63, Tk=63, pad_lengths=[50, 20]), dict(window=(10, 5))),
    ("T63_q1_fully_masked_batch", dict(Tq=1, Tk=63, Hkv=1, pad_lengths=[0, 63]), dict()),
    ("T300_q3_gqa_causal", dict(B=1, Tq=3, Tk=300, R=11), dict(causal=True, max_distance=5)),
    ("T300_q1_gqa_window_phx", dict(B=1, Tq=1, Tk=300, per_head_x=True), dict(window=(100, 0))),
    ("T300_qT_mqa_window_pad", dict(B=1, H=2, Hkv=1, Tq=300, Tk=300, pad_lengths=[280], R=11,
                                    Dk=4), dict(window=40, max_distance=5)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,inp,kw", PADDED, ids=[c[0] for c in PADDED])
def test_padded_matches_naive_float64(backend, name, inp, kw):
    q, k, v, x, w, mask = make_gqa(**inp)
    compare(f"{backend}/{name}", run("naive", q, k, v, x, w, mask, kw),
            run(backend, q, k, v, x, w, mask, kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_give_zero_output_and_gradient(backend):
    # Query rows 1, 2 of batch 0 (positions 5, 6) see only themselves, and those keys are padding.
    q, k, v, x, w, mask = make_gqa(Tq=3, Tk=7, pad_lengths=[5, 7])
    out, dq, *_ = run(backend, q, k, v, x, w, mask, dict(causal=True, window=(0, 0)))
    assert torch.equal(out[0, :, 1:], torch.zeros_like(out[0, :, 1:]))
    assert torch.equal(dq[0, :, 1:], torch.zeros_like(dq[0, :, 1:]))
    assert out[0, :, 0].abs().sum() > 0 and torch.isfinite(dq).all()


@pytest.mark.parametrize("Hkv", [1, 2])
def test_gqa_equals_the_call_on_repeated_kv(Hkv):
    q, k, v, x, w, mask = make_gqa(H=4, Hkv=Hkv, Tq=5, Tk=9, per_head_w=True, pad_lengths=[9, 6])
    kw = dict(window=(4, 1))
    got = run("cpu", q, k, v, x, w, mask, kw)
    kr = k.detach().repeat_interleave(4 // Hkv, 1).requires_grad_()
    vr = v.detach().repeat_interleave(4 // Hkv, 1).requires_grad_()
    ref = run("cpu", q, kr, vr, x, w, mask, kw)
    # dk, dv of a key/value head: the sums over the query heads of its group
    ref = list(ref)
    for n in (2, 3):
        ref[n] = ref[n].unflatten(1, (Hkv, 4 // Hkv)).sum(2)
    compare(f"gqa{Hkv}", ref, got)


@pytest.mark.parametrize("kw", [dict(causal=True), dict(window=(3, 2)), dict()], ids=str)
def test_query_block_equals_the_last_rows_of_the_full_call(kw):
    """Tq < Tk puts the queries at the last Tq positions: the call equals those rows of Tq = Tk."""
    q, k, v, x, w, mask = make_gqa(Tq=11, Tk=11, pad_lengths=[11, 8], requires_grad=False)
    full = hdaf.delta_attention(q, k, v, x, w, key_padding_mask=mask, backend="cpu", **kw)
    for Tq in (1, 3):
        part = hdaf.delta_attention(q[:, :, -Tq:], k, v, x, w, key_padding_mask=mask,
                                    backend="cpu", **kw)
        assert_close(f"Tq={Tq}", full[:, :, -Tq:], part)


# ---- packed batches ---------------------------------------------------------------------------
# lengths {0, 1, 7, 63, 300} mixed in one batch; (name, make_varlen kwargs, call kwargs)
VARLEN = [
    ("self_gqa", dict(lq=[7, 0, 63, 1, 300], lk=[7, 0, 63, 1, 300]), dict()),
    ("tq_lt_tk_mqa_causal_phxw", dict(lq=[1, 3, 0, 7, 63], lk=[7, 63, 0, 7, 300], Hkv=1,
                                      per_head_x=True, per_head_w=True), dict(causal=True)),
    ("self_mha_window_phw", dict(lq=[300, 1, 0, 63, 7], lk=[300, 1, 0, 63, 7], Hkv=4,
                                 per_head_w=True, R=6), dict(window=(5, 3), max_distance=(2, 3))),
    ("decode_gqa_phx", dict(lq=[1, 1, 0, 1, 1], lk=[300, 1, 0, 7, 63], per_head_x=True),
     dict(causal=True, window=(40, 0))),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,inp,kw", VARLEN, ids=[c[0] for c in VARLEN])
def test_varlen_matches_naive_float64(backend, name, inp, kw):
    args = make_varlen(**inp)
    compare(f"{backend}/{name}", run_varlen("naive", *args, kw), run_varlen(backend, *args, kw))


@pytest.mark.parametrize("backend", ["naive", "cpu"])
def test_varlen_equals_the_per_sequence_calls_concatenated(backend):
    lq, lk = [3, 0, 7, 1, 63, 0], [7, 0, 7, 5, 63, 4]
    q, k, v, x, w, cq, ck, mq, mk = make_varlen(lq, lk, per_head_x=True, requires_grad=False)
    kw = dict(causal=True, window=(20, 0))
    out = hdaf.delta_attention_varlen(q, k, v, x, w, cq, ck, mq, mk, backend=backend, **kw)
    pieces = []
    for b in range(len(lq)):
        if lq[b] == 0:
            continue
        sq, sk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        o = hdaf.delta_attention(q[sq].transpose(0, 1)[None], k[sk].transpose(0, 1)[None],
                                 v[sk].transpose(0, 1)[None], x[sk].transpose(0, 1)[None], w,
                                 backend="cpu", **kw)
        pieces.append(o[0].transpose(0, 1))
    assert_close("varlen", torch.cat(pieces), out)


def test_varlen_float32_and_bfloat16():
    args = make_varlen([7, 63, 0, 1], [7, 63, 0, 9])
    ref = run_varlen("naive", *args, dict(causal=True))
    low = [t.detach().float().requires_grad_() for t in args[:5]]
    got = run_varlen("cpu", *low, *args[5:], dict(causal=True))
    for label, r, g in zip(("out",) + GRAD_NAMES, ref, got):
        scale = max(1.0, r.abs().max().item()) if label == "w" else 1.0
        assert_close(f"f32/{label}", r / scale, g.double() / scale, torch.float32)
    bf = [t.detach().bfloat16() for t in args[:5]]
    out = hdaf.delta_attention_varlen(*bf, *args[5:], causal=True, backend="cpu")
    assert out.dtype == torch.bfloat16
    assert_close("bf16/out", ref[0], out.double(), torch.bfloat16)


def test_non_contiguous_inputs_are_accepted():
    q, k, v, x, w, mask = make_gqa(Tq=3, Tk=9, pad_lengths=[9, 5], requires_grad=False)
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    ref = hdaf.delta_attention(q, k, v, x, w, key_padding_mask=mask, backend="naive")
    assert_close("padded", ref, hdaf.delta_attention(q, kt, v, x, w, key_padding_mask=mask,
                                                     backend="cpu"))
    q, k, v, x, w, cq, ck, mq, mk = make_varlen([3, 0, 4], [5, 2, 4], requires_grad=False)
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)
    assert not qt.is_contiguous()
    ref = hdaf.delta_attention_varlen(q, k, v, x, w, cq, ck, mq, mk, backend="naive")
    assert_close("varlen", ref, hdaf.delta_attention_varlen(qt, k, v, x, w, cq, ck, mq, mk,
                                                            backend="cpu"))


def test_varlen_deterministic_bitwise():
    args = make_varlen([150, 3, 77, 1], [150, 40, 77, 200], dtype=torch.float32, Dk=16)
    runs = [run_varlen("cpu", *args, dict(window=(30, 3))) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_varlen_keys_of_a_sequence_without_queries_get_zero_gradient():
    q, k, v, x, w, cq, ck, mq, mk = make_varlen([2, 0, 3], [4, 5, 3])
    out, dq, dk, dv, dx, dw = run_varlen("cpu", q, k, v, x, w, cq, ck, mq, mk, {})
    assert out.shape == (5, 4, 8)
    for g in (dk[4:9], dv[4:9], dx[4:9]):
        assert torch.equal(g, torch.zeros_like(g))


def test_gradcheck_gqa_tq_lt_tk_and_varlen():
    q, k, v, x, w, mask = make_gqa(B=1, H=2, Hkv=1, Tq=2, Tk=5, Dk=3, Dr=2, R=3,
                                   per_head_w=True, pad_lengths=[4])
    fn = lambda *a: hdaf.delta_attention(*a, key_padding_mask=mask, causal=True,  # noqa: E731
                                         backend="cpu")
    assert torch.autograd.gradcheck(fn, (q, k, v, x, w), eps=1e-6, atol=1e-7)
    q, k, v, x, w, cq, ck, mq, mk = make_varlen([2, 0, 1, 3], [2, 1, 4, 3], H=2, Hkv=1, Dk=3,
                                                Dr=2, R=3, per_head_x=True)
    fn = lambda *a: hdaf.delta_attention_varlen(*a, cq, ck, mq, mk, window=(1, 1),  # noqa: E731
                                                backend="cpu")
    assert torch.autograd.gradcheck(fn, (q, k, v, x, w), eps=1e-6, atol=1e-7)


# ---- the ops: opcheck and torch.compile --------------------------------------------------------

def test_opcheck_padded_ops_with_gqa_and_a_query_block():
    q, k, v, x, w, mask = make_gqa(Tq=3, Tk=6, per_head_w=True, pad_lengths=[6, 4])
    P = delta_projection(x, w).detach().requires_grad_()
    args = (q, k, v, P, mask, 3, 3, -1, 0, 0.5)
    torch.library.opcheck(torch.ops.hdaf.delta_attention_forward, args)
    out, lse = torch.ops.hdaf.delta_attention_forward(*args)
    assert out.shape == (2, 4, 3, 8) and lse.shape == (2, 4, 3)
    q, k, v, P, out = (t.detach() for t in (q, k, v, P, out))
    torch.library.opcheck(torch.ops.hdaf.delta_attention_backward,
                          (torch.randn_like(out), q, k, v, P, mask, out, lse, 3, 3, -1, 0, 0.5))


@pytest.mark.parametrize("per_head", [False, True])
def test_opcheck_varlen_ops(per_head):
    q, k, v, x, w, cq, ck, mq, mk = make_varlen([2, 0, 3, 1], [4, 0, 3, 5], per_head_w=per_head)
    P = varlen_projection(x, w).detach().requires_grad_()
    args = (q, k, v, P, cq, ck, mq, mk, 3, 3, 2, -1, 0.5)
    torch.library.opcheck(torch.ops.hdaf.delta_attention_varlen_forward, args)
    out, lse = torch.ops.hdaf.delta_attention_varlen_forward(*args)
    assert out.shape == (6, 4, 8) and lse.shape == (4, 6) and lse.dtype == torch.float64
    q, k, v, P, out = (t.detach() for t in (q, k, v, P, out))
    torch.library.opcheck(torch.ops.hdaf.delta_attention_varlen_backward,
                          (torch.randn_like(out), q, k, v, P, cq, ck, mq, mk, out, lse, 3, 3, 2,
                           -1, 0.5))


def test_torch_compile_fullgraph_varlen_and_decode():
    args = make_varlen([5, 0, 9], [5, 2, 12], per_head_x=True)
    q, k, v, x, w, cq, ck, mq, mk = args

    def f(q, k, v, x, w):
        return hdaf.delta_attention_varlen(q, k, v, x, w, cq, ck, mq, mk, causal=True,
                                           backend="cpu").sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v, x, w), (q, k, v, x, w))
    ref = torch.autograd.grad(f(q, k, v, x, w), (q, k, v, x, w))
    for name, r, g in zip(GRAD_NAMES, ref, got):
        assert_close(f"varlen/{name}", r, g)

    q, k, v, x, w, mask = make_gqa(Tq=1, Tk=300, pad_lengths=[300, 120])

    def g(q, k, v, x, w):
        return hdaf.delta_attention(q, k, v, x, w, key_padding_mask=mask, causal=True,
                                    backend="auto").sum()

    compiled = torch.compile(g, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v, x, w), (q, k, v, x, w))
    ref = torch.autograd.grad(g(q, k, v, x, w), (q, k, v, x, w))
    for name, r, g_ in zip(GRAD_NAMES, ref, got):
        assert_close(f"decode/{name}", r, g_)


def test_auto_on_cpu_serves_every_feature_with_the_cpp_kernel(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a PyTorch reference ran instead of the compiled kernel")

    for name in ("delta_attention_gather", "delta_attention_naive",
                 "delta_attention_varlen_gather", "delta_attention_varlen_naive"):
        monkeypatch.setattr(hdaf.functional, name, refuse)
    q, k, v, x, w, _ = make_gqa(Tq=2, Tk=6, Hkv=1)
    hdaf.delta_attention(q, k, v, x, w).sum().backward()
    args = make_varlen([2, 3], [4, 3])
    hdaf.delta_attention_varlen(*args).sum().backward()


# ---- errors ------------------------------------------------------------------------------------

def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


def _three_kv_heads(t):
    return torch.cat([t, t[:, :1]], dim=1)


# The batch below: lq = [2, 0, 3, 1] (cu_seqlens_q [0, 2, 2, 5, 6]), lk = [3, 0, 3, 3]
# (cu_seqlens_k [0, 3, 3, 6, 9]), H=4, Hkv=2.
VARLEN_BAD = [
    (dict(cq=_i32(0, 2, 5)), ValueError,
     r"cu_seqlens_q and cu_seqlens_k must both be \[B\+1\], got shapes \(3,\) and \(5,\)"),
    (dict(cq=_i32(1, 2, 2, 5, 6)), ValueError,
     r"cu_seqlens_q\[0\] must be 0, got cu_seqlens_q=\[1, 2, 2, 5, 6\]"),
    (dict(ck=_i32(0, 3, 3, 6, 8)), ValueError,
     r"cu_seqlens_k\[-1\] must be Total_k=9, got cu_seqlens_k=\[0, 3, 3, 6, 8\]"),
    (dict(cq=_i32(0, 4, 2, 5, 6)), ValueError,
     r"cu_seqlens_q must be non-decreasing, got cu_seqlens_q=\[0, 4, 2, 5, 6\]"),
    (dict(cq=_i32(0, 1, 4, 5, 6)), ValueError,
     r"sequence 1 has Tq=3 queries but Tk=0 keys: Tq <= Tk is required in every sequence"),
    (dict(mq=2), ValueError, r"max_seqlen_q=2 is smaller than the longest sequence of "
                             r"cu_seqlens_q, 3 \(lengths \[2, 0, 3, 1\]\)"),
    (dict(mk=2), ValueError, r"max_seqlen_k=2 is smaller than the longest sequence of cu_seqlens_k"),
    (dict(mk=-1), ValueError, r"max_seqlen_k must be >= 0, got -1"),
    (dict(cq=torch.tensor([0, 2, 2, 5, 6])), TypeError,
     r"cu_seqlens_q must have dtype torch.int32, got torch.int64"),
    (dict(ck=_i32(0, 3, 3, 6, 9)[None]), ValueError,
     r"cu_seqlens_k must be 1-D \[B\+1\], got shape \(1, 5\)"),
    (dict(cq=[0, 2, 2, 5, 6]), TypeError, r"cu_seqlens_q must be an int32 torch.Tensor \[B\+1\], got list"),
    (dict(mq=2.5), TypeError, r"max_seqlen_q must be an int, got float 2.5"),
    (dict(k=lambda a: _three_kv_heads(a["k"]), v=lambda a: _three_kv_heads(a["v"])), ValueError,
     r"the query heads H=4 must be a multiple of the key/value heads Hkv=3"),
    (dict(v=lambda a: a["v"][:, :1]), ValueError, r"k and v must have the same number of key/value heads"),
    (dict(k=lambda a: a["k"][:, :, :5]), ValueError, r"k must be \[Total_k,Hkv,Dk\] with Dk=8"),
    (dict(x=lambda a: a["x"][:5]), ValueError, r"x must be \[Total_k,Dr\] with Total_k=9 .*got \(5, 5\)"),
    (dict(x=lambda a: a["x"][:, None].expand(9, 3, 5)), ValueError,
     r"x must be \[Total_k,H,Dr\] with Total_k=9, H=4 .*got \(9, 3, 5\)"),
    (dict(q=lambda a: a["q"][None]), ValueError, r"q must be 3-D, got shape \(1, 6, 4, 8\)"),
    (dict(v=lambda a: a["v"].float()), TypeError, r"v has dtype torch.float32 but q has torch.float64"),
    (dict(cq=_i32(0, 2, 2, 5, 6).to("meta")), ValueError, r"cu_seqlens_q is on meta but q is on cpu"),
]


@pytest.mark.parametrize("change,exc,msg", VARLEN_BAD, ids=[f"bad{i}" for i in range(len(VARLEN_BAD))])
def test_varlen_bad_input_errors_name_the_argument_and_values(change, exc, msg):
    q, k, v, x, w, cq, ck, mq, mk = make_varlen([2, 0, 3, 1], [3, 0, 3, 3], requires_grad=False)
    a = dict(q=q, k=k, v=v, x=x, w=w, cq=cq, ck=ck, mq=mq, mk=mk)
    a.update({n: c(a) if callable(c) else c for n, c in change.items()})
    with pytest.raises(exc, match=msg):
        hdaf.delta_attention_varlen(*a.values())


CPP_VARLEN_BAD = [  # the op's own checks (what runs under torch.compile, and for direct callers)
    (dict(cq=_i32(0, 2, 2, 6, 6)), r"max_seqlen_q=3 is smaller than sequence 2's length 4"),
    (dict(cq=_i32(0, 2, 3, 5, 6)), r"sequence 1 has Tq=1 queries but Tk=0 keys"),
    (dict(cq=_i32(0, 2, 2, 5, 7)), r"cu_seqlens_q\[-1\] must be Total_q=6, got 7"),
    (dict(cq=_i32(1, 2, 2, 5, 6)), r"cu_seqlens_q\[0\] must be 0, got 1"),
    (dict(ck=_i32(0, 3, 1, 6, 9)), r"cu_seqlens_k must be non-decreasing, "
                                   r"got cu_seqlens_k\[1\]=3 > cu_seqlens_k\[2\]=1"),
    (dict(cq=_i32(0, 2, 2, 5, 6, 6)), r"cu_seqlens_q and cu_seqlens_k must both be \[B\+1\], "
                                      r"got lengths 6 and 5"),
    (dict(mk=2), r"max_seqlen_k=2 is smaller than sequence 0's length 3"),
    (dict(cq=torch.tensor([0, 2, 2, 5, 6])), r"cu_seqlens_q must be int32, got Long"),
    (dict(k=lambda a: _three_kv_heads(a["k"]), v=lambda a: _three_kv_heads(a["v"])),
     r"the query heads H=4 must be a multiple of the key/value heads Hkv=3"),
    (dict(P=lambda a: a["P"][:, :, :5]), r"P has R=5 buckets but L=3, U=3 need R = L\+U\+1 = 7"),
    (dict(P=lambda a: a["P"][:4]), r"P must be \[Total_k,Hp,R\] with Total_k=9, Hp in \{1, 4\}, "
                                   r"got \[4, 1, 7\]"),
]


@pytest.mark.parametrize("change,msg", CPP_VARLEN_BAD, ids=[f"bad{i}" for i in range(len(CPP_VARLEN_BAD))])
def test_varlen_op_checks_name_the_argument_and_values(change, msg):
    q, k, v, x, w, cq, ck, mq, mk = make_varlen([2, 0, 3, 1], [3, 0, 3, 3], requires_grad=False)
    a = dict(q=q, k=k, v=v, P=varlen_projection(x, w), cq=cq, ck=ck, mq=mq, mk=mk)
    a.update({n: c(a) if callable(c) else c for n, c in change.items()})
    with pytest.raises(RuntimeError, match=rf"hdaf delta_attention \(CPU\): .*({msg})"):
        torch.ops.hdaf.delta_attention_varlen_forward(*a.values(), 3, 3, -1, -1, 0.5)
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.hdaf._check_varlen_args(*a.values(), 3, 3, -1, -1, 0.5, "cpu")


def test_padded_bad_query_block_and_head_ratio():
    q, k, v, x, w, _ = make_gqa(Tq=5, Tk=4, requires_grad=False)
    with pytest.raises(ValueError, match=r"q has Tq=5 queries but k has Tk=4 keys"):
        hdaf.delta_attention(q, k, v, x, w)
    q, k, v, x, w, _ = make_gqa(H=6, Hkv=4, requires_grad=False)
    with pytest.raises(ValueError, match=r"the query heads H=6 must be a multiple of the "
                                         r"key/value heads Hkv=4 \(q \(2, 6, 7, 8\), k \(2, 4, 7, 8\)"):
        hdaf.delta_attention(q, k, v, x, w)
    q, k, v, x, w, _ = make_gqa(Tq=2, Tk=6, requires_grad=False)
    with pytest.raises(ValueError, match=r"x must be \[B,Tk,Dr\] with B=2, Tk=6 .*got \(2, 2, 5\)"):
        hdaf.delta_attention(q, k, v, x[:, -2:], w)
    with pytest.raises(ValueError, match=r"key_padding_mask must be \[B,Tk\]=\(2, 6\), got \(2, 2\)"):
        hdaf.delta_attention(q, k, v, x, w, key_padding_mask=torch.zeros(2, 2, dtype=torch.bool))


# ---- the cuda backend computes the three features ----------------------------------------------

CUDA = torch.device("cuda")  # a device object only: nothing here touches a GPU


@pytest.fixture
def available(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())

    def simulate(*names):
        monkeypatch.setattr(dispatch, "unavailable_reason",
                            lambda b, dev: None if b in names else f"{b} simulated as missing")
    return simulate


FEATURE_CASES = [{"gqa": "q with H=8 heads and k, v with Hkv=2"},
                 {"tq<tk": "Tq=1 queries and Tk=4096 keys"}, {"varlen": "a packed batch"}]


@pytest.mark.parametrize("features", FEATURE_CASES, ids=["gqa", "tq<tk", "varlen"])
def test_cuda_backend_takes_the_features(available, monkeypatch, features):
    """The CUDA kernels take grouped heads, Tq < Tk and packed batches; `auto` still prefers the
    measured Triton kernels, and takes cuda when Triton is missing."""
    monkeypatch.setattr(dispatch, "_has_triton_varlen", lambda: True)
    available("triton", "cuda", "naive", "gather")
    assert dispatch.resolve("cuda", CUDA, torch.bfloat16, 64, features=features) == "cuda"
    assert dispatch.resolve("auto", CUDA, torch.bfloat16, 64, features=features) == "triton"
    available("cuda")
    assert dispatch.resolve("auto", CUDA, torch.float16, 128, features=features) == "cuda"
    with pytest.warns(RuntimeWarning, match=r"falls back.*gather.*cuda: no torch.float64 kernel"):
        assert dispatch.resolve("auto", CUDA, torch.float64, 64, features=features) == "gather"
    assert dispatch.auto_candidates("cpu", torch.float32, 64, ("gqa", "tq<tk", "varlen")) == (
        ["cpu"], [])


def test_cuda_backend_refuses_global_positions_and_names_triton(available):
    available("triton", "cuda", "naive", "gather")
    with pytest.raises(NotImplementedError, match=r"backend='cuda' does not support query and key "
                                                  r"blocks at global positions.*; use "
                                                  r"backend='triton'"):
        dispatch.resolve("cuda", CUDA, torch.bfloat16, 64, features={"offsets": "q_start=8"})


def test_triton_varlen_without_its_op_says_which_backend_to_use(available, monkeypatch):
    available("triton", "cpu", "naive", "gather")
    monkeypatch.setattr(dispatch, "_has_triton_varlen", lambda: False)
    args = make_varlen([2, 3], [2, 4], requires_grad=False)
    with pytest.raises(NotImplementedError, match=r"backend='triton' has no packed-batch kernels "
                                                  r"yet .*hdaf::triton_delta_attention_varlen_forward"
                                                  r".*use backend='cpu' for CPU tensors"):
        hdaf.delta_attention_varlen(*args, backend="triton")
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="no packed-batch kernels"):  # auto on CUDA: reference
        assert dispatch.resolve("auto", CUDA, torch.bfloat16, 64, features={"varlen": "x"}) == "gather"


@pytest.mark.parametrize("backend", ["naive"] + BACKENDS)
def test_varlen_without_any_query_is_empty_with_zero_gradients(backend):
    """A packed batch whose sequences hold keys but no query: an empty output that backward
    goes through (the spec's empty-batch row), zero gradients everywhere. The gather path
    returned a fresh empty tensor outside the graph, so backward raised (found by the packed
    fuzzer)."""
    q, k, v, x, w, cq, ck, mq, mk = make_varlen([0, 0], [3, 5])
    out = hdaf.delta_attention_varlen(q, k, v, x, w, cq, ck, max(1, mq), mk, max_distance=3,
                                      backend=backend)
    assert out.shape == (0, 4, 8)
    out.sum().backward()
    for t in (q, k, v, x, w):
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


# ---- without the delta term (x = w = None) ----------------------------------------------------
# The spec defines it as the operator with a zero term: the reference is "naive" given zero x, w.
NO_DELTA_PADDED = [PADDED[i] for i in (1, 3, 4, 6, 8, 11)]
NO_DELTA_VARLEN = [VARLEN[i] for i in (1, 3)]


def _plain_vs_zero_term(call, q, k, v, x, w, tag):
    """``call(q, k, v, x, w)`` with ``x = w = None`` against "naive" with zero x and w: forward
    and dq, dk, dv in float64."""
    out = call(q, k, v, None, None, None)
    ref = call(q, k, v, torch.zeros_like(x), torch.zeros_like(w), "naive")
    compare(tag, (ref,) + grads(ref, (q, k, v)), (out,) + grads(out, (q, k, v)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,inp,kw", NO_DELTA_PADDED, ids=[c[0] for c in NO_DELTA_PADDED])
def test_no_delta_term_is_attention_with_a_zero_term(backend, name, inp, kw):
    q, k, v, x, w, mask = make_gqa(**inp)

    def call(q, k, v, x, w, ref_backend):
        return hdaf.delta_attention(q, k, v, x, w, key_padding_mask=mask,
                                    backend=ref_backend or backend, **kw)

    _plain_vs_zero_term(call, q, k, v, x, w, f"{backend}/{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,inp,kw", NO_DELTA_VARLEN, ids=[c[0] for c in NO_DELTA_VARLEN])
def test_varlen_no_delta_term_is_attention_with_a_zero_term(backend, name, inp, kw):
    q, k, v, x, w, cq, ck, mq, mk = make_varlen(**inp)

    def call(q, k, v, x, w, ref_backend):
        return hdaf.delta_attention_varlen(q, k, v, x, w, cq, ck, mq, mk,
                                           backend=ref_backend or backend, **kw)

    _plain_vs_zero_term(call, q, k, v, x, w, f"{backend}/{name}")


@pytest.mark.parametrize("given", ["x", "w"])
def test_delta_term_needs_both_x_and_w(given):
    q, k, v, x, w, _ = make_gqa(requires_grad=False)
    x, w = (x, None) if given == "x" else (None, w)
    msg = (r"x and w must both be tensors \(the delta term\) or both be None \(no delta term\), "
           r"got x=(None|a tensor of shape \((2, )?7, 5\)) and w=(None|a tensor of shape \(5, 7\))")
    with pytest.raises(TypeError, match=msg):
        hdaf.delta_attention(q, k, v, x, w)
    with pytest.raises(TypeError, match=msg):
        hdaf.delta_attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1),
                                    v[0].transpose(0, 1), x if x is None else x[0], w,
                                    cu([7]), cu([7]), 7, 7)
