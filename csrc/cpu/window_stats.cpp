// CPU kernel of window_stats (contract in register.cpp): per (batch, kv head), two streaming passes over
// key chunks — softmax statistics first, then the per-key column statistics.
#include <limits>

#include <torch/library.h>

#include "../checks.h"

namespace cakekv::cpu {

namespace {
constexpr int64_t kKeyChunk = 4096;

// Scaled logits of one head's queries over one key chunk, with invisible keys set to -inf.
at::Tensor chunk_logits(const at::Tensor& qh, const at::Tensor& kc, const at::Tensor& qp, const at::Tensor& kpc,
                        double scale, at::Tensor& visible) {
  visible = kpc.unsqueeze(0).ge(0).logical_and(kpc.unsqueeze(0).le(qp.unsqueeze(1)));
  auto logits = at::matmul(qh, kc.t()).mul_(scale);
  return logits.masked_fill_(visible.logical_not(), -std::numeric_limits<float>::infinity());
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_stats(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& q_pos, const at::Tensor& k_pos,
                                                            double scale) {
  check_window_stats_args(q, k, q_pos, k_pos);
  const int64_t B = q.size(0), H = q.size(1), Q = q.size(2), Hkv = k.size(1), N = k.size(2);
  const int64_t G = H / Hkv;
  auto opts = q.options().dtype(at::kFloat);
  auto mean = at::zeros({B, H, N}, opts), var = at::zeros({B, H, N}, opts), ent = at::zeros({B, H, N}, opts);
  if (B * H * Q * N == 0) return {mean, var, ent};
  const auto qf = q.to(at::kFloat);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  // One (batch row, kv head) at a time with all its G*Q queries in each matrix product: the ATen ops
  // parallelise inside (a parallel loop around them would nest thread pools and oversubscribe).
  for (int64_t b = 0; b < B; ++b) {
    const auto qp = q_pos[b].repeat({G});  // [G*Q], query-major within each head
    for (int64_t g = 0; g < Hkv; ++g) {
      const auto qg = qf[b].narrow(0, g * G, G).reshape({G * Q, q.size(3)});
      const auto kh = k[b][g];
      const auto kp = k_pos[b][g];
      // Pass 1: running max and sum of exponentials per query.
      auto row_max = at::full({G * Q}, neg_inf, opts);
      auto row_sum = at::zeros({G * Q}, opts);
      at::Tensor visible;
      for (int64_t s = 0; s < N; s += kKeyChunk) {
        const int64_t len = std::min(kKeyChunk, N - s);
        auto logits = chunk_logits(qg, kh.narrow(0, s, len).to(at::kFloat), qp, kp.narrow(0, s, len), scale, visible);
        auto new_max = at::maximum(row_max, std::get<0>(logits.max(1)));
        auto safe_max = at::where(new_max.isinf(), at::zeros_like(new_max), new_max);
        row_sum = row_sum * at::exp(row_max - safe_max) + at::exp(logits - safe_max.unsqueeze(1)).sum(1);
        row_max = new_max;
      }
      const auto safe_max = at::where(row_max.isinf(), at::zeros_like(row_max), row_max);
      const auto inv_sum = at::where(row_sum.gt(0), row_sum.reciprocal(), at::zeros_like(row_sum));
      // Pass 2: normalised probabilities of each chunk, reduced over the Q queries of each head.
      for (int64_t s = 0; s < N; s += kKeyChunk) {
        const int64_t len = std::min(kKeyChunk, N - s);
        auto logits = chunk_logits(qg, kh.narrow(0, s, len).to(at::kFloat), qp, kp.narrow(0, s, len), scale, visible);
        auto p = at::exp(logits - safe_max.unsqueeze(1)).mul_(inv_sum.unsqueeze(1));
        p.masked_fill_(visible.logical_not(), 0.f);
        p = p.view({G, Q, len});
        mean[b].narrow(0, g * G, G).narrow(1, s, len).copy_(p.mean(1));
        if (Q > 1) var[b].narrow(0, g * G, G).narrow(1, s, len).copy_(p.var(1, /*unbiased=*/true));
        ent[b].narrow(0, g * G, G).narrow(1, s, len).copy_(p.mul(at::log(p + 1e-10)).sum(1).neg_());
      }
    }
  }
  return {mean, var, ent};
}

}  // namespace cakekv::cpu

TORCH_LIBRARY_IMPL(cakekv, CPU, m) {
  m.impl("window_stats", &cakekv::cpu::window_stats);
}
