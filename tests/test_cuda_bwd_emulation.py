"""The CUDA backward kernels (csrc/cuda/flash_bwd.cuh) on the CPU: the tile walks of both passes
(csrc/cuda/tile_split.h), and the shipped instantiation units run through the host emulation
(csrc/cuda/host_emulation/bwd_emulation.cpp) against the float64 gather reference's autograd:
padded and packed batches, grouped heads, query blocks shorter than the keys, every mask kind of
BWD_CASES, shared and per-head P, fully masked rows and non-finite inputs."""
from __future__ import annotations

import glob
import itertools
import os
import re
import shutil
import subprocess

import pytest
import torch

from cuda_emulation import (BWD_CASES, CASES, CONFIGS, GRAD_NAMES, REPO, shipped_tiles,
                            _build_emulation, _check_grads, _grads_of_gather, _window)


TILES_PROGRAM = r"""
#include <cstdio>
#include "tile_split.h"
using namespace hdaf::cute_tiles;
// One line per CTA: its tiles in the order the schedule runs them, each with a tag:
// m (compares positions), 0 / 1 / 2 (unmasked far-low / band / far-high).
static void walk(const char* tag, int cta, const TileSchedule& s, const int kinds[3]) {
  std::printf("%s %d", tag, cta);
  for (int k = 0; k < s.masked_count(); ++k) std::printf(" m%d", s.masked_tile(k));
  for (int seg = 1; seg < 4; ++seg)
    for (int k = 0; k < s.segment_count(seg); ++k)
      std::printf(" %d:%d", kinds[seg - 1], s.segment_tile(seg, k));
  std::printf(" first %d\n", s.first());
}
int main() {
  long Tq, Tk, L, U, Wl, Wr, BM, BN, pad;
  while (std::scanf("%ld %ld %ld %ld %ld %ld %ld %ld %ld", &Tq, &Tk, &L, &U, &Wl, &Wr, &BM, &BN,
                    &pad) == 9) {
    const hdaf::Band b = hdaf::make_band(Tk, Wl, Wr);
    const int off = int(Tk - Tq);
    const int q_kinds[3] = {0, 1, 2}, k_kinds[3] = {2, 1, 0};
    for (int m0 = 0; m0 < Tq; m0 += BM) {  // dQ
      const KeyTiles t = key_tiles(off + m0, Tk, L, U, b.lo, b.hi, BM, BN);
      Span u = unmasked_key_tiles(off + m0, b.lo, b.hi, BM, BN, t.begin, t.end);
      u.last = imax(imin(u.last, int(Tk / BN * BN)), u.first);
      walk("Q", m0, make_schedule(t.begin, t.end, u, t.band, t.far_hi, pad, BN), q_kinds);
    }
    for (int n0 = 0; n0 < Tk; n0 += BN) {  // dK/dV
      const QueryRuns r = query_runs(n0, Tq, off, L, U, b.lo, b.hi, BM, BN);
      const Span u = unmasked_query_tiles(n0, off, b.lo, b.hi, BM, BN, r.begin, r.end);
      walk("K", n0, make_schedule(r.begin, r.end, u, r.band, r.far_lo, pad || n0 + BN > Tk, BM),
           k_kinds);
    }
    std::printf("END\n");
  }
}
"""


def _window_band(Tk, Wl, Wr):
    """hdaf::make_band: the visible offsets [lo, hi] of j - t_i."""
    lo = -(Tk - 1) if Wl < 0 or Wl > Tk - 1 else -Wl
    hi = (Tk - 1) if Wr < 0 or Wr > Tk - 1 else Wr
    return lo, hi


def test_tile_schedules_cover_every_visible_pair_once_with_the_right_loop(tmp_path):
    """Both passes' walks (query i at key position Tk - Tq + i): every tile that holds a visible
    pair is run exactly once, in block-aligned steps; an unmasked far-low / far-high tile holds
    only pairs of bucket 0 / R-1 (the whole tile, rows past the end included: the passes add whole
    rows of dS), every pair of an unmasked tile is inside the window, and an unmasked band tile
    lies inside the sequence and, with a padding mask, is never run unmasked."""
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    (tmp_path / "t.cpp").write_text(TILES_PROGRAM)
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{REPO}/csrc/include", f"-I{REPO}/csrc/cuda",
                    str(tmp_path / "t.cpp"), "-o", str(tmp_path / "t")], check=True, timeout=120)
    grid = [(Tq, Tk, LU, W, BMN, pad) for (Tq, Tk), LU, W, BMN, pad in itertools.product(
        ((1, 1), (7, 7), (63, 63), (65, 65), (130, 130), (1, 300), (37, 300), (64, 130), (0, 9)),
        ((0, 0), (3, 3), (2, 5), (0, 30), (200, 200), (5, 0), (0, 1)),
        ((-1, -1), (-1, 0), (40, 17), (0, 30), (0, 0), (3, -1)), ((64, 64), (16, 16), (64, 128)),
        (0, 1))]
    lines = "".join(f"{Tq} {Tk} {L} {U} {Wl} {Wr} {BM} {BN} {pad}\n"
                    for Tq, Tk, (L, U), (Wl, Wr), (BM, BN), pad in grid)
    out = subprocess.run([str(tmp_path / "t")], input=lines, capture_output=True, text=True,
                         check=True, timeout=300).stdout.split("END\n")
    seen_kinds = set()
    for (Tq, Tk, (L, U), (Wl, Wr), (BM, BN), pad), block in zip(grid, out):
        lo, hi = _window_band(Tk, Wl, Wr)
        off = Tk - Tq
        where = f"Tq={Tq} Tk={Tk} L={L} U={U} window=({Wl},{Wr}) tiles {BM}x{BN} pad={pad}"
        for line in block.strip().splitlines():
            tag, cta, *items = line.split()
            cta = int(cta)
            first = int(items[-1])
            items = items[:-2]
            q_pass = tag == "Q"
            step = BN if q_pass else BM
            starts = [int(it.split(":")[-1].lstrip("m")) for it in items]
            assert len(set(starts)) == len(starts), f"{where} {line}: a tile runs twice"
            assert all(s % step == 0 for s in starts), f"{where} {line}"
            assert first == (starts[0] if starts else -1), f"{where} {line}: first"
            # every visible pair of the CTA lies in a run tile
            if q_pass:
                qi = torch.arange(cta, min(cta + BM, Tq))
                kj = torch.arange(Tk)
            else:
                qi = torch.arange(Tq)
                kj = torch.arange(cta, min(cta + BN, Tk))
            d = kj[None, :] - (off + qi)[:, None]
            vis = (d >= lo) & (d <= hi)
            covered = torch.zeros_like(vis)
            for s in starts:
                if q_pass:
                    covered[:, (kj >= s) & (kj < s + BN)] = True
                else:
                    covered[(qi >= s) & (qi < s + BM), :] = True
            assert not (vis & ~covered).any(), f"{where} {line}: a visible pair is skipped"
            for it in items:
                if it.startswith("m"):
                    continue
                kind, s = map(int, it.split(":"))
                seen_kinds.add(kind)
                rows = torch.arange(cta, cta + BM) if q_pass else torch.arange(s, s + BM)
                cols = torch.arange(s, s + BN) if q_pass else torch.arange(cta, cta + BN)
                dd = cols[None, :] - (off + rows)[:, None]
                assert ((dd >= lo) & (dd <= hi)).all(), f"{where} {line}: {it} crosses the window"
                r = dd.clamp(-L, U) + L
                if kind != 1:
                    assert (r == (0 if kind == 0 else L + U)).all(), f"{where} {line}: {it} kind"
                else:
                    assert not pad, f"{where} {line}: band tile unmasked under padding"
                    assert cols.max() < Tk, f"{where} {line}: band tile crosses the sequence end"
    assert seen_kinds == {0, 1, 2}


BWD_EMULATION_SRC = os.path.join(REPO, "csrc", "cuda", "host_emulation", "bwd_emulation.cpp")
BWD_UNITS = sorted(glob.glob(os.path.join(REPO, "csrc", "cuda", "bwd_*.cu")))


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """torch.ops.hdaf_cuda_bwd_emulation, built once per module."""
    return _build_emulation("hdaf_cuda_bwd_emulation", BWD_EMULATION_SRC, tmp_path_factory)


def _expected_counters(seqs, H, Hkv, D, lo, hi, BM, BN, W):
    """[mma.sync, ldmatrix, ldmatrix.trans, cp.async bytes] the tiling implies for sequences of
    (Tq, Tk). dQ, per (query block, head): Q, dO once; per visited key tile K, V, S = Q K^T and
    dO V^T from smem, dQ += dS K (K^T by ldmatrix.trans). dK/dV, per (key block, kv head): K, V
    once; per query head of the group and visited query tile Q, dO, S^T = K Q^T, V dO^T,
    dV += p^T dO, dK += dS^T Q (dO^T, Q^T by ldmatrix.trans). D_i issues none."""
    mma = ldsm = ldsm_t = nbytes = 0
    am, an = BM // W // 16, BN // W // 16
    for Tq, Tk in seqs:
        off = Tk - Tq
        for m0 in range(0, Tq, BM):
            nbytes += H * 2 * 2 * D * min(BM, Tq - m0)
            begin = max(off + m0 + lo, 0) // BN * BN
            end = max(min(off + m0 + BM + hi, Tk), begin)
            for n0 in range(begin, end, BN):
                mma += H * W * am * (2 * (BN // 8) * (D // 16) + (D // 8) * (BN // 16))
                ldsm += H * W * (2 * am * (D // 16) + 2 * BN * D // 256)
                ldsm_t += H * W * D * BN // 256
                nbytes += H * 2 * 2 * D * min(BN, Tk - n0)
        for n0 in range(0, Tk, BN):
            nbytes += Hkv * 2 * 2 * D * min(BN, Tk - n0)
            begin = max(n0 - off - hi, 0) // BM * BM
            end = max(min(n0 + BN - off - lo, Tq), begin)
            for m0 in range(begin, end, BM):
                mma += H * W * an * (2 * (BM // 8) * (D // 16) + 2 * (D // 8) * (BM // 16))
                ldsm += H * W * (2 * an * (D // 16) + 2 * BM * D // 256)
                ldsm_t += H * W * 2 * D * BM // 256
                nbytes += H * 2 * 2 * D * min(BM, Tq - m0)
    return [mma, ldsm, ldsm_t, nbytes]


def _ref_lse(q, k, P, mask, L, U, lo, hi, scale):
    """float64 lse [B,H,Tq] of the operator (grouped heads, query i at key position Tk-Tq+i)."""
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    k = k.repeat_interleave(H // k.shape[1], 1)
    t = torch.arange(Tq) + Tk - Tq
    d = torch.arange(Tk)[None, :] - t[:, None]
    r = (d.clamp(-L, U) + L).expand(B, H, Tq, Tk)
    Pe = P.expand(B, H, Tk, P.shape[-1])
    bias = torch.gather(Pe.transpose(-1, -2), -2, r) - torch.gather(Pe[:, :, t], -1, r)
    logits = scale * (q @ k.transpose(-1, -2) + bias)
    vis = ((d >= lo) & (d <= hi))[None, None]
    if mask is not None:
        vis = vis & ~mask[:, None, None, :]
    return logits.masked_fill(~vis, float("-inf")).logsumexp(-1)


def _make(dtype, B, H, Hkv, Tq, Tk, D, R, per_head, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    q, k, v = rnd(B, H, Tq, D), rnd(B, Hkv, Tk, D), rnd(B, Hkv, Tk, D)
    P = rnd(B, H if per_head else 1, Tk, R)
    dout = rnd(B, H, Tq, D)
    return q, k, v, P, dout


def _reference(q, k, v, P, dout, mask, L, U, window, causal, scale):
    """float64 (out, dq, dk, dv, dP) by autograd, those of gather in the inputs' dtype, and the
    float64 lse."""
    ref = _grads_of_gather(*(t.double() for t in (q, k, v, P)), mask, L, U, window, causal, scale,
                           dout.double())
    base = _grads_of_gather(q, k, v, P, mask, L, U, window, causal, scale, dout)
    Wl, Wr = _window(window, causal)
    lo, hi = _window_band(k.shape[2], Wl, Wr)
    lse = _ref_lse(*(t.double() for t in (q, k, P)), mask, L, U, lo, hi, scale)
    return ref, base, lse


def _run_padded(emu, case, dtype, D, B=1, H=2, Hkv=None, Tq=63, Tk=None, at_issue=False,
                edit=None):
    """The emulated backward on a padded batch, on the float64 reference's out and lse (cast as
    the forward returns them); returns (ref grads, gather-in-dtype grads, got grads, counters,
    (lo, hi), inputs)."""
    Tk = Tq if Tk is None else Tk
    Hkv = H if Hkv is None else Hkv
    L, U, window, causal, padding, per_head = BWD_CASES[case]
    q, k, v, P, dout = _make(dtype, B, H, Hkv, Tq, Tk, D, L + U + 1, per_head)
    if edit is not None:
        edit(q, k, v, P)
    mask = padding(Tk)[:B] if padding is not None else None
    scale = D ** -0.5
    ref, base, lse = _reference(q, k, v, P, dout, mask, L, U, window, causal, scale)
    Wl, Wr = _window(window, causal)
    *got, counters = emu.backward(dout, q, k, v, P, mask, ref[0].to(dtype), lse.float(), None,
                                  None, Tq, Tk, L, U, Wl, Wr, scale, at_issue)
    return ref[1:], base[1:], got, counters, _window_band(Tk, Wl, Wr), (q, k, v, P, dout)


PADDED = (
    # (T, case, D, dtype): every case at T = 63, each configuration at T = 1, 7, 63 and 300
    [(63, case, *CONFIGS[i % 4][::-1]) for i, case in enumerate(BWD_CASES)]
    + [(1, "plain", 64, torch.bfloat16), (1, "causal", 128, torch.float16),
       (7, "masked_rows", 64, torch.float16), (7, "window", 128, torch.bfloat16)]
    + [(300, case, *CONFIGS[i][::-1])
       for i, case in enumerate(("wide_R_causal", "window", "padding", "per_head_P"))])


@pytest.mark.parametrize("T,case,D,dtype", PADDED,
                         ids=[f"T{T}-{c}-D{D}-{str(d).split('.')[-1]}" for T, c, D, d in PADDED])
def test_padded_matches_gather(emu, T, case, D, dtype):
    """dq, dk, dv and dP of the shipped kernels (emulated SM80 operations) against the float64
    gather reference's autograd by the flash-attention error rule (at most 2x the error of gather
    in the same dtype, plus a floor), rows that see no key getting exactly 0, and exactly the
    operations the tiling implies."""
    B = 2 if case in ("padding", "masked_rows") else 1
    H = 1 if T == 300 else 2
    ref, base, got, counters, (lo, hi), _ = _run_padded(emu, case, dtype, D, B=B, H=H, Tq=T)
    where = f"padded {case} T={T} D={D} {dtype}"
    _check_grads(where, ref, base, got, dtype)
    if case == "masked_rows":  # causal, keys 0..4 padding: rows 0..4 see no key
        assert (got[0][:, :, :min(5, T)] == 0).all(), f"{where}: dq of rows that see no key"
    BM, BN, W = shipped_tiles(BWD_UNITS, "BWD")[(dtype, D)]
    want = _expected_counters([(T, T)] * B, H, H, D, lo, hi, BM, BN, W)
    assert counters.tolist() == want, (f"{where}: [mma, ldmatrix, ldmatrix.trans, cp.async bytes] "
                                       f"= {counters.tolist()}, the tiling implies {want}")


GQA = [  # (case, H, Hkv, Tq, Tk, D, dtype)
    ("per_head_P", 4, 2, 63, 63, 64, torch.bfloat16),
    ("wide_R_causal", 3, 1, 63, 63, 128, torch.float16),
    ("window", 4, 1, 37, 150, 64, torch.float16),
    ("causal", 2, 2, 1, 300, 128, torch.bfloat16),
    ("wide_R_causal", 2, 1, 37, 300, 64, torch.bfloat16),
    ("padding", 2, 1, 20, 70, 128, torch.bfloat16),
    ("per_head_P", 2, 1, 100, 300, 64, torch.float16),  # unmasked far-low runs at Tq < Tk
]


@pytest.mark.parametrize("case,H,Hkv,Tq,Tk,D,dtype", GQA,
                         ids=[f"{c}-H{h}-Hkv{hk}-Tq{tq}-Tk{tk}-D{d}" for c, h, hk, tq, tk, d, _ in GQA])
def test_grouped_heads_and_short_query_blocks_match_gather(emu, case, H, Hkv, Tq, Tk, D, dtype):
    """Grouped heads (Hkv < H, Hkv = 1 included: dk, dv summed over the group inside the kernel)
    and query blocks at the end of longer key sequences (Tq = 1 decoding, Tq = 37 against 300
    keys), shared and per-head P."""
    B = 2 if case == "padding" else 1
    ref, base, got, counters, (lo, hi), _ = _run_padded(emu, case, dtype, D, B=B, H=H, Hkv=Hkv,
                                                        Tq=Tq, Tk=Tk)
    where = f"{case} H={H} Hkv={Hkv} Tq={Tq} Tk={Tk} D={D}"
    _check_grads(where, ref, base, got, dtype)
    BM, BN, W = shipped_tiles(BWD_UNITS, "BWD")[(dtype, D)]
    assert counters.tolist() == _expected_counters([(Tq, Tk)] * B, H, Hkv, D, lo, hi, BM, BN, W)


VARLEN = [  # (case, H, Hkv, seqlens q, seqlens k, D, dtype)
    ("causal", 2, 1, (0, 5, 63, 0, 20), (0, 9, 63, 12, 70), 64, torch.bfloat16),
    ("wide_R_causal", 2, 2, (7, 0, 40), (7, 0, 100), 128, torch.float16),
    ("per_head_P", 4, 2, (3, 66), (30, 66), 64, torch.float16),
]


@pytest.mark.parametrize("case,H,Hkv,sq,sk,D,dtype", VARLEN,
                         ids=[f"{c}-H{h}-Hkv{hk}-D{d}" for c, h, hk, _, _, d, _ in VARLEN])
def test_packed_batch_matches_per_sequence_references(emu, case, H, Hkv, sq, sk, D, dtype):
    """A packed batch (cu_seqlens) with unequal lengths, an empty sequence (Tq = Tk = 0) and one
    with keys but no queries (its dk, dv and dP exactly 0): each sequence's gradients against
    its own padded float64 reference."""
    L, U, window, causal, _, per_head = BWD_CASES[case]
    R = L + U + 1
    scale = D ** -0.5
    Wl, Wr = _window(window, causal)
    parts, refs, bases = [], [], []
    for b, (Tq, Tk) in enumerate(zip(sq, sk)):
        q, k, v, P, dout = _make(dtype, 1, H, Hkv, Tq, Tk, D, R, per_head, seed=b)
        parts.append((q, k, v, P, dout))
        if Tq > 0:
            ref, base, lse = _reference(q, k, v, P, dout, None, L, U, window, causal, scale)
            refs.append((ref, lse))
            bases.append(base)
        else:
            refs.append(None)
            bases.append(None)
    # [1, heads, rows, :] per sequence -> [total rows, heads, :]
    q, k, v, P, dout = (torch.cat([x[n][0].transpose(0, 1) for x in parts], 0).contiguous()
                        for n in range(5))
    out = torch.cat([(r[0][0].to(dtype)[0].transpose(0, 1) if r else
                      torch.zeros(0, H, D, dtype=dtype)) for r in refs], 0).contiguous()
    lse = torch.cat([(r[1][0].float() if r else torch.zeros(H, 0)) for r in refs], 1).contiguous()
    cu = lambda s: torch.tensor([0, *itertools.accumulate(s)], dtype=torch.int32)  # noqa: E731
    dq, dk, dv, dP, counters = emu.backward(dout, q, k, v, P, None, out, lse, cu(sq), cu(sk),
                                            max(sq), max(sk), L, U, Wl, Wr, scale, False)
    qs, ks = list(itertools.accumulate((0,) + sq)), list(itertools.accumulate((0,) + sk))
    for b, (Tq, Tk) in enumerate(zip(sq, sk)):
        got = [dq[qs[b]:qs[b + 1]], dk[ks[b]:ks[b + 1]], dv[ks[b]:ks[b + 1]], dP[ks[b]:ks[b + 1]]]
        got = [g.transpose(0, 1)[None] for g in got]
        where = f"packed {case} sequence {b} (Tq={Tq}, Tk={Tk})"
        if refs[b] is None:
            for name, g in zip(GRAD_NAMES, got):
                assert (g == 0).all(), f"{where}: {name} of a sequence without queries"
            continue
        _check_grads(where, refs[b][0][1:], bases[b][1:], got, dtype)
    Wl_, Wr_ = _window(window, causal)
    lo_hi = [_window_band(Tk, Wl_, Wr_) for Tk in sk]
    BM, BN, W = shipped_tiles(BWD_UNITS, "BWD")[(dtype, D)]
    want = [sum(x) for x in zip(*(_expected_counters([s], H, Hkv, D, *lh, BM, BN, W)
                                  for s, lh in zip(zip(sq, sk), lo_hi)))]
    assert counters.tolist() == want


def test_nonfinite_query_row_reaches_only_what_depends_on_it(emu):
    """A NaN in one query row of one head (plain attention): that row's dq and the head's dk, dv
    (every key sees it) are NaN; every other row's dq, and the other head's gradients, stay
    bitwise what they are with finite inputs."""
    row = 40
    clean_ref, _, clean, _, _, (q, k, v, P, dout) = _run_padded(emu, "plain", torch.bfloat16, 64,
                                                                  H=2)
    L, U, window, causal, _, _ = BWD_CASES["plain"]
    scale = 64 ** -0.5
    ref, _, lse = _reference(q, k, v, P, dout, None, L, U, window, causal, scale)
    q = q.clone()
    q[0, 1, row, 3] = float("nan")
    Wl, Wr = _window(window, causal)
    dq, dk, dv, _, _ = emu.backward(dout, q, k, v, P, None, ref[0].to(q.dtype), lse.float(), None,
                                    None, 63, 63, L, U, Wl, Wr, scale, False)
    assert torch.isnan(dq[0, 1, row]).all()
    others = torch.arange(63) != row
    assert torch.equal(dq[0, 1, others], clean[0][0, 1, others])
    assert torch.equal(dq[0, 0], clean[0][0, 0])
    assert torch.isnan(dk[0, 1]).all() and torch.isnan(dv[0, 1]).all()
    assert torch.equal(dk[0, 0], clean[1][0, 0]) and torch.equal(dv[0, 0], clean[2][0, 0])


def test_deterministic_and_cp_async_landing_does_not_matter(emu):
    """Two runs give bitwise the same gradients (no atomics), and landing cp.async at issue
    instead of at its wait changes nothing: no warp reads a stage before its copy is waited for,
    and no copy overwrites a stage a warp still reads (grouped heads: the pipeline runs on from
    one query head to the next)."""
    runs = [_run_padded(emu, "window", torch.float16, 128, H=2, Hkv=1, Tq=100, Tk=150,
                        at_issue=a) for a in (False, False, True)]
    for run in runs[1:]:
        for name, a, b in zip(GRAD_NAMES, runs[0][2], run[2]):
            assert torch.equal(a, b), name
        assert torch.equal(runs[0][3], run[3])


def test_every_shipped_configuration_is_covered():
    assert sorted(os.path.basename(u) for u in BWD_UNITS) == [
        "bwd_bf16_hdim128.cu", "bwd_bf16_hdim64.cu", "bwd_fp16_hdim128.cu", "bwd_fp16_hdim64.cu"]
    with open(BWD_EMULATION_SRC) as f:
        included = re.findall(r'^#include "\.\./(bwd_\w+\.cu)"', f.read(), re.M)
    assert sorted(included) == sorted(os.path.basename(u) for u in BWD_UNITS)
    assert set(shipped_tiles(BWD_UNITS, "BWD")) == set(CONFIGS)
    for T in (63, 300):
        assert {(dtype, D) for t, _, D, dtype in PADDED if t == T} == set(CONFIGS)
    assert {case for t, case, _, _ in PADDED if t == 63} == set(BWD_CASES)
    assert set(CASES) <= set(BWD_CASES)
