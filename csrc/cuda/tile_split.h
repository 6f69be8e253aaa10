// Which key tiles one query block of the CuTe forward / dQ pass visits, which query tiles one key
// block of the dK/dV pass visits, and what each of them is.
// Torch-free and __host__ __device__: the kernels (flash_fwd.cuh, flash_bwd.cuh) call it, and
// tests/test_cuda_fwd_emulation.py and test_cuda_bwd_emulation.py compile it on the CPU and check
// it against every (query, key) pair.
#pragma once

#include "hdaf/delta_common.h"

namespace hdaf {
namespace cute_tiles {

HDAF_HD int imin(int a, int b) { return a < b ? a : b; }
HDAF_HD int imax(int a, int b) { return a > b ? a : b; }

// Block-aligned runs of key tiles (starts multiples of BN) for the query rows [m0, m0 + BM):
// far-low [begin, band), band [band, far_hi), far-high [far_hi, end), `end` one past the last
// key the rows may see. lo, hi: the visible offsets j - i (hdaf::make_band).
struct KeyTiles {
  int begin, band, far_hi, end;
};

HDAF_HD KeyTiles key_tiles(int m0, int T, int L, int U, int lo, int hi, int BM, int BN) {
  auto ceil_block = [BN](int x) { return (imax(x, 0) + BN - 1) / BN * BN; };
  KeyTiles t;
  t.begin = imax(m0 + lo, 0) / BN * BN;
  t.end = imax(imin(m0 + BM + hi, T), t.begin);
  // far-low: the largest offset of the tile, n0 + BN - 1 - m0, is <= -L
  t.band = imin(imax(ceil_block(m0 - L - BN + 2), t.begin), t.end);
  // far-high: the smallest offset, n0 - (m0 + BM - 1), is >= U
  t.far_hi = imin(imax(ceil_block(m0 + BM - 1 + U), t.band), t.end);
  return t;
}

// Whether tile n0 needs the per-pair visibility test: it crosses a window / causal edge or the
// end of the sequence, or the call has a key padding mask. Otherwise every pair is visible.
HDAF_HD bool tile_needs_mask(int m0, int n0, int T, int lo, int hi, int BM, int BN, bool has_pad) {
  return has_pad || n0 - (m0 + BM - 1) < lo || n0 + BN - 1 - m0 > hi || n0 + BN > T;
}

// The key tiles of key_tiles(m0, T, ...) = t that need no mask (tile_needs_mask false): one
// contiguous run [first, last), first <= last, both in [t.begin, t.end]; the masked tiles are
// [t.begin, first) and [last, t.end). Empty (first == last == t.end) under a key padding mask.
// m0 may be any position (a query block at the end of longer keys starts anywhere).
struct TileRun {
  int first, last;
};

HDAF_HD TileRun unmasked_tiles(KeyTiles t, int m0, int T, int lo, int hi, int BM, int BN,
                               bool has_pad) {
  TileRun r;
  if (has_pad) {
    r.first = r.last = t.end;
    return r;
  }
  // unmasked: n0 >= m0 + BM - 1 + lo, n0 <= m0 + hi - BN + 1, n0 <= T - BN
  r.first = imin((imax(m0 + BM - 1 + lo, t.begin) + BN - 1) / BN * BN, t.end);
  const int lim = imin(m0 + hi - BN + 1, T - BN);
  r.last = lim < r.first ? r.first : imin(lim / BN * BN + BN, t.end);
  return r;
}

// Block-aligned query tiles (starts multiples of BM) that may see the keys [n0, n0 + BN):
// [begin, end), `end` one past the last query that sees one of them.
struct QueryTiles {
  int begin, end;
};

HDAF_HD QueryTiles query_tiles(int n0, int T, int lo, int hi, int BM, int BN) {
  QueryTiles t;
  t.begin = imax(n0 - hi, 0) / BM * BM;
  t.end = imax(imin(n0 + BN - lo, T), t.begin);
  return t;
}

// The kind of the tile (query rows [m0, m0 + BM), keys [n0, n0 + BN)): every pair's bucket is 0
// (far-low, 0), R-1 (far-high, 2), or the bucket varies (band, 1). Same bounds as key_tiles.
HDAF_HD int tile_kind(int m0, int n0, int L, int U, int BM, int BN) {
  if (n0 + BN - 1 - m0 <= -L) return 0;
  if (n0 - (m0 + BM - 1) >= U) return 2;
  return 1;
}

// ---------------------------------------------------------------------------------------------
// Query blocks shorter than the keys (query i at key position off + i), and the order in which a
// CTA of the backward runs its tiles: the tiles that compare positions first, then one unmasked
// run per tile kind, each compiled for that kind.
// ---------------------------------------------------------------------------------------------

HDAF_HD int ceil_to(int x, int step) { return x <= 0 ? 0 : (x + step - 1) / step * step; }
// The first multiple of step above x (x may be negative): one past the last tile start <= x.
HDAF_HD int past_floor(int x, int step) { return x < 0 ? 0 : x / step * step + step; }

// The dK/dV pass's query tiles (query indices, starts multiples of BM) that may see the keys
// [n0, n0 + BN) of a sequence with Tq queries standing at key positions off + i: far-high
// [begin, band) (every pair j - t_i >= U), band [band, far_lo), far-low [far_lo, end) (every
// pair j - t_i <= -L), `end` one past the last query that sees one of the keys. Whole tiles,
// rows past Tq included, decide a tile's kind.
struct QueryRuns {
  int begin, band, far_lo, end;
};

HDAF_HD QueryRuns query_runs(int n0, int Tq, int off, int L, int U, int lo, int hi, int BM,
                             int BN) {
  QueryRuns t;
  t.begin = imax(n0 - off - hi, 0) / BM * BM;
  t.end = imax(imin(n0 + BN - off - lo, Tq), t.begin);
  // far-high: the smallest offset of tile m0, n0 - (off + m0 + BM - 1), is >= U
  t.band = imin(imax(ceil_to(n0 - off - BM + 2 - U, BM), t.begin), t.end);
  // far-low: the largest offset, n0 + BN - 1 - (off + m0), is <= -L
  t.far_lo = imin(imax(ceil_to(n0 + BN - 1 - off + L, BM), t.band), t.end);
  return t;
}

// Tile starts [first, last) of a walk whose tiles cross no window / causal edge: every pair's
// offset lies in [lo, hi]. dQ: query rows at positions [pos0, pos0 + BM), key tiles n0;
// dK/dV: keys [n0, n0 + BN), query tiles m0 (positions off + m0 ...).
struct Span {
  int first, last;
};

HDAF_HD Span unmasked_key_tiles(int pos0, int lo, int hi, int BM, int BN, int begin, int end) {
  Span s;
  s.first = imin(imax(ceil_to(pos0 + BM - 1 + lo, BN), begin), end);
  s.last = imin(imax(past_floor(pos0 + hi - BN + 1, BN), s.first), end);
  return s;
}

HDAF_HD Span unmasked_query_tiles(int n0, int off, int lo, int hi, int BM, int BN, int begin,
                                  int end) {
  Span s;
  s.first = imin(imax(ceil_to(n0 + BN - 1 - off - hi, BM), begin), end);
  s.last = imin(imax(past_floor(n0 - off - BM + 1 - lo, BM), s.first), end);
  return s;
}

// A CTA's tiles [begin, end), `step` apart, in the order it runs them. Pieces 0-2 form segment
// 0, the tiles that compare positions: [begin, u.first), the middle run when `middle_masked`
// (a key padding mask or the sequence end inside the tiles: only far tiles fold those into
// their key terms), and [u.last, end). Pieces 3-5 are segments 1-3: the unmasked runs
// [u.first, a), [a, b), [b, u.last), with a, b the run boundaries (KeyTiles::band / far_hi,
// QueryRuns::band / far_lo) clamped into the unmasked span.
struct TileSchedule {
  int step;
  int start[6], count[6];

  HDAF_HD int masked_count() const { return count[0] + count[1] + count[2]; }
  // The k-th tile of segment 0.
  HDAF_HD int masked_tile(int k) const {
    if (k < count[0]) return start[0] + k * step;
    k -= count[0];
    if (k < count[1]) return start[1] + k * step;
    return start[2] + (k - count[1]) * step;
  }
  HDAF_HD int segment_count(int seg) const { return seg == 0 ? masked_count() : count[seg + 2]; }
  HDAF_HD int segment_tile(int seg, int k) const {
    return seg == 0 ? masked_tile(k) : start[seg + 2] + k * step;
  }
  // The first tile run after segment seg, or -1.
  HDAF_HD int first_after(int seg) const {
    for (int s = seg + 1; s < 4; ++s)
      if (segment_count(s) > 0) return segment_tile(s, 0);
    return -1;
  }
  HDAF_HD int first() const { return first_after(-1); }
};

HDAF_HD TileSchedule make_schedule(int begin, int end, Span u, int a, int b, bool middle_masked,
                                   int step) {
  auto count = [step](int x, int y) { return y > x ? (y - x + step - 1) / step : 0; };
  a = imin(imax(a, u.first), u.last);
  b = imin(imax(b, a), u.last);
  TileSchedule t;
  t.step = step;
  t.start[0] = begin;
  t.count[0] = count(begin, u.first);
  t.start[1] = a;
  t.count[1] = middle_masked ? count(a, b) : 0;
  t.start[2] = u.last;
  t.count[2] = count(u.last, end);
  t.start[3] = u.first;
  t.count[3] = count(u.first, a);
  t.start[4] = a;
  t.count[4] = middle_masked ? 0 : count(a, b);
  t.start[5] = b;
  t.count[5] = count(b, u.last);
  return t;
}

}  // namespace cute_tiles
}  // namespace hdaf
