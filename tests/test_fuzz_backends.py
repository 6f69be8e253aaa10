"""Differential fuzzer: every available backend against the "naive" reference on generated
inputs, forward and the five gradients (dq, dk, dv, dx, dw), or the same error type.

Hypothesis draws shapes (B, H, grouped heads, Tq <= Tk from 1 to 300 with small sizes favoured,
Dk != Dv, Dr, R), every mask kind (padding with holes and whole padded batch elements, causal,
windows, hence fully masked rows), shared and per-head ``x`` and ``w``, non-contiguous and
expanded (stride-0) inputs, the dtypes, ``scale`` (0 included) and non-finite values at random
positions. The run is derandomized (the same examples every time) and bounded:
``HDAF_FUZZ_EXAMPLES`` examples per backend (Triton under the interpreter gets a fortieth, with
T <= 32), default 200; docs/verification.md gives the long run before a release
(``HDAF_FUZZ_EXAMPLES=5000``).

With non-finite inputs the check is the spec's rule (docs/delta_attention.md, "Non-finite
values and edge cases"):

* every entry that depends on a non-finite input through a *visible* pair is non-finite in the
  backend too (:func:`strict_naive` gives that set: the naive formula evaluated pair by pair,
  hidden pairs replaced by 0 before any product);
* a backend may also be non-finite where a pair hidden only by the window or causal mask carries
  one (kernels multiply whole tiles, 0·NaN = NaN): the bound is the naive reference without
  window and causal (padding still applied): padding keys and fully masked rows never leak;
* every other entry is finite and within the dtype's tolerance (conftest.TOL) of the reference.

Packed batches (``hdaf.delta_attention_varlen``, finite inputs) are fuzzed too: lengths 0 to 300
per sequence (Triton under the interpreter: 32), query blocks at the end, grouped heads, windows,
causal, ``scale``, shared and per-head ``x`` and ``w``, against the naive reference called on each
sequence alone (half the example count).

The regression tests at the end pin each disagreement the fuzzer found.
"""
from __future__ import annotations

import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import hdaf  # noqa: E402
from conftest import GRAD_NAMES, TOL, grads  # noqa: E402
from hdaf.dispatch import unavailable_reason  # noqa: E402
from hdaf.reference import (idle_rows, relative_buckets, repeat_kv, visibility,  # noqa: E402
                            without_idle_rows)

EXAMPLES = int(os.environ.get("HDAF_FUZZ_EXAMPLES", "200"))
ON_GPU = torch.cuda.is_available()
KERNEL_DEVICE = {"gather": "cpu", "cpu": "cpu", "triton": "cuda" if ON_GPU else "cpu",
                 "cuda": "cuda"}
# The interpreter runs Triton programs in Python: a fortieth of the examples, shorter sequences.
EXAMPLES_OF = {"gather": EXAMPLES, "cpu": EXAMPLES,
               "triton": EXAMPLES if ON_GPU else max(1, EXAMPLES // 40), "cuda": EXAMPLES}
MAX_T_OF = {"gather": 300, "cpu": 300, "triton": 300 if ON_GPU else 32, "cuda": 300}
DTYPES_OF = {"gather": (torch.float64, torch.float32, torch.bfloat16),
             "cpu": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
             # Triton's tl.dot has no float64 (a documented TypeError, not a disagreement)
             "triton": (torch.float32,) if not ON_GPU else (torch.float32, torch.bfloat16,
                                                              torch.float16),
             "cuda": (torch.float64, torch.float32, torch.bfloat16, torch.float16)}


def available(backend: str) -> bool:
    device = KERNEL_DEVICE[backend]
    if device == "cuda" and not ON_GPU:
        return False
    return unavailable_reason(backend, torch.device(device)) is None


def strict_naive(q, k, v, x, w, *, L, U, lo, hi, key_padding_mask=None, scale):
    """The naive formula pair by pair, with each factor of a hidden pair replaced by 0 through a
    ``where`` before any product: an output or gradient is non-finite exactly when it depends on
    a non-finite input through a visible pair. O(B·H·Tq·Tk·(Dk+Dv+Dr)) memory: small sizes only."""
    H, Tq, Tk = q.shape[1], q.shape[-2], k.shape[-2]
    k, v = repeat_kv(k, H), repeat_kv(v, H)
    x = x[:, None] if x.dim() == 3 else x
    w = w[None] if w.dim() == 2 else w
    vis = visibility(Tq, lo, hi, key_padding_mask, q.device, Tk)[..., None]  # [B|1,1,Tq,Tk,1]
    zero = torch.zeros((), dtype=q.dtype)

    def pairs(a_i, b_j):  # [..,Tq,D], [..,Tk,D] -> both [..,Tq,Tk,D], zero at hidden pairs
        return (torch.where(vis, a_i[..., :, None, :], zero),
                torch.where(vis, b_j[..., None, :, :], zero))

    qi, kj = pairs(q, k)
    xi, xj = pairs(x[..., Tk - Tq:, :], x)
    r = relative_buckets(Tq, L, U, q.device, Tk)
    wr = torch.where(vis, w.transpose(-1, -2)[:, r][None], zero)  # [B|1,Hw,Tq,Tk,Dr]
    logits = scale * ((qi * kj).sum(-1) + ((xj - xi) * wr).sum(-1))
    vis = vis[..., 0]
    logits = logits.masked_fill(~vis, torch.finfo(q.dtype).min)
    probs = torch.softmax(logits, dim=-1)
    probs = torch.where(vis & vis.any(-1, keepdim=True), probs, zero)
    return (probs[..., None] * torch.where(vis[..., None], v[..., None, :, :], zero)).sum(-2)


@st.composite
def problems(draw, backend: str):
    """One call: inputs (float64 masters), the keyword options and how to present them."""
    dtype = draw(st.sampled_from(DTYPES_OF[backend]))
    max_t = MAX_T_OF[backend]
    Tk = draw(st.one_of(st.integers(1, 12), st.integers(1, min(64, max_t)),
                        st.integers(1, max_t)))
    Tq = draw(st.sampled_from([Tk, Tk, 1, draw(st.integers(1, Tk))]))
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 2))
    H = Hkv * draw(st.integers(1, 2))
    if backend == "cuda":  # it refuses grouped heads and Tq < Tk (the spec's "Backends")
        Tq, H = Tk, Hkv
    Dk, Dv, Dr = draw(st.integers(1, 16)), draw(st.integers(1, 16)), draw(st.integers(1, 6))
    L, U = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    R = L + U + 1
    per_head_x, per_head_w = draw(st.booleans()), draw(st.booleans())
    mask_kind = draw(st.sampled_from(["none", "padding", "causal", "window", "padding_window",
                                      "padding_causal"]))
    kw = {"max_distance": (L, U)}
    if "causal" in mask_kind:
        kw["causal"] = True
    if "window" in mask_kind:
        kw["window"] = (draw(st.integers(0, 8)), draw(st.integers(0, 8)))
    pad = None
    if "padding" in mask_kind:
        # random holes, and sometimes a whole padded batch element (fully masked rows)
        density = draw(st.sampled_from([0.1, 0.5, 0.9, 1.0]))
        seed = draw(st.integers(0, 2**31 - 1))
        pad = torch.rand(B, Tk, generator=torch.Generator().manual_seed(seed)) < density
        kw["key_padding_mask"] = pad
    scale = draw(st.sampled_from([None, None, None, 0.0, 0.37]))
    if scale is not None:
        kw["scale"] = scale
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided", "expanded"]))
    nonfinite = draw(st.lists(st.tuples(st.sampled_from("qkvxw"), st.integers(0, 2**31 - 1),
                                        st.sampled_from([float("nan"), float("inf"),
                                                         float("-inf")])),
                              max_size=3)) if Tk * Tq <= 64 * 64 and draw(st.booleans()) else []
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    shapes = {"q": (B, H, Tq, Dk), "k": (B, Hkv, Tk, Dk), "v": (B, Hkv, Tk, Dv),
              "x": (B, H, Tk, Dr) if per_head_x else (B, Tk, Dr),
              "w": (H, Dr, R) if per_head_w else (Dr, R)}
    if layout == "expanded":  # stride-0 views of smaller leaves: the gradients sum over them
        base = {"q": (B, H, Tq, Dk), "k": (1, Hkv, Tk, Dk), "v": (B, 1, Tk, Dv),
                "x": (B, 1, Tk, Dr) if per_head_x else (1, Tk, Dr),
                "w": (1, Dr, R) if per_head_w else (Dr, R)}
    else:
        base = shapes
    leaves = {n: torch.randn(s, generator=g, dtype=torch.float64).to(dtype).double()
              for n, s in base.items()}
    for name, pos, val in nonfinite:
        leaves[name].view(-1)[pos % leaves[name].numel()] = val
    return dict(dtype=dtype, leaves=leaves, shapes=shapes, layout=layout, kw=kw,
                dims=(B, H, Hkv, Tq, Tk, Dk, Dv, Dr, L, U), pad=pad,
                nonfinite=bool(nonfinite))


def present(leaf: torch.Tensor, shape, layout: str) -> torch.Tensor:
    """The tensor the function receives: ``leaf`` as a contiguous, transposed-in-memory,
    strided or expanded view of the same values."""
    if layout == "expanded":
        return leaf.expand(shape)
    if layout == "transposed":  # same values, the last two dims swapped in memory
        return leaf.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":  # every other element of a twice-as-wide buffer
        return torch.stack([leaf, torch.zeros_like(leaf)], dim=-1)[..., 0]
    return leaf


def run(backend: str, prob, dtype, device="cpu", fn=None):
    """(out, grads of the leaves) or the exception raised."""
    leaves = {n: t.detach().to(device=device, dtype=dtype).requires_grad_()
              for n, t in prob["leaves"].items()}
    args = [present(leaves[n], prob["shapes"][n], prob["layout"]) for n in "qkvxw"]
    kw = dict(prob["kw"])
    if kw.get("key_padding_mask") is not None:
        kw["key_padding_mask"] = kw["key_padding_mask"].to(device)
    try:
        out = fn(*args, **kw) if fn is not None else hdaf.delta_attention(*args, backend=backend,
                                                                          **kw)
        g = torch.Generator().manual_seed(1)
        dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
        gr = torch.autograd.grad(out, [leaves[n] for n in "qkvxw"], dout)
    except Exception as exc:  # compared by type with the reference's
        return exc
    return out.detach().cpu().double(), [t.cpu().double() for t in gr]


def strict_call(prob):
    B, H, Hkv, Tq, Tk, Dk, Dv, Dr, L, U = prob["dims"]
    kw = prob["kw"]
    Wl, Wr = kw.get("window", (-1, -1))
    if kw.get("causal"):
        Wr = 0 if Wr < 0 else min(Wr, 0)
    lo, hi = (-(Tk - 1) if Wl < 0 else -Wl), ((Tk - 1) if Wr < 0 else Wr)
    scale = kw.get("scale", 1.0 / Dk ** 0.5)

    def fn(q, k, v, x, w, **_):
        return strict_naive(q, k, v, x, w, L=L, U=U, lo=lo, hi=hi, scale=scale,
                            key_padding_mask=kw.get("key_padding_mask"))
    return fn


def spread_call(prob):
    """The bound on where a non-finite value may spread: the naive reference with window,
    causal and padding lifted, after the rows the spec fences off are zeroed (``k``, ``v`` at
    padding keys, ``q`` at fully masked rows, ``x`` at rows in no visible pair). Kernels
    multiply whole tiles, so a NaN row may reach pairs those masks hide (0·NaN), but never
    the values of padding keys or of fully masked rows."""
    B, H, Hkv, Tq, Tk, Dk, Dv, Dr, L, U = prob["dims"]
    kw = prob["kw"]
    pad = kw.get("key_padding_mask")
    free = {k: v for k, v in kw.items() if k not in ("window", "causal", "key_padding_mask")}
    if pad is None:
        return lambda *args, **_: hdaf.delta_attention(*args, backend="naive", **free)
    Wl, Wr = kw.get("window", (-1, -1))
    if kw.get("causal"):
        Wr = 0 if Wr < 0 else min(Wr, 0)
    lo, hi = (-(Tk - 1) if Wl < 0 else -Wl), ((Tk - 1) if Wr < 0 else Wr)
    live = visibility(Tq, lo, hi, pad, "cpu", Tk).any(-1)[:, 0]  # [B,Tq]
    idle = idle_rows(pad, live)

    def fn(q, k, v, x, w, **_):
        k, v = (t.masked_fill(pad[:, None, :, None], 0) for t in (k, v))
        q = q.masked_fill(~live[:, None, :, None], 0)
        x = without_idle_rows(x, idle)
        return hdaf.delta_attention(q, k, v, x, w, backend="naive", **free)
    return fn


def tolerance(dtype, ref64: torch.Tensor, refs_dtype):
    """conftest.TOL, widened for half dtypes as in tests/test_triton.py (the flash-attention
    rule): twice the larger error of the same-dtype references (``naive``, and ``gather``, which
    computes the bias as the kernels do, ``P[j] - P[t_i]`` with ``P = x·w`` rounded to the
    dtype) plus the rounding of the exact result; at least 8 units in the last place of the
    largest entry (a kernel returns dP rounded to the dtype, and dx = dP·wᵀ, dw = xᵀ·dP then
    run in the dtype: the same-dtype references round elsewhere, so their error is no tight
    bound in a small example)."""
    tol = dict(TOL[dtype])
    if dtype in (torch.float16, torch.bfloat16):
        finite = torch.isfinite(ref64)
        if finite.any():
            ulp = torch.finfo(dtype).eps * ref64[finite].abs().max().item()
            tol["atol"] = max(tol["atol"], 8 * ulp)
        for ref_dtype in refs_dtype:
            both = torch.isfinite(ref64) & torch.isfinite(ref_dtype)
            if both.any():
                err = (ref64 - ref_dtype).abs()[both].max().item()
                rounding = (ref64 - ref64.to(dtype).double()).abs()[both].max().item()
                tol["atol"] = max(tol["atol"], 2 * err + rounding)
    return tol


def compare(name, got, ref, strict_bad, allowed_bad, tol):
    """``got`` is non-finite wherever ``strict_bad``, finite outside ``allowed_bad``, and close
    to ``ref`` where both are finite."""
    bad = ~torch.isfinite(got)
    missed = strict_bad & ~bad
    assert not missed.any(), (f"{name}: finite at {missed.nonzero()[:5].tolist()} where a NaN "
                              "input reaches it through a visible pair (swallowed)")
    spurious = bad & ~strict_bad & ~allowed_bad
    assert not spurious.any(), (f"{name}: non-finite at {spurious.nonzero()[:5].tolist()} where "
                                "no pair of the band carries a non-finite input")
    ok = ~bad & torch.isfinite(ref)
    torch.testing.assert_close(got[ok], ref[ok], msg=lambda m: f"{name}: {m}", **tol)


def _with_leaves(prob, change):
    return dict(prob, leaves={n: change(t) for n, t in prob["leaves"].items()})


def check(backend: str, prob):
    dtype = prob["dtype"]
    device = KERNEL_DEVICE[backend]
    got = run(backend, prob, dtype, device)
    ref = run("naive", prob, torch.float64)
    if isinstance(ref, Exception) or isinstance(got, Exception):
        assert type(got) is type(ref), f"{backend} raised {got!r}, naive raised {ref!r}"
        return
    half = dtype in (torch.float16, torch.bfloat16)
    refs_dtype = [run(b, prob, dtype) for b in ("naive", "gather")] if half else []
    if prob["nonfinite"]:
        # Values: the strict formula. Must be non-finite: what depends on a NaN input through a
        # visible pair (an Inf may legitimately vanish: exp(-inf) = 0, and whether a logit
        # comes out -inf or NaN depends on the order of operations, e.g. P[j] - P[i] = inf -
        # inf). May be non-finite: what depends on any non-finite input, with window and
        # causal lifted (every non-finite input made NaN, the most contagious value).
        inf_to_zero = _with_leaves(prob, lambda t: t.masked_fill(torch.isinf(t), 0.0))
        all_nan = _with_leaves(prob, lambda t: t.masked_fill(~torch.isfinite(t), float("nan")))
        truth = run("naive", prob, torch.float64, fn=strict_call(prob))
        must = run("naive", inf_to_zero, torch.float64, fn=strict_call(prob))
        bound = run("naive", all_nan, torch.float64, fn=spread_call(prob))
    else:  # all finite: the reference must be finite everywhere
        truth = must = ref
        bound = None
    names = ("out",) + tuple(f"d{n}" for n in GRAD_NAMES)
    for i, name in enumerate(names):
        pick = (lambda r: r[0]) if i == 0 else (lambda r, i=i: r[1][i - 1])
        t, g = pick(truth), pick(got)
        strict_bad = ~torch.isfinite(pick(must))
        allowed = ~torch.isfinite(t)
        if bound is not None:
            allowed = allowed | ~torch.isfinite(pick(bound))
            if _projection_spreads(prob, name):
                allowed = torch.ones_like(allowed)
        compare(f"{backend} {name}", g, t, strict_bad, allowed,
                tolerance(dtype, t, [pick(r) for r in refs_dtype]))
        # the reference itself follows the same rule
        compare(f"naive {name}", pick(ref), t, strict_bad, allowed, TOL[torch.float64])


def _projection_spreads(prob, name: str) -> bool:
    """dx = dP·wᵀ and dw = xᵀ·dP are dense matmuls (the spec's chain rule through P = x·w): a
    non-finite w entry may reach every dx entry, a non-finite x row every dw entry, even where
    no visible pair uses that column / row together with them (0·NaN)."""
    leaves = prob["leaves"]
    return ((name == "dx" and not torch.isfinite(leaves["w"]).all())
            or (name == "dw" and not torch.isfinite(leaves["x"]).all()))


def _fuzz(backend, strategy=None, checker=None, examples=None, name="matches_naive"):
    """A derandomized, bounded hypothesis test of ``backend``: ``checker(backend, drawn)`` on
    examples of ``strategy(backend)`` (default: the padded problems and their check)."""
    strategy, checker = strategy or problems, checker or check

    @pytest.mark.skipif(not available(backend), reason=f"backend {backend!r} not available")
    @settings(max_examples=examples or EXAMPLES_OF[backend], derandomize=True, deadline=None,
              suppress_health_check=list(HealthCheck), database=None)
    @given(prob=strategy(backend))
    def test(prob):
        checker(backend, prob)
    test.__name__ = f"test_fuzz_{backend}_{name}"
    return test


test_fuzz_gather_matches_naive = _fuzz("gather")
test_fuzz_cpu_matches_naive = _fuzz("cpu")
test_fuzz_triton_matches_naive = _fuzz("triton")
test_fuzz_cuda_matches_naive = _fuzz("cuda")


# --- packed batches ------------------------------------------------------------------------
# Finite inputs only (the non-finite rule across packed sequences has its own regression test,
# tests/test_nonfinite.py::test_packed_sequences_are_independent_under_nan). The oracle is the
# naive reference called on each sequence alone, concatenated: the spec's definition of a
# packed batch, independent of the naive varlen path.
VARLEN_DTYPES_OF = {"gather": (torch.float64,), "cpu": (torch.float64, torch.float32),
                    "triton": (torch.float32,)}


@st.composite
def packed_problems(draw, backend: str):
    max_t = MAX_T_OF[backend]
    n = draw(st.integers(1, 4))
    lk = [draw(st.sampled_from(sorted({0, 1, 2, 7, 63 if max_t >= 63 else max_t, max_t}))
               | st.integers(0, min(max_t, 80))) for _ in range(n)]
    lq = [draw(st.integers(0, t)) if draw(st.booleans()) else t for t in lk]
    Hkv = draw(st.sampled_from([1, 2]))
    H = Hkv * draw(st.sampled_from([1, 2]))
    L, U = draw(st.integers(0, 6)), draw(st.integers(0, 6))
    kw = dict(max_distance=(L, U))
    if draw(st.booleans()):
        kw["causal"] = True
    if draw(st.booleans()):
        kw["window"] = (draw(st.integers(0, 9)), draw(st.integers(0, 9)))
    if draw(st.booleans()):
        kw["scale"] = draw(st.sampled_from([0.0, 0.3, 1.7]))
    return dict(lq=lq, lk=lk, H=H, Hkv=Hkv, Dk=draw(st.integers(1, 9)), Dv=draw(st.integers(1, 9)),
                Dr=draw(st.integers(1, 6)), R=L + U + 1, per_head_x=draw(st.booleans()),
                per_head_w=draw(st.booleans()), kw=kw, seed=draw(st.integers(0, 2 ** 16)),
                dtype=draw(st.sampled_from(VARLEN_DTYPES_OF[backend])))


def _packed_leaves(p, dtype, device="cpu"):
    g = torch.Generator().manual_seed(p["seed"])
    Tq, Tk, H, Hkv = sum(p["lq"]), sum(p["lk"]), p["H"], p["Hkv"]
    shapes = ((Tq, H, p["Dk"]), (Tk, Hkv, p["Dk"]), (Tk, Hkv, p["Dv"]),
              (Tk, H, p["Dr"]) if p["per_head_x"] else (Tk, p["Dr"]),
              (H, p["Dr"], p["R"]) if p["per_head_w"] else (p["Dr"], p["R"]))
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_()
            for s in shapes]


def check_packed(backend: str, p):
    lq, lk, kw = p["lq"], p["lk"], p["kw"]
    cu_q = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32)
    device = KERNEL_DEVICE[backend]
    leaves = _packed_leaves(p, p["dtype"], device)
    out = hdaf.delta_attention_varlen(*leaves, cu_q.to(device), cu_k.to(device), max(lq), max(lk),
                                      backend=backend, **kw)
    got = [out, *grads(out, leaves)]
    # the oracle: each sequence alone through naive, float64, concatenated (rows and gradients)
    ref_leaves = _packed_leaves(p, torch.float64)
    q, k, v, x, w = ref_leaves
    outs = []
    for b in range(len(lq)):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if lq[b] == 0:
            continue
        xb = x[ks].permute(1, 0, 2)[None] if p["per_head_x"] else x[ks][None]
        o = hdaf.delta_attention(q[qs].transpose(0, 1)[None], k[ks].transpose(0, 1)[None],
                                 v[ks].transpose(0, 1)[None], xb, w, backend="naive", **kw)
        outs.append(o[0].transpose(0, 1))
    ref_out = torch.cat(outs) if outs else torch.zeros(0, p["H"], p["Dv"], dtype=torch.float64)
    if ref_out.numel():
        ref = [ref_out, *grads(ref_out, ref_leaves)]
    else:
        ref = [ref_out] + [torch.zeros_like(t) for t in ref_leaves]
    tol = TOL[p["dtype"]]
    for name, g, r in zip(("out",) + tuple(f"d{n}" for n in GRAD_NAMES), got, ref):
        assert g.shape == r.shape, (name, tuple(g.shape), tuple(r.shape))
        torch.testing.assert_close(g.double().cpu(), r, msg=lambda m: f"{backend} packed {name}: {m}",
                                   **tol)


def _fuzz_packed(backend):
    return _fuzz(backend, packed_problems, check_packed, max(5, EXAMPLES_OF[backend] // 2),
                 "packed_matches_per_sequence_naive")


test_fuzz_gather_packed_matches_per_sequence_naive = _fuzz_packed("gather")
test_fuzz_cpu_packed_matches_per_sequence_naive = _fuzz_packed("cpu")
test_fuzz_triton_packed_matches_per_sequence_naive = _fuzz_packed("triton")
