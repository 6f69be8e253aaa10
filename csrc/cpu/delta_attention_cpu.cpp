// Fused CPU kernels of hdaf::delta_attention_forward / _backward and of their packed-batch
// forms hdaf::delta_attention_varlen_forward / _backward.
//
// Flash-attention-style: query tiles × key tiles with an online softmax; the delta bias
// bias_ij = P[j, r(i,j)] - P[t_i, r(i,j)] (t_i = Tk - Tq + i, the query's position) is gathered
// from rows of P = x·w inside the tile loop, so nothing of size Tq×Tk is ever allocated.
// Grouped-query heads read their key/value head in place (no copy of k or v), and a packed
// batch is a list of sequences of their own lengths: its work is Σ Tq_b·Tk_b. Only key tiles inside the band of the
// window (and causal) constraint are visited: a sliding window costs O(T·window).
// Tile matmuls go to BLAS (the sgemm_/dgemm_ that torch's x86-64 wheels export, with a
// plain loop if the symbol is absent); the index math is csrc/include/hdaf/delta_common.h,
// shared with the CUDA kernels. Spec and backward formulas: docs/delta_attention.md.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <utility>
#include <limits>
#include <vector>

#include "hdaf/delta_attention_checks.h"
#include "hdaf/delta_common.h"

extern "C" {
// Fortran BLAS, exported by the MKL inside torch's x86-64 wheels. Weak: where a torch
// build lacks them, the pointers are null and gemm() below uses its loop instead.
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
}

namespace hdaf {
namespace {

// Tile sizes (query rows x key rows). The forward takes large tiles where rows see many keys:
// fewer, larger BLAS calls (less packing per multiply-add), as ATen's CPU flash attention does
// (256 x 512); under a narrow window (fewer than kWideBand visible offsets) large tiles would
// mostly compute masked scores, so it keeps the small ones. The backward keeps the small ones
// throughout: it holds two score tiles (S and dS), which at the large size leave the cache.
struct Blocks {
  int64_t q, k;
};
constexpr Blocks kSmall{64, 128};
constexpr Blocks kLarge{256, 512};
constexpr int64_t kWideBand = 1024;

// Row-major C[M,N] = alpha * op(A) * op(B) + beta * C. Column-major BLAS sees each row-major
// matrix transposed, so it computes Cᵀ = op(B)ᵀ op(A)ᵀ with the same transpose flags.
template <typename T>
void gemm_loop(bool ta, bool tb, int M, int N, int K, T alpha, const T* A, int lda, const T* B,
               int ldb, T beta, T* C, int ldc) {
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      T s = 0;
      for (int kk = 0; kk < K; ++kk) {
        const T a = ta ? A[kk * lda + m] : A[m * lda + kk];
        const T b = tb ? B[n * ldb + kk] : B[kk * ldb + n];
        s += a * b;
      }
      C[m * ldc + n] = alpha * s + (beta == T(0) ? T(0) : beta * C[m * ldc + n]);
    }
  }
}

template <typename T>
void gemm(bool ta, bool tb, int M, int N, int K, T alpha, const T* A, int lda, const T* B,
          int ldb, T beta, T* C, int ldc) {
  if (M == 0 || N == 0) return;
  const char fa = ta ? 'T' : 'N', fb = tb ? 'T' : 'N';
  lda = std::max(lda, 1);
  ldb = std::max(ldb, 1);
  ldc = std::max(ldc, 1);
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) {
      sgemm_(&fb, &fa, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
      return;
    }
  } else {
    if (dgemm_ != nullptr) {
      dgemm_(&fb, &fa, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
      return;
    }
  }
  gemm_loop(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

// ---- Row primitives of a tile. float32 gets versions compiled for AVX2+FMA as well as the
// baseline (GCC function multiversioning picks one at load time), with a polynomial exp that
// vectorizes; float64 keeps std::exp, which its tolerance needs.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define HDAF_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define HDAF_CLONES
#endif

#define HDAF_INLINE inline __attribute__((always_inline))

// S[jj] = scale * (S[jj] + P[j, r] - Pt[r]), r = clamp(j - t, -L, U) + L, for the keys
// j = j0 + jj, jj < bk, of the query at position t (relative to key 0; any integer) whose own
// row of P is `Pt`; the key rows of P are sP elements apart.
// Split into the three runs of r (clipped low, diagonal, clipped high) so that each loop has
// invariant strides and vectorizes. The clipped runs read P's first and last columns from
// `col_lo` / `col_hi`, contiguous copies of them pre-multiplied by scale (indexed by j), so they
// are one FMA per key; on the diagonal run r = j - t + L, hence P[j, r] = P[j*(sP+1) + L - t]
// and Pt[r] = Pt[j - t + L].
template <typename T>
HDAF_INLINE void bias_row_runs(T* __restrict S, const T* __restrict Pbh, const T* __restrict Pt,
                               const T* __restrict col_lo, const T* __restrict col_hi, int64_t t,
                               int64_t j0, int64_t bk, int64_t L, int64_t U, int64_t R,
                               int64_t sP, T scale) {
  const int64_t lo_end = t - L - j0, hi_begin = t + U + 1 - j0;
  const int64_t a = lo_end < 0 ? 0 : (lo_end > bk ? bk : lo_end);
  const int64_t b = hi_begin < a ? a : (hi_begin > bk ? bk : hi_begin);
  const T q_first = scale * Pt[0], q_last = scale * Pt[R - 1];
  const T* lo = col_lo + j0;
  const T* hi = col_hi + j0;
  for (int64_t jj = 0; jj < a; ++jj) S[jj] = scale * S[jj] + (lo[jj] - q_first);
  if (b > a) {
    // From jj = a on, j - t >= -L: both pointers stay inside P.
    const T* Pdiag = Pbh + (j0 + a) * (sP + 1) + L - t;
    const T* Prow = Pt + (j0 + a) - t + L;
    T* Sa = S + a;
    for (int64_t jj = 0; jj < b - a; ++jj)
      Sa[jj] = scale * (Sa[jj] + Pdiag[jj * (sP + 1)] - Prow[jj]);
  }
  for (int64_t jj = b; jj < bk; ++jj) S[jj] = scale * S[jj] + (hi[jj] - q_last);
}

HDAF_CLONES void bias_row_f32(float* S, const float* Pbh, const float* Pt, const float* col_lo,
                              const float* col_hi, int64_t t, int64_t j0, int64_t bk, int64_t L,
                              int64_t U, int64_t R, int64_t sP, float scale) {
  bias_row_runs<float>(S, Pbh, Pt, col_lo, col_hi, t, j0, bk, L, U, R, sP, scale);
}

// exp for x <= ~0 (the softmax only exponentiates score - max, or score - lse); exactly 0 below
// the float range, so -inf (a masked key) gives 0. Cephes' expf polynomial, about 1 ulp. No clamp
// of the argument: below `lo` (-inf included) the reduction's values are discarded by the final
// select, and a NaN propagates. Builtins and ternaries only: library calls would not inline
// into the AVX2 clone, and the loop would stay scalar.
HDAF_INLINE float exp_poly(float x) {
  const float lo = -87.33654475f;
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const float pow2n = __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
  return x < lo ? 0.0f : y * pow2n;
}

// Sum with 8 fixed partial sums: vectorizes without -ffast-math, and the order (hence the
// result) depends only on n, never on threads.
template <typename T>
HDAF_INLINE T sum_row(const T* __restrict S, int64_t n) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t jj = 0;
  for (; jj + 8 <= n; jj += 8)
    for (int l = 0; l < 8; ++l) acc[l] += S[jj + l];
  T sum = 0;
  for (; jj < n; ++jj) sum += S[jj];
  for (int l = 0; l < 8; ++l) sum += acc[l];
  return sum;
}

// S[jj] = exp(S[jj] - m); returns the sum.
HDAF_CLONES float exp_row_f32(float* __restrict S, int64_t n, float m) {
  for (int64_t jj = 0; jj < n; ++jj) S[jj] = exp_poly(S[jj] - m);
  return sum_row(S, n);
}

// The row's maximum, NaN when a score is NaN: a comparison-based max skips NaN, which would
// give a row with a NaN score the output 0 of a fully masked row instead of NaN.
HDAF_CLONES float max_row_f32(const float* __restrict S, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t jj = 0; jj < n; ++jj) {
    m = S[jj] > m ? S[jj] : m;
    nan |= S[jj] != S[jj];
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

inline void bias_row(float* S, const float* Pbh, const float* Pt, const float* col_lo,
                     const float* col_hi, int64_t t, int64_t j0, int64_t bk, int64_t L, int64_t U,
                     int64_t R, int64_t sP, float scale) {
  bias_row_f32(S, Pbh, Pt, col_lo, col_hi, t, j0, bk, L, U, R, sP, scale);
}
inline void bias_row(double* S, const double* Pbh, const double* Pt, const double* col_lo,
                     const double* col_hi, int64_t t, int64_t j0, int64_t bk, int64_t L,
                     int64_t U, int64_t R, int64_t sP, double scale) {
  bias_row_runs<double>(S, Pbh, Pt, col_lo, col_hi, t, j0, bk, L, U, R, sP, scale);
}
inline float exp_row(float* S, int64_t n, float m) { return exp_row_f32(S, n, m); }
inline double exp_row(double* S, int64_t n, double m) {
  for (int64_t jj = 0; jj < n; ++jj) S[jj] = std::exp(S[jj] - m);  // exp(-inf) = 0: masked
  return sum_row(S, n);
}
inline float max_row(const float* S, int64_t n) { return max_row_f32(S, n); }
inline double max_row(const double* S, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  bool nan = false;
  for (int64_t jj = 0; jj < n; ++jj) {
    m = S[jj] > m ? S[jj] : m;
    nan |= S[jj] != S[jj];
  }
  return nan ? std::numeric_limits<double>::quiet_NaN() : m;
}

// ---- Problems. The padded op (one sequence per batch element) and the packed op (one per
// cu_seqlens entry) both become a list of sequences with element offsets, sharing the per-head
// and per-position strides of each tensor; the kernels below see only this description.

struct Strides {
  int64_t h, t;  // elements between heads, between positions (the last dim is contiguous)
};

struct Seq {
  int64_t Tq, Tk;
  // Element offsets of (head 0, position 0) of this sequence in each tensor. dq, dk, dv and
  // grad_out share the layouts of q, k, v and out.
  int64_t q, k, v, P, o, lse, dP;
  const bool* mask;  // [Tk] (True: padding key) or nullptr
  int64_t col;       // offset of key 0 in the key-column buffer (see key_columns)
  // Position of query 0 relative to key 0: Tk - Tq for the end-aligned ops, q_start - k_start
  // for the block ops (query i stands at t = off + i). Pq, dPq: element offsets of query 0's own
  // row of P and of its gradient (rows of P and of the dP buffer for the end-aligned ops,
  // separate tensors for the block ops).
  int64_t off, Pq, dPq;
};

struct Problem {
  int64_t H, Hkv, G, Hp, Dk, Dv, R, L, U, window_left, window_right;
  double scale;
  Strides q, k, v, P, o, lse, dP;  // dP: the per-head gradient buffer (Hd heads, see below)
  Strides Pq, dPq;                 // query rows of P and of the dP buffer (see Seq)
  int64_t Hd;                      // heads of that buffer: Hkv when Hp == 1, else H
  int64_t col_rows;                // keys of all sequences: the key-column buffer's row length
  std::vector<Seq> seqs;
};

// A query tile: the rows (g, i) for the query heads g0 <= g < g1 of one key/value head and the
// queries i0 <= i < i1, row n = (g - g0) * (i1 - i0) + (i - i0). With Tq >= block_q a tile is
// part of one head; with shorter Tq (decoding) it stacks whole heads of the group, so a key tile
// feeds all of them from one read.
struct Tile {
  int64_t g0, g1, i0, i1;
  int64_t rows() const { return (g1 - g0) * (i1 - i0); }
};

std::vector<Tile> make_tiles(int64_t Tq, int64_t G, int64_t block_q) {
  std::vector<Tile> tiles;
  if (Tq == 0) return tiles;
  const int64_t heads_per_tile =
      Tq >= block_q ? 1 : std::max<int64_t>(1, std::min(G, block_q / Tq));
  for (int64_t g0 = 0; g0 < G; g0 += heads_per_tile)
    for (int64_t i0 = 0; i0 < Tq; i0 += block_q)
      tiles.push_back({g0, std::min(G, g0 + heads_per_tile), i0, std::min(Tq, i0 + block_q)});
  return tiles;
}

// The forward's tiles: large unless the window lets a row see fewer than kWideBand keys.
Blocks forward_blocks(const Problem& p) {
  const bool narrow = p.window_left >= 0 && p.window_right >= 0 &&
                      p.window_left + p.window_right + 1 < kWideBand;
  return narrow ? kSmall : kLarge;
}

// The window's band of offsets j - t for a sequence. Its extent covers every offset between
// its queries and keys, wherever the queries stand (an unbounded side reaches them all).
Band seq_band(const Problem& p, const Seq& s) {
  const int64_t span = s.Tk + s.Tq + (s.off < 0 ? -s.off : s.off);
  return make_band(span, p.window_left, p.window_right);
}

// Keys [begin, end) that the band lets any row of the tile see (positions t = off + i); empty
// (begin >= end) when the tile sees none.
std::pair<int64_t, int64_t> tile_keys(const Problem& p, const Seq& s, const Tile& tile) {
  const Band band = seq_band(p, s);
  return {band_key_begin(s.off + tile.i0, band), band_key_end(s.off + tile.i1, s.Tk, band)};
}

// Runs fn(task) for task in [0, n) on the intra-op threads, longest first by `cost`, each thread
// taking the next task when it is free. Every task owns the outputs it writes, so the result
// does not depend on which thread ran what.
template <typename F>
void run_tasks(const std::vector<int64_t>& cost, const F& fn) {
  const int64_t n = static_cast<int64_t>(cost.size());
  if (n == 0) return;
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) fn(order[t]);
  });
}

// Scores of one tile: S[n, jj] = scale * (q·k_j + P[j,r] - P[t,r]) where visible, -inf
// elsewhere. S holds q·k_j on entry. Returns false when nothing in the tile is visible.
// Per row, the band leaves one contiguous run of keys [jlo, jhi) (edge tiles of a window or
// of causal masking cut it), then padding keys are set to -inf.
template <typename T>
bool tile_logits(const Problem& p, const Seq& s, int64_t hkv, const Tile& tile, T* S,
                 const T* P, const T* Pq, const T* cols, int64_t j0, int64_t bk) {
  const T scale = static_cast<T>(p.scale);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const Band band = seq_band(p, s);
  const int64_t bq = tile.i1 - tile.i0;
  bool any_row = false;
  for (int64_t n = 0; n < tile.rows(); ++n) {
    const int64_t h = hkv * p.G + tile.g0 + n / bq;
    const int64_t i = tile.i0 + n % bq, t = s.off + i;
    const int64_t hp = p.Hp == 1 ? 0 : h;
    const T* Ph = P + s.P + hp * p.P.h;
    const T* Pt = Pq + s.Pq + hp * p.Pq.h + i * p.Pq.t;
    const T* col_lo = cols + hp * p.col_rows + s.col;
    const T* col_hi = col_lo + p.Hp * p.col_rows;
    T* Srow = S + n * bk;
    int64_t jlo = t + band.lo - j0, jhi = t + band.hi + 1 - j0;
    jlo = jlo < 0 ? 0 : (jlo > bk ? bk : jlo);
    jhi = jhi < jlo ? jlo : (jhi > bk ? bk : jhi);
    std::fill(Srow, Srow + jlo, neg_inf);
    std::fill(Srow + jhi, Srow + bk, neg_inf);
    if (jhi > jlo) {
      bias_row(Srow + jlo, Ph, Pt, col_lo, col_hi, t, j0 + jlo, jhi - jlo, p.L, p.U, p.R,
               p.P.t, scale);
      any_row = true;
    }
  }
  if (s.mask == nullptr || !any_row) return any_row;
  bool any_key = false;
  for (int64_t jj = 0; jj < bk; ++jj) any_key |= !s.mask[j0 + jj];
  if (!any_key) return false;
  for (int64_t n = 0; n < tile.rows(); ++n) {
    T* Srow = S + n * bk;
    for (int64_t jj = 0; jj < bk; ++jj) Srow[jj] = s.mask[j0 + jj] ? neg_inf : Srow[jj];
  }
  return true;
}

// The tile's rows of a [head, position]-strided tensor: gathered into a dense [rows, D] buffer,
// or scattered back from one.
template <typename F>
void for_tile_rows(const Problem& p, const Tile& tile, int64_t hkv, Strides st, const F& fn) {
  const int64_t bq = tile.i1 - tile.i0;
  for (int64_t n = 0; n < tile.rows(); ++n) {
    const int64_t h = hkv * p.G + tile.g0 + n / bq, i = tile.i0 + n % bq;
    fn(n, h * st.h + i * st.t);
  }
}
template <typename T>
void gather_rows(const Problem& p, const Tile& tile, int64_t hkv, const T* base, Strides st,
                 int64_t D, T* dense) {
  for_tile_rows(p, tile, hkv, st, [&](int64_t n, int64_t at) {
    std::memcpy(dense + n * D, base + at, sizeof(T) * D);
  });
}
template <typename T>
void scatter_rows(const Problem& p, const Tile& tile, int64_t hkv, T* base, Strides st,
                  int64_t D, const T* dense) {
  for_tile_rows(p, tile, hkv, st, [&](int64_t n, int64_t at) {
    std::memcpy(base + at, dense + n * D, sizeof(T) * D);
  });
}

// The key-column buffer [2, Hp, col_rows]: scale * P[j, 0] and scale * P[j, R-1] of every key
// of every sequence, contiguous, so the clipped runs of the bias are one FMA per key.
template <typename T>
void key_columns(const Problem& p, const T* P, T* cols) {
  const T scale = static_cast<T>(p.scale);
  for (const Seq& s : p.seqs)
    for (int64_t hp = 0; hp < p.Hp; ++hp) {
      const T* Ph = P + s.P + hp * p.P.h;
      T* lo = cols + hp * p.col_rows + s.col;
      T* hi = lo + p.Hp * p.col_rows;
      for (int64_t j = 0; j < s.Tk; ++j) {
        lo[j] = scale * Ph[j * p.P.t];
        hi[j] = scale * Ph[j * p.P.t + p.R - 1];
      }
    }
}

template <typename T>
void forward_kernel(const Problem& p, const T* q, const T* k, const T* v, const T* P,
                    const T* Pq, const T* cols, T* out, T* lse) {
  struct Task {
    int64_t seq, hkv;
    Tile tile;
  };
  const Blocks blocks = forward_blocks(p);
  std::vector<Task> tasks;
  std::vector<int64_t> cost;
  for (int64_t si = 0; si < static_cast<int64_t>(p.seqs.size()); ++si) {
    const Seq& s = p.seqs[si];
    for (const Tile& tile : make_tiles(s.Tq, p.G, blocks.q)) {
      const auto keys = tile_keys(p, s, tile);
      for (int64_t hkv = 0; hkv < p.Hkv; ++hkv) {
        tasks.push_back({si, hkv, tile});
        cost.push_back(tile.rows() * std::max<int64_t>(keys.second - keys.first, 1));
      }
    }
  }
  const int64_t Dk = p.Dk, Dv = p.Dv;
  const int64_t qrows = blocks.q;
  run_tasks(cost, [&](int64_t ti) {
    // Buffers per task: small next to the task's work, and no state shared between threads.
    thread_local std::vector<T> Q, S, acc;
    thread_local std::vector<SoftmaxState<T>> st;
    Q.resize(qrows * std::max<int64_t>(Dk, 1));
    S.resize(qrows * blocks.k);
    acc.resize(qrows * std::max<int64_t>(Dv, 1));
    st.resize(qrows);
    const Task& task = tasks[ti];
    const Seq& s = p.seqs[task.seq];
    const Tile& tile = task.tile;
    const int64_t M = tile.rows(), hkv = task.hkv;
    gather_rows(p, tile, hkv, q + s.q, p.q, Dk, Q.data());
    const T* Kh = k + s.k + hkv * p.k.h;
    const T* Vh = v + s.v + hkv * p.v.h;
    std::fill(acc.begin(), acc.begin() + M * Dv, T(0));
    for (int64_t n = 0; n < M; ++n) st[n] = softmax_init<T>();
    const auto keys = tile_keys(p, s, tile);
    for (int64_t j0 = keys.first; j0 < keys.second; j0 += blocks.k) {
      const int64_t bk = std::min(keys.second, j0 + blocks.k) - j0;
      gemm<T>(false, true, M, bk, Dk, T(1), Q.data(), Dk, Kh + j0 * p.k.t, p.k.t, T(0),
              S.data(), bk);
      if (!tile_logits(p, s, hkv, tile, S.data(), P, Pq, cols, j0, bk)) continue;
      for (int64_t n = 0; n < M; ++n) {
        T* Srow = S.data() + n * bk;
        const T bmax = max_row(Srow, bk);
        const T alpha = softmax_rescale(st[n], bmax);
        if (st[n].m == -std::numeric_limits<T>::infinity()) {
          std::fill(Srow, Srow + bk, T(0));  // nothing visible yet in this row
          continue;
        }
        st[n].l += exp_row(Srow, bk, st[n].m);
        if (alpha != T(1)) {
          T* arow = acc.data() + n * Dv;
          for (int64_t d = 0; d < Dv; ++d) arow[d] *= alpha;
        }
      }
      gemm<T>(false, false, M, Dv, bk, T(1), S.data(), bk, Vh + j0 * p.v.t, p.v.t, T(1),
              acc.data(), Dv);
    }
    const int64_t bq = tile.i1 - tile.i0;
    for (int64_t n = 0; n < M; ++n) {
      const T inv = softmax_inv_sum(st[n]);
      T* arow = acc.data() + n * Dv;
      for (int64_t d = 0; d < Dv; ++d) arow[d] *= inv;
      const int64_t h = hkv * p.G + tile.g0 + n / bq, i = tile.i0 + n % bq;
      lse[s.lse + h * p.lse.h + i * p.lse.t] = softmax_lse(st[n]);
    }
    scatter_rows(p, tile, hkv, out + s.o, p.o, Dv, acc.data());
  });
}

// One task per (sequence, key/value head): it owns the rows of dk and dv of that head, those of
// the dP buffer for its heads, and dq of its query heads, so the gradients need neither atomics
// nor a reduction across threads, and the result is bitwise reproducible (whatever the thread
// count). The query heads of a group are summed into dk / dv in a fixed order.
template <typename T>
void backward_kernel(const Problem& p, const T* dout, const T* q, const T* k, const T* v,
                     const T* P, const T* Pq, const T* cols, const T* out, const T* lse, T* dq,
                     T* dk, T* dv, T* dPh, T* dPq) {
  const int64_t Dk = p.Dk, Dv = p.Dv, R = p.R;
  const T scale = static_cast<T>(p.scale);
  std::vector<int64_t> cost;
  for (const Seq& s : p.seqs)
    for (int64_t hkv = 0; hkv < p.Hkv; ++hkv) {
      int64_t c = 0;
      for (const Tile& tile : make_tiles(s.Tq, p.G, kSmall.q)) {
        const auto keys = tile_keys(p, s, tile);
        c += tile.rows() * std::max<int64_t>(keys.second - keys.first, 1);
      }
      cost.push_back(c);
    }
  run_tasks(cost, [&](int64_t task) {
    thread_local std::vector<T> Q, dO, dQ, S, dS, Di, Li;
    constexpr int64_t BQ = kSmall.q, BK = kSmall.k;
    Q.resize(BQ * std::max<int64_t>(Dk, 1));
    dQ.resize(BQ * std::max<int64_t>(Dk, 1));
    dO.resize(BQ * std::max<int64_t>(Dv, 1));
    S.resize(BQ * BK);
    dS.resize(BQ * BK);
    Di.resize(BQ);
    Li.resize(BQ);
    const Seq& s = p.seqs[task / p.Hkv];
    const int64_t hkv = task % p.Hkv;
    const T* Kh = k + s.k + hkv * p.k.h;
    const T* Vh = v + s.v + hkv * p.v.h;
    T* dKh = dk + s.k + hkv * p.k.h;
    T* dVh = dv + s.v + hkv * p.v.h;
    for (const Tile& tile : make_tiles(s.Tq, p.G, BQ)) {
      const int64_t M = tile.rows(), bq = tile.i1 - tile.i0;
      gather_rows(p, tile, hkv, q + s.q, p.q, Dk, Q.data());
      gather_rows(p, tile, hkv, dout + s.o, p.o, Dv, dO.data());
      std::fill(dQ.begin(), dQ.begin() + M * Dk, T(0));
      for (int64_t n = 0; n < M; ++n) {
        const int64_t h = hkv * p.G + tile.g0 + n / bq, i = tile.i0 + n % bq;
        const T* orow = out + s.o + h * p.o.h + i * p.o.t;
        const T* dorow = dO.data() + n * Dv;
        T acc = 0;
        for (int64_t d = 0; d < Dv; ++d) acc += dorow[d] * orow[d];
        Di[n] = acc;
        Li[n] = lse[s.lse + h * p.lse.h + i * p.lse.t];
      }
      const auto keys = tile_keys(p, s, tile);
      for (int64_t j0 = keys.first; j0 < keys.second; j0 += BK) {
        const int64_t bk = std::min(keys.second, j0 + BK) - j0;
        gemm<T>(false, true, M, bk, Dk, T(1), Q.data(), Dk, Kh + j0 * p.k.t, p.k.t, T(0),
                S.data(), bk);
        if (!tile_logits(p, s, hkv, tile, S.data(), P, Pq, cols, j0, bk)) continue;
        for (int64_t n = 0; n < M; ++n) {  // probabilities from the saved lse
          T* Srow = S.data() + n * bk;
          if (Li[n] == -std::numeric_limits<T>::infinity()) {
            std::fill(Srow, Srow + bk, T(0));
          } else {
            exp_row(Srow, bk, Li[n]);
          }
        }
        // dv_j += Σ_i p_ij dout_i ; dp_ij = dout_i·v_j
        gemm<T>(true, false, bk, Dv, M, T(1), S.data(), bk, dO.data(), Dv, T(1),
                dVh + j0 * p.v.t, p.v.t);
        gemm<T>(false, true, M, bk, Dv, T(1), dO.data(), Dv, Vh + j0 * p.v.t, p.v.t, T(0),
                dS.data(), bk);
        for (int64_t n = 0; n < M; ++n) {
          const int64_t h = hkv * p.G + tile.g0 + n / bq, i = tile.i0 + n % bq, t = s.off + i;
          const int64_t hd = p.Hp == 1 ? hkv : h;
          T* dPb = dPh + s.dP + hd * p.dP.h;
          T* dPt = dPq + s.dPq + hd * p.dPq.h + i * p.dPq.t;
          T* dSrow = dS.data() + n * bk;
          const T* Srow = S.data() + n * bk;
          for (int64_t jj = 0; jj < bk; ++jj) {
            const T g = scale * Srow[jj] * (dSrow[jj] - Di[n]);  // scale · dS_ij
            dSrow[jj] = g;
            if (g != T(0)) {
              const int64_t j = j0 + jj;
              const int64_t r = bucket(t, j, p.L, p.U);
              dPb[j * p.dP.t + r] += g;
              dPt[r] -= g;
            }
          }
        }
        gemm<T>(false, false, M, Dk, bk, T(1), dS.data(), bk, Kh + j0 * p.k.t, p.k.t, T(1),
                dQ.data(), Dk);
        gemm<T>(true, false, bk, Dk, M, T(1), dS.data(), bk, Q.data(), Dk, T(1),
                dKh + j0 * p.k.t, p.k.t);
      }
      scatter_rows(p, tile, hkv, dq + s.q, p.q, Dk, dQ.data());
    }
  });
}

Problem base_problem(int64_t H, int64_t Hkv, int64_t Hp, int64_t Dk, int64_t Dv, int64_t R,
                     int64_t L, int64_t U, int64_t wl, int64_t wr, double scale) {
  Problem p;
  p.H = H, p.Hkv = Hkv, p.G = H / Hkv, p.Hp = Hp, p.Dk = Dk, p.Dv = Dv, p.R = R, p.L = L,
  p.U = U, p.window_left = wl, p.window_right = wr, p.scale = scale;
  p.Hd = Hp == 1 ? Hkv : H;
  return p;
}

// The end-aligned ops: query i stands at Tk - Tq + i, and its own row of P (and of dP) is that
// key row.
void end_aligned_queries(Problem& p) {
  p.Pq = p.P;
  p.dPq = p.dP;
  for (Seq& s : p.seqs) {
    s.off = s.Tk - s.Tq;
    s.Pq = s.P + s.off * p.P.t;
    s.dPq = s.dP + s.off * p.dP.t;
  }
}

// q [B,H,Tq,Dk], k [B,Hkv,Tk,Dk], v [B,Hkv,Tk,Dv], P [B,Hp,Tk,R], out [B,H,Tq,Dv], lse [B,H,Tq],
// the dP buffer [B,Hd,Tk,R]; all contiguous.
Problem padded_problem(const DeltaSizes& z, const bool* mask, int64_t L, int64_t U, int64_t wl,
                       int64_t wr, double scale) {
  Problem p = base_problem(z.H, z.Hkv, z.Hp, z.Dk, z.Dv, z.R, L, U, wl, wr, scale);
  const int64_t Tq = z.T, Tk = z.Tk;
  p.q = {Tq * z.Dk, z.Dk};
  p.k = {Tk * z.Dk, z.Dk};
  p.v = {Tk * z.Dv, z.Dv};
  p.P = {Tk * z.R, z.R};
  p.o = {Tq * z.Dv, z.Dv};
  p.lse = {Tq, 1};
  p.dP = {Tk * z.R, z.R};
  for (int64_t b = 0; b < z.B; ++b) {
    p.seqs.push_back({Tq, Tk, b * z.H * Tq * z.Dk, b * z.Hkv * Tk * z.Dk, b * z.Hkv * Tk * z.Dv,
                      b * z.Hp * Tk * z.R, b * z.H * Tq * z.Dv, b * z.H * Tq,
                      b * p.Hd * Tk * z.R, mask ? mask + b * Tk : nullptr, b * Tk, 0, 0, 0});
  }
  p.col_rows = z.B * Tk;
  end_aligned_queries(p);
  return p;
}

// The block ops: as padded_problem, with query i at position q_start + i and key j at
// k_start + j, and the queries' rows of P in P_q [B,Hp,Tq,R] (their gradient in a dP_q buffer
// [B,Hd,Tq,R]); contiguous.
Problem block_problem(const DeltaSizes& z, const bool* mask, int64_t q_start, int64_t k_start,
                      int64_t L, int64_t U, int64_t wl, int64_t wr, double scale) {
  Problem p = padded_problem(z, mask, L, U, wl, wr, scale);
  p.Pq = {z.T * z.R, z.R};
  p.dPq = {z.T * z.R, z.R};
  for (int64_t b = 0; b < z.B; ++b) {
    Seq& s = p.seqs[b];
    s.off = q_start - k_start;
    s.Pq = b * z.Hp * z.T * z.R;
    s.dPq = b * p.Hd * z.T * z.R;
  }
  return p;
}

// q [Total_q,H,Dk], k [Total_k,Hkv,Dk], v [Total_k,Hkv,Dv], P [Total_k,Hp,R], out
// [Total_q,H,Dv], lse [H,Total_q], the dP buffer [Total_k,Hd,R]; all contiguous.
Problem varlen_problem(const VarlenSizes& z, const int32_t* cu_q, const int32_t* cu_k, int64_t L,
                       int64_t U, int64_t wl, int64_t wr, double scale) {
  Problem p = base_problem(z.H, z.Hkv, z.Hp, z.Dk, z.Dv, z.R, L, U, wl, wr, scale);
  p.q = {z.Dk, z.H * z.Dk};
  p.k = {z.Dk, z.Hkv * z.Dk};
  p.v = {z.Dv, z.Hkv * z.Dv};
  p.P = {z.R, z.Hp * z.R};
  p.o = {z.Dv, z.H * z.Dv};
  p.lse = {z.Total_q, 1};
  p.dP = {z.R, p.Hd * z.R};
  for (int64_t b = 0; b < z.B; ++b) {
    const int64_t q0 = cu_q[b], k0 = cu_k[b];
    p.seqs.push_back({cu_q[b + 1] - q0, cu_k[b + 1] - k0, q0 * p.q.t, k0 * p.k.t, k0 * p.v.t,
                      k0 * p.P.t, q0 * p.o.t, q0, k0 * p.dP.t, nullptr, k0, 0, 0, 0});
  }
  p.col_rows = z.Total_k;
  end_aligned_queries(p);
  return p;
}

// Reduced precision (bfloat16, float16) computes in float32: inputs are widened once and the
// results narrowed once, so every tile matmul and the softmax accumulate in float32.
at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor dense(const at::Tensor& t, at::ScalarType ct) { return t.to(ct).contiguous(); }

// Pq: the tensor of the queries' own rows of P (P itself for the end-aligned ops).
std::tuple<at::Tensor, at::Tensor> run_forward(const Problem& p, const at::Tensor& q,
                                               const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& P, const at::Tensor& Pq,
                                               at::Tensor out, at::Tensor lse,
                                               at::ScalarType out_type) {
  auto cols = at::empty({2, p.Hp, p.col_rows}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "hdaf_delta_attention_forward_cpu", [&] {
    key_columns<scalar_t>(p, P.data_ptr<scalar_t>(), cols.data_ptr<scalar_t>());
    forward_kernel<scalar_t>(p, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                             v.data_ptr<scalar_t>(), P.data_ptr<scalar_t>(),
                             Pq.data_ptr<scalar_t>(), cols.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>(),
                             lse.data_ptr<scalar_t>());
  });
  return {out.to(out_type), lse};
}

// Pq / dPq: the queries' own rows of P and of the dP buffer (P and dPh for the end-aligned
// ops).
void run_backward(const Problem& p, const at::Tensor& dout, const at::Tensor& q,
                  const at::Tensor& k, const at::Tensor& v, const at::Tensor& P,
                  const at::Tensor& Pq, const at::Tensor& out, const at::Tensor& lse,
                  at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dPh,
                  at::Tensor& dPq) {
  auto cols = at::empty({2, p.Hp, p.col_rows}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "hdaf_delta_attention_backward_cpu", [&] {
    key_columns<scalar_t>(p, P.data_ptr<scalar_t>(), cols.data_ptr<scalar_t>());
    backward_kernel<scalar_t>(p, dout.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
                              k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                              P.data_ptr<scalar_t>(), Pq.data_ptr<scalar_t>(),
                              cols.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                              lse.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(),
                              dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(),
                              dPh.data_ptr<scalar_t>(), dPq.data_ptr<scalar_t>());
  });
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q_, const at::Tensor& k_,
                                               const at::Tensor& v_, const at::Tensor& P_,
                                               const std::optional<at::Tensor>& mask_, int64_t L,
                                               int64_t U, int64_t wl, int64_t wr, double scale) {
  const DeltaSizes z = check_forward_args(OpDevice::CPU, q_, k_, v_, P_, mask_, L, U, wl, wr,
                                          scale);
  const auto ct = compute_type(q_.scalar_type());
  auto q = dense(q_, ct), k = dense(k_, ct), v = dense(v_, ct), P = dense(P_, ct);
  at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();
  const Problem p =
      padded_problem(z, mask.defined() ? mask.data_ptr<bool>() : nullptr, L, U, wl, wr, scale);
  auto out = at::empty({z.B, z.H, z.T, z.Dv}, q.options());
  auto lse = at::empty({z.B, z.H, z.T}, q.options());
  return run_forward(p, q, k, v, P, P, out, lse, q_.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& P_, const std::optional<at::Tensor>& mask_, const at::Tensor& out_,
    const at::Tensor& lse_, int64_t L, int64_t U, int64_t wl, int64_t wr, double scale) {
  const DeltaSizes z =
      check_forward_args(OpDevice::CPU, q_, k_, v_, P_, mask_, L, U, wl, wr, scale);
  check_backward_args(OpDevice::CPU, z, q_, dout_, out_, lse_);
  const auto ct = compute_type(q_.scalar_type());
  auto q = dense(q_, ct), k = dense(k_, ct), v = dense(v_, ct), P = dense(P_, ct);
  auto dout = dense(dout_, ct), out = dense(out_, ct), lse = dense(lse_, ct);
  at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();
  const Problem p =
      padded_problem(z, mask.defined() ? mask.data_ptr<bool>() : nullptr, L, U, wl, wr, scale);
  auto dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  auto dPh = at::zeros({z.B, p.Hd, z.Tk, z.R}, q.options());  // summed below if P is shared
  run_backward(p, dout, q, k, v, P, P, out, lse, dq, dk, dv, dPh, dPh);
  auto dP = z.Hp == 1 ? dPh.sum(1, /*keepdim=*/true) : dPh;
  const auto t = q_.scalar_type();
  return {dq.to(t), dk.to(t), dv.to(t), dP.to(t)};
}

std::tuple<at::Tensor, at::Tensor> varlen_forward_cpu(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& P_,
    const at::Tensor& cu_q_, const at::Tensor& cu_k_, int64_t max_q, int64_t max_k, int64_t L,
    int64_t U, int64_t wl, int64_t wr, double scale) {
  const VarlenSizes z = check_varlen_args(OpDevice::CPU, q_, k_, v_, P_, cu_q_, cu_k_, max_q,
                                          max_k, L, U, wl, wr, scale);
  const auto ct = compute_type(q_.scalar_type());
  auto q = dense(q_, ct), k = dense(k_, ct), v = dense(v_, ct), P = dense(P_, ct);
  auto cu_q = cu_q_.contiguous(), cu_k = cu_k_.contiguous();
  const Problem p = varlen_problem(z, cu_q.data_ptr<int32_t>(), cu_k.data_ptr<int32_t>(), L, U,
                                   wl, wr, scale);
  auto out = at::empty({z.Total_q, z.H, z.Dv}, q.options());
  auto lse = at::empty({z.H, z.Total_q}, q.options());
  return run_forward(p, q, k, v, P, P, out, lse, q_.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_backward_cpu(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& P_, const at::Tensor& cu_q_, const at::Tensor& cu_k_, int64_t max_q,
    int64_t max_k, const at::Tensor& out_, const at::Tensor& lse_, int64_t L, int64_t U,
    int64_t wl, int64_t wr, double scale) {
  const VarlenSizes z = check_varlen_args(OpDevice::CPU, q_, k_, v_, P_, cu_q_, cu_k_, max_q,
                                          max_k, L, U, wl, wr, scale);
  check_varlen_backward_args(OpDevice::CPU, z, q_, dout_, out_, lse_);
  const auto ct = compute_type(q_.scalar_type());
  auto q = dense(q_, ct), k = dense(k_, ct), v = dense(v_, ct), P = dense(P_, ct);
  auto dout = dense(dout_, ct), out = dense(out_, ct), lse = dense(lse_, ct);
  auto cu_q = cu_q_.contiguous(), cu_k = cu_k_.contiguous();
  const Problem p = varlen_problem(z, cu_q.data_ptr<int32_t>(), cu_k.data_ptr<int32_t>(), L, U,
                                   wl, wr, scale);
  auto dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  auto dPh = at::zeros({z.Total_k, p.Hd, z.R}, q.options());
  run_backward(p, dout, q, k, v, P, P, out, lse, dq, dk, dv, dPh, dPh);
  auto dP = z.Hp == 1 ? dPh.sum(1, /*keepdim=*/true) : dPh;
  const auto t = q_.scalar_type();
  return {dq.to(t), dk.to(t), dv.to(t), dP.to(t)};
}

// The block ops: queries at global positions q_start + i, keys at k_start + j, the queries'
// rows of P in P_q (docs/delta_attention.md, "Global positions").
std::tuple<at::Tensor, at::Tensor> block_forward_cpu(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& Pq_,
    const at::Tensor& Pk_, const std::optional<at::Tensor>& mask_, int64_t q_start,
    int64_t k_start, int64_t L, int64_t U, int64_t wl, int64_t wr, double scale) {
  const DeltaSizes z =
      check_block_args(OpDevice::CPU, q_, k_, v_, Pq_, Pk_, mask_, L, U, wl, wr, scale);
  const auto ct = compute_type(q_.scalar_type());
  auto q = dense(q_, ct), k = dense(k_, ct), v = dense(v_, ct);
  auto Pq = dense(Pq_, ct), Pk = dense(Pk_, ct);
  at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();
  const Problem p = block_problem(z, mask.defined() ? mask.data_ptr<bool>() : nullptr, q_start,
                                  k_start, L, U, wl, wr, scale);
  auto out = at::empty({z.B, z.H, z.T, z.Dv}, q.options());
  auto lse = at::empty({z.B, z.H, z.T}, q.options());
  return run_forward(p, q, k, v, Pk, Pq, out, lse, q_.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_backward_cpu(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& Pq_, const at::Tensor& Pk_, const std::optional<at::Tensor>& mask_,
    const at::Tensor& out_, const at::Tensor& lse_, int64_t q_start, int64_t k_start, int64_t L,
    int64_t U, int64_t wl, int64_t wr, double scale) {
  const DeltaSizes z =
      check_block_args(OpDevice::CPU, q_, k_, v_, Pq_, Pk_, mask_, L, U, wl, wr, scale);
  check_backward_args(OpDevice::CPU, z, q_, dout_, out_, lse_);
  const auto ct = compute_type(q_.scalar_type());
  auto q = dense(q_, ct), k = dense(k_, ct), v = dense(v_, ct);
  auto Pq = dense(Pq_, ct), Pk = dense(Pk_, ct);
  auto dout = dense(dout_, ct), out = dense(out_, ct), lse = dense(lse_, ct);
  at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();
  const Problem p = block_problem(z, mask.defined() ? mask.data_ptr<bool>() : nullptr, q_start,
                                  k_start, L, U, wl, wr, scale);
  auto dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  auto dPk = at::zeros({z.B, p.Hd, z.Tk, z.R}, q.options());  // summed below if P is shared
  auto dPq = at::zeros({z.B, p.Hd, z.T, z.R}, q.options());
  run_backward(p, dout, q, k, v, Pk, Pq, out, lse, dq, dk, dv, dPk, dPq);
  if (z.Hp == 1) {
    dPk = dPk.sum(1, /*keepdim=*/true);
    dPq = dPq.sum(1, /*keepdim=*/true);
  }
  const auto t = q_.scalar_type();
  return {dq.to(t), dk.to(t), dv.to(t), dPq.to(t), dPk.to(t)};
}

}  // namespace

TORCH_LIBRARY_IMPL(hdaf, CPU, m) {
  m.impl("delta_attention_block_forward", &block_forward_cpu);
  m.impl("delta_attention_block_backward", &block_backward_cpu);
  m.impl("delta_attention_forward", &forward_cpu);
  m.impl("delta_attention_backward", &backward_cpu);
  m.impl("delta_attention_varlen_forward", &varlen_forward_cpu);
  m.impl("delta_attention_varlen_backward", &varlen_backward_cpu);
}

}  // namespace hdaf
