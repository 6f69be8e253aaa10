// Device helpers shared by the forward (flash_fwd.cuh) and backward (flash_bwd.cuh) kernels:
// the launch macro the host emulation redefines, the SM80 operation namespace (CuTe's, or the
// emulation's), the tile kinds, register-layout views of MMA accumulators, warp-quad reductions,
// the register-A GEMM and the predicated gmem -> smem row copy. Torch-free; included by the
// instantiation units through the kernel headers (and by csrc/cuda/host_emulation for the CPU).
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


// Kernel launch; the host emulation redefines it to run the kernel on the CPU.
#ifndef HDAF_LAUNCH
#define HDAF_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#endif

namespace hdaf {
namespace cuda {
namespace kcommon {

using namespace cute;

// The SM80 operations: CuTe's, or with HDAF_CUTE_EMULATION the host emulation's structs of the
// same names and traits (never chosen by __CUDA_ARCH__: the emulated kernel is this kernel).
#if defined(HDAF_CUTE_EMULATION)
namespace sm80 = ::hdaf_cute_emu;
#else
namespace sm80 = ::cute;
#endif

// What a key block is, seen from a query block.
enum TileKind { kFarLo = 0, kBand = 1, kFarHi = 2 };

// ---------------------------------------------------------------------------------------------
// Register-layout helpers
// ---------------------------------------------------------------------------------------------

// What the forward and backward kernels' traits share for an Element type, head dim and warp
// count: the MMA (SM80 mma.sync m16n8k16, fp32 accumulators, warps stacked along M; an N extent
// of 16 lets one ldmatrix.x4 feed two n8 MMAs); row-major (rows, kHeadDim) shared-memory tiles in
// 64-element (128-byte) column chunks, XOR-swizzled so that one ldmatrix (8 rows of 16 bytes)
// hits 8 different bank groups, and their (head dim, rows) views, the B operands of products with
// a transposed tile; the ldmatrix (plain, .trans) and store atoms; gmem <-> smem tiled copies of
// 16 bytes per thread and copy, a 64-element row chunk per kThreadsPerRow threads.
template <typename Element_, int kHeadDim_, int kNWarps_>
struct TileTraits {
  using Element = Element_;  // cutlass::half_t or cutlass::bfloat16_t
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = 32 * kNWarps;
  static_assert(kHeadDim % 64 == 0, "the smem swizzle atom is 64 elements wide");

  using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::half_t>,
                                     MMA_Atom<sm80::SM80_16x8x16_F32F16F16F32_TN>,
                                     MMA_Atom<sm80::SM80_16x8x16_F32BF16BF16F32_TN>>;
  using TiledMma = TiledMMA<MmaAtom, Layout<Shape<Int<kNWarps>, _1, _1>>,
                            Tile<Int<16 * kNWarps>, _16, _16>>;

  using SmemLayoutAtom =
      decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
  template <int kRows>
  using SmemLayoutRows =
      decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kRows>, Int<kHeadDim>>{}));
  template <int kRows>
  using SmemLayoutRowsT = decltype(composition(
      SmemLayoutRows<kRows>{}, make_layout(Shape<Int<kHeadDim>, Int<kRows>>{}, GenRowMajor{})));
  template <int kRows>
  using SmemLayoutRowsTNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutRowsT<kRows>{}));

  using SmemCopyAtom = Copy_Atom<sm80::SM75_U32x4_LDSM_N, Element>;   // ldmatrix
  using SmemCopyAtomT = Copy_Atom<sm80::SM75_U16x8_LDSM_T, Element>;  // ldmatrix.trans
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
};

// An m16n8 accumulator ((2 cols, 2 rows), MMA_M, MMA_N) seen as (row, col) = ((2,MMA_M), (2,MMA_N)).
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_rowcol(Layout l) {
  static_assert(decltype(size<0>(l))::value == 4 && decltype(rank(l))::value == 3);
  auto d = logical_divide(l, Shape<_2>{});  // ((2,2),MMA_M,MMA_N)
  return make_layout(make_layout(get<0, 1>(d), get<1>(d)), make_layout(get<0, 0>(d), get<2>(d)));
}

// The S accumulator as the A operand of O += P V: an m16n8k16 A fragment spans two n8 tiles of
// S, ((2,2),MMA_M,MMA_N) -> ((2,2,2),MMA_M,MMA_N/2).
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_as_a(Layout l) {
  auto d = logical_divide(l, Shape<X, X, _2>{});  // ((2,2),MMA_M,(2,MMA_N/2))
  return make_layout(make_layout(get<0>(d), get<2, 0>(d)), get<1>(d), get<2, 1>(d));
}

// fp32 register fragment -> Element fragment of the same layout (packed conversions).
template <typename Element, class Frag>
__device__ __forceinline__ auto to_element(Frag const& f) {
  constexpr int N = decltype(size(f))::value;
  Tensor out = make_tensor<Element>(f.layout());
  *reinterpret_cast<cutlass::Array<Element, N>*>(out.data()) =
      cutlass::NumericArrayConverter<Element, float, N>{}(
          *reinterpret_cast<const cutlass::Array<float, N>*>(f.data()));
  return out;
}

// 2^x by the hardware approximation (MUFU.EX2, flush-to-zero): exp2f without fast-math adds a
// range test and two scalings per call. The emulation uses exp2f.
__device__ __forceinline__ float exp2_approx(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x + __shfl_xor_sync(0xffffffffu, x, 1);
}

// acc += A B^T with A already in registers (tCrA: (MMA, MMA_M, MMA_K)) and B read from smem by
// ldmatrix one k-slice ahead of the MMAs that consume it.
template <class Mma, class Acc, class FragA, class FragB, class SmemB, class CopyB, class ThrCopyB>
__device__ __forceinline__ void gemm_a_in_regs(Mma const& mma, Acc& acc, FragA const& tCrA,
                                               FragB& tCrB, SmemB const& tCsB, CopyB const& copy_b,
                                               ThrCopyB const& thr_copy_b) {
  Tensor tCrB_view = thr_copy_b.retile_D(tCrB);
  copy(copy_b, tCsB(_, _, 0), tCrB_view(_, _, 0));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(tCrA); ++k) {
    if (k + 1 < size<2>(tCrA)) copy(copy_b, tCsB(_, _, k + 1), tCrB_view(_, _, k + 1));
    cute::gemm(mma, tCrA(_, _, k), tCrB(_, _, k), acc);
  }
}

// acc += A B^T with both operands read from smem by ldmatrix one k-slice ahead of the MMAs that
// consume them (tCrA, tCrB: full-size fragments of which only two k-slices are live).
template <class Mma, class Acc, class FragA, class SmemA, class CopyA, class ThrCopyA, class FragB,
          class SmemB, class CopyB, class ThrCopyB>
__device__ __forceinline__ void gemm_smem_ab(Mma const& mma, Acc& acc, FragA& tCrA,
                                             SmemA const& tCsA, CopyA const& copy_a,
                                             ThrCopyA const& thr_copy_a, FragB& tCrB,
                                             SmemB const& tCsB, CopyB const& copy_b,
                                             ThrCopyB const& thr_copy_b) {
  Tensor tCrA_view = thr_copy_a.retile_D(tCrA);
  Tensor tCrB_view = thr_copy_b.retile_D(tCrB);
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

// gmem -> smem copy of a (rows, head dim) tile partition (CPY, CPY_M, CPY_K). Rows at or past
// rows_left (the end of the sequence) are zero-filled, so stale smem never reaches P V as NaN.
template <class TiledCopy, class Src, class Dst, class Ids>
__device__ __forceinline__ void copy_rows(TiledCopy const& tc, Src const& S, Dst& D, Ids const& ids,
                                          int rows_left) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(S); ++m) {
    if (get<0>(ids(0, m, 0)) < rows_left) {
      CUTE_UNROLL
      for (int k = 0; k < size<2>(S); ++k) copy(tc, S(_, m, k), D(_, m, k));
    } else {
      clear(D(_, m, _));
    }
  }
}

}  // namespace kcommon
}  // namespace cuda
}  // namespace hdaf
