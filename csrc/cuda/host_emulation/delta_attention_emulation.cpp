// Runs the CUDA kernel templates of delta_attention_kernels.cuh on the CPU, for tests on
// machines without a GPU (tests/test_cuda.py builds it with torch.utils.cpp_extension.load).
// Not part of the hdaf._C build (setup.py compiles csrc/cuda/*.cu only).
//
// Emulation: threads, barriers and NaN-filled shared memory as in block_emulation.h (one
// std::thread per CUDA thread, a std::barrier per block and per warp). wmma is emulated
// with its documented semantics (each lane holds the whole 16x16 tile, loads check the
// 32-byte pointer and ldm alignment the hardware requires), and __CUDA_ARCH__ is set to 800
// while the kernels are compiled, so fp16/bf16 take the tensor-core path exactly as the
// sm_80 / sm_90 builds do; float32 / float64 take the FMA path, as on the GPU.
// Registered ops (CPU tensors, contiguous):
//   hdaf_cuda_emulation::forward(q, k, v, P, mask, L, U, wl, wr, scale, max_smem) -> (out, lse)
//   hdaf_cuda_emulation::backward(grad_out, q, k, v, P, mask, out, lse, L, U, wl, wr, scale,
//                                  max_smem) -> (dq, dk, dv, dP)
// max_smem selects the tile configuration as the device's shared-memory limit would.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <type_traits>

#include "block_emulation.h"

// wmma with its documented semantics.
namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct accumulator {};
struct matrix_a {};
struct matrix_b {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  float x[16][16];
};
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
inline void check(const void* p, unsigned ld, unsigned multiple) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || ld % multiple != 0)
    throw std::runtime_error("emulated wmma: pointer not 32-byte aligned or bad ldm");
}
template <class Use, class T, class Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ld) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value);
  check(p, ld, 8);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.x[r][c] = to_f(std::is_same<Layout, col_major>::value ? p[r + c * ld] : p[r * ld + c]);
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ld, layout_t layout) {
  check(p, ld, 4);
  if (layout != mem_row_major) throw std::runtime_error("emulated wmma: layout");
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r][c] = p[r * ld + c];
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ld, layout_t layout) {
  check(p, ld, 4);
  if (layout != mem_row_major) throw std::runtime_error("emulated wmma: layout");
  hdaf_emu::syncwarp();  // every lane has loaded before any lane stores
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) p[r * ld + c] = f.x[r][c];
}
inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float v) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r][c] = v;
}
template <class T, class LA, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  float t[16][16];
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n) {
      float s = c.x[r][n];
      for (int k = 0; k < 16; ++k) s += a.x[r][k] * b.x[k][n];
      t[r][n] = s;
    }
  std::memcpy(d.x, t, sizeof t);
}
}  // namespace wmma
}  // namespace nvcuda

// Compile the kernels as for sm_80, in a namespace of their own (the CUDA build of the same
// templates may be loaded in the same process through hdaf._C).
#define __CUDA_ARCH__ 800
#define hdaf hdaf_host_emulation
#include "../delta_attention_kernels.cuh"
#undef hdaf
#undef __CUDA_ARCH__

// `extern __shared__ unsigned char smem[]` in a kernel declares this namespace's smem.
namespace hdaf_host_emulation {
namespace cuda {
namespace detail {
alignas(128) unsigned char smem[hdaf_emu::kSmemBytes];
}  // namespace detail
}  // namespace cuda
}  // namespace hdaf_host_emulation
unsigned char* const hdaf_emu::shared_memory = hdaf_host_emulation::cuda::detail::smem;

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace {

namespace emu = hdaf_host_emulation::cuda;

emu::ProblemDims dims_of(const at::Tensor& q, const at::Tensor& v, const at::Tensor& P, int64_t L,
                        int64_t U, int64_t wl, int64_t wr, double scale) {
  return emu::ProblemDims{q.size(0), q.size(1), P.size(1), q.size(2), q.size(3), v.size(3),
                          P.size(3), L, U, wl, wr, scale};
}

at::ScalarType acc_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

template <class T>
std::tuple<at::Tensor, at::Tensor> forward_t(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, const at::Tensor& P,
                                             const std::optional<at::Tensor>& mask, int64_t L,
                                             int64_t U, int64_t wl, int64_t wr, double scale,
                                             int64_t max_smem) {
  auto out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(acc_dtype(q)));
  emu::FwdParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.P = P.data_ptr();
  p.mask = mask ? mask->data_ptr<bool>() : nullptr;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  static_cast<emu::ProblemDims&>(p) = dims_of(q, v, P, L, U, wl, wr, scale);
  emu::detail::fwd_launch<T>(p, static_cast<int>(max_smem), nullptr);
  return {out, lse};
}

template <class T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_t(
    const at::Tensor& go, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& P, const std::optional<at::Tensor>& mask, const at::Tensor& out,
    const at::Tensor& lse, int64_t L, int64_t U, int64_t wl, int64_t wr, double scale,
    int64_t max_smem) {
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  auto D = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(acc_dtype(q)));
  auto dPh = at::zeros({q.size(0), q.size(1), q.size(2), P.size(3)}, q.options().dtype(acc_dtype(q)));
  emu::BwdParams p;
  p.grad_out = go.data_ptr();
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.P = P.data_ptr();
  p.mask = mask ? mask->data_ptr<bool>() : nullptr;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  p.D = D.data_ptr();
  p.grad_q = dq.data_ptr();
  p.grad_k = dk.data_ptr();
  p.grad_v = dv.data_ptr();
  p.dP_heads = dPh.data_ptr();
  static_cast<emu::ProblemDims&>(p) = dims_of(q, v, P, L, U, wl, wr, scale);
  emu::detail::bwd_launch<T>(p, static_cast<int>(max_smem), nullptr);
  at::Tensor dP = P.size(1) == 1 ? dPh.sum(1, /*keepdim=*/true) : dPh;
  return {dq, dk, dv, dP.to(P.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& P,
                                           const std::optional<at::Tensor>& mask, int64_t L,
                                           int64_t U, int64_t wl, int64_t wr, double scale,
                                           int64_t max_smem) {
  TORCH_CHECK(q.is_cpu() && q.is_contiguous() && k.is_contiguous() && v.is_contiguous() &&
                  P.is_contiguous(),
              "emulation: contiguous CPU tensors expected");
  switch (q.scalar_type()) {
    case at::kFloat: return forward_t<float>(q, k, v, P, mask, L, U, wl, wr, scale, max_smem);
    case at::kDouble: return forward_t<double>(q, k, v, P, mask, L, U, wl, wr, scale, max_smem);
    case at::kHalf: return forward_t<__half>(q, k, v, P, mask, L, U, wl, wr, scale, max_smem);
    case at::kBFloat16:
      return forward_t<__nv_bfloat16>(q, k, v, P, mask, L, U, wl, wr, scale, max_smem);
    default: TORCH_CHECK(false, "emulation: unsupported dtype ", q.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& go, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& P, const std::optional<at::Tensor>& mask, const at::Tensor& out,
    const at::Tensor& lse, int64_t L, int64_t U, int64_t wl, int64_t wr, double scale,
    int64_t max_smem) {
  TORCH_CHECK(q.is_cpu() && go.is_contiguous() && q.is_contiguous() && k.is_contiguous() &&
                  v.is_contiguous() && P.is_contiguous() && out.is_contiguous() &&
                  lse.is_contiguous(),
              "emulation: contiguous CPU tensors expected");
  switch (q.scalar_type()) {
    case at::kFloat:
      return backward_t<float>(go, q, k, v, P, mask, out, lse, L, U, wl, wr, scale, max_smem);
    case at::kDouble:
      return backward_t<double>(go, q, k, v, P, mask, out, lse, L, U, wl, wr, scale, max_smem);
    case at::kHalf:
      return backward_t<__half>(go, q, k, v, P, mask, out, lse, L, U, wl, wr, scale, max_smem);
    case at::kBFloat16:
      return backward_t<__nv_bfloat16>(go, q, k, v, P, mask, out, lse, L, U, wl, wr, scale,
                                       max_smem);
    default: TORCH_CHECK(false, "emulation: unsupported dtype ", q.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY(hdaf_cuda_emulation, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor P, Tensor? key_padding_mask, int L, int U, "
        "int window_left, int window_right, float scale, int max_smem) -> (Tensor, Tensor)",
        &forward);
  m.def("backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor P, "
        "Tensor? key_padding_mask, Tensor out, Tensor lse, int L, int U, int window_left, "
        "int window_right, float scale, int max_smem) -> (Tensor, Tensor, Tensor, Tensor)",
        &backward);
}
