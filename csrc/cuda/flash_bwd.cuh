// Backward kernels of hdaf::delta_attention on CuTe (CUTLASS 4.x), FlashAttention-2 style, sm_80+.
// Spec: docs/delta_attention.md ("Backward", "Packed batches", "How the kernels compute it").
// Included by the instantiation units bwd_*.cu, which the host emulation
// (csrc/cuda/host_emulation/bwd_emulation.cpp) also compiles for the CPU with HDAF_CUTE_EMULATION
// defined (the SM80 operations through kcommon's `sm80` alias). Depends only on kernel_common.cuh,
// tile_split.h and delta_attention_cuda.h (BwdParams, SeqInfo).
//
// Every CTA works on one sequence b (SeqInfo: padded or packed by cu_seqlens): query i stands at
// key position off + i (off = Tk - Tq), which every bucket, window and causal relation and the
// query's own P row use. Grids are sized by the longest sequence (p.Tq, p.Tk); CTAs past their
// sequence's end return at once.
//
// Three launches, no atomics (every output element has one writer; deterministic):
//   dot     D_i = dout_i . out_i, one warp per row.
//   dQ      one CTA per (query block, b, query head h), warps stacked along the query rows; reads
//           key/value head kv_head(h) and walks the key tiles the forward walks: S = Q K^T,
//           dPv = dO V^T, p = exp2(S' - lse2), dS = p (dPv - D), dQ += dS K. Q and dO stay in
//           smem; K and V in two smem stages (tile n+1 loads with cp.async under tile n).
//   dK/dV   one CTA per (key block, b, key/value head hk), in the transposed orientation
//           (S^T = K Q^T: the keys are the MMA's M, warps stacked along them, a key's row lives
//           in one quad). It loops over the group's query heads hk*G .. hk*G+G-1 and their query
//           tiles (one pipeline across heads), adding dV += p^T dO and dK += dS^T Q in registers,
//           and stores dK, dV once. K and V stay in smem; Q, dO and the query vectors in two
//           stages.
//   tiles   each walk runs its tiles in segments (cute_tiles::TileSchedule): first the tiles that
//           compare positions (crossing a window / causal edge, and the band run when a key
//           padding mask or the sequence end lies inside it), then one unmasked run per tile kind,
//           each a loop compiled for that kind. A far tile (every pair in bucket 0, or every pair
//           in R-1) needs no gather: its logit is scale*log2(e)*(q.k + P[j,e]) - (lse2_i +
//           scale*log2(e)*P[t_i,e]), one FFMA with the key term (-inf at padding keys and past
//           the end, so far tiles need no mask for either) and one FADD with the query term
//           (+inf for a row that sees no key). Band and masked tiles gather their bias
//           c (P[j, r] - P[t_i, r]) per pair into shared memory first (the whole CTA, -inf at
//           hidden pairs), then read it where far tiles read their key terms.
//   host    mask rows contiguous ([B, Tk]); dout with out's strides; rows 16-byte aligned
//           (cp.async); a sequence's rows of P and of the dP halves addressable with 32-bit
//           offsets (the launcher checks Tk * row stride < 2^31).
//   dP      dP_keys[j, r(i,j)] += scale dS_ij (dK/dV pass) and dP_rows[t_i, r(i,j)] -= scale dS_ij
//           (dQ pass), float32, per query head. A row's edge buckets 0 and R-1 are sums (far
//           tiles: whole rows of dS; other tiles: the clipped pairs) kept in registers,
//           quad-reduced and stored once per row and head. Every middle bucket 0 < r < R-1 of a
//           row is one offset j - t_i, i.e. one pair, visited once: a plain store.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cute/tensor.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include <cstdint>
#include <type_traits>

#include "delta_attention_cuda.h"
#include "hdaf/delta_common.h"
#include "kernel_common.cuh"
#include "tile_split.h"

namespace hdaf {
namespace cuda {
namespace cute_bwd {

using namespace cute;
using namespace kcommon;
using cute_tiles::imax;
using cute_tiles::imin;

constexpr float kLog2e = 1.4426950408889634f;

// The tile bodies are lambdas called once each; inlined, so that the accumulators they update
// stay in registers.
#define HDAF_BWD_INLINE __attribute__((always_inline))

template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_>
struct BwdTraits : TileTraits<Element_, kHeadDim_, kNWarps_> {
  using Base = TileTraits<Element_, kHeadDim_, kNWarps_>;
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // query rows of a tile
  static constexpr int kBlockN = kBlockN_;  // key rows of a tile
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = 32 * kNWarps;
  static_assert(kBlockM % (16 * kNWarps) == 0, "dQ: each warp owns whole 16-row MMA tiles");
  static_assert(kBlockN % (16 * kNWarps) == 0, "dK/dV: each warp owns whole 16-row MMA tiles");

  using SmemLayoutM = typename Base::template SmemLayoutRows<kBlockM>;  // Q, dO tiles
  using SmemLayoutN = typename Base::template SmemLayoutRows<kBlockN>;  // K, V tiles
  // Transposed views (head dim, rows): the B operands of dV += p^T dO, dK += dS^T Q, dQ += dS K.
  using SmemLayoutMt = typename Base::template SmemLayoutRowsT<kBlockM>;
  using SmemLayoutMtNoSwizzle = typename Base::template SmemLayoutRowsTNoSwizzle<kBlockM>;
  using SmemLayoutNt = typename Base::template SmemLayoutRowsT<kBlockN>;
  using SmemLayoutNtNoSwizzle = typename Base::template SmemLayoutRowsTNoSwizzle<kBlockN>;

  static constexpr int kTileM = kBlockM * kHeadDim;  // elements of a Q / dO tile
  static constexpr int kTileN = kBlockN * kHeadDim;  // elements of a K / V tile
  // Row strides (floats) of the band tiles' bias in smem, [query][key] (dQ) and [key][query]
  // (dK/dV): padded by 4 so that a quad's 8-byte reads of one row hit different banks.
  static constexpr int kBiasLd = kBlockN + 4;
  static constexpr int kBiasLdT = kBlockM + 4;
  // dQ: Q, dO; two stages of K, V, of the far-tile key terms (float2 per key) and of the bias.
  static constexpr int kSmemDq = (2 * kTileM + 4 * kTileN) * int(sizeof(Element)) +
                                 2 * (2 * kBlockN + kBlockM * kBiasLd) * int(sizeof(float));
  // dK/dV: K, V; two stages of Q, dO, of the query vectors (float4 per query) and of the bias;
  // the far-tile key terms of the current head (float2 per key).
  static constexpr int kSmemDkDv =
      (2 * kTileN + 4 * kTileM) * int(sizeof(Element)) +
      (2 * (4 * kBlockM + kBlockN * kBiasLdT) + 2 * kBlockN) * int(sizeof(float));
  static constexpr int kSmemBytes = kSmemDq > kSmemDkDv ? kSmemDq : kSmemDkDv;
};

// acc += A B^T with both operands read from smem by ldmatrix, each k-slice right before the MMAs
// that consume it: one slice of fragments live at a time (the backward's accumulators leave no
// registers for a second), its latency hidden by the other warps.
template <class Mma, class Acc, class FragA, class FragB, class SmemA, class SmemB, class CopyA,
          class ThrA, class CopyB, class ThrB>
__device__ __forceinline__ void gemm_smem(Mma const& mma, Acc& acc, FragA& tCrA, FragB& tCrB,
                                          SmemA const& tCsA, SmemB const& tCsB, CopyA const& copy_a,
                                          ThrA const& thr_a, CopyB const& copy_b, ThrB const& thr_b) {
  Tensor tCrA_view = thr_a.retile_D(tCrA);
  Tensor tCrB_view = thr_b.retile_D(tCrB);
  CUTE_UNROLL
  for (int k = 0; k < size<2>(tCrA); ++k) {
    copy(copy_a, tCsA(_, _, k), tCrA_view(_, _, k));
    copy(copy_b, tCsB(_, _, k), tCrB_view(_, _, k));
    cute::gemm(mma, tCrA(_, _, k), tCrB(_, _, k), acc);
  }
}

// acc += A B^T with A in registers and B read from smem by ldmatrix, each k-slice right before
// its MMAs (as gemm_smem).
template <class Mma, class Acc, class FragA, class FragB, class SmemB, class CopyB, class ThrB>
__device__ __forceinline__ void gemm_rs(Mma const& mma, Acc& acc, FragA const& tCrA, FragB& tCrB,
                                        SmemB const& tCsB, CopyB const& copy_b,
                                        ThrB const& thr_b) {
  Tensor tCrB_view = thr_b.retile_D(tCrB);
  CUTE_UNROLL
  for (int k = 0; k < size<2>(tCrA); ++k) {
    copy(copy_b, tCsB(_, _, k), tCrB_view(_, _, k));
    cute::gemm(mma, tCrA(_, _, k), tCrB(_, _, k), acc);
  }
}

// An fp32 accumulator tile (rows, head dim) times mul -> Element, staged through smem (16-byte
// stores to global), rows at or past rows_left skipped. The caller has synchronised: no warp
// still reads `smem`.
template <class Traits, class SmemLayout, class Acc, class G>
__device__ __forceinline__ void store_tile(Acc& acc, float mul, typename Traits::Element* smem,
                                           G&& g, int rows_left, int tid) {
  using Element = typename Traits::Element;
  CUTE_UNROLL
  for (int x = 0; x < size(acc); ++x) acc(x) *= mul;
  Tensor r = to_element<Element>(acc);
  Tensor s = make_tensor(make_smem_ptr(smem), SmemLayout{});
  typename Traits::TiledMma mma;
  auto copy_c = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, mma);
  auto thr_c = copy_c.get_thread_slice(tid);
  copy(copy_c, thr_c.retile_S(r), thr_c.partition_D(s));
  __syncthreads();
  typename Traits::GmemCopyO gcopy;
  auto gthr = gcopy.get_thread_slice(tid);
  Tensor tS = gthr.partition_S(s);
  Tensor tG = gthr.partition_D(g);
  Tensor tR = make_tensor<Element>(shape(tG));
  copy(gcopy, tS, tR);
  Tensor id = gthr.partition_D(make_identity_tensor(make_shape(size<0>(s), size<1>(s))));
  CUTE_UNROLL
  for (int m = 0; m < size<1>(tG); ++m) {
    if (get<0>(id(0, m, 0)) < rows_left) {
      CUTE_UNROLL
      for (int k = 0; k < size<2>(tG); ++k) copy(gcopy, tR(_, m, k), tG(_, m, k));
    }
  }
}

// What the tiles of one (sequence, query head) read besides the tiles themselves. Offsets inside
// one sequence's rows of P and dP are 32-bit (the launcher checks Tk * row stride < 2^31).
template <typename Element>
struct SeqArgs {
  const Element* P;  // the sequence's row 0 in P, this head's P head
  int P_row;         // P's row stride
  const bool* pad;   // the sequence's key padding mask [Tk], or nullptr
  int Tq, Tk, off, R, L, U, lo, hi;
  float c;  // scale * log2(e)

  __device__ __forceinline__ float p_at(int row, int r) const { return float(P[row * P_row + r]); }
  // Key j is padding or past the end.
  __device__ __forceinline__ bool key_out(int j) const {
    return j >= Tk || (pad != nullptr && pad[j]);
  }
  // The far-tile key term c * P[j, e], -inf for a key that is padding or past the end.
  __device__ __forceinline__ float key_term(int j, int e) const {
    return key_out(j) ? -INFINITY : c * p_at(j, e);
  }
  // P's row at key position t, clamped into the sequence (a row past the end has p = 0 through
  // its lse2 or the mask; its bias only has to be a readable value).
  __device__ __forceinline__ const Element* row(int t) const {
    return P + imin(t, Tk - 1) * P_row;
  }
  // r(d) = clamp(d, -L, U) + L, the bucket of offset d = j - t_i.
  __device__ __forceinline__ unsigned bucket(int d) const { return unsigned(min(max(d, -L), U) + L); }
};

// The bias P[j, r] - P[t_i, r] of a pair from the rows of P at j and t_i.
template <typename Element>
__device__ __forceinline__ float pair_bias(const Element* key_row, const Element* query_row,
                                           unsigned r) {
  return float(key_row[r]) - float(query_row[r]);
}

template <typename Element>
__device__ __forceinline__ SeqArgs<Element> seq_args(const BwdParams& p, const SeqInfo& seq, int b,
                                                     int h) {
  const Band band = make_band(seq.Tk, p.window_left, p.window_right);
  SeqArgs<Element> a;
  a.P = static_cast<const Element*>(p.P) + seq.k_offset(p.P_s, b, p_head(p, h));
  a.P_row = int(p.P_s.row);
  a.pad = p.mask != nullptr ? p.mask + int64_t(b) * p.Tk : nullptr;
  a.Tq = seq.Tq;
  a.Tk = seq.Tk;
  a.off = seq.off;
  a.R = p.R;
  a.L = p.L;
  a.U = p.U;
  a.lo = int(band.lo);
  a.hi = int(band.hi);
  a.c = p.scale * kLog2e;
  return a;
}

// lse in the log2 domain; +inf for a row that sees no key (lse = -inf) or past the end: p = 0.
__device__ __forceinline__ float lse2_of(const float* lse, int64_t row_stride, int i, int Tq) {
  const float l = i < Tq ? lse[int64_t(i) * row_stride] : -INFINITY;
  return l == -INFINITY ? INFINITY : l * kLog2e;
}

// A pair's share of the bucket sums of dS (tiles other than far ones): bucket r = 0 adds to the
// row's bucket-0 sum, r = R-1 to its bucket-(R-1) sum (with R = 1 every pair lands in the first,
// and the row's store adds both), and a middle bucket (one pair per row and bucket) is stored at
// once, as mul * dS, at dp_row[r] when `valid`.
__device__ __forceinline__ void pair_bucket(float v, unsigned r, unsigned R, float& edge_lo,
                                            float& edge_hi, float* dp_row, bool valid, float mul) {
  const bool lo = r == 0, hi = !lo && r == R - 1;
  edge_lo += lo ? v : 0.f;
  edge_hi += hi ? v : 0.f;
  if (!lo && !hi && valid) dp_row[r] = mul * v;
}

// The edge buckets of each row, quad-reduced, one lane per row storing dp[row + row_shift, 0] and
// dp[row + row_shift, R-1] = mul * sum for rows < n_rows. With R = 1 both are bucket 0, which
// takes both sums (far-high tiles, every pair j - t_i >= U = 0, added theirs to the high one).
template <class RC, int kRows>
__device__ __forceinline__ void store_edge_sums(RC const& rc, int row0, int n_rows, int row_shift,
                                                int R, int tid, float (&edge_lo)[kRows],
                                                float (&edge_hi)[kRows], float* dp, int dp_row,
                                                float mul) {
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const float lo = quad_sum(edge_lo[mi]);
    const float hi = quad_sum(edge_hi[mi]);
    const int row = row0 + get<0>(rc(mi, 0));
    if (tid % 4 == 0 && row < n_rows) {
      float* d = dp + (row + row_shift) * dp_row;
      if (R > 1) {
        d[0] = mul * lo;
        d[R - 1] = mul * hi;
      } else {
        d[0] = mul * (lo + hi);
      }
    }
  }
}

// A (rows, head dim) view of one (sequence, head) of a tensor with the given row stride.
template <typename Element, int kHeadDim, class Ptr>
__device__ __forceinline__ auto rows_view(Ptr* base, int64_t offset, int64_t row_stride, int n) {
  return make_tensor(make_gmem_ptr(static_cast<Element*>(base) + offset),
                     make_shape(n, Int<kHeadDim>{}), make_stride(row_stride, _1{}));
}

// ---------------------------------------------------------------------------------------------
// D_i = dout_i . out_i: grid.x = ceil(B * H * p.Tq / kNWarps), one warp per (b, h, row).
// ---------------------------------------------------------------------------------------------

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads) dot_kernel(const BwdParams p) {
  using Element = typename Traits::Element;
  constexpr int D = Traits::kHeadDim;
  const int64_t row = int64_t(blockIdx.x) * Traits::kNWarps + threadIdx.x / 32;
  if (row >= int64_t(p.B) * p.H * p.Tq) return;  // whole warps
  const int i = int(row % p.Tq);
  const int bh = int(row / p.Tq);
  const int b = bh / p.H, h = bh % p.H;
  const SeqInfo seq(p, b);
  if (i >= seq.Tq) return;
  const int lane = threadIdx.x % 32;
  const int64_t o = seq.q_offset(p.o_s, b, h) + int64_t(i) * p.o_s.row;
  const Element* dout = static_cast<const Element*>(p.dout) + o;
  const Element* out = static_cast<const Element*>(p.out) + o;
  float s = 0.f;
  CUTE_UNROLL
  for (int d = lane; d < D; d += 32) s += float(dout[d]) * float(out[d]);
  CUTE_UNROLL
  for (int m = 16; m > 0; m /= 2) s += __shfl_xor_sync(0xffffffffu, s, m);
  if (lane == 0) p.Dsum[seq.q_offset(p.lse_s, b, h) + int64_t(i) * p.lse_s.row] = s;
}

// ---------------------------------------------------------------------------------------------
// dQ and the query-row half of dP: grid.x = ceil(p.Tq / kBlockM) * B * H.
// ---------------------------------------------------------------------------------------------

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads) dq_kernel(const BwdParams p) {
#if defined(HDAF_CUTE_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  extern __shared__ __align__(128) unsigned char smem_raw[];

  const int num_m = (p.Tq + kBlockM - 1) / kBlockM;
  const int m_block = int(blockIdx.x % unsigned(num_m));
  const int bh = int(blockIdx.x / unsigned(num_m));
  const int b = bh / p.H, h = bh % p.H;
  const SeqInfo seq(p, b);
  const int m0 = m_block * kBlockM;
  if (m0 >= seq.Tq) return;
  const int hk = kv_head(p, h);
  const SeqArgs<Element> a = seq_args<Element>(p, seq, b, h);
  const int pos0 = seq.off + m0;  // key position of query row m0
  const int tid = threadIdx.x;

  Tensor gQ = local_tile(rows_view<const Element, kHeadDim>(p.q, seq.q_offset(p.q_s, b, h),
                                                             p.q_s.row, seq.Tq),
                         Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, 0));
  Tensor gdO = local_tile(rows_view<const Element, kHeadDim>(p.dout, seq.q_offset(p.o_s, b, h),
                                                              p.o_s.row, seq.Tq),
                          Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, 0));
  Tensor gK = local_tile(rows_view<const Element, kHeadDim>(p.k, seq.k_offset(p.k_s, b, hk),
                                                             p.k_s.row, seq.Tk),
                         Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));
  Tensor gV = local_tile(rows_view<const Element, kHeadDim>(p.v, seq.k_offset(p.v_s, b, hk),
                                                             p.v_s.row, seq.Tk),
                         Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));
  Tensor gdQ = local_tile(rows_view<Element, kHeadDim>(p.dq, seq.q_offset(p.q_s, b, h), p.q_s.row,
                                                        seq.Tq),
                          Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, 0));

  Element* smem = reinterpret_cast<Element*>(smem_raw);
  Tensor sQ = make_tensor(make_smem_ptr(smem), typename Traits::SmemLayoutM{});
  Tensor sdO = make_tensor(make_smem_ptr(smem + Traits::kTileM), typename Traits::SmemLayoutM{});
  Element* kv_base = smem + 2 * Traits::kTileM;  // stage s: K at 2s, V at 2s + 1 (tiles)
  auto sK_at = [&](int s) {
    return make_tensor(make_smem_ptr(kv_base + 2 * s * Traits::kTileN),
                       typename Traits::SmemLayoutN{});
  };
  auto sV_at = [&](int s) {
    return make_tensor(make_smem_ptr(kv_base + (2 * s + 1) * Traits::kTileN),
                       typename Traits::SmemLayoutN{});
  };
  auto sKt_at = [&](int s) {
    return make_tensor(make_smem_ptr(kv_base + 2 * s * Traits::kTileN),
                       typename Traits::SmemLayoutNt{});
  };
  // [stage][kBlockN]: the far-tile key terms {c P[j, 0], c P[j, R-1]}, -inf at padding / past Tk.
  float2* s_kterm = reinterpret_cast<float2*>(kv_base + 4 * Traits::kTileN);
  // [stage][kBlockM][kBiasLd]: a band or masked tile's c * (P[j, r] - P[t_i, r]), -inf where
  // the pair is hidden (masked tiles).
  float* s_bias = reinterpret_cast<float*>(s_kterm + 2 * kBlockN);

  typename Traits::GmemCopy gmem_copy;
  auto gthr = gmem_copy.get_thread_slice(tid);
  Tensor tMid = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor tNid = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  Tensor tKgK = gthr.partition_S(gK);  // (CPY, CPY_N, CPY_K, key blocks)
  Tensor tVgV = gthr.partition_S(gV);
  // The far-tile key terms of key tile n0 into stage s: one element per thread, thread tid
  // writing term tid / kBlockN (0: bucket 0, 1: bucket R-1) of key tid % kBlockN.
  static_assert(Traits::kNThreads >= 2 * kBlockN, "one key term per thread");
  auto load_kterm = [&](int n0, int s) {
    if (tid < 2 * kBlockN) {
      const int c = tid % kBlockN, e = tid / kBlockN;
      reinterpret_cast<float*>(s_kterm + s * kBlockN)[2 * c + e] =
          a.key_term(n0 + c, e == 0 ? 0 : a.R - 1);
    }
  };
  // Key tile n0 into stage s: K, V by cp.async (rows past the end zero-filled), the key terms.
  auto load_kv = [&](int n0, int s) {
    Tensor tKsK = gthr.partition_D(sK_at(s));
    Tensor tVsV = gthr.partition_D(sV_at(s));
    copy_rows(gmem_copy, tKgK(_, _, _, n0 / kBlockN), tKsK, tNid, a.Tk - n0);
    copy_rows(gmem_copy, tVgV(_, _, _, n0 / kBlockN), tVsV, tNid, a.Tk - n0);
    load_kterm(n0, s);
  };
  // A key tile whose rows all lie in the sequence (the unmasked runs' tiles): K, V unpredicated
  // from this thread's sources kg, vg (a tile's sources are kBlockN rows after the previous
  // tile's: the runs advance them by k_step, v_step).
  const auto k_src = tKgK(_, _, _, 0).layout();
  const auto v_src = tVgV(_, _, _, 0).layout();
  const int64_t k_step = int64_t(kBlockN) * p.k_s.row, v_step = int64_t(kBlockN) * p.v_s.row;
  // Its key terms from pg, this thread's element of P (key n0 + tid % kBlockN, bucket 0 or R-1
  // as load_kterm): every key is inside the sequence, so only the padding mask can hide one.
  const int kt_key = tid % kBlockN;
  const int kt_col = tid / kBlockN == 0 ? 0 : a.R - 1;
  const int kt_step = kBlockN * a.P_row;
  // The sources then step to the next tile's.
  auto load_kv_full = [&](auto& kg, auto& vg, const Element*& pg, int n0, int s) {
    Tensor tKsK = gthr.partition_D(sK_at(s));
    Tensor tVsV = gthr.partition_D(sV_at(s));
    copy(gmem_copy, make_tensor(kg, k_src), tKsK);
    copy(gmem_copy, make_tensor(vg, v_src), tVsV);
    if (Traits::kNThreads == 2 * kBlockN || tid < 2 * kBlockN) {
      const bool out = a.pad != nullptr && a.pad[n0 + kt_key];
      reinterpret_cast<float*>(s_kterm + s * kBlockN)[2 * kt_key + tid / kBlockN] =
          out ? -INFINITY : a.c * float(*pg);
    }
    kg = kg + k_step;
    vg = vg + v_step;
    pg += kt_step;
  };

  typename Traits::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);  // (MMA, MMA_M, MMA_K)
  Tensor tSrdO = thr_mma.partition_fragment_A(sdO);
  Tensor tSrK = thr_mma.partition_fragment_B(sK_at(0));  // (MMA, MMA_N, MMA_K)
  Tensor tSrV = thr_mma.partition_fragment_B(sV_at(0));
  Tensor tQrKt = thr_mma.partition_fragment_B(make_tensor(
      make_smem_ptr(kv_base), typename Traits::SmemLayoutNtNoSwizzle{}));  // (MMA, MMA_D, MMA_N)
  Tensor acc_dq = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  auto copy_a = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma);
  auto thr_a = copy_a.get_thread_slice(tid);
  auto copy_b = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma);
  auto thr_b = copy_b.get_thread_slice(tid);
  auto copy_bt = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, mma);
  auto thr_bt = copy_bt.get_thread_slice(tid);
  Tensor tSsQ = thr_a.partition_S(sQ);
  Tensor tSsdO = thr_a.partition_S(sdO);

  Tensor tSid = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor rc = make_tensor(tSid.data(), acc_rowcol(tSid.layout()));
  constexpr int kRows = decltype(size<0>(rc))::value;
  constexpr int kCols = decltype(size<1>(rc))::value;

  // The walk: key_tiles' runs in key positions; tiles crossing a window / causal edge, the last
  // partial key tile and, under a key padding mask, the band run compare positions.
  const cute_tiles::KeyTiles kt =
      cute_tiles::key_tiles(pos0, a.Tk, a.L, a.U, a.lo, a.hi, kBlockM, kBlockN);
  cute_tiles::Span u =
      cute_tiles::unmasked_key_tiles(pos0, a.lo, a.hi, kBlockM, kBlockN, kt.begin, kt.end);
  u.last = cute_tiles::imax(cute_tiles::imin(u.last, a.Tk / kBlockN * kBlockN), u.first);
  const cute_tiles::TileSchedule sch = cute_tiles::make_schedule(
      kt.begin, kt.end, u, kt.band, kt.far_hi, a.pad != nullptr, kBlockN);

  const float* lse = p.lse + seq.q_offset(p.lse_s, b, h);
  const float* Dvec = p.Dsum + seq.q_offset(p.lse_s, b, h);
  float* dp_rows = p.dP_rows + seq.k_offset(p.dP_s, b, h);
  const int dp_row = int(p.dP_s.row);
  // Per row: lse2, D, the far-tile query terms lse2 + c P[t_i, e], the edge sums.
  float lse2[kRows], drow[kRows], qterm_lo[kRows], qterm_hi[kRows], edge_lo[kRows], edge_hi[kRows];
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const int i = m0 + get<0>(rc(mi, 0));
    lse2[mi] = lse2_of(lse, p.lse_s.row, i, a.Tq);
    drow[mi] = i < a.Tq ? Dvec[int64_t(i) * p.lse_s.row] : 0.f;
    qterm_lo[mi] = i < a.Tq ? lse2[mi] + a.c * a.p_at(a.off + i, 0) : INFINITY;
    qterm_hi[mi] = i < a.Tq ? lse2[mi] + a.c * a.p_at(a.off + i, a.R - 1) : INFINITY;
    edge_lo[mi] = edge_hi[mi] = 0.f;
  }

  {
    Tensor tQgQ = gthr.partition_S(gQ);
    Tensor tQsQ = gthr.partition_D(sQ);
    Tensor tdOgdO = gthr.partition_S(gdO);
    Tensor tdOsdO = gthr.partition_D(sdO);
    copy_rows(gmem_copy, tQgQ, tQsQ, tMid, a.Tq - m0);
    copy_rows(gmem_copy, tdOgdO, tdOsdO, tMid, a.Tq - m0);
  }
  const int first = sch.first();
  if (first >= 0) load_kv(first, 0);
  sm80::cp_async_fence();
  clear(acc_dq);

  int stage = 0;
  const float neg_scale = -p.scale;
  // One key tile n0 of kind kKind (kMask: any kind, gathering and comparing positions);
  // load_next(s) loads the next tile into stage s, under this one.
  auto tile = [&](auto kind_c, auto mask_c, int n0, auto&& load_next) HDAF_BWD_INLINE {
    constexpr int kKind = decltype(kind_c)::value;
    constexpr bool kMask = decltype(mask_c)::value;
    constexpr int kLd = Traits::kBiasLd;
    float* bias = s_bias + stage * kBlockM * kLd;
    if constexpr (kMask || kKind == kBand) {
      // The tile's bias, gathered by the whole CTA before the barrier (the stage's buffer was
      // last read two tiles ago, before the previous barrier). Not unrolled: unrolled, its loads
      // would all be hoisted and the registers spill.
      // A thread keeps one key column and steps down the query rows.
      constexpr int kStep = Traits::kNThreads / kBlockN;
      static_assert(Traits::kNThreads % kBlockN == 0 && kBlockM % kStep == 0);
      const int j = n0 + tid % kBlockN;
      const Element* krow = a.row(j);
      const bool key_out = kMask && a.key_out(j);
      float* out = bias + (tid / kBlockN) * kLd + tid % kBlockN;
      int t = pos0 + tid / kBlockN;
#pragma unroll 1
      for (int k = 0; k < kBlockM / kStep; ++k) {  // bias gather
        const int d = j - t;
        float v = a.c * pair_bias(krow, a.row(t), a.bucket(d));
        if (kMask && (key_out || d < a.lo || d > a.hi)) v = -INFINITY;
        *out = v;
        t += kStep;
        out += kStep * kLd;
      }
    }
    sm80::cp_async_wait<0>();
    __syncthreads();  // tile n0 is in smem, and no warp still reads the other stage
    load_next(stage ^ 1);
    sm80::cp_async_fence();

    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor acc_dp = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    clear(acc_dp);
    gemm_smem(mma, acc_s, tSrQ, tSrK, tSsQ, thr_b.partition_S(sK_at(stage)), copy_a, thr_a,
              copy_b, thr_b);
    gemm_smem(mma, acc_dp, tSrdO, tSrV, tSsdO, thr_b.partition_S(sV_at(stage)), copy_a, thr_a,
              copy_b, thr_b);

    Tensor s = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
    Tensor dp = make_tensor(acc_dp.data(), acc_rowcol(acc_dp.layout()));
    const float2* kterm = s_kterm + stage * kBlockN;
    // Band and masked tiles: each row's key position t_i and its row of dP_rows, recomputed per
    // tile (kept across the walk they would crowd the far tiles' registers).
    int qpos[kRows];
    float* dprow[kRows];
    if constexpr (kMask || kKind == kBand) {
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) {
        qpos[mi] = pos0 + get<0>(rc(mi, 0));
        dprow[mi] = dp_rows + qpos[mi] * dp_row;
      }
    }
    // p = exp2(logit2 - lse2); dS = p (dPv - D) into acc_dp, and its bucket sums.
    CUTE_UNROLL
    for (int ni = 0; ni < kCols; ++ni) {
      const int cj = get<1>(rc(0, ni));
      const int j = n0 + cj;
      if constexpr (kMask || kKind == kBand) {
        const bool key_in = !kMask || !a.key_out(j);
        CUTE_UNROLL
        for (int mi = 0; mi < kRows; ++mi) {
          const int d = j - qpos[mi];
          const unsigned r = a.bucket(d);
          const float x =
              fmaf(s(mi, ni), a.c, bias[get<0>(rc(mi, 0)) * kLd + cj]) - lse2[mi];
          const float v = exp2_approx(x) * (dp(mi, ni) - drow[mi]);
          dp(mi, ni) = v;
          pair_bucket(v, r, a.R, edge_lo[mi], edge_hi[mi], dprow[mi], key_in && qpos[mi] < a.Tk,
                      neg_scale);
        }
      } else {
        const float kt_e = kKind == kFarLo ? kterm[cj].x : kterm[cj].y;
        CUTE_UNROLL
        for (int mi = 0; mi < kRows; ++mi) {
          const float x = fmaf(s(mi, ni), a.c, kt_e) - (kKind == kFarLo ? qterm_lo : qterm_hi)[mi];
          const float v = exp2_approx(x) * (dp(mi, ni) - drow[mi]);
          dp(mi, ni) = v;
          (kKind == kFarLo ? edge_lo : edge_hi)[mi] += v;
        }
      }
    }

    Tensor dsr = to_element<Element>(acc_dp);
    Tensor tQrdS = make_tensor(dsr.data(), acc_as_a(dsr.layout()));
    gemm_rs(mma, acc_dq, tQrdS, tQrKt, thr_bt.partition_S(sKt_at(stage)), copy_bt, thr_bt);
    stage ^= 1;
  };

  using Masked = std::true_type;
  using Unmasked = std::false_type;
  {
    const int n = sch.masked_count(), after = sch.first_after(0);
    for (int k = 0; k < n; ++k) {  // hot loop: masked
      const int next = k + 1 < n ? sch.masked_tile(k + 1) : after;
      tile(Int<kBand>{}, Masked{}, sch.masked_tile(k), [&](int s) {
        if (next >= 0) load_kv(next, s);
      });
    }
  }
  // The unmasked runs: their tiles are whole (u.last <= Tk rounded down), so every tile but a
  // run's last loads the next through load_kv_full; the last loads the next run's first tile.
  auto last_tile = [&](auto kind_c, int n0, int after) HDAF_BWD_INLINE {
    tile(kind_c, Unmasked{}, n0, [&](int s) {
      if (after >= 0) load_kv(after, s);
    });
  };
  {
    const int n = sch.count[3], n0 = sch.start[3], after = sch.first_after(1);
    auto kg = tKgK(_, _, _, 0).data() + (n0 / kBlockN + 1) * k_step;
    auto vg = tVgV(_, _, _, 0).data() + (n0 / kBlockN + 1) * v_step;
    const Element* pg = a.P + (n0 + kBlockN + kt_key) * a.P_row + kt_col;
    for (int k = 0; k + 1 < n; ++k) {  // hot loop: far-low
      const int next = n0 + (k + 1) * kBlockN;
      tile(Int<kFarLo>{}, Unmasked{}, next - kBlockN,
           [&](int s) { load_kv_full(kg, vg, pg, next, s); });
    }
    if (n > 0) last_tile(Int<kFarLo>{}, n0 + (n - 1) * kBlockN, after);
  }
  {
    const int n = sch.count[4], n0 = sch.start[4], after = sch.first_after(2);
    auto kg = tKgK(_, _, _, 0).data() + (n0 / kBlockN + 1) * k_step;
    auto vg = tVgV(_, _, _, 0).data() + (n0 / kBlockN + 1) * v_step;
    const Element* pg = a.P + (n0 + kBlockN + kt_key) * a.P_row + kt_col;
    for (int k = 0; k + 1 < n; ++k) {  // hot loop: band
      const int next = n0 + (k + 1) * kBlockN;
      tile(Int<kBand>{}, Unmasked{}, next - kBlockN,
           [&](int s) { load_kv_full(kg, vg, pg, next, s); });
    }
    if (n > 0) last_tile(Int<kBand>{}, n0 + (n - 1) * kBlockN, after);
  }
  {
    const int n = sch.count[5], n0 = sch.start[5];
    auto kg = tKgK(_, _, _, 0).data() + (n0 / kBlockN + 1) * k_step;
    auto vg = tVgV(_, _, _, 0).data() + (n0 / kBlockN + 1) * v_step;
    const Element* pg = a.P + (n0 + kBlockN + kt_key) * a.P_row + kt_col;
    for (int k = 0; k + 1 < n; ++k) {  // hot loop: far-high
      const int next = n0 + (k + 1) * kBlockN;
      tile(Int<kFarHi>{}, Unmasked{}, next - kBlockN,
           [&](int s) { load_kv_full(kg, vg, pg, next, s); });
    }
    if (n > 0) last_tile(Int<kFarHi>{}, n0 + (n - 1) * kBlockN, -1);
  }

  store_edge_sums(rc, m0, a.Tq, a.off, a.R, tid, edge_lo, edge_hi, dp_rows, dp_row, neg_scale);
  sm80::cp_async_wait<0>();
  __syncthreads();  // every warp is past its last read of sQ
  store_tile<Traits, typename Traits::SmemLayoutM>(acc_dq, p.scale, smem, gdQ, a.Tq - m0, tid);
#endif  // HDAF_CUTE_EMULATION || __CUDA_ARCH__ >= 800
}

// ---------------------------------------------------------------------------------------------
// dK, dV and the key-row half of dP: grid.x = ceil(p.Tk / kBlockN) * B * Hkv.
// ---------------------------------------------------------------------------------------------

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads) dkdv_kernel(const BwdParams p) {
#if defined(HDAF_CUTE_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  extern __shared__ __align__(128) unsigned char smem_raw[];

  const int num_n = (p.Tk + kBlockN - 1) / kBlockN;
  const int n_block = int(blockIdx.x % unsigned(num_n));
  const int bhk = int(blockIdx.x / unsigned(num_n));
  const int b = bhk / p.Hkv, hk = bhk % p.Hkv;
  const SeqInfo seq(p, b);
  const int n0 = n_block * kBlockN;
  if (n0 >= seq.Tk) return;
  const int group = p.H / p.Hkv;
  const int h_begin = hk * group, h_end = h_begin + group;
  SeqArgs<Element> a = seq_args<Element>(p, seq, b, h_begin);
  const int tid = threadIdx.x;

  Tensor gK = local_tile(rows_view<const Element, kHeadDim>(p.k, seq.k_offset(p.k_s, b, hk),
                                                             p.k_s.row, seq.Tk),
                         Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, 0));
  Tensor gV = local_tile(rows_view<const Element, kHeadDim>(p.v, seq.k_offset(p.v_s, b, hk),
                                                             p.v_s.row, seq.Tk),
                         Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, 0));
  Tensor gdK = local_tile(rows_view<Element, kHeadDim>(p.dk, seq.k_offset(p.k_s, b, hk), p.k_s.row,
                                                        seq.Tk),
                          Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, 0));
  Tensor gdV = local_tile(rows_view<Element, kHeadDim>(p.dv, seq.k_offset(p.v_s, b, hk), p.v_s.row,
                                                        seq.Tk),
                          Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, 0));

  Element* smem = reinterpret_cast<Element*>(smem_raw);
  Tensor sK = make_tensor(make_smem_ptr(smem), typename Traits::SmemLayoutN{});
  Tensor sV = make_tensor(make_smem_ptr(smem + Traits::kTileN), typename Traits::SmemLayoutN{});
  Element* qdo_base = smem + 2 * Traits::kTileN;  // stage s: Q at 2s, dO at 2s + 1 (tiles)
  auto stage_tile = [&](int s, int which) { return qdo_base + (2 * s + which) * Traits::kTileM; };
  // [stage][kBlockM]: {D, lse2, lse2 + c P[t_i, 0], lse2 + c P[t_i, R-1]} per query column.
  float4* s_vec = reinterpret_cast<float4*>(qdo_base + 4 * Traits::kTileM);
  // [stage][kBlockN][kBiasLdT]: a band or masked tile's c * (P[j, r] - P[t_i, r]), -inf where
  // the pair is hidden (masked tiles).
  float* s_bias = reinterpret_cast<float*>(s_vec + 2 * kBlockM);
  // [kBlockN]: the current head's far-tile key terms {c P[j, 0], c P[j, R-1]}, -inf at padding
  // and past the end (in registers they would crowd the tiles' accumulators).
  float2* s_kterm = reinterpret_cast<float2*>(s_bias + 2 * kBlockN * Traits::kBiasLdT);

  typename Traits::GmemCopy gmem_copy;
  auto gthr = gmem_copy.get_thread_slice(tid);
  Tensor tMid = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor tNid = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  // Query tile m0 of head h into stage s: Q, dO by cp.async, the query vectors by plain loads.
  // (The head's row pointers are recomputed here, not kept in registers across the walk.)
  auto load_q = [&](int h, int m0, int s) {
    Tensor gQ = local_tile(rows_view<const Element, kHeadDim>(p.q, seq.q_offset(p.q_s, b, h),
                                                               p.q_s.row, seq.Tq),
                           Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m0 / kBlockM, 0));
    Tensor gdO = local_tile(rows_view<const Element, kHeadDim>(p.dout, seq.q_offset(p.o_s, b, h),
                                                                p.o_s.row, seq.Tq),
                            Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m0 / kBlockM, 0));
    Tensor tQsQ = gthr.partition_D(
        make_tensor(make_smem_ptr(stage_tile(s, 0)), typename Traits::SmemLayoutM{}));
    Tensor tdOsdO = gthr.partition_D(
        make_tensor(make_smem_ptr(stage_tile(s, 1)), typename Traits::SmemLayoutM{}));
    copy_rows(gmem_copy, gthr.partition_S(gQ), tQsQ, tMid, a.Tq - m0);
    copy_rows(gmem_copy, gthr.partition_S(gdO), tdOsdO, tMid, a.Tq - m0);
    float4* v = s_vec + s * kBlockM;
    const int64_t lse_off = seq.q_offset(p.lse_s, b, h);
    const Element* P = static_cast<const Element*>(p.P) + seq.k_offset(p.P_s, b, p_head(p, h));
    for (int c = tid; c < kBlockM; c += Traits::kNThreads) {
      const int i = m0 + c;
      if (i < a.Tq) {
        const float l2 = lse2_of(p.lse + lse_off, p.lse_s.row, i, a.Tq);
        const Element* prow = P + (a.off + i) * a.P_row;
        v[c] = make_float4(p.Dsum[lse_off + int64_t(i) * p.lse_s.row], l2,
                           l2 + a.c * float(prow[0]), l2 + a.c * float(prow[a.R - 1]));
      } else {
        v[c] = make_float4(0.f, INFINITY, INFINITY, INFINITY);
      }
    }
  };

  typename Traits::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor tSrK = thr_mma.partition_fragment_A(sK);  // (MMA, MMA_N, MMA_K): keys are M here
  Tensor tSrV = thr_mma.partition_fragment_A(sV);
  Tensor sQ0 = make_tensor(make_smem_ptr(stage_tile(0, 0)), typename Traits::SmemLayoutM{});
  Tensor tSrQ = thr_mma.partition_fragment_B(sQ0);  // (MMA, MMA_Mq, MMA_K)
  Tensor tSrdO = thr_mma.partition_fragment_B(sQ0);
  Tensor sQt0 =
      make_tensor(make_smem_ptr(stage_tile(0, 0)), typename Traits::SmemLayoutMtNoSwizzle{});
  Tensor tDrQt = thr_mma.partition_fragment_B(sQt0);  // (MMA, MMA_D, MMA_Mq)
  Tensor tDrdOt = thr_mma.partition_fragment_B(sQt0);
  Tensor acc_dk = partition_fragment_C(mma, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor acc_dv = partition_fragment_C(mma, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  auto copy_a = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma);
  auto thr_a = copy_a.get_thread_slice(tid);
  auto copy_b = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma);
  auto thr_b = copy_b.get_thread_slice(tid);
  auto copy_bt = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, mma);
  auto thr_bt = copy_bt.get_thread_slice(tid);
  Tensor tSsK = thr_a.partition_S(sK);
  Tensor tSsV = thr_a.partition_S(sV);

  Tensor tSid = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{}));
  Tensor rc = make_tensor(tSid.data(), acc_rowcol(tSid.layout()));  // (key row, query col)
  constexpr int kRows = decltype(size<0>(rc))::value;
  constexpr int kCols = decltype(size<1>(rc))::value;

  // Whether a key of this block is padding: then, like past the end, the band run compares
  // positions (far tiles fold both into their key terms).
  int block_pad = 0;
  if (a.pad != nullptr) {
    for (int c = tid; c < kBlockN; c += Traits::kNThreads) {
      if (n0 + c < a.Tk && a.pad[n0 + c]) block_pad = 1;
    }
  }
  block_pad = __syncthreads_or(block_pad);
  const cute_tiles::QueryRuns qr =
      cute_tiles::query_runs(n0, a.Tq, a.off, a.L, a.U, a.lo, a.hi, kBlockM, kBlockN);
  const cute_tiles::Span u =
      cute_tiles::unmasked_query_tiles(n0, a.off, a.lo, a.hi, kBlockM, kBlockN, qr.begin, qr.end);
  const cute_tiles::TileSchedule sch = cute_tiles::make_schedule(
      qr.begin, qr.end, u, qr.band, qr.far_lo, block_pad || n0 + kBlockN > a.Tk, kBlockM);

  {
    Tensor tKgK = gthr.partition_S(gK);
    Tensor tKsK = gthr.partition_D(sK);
    Tensor tVgV = gthr.partition_S(gV);
    Tensor tVsV = gthr.partition_D(sV);
    copy_rows(gmem_copy, tKgK, tKsK, tNid, a.Tk - n0);
    copy_rows(gmem_copy, tVgV, tVsV, tNid, a.Tk - n0);
  }
  const int first = sch.first();
  if (first >= 0) load_q(h_begin, first, 0);
  sm80::cp_async_fence();
  clear(acc_dk);
  clear(acc_dv);

  int stage = 0;
  int h = h_begin;
  const int dp_row = int(p.dP_s.row);
  // Per key row: the far-tile key terms c P[j, e] (-inf at padding / past Tk), the edge sums.
  float edge_lo[kRows], edge_hi[kRows];
  float* dp_keys = nullptr;
  // One query tile m0 of head h (kKind, kMask as in the dQ pass); `next`: the tile of head h to
  // load under it, or -1 for the next head's first.
  auto tile = [&](auto kind_c, auto mask_c, int m0, int next) HDAF_BWD_INLINE {
    constexpr int kKind = decltype(kind_c)::value;
    constexpr bool kMask = decltype(mask_c)::value;
    constexpr int kLd = Traits::kBiasLdT;
    float* bias = s_bias + stage * kBlockN * kLd;
    if constexpr (kMask || kKind == kBand) {
      // The tile's bias, gathered by the whole CTA before the barrier (as in the dQ pass).
      // A thread keeps one query column and steps down the key rows.
      constexpr int kStep = Traits::kNThreads / kBlockM;
      static_assert(Traits::kNThreads % kBlockM == 0 && kBlockN % kStep == 0);
      const int t = a.off + m0 + tid % kBlockM;
      const Element* qrow = a.row(t);
      float* out = bias + (tid / kBlockM) * kLd + tid % kBlockM;
      int j = n0 + tid / kBlockM;
#pragma unroll 1
      for (int k = 0; k < kBlockN / kStep; ++k) {  // bias gather
        const int d = j - t;
        float v = a.c * pair_bias(a.row(j), qrow, a.bucket(d));
        if (kMask && (a.key_out(j) || d < a.lo || d > a.hi)) v = -INFINITY;
        *out = v;
        j += kStep;
        out += kStep * kLd;
      }
    }
    sm80::cp_async_wait<0>();
    __syncthreads();  // tile m0 is in smem, and no warp still reads the other stage
    if (next >= 0 || h + 1 < h_end) load_q(next >= 0 ? h : h + 1, next >= 0 ? next : first, stage ^ 1);
    sm80::cp_async_fence();

    Tensor sQ = make_tensor(make_smem_ptr(stage_tile(stage, 0)), typename Traits::SmemLayoutM{});
    Tensor sdO = make_tensor(make_smem_ptr(stage_tile(stage, 1)), typename Traits::SmemLayoutM{});
    Tensor sQt = make_tensor(make_smem_ptr(stage_tile(stage, 0)), typename Traits::SmemLayoutMt{});
    Tensor sdOt =
        make_tensor(make_smem_ptr(stage_tile(stage, 1)), typename Traits::SmemLayoutMt{});
    const float4* vec = s_vec + stage * kBlockM;
    // Band and masked tiles: whether each key row takes part (not padding, not past the end)
    // and its row of dP_keys, recomputed per tile (kept across the walk they would crowd the
    // far tiles' registers).
    bool key_in[kRows];
    float* dprow[kRows];
    if constexpr (kMask || kKind == kBand) {
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) {
        const int j = n0 + get<0>(rc(mi, 0));
        key_in[mi] = !kMask || !a.key_out(j);  // unmasked band tiles: every key takes part
        dprow[mi] = dp_keys + j * dp_row;
      }
    }

    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockN>, Int<kBlockM>>{});
    Tensor acc_dp = partition_fragment_C(mma, Shape<Int<kBlockN>, Int<kBlockM>>{});
    clear(acc_s);
    clear(acc_dp);
    gemm_smem(mma, acc_s, tSrK, tSrQ, tSsK, thr_b.partition_S(sQ), copy_a, thr_a, copy_b, thr_b);
    gemm_smem(mma, acc_dp, tSrV, tSrdO, tSsV, thr_b.partition_S(sdO), copy_a, thr_a, copy_b,
              thr_b);

    Tensor s = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
    Tensor dp = make_tensor(acc_dp.data(), acc_rowcol(acc_dp.layout()));
    // p^T = exp2(logit2 - lse2_i) into acc_s, dS^T = p^T (dPv^T - D_i) into acc_dp, and the
    // bucket sums of dS.
    CUTE_UNROLL
    for (int ni = 0; ni < kCols; ++ni) {
      const int ci = get<1>(rc(0, ni));
      const float4 w = vec[ci];  // D, lse2, far-low and far-high query terms
      const int t = a.off + m0 + ci;  // the query's key position
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) {
        float x;
        const int d = n0 + get<0>(rc(mi, 0)) - t;
        if constexpr (kMask || kKind == kBand) {
          x = fmaf(s(mi, ni), a.c, bias[get<0>(rc(mi, 0)) * kLd + ci]) - w.y;
        } else if constexpr (kKind == kFarLo) {
          x = fmaf(s(mi, ni), a.c, s_kterm[get<0>(rc(mi, 0))].x) - w.z;
        } else {
          x = fmaf(s(mi, ni), a.c, s_kterm[get<0>(rc(mi, 0))].y) - w.w;
        }
        const float pr = exp2_approx(x);
        const float v = pr * (dp(mi, ni) - w.x);
        s(mi, ni) = pr;
        dp(mi, ni) = v;
        if constexpr (kMask || kKind == kBand) {
          pair_bucket(v, a.bucket(d), a.R, edge_lo[mi], edge_hi[mi], dprow[mi],
                      key_in[mi] && t < a.Tk, p.scale);
        } else {
          (kKind == kFarLo ? edge_lo : edge_hi)[mi] += v;
        }
      }
    }

    // dV += p^T dO, dK += dS^T Q: the B operands dO^T, Q^T through ldmatrix.trans.
    Tensor pr = to_element<Element>(acc_s);
    Tensor tDrP = make_tensor(pr.data(), acc_as_a(pr.layout()));
    gemm_rs(mma, acc_dv, tDrP, tDrdOt, thr_bt.partition_S(sdOt), copy_bt, thr_bt);
    Tensor dsr = to_element<Element>(acc_dp);
    Tensor tDrdS = make_tensor(dsr.data(), acc_as_a(dsr.layout()));
    gemm_rs(mma, acc_dk, tDrdS, tDrQt, thr_bt.partition_S(sQt), copy_bt, thr_bt);
    stage ^= 1;
  };

  using Masked = std::true_type;
  using Unmasked = std::false_type;
  for (; h < h_end; ++h) {
    a.P = static_cast<const Element*>(p.P) + seq.k_offset(p.P_s, b, p_head(p, h));
    dp_keys = p.dP_keys + seq.k_offset(p.dP_s, b, h);
    __syncwarp();  // the warp is done with the previous head's key terms
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      const int j = n0 + get<0>(rc(mi, 0));
      // Each quad writes its own key rows (its 4 lanes the same values), read only by this warp.
      s_kterm[get<0>(rc(mi, 0))] = a.key_out(j) ? make_float2(-INFINITY, -INFINITY)
                                                : make_float2(a.c * a.p_at(j, 0),
                                                              a.c * a.p_at(j, a.R - 1));
      edge_lo[mi] = edge_hi[mi] = 0.f;
    }
    __syncwarp();
    {
      const int n = sch.masked_count(), after = sch.first_after(0);
      for (int k = 0; k < n; ++k) {  // hot loop: masked
        tile(Int<kBand>{}, Masked{}, sch.masked_tile(k),
             k + 1 < n ? sch.masked_tile(k + 1) : after);
      }
    }
    {  // far-high (small query indices), band, far-low
      const int n = sch.count[3], m0 = sch.start[3], after = sch.first_after(1);
      for (int k = 0; k < n; ++k) {  // hot loop: far-high
        tile(Int<kFarHi>{}, Unmasked{}, m0 + k * kBlockM,
             k + 1 < n ? m0 + (k + 1) * kBlockM : after);
      }
    }
    {
      const int n = sch.count[4], m0 = sch.start[4], after = sch.first_after(2);
      for (int k = 0; k < n; ++k) {  // hot loop: band
        tile(Int<kBand>{}, Unmasked{}, m0 + k * kBlockM,
             k + 1 < n ? m0 + (k + 1) * kBlockM : after);
      }
    }
    {
      const int n = sch.count[5], m0 = sch.start[5];
      for (int k = 0; k < n; ++k) {  // hot loop: far-low
        tile(Int<kFarLo>{}, Unmasked{}, m0 + k * kBlockM, k + 1 < n ? m0 + (k + 1) * kBlockM : -1);
      }
    }
    store_edge_sums(rc, n0, a.Tk, 0, a.R, tid, edge_lo, edge_hi, dp_keys, dp_row, p.scale);
  }

  sm80::cp_async_wait<0>();
  __syncthreads();  // every warp is past its last read of sK and sV
  store_tile<Traits, typename Traits::SmemLayoutN>(acc_dv, 1.f, smem + Traits::kTileN, gdV,
                                                   a.Tk - n0, tid);
  store_tile<Traits, typename Traits::SmemLayoutN>(acc_dk, p.scale, smem, gdK, a.Tk - n0, tid);
#endif  // HDAF_CUTE_EMULATION || __CUDA_ARCH__ >= 800
}

template <class Kernel>
cudaError_t allow_smem(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <class Traits>
cudaError_t launch(const BwdParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.H == 0 || p.Tk == 0) return cudaSuccess;
  auto dot = &dot_kernel<Traits>;
  auto dq = &dq_kernel<Traits>;
  auto dkdv = &dkdv_kernel<Traits>;
  const int64_t dot_grid =
      (int64_t(p.B) * p.H * p.Tq + Traits::kNWarps - 1) / Traits::kNWarps;
  const int64_t dq_grid = int64_t(p.Tq + Traits::kBlockM - 1) / Traits::kBlockM * p.B * p.H;
  const int64_t dkdv_grid = int64_t(p.Tk + Traits::kBlockN - 1) / Traits::kBlockN * p.B * p.Hkv;
  constexpr int64_t kMaxGrid = (int64_t(1) << 31) - 1;
  if (dot_grid > kMaxGrid || dq_grid > kMaxGrid || dkdv_grid > kMaxGrid) {
    return cudaErrorInvalidConfiguration;
  }
  // The kernels index a sequence's rows of P and of the dP halves with 32-bit offsets.
  if (int64_t(p.Tk) * p.P_s.row >= kMaxGrid || int64_t(p.Tk) * p.dP_s.row >= kMaxGrid) {
    return cudaErrorInvalidValue;
  }
  cudaError_t err = allow_smem(dq, Traits::kSmemDq);
  if (err == cudaSuccess) err = allow_smem(dkdv, Traits::kSmemDkDv);
  if (err != cudaSuccess) return err;
  if (dot_grid > 0) {
    HDAF_LAUNCH(dot, unsigned(dot_grid), Traits::kNThreads, 0, stream, p);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    HDAF_LAUNCH(dq, unsigned(dq_grid), Traits::kNThreads, Traits::kSmemDq, stream, p);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  HDAF_LAUNCH(dkdv, unsigned(dkdv_grid), Traits::kNThreads, Traits::kSmemDkDv, stream, p);
  return cudaGetLastError();
}

}  // namespace cute_bwd
}  // namespace cuda
}  // namespace hdaf

// One instantiation unit per (dtype, head dim): scalar_t is the launcher's CUDA type, Element the
// CuTe one, then the tile configuration (query rows, key rows, warps) both passes use.
#define HDAF_DEFINE_BWD(scalar_t, Element, D, BM, BN, WARPS)                                  \
  namespace hdaf {                                                                            \
  namespace cuda {                                                                            \
  template <>                                                                                 \
  size_t delta_bwd_smem_bytes<scalar_t, D>() {                                                \
    return cute_bwd::BwdTraits<Element, D, BM, BN, WARPS>::kSmemBytes;                        \
  }                                                                                           \
  template <>                                                                                 \
  cudaError_t delta_bwd_launch<scalar_t, D>(const BwdParams& p, cudaStream_t stream) {        \
    return cute_bwd::launch<cute_bwd::BwdTraits<Element, D, BM, BN, WARPS>>(p, stream);       \
  }                                                                                           \
  }                                                                                           \
  }
