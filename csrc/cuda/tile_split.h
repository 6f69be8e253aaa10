// Which key tiles one query block of the CuTe forward / dQ pass visits, which query tiles one key
// block of the dK/dV pass visits, and what each of them is.
// Torch-free and __host__ __device__: the kernels (flash_fwd.cuh, flash_bwd.cuh) call it, and
// tests/test_cuda_cute.py compiles it on the CPU and checks it against every (query, key) pair.
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

}  // namespace cute_tiles
}  // namespace hdaf
