// Attention logits and softmax statistics shared by the CPU kernels (window_stats, attention_max): the softmax
// scale, then the logit soft-capping of Gemma 2 when asked (softcap > 0), in the order of transformers' eager
// attention; key chunks streamed so that no [Q, N] block is held.
#pragma once
#include <ATen/ATen.h>

#include <limits>
#include <vector>

namespace cakekv::cpu {

constexpr int64_t kKeyChunk = 1024;
constexpr int64_t kQueryTile = 256;

inline at::Tensor& logits_from_dots_(at::Tensor& dots, double scale, double softcap) {
  dots.mul_(scale);
  if (softcap > 0.0) dots.div_(softcap).tanh_().mul_(softcap);
  return dots;
}

// Logits [rows, len] of one head group's query rows `qh` (positions `qp` [rows]) over one key chunk `kc`
// (positions `kpc` [len]), invisible keys at -inf; `visible` receives the visibility.
inline at::Tensor chunk_logits(const at::Tensor& qh, const at::Tensor& kc, const at::Tensor& qp,
                               const at::Tensor& kpc, double scale, double softcap, at::Tensor& visible) {
  visible = kpc.unsqueeze(0).ge(0).logical_and(kpc.unsqueeze(0).le(qp.unsqueeze(1)));
  auto logits = at::matmul(qh, kc.t());
  return logits_from_dots_(logits, scale, softcap)
      .masked_fill_(visible.logical_not(), -std::numeric_limits<float>::infinity());
}

// Which key chunks of `kp` [N] some query at or before `last_query` sees (the others are skipped).
inline std::vector<bool> seen_chunks(const at::Tensor& kp, int64_t last_query) {
  std::vector<bool> seen;
  const int64_t N = kp.size(0);
  for (int64_t s = 0; s < N; s += kKeyChunk) {
    const auto kpc = kp.narrow(0, s, std::min(kKeyChunk, N - s));
    seen.push_back(kpc.ge(0).logical_and(kpc.le(last_query)).any().item<bool>());
  }
  return seen;
}

// Softmax statistics of rows `qg` [rows, D] (fp32) over keys `kh` [N, D]: (row max, 1 / row sum of exp), both
// 0 for a row that sees no key, so that its probabilities come out 0. One streaming pass over the key chunks.
inline std::pair<at::Tensor, at::Tensor> softmax_rows(const at::Tensor& qg, const at::Tensor& kh,
                                                      const at::Tensor& qp, const at::Tensor& kp,
                                                      const std::vector<bool>& seen, double scale,
                                                      double softcap) {
  const auto opts = qg.options();
  auto row_max = at::full({qg.size(0)}, -std::numeric_limits<float>::infinity(), opts);
  auto row_sum = at::zeros({qg.size(0)}, opts);
  at::Tensor visible;
  const int64_t N = kh.size(0);
  for (int64_t s = 0; s < N; s += kKeyChunk) {
    const int64_t len = std::min(kKeyChunk, N - s);
    if (!seen[s / kKeyChunk]) continue;
    auto logits = chunk_logits(qg, kh.narrow(0, s, len).to(at::kFloat), qp, kp.narrow(0, s, len), scale, softcap,
                               visible);
    auto new_max = at::maximum(row_max, std::get<0>(logits.max(1)));
    auto safe_max = at::where(new_max.isinf(), at::zeros_like(new_max), new_max);
    row_sum = row_sum * at::exp(row_max - safe_max) + at::exp(logits - safe_max.unsqueeze(1)).sum(1);
    row_max = new_max;
  }
  const auto safe_max = at::where(row_max.isinf(), at::zeros_like(row_max), row_max);
  const auto inv_sum = at::where(row_sum.gt(0), row_sum.reciprocal(), at::zeros_like(row_sum));
  return {safe_max, inv_sum};
}

}  // namespace cakekv::cpu
