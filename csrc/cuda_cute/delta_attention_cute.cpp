// Host side of the opt-in CuTe kernels: the ops hdaf::cuda_cute_delta_attention_forward and
// hdaf::cuda_cute_delta_attention_backward, with the schemas of hdaf::delta_attention_forward /
// _backward (docs/delta_attention.md), defined here and registered for the CUDA dispatch key.
// setup.py compiles this file and the kernels of csrc/cuda_cute/ only with HDAF_BUILD_CUTE=1,
// so the ops exist exactly when they were built
// (tests/test_cuda_cute.py keys on that). hdaf's dispatcher (`auto`, backend="cuda") never calls
// it: nothing here has run on a GPU yet.
//
// Built by the host C++ compiler like csrc/cuda/delta_attention_cuda.cpp: the generic argument
// checks are hdaf::check_forward_args (the very checks of the CPU and CUDA ops); this file adds
// what the CuTe kernels instantiate (float16 / bfloat16, Dk == Dv in {64, 128}, sm_80+).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "../cuda/delta_attention_cuda.h"
#include "../cuda/host_params.h"
#include "hdaf/delta_attention_checks.h"

namespace hdaf {
namespace cuda {
namespace {

constexpr const char* kWho = "hdaf cuda_cute_delta_attention_forward";
constexpr const char* kWhoBwd = "hdaf cuda_cute_delta_attention_backward";

// The shared checks, then the CuTe kernels' own limits. Runs before anything touches a GPU, so
// tests reach it with fake CUDA tensors on a machine without one.
DeltaSizes check_cute_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& P, const std::optional<at::Tensor>& mask, int64_t L,
                             int64_t U, int64_t window_left, int64_t window_right, double scale,
                             const char* who = kWho) {
  const DeltaSizes s = check_forward_args(OpDevice::CUDA, q, k, v, P, mask, L, U, window_left,
                                          window_right, scale);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, who,
              ": q must be float16 or bfloat16 (the CuTe kernels instantiate no other dtype; "
              "backend 'cuda' serves float32 and float64), got ",
              q.scalar_type());
  TORCH_CHECK(s.Dk == s.Dv, who, ": needs Dk == Dv, got Dk=", s.Dk, " and Dv=", s.Dv,
              " (backend 'cuda' takes Dk != Dv)");
  TORCH_CHECK(s.Dk == 64 || s.Dk == 128, who, ": head dim must be 64 or 128, got Dk=", s.Dk,
              " (backend 'cuda' takes head dims up to 128)");
  // Tile indices inside one (batch, head) are 32-bit; the grid is 1-D.
  TORCH_CHECK(s.T * s.Dk < (int64_t(1) << 31) && s.R < (int64_t(1) << 31), who,
              ": T*D and R must be < 2^31, got T=", s.T, ", D=", s.Dk, ", R=", s.R);
  TORCH_CHECK((s.T + 127) / 128 * s.B * s.H < (int64_t(1) << 31), who, ": B*H*ceil(T/128) = ",
              (s.T + 127) / 128 * s.B * s.H, " thread blocks exceed the grid limit");
  TORCH_CHECK(q.is_cuda(), who, ": q must be a CUDA tensor, got ", q.device());
  return s;
}

// sm_80+ (mma.sync m16n8k16 with bf16, cp.async) and the tile's shared memory.
void check_device(const at::Tensor& q, size_t smem_bytes, const char* who = kWho) {
  const int dev = q.device().index();
  int major = 0, minor = 0, optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK(major >= 8, who, ": needs compute capability 8.0 or newer, device ", dev, " is ",
              major, ".", minor, " (backend 'cuda' runs there)");
  TORCH_CHECK(smem_bytes <= static_cast<size_t>(optin), who, ": the kernel needs ", smem_bytes,
              " bytes of shared memory per block, device ", dev, " allows ", optin);
}

// cp.async moves 16-byte chunks: a tensor it reads must start 16-byte aligned (a contiguous view
// with a storage offset may not; a fresh copy does).
at::Tensor aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return reinterpret_cast<std::uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

template <typename scalar_t, int D>
void run(const FwdParams& p, const at::Tensor& q) {
  check_device(q, delta_fwd_cute_smem_bytes<scalar_t, D>());
  const cudaError_t err = delta_fwd_cute_launch<scalar_t, D>(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                           const at::Tensor& v_in, const at::Tensor& P_in,
                                           const std::optional<at::Tensor>& key_padding_mask,
                                           int64_t L, int64_t U, int64_t window_left,
                                           int64_t window_right, double scale) {
  const DeltaSizes s = check_cute_inputs(q_in, k_in, v_in, P_in, key_padding_mask, L, U,
                                         window_left, window_right, scale);
  c10::cuda::CUDAGuard guard(q_in.device());
  // q, k, v through cp.async (aligned); P and the mask are read element by element.
  const at::Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in), P = P_in.contiguous();
  at::Tensor mask;
  if (key_padding_mask.has_value()) mask = key_padding_mask->contiguous();

  at::Tensor out = at::empty({s.B, s.H, s.T, s.Dv}, q.options());
  at::Tensor lse = at::empty({s.B, s.H, s.T}, q.options().dtype(at::kFloat));
  if (s.B * s.H * s.T == 0) return {out, lse};

  const FwdParams p = make_fwd_params(
      ProblemDims{s.B, s.H, s.Hp, s.T, s.Dk, s.Dv, s.R, L, U, window_left, window_right, scale},
      q, k, v, P, mask, out, lse);

  const bool half = q.scalar_type() == at::kHalf;
  if (s.Dk == 64) {
    half ? run<__half, 64>(p, q) : run<__nv_bfloat16, 64>(p, q);
  } else {
    half ? run<__half, 128>(p, q) : run<__nv_bfloat16, 128>(p, q);
  }
  return {out, lse};
}

template <typename scalar_t, int D>
void run_backward(const CuteBwdParams& p, const at::Tensor& q) {
  check_device(q, delta_bwd_cute_smem_bytes<scalar_t, D>(), kWhoBwd);
  const cudaError_t err = delta_bwd_cute_launch<scalar_t, D>(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& P_in,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out_in,
    const at::Tensor& lse_in, int64_t L, int64_t U, int64_t window_left, int64_t window_right,
    double scale) {
  const DeltaSizes s = check_cute_inputs(q_in, k_in, v_in, P_in, key_padding_mask, L, U,
                                         window_left, window_right, scale, kWhoBwd);
  check_backward_args(OpDevice::CUDA, s, q_in, grad_out_in, out_in, lse_in);
  // The backward's grids: ceil(T / 64) blocks per (batch, head) for dQ and dK/dV, one warp per
  // row (4 or 8 per block) for D_i.
  TORCH_CHECK((s.T + 63) / 64 * s.B * s.H < (int64_t(1) << 31) &&
                  (s.B * s.H * s.T + 3) / 4 < (int64_t(1) << 31),
              kWhoBwd, ": B*H*ceil(T/64) = ", (s.T + 63) / 64 * s.B * s.H, " and B*H*T/4 = ",
              (s.B * s.H * s.T + 3) / 4, " thread blocks must stay below the grid limit 2^31");
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in),
                   grad_out = aligned(grad_out_in), P = P_in.contiguous(),
                   out = out_in.contiguous(), lse = lse_in.contiguous();
  at::Tensor mask;
  if (key_padding_mask.has_value()) mask = key_padding_mask->contiguous();

  at::Tensor grad_q = at::empty_like(q), grad_k = at::empty_like(k), grad_v = at::empty_like(v);
  if (s.B * s.H * s.T == 0) return {grad_q, grad_k, grad_v, at::zeros_like(P)};
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor D = at::empty({s.B, s.H, s.T}, f32);
  // The key-row and query-row halves of dP per head, every element written by one thread.
  at::Tensor dP_keys = at::zeros({s.B, s.H, s.T, s.R}, f32);
  at::Tensor dP_rows = at::zeros({s.B, s.H, s.T, s.R}, f32);

  CuteBwdParams p;
  static_cast<ProblemDims&>(p) =
      ProblemDims{s.B, s.H, s.Hp, s.T, s.Dk, s.Dv, s.R, L, U, window_left, window_right, scale};
  p.grad_out = grad_out.data_ptr();
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.P = P.data_ptr();
  p.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  p.D = D.data_ptr();
  p.grad_q = grad_q.data_ptr();
  p.grad_k = grad_k.data_ptr();
  p.grad_v = grad_v.data_ptr();
  p.dP_heads = dP_keys.data_ptr();
  p.dP_rows = dP_rows.data_ptr();

  const bool half = q.scalar_type() == at::kHalf;
  if (s.Dk == 64) {
    half ? run_backward<__half, 64>(p, q) : run_backward<__nv_bfloat16, 64>(p, q);
  } else {
    half ? run_backward<__half, 128>(p, q) : run_backward<__nv_bfloat16, 128>(p, q);
  }
  // Both halves, then the sum over heads in a fixed order when P is shared (Hp = 1).
  at::Tensor grad_P = dP_keys.add_(dP_rows);
  if (s.Hp == 1) grad_P = grad_P.sum(1, /*keepdim=*/true);
  return {grad_q, grad_k, grad_v, grad_P.to(P.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hdaf, m) {
  m.def(
      "cuda_cute_delta_attention_forward(Tensor q, Tensor k, Tensor v, Tensor P, "
      "Tensor? key_padding_mask, int L, int U, int window_left, int window_right, float scale) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "cuda_cute_delta_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor P, "
      "Tensor? key_padding_mask, Tensor out, Tensor lse, int L, int U, int window_left, "
      "int window_right, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, "
      "Tensor grad_P)");
}

TORCH_LIBRARY_IMPL(hdaf, CUDA, m) {
  m.impl("cuda_cute_delta_attention_forward", &forward);
  m.impl("cuda_cute_delta_attention_backward", &backward);
}

}  // namespace cuda
}  // namespace hdaf
