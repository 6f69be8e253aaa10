// What both CuTe emulation units (fwd_emulation.cpp, bwd_emulation.cpp) need before
// they include the shipped kernel units: the CUDA host headers, CuTe / CUTLASS, and the device
// built-ins those headers name but the host headers do not declare.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// Device intrinsics that CUTLASS's numeric_conversion.h names in converters these kernels do not
// instantiate (int8 / fp8 paths); the host CUDA headers do not declare them. Declared only: a use
// would fail to link instead of computing anything.
int __dp4a(int, int, int);
unsigned __byte_perm(unsigned, unsigned, unsigned);
__half2 __hfma2(__half2, __half2, __half2);

#include <cute/tensor.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include "cute_sm80_emulation.h"

// CUDA's integer min / max device built-ins, for the host.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
