// fwd kernels of hdaf::delta_attention for double (instantiation unit; see delta_attention_kernels.cuh).
#include "delta_attention_kernels.cuh"

namespace hdaf {
namespace cuda {
HDAF_CUDA_DEFINE_FWD(double)
}  // namespace cuda
}  // namespace hdaf
