// CUDA forward of hdaf::delta_attention, float16, head dim 128: 128 query rows x 64 key rows,
// 8 warps, so S and the output accumulator fit in registers (instantiation unit; see
// flash_fwd.cuh). sm_90, CUDA 13.0: 255 registers; ptxas spills 136 bytes outside the key-tile
// loops, none in them (bench/results/static_cute_sm90.md). Not timed on a GPU.
#include "flash_fwd.cuh"

HDAF_DEFINE_FWD(__half, cutlass::half_t, 128, 128, 64, 8)
