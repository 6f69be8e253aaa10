// CUDA kernel templates of hdaf::delta_attention (spec: docs/delta_attention.md).
//
// Included only by the per-dtype translation units fwd_*.cu / bwd_*.cu, which
// instantiate one launcher each (4 dtypes x 2 directions), so the eight compile in parallel and none
// of them includes a torch header.
//
// Design (one CTA per (batch*head, block of rows); all tiles in shared memory):
//   forward   CTA owns BM query rows; iterates the key tiles of the band only
//             (hdaf::band_key_begin/end), skips tiles whose keys are all padding;
//             S = Q K^T and O += P V are the two tile matmuls; the bias
//             P[j,r(i,j)] - P[i,r(i,j)] is gathered from global P inside the tile;
//             online softmax through hdaf::softmax_rescale / softmax_inv_sum / softmax_lse.
//   backward  1. D_i = dout_i . out_i (one warp per row)
//             2. dkdv kernel: CTA owns BN key rows: dK, dV and the key-row part of dP
//                (dP_heads[j, r] += scale dS_ij), iterating the query tiles of the band
//             3. dq kernel: CTA owns BM query rows: dQ and the query-row part of dP
//                (dP_heads[i, r] -= scale dS_ij), after kernel 2 on the same stream.
//             Every output element is written by exactly one thread in a fixed order:
//             no atomics, bitwise deterministic. The caller sums dP_heads over heads
//             when P is shared (Hp = 1).
// Matmuls: wmma m16n16k16 tensor-core tiles (fp16/bf16 operands, fp32 accumulators)
// on sm_80+; a plain FMA loop for float32/float64 operands (no tf32: float32 keeps
// full float32 products) and for fp16/bf16 on older architectures.
// Tiles: a large configuration for sm_80 / sm_90 (<= 163 KB of shared memory per block
// at head dim 128) and a small one taken when the device allows less (sm_86 / sm_89).
// Accumulation: float32 (float64 for float64 inputs, whose lse is float64 as the spec asks).
// tests/test_cuda.py also runs these templates on the CPU through host_emulation/
// (threads for CUDA threads, an emulated wmma), so the logic is tested without a GPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "delta_attention_cuda.h"
#include "hdaf/delta_common.h"

// Kernel launch; csrc/cuda/host_emulation/ redefines it to run the kernels on the CPU.
#ifndef HDAF_LAUNCH
#define HDAF_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#endif

namespace hdaf {
namespace cuda {
namespace detail {

// ---------------------------------------------------------------------------
// Types and conversions
// ---------------------------------------------------------------------------

// Accumulation type: float64 for float64 inputs, float32 otherwise.
template <typename T>
using acc_type = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_type<T> x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

// Whether the tile matmuls of operand type T run on tensor cores (wmma) in this
// compilation pass. Host passes and pre-sm_80 devices take the FMA path.
template <typename T>
struct UseTensorCores {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  static constexpr bool value =
      std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;
#else
  static constexpr bool value = false;
#endif
};

// Shared-memory row padding (elements) of operand tiles: keeps wmma's ldm a multiple
// of 8 halves (16 bytes) for 2-byte types, and makes the FMA path's column walks
// conflict-free (odd stride) for 4/8-byte types.
template <typename T>
__host__ __device__ constexpr int operand_pad() {
  return sizeof(T) == 2 ? 8 : 1;
}
// Accumulator tiles (always acc_type) keep a stride that is a multiple of 4 (wmma).
constexpr int kAccPad = 4;

__host__ __device__ inline int round16(int64_t d) { return static_cast<int>((d + 15) / 16 * 16); }

struct Carve {
  size_t off = 0;
  __host__ __device__ size_t take(size_t bytes) {
    const size_t o = off;
    off += (bytes + 127) / 128 * 128;  // every buffer 128-byte aligned (wmma wants 32)
    return o;
  }
};

// ---------------------------------------------------------------------------
// Block-level helpers
// ---------------------------------------------------------------------------

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// dst[r][d] = src[(row0 + r) * D + d] for row0 + r < row_end and d < D, else 0,
// for r < rows and d < dpad (the zero padding makes the padded matmuls exact).
template <typename T, int NT>
__device__ __forceinline__ void load_rows(T* dst, int ld, int dpad, const T* __restrict__ src,
                                          int64_t D, int64_t row0, int rows, int64_t row_end) {
  const int n = rows * dpad;
  for (int idx = threadIdx.x; idx < n; idx += NT) {
    const int r = idx / dpad;
    const int d = idx - r * dpad;
    const int64_t g = row0 + r;
    T val = from_acc<T>(acc_type<T>(0));
    if (g < row_end && d < D) val = src[g * D + d];
    dst[r * ld + d] = val;
  }
}

// C[M x N] (+)= A[M x K] . B[K x N], all in shared memory; M, N, K multiples of 16.
// A(m,k) = A_COL ? A[m + k*lda] : A[m*lda + k];  B(k,n) = B_COL ? B[k + n*ldb] : B[k*ldb + n].
// C is row-major acc_type with stride ldc. The caller synchronises around it.
template <typename T, bool A_COL, bool B_COL, bool ACC, int NT>
__device__ __forceinline__ void block_mma(acc_type<T>* C, int ldc, const T* A, int lda, const T* B,
                                          int ldb, int M, int N, int K) {
  if constexpr (UseTensorCores<T>::value) {
    namespace wmma = nvcuda::wmma;
    using ALayout = typename std::conditional<A_COL, wmma::col_major, wmma::row_major>::type;
    using BLayout = typename std::conditional<B_COL, wmma::col_major, wmma::row_major>::type;
    const int warp = threadIdx.x / 32;
    constexpr int kWarps = NT / 32;
    const int tn = N / 16;
    const int tiles = (M / 16) * tn;
    for (int t = warp; t < tiles; t += kWarps) {
      const int tm = t / tn;
      const int tc = t - tm * tn;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      float* c = C + tm * 16 * ldc + tc * 16;
      if (ACC) {
        wmma::load_matrix_sync(acc, c, ldc, wmma::mem_row_major);
      } else {
        wmma::fill_fragment(acc, 0.0f);
      }
      for (int k = 0; k < K; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> b;
        const T* pa = A_COL ? A + tm * 16 + k * lda : A + tm * 16 * lda + k;
        const T* pb = B_COL ? B + k + tc * 16 * ldb : B + k * ldb + tc * 16;
        wmma::load_matrix_sync(a, pa, lda);
        wmma::load_matrix_sync(b, pb, ldb);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(c, acc, ldc, wmma::mem_row_major);
    }
  } else {
    using A_t = acc_type<T>;
    const int n = M * N;
    for (int idx = threadIdx.x; idx < n; idx += NT) {
      const int m = idx / N;
      const int col = idx - m * N;
      A_t acc = ACC ? C[m * ldc + col] : A_t(0);
      for (int k = 0; k < K; ++k) {
        const T a = A_COL ? A[m + k * lda] : A[m * lda + k];
        const T b = B_COL ? B[k + col * ldb] : B[k * ldb + col];
        acc = fma(to_acc(a), to_acc(b), acc);
      }
      C[m * ldc + col] = acc;
    }
  }
}

// The logit of the visible pair (i, j): scale * (q_i.k_j + P[j, r] - P[i, r]), r = r(i,j).
// Forward and both backward kernels use this one expression.
template <typename T>
__device__ __forceinline__ acc_type<T> delta_logit(acc_type<T> qk, const T* __restrict__ Pb,
                                                   int64_t i, int64_t j, int64_t R, int64_t L,
                                                   int64_t U, acc_type<T> scale) {
  const int64_t r = hdaf::bucket(i, j, L, U);
  return scale * (qk + (to_acc(Pb[j * R + r]) - to_acc(Pb[i * R + r])));
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

// Tile shapes (BM query rows x BN key rows, NT threads). Large: sized for sm_80 / sm_90
// (<= 163 KB of shared memory at head dim 128); Small: for devices with ~99 KB per block
// (sm_86 / sm_89), taken when the large one does not fit.
template <typename T, bool kSmall = false>
struct FwdCfg {  // __half, __nv_bfloat16
  static constexpr int BM = kSmall ? 32 : 64, BN = 64, NT = 128;
};
template <bool kSmall>
struct FwdCfg<float, kSmall> {
  static constexpr int BM = kSmall ? 32 : 64, BN = 32, NT = 128;
};
template <bool kSmall>
struct FwdCfg<double, kSmall> {
  static constexpr int BM = 16, BN = kSmall ? 16 : 32, NT = 128;
};

template <typename T, int BM, int BN>
struct FwdLayout {
  int dkp, dvp, ldk, ldv, lds, ldp, ldo;
  size_t q, k, v, s, p, o, m, l, alpha, kmask, bytes;
  __host__ __device__ FwdLayout(int64_t Dk, int64_t Dv) {
    using A = acc_type<T>;
    dkp = round16(Dk);
    dvp = round16(Dv);
    ldk = dkp + operand_pad<T>();
    ldv = dvp + operand_pad<T>();
    lds = BN + kAccPad;
    ldp = BN + operand_pad<T>();
    ldo = dvp + kAccPad;
    Carve c;
    q = c.take(sizeof(T) * BM * ldk);
    k = c.take(sizeof(T) * BN * ldk);
    v = c.take(sizeof(T) * BN * ldv);
    s = c.take(sizeof(A) * BM * lds);
    p = c.take(sizeof(T) * BM * ldp);
    o = c.take(sizeof(A) * BM * ldo);
    m = c.take(sizeof(A) * BM);
    l = c.take(sizeof(A) * BM);
    alpha = c.take(sizeof(A) * BM);
    kmask = c.take(BN);
    bytes = c.off;
  }
};

template <typename T, int BM, int BN, int NT>
__global__ void __launch_bounds__(NT) delta_fwd_kernel(const FwdParams p) {
  using A = acc_type<T>;
  static_assert(BM % 16 == 0 && BN % 16 == 0 && NT % 32 == 0, "tile shape");
  constexpr int kWarps = NT / 32;
  constexpr int kPerLane = (BN + 31) / 32;
  extern __shared__ __align__(128) unsigned char smem[];
  const FwdLayout<T, BM, BN> lay(p.Dk, p.Dv);
  T* Qs = reinterpret_cast<T*>(smem + lay.q);
  T* Ks = reinterpret_cast<T*>(smem + lay.k);
  T* Vs = reinterpret_cast<T*>(smem + lay.v);
  A* Sf = reinterpret_cast<A*>(smem + lay.s);
  T* Ps = reinterpret_cast<T*>(smem + lay.p);
  A* Of = reinterpret_cast<A*>(smem + lay.o);
  A* row_m = reinterpret_cast<A*>(smem + lay.m);
  A* row_l = reinterpret_cast<A*>(smem + lay.l);
  A* row_alpha = reinterpret_cast<A*>(smem + lay.alpha);
  unsigned char* kmask = smem + lay.kmask;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int64_t T_ = p.T;
  const int64_t nqb = (T_ + BM - 1) / BM;
  const int64_t bh = blockIdx.x / nqb;
  const int64_t qb = blockIdx.x - bh * nqb;
  const int64_t b = bh / p.H;
  const int64_t h = bh - b * p.H;
  const int64_t i0 = qb * BM;
  const int64_t i1 = i0 + BM < T_ ? i0 + BM : T_;

  const T* __restrict__ q = static_cast<const T*>(p.q) + bh * T_ * p.Dk;
  const T* __restrict__ k = static_cast<const T*>(p.k) + bh * T_ * p.Dk;
  const T* __restrict__ v = static_cast<const T*>(p.v) + bh * T_ * p.Dv;
  const T* __restrict__ Pb = static_cast<const T*>(p.P) + (b * p.Hp + (p.Hp == 1 ? 0 : h)) * T_ * p.R;
  const bool* __restrict__ mask = p.mask ? p.mask + b * T_ : nullptr;
  T* __restrict__ out = static_cast<T*>(p.out) + bh * T_ * p.Dv;
  A* __restrict__ lse = static_cast<A*>(p.lse) + bh * T_;
  const A scale = static_cast<A>(p.scale);

  const hdaf::Band band = hdaf::make_band(T_, p.window_left, p.window_right);
  const int64_t kbeg = hdaf::band_key_begin(i0, band);
  const int64_t kend = hdaf::band_key_end(i1, T_, band);

  load_rows<T, NT>(Qs, lay.ldk, lay.dkp, q, p.Dk, i0, BM, T_);
  for (int idx = tid; idx < BM * lay.dvp; idx += NT) {
    const int r = idx / lay.dvp;
    Of[r * lay.ldo + (idx - r * lay.dvp)] = A(0);
  }
  for (int r = tid; r < BM; r += NT) {
    const hdaf::SoftmaxState<A> st = hdaf::softmax_init<A>();
    row_m[r] = st.m;
    row_l[r] = st.l;
  }

  // Key tiles of the band only: [kbeg, kend) is the union over the block's rows.
  for (int64_t j0 = kbeg; j0 < kend; j0 += BN) {
    load_rows<T, NT>(Ks, lay.ldk, lay.dkp, k, p.Dk, j0, BN, kend);
    load_rows<T, NT>(Vs, lay.ldv, lay.dvp, v, p.Dv, j0, BN, kend);
    int usable = 0;
    for (int c = tid; c < BN; c += NT) {
      const int64_t j = j0 + c;
      const bool u = j < kend && !(mask != nullptr && mask[j]);
      kmask[c] = u;
      usable |= u;
    }
    // Barrier (also for the loads above); a tile of padding keys only is skipped.
    if (!__syncthreads_or(usable)) continue;

    block_mma<T, false, true, false, NT>(Sf, lay.lds, Qs, lay.ldk, Ks, lay.ldk, BM, BN, lay.dkp);
    __syncthreads();

    // Online softmax, one warp per row.
    for (int r = warp; r < BM; r += kWarps) {
      const int64_t i = i0 + r;
      A s[kPerLane];
      bool vis[kPerLane];
      A bmax = neg_inf<A>();
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) {
        const int c = lane + 32 * u;
        const int64_t j = j0 + c;
        vis[u] = c < BN && i < T_ && kmask[c] && hdaf::in_band(i, j, band);
        s[u] = A(0);
        if (vis[u]) {
          s[u] = delta_logit<T>(Sf[r * lay.lds + c], Pb, i, j, p.R, p.L, p.U, scale);
          bmax = fmax(bmax, s[u]);
        }
      }
      bmax = warp_max(bmax);
      hdaf::SoftmaxState<A> st;
      st.m = row_m[r];
      st.l = row_l[r];
      const A alpha = hdaf::softmax_rescale(st, bmax);
      A sum = A(0);
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) {
        const int c = lane + 32 * u;
        const A pv = vis[u] ? acc_exp(s[u] - st.m) : A(0);
        if (c < BN) Ps[r * lay.ldp + c] = from_acc<T>(pv);
        sum += pv;
      }
      sum = warp_sum(sum);
      st.l += sum;
      __syncwarp();
      if (lane == 0) {
        row_m[r] = st.m;
        row_l[r] = st.l;
        row_alpha[r] = alpha;
      }
    }
    __syncthreads();
    for (int idx = tid; idx < BM * lay.dvp; idx += NT) {
      const int r = idx / lay.dvp;
      Of[r * lay.ldo + (idx - r * lay.dvp)] *= row_alpha[r];
    }
    __syncthreads();
    block_mma<T, false, false, true, NT>(Of, lay.ldo, Ps, lay.ldp, Vs, lay.ldv, BM, lay.dvp, BN);
    __syncthreads();
  }
  __syncthreads();

  for (int idx = tid; idx < BM * lay.dvp; idx += NT) {
    const int r = idx / lay.dvp;
    const int d = idx - r * lay.dvp;
    const int64_t i = i0 + r;
    if (i < T_ && d < p.Dv) {
      hdaf::SoftmaxState<A> st;
      st.m = row_m[r];
      st.l = row_l[r];
      out[i * p.Dv + d] = from_acc<T>(Of[r * lay.ldo + d] * hdaf::softmax_inv_sum(st));
    }
  }
  for (int r = tid; r < BM; r += NT) {
    const int64_t i = i0 + r;
    if (i < T_) {
      hdaf::SoftmaxState<A> st;
      st.m = row_m[r];
      st.l = row_l[r];
      lse[i] = hdaf::softmax_lse(st);
    }
  }
}

template <typename T, bool kSmall>
size_t fwd_smem_bytes_cfg(int64_t Dk, int64_t Dv) {
  using C = FwdCfg<T, kSmall>;
  return FwdLayout<T, C::BM, C::BN>(Dk, Dv).bytes;
}

// Whether the large tiles fit in max_smem bytes; otherwise the small ones are used.
template <typename T>
bool fwd_use_large(int64_t Dk, int64_t Dv, int max_smem) {
  return fwd_smem_bytes_cfg<T, false>(Dk, Dv) <= static_cast<size_t>(max_smem);
}

template <typename T>
size_t fwd_smem_bytes(int64_t Dk, int64_t Dv, int max_smem) {
  return fwd_use_large<T>(Dk, Dv, max_smem) ? fwd_smem_bytes_cfg<T, false>(Dk, Dv)
                                           : fwd_smem_bytes_cfg<T, true>(Dk, Dv);
}

template <typename T, bool kSmall>
cudaError_t fwd_launch_cfg(const FwdParams& p, cudaStream_t stream) {
  using C = FwdCfg<T, kSmall>;
  const int64_t nqb = (p.T + C::BM - 1) / C::BM;
  const int64_t grid = nqb * p.B * p.H;
  if (grid == 0) return cudaSuccess;
  const size_t bytes = fwd_smem_bytes_cfg<T, kSmall>(p.Dk, p.Dv);
  auto kernel = delta_fwd_kernel<T, C::BM, C::BN, C::NT>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  HDAF_LAUNCH(kernel, static_cast<unsigned int>(grid), C::NT, bytes, stream, p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd_launch(const FwdParams& p, int max_smem, cudaStream_t stream) {
  return fwd_use_large<T>(p.Dk, p.Dv, max_smem) ? fwd_launch_cfg<T, false>(p, stream)
                                               : fwd_launch_cfg<T, true>(p, stream);
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

template <typename T, bool kSmall = false>
struct BwdCfg {  // __half, __nv_bfloat16
  static constexpr int BM = kSmall ? 16 : 32, BN = kSmall ? 32 : 64, NT = 128;
};
template <bool kSmall>
struct BwdCfg<float, kSmall> {
  static constexpr int BM = kSmall ? 16 : 32, BN = kSmall ? 16 : 32, NT = 128;
};
template <bool kSmall>
struct BwdCfg<double, kSmall> {  // float64 at head dim 128 needs ~110 KB either way
  static constexpr int BM = 16, BN = 16, NT = 128;
};

// D_i = dout_i . out_i, one warp per row.
template <typename T>
__global__ void delta_bwd_dot_kernel(const T* __restrict__ dout, const T* __restrict__ out,
                                     acc_type<T>* __restrict__ D, int64_t rows, int64_t Dv) {
  using A = acc_type<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  A s = A(0);
  for (int64_t d = lane; d < Dv; d += 32) {
    s = fma(to_acc(dout[row * Dv + d]), to_acc(out[row * Dv + d]), s);
  }
  s = warp_sum(s);
  if (lane == 0) D[row] = s;
}

// Shared-memory plan of the two backward kernels. The dkdv kernel holds a BN-row key
// block (K, V, dK, dV) and walks BM-row query tiles (Q, dO, lse, D); the dq kernel
// holds a BM-row query block (Q, dO, dQ) and walks BN-row key tiles (K, V).
template <typename T, int BM, int BN, bool DKDV>
struct BwdLayout {
  int dkp, dvp, ldk, ldv, lds, ldp, ldka, ldva;
  size_t q, dout, k, v, acc_k, acc_v, s, dp, p, ds, lse, dd, kmask, bytes;
  __host__ __device__ BwdLayout(int64_t Dk, int64_t Dv) {
    using A = acc_type<T>;
    dkp = round16(Dk);
    dvp = round16(Dv);
    ldk = dkp + operand_pad<T>();
    ldv = dvp + operand_pad<T>();
    lds = BN + kAccPad;
    ldp = BN + operand_pad<T>();
    ldka = dkp + kAccPad;
    ldva = dvp + kAccPad;
    Carve c;
    q = c.take(sizeof(T) * BM * ldk);
    dout = c.take(sizeof(T) * BM * ldv);
    k = c.take(sizeof(T) * BN * ldk);
    v = c.take(sizeof(T) * BN * ldv);
    // dkdv: dK [BN x dkp] and dV [BN x dvp]; dq: dQ [BM x dkp] (acc_v unused).
    acc_k = c.take(sizeof(A) * (DKDV ? BN : BM) * ldka);
    acc_v = c.take(DKDV ? sizeof(A) * BN * ldva : 0);
    s = c.take(sizeof(A) * BM * lds);
    dp = c.take(sizeof(A) * BM * lds);
    p = c.take(DKDV ? sizeof(T) * BM * ldp : 0);
    ds = c.take(sizeof(T) * BM * ldp);
    lse = c.take(sizeof(A) * BM);
    dd = c.take(sizeof(A) * BM);
    kmask = c.take(BN);
    bytes = c.off;
  }
};

// For the BM x BN tile at query rows i0.., key columns j0..: from S (= q.k, in Sf) and
// dPv (= dout.v, in dPf) form p_ij and dS_ij = p_ij (dPv_ij - D_i). Writes p (as T, when
// Ps is non-null) and dS (as T) for the tile matmuls, and dS (acc_type) over Sf in place.
template <typename T, int BM, int BN, int NT>
__device__ __forceinline__ void tile_ds(const BwdParams& p, const T* __restrict__ Pb,
                                        const hdaf::Band band, int64_t i0, int64_t j0,
                                        acc_type<T>* Sf, const acc_type<T>* dPf, int lds, T* Ps,
                                        T* dSs, int ldp, const acc_type<T>* lse_s,
                                        const acc_type<T>* dd_s, const unsigned char* kmask) {
  using A = acc_type<T>;
  const A scale = static_cast<A>(p.scale);
  for (int idx = threadIdx.x; idx < BM * BN; idx += NT) {
    const int r = idx / BN;
    const int c = idx - r * BN;
    const int64_t i = i0 + r;
    const int64_t j = j0 + c;
    const A l = lse_s[r];
    A pv = A(0);
    A ds = A(0);
    if (kmask[c] && i < p.T && l != neg_inf<A>() && hdaf::in_band(i, j, band)) {
      const A s = delta_logit<T>(Sf[r * lds + c], Pb, i, j, p.R, p.L, p.U, scale);
      pv = acc_exp(s - l);
      ds = pv * (dPf[r * lds + c] - dd_s[r]);
    }
    if (Ps != nullptr) Ps[r * ldp + c] = from_acc<T>(pv);
    dSs[r * ldp + c] = from_acc<T>(ds);
    Sf[r * lds + c] = ds;
  }
}

// Loads the query-side rows [i0, i0+BM) of one tile: Q, dO, lse (-inf past row_end), D.
template <typename T, int BM, int NT, typename Layout>
__device__ __forceinline__ void load_query_side(const Layout& lay, T* Qs, T* dOs, acc_type<T>* lse_s,
                                                acc_type<T>* dd_s, const T* q, const T* dout,
                                                const acc_type<T>* lse, const acc_type<T>* D,
                                                int64_t Dk, int64_t Dv, int64_t i0, int64_t row_end) {
  load_rows<T, NT>(Qs, lay.ldk, lay.dkp, q, Dk, i0, BM, row_end);
  load_rows<T, NT>(dOs, lay.ldv, lay.dvp, dout, Dv, i0, BM, row_end);
  for (int r = threadIdx.x; r < BM; r += NT) {
    const int64_t i = i0 + r;
    lse_s[r] = i < row_end ? lse[i] : neg_inf<acc_type<T>>();
    dd_s[r] = i < row_end ? D[i] : acc_type<T>(0);
  }
}

// Kernel 2: one CTA per BN-row key block: dK, dV and dP_heads[j, :] += scale dS[:, j].
template <typename T, int BM, int BN, int NT>
__global__ void __launch_bounds__(NT) delta_bwd_dkdv_kernel(const BwdParams p) {
  using A = acc_type<T>;
  static_assert(BM % 16 == 0 && BN % 16 == 0 && NT % 32 == 0 && BN <= NT, "tile shape");
  extern __shared__ __align__(128) unsigned char smem[];
  const BwdLayout<T, BM, BN, true> lay(p.Dk, p.Dv);
  T* Qs = reinterpret_cast<T*>(smem + lay.q);
  T* dOs = reinterpret_cast<T*>(smem + lay.dout);
  T* Ks = reinterpret_cast<T*>(smem + lay.k);
  T* Vs = reinterpret_cast<T*>(smem + lay.v);
  A* dKf = reinterpret_cast<A*>(smem + lay.acc_k);
  A* dVf = reinterpret_cast<A*>(smem + lay.acc_v);
  A* Sf = reinterpret_cast<A*>(smem + lay.s);
  A* dPf = reinterpret_cast<A*>(smem + lay.dp);
  T* Ps = reinterpret_cast<T*>(smem + lay.p);
  T* dSs = reinterpret_cast<T*>(smem + lay.ds);
  A* lse_s = reinterpret_cast<A*>(smem + lay.lse);
  A* dd_s = reinterpret_cast<A*>(smem + lay.dd);
  unsigned char* kmask = smem + lay.kmask;

  const int tid = threadIdx.x;
  const int64_t T_ = p.T;
  const int64_t nkb = (T_ + BN - 1) / BN;
  const int64_t bh = blockIdx.x / nkb;
  const int64_t kb = blockIdx.x - bh * nkb;
  const int64_t b = bh / p.H;
  const int64_t h = bh - b * p.H;
  const int64_t j0 = kb * BN;
  const int64_t j1 = j0 + BN < T_ ? j0 + BN : T_;

  const T* __restrict__ q = static_cast<const T*>(p.q) + bh * T_ * p.Dk;
  const T* __restrict__ k = static_cast<const T*>(p.k) + bh * T_ * p.Dk;
  const T* __restrict__ v = static_cast<const T*>(p.v) + bh * T_ * p.Dv;
  const T* __restrict__ dout = static_cast<const T*>(p.grad_out) + bh * T_ * p.Dv;
  const T* __restrict__ Pb = static_cast<const T*>(p.P) + (b * p.Hp + (p.Hp == 1 ? 0 : h)) * T_ * p.R;
  const bool* __restrict__ mask = p.mask ? p.mask + b * T_ : nullptr;
  const A* __restrict__ lse = static_cast<const A*>(p.lse) + bh * T_;
  const A* __restrict__ D = static_cast<const A*>(p.D) + bh * T_;
  T* __restrict__ dk = static_cast<T*>(p.grad_k) + bh * T_ * p.Dk;
  T* __restrict__ dv = static_cast<T*>(p.grad_v) + bh * T_ * p.Dv;
  A* __restrict__ dPh = static_cast<A*>(p.dP_heads) + bh * T_ * p.R;
  const A scale = static_cast<A>(p.scale);
  const int64_t R = p.R;

  const hdaf::Band band = hdaf::make_band(T_, p.window_left, p.window_right);
  const int64_t qbeg = hdaf::band_query_begin(j0, band);
  const int64_t qend = hdaf::band_query_end(j1, T_, band);

  load_rows<T, NT>(Ks, lay.ldk, lay.dkp, k, p.Dk, j0, BN, T_);
  load_rows<T, NT>(Vs, lay.ldv, lay.dvp, v, p.Dv, j0, BN, T_);
  for (int idx = tid; idx < BN * lay.dkp; idx += NT) {
    const int r = idx / lay.dkp;
    dKf[r * lay.ldka + (idx - r * lay.dkp)] = A(0);
  }
  for (int idx = tid; idx < BN * lay.dvp; idx += NT) {
    const int r = idx / lay.dvp;
    dVf[r * lay.ldva + (idx - r * lay.dvp)] = A(0);
  }
  int usable = 0;
  for (int c = tid; c < BN; c += NT) {
    const int64_t j = j0 + c;
    const bool u = j < T_ && !(mask != nullptr && mask[j]);
    kmask[c] = u;
    usable |= u;
  }
  // Edge buckets 0 and R-1 collect many (i, j) pairs of a key row: thread c sums them
  // in registers, in query order. Interior buckets get exactly one pair per key row.
  A acc_first = A(0);
  A acc_last = A(0);
  const bool any_key = __syncthreads_or(usable);  // all padding: nothing to do

  for (int64_t i0 = qbeg; any_key && i0 < qend; i0 += BM) {
    load_query_side<T, BM, NT>(lay, Qs, dOs, lse_s, dd_s, q, dout, lse, D, p.Dk, p.Dv, i0, qend);
    __syncthreads();
    block_mma<T, false, true, false, NT>(Sf, lay.lds, Qs, lay.ldk, Ks, lay.ldk, BM, BN, lay.dkp);
    block_mma<T, false, true, false, NT>(dPf, lay.lds, dOs, lay.ldv, Vs, lay.ldv, BM, BN, lay.dvp);
    __syncthreads();
    tile_ds<T, BM, BN, NT>(p, Pb, band, i0, j0, Sf, dPf, lay.lds, Ps, dSs, lay.ldp, lse_s, dd_s,
                           kmask);
    __syncthreads();
    // dV += P^T dO ; dK += dS^T Q (scale applied at the end)
    block_mma<T, true, false, true, NT>(dVf, lay.ldva, Ps, lay.ldp, dOs, lay.ldv, BN, lay.dvp, BM);
    block_mma<T, true, false, true, NT>(dKf, lay.ldka, dSs, lay.ldp, Qs, lay.ldk, BN, lay.dkp, BM);
    if (tid < BN && j0 + tid < T_) {
      const int64_t j = j0 + tid;
      for (int r = 0; r < BM; ++r) {
        const A ds = Sf[r * lay.lds + tid];
        if (ds != A(0)) {
          const int64_t rr = hdaf::bucket(i0 + r, j, p.L, p.U);
          if (rr == 0) {
            acc_first += ds;
          } else if (rr == R - 1) {
            acc_last += ds;
          } else {
            dPh[j * R + rr] = scale * ds;  // the only write of this element in this kernel
          }
        }
      }
    }
    __syncthreads();
  }

  for (int idx = tid; idx < BN * lay.dkp; idx += NT) {
    const int r = idx / lay.dkp;
    const int d = idx - r * lay.dkp;
    if (j0 + r < T_ && d < p.Dk) dk[(j0 + r) * p.Dk + d] = from_acc<T>(scale * dKf[r * lay.ldka + d]);
  }
  for (int idx = tid; idx < BN * lay.dvp; idx += NT) {
    const int r = idx / lay.dvp;
    const int d = idx - r * lay.dvp;
    if (j0 + r < T_ && d < p.Dv) dv[(j0 + r) * p.Dv + d] = from_acc<T>(dVf[r * lay.ldva + d]);
  }
  if (tid < BN && j0 + tid < T_) {
    const int64_t j = j0 + tid;
    dPh[j * R] = scale * acc_first;
    if (R > 1) dPh[j * R + R - 1] = scale * acc_last;
  }
}

// Kernel 3: one CTA per BM-row query block: dQ and dP_heads[i, :] -= scale dS[i, :].
template <typename T, int BM, int BN, int NT>
__global__ void __launch_bounds__(NT) delta_bwd_dq_kernel(const BwdParams p) {
  using A = acc_type<T>;
  static_assert(BM % 16 == 0 && BN % 16 == 0 && NT % 32 == 0 && BM <= NT, "tile shape");
  extern __shared__ __align__(128) unsigned char smem[];
  const BwdLayout<T, BM, BN, false> lay(p.Dk, p.Dv);
  T* Qs = reinterpret_cast<T*>(smem + lay.q);
  T* dOs = reinterpret_cast<T*>(smem + lay.dout);
  T* Ks = reinterpret_cast<T*>(smem + lay.k);
  T* Vs = reinterpret_cast<T*>(smem + lay.v);
  A* dQf = reinterpret_cast<A*>(smem + lay.acc_k);
  A* Sf = reinterpret_cast<A*>(smem + lay.s);
  A* dPf = reinterpret_cast<A*>(smem + lay.dp);
  T* dSs = reinterpret_cast<T*>(smem + lay.ds);
  A* lse_s = reinterpret_cast<A*>(smem + lay.lse);
  A* dd_s = reinterpret_cast<A*>(smem + lay.dd);
  unsigned char* kmask = smem + lay.kmask;

  const int tid = threadIdx.x;
  const int64_t T_ = p.T;
  const int64_t nqb = (T_ + BM - 1) / BM;
  const int64_t bh = blockIdx.x / nqb;
  const int64_t qb = blockIdx.x - bh * nqb;
  const int64_t b = bh / p.H;
  const int64_t h = bh - b * p.H;
  const int64_t i0 = qb * BM;
  const int64_t i1 = i0 + BM < T_ ? i0 + BM : T_;

  const T* __restrict__ q = static_cast<const T*>(p.q) + bh * T_ * p.Dk;
  const T* __restrict__ k = static_cast<const T*>(p.k) + bh * T_ * p.Dk;
  const T* __restrict__ v = static_cast<const T*>(p.v) + bh * T_ * p.Dv;
  const T* __restrict__ dout = static_cast<const T*>(p.grad_out) + bh * T_ * p.Dv;
  const T* __restrict__ Pb = static_cast<const T*>(p.P) + (b * p.Hp + (p.Hp == 1 ? 0 : h)) * T_ * p.R;
  const bool* __restrict__ mask = p.mask ? p.mask + b * T_ : nullptr;
  const A* __restrict__ lse = static_cast<const A*>(p.lse) + bh * T_;
  const A* __restrict__ D = static_cast<const A*>(p.D) + bh * T_;
  T* __restrict__ dq = static_cast<T*>(p.grad_q) + bh * T_ * p.Dk;
  A* __restrict__ dPh = static_cast<A*>(p.dP_heads) + bh * T_ * p.R;
  const A scale = static_cast<A>(p.scale);
  const int64_t R = p.R;

  const hdaf::Band band = hdaf::make_band(T_, p.window_left, p.window_right);
  const int64_t kbeg = hdaf::band_key_begin(i0, band);
  const int64_t kend = hdaf::band_key_end(i1, T_, band);

  load_query_side<T, BM, NT>(lay, Qs, dOs, lse_s, dd_s, q, dout, lse, D, p.Dk, p.Dv, i0, T_);
  for (int idx = tid; idx < BM * lay.dkp; idx += NT) {
    const int r = idx / lay.dkp;
    dQf[r * lay.ldka + (idx - r * lay.dkp)] = A(0);
  }
  int live = 0;
  for (int r = tid; r < BM; r += NT) live |= i0 + r < T_ && lse[i0 + r] != neg_inf<A>();
  A acc_first = A(0);
  A acc_last = A(0);
  const bool any_row = __syncthreads_or(live);  // every row fully masked: gradients are 0

  for (int64_t j0 = kbeg; any_row && j0 < kend; j0 += BN) {
    load_rows<T, NT>(Ks, lay.ldk, lay.dkp, k, p.Dk, j0, BN, kend);
    load_rows<T, NT>(Vs, lay.ldv, lay.dvp, v, p.Dv, j0, BN, kend);
    int usable = 0;
    for (int c = tid; c < BN; c += NT) {
      const int64_t j = j0 + c;
      const bool u = j < kend && !(mask != nullptr && mask[j]);
      kmask[c] = u;
      usable |= u;
    }
    if (!__syncthreads_or(usable)) continue;  // a tile of padding keys only
    block_mma<T, false, true, false, NT>(Sf, lay.lds, Qs, lay.ldk, Ks, lay.ldk, BM, BN, lay.dkp);
    block_mma<T, false, true, false, NT>(dPf, lay.lds, dOs, lay.ldv, Vs, lay.ldv, BM, BN, lay.dvp);
    __syncthreads();
    tile_ds<T, BM, BN, NT>(p, Pb, band, i0, j0, Sf, dPf, lay.lds, static_cast<T*>(nullptr), dSs,
                           lay.ldp, lse_s, dd_s, kmask);
    __syncthreads();
    // dQ += dS K (scale applied at the end)
    block_mma<T, false, false, true, NT>(dQf, lay.ldka, dSs, lay.ldp, Ks, lay.ldk, BM, lay.dkp, BN);
    if (tid < BM && i0 + tid < T_) {
      const int64_t i = i0 + tid;
      for (int c = 0; c < BN; ++c) {
        const A ds = Sf[tid * lay.lds + c];
        if (ds != A(0)) {
          const int64_t rr = hdaf::bucket(i, j0 + c, p.L, p.U);
          if (rr == 0) {
            acc_first += ds;
          } else if (rr == R - 1) {
            acc_last += ds;
          } else {
            dPh[i * R + rr] -= scale * ds;  // the only update of this element in this kernel
          }
        }
      }
    }
    __syncthreads();
  }

  for (int idx = tid; idx < BM * lay.dkp; idx += NT) {
    const int r = idx / lay.dkp;
    const int d = idx - r * lay.dkp;
    if (i0 + r < T_ && d < p.Dk) dq[(i0 + r) * p.Dk + d] = from_acc<T>(scale * dQf[r * lay.ldka + d]);
  }
  if (tid < BM && i0 + tid < T_) {
    const int64_t i = i0 + tid;
    dPh[i * R] -= scale * acc_first;
    if (R > 1) dPh[i * R + R - 1] -= scale * acc_last;
  }
}

template <typename T, bool kSmall>
size_t bwd_smem_bytes_cfg(int64_t Dk, int64_t Dv) {
  using C = BwdCfg<T, kSmall>;
  const size_t a = BwdLayout<T, C::BM, C::BN, true>(Dk, Dv).bytes;
  const size_t b = BwdLayout<T, C::BM, C::BN, false>(Dk, Dv).bytes;
  return a > b ? a : b;
}

template <typename T>
bool bwd_use_large(int64_t Dk, int64_t Dv, int max_smem) {
  return bwd_smem_bytes_cfg<T, false>(Dk, Dv) <= static_cast<size_t>(max_smem);
}

template <typename T>
size_t bwd_smem_bytes(int64_t Dk, int64_t Dv, int max_smem) {
  return bwd_use_large<T>(Dk, Dv, max_smem) ? bwd_smem_bytes_cfg<T, false>(Dk, Dv)
                                           : bwd_smem_bytes_cfg<T, true>(Dk, Dv);
}

template <typename T, bool kSmall>
cudaError_t bwd_launch_cfg(const BwdParams& p, cudaStream_t stream) {
  using C = BwdCfg<T, kSmall>;
  const int64_t rows = p.B * p.H * p.T;
  if (rows == 0) return cudaSuccess;
  {
    constexpr int kThreads = 256;
    constexpr int kRowsPerBlock = kThreads / 32;
    const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
    HDAF_LAUNCH(delta_bwd_dot_kernel<T>, static_cast<unsigned int>(blocks), kThreads, 0, stream,
        static_cast<const T*>(p.grad_out), static_cast<const T*>(p.out),
        static_cast<acc_type<T>*>(p.D), rows, p.Dv);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  {
    const size_t bytes = BwdLayout<T, C::BM, C::BN, true>(p.Dk, p.Dv).bytes;
    auto kernel = delta_bwd_dkdv_kernel<T, C::BM, C::BN, C::NT>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(bytes));
    if (err != cudaSuccess) return err;
    const int64_t grid = (p.T + C::BN - 1) / C::BN * p.B * p.H;
    HDAF_LAUNCH(kernel, static_cast<unsigned int>(grid), C::NT, bytes, stream, p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  {
    const size_t bytes = BwdLayout<T, C::BM, C::BN, false>(p.Dk, p.Dv).bytes;
    auto kernel = delta_bwd_dq_kernel<T, C::BM, C::BN, C::NT>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(bytes));
    if (err != cudaSuccess) return err;
    const int64_t grid = (p.T + C::BM - 1) / C::BM * p.B * p.H;
    HDAF_LAUNCH(kernel, static_cast<unsigned int>(grid), C::NT, bytes, stream, p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t bwd_launch(const BwdParams& p, int max_smem, cudaStream_t stream) {
  if constexpr (std::is_same<T, double>::value) {
    return bwd_launch_cfg<T, false>(p, stream);  // one configuration for float64
  } else {
    return bwd_use_large<T>(p.Dk, p.Dv, max_smem) ? bwd_launch_cfg<T, false>(p, stream)
                                                 : bwd_launch_cfg<T, true>(p, stream);
  }
}

}  // namespace detail

// Explicit specialisations of the launchers for one dtype (used by fwd_*.cu / bwd_*.cu).
#define HDAF_CUDA_DEFINE_FWD(T)                                                      \
  template <>                                                                        \
  size_t delta_fwd_smem_bytes<T>(int64_t Dk, int64_t Dv, int max_smem) {             \
    return detail::fwd_smem_bytes<T>(Dk, Dv, max_smem);                              \
  }                                                                                  \
  template <>                                                                        \
  cudaError_t delta_fwd_launch<T>(const FwdParams& p, int max_smem, cudaStream_t stream) { \
    return detail::fwd_launch<T>(p, max_smem, stream);                               \
  }

#define HDAF_CUDA_DEFINE_BWD(T)                                                      \
  template <>                                                                        \
  size_t delta_bwd_smem_bytes<T>(int64_t Dk, int64_t Dv, int max_smem) {             \
    return detail::bwd_smem_bytes<T>(Dk, Dv, max_smem);                              \
  }                                                                                  \
  template <>                                                                        \
  cudaError_t delta_bwd_launch<T>(const BwdParams& p, int max_smem, cudaStream_t stream) { \
    return detail::bwd_launch<T>(p, max_smem, stream);                               \
  }

}  // namespace cuda
}  // namespace hdaf
