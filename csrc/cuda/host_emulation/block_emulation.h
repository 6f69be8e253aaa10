// CUDA thread blocks on the CPU, for the host emulations of this folder (test-time extensions
// built by tests/test_cuda_fwd_emulation.py and test_cuda_bwd_emulation.py; never in hdaf._C).
//
// One std::thread per CUDA thread of a block; the blocks of a grid run one after another on the
// same pool. A std::barrier per block serves __syncthreads / __syncthreads_or and one per warp
// serves __syncwarp, __shfl_xor_sync and the warp-collective operations the emulations define
// (wmma, mma.sync, ldmatrix). The dynamic shared memory is one buffer filled with NaN bytes
// (0xFF) before each block, so a read of shared memory nothing wrote shows up in the results.
//
// Include after the CUDA headers (cuda_runtime.h): it redefines their execution-space macros
// (__global__, __device__, ...) to nothing and threadIdx / blockIdx / blockDim / __syncthreads
// to the emulated ones. A TU including it defines `hdaf_emu::shared_memory`, the buffer its
// kernels' `extern __shared__` array names (kSmemBytes bytes).
#pragma once

#include <atomic>
#include <barrier>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __launch_bounds__(...)

namespace hdaf_emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Dim3 thread_idx, block_idx, block_dim;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline int or_flag = 0;
inline double shuffle_buffer[1024];
constexpr size_t kSmemBytes = size_t(1) << 18;
extern unsigned char* const shared_memory;

inline unsigned lane_id() { return thread_idx.x & 31u; }
inline unsigned warp_id() { return thread_idx.x / 32u; }

// The first error an emulated thread ran into (a misaligned or out-of-range access an emulated
// instruction would fault on, a collective called by part of a warp). Threads record it and go
// on (an exception thrown in a std::thread would end the process); launch() throws it.
inline std::mutex error_mutex;
inline std::string first_error;
inline std::atomic<bool> failed{false};
inline void fail(const std::string& what) {
  std::lock_guard<std::mutex> lock(error_mutex);
  if (!failed.exchange(true)) first_error = what;
}

inline bool in_shared_memory(const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  return c >= shared_memory && c + bytes <= shared_memory + kSmemBytes;
}

inline void syncthreads() { block_barrier->arrive_and_wait(); }
inline int syncthreads_or(int v) {
  block_barrier->arrive_and_wait();
  if (thread_idx.x == 0) or_flag = 0;
  block_barrier->arrive_and_wait();
  if (v) or_flag = 1;
  block_barrier->arrive_and_wait();
  return or_flag;
}
inline void syncwarp() { warp_barriers[warp_id()]->arrive_and_wait(); }
template <class V>
V shfl_xor(unsigned, V v, int lane_mask) {
  syncwarp();
  shuffle_buffer[thread_idx.x] = static_cast<double>(v);
  syncwarp();
  const unsigned src = (thread_idx.x & ~31u) | ((thread_idx.x & 31u) ^ unsigned(lane_mask));
  return static_cast<V>(shuffle_buffer[src]);
}

// Hooks run by every thread around each block it runs (the emulated cp.async checks that no
// copy is left pending when a thread leaves the kernel). Set before launch().
inline void (*thread_block_begin)() = nullptr;
inline void (*thread_block_end)() = nullptr;

// Runs kernel(args...) for blocks 0..grid-1 with `threads` threads each; throws the first error
// an emulated thread recorded.
template <class Kernel, class... Args>
void launch(Kernel kernel, unsigned grid, int threads, size_t smem_bytes, const void* /*stream*/,
            Args... args) {
  if (smem_bytes > kSmemBytes) throw std::runtime_error("emulation: shared memory too large");
  if (threads > 1024 || threads % 32 != 0) throw std::runtime_error("emulation: block size");
  failed = false;
  first_error.clear();
  std::barrier<> bar(threads);
  block_barrier = &bar;
  warp_barriers.clear();
  for (int w = 0; w < threads / 32; ++w) warp_barriers.emplace_back(new std::barrier<>(32));
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([=, &bar] {
      thread_idx.x = t;
      block_dim.x = threads;
      for (unsigned b = 0; b < grid; ++b) {
        block_idx.x = b;
        bar.arrive_and_wait();  // the previous block is done
        if (t == 0) std::memset(shared_memory, 0xFF, smem_bytes);
        bar.arrive_and_wait();
        if (thread_block_begin) thread_block_begin();
        kernel(args...);
        if (thread_block_end) thread_block_end();
      }
    });
  }
  for (auto& th : pool) th.join();
  if (failed) throw std::runtime_error("emulation: " + first_error);
}

}  // namespace hdaf_emu

#define threadIdx (hdaf_emu::thread_idx)
#define blockIdx (hdaf_emu::block_idx)
#define blockDim (hdaf_emu::block_dim)
#define __syncthreads() hdaf_emu::syncthreads()
#define __syncthreads_or(v) hdaf_emu::syncthreads_or(v)
#define __syncwarp(...) hdaf_emu::syncwarp()
#define __shfl_xor_sync(m, v, o) hdaf_emu::shfl_xor(m, v, o)
#define cudaFuncSetAttribute(...) cudaSuccess
#define cudaGetLastError() cudaSuccess
#define HDAF_LAUNCH(kernel, grid, block, smem, stream, ...) \
  hdaf_emu::launch(kernel, grid, block, smem, stream, __VA_ARGS__)
