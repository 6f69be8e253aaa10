"""The CUDA extension (csrc/cuda): registration, and the kernels against the float64 "naive" oracle.

* ``test_cuda_kernels_registered`` runs on any machine whose torch is a CUDA build: the kernels
  must be compiled and registered for the ``CUDA`` dispatch key (skipped for a CPU torch or when
  the build was skipped with ``HDAF_SKIP_CUDA_BUILD=1``).
* ``test_cuda_op_rejects_head_dim_160_without_a_gpu`` sends fake tensors on a CUDA device
  straight to the op's CUDA kernel: its argument checks must raise (Dk=160 once crashed a GPU run).
* ``test_cuda_kernels_host_emulation`` runs the very kernel templates of
  ``csrc/cuda/delta_attention_kernels.cuh`` on the CPU (``csrc/cuda/host_emulation``: a thread
  per CUDA thread, barriers for ``__syncthreads``, an emulated ``wmma`` with the sm_80 code path),
  against a float64 reference of the raw op, for every dtype and both tile configurations. It
  needs only the CUDA headers (``cuda_fp16.h``, ``mma.h``) and a C++ compiler, and is skipped
  without them or with ``HDAF_SKIP_CUDA_EMULATION=1``.
* Every other test needs a GPU and is skipped without one; the bad-input calls run in a child
  process, so a crash fails that test instead of killing pytest. Tolerances follow the
  flash-attention rule: the kernel's error against the float64 reference (run on the same,
  already rounded inputs) may be at most twice the error of the PyTorch "gather" implementation
  run in the kernel's dtype, plus a small floor.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import hdaf
from conftest import GRAD_NAMES, TOL, cuda_include_dir, make_inputs, requires_cuda

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("hdaf::delta_attention_forward", "hdaf::delta_attention_backward")
LOW_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Floor of the error rule, relative to max(1, |reference|max), per dtype.
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _cuda_build_skip_reason():
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build: the CUDA extension is not built"
    if os.environ.get("HDAF_SKIP_CUDA_BUILD") == "1":
        return "HDAF_SKIP_CUDA_BUILD=1: the CUDA extension build was skipped"
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return "no nvcc on PATH and no CUDA_HOME: setup.py could not build the CUDA extension"
    return None


def test_cuda_kernels_registered():
    reason = _cuda_build_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    info = hdaf.backends()
    assert info["extension"] == "loaded", f"hdaf._C did not import: {info['extension']}"
    assert info["cuda_kernel_compiled"], (
        "torch is a CUDA build but hdaf._C has no CUDA kernel for hdaf::delta_attention_forward "
        f"(backends: {info})")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op}: no CUDA kernel"


# The CUDA op itself, reached without a GPU: fake tensors that report a CUDA device, sent
# straight to the op's CUDA kernel. Its argument checks must reject the input before anything
# touches a GPU. In a child process, so that a crash fails the test instead of killing pytest.
FAKE_CUDA_CHILD = textwrap.dedent("""
    import torch, hdaf
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        mk = lambda d: torch.empty(1, 1, 5, d, dtype=torch.float16, device="cuda")
        q160, q8, P = mk(160), mk(8), mk(7)
    cuda_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    for name, args in (("dk160", (q160, q160, q8, P)), ("dv160", (q8, q8, q160, P))):
        try:
            torch.ops.hdaf.delta_attention_forward.default.redispatch(
                cuda_only, *args, None, 3, 3, -1, -1, 0.1)
            print(name, "NO ERROR", flush=True)
        except RuntimeError as exc:
            print(name, "RAISED", str(exc).splitlines()[0], flush=True)
""")


def test_cuda_op_rejects_head_dim_160_without_a_gpu():
    reason = _cuda_build_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    if not hdaf.backends()["cuda_kernel_compiled"]:
        pytest.skip("hdaf._C has no CUDA kernel")
    proc = subprocess.run([sys.executable, "-c", FAKE_CUDA_CHILD], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=os.environ.copy())
    assert proc.returncode == 0, (f"child died ({proc.returncode}):\n{proc.stdout}\n"
                                  f"{proc.stderr[-3000:]}")
    assert ("dk160 RAISED hdaf delta_attention (CUDA): head dims up to 128 are supported, "
            "got Dk=160 and Dv=8") in proc.stdout, proc.stdout
    assert "dv160 RAISED" in proc.stdout and "got Dk=8 and Dv=160" in proc.stdout, proc.stdout


# ---------------------------------------------------------------------------------------------
# The kernels on the CPU, through the host emulation
# ---------------------------------------------------------------------------------------------

EMULATION_SRC = os.path.join(REPO, "csrc", "cuda", "host_emulation", "delta_attention_emulation.cpp")
LARGE_SMEM = 1 << 18  # every large tile configuration fits
SMALL_SMEM = 0  # forces the small tile configuration


@pytest.fixture(scope="module")
def emulation():
    if os.environ.get("HDAF_SKIP_CUDA_EMULATION") == "1":
        pytest.skip("HDAF_SKIP_CUDA_EMULATION=1")
    inc = cuda_include_dir()
    if inc is None:
        pytest.skip("the CUDA runtime headers (cuda_fp16.h, mma.h) were not found: set CUDA_HOME")
    from torch.utils.cpp_extension import load
    load(name="hdaf_cuda_emulation", sources=[EMULATION_SRC],
         extra_include_paths=[os.path.join(REPO, "csrc", "include"), inc],
         extra_cflags=["-O2", "-pthread"], extra_ldflags=["-pthread"], with_cuda=False,
         is_python_module=False, verbose=False)
    return torch.ops.hdaf_cuda_emulation


def _reference_op(q, k, v, P, mask, L, U, wl, wr, scale):
    """The raw op in float64 with P as an input (docs/delta_attention.md)."""
    T = q.shape[2]
    pos = torch.arange(T)
    d = pos[None, :] - pos[:, None]
    r = d.clamp(-L, U) + L
    lo = -(T - 1) if wl < 0 else -wl
    hi = (T - 1) if wr < 0 else wr
    vis = ((d >= lo) & (d <= hi))[None, None]
    if mask is not None:
        vis = vis & ~mask[:, None, None, :]
    idx = r.expand(P.shape[0], P.shape[1], T, T)
    bias = torch.gather(P.transpose(-1, -2), -2, idx) - torch.gather(P, -1, idx)
    logits = (scale * (q @ k.transpose(-1, -2) + bias)).masked_fill(~vis, float("-inf"))
    lse = logits.logsumexp(-1)
    probs = torch.softmax(logits.masked_fill(~vis, -1e300), -1)
    probs = torch.where(vis & vis.any(-1, keepdim=True), probs, torch.zeros((), dtype=q.dtype))
    return probs @ v, lse


# B, H, Hp, T, Dk, Dv, L, U, window_left, window_right (causal: right 0), pad lengths
EMU_CASES = {
    "shared_sym_full": (2, 3, 1, 7, 16, 24, 3, 3, -1, -1, None),
    "perhead_asym_window_odd_dims": (2, 3, 3, 63, 5, 3, 2, 5, 5, 5, None),
    "shared_causal_pad": (2, 2, 1, 63, 16, 16, 2, 2, -1, 0, [63, 60]),
    "paper_preset_pad_fully_masked_rows": (2, 2, 2, 75, 8, 8, 0, 8, 0, 8, [75, 30]),
    "fully_masked_batch": (2, 2, 1, 40, 8, 8, 3, 3, 2, 1, [0, 40]),
    "single_bucket_T1": (1, 1, 1, 1, 8, 8, 0, 0, -1, -1, None),
    "long_window_pad_dk_ne_dv": (1, 2, 1, 130, 32, 16, 5, 2, 70, 10, [100]),
}
EMU_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 6e-3, torch.bfloat16: 4e-2}


@pytest.mark.parametrize("smem", [LARGE_SMEM, SMALL_SMEM], ids=["large_tiles", "small_tiles"])
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.float16, torch.bfloat16),
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(EMU_CASES), ids=str)
def test_cuda_kernels_host_emulation(emulation, case, dtype, smem):
    B, H, Hp, T, Dk, Dv, L, U, wl, wr, pad = EMU_CASES[case]
    if smem == SMALL_SMEM and T > 63:
        pytest.skip("the small tiles are covered by the shorter cases")
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    q, k, v = rnd(B, H, T, Dk), rnd(B, H, T, Dk), rnd(B, H, T, Dv)
    P, dout = rnd(B, Hp, T, L + U + 1), rnd(B, H, T, Dv)
    mask = None if pad is None else torch.arange(T)[None, :] >= torch.tensor(pad)[:, None]
    scale = 0.37
    out, lse = emulation.forward(q, k, v, P, mask, L, U, wl, wr, scale, smem)
    dq, dk, dv, dP = emulation.backward(dout, q, k, v, P, mask, out, lse, L, U, wl, wr, scale, smem)

    ref_in = [t.double().requires_grad_(True) for t in (q, k, v, P)]
    ref_out, ref_lse = _reference_op(*ref_in[:3], ref_in[3], mask, L, U, wl, wr, scale)
    ref_grads = torch.autograd.grad(ref_out, ref_in, dout.double())
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for name, got, ref in (("out", out, ref_out), ("lse", lse, ref_lse), ("dq", dq, ref_grads[0]),
                           ("dk", dk, ref_grads[1]), ("dv", dv, ref_grads[2]),
                           ("dP", dP, ref_grads[3])):
        ref = ref.detach()
        assert got.shape == ref.shape and got.dtype == (lse.dtype if name == "lse" else dtype), name
        got = got.double()
        finite = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(got), finite), f"{name}: non-finite pattern differs"
        assert torch.equal(got[~finite], ref[~finite]), f"{name}: -inf rows differ"
        err = (got[finite] - ref[finite]).abs().max().item() if finite.any() else 0.0
        bound = EMU_TOL[dtype] * max(1.0, ref[finite].abs().max().item() if finite.any() else 0.0)
        assert err <= bound, f"{case} {name} ({dtype}): max error {err:.3e} > {bound:.3e}"


# ---------------------------------------------------------------------------------------------
# GPU tests
# ---------------------------------------------------------------------------------------------

def _require_cuda_backend():
    info = hdaf.backends()
    if "cuda" not in info["available"].get("cuda", []):
        pytest.skip("the 'cuda' backend is not available on this GPU machine "
                    f"(extension: {info['extension']}, cuda_kernel_compiled: "
                    f"{info['cuda_kernel_compiled']})")


# name -> (make_inputs kwargs, delta_attention kwargs, pad_lengths as a function of T)
CASES = {
    "shared_sym": (dict(R=7), dict(), None),
    "headx_asym_window": (dict(R=8, per_head_x=True), dict(max_distance=(2, 5), window=5), None),
    "headw_causal_pad": (dict(R=5, per_head_w=True), dict(causal=True),
                         lambda T: [T, max(1, T - 3)]),
    "perhead_window_lr_causal": (dict(R=9, per_head_x=True, per_head_w=True),
                                 dict(max_distance=(4, 4), window=(3, 6), causal=True), None),
    # the paper's setting: offsets 0..R-1, i attends j >= i; the padded tail leaves the last
    # rows of batch 1 with no visible key (fully masked rows)
    "paper_pad": (dict(R=9, per_head_w=True), dict(hdaf.paper_preset(9)),
                  lambda T: [T, max(1, T // 2)]),
    # batch 0 entirely padding: every row fully masked
    "fully_masked_batch": (dict(R=7, per_head_x=True), dict(window=(2, 1)), lambda T: [0, T]),
    "asym_clip_large": (dict(R=4), dict(max_distance=(0, 3)), None),
    "single_bucket": (dict(R=1), dict(max_distance=(0, 0), window=(40, 0)), None),
}
DIMS = {"dk16_dv24": (16, 24), "dk5_dv3": (5, 3), "dk64": (64, 64)}


def _inputs(dtype, T, mk, pad, Dk, Dv, seed=0):
    """Inputs rounded to ``dtype`` (low) and the same values in float64 (reference)."""
    q, k, v, x, w, mask = make_inputs(B=2, H=3, T=T, Dk=Dk, Dv=Dv, Dr=5, dtype=torch.float64,
                                      device="cuda", pad_lengths=pad(T) if pad else None,
                                      seed=seed, requires_grad=False, **mk)
    low = [t.to(dtype) for t in (q, k, v, x, w)]
    ref = [t.double() for t in low]
    return low, ref, mask


def _run(backend, tensors, mask, kw, dout):
    ins = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = hdaf.delta_attention(*ins, key_padding_mask=mask, backend=backend, **kw)
    gs = torch.autograd.grad(out, ins, dout.to(out.dtype))
    return [out.detach()] + [g.detach() for g in gs]


def _check_rule(name, ref, got, base, dtype):
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - ref).abs().max().item() if ref.numel() else 0.0
    base_err = (base.double() - ref).abs().max().item() if ref.numel() else 0.0
    scale = max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    bound = 2.0 * base_err + FLOOR[dtype] * scale
    assert err <= bound, (f"{name} ({dtype}): max error {err:.3e} vs float64 reference exceeds "
                          f"2 x gather's {base_err:.3e} + floor {FLOOR[dtype] * scale:.3e}")


@requires_cuda
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("dims", list(DIMS), ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=str)
@pytest.mark.parametrize("T", [1, 7, 63, 300])
def test_cuda_matches_naive(T, case, dims, dtype):
    _require_cuda_backend()
    if dims != "dk16_dv24" and T not in (7, 300):
        pytest.skip("other head dims are covered at T in (7, 300)")
    mk, kw, pad = CASES[case]
    Dk, Dv = DIMS[dims]
    low, ref_in, mask = _inputs(dtype, T, mk, pad, Dk, Dv)
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(2, 3, T, Dv, generator=g, dtype=torch.float64).to(dtype).double().cuda()
    ref = _run("naive", ref_in, mask, kw, dout)
    base = _run("gather", low, mask, kw, dout)
    got = _run("cuda", low, mask, kw, dout)
    for name, r, b, c in zip(("out",) + GRAD_NAMES, ref, base, got):
        assert c.dtype == dtype, f"{name}: dtype {c.dtype} != {dtype}"
        _check_rule(f"{case} T={T} {dims} {name}", r, c, b, dtype)


@requires_cuda
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_cuda_float64_matches_naive(case):
    """float64 runs the FMA path with float64 accumulation: held to the float64 tolerance."""
    _require_cuda_backend()
    mk, kw, pad = CASES[case]
    low, ref_in, mask = _inputs(torch.float64, 63, mk, pad, 16, 24)
    dout = torch.randn(2, 3, 63, 24, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64).cuda()
    ref = _run("naive", ref_in, mask, kw, dout)
    got = _run("cuda", low, mask, kw, dout)
    for name, r, c in zip(("out",) + GRAD_NAMES, ref, got):
        torch.testing.assert_close(c, r, msg=lambda m: f"{case} {name}: {m}", **TOL[torch.float64])


@requires_cuda
@pytest.mark.parametrize("dtype", LOW_DTYPES + (torch.float64,), ids=lambda d: str(d).split(".")[-1])
def test_cuda_lse_and_fully_masked_rows(dtype):
    """The raw op: lse matches logsumexp of the reference logits, -inf with output 0 and zero
    gradients for fully masked rows."""
    _require_cuda_backend()
    T, L, U = 37, 2, 5
    q, k, v, x, w, mask = make_inputs(B=2, H=2, T=T, Dk=32, Dv=16, Dr=4, R=L + U + 1,
                                      dtype=dtype, device="cuda", pad_lengths=[0, 20],
                                      requires_grad=False)
    P = (x[:, None] @ w[None]).contiguous()  # [B,1,T,R]
    scale = 0.3
    out, lse = torch.ops.hdaf.delta_attention_forward(q, k, v, P, mask, L, U, -1, 0, scale)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lse.shape == (2, 2, T)
    # batch 0 is all padding: every row fully masked
    assert torch.isneginf(lse[0]).all()
    assert (out[0] == 0).all()
    # reference lse of batch 1 (causal, keys < 20) in float64
    qd, kd, Pd = q.double(), k.double(), P.double()
    pos = torch.arange(T, device="cuda")
    r = (pos[None, :] - pos[:, None]).clamp(-L, U) + L
    bias = torch.gather(Pd.transpose(-1, -2), -2, r.expand(2, 1, T, T)) - torch.gather(
        Pd, -1, r.expand(2, 1, T, T))
    logits = scale * (qd @ kd.transpose(-1, -2) + bias)
    vis = (pos[None, :] <= pos[:, None])[None, None] & ~mask[:, None, None, :]
    ref_lse = logits.masked_fill(~vis, float("-inf")).logsumexp(-1)
    tol = 1e-9 if dtype == torch.float64 else 2e-3 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(lse[1].double(), ref_lse[1], atol=tol, rtol=0)
    gout = torch.randn_like(out)
    dq, dk, dv, dP = torch.ops.hdaf.delta_attention_backward(gout, q, k, v, P, mask, out, lse,
                                                             L, U, -1, 0, scale)
    assert dP.shape == P.shape and dP.dtype == P.dtype
    for name, t in (("dq", dq), ("dk", dk), ("dv", dv), ("dP", dP)):
        assert torch.isfinite(t).all(), f"{name}: non-finite"
        assert (t[0] == 0).all(), f"{name}: fully masked batch must get zero gradient"


@requires_cuda
def test_cuda_head_dim_128():
    _require_cuda_backend()
    low, ref_in, mask = _inputs(torch.float16, 70, dict(R=7), None, 128, 128)
    dout = torch.randn(2, 3, 70, 128, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(3)).half().double().cuda()
    ref = _run("naive", ref_in, mask, {}, dout)
    base = _run("gather", low, mask, {}, dout)
    got = _run("cuda", low, mask, {}, dout)
    for name, r, b, c in zip(("out",) + GRAD_NAMES, ref, base, got):
        _check_rule(f"D=128 {name}", r, c, b, torch.float16)


# Bad calls of the CUDA op, run in a child process: on an H100 (2026-11-24) the Dk=160 call
# killed the whole pytest process (segfault). Here a crash fails this one test, naming the signal.
REJECTIONS_CHILD = textwrap.dedent("""
    import torch, hdaf
    mk = lambda d: torch.randn(1, 1, 5, d, dtype=torch.float16, device="cuda")
    q160, q8, P = mk(160), mk(8), torch.randn(1, 1, 5, 7, dtype=torch.float16, device="cuda")
    x, w = torch.randn(1, 5, 5, dtype=torch.float16, device="cuda"), torch.randn(5, 7).half().cuda()
    calls = {
        "dk160": lambda: torch.ops.hdaf.delta_attention_forward(q160, q160, q8, P, None, 3, 3, -1, -1, 0.1),
        "dv160": lambda: torch.ops.hdaf.delta_attention_forward(q8, q8, q160, P, None, 3, 3, -1, -1, 0.1),
        "bad_R": lambda: torch.ops.hdaf.delta_attention_forward(q8, q8, q8, P, None, 2, 2, -1, -1, 0.1),
        "public_dk160": lambda: hdaf.delta_attention(q160, q160, q8, x, w, backend="cuda"),
    }
    for name, call in calls.items():
        try:
            call()
            torch.cuda.synchronize()
            print(name, "NO ERROR", flush=True)
        except RuntimeError as exc:
            print(name, "RAISED", str(exc).splitlines()[0], flush=True)
""")
REJECTIONS = {
    "dk160": r"hdaf delta_attention \(CUDA\): head dims up to 128 are supported, got Dk=160 and Dv=8",
    "dv160": r"head dims up to 128 are supported, got Dk=8 and Dv=160",
    "bad_R": r"P has R=7 buckets but L=2, U=2 need R = L\+U\+1 = 5",
    "public_dk160": r"head dims up to 128 are supported, got Dk=160 and Dv=8",
}


@requires_cuda
def test_cuda_rejects_bad_input_with_an_error_not_a_crash():
    _require_cuda_backend()
    proc = subprocess.run([sys.executable, "-c", REJECTIONS_CHILD], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=os.environ.copy())
    if proc.returncode < 0:
        pytest.fail(f"the bad calls killed the process with {signal.Signals(-proc.returncode).name}"
                    f"\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}")
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    got = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.split(" ")[0] in REJECTIONS)
    for name, pattern in REJECTIONS.items():
        assert name in got, f"{name}: no result (stdout: {proc.stdout!r})"
        assert got[name].startswith("RAISED"), f"{name}: expected a RuntimeError, got {got[name]!r}"
        assert re.search(pattern, got[name]), f"{name}: {got[name]!r} does not match {pattern!r}"


@requires_cuda
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32),
                         ids=lambda d: str(d).split(".")[-1])
def test_cuda_large_T_smoke_and_determinism(dtype):
    """T = 8192: finite, close to the float32 gather reference, and bitwise deterministic."""
    _require_cuda_backend()
    T = 8192
    q, k, v, x, w, mask = make_inputs(B=1, H=2, T=T, Dk=64, Dv=64, Dr=8, R=33, per_head_w=True,
                                      dtype=dtype, device="cuda", pad_lengths=[T - 100],
                                      requires_grad=False)
    kw = dict(max_distance=16, window=(512, 256))
    dout = torch.randn(1, 2, T, 64, generator=torch.Generator().manual_seed(5)).to(dtype).cuda()
    run1 = _run("cuda", (q, k, v, x, w), mask, kw, dout)
    run2 = _run("cuda", (q, k, v, x, w), mask, kw, dout)
    for name, a, b in zip(("out",) + GRAD_NAMES, run1, run2):
        assert torch.isfinite(a).all(), f"{name}: non-finite at T={T}"
        assert torch.equal(a, b), f"{name}: two runs differ (not deterministic)"
    with torch.no_grad():
        ref = hdaf.delta_attention(q.float(), k.float(), v.float(), x.float(), w.float(),
                                   key_padding_mask=mask, backend="gather", **kw)
    tol = dict(atol=1e-4, rtol=1e-3) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(run1[0].float(), ref, **tol)
    # full (unwindowed) causal attention at the same length: finite and deterministic
    kw2 = dict(causal=True)
    a = _run("cuda", (q, k, v, x, w), mask, kw2, dout)
    b = _run("cuda", (q, k, v, x, w), mask, kw2, dout)
    for name, s, t in zip(("out",) + GRAD_NAMES, a, b):
        assert torch.isfinite(s).all() and torch.equal(s, t), f"causal {name}"
