// bwd kernels of hdaf::delta_attention for __nv_bfloat16 (instantiation unit; see delta_attention_kernels.cuh).
#include "delta_attention_kernels.cuh"

namespace hdaf {
namespace cuda {
HDAF_CUDA_DEFINE_BWD(__nv_bfloat16)
}  // namespace cuda
}  // namespace hdaf
