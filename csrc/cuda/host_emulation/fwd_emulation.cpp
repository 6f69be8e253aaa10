// Runs the CUDA forward (csrc/cuda/flash_fwd.cuh) on the CPU, for tests on machines without a
// GPU (tests/test_cuda_fwd_emulation.py builds it with torch.utils.cpp_extension.load; never part
// of hdaf._C). It compiles the four instantiation units csrc/cuda/fwd_*.cu themselves, so the
// kernel template and its tile configurations are the shipped ones, and builds the parameter
// block with host_params.h as the op does; with HDAF_CUTE_EMULATION defined the kernel takes the
// SM80 operations of cute_sm80_emulation.h (mma.sync, ldmatrix, cp.async with CuTe's own traits)
// and block_emulation.h runs its blocks (a std::thread per CUDA thread, barriers, NaN-filled
// shared memory).
//
// Registered op (CPU tensors, float16 / bfloat16, Dk == Dv in {64, 128}, last dim contiguous):
//   hdaf_cuda_fwd_emulation::forward(q, k, v, P, mask, cu_seqlens_q, cu_seqlens_k,
//       max_seqlen_q, max_seqlen_k, L, U, window_left, window_right, scale, num_splits,
//       cp_async_at_issue) -> (out, lse, counters)
// padded: q [B,H,Tq,D], k, v [B,Hkv,Tk,D], P [B,Hp,Tk,R], mask bool [B,Tk] or None, out like q,
//   lse [B,H,Tq];
// packed (cu_seqlens_q / _k int32 [B+1] given): q [Total_q,H,D], k, v [Total_k,Hkv,D],
//   P [Total_k,Hp,R], no mask, out like q, lse [H,Total_q]; max_seqlen_q / _k size the grid.
// num_splits > 1 turns on split-key decoding (float32 out_accum / lse_accum, then the combine
// kernel). counters (int64): warp-level mma.sync, ldmatrix, ldmatrix.trans calls and cp.async
// bytes of the launch. cp_async_at_issue lands each cp.async when issued instead of at its wait.
//
// Build with -fno-strict-aliasing: CuTe reads register fragments through recast (mma_unpack
// views half_t / bfloat16_t fragments as uint32_t registers), which g++ -O2 otherwise may
// reorder against the stores that filled them (seen: the fp16 P V product read stale registers).
#include "cute_host_prelude.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
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
  const size_t smem = emu::delta_fwd_smem_bytes<scalar_t, D>();
  TORCH_CHECK(smem <= hdaf_emu::kSmemBytes, "emulation: the kernel needs ", smem,
              " bytes of shared memory");
  const cudaError_t err = emu::delta_fwd_launch<scalar_t, D>(p, nullptr);
  TORCH_CHECK(err == cudaSuccess, "emulation: launch returned ", int(err));
}

// cp.async moves 16 bytes: rows must start 16-byte aligned.
void check_rows(const at::Tensor& t, int row_dim, const char* name) {
  TORCH_CHECK(t.stride(-1) == 1, "emulation: ", name, " needs a contiguous last dim");
  for (int d = 0; d < t.dim() - 1; ++d) {
    TORCH_CHECK(t.stride(d) % 8 == 0 || t.size(d) <= 1, "emulation: ", name, " stride ", d,
                " must be a multiple of 8 elements (16-byte cp.async)");
  }
  (void)row_dim;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& P,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t L, int64_t U, int64_t window_left,
    int64_t window_right, double scale, int64_t num_splits, bool cp_async_at_issue) {
  TORCH_CHECK(q.is_cpu() && k.is_cpu() && v.is_cpu() && P.is_cpu(), "emulation: CPU tensors");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "emulation: float16 or bfloat16 expected, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  P.scalar_type() == q.scalar_type(),
              "emulation: q, k, v and P must share a dtype");
  const bool varlen = cu_seqlens_q.has_value();
  TORCH_CHECK(varlen == cu_seqlens_k.has_value(), "emulation: both cu_seqlens or neither");
  TORCH_CHECK(num_splits >= 1 && num_splits <= 64, "emulation: num_splits in [1, 64]");
  at::Tensor cu_q, cu_k, mask;
  int64_t B, H, Hkv, Hp, Tq, Tk, D, R;
  if (varlen) {
    cu_q = cu_seqlens_q->contiguous();
    cu_k = cu_seqlens_k->contiguous();
    TORCH_CHECK(cu_q.scalar_type() == at::kInt && cu_k.scalar_type() == at::kInt &&
                    cu_q.dim() == 1 && cu_q.sizes() == cu_k.sizes() && cu_q.size(0) >= 1,
                "emulation: cu_seqlens int32 [B+1]");
    TORCH_CHECK(!key_padding_mask.has_value(), "emulation: no mask with a packed batch");
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && P.dim() == 3,
                "emulation: packed q [Total_q,H,D], k, v [Total_k,Hkv,D], P [Total_k,Hp,R]");
    B = cu_q.size(0) - 1;
    H = q.size(1), Hkv = k.size(1), Hp = P.size(1), D = q.size(2), R = P.size(2);
    Tq = max_seqlen_q, Tk = max_seqlen_k;
    TORCH_CHECK(k.size(2) == D && P.size(0) == k.size(0), "emulation: packed shapes");
  } else {
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && P.dim() == 4,
                "emulation: q [B,H,Tq,D], k, v [B,Hkv,Tk,D], P [B,Hp,Tk,R] expected");
    B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3);
    Hkv = k.size(1), Tk = k.size(2), Hp = P.size(1), R = P.size(3);
    TORCH_CHECK(k.size(0) == B && k.size(3) == D && P.size(0) == B && P.size(2) == Tk &&
                    Tq <= Tk,
                "emulation: padded shapes");
    if (key_padding_mask.has_value()) {
      mask = key_padding_mask->contiguous();
      TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == B &&
                      mask.size(1) == Tk,
                  "emulation: key_padding_mask must be bool [B, Tk]");
    }
  }
  TORCH_CHECK(D == 64 || D == 128, "emulation: head dim 64 or 128 expected, got ", D);
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0 && (Hp == 1 || Hp == H) && R == L + U + 1,
              "emulation: heads / R");
  check_rows(q, 2, "q");
  check_rows(k, 2, "k");
  check_rows(v, 2, "v");
  TORCH_CHECK(P.stride(-1) == 1, "emulation: P needs a contiguous last dim");
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = varlen ? at::empty({H, q.size(0)}, q.options().dtype(at::kFloat))
                          : at::empty({B, H, Tq}, q.options().dtype(at::kFloat));
  hdaf_cute_emu::counters.reset();
  if (B * H * Tq > 0) {
    const emu::CallArgs args{B, H, Hkv, Hp, Tq, Tk, D, R, L, U, window_left, window_right, scale};
    emu::FwdParams p =
        emu::make_fwd_params(args, varlen, q, k, v, P, mask, out, lse, cu_q, cu_k);
    at::Tensor out_accum, lse_accum;
    if (num_splits > 1) {
      // NaN-filled: a split that leaves a row unwritten shows up in the result.
      std::vector<int64_t> so{num_splits}, sl{num_splits};
      for (auto s : out.sizes()) so.push_back(s);
      for (auto s : lse.sizes()) sl.push_back(s);
      out_accum = at::full(so, NAN, out.options().dtype(at::kFloat));
      lse_accum = at::full(sl, NAN, lse.options());
      emu::set_splits(p, int(num_splits), out_accum, lse_accum);
    }
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

TORCH_LIBRARY(hdaf_cuda_fwd_emulation, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor P, Tensor? key_padding_mask, "
        "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, int L, "
        "int U, int window_left, int window_right, float scale, int num_splits=1, "
        "bool cp_async_at_issue=False) -> (Tensor out, Tensor lse, Tensor counters)",
        &forward);
}
