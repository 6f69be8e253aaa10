// Runs the CuTe forward (csrc/cuda/flash_fwd.cuh) on the CPU, for tests on machines
// without a GPU (tests/test_cuda_cute.py builds it with torch.utils.cpp_extension.load; never
// part of hdaf._C). It compiles the four instantiation units csrc/cuda/fwd_*.cu
// themselves, so the kernel template and its tile configurations are the shipped ones; with
// HDAF_CUTE_EMULATION defined the kernel takes the SM80 operations of cute_sm80_emulation.h
// (mma.sync, ldmatrix, cp.async with CuTe's own traits) and block_emulation.h runs its blocks
// (a std::thread per CUDA thread, barriers, NaN-filled shared memory).
//
// Registered op (contiguous CPU tensors, float16 / bfloat16, Dk == Dv in {64, 128}):
//   hdaf_cute_emulation::forward(q, k, v, P, mask, L, U, window_left, window_right, scale,
//                                cp_async_at_issue) -> (out, lse, counters)
// counters (int64): warp-level mma.sync, ldmatrix, ldmatrix.trans calls and cp.async bytes of
// the launch. cp_async_at_issue lands each cp.async when issued instead of at its wait.
//
// Build with -fno-strict-aliasing: CuTe reads register fragments through recast (mma_unpack
// views half_t / bfloat16_t fragments as uint32_t registers), which g++ -O2 otherwise may
// reorder against the stores that filled them (seen: the fp16 P V product read stale registers).
#include "cute_host_prelude.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

// The shipped instantiation units, in a namespace of their own (hdaf._C, loaded in the same
// process, may hold the GPU build of the same templates).
#define HDAF_CUTE_EMULATION 1
#define hdaf hdaf_cute_host
#include "../fwd_bf16_hdim128.cu"
#include "../fwd_bf16_hdim64.cu"
#include "../fwd_fp16_hdim128.cu"
#include "../fwd_fp16_hdim64.cu"
#include "../host_params.h"
#undef hdaf

// `extern __shared__ unsigned char smem_raw[]` in the kernel declares this array.
namespace hdaf_cute_host {
namespace cuda {
namespace cute_fwd {
alignas(128) unsigned char smem_raw[hdaf_emu::kSmemBytes];
}  // namespace cute_fwd
}  // namespace cuda
}  // namespace hdaf_cute_host
unsigned char* const hdaf_emu::shared_memory = hdaf_cute_host::cuda::cute_fwd::smem_raw;

namespace {

namespace emu = hdaf_cute_host::cuda;

template <typename scalar_t, int D>
void run(const emu::FwdParams& p) {
  const size_t smem = emu::delta_fwd_cute_smem_bytes<scalar_t, D>();
  TORCH_CHECK(smem <= hdaf_emu::kSmemBytes, "emulation: the kernel needs ", smem,
              " bytes of shared memory");
  const cudaError_t err = emu::delta_fwd_cute_launch<scalar_t, D>(p, nullptr);
  TORCH_CHECK(err == cudaSuccess, "emulation: launch returned ", int(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& P,
    const std::optional<at::Tensor>& key_padding_mask, int64_t L, int64_t U, int64_t window_left,
    int64_t window_right, double scale, bool cp_async_at_issue) {
  TORCH_CHECK(q.is_cpu() && q.is_contiguous() && k.is_contiguous() && v.is_contiguous() &&
                  P.is_contiguous(),
              "emulation: contiguous CPU tensors expected");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "emulation: float16 or bfloat16 expected, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  P.scalar_type() == q.scalar_type(),
              "emulation: q, k, v and P must share a dtype");
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes() && P.dim() == 4,
              "emulation: q, k, v [B, H, T, D] of one shape and P [B, Hp, T, R] expected");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  TORCH_CHECK(D == 64 || D == 128, "emulation: head dim 64 or 128 expected, got ", D);
  TORCH_CHECK(P.size(0) == B && (P.size(1) == 1 || P.size(1) == H) && P.size(2) == T &&
                  P.size(3) == L + U + 1,
              "emulation: P must be [B, 1 or H, T, L+U+1], got ", P.sizes());
  at::Tensor mask;
  if (key_padding_mask.has_value()) {
    mask = key_padding_mask->contiguous();
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == B &&
                    mask.size(1) == T,
                "emulation: key_padding_mask must be bool [B, T]");
  }
  at::Tensor out = at::empty({B, H, T, D}, q.options());
  at::Tensor lse = at::empty({B, H, T}, q.options().dtype(at::kFloat));
  hdaf_cute_emu::counters.reset();
  if (B * H * T > 0) {
    const emu::FwdParams p = emu::make_fwd_params(
        emu::ProblemDims{B, H, P.size(1), T, D, D, P.size(3), L, U, window_left, window_right,
                         scale},
        q, k, v, P, mask, out, lse);
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
  const auto& c = hdaf_cute_emu::counters;
  at::Tensor counts = at::tensor(
      std::vector<int64_t>{c.mma.load(), c.ldsm_n.load(), c.ldsm_t.load(), c.cp_async_bytes.load()},
      at::TensorOptions().dtype(at::kLong));
  return {out, lse, counts};
}

}  // namespace

TORCH_LIBRARY(hdaf_cute_emulation, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor P, Tensor? key_padding_mask, int L, int U, "
        "int window_left, int window_right, float scale, bool cp_async_at_issue=False) "
        "-> (Tensor out, Tensor lse, Tensor counters)",
        &forward);
}
