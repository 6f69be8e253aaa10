// The argument checks of the hdaf ops (declared in csrc/include/hdaf/delta_attention_checks.h),
// compiled once by the host C++ compiler and called by both the CPU and the CUDA op, and by the
// test hooks hdaf::_check_forward_args / _check_varlen_args (tests/test_delta_attention.py,
// tests/test_gqa_varlen.py), so the rejection of a CUDA-only limit is tested on machines without
// a GPU through this very code.
#include "hdaf/delta_attention_checks.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <string>

namespace hdaf {
namespace {

const char* who(OpDevice dev) {
  return dev == OpDevice::CUDA ? "hdaf delta_attention (CUDA)" : "hdaf delta_attention (CPU)";
}

int64_t max_head_dim(OpDevice dev) { return dev == OpDevice::CUDA ? kCudaMaxHeadDim : 0; }

bool supported_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

void check_like_q(const char* w, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), w, ": ", name, " has dtype ", t.scalar_type(),
              " but q has ", q.scalar_type(), ": all of q, k, v, P must share one dtype");
  TORCH_CHECK(t.device() == q.device(), w, ": ", name, " is on ", t.device(), " but q is on ",
              q.device(), ": all inputs must be on one device");
}

void check_head_ratio(const char* w, int64_t H, int64_t Hkv, const at::Tensor& q,
                      const at::Tensor& k) {
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, w, ": the query heads H=", H,
              " must be a multiple of the key/value heads Hkv=", Hkv, " (q ", q.sizes(), ", k ",
              k.sizes(), ")");
}

void check_head_dims(OpDevice dev, const char* w, int64_t Dk, int64_t Dv) {
  const int64_t limit = max_head_dim(dev);
  TORCH_CHECK(limit <= 0 || (Dk <= limit && Dv <= limit), w, ": head dims up to ", limit,
              " are supported, got Dk=", Dk, " and Dv=", Dv,
              " (the 'cpu' and 'gather' backends take any head dim)");
}

void check_scalars(const char* w, int64_t L, int64_t U, int64_t window_left,
                   int64_t window_right, double scale) {
  TORCH_CHECK(L >= 0 && U >= 0, w, ": L and U must be >= 0, got L=", L, ", U=", U);
  TORCH_CHECK(window_left >= -1 && window_right >= -1, w,
              ": window_left/window_right must be >= -1 (-1: unbounded), got ", window_left, ", ",
              window_right);
  TORCH_CHECK(std::isfinite(scale), w, ": scale must be finite, got ", scale);
}

// What the CUDA kernels (csrc/cuda, CuTe tensor-core kernels) instantiate: float16 and bfloat16,
// Dk == Dv in {64, 128}. Anything else is NotImplementedError naming the backends that take it.
void check_cuda_kernels(OpDevice dev, const char* w, at::ScalarType dtype, int64_t Dk,
                        int64_t Dv) {
  if (dev != OpDevice::CUDA) return;
  TORCH_CHECK_NOT_IMPLEMENTED(
      dtype == at::kHalf || dtype == at::kBFloat16, w,
      ": backend='cuda' computes float16 and bfloat16 (tensor-core kernels), got ", dtype,
      "; use backend='triton' (float16, bfloat16, float32) or 'gather' (any dtype, the PyTorch "
      "reference)");
  TORCH_CHECK_NOT_IMPLEMENTED(Dk == Dv, w, ": backend='cuda' needs Dk == Dv, got Dk=", Dk,
                              " and Dv=", Dv, "; use backend='triton'");
  TORCH_CHECK_NOT_IMPLEMENTED(Dk == 64 || Dk == 128, w,
                              ": backend='cuda' has kernels for head dims 64 and 128, got ", Dk,
                              "; use backend='triton' (head dims up to 128)");
}

void check_cu_seqlens(const char* w, const char* name, const at::Tensor& cu,
                      const at::Tensor& q) {
  TORCH_CHECK(cu.scalar_type() == at::kInt, w, ": ", name, " must be int32, got ",
              cu.scalar_type());
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1, w, ": ", name, " must be 1-D [B+1], got shape ",
              cu.sizes());
  TORCH_CHECK(cu.device() == q.device(), w, ": ", name, " is on ", cu.device(), " but q is on ",
              q.device());
}

// Values of one cu_seqlens: 0 first, total last, non-decreasing, lengths <= max_seqlen.
void check_cu_values(const char* w, const char* name, const int32_t* c, int64_t B,
                     int64_t total, const char* total_name, int64_t max_seqlen,
                     const char* max_name) {
  TORCH_CHECK(c[0] == 0, w, ": ", name, "[0] must be 0, got ", c[0]);
  TORCH_CHECK(c[B] == total, w, ": ", name, "[-1] must be ", total_name, "=", total, ", got ",
              c[B]);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = int64_t(c[b + 1]) - c[b];
    TORCH_CHECK(len >= 0, w, ": ", name, " must be non-decreasing, got ", name, "[", b, "]=",
                c[b], " > ", name, "[", b + 1, "]=", c[b + 1]);
    TORCH_CHECK(len <= max_seqlen, w, ": ", max_name, "=", max_seqlen,
                " is smaller than sequence ", b, "'s length ", len);
  }
}

}  // namespace

namespace {

// The checks of the padded ops. `end_aligned`: the queries are the last Tq of the Tk positions
// (Tq <= Tk); the block ops place them anywhere, so they skip that check.
DeltaSizes check_padded_args(OpDevice dev, const char* w, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const at::Tensor& P,
                             const std::optional<at::Tensor>& key_padding_mask, int64_t L,
                             int64_t U, int64_t window_left, int64_t window_right, double scale,
                             bool end_aligned) {
  TORCH_CHECK(q.dim() == 4, w, ": q must be 4-D [B,H,Tq,Dk], got shape ", q.sizes());
  TORCH_CHECK(supported_dtype(q.scalar_type()), w,
              ": q must be float16, bfloat16, float32 or float64, got ", q.scalar_type());
  check_like_q(w, "k", k, q);
  check_like_q(w, "v", v, q);
  check_like_q(w, "P", P, q);
  DeltaSizes s;
  s.B = q.size(0);
  s.H = q.size(1);
  s.T = q.size(2);
  s.Dk = q.size(3);
  TORCH_CHECK(k.dim() == 4 && k.size(0) == s.B && k.size(3) == s.Dk, w,
              ": k must be [B,Hkv,Tk,Dk] with B=", s.B, ", Dk=", s.Dk, " as in q, got ",
              k.sizes());
  s.Hkv = k.size(1);
  s.Tk = k.size(2);
  TORCH_CHECK(v.dim() == 4 && v.sizes().slice(0, 3) == k.sizes().slice(0, 3), w,
              ": v must be [B,Hkv,Tk,Dv] with [B,Hkv,Tk]=", k.sizes().slice(0, 3),
              " as in k, got ", v.sizes());
  s.Dv = v.size(3);
  check_head_ratio(w, s.H, s.Hkv, q, k);
  TORCH_CHECK(!end_aligned || s.T <= s.Tk, w, ": q has Tq=", s.T, " queries but k has Tk=", s.Tk,
              " keys: Tq <= Tk is required (the queries are the last Tq positions)");
  check_head_dims(dev, w, s.Dk, s.Dv);
  check_scalars(w, L, U, window_left, window_right, scale);
  TORCH_CHECK(P.dim() == 4 && P.size(0) == s.B && (P.size(1) == 1 || P.size(1) == s.H) &&
                  P.size(2) == s.Tk,
              w, ": P must be [B,Hp,Tk,R] with B=", s.B, ", Hp in {1, ", s.H, "}, Tk=", s.Tk,
              ", got ", P.sizes());
  TORCH_CHECK(P.size(3) == L + U + 1, w, ": P has R=", P.size(3), " buckets but L=", L,
              ", U=", U, " need R = L+U+1 = ", L + U + 1);
  s.Hp = P.size(1);
  s.R = P.size(3);
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, w,
                ": key_padding_mask must be bool (True marks padding), got ", m.scalar_type());
    TORCH_CHECK(m.device() == q.device(), w, ": key_padding_mask is on ", m.device(),
                " but q is on ", q.device());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == s.B && m.size(1) == s.Tk, w,
                ": key_padding_mask must be [B,Tk]=[", s.B, ", ", s.Tk, "], got ", m.sizes());
  }
  // Last: a well-formed call the CUDA kernels do not instantiate.
  check_cuda_kernels(dev, w, q.scalar_type(), s.Dk, s.Dv);
  return s;
}

}  // namespace

DeltaSizes check_forward_args(OpDevice dev, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& P,
                              const std::optional<at::Tensor>& key_padding_mask, int64_t L,
                              int64_t U, int64_t window_left, int64_t window_right,
                              double scale) {
  return check_padded_args(dev, who(dev), q, k, v, P, key_padding_mask, L, U, window_left,
                           window_right, scale, /*end_aligned=*/true);
}

DeltaSizes check_block_args(OpDevice dev, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& P_q, const at::Tensor& P_k,
                            const std::optional<at::Tensor>& key_padding_mask, int64_t L,
                            int64_t U, int64_t window_left, int64_t window_right,
                            double scale) {
  const char* w = who(dev);
  TORCH_CHECK_NOT_IMPLEMENTED(dev != OpDevice::CUDA, w,
                              ": global query/key positions (q_start, k_start: a block of a "
                              "context-parallel ring) are not supported by backend='cuda'; use "
                              "backend='triton'");
  const DeltaSizes s = check_padded_args(dev, w, q, k, v, P_k, key_padding_mask, L, U,
                                         window_left, window_right, scale, /*end_aligned=*/false);
  check_like_q(w, "P_q", P_q, q);
  TORCH_CHECK(P_q.dim() == 4 && P_q.size(0) == s.B && P_q.size(1) == s.Hp &&
                  P_q.size(2) == s.T && P_q.size(3) == s.R,
              w, ": P_q must be [B,Hp,Tq,R]=[", s.B, ", ", s.Hp, ", ", s.T, ", ", s.R,
              "] (Hp and R as in P_k, Tq as in q), got ", P_q.sizes());
  return s;
}

void check_backward_args(OpDevice dev, const DeltaSizes& s, const at::Tensor& q,
                         const at::Tensor& grad_out, const at::Tensor& out,
                         const at::Tensor& lse) {
  const char* w = who(dev);
  check_like_q(w, "grad_out", grad_out, q);
  check_like_q(w, "out", out, q);
  auto like_out = [&](const at::Tensor& t) {
    return t.dim() == 4 && t.size(0) == s.B && t.size(1) == s.H && t.size(2) == s.T &&
           t.size(3) == s.Dv;
  };
  TORCH_CHECK(like_out(grad_out) && like_out(out), w, ": grad_out and out must be [B,H,Tq,Dv]=[",
              s.B, ", ", s.H, ", ", s.T, ", ", s.Dv, "], got ", grad_out.sizes(), " and ",
              out.sizes());
  const at::ScalarType acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.device() == q.device(), w, ": lse is on ", lse.device(), " but q is on ",
              q.device());
  TORCH_CHECK(lse.scalar_type() == acc, w, ": lse must be ", acc, " for ", q.scalar_type(),
              " inputs, got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == s.B && lse.size(1) == s.H && lse.size(2) == s.T, w,
              ": lse must be [B,H,Tq]=[", s.B, ", ", s.H, ", ", s.T, "], got ", lse.sizes());
}

VarlenSizes check_varlen_args(OpDevice dev, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& P,
                              const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                              int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t L, int64_t U,
                              int64_t window_left, int64_t window_right, double scale) {
  const char* w = who(dev);
  TORCH_CHECK(q.dim() == 3, w, ": q must be 3-D [Total_q,H,Dk], got shape ", q.sizes());
  TORCH_CHECK(supported_dtype(q.scalar_type()), w,
              ": q must be float16, bfloat16, float32 or float64, got ", q.scalar_type());
  check_like_q(w, "k", k, q);
  check_like_q(w, "v", v, q);
  check_like_q(w, "P", P, q);
  VarlenSizes s;
  s.Total_q = q.size(0);
  s.H = q.size(1);
  s.Dk = q.size(2);
  TORCH_CHECK(k.dim() == 3 && k.size(2) == s.Dk, w, ": k must be [Total_k,Hkv,Dk] with Dk=",
              s.Dk, " as in q, got ", k.sizes());
  s.Total_k = k.size(0);
  s.Hkv = k.size(1);
  TORCH_CHECK(v.dim() == 3 && v.size(0) == s.Total_k && v.size(1) == s.Hkv, w,
              ": v must be [Total_k,Hkv,Dv] with [Total_k,Hkv]=[", s.Total_k, ", ", s.Hkv,
              "] as in k, got ", v.sizes());
  s.Dv = v.size(2);
  check_head_ratio(w, s.H, s.Hkv, q, k);
  check_head_dims(dev, w, s.Dk, s.Dv);
  check_scalars(w, L, U, window_left, window_right, scale);
  TORCH_CHECK(P.dim() == 3 && P.size(0) == s.Total_k && (P.size(1) == 1 || P.size(1) == s.H), w,
              ": P must be [Total_k,Hp,R] with Total_k=", s.Total_k, ", Hp in {1, ", s.H,
              "}, got ", P.sizes());
  TORCH_CHECK(P.size(2) == L + U + 1, w, ": P has R=", P.size(2), " buckets but L=", L,
              ", U=", U, " need R = L+U+1 = ", L + U + 1);
  s.Hp = P.size(1);
  s.R = P.size(2);
  check_cu_seqlens(w, "cu_seqlens_q", cu_seqlens_q, q);
  check_cu_seqlens(w, "cu_seqlens_k", cu_seqlens_k, q);
  TORCH_CHECK(cu_seqlens_q.size(0) == cu_seqlens_k.size(0), w,
              ": cu_seqlens_q and cu_seqlens_k must both be [B+1], got lengths ",
              cu_seqlens_q.size(0), " and ", cu_seqlens_k.size(0));
  s.B = cu_seqlens_q.size(0) - 1;
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, w,
              ": max_seqlen_q and max_seqlen_k must be >= 0, got ", max_seqlen_q, " and ",
              max_seqlen_k);
  if (cu_seqlens_q.device().is_cpu()) {
    const at::Tensor cq = cu_seqlens_q.contiguous(), ck = cu_seqlens_k.contiguous();
    const int32_t* pq = cq.data_ptr<int32_t>();
    const int32_t* pk = ck.data_ptr<int32_t>();
    check_cu_values(w, "cu_seqlens_q", pq, s.B, s.Total_q, "Total_q", max_seqlen_q,
                    "max_seqlen_q");
    check_cu_values(w, "cu_seqlens_k", pk, s.B, s.Total_k, "Total_k", max_seqlen_k,
                    "max_seqlen_k");
    for (int64_t b = 0; b < s.B; ++b) {
      const int64_t tq = int64_t(pq[b + 1]) - pq[b], tk = int64_t(pk[b + 1]) - pk[b];
      TORCH_CHECK(tq <= tk, w, ": sequence ", b, " has Tq=", tq, " queries but Tk=", tk,
                  " keys: Tq <= Tk is required in every sequence");
    }
  }
  // Last: a well-formed call the CUDA kernels do not instantiate.
  check_cuda_kernels(dev, w, q.scalar_type(), s.Dk, s.Dv);
  return s;
}

void check_varlen_backward_args(OpDevice dev, const VarlenSizes& s, const at::Tensor& q,
                                const at::Tensor& grad_out, const at::Tensor& out,
                                const at::Tensor& lse) {
  const char* w = who(dev);
  check_like_q(w, "grad_out", grad_out, q);
  check_like_q(w, "out", out, q);
  auto like_out = [&](const at::Tensor& t) {
    return t.dim() == 3 && t.size(0) == s.Total_q && t.size(1) == s.H && t.size(2) == s.Dv;
  };
  TORCH_CHECK(like_out(grad_out) && like_out(out), w,
              ": grad_out and out must be [Total_q,H,Dv]=[", s.Total_q, ", ", s.H, ", ", s.Dv,
              "], got ", grad_out.sizes(), " and ", out.sizes());
  const at::ScalarType acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.device() == q.device(), w, ": lse is on ", lse.device(), " but q is on ",
              q.device());
  TORCH_CHECK(lse.scalar_type() == acc, w, ": lse must be ", acc, " for ", q.scalar_type(),
              " inputs, got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == s.H && lse.size(1) == s.Total_q, w,
              ": lse must be [H,Total_q]=[", s.H, ", ", s.Total_q, "], got ", lse.sizes());
}

}  // namespace hdaf
