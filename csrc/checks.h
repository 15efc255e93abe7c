// Argument checks shared by the CPU and CUDA kernels (defined in checks.cpp; contracts in register.cpp).
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace cakekv {

// Value checks read the tensors on the host (a sync on CUDA), so only ops that run outside a captured decode
// step use them on CUDA (gather_kept, gather_ragged, allocate_budgets); CPU kernels check before their
// parallel loops (an exception must not leave one). The decode ops trust the segment tables the cache builds.
void check_indices_in_range(const char* op, const at::Tensor& idx, int64_t n);
void check_offsets(const char* op, const at::Tensor& offsets, int64_t total);
// Queries [B, H, Q, D] against keys [B, Hkv, N, D] with positions (window_stats, attention_max).
void check_attention_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_pos,
                          const at::Tensor& k_pos, double softcap);
void check_softcap(const char* op, double softcap);
void check_allocate_budgets_args(const at::Tensor& scores, const at::Tensor& caps, const at::Tensor& total);
void check_allocate_budgets_values(const at::Tensor& scores, const at::Tensor& caps, const at::Tensor& total);
void check_gather_kept_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx);
void check_gather_ragged_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx,
                              const at::Tensor& offsets);
void check_ragged_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& pos, const at::Tensor& offsets, const at::Tensor& q_pos,
                                 double softcap);
void check_append_entries_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos,
                               const at::Tensor& offsets, const at::Tensor& new_k, const at::Tensor& new_v,
                               const at::Tensor& q_pos, const std::optional<at::Tensor>& order);
void check_evict_lowest_args(const at::Tensor& weights, const at::Tensor& pos, const at::Tensor& order,
                             const at::Tensor& offsets, const at::Tensor& q_pos, const at::Tensor& over,
                             int64_t kernel_size, int64_t n_evict);

}  // namespace cakekv
