"""The CUDA backward kernels (csrc/cuda/flash_bwd.cuh) on the CPU: the dK/dV pass's walk over query
tiles, and the shipped instantiation units run through the host emulation
(csrc/cuda/host_emulation/bwd_emulation.cpp) against the float64 gather reference's autograd."""
from __future__ import annotations

import glob
import itertools
import os
import re
import shutil
import subprocess

import pytest
import torch

from cuda_emulation import (BWD_CASES, CASES, CONFIGS, GRAD_NAMES, REPO, _build_emulation, _check_grads, _grads_of_gather, _inputs, _key_tile_span, _ref_lse, _window)


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
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{REPO}/csrc/include", f"-I{REPO}/csrc/cuda",
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


BWD_EMULATION_SRC = os.path.join(REPO, "csrc", "cuda", "host_emulation", "bwd_emulation.cpp")
BWD_UNITS = sorted(glob.glob(os.path.join(REPO, "csrc", "cuda", "bwd_*.cu")))


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
        "bwd_bf16_hdim128.cu", "bwd_bf16_hdim64.cu", "bwd_fp16_hdim128.cu",
        "bwd_fp16_hdim64.cu"]
    with open(BWD_EMULATION_SRC) as f:
        included = re.findall(r'^#include "\.\./(bwd_\w+\.cu)"', f.read(), re.M)
    assert sorted(included) == sorted(os.path.basename(u) for u in BWD_UNITS)
    assert set(_shipped_bwd_tiles()) == set(CONFIGS)
    for T in (63, 300):
        assert {(dtype, D) for t, _, D, dtype in BWD_PARAMS if t == T} == set(CONFIGS)
    assert {case for t, case, _, _ in BWD_PARAMS if t == 63} >= set(CASES)
    assert {case for _, case, _, _ in BWD_PARAMS} == set(BWD_CASES)
