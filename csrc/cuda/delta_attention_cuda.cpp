// CUDA implementation of hdaf::delta_attention_forward / _backward (schema in
// csrc/delta_attention.cpp, spec in docs/delta_attention.md): the device checks, allocation,
// dtype dispatch to the launchers of fwd_*.cu / bwd_*.cu, and the TORCH_LIBRARY_IMPL(hdaf, CUDA)
// registration. The argument checks are hdaf::check_forward_args / check_backward_args
// (csrc/delta_attention_checks.cpp), the same code the CPU op runs.
//
// Host code compiled by the host C++ compiler, like flash-attention's flash_api.cpp: every
// torch-facing line (checks, exceptions, allocation) is built as in any .cpp extension, and
// nvcc compiles only the torch-free kernel files.
//
// dtypes: float16 and bfloat16 (tensor-core tile matmuls on sm_80+, float32
// accumulation), float32 (FMA tile matmuls, float32 throughout, no tf32) and float64
// (FMA, float64 throughout; lse float64 as the spec asks). Head dims Dk, Dv <= 128
// (hdaf::kCudaMaxHeadDim).
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

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "delta_attention_cuda.h"
#include "host_params.h"
#include "hdaf/delta_attention_checks.h"

namespace hdaf {
namespace cuda {
namespace {

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

using Shape = DeltaSizes;

// The shared argument checks, then what only the CUDA op needs: q (hence all) on a GPU.
Shape check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& P, const std::optional<at::Tensor>& key_padding_mask,
                   int64_t L, int64_t U, int64_t window_left, int64_t window_right,
                   double scale) {
  const Shape s = check_forward_args(OpDevice::CUDA, q, k, v, P, key_padding_mask, L, U,
                                     window_left, window_right, scale);
  TORCH_CHECK(q.is_cuda(), "hdaf delta_attention (CUDA): q must be a CUDA tensor, got ",
              q.device());
  return s;
}

void check_grid(const Shape& s) {
  // The largest grid is ceil(T/16) * B * H blocks (float64 tiles); gridDim.x < 2^31.
  const int64_t blocks = (s.T + 15) / 16 * s.B * s.H;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "hdaf delta_attention (CUDA): B*H*ceil(T/16) = ",
              blocks, " thread blocks exceed the grid limit (B=", s.B, ", H=", s.H, ", T=", s.T,
              ")");
}

int max_smem_per_block(const at::Tensor& q) {
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        q.device().index()));
  return optin;
}

void check_smem(size_t bytes, int optin, const at::Tensor& q, const Shape& s, const char* what) {
  TORCH_CHECK(bytes <= static_cast<size_t>(optin), "hdaf delta_attention (CUDA): the ", what,
              " kernel needs ", bytes, " bytes of shared memory per block for ", q.scalar_type(),
              " with Dk=", s.Dk, ", Dv=", s.Dv, ", but the device allows ", optin,
              " (use smaller head dims, or a device with more shared memory)");
}

ProblemDims dims_of(const Shape& s, int64_t L, int64_t U, int64_t window_left,
                    int64_t window_right, double scale) {
  return ProblemDims{s.B, s.H, s.Hp, s.T, s.Dk, s.Dv, s.R, L, U, window_left, window_right, scale};
}

template <typename scalar_t>
void run_forward(const FwdParams& p, const at::Tensor& q, const Shape& s) {
  const int optin = max_smem_per_block(q);
  check_smem(delta_fwd_smem_bytes<scalar_t>(s.Dk, s.Dv, optin), optin, q, s, "forward");
  C10_CUDA_CHECK(delta_fwd_launch<scalar_t>(p, optin, c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void run_backward(const BwdParams& p, const at::Tensor& q, const Shape& s) {
  const int optin = max_smem_per_block(q);
  check_smem(delta_bwd_smem_bytes<scalar_t>(s.Dk, s.Dv, optin), optin, q, s, "backward");
  C10_CUDA_CHECK(delta_bwd_launch<scalar_t>(p, optin, c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> delta_attention_forward_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& P_in,
    const std::optional<at::Tensor>& key_padding_mask, int64_t L, int64_t U, int64_t window_left,
    int64_t window_right, double scale) {
  const Shape s = check_inputs(q_in, k_in, v_in, P_in, key_padding_mask, L, U, window_left,
                               window_right, scale);
  check_grid(s);
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(),
                   P = P_in.contiguous();
  at::Tensor mask;
  if (key_padding_mask.has_value()) mask = key_padding_mask->contiguous();

  at::Tensor out = at::empty({s.B, s.H, s.T, s.Dv}, q.options());
  at::Tensor lse = at::empty({s.B, s.H, s.T}, q.options().dtype(acc_dtype(q.scalar_type())));
  if (s.B * s.H * s.T == 0) return {out, lse};

  const FwdParams p = make_fwd_params(dims_of(s, L, U, window_left, window_right, scale), q, k, v,
                                      P, mask, out, lse);

  switch (q.scalar_type()) {
    case at::kHalf: run_forward<__half>(p, q, s); break;
    case at::kBFloat16: run_forward<__nv_bfloat16>(p, q, s); break;
    case at::kFloat: run_forward<float>(p, q, s); break;
    case at::kDouble: run_forward<double>(p, q, s); break;
    default: TORCH_CHECK(false, "hdaf delta_attention (CUDA): unsupported dtype ", q.scalar_type());
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> delta_attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& P_in,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out_in,
    const at::Tensor& lse_in, int64_t L, int64_t U, int64_t window_left, int64_t window_right,
    double scale) {
  const Shape s = check_inputs(q_in, k_in, v_in, P_in, key_padding_mask, L, U, window_left,
                               window_right, scale);
  check_backward_args(OpDevice::CUDA, s, q_in, grad_out_in, out_in, lse_in);
  check_grid(s);
  const at::ScalarType acc = acc_dtype(q_in.scalar_type());
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(),
                   P = P_in.contiguous(), grad_out = grad_out_in.contiguous(),
                   out = out_in.contiguous(), lse = lse_in.contiguous();
  at::Tensor mask;
  if (key_padding_mask.has_value()) mask = key_padding_mask->contiguous();

  at::Tensor grad_q = at::empty_like(q);
  at::Tensor grad_k = at::empty_like(k);
  at::Tensor grad_v = at::empty_like(v);
  if (s.B * s.H * s.T == 0) return {grad_q, grad_k, grad_v, at::zeros_like(P)};
  at::Tensor D = at::empty({s.B, s.H, s.T}, q.options().dtype(acc));
  // Per-head dP, each element owned by one thread of each kernel (deterministic).
  at::Tensor dP_heads = at::zeros({s.B, s.H, s.T, s.R}, q.options().dtype(acc));

  BwdParams p;
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
  p.dP_heads = dP_heads.data_ptr();
  static_cast<ProblemDims&>(p) = dims_of(s, L, U, window_left, window_right, scale);

  switch (q.scalar_type()) {
    case at::kHalf: run_backward<__half>(p, q, s); break;
    case at::kBFloat16: run_backward<__nv_bfloat16>(p, q, s); break;
    case at::kFloat: run_backward<float>(p, q, s); break;
    case at::kDouble: run_backward<double>(p, q, s); break;
    default: TORCH_CHECK(false, "hdaf delta_attention (CUDA): unsupported dtype ", q.scalar_type());
  }
  // Sum over heads in a fixed order when P is shared by all heads (Hp = 1).
  at::Tensor grad_P = s.Hp == 1 ? dP_heads.sum(1, /*keepdim=*/true) : dP_heads;
  return {grad_q, grad_k, grad_v, grad_P.to(P.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(hdaf, CUDA, m) {
  m.impl("delta_attention_forward", &delta_attention_forward_cuda);
  m.impl("delta_attention_backward", &delta_attention_backward_cuda);
}

}  // namespace cuda
}  // namespace hdaf
