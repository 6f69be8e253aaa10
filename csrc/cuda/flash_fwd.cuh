// Forward kernel of hdaf::delta_attention on CuTe (CUTLASS 4.x), FlashAttention-2 style, sm_80+.
// Spec: docs/delta_attention.md. OPT-IN (setup.py: HDAF_BUILD_CUTE=1), served only by the op
// hdaf::cuda_cute_delta_attention_forward, never by `auto`; compile-verified only, no GPU has run
// it yet (docs/verification.md, "The CuTe forward"). Included only by the instantiation units
// fwd_cute_*.cu, which the host emulation (csrc/cuda/host_emulation/fwd_emulation.cpp)
// also compiles, for the CPU, with HDAF_CUTE_EMULATION defined: the SM80 operations are then
// CPU versions with the same CuTe traits (cute_sm80_emulation.h), everything else is this file.
//
// One CTA = kBlockM query rows of one (batch, head). Warps are stacked along the rows (each owns
// kBlockM / kNWarps of them), so a row's softmax state lives in the 4 lanes of one quad.
//   Q      gmem --cp.async--> smem --ldmatrix--> registers, once; the MMAs read Q from registers.
//   K, V   one smem tile each; V(n) loads (cp.async) under S = Q K(n)^T and K(n+1) under the
//          softmax and O += P V(n): two copy groups in flight, as in FlashAttention-2.
//   MMA    cute::TiledMMA of SM80 mma.sync m16n8k16 (fp16/bf16 operands, fp32 accumulators);
//          K through ldmatrix, V through ldmatrix.trans (P V needs V^T as the B operand).
//   bias   a key block is far-low (every pair j - i <= -L: bucket 0), far-high (every pair
//          j - i >= U: bucket R-1) or band. A far tile adds the key column P[j, e] minus the
//          query row P[i, e]: the rows are read once per CTA into registers, the columns of
//          both edges once per key tile into smem (loaded with the next K tile; read from
//          global inside the tile they keep ~16 more loads in flight across the MMAs, and
//          ptxas spilled). Only band tiles gather P[j, r(i,j)] - P[i, r(i,j)] per pair, from
//          global memory (L1/L2).
//   mask   only tiles crossing a window / causal edge or the sequence end, and every tile when
//          there is a key padding mask, compare positions.
//   softmax online, in registers, log2 domain: s2 = (q.k + bias) * scale * log2(e), exp2.
//   out    acc_o / l, staged through smem (the Q tile) for 16-byte stores; lse float32, -inf with
//          out = 0 for a row that sees no key.
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
namespace cute_fwd {

using namespace cute;
using namespace kcommon;

template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_>
struct FwdTraits {
  using Element = Element_;  // cutlass::half_t or cutlass::bfloat16_t
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = 32 * kNWarps;
  static_assert(kHeadDim % 64 == 0, "the smem swizzle atom is 64 elements wide");
  static_assert(kBlockM % (16 * kNWarps) == 0, "each warp owns whole 16-row MMA tiles");
  static_assert(kBlockN % 16 == 0, "key tiles are whole k16 steps of P V");

  using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::half_t>,
                                     MMA_Atom<sm80::SM80_16x8x16_F32F16F16F32_TN>,
                                     MMA_Atom<sm80::SM80_16x8x16_F32BF16BF16F32_TN>>;
  // Warps along M only; an N extent of 16 lets one ldmatrix.x4 feed two n8 MMAs.
  using TiledMma = TiledMMA<MmaAtom, Layout<Shape<Int<kNWarps>, _1, _1>>,
                            Tile<Int<16 * kNWarps>, _16, _16>>;

  // Row-major tiles in 64-element (128-byte) column chunks, XOR-swizzled so that one ldmatrix
  // (8 rows of 16 bytes) hits 8 different bank groups.
  using SmemLayoutAtom =
      decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
  using SmemLayoutQ =
      decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV =
      decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  // V seen as (head dim, key): the B operand of O += P V.
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));
  using SmemLayoutVtNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutVt{}));

  using SmemCopyAtom = Copy_Atom<sm80::SM75_U32x4_LDSM_N, Element>;   // Q, K: ldmatrix
  using SmemCopyAtomT = Copy_Atom<sm80::SM75_U16x8_LDSM_T, Element>;  // V: ldmatrix.trans
  using SmemCopyAtomO = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<128>, Element>;

  // gmem <-> smem: 16 bytes per thread and copy, a 64-element row chunk per kThreadsPerRow threads.
  static constexpr int kElemsPer16B = 16 / int(sizeof(Element));
  static constexpr int kThreadsPerRow = 64 / kElemsPer16B;
  using GmemThreads = Layout<Shape<Int<kNThreads / kThreadsPerRow>, Int<kThreadsPerRow>>,
                             Stride<Int<kThreadsPerRow>, _1>>;
  using GmemCopyQKV = decltype(make_tiled_copy(
      Copy_Atom<sm80::SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{}, GmemThreads{},
      Layout<Shape<_1, Int<kElemsPer16B>>>{}));
  using GmemCopyO = decltype(make_tiled_copy(Copy_Atom<UniversalCopy<cute::uint128_t>, Element>{},
                                             GmemThreads{}, Layout<Shape<_1, Int<kElemsPer16B>>>{}));

  // Q, K, V tiles, then the key tile's far-tile columns P[j, 0] and P[j, R-1] in float32.
  static constexpr int kSmemBytes =
      int(size(SmemLayoutQ{}) + 2 * size(SmemLayoutKV{})) * int(sizeof(Element)) +
      2 * kBlockN * int(sizeof(float));
};

// What the logits of one tile need besides S.
template <typename Element>
struct TileArgs {
  const Element* P;  // this (batch, head)'s P, [T, R] row-major
  const float* pcol_lo;  // smem [kBlockN]: P[n0 + c, 0] (0 past the end)
  const float* pcol_hi;  // smem [kBlockN]: P[n0 + c, R-1]
  const bool* pad;   // this batch's key padding mask [T], or nullptr
  int T, R, L, U, lo, hi, m0, n0;
  float scale_log2;  // scale * log2(e)
};

// S (row, col view) -> log2-domain logits: (q.k + bias) * scale * log2(e), -inf where not
// visible (tested only on tiles that cross an edge: `edge`). prow: the query rows' P[i, e] of a
// far tile. rc gives each register's (row, col) inside the tile.
template <int kKind, typename Element, class S, class RC, int kRows>
__device__ __forceinline__ void tile_logits(S& s, RC const& rc, const float (&prow)[kRows],
                                            TileArgs<Element> const& a, bool edge) {
  constexpr int kCols = decltype(size<1>(s))::value;
  const float* pcol = kKind == kFarLo ? a.pcol_lo : a.pcol_hi;  // far tiles: P[j, e]
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const int i = a.m0 + get<0>(rc(mi, 0));
    CUTE_UNROLL
    for (int ni = 0; ni < kCols; ++ni) {
      const int j = a.n0 + get<1>(rc(0, ni));
      float bias;
      if (kKind == kBand) {
        const int r = min(max(j - i, -a.L), a.U) + a.L;
        bias = (i < a.T && j < a.T)
                   ? float(a.P[int64_t(j) * a.R + r]) - float(a.P[int64_t(i) * a.R + r])
                   : 0.f;
      } else {
        bias = pcol[get<1>(rc(0, ni))] - prow[mi];
      }
      s(mi, ni) = (s(mi, ni) + bias) * a.scale_log2;
    }
  }
  if (!edge) return;
  CUTE_UNROLL
  for (int ni = 0; ni < kCols; ++ni) {
    const int j = a.n0 + get<1>(rc(0, ni));
    const bool hidden = j >= a.T || (a.pad != nullptr && a.pad[j]);  // past the end, or padding
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      const int d = j - (a.m0 + get<0>(rc(mi, 0)));
      if (hidden || d < a.lo || d > a.hi) s(mi, ni) = -INFINITY;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The kernel: grid.x = ceil(T / kBlockM) * B * H, one CTA per (query block, batch, head).
// ---------------------------------------------------------------------------------------------

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads) fwd_kernel(const FwdParams p) {
#if defined(HDAF_CUTE_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  extern __shared__ __align__(128) unsigned char smem_raw[];

  const int T = int(p.T);
  const int num_m = (T + kBlockM - 1) / kBlockM;
  const int m_block = int(blockIdx.x % num_m);
  const int64_t bh = blockIdx.x / num_m;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int tid = threadIdx.x;
  const int m0 = m_block * kBlockM;
  const Band band = make_band(p.T, p.window_left, p.window_right);

  TileArgs<Element> a;
  a.P = static_cast<const Element*>(p.P) + (b * p.Hp + (p.Hp == 1 ? 0 : h)) * p.T * p.R;
  a.pad = p.mask != nullptr ? p.mask + b * p.T : nullptr;
  a.T = T;
  a.R = int(p.R);
  a.L = int(p.L);
  a.U = int(p.U);
  a.lo = int(band.lo);
  a.hi = int(band.hi);
  a.m0 = m0;
  a.scale_log2 = float(p.scale * 1.4426950408889634);

  // (T, D) views of this (batch, head); tiles of them.
  const int64_t off = bh * p.T * kHeadDim;
  auto rows = [&](const void* ptr) {
    return make_tensor(make_gmem_ptr(static_cast<const Element*>(ptr) + off),
                       make_shape(T, Int<kHeadDim>{}), make_stride(Int<kHeadDim>{}, _1{}));
  };
  Tensor gQ = local_tile(rows(p.q), Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, 0));
  Tensor gK = local_tile(rows(p.k), Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));
  Tensor gV = local_tile(rows(p.v), Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));
  Tensor mO = make_tensor(make_gmem_ptr(static_cast<Element*>(p.out) + off),
                          make_shape(T, Int<kHeadDim>{}), make_stride(Int<kHeadDim>{}, _1{}));
  Tensor gO = local_tile(mO, Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, 0));

  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem_raw)),
                          typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(sV.data(), typename Traits::SmemLayoutVt{});
  Tensor sVtNoSwizzle = make_tensor(sV.data().get(), typename Traits::SmemLayoutVtNoSwizzle{});
  float* s_pcol = reinterpret_cast<float*>(smem_raw + (size(sQ) + 2 * size(sK)) * sizeof(Element));
  a.pcol_lo = s_pcol;
  a.pcol_hi = s_pcol + kBlockN;
  // The far-tile columns of key tile n0 into smem (plain loads: P is converted to float).
  auto load_pcol = [&](int n0) {
    for (int c = tid; c < kBlockN; c += Traits::kNThreads) {
      const int j = n0 + c;
      s_pcol[c] = j < T ? float(a.P[int64_t(j) * a.R]) : 0.f;
      s_pcol[kBlockN + c] = j < T ? float(a.P[int64_t(j) * a.R + a.R - 1]) : 0.f;
    }
  };

  // gmem -> smem partitions, and each copied element's (row, col) for the row predicates.
  typename Traits::GmemCopyQKV gmem_copy;
  auto gthr = gmem_copy.get_thread_slice(tid);
  Tensor tQgQ = gthr.partition_S(gQ);
  Tensor tQsQ = gthr.partition_D(sQ);
  Tensor tKgK = gthr.partition_S(gK);  // (CPY, CPY_N, CPY_K, key blocks)
  Tensor tKsK = gthr.partition_D(sK);
  Tensor tVgV = gthr.partition_S(gV);
  Tensor tVsV = gthr.partition_D(sV);
  Tensor tQid = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor tKVid = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));

  // MMA partitions: Q, K, V^T fragments and the fp32 output accumulator.
  typename Traits::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);            // (MMA, MMA_M, MMA_K)
  Tensor tSrK = thr_mma.partition_fragment_B(sK);            // (MMA, MMA_N, MMA_K)
  Tensor tOrVt = thr_mma.partition_fragment_B(sVtNoSwizzle);  // (MMA, MMA_D, MMA_N)
  Tensor acc_o = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  auto smem_copy_Q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma);
  auto sthr_Q = smem_copy_Q.get_thread_slice(tid);
  auto smem_copy_K = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma);
  auto sthr_K = smem_copy_K.get_thread_slice(tid);
  Tensor tSsK = sthr_K.partition_S(sK);
  auto smem_copy_V = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, mma);
  auto sthr_V = smem_copy_V.get_thread_slice(tid);
  Tensor tOsVt = sthr_V.partition_S(sVt);

  // Each S register's (row, col) in the tile, viewed as (row, col) like S itself.
  Tensor tSid = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor rc = make_tensor(tSid.data(), acc_rowcol(tSid.layout()));
  constexpr int kRows = decltype(size<0>(rc))::value;

  // Key blocks meeting the band [m0 + lo, m0 + kBlockM - 1 + hi], split into the block-aligned
  // runs far-low [n_begin, n_band), band [n_band, n_far_hi), far-high [n_far_hi, n_end).
  const cute_tiles::KeyTiles tiles =
      cute_tiles::key_tiles(m0, T, a.L, a.U, a.lo, a.hi, kBlockM, kBlockN);
  const int n_begin = tiles.begin, n_band = tiles.band, n_far_hi = tiles.far_hi, n_end = tiles.end;

  // The query rows' P[i, 0] and P[i, R-1], read once for every far tile; the softmax state.
  float prow_lo[kRows], prow_hi[kRows], row_max[kRows], row_sum[kRows];
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const int i = m0 + get<0>(rc(mi, 0));
    prow_lo[mi] = i < T ? float(a.P[int64_t(i) * a.R]) : 0.f;
    prow_hi[mi] = i < T ? float(a.P[int64_t(i) * a.R + a.R - 1]) : 0.f;
    row_max[mi] = -INFINITY;
    row_sum[mi] = 0.f;
  }

  // Prologue: Q and the first K tile in flight together; then Q into registers for good.
  copy_rows(gmem_copy, tQgQ, tQsQ, tQid, T - m0);
  if (n_begin < n_end) {
    copy_rows(gmem_copy, tKgK(_, _, _, n_begin / kBlockN), tKsK, tKVid, T - n_begin);
    load_pcol(n_begin);
  }
  sm80::cp_async_fence();
  sm80::cp_async_wait<0>();
  __syncthreads();
  copy(smem_copy_Q, sthr_Q.partition_S(sQ), sthr_Q.retile_D(tSrQ));
  clear(acc_o);
  Tensor o = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));

  for (int n0 = n_begin; n0 < n_end; n0 += kBlockN) {
    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    sm80::cp_async_wait<0>();
    __syncthreads();  // K(n0), pcol(n0) are in smem, and no warp still reads V(n0 - kBlockN)
    copy_rows(gmem_copy, tVgV(_, _, _, n0 / kBlockN), tVsV, tKVid, T - n0);
    sm80::cp_async_fence();
    gemm_a_in_regs(mma, acc_s, tSrQ, tSrK, tSsK, smem_copy_K, sthr_K);

    Tensor s = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
    a.n0 = n0;
    const bool edge =
        cute_tiles::tile_needs_mask(m0, n0, T, a.lo, a.hi, kBlockM, kBlockN, a.pad != nullptr);
    if (n0 < n_band) {
      tile_logits<kFarLo>(s, rc, prow_lo, a, edge);
    } else if (n0 < n_far_hi) {
      tile_logits<kBand>(s, rc, prow_lo, a, edge);
    } else {
      tile_logits<kFarHi>(s, rc, prow_hi, a, edge);
    }

    sm80::cp_async_wait<0>();
    __syncthreads();  // V(n0) is in smem, and no warp still reads K(n0) or pcol(n0)
    if (n0 + kBlockN < n_end) {
      copy_rows(gmem_copy, tKgK(_, _, _, n0 / kBlockN + 1), tKsK, tKVid, T - n0 - kBlockN);
      load_pcol(n0 + kBlockN);
    }
    sm80::cp_async_fence();

    // Online softmax: a row with nothing visible yet keeps max -inf and sum 0 (base 0 keeps
    // exp2 free of -inf - -inf).
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      float mx = row_max[mi];
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(s); ++ni) mx = fmaxf(mx, s(mi, ni));
      mx = quad_max(mx);
      const float base = mx == -INFINITY ? 0.f : mx;
      const float alpha = exp2f(row_max[mi] - base);
      row_max[mi] = mx;
      float sum = 0.f;
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(s); ++ni) {
        s(mi, ni) = exp2f(s(mi, ni) - base);
        sum += s(mi, ni);
      }
      row_sum[mi] = row_sum[mi] * alpha + sum;  // this thread's columns; quad-reduced at the end
      CUTE_UNROLL
      for (int di = 0; di < size<1>(o); ++di) o(mi, di) *= alpha;
    }

    Tensor pr = to_element<Element>(acc_s);
    Tensor tOrP = make_tensor(pr.data(), acc_as_a(pr.layout()));
    gemm_a_in_regs(mma, acc_o, tOrP, tOrVt, tOsVt, smem_copy_V, sthr_V);
  }

  // Epilogue: out = acc_o / l (0 for an empty row), lse = ln(sum exp(logit)) (-inf if empty).
  float* lse = static_cast<float*>(p.lse) + bh * p.T;
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const float l = quad_sum(row_sum[mi]);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    CUTE_UNROLL
    for (int di = 0; di < size<1>(o); ++di) o(mi, di) *= inv;
    const int i = m0 + get<0>(rc(mi, 0));
    if (tid % 4 == 0 && i < T) {
      lse[i] = l > 0.f ? (row_max[mi] + log2f(l)) * 0.6931471805599453f : -INFINITY;
    }
  }
  Tensor ro = to_element<Element>(acc_o);
  sm80::cp_async_wait<0>();
  __syncthreads();  // every warp is past its last read of sQ (Q) and sV: sQ becomes sO
  Tensor sO = make_tensor(sQ.data(), typename Traits::SmemLayoutQ{});
  auto smem_copy_O = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, mma);
  auto sthr_O = smem_copy_O.get_thread_slice(tid);
  copy(smem_copy_O, sthr_O.retile_S(ro), sthr_O.partition_D(sO));
  __syncthreads();
  typename Traits::GmemCopyO gmem_copy_o;
  auto gthr_o = gmem_copy_o.get_thread_slice(tid);
  Tensor tOsO = gthr_o.partition_S(sO);
  Tensor tOgO = gthr_o.partition_D(gO);
  Tensor tOrO = make_tensor<Element>(shape(tOgO));
  copy(gmem_copy_o, tOsO, tOrO);
  Tensor tOid = gthr_o.partition_D(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  CUTE_UNROLL
  for (int m = 0; m < size<1>(tOgO); ++m) {
    if (get<0>(tOid(0, m, 0)) < T - m0) {
      CUTE_UNROLL
      for (int k = 0; k < size<2>(tOgO); ++k) copy(gmem_copy_o, tOrO(_, m, k), tOgO(_, m, k));
    }
  }
#endif  // HDAF_CUTE_EMULATION || __CUDA_ARCH__ >= 800
}

template <class Traits>
cudaError_t launch(const FwdParams& p, cudaStream_t stream) {
  constexpr int kSmem = Traits::kSmemBytes;
  auto kernel = &fwd_kernel<Traits>;
  if (kSmem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (err != cudaSuccess) return err;
  }
  const int64_t blocks = (p.T + Traits::kBlockM - 1) / Traits::kBlockM * p.B * p.H;
  HDAF_LAUNCH(kernel, unsigned(blocks), Traits::kNThreads, kSmem, stream, p);
  return cudaGetLastError();
}

}  // namespace cute_fwd
}  // namespace cuda
}  // namespace hdaf

// One instantiation unit per (dtype, head dim): scalar_t is the launcher's CUDA type,
// Element the CuTe one, then the tile configuration (query rows, key rows, warps).
#define HDAF_CUTE_DEFINE_FWD(scalar_t, Element, D, BM, BN, WARPS)                                \
  namespace hdaf {                                                                                \
  namespace cuda {                                                                                \
  template <>                                                                                     \
  size_t delta_fwd_cute_smem_bytes<scalar_t, D>() {                                               \
    return cute_fwd::FwdTraits<Element, D, BM, BN, WARPS>::kSmemBytes;                            \
  }                                                                                               \
  template <>                                                                                     \
  cudaError_t delta_fwd_cute_launch<scalar_t, D>(const FwdParams& p, cudaStream_t stream) {       \
    return cute_fwd::launch<cute_fwd::FwdTraits<Element, D, BM, BN, WARPS>>(p, stream);           \
  }                                                                                               \
  }                                                                                               \
  }
