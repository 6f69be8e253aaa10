// CUDA implementation of hdaf::delta_attention_forward / _backward and
// hdaf::delta_attention_varlen_forward / _backward (schemas in csrc/delta_attention.cpp, spec in
// docs/delta_attention.md): the device checks, allocation, dtype / head-dim dispatch to the
// launchers of fwd_*.cu / bwd_*.cu, and the TORCH_LIBRARY_IMPL(hdaf, CUDA) registration. The
// argument checks are hdaf::check_forward_args / check_varlen_args (csrc/delta_attention_checks.cpp),
// the very code the CPU op runs; they also hold what the kernels instantiate (float16 / bfloat16,
// Dk == Dv in {64, 128}) and raise NotImplementedError naming the backends for anything else.
//
// Host code compiled by the host C++ compiler, like flash-attention's flash_api.cpp: every
// torch-facing line is built as in any .cpp extension; nvcc compiles only the torch-free kernel
// units. The parameter blocks come from host_params.h, which the host emulation
// (csrc/cuda/host_emulation) uses too, so the kernels it verifies on the CPU get the same blocks.
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

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "delta_attention_cuda.h"
#include "hdaf/delta_attention_checks.h"
#include "host_params.h"

namespace hdaf {
namespace cuda {
namespace {

constexpr const char* kWho = "hdaf delta_attention (CUDA)";

// The (dtype, head dim) of a call as a type: Config::scalar_t, Config::kD.
template <typename scalar_t_, int kD_>
struct Config {
  using scalar_t = scalar_t_;
  static constexpr int kD = kD_;
};

// Calls f(Config<scalar_t, D>{}) for the dtype and head dim of the call; the shared checks have
// already refused everything else.
template <class F>
void dispatch(at::ScalarType dtype, int64_t D, F&& f) {
  const bool half = dtype == at::kHalf;
  if (D == 64) {
    half ? f(Config<__half, 64>{}) : f(Config<__nv_bfloat16, 64>{});
  } else {
    half ? f(Config<__half, 128>{}) : f(Config<__nv_bfloat16, 128>{});
  }
}

struct DeviceInfo {
  int num_sms;
};

// sm_80+ (mma.sync m16n8k16 with bf16, cp.async) and the kernel's shared memory.
DeviceInfo check_device(const at::Tensor& q, size_t smem_bytes) {
  TORCH_CHECK(q.is_cuda(), kWho, ": q must be a CUDA tensor, got ", q.device());
  const int dev = q.device().index();
  int major = 0, minor = 0, optin = 0, sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  TORCH_CHECK_NOT_IMPLEMENTED(major >= 8, kWho, ": backend='cuda' needs compute capability 8.0 "
                              "or newer, device ", dev, " is ", major, ".", minor,
                              "; use backend='triton'");
  TORCH_CHECK(smem_bytes <= static_cast<size_t>(optin), kWho, ": the kernel needs ", smem_bytes,
              " bytes of shared memory per block, device ", dev, " allows ", optin);
  return DeviceInfo{sms};
}

// Sizes the kernels index with 32-bit integers inside one sequence, and the 1-D grid limit.
void check_limits(int64_t B, int64_t H, int64_t Tq, int64_t Tk, int64_t D, int64_t R) {
  TORCH_CHECK(Tk * D < (int64_t(1) << 31) && Tk * R < (int64_t(1) << 31), kWho,
              ": Tk*D and Tk*R must be < 2^31, got Tk=", Tk, ", D=", D, ", R=", R);
  const int64_t blocks = (std::max(Tq, Tk) + 63) / 64 * B * H;
  TORCH_CHECK(blocks < (int64_t(1) << 31), kWho, ": B*H*ceil(T/64) = ", blocks,
              " thread blocks exceed the grid limit (B=", B, ", H=", H, ", Tq=", Tq, ", Tk=", Tk,
              ")");
}

// cp.async moves 16-byte chunks: a tensor it reads must start 16-byte aligned (a contiguous view
// with a storage offset may not; a fresh copy does).
at::Tensor aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return reinterpret_cast<std::uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

// Split-key decoding for calls whose grid leaves the device mostly idle (decoding: few queries,
// many keys): partial results per split in float32, merged by the launcher's combine kernel.
template <typename scalar_t, int D>
void launch_forward(FwdParams& p, const at::Tensor& out, const at::Tensor& lse,
                    const DeviceInfo& dev) {
  const int bm = delta_fwd_block_m<scalar_t, D>(), bn = delta_fwd_block_n<scalar_t, D>();
  const int64_t ctas = (int64_t(p.Tq) + bm - 1) / bm * p.B * p.H;
  const int splits = num_splits_heuristic(ctas, (p.Tk + bn - 1) / bn, dev.num_sms);
  at::Tensor out_accum, lse_accum;
  if (splits > 1) {
    auto shape = out.sizes().vec();
    shape.insert(shape.begin(), splits);
    out_accum = at::empty(shape, out.options().dtype(at::kFloat));
    shape = lse.sizes().vec();
    shape.insert(shape.begin(), splits);
    lse_accum = at::empty(shape, lse.options());
    set_splits(p, splits, out_accum, lse_accum);
  }
  const cudaError_t err = delta_fwd_launch<scalar_t, D>(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                           const at::Tensor& v_in, const at::Tensor& P_in,
                                           const std::optional<at::Tensor>& key_padding_mask,
                                           int64_t L, int64_t U, int64_t window_left,
                                           int64_t window_right, double scale) {
  const DeltaSizes s = check_forward_args(OpDevice::CUDA, q_in, k_in, v_in, P_in,
                                          key_padding_mask, L, U, window_left, window_right,
                                          scale);
  TORCH_CHECK(q_in.is_cuda(), kWho, ": q must be a CUDA tensor, got ", q_in.device());
  check_limits(s.B, s.H, s.T, s.Tk, s.Dk, s.R);
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in), P = aligned(P_in);
  at::Tensor mask;
  if (key_padding_mask.has_value()) mask = key_padding_mask->contiguous();
  at::Tensor out = at::empty({s.B, s.H, s.T, s.Dv}, q.options());
  at::Tensor lse = at::empty({s.B, s.H, s.T}, q.options().dtype(at::kFloat));
  if (s.B * s.H * s.T == 0) return {out, lse};
  const CallArgs c{s.B, s.H, s.Hkv, s.Hp, s.T, s.Tk, s.Dk, s.R, L, U, window_left, window_right,
                   scale};
  FwdParams p = make_fwd_params(c, /*varlen=*/false, q, k, v, P, mask, out, lse, at::Tensor(),
                                at::Tensor());
  dispatch(q.scalar_type(), s.Dk, [&](auto cfg) {
    using C = decltype(cfg);
    const DeviceInfo dev = check_device(q, delta_fwd_smem_bytes<typename C::scalar_t, C::kD>());
    launch_forward<typename C::scalar_t, C::kD>(p, out, lse, dev);
  });
  return {out, lse};
}

// dP = dP_keys + dP_rows per query head, summed over heads in a fixed order when P is shared
// (Hp = 1; `head_dim` is the heads' dimension), in P's dtype.
at::Tensor grad_P_of(at::Tensor& dP_keys, const at::Tensor& dP_rows, int64_t Hp, int64_t head_dim,
                     const at::Tensor& P) {
  at::Tensor g = dP_keys.add_(dP_rows);
  if (Hp == 1) g = g.sum(head_dim, /*keepdim=*/true);
  return g.to(P.scalar_type());
}

template <typename scalar_t, int D>
void launch_backward(const BwdParams& p, const at::Tensor& q) {
  check_device(q, delta_bwd_smem_bytes<scalar_t, D>());
  const cudaError_t err = delta_bwd_launch<scalar_t, D>(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& P_in,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out_in,
    const at::Tensor& lse_in, int64_t L, int64_t U, int64_t window_left, int64_t window_right,
    double scale) {
  const DeltaSizes s = check_forward_args(OpDevice::CUDA, q_in, k_in, v_in, P_in,
                                          key_padding_mask, L, U, window_left, window_right,
                                          scale);
  check_backward_args(OpDevice::CUDA, s, q_in, grad_out_in, out_in, lse_in);
  TORCH_CHECK(q_in.is_cuda(), kWho, ": q must be a CUDA tensor, got ", q_in.device());
  check_limits(s.B, s.H, s.T, s.Tk, s.Dk, s.R);
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in), P = aligned(P_in),
                   grad_out = aligned(grad_out_in), out = aligned(out_in),
                   lse = lse_in.contiguous();
  at::Tensor mask;
  if (key_padding_mask.has_value()) mask = key_padding_mask->contiguous();
  at::Tensor grad_q = at::empty_like(q), grad_k = at::empty_like(k), grad_v = at::empty_like(v);
  if (s.B * s.H * s.T == 0) {  // no query: nothing flows back
    return {grad_q, grad_k.zero_(), grad_v.zero_(), at::zeros_like(P)};
  }
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor Dsum = at::empty_like(lse);
  at::Tensor dP_keys = at::zeros({s.B, s.H, s.Tk, s.R}, f32);
  at::Tensor dP_rows = at::zeros({s.B, s.H, s.Tk, s.R}, f32);
  const CallArgs c{s.B, s.H, s.Hkv, s.Hp, s.T, s.Tk, s.Dk, s.R, L, U, window_left, window_right,
                   scale};
  const FwdParams f = make_fwd_params(c, /*varlen=*/false, q, k, v, P, mask, out, lse,
                                      at::Tensor(), at::Tensor());
  const BwdParams p =
      make_bwd_params(f, /*varlen=*/false, grad_out, Dsum, grad_q, grad_k, grad_v, dP_keys,
                      dP_rows);
  dispatch(q.scalar_type(), s.Dk,
           [&](auto cfg) {
    using C = decltype(cfg);
    launch_backward<typename C::scalar_t, C::kD>(p, q);
  });
  return {grad_q, grad_k, grad_v, grad_P_of(dP_keys, dP_rows, s.Hp, 1, P)};
}

std::tuple<at::Tensor, at::Tensor> varlen_forward(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& P_in,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, int64_t L, int64_t U, int64_t window_left, int64_t window_right,
    double scale) {
  const VarlenSizes s = check_varlen_args(OpDevice::CUDA, q_in, k_in, v_in, P_in, cu_seqlens_q,
                                          cu_seqlens_k, max_seqlen_q, max_seqlen_k, L, U,
                                          window_left, window_right, scale);
  TORCH_CHECK(q_in.is_cuda(), kWho, ": q must be a CUDA tensor, got ", q_in.device());
  check_limits(s.B, s.H, max_seqlen_q, max_seqlen_k, s.Dk, s.R);
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in), P = aligned(P_in);
  const at::Tensor cq = cu_seqlens_q.contiguous(), ck = cu_seqlens_k.contiguous();
  at::Tensor out = at::empty({s.Total_q, s.H, s.Dv}, q.options());
  at::Tensor lse = at::empty({s.H, s.Total_q}, q.options().dtype(at::kFloat));
  if (s.B * s.H * s.Total_q == 0 || max_seqlen_q == 0) return {out, lse};
  const CallArgs c{s.B, s.H, s.Hkv, s.Hp, max_seqlen_q, max_seqlen_k, s.Dk, s.R, L, U,
                   window_left, window_right, scale};
  FwdParams p = make_fwd_params(c, /*varlen=*/true, q, k, v, P, at::Tensor(), out, lse, cq, ck);
  dispatch(q.scalar_type(), s.Dk, [&](auto cfg) {
    using C = decltype(cfg);
    const DeviceInfo dev = check_device(q, delta_fwd_smem_bytes<typename C::scalar_t, C::kD>());
    launch_forward<typename C::scalar_t, C::kD>(p, out, lse, dev);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_backward(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& P_in, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const at::Tensor& out_in, const at::Tensor& lse_in, int64_t L, int64_t U, int64_t window_left,
    int64_t window_right, double scale) {
  const VarlenSizes s = check_varlen_args(OpDevice::CUDA, q_in, k_in, v_in, P_in, cu_seqlens_q,
                                          cu_seqlens_k, max_seqlen_q, max_seqlen_k, L, U,
                                          window_left, window_right, scale);
  check_varlen_backward_args(OpDevice::CUDA, s, q_in, grad_out_in, out_in, lse_in);
  TORCH_CHECK(q_in.is_cuda(), kWho, ": q must be a CUDA tensor, got ", q_in.device());
  check_limits(s.B, s.H, max_seqlen_q, max_seqlen_k, s.Dk, s.R);
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in), P = aligned(P_in),
                   grad_out = aligned(grad_out_in), out = aligned(out_in),
                   lse = lse_in.contiguous();
  const at::Tensor cq = cu_seqlens_q.contiguous(), ck = cu_seqlens_k.contiguous();
  at::Tensor grad_q = at::empty_like(q), grad_k = at::empty_like(k), grad_v = at::empty_like(v);
  if (s.B * s.H * s.Total_q == 0 || max_seqlen_q == 0) {
    return {grad_q, grad_k.zero_(), grad_v.zero_(), at::zeros_like(P)};
  }
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor Dsum = at::empty_like(lse);
  at::Tensor dP_keys = at::zeros({s.Total_k, s.H, s.R}, f32);
  at::Tensor dP_rows = at::zeros({s.Total_k, s.H, s.R}, f32);
  const CallArgs c{s.B, s.H, s.Hkv, s.Hp, max_seqlen_q, max_seqlen_k, s.Dk, s.R, L, U,
                   window_left, window_right, scale};
  const FwdParams f =
      make_fwd_params(c, /*varlen=*/true, q, k, v, P, at::Tensor(), out, lse, cq, ck);
  const BwdParams p = make_bwd_params(f, /*varlen=*/true, grad_out, Dsum, grad_q, grad_k, grad_v,
                                      dP_keys, dP_rows);
  dispatch(q.scalar_type(), s.Dk,
           [&](auto cfg) {
    using C = decltype(cfg);
    launch_backward<typename C::scalar_t, C::kD>(p, q);
  });
  return {grad_q, grad_k, grad_v, grad_P_of(dP_keys, dP_rows, s.Hp, 1, P)};
}

}  // namespace

TORCH_LIBRARY_IMPL(hdaf, CUDA, m) {
  m.impl("delta_attention_forward", &forward);
  m.impl("delta_attention_backward", &backward);
  m.impl("delta_attention_varlen_forward", &varlen_forward);
  m.impl("delta_attention_varlen_backward", &varlen_backward);
}

}  // namespace cuda
}  // namespace hdaf
