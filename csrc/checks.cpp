// Argument checks shared by the CPU and CUDA kernels of every op (contracts in register.cpp).
#include "checks.h"

#include <cmath>

namespace cakekv {

void check_softcap(const char* op, double softcap) {
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, op, ": softcap must be a finite number >= 0 (0 = no "
              "soft-capping), got ", softcap);
}

void check_attention_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_pos,
                          const at::Tensor& k_pos, double softcap) {
  check_softcap(op, softcap);
  TORCH_CHECK(q.dim() == 4, op, ": q must be [B, H, Q, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, op, ": k must be [B, Hkv, N, D], got ", k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), op, ": q and k dtypes differ");
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), op, ": q must be floating point");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), op, ": q ", q.sizes(),
              " and k ", k.sizes(), " disagree on batch or head dim");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": H=", q.size(1),
              " is not a multiple of Hkv=", k.size(1));
  TORCH_CHECK(q_pos.scalar_type() == at::kLong && k_pos.scalar_type() == at::kLong,
              op, ": q_pos and k_pos must be int64");
  TORCH_CHECK(q_pos.dim() == 2 && q_pos.size(0) == q.size(0) && q_pos.size(1) == q.size(2),
              op, ": q_pos must be [B, Q]");
  TORCH_CHECK(k_pos.dim() == 3 && k_pos.size(0) == k.size(0) && k_pos.size(1) == k.size(1) &&
                  k_pos.size(2) == k.size(2),
              op, ": k_pos must be [B, Hkv, N]");
  TORCH_CHECK(q.device() == k.device() && q.device() == q_pos.device() && q.device() == k_pos.device(),
              op, ": all inputs must be on one device");
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

void check_allocate_budgets_values(const at::Tensor& scores, const at::Tensor& caps, const at::Tensor& total) {
  // One host read of three flags (a sync on CUDA: the op runs at prefill, once per layer).
  const auto flags = at::stack({at::isfinite(scores).all(), caps.ge(0).all(), total.ge(0).all()}).cpu();
  const bool* f = flags.data_ptr<bool>();
  TORCH_CHECK(f[0], "allocate_budgets: scores must be finite (NaN or inf found)");
  TORCH_CHECK(f[1], "allocate_budgets: caps must be >= 0");
  TORCH_CHECK(f[2], "allocate_budgets: total must be >= 0");
}

void check_indices_in_range(const char* op, const at::Tensor& idx, int64_t n) {
  if (idx.numel() == 0) return;
  const auto [lo_t, hi_t] = at::aminmax(idx);
  const auto bounds = at::stack({lo_t, hi_t}).cpu();  // a sync on CUDA: prefill-time ops only
  const int64_t lo = bounds[0].item<int64_t>(), hi = bounds[1].item<int64_t>();
  TORCH_CHECK(lo >= 0, op, ": index ", lo, " out of range [0, ", n, ")");
  TORCH_CHECK(hi < n, op, ": index ", hi, " out of range [0, ", n, ")");
}

void check_offsets(const char* op, const at::Tensor& offsets, int64_t total) {
  const int64_t segs = offsets.size(0) - 1;
  const auto ordered = segs == 0 ? at::ones({}, offsets.options())
                                 : offsets.slice(0, 1).ge(offsets.slice(0, 0, segs)).all().to(at::kLong);
  const auto read = at::stack({offsets[0], offsets[segs], ordered}).cpu();  // one sync on CUDA: see checks.h
  const int64_t first = read[0].item<int64_t>(), last = read[1].item<int64_t>();
  TORCH_CHECK(first == 0, op, ": offsets[0] must be 0, got ", first);
  TORCH_CHECK(read[2].item<int64_t>() == 1, op, ": offsets must be non-decreasing");
  TORCH_CHECK(last == total, op, ": offsets[-1] = ", last, " must equal T = ", total);
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
                                 const at::Tensor& pos, const at::Tensor& offsets, const at::Tensor& q_pos,
                                 double softcap) {
  check_softcap("ragged_attention", softcap);
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

namespace {

// The position order of a segmented layer: contiguous int32 [T] (written in place) on pos's device.
void check_order(const char* op, const at::Tensor& order, const at::Tensor& pos) {
  TORCH_CHECK(order.dim() == 1 && order.size(0) == pos.size(0) && order.scalar_type() == at::kInt &&
                  order.is_contiguous(),
              op, ": order must be contiguous int32 [T] (it is written in place), got ", order.scalar_type(), " ",
              order.sizes());
  TORCH_CHECK(order.device() == pos.device(), op, ": all inputs must be on one device");
}

}  // namespace

void check_append_entries_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos,
                               const at::Tensor& offsets, const at::Tensor& new_k, const at::Tensor& new_v,
                               const at::Tensor& q_pos, const std::optional<at::Tensor>& order) {
  TORCH_CHECK(k.dim() == 2 && v.sizes() == k.sizes() && v.scalar_type() == k.scalar_type(),
              "append_entries: k and v must be [T, D] of one dtype, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && pos.is_contiguous(),
              "append_entries: k, v and pos are written in place and must be contiguous");
  TORCH_CHECK(pos.dim() == 1 && pos.size(0) == k.size(0) && pos.scalar_type() == at::kLong,
              "append_entries: pos must be int64 [T]");
  TORCH_CHECK(new_k.dim() == 4 && new_v.sizes() == new_k.sizes() && new_k.size(3) == k.size(1) &&
                  new_k.scalar_type() == k.scalar_type() && new_v.scalar_type() == k.scalar_type(),
              "append_entries: new_k and new_v must be [B, Hkv, Q, D] with k's head dim and dtype, got ",
              new_k.sizes());
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong &&
                  offsets.size(0) == new_k.size(0) * new_k.size(1) + 1,
              "append_entries: offsets must be int64 [B * Hkv + 1]");
  TORCH_CHECK(q_pos.dim() == 2 && q_pos.size(0) == new_k.size(0) && q_pos.size(1) == new_k.size(2) &&
                  q_pos.scalar_type() == at::kLong,
              "append_entries: q_pos must be int64 [B, Q]");
  TORCH_CHECK(k.device() == v.device() && k.device() == pos.device() && k.device() == offsets.device() &&
                  k.device() == new_k.device() && k.device() == new_v.device() && k.device() == q_pos.device(),
              "append_entries: all inputs must be on one device");
  if (order) check_order("append_entries", *order, pos);
}

void check_evict_lowest_args(const at::Tensor& weights, const at::Tensor& pos, const at::Tensor& order,
                             const at::Tensor& offsets, const at::Tensor& q_pos, const at::Tensor& over,
                             int64_t kernel_size, int64_t n_evict) {
  TORCH_CHECK(pos.dim() == 1 && pos.scalar_type() == at::kLong && pos.is_contiguous(),
              "evict_lowest: pos must be contiguous int64 [T] (it is written in place)");
  TORCH_CHECK(q_pos.dim() == 2 && q_pos.size(0) > 0 && q_pos.scalar_type() == at::kLong,
              "evict_lowest: q_pos must be int64 [B, Q] with B > 0");
  const int64_t B = q_pos.size(0), Q = q_pos.size(1);
  TORCH_CHECK(weights.dim() == 2 && weights.size(1) == pos.size(0) && weights.scalar_type() == at::kFloat &&
                  weights.is_contiguous() && (Q == 0 || weights.size(0) % Q == 0),
              "evict_lowest: weights must be contiguous fp32 [G * Q, T] (ragged_attention's weights), got ",
              weights.scalar_type(), " ", weights.sizes(), " for Q=", Q, " and T=", pos.size(0));
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong && offsets.size(0) >= 1,
              "evict_lowest: offsets must be int64 [B * Hkv + 1]");
  const int64_t segs = offsets.size(0) - 1;
  TORCH_CHECK(segs % B == 0 && segs / B > 0, "evict_lowest: offsets has ", segs, " segments, not a positive multiple "
              "of B=", B);
  TORCH_CHECK(over.dim() == 2 && over.size(0) == B && over.size(1) == segs / B && over.scalar_type() == at::kLong &&
                  over.is_contiguous(),
              "evict_lowest: over must be contiguous int64 [B, Hkv] (it is written in place)");
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1, "evict_lowest: kernel_size must be odd and >= 1, got ",
              kernel_size);
  TORCH_CHECK(n_evict >= 0, "evict_lowest: n_evict must be >= 0, got ", n_evict);
  TORCH_CHECK(weights.device() == pos.device() && weights.device() == offsets.device() &&
                  weights.device() == q_pos.device() && weights.device() == over.device(),
              "evict_lowest: all inputs must be on one device");
  check_order("evict_lowest", order, pos);
}

}  // namespace cakekv
