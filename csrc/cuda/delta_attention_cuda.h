// Interface between the torch-facing dispatcher (delta_attention_cuda.cpp) and the
// per-dtype kernel translation units (fwd_*.cu, bwd_*.cu). Torch-free on purpose:
// the kernel files include only CUDA headers and compile in seconds, in parallel.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace hdaf {
namespace cuda {

// All tensors contiguous; q,k [B,H,T,Dk], v,out,grad_out [B,H,T,Dv], P [B,Hp,T,R],
// mask [B,T] (bool bytes, nullptr when absent). lse, D [B,H,T] and dP_heads [B,H,T,R]
// (per-head partial dP, zero-initialised by the caller) are in the accumulation type:
// float64 for float64 inputs, float32 otherwise.
// Sizes and operator arguments, shared by both directions.
struct ProblemDims {
  int64_t B, H, Hp, T, Dk, Dv, R, L, U, window_left, window_right;
  double scale;  // cast to the accumulation type in the kernels
};

struct FwdParams : ProblemDims {
  const void* q;
  const void* k;
  const void* v;
  const void* P;
  const bool* mask;
  void* out;
  void* lse;
};

struct BwdParams : ProblemDims {
  const void* grad_out;
  const void* q;
  const void* k;
  const void* v;
  const void* P;
  const bool* mask;
  const void* out;
  const void* lse;
  void* D;          // [B,H,T] workspace: D_i = dout_i . out_i
  void* grad_q;
  void* grad_k;
  void* grad_v;
  void* dP_heads;   // [B,H,T,R], zero on entry
};

// scalar_t is double, float, __half or __nv_bfloat16. Each launcher takes the tile
// configuration that fits in max_smem (the device's opt-in shared memory per block): the
// large tiles on sm_80 / sm_90, smaller ones on devices with less shared memory.
// *_smem_bytes return what the chosen configuration needs, which the dispatcher checks
// against max_smem before launching. The launchers return the first CUDA error.
template <typename scalar_t>
size_t delta_fwd_smem_bytes(int64_t Dk, int64_t Dv, int max_smem);
template <typename scalar_t>
cudaError_t delta_fwd_launch(const FwdParams& p, int max_smem, cudaStream_t stream);

template <typename scalar_t>
size_t delta_bwd_smem_bytes(int64_t Dk, int64_t Dv, int max_smem);
template <typename scalar_t>
cudaError_t delta_bwd_launch(const BwdParams& p, int max_smem, cudaStream_t stream);

// The CuTe forward (csrc/cuda_cute/, compiled only with HDAF_BUILD_CUTE=1; compile-verified, not
// yet run on a GPU): scalar_t __half or __nv_bfloat16, Dk == Dv == kHeadDim in {64, 128}, sm_80+,
// lse float32. One fixed tile configuration per (dtype, head dim); *_smem_bytes is what it needs.
template <typename scalar_t, int kHeadDim>
size_t delta_fwd_cute_smem_bytes();
template <typename scalar_t, int kHeadDim>
cudaError_t delta_fwd_cute_launch(const FwdParams& p, cudaStream_t stream);

// The CuTe backward (same build switch and status): BwdParams with lse, D and both dP halves in
// float32. dP_heads takes the key-row half (dP[j, r(i,j)] += scale dS_ij, written by the dK/dV
// pass) and dP_rows the query-row half (dP[i, r(i,j)] -= scale dS_ij, by the dQ pass), each
// [B,H,T,R], zero on entry; the caller adds them (and sums over heads when Hp = 1).
struct CuteBwdParams : BwdParams {
  void* dP_rows;
};
template <typename scalar_t, int kHeadDim>
size_t delta_bwd_cute_smem_bytes();
template <typename scalar_t, int kHeadDim>
cudaError_t delta_bwd_cute_launch(const CuteBwdParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace hdaf
