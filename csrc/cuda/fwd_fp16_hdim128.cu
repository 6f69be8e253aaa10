// CuTe forward of hdaf::delta_attention, float16, head dim 128: 128 query rows x 64 key rows,
// 8 warps, so the Q fragment, S and the output accumulator fit in registers (instantiation unit;
// see flash_fwd.cuh).
#include "flash_fwd.cuh"

HDAF_DEFINE_FWD(__half, cutlass::half_t, 128, 128, 64, 8)
