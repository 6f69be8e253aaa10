// CUDA implementation of hdaf::delta_attention_forward / _backward (schema in
// csrc/delta_attention.cpp, spec in docs/delta_attention.md): input validation,
// allocation, dtype dispatch to the launchers of fwd_*.cu / bwd_*.cu, and the
// TORCH_LIBRARY_IMPL(hdaf, CUDA) registration.
//
// dtypes: float16 and bfloat16 (tensor-core tile matmuls on sm_80+, float32
// accumulation), float32 (FMA tile matmuls, float32 throughout, no tf32) and float64
// (FMA, float64 throughout; lse float64 as the spec asks). Head dims Dk, Dv <= 128.
//
// Kept light on purpose (no torch/extension.h, no ATen/cuda/CUDAContext.h, no
// pybind11): c10::cuda::getCurrentCUDAStream is the function that
// at::cuda::getCurrentCUDAStream aliases.
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

namespace hdaf {
namespace cuda {
namespace {

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_dtype(const at::Tensor& q) {
  const auto t = q.scalar_type();
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble,
              "hdaf delta_attention (CUDA): q must be float16, bfloat16, float32 or float64, got ",
              t);
}

void check_same(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda(), "hdaf delta_attention (CUDA): ", name, " must be a CUDA tensor, got ",
              t.device());
  TORCH_CHECK(t.device() == q.device(), "hdaf delta_attention (CUDA): ", name, " is on ",
              t.device(), " but q is on ", q.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "hdaf delta_attention (CUDA): ", name,
              " has dtype ", t.scalar_type(), " but q has ", q.scalar_type());
}

struct Shape {
  int64_t B, H, Hp, T, Dk, Dv, R;
};

// Validates q, k, v, P, mask and the scalar arguments; returns the sizes.
Shape check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& P, const std::optional<at::Tensor>& key_padding_mask,
                   int64_t L, int64_t U, double scale) {
  TORCH_CHECK(q.is_cuda(), "hdaf delta_attention (CUDA): q must be a CUDA tensor, got ", q.device());
  check_dtype(q);
  check_same("k", k, q);
  check_same("v", v, q);
  check_same("P", P, q);
  TORCH_CHECK(q.dim() == 4, "hdaf delta_attention (CUDA): q must be 4-D [B,H,T,Dk], got shape ",
              q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), "hdaf delta_attention (CUDA): k must have q's shape ",
              q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.dim() == 4 && v.size(0) == q.size(0) && v.size(1) == q.size(1) &&
                  v.size(2) == q.size(2),
              "hdaf delta_attention (CUDA): v must be [B,H,T,Dv] with [B,H,T] = [", q.size(0), ", ",
              q.size(1), ", ", q.size(2), "], got ", v.sizes());
  Shape s;
  s.B = q.size(0);
  s.H = q.size(1);
  s.T = q.size(2);
  s.Dk = q.size(3);
  s.Dv = v.size(3);
  TORCH_CHECK(s.Dk <= kMaxHeadDim && s.Dv <= kMaxHeadDim,
              "hdaf delta_attention (CUDA): head dims up to ", kMaxHeadDim,
              " are supported, got Dk=", s.Dk, " and Dv=", s.Dv);
  TORCH_CHECK(L >= 0 && U >= 0, "hdaf delta_attention (CUDA): L and U must be >= 0, got L=", L,
              " U=", U);
  TORCH_CHECK(P.dim() == 4 && P.size(0) == s.B && (P.size(1) == 1 || P.size(1) == s.H) &&
                  P.size(2) == s.T && P.size(3) == L + U + 1,
              "hdaf delta_attention (CUDA): P must be [B,Hp,T,R] with B=", s.B, ", Hp in {1, ", s.H,
              "}, T=", s.T, ", R=L+U+1=", L + U + 1, ", got ", P.sizes());
  s.Hp = P.size(1);
  s.R = P.size(3);
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool,
                "hdaf delta_attention (CUDA): key_padding_mask must be bool, got ", m.scalar_type());
    TORCH_CHECK(m.device() == q.device(), "hdaf delta_attention (CUDA): key_padding_mask is on ",
                m.device(), " but q is on ", q.device());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == s.B && m.size(1) == s.T,
                "hdaf delta_attention (CUDA): key_padding_mask must be [B,T] = [", s.B, ", ", s.T,
                "], got ", m.sizes());
  }
  TORCH_CHECK(std::isfinite(scale), "hdaf delta_attention (CUDA): scale must be finite, got ",
              scale);
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
  const Shape s = check_inputs(q_in, k_in, v_in, P_in, key_padding_mask, L, U, scale);
  check_grid(s);
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(),
                   P = P_in.contiguous();
  at::Tensor mask;
  if (key_padding_mask.has_value()) mask = key_padding_mask->contiguous();

  at::Tensor out = at::empty({s.B, s.H, s.T, s.Dv}, q.options());
  at::Tensor lse = at::empty({s.B, s.H, s.T}, q.options().dtype(acc_dtype(q.scalar_type())));
  if (s.B * s.H * s.T == 0) return {out, lse};

  FwdParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.P = P.data_ptr();
  p.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  static_cast<ProblemDims&>(p) = dims_of(s, L, U, window_left, window_right, scale);

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
  const Shape s = check_inputs(q_in, k_in, v_in, P_in, key_padding_mask, L, U, scale);
  check_grid(s);
  check_same("grad_out", grad_out_in, q_in);
  check_same("out", out_in, q_in);
  TORCH_CHECK(grad_out_in.sizes() == v_in.sizes() && out_in.sizes() == v_in.sizes(),
              "hdaf delta_attention (CUDA): grad_out and out must be [B,H,T,Dv] = ", v_in.sizes(),
              ", got ", grad_out_in.sizes(), " and ", out_in.sizes());
  const at::ScalarType acc = acc_dtype(q_in.scalar_type());
  TORCH_CHECK(lse_in.is_cuda() && lse_in.device() == q_in.device(),
              "hdaf delta_attention (CUDA): lse must be on ", q_in.device(), ", got ",
              lse_in.device());
  TORCH_CHECK(lse_in.scalar_type() == acc, "hdaf delta_attention (CUDA): lse must be ", acc,
              " for ", q_in.scalar_type(), " inputs, got ", lse_in.scalar_type());
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == s.B && lse_in.size(1) == s.H &&
                  lse_in.size(2) == s.T,
              "hdaf delta_attention (CUDA): lse must be [B,H,T] = [", s.B, ", ", s.H, ", ", s.T,
              "], got ", lse_in.sizes());
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
