// CuTe backward of hdaf::delta_attention, bfloat16, head dim 64: tiles of 128 query rows and 128 key
// rows, 8 warps, for both the dQ and the dK/dV pass (instantiation unit; see flash_bwd_cute.cuh).
// Not timed on a GPU.
#include "flash_bwd_cute.cuh"

HDAF_CUTE_DEFINE_BWD(__nv_bfloat16, cutlass::bfloat16_t, 64, 128, 128, 8)
