// The argument checks of the hdaf ops (declared in csrc/include/hdaf/delta_attention_checks.h),
// compiled once by the host C++ compiler and called by both the CPU and the CUDA op, and by the
// test hook hdaf::_check_forward_args (tests/test_delta_attention.py), so the rejection of a
// CUDA-only limit is tested on machines without a GPU through this very code.
#include "hdaf/delta_attention_checks.h"

#include <c10/util/Exception.h>

#include <cmath>

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

}  // namespace

DeltaSizes check_forward_args(OpDevice dev, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& P,
                              const std::optional<at::Tensor>& key_padding_mask, int64_t L,
                              int64_t U, int64_t window_left, int64_t window_right,
                              double scale) {
  const char* w = who(dev);
  TORCH_CHECK(q.dim() == 4, w, ": q must be 4-D [B,H,T,Dk], got shape ", q.sizes());
  TORCH_CHECK(supported_dtype(q.scalar_type()), w,
              ": q must be float16, bfloat16, float32 or float64, got ", q.scalar_type());
  check_like_q(w, "k", k, q);
  check_like_q(w, "v", v, q);
  check_like_q(w, "P", P, q);
  TORCH_CHECK(k.sizes() == q.sizes(), w, ": k must have q's shape ", q.sizes(), ", got ",
              k.sizes());
  TORCH_CHECK(v.dim() == 4 && v.sizes().slice(0, 3) == q.sizes().slice(0, 3), w,
              ": v must be [B,H,T,Dv] with [B,H,T]=", q.sizes().slice(0, 3), ", got ", v.sizes());
  DeltaSizes s;
  s.B = q.size(0);
  s.H = q.size(1);
  s.T = q.size(2);
  s.Dk = q.size(3);
  s.Dv = v.size(3);
  const int64_t limit = max_head_dim(dev);
  TORCH_CHECK(limit <= 0 || (s.Dk <= limit && s.Dv <= limit), w, ": head dims up to ", limit,
              " are supported, got Dk=", s.Dk, " and Dv=", s.Dv,
              " (the 'cpu' and 'gather' backends take any head dim)");
  TORCH_CHECK(L >= 0 && U >= 0, w, ": L and U must be >= 0, got L=", L, ", U=", U);
  TORCH_CHECK(P.dim() == 4 && P.size(0) == s.B && (P.size(1) == 1 || P.size(1) == s.H) &&
                  P.size(2) == s.T,
              w, ": P must be [B,Hp,T,R] with B=", s.B, ", Hp in {1, ", s.H, "}, T=", s.T,
              ", got ", P.sizes());
  TORCH_CHECK(P.size(3) == L + U + 1, w, ": P has R=", P.size(3), " buckets but L=", L,
              ", U=", U, " need R = L+U+1 = ", L + U + 1);
  s.Hp = P.size(1);
  s.R = P.size(3);
  TORCH_CHECK(window_left >= -1 && window_right >= -1, w,
              ": window_left/window_right must be >= -1 (-1: unbounded), got ", window_left, ", ",
              window_right);
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, w,
                ": key_padding_mask must be bool (True marks padding), got ", m.scalar_type());
    TORCH_CHECK(m.device() == q.device(), w, ": key_padding_mask is on ", m.device(),
                " but q is on ", q.device());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == s.B && m.size(1) == s.T, w,
                ": key_padding_mask must be [B,T]=[", s.B, ", ", s.T, "], got ", m.sizes());
  }
  TORCH_CHECK(std::isfinite(scale), w, ": scale must be finite, got ", scale);
  return s;
}

void check_backward_args(OpDevice dev, const DeltaSizes& s, const at::Tensor& q,
                         const at::Tensor& grad_out, const at::Tensor& out,
                         const at::Tensor& lse) {
  const char* w = who(dev);
  check_like_q(w, "grad_out", grad_out, q);
  check_like_q(w, "out", out, q);
  auto like_v = [&](const at::Tensor& t) {
    return t.dim() == 4 && t.size(0) == s.B && t.size(1) == s.H && t.size(2) == s.T &&
           t.size(3) == s.Dv;
  };
  TORCH_CHECK(like_v(grad_out) && like_v(out), w, ": grad_out and out must be [B,H,T,Dv]=[", s.B, ", ", s.H, ", ", s.T,
              ", ", s.Dv, "], got ", grad_out.sizes(), " and ", out.sizes());
  const at::ScalarType acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.device() == q.device(), w, ": lse is on ", lse.device(), " but q is on ",
              q.device());
  TORCH_CHECK(lse.scalar_type() == acc, w, ": lse must be ", acc, " for ", q.scalar_type(),
              " inputs, got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == s.B && lse.size(1) == s.H && lse.size(2) == s.T, w,
              ": lse must be [B,H,T]=[", s.B, ", ", s.H, ", ", s.T, "], got ", lse.sizes());
}

}  // namespace hdaf
