// bwd kernels of hdaf::delta_attention for float (instantiation unit; see delta_attention_kernels.cuh).
#include "delta_attention_kernels.cuh"

namespace hdaf {
namespace cuda {
HDAF_CUDA_DEFINE_BWD(float)
}  // namespace cuda
}  // namespace hdaf
