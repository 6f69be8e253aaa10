// Runs the CUDA backward (csrc/cuda/flash_bwd.cuh) on the CPU, for tests on machines without a
// GPU (tests/test_cuda_bwd_emulation.py builds it with torch.utils.cpp_extension.load; never part
// of hdaf._C). Like fwd_emulation.cpp it compiles the four instantiation units csrc/cuda/bwd_*.cu
// themselves, with HDAF_CUTE_EMULATION defined, so the kernels take the SM80 operations of
// cute_sm80_emulation.h and block_emulation.h runs their blocks; the parameter block comes from
// host_params.h, as for the op.
//
// Registered op (contiguous CPU tensors, float16 / bfloat16, Dk == Dv in {64, 128}):
//   hdaf_cuda_bwd_emulation::backward(dout, q, k, v, P, mask, out, lse, cu_seqlens_q,
//       cu_seqlens_k, max_seqlen_q, max_seqlen_k, L, U, window_left, window_right, scale,
//       cp_async_at_issue) -> (dq, dk, dv, dP, counters)
// Padded: q, dout, out [B,H,Tq,D], k, v [B,Hkv,Tk,D], P [B,Hp,Tk,R], mask bool [B,Tk] or None,
// lse float32 [B,H,Tq], cu_seqlens None. Packed: q, dout, out [Total_q,H,D], k, v
// [Total_k,Hkv,D], P [Total_k,Hp,R], lse float32 [H,Total_q], cu_seqlens int32 [B+1], no mask.
// dq, dk, dv start NaN-filled (an element no kernel writes shows up); dP is the two halves
// added and, when Hp == 1, summed over the heads, in P's dtype, as the op returns it. counters
// (int64): warp-level mma.sync, ldmatrix, ldmatrix.trans calls and cp.async bytes of the three
// launches together. cp_async_at_issue lands each cp.async when issued instead of at its wait.
//
// Build with -fno-strict-aliasing (see fwd_emulation.cpp).
#include "cute_host_prelude.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#define HDAF_CUTE_EMULATION 1
#define hdaf hdaf_cute_host
#include "../bwd_bf16_hdim128.cu"
#include "../bwd_bf16_hdim64.cu"
#include "../bwd_fp16_hdim128.cu"
#include "../bwd_fp16_hdim64.cu"
#include "../host_params.h"
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
void run(const emu::BwdParams& p) {
  const size_t smem = emu::delta_bwd_smem_bytes<scalar_t, D>();
  TORCH_CHECK(smem <= hdaf_emu::kSmemBytes, "emulation: the kernels need ", smem,
              " bytes of shared memory");
  const cudaError_t err = emu::delta_bwd_launch<scalar_t, D>(p, nullptr);
  TORCH_CHECK(err == cudaSuccess, "emulation: launch returned ", int(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& P, const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    int64_t L, int64_t U, int64_t window_left, int64_t window_right, double scale,
    bool cp_async_at_issue) {
  for (const at::Tensor* t : {&q, &k, &v, &P, &dout, &out, &lse}) {
    TORCH_CHECK(t->is_cpu() && t->is_contiguous(), "emulation: contiguous CPU tensors expected");
  }
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "emulation: float16 or bfloat16 expected, got ", q.scalar_type());
  for (const at::Tensor* t : {&k, &v, &P, &dout, &out}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(),
                "emulation: q, k, v, P, dout and out must share a dtype");
  }
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "emulation: lse must be float32");
  const bool varlen = cu_seqlens_q.has_value();
  TORCH_CHECK(varlen == cu_seqlens_k.has_value(), "emulation: both cu_seqlens or neither");
  TORCH_CHECK(!(varlen && key_padding_mask.has_value()), "emulation: no mask in a packed batch");
  const int64_t D = q.size(-1);
  TORCH_CHECK(D == 64 || D == 128, "emulation: head dim 64 or 128 expected, got ", D);
  TORCH_CHECK(q.dim() == (varlen ? 3 : 4) && k.dim() == q.dim() && v.sizes() == k.sizes() &&
                  dout.sizes() == q.sizes() && out.sizes() == q.sizes() && P.dim() == q.dim() &&
                  k.size(-1) == D,
              "emulation: unexpected shapes q ", q.sizes(), " k ", k.sizes(), " P ", P.sizes());
  const int64_t H = q.size(1), Hkv = k.size(1), Hp = P.size(1), R = P.size(-1);
  TORCH_CHECK(R == L + U + 1 && (Hp == 1 || Hp == H) && H % Hkv == 0,
              "emulation: R = L+U+1, Hp in {1, H}, Hkv divides H expected");
  emu::CallArgs c{};
  at::Tensor cu_q, cu_k, mask;
  if (varlen) {
    cu_q = cu_seqlens_q->contiguous();
    cu_k = cu_seqlens_k->contiguous();
    TORCH_CHECK(cu_q.scalar_type() == at::kInt && cu_k.scalar_type() == at::kInt &&
                    cu_q.numel() == cu_k.numel() && cu_q.numel() >= 1,
                "emulation: cu_seqlens int32 [B+1]");
    TORCH_CHECK(P.size(0) == k.size(0) && lse.dim() == 2 && lse.size(0) == H &&
                    lse.size(1) == q.size(0),
                "emulation: P [Total_k,Hp,R] and lse [H,Total_q] expected");
    c.B = cu_q.numel() - 1;
    c.Tq = max_seqlen_q;
    c.Tk = max_seqlen_k;
  } else {
    c.B = q.size(0);
    c.Tq = q.size(2);
    c.Tk = k.size(2);
    TORCH_CHECK(k.size(0) == c.B && P.size(0) == c.B && P.size(2) == c.Tk && lse.dim() == 3 &&
                    lse.size(0) == c.B && lse.size(1) == H && lse.size(2) == c.Tq,
                "emulation: P [B,Hp,Tk,R] and lse [B,H,Tq] expected");
    if (key_padding_mask.has_value()) {
      mask = key_padding_mask->contiguous();
      TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == c.B &&
                      mask.size(1) == c.Tk,
                  "emulation: key_padding_mask must be bool [B, Tk]");
    }
  }
  c.H = H;
  c.Hkv = Hkv;
  c.Hp = Hp;
  c.D = D;
  c.R = R;
  c.L = L;
  c.U = U;
  c.window_left = window_left;
  c.window_right = window_right;
  c.scale = scale;

  const double nan = std::nan("");
  at::Tensor dq = at::full_like(q, nan), dk = at::full_like(k, nan), dv = at::full_like(v, nan);
  at::Tensor Dsum = at::empty_like(lse);
  const auto f32 = q.options().dtype(at::kFloat);
  const std::vector<int64_t> dp_shape =
      varlen ? std::vector<int64_t>{k.size(0), H, R} : std::vector<int64_t>{c.B, H, c.Tk, R};
  at::Tensor dP_keys = at::zeros(dp_shape, f32), dP_rows = at::zeros(dp_shape, f32);
  hdaf_cute_emu::counters.reset();
  if (c.B > 0 && q.numel() + k.numel() > 0) {
    const emu::FwdParams f =
        emu::make_fwd_params(c, varlen, q, k, v, P, mask, out, lse, cu_q, cu_k);
    const emu::BwdParams p =
        emu::make_bwd_params(f, varlen, dout, Dsum, dq, dk, dv, dP_keys, dP_rows);
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
  // The two halves, then the sum over heads in a fixed order when P is shared.
  at::Tensor dP = dP_keys.add_(dP_rows);
  if (Hp == 1) dP = dP.sum(1, /*keepdim=*/true);
  const auto& n = hdaf_cute_emu::counters;
  at::Tensor counts = at::tensor(
      std::vector<int64_t>{n.mma.load(), n.ldsm_n.load(), n.ldsm_t.load(), n.cp_async_bytes.load()},
      at::TensorOptions().dtype(at::kLong));
  return {dq, dk, dv, dP.to(P.scalar_type()), counts};
}

}  // namespace

TORCH_LIBRARY(hdaf_cuda_bwd_emulation, m) {
  m.def("backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor P, Tensor? key_padding_mask, "
        "Tensor out, Tensor lse, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, "
        "int max_seqlen_k, int L, int U, int window_left, int window_right, float scale, "
        "bool cp_async_at_issue=False) "
        "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dP, Tensor counters)",
        &backward);
}
