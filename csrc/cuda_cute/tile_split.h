// Which key tiles one query block of the CuTe forward visits, and what each of them is.
// Torch-free and __host__ __device__: the kernel (flash_fwd_cute.cuh) calls it, and
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

}  // namespace cute_tiles
}  // namespace hdaf
