"""The CUDA forward kernels (csrc/cuda/flash_fwd.cuh) on the CPU: the tile split compiled for the
CPU against every (query, key) pair, and the shipped instantiation units run through the host
emulation (csrc/cuda/host_emulation/fwd_emulation.cpp) against float64 references: padded and
packed batches, grouped-query heads, query blocks shorter than the keys, split-key decoding,
every mask kind of CASES and non-finite inputs."""
from __future__ import annotations

import glob
import itertools
import os
import re
import shutil
import subprocess

import pytest
import torch

from cuda_emulation import (CASES, CONFIGS, FLOOR, REPO, shipped_tiles, _build_emulation, _gather,
                            _key_tile_span, _window)


TILES_PROGRAM = r"""
#include <cstdio>
#include "tile_split.h"
int main() {
  long T, off, L, U, Wl, Wr, BM, BN, pad;
  while (std::scanf("%ld %ld %ld %ld %ld %ld %ld %ld %ld", &T, &off, &L, &U, &Wl, &Wr, &BM, &BN,
                    &pad) == 9) {
    const hdaf::Band b = hdaf::make_band(T, Wl, Wr);
    for (int m0 = off; m0 < T; m0 += BM) {
      const auto t = hdaf::cute_tiles::key_tiles(m0, T, L, U, b.lo, b.hi, BM, BN);
      const auto u = hdaf::cute_tiles::unmasked_tiles(t, m0, T, b.lo, b.hi, BM, BN, pad);
      std::printf("%d %d %d %d %d %d %d", m0, t.begin, t.band, t.far_hi, t.end, u.first, u.last);
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
    bucket 0 / R-1; a tile left unmasked holds only visible pairs; the unmasked tiles are
    exactly unmasked_tiles' run. Query blocks start at key position `off` + multiples of BM
    (queries at the end of longer keys)."""
    grid = list(itertools.product(
        (1, 7, 63, 64, 65, 130, 300),  # T (keys)
        (0, 5),  # key position of the first query
        ((0, 0), (3, 3), (2, 5), (0, 30), (200, 200), (5, 0)),  # (L, U)
        ((-1, -1), (-1, 0), (40, 17), (0, 30), (0, 0), (3, -1)),  # (Wl, Wr)
        ((128, 64), (16, 16), (64, 128)),  # (BM, BN)
        (0, 1)))  # padding mask present
    grid = [g for g in grid if g[1] < g[0]]
    lines = "".join(f"{T} {off} {L} {U} {Wl} {Wr} {BM} {BN} {pad}\n"
                    for T, off, (L, U), (Wl, Wr), (BM, BN), pad in grid)
    out = subprocess.run([tiles_program], input=lines, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split("END\n")
    kinds_seen = set()
    for (T, off, (L, U), (Wl, Wr), (BM, BN), pad), block_lines in zip(grid, out):
        lo = -(T - 1) if Wl < 0 or Wl > T - 1 else -Wl
        hi = (T - 1) if Wr < 0 or Wr > T - 1 else Wr
        pos = torch.arange(T)
        d = pos[None, :] - pos[:, None]  # [i, j]
        vis = (d >= lo) & (d <= hi)
        bucket = d.clamp(-L, U) + L
        where = f"T={T} off={off} L={L} U={U} window=({Wl},{Wr}) tiles {BM}x{BN} pad={pad}"
        for line in block_lines.strip().splitlines():
            m0, begin, band, far_hi, end, first, last, *masks = map(int, line.split())
            rows = slice(m0, min(m0 + BM, T))
            assert begin % BN == 0 and begin <= band <= far_hi <= end <= T, f"{where} m0={m0}: {line}"
            assert band % BN == 0 or band == end, f"{where} m0={m0}: {line}"
            assert far_hi % BN == 0 or far_hi == end, f"{where} m0={m0}: {line}"
            assert begin <= first <= last <= end, f"{where} m0={m0}: {line}"
            assert (first - begin) % BN == 0 or first == end, f"{where} m0={m0}: {line}"
            assert (last - begin) % BN == 0 or last == end, f"{where} m0={m0}: {line}"
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
                assert (first <= n0 < last) == (not masks[t]), \
                    f"{where} m0={m0} n0={n0}: unmasked_tiles [{first}, {last}) vs tile_needs_mask"
    assert kinds_seen == {"far_lo", "band", "far_hi"}


EMULATION_SRC = os.path.join(REPO, "csrc", "cuda", "host_emulation", "fwd_emulation.cpp")
UNITS = sorted(glob.glob(os.path.join(REPO, "csrc", "cuda", "fwd_*.cu")))


EMU_LSE_TOL = 1e-4


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """torch.ops.hdaf_cuda_fwd_emulation, built once per module."""
    return _build_emulation("hdaf_cuda_fwd_emulation", EMULATION_SRC, tmp_path_factory)


# ---------------------------------------------------------------------------------------------
# References and expected counters
# ---------------------------------------------------------------------------------------------

def _band(Tk, Wl, Wr):
    lo = -(Tk - 1) if Wl < 0 or Wl > Tk - 1 else -Wl
    hi = (Tk - 1) if Wr < 0 or Wr > Tk - 1 else Wr
    return lo, hi


def _ref_lse(q, k, P, mask, L, U, Wl, Wr, scale):
    """float64 lse [B,H,Tq] of one padded call: grouped heads, queries at key positions
    Tk - Tq + i."""
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    k = k.repeat_interleave(H // k.shape[1], 1)
    P = P.expand(B, H, Tk, P.shape[-1])
    t = torch.arange(Tq) + Tk - Tq
    d = torch.arange(Tk)[None, :] - t[:, None]
    r = (d.clamp(-L, U) + L).expand(B, H, Tq, Tk)
    bias = torch.gather(P.transpose(-1, -2), -2, r) - torch.gather(P[:, :, t], -1, r)
    logits = scale * (q @ k.transpose(-1, -2) + bias)
    lo, hi = _band(Tk, Wl, Wr)
    vis = ((d >= lo) & (d <= hi))[None, None]
    if mask is not None:
        vis = vis & ~mask[:, None, None, :]
    return logits.masked_fill(~vis, float("-inf")).logsumexp(-1)


def _check(where, case, out, lse, q, k, v, P, mask, scale):
    """out by the flash-attention error rule against the float64 gather reference (at most 2x
    gather-in-dtype's error plus a floor), lse within EMU_LSE_TOL; rows that see no key: lse
    -inf and out 0."""
    dtype = q.dtype
    L, U, window, causal, _, _ = CASES[case]
    Wl, Wr = _window(window, causal)
    assert out.dtype == dtype and out.shape == q.shape, f"{where}: out {out.dtype} {tuple(out.shape)}"
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3], f"{where}: lse {lse.dtype}"
    if q.numel() == 0:
        return
    ref = _gather(*(t.double() for t in (q, k, v, P)), mask, L, U, window, causal, scale)
    base = _gather(q, k, v, P, mask, L, U, window, causal, scale)
    err = (out.double() - ref).abs().max().item()
    base_err = (base.double() - ref).abs().max().item()
    bound = 2.0 * base_err + FLOOR[dtype] * max(1.0, ref.abs().max().item())
    assert torch.isfinite(out).all(), f"{where}: non-finite output"
    assert err <= bound, (f"{where}: max error {err:.3e} vs float64 gather exceeds 2 x "
                          f"gather-in-{dtype}'s {base_err:.3e} + floor")
    ref_lse = _ref_lse(*(t.double() for t in (q, k, P)), mask, L, U, Wl, Wr, scale)
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), f"{where}: -inf lse where no key is visible"
    assert (out[empty] == 0).all(), f"{where}: rows that see no key must be 0"
    if (~empty).any():
        lse_err = (lse[~empty].double() - ref_lse[~empty]).abs().max().item()
        assert lse_err <= EMU_LSE_TOL, f"{where}: lse max error {lse_err:.3e}"


def _split_range(begin, end, BN, s, S):
    n = (end - begin + BN - 1) // BN
    return (min(begin + s * n // S * BN, end), min(begin + (s + 1) * n // S * BN, end))


def _expected_counters(seqs, H, D, L, U, Wl, Wr, BM, BN, W, num_splits=1):
    """[mma.sync, ldmatrix, ldmatrix.trans, cp.async bytes] one launch issues. seqs: (Tq_b,
    Tk_b) per sequence. Per query block (rows < Tq_b) and split: Q into smem once; per visited
    key tile of the split Q (from smem), K and V (rows < Tk_b), S = Q K^T and O += P V. The tiles are those the block's
    rows below Tq_b see."""
    atoms_m = BM // W // 16  # m16 tiles per warp: warps split the query rows only
    mma = ldsm = ldsm_t = nbytes = 0
    for Tq, Tk in seqs:
        lo, hi = _band(Tk, Wl, Wr)
        for m0 in range(0, Tq, BM):
            begin, end = _key_tile_span(Tk - Tq + m0, Tk, L, U, lo, hi, BN, min(BM, Tq - m0))
            for s in range(num_splits):
                nbytes += 2 * D * min(BM, Tq - m0)  # Q
                sb, se = _split_range(begin, end, BN, s, num_splits) if num_splits > 1 else (begin, end)
                for n0 in range(sb, se, BN):
                    mma += W * atoms_m * ((BN // 8) * (D // 16) + (D // 8) * (BN // 16))
                    ldsm += W * atoms_m * 16 * D // 256  # Q from smem: one x4 per 16x16
                    ldsm += W * BN * D // 256  # K: every warp reads the whole tile
                    ldsm_t += W * BN * D // 256  # V
                    nbytes += 2 * 2 * D * min(BN, Tk - n0)
    return [H * x for x in (mma, ldsm, ldsm_t, nbytes)]


def _case_inputs(case, dtype, Tq, Tk, D, B=2, H=2, Hkv=None, seed=0):
    """q [B,H,Tq,D], k, v [B,Hkv,Tk,D], P [B,Hp,Tk,R], the mask [B,Tk] or None, and the op's
    L, U, window_left, window_right of one CASES entry."""
    L, U, window, causal, padding, per_head = CASES[case]
    Hkv = Hkv or H
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    q, k, v = rnd(B, H, Tq, D), rnd(B, Hkv, Tk, D), rnd(B, Hkv, Tk, D)
    P = rnd(B, H if per_head else 1, Tk, L + U + 1)
    mask = None
    if padding is not None:
        mask = padding(Tk)
        mask = mask.expand(B, Tk).contiguous() if mask.shape[0] == 1 else mask[:B]
        if mask.shape[0] < B:
            mask = torch.cat([mask, mask[-1:].expand(B - mask.shape[0], Tk)])
    Wl, Wr = _window(window, causal)
    return q, k, v, P, mask, L, U, Wl, Wr


def _run_padded(emu, q, k, v, P, mask, L, U, Wl, Wr, num_splits=1, at_issue=False):
    scale = q.shape[-1] ** -0.5
    out, lse, counters = emu.forward(q, k, v, P, mask, None, None, q.shape[2], k.shape[2], L, U,
                                     Wl, Wr, scale, num_splits, at_issue)
    return out, lse, counters, scale


def _check_padded(emu, where, case, dtype, D, q, k, v, P, mask, L, U, Wl, Wr, num_splits=1):
    out, lse, counters, scale = _run_padded(emu, q, k, v, P, mask, L, U, Wl, Wr, num_splits)
    _check(where, case, out, lse, q, k, v, P, mask, scale)
    BM, BN, W = shipped_tiles(UNITS, "FWD")[(dtype, D)]
    want = _expected_counters([(q.shape[2], k.shape[2])] * q.shape[0], q.shape[1], D, L, U, Wl, Wr,
                              BM, BN, W, num_splits)
    assert counters.tolist() == want, (f"{where}: [mma, ldmatrix, ldmatrix.trans, cp.async bytes] "
                                       f"= {counters.tolist()}, the tiling implies {want}")
    return out, lse


# ---------------------------------------------------------------------------------------------
# Padded batches: every case at small T for every configuration in turn, a few at T=300
# ---------------------------------------------------------------------------------------------

PADDED = [(T, case, *CONFIGS[(i + j) % len(CONFIGS)])
          for j, T in enumerate((1, 7, 63)) for i, case in enumerate(CASES)] + [
    (300, case, *CONFIGS[i % len(CONFIGS)])
    for i, case in enumerate(("wide_R_causal", "window", "padding", "paper_preset", "plain",
                              "per_head_P"))]  # the last two: unmasked far-low and far-high tiles


@pytest.mark.parametrize("T,case,dtype,D", PADDED,
                         ids=[f"T{T}-{c}-D{D}-{str(d).split('.')[-1]}" for T, c, d, D in PADDED])
def test_padded_matches_reference(emu, T, case, dtype, D):
    """The shipped kernel template and tile configuration, run on the CPU with emulated mma.sync /
    ldmatrix / cp.async: out and lse against the float64 references, and exactly the operations
    its tiling implies (so the emulated kernel, nothing else, produced them)."""
    args = _case_inputs(case, dtype, T, T, D)
    _check_padded(emu, f"{case} T={T} D={D} {dtype}", case, dtype, D, *args)


# (Tq, Tk, H, Hkv, case, dtype, D)
SHORT_QUERIES = [
    (1, 300, 4, 1, "causal", torch.bfloat16, 64),  # a decoding step, multi-query
    (37, 300, 4, 2, "wide_R_causal", torch.float16, 128),
    (37, 300, 4, 2, "window", torch.bfloat16, 128),
    (37, 300, 2, 1, "padding", torch.float16, 64),
    (7, 63, 4, 2, "masked_rows", torch.bfloat16, 64),
    (63, 130, 2, 2, "paper_preset", torch.bfloat16, 64),
]


@pytest.mark.parametrize("Tq,Tk,H,Hkv,case,dtype,D", SHORT_QUERIES,
                         ids=[f"Tq{a}-Tk{b}-H{h}-Hkv{g}-{c}-D{D}" for a, b, h, g, c, _, D in SHORT_QUERIES])
def test_short_queries_and_grouped_heads(emu, Tq, Tk, H, Hkv, case, dtype, D):
    """Queries at the end of longer keys (query i at key position Tk - Tq + i for every bucket,
    window and causal relation and its own P row) and grouped-query heads (h reads k/v head
    h // (H / Hkv), no copies)."""
    args = _case_inputs(case, dtype, Tq, Tk, D, H=H, Hkv=Hkv)
    _check_padded(emu, f"{case} Tq={Tq} Tk={Tk} H={H} Hkv={Hkv} D={D} {dtype}", case, dtype, D,
                  *args)


# (Tq, Tk, case, num_splits, dtype, D)
SPLITS = [
    (1, 300, "causal", 2, torch.bfloat16, 64),
    (1, 300, "window", 3, torch.float16, 128),  # one key tile: two splits without tiles
    (37, 300, "wide_R_causal", 4, torch.bfloat16, 128),
    (63, 63, "masked_rows", 4, torch.float16, 64),  # rows no split sees, empty splits
    (7, 130, "padding", 3, torch.bfloat16, 64),
]


@pytest.mark.parametrize("Tq,Tk,case,num_splits,dtype,D", SPLITS,
                         ids=[f"Tq{a}-Tk{b}-{c}-S{s}-D{D}" for a, b, c, s, _, D in SPLITS])
def test_split_key_decoding(emu, Tq, Tk, case, num_splits, dtype, D):
    """num_splits CTAs share each query block's key tiles and write float32 partial out and lse;
    the combine kernel merges them. Splits without tiles write lse -inf; the partial buffers
    start as NaN, so a row a split leaves unwritten would show."""
    args = _case_inputs(case, dtype, Tq, Tk, D, H=4, Hkv=2)
    out, lse = _check_padded(emu, f"{case} Tq={Tq} Tk={Tk} splits={num_splits}", case, dtype, D, *args,
                             num_splits=num_splits)
    one, lse1, _, _ = _run_padded(emu, *args)
    assert (out.double() - one.double()).abs().max().item() <= 2 * FLOOR[dtype] * max(
        1.0, one.abs().max().item())
    fin = torch.isfinite(lse1)
    assert torch.equal(fin, torch.isfinite(lse)) and \
        (lse[fin] - lse1[fin]).abs().max().item() <= EMU_LSE_TOL


# (case, scale factor, dtype, D): T=300, unmasked far-low, band and far-high tiles at scale > 0
NONPOSITIVE_SCALE = [
    ("per_head_P", -1.0, torch.bfloat16, 64),
    ("plain", -1.0, torch.float16, 128),
    ("per_head_P", 0.0, torch.bfloat16, 128),
]


@pytest.mark.parametrize("case,factor,dtype,D", NONPOSITIVE_SCALE,
                         ids=[f"{c}-x{f:g}-D{D}" for c, f, _, D in NONPOSITIVE_SCALE])
def test_nonpositive_scale(emu, case, factor, dtype, D):
    """scale = factor / sqrt(D): the unmasked loops take the row maximum of the unscaled S,
    which needs scale >= 0, so a negative scale runs every tile in the masked loop; scale 0
    weights every visible key alike. The queries are scaled up so that the logits of a row span
    more than exp2's range: a maximum taken the wrong way round overflows. out and lse against
    the float64 references, and the same operation counts as at scale > 0 (the same tiles)."""
    q, k, v, P, mask, L, U, Wl, Wr = _case_inputs(case, dtype, 300, 300, D)
    q = q * 32
    scale = factor * D ** -0.5
    out, lse, counters = emu.forward(q, k, v, P, mask, None, None, 300, 300, L, U, Wl, Wr, scale,
                                     1, False)
    _check(f"{case} scale={scale:g} D={D} {dtype}", case, out, lse, q, k, v, P, mask, scale)
    BM, BN, W = shipped_tiles(UNITS, "FWD")[(dtype, D)]
    assert counters.tolist() == _expected_counters([(300, 300)] * q.shape[0], q.shape[1], D, L, U,
                                                   Wl, Wr, BM, BN, W)


# ---------------------------------------------------------------------------------------------
# Packed batches
# ---------------------------------------------------------------------------------------------

# (seqlens [(Tq_b, Tk_b)], case, H, Hkv, num_splits, dtype, D)
PACKED = [
    ([(5, 5), (0, 0), (70, 70), (1, 130), (0, 9), (37, 100)], "causal", 4, 2, 1,
     torch.bfloat16, 64),
    ([(63, 63), (130, 130), (0, 0), (2, 2)], "wide_R_causal", 2, 1, 1, torch.float16, 128),
    ([(1, 300), (1, 7), (0, 0), (3, 200)], "window", 4, 4, 3, torch.float16, 64),
    ([(7, 7), (20, 135)], "per_head_P", 2, 2, 2, torch.bfloat16, 128),
]


@pytest.mark.parametrize("seqlens,case,H,Hkv,num_splits,dtype,D", PACKED,
                         ids=[f"{c}-H{h}-Hkv{g}-S{s}-D{D}" for _, c, h, g, s, _, D in PACKED])
def test_packed_matches_per_sequence_calls(emu, seqlens, case, H, Hkv, num_splits, dtype, D):
    """A packed batch (cu_seqlens; sequences of unequal length, empty ones, Tq_b < Tk_b) equals
    the per-sequence padded references concatenated; lse [H, Total_q]."""
    L, U, window, causal, _, per_head = CASES[case]
    Wl, Wr = _window(window, causal)
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    tq = [a for a, _ in seqlens]
    tk = [b for _, b in seqlens]
    q, k, v = rnd(sum(tq), H, D), rnd(sum(tk), Hkv, D), rnd(sum(tk), Hkv, D)
    P = rnd(sum(tk), H if per_head else 1, L + U + 1)
    cu = lambda t: torch.tensor([0] + list(itertools.accumulate(t)), dtype=torch.int32)  # noqa: E731
    cu_q, cu_k = cu(tq), cu(tk)
    scale = D ** -0.5
    out, lse, counters = emu.forward(q, k, v, P, None, cu_q, cu_k, max(tq), max(tk), L, U, Wl, Wr,
                                     scale, num_splits, False)
    assert out.shape == q.shape and lse.shape == (H, sum(tq))
    for b, (a, n) in enumerate(seqlens):
        if a == 0:
            continue
        qs = slice(int(cu_q[b]), int(cu_q[b + 1]))
        ks = slice(int(cu_k[b]), int(cu_k[b + 1]))
        pad4 = lambda t: t[None].transpose(1, 2)  # noqa: E731  [rows, heads, D] -> [1, heads, rows, D]
        _check(f"packed {case} sequence {b} ({a}, {n})", case, pad4(out[qs]), lse[None, :, qs],
               pad4(q[qs]), pad4(k[ks]), pad4(v[ks]), pad4(P[ks]), None, scale)
    BM, BN, W = shipped_tiles(UNITS, "FWD")[(dtype, D)]
    want = _expected_counters(seqlens, H, D, L, U, Wl, Wr, BM, BN, W, num_splits)
    assert counters.tolist() == want, f"packed {case}: counters {counters.tolist()} vs {want}"


# ---------------------------------------------------------------------------------------------
# Non-finite inputs, the cp.async pipeline, the shipped configurations
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_splits", (1, 3))
def test_nonfinite_inputs(emu, num_splits):
    """Per the spec: a NaN query row reaches its own output only (NaN), a NaN / Inf key at a
    padding position reaches nothing, a fully masked row stays 0 with lse -inf whatever its
    query and its own P row hold, and a NaN in a visible key's P column reaches the rows that see
    that key."""
    dtype, D, T = torch.bfloat16, 64, 130
    q, k, v, P, mask, L, U, Wl, Wr = _case_inputs("masked_rows", dtype, T, T, D)
    clean, clean_lse, _, scale = _run_padded(emu, q, k, v, P, mask, L, U, Wl, Wr, num_splits)
    q2, k2, P2 = q.clone(), k.clone(), P.clone()
    q2[0, 1, 70] = float("nan")  # a visible row
    q2[1, 0, 2] = float("nan")  # a fully masked row (causal rows 0..4 see only padding)
    P2[1, 0, 3] = float("inf")  # that row's own P row
    k2[:, :, 1] = float("nan")  # a padding key
    k2[0, 0, 4] = float("inf")
    out, lse, _, _ = _run_padded(emu, q2, k2, v, P2, mask, L, U, Wl, Wr, num_splits)
    assert torch.isnan(out[0, 1, 70]).all() and torch.isnan(lse[0, 1, 70])
    others = torch.ones_like(lse, dtype=torch.bool)
    others[0, 1, 70] = False
    assert torch.isfinite(out[others]).all()
    assert torch.equal(out[others], clean[others]) and torch.equal(lse[others], clean_lse[others])
    assert (out[:, :, :5] == 0).all() and torch.isneginf(lse[:, :, :5]).all()
    # a NaN in column 0 of key 20's P row (head 0): it reaches the rows that see key 20 in
    # bucket 0 (j - t_i <= -3, through far-low tiles too) and row 20 itself (its own row), no
    # other row
    q, k, v, P, mask, L, U, Wl, Wr = _case_inputs("per_head_P", dtype, 300, 300, D, B=1)
    P[0, 0, 20, 0] = float("nan")
    out3, lse3, _, _ = _run_padded(emu, q, k, v, P, mask, L, U, Wl, Wr, num_splits)
    nan_rows = torch.zeros(300, dtype=torch.bool)
    nan_rows[20] = True
    nan_rows[23:] = True
    assert torch.isnan(out3[0, 0, nan_rows]).all() and torch.isnan(lse3[0, 0, nan_rows]).all()
    assert torch.isfinite(out3[0, 0, ~nan_rows]).all() and torch.isfinite(out3[0, 1]).all()


def test_cp_async_landing_does_not_change_the_result(emu):
    """cp.async landing at issue or only at its wait gives bitwise the same result: no warp reads
    a tile before its copy is waited for, and no copy overwrites a tile a warp still reads
    (every loop kind and the prefetch across loops)."""
    args = _case_inputs("wide_R_causal", torch.bfloat16, 300, 300, 64)
    a = _run_padded(emu, *args)
    b = _run_padded(emu, *args, at_issue=True)
    for x, y in zip(a[:3], b[:3]):
        assert torch.equal(x, y)


def test_covers_every_shipped_configuration():
    """The emulation compiles the instantiation units setup.py builds, and the tests above run
    each of their (dtype, head dim) configurations, at T=300 too."""
    assert sorted(os.path.basename(u) for u in UNITS) == [
        "fwd_bf16_hdim128.cu", "fwd_bf16_hdim64.cu", "fwd_fp16_hdim128.cu",
        "fwd_fp16_hdim64.cu"]
    with open(EMULATION_SRC) as f:
        included = re.findall(r'^#include "\.\./(fwd_\w+\.cu)"', f.read(), re.M)
    assert sorted(included) == sorted(os.path.basename(u) for u in UNITS)
    assert set(shipped_tiles(UNITS, "FWD")) == set(CONFIGS)
    assert {(dtype, D) for T, _, dtype, D in PADDED if T == 300} == set(CONFIGS)
