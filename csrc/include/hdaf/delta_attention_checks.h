// Argument checks of hdaf::delta_attention_forward / _backward, shared by the CPU and the
// CUDA op (implemented in csrc/delta_attention_checks.cpp, compiled by the host C++ compiler).
// Every device-independent check lives here, once: the CUDA op adds only what depends on the
// device (CUDA tensors, grid and shared-memory limits) and then launches.
// Errors are c10::Error (Python RuntimeError) naming the argument and the value received.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace hdaf {

// Largest head dim (Dk and Dv each) of the CUDA kernels: their shared-memory tiles hold whole
// head rows. The CPU kernel takes any head dim.
constexpr int64_t kCudaMaxHeadDim = 128;

// q, k [B,H,T,Dk]; v [B,H,T,Dv]; P [B,Hp,T,R] with Hp in {1, H} and R = L + U + 1.
struct DeltaSizes {
  int64_t B, H, Hp, T, Dk, Dv, R;
};

// Which op the checks serve: it sets the message prefix and the head-dim limit.
enum class OpDevice { CPU, CUDA };

// Shapes, dtypes (float16/bfloat16/float32/float64, one for all), one device for all tensors,
// L, U >= 0 and R = L+U+1, windows >= -1, the mask, a finite scale, and the head-dim limit.
DeltaSizes check_forward_args(OpDevice dev, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& P,
                              const std::optional<at::Tensor>& key_padding_mask, int64_t L,
                              int64_t U, int64_t window_left, int64_t window_right, double scale);

// The extra backward arguments: grad_out and out [B,H,T,Dv] like v, lse [B,H,T] in the
// accumulation dtype (float64 for float64 inputs, float32 otherwise), all on q's device.
void check_backward_args(OpDevice dev, const DeltaSizes& s, const at::Tensor& q,
                         const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse);

}  // namespace hdaf
