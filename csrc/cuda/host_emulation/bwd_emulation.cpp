// Runs the CuTe backward (csrc/cuda/flash_bwd.cuh) on the CPU, for tests on machines
// without a GPU (tests/test_cuda_cute.py builds it with torch.utils.cpp_extension.load; never
// part of hdaf._C). Like fwd_emulation.cpp: it compiles the four instantiation units
// csrc/cuda/bwd_*.cu themselves, with HDAF_CUTE_EMULATION defined, so the kernels take
// the SM80 operations of cute_sm80_emulation.h and block_emulation.h runs their blocks.
//
// Registered op (contiguous CPU tensors, float16 / bfloat16, Dk == Dv in {64, 128}):
//   hdaf_cute_bwd_emulation::backward(grad_out, q, k, v, P, mask, out, lse, L, U, window_left,
//       window_right, scale, cp_async_at_issue) -> (grad_q, grad_k, grad_v, grad_P, counters)
// with the outputs of hdaf::delta_attention_backward (grad_P in P's dtype, summed over heads when
// P is shared), and counters (int64) as in the forward's emulation: warp-level mma.sync, ldmatrix,
// ldmatrix.trans calls and cp.async bytes of the three launches together.
//
// Build with -fno-strict-aliasing (see fwd_emulation.cpp).
#include "cute_host_prelude.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#define HDAF_CUTE_EMULATION 1
#define hdaf hdaf_cute_host
#include "../bwd_bf16_hdim128.cu"
#include "../bwd_bf16_hdim64.cu"
#include "../bwd_fp16_hdim128.cu"
#include "../bwd_fp16_hdim64.cu"
#undef hdaf

// `extern __shared__ unsigned char smem_raw[]` in the backward kernels declares this array.
namespace hdaf_cute_host {
namespace cuda {
namespace cute_bwd {
alignas(128) unsigned char smem_raw[hdaf_emu::kSmemBytes];
}  // namespace cute_bwd
}  // namespace cuda
}  // namespace hdaf_cute_host
unsigned char* const hdaf_emu::shared_memory = hdaf_cute_host::cuda::cute_bwd::smem_raw;

namespace {

namespace emu = hdaf_cute_host::cuda;

template <typename scalar_t, int D>
void run(const emu::CuteBwdParams& p) {
  const size_t smem = emu::delta_bwd_cute_smem_bytes<scalar_t, D>();
  TORCH_CHECK(smem <= hdaf_emu::kSmemBytes, "emulation: the kernels need ", smem,
              " bytes of shared memory");
  const cudaError_t err = emu::delta_bwd_cute_launch<scalar_t, D>(p, nullptr);
  TORCH_CHECK(err == cudaSuccess, "emulation: launch returned ", int(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& P, const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, int64_t L, int64_t U, int64_t window_left, int64_t window_right,
    double scale, bool cp_async_at_issue) {
  TORCH_CHECK(q.is_cpu() && q.is_contiguous() && k.is_contiguous() && v.is_contiguous() &&
                  P.is_contiguous() && grad_out.is_contiguous() && out.is_contiguous() &&
                  lse.is_contiguous(),
              "emulation: contiguous CPU tensors expected");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "emulation: float16 or bfloat16 expected, got ", q.scalar_type());
  for (const at::Tensor* t : {&k, &v, &P, &grad_out, &out}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(),
                "emulation: q, k, v, P, grad_out and out must share a dtype");
  }
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes() &&
                  grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() && P.dim() == 4,
              "emulation: q, k, v, grad_out, out [B, H, T, D] of one shape and P [B, Hp, T, R]");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  TORCH_CHECK(D == 64 || D == 128, "emulation: head dim 64 or 128 expected, got ", D);
  TORCH_CHECK(P.size(0) == B && (P.size(1) == 1 || P.size(1) == H) && P.size(2) == T &&
                  P.size(3) == L + U + 1,
              "emulation: P must be [B, 1 or H, T, L+U+1], got ", P.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == B &&
                  lse.size(1) == H && lse.size(2) == T,
              "emulation: lse must be float32 [B, H, T]");
  at::Tensor mask;
  if (key_padding_mask.has_value()) {
    mask = key_padding_mask->contiguous();
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == B &&
                    mask.size(1) == T,
                "emulation: key_padding_mask must be bool [B, T]");
  }
  const int64_t R = P.size(3);
  at::Tensor grad_q = at::empty_like(q), grad_k = at::empty_like(k), grad_v = at::empty_like(v);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor Dvec = at::empty({B, H, T}, f32);
  at::Tensor dP_keys = at::zeros({B, H, T, R}, f32), dP_rows = at::zeros({B, H, T, R}, f32);
  hdaf_cute_emu::counters.reset();
  if (B * H * T > 0) {
    emu::CuteBwdParams p;
    static_cast<emu::ProblemDims&>(p) =
        emu::ProblemDims{B, H, P.size(1), T, D, D, R, L, U, window_left, window_right, scale};
    p.grad_out = grad_out.data_ptr();
    p.q = q.data_ptr();
    p.k = k.data_ptr();
    p.v = v.data_ptr();
    p.P = P.data_ptr();
    p.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    p.out = out.data_ptr();
    p.lse = lse.data_ptr();
    p.D = Dvec.data_ptr();
    p.grad_q = grad_q.data_ptr();
    p.grad_k = grad_k.data_ptr();
    p.grad_v = grad_v.data_ptr();
    p.dP_heads = dP_keys.data_ptr();
    p.dP_rows = dP_rows.data_ptr();
    hdaf_cute_emu::cp_async_landing = cp_async_at_issue ? hdaf_cute_emu::CpAsyncLanding::kAtIssue
                                                        : hdaf_cute_emu::CpAsyncLanding::kAtWait;
    hdaf_cute_emu::install_block_hooks();
    const bool half = q.scalar_type() == at::kHalf;
    if (D == 64) {
      half ? run<__half, 64>(p) : run<__nv_bfloat16, 64>(p);
    } else {
      half ? run<__half, 128>(p) : run<__nv_bfloat16, 128>(p);
    }
  }
  // The two halves of dP, then the sum over heads in a fixed order when P is shared.
  at::Tensor dP = dP_keys.add_(dP_rows);
  if (P.size(1) == 1) dP = dP.sum(1, /*keepdim=*/true);
  const auto& c = hdaf_cute_emu::counters;
  at::Tensor counts = at::tensor(
      std::vector<int64_t>{c.mma.load(), c.ldsm_n.load(), c.ldsm_t.load(), c.cp_async_bytes.load()},
      at::TensorOptions().dtype(at::kLong));
  return {grad_q, grad_k, grad_v, dP.to(P.scalar_type()), counts};
}

}  // namespace

TORCH_LIBRARY(hdaf_cute_bwd_emulation, m) {
  m.def("backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor P, "
        "Tensor? key_padding_mask, Tensor out, Tensor lse, int L, int U, int window_left, "
        "int window_right, float scale, bool cp_async_at_issue=False) "
        "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_P, Tensor counters)",
        &backward);
}
