"""The CUDA forward kernels (csrc/cuda/flash_fwd.cuh) on the CPU: the tile split compiled for the
CPU against every (query, key) pair, and the shipped instantiation units run through the host
emulation (csrc/cuda/host_emulation/fwd_emulation.cpp) against the float64 gather reference."""
from __future__ import annotations

import glob
import itertools
import os
import re
import shutil
import subprocess

import pytest
import torch

from cuda_emulation import (CASES, CONFIGS, REPO, _build_emulation, _check_against_gather, _inputs, _key_tile_span, _window)


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
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{REPO}/csrc/include", f"-I{REPO}/csrc/cuda",
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


EMULATION_SRC = os.path.join(REPO, "csrc", "cuda", "host_emulation", "fwd_emulation.cpp")
UNITS = sorted(glob.glob(os.path.join(REPO, "csrc", "cuda", "fwd_*.cu")))


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


@pytest.fixture(scope="module")
def cute_emulation(tmp_path_factory):
    """torch.ops.hdaf_cute_emulation (the forward), built once per module."""
    return _build_emulation("hdaf_cute_emulation", EMULATION_SRC, tmp_path_factory)




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
        "fwd_bf16_hdim128.cu", "fwd_bf16_hdim64.cu", "fwd_fp16_hdim128.cu",
        "fwd_fp16_hdim64.cu"]
    with open(EMULATION_SRC) as f:
        included = re.findall(r'^#include "\.\./(fwd_\w+\.cu)"', f.read(), re.M)
    assert sorted(included) == sorted(os.path.basename(u) for u in UNITS)
    assert set(_shipped_tiles()) == set(CONFIGS)
    assert {(dtype, D) for T, _, D, dtype in EMU_PARAMS if T == 300} == set(CONFIGS)
