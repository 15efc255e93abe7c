// Schemas and dispatch registration of every cakekv op (CPU and CUDA kernels; fake kernels are
// registered from Python in cakekv/_ops.py).
#include <torch/library.h>

#include "ops.h"

namespace cakekv {

void check_window_stats_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_pos,
                             const at::Tensor& k_pos) {
  TORCH_CHECK(q.dim() == 4, "window_stats: q must be [B, H, Q, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "window_stats: k must be [B, Hkv, N, D], got ", k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "window_stats: q and k dtypes differ");
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "window_stats: q must be floating point");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), "window_stats: q ", q.sizes(),
              " and k ", k.sizes(), " disagree on batch or head dim");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "window_stats: H=", q.size(1),
              " is not a multiple of Hkv=", k.size(1));
  TORCH_CHECK(q_pos.scalar_type() == at::kLong && k_pos.scalar_type() == at::kLong,
              "window_stats: q_pos and k_pos must be int64");
  TORCH_CHECK(q_pos.dim() == 2 && q_pos.size(0) == q.size(0) && q_pos.size(1) == q.size(2),
              "window_stats: q_pos must be [B, Q]");
  TORCH_CHECK(k_pos.dim() == 3 && k_pos.size(0) == k.size(0) && k_pos.size(1) == k.size(1) &&
                  k_pos.size(2) == k.size(2),
              "window_stats: k_pos must be [B, Hkv, N]");
  TORCH_CHECK(q.device() == k.device() && q.device() == q_pos.device() && q.device() == k_pos.device(),
              "window_stats: all inputs must be on one device");
}

void check_allocate_budgets_args(const at::Tensor& scores, const at::Tensor& caps, const at::Tensor& total) {
  TORCH_CHECK(scores.dim() == 2, "allocate_budgets: scores must be [R, L]");
  TORCH_CHECK(at::isFloatingType(scores.scalar_type()), "allocate_budgets: scores must be floating point");
  TORCH_CHECK(caps.sizes() == scores.sizes() && caps.scalar_type() == at::kLong,
              "allocate_budgets: caps must be int64 with the shape of scores");
  TORCH_CHECK(total.dim() == 1 && total.size(0) == scores.size(0) && total.scalar_type() == at::kLong,
              "allocate_budgets: total must be int64 [R]");
  TORCH_CHECK(scores.device() == caps.device() && scores.device() == total.device(),
              "allocate_budgets: all inputs must be on one device");
}

void check_indices_in_range(const char* op, const int64_t* idx, int64_t count, int64_t n) {
  for (int64_t i = 0; i < count; ++i)
    TORCH_CHECK(idx[i] >= 0 && idx[i] < n, op, ": index ", idx[i], " out of range [0, ", n, ")");
}

void check_gather_kept_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx) {
  TORCH_CHECK(k.dim() == 4, "gather_kept: k must be [B, Hkv, N, D]");
  TORCH_CHECK(v.sizes() == k.sizes() && v.scalar_type() == k.scalar_type(),
              "gather_kept: k and v must have the same shape and dtype");
  TORCH_CHECK(idx.dim() == 3 && idx.size(0) == k.size(0) && idx.size(1) == k.size(1),
              "gather_kept: idx must be [B, Hkv, M]");
  TORCH_CHECK(idx.scalar_type() == at::kLong, "gather_kept: idx must be int64");
  TORCH_CHECK(k.device() == v.device() && k.device() == idx.device(),
              "gather_kept: all inputs must be on one device");
}

void check_gather_ragged_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx,
                              const at::Tensor& offsets) {
  TORCH_CHECK(k.dim() == 4, "gather_ragged: k must be [B, Hkv, N, D]");
  TORCH_CHECK(v.sizes() == k.sizes() && v.scalar_type() == k.scalar_type(),
              "gather_ragged: k and v must have the same shape and dtype");
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong, "gather_ragged: idx must be int64 [T]");
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong &&
                  offsets.size(0) == k.size(0) * k.size(1) + 1,
              "gather_ragged: offsets must be int64 [B * Hkv + 1]");
  TORCH_CHECK(k.device() == v.device() && k.device() == idx.device() && k.device() == offsets.device(),
              "gather_ragged: all inputs must be on one device");
}

void check_ragged_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& pos, const at::Tensor& offsets, const at::Tensor& q_pos) {
  TORCH_CHECK(q.dim() == 4, "ragged_attention: q must be [B, H, Q, D], got ", q.sizes());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "ragged_attention: q must be floating point");
  TORCH_CHECK(k.dim() == 2 && k.size(1) == q.size(3), "ragged_attention: k must be [T, D], got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes() && k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "ragged_attention: k and v must be [T, D] with q's dtype");
  TORCH_CHECK(pos.dim() == 1 && pos.size(0) == k.size(0) && pos.scalar_type() == at::kLong,
              "ragged_attention: pos must be int64 [T]");
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong && offsets.size(0) >= 1,
              "ragged_attention: offsets must be int64 [B * Hkv + 1]");
  const int64_t B = q.size(0), segs = offsets.size(0) - 1;
  TORCH_CHECK(B > 0 && segs % B == 0 && segs / B > 0, "ragged_attention: offsets has ", segs,
              " segments, not a positive multiple of B=", B);
  TORCH_CHECK(q.size(1) % (segs / B) == 0, "ragged_attention: H=", q.size(1), " is not a multiple of Hkv=",
              segs / B);
  TORCH_CHECK(q_pos.dim() == 2 && q_pos.size(0) == B && q_pos.size(1) == q.size(2) &&
                  q_pos.scalar_type() == at::kLong,
              "ragged_attention: q_pos must be int64 [B, Q]");
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device() && q.device() == pos.device() &&
                  q.device() == offsets.device() && q.device() == q_pos.device(),
              "ragged_attention: all inputs must be on one device");
}

}  // namespace cakekv

TORCH_LIBRARY(cakekv, m) {
  m.def("window_stats(Tensor q, Tensor k, Tensor q_pos, Tensor k_pos, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("allocate_budgets(Tensor scores, Tensor caps, Tensor total) -> Tensor");
  m.def("gather_kept(Tensor k, Tensor v, Tensor idx) -> (Tensor, Tensor)");
  m.def("gather_ragged(Tensor k, Tensor v, Tensor idx, Tensor offsets) -> (Tensor, Tensor)");
  m.def("ragged_attention(Tensor q, Tensor k, Tensor v, Tensor pos, Tensor offsets, Tensor q_pos, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(cakekv, CPU, m) {
  m.impl("window_stats", &cakekv::cpu::window_stats);
  m.impl("allocate_budgets", &cakekv::cpu::allocate_budgets);
  m.impl("gather_kept", &cakekv::cpu::gather_kept);
  m.impl("gather_ragged", &cakekv::cpu::gather_ragged);
  m.impl("ragged_attention", &cakekv::cpu::ragged_attention);
}

#ifdef CAKEKV_WITH_CUDA
TORCH_LIBRARY_IMPL(cakekv, CUDA, m) {
  m.impl("window_stats", &cakekv::cuda::window_stats);
  m.impl("allocate_budgets", &cakekv::cuda::allocate_budgets);
  m.impl("gather_kept", &cakekv::cuda::gather_kept);
  m.impl("gather_ragged", &cakekv::cuda::gather_ragged);
  m.impl("ragged_attention", &cakekv::cuda::ragged_attention);
}
#endif
