// CuTe backward of hdaf::delta_attention, float16, head dim 64: tiles of 64 query rows and 64 key
// rows, 4 warps, for both the dQ and the dK/dV pass (instantiation unit; see flash_bwd.cuh).
// Not timed on a GPU.
#include "flash_bwd.cuh"

HDAF_DEFINE_BWD(__half, cutlass::half_t, 64, 64, 64, 4)
