// Interface between the torch-facing host code (delta_attention_cuda.cpp, which serves
// hdaf::delta_attention_forward / _backward and hdaf::delta_attention_varlen_forward / _backward
// for CUDA tensors) and the kernel instantiation units (fwd_*.cu, bwd_*.cu, one per dtype and head
// dim). Torch-free on purpose: the kernel files include only CUDA and CuTe headers, and the host
// emulation (csrc/cuda/host_emulation) compiles the very same units for the CPU.
//
// One parameter block serves padded and packed (varlen) batches, grouped-query heads and a query
// block shorter than the keys. Sequence b, query head h:
//   Tq_b, Tk_b   padded: Tq, Tk; varlen: cu_seqlens_q[b+1] - cu_seqlens_q[b] (likewise k)
//   first row    padded: 0; varlen: cu_seqlens_q[b] (queries), cu_seqlens_k[b] (keys)
//   query i      stands at key position Tk_b - Tq_b + i (the query block is end-aligned)
//   kv head      h / (H / Hkv); P head: 0 when Hp == 1, else h
// Element (b, h, row) of a tensor with strides s lies at
//   b * s.batch + (first row + row) * s.row + h * s.head   (last dim contiguous)
// (a varlen tensor has s.batch = 0). SeqInfo (below) does this arithmetic, once, for every kernel.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "hdaf/delta_common.h"  // HDAF_HD

namespace hdaf {
namespace cuda {

// Strides in elements.
struct Strides {
  int64_t batch, head, row;
};

// q [B,H,Tq,D] | [Total_q,H,D]; k, v [B,Hkv,Tk,D] | [Total_k,Hkv,D]; P [B,Hp,Tk,R] |
// [Total_k,Hp,R]; out like q; lse float32 [B,H,Tq] | [H,Total_q]; mask bool [B,Tk] (padded only,
// nullptr when absent). Dk == Dv == D. All data pointers 16-byte aligned (cp.async).
struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* P;
  const bool* mask;
  void* out;
  float* lse;
  Strides q_s, k_s, v_s, P_s, o_s, lse_s;
  const int* cu_seqlens_q;  // [B+1] int32 or nullptr (padded batch)
  const int* cu_seqlens_k;
  int B, H, Hkv, Hp;
  int Tq, Tk;  // padded: every sequence's lengths; varlen: max_seqlen_q / max_seqlen_k (grid)
  int D, R, L, U, window_left, window_right;
  float scale;
  // Split-key decoding: with num_splits > 1 the key tiles of each query block are dealt to
  // num_splits CTAs; split s writes its partial result (normalised by its own sum) to out_accum + s *
  // split_stride_o (float32, strides o_s) and lse_accum + s * split_stride_lse (strides lse_s),
  // and a combine kernel writes out and lse. num_splits == 1: out and lse directly.
  int num_splits;
  float* out_accum;
  float* lse_accum;
  int64_t split_stride_o, split_stride_lse;
};

// The backward adds dout (strides o_s), the row sums Dsum (float32, strides lse_s), the
// gradients dq (strides q_s), dk and dv (strides k_s / v_s: one per key/value head, the group's
// query heads summed inside the kernel, no copies), and the two halves of dP per query head,
// float32, zero on entry, strides dP_s over [B,H,Tk,R] | [Total_k,H,R]: dP_keys[j, r(i,j)] +=
// scale dS_ij (dK/dV pass), dP_rows[i, r(i,j)] -= scale dS_ij (dQ pass). The host adds the halves
// and sums over heads when Hp == 1.
struct BwdParams : FwdParams {
  const void* dout;
  float* Dsum;
  void* dq;
  void* dk;
  void* dv;
  float* dP_keys;
  float* dP_rows;
  Strides dP_s;
};

// Where sequence b lies. cu: cu_seqlens or nullptr.
struct SeqInfo {
  int q_start, k_start;  // first query / key row in storage
  int Tq, Tk;            // lengths
  int off;               // Tk - Tq: query row i stands at key position off + i

  HDAF_HD SeqInfo(const FwdParams& p, int b)
      : q_start(p.cu_seqlens_q ? p.cu_seqlens_q[b] : 0),
        k_start(p.cu_seqlens_k ? p.cu_seqlens_k[b] : 0),
        Tq(p.cu_seqlens_q ? p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b] : p.Tq),
        Tk(p.cu_seqlens_k ? p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b] : p.Tk),
        off(Tk - Tq) {}

  // Element offset of row 0 of (b, head) in a query-indexed (q_row) or key-indexed tensor.
  HDAF_HD int64_t q_offset(const Strides& s, int b, int head) const {
    return int64_t(b) * s.batch + int64_t(q_start) * s.row + int64_t(head) * s.head;
  }
  HDAF_HD int64_t k_offset(const Strides& s, int b, int head) const {
    return int64_t(b) * s.batch + int64_t(k_start) * s.row + int64_t(head) * s.head;
  }
};

HDAF_HD int kv_head(const FwdParams& p, int h) { return h / (p.H / p.Hkv); }
HDAF_HD int p_head(const FwdParams& p, int h) { return p.Hp == 1 ? 0 : h; }

// Split-key decoding heuristic (host side): how many CTAs share the key tiles of one query block.
// 1 unless the grid (query blocks x B x H) would leave most of the device's SMs idle and each
// split still gets at least two key tiles; at most 16.
inline int num_splits_heuristic(int64_t ctas, int n_key_tiles, int num_sms) {
  if (ctas >= int64_t(num_sms) * 4 / 5 || n_key_tiles < 4) return 1;
  int best = 1;
  for (int s = 2; s <= 16 && s * 2 <= n_key_tiles; ++s) {
    best = s;
    if (ctas * s >= int64_t(num_sms)) break;
  }
  return best;
}

// scalar_t is __half or __nv_bfloat16, kHeadDim 64 or 128 (one instantiation unit each).
// *_smem_bytes: the dynamic shared memory of the shipped tile configuration; *_block_m: its
// query-block height (the host sizes split-key grids and checks grid limits with it).
// The launchers return the first CUDA error.
template <typename scalar_t, int kHeadDim>
size_t delta_fwd_smem_bytes();
template <typename scalar_t, int kHeadDim>
int delta_fwd_block_m();
template <typename scalar_t, int kHeadDim>
int delta_fwd_block_n();
template <typename scalar_t, int kHeadDim>
cudaError_t delta_fwd_launch(const FwdParams& p, cudaStream_t stream);

template <typename scalar_t, int kHeadDim>
size_t delta_bwd_smem_bytes();
template <typename scalar_t, int kHeadDim>
cudaError_t delta_bwd_launch(const BwdParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace hdaf
