// Host-side builder of the forward's parameter block from tensors, shared by the torch-facing
// host code of both CUDA forwards: the wmma kernels (delta_attention_cuda.cpp) and the opt-in
// CuTe kernel (csrc/cuda_cute/delta_attention_cute.cpp). Kept out of delta_attention_cuda.h,
// which the kernel files include and which stays torch-free.
#pragma once

#include <ATen/core/Tensor.h>

#include "delta_attention_cuda.h"

namespace hdaf {
namespace cuda {

// All tensors contiguous (see delta_attention_cuda.h); mask undefined when there is none.
inline FwdParams make_fwd_params(const ProblemDims& dims, const at::Tensor& q,
                                 const at::Tensor& k, const at::Tensor& v, const at::Tensor& P,
                                 const at::Tensor& mask, const at::Tensor& out,
                                 const at::Tensor& lse) {
  FwdParams p;
  static_cast<ProblemDims&>(p) = dims;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.P = P.data_ptr();
  p.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  return p;
}

}  // namespace cuda
}  // namespace hdaf
