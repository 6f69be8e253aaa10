// Index math shared by every compiled backend of hdaf::delta_attention.
//
// The CPU kernel (csrc/cpu), the CUDA kernels (csrc/cuda) and the header test
// (tests/test_common_header.py through hdaf._C.common_*) all compile these
// functions, so the logic the GPU runs is exercised on the CPU. The math is the
// normative spec in docs/delta_attention.md.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define HDAF_HD __host__ __device__ __forceinline__
#else
#define HDAF_HD inline __attribute__((always_inline))
#endif

namespace hdaf {

// Band of relative offsets d = j - i that may be visible: lo <= d <= hi.
// A negative window side means unbounded; causal is folded into hi <= 0 by the caller.
struct Band {
  int64_t lo;  // most negative visible offset (>= -(T-1))
  int64_t hi;  // most positive visible offset (<= T-1)
};

HDAF_HD Band make_band(int64_t T, int64_t window_left, int64_t window_right) {
  Band b;
  b.lo = (window_left < 0 || window_left > T - 1) ? -(T - 1) : -window_left;
  b.hi = (window_right < 0 || window_right > T - 1) ? (T - 1) : window_right;
  return b;
}

// r(i,j) = clamp(j - i, -L, U) + L, in [0, L+U].
HDAF_HD int64_t bucket(int64_t i, int64_t j, int64_t L, int64_t U) {
  int64_t d = j - i;
  d = d < -L ? -L : (d > U ? U : d);
  return d + L;
}

// Visibility through the band only (the key padding mask is applied separately).
HDAF_HD bool in_band(int64_t i, int64_t j, Band band) {
  const int64_t d = j - i;
  return d >= band.lo && d <= band.hi;
}

// First and one-past-last key visible through the band from the query rows [i0, i1).
HDAF_HD int64_t band_key_begin(int64_t i0, Band band) {
  const int64_t j = i0 + band.lo;
  return j < 0 ? 0 : j;
}
HDAF_HD int64_t band_key_end(int64_t i1, int64_t T, Band band) {
  const int64_t j = (i1 - 1) + band.hi + 1;
  return j > T ? T : j;
}
// First and one-past-last query that sees any key of [j0, j1) through the band.
HDAF_HD int64_t band_query_begin(int64_t j0, Band band) {
  const int64_t i = j0 - band.hi;
  return i < 0 ? 0 : i;
}
HDAF_HD int64_t band_query_end(int64_t j1, int64_t T, Band band) {
  const int64_t i = (j1 - 1) - band.lo + 1;
  return i > T ? T : i;
}

// Online-softmax state of one query row: running max m and running sum l of
// exp(s - m). A row that has seen no visible key keeps m = -inf, l = 0.
template <typename acc_t>
struct SoftmaxState {
  acc_t m;
  acc_t l;
};

template <typename acc_t>
HDAF_HD SoftmaxState<acc_t> softmax_init() {
  SoftmaxState<acc_t> s;
  s.m = -std::numeric_limits<acc_t>::infinity();
  s.l = acc_t(0);
  return s;
}

// Merge a block whose maximum is block_max. Returns the factor by which the
// previously accumulated output and sum must be rescaled (exp(m_old - m_new));
// the caller then adds exp(s - m_new) for the block's scores. A NaN maximum (a NaN
// score) sticks: m, l, the output and lse of the row all become NaN, never 0
// (docs/delta_attention.md, "Non-finite values and edge cases").
template <typename acc_t>
HDAF_HD acc_t softmax_rescale(SoftmaxState<acc_t>& st, acc_t block_max) {
  const acc_t m_new = (block_max > st.m || block_max != block_max) ? block_max : st.m;
  if (m_new == -std::numeric_limits<acc_t>::infinity()) {
    return acc_t(1);  // nothing visible yet: keep the empty state
  }
  const acc_t alpha = std::exp(st.m - m_new);  // exp(-inf) = 0 on the first block
  st.m = m_new;
  st.l *= alpha;
  return alpha;
}

// Final normalizer and log-sum-exp; a fully masked row gives inv = 0 (output 0)
// and lse = -inf (backward probabilities exp(s - lse) are then never formed).
// A NaN sum (a row with a NaN score) gives NaN for both.
template <typename acc_t>
HDAF_HD acc_t softmax_inv_sum(const SoftmaxState<acc_t>& st) {
  return (st.l > acc_t(0) || st.l != st.l) ? acc_t(1) / st.l : acc_t(0);
}
template <typename acc_t>
HDAF_HD acc_t softmax_lse(const SoftmaxState<acc_t>& st) {
  return (st.l > acc_t(0) || st.l != st.l) ? st.m + std::log(st.l)
                                           : -std::numeric_limits<acc_t>::infinity();
}

}  // namespace hdaf
