// Host-side builders of the kernels' parameter blocks (delta_attention_cuda.h) from tensors,
// shared by the torch-facing op (delta_attention_cuda.cpp) and the host emulation
// (csrc/cuda/host_emulation), so both hand the kernels exactly the same blocks. Kept out of
// delta_attention_cuda.h, which the kernel files include and which stays torch-free.
#pragma once

#include <ATen/core/Tensor.h>

#include "delta_attention_cuda.h"

namespace hdaf {
namespace cuda {

// Strides of a padded [B, heads, rows, D] / [B, heads, rows] tensor, or of a packed
// [rows, heads, D] tensor (varlen; batch 0, rows offset by cu_seqlens). The last dim of a
// 4-D / 3-D packed tensor must be contiguous (the host makes it so).
inline Strides padded_strides(const at::Tensor& t) {
  return Strides{t.stride(0), t.stride(1), t.stride(2)};
}
inline Strides packed_strides(const at::Tensor& t) { return Strides{0, t.stride(1), t.stride(0)}; }
// A packed lse / Dsum [heads, Total_q].
inline Strides packed_lse_strides(const at::Tensor& t) {
  return Strides{0, t.stride(0), t.stride(1)};
}

// The sizes and operator arguments every call fills in the same way.
struct CallArgs {
  int64_t B, H, Hkv, Hp, Tq, Tk, D, R, L, U, window_left, window_right;
  double scale;
};

// q, k, v, P, out, lse as described in delta_attention_cuda.h; `varlen` selects the packed
// layouts (cu_seqlens_q / cu_seqlens_k defined, mask undefined). Split-key decoding off.
inline FwdParams make_fwd_params(const CallArgs& c, bool varlen, const at::Tensor& q,
                                 const at::Tensor& k, const at::Tensor& v, const at::Tensor& P,
                                 const at::Tensor& mask, const at::Tensor& out,
                                 const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
                                 const at::Tensor& cu_seqlens_k) {
  FwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.P = P.data_ptr();
  p.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  auto rows = varlen ? packed_strides : padded_strides;
  p.q_s = rows(q);
  p.k_s = rows(k);
  p.v_s = rows(v);
  p.P_s = rows(P);
  p.o_s = rows(out);
  p.lse_s = varlen ? packed_lse_strides(lse) : padded_strides(lse);
  p.cu_seqlens_q = varlen ? cu_seqlens_q.data_ptr<int>() : nullptr;
  p.cu_seqlens_k = varlen ? cu_seqlens_k.data_ptr<int>() : nullptr;
  p.B = int(c.B);
  p.H = int(c.H);
  p.Hkv = int(c.Hkv);
  p.Hp = int(c.Hp);
  p.Tq = int(c.Tq);
  p.Tk = int(c.Tk);
  p.D = int(c.D);
  p.R = int(c.R);
  p.L = int(c.L);
  p.U = int(c.U);
  p.window_left = int(c.window_left);
  p.window_right = int(c.window_right);
  p.scale = float(c.scale);
  p.num_splits = 1;
  p.out_accum = nullptr;
  p.lse_accum = nullptr;
  p.split_stride_o = p.split_stride_lse = 0;
  return p;
}

// Turns on split-key decoding: out_accum float32 [num_splits, *out.shape] and lse_accum float32
// [num_splits, *lse.shape], both contiguous like out and lse.
inline void set_splits(FwdParams& p, int num_splits, const at::Tensor& out_accum,
                       const at::Tensor& lse_accum) {
  p.num_splits = num_splits;
  p.out_accum = out_accum.data_ptr<float>();
  p.lse_accum = lse_accum.data_ptr<float>();
  p.split_stride_o = out_accum.stride(0);
  p.split_stride_lse = lse_accum.stride(0);
}

// The backward's block: the forward's, plus dout (strides of out), Dsum (lse's), dq (q's), dk,
// dv (k's, v's) and the dP halves [B,H,Tk,R] | [Total_k,H,R] float32.
inline BwdParams make_bwd_params(const FwdParams& f, bool varlen, const at::Tensor& dout,
                                 const at::Tensor& Dsum, const at::Tensor& dq,
                                 const at::Tensor& dk, const at::Tensor& dv,
                                 const at::Tensor& dP_keys, const at::Tensor& dP_rows) {
  BwdParams p{};
  static_cast<FwdParams&>(p) = f;
  p.dout = dout.data_ptr();
  p.Dsum = Dsum.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dP_keys = dP_keys.data_ptr<float>();
  p.dP_rows = dP_rows.data_ptr<float>();
  p.dP_s = varlen ? packed_strides(dP_keys) : padded_strides(dP_keys);
  return p;
}

}  // namespace cuda
}  // namespace hdaf
