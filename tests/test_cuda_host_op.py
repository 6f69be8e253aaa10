"""The opt-in CuTe forward and backward (csrc/cuda_cute, built only with ``HDAF_BUILD_CUTE=1``).

Their ops ``hdaf::cuda_cute_delta_attention_forward`` / ``_backward`` have the schemas of
``hdaf::delta_attention_forward`` / ``_backward`` and exist only when the extension was built with
the flag; ``auto`` never calls them.

* ``test_tile_split_*`` (any machine with a C++ compiler): the tile arithmetic the kernel runs
  (``csrc/cuda_cute/tile_split.h``, compiled here for the CPU) against every (query, key) pair.
* ``test_setup_*`` (any machine with a CUDA torch and nvcc): setup.py leaves the default build
  alone, adds the CuTe sources and include folder with the flag, and names what it looked for when
  the headers are missing.
* ``test_cute_op_is_registered`` and ``test_cute_checks_reject_*`` need the flagged build (skipped
  otherwise); the checks run on fake CUDA tensors, so no GPU is needed.
* ``test_cute_forward_matches_gather`` needs the flagged build and a GPU (sm_80+): out and lse
  against the float64 ``gather`` reference, by the flash-attention error rule of tests/test_cuda.py.
  No GPU has run it yet.
* ``test_cute_emulation_*`` (any machine with a C++20 compiler, the CUDA headers and the CUTLASS
  headers of requirements.txt; no GPU, no flagged build): the very kernel template and tile
  configurations of ``csrc/cuda_cute/fwd_cute_*.cu``, compiled for the CPU with emulated SM80
  operations (``csrc/cuda/host_emulation/cute_fwd_emulation.cpp``), against the same reference
  for every case, both dtypes and both head dims, with the emulated operations counted against
  the tile split. Skipped only when one of those is missing, or with HDAF_SKIP_CUDA_EMULATION=1.
* ``test_cute_emulation_backward_*``: the same for the backward units ``bwd_cute_*.cu``
  (``cute_bwd_emulation.cpp``): dq, dk, dv, dP against the float64 gather reference's autograd
  gradients, operation counts of both kernels, cp.async landing; ``test_query_tiles_*`` the
  dK/dV pass's walk over query tiles; ``test_cute_backward_matches_gather`` the op on a GPU.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import requires_cuda
from cuda_emulation import (BWD_CASES, CASES, REPO, _check_against_gather, _check_grads, _grads_of_gather, _inputs, _ref_lse, _window)


OP = "cuda_cute_delta_attention_forward"
BWD_OP = "cuda_cute_delta_attention_backward"


def _cute_built() -> bool:
    return hasattr(torch.ops.hdaf, OP)


requires_cute = pytest.mark.skipif(
    not _cute_built(),
    reason="hdaf._C was built without HDAF_BUILD_CUTE=1 (see docs/verification.md, The CuTe forward)")


SETUP_CHILD = textwrap.dedent("""
    import importlib.util, json, os, runpy, sys
    import setuptools
    if os.environ.get("HIDE_CUTLASS") == "1":  # as if the nvidia-cutlass package were absent
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "cutlass_library" else real(name, *a)
    seen = {}
    setuptools.setup = lambda **kw: seen.update(kw)
    sys.argv = ["setup.py", "--name"]
    try:
        runpy.run_path("setup.py", run_name="__main__")
    except SystemExit as exc:
        print("EXIT", exc.code)
        sys.exit(0)
    ext = seen["ext_modules"][0]
    print("EXT", json.dumps({"sources": ext.sources, "include_dirs": ext.include_dirs}))
""")


def _setup(**env):
    child_env = {k: v for k, v in os.environ.items()
                 if k not in ("HDAF_BUILD_CUTE", "CUTLASS_INCLUDE_DIR", "HDAF_SKIP_CUDA_BUILD")}
    child_env.update(env)
    proc = subprocess.run([sys.executable, "-c", SETUP_CHILD], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=child_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in proc.stdout.splitlines():
        if line.startswith("EXT "):
            return json.loads(line[4:])
        if line.startswith("EXIT "):
            return line[5:]
    raise AssertionError(f"no result from setup.py:\n{proc.stdout}\n{proc.stderr[-3000:]}")


def _cuda_buildable():
    got = _setup()
    return not isinstance(got, str) and any(s.endswith(".cu") for s in got["sources"])


def test_setup_without_the_flag_builds_no_cute():
    got = _setup()
    assert not isinstance(got, str), got
    assert not [s for s in got["sources"] if "cuda_cute" in s], got["sources"]


def test_setup_with_the_flag_adds_the_cute_sources_and_headers():
    pytest.importorskip("cutlass_library", reason="the nvidia-cutlass pip package is not installed")
    if not _cuda_buildable():
        pytest.skip("the CUDA extension cannot be built here (CPU torch or no nvcc)")
    got = _setup(HDAF_BUILD_CUTE="1")
    assert not isinstance(got, str), got
    cute = sorted(os.path.basename(s) for s in got["sources"] if "cuda_cute" in s)
    assert cute == ["bwd_cute_bf16_hdim128.cu", "bwd_cute_bf16_hdim64.cu", "bwd_cute_fp16_hdim128.cu",
                    "bwd_cute_fp16_hdim64.cu", "delta_attention_cute.cpp", "fwd_cute_bf16_hdim128.cu",
                    "fwd_cute_bf16_hdim64.cu", "fwd_cute_fp16_hdim128.cu", "fwd_cute_fp16_hdim64.cu"], cute
    assert any(os.path.isfile(os.path.join(d, "cute", "tensor.hpp")) for d in got["include_dirs"])


def test_setup_with_the_flag_names_the_missing_headers():
    got = _setup(HDAF_BUILD_CUTE="1", CUTLASS_INCLUDE_DIR="/nonexistent/cutlass-include",
                 HIDE_CUTLASS="1")
    assert isinstance(got, str), f"setup.py did not stop: {got}"
    if "needs the CUDA build" in got:  # CPU torch / no nvcc: that is said first
        return
    assert "HDAF_BUILD_CUTE=1 but the CUTLASS/CuTe headers cute/tensor.hpp and cutlass/cutlass.h " \
           "were not found" in got, got
    assert "/nonexistent/cutlass-include (CUTLASS_INCLUDE_DIR)" in got, got
    assert "pip install nvidia-cutlass" in got, got


@requires_cute
@pytest.mark.parametrize("op,ref", ((OP, "delta_attention_forward"),
                                    (BWD_OP, "delta_attention_backward")))
def test_cute_op_is_registered(op, ref):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"hdaf::{op}", "CUDA")
    ours = getattr(torch.ops.hdaf, op).default._schema
    ref = getattr(torch.ops.hdaf, ref).default._schema
    assert [(a.name, str(a.type)) for a in ours.arguments] == \
        [(a.name, str(a.type)) for a in ref.arguments]
    assert [str(r.type) for r in ours.returns] == [str(r.type) for r in ref.returns]
    # `auto` and backend="cuda" never reach it: the dispatcher does not know its name.
    with open(os.path.join(REPO, "hdaf", "dispatch.py")) as f:
        assert "cute" not in f.read()


CHECKS_CHILD = textwrap.dedent("""
    import sys, torch, hdaf
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        def qkv(dk, dv, dtype=torch.float16):
            mk = lambda d: torch.empty(1, 2, 5, d, dtype=dtype, device="cuda")
            return mk(dk), mk(dk), mk(dv), torch.empty(1, 1, 5, 7, dtype=dtype, device="cuda")
        cases = {
            "float32": (qkv(64, 64, torch.float32), 3),
            "float64": (qkv(64, 64, torch.float64), 3),
            "dk32": (qkv(32, 32), 3),
            "dk64_dv128": (qkv(64, 128), 3),
            "dk160": (qkv(160, 160), 3),
            "bad_R": (qkv(64, 64), 2),
        }
        lse32, lse64 = (torch.empty(1, 2, 5, dtype=t, device="cuda") for t in (torch.float32, torch.float64))
    cuda_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    backward = sys.argv[1] == "backward"
    op = getattr(torch.ops.hdaf, f"cuda_cute_delta_attention_{sys.argv[1]}").default
    for name, ((q, k, v, P), LU) in cases.items():
        lse = lse64 if q.dtype == torch.float64 else lse32
        try:
            if backward:  # grad_out, out shaped like v
                op.redispatch(cuda_only, v, q, k, v, P, None, v, lse, LU, LU, -1, -1, 0.125)
            else:
                op.redispatch(cuda_only, q, k, v, P, None, LU, LU, -1, -1, 0.125)
            print(name, "NO ERROR", flush=True)
        except RuntimeError as exc:
            print(name, "RAISED", str(exc).splitlines()[0], flush=True)
""")


REJECTIONS = {
    "float32": r"^hdaf cuda_cute_delta_attention_{op}: q must be float16 or bfloat16 .*got Float$",
    "float64": r"q must be float16 or bfloat16 .*got Double$",
    "dk32": r"^hdaf cuda_cute_delta_attention_{op}: head dim must be 64 or 128, got Dk=32",
    "dk64_dv128": r"needs Dk == Dv, got Dk=64 and Dv=128",
    # the shared checks (csrc/delta_attention_checks.cpp) come first
    "dk160": r"^hdaf delta_attention \(CUDA\): head dims up to 128 are supported, got Dk=160 and Dv=160",
    "bad_R": r"P has R=7 buckets but L=2, U=2 need R = L\+U\+1 = 5",
}


@requires_cute
@pytest.mark.parametrize("direction", ("forward", "backward"))
def test_cute_checks_reject_unsupported_inputs_without_a_gpu(direction):
    # cwd: the tests folder, so the child imports the same hdaf as this process (not ./hdaf)
    proc = subprocess.run([sys.executable, "-c", CHECKS_CHILD, direction], capture_output=True,
                          text=True,
                          timeout=300, cwd=os.path.dirname(os.path.abspath(__file__)),
                          env=os.environ.copy())
    assert proc.returncode == 0, f"child died ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    got = dict(line.split(" ", 1) for line in proc.stdout.splitlines()
               if line.split(" ")[0] in REJECTIONS)
    for name, pattern in REJECTIONS.items():
        assert name in got, f"{name}: no result (stdout: {proc.stdout!r})"
        assert got[name].startswith("RAISED "), f"{name}: expected a RuntimeError, got {got[name]!r}"
        pattern = pattern.replace("{op}", direction)
        assert re.search(pattern, got[name][len("RAISED "):]), f"{name}: {got[name]!r} !~ {pattern!r}"


@requires_cuda
@requires_cute
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("D", (64, 128))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("T", (1, 7, 63, 300, 1000))
def test_cute_forward_matches_gather(T, case, D, dtype):
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the CuTe kernels need sm_80+")
    L, U, window, causal, padding, per_head = CASES[case]
    q, k, v, P = _inputs(dtype, T, D, L, U, per_head)
    mask = padding(T).cuda() if padding is not None else None
    scale = D ** -0.5
    Wl, Wr = _window(window, causal)
    out, lse = getattr(torch.ops.hdaf, OP)(q, k, v, P, mask, L, U, Wl, Wr, scale)
    _check_against_gather(f"{case} T={T} D={D} {dtype}", out, lse, q, k, v, P, mask, L, U, window,
                          causal, scale, lse_tol=5e-2)


@requires_cuda
@requires_cute
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("D", (64, 128))
@pytest.mark.parametrize("case", list(CASES) + ["one_bucket", "two_buckets_causal"])
@pytest.mark.parametrize("T", (1, 7, 63, 300, 1000))
def test_cute_backward_matches_gather(T, case, D, dtype):
    """dq, dk, dv, dP of the CuTe backward op (on the float64 reference's out and lse) against
    the float64 gather reference's autograd gradients, by the flash-attention error rule."""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the CuTe kernels need sm_80+")
    L, U, window, causal, padding, per_head = BWD_CASES[case]
    q, k, v, P = _inputs(dtype, T, D, L, U, per_head)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7),
                       dtype=torch.float64).to(dtype).cuda()
    mask = padding(T).cuda() if padding is not None else None
    scale = D ** -0.5
    Wl, Wr = _window(window, causal)
    lo = -(T - 1) if Wl < 0 else -Wl
    hi = (T - 1) if Wr < 0 else Wr
    ref = _grads_of_gather(*(t.double() for t in (q, k, v, P)), mask, L, U, window, causal, scale,
                           dout.double())
    base = _grads_of_gather(q, k, v, P, mask, L, U, window, causal, scale, dout)
    lse = _ref_lse(*(t.double() for t in (q, k, P)), mask, L, U, lo, hi, scale).float()
    got = getattr(torch.ops.hdaf, BWD_OP)(dout, q, k, v, P, mask, ref[0].to(dtype), lse, L, U,
                                          Wl, Wr, scale)
    _check_grads(f"{case} T={T} D={D} {dtype}", ref[1:], base[1:], got, dtype)
