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

import glob
import importlib.util
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import hdaf
from conftest import cuda_include_dir, requires_cuda

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OP = "cuda_cute_delta_attention_forward"
BWD_OP = "cuda_cute_delta_attention_backward"
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _cute_built() -> bool:
    return hasattr(torch.ops.hdaf, OP)


requires_cute = pytest.mark.skipif(
    not _cute_built(),
    reason="hdaf._C was built without HDAF_BUILD_CUTE=1 (see docs/verification.md, The CuTe forward)")


# ---------------------------------------------------------------------------------------------
# The kernel's tile split, compiled for the CPU
# ---------------------------------------------------------------------------------------------

# Reads "T L U Wl Wr BM BN has_pad" lines; per query block prints "m0 begin band far_hi end"
# and the needs-mask flag of each visited key tile, then "END".
TILES_PROGRAM = r"""
#include <cstdio>
#include "tile_split.h"
int main() {
  long T, L, U, Wl, Wr, BM, BN, pad;
  while (std::scanf("%ld %ld %ld %ld %ld %ld %ld %ld", &T, &L, &U, &Wl, &Wr, &BM, &BN, &pad) == 8) {
    const hdaf::Band b = hdaf::make_band(T, Wl, Wr);
    for (int m0 = 0; m0 < T; m0 += BM) {
      const auto t = hdaf::cute_tiles::key_tiles(m0, T, L, U, b.lo, b.hi, BM, BN);
      std::printf("%d %d %d %d %d", m0, t.begin, t.band, t.far_hi, t.end);
      for (int n0 = t.begin; n0 < t.end; n0 += BN)
        std::printf(" %d", int(hdaf::cute_tiles::tile_needs_mask(m0, n0, T, b.lo, b.hi, BM, BN, pad)));
      std::printf("\n");
    }
    std::printf("END\n");
  }
}
"""


@pytest.fixture(scope="module")
def tiles_program(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    d = tmp_path_factory.mktemp("tiles")
    (d / "tiles.cpp").write_text(TILES_PROGRAM)
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{REPO}/csrc/include", f"-I{REPO}/csrc/cuda_cute",
                    str(d / "tiles.cpp"), "-o", str(d / "tiles")], check=True, timeout=120)
    return str(d / "tiles")


def test_tile_split_covers_every_visible_pair_with_the_right_bucket(tiles_program):
    """Every visible pair lies in a visited tile; far-low / far-high tiles hold only pairs of
    bucket 0 / R-1; a tile left unmasked holds only visible pairs."""
    grid = list(itertools.product(
        (1, 7, 63, 64, 65, 130, 300),  # T
        ((0, 0), (3, 3), (2, 5), (0, 30), (200, 200), (5, 0)),  # (L, U)
        ((-1, -1), (-1, 0), (40, 17), (0, 30), (0, 0), (3, -1)),  # (Wl, Wr)
        ((128, 64), (16, 16), (64, 128)),  # (BM, BN)
        (0, 1)))  # padding mask present
    lines = "".join(f"{T} {L} {U} {Wl} {Wr} {BM} {BN} {pad}\n"
                    for T, (L, U), (Wl, Wr), (BM, BN), pad in grid)
    out = subprocess.run([tiles_program], input=lines, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split("END\n")
    kinds_seen = set()
    for (T, (L, U), (Wl, Wr), (BM, BN), pad), block_lines in zip(grid, out):
        lo = -(T - 1) if Wl < 0 or Wl > T - 1 else -Wl
        hi = (T - 1) if Wr < 0 or Wr > T - 1 else Wr
        pos = torch.arange(T)
        d = pos[None, :] - pos[:, None]  # [i, j]
        vis = (d >= lo) & (d <= hi)
        bucket = d.clamp(-L, U) + L
        where = f"T={T} L={L} U={U} window=({Wl},{Wr}) tiles {BM}x{BN} pad={pad}"
        for line in block_lines.strip().splitlines():
            m0, begin, band, far_hi, end, *masks = map(int, line.split())
            rows = slice(m0, min(m0 + BM, T))
            assert begin % BN == 0 and begin <= band <= far_hi <= end <= T, f"{where} m0={m0}: {line}"
            assert band % BN == 0 or band == end, f"{where} m0={m0}: {line}"
            assert far_hi % BN == 0 or far_hi == end, f"{where} m0={m0}: {line}"
            visited = torch.zeros(T, dtype=torch.bool)
            visited[begin:end] = True
            assert not (vis[rows] & ~visited[None, :]).any(), f"{where} m0={m0}: a visible key is skipped"
            assert len(masks) == (end - begin + BN - 1) // BN, f"{where} m0={m0}: {line}"
            for t, n0 in enumerate(range(begin, end, BN)):
                cols = slice(n0, min(n0 + BN, T))
                v, r = vis[rows, cols], bucket[rows, cols]
                kind = "far_lo" if n0 < band else "band" if n0 < far_hi else "far_hi"
                kinds_seen.add(kind)
                if kind == "far_lo":
                    assert (r[v] == 0).all(), f"{where} m0={m0} n0={n0}: far-low tile has bucket > 0"
                if kind == "far_hi":
                    assert (r[v] == L + U).all(), f"{where} m0={m0} n0={n0}: far-high tile below R-1"
                if not masks[t]:
                    assert not pad and n0 + BN <= T and v.all(), f"{where} m0={m0} n0={n0}: unmasked"
    assert kinds_seen == {"far_lo", "band", "far_hi"}


# Reads the same lines; per key block prints "n0 begin end" and the tile_kind of each visited
# query tile, then per query block the tile_kind of each key tile key_tiles visits, then "END".
QUERY_TILES_PROGRAM = r"""
#include <cstdio>
#include "tile_split.h"
int main() {
  long T, L, U, Wl, Wr, BM, BN, pad;
  while (std::scanf("%ld %ld %ld %ld %ld %ld %ld %ld", &T, &L, &U, &Wl, &Wr, &BM, &BN, &pad) == 8) {
    const hdaf::Band b = hdaf::make_band(T, Wl, Wr);
    for (int n0 = 0; n0 < T; n0 += BN) {
      const auto t = hdaf::cute_tiles::query_tiles(n0, T, b.lo, b.hi, BM, BN);
      std::printf("K %d %d %d", n0, t.begin, t.end);
      for (int m0 = t.begin; m0 < t.end; m0 += BM)
        std::printf(" %d", hdaf::cute_tiles::tile_kind(m0, n0, L, U, BM, BN));
      std::printf("\n");
    }
    for (int m0 = 0; m0 < T; m0 += BM) {
      const auto t = hdaf::cute_tiles::key_tiles(m0, T, L, U, b.lo, b.hi, BM, BN);
      std::printf("Q %d %d %d %d", m0, t.begin, t.band, t.far_hi);
      for (int n0 = t.begin; n0 < t.end; n0 += BN)
        std::printf(" %d", hdaf::cute_tiles::tile_kind(m0, n0, L, U, BM, BN));
      std::printf("\n");
    }
    std::printf("END\n");
  }
}
"""


def test_query_tiles_cover_every_visible_pair_and_tile_kind_matches_the_runs(tmp_path):
    """The backward's dK/dV pass: every query that sees a key of block n0 lies in a visited query
    tile; a far-low / far-high tile holds only pairs of bucket 0 / R-1 (visible or not: the pass
    adds its whole rows); tile_kind agrees with key_tiles' runs, which the forward and dQ walk."""
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    (tmp_path / "q.cpp").write_text(QUERY_TILES_PROGRAM)
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{REPO}/csrc/include", f"-I{REPO}/csrc/cuda_cute",
                    str(tmp_path / "q.cpp"), "-o", str(tmp_path / "q")], check=True, timeout=120)
    grid = list(itertools.product(
        (1, 7, 63, 64, 65, 130, 300), ((0, 0), (3, 3), (2, 5), (0, 30), (200, 200), (5, 0)),
        ((-1, -1), (-1, 0), (40, 17), (0, 30), (0, 0), (3, -1)), ((64, 64), (16, 16), (64, 128))))
    lines = "".join(f"{T} {L} {U} {Wl} {Wr} {BM} {BN} 0\n" for T, (L, U), (Wl, Wr), (BM, BN) in grid)
    out = subprocess.run([str(tmp_path / "q")], input=lines, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split("END\n")
    kinds_seen = set()
    for (T, (L, U), (Wl, Wr), (BM, BN)), block in zip(grid, out):
        lo = -(T - 1) if Wl < 0 or Wl > T - 1 else -Wl
        hi = (T - 1) if Wr < 0 or Wr > T - 1 else Wr
        pos = torch.arange(T)
        d = pos[None, :] - pos[:, None]  # [i, j]
        vis = (d >= lo) & (d <= hi)
        where = f"T={T} L={L} U={U} window=({Wl},{Wr}) tiles {BM}x{BN}"
        for line in block.strip().splitlines():
            tag, *nums = line.split()
            nums = list(map(int, nums))
            if tag == "K":
                n0, begin, end, *kinds = nums
                assert begin % BM == 0 and begin <= end <= T, f"{where}: {line}"
                cols = slice(n0, min(n0 + BN, T))
                seen = torch.zeros(T, dtype=torch.bool)
                seen[begin:end] = True
                assert not (vis[:, cols] & ~seen[:, None]).any(), f"{where} n0={n0}: a query is skipped"
                for m0, kind in zip(range(begin, end, BM), kinds):
                    kinds_seen.add(kind)
                    # the whole tile, rows past T too (the pass adds whole rows of dS)
                    r = (pos[n0:n0 + BN][None, :] - torch.arange(m0, m0 + BM)[:, None]).clamp(-L, U) + L
                    if kind != 1:
                        assert (r == (0 if kind == 0 else L + U)).all(), f"{where} {m0},{n0}: {kind}"
            else:
                m0, begin, band, far_hi, *kinds = nums
                for n0, kind in zip(range(begin, begin + BN * len(kinds), BN), kinds):
                    run = 0 if n0 < band else 1 if n0 < far_hi else 2
                    assert kind == run, f"{where} m0={m0} n0={n0}: tile_kind {kind}, run {run}"
    assert kinds_seen == {0, 1, 2}


# ---------------------------------------------------------------------------------------------
# setup.py, run with setuptools.setup replaced by a recorder (in a child: setup.py sets env vars)
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# The op's registration and argument checks (flagged build; no GPU needed)
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# On a GPU: against the float64 gather reference
# ---------------------------------------------------------------------------------------------

# name -> (L, U, window, causal, padding, per-head P). padding(T) -> [B, T] bool or None.
CASES = {
    "plain": (3, 3, None, False, None, False),
    "per_head_P": (3, 3, None, False, None, True),
    "causal": (3, 3, None, True, None, False),
    "window": (2, 5, (40, 17), False, None, True),
    "wide_R_causal": (200, 200, None, True, None, False),  # band tiles and both far kinds
    "paper_preset": (0, 30, (0, 30), False, None, False),
    "padding": (3, 3, None, False, lambda T: torch.arange(T)[None, :] >= torch.tensor([[T], [(T + 1) // 2]]), False),
    # the first 5 keys are padding: causal rows 0..4 see no key (out 0, lse -inf)
    "masked_rows": (3, 3, None, True, lambda T: (torch.arange(T) < 5)[None, :].expand(2, T), True),
}


def _inputs(dtype, T, D, L, U, per_head, seed=0, device="cuda", B=2, H=3):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(device)  # noqa: E731
    q, k, v = rnd(B, H, T, D), rnd(B, H, T, D), rnd(B, H, T, D)
    P = rnd(B, H if per_head else 1, T, L + U + 1)
    return q, k, v, P


def _gather(q, k, v, P, mask, L, U, window, causal, scale):
    """The "gather" backend on P itself: x = P and w = the identity give P = x·w exactly."""
    R = P.shape[-1]
    x = P[:, 0] if P.shape[1] == 1 else P
    w = torch.eye(R, dtype=P.dtype, device=P.device)
    return hdaf.delta_attention(q, k, v, x, w, max_distance=(L, U), window=window, causal=causal,
                                key_padding_mask=mask, scale=scale, backend="gather")


def _ref_lse(q, k, P, mask, L, U, lo, hi, scale):
    T = q.shape[2]
    pos = torch.arange(T, device=q.device)
    d = pos[None, :] - pos[:, None]
    r = (d.clamp(-L, U) + L).expand(*P.shape[:2], T, T)
    bias = torch.gather(P.transpose(-1, -2), -2, r) - torch.gather(P, -1, r)
    logits = scale * (q @ k.transpose(-1, -2) + bias)
    vis = ((d >= lo) & (d <= hi))[None, None]
    if mask is not None:
        vis = vis & ~mask[:, None, None, :]
    return logits.masked_fill(~vis, float("-inf")).logsumexp(-1)


def _window(window, causal):
    """The op's (window_left, window_right) for a case's window and causal flag."""
    Wl, Wr = (-1, -1) if window is None else window
    if causal:
        Wr = 0 if Wr < 0 else min(Wr, 0)
    return Wl, Wr


def _check_against_gather(where, out, lse, q, k, v, P, mask, L, U, window, causal, scale,
                          lse_tol):
    """out by the flash-attention error rule against the float64 gather reference; lse within
    lse_tol (absolute); rows that see no key: lse -inf and out 0."""
    dtype, T = q.dtype, q.shape[2]
    assert out.dtype == dtype and out.shape == v.shape, f"{where}: out {out.dtype} {tuple(out.shape)}"
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3], f"{where}: lse {lse.dtype}"
    ref = _gather(*(t.double() for t in (q, k, v, P)), mask, L, U, window, causal, scale)
    base = _gather(q, k, v, P, mask, L, U, window, causal, scale)
    err = (out.double() - ref).abs().max().item() if ref.numel() else 0.0
    base_err = (base.double() - ref).abs().max().item() if ref.numel() else 0.0
    bound = 2.0 * base_err + FLOOR[dtype] * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    assert torch.isfinite(out).all(), f"{where}: non-finite output"
    assert err <= bound, (f"{where}: max error {err:.3e} vs float64 gather exceeds 2 x "
                          f"gather-in-{dtype}'s {base_err:.3e} + floor")

    Wl, Wr = _window(window, causal)
    lo = -(T - 1) if Wl < 0 else -Wl
    hi = (T - 1) if Wr < 0 else Wr
    ref_lse = _ref_lse(*(t.double() for t in (q, k, P)), mask, L, U, lo, hi, scale)
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), f"{where}: -inf lse where no key is visible"
    assert (out[empty] == 0).all(), f"{where}: rows that see no key must be 0"
    if (~empty).any():
        lse_err = (lse[~empty].double() - ref_lse[~empty]).abs().max().item()
        assert lse_err <= lse_tol, f"{where}: lse max error {lse_err:.3e} > {lse_tol:.1e}"


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


# ---------------------------------------------------------------------------------------------
# On the CPU: the very kernel through the host emulation of its SM80 operations
# ---------------------------------------------------------------------------------------------

EMULATION_SRC = os.path.join(REPO, "csrc", "cuda", "host_emulation", "cute_fwd_emulation.cpp")
UNITS = sorted(glob.glob(os.path.join(REPO, "csrc", "cuda_cute", "fwd_cute_*.cu")))
# The float32 lse of the emulation (exact products, float softmax state) against float64.
EMU_LSE_TOL = 1e-4


def _shipped_tiles():
    """(dtype, head dim) -> (query rows, key rows, warps) of each instantiation unit, which the
    emulation compiles as they are."""
    dtypes = {"__nv_bfloat16": torch.bfloat16, "__half": torch.float16}
    tiles = {}
    for path in UNITS:
        with open(path) as f:
            m = re.search(r"^HDAF_CUTE_DEFINE_FWD\((\w+), [\w:]+, (\d+), (\d+), (\d+), (\d+)\)",
                          f.read(), re.M)
        assert m, f"{path}: no HDAF_CUTE_DEFINE_FWD line"
        tiles[(dtypes[m[1]], int(m[2]))] = tuple(int(x) for x in m.groups()[2:])
    return tiles


def _cutlass_include_dir():
    """The folder holding cute/ and cutlass/, looked up as setup.py does, or None."""
    cands = [os.environ["CUTLASS_INCLUDE_DIR"]] if os.environ.get("CUTLASS_INCLUDE_DIR") else []
    spec = importlib.util.find_spec("cutlass_library")
    cands += [os.path.join(loc, "source", "include")
              for loc in ((spec.submodule_search_locations or []) if spec else [])]
    for d in cands:
        if os.path.isfile(os.path.join(d, "cute", "tensor.hpp")) and \
                os.path.isfile(os.path.join(d, "cutlass", "cutlass.h")):
            return d
    return None


def _cxx20_missing(tmp):
    """Why the C++ compiler torch uses cannot build the emulation (C++20 <barrier>), or None."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not on PATH)"
    src = tmp / "barrier.cpp"
    src.write_text("#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n")
    proc = subprocess.run([cxx, "-std=c++20", "-pthread", str(src), "-o", str(tmp / "barrier")],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        return f"{cxx} cannot compile C++20 std::barrier: {proc.stderr.strip()[-300:]}"
    return None


def _build_emulation(name, src, tmp_path_factory):
    """torch.ops.<name>, the host emulation built from src (about 30 s on 2 cores), or a skip
    naming what is missing."""
    if os.environ.get("HDAF_SKIP_CUDA_EMULATION") == "1":
        pytest.skip("HDAF_SKIP_CUDA_EMULATION=1")
    inc = cuda_include_dir()
    if inc is None:
        pytest.skip("the CUDA headers (cuda_runtime.h, cuda_fp16.h, crt/host_defines.h) were not "
                    "found: set CUDA_HOME")
    cccl = os.path.join(inc, "cccl")  # CUDA 13 keeps libcu++ (cuda/std), which CUTLASS needs, here
    includes = [inc] + ([cccl] if os.path.isdir(cccl) else [])
    if not any(os.path.isfile(os.path.join(d, "cuda", "std", "utility")) for d in includes):
        pytest.skip(f"libcu++ (cuda/std/utility), which CUTLASS includes, is not in {includes}")
    cutlass = _cutlass_include_dir()
    if cutlass is None:
        pytest.skip("the CUTLASS/CuTe headers were not found: pip install nvidia-cutlass "
                    "(requirements.txt) or set CUTLASS_INCLUDE_DIR")
    why = _cxx20_missing(tmp_path_factory.mktemp("cxx20"))
    if why is not None:
        pytest.skip(why)
    from torch.utils.cpp_extension import load
    load(name=name, sources=[src],
         extra_include_paths=[os.path.join(REPO, "csrc", "include")] + includes + [cutlass],
         # CuTe reads register fragments through recast (half_t storage as uint32_t): with g++'s
         # default strict aliasing at -O2 the fp16 P V product read stale registers.
         extra_cflags=["-O2", "-fno-strict-aliasing", "-pthread"], extra_ldflags=["-pthread"],
         with_cuda=False, is_python_module=False, verbose=False)
    return getattr(torch.ops, name)


@pytest.fixture(scope="module")
def cute_emulation(tmp_path_factory):
    """torch.ops.hdaf_cute_emulation (the forward), built once per module."""
    return _build_emulation("hdaf_cute_emulation", EMULATION_SRC, tmp_path_factory)


def _key_tile_span(m0, T, L, U, lo, hi, BN, BM):
    """[begin, end) of the key tiles query block m0 visits (cute_tiles::key_tiles)."""
    begin = max(m0 + lo, 0) // BN * BN
    return begin, max(min(m0 + BM + hi, T), begin)


def _expected_counters(B, H, T, D, L, U, lo, hi, BM, BN, W):
    """[mma.sync, ldmatrix, ldmatrix.trans, cp.async bytes] one launch issues: per query block Q
    once (rows < T); per visited key tile K and V (rows < T), S = Q K^T and O += P V."""
    atoms_m = BM // W // 16  # m16 tiles per warp: warps split the query rows only
    mma = ldsm = ldsm_t = nbytes = 0
    for m0 in range(0, T, BM):
        ldsm += W * atoms_m * 16 * D // 256  # Q: one x4 per 16x16
        nbytes += 2 * D * min(BM, T - m0)
        begin, end = _key_tile_span(m0, T, L, U, lo, hi, BN, BM)
        for n0 in range(begin, end, BN):
            mma += W * atoms_m * ((BN // 8) * (D // 16) + (D // 8) * (BN // 16))
            ldsm += W * BN * D // 256  # K: every warp reads the whole tile
            ldsm_t += W * BN * D // 256  # V
            nbytes += 2 * 2 * D * min(BN, T - n0)
    return [B * H * x for x in (mma, ldsm, ldsm_t, nbytes)]


def _run_emulation(emu, case, T, D, dtype, B=2, H=2, at_issue=False):
    L, U, window, causal, padding, per_head = CASES[case]
    q, k, v, P = _inputs(dtype, T, D, L, U, per_head, device="cpu", B=B, H=H)
    mask = padding(T) if padding is not None else None
    if mask is not None:
        mask = mask[:B]
    scale = D ** -0.5
    Wl, Wr = _window(window, causal)
    out, lse, counters = emu.forward(q, k, v, P, mask, L, U, Wl, Wr, scale, at_issue)
    return (q, k, v, P, mask, scale, Wl, Wr), out, lse, counters


# Each shipped configuration sees every case at T <= 63; at T = 300 (several query blocks, band
# and far tiles of both kinds) every case runs in both dtypes and both head dims, in two of the
# four configurations, which alternate between the cases.
CONFIGS = [(torch.bfloat16, 64), (torch.float16, 64), (torch.bfloat16, 128), (torch.float16, 128)]
EMU_PARAMS = [(T, case, D, dtype) for T in (1, 7, 63) for case in CASES for dtype, D in CONFIGS] + [
    (300, case, D, dtype) for i, case in enumerate(CASES)
    for dtype, D in ((CONFIGS[0], CONFIGS[3]) if i % 2 == 0 else (CONFIGS[1], CONFIGS[2]))]


@pytest.mark.parametrize("T,case,D,dtype", EMU_PARAMS,
                         ids=[f"T{T}-{c}-D{D}-{str(d).split('.')[-1]}" for T, c, D, d in EMU_PARAMS])
def test_cute_emulation_matches_gather(cute_emulation, T, case, D, dtype):
    """The shipped kernel template and tile configuration, run on the CPU with emulated mma.sync /
    ldmatrix / cp.async: out and lse against the float64 gather reference, and exactly the
    operations its tiling implies (so the emulated kernel, nothing else, produced them)."""
    (q, k, v, P, mask, scale, Wl, Wr), out, lse, counters = _run_emulation(
        cute_emulation, case, T, D, dtype)
    L, U, window, causal, _, _ = CASES[case]
    where = f"emulation {case} T={T} D={D} {dtype}"
    _check_against_gather(where, out, lse, q, k, v, P, mask, L, U, window, causal, scale,
                          lse_tol=EMU_LSE_TOL)
    BM, BN, W = _shipped_tiles()[(dtype, D)]
    lo = -(T - 1) if Wl < 0 else -Wl
    hi = (T - 1) if Wr < 0 else Wr
    want = _expected_counters(q.shape[0], q.shape[1], T, D, L, U, lo, hi, BM, BN, W)
    assert counters.tolist() == want, (f"{where}: [mma, ldmatrix, ldmatrix.trans, cp.async bytes] "
                                       f"= {counters.tolist()}, the tiling implies {want}")


def test_cute_emulation_cp_async_landing_does_not_change_the_result(cute_emulation):
    """cp.async landing at issue or only at its wait gives bitwise the same result: no warp reads
    a tile before its copy is waited for, and no copy overwrites a tile a warp still reads."""
    _, out_w, lse_w, c_w = _run_emulation(cute_emulation, "wide_R_causal", 300, 64, torch.bfloat16)
    _, out_i, lse_i, c_i = _run_emulation(cute_emulation, "wide_R_causal", 300, 64, torch.bfloat16,
                                          at_issue=True)
    assert torch.equal(out_w, out_i) and torch.equal(lse_w, lse_i)
    assert torch.equal(c_w, c_i)


def test_cute_emulation_covers_every_shipped_configuration():
    """The emulation compiles the instantiation units setup.py builds, and the tests above run
    each of their (dtype, head dim) configurations."""
    assert sorted(os.path.basename(u) for u in UNITS) == [
        "fwd_cute_bf16_hdim128.cu", "fwd_cute_bf16_hdim64.cu", "fwd_cute_fp16_hdim128.cu",
        "fwd_cute_fp16_hdim64.cu"]
    with open(EMULATION_SRC) as f:
        included = re.findall(r'^#include "\.\./\.\./cuda_cute/(fwd_cute_\w+\.cu)"', f.read(), re.M)
    assert sorted(included) == sorted(os.path.basename(u) for u in UNITS)
    assert set(_shipped_tiles()) == set(CONFIGS)
    assert {(dtype, D) for T, _, D, dtype in EMU_PARAMS if T == 300} == set(CONFIGS)


# ---------------------------------------------------------------------------------------------
# The backward on the CPU: the CuTe dQ and dK/dV kernels through the same host emulation
# ---------------------------------------------------------------------------------------------

# Backward-only cases: one bucket (R = 1: far-low and far-high tiles share bucket 0) and two.
BWD_CASES = {**CASES, "one_bucket": (0, 0, None, False, None, True),
             "two_buckets_causal": (0, 1, None, True, None, False)}
BWD_EMULATION_SRC = os.path.join(REPO, "csrc", "cuda", "host_emulation", "cute_bwd_emulation.cpp")
BWD_UNITS = sorted(glob.glob(os.path.join(REPO, "csrc", "cuda_cute", "bwd_cute_*.cu")))
GRAD_NAMES = ("dq", "dk", "dv", "dP")


@pytest.fixture(scope="module")
def cute_bwd_emulation(tmp_path_factory):
    """torch.ops.hdaf_cute_bwd_emulation (the backward), built once per module."""
    return _build_emulation("hdaf_cute_bwd_emulation", BWD_EMULATION_SRC, tmp_path_factory)


def _shipped_bwd_tiles():
    """(dtype, head dim) -> (query rows, key rows, warps) of each backward instantiation unit."""
    dtypes = {"__nv_bfloat16": torch.bfloat16, "__half": torch.float16}
    tiles = {}
    for path in BWD_UNITS:
        with open(path) as f:
            m = re.search(r"^HDAF_CUTE_DEFINE_BWD\((\w+), [\w:]+, (\d+), (\d+), (\d+), (\d+)\)",
                          f.read(), re.M)
        assert m, f"{path}: no HDAF_CUTE_DEFINE_BWD line"
        tiles[(dtypes[m[1]], int(m[2]))] = tuple(int(x) for x in m.groups()[2:])
    return tiles


def _expected_bwd_counters(B, H, T, D, L, U, lo, hi, BM, BN, W):
    """[mma.sync, ldmatrix, ldmatrix.trans, cp.async bytes] of the dQ and dK/dV launches.
    dQ, per query block (Q, dO once) and visited key tile (K, V): S = Q K^T and dO V^T with both
    operands from smem, dQ += dS K (K^T by ldmatrix.trans). dK/dV, per key block (K, V once) and
    visited query tile (Q, dO): S^T = K Q^T, V dO^T, dV += p^T dO and dK += dS^T Q (dO^T, Q^T by
    ldmatrix.trans). The D_i launch issues none of them."""
    mma = ldsm = ldsm_t = nbytes = 0
    am = BM // W // 16  # dQ: m16 tiles per warp along the query rows
    for m0 in range(0, T, BM):
        nbytes += 2 * 2 * D * min(BM, T - m0)
        begin, end = _key_tile_span(m0, T, L, U, lo, hi, BN, BM)
        for n0 in range(begin, end, BN):
            mma += W * am * (2 * (BN // 8) * (D // 16) + (D // 8) * (BN // 16))
            ldsm += W * (2 * am * (D // 16) + 2 * BN * D // 256)
            ldsm_t += W * D * BN // 256
            nbytes += 2 * 2 * D * min(BN, T - n0)
    an = BN // W // 16  # dK/dV: m16 tiles per warp along the key rows
    for n0 in range(0, T, BN):
        nbytes += 2 * 2 * D * min(BN, T - n0)
        begin = max(n0 - hi, 0) // BM * BM
        end = max(min(n0 + BN - lo, T), begin)
        for m0 in range(begin, end, BM):
            mma += W * an * (2 * (BM // 8) * (D // 16) + 2 * (D // 8) * (BM // 16))
            ldsm += W * (2 * an * (D // 16) + 2 * BM * D // 256)
            ldsm_t += W * 2 * D * BM // 256
            nbytes += 2 * 2 * D * min(BM, T - m0)
    return [B * H * x for x in (mma, ldsm, ldsm_t, nbytes)]


def _grads_of_gather(q, k, v, P, mask, L, U, window, causal, scale, dout):
    """(out, dq, dk, dv, dP) of the gather backend by autograd, in the inputs' dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, P)]
    out = _gather(*leaves, mask, L, U, window, causal, scale)
    grads = torch.autograd.grad(out, leaves, dout)
    return (out.detach(),) + tuple(grads)


def _check_grads(where, ref, base, got, dtype):
    """dq, dk, dv, dP by the flash-attention error rule: at most 2x the error of gather in the
    same dtype against the float64 reference, plus a floor."""
    for name, r, b, g in zip(GRAD_NAMES, ref, base, got):
        assert g.dtype == dtype and g.shape == r.shape, f"{where}: {name} {g.dtype} {tuple(g.shape)}"
        assert torch.isfinite(g).all(), f"{where}: non-finite {name}"
        if r.numel() == 0:
            continue
        err = (g.double().cpu() - r.cpu()).abs().max().item()
        base_err = (b.double() - r).abs().max().item()
        bound = 2.0 * base_err + FLOOR[dtype] * max(1.0, r.abs().max().item())
        assert err <= bound, (f"{where}: {name} max error {err:.3e} vs float64 gather exceeds "
                              f"2 x gather-in-{dtype}'s {base_err:.3e} + floor")


def _run_bwd_emulation(emu, case, T, D, dtype, B=2, H=2, at_issue=False):
    """The emulated backward on the float64 reference's out and lse (cast as the forward returns
    them), and the float64 reference gradients and those of gather in dtype."""
    L, U, window, causal, padding, per_head = BWD_CASES[case]
    q, k, v, P = _inputs(dtype, T, D, L, U, per_head, device="cpu", B=B, H=H)
    dout = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(7),
                       dtype=torch.float64).to(dtype)
    mask = padding(T)[:B] if padding is not None else None
    scale = D ** -0.5
    Wl, Wr = _window(window, causal)
    lo = -(T - 1) if Wl < 0 else -Wl
    hi = (T - 1) if Wr < 0 else Wr
    ref = _grads_of_gather(*(t.double() for t in (q, k, v, P)), mask, L, U, window, causal, scale,
                           dout.double())
    base = _grads_of_gather(q, k, v, P, mask, L, U, window, causal, scale, dout)
    lse = _ref_lse(*(t.double() for t in (q, k, P)), mask, L, U, lo, hi, scale).float()
    *got, counters = emu.backward(dout, q, k, v, P, mask, ref[0].to(dtype), lse, L, U, Wl, Wr,
                                  scale, at_issue)
    return (L, U, lo, hi), ref[1:], base[1:], got, counters


# Every case at T = 63 (one or two tiles, batch 1, two heads: shared P sums over them), the four
# configurations alternating over the cases; T = 300 (several query and key blocks, band and far
# tiles) for four cases, one per configuration, with one (batch, head) except the padding case's
# two sequence lengths; T = 1 and 7 in every configuration. The emulation runs a std::thread per
# CUDA thread: a T = 300 (batch, head) takes 5-10 s on 2 cores.
BWD_PARAMS = ([(63, case, *CONFIGS[i % 4][::-1]) for i, case in enumerate(CASES)] +
              [(300, case, *CONFIGS[i][::-1])
               for i, case in enumerate(("plain", "window", "padding", "masked_rows"))] +
              [(T, case, *cfg[::-1]) for cfg in CONFIGS for T, case in ((1, "plain"), (7, "masked_rows"))
               if (T == 1) == (cfg[1] == 64)] +
              [(150, "one_bucket", 64, torch.bfloat16), (63, "two_buckets_causal", 128, torch.float16)])


def _bwd_batch_heads(T, case):
    return (2 if case == "padding" else 1), (1 if T > 63 and case != "one_bucket" else 2)


@pytest.mark.parametrize("T,case,D,dtype", BWD_PARAMS,
                         ids=[f"T{T}-{c}-D{D}-{str(d).split('.')[-1]}" for T, c, D, d in BWD_PARAMS])
def test_cute_emulation_backward_matches_gather(cute_bwd_emulation, T, case, D, dtype):
    """The shipped backward kernels and tile configurations, run on the CPU with emulated SM80
    operations: dq, dk, dv and dP against the float64 gather reference's autograd gradients by
    the flash-attention error rule (at most 2x the error of gather in the same dtype, plus a
    floor), rows that see no key getting exactly 0, and exactly the operations the tiling implies."""
    B, H = _bwd_batch_heads(T, case)
    (L, U, lo, hi), ref, base, got, counters = _run_bwd_emulation(cute_bwd_emulation, case, T, D,
                                                                  dtype, B=B, H=H)
    where = f"emulation backward {case} T={T} D={D} {dtype}"
    _check_grads(where, ref, base, got, dtype)
    if case == "masked_rows":  # rows 0..4 see no key: no gradient through them
        assert (got[0][:, :, :5] == 0).all(), f"{where}: dq of rows that see no key"
    BM, BN, W = _shipped_bwd_tiles()[(dtype, D)]
    want = _expected_bwd_counters(B, H, T, D, L, U, lo, hi, BM, BN, W)
    assert counters.tolist() == want, (f"{where}: [mma, ldmatrix, ldmatrix.trans, cp.async bytes] "
                                       f"= {counters.tolist()}, the tiling implies {want}")


def test_cute_emulation_backward_is_deterministic_and_cp_async_landing_does_not_matter(
        cute_bwd_emulation):
    """Two runs give bitwise the same gradients (no atomics), and landing cp.async at issue
    instead of at its wait changes nothing: no warp reads a stage before its copy is waited for,
    and no copy overwrites a stage a warp still reads."""
    runs = [_run_bwd_emulation(cute_bwd_emulation, "plain", 200, 128, torch.float16, B=1, H=1,
                               at_issue=a) for a in (False, False, True)]
    for _, _, _, got, counters in runs[1:]:
        for name, a, b in zip(GRAD_NAMES, runs[0][3], got):
            assert torch.equal(a, b), name
        assert torch.equal(runs[0][4], counters)


def test_cute_emulation_backward_covers_every_shipped_configuration():
    assert sorted(os.path.basename(u) for u in BWD_UNITS) == [
        "bwd_cute_bf16_hdim128.cu", "bwd_cute_bf16_hdim64.cu", "bwd_cute_fp16_hdim128.cu",
        "bwd_cute_fp16_hdim64.cu"]
    with open(BWD_EMULATION_SRC) as f:
        included = re.findall(r'^#include "\.\./\.\./cuda_cute/(bwd_cute_\w+\.cu)"', f.read(), re.M)
    assert sorted(included) == sorted(os.path.basename(u) for u in BWD_UNITS)
    assert set(_shipped_bwd_tiles()) == set(CONFIGS)
    for T in (63, 300):
        assert {(dtype, D) for t, _, D, dtype in BWD_PARAMS if t == T} == set(CONFIGS)
    assert {case for t, case, _, _ in BWD_PARAMS if t == 63} >= set(CASES)
    assert {case for _, case, _, _ in BWD_PARAMS} == set(BWD_CASES)
