// Host side of the opt-in CuTe forward: the op hdaf::cuda_cute_delta_attention_forward,
// with the schema of hdaf::delta_attention_forward (docs/delta_attention.md), defined here and
// registered for the CUDA dispatch key. setup.py compiles this file and the kernels of
// csrc/cuda_cute/ only with HDAF_BUILD_CUTE=1, so the op exists exactly when they were built
// (tests/test_cuda_cute.py keys on that). hdaf's dispatcher (`auto`, backend="cuda") never calls
// it: nothing here has run on a GPU yet.
//
// Built by the host C++ compiler like csrc/cuda/delta_attention_cuda.cpp: the generic argument
// checks are hdaf::check_forward_args (the very checks of the CPU and CUDA ops); this file adds
// what the CuTe kernels instantiate (float16 / bfloat16, Dk == Dv in {64, 128}, sm_80+).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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

// The shared checks, then the CuTe kernels' own limits. Runs before anything touches a GPU, so
// tests reach it with fake CUDA tensors on a machine without one.
DeltaSizes check_cute_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& P, const std::optional<at::Tensor>& mask, int64_t L,
                             int64_t U, int64_t window_left, int64_t window_right, double scale) {
  const DeltaSizes s = check_forward_args(OpDevice::CUDA, q, k, v, P, mask, L, U, window_left,
                                          window_right, scale);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, kWho,
              ": q must be float16 or bfloat16 (the CuTe kernels instantiate no other dtype; "
              "backend 'cuda' serves float32 and float64), got ",
              q.scalar_type());
  TORCH_CHECK(s.Dk == s.Dv, kWho, ": needs Dk == Dv, got Dk=", s.Dk, " and Dv=", s.Dv,
              " (backend 'cuda' takes Dk != Dv)");
  TORCH_CHECK(s.Dk == 64 || s.Dk == 128, kWho, ": head dim must be 64 or 128, got Dk=", s.Dk,
              " (backend 'cuda' takes head dims up to 128)");
  // Tile indices inside one (batch, head) are 32-bit; the grid is 1-D.
  TORCH_CHECK(s.T * s.Dk < (int64_t(1) << 31) && s.R < (int64_t(1) << 31), kWho,
              ": T*D and R must be < 2^31, got T=", s.T, ", D=", s.Dk, ", R=", s.R);
  TORCH_CHECK((s.T + 127) / 128 * s.B * s.H < (int64_t(1) << 31), kWho, ": B*H*ceil(T/128) = ",
              (s.T + 127) / 128 * s.B * s.H, " thread blocks exceed the grid limit");
  TORCH_CHECK(q.is_cuda(), kWho, ": q must be a CUDA tensor, got ", q.device());
  return s;
}

// sm_80+ (mma.sync m16n8k16 with bf16, cp.async) and the tile's shared memory.
void check_device(const at::Tensor& q, size_t smem_bytes) {
  const int dev = q.device().index();
  int major = 0, minor = 0, optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK(major >= 8, kWho, ": needs compute capability 8.0 or newer, device ", dev, " is ",
              major, ".", minor, " (backend 'cuda' runs there)");
  TORCH_CHECK(smem_bytes <= static_cast<size_t>(optin), kWho, ": the kernel needs ", smem_bytes,
              " bytes of shared memory per block, device ", dev, " allows ", optin);
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
  // cp.async moves 16-byte chunks: q, k, v must start 16-byte aligned (a contiguous view with a
  // storage offset may not; a fresh copy does). P and the mask are read element by element.
  auto aligned = [](const at::Tensor& t) {
    at::Tensor c = t.contiguous();
    return reinterpret_cast<std::uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
  };
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(hdaf, m) {
  m.def(
      "cuda_cute_delta_attention_forward(Tensor q, Tensor k, Tensor v, Tensor P, "
      "Tensor? key_padding_mask, int L, int U, int window_left, int window_right, float scale) "
      "-> (Tensor out, Tensor lse)");
}

TORCH_LIBRARY_IMPL(hdaf, CUDA, m) { m.impl("cuda_cute_delta_attention_forward", &forward); }

}  // namespace cuda
}  // namespace hdaf
