// Backward kernels of hdaf::delta_attention on CuTe (CUTLASS 4.x), FlashAttention-2 style, sm_80+.
// Spec: docs/delta_attention.md ("Backward"). OPT-IN like the forward (setup.py: HDAF_BUILD_CUTE=1),
// served only by the op hdaf::cuda_cute_delta_attention_backward, never by `auto`; compile-verified
// only, no GPU has run it yet. Included by the instantiation units bwd_cute_*.cu, which the host
// emulation (csrc/cuda/host_emulation/bwd_emulation.cpp) also compiles for the CPU with
// HDAF_CUTE_EMULATION defined (the SM80 operations through the `sm80` alias, as in the forward).
//
// Three launches, no atomics (every output element has one writer; deterministic):
//   dot     D_i = dout_i . out_i, one warp per row.
//   dQ      one CTA per (query block, batch, head), warps stacked along the query rows; walks the
//           key tiles the forward walks (cute_tiles::key_tiles): S = Q K^T, dPv = dO V^T,
//           p = exp2(S' - lse2), dS = p (dPv - D), dQ += dS K. Q and dO stay in smem; K and V
//           in two smem stages (tile n+1 loads with cp.async under tile n).
//   dK/dV   one CTA per (key block, batch, head), in the transposed orientation (S^T = K Q^T:
//           the keys are the MMA's M, warps stacked along them, a key's row lives in one quad);
//           walks the query tiles that see its keys (cute_tiles::query_tiles): dV += p^T dO,
//           dK += dS^T Q. K and V stay in smem; Q, dO and the query vectors (lse, D and the
//           far-tile terms P[i, 0], P[i, R-1]) in two stages.
//   bias    as in the forward: far tiles (every pair in bucket 0, or every pair in R-1) add a key
//           value minus a query value, one from registers (the CTA's own rows), one from smem;
//           only band tiles gather P per pair.
//   dP      dP[j, r(i,j)] += scale dS_ij (key rows, dK/dV pass) and dP[i, r(i,j)] -= scale dS_ij
//           (query rows, dQ pass) into two float32 buffers. A row's edge buckets 0 and R-1 are
//           sums (far tiles: whole rows of dS; band tiles: the clipped pairs) kept in registers,
//           quad-reduced and stored once at the end. Every middle bucket 0 < r < R-1 of a row is
//           one offset j - i, i.e. one pair, visited once: a plain store, no read-modify-write.
//   mask    as in the forward: only tiles crossing a window / causal edge or the sequence end,
//           and every tile with a key padding mask, compare positions. A row with no visible key
//           (lse = -inf) and rows past the end take lse2 = +inf: p = 0 there, whatever S is.
#pragma once

#include "flash_fwd.cuh"

namespace hdaf {
namespace cuda {
namespace cute_bwd {

using namespace cute;
using namespace kcommon;
using cute_fwd::TileArgs;

constexpr float kLog2e = 1.4426950408889634f;

template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_>
struct BwdTraits {
  using Element = Element_;  // cutlass::half_t or cutlass::bfloat16_t
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // query rows of a tile
  static constexpr int kBlockN = kBlockN_;  // key rows of a tile
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = 32 * kNWarps;
  static_assert(kHeadDim % 64 == 0, "the smem swizzle atom is 64 elements wide");
  static_assert(kBlockM % (16 * kNWarps) == 0, "dQ: each warp owns whole 16-row MMA tiles");
  static_assert(kBlockN % (16 * kNWarps) == 0, "dK/dV: each warp owns whole 16-row MMA tiles");

  using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::half_t>,
                                     MMA_Atom<sm80::SM80_16x8x16_F32F16F16F32_TN>,
                                     MMA_Atom<sm80::SM80_16x8x16_F32BF16BF16F32_TN>>;
  using TiledMma = TiledMMA<MmaAtom, Layout<Shape<Int<kNWarps>, _1, _1>>,
                            Tile<Int<16 * kNWarps>, _16, _16>>;

  using SmemLayoutAtom =
      decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
  using SmemLayoutM =  // Q, dO tiles
      decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutN =  // K, V tiles
      decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  // Transposed views (head dim, rows): the B operands of dV += p^T dO, dK += dS^T Q, dQ += dS K.
  using SmemLayoutMt = decltype(composition(
      SmemLayoutM{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockM>>{}, GenRowMajor{})));
  using SmemLayoutMtNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutMt{}));
  using SmemLayoutNt = decltype(composition(
      SmemLayoutN{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));
  using SmemLayoutNtNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutNt{}));

  using SmemCopyAtom = Copy_Atom<sm80::SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomT = Copy_Atom<sm80::SM75_U16x8_LDSM_T, Element>;
  using SmemCopyAtomO = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<128>, Element>;

  static constexpr int kElemsPer16B = 16 / int(sizeof(Element));
  static constexpr int kThreadsPerRow = 64 / kElemsPer16B;
  using GmemThreads = Layout<Shape<Int<kNThreads / kThreadsPerRow>, Int<kThreadsPerRow>>,
                             Stride<Int<kThreadsPerRow>, _1>>;
  using GmemCopy = decltype(make_tiled_copy(
      Copy_Atom<sm80::SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{}, GmemThreads{},
      Layout<Shape<_1, Int<kElemsPer16B>>>{}));
  using GmemCopyO = decltype(make_tiled_copy(Copy_Atom<UniversalCopy<cute::uint128_t>, Element>{},
                                             GmemThreads{}, Layout<Shape<_1, Int<kElemsPer16B>>>{}));

  static constexpr int kTileM = kBlockM * kHeadDim;  // elements of a Q / dO tile
  static constexpr int kTileN = kBlockN * kHeadDim;  // elements of a K / V tile
  // dQ: Q, dO; two stages of K, V and of the key columns P[j, 0], P[j, R-1] (float32).
  static constexpr int kSmemDq =
      (2 * kTileM + 4 * kTileN) * int(sizeof(Element)) + 2 * 2 * kBlockN * int(sizeof(float));
  // dK/dV: K, V; two stages of Q, dO and of the query vectors lse2, D, P[i, 0], P[i, R-1].
  static constexpr int kSmemDkDv =
      (2 * kTileN + 4 * kTileM) * int(sizeof(Element)) + 2 * 4 * kBlockM * int(sizeof(float));
  static constexpr int kSmemBytes = kSmemDq > kSmemDkDv ? kSmemDq : kSmemDkDv;
};

// acc += A B^T with both operands read from smem by ldmatrix, one k-slice ahead of the MMAs.
template <class Mma, class Acc, class FragA, class FragB, class SmemA, class SmemB, class CopyA,
          class ThrA, class CopyB, class ThrB>
__device__ __forceinline__ void gemm_smem(Mma const& mma, Acc& acc, FragA& tCrA, FragB& tCrB,
                                          SmemA const& tCsA, SmemB const& tCsB, CopyA const& copy_a,
                                          ThrA const& thr_a, CopyB const& copy_b, ThrB const& thr_b) {
  Tensor tCrA_view = thr_a.retile_D(tCrA);
  Tensor tCrB_view = thr_b.retile_D(tCrB);
  copy(copy_a, tCsA(_, _, 0), tCrA_view(_, _, 0));
  copy(copy_b, tCsB(_, _, 0), tCrB_view(_, _, 0));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(tCrA); ++k) {
    if (k + 1 < size<2>(tCrA)) {
      copy(copy_a, tCsA(_, _, k + 1), tCrA_view(_, _, k + 1));
      copy(copy_b, tCsB(_, _, k + 1), tCrB_view(_, _, k + 1));
    }
    cute::gemm(mma, tCrA(_, _, k), tCrB(_, _, k), acc);
  }
}

// The transposed tile of the dK/dV pass, rows = keys j, columns = queries i: S^T -> log2-domain
// logits (q.k + bias) * scale * log2(e), -inf where not visible (only when `edge`). pkey: the key
// rows' P[j, e] of a far tile; a.pcol_lo / pcol_hi: the query columns' P[i, e] (smem).
template <int kKind, typename Element, class S, class RC, int kRows>
__device__ __forceinline__ void tile_logits_t(S& s, RC const& rc, const float (&pkey)[kRows],
                                              TileArgs<Element> const& a, bool edge) {
  constexpr int kCols = decltype(size<1>(s))::value;
  const float* pq = kKind == kFarLo ? a.pcol_lo : a.pcol_hi;
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const int j = a.n0 + get<0>(rc(mi, 0));
    CUTE_UNROLL
    for (int ni = 0; ni < kCols; ++ni) {
      const int i = a.m0 + get<1>(rc(0, ni));
      float bias;
      if (kKind == kBand) {
        const int r = min(max(j - i, -a.L), a.U) + a.L;
        bias = (i < a.T && j < a.T)
                   ? float(a.P[int64_t(j) * a.R + r]) - float(a.P[int64_t(i) * a.R + r])
                   : 0.f;
      } else {
        bias = pkey[mi] - pq[get<1>(rc(0, ni))];
      }
      s(mi, ni) = (s(mi, ni) + bias) * a.scale_log2;
    }
  }
  if (!edge) return;
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const int j = a.n0 + get<0>(rc(mi, 0));
    const bool hidden = j >= a.T || (a.pad != nullptr && a.pad[j]);
    CUTE_UNROLL
    for (int ni = 0; ni < kCols; ++ni) {
      const int i = a.m0 + get<1>(rc(0, ni));
      const int d = j - i;
      if (hidden || i >= a.T || d < a.lo || d > a.hi) s(mi, ni) = -INFINITY;
    }
  }
}

// One tile's share of the bucket sums of dS for the rows this thread holds. kKeyRows: rows are
// keys (dK/dV pass, offset j - i = row - col) or queries (dQ pass, col - row). Far tiles add whole
// rows to the edge sums; band tiles sort each pair: edge buckets into the sums, a middle bucket
// (one pair per row and bucket) stored at once as sign * scale * dS.
template <int kKind, bool kKeyRows, class S, class RC, int kRows>
__device__ __forceinline__ void bucket_sums(S const& ds, RC const& rc, int row0, int col0, int T,
                                            int L, int U, int R, float (&edge_lo)[kRows],
                                            float (&edge_hi)[kRows], float* dp_rows, float mul) {
  constexpr int kCols = decltype(size<1>(ds))::value;
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const int row = row0 + get<0>(rc(mi, 0));
    if constexpr (kKind != kBand) {
      float sum = 0.f;
      CUTE_UNROLL
      for (int ni = 0; ni < kCols; ++ni) sum += ds(mi, ni);
      (kKind == kFarLo ? edge_lo : edge_hi)[mi] += sum;
    } else {
      CUTE_UNROLL
      for (int ni = 0; ni < kCols; ++ni) {
        const int col = col0 + get<1>(rc(0, ni));
        const int d = kKeyRows ? row - col : col - row;  // j - i
        const int r = min(max(d, -L), U) + L;
        if (r == 0) {
          edge_lo[mi] += ds(mi, ni);
        } else if (r == R - 1) {
          edge_hi[mi] += ds(mi, ni);
        } else if (row < T && col < T) {
          dp_rows[int64_t(row) * R + r] = mul * ds(mi, ni);
        }
      }
    }
  }
}

// The edge buckets of each row, quad-reduced, one lane per row storing: dp[row, 0] and
// dp[row, R-1] = mul * sum. With R = 1 both are bucket 0, which takes both sums (far-high tiles,
// every pair j - i >= U = 0, added theirs to the high one).
template <class RC, int kRows>
__device__ __forceinline__ void store_edge_sums(RC const& rc, int row0, int T, int R, int tid,
                                                float (&edge_lo)[kRows], float (&edge_hi)[kRows],
                                                float* dp_rows, float mul) {
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const float lo = quad_sum(edge_lo[mi]);
    const float hi = quad_sum(edge_hi[mi]);
    const int row = row0 + get<0>(rc(mi, 0));
    if (tid % 4 == 0 && row < T) {
      if (R > 1) {
        dp_rows[int64_t(row) * R] = mul * lo;
        dp_rows[int64_t(row) * R + R - 1] = mul * hi;
      } else {
        dp_rows[int64_t(row) * R] = mul * (lo + hi);
      }
    }
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

// What both passes read about their (batch, head).
template <class Traits>
__device__ __forceinline__ TileArgs<typename Traits::Element> tile_args(const CuteBwdParams& p,
                                                                        int64_t b, int64_t h) {
  using Element = typename Traits::Element;
  const Band band = make_band(p.T, p.window_left, p.window_right);
  TileArgs<Element> a;
  a.P = static_cast<const Element*>(p.P) + (b * p.Hp + (p.Hp == 1 ? 0 : h)) * p.T * p.R;
  a.pad = p.mask != nullptr ? p.mask + b * p.T : nullptr;
  a.T = int(p.T);
  a.R = int(p.R);
  a.L = int(p.L);
  a.U = int(p.U);
  a.lo = int(band.lo);
  a.hi = int(band.hi);
  a.m0 = a.n0 = 0;
  a.scale_log2 = float(p.scale * 1.4426950408889634);
  return a;
}

// lse in the log2 domain; +inf for a row that sees no key (lse = -inf) or past the end: p = 0.
__device__ __forceinline__ float lse2_of(const float* lse, int i, int T) {
  const float l = i < T ? lse[i] : -INFINITY;
  return l == -INFINITY ? INFINITY : l * kLog2e;
}

// ---------------------------------------------------------------------------------------------
// D_i = dout_i . out_i: grid.x = ceil(B*H*T / kNWarps), one warp per row.
// ---------------------------------------------------------------------------------------------

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads) dot_kernel(const CuteBwdParams p) {
  using Element = typename Traits::Element;
  constexpr int D = Traits::kHeadDim;
  const int64_t row = int64_t(blockIdx.x) * Traits::kNWarps + threadIdx.x / 32;
  if (row >= p.B * p.H * p.T) return;  // whole warps
  const int lane = threadIdx.x % 32;
  const Element* dout = static_cast<const Element*>(p.grad_out) + row * D;
  const Element* out = static_cast<const Element*>(p.out) + row * D;
  float s = 0.f;
  CUTE_UNROLL
  for (int d = lane; d < D; d += 32) s += float(dout[d]) * float(out[d]);
  CUTE_UNROLL
  for (int m = 16; m > 0; m /= 2) s += __shfl_xor_sync(0xffffffffu, s, m);
  if (lane == 0) static_cast<float*>(p.D)[row] = s;
}

// ---------------------------------------------------------------------------------------------
// dQ and the query-row half of dP: grid.x = ceil(T / kBlockM) * B * H.
// ---------------------------------------------------------------------------------------------

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads) dq_kernel(const CuteBwdParams p) {
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
  TileArgs<Element> a = tile_args<Traits>(p, b, h);
  a.m0 = m0;

  const int64_t off = bh * p.T * kHeadDim;
  auto rows = [&](const void* ptr) {
    return make_tensor(make_gmem_ptr(static_cast<const Element*>(ptr) + off),
                       make_shape(T, Int<kHeadDim>{}), make_stride(Int<kHeadDim>{}, _1{}));
  };
  Tensor gQ = local_tile(rows(p.q), Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, 0));
  Tensor gdO =
      local_tile(rows(p.grad_out), Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, 0));
  Tensor gK = local_tile(rows(p.k), Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));
  Tensor gV = local_tile(rows(p.v), Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));
  Tensor mdQ = make_tensor(make_gmem_ptr(static_cast<Element*>(p.grad_q) + off),
                           make_shape(T, Int<kHeadDim>{}), make_stride(Int<kHeadDim>{}, _1{}));

  Element* smem = reinterpret_cast<Element*>(smem_raw);
  Tensor sQ = make_tensor(make_smem_ptr(smem), typename Traits::SmemLayoutM{});
  Tensor sdO = make_tensor(make_smem_ptr(smem + Traits::kTileM), typename Traits::SmemLayoutM{});
  Element* kv_base = smem + 2 * Traits::kTileM;  // stage s: K at 2s, V at 2s + 1 (tiles)
  auto sK_at = [&](int s) {
    return make_tensor(make_smem_ptr(kv_base + 2 * s * Traits::kTileN), typename Traits::SmemLayoutN{});
  };
  auto sV_at = [&](int s) {
    return make_tensor(make_smem_ptr(kv_base + (2 * s + 1) * Traits::kTileN),
                       typename Traits::SmemLayoutN{});
  };
  auto sKt_at = [&](int s) {
    return make_tensor(make_smem_ptr(kv_base + 2 * s * Traits::kTileN),
                       typename Traits::SmemLayoutNt{});
  };
  float* s_pcol = reinterpret_cast<float*>(kv_base + 4 * Traits::kTileN);  // [stage][lo, hi][kBlockN]

  typename Traits::GmemCopy gmem_copy;
  auto gthr = gmem_copy.get_thread_slice(tid);
  Tensor tMid = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor tNid = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  Tensor tKgK = gthr.partition_S(gK);  // (CPY, CPY_N, CPY_K, key blocks)
  Tensor tVgV = gthr.partition_S(gV);
  // Key tile n0 into stage s: K, V by cp.async, the far-tile columns by plain loads.
  auto load_kv = [&](int n0, int s) {
    Tensor tKsK = gthr.partition_D(sK_at(s));
    Tensor tVsV = gthr.partition_D(sV_at(s));
    copy_rows(gmem_copy, tKgK(_, _, _, n0 / kBlockN), tKsK, tNid, T - n0);
    copy_rows(gmem_copy, tVgV(_, _, _, n0 / kBlockN), tVsV, tNid, T - n0);
    float* pc = s_pcol + s * 2 * kBlockN;
    for (int c = tid; c < kBlockN; c += Traits::kNThreads) {
      const int j = n0 + c;
      pc[c] = j < T ? float(a.P[int64_t(j) * a.R]) : 0.f;
      pc[kBlockN + c] = j < T ? float(a.P[int64_t(j) * a.R + a.R - 1]) : 0.f;
    }
  };

  typename Traits::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);    // (MMA, MMA_M, MMA_K)
  Tensor tSrdO = thr_mma.partition_fragment_A(sdO);
  Tensor tSrK = thr_mma.partition_fragment_B(sK_at(0));  // (MMA, MMA_N, MMA_K)
  Tensor tSrV = thr_mma.partition_fragment_B(sV_at(0));
  Tensor tQrKt = thr_mma.partition_fragment_B(
      make_tensor(make_smem_ptr(kv_base), typename Traits::SmemLayoutNtNoSwizzle{}));  // (MMA, MMA_D, MMA_N)
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

  const cute_tiles::KeyTiles tiles =
      cute_tiles::key_tiles(m0, T, a.L, a.U, a.lo, a.hi, kBlockM, kBlockN);
  const int n_begin = tiles.begin, n_band = tiles.band, n_far_hi = tiles.far_hi, n_end = tiles.end;

  const float* lse = static_cast<const float*>(p.lse) + bh * p.T;
  const float* Dvec = static_cast<const float*>(p.D) + bh * p.T;
  float* dp_rows = static_cast<float*>(p.dP_rows) + bh * p.T * p.R;
  float prow_lo[kRows], prow_hi[kRows], lse2[kRows], drow[kRows], edge_lo[kRows], edge_hi[kRows];
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const int i = m0 + get<0>(rc(mi, 0));
    prow_lo[mi] = i < T ? float(a.P[int64_t(i) * a.R]) : 0.f;
    prow_hi[mi] = i < T ? float(a.P[int64_t(i) * a.R + a.R - 1]) : 0.f;
    lse2[mi] = lse2_of(lse, i, T);
    drow[mi] = i < T ? Dvec[i] : 0.f;
    edge_lo[mi] = edge_hi[mi] = 0.f;
  }

  {
    Tensor tQgQ = gthr.partition_S(gQ);
    Tensor tQsQ = gthr.partition_D(sQ);
    Tensor tdOgdO = gthr.partition_S(gdO);
    Tensor tdOsdO = gthr.partition_D(sdO);
    copy_rows(gmem_copy, tQgQ, tQsQ, tMid, T - m0);
    copy_rows(gmem_copy, tdOgdO, tdOsdO, tMid, T - m0);
  }
  if (n_begin < n_end) load_kv(n_begin, 0);
  sm80::cp_async_fence();
  clear(acc_dq);

  for (int n0 = n_begin, it = 0; n0 < n_end; n0 += kBlockN, ++it) {
    const int stage = it & 1;
    sm80::cp_async_wait<0>();
    __syncthreads();  // tile n0 is in smem, and no warp still reads the other stage
    if (n0 + kBlockN < n_end) load_kv(n0 + kBlockN, stage ^ 1);
    sm80::cp_async_fence();

    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor acc_dp = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    clear(acc_dp);
    gemm_smem(mma, acc_s, tSrQ, tSrK, tSsQ, thr_b.partition_S(sK_at(stage)), copy_a, thr_a, copy_b,
              thr_b);
    gemm_smem(mma, acc_dp, tSrdO, tSrV, tSsdO, thr_b.partition_S(sV_at(stage)), copy_a, thr_a,
              copy_b, thr_b);

    Tensor s = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
    Tensor dp = make_tensor(acc_dp.data(), acc_rowcol(acc_dp.layout()));
    a.n0 = n0;
    a.pcol_lo = s_pcol + stage * 2 * kBlockN;
    a.pcol_hi = a.pcol_lo + kBlockN;
    const bool edge =
        cute_tiles::tile_needs_mask(m0, n0, T, a.lo, a.hi, kBlockM, kBlockN, a.pad != nullptr);
    const int kind = n0 < n_band ? kFarLo : n0 < n_far_hi ? kBand : kFarHi;
    if (kind == kFarLo) {
      cute_fwd::tile_logits<kFarLo>(s, rc, prow_lo, a, edge);
    } else if (kind == kBand) {
      cute_fwd::tile_logits<kBand>(s, rc, prow_lo, a, edge);
    } else {
      cute_fwd::tile_logits<kFarHi>(s, rc, prow_hi, a, edge);
    }
    // p = exp2(logit2 - lse2); dS = p (dPv - D), into acc_dp.
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(s); ++ni) {
        const float pr = exp2f(s(mi, ni) - lse2[mi]);
        dp(mi, ni) = pr * (dp(mi, ni) - drow[mi]);
      }
    }
    const float neg_scale = -float(p.scale);
    if (kind == kFarLo) {
      bucket_sums<kFarLo, false>(dp, rc, m0, n0, T, a.L, a.U, a.R, edge_lo, edge_hi, dp_rows, neg_scale);
    } else if (kind == kBand) {
      bucket_sums<kBand, false>(dp, rc, m0, n0, T, a.L, a.U, a.R, edge_lo, edge_hi, dp_rows, neg_scale);
    } else {
      bucket_sums<kFarHi, false>(dp, rc, m0, n0, T, a.L, a.U, a.R, edge_lo, edge_hi, dp_rows, neg_scale);
    }

    Tensor dsr = to_element<Element>(acc_dp);
    Tensor tQrdS = make_tensor(dsr.data(), acc_as_a(dsr.layout()));
    Tensor sKt = sKt_at(stage);
    gemm_a_in_regs(mma, acc_dq, tQrdS, tQrKt, thr_bt.partition_S(sKt), copy_bt, thr_bt);
  }

  store_edge_sums(rc, m0, T, a.R, tid, edge_lo, edge_hi, dp_rows, -float(p.scale));
  sm80::cp_async_wait<0>();
  __syncthreads();  // every warp is past its last read of sQ
  store_tile<Traits, typename Traits::SmemLayoutM>(
      acc_dq, float(p.scale), smem,
      local_tile(mdQ, Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, 0)), T - m0, tid);
#endif  // HDAF_CUTE_EMULATION || __CUDA_ARCH__ >= 800
}

// ---------------------------------------------------------------------------------------------
// dK, dV and the key-row half of dP: grid.x = ceil(T / kBlockN) * B * H.
// ---------------------------------------------------------------------------------------------

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads) dkdv_kernel(const CuteBwdParams p) {
#if defined(HDAF_CUTE_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  extern __shared__ __align__(128) unsigned char smem_raw[];

  const int T = int(p.T);
  const int num_n = (T + kBlockN - 1) / kBlockN;
  const int n_block = int(blockIdx.x % num_n);
  const int64_t bh = blockIdx.x / num_n;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int tid = threadIdx.x;
  const int n0 = n_block * kBlockN;
  TileArgs<Element> a = tile_args<Traits>(p, b, h);
  a.n0 = n0;

  const int64_t off = bh * p.T * kHeadDim;
  auto rows = [&](const void* ptr) {
    return make_tensor(make_gmem_ptr(static_cast<const Element*>(ptr) + off),
                       make_shape(T, Int<kHeadDim>{}), make_stride(Int<kHeadDim>{}, _1{}));
  };
  auto out_rows = [&](void* ptr) {
    return make_tensor(make_gmem_ptr(static_cast<Element*>(ptr) + off),
                       make_shape(T, Int<kHeadDim>{}), make_stride(Int<kHeadDim>{}, _1{}));
  };
  Tensor gK = local_tile(rows(p.k), Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, 0));
  Tensor gV = local_tile(rows(p.v), Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, 0));
  Tensor gQ = local_tile(rows(p.q), Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(_, 0));
  Tensor gdO = local_tile(rows(p.grad_out), Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(_, 0));

  Element* smem = reinterpret_cast<Element*>(smem_raw);
  Tensor sK = make_tensor(make_smem_ptr(smem), typename Traits::SmemLayoutN{});
  Tensor sV = make_tensor(make_smem_ptr(smem + Traits::kTileN), typename Traits::SmemLayoutN{});
  Element* qdo_base = smem + 2 * Traits::kTileN;  // stage s: Q at 2s, dO at 2s + 1 (tiles)
  auto stage_tile = [&](int s, int which) { return qdo_base + (2 * s + which) * Traits::kTileM; };
  float* s_vec = reinterpret_cast<float*>(qdo_base + 4 * Traits::kTileM);  // [stage][4][kBlockM]

  const float* lse = static_cast<const float*>(p.lse) + bh * p.T;
  const float* Dvec = static_cast<const float*>(p.D) + bh * p.T;
  float* dp_keys = static_cast<float*>(p.dP_heads) + bh * p.T * p.R;

  typename Traits::GmemCopy gmem_copy;
  auto gthr = gmem_copy.get_thread_slice(tid);
  Tensor tMid = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor tNid = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  Tensor tQgQ = gthr.partition_S(gQ);  // (CPY, CPY_M, CPY_K, query blocks)
  Tensor tdOgdO = gthr.partition_S(gdO);
  // Query tile m0 into stage s: Q, dO by cp.async; lse2, D, P[i, 0], P[i, R-1] by plain loads.
  auto load_q = [&](int m0, int s) {
    Tensor tQsQ = gthr.partition_D(
        make_tensor(make_smem_ptr(stage_tile(s, 0)), typename Traits::SmemLayoutM{}));
    Tensor tdOsdO = gthr.partition_D(
        make_tensor(make_smem_ptr(stage_tile(s, 1)), typename Traits::SmemLayoutM{}));
    copy_rows(gmem_copy, tQgQ(_, _, _, m0 / kBlockM), tQsQ, tMid, T - m0);
    copy_rows(gmem_copy, tdOgdO(_, _, _, m0 / kBlockM), tdOsdO, tMid, T - m0);
    float* v = s_vec + s * 4 * kBlockM;
    for (int c = tid; c < kBlockM; c += Traits::kNThreads) {
      const int i = m0 + c;
      v[c] = lse2_of(lse, i, T);
      v[kBlockM + c] = i < T ? Dvec[i] : 0.f;
      v[2 * kBlockM + c] = i < T ? float(a.P[int64_t(i) * a.R]) : 0.f;
      v[3 * kBlockM + c] = i < T ? float(a.P[int64_t(i) * a.R + a.R - 1]) : 0.f;
    }
  };

  typename Traits::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor tSrK = thr_mma.partition_fragment_A(sK);  // (MMA, MMA_N, MMA_K): keys are M here
  Tensor tSrV = thr_mma.partition_fragment_A(sV);
  Tensor sQ0 = make_tensor(make_smem_ptr(stage_tile(0, 0)), typename Traits::SmemLayoutM{});
  Tensor tSrQ = thr_mma.partition_fragment_B(sQ0);  // (MMA, MMA_Mq, MMA_K)
  Tensor tSrdO = thr_mma.partition_fragment_B(sQ0);
  Tensor sQt0 = make_tensor(make_smem_ptr(stage_tile(0, 0)), typename Traits::SmemLayoutMtNoSwizzle{});
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

  const cute_tiles::QueryTiles tiles = cute_tiles::query_tiles(n0, T, a.lo, a.hi, kBlockM, kBlockN);

  float pkey_lo[kRows], pkey_hi[kRows], edge_lo[kRows], edge_hi[kRows];
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const int j = n0 + get<0>(rc(mi, 0));
    pkey_lo[mi] = j < T ? float(a.P[int64_t(j) * a.R]) : 0.f;
    pkey_hi[mi] = j < T ? float(a.P[int64_t(j) * a.R + a.R - 1]) : 0.f;
    edge_lo[mi] = edge_hi[mi] = 0.f;
  }

  {
    Tensor tKgK = gthr.partition_S(gK);
    Tensor tKsK = gthr.partition_D(sK);
    Tensor tVgV = gthr.partition_S(gV);
    Tensor tVsV = gthr.partition_D(sV);
    copy_rows(gmem_copy, tKgK, tKsK, tNid, T - n0);
    copy_rows(gmem_copy, tVgV, tVsV, tNid, T - n0);
  }
  if (tiles.begin < tiles.end) load_q(tiles.begin, 0);
  sm80::cp_async_fence();
  clear(acc_dk);
  clear(acc_dv);

  for (int m0 = tiles.begin, it = 0; m0 < tiles.end; m0 += kBlockM, ++it) {
    const int stage = it & 1;
    sm80::cp_async_wait<0>();
    __syncthreads();  // tile m0 is in smem, and no warp still reads the other stage
    if (m0 + kBlockM < tiles.end) load_q(m0 + kBlockM, stage ^ 1);
    sm80::cp_async_fence();

    Tensor sQ = make_tensor(make_smem_ptr(stage_tile(stage, 0)), typename Traits::SmemLayoutM{});
    Tensor sdO = make_tensor(make_smem_ptr(stage_tile(stage, 1)), typename Traits::SmemLayoutM{});
    Tensor sQt = make_tensor(make_smem_ptr(stage_tile(stage, 0)), typename Traits::SmemLayoutMt{});
    Tensor sdOt = make_tensor(make_smem_ptr(stage_tile(stage, 1)), typename Traits::SmemLayoutMt{});
    const float* vec = s_vec + stage * 4 * kBlockM;  // lse2, D, P[i, 0], P[i, R-1]

    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockN>, Int<kBlockM>>{});
    Tensor acc_dp = partition_fragment_C(mma, Shape<Int<kBlockN>, Int<kBlockM>>{});
    clear(acc_s);
    clear(acc_dp);
    gemm_smem(mma, acc_s, tSrK, tSrQ, tSsK, thr_b.partition_S(sQ), copy_a, thr_a, copy_b, thr_b);
    gemm_smem(mma, acc_dp, tSrV, tSrdO, tSsV, thr_b.partition_S(sdO), copy_a, thr_a, copy_b, thr_b);

    Tensor s = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
    Tensor dp = make_tensor(acc_dp.data(), acc_rowcol(acc_dp.layout()));
    a.m0 = m0;
    a.pcol_lo = vec + 2 * kBlockM;
    a.pcol_hi = vec + 3 * kBlockM;
    const bool edge =
        cute_tiles::tile_needs_mask(m0, n0, T, a.lo, a.hi, kBlockM, kBlockN, a.pad != nullptr) ||
        m0 + kBlockM > T;
    const int kind = cute_tiles::tile_kind(m0, n0, a.L, a.U, kBlockM, kBlockN);
    if (kind == kFarLo) {
      tile_logits_t<kFarLo>(s, rc, pkey_lo, a, edge);
    } else if (kind == kBand) {
      tile_logits_t<kBand>(s, rc, pkey_lo, a, edge);
    } else {
      tile_logits_t<kFarHi>(s, rc, pkey_hi, a, edge);
    }
    // p^T = exp2(logit2 - lse2_i) into acc_s, dS^T = p^T (dPv^T - D_i) into acc_dp.
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(s); ++ni) {
        const int c = get<1>(rc(0, ni));
        const float pr = exp2f(s(mi, ni) - vec[c]);
        s(mi, ni) = pr;
        dp(mi, ni) = pr * (dp(mi, ni) - vec[kBlockM + c]);
      }
    }
    const float scale = float(p.scale);
    if (kind == kFarLo) {
      bucket_sums<kFarLo, true>(dp, rc, n0, m0, T, a.L, a.U, a.R, edge_lo, edge_hi, dp_keys, scale);
    } else if (kind == kBand) {
      bucket_sums<kBand, true>(dp, rc, n0, m0, T, a.L, a.U, a.R, edge_lo, edge_hi, dp_keys, scale);
    } else {
      bucket_sums<kFarHi, true>(dp, rc, n0, m0, T, a.L, a.U, a.R, edge_lo, edge_hi, dp_keys, scale);
    }

    // dV += p^T dO, dK += dS^T Q: the B operands dO^T, Q^T through ldmatrix.trans.
    Tensor pr = to_element<Element>(acc_s);
    Tensor tDrP = make_tensor(pr.data(), acc_as_a(pr.layout()));
    gemm_a_in_regs(mma, acc_dv, tDrP, tDrdOt, thr_bt.partition_S(sdOt), copy_bt, thr_bt);
    Tensor dsr = to_element<Element>(acc_dp);
    Tensor tDrdS = make_tensor(dsr.data(), acc_as_a(dsr.layout()));
    gemm_a_in_regs(mma, acc_dk, tDrdS, tDrQt, thr_bt.partition_S(sQt), copy_bt, thr_bt);
  }

  store_edge_sums(rc, n0, T, a.R, tid, edge_lo, edge_hi, dp_keys, float(p.scale));
  sm80::cp_async_wait<0>();
  __syncthreads();  // every warp is past its last read of sK and sV
  store_tile<Traits, typename Traits::SmemLayoutN>(
      acc_dv, 1.f, smem + Traits::kTileN,
      local_tile(out_rows(p.grad_v), Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, 0)),
      T - n0, tid);
  store_tile<Traits, typename Traits::SmemLayoutN>(
      acc_dk, float(p.scale), smem,
      local_tile(out_rows(p.grad_k), Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, 0)),
      T - n0, tid);
#endif  // HDAF_CUTE_EMULATION || __CUDA_ARCH__ >= 800
}

template <class Kernel>
cudaError_t allow_smem(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <class Traits>
cudaError_t launch(const CuteBwdParams& p, cudaStream_t stream) {
  auto dot = &dot_kernel<Traits>;
  auto dq = &dq_kernel<Traits>;
  auto dkdv = &dkdv_kernel<Traits>;
  cudaError_t err = allow_smem(dq, Traits::kSmemDq);
  if (err == cudaSuccess) err = allow_smem(dkdv, Traits::kSmemDkDv);
  if (err != cudaSuccess) return err;
  const int64_t rows = p.B * p.H * p.T;
  HDAF_LAUNCH(dot, unsigned((rows + Traits::kNWarps - 1) / Traits::kNWarps), Traits::kNThreads, 0,
              stream, p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  const int64_t bh = p.B * p.H;
  HDAF_LAUNCH(dq, unsigned((p.T + Traits::kBlockM - 1) / Traits::kBlockM * bh), Traits::kNThreads,
              Traits::kSmemDq, stream, p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  HDAF_LAUNCH(dkdv, unsigned((p.T + Traits::kBlockN - 1) / Traits::kBlockN * bh),
              Traits::kNThreads, Traits::kSmemDkDv, stream, p);
  return cudaGetLastError();
}

}  // namespace cute_bwd
}  // namespace cuda
}  // namespace hdaf

// One instantiation unit per (dtype, head dim): scalar_t is the launcher's CUDA type, Element the
// CuTe one, then the tile configuration (query rows, key rows, warps) both passes use.
#define HDAF_CUTE_DEFINE_BWD(scalar_t, Element, D, BM, BN, WARPS)                                \
  namespace hdaf {                                                                                \
  namespace cuda {                                                                                \
  template <>                                                                                     \
  size_t delta_bwd_cute_smem_bytes<scalar_t, D>() {                                               \
    return cute_bwd::BwdTraits<Element, D, BM, BN, WARPS>::kSmemBytes;                            \
  }                                                                                               \
  template <>                                                                                     \
  cudaError_t delta_bwd_cute_launch<scalar_t, D>(const CuteBwdParams& p, cudaStream_t stream) {   \
    return cute_bwd::launch<cute_bwd::BwdTraits<Element, D, BM, BN, WARPS>>(p, stream);           \
  }                                                                                               \
  }                                                                                               \
  }
