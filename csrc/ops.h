// cakekv operator declarations: each op is declared once here, with its shape contract.
// CPU kernels live in cpu/*.cpp, CUDA kernels in cuda/*.cu, registration in register.cpp.
#pragma once
#include <ATen/ATen.h>
#include <tuple>

namespace cakekv {

// ---------------------------------------------------------------------------------------------
// window_stats — per-key statistics of the attention of a few queries (the observation window)
//
//   q     [B, H, Q, D]    queries after RoPE (fp32 / fp16 / bf16)
//   k     [B, Hkv, N, D]  keys after RoPE, same dtype; H % Hkv == 0 (query head h reads kv head h / (H/Hkv))
//   q_pos [B, Q]          int64 logical position of each query
//   k_pos [B, Hkv, N]     int64 logical position of each key slot; -1 marks an empty slot
//   scale                 softmax scale (1/sqrt(D) for most models)
//
// Key slot j is visible to query i iff 0 <= k_pos[b,g,j] <= q_pos[b,i] (causal, padding and free slots
// all follow from positions). A[b,h,i,:] = softmax over visible keys of scale * q·k, in fp32; invisible
// keys get A = 0. Returns three fp32 tensors of shape [B, H, N]:
//   mean    = mean_i A[b,h,i,j]
//   var     = unbiased variance over i of A[b,h,i,j]   (0 when Q == 1)
//   entropy = sum_i -A[b,h,i,j] * ln(A[b,h,i,j] + 1e-10)
// Kernels stream over keys: only per-query softmax statistics (running max, sum) are kept, never the
// whole [Q, N] block of all heads.
std::tuple<at::Tensor, at::Tensor, at::Tensor> window_stats(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_pos, const at::Tensor& k_pos,
    double scale);

// ---------------------------------------------------------------------------------------------
// allocate_budgets — integer budgets proportional to scores, exact total, capped per entry
//
//   scores [R, L]  float >= 0 (R independent rows, e.g. batch rows; L layers or heads)
//   caps   [R, L]  int64 >= 0, the most each entry can take (e.g. its evictable length)
//   total  [R]     int64 >= 0, what to hand out per row
// Returns int64 [R, L] with 0 <= out <= caps and sum(out[r]) == min(total[r], sum(caps[r])):
//   1. out = floor(total * score / sum(score))        (uniform scores when sum(score) == 0)
//   2. out = min(out, caps)
//   3. while sum(out) < target: the deficit d is split over the e entries still below their cap,
//      d / e each and one more to the first d % e of them in index order, each clipped to its room.
at::Tensor allocate_budgets(const at::Tensor& scores, const at::Tensor& caps, const at::Tensor& total);

// ---------------------------------------------------------------------------------------------
// gather_kept — compact K and V to kept slots in one pass (the evicted rest is freed by the caller
// dropping its reference to the old tensors)
//
//   k, v [B, Hkv, N, D]  same shape and dtype
//   idx  [B, Hkv, M]     int64 slot indices in [0, N)
// Returns (k_out, v_out), each [B, Hkv, M, D]: out[b,g,m,:] = in[b,g,idx[b,g,m],:].
std::tuple<at::Tensor, at::Tensor> gather_kept(const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx);

// ---------------------------------------------------------------------------------------------
// Ragged layout of one layer (per-head budgets): the entries of every (row, kv head) pair are stored
// flat, segment s = b * Hkv + g holding entries offsets[s] .. offsets[s+1] - 1 of [T, D] tensors, so a
// layer takes (sum of kept entries) rows instead of B * Hkv * (longest head). offsets is int64
// [B * Hkv + 1], non-decreasing, offsets[0] = 0, offsets[S] = T. A segment may hold free slots
// (position -1) as room for appends.
//
// gather_ragged — compact K and V of a padded layer into the ragged layout in one pass
//   k, v    [B, Hkv, N, D]  same shape and dtype
//   idx     [T]             int64 slot in [0, N) of each kept entry (entry t of segment s reads slot idx[t]
//                           of (b, g) = (s / Hkv, s % Hkv))
//   offsets [B*Hkv + 1]     int64 segment starts as above
// Returns (k_flat, v_flat), each [T, D]: out[t,:] = in[b, g, idx[t], :] for t in segment s.
std::tuple<at::Tensor, at::Tensor> gather_ragged(const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx,
                                                 const at::Tensor& offsets);

// ragged_attention — attention of the current queries over a ragged layer (GQA at kv-head granularity)
//   q       [B, H, Q, D]    fp32 / fp16 / bf16; H % Hkv == 0 with Hkv = (offsets.size(0) - 1) / B
//   k, v    [T, D]          same dtype as q
//   pos     [T]             int64 logical position of each entry, -1 = free slot
//   offsets [B*Hkv + 1]     int64 segment starts (see above)
//   q_pos   [B, Q]          int64 logical position of each query
//   scale                   softmax scale
// Query head h of row b reads segment b * Hkv + h / (H / Hkv); entry t is visible to query i iff
// 0 <= pos[t] <= q_pos[b, i]. out[b,h,i,:] = softmax over visible entries of scale * q·k, times v, with
// fp32 accumulation, in q's dtype; a query that sees no entry gets zeros.
at::Tensor ragged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos,
                            const at::Tensor& offsets, const at::Tensor& q_pos, double scale);

// ---------------------------------------------------------------------------------------------
// Decode-time ops over a layer seen as segments: segment s = b * Hkv + g (row b, kv head g) holds the
// entries offsets[s] .. offsets[s+1] - 1 of flat k, v [T, D] and pos [T] (-1 = free slot). The ragged
// layout is this; the padded layout [B, Hkv, M, D] is it too, viewed flat with offsets = M * arange(S + 1).
//
// append_entries — write the Q new tokens of every segment into its first Q free slots, in place
//   k, v    [T, D]          (mutated)
//   pos     [T] int64       (mutated: the slots taken get q_pos)
//   offsets [B*Hkv + 1]     int64 segment starts
//   new_k, new_v [B, Hkv, Q, D]  same dtype as k
//   q_pos   [B, Q] int64    position of each new token
// Token i of segment s goes to the i-th free slot of s in slot order. A segment with fewer than Q free
// slots is an error (the caller makes room first): CPU raises, CUDA asserts on the device.
void append_entries(const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos, const at::Tensor& offsets,
                    const at::Tensor& new_k, const at::Tensor& new_v, const at::Tensor& q_pos);

// evict_lowest — decode-time eviction: per segment, free the entries the current queries value least
//   q        [B, H, Q, D]   current queries (after RoPE), same dtype as k; H % Hkv == 0
//   k        [T, D], pos [T] int64 (mutated: evicted entries get -1), offsets [B*Hkv + 1] as above
//   q_pos    [B, Q] int64   positions of the current queries
//   over     [B, Hkv] int64 (mutated) entries each segment holds above its cap; decreases by what is evicted
//   scale, var_weight (w), protect (P), kernel_size (K, odd >= 1), max_pool, n_evict (E >= 0)
// For segment s = (b, g) and its query heads j (h = g * G + j): A[j,i,t] = softmax over visible entries
// (0 <= pos[t] <= q_pos[b,i]) of scale * q·k in fp32; score[t] = mean_j (mean_i A + w * var_i A) (unbiased
// variance over the Q queries, 0 when Q == 1). Candidates: 0 <= pos[t] <= q_pos[b, Q-1] - P, taken in
// position order; pooled = the K-wide average (zero padded, divided by K) or maximum of the candidates'
// scores, centred. The min(E, over[b,g]) candidates with the lowest pooled score (ties: earlier position)
// get pos = -1, and over[b,g] decreases by their number.
void evict_lowest(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos, const at::Tensor& offsets,
                  const at::Tensor& q_pos, const at::Tensor& over, double scale, double var_weight, int64_t protect,
                  int64_t kernel_size, bool max_pool, int64_t n_evict);

// Shape/dtype checks shared by every backend (defined in register.cpp).
// Value checks read the tensors on the host (a sync on CUDA), so only ops that run outside a captured decode
// step use them on CUDA (gather_kept, gather_ragged, allocate_budgets); CPU kernels check before their
// parallel loops (an exception must not leave one). The decode ops trust the segment tables the cache builds.
void check_indices_in_range(const char* op, const at::Tensor& idx, int64_t n);
void check_offsets(const char* op, const at::Tensor& offsets, int64_t total);
void check_window_stats_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_pos,
                             const at::Tensor& k_pos);
void check_allocate_budgets_args(const at::Tensor& scores, const at::Tensor& caps, const at::Tensor& total);
void check_allocate_budgets_values(const at::Tensor& scores, const at::Tensor& caps, const at::Tensor& total);
void check_gather_kept_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx);
void check_gather_ragged_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx,
                              const at::Tensor& offsets);
void check_ragged_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& pos, const at::Tensor& offsets, const at::Tensor& q_pos);
void check_append_entries_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos,
                               const at::Tensor& offsets, const at::Tensor& new_k, const at::Tensor& new_v,
                               const at::Tensor& q_pos);
void check_evict_lowest_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                             const at::Tensor& offsets, const at::Tensor& q_pos, const at::Tensor& over,
                             int64_t kernel_size, int64_t n_evict);

namespace cpu {
std::tuple<at::Tensor, at::Tensor, at::Tensor> window_stats(const at::Tensor&, const at::Tensor&,
                                                            const at::Tensor&, const at::Tensor&, double);
at::Tensor allocate_budgets(const at::Tensor&, const at::Tensor&, const at::Tensor&);
std::tuple<at::Tensor, at::Tensor> gather_kept(const at::Tensor&, const at::Tensor&, const at::Tensor&);
std::tuple<at::Tensor, at::Tensor> gather_ragged(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&);
at::Tensor ragged_attention(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, double);
void append_entries(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, const at::Tensor&);
void evict_lowest(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                  const at::Tensor&, double, double, int64_t, int64_t, bool, int64_t);
}  // namespace cpu

#ifdef CAKEKV_WITH_CUDA
namespace cuda {
std::tuple<at::Tensor, at::Tensor, at::Tensor> window_stats(const at::Tensor&, const at::Tensor&,
                                                            const at::Tensor&, const at::Tensor&, double);
at::Tensor allocate_budgets(const at::Tensor&, const at::Tensor&, const at::Tensor&);
std::tuple<at::Tensor, at::Tensor> gather_kept(const at::Tensor&, const at::Tensor&, const at::Tensor&);
std::tuple<at::Tensor, at::Tensor> gather_ragged(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&);
at::Tensor ragged_attention(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, double);
void append_entries(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, const at::Tensor&);
void evict_lowest(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                  const at::Tensor&, double, double, int64_t, int64_t, bool, int64_t);
}  // namespace cuda
#endif

}  // namespace cakekv
