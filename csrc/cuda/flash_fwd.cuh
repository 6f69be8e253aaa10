// Forward kernel of hdaf::delta_attention on CuTe (CUTLASS 4.x), FlashAttention-2 style, sm_80+.
// Spec: docs/delta_attention.md. Included only by the instantiation units fwd_*.cu, which the
// host emulation (csrc/cuda/host_emulation/fwd_emulation.cpp) also compiles, for the CPU, with
// HDAF_CUTE_EMULATION defined: the SM80 operations are then CPU versions with the same CuTe
// traits (cute_sm80_emulation.h), everything else is this file.
//
// One CTA = kBlockM query rows of one (sequence, query head), or with split-key decoding one
// share of their key tiles. Padded and packed batches, grouped-query heads and Tq < Tk come from
// FwdParams through SeqInfo: query row i stands at key position off + i, and every bucket,
// window and causal relation and the query's own P row use that position. Warps are stacked
// along the rows (each owns kBlockM / kNWarps of them), so a row's softmax state lives in the
// 4 lanes of one quad.
//   Q      gmem --cp.async--> smem, once; ldmatrix reads it for every key tile (holding it in
//          registers for good took 16 / 32 registers at D = 64 / 128, and ptxas spilled).
//   K, V   one smem tile each; V(n) loads (cp.async) under S = Q K(n)^T and the next K tile under
//          the softmax and O += P V(n): two copy groups in flight, as in FlashAttention-2.
//   MMA    cute::TiledMMA of SM80 mma.sync m16n8k16 (fp16/bf16 operands, fp32 accumulators);
//          K through ldmatrix, V through ldmatrix.trans (P V needs V^T as the B operand).
//   tiles  the key tiles a query block visits are far-low (every pair's bucket is 0), band or
//          far-high (bucket R-1) (tile_split.h). Tiles that cross a window / causal edge or the
//          end of the keys, and every tile under a key padding mask, are masked; the others
//          form one contiguous run. Each kind has its own loop, compiled for it:
//            far-low, far-high  logit2 = c (q.k + P[j, e]) - c P[t_i, e] (c = scale log2 e):
//                               the MMAs of S start from the key column P[j, e] (smem, loaded
//                               with the K tile), the row maximum is taken of the unscaled S,
//                               and exp2's argument is one FFMA per element (c, and the query
//                               term folded into the row's base); no mask.
//            band               gathers P[j, r] - P[t_i, r] per pair (L1/L2) as the initial S;
//                               row maximum and exp2 as in the far loops; no mask.
//            masked             gathers like band (serves every kind), scales S and compares
//                               positions (-inf). The unmasked loops need c >= 0 (max(c s) =
//                               c max(s)): for c < 0 or NaN every tile runs in this loop.
//          The tiles still run in one pipeline: each body prefetches the tile the next loop
//          needs.
//   softmax online, in registers, log2 domain, exp2.
//   out    acc_o / l, staged through smem (the Q tile) for 16-byte stores; lse float32, -inf with
//          out = 0 for a row that sees no key. With split-key decoding each split writes its
//          normalised float32 partial out and partial lse to out_accum / lse_accum, and
//          combine_kernel merges the splits into out and lse.
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
struct FwdTraits : TileTraits<Element_, kHeadDim_, kNWarps_> {
  using Base = TileTraits<Element_, kHeadDim_, kNWarps_>;
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = 32 * kNWarps;
  static_assert(kBlockM % (16 * kNWarps) == 0, "each warp owns whole 16-row MMA tiles");
  static_assert(kBlockN % 16 == 0, "key tiles are whole k16 steps of P V");

  using SmemLayoutQ = typename Base::template SmemLayoutRows<kBlockM>;
  using SmemLayoutKV = typename Base::template SmemLayoutRows<kBlockN>;
  // V seen as (head dim, key): the B operand of O += P V.
  using SmemLayoutVt = typename Base::template SmemLayoutRowsT<kBlockN>;
  using SmemLayoutVtNoSwizzle = typename Base::template SmemLayoutRowsTNoSwizzle<kBlockN>;
  using GmemCopyQKV = typename Base::GmemCopy;  // Q, K, V by cp.async

  // Band and masked tiles: the MMAs of S start from the gathered bias (its loads are issued
  // before them and their registers are free again when S is), or the bias is added to S after
  // them. First at both head dims (sm_90, CUDA 13.0): after took ~60 more registers at D = 128
  // and ptxas spilled; at D = 64 after put spill loads in the far-low and band loops, first
  // puts them in the masked loop only, and the band loop is 33 instructions shorter.
  static constexpr bool kBiasFirst = true;
  // Registers of S per thread: rows (2 per m16 tile of the warp) and columns (2 per n8 tile).
  static constexpr int kRows = 2 * (kBlockM / (16 * kNWarps));
  static constexpr int kCols = 2 * (kBlockN / 8);

  // Q, K, V tiles, then the key tile's far-tile columns P[j, 0] and P[j, R-1] in float32, each
  // column pair (j, j+1) stored twice, as (j, j+1, j, j+1): the initial S of one m16n8 tile.
  static constexpr int kSmemBytes =
      int(size(SmemLayoutQ{}) + 2 * size(SmemLayoutKV{})) * int(sizeof(Element)) +
      4 * kBlockN * int(sizeof(float));
};

// ---------------------------------------------------------------------------------------------
// The kernel: grid.x = ceil(p.Tq / kBlockM) * num_splits * B * H, one CTA per (query block,
// split, batch, head), the query block fastest.
// ---------------------------------------------------------------------------------------------

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads) fwd_kernel(const FwdParams p) {
#if defined(HDAF_CUTE_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  extern __shared__ __align__(128) unsigned char smem_raw[];

  const int num_m = (p.Tq + kBlockM - 1) / kBlockM;
  int cta = int(blockIdx.x);
  const int m_block = cta % num_m;
  cta /= num_m;
  const int split = cta % p.num_splits;
  cta /= p.num_splits;
  const int h = cta % p.H, b = cta / p.H;
  const SeqInfo seq(p, b);
  const int m0 = m_block * kBlockM;
  if (m0 >= seq.Tq) return;  // past this sequence's queries (the grid is sized by the longest)
  const int Tq = seq.Tq, Tk = seq.Tk;
  const int pos0 = seq.off + m0;  // key position of the block's first query row
  const int tid = threadIdx.x;
  const Band band = make_band(Tk, p.window_left, p.window_right);
  const int lo = int(band.lo), hi = int(band.hi), L = p.L, U = p.U, R = p.R;
  const float c = p.scale * 1.4426950408889634f;  // scale * log2(e)

  // This (sequence, head)'s rows: q, out by query row; k, v, P by key row.
  const int hk = kv_head(p, h);
  const Element* Pb = static_cast<const Element*>(p.P) + seq.k_offset(p.P_s, b, p_head(p, h));
  const int64_t Ps = p.P_s.row;
  const bool* pad = p.mask != nullptr ? p.mask + int64_t(b) * p.Tk : nullptr;
  auto rows = [](const void* ptr, int64_t offset, int n, int64_t stride) {
    return make_tensor(make_gmem_ptr(static_cast<const Element*>(ptr) + offset),
                       make_shape(n, Int<kHeadDim>{}), make_stride(stride, _1{}));
  };
  Tensor gQ = local_tile(rows(p.q, seq.q_offset(p.q_s, b, h), Tq, p.q_s.row),
                         Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, 0));
  Tensor gK = local_tile(rows(p.k, seq.k_offset(p.k_s, b, hk), Tk, p.k_s.row),
                         Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));
  Tensor gV = local_tile(rows(p.v, seq.k_offset(p.v_s, b, hk), Tk, p.v_s.row),
                         Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));

  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem_raw)),
                          typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(sV.data(), typename Traits::SmemLayoutVt{});
  Tensor sVtNoSwizzle = make_tensor(sV.data().get(), typename Traits::SmemLayoutVtNoSwizzle{});
  // Far-tile key columns of the current key tile: P[n0 + col, 0], then P[n0 + col, R-1] (at
  // 2 kBlockN floats), each in the pair layout of kSmemBytes. Thread tid < 2 kBlockN loads one
  // entry: column tid % kBlockN of column tid / kBlockN of P, from kc_src + n0 Ps.
  float* s_kcol = reinterpret_cast<float*>(smem_raw + (size(sQ) + 2 * size(sK)) * sizeof(Element));
  static_assert(2 * kBlockN <= Traits::kNThreads, "one far-tile key column entry per thread");
  auto load_kcol = [&](int n0) {
    if (tid < 2 * kBlockN) {
      const int kc_col = tid % kBlockN;
      const int j = n0 + kc_col;
      const float x = j < Tk ? float(Pb[int64_t(j) * Ps + (tid < kBlockN ? 0 : R - 1)]) : 0.f;
      float* kc_dst = s_kcol + (tid / kBlockN) * 2 * kBlockN + kc_col / 2 * 4 + kc_col % 2;
      kc_dst[0] = x;
      kc_dst[2] = x;
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
  // This thread's K and V sources in the key tile starting at n0. (Tile 0's sources advanced
  // by n0 row strides took fewer instructions but put spill loads in the far loops at D = 128
  // on sm_80.)
  auto k_src = [&](int n0) { return tKgK(_, _, _, n0 / kBlockN); };
  auto v_src = [&](int n0) { return tVgV(_, _, _, n0 / kBlockN); };
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
  static_assert(decltype(size<0>(rc))::value == Traits::kRows &&
                decltype(size<1>(rc))::value == Traits::kCols, "S register layout");

  // The tiles of this block, this split's share of them, and the runs of each loop.
  // (Only the block's rows below Tq count: the rows past it are computed but never stored.)
  const int rows_m = min(kBlockM, Tq - m0);
  const cute_tiles::KeyTiles tiles =
      cute_tiles::key_tiles(pos0, Tk, L, U, lo, hi, rows_m, kBlockN);
  cute_tiles::TileRun fast = cute_tiles::unmasked_tiles(tiles, pos0, Tk, lo, hi, rows_m,
                                                              kBlockN, pad != nullptr);
  // The unmasked loops take the row maximum of the unscaled S (below), which needs c >= 0;
  // otherwise (or c NaN) the masked loop, exact for any tile, runs every tile.
  const bool far_ok = c >= 0.f;
  if (!far_ok) fast.first = fast.last = tiles.begin;
  int s_begin = tiles.begin, s_end = tiles.end;
  if (p.num_splits > 1) {
    const int n_tiles = (tiles.end - tiles.begin + kBlockN - 1) / kBlockN;
    s_begin = min(tiles.begin + split * n_tiles / p.num_splits * kBlockN, tiles.end);
    s_end = min(tiles.begin + (split + 1) * n_tiles / p.num_splits * kBlockN, tiles.end);
  }
  // The loops, in visiting order: far-low, band, far-high (unmasked), then the masked tiles
  // left and right of them (3, 4: one loop). run(k) gives loop k's tiles [first, end) within
  // this split; after(k) the first tile of the loops after loop k (-1: none), for the prefetch.
  auto run = [&](int k, int& ra, int& rz) {
    int a, z;
    switch (k) {
      case 0: a = fast.first; z = min(tiles.band, fast.last); break;
      case 1: a = max(tiles.band, fast.first); z = min(tiles.far_hi, fast.last); break;
      case 2: a = max(tiles.far_hi, fast.first); z = fast.last; break;
      case 3: a = tiles.begin; z = fast.first; break;
      default: a = fast.last; z = tiles.end; break;
    }
    ra = max(a, s_begin);
    rz = max(min(z, s_end), ra);
  };
  auto after = [&](int k) {
    CUTE_UNROLL
    for (int k2 = 1; k2 < 5; ++k2) {
      int a, z;
      run(k2, a, z);
      if (k2 > k && a < z) return a;
    }
    return -1;
  };

  int first_tile, first_end;
  run(0, first_tile, first_end);
  if (first_tile == first_end) first_tile = after(0);

  // Per query row of this thread: its key position, its P row (clamped into the sequence for
  // the rows past Tq, which are computed but never stored), c P[t_i, 0], c P[t_i, R-1]; the
  // softmax state (log2 domain).
  int qpos[Traits::kRows];
  float qc_lo[Traits::kRows], qc_hi[Traits::kRows], row_max[Traits::kRows], row_sum[Traits::kRows];
  auto prow = [&](int mi) { return Pb + int64_t(min(qpos[mi], Tk - 1)) * Ps; };
  CUTE_UNROLL
  for (int mi = 0; mi < Traits::kRows; ++mi) {
    qpos[mi] = pos0 + get<0>(rc(mi, 0));
    qc_lo[mi] = c * float(prow(mi)[0]);
    qc_hi[mi] = c * float(prow(mi)[R - 1]);
    row_max[mi] = -INFINITY;
    row_sum[mi] = 0.f;
  }

  // Prologue: Q and the first K tile in flight together; then Q into registers for good.
  copy_rows(gmem_copy, tQgQ, tQsQ, tQid, Tq - m0);
  if (first_tile >= 0) {
    copy_rows(gmem_copy, k_src(first_tile), tKsK, tKVid, Tk - first_tile);
    load_kcol(first_tile);
  }
  sm80::cp_async_fence();
  Tensor tSsQ = sthr_Q.partition_S(sQ);
  clear(acc_o);
  Tensor o = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));

  // One key tile n0 of kind kKind (masked: any kind, positions compared); `next` is the tile the
  // loops visit after it (-1: none).
  auto tile = [&](auto kind_c, auto masked_c, int n0, int next) {
    constexpr int kKind = decltype(kind_c)::value;
    constexpr bool kMasked = decltype(masked_c)::value;
    constexpr bool kFar = kKind != kBand && !kMasked;
    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor s = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
    if constexpr (!kFar && Traits::kBiasFirst) {
      // Band and masked tiles: the bias P[j, r] - P[t_i, r], gathered.
      const Element* prows[Traits::kRows];
      CUTE_UNROLL
      for (int mi = 0; mi < Traits::kRows; ++mi) prows[mi] = prow(mi);
      CUTE_UNROLL
      for (int ni = 0; ni < Traits::kCols; ++ni) {
        const int j = n0 + get<1>(rc(0, ni));
        const Element* pj = Pb + int64_t(min(j, Tk - 1)) * Ps;
        CUTE_UNROLL
        for (int mi = 0; mi < Traits::kRows; ++mi) {
          const int r = min(max(j - qpos[mi], -L), U) + L;
          s(mi, ni) = float(pj[r]) - float(prows[mi][r]);
        }
      }
    } else if constexpr (!kFar) {
      clear(acc_s);
    }
    sm80::cp_async_wait<0>();
    __syncthreads();  // Q, K(n0), kcol(n0) are in smem, and no warp still reads the previous V
    if constexpr (kMasked) {
      copy_rows(gmem_copy, v_src(n0), tVsV, tKVid, Tk - n0);
    } else {
      copy(gmem_copy, v_src(n0), tVsV);  // an unmasked tile ends at or before Tk
    }
    sm80::cp_async_fence();
    if constexpr (kFar) {
      // Far tiles: the MMAs of S start from the key column P[j, e], so that
      // s = q.k + P[j, e] and the log2 logit less c P[t_i, e] is c s.
      // One 16-byte load per m16n8 tile: its registers (row r: cols j, j+1; row r+8: same).
      const float* kcol = s_kcol + (kKind == kFarLo ? 0 : 2 * kBlockN);
      CUTE_UNROLL
      for (int n = 0; n < size<2>(acc_s); ++n) {
        const float4 kc = *reinterpret_cast<const float4*>(kcol + 2 * get<1>(rc(0, 2 * n)));
        CUTE_UNROLL
        for (int m = 0; m < size<1>(acc_s); ++m) {
          acc_s(0, m, n) = kc.x;
          acc_s(1, m, n) = kc.y;
          acc_s(2, m, n) = kc.z;
          acc_s(3, m, n) = kc.w;
        }
      }
    }
    gemm_smem_ab(mma, acc_s, tSrQ, tSsQ, smem_copy_Q, sthr_Q, tSrK, tSsK, smem_copy_K, sthr_K);

    // Logits, log2 domain, less the row constant qconst: c s - qconst in the unmasked loops (s
    // unscaled until exp2; qconst = c P[t_i, e] for far tiles, 0 for band tiles), or s itself,
    // biased, scaled and masked here (masked tiles, qconst 0).
    float qconst[Traits::kRows];
    constexpr bool kScaleLate = !kMasked;
    if constexpr (kFar) {
      CUTE_UNROLL
      for (int mi = 0; mi < Traits::kRows; ++mi) qconst[mi] = kKind == kFarLo ? qc_lo[mi] : qc_hi[mi];
    } else {
      const Element* prows[Traits::kRows];
      CUTE_UNROLL
      for (int mi = 0; mi < Traits::kRows; ++mi) prows[mi] = prow(mi);
      CUTE_UNROLL
      for (int ni = 0; ni < Traits::kCols; ++ni) {
        const int j = n0 + get<1>(rc(0, ni));
        const Element* pj = Pb + int64_t(min(j, Tk - 1)) * Ps;
        const bool hidden = kMasked && (j >= Tk || (pad != nullptr && pad[min(j, Tk - 1)]));
        CUTE_UNROLL
        for (int mi = 0; mi < Traits::kRows; ++mi) {
          const int d = j - qpos[mi];
          float x = s(mi, ni);
          if constexpr (!Traits::kBiasFirst) {
            const int r = min(max(d, -L), U) + L;
            x += float(pj[r]) - float(prows[mi][r]);
          }
          if constexpr (kScaleLate) {
            s(mi, ni) = x;
          } else {
            s(mi, ni) = (hidden || d < lo || d > hi) ? -INFINITY : x * c;
          }
        }
      }
      CUTE_UNROLL
      for (int mi = 0; mi < Traits::kRows; ++mi) qconst[mi] = 0.f;
    }

    sm80::cp_async_wait<0>();
    __syncthreads();  // V(n0) is in smem, and no warp still reads K(n0) or kcol(n0)
    if (next >= 0) {
      copy_rows(gmem_copy, k_src(next), tKsK, tKVid, Tk - next);
      load_kcol(next);
    }
    sm80::cp_async_fence();

    // Online softmax. The true log2 logit is sc s - qconst (sc = c for unmasked tiles, whose s is
    // unscaled, else 1; max(c s) = c max(s) as c >= 0 there): the row's maximum is kept in the
    // true domain and exp2 takes sc s - (max + qconst), one FFMA. A row with nothing visible
    // yet keeps max -inf and sum 0 (base 0 keeps exp2 free of -inf - -inf).
    const float sc = kScaleLate ? c : 1.f;
    CUTE_UNROLL
    for (int mi = 0; mi < Traits::kRows; ++mi) {
      float mx = -INFINITY;
      CUTE_UNROLL
      for (int ni = 0; ni < Traits::kCols; ++ni) mx = fmaxf(mx, s(mi, ni));
      const float m_new = fmaxf(row_max[mi], (kScaleLate ? sc * quad_max(mx) : quad_max(mx)) - qconst[mi]);
      const float base = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2_approx(row_max[mi] - base);
      row_max[mi] = m_new;
      const float base_s = base + qconst[mi];
      float sum = 0.f;
      CUTE_UNROLL
      for (int ni = 0; ni < Traits::kCols; ++ni) {
        s(mi, ni) = exp2_approx(kScaleLate ? fmaf(s(mi, ni), sc, -base_s) : s(mi, ni) - base_s);
        sum += s(mi, ni);
      }
      row_sum[mi] = row_sum[mi] * alpha + sum;  // this thread's columns; quad-reduced at the end
      CUTE_UNROLL
      for (int di = 0; di < size<1>(o); ++di) o(mi, di) *= alpha;
    }

    Tensor pr = to_element<Element>(acc_s);
    Tensor tOrP = make_tensor(pr.data(), acc_as_a(pr.layout()));
    gemm_a_in_regs(mma, acc_o, tOrP, tOrVt, tOsVt, smem_copy_V, sthr_V);
  };
  using FarLo = std::integral_constant<int, kFarLo>;
  using Bnd = std::integral_constant<int, kBand>;
  using FarHi = std::integral_constant<int, kFarHi>;
  using Unmasked = std::false_type;
  using Masked = std::true_type;

  {  // far-low loop
    int a, z;
    run(0, a, z);
    const int next_run = after(0);
    for (int n0 = a; n0 < z; n0 += kBlockN) {
      tile(FarLo{}, Unmasked{}, n0, n0 + kBlockN < z ? n0 + kBlockN : next_run);
    }
  }
  {  // band loop
    int a, z;
    run(1, a, z);
    const int next_run = after(1);
    for (int n0 = a; n0 < z; n0 += kBlockN) {
      tile(Bnd{}, Unmasked{}, n0, n0 + kBlockN < z ? n0 + kBlockN : next_run);
    }
  }
  {  // far-high loop
    int a, z;
    run(2, a, z);
    const int next_run = after(2);
    for (int n0 = a; n0 < z; n0 += kBlockN) {
      tile(FarHi{}, Unmasked{}, n0, n0 + kBlockN < z ? n0 + kBlockN : next_run);
    }
  }
  {  // masked loop: the tiles left of the unmasked run, then those right of it
    int a3, z3, a4, z4;
    run(3, a3, z3);
    run(4, a4, z4);
    const int n_left = (z3 - a3 + kBlockN - 1) / kBlockN;
    const int n_all = n_left + (z4 - a4 + kBlockN - 1) / kBlockN;
    for (int t = 0; t < n_all; ++t) {
      const int n0 = t < n_left ? a3 + t * kBlockN : a4 + (t - n_left) * kBlockN;
      const int next = t + 1 == n_all ? -1 : t + 1 == n_left ? a4 : n0 + kBlockN;
      tile(Bnd{}, Masked{}, n0, next);
    }
  }

  // Epilogue: out = acc_o / l (0 for a row that saw no key), lse = ln(sum exp(logit)) (-inf
  // then; NaN stays NaN).
  const bool split_out = p.num_splits > 1;
  float* lse = (split_out ? p.lse_accum + split * p.split_stride_lse : p.lse) +
               seq.q_offset(p.lse_s, b, h);
  CUTE_UNROLL
  for (int mi = 0; mi < Traits::kRows; ++mi) {
    const float l = quad_sum(row_sum[mi]);
    const float inv = l == 0.f ? 0.f : 1.f / l;
    CUTE_UNROLL
    for (int di = 0; di < size<1>(o); ++di) o(mi, di) *= inv;
    const int i = m0 + get<0>(rc(mi, 0));
    if (tid % 4 == 0 && i < Tq) {
      lse[int64_t(i) * p.lse_s.row] =
          l == 0.f ? -INFINITY : (row_max[mi] + log2f(l)) * 0.6931471805599453f;
    }
  }
  if (split_out) {
    // float32 partial out straight from the registers (rows < Tq).
    Tensor tOid = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    Tensor orc = make_tensor(tOid.data(), acc_rowcol(tOid.layout()));
    float* oacc = p.out_accum + split * p.split_stride_o + seq.q_offset(p.o_s, b, h);
    CUTE_UNROLL
    for (int mi = 0; mi < Traits::kRows; ++mi) {
      const int i = m0 + get<0>(orc(mi, 0));
      if (i < Tq) {
        CUTE_UNROLL
        for (int di = 0; di < size<1>(o); di += 2) {
          *reinterpret_cast<float2*>(oacc + int64_t(i) * p.o_s.row + get<1>(orc(0, di))) =
              make_float2(o(mi, di), o(mi, di + 1));
        }
      }
    }
    sm80::cp_async_wait<0>();
    return;
  }
  Tensor ro = to_element<Element>(acc_o);
  sm80::cp_async_wait<0>();
  __syncthreads();  // every warp is past its last read of sQ (Q) and sV: sQ becomes sO
  Tensor sO = make_tensor(sQ.data(), typename Traits::SmemLayoutQ{});
  auto smem_copy_O = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, mma);
  auto sthr_O = smem_copy_O.get_thread_slice(tid);
  copy(smem_copy_O, sthr_O.retile_S(ro), sthr_O.partition_D(sO));
  __syncthreads();
  Tensor mO = make_tensor(make_gmem_ptr(static_cast<Element*>(p.out) + seq.q_offset(p.o_s, b, h)),
                          make_shape(Tq, Int<kHeadDim>{}), make_stride(p.o_s.row, _1{}));
  Tensor gO = local_tile(mO, Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, 0));
  typename Traits::GmemCopyO gmem_copy_o;
  auto gthr_o = gmem_copy_o.get_thread_slice(tid);
  Tensor tOsO = gthr_o.partition_S(sO);
  Tensor tOgO = gthr_o.partition_D(gO);
  Tensor tOrO = make_tensor<Element>(shape(tOgO));
  copy(gmem_copy_o, tOsO, tOrO);
  Tensor tOid = gthr_o.partition_D(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  CUTE_UNROLL
  for (int m = 0; m < size<1>(tOgO); ++m) {
    if (get<0>(tOid(0, m, 0)) < Tq - m0) {
      CUTE_UNROLL
      for (int k = 0; k < size<2>(tOgO); ++k) copy(gmem_copy_o, tOrO(_, m, k), tOgO(_, m, k));
    }
  }
#endif  // HDAF_CUTE_EMULATION || __CUDA_ARCH__ >= 800
}

// Split-key decoding: merges the num_splits partial results (normalised out_s and lse_s per
// split) of each query row: lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse) out_s.
// A row no split saw gets lse -inf and out 0; a NaN lse_s makes the row NaN. One warp per row,
// kCombineWarps rows per CTA; grid.x = ceil(p.Tq / kCombineWarps) * B * H.
constexpr int kCombineWarps = 4;

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(32 * kCombineWarps) combine_kernel(const FwdParams p) {
  const int num_r = (p.Tq + kCombineWarps - 1) / kCombineWarps;
  const int cta = int(blockIdx.x);
  const int bh = cta / num_r;
  const int h = bh % p.H, b = bh / p.H;
  const SeqInfo seq(p, b);
  const int i = (cta % num_r) * kCombineWarps + int(threadIdx.x) / 32;
  const int lane = int(threadIdx.x) % 32;
  if (i >= seq.Tq) return;
  const int64_t at_lse = seq.q_offset(p.lse_s, b, h) + int64_t(i) * p.lse_s.row;
  const int64_t at_o = seq.q_offset(p.o_s, b, h) + int64_t(i) * p.o_s.row;
  float m = -INFINITY;
  bool nan = false;
  for (int s = 0; s < p.num_splits; ++s) {
    const float x = p.lse_accum[s * p.split_stride_lse + at_lse];
    m = fmaxf(m, x);
    nan = nan || x != x;
  }
  float lse = -INFINITY;
  if (nan) {
    lse = NAN;
  } else if (m != -INFINITY) {
    float sum = 0.f;
    for (int s = 0; s < p.num_splits; ++s) sum += expf(p.lse_accum[s * p.split_stride_lse + at_lse] - m);
    lse = m + logf(sum);
  }
  Element* out = static_cast<Element*>(p.out) + at_o;
  for (int d = lane; d < kHeadDim; d += 32) {
    float acc = 0.f;
    if (lse != -INFINITY) {
      for (int s = 0; s < p.num_splits; ++s) {
        const float w = expf(p.lse_accum[s * p.split_stride_lse + at_lse] - lse);
        acc += w * p.out_accum[s * p.split_stride_o + at_o + d];
      }
    }
    out[d] = static_cast<Element>(acc);
  }
  if (lane == 0) p.lse[at_lse] = lse;
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
  const int64_t bh = int64_t(p.B) * p.H;
  const int64_t blocks = (p.Tq + Traits::kBlockM - 1) / Traits::kBlockM * p.num_splits * bh;
  if (blocks == 0) return cudaSuccess;
  HDAF_LAUNCH(kernel, unsigned(blocks), Traits::kNThreads, kSmem, stream, p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits <= 1) return err;
  auto combine = &combine_kernel<typename Traits::Element, Traits::kHeadDim>;
  const int64_t rows = (p.Tq + kCombineWarps - 1) / kCombineWarps * bh;
  HDAF_LAUNCH(combine, unsigned(rows), 32 * kCombineWarps, 0, stream, p);
  return cudaGetLastError();
}

}  // namespace cute_fwd
}  // namespace cuda
}  // namespace hdaf

// One instantiation unit per (dtype, head dim): scalar_t is the launcher's CUDA type, Element
// the CuTe one, then the tile configuration (query rows, key rows, warps).
#define HDAF_DEFINE_FWD(scalar_t, Element, D, BM, BN, WARPS)                                      \
  namespace hdaf {                                                                                \
  namespace cuda {                                                                                \
  template <>                                                                                     \
  size_t delta_fwd_smem_bytes<scalar_t, D>() {                                                    \
    return cute_fwd::FwdTraits<Element, D, BM, BN, WARPS>::kSmemBytes;                            \
  }                                                                                               \
  template <>                                                                                     \
  int delta_fwd_block_m<scalar_t, D>() {                                                          \
    return BM;                                                                                    \
  }                                                                                               \
  template <>                                                                                     \
  int delta_fwd_block_n<scalar_t, D>() {                                                          \
    return BN;                                                                                    \
  }                                                                                               \
  template <>                                                                                     \
  cudaError_t delta_fwd_launch<scalar_t, D>(const FwdParams& p, cudaStream_t stream) {            \
    return cute_fwd::launch<cute_fwd::FwdTraits<Element, D, BM, BN, WARPS>>(p, stream);           \
  }                                                                                               \
  }                                                                                               \
  }
