// CUDA forward of hdaf::delta_attention, float16, head dim 64: 128 query rows x 64 key rows,
// 8 warps (instantiation unit; see flash_fwd.cuh). With 4 warps ptxas hit 255 registers and
// spilled (sm_80, CUDA 13.0). 8 warps, sm_90, CUDA 13.0: 255 registers, 96 bytes of spill, its
// loads and stores in the masked loop only; 128 x 128 with 8 warps put spill loads in the
// far-tile loops (bench/results/static_cute_sm90.md). Not timed on a GPU.
#include "flash_fwd.cuh"

HDAF_DEFINE_FWD(__half, cutlass::half_t, 64, 128, 64, 8)
