"""Shared by the CUDA kernel tests (tests/test_cuda_fwd_emulation.py, test_cuda_bwd_emulation.py,
test_cuda.py): the cases, inputs and float64 references, and the build of the host emulation
(csrc/cuda/host_emulation) with torch.utils.cpp_extension."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess

import pytest
import torch

import hdaf
from conftest import cuda_include_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


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


def _key_tile_span(m0, T, L, U, lo, hi, BN, BM):
    """[begin, end) of the key tiles query block m0 visits (cute_tiles::key_tiles)."""
    begin = max(m0 + lo, 0) // BN * BN
    return begin, max(min(m0 + BM + hi, T), begin)


CONFIGS = [(torch.bfloat16, 64), (torch.float16, 64), (torch.bfloat16, 128), (torch.float16, 128)]


GRAD_NAMES = ("dq", "dk", "dv", "dP")
BWD_CASES = {**CASES, "one_bucket": (0, 0, None, False, None, True),
             "two_buckets_causal": (0, 1, None, True, None, False)}


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


def shipped_tiles(units, direction):
    """(dtype, head dim) -> (query rows, key rows, warps) of each instantiation unit in ``units``
    (their ``HDAF_DEFINE_FWD`` / ``HDAF_DEFINE_BWD`` line, ``direction`` "FWD" or "BWD"), which
    the emulation compiles as they are."""
    dtypes = {"__nv_bfloat16": torch.bfloat16, "__half": torch.float16}
    tiles = {}
    for path in units:
        with open(path) as f:
            m = re.search(rf"^HDAF_DEFINE_{direction}\((\w+), [\w:]+, "
                          r"(\d+), (\d+), (\d+), (\d+)\)", f.read(), re.M)
        assert m, f"{path}: no HDAF_DEFINE_{direction} line"
        tiles[(dtypes[m[1]], int(m[2]))] = tuple(int(x) for x in m.groups()[2:])
    return tiles
