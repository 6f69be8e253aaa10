// Fused CPU kernels of hdaf::delta_attention_forward / _backward.
//
// Flash-attention-style: query tiles × key tiles with an online softmax; the delta bias
// bias_ij = P[j, r(i,j)] - P[i, r(i,j)] is gathered from rows of P = x·w inside the tile
// loop, so nothing of size T×T is ever allocated. Only key tiles inside the band of the
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
#include <cstring>
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

constexpr int64_t kBlockQ = 64;   // query rows per tile
constexpr int64_t kBlockK = 128;  // key rows per tile

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

struct Problem {
  int64_t B, H, T, Dk, Dv, Hp, R, L, U;
  Band band;
  double scale;
  const bool* mask;  // [B,T] or nullptr
};

// ---- Row primitives of a tile. float32 gets versions compiled for AVX2+FMA as well as the
// baseline (GCC function multiversioning picks one at load time), with a polynomial exp that
// vectorizes; float64 keeps std::exp, which its tolerance needs.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define HDAF_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define HDAF_CLONES
#endif

// S[jj] = scale * (S[jj] + P[j, r(i,j)] - P[i, r(i,j)]) for the keys j = j0 + jj.
#define HDAF_INLINE inline __attribute__((always_inline))

// S[jj] = scale * (S[jj] + P[j, r(i,j)] - P[i, r(i,j)]) for the keys j = j0 + jj, jj < bk.
// Split into the three runs of r (clipped low, diagonal, clipped high) so that each loop has
// invariant strides and vectorizes: on the diagonal run r = j - i + L, hence
// P[j, r] = P[j*(R+1) + L - i] and P[i, r] = P[i*R + j - i + L].
template <typename T>
HDAF_INLINE void bias_row_runs(T* __restrict S, const T* __restrict Pbh, int64_t i, int64_t j0,
                               int64_t bk, int64_t L, int64_t U, int64_t R, T scale) {
  const T* Pi = Pbh + i * R;
  const int64_t lo_end = i - L - j0, hi_begin = i + U + 1 - j0;
  const int64_t a = lo_end < 0 ? 0 : (lo_end > bk ? bk : lo_end);
  const int64_t b = hi_begin < a ? a : (hi_begin > bk ? bk : hi_begin);
  const T p_first = Pi[0], p_last = Pi[R - 1];
  const T* Pj = Pbh + j0 * R;
  for (int64_t jj = 0; jj < a; ++jj) S[jj] = scale * (S[jj] + Pj[jj * R] - p_first);
  if (b > a) {
    const T* Pdiag = Pbh + j0 * (R + 1) + L - i;  // indexed from jj = 0; read from jj = a
    const T* Prow = Pi + j0 - i + L;
    for (int64_t jj = a; jj < b; ++jj) S[jj] = scale * (S[jj] + Pdiag[jj * (R + 1)] - Prow[jj]);
  }
  for (int64_t jj = b; jj < bk; ++jj) S[jj] = scale * (S[jj] + Pj[jj * R + R - 1] - p_last);
}

HDAF_CLONES void bias_row_f32(float* S, const float* Pbh, int64_t i, int64_t j0, int64_t bk,
                              int64_t L, int64_t U, int64_t R, float scale) {
  bias_row_runs<float>(S, Pbh, i, j0, bk, L, U, R, scale);
}

// exp for x <= ~0 (the softmax only exponentiates score - max); exactly 0 below the float
// range, so -inf (a masked key) gives 0. Cephes' expf polynomial, about 1 ulp. Builtins and
// ternaries only: library calls would not inline into the AVX2 clone, and the loop would
// stay scalar.
HDAF_INLINE float exp_poly(float x) {
  const float lo = -87.33654475f;
  const float xc = x < lo ? lo : (x > 88.0f ? 88.0f : x);
  const float n = __builtin_floorf(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
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

HDAF_CLONES float max_row_f32(const float* __restrict S, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t jj = 0; jj < n; ++jj) m = S[jj] > m ? S[jj] : m;
  return m;
}

inline void bias_row(float* S, const float* Pbh, int64_t i, int64_t j0, int64_t bk, int64_t L,
                     int64_t U, int64_t R, float scale) {
  bias_row_f32(S, Pbh, i, j0, bk, L, U, R, scale);
}
inline void bias_row(double* S, const double* Pbh, int64_t i, int64_t j0, int64_t bk, int64_t L,
                     int64_t U, int64_t R, double scale) {
  bias_row_runs<double>(S, Pbh, i, j0, bk, L, U, R, scale);
}
inline float exp_row(float* S, int64_t n, float m) { return exp_row_f32(S, n, m); }
inline double exp_row(double* S, int64_t n, double m) {
  for (int64_t jj = 0; jj < n; ++jj) S[jj] = std::exp(S[jj] - m);  // exp(-inf) = 0: masked
  return sum_row(S, n);
}
inline float max_row(const float* S, int64_t n) { return max_row_f32(S, n); }
inline double max_row(const double* S, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t jj = 0; jj < n; ++jj) m = S[jj] > m ? S[jj] : m;
  return m;
}

// Scores of one tile: S[ii, jj] = scale * (q_i·k_j + P[j,r] - P[i,r]) where visible, -inf
// elsewhere. S holds q_i·k_j on entry. Returns false when nothing in the tile is visible.
// Per row, the band leaves one contiguous run of keys [jlo, jhi) (edge tiles of a window or
// of causal masking cut it), then padding keys are set to -inf.
template <typename T>
bool tile_logits(const Problem& p, T* S, const T* Pbh, const bool* mask_b, int64_t i0,
                 int64_t bq, int64_t j0, int64_t bk) {
  const T scale = static_cast<T>(p.scale);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  bool any_row = false;
  for (int64_t ii = 0; ii < bq; ++ii) {
    const int64_t i = i0 + ii;
    T* Srow = S + ii * bk;
    int64_t jlo = i + p.band.lo - j0, jhi = i + p.band.hi + 1 - j0;
    jlo = jlo < 0 ? 0 : (jlo > bk ? bk : jlo);
    jhi = jhi < jlo ? jlo : (jhi > bk ? bk : jhi);
    std::fill(Srow, Srow + jlo, neg_inf);
    std::fill(Srow + jhi, Srow + bk, neg_inf);
    if (jhi > jlo) {
      bias_row(Srow + jlo, Pbh, i, j0 + jlo, jhi - jlo, p.L, p.U, p.R, scale);
      any_row = true;
    }
  }
  if (mask_b == nullptr || !any_row) return any_row;
  bool any_key = false;
  for (int64_t jj = 0; jj < bk; ++jj) any_key |= !mask_b[j0 + jj];
  if (!any_key) return false;
  for (int64_t ii = 0; ii < bq; ++ii) {
    T* Srow = S + ii * bk;
    for (int64_t jj = 0; jj < bk; ++jj) Srow[jj] = mask_b[j0 + jj] ? neg_inf : Srow[jj];
  }
  return true;
}

template <typename T>
void forward_kernel(const Problem& p, const T* q, const T* k, const T* v, const T* P, T* out,
                    T* lse) {
  const int64_t nqb = (p.T + kBlockQ - 1) / kBlockQ;
  const int64_t T_ = p.T, Dk = p.Dk, Dv = p.Dv, R = p.R;
  at::parallel_for(0, p.B * p.H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> S(kBlockQ * kBlockK), acc(kBlockQ * std::max<int64_t>(Dv, 1));
    std::vector<SoftmaxState<T>> st(kBlockQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (p.H * nqb), h = (task / nqb) % p.H, qb = task % nqb;
      const int64_t bh = b * p.H + h;
      const int64_t i0 = qb * kBlockQ, i1 = std::min(T_, i0 + kBlockQ), bq = i1 - i0;
      const T* Qb = q + (bh * T_ + i0) * Dk;
      const T* Kbh = k + bh * T_ * Dk;
      const T* Vbh = v + bh * T_ * Dv;
      const T* Pbh = P + (b * p.Hp + (p.Hp == 1 ? 0 : h)) * T_ * R;
      const bool* mask_b = p.mask ? p.mask + b * T_ : nullptr;
      std::fill(acc.begin(), acc.begin() + bq * Dv, T(0));
      for (int64_t ii = 0; ii < bq; ++ii) st[ii] = softmax_init<T>();
      const int64_t jb = band_key_begin(i0, p.band), je = band_key_end(i1, T_, p.band);
      for (int64_t j0 = jb; j0 < je; j0 += kBlockK) {
        const int64_t bk = std::min(je, j0 + kBlockK) - j0;
        gemm<T>(false, true, bq, bk, Dk, T(1), Qb, Dk, Kbh + j0 * Dk, Dk, T(0), S.data(), bk);
        if (!tile_logits(p, S.data(), Pbh, mask_b, i0, bq, j0, bk)) continue;
        for (int64_t ii = 0; ii < bq; ++ii) {
          T* Srow = S.data() + ii * bk;
          const T bmax = max_row(Srow, bk);
          const T alpha = softmax_rescale(st[ii], bmax);
          if (st[ii].m == -std::numeric_limits<T>::infinity()) {
            std::fill(Srow, Srow + bk, T(0));  // nothing visible yet in this row
            continue;
          }
          st[ii].l += exp_row(Srow, bk, st[ii].m);
          if (alpha != T(1)) {
            T* arow = acc.data() + ii * Dv;
            for (int64_t d = 0; d < Dv; ++d) arow[d] *= alpha;
          }
        }
        gemm<T>(false, false, bq, Dv, bk, T(1), S.data(), bk, Vbh + j0 * Dv, Dv, T(1),
                acc.data(), Dv);
      }
      T* Ob = out + (bh * T_ + i0) * Dv;
      for (int64_t ii = 0; ii < bq; ++ii) {
        const T inv = softmax_inv_sum(st[ii]);
        for (int64_t d = 0; d < Dv; ++d) Ob[ii * Dv + d] = acc[ii * Dv + d] * inv;
        lse[bh * T_ + i0 + ii] = softmax_lse(st[ii]);
      }
    }
  });
}

// One task per (batch, head): it owns every row of dk, dv and dP of that head, so the
// bias gradient needs neither atomics nor a reduction across threads, and the result is
// bitwise reproducible for a given thread count (and independent of it).
template <typename T>
void backward_kernel(const Problem& p, const T* dout, const T* q, const T* k, const T* v,
                     const T* P, const T* out, const T* lse, T* dq, T* dk, T* dv, T* dPh) {
  const int64_t T_ = p.T, Dk = p.Dk, Dv = p.Dv, R = p.R;
  const T scale = static_cast<T>(p.scale);
  at::parallel_for(0, p.B * p.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> S(kBlockQ * kBlockK), dS(kBlockQ * kBlockK), Di(kBlockQ);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.H, h = bh % p.H;
      const T* Qbh = q + bh * T_ * Dk;
      const T* Kbh = k + bh * T_ * Dk;
      const T* Vbh = v + bh * T_ * Dv;
      const T* dObh = dout + bh * T_ * Dv;
      const T* Obh = out + bh * T_ * Dv;
      const T* Lbh = lse + bh * T_;
      const T* Pbh = P + (b * p.Hp + (p.Hp == 1 ? 0 : h)) * T_ * R;
      T* dQbh = dq + bh * T_ * Dk;
      T* dKbh = dk + bh * T_ * Dk;
      T* dVbh = dv + bh * T_ * Dv;
      T* dPbh = dPh + bh * T_ * R;
      const bool* mask_b = p.mask ? p.mask + b * T_ : nullptr;
      for (int64_t i0 = 0; i0 < T_; i0 += kBlockQ) {
        const int64_t i1 = std::min(T_, i0 + kBlockQ), bq = i1 - i0;
        for (int64_t ii = 0; ii < bq; ++ii) {
          T s = 0;
          for (int64_t d = 0; d < Dv; ++d) s += dObh[(i0 + ii) * Dv + d] * Obh[(i0 + ii) * Dv + d];
          Di[ii] = s;
        }
        const int64_t jb = band_key_begin(i0, p.band), je = band_key_end(i1, T_, p.band);
        for (int64_t j0 = jb; j0 < je; j0 += kBlockK) {
          const int64_t bk = std::min(je, j0 + kBlockK) - j0;
          gemm<T>(false, true, bq, bk, Dk, T(1), Qbh + i0 * Dk, Dk, Kbh + j0 * Dk, Dk, T(0),
                  S.data(), bk);
          if (!tile_logits(p, S.data(), Pbh, mask_b, i0, bq, j0, bk)) continue;
          for (int64_t ii = 0; ii < bq; ++ii) {  // probabilities from the saved lse
            const T l = Lbh[i0 + ii];
            T* Srow = S.data() + ii * bk;
            if (l == -std::numeric_limits<T>::infinity()) {
              std::fill(Srow, Srow + bk, T(0));
            } else {
              exp_row(Srow, bk, l);
            }
          }
          // dv_j += Σ_i p_ij dout_i ; dp_ij = dout_i·v_j
          gemm<T>(true, false, bk, Dv, bq, T(1), S.data(), bk, dObh + i0 * Dv, Dv, T(1),
                  dVbh + j0 * Dv, Dv);
          gemm<T>(false, true, bq, bk, Dv, T(1), dObh + i0 * Dv, Dv, Vbh + j0 * Dv, Dv, T(0),
                  dS.data(), bk);
          for (int64_t ii = 0; ii < bq; ++ii) {
            const int64_t i = i0 + ii;
            T* dSrow = dS.data() + ii * bk;
            const T* Srow = S.data() + ii * bk;
            T* dPi = dPbh + i * R;
            for (int64_t jj = 0; jj < bk; ++jj) {
              const T g = scale * Srow[jj] * (dSrow[jj] - Di[ii]);  // scale · dS_ij
              dSrow[jj] = g;
              if (g != T(0)) {
                const int64_t j = j0 + jj;
                const int64_t r = bucket(i, j, p.L, p.U);
                dPbh[j * R + r] += g;
                dPi[r] -= g;
              }
            }
          }
          gemm<T>(false, false, bq, Dk, bk, T(1), dS.data(), bk, Kbh + j0 * Dk, Dk, T(1),
                  dQbh + i0 * Dk, Dk);
          gemm<T>(true, false, bk, Dk, bq, T(1), dS.data(), bk, Qbh + i0 * Dk, Dk, T(1),
                  dKbh + j0 * Dk, Dk);
        }
      }
    }
  });
}

Problem make_problem(const at::Tensor& q, const at::Tensor& v, const at::Tensor& P,
                     const bool* mask, int64_t L, int64_t U, int64_t wl, int64_t wr,
                     double scale) {
  Problem p;
  p.B = q.size(0), p.H = q.size(1), p.T = q.size(2), p.Dk = q.size(3), p.Dv = v.size(3);
  p.Hp = P.size(1), p.R = P.size(3), p.L = L, p.U = U;
  p.band = make_band(p.T, wl, wr);
  p.scale = scale;
  p.mask = mask;
  return p;
}

// Reduced precision (bfloat16, float16) computes in float32: inputs are widened once and the
// results narrowed once, so every tile matmul and the softmax accumulate in float32.
at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q_, const at::Tensor& k_,
                                               const at::Tensor& v_, const at::Tensor& P_,
                                               const std::optional<at::Tensor>& mask_, int64_t L,
                                               int64_t U, int64_t wl, int64_t wr, double scale) {
  check_forward_args(OpDevice::CPU, q_, k_, v_, P_, mask_, L, U, wl, wr, scale);
  const auto ct = compute_type(q_.scalar_type());
  auto q = q_.to(ct).contiguous(), k = k_.to(ct).contiguous(), v = v_.to(ct).contiguous();
  auto P = P_.to(ct).contiguous();
  at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();
  const Problem p = make_problem(q, v, P, mask.defined() ? mask.data_ptr<bool>() : nullptr, L, U,
                                 wl, wr, scale);
  auto out = at::empty({p.B, p.H, p.T, p.Dv}, q.options());
  auto lse = at::empty({p.B, p.H, p.T}, q.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "hdaf_delta_attention_forward_cpu", [&] {
    forward_kernel<scalar_t>(p, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                             v.data_ptr<scalar_t>(), P.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
  });
  return {out.to(q_.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& P_, const std::optional<at::Tensor>& mask_, const at::Tensor& out_,
    const at::Tensor& lse_, int64_t L, int64_t U, int64_t wl, int64_t wr, double scale) {
  const DeltaSizes sizes =
      check_forward_args(OpDevice::CPU, q_, k_, v_, P_, mask_, L, U, wl, wr, scale);
  check_backward_args(OpDevice::CPU, sizes, q_, dout_, out_, lse_);
  const auto ct = compute_type(q_.scalar_type());
  auto q = q_.to(ct).contiguous(), k = k_.to(ct).contiguous(), v = v_.to(ct).contiguous();
  auto P = P_.to(ct).contiguous(), dout = dout_.to(ct).contiguous();
  auto out = out_.to(ct).contiguous(), lse = lse_.to(ct).contiguous();
  at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();
  const Problem p = make_problem(q, v, P, mask.defined() ? mask.data_ptr<bool>() : nullptr, L, U,
                                 wl, wr, scale);
  auto dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  auto dPh = at::zeros({p.B, p.H, p.T, p.R}, q.options());  // per head; summed below if shared
  AT_DISPATCH_FLOATING_TYPES(ct, "hdaf_delta_attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(p, dout.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
                              k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                              P.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                              lse.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(),
                              dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(),
                              dPh.data_ptr<scalar_t>());
  });
  auto dP = p.Hp == 1 ? dPh.sum(1, /*keepdim=*/true) : dPh;
  const auto t = q_.scalar_type();
  return {dq.to(t), dk.to(t), dv.to(t), dP.to(t)};
}

}  // namespace

TORCH_LIBRARY_IMPL(hdaf, CPU, m) {
  m.impl("delta_attention_forward", &forward_cpu);
  m.impl("delta_attention_backward", &backward_cpu);
}

}  // namespace hdaf
