// CuTe forward of hdaf::delta_attention, bfloat16, head dim 128: 128 query rows x 64 key rows,
// 8 warps, so the Q fragment, S and the output accumulator fit in registers (instantiation unit;
// see flash_fwd.cuh).
#include "flash_fwd.cuh"

HDAF_DEFINE_FWD(__nv_bfloat16, cutlass::bfloat16_t, 128, 128, 64, 8)
