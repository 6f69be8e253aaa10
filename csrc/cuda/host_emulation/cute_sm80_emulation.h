// CuTe's SM80 operations on the CPU: mma.sync m16n8k16 (bf16 / fp16 in, fp32 accumulate),
// ldmatrix x4 (plain and .trans) and 16-byte cp.async, for host emulation builds of the CuTe
// kernels (csrc/cuda/ compiled with HDAF_CUTE_EMULATION; see fwd_emulation.cpp).
//
// On the host CuTe's own operation structs (cute/arch/mma_sm80.hpp, copy_sm75.hpp,
// copy_sm80.hpp) reach CUTE_INVALID_CONTROL_PATH: with NDEBUG they print and leave the result
// unchanged. The structs here have the same names (in namespace hdaf_cute_emu), register
// typedefs and fma / copy signatures, and their MMA_Traits / Copy_Traits derive from the SM80
// ones, so every thread-value layout, partition and tiled copy of a kernel stays what the GPU
// build has (static_asserts below). A kernel picks them by its own switch (HDAF_CUTE_EMULATION),
// never by __CUDA_ARCH__, so the emulated kernel is the same template as the shipped one.
//
// Semantics, from the PTX ISA's fragment tables (group = lane / 4, t = lane % 4):
//   mma.sync.m16n8k16.row.col   a0..a3 = A[g][2t..2t+1], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..];
//                               b0, b1 = B[2t..2t+1][g], B[2t+8..2t+9][g];
//                               c0..c3 / d0..d3 = C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1].
//                               Each lane publishes its registers, a warp barrier, each lane
//                               computes its four outputs from the published copies, a second
//                               barrier; d may alias c. The 16 products and c are summed in
//                               double and rounded once to float (at least as accurate as the
//                               tensor cores; their exact rounding is not modelled).
//   ldmatrix.x4 (.trans)        lane 8i + r gives the address of row r of 8x8 matrix i (16 bytes);
//                               lane l receives row l/4, columns 2(l%4), 2(l%4)+1 of matrix i in
//                               register i (.trans: rows 2(l%4), 2(l%4)+1 of column l/4). Every
//                               address must be 16-byte aligned and in shared memory.
//   cp.async (16 bytes)         queued per thread; cp_async_fence closes a group; cp_async_wait<N>
//                               lands all but the newest N groups (N = 0: every copy). A copy
//                               lands at its wait (CpAsyncLanding::kAtWait: a read of shared
//                               memory before the wait sees the NaN fill) or at issue (kAtIssue:
//                               a write into a buffer other warps still read shows); a thread that
//                               leaves the kernel with copies pending is an error.
// Counters of the warp-collective operations and of the copied bytes let a test check that the
// emulated operations, and as many of them as the tiling implies, ran.
//
// Include after block_emulation.h and the CuTe headers.
#pragma once

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/copy_traits_sm75.hpp>
#include <cute/atom/copy_traits_sm80.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/mma_traits_sm80.hpp>
#include <cutlass/bfloat16.h>
#include <cutlass/half.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "block_emulation.h"

namespace hdaf_cute_emu {

using cute::uint128_t;

enum class CpAsyncLanding { kAtWait, kAtIssue };
inline CpAsyncLanding cp_async_landing = CpAsyncLanding::kAtWait;

// Warp-collective calls (counted once per warp) and cp.async bytes (all threads).
struct Counters {
  std::atomic<int64_t> mma{0}, ldsm_n{0}, ldsm_t{0}, cp_async_bytes{0};
  void reset() { mma = ldsm_n = ldsm_t = cp_async_bytes = 0; }
};
inline Counters counters;

namespace detail {

// What the lanes of one warp publish for a collective operation.
struct WarpExchange {
  uint32_t a[32][4];
  uint32_t b[32][2];
  float c[32][4];
  const unsigned char* addr[32];
};
inline WarpExchange exchange[32];

template <class Element>
float half_to_float(uint32_t reg, int half) {
  const uint16_t bits = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xFFFFu);
  return float(Element::bitcast(bits));
}

// D = A B + C for one m16n8k16 tile, Element = cutlass::bfloat16_t or cutlass::half_t.
template <class Element>
void mma_m16n8k16(float& d0, float& d1, float& d2, float& d3, uint32_t a0, uint32_t a1,
                  uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1, float c0, float c1,
                  float c2, float c3) {
  WarpExchange& x = exchange[hdaf_emu::warp_id()];
  const unsigned lane = hdaf_emu::lane_id();
  x.a[lane][0] = a0, x.a[lane][1] = a1, x.a[lane][2] = a2, x.a[lane][3] = a3;
  x.b[lane][0] = b0, x.b[lane][1] = b1;
  x.c[lane][0] = c0, x.c[lane][1] = c1, x.c[lane][2] = c2, x.c[lane][3] = c3;
  hdaf_emu::syncwarp();
  if (lane == 0) ++counters.mma;
  // A[m][k] is in lane 4 (m % 8) + (k % 8) / 2, register (m / 8) + 2 (k / 8), half k % 2;
  // B[k][n] in lane 4 n + (k % 8) / 2, register k / 8, half k % 2.
  auto A = [&](int m, int k) {
    return half_to_float<Element>(x.a[4 * (m % 8) + (k % 8) / 2][(m / 8) + 2 * (k / 8)], k % 2);
  };
  auto B = [&](int k, int n) {
    return half_to_float<Element>(x.b[4 * n + (k % 8) / 2][k / 8], k % 2);
  };
  const int g = int(lane / 4), t = int(lane % 4);
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int m = g + 8 * (i / 2), n = 2 * t + i % 2;
    double s = x.c[lane][i];
    for (int k = 0; k < 16; ++k) s += double(A(m, k)) * double(B(k, n));
    out[i] = float(s);
  }
  hdaf_emu::syncwarp();  // every lane has read the published registers
  d0 = out[0], d1 = out[1], d2 = out[2], d3 = out[3];
}

// ldmatrix .x4: dst[i] of this lane from matrix i, whose rows lanes 8i..8i+7 address.
template <bool kTrans>
void ldmatrix_x4(const uint128_t& src, uint32_t (&dst)[4]) {
  WarpExchange& x = exchange[hdaf_emu::warp_id()];
  const unsigned lane = hdaf_emu::lane_id();
  x.addr[lane] = reinterpret_cast<const unsigned char*>(&src);
  hdaf_emu::syncwarp();
  if (lane == 0) ++(kTrans ? counters.ldsm_t : counters.ldsm_n);
  bool ok = true;
  for (int l = 0; l < 32; ++l) {
    if (reinterpret_cast<uintptr_t>(x.addr[l]) % 16 != 0 || !hdaf_emu::in_shared_memory(x.addr[l], 16))
      ok = false;
  }
  if (!ok) {
    hdaf_emu::fail(std::string("ldmatrix: a row address is not 16-byte aligned shared memory") +
                   (kTrans ? " (.trans)" : ""));
  }
  const int r = int(lane / 4), c = 2 * int(lane % 4);
  for (int i = 0; i < 4 && ok; ++i) {
    if (!kTrans) {
      std::memcpy(&dst[i], x.addr[8 * i + r] + 2 * c, 4);  // row r, columns c, c + 1
    } else {
      uint16_t lo, hi;  // column r of rows c and c + 1
      std::memcpy(&lo, x.addr[8 * i + c] + 2 * r, 2);
      std::memcpy(&hi, x.addr[8 * i + c + 1] + 2 * r, 2);
      dst[i] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  }
  hdaf_emu::syncwarp();
}

// cp.async, per thread: issued copies, and the number issued when each group was committed.
struct PendingCopy {
  const void* src;
  void* dst;
  int bytes;
};
inline thread_local std::vector<PendingCopy> pending;
inline thread_local std::vector<size_t> group_ends;

inline void land(size_t n) {  // the first n pending copies
  for (size_t i = 0; i < n; ++i) std::memcpy(pending[i].dst, pending[i].src, pending[i].bytes);
  pending.erase(pending.begin(), pending.begin() + std::ptrdiff_t(n));
  for (size_t& e : group_ends) e = e > n ? e - n : 0;
  while (!group_ends.empty() && group_ends.front() == 0) group_ends.erase(group_ends.begin());
}

inline void cp_async(const void* src, void* dst, int bytes) {
  if (reinterpret_cast<uintptr_t>(src) % bytes != 0 || reinterpret_cast<uintptr_t>(dst) % bytes != 0 ||
      !hdaf_emu::in_shared_memory(dst, size_t(bytes)) || hdaf_emu::in_shared_memory(src, 1)) {
    hdaf_emu::fail("cp.async: source not global or destination not shared memory, or misaligned");
    return;
  }
  counters.cp_async_bytes += bytes;
  if (cp_async_landing == CpAsyncLanding::kAtIssue) {
    std::memcpy(dst, src, size_t(bytes));
  } else {
    pending.push_back({src, dst, bytes});
  }
}

// Block hooks (hdaf_emu::thread_block_begin / _end): start clean, leave nothing pending.
inline void cp_async_block_begin() {
  pending.clear();
  group_ends.clear();
}
inline void cp_async_block_end() {
  if (!pending.empty()) hdaf_emu::fail("cp.async: copies still pending when the thread left the kernel");
  cp_async_block_begin();
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// The operation structs, named as in CuTe
// ---------------------------------------------------------------------------------------------

template <class Element>
struct Mma16x8x16F32 {
  using DRegisters = float[4];
  using ARegisters = uint32_t[4];
  using BRegisters = uint32_t[2];
  using CRegisters = float[4];

  static void fma(float& d0, float& d1, float& d2, float& d3, uint32_t const& a0,
                  uint32_t const& a1, uint32_t const& a2, uint32_t const& a3, uint32_t const& b0,
                  uint32_t const& b1, float const& c0, float const& c1, float const& c2,
                  float const& c3) {
    detail::mma_m16n8k16<Element>(d0, d1, d2, d3, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3);
  }
};
struct SM80_16x8x16_F32BF16BF16F32_TN : Mma16x8x16F32<cutlass::bfloat16_t> {};
struct SM80_16x8x16_F32F16F16F32_TN : Mma16x8x16F32<cutlass::half_t> {};

template <bool kTrans>
struct LdsmX4 {
  using SRegisters = uint128_t[1];
  using DRegisters = uint32_t[4];

  static void copy(uint128_t const& smem_src, uint32_t& dst0, uint32_t& dst1, uint32_t& dst2,
                   uint32_t& dst3) {
    uint32_t d[4] = {0, 0, 0, 0};
    detail::ldmatrix_x4<kTrans>(smem_src, d);
    dst0 = d[0], dst1 = d[1], dst2 = d[2], dst3 = d[3];
  }
};
struct SM75_U32x4_LDSM_N : LdsmX4<false> {};
struct SM75_U16x8_LDSM_T : LdsmX4<true> {};

template <class TS, class TD = TS>
struct SM80_CP_ASYNC_CACHEGLOBAL {
  using SRegisters = TS[1];
  using DRegisters = TD[1];
  static_assert(sizeof(TS) == sizeof(TD) && sizeof(TS) == 16, "cp.async.cg copies 16 bytes");

  static void copy(TS const& gmem_src, TD& smem_dst) {
    detail::cp_async(&gmem_src, &smem_dst, int(sizeof(TS)));
  }
};

inline void cp_async_fence() { detail::group_ends.push_back(detail::pending.size()); }

template <int N>
void cp_async_wait() {
  using detail::group_ends;
  if (N == 0) {
    detail::land(detail::pending.size());  // cp.async.wait_all: committed or not
  } else if (group_ends.size() > size_t(N)) {
    detail::land(group_ends[group_ends.size() - 1 - N]);
  }
}

// Installs the per-thread cp.async bookkeeping as block hooks; call before hdaf_emu::launch.
inline void install_block_hooks() {
  hdaf_emu::thread_block_begin = &detail::cp_async_block_begin;
  hdaf_emu::thread_block_end = &detail::cp_async_block_end;
}

}  // namespace hdaf_cute_emu

// The emulated operations take the SM80 traits: the same thread-value layouts, so the same
// partitions, fragments and tiled copies.
namespace cute {
template <>
struct MMA_Traits<hdaf_cute_emu::SM80_16x8x16_F32BF16BF16F32_TN>
    : MMA_Traits<SM80_16x8x16_F32BF16BF16F32_TN> {};
template <>
struct MMA_Traits<hdaf_cute_emu::SM80_16x8x16_F32F16F16F32_TN>
    : MMA_Traits<SM80_16x8x16_F32F16F16F32_TN> {};
template <>
struct Copy_Traits<hdaf_cute_emu::SM75_U32x4_LDSM_N> : Copy_Traits<SM75_U32x4_LDSM_N> {};
template <>
struct Copy_Traits<hdaf_cute_emu::SM75_U16x8_LDSM_T> : Copy_Traits<SM75_U16x8_LDSM_T> {};
template <class S, class D>
struct Copy_Traits<hdaf_cute_emu::SM80_CP_ASYNC_CACHEGLOBAL<S, D>>
    : Copy_Traits<SM80_CP_ASYNC_CACHEGLOBAL<S, D>> {};
}  // namespace cute

namespace hdaf_cute_emu {
namespace detail {

template <class Emu, class Real>
constexpr bool same_mma_atom() {
  using E = cute::MMA_Atom<Emu>;
  using R = cute::MMA_Atom<Real>;
  return std::is_same_v<typename E::Shape_MNK, typename R::Shape_MNK> &&
         std::is_same_v<typename E::ThrID, typename R::ThrID> &&
         std::is_same_v<typename E::LayoutA_TV, typename R::LayoutA_TV> &&
         std::is_same_v<typename E::LayoutB_TV, typename R::LayoutB_TV> &&
         std::is_same_v<typename E::LayoutC_TV, typename R::LayoutC_TV> &&
         std::is_same_v<typename E::ValTypeA, typename R::ValTypeA> &&
         std::is_same_v<typename E::ValTypeB, typename R::ValTypeB> &&
         std::is_same_v<typename E::ValTypeC, typename R::ValTypeC> &&
         std::is_same_v<typename E::ValTypeD, typename R::ValTypeD> &&
         std::is_same_v<typename Emu::ARegisters, typename Real::ARegisters> &&
         std::is_same_v<typename Emu::BRegisters, typename Real::BRegisters> &&
         std::is_same_v<typename Emu::CRegisters, typename Real::CRegisters> &&
         std::is_same_v<typename Emu::DRegisters, typename Real::DRegisters>;
}

template <class Emu, class Real, class T>
constexpr bool same_copy_atom() {
  using E = cute::Copy_Atom<Emu, T>;
  using R = cute::Copy_Atom<Real, T>;
  return std::is_same_v<typename E::ThrID, typename R::ThrID> &&
         std::is_same_v<typename E::ValLayoutSrc, typename R::ValLayoutSrc> &&
         std::is_same_v<typename E::ValLayoutDst, typename R::ValLayoutDst> &&
         std::is_same_v<typename E::ValLayoutRef, typename R::ValLayoutRef> &&
         std::is_same_v<typename Emu::SRegisters, typename Real::SRegisters> &&
         std::is_same_v<typename Emu::DRegisters, typename Real::DRegisters>;
}

static_assert(same_mma_atom<SM80_16x8x16_F32BF16BF16F32_TN, cute::SM80_16x8x16_F32BF16BF16F32_TN>());
static_assert(same_mma_atom<SM80_16x8x16_F32F16F16F32_TN, cute::SM80_16x8x16_F32F16F16F32_TN>());
static_assert(same_copy_atom<SM75_U32x4_LDSM_N, cute::SM75_U32x4_LDSM_N, cutlass::half_t>());
static_assert(same_copy_atom<SM75_U32x4_LDSM_N, cute::SM75_U32x4_LDSM_N, cutlass::bfloat16_t>());
static_assert(same_copy_atom<SM75_U16x8_LDSM_T, cute::SM75_U16x8_LDSM_T, cutlass::half_t>());
static_assert(same_copy_atom<SM75_U16x8_LDSM_T, cute::SM75_U16x8_LDSM_T, cutlass::bfloat16_t>());
static_assert(same_copy_atom<SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>,
                             cute::SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>, cutlass::half_t>());
static_assert(same_copy_atom<SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>,
                             cute::SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>, cutlass::bfloat16_t>());

}  // namespace detail
}  // namespace hdaf_cute_emu
