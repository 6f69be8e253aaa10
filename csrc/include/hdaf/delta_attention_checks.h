// Argument checks of the hdaf ops, shared by the CPU and the CUDA op (implemented in
// csrc/delta_attention_checks.cpp, compiled by the host C++ compiler).
// Every device-independent check lives here, once: the CUDA op adds only what depends on the
// device (CUDA tensors, grid and shared-memory limits) and then launches.
// Errors are c10::Error (Python RuntimeError) naming the argument and the value received; a
// feature a device's kernels lack is c10::NotImplementedError (Python NotImplementedError).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace hdaf {

// Largest head dim (Dk and Dv each) of the CUDA kernels, which instantiate Dk == Dv in {64, 128}
// for float16 and bfloat16 only (NotImplementedError otherwise). The CPU kernel takes any.
constexpr int64_t kCudaMaxHeadDim = 128;

// q [B,H,T,Dk]; k [B,Hkv,Tk,Dk]; v [B,Hkv,Tk,Dv]; P [B,Hp,Tk,R] with Hp in {1, H} and
// R = L + U + 1. T is the number of queries (Tq <= Tk; query i stands at Tk - T + i) and Hkv
// divides H.
struct DeltaSizes {
  int64_t B, H, Hp, T, Dk, Dv, R, Hkv, Tk;
};

// Which op the checks serve: it sets the message prefix, the head-dim limit and the features.
enum class OpDevice { CPU, CUDA };

// Shapes, dtypes (float16/bfloat16/float32/float64, one for all), one device for all tensors,
// L, U >= 0 and R = L+U+1, windows >= -1, the mask, a finite scale, and the head-dim limit.
DeltaSizes check_forward_args(OpDevice dev, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& P,
                              const std::optional<at::Tensor>& key_padding_mask, int64_t L,
                              int64_t U, int64_t window_left, int64_t window_right, double scale);

// The block ops (hdaf::delta_attention_block_*): the checks above with P = P_k [B,Hp,Tk,R],
// without Tq <= Tk (the queries stand at any global position), and P_q [B,Hp,Tq,R]. The CUDA
// kernels do not take global positions: NotImplementedError for OpDevice::CUDA.
DeltaSizes check_block_args(OpDevice dev, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& P_q, const at::Tensor& P_k,
                            const std::optional<at::Tensor>& key_padding_mask, int64_t L,
                            int64_t U, int64_t window_left, int64_t window_right, double scale);

// The extra backward arguments: grad_out and out [B,H,T,Dv], lse [B,H,T] in the accumulation
// dtype (float64 for float64 inputs, float32 otherwise), all on q's device.
void check_backward_args(OpDevice dev, const DeltaSizes& s, const at::Tensor& q,
                         const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse);

// Packed batches: q [Total_q,H,Dk]; k [Total_k,Hkv,Dk]; v [Total_k,Hkv,Dv]; P [Total_k,Hp,R];
// cu_seqlens_q / cu_seqlens_k int32 [B+1] on q's device.
struct VarlenSizes {
  int64_t B, H, Hkv, Hp, Total_q, Total_k, Dk, Dv, R;
};

// Shapes, dtypes, devices and scalars of the varlen ops. When the cu_seqlens tensors are on the
// CPU their values are checked too: 0 first, Total last, non-decreasing, Tq_b <= Tk_b, and every
// length <= max_seqlen_q / max_seqlen_k.
VarlenSizes check_varlen_args(OpDevice dev, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& P,
                              const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                              int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t L, int64_t U,
                              int64_t window_left, int64_t window_right, double scale);

// grad_out and out [Total_q,H,Dv], lse [H,Total_q] in the accumulation dtype.
void check_varlen_backward_args(OpDevice dev, const VarlenSizes& s, const at::Tensor& q,
                                const at::Tensor& grad_out, const at::Tensor& out,
                                const at::Tensor& lse);

}  // namespace hdaf
