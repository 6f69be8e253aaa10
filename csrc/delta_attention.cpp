// The schemas of the hdaf ops, defined here once for every backend. The CPU kernels
// are in csrc/cpu, the CUDA kernels in csrc/cuda (registered per dispatch key);
// the Python side (hdaf/ops.py) adds the fake implementations and autograd.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "hdaf/delta_attention_checks.h"
#include "hdaf/delta_common.h"

extern "C" {
// Importing hdaf._C runs the static registrations below; it defines no Python API.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace hdaf {
namespace {

// Test hooks for the shared __host__ __device__ header (tests/test_common_header.py):
// the bucket and band predicate for every (i, j), and the online softmax run over
// key blocks of a given width, exactly as the kernels use them.
std::tuple<at::Tensor, at::Tensor> common_buckets(int64_t T, int64_t L, int64_t U,
                                                  int64_t window_left, int64_t window_right) {
  TORCH_CHECK(T >= 1, "T must be >= 1, got ", T);
  auto r = at::empty({T, T}, at::kLong);
  auto vis = at::empty({T, T}, at::kBool);
  auto* rp = r.data_ptr<int64_t>();
  auto* vp = vis.data_ptr<bool>();
  const Band band = make_band(T, window_left, window_right);
  for (int64_t i = 0; i < T; ++i) {
    for (int64_t j = 0; j < T; ++j) {
      rp[i * T + j] = bucket(i, j, L, U);
      vp[i * T + j] = in_band(i, j, band);
    }
  }
  return {r, vis};
}

// Key range [begin, end) the kernels iterate for each query block of width `block`.
at::Tensor common_band_ranges(int64_t T, int64_t block, int64_t window_left, int64_t window_right) {
  TORCH_CHECK(T >= 1 && block >= 1, "T and block must be >= 1, got ", T, " and ", block);
  const int64_t nb = (T + block - 1) / block;
  auto out = at::empty({nb, 4}, at::kLong);
  auto* p = out.data_ptr<int64_t>();
  const Band band = make_band(T, window_left, window_right);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t i0 = b * block, i1 = std::min(T, i0 + block);
    p[b * 4 + 0] = band_key_begin(i0, band);
    p[b * 4 + 1] = band_key_end(i1, T, band);
    p[b * 4 + 2] = band_query_begin(i0, band);  // rows as keys: queries that see them
    p[b * 4 + 3] = band_query_end(i1, T, band);
  }
  return out;
}

// Row-wise log-sum-exp of `scores` [N, T] over entries where `visible` is true,
// computed block by block with the online-softmax state (-inf for empty rows).
at::Tensor common_online_lse(const at::Tensor& scores, const at::Tensor& visible, int64_t block) {
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == at::kDouble,
              "scores must be 2-D float64, got ", scores.sizes(), " ", scores.scalar_type());
  TORCH_CHECK(visible.sizes() == scores.sizes() && visible.scalar_type() == at::kBool,
              "visible must be bool with scores' shape ", scores.sizes());
  TORCH_CHECK(block >= 1, "block must be >= 1, got ", block);
  auto s = scores.contiguous();
  auto vis = visible.contiguous();
  const int64_t N = s.size(0), T = s.size(1);
  auto out = at::empty({N}, at::kDouble);
  for (int64_t n = 0; n < N; ++n) {
    const double* row = s.data_ptr<double>() + n * T;
    const bool* vrow = vis.data_ptr<bool>() + n * T;
    SoftmaxState<double> st = softmax_init<double>();
    for (int64_t j0 = 0; j0 < T; j0 += block) {
      const int64_t j1 = std::min(T, j0 + block);
      double bmax = -std::numeric_limits<double>::infinity();
      for (int64_t j = j0; j < j1; ++j) bmax = vrow[j] && row[j] > bmax ? row[j] : bmax;
      softmax_rescale(st, bmax);
      for (int64_t j = j0; j < j1; ++j) st.l += vrow[j] ? std::exp(row[j] - st.m) : 0.0;
    }
    out.data_ptr<double>()[n] = softmax_lse(st);
  }
  return out;
}

// Test hook for the argument checks (tests/test_delta_attention.py): runs the very checks the
// CPU or the CUDA op runs first (`device` "cpu" or "cuda"), on tensors of any device, and
// returns [B, H, Hp, Tq, Dk, Dv, R, Hkv, Tk]. So the CUDA limits are tested where there is no GPU.
std::vector<int64_t> check_forward_args_hook(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, const at::Tensor& P,
                                             const std::optional<at::Tensor>& key_padding_mask,
                                             int64_t L, int64_t U, int64_t window_left,
                                             int64_t window_right, double scale,
                                             c10::string_view device) {
  TORCH_CHECK(device == "cpu" || device == "cuda", "device must be 'cpu' or 'cuda', got '",
              device, "'");
  const DeltaSizes s = check_forward_args(device == "cuda" ? OpDevice::CUDA : OpDevice::CPU, q, k,
                                          v, P, key_padding_mask, L, U, window_left, window_right,
                                          scale);
  return {s.B, s.H, s.Hp, s.T, s.Dk, s.Dv, s.R, s.Hkv, s.Tk};
}

// The same for the varlen ops (tests/test_gqa_varlen.py): returns
// [B, H, Hkv, Hp, Total_q, Total_k, Dk, Dv, R].
std::vector<int64_t> check_varlen_args_hook(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v, const at::Tensor& P,
                                            const at::Tensor& cu_seqlens_q,
                                            const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                            int64_t max_seqlen_k, int64_t L, int64_t U,
                                            int64_t window_left, int64_t window_right,
                                            double scale, c10::string_view device) {
  TORCH_CHECK(device == "cpu" || device == "cuda", "device must be 'cpu' or 'cuda', got '",
              device, "'");
  const VarlenSizes s =
      check_varlen_args(device == "cuda" ? OpDevice::CUDA : OpDevice::CPU, q, k, v, P,
                        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, L, U, window_left,
                        window_right, scale);
  return {s.B, s.H, s.Hkv, s.Hp, s.Total_q, s.Total_k, s.Dk, s.Dv, s.R};
}

// The hand-written CUDA kernels take no global positions: the block ops refuse CUDA tensors
// with the error of the shared checks (registered here, so csrc/cuda needs no change).
std::tuple<at::Tensor, at::Tensor> block_forward_refused(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& P_q,
    const at::Tensor& P_k, const std::optional<at::Tensor>& mask, int64_t, int64_t, int64_t L,
    int64_t U, int64_t wl, int64_t wr, double scale) {
  check_block_args(OpDevice::CUDA, q, k, v, P_q, P_k, mask, L, U, wl, wr, scale);
  TORCH_INTERNAL_ASSERT(false, "check_block_args accepted CUDA");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_backward_refused(
    const at::Tensor&, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& P_q, const at::Tensor& P_k, const std::optional<at::Tensor>& mask,
    const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t L, int64_t U, int64_t wl,
    int64_t wr, double scale) {
  check_block_args(OpDevice::CUDA, q, k, v, P_q, P_k, mask, L, U, wl, wr, scale);
  TORCH_INTERNAL_ASSERT(false, "check_block_args accepted CUDA");
}

}  // namespace

TORCH_LIBRARY_IMPL(hdaf, CUDA, m) {
  m.impl("delta_attention_block_forward", &block_forward_refused);
  m.impl("delta_attention_block_backward", &block_backward_refused);
}

TORCH_LIBRARY(hdaf, m) {
  m.def(
      "delta_attention_forward(Tensor q, Tensor k, Tensor v, Tensor P, Tensor? key_padding_mask, "
      "int L, int U, int window_left, int window_right, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "delta_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor P, "
      "Tensor? key_padding_mask, Tensor out, Tensor lse, int L, int U, int window_left, "
      "int window_right, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, "
      "Tensor grad_P)");
  m.def(
      "delta_attention_varlen_forward(Tensor q, Tensor k, Tensor v, Tensor P, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, int L, "
      "int U, int window_left, int window_right, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "delta_attention_varlen_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor P, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
      "Tensor out, Tensor lse, int L, int U, int window_left, int window_right, float scale) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_P)");
  // A block of queries and a block of keys at global positions (query i at q_start + i, key j at
  // k_start + j): a step of context-parallel attention (hdaf.distributed). P_q holds the queries'
  // own rows of P, P_k the keys' rows; the backward takes the out and lse merged over all key
  // blocks and returns the gradients of both.
  m.def(
      "delta_attention_block_forward(Tensor q, Tensor k, Tensor v, Tensor P_q, Tensor P_k, "
      "Tensor? key_padding_mask, int q_start, int k_start, int L, int U, int window_left, "
      "int window_right, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "delta_attention_block_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
      "Tensor P_q, Tensor P_k, Tensor? key_padding_mask, Tensor out, Tensor lse, int q_start, "
      "int k_start, int L, int U, int window_left, int window_right, float scale) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_P_q, Tensor grad_P_k)");
  m.def("_common_buckets(int T, int L, int U, int window_left, int window_right) -> (Tensor, Tensor)",
        &common_buckets);
  m.def("_common_band_ranges(int T, int block, int window_left, int window_right) -> Tensor",
        &common_band_ranges);
  m.def("_common_online_lse(Tensor scores, Tensor visible, int block) -> Tensor",
        &common_online_lse);
  m.def("_check_forward_args(Tensor q, Tensor k, Tensor v, Tensor P, Tensor? key_padding_mask, "
        "int L, int U, int window_left, int window_right, float scale, str device) -> int[]",
        &check_forward_args_hook);
  m.def("_check_varlen_args(Tensor q, Tensor k, Tensor v, Tensor P, Tensor cu_seqlens_q, "
        "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, int L, int U, "
        "int window_left, int window_right, float scale, str device) -> int[]",
        &check_varlen_args_hook);
}

}  // namespace hdaf
