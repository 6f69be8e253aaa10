// bwd kernels of hdaf::delta_attention for __half (instantiation unit; see delta_attention_kernels.cuh).
#include "delta_attention_kernels.cuh"

namespace hdaf {
namespace cuda {
HDAF_CUDA_DEFINE_BWD(__half)
}  // namespace cuda
}  // namespace hdaf
