// CPU kernel of attention_max (contract in register.cpp): per (batch, kv head) and query tile, the softmax
// statistics of the tile's rows, then each key chunk's probabilities reduced by max over the rows: a
// [G * kQueryTile, kKeyChunk] block of logits at a time.
#include <torch/library.h>

#include "../checks.h"
#include "logits.h"

namespace cakekv::cpu {

at::Tensor attention_max(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_pos, const at::Tensor& k_pos,
                         double scale, double softcap) {
  check_attention_args("attention_max", q, k, q_pos, k_pos, softcap);
  const int64_t B = q.size(0), H = q.size(1), Q = q.size(2), Hkv = k.size(1), N = k.size(2);
  const int64_t G = H / Hkv;
  auto best = at::zeros({B, Hkv, N}, q.options().dtype(at::kFloat));
  if (B * H * Q * N == 0) return best;
  const auto qf = q.to(at::kFloat);
  // As window_stats: one (batch row, kv head) at a time, the ATen ops parallelise inside.
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < Hkv; ++g) {
      const auto kh = k[b][g];
      const auto kp = k_pos[b][g];
      auto best_g = best[b][g];
      for (int64_t i0 = 0; i0 < Q; i0 += kQueryTile) {
        const int64_t qt = std::min(kQueryTile, Q - i0);
        const auto qg = qf[b].narrow(0, g * G, G).narrow(1, i0, qt).reshape({G * qt, q.size(3)});
        const auto qp = q_pos[b].narrow(0, i0, qt).repeat({G});
        const auto seen = seen_chunks(kp, qp.max().item<int64_t>());
        const auto [row_max, inv_sum] = softmax_rows(qg, kh, qp, kp, seen, scale, softcap);
        at::Tensor visible;
        for (int64_t s = 0; s < N; s += kKeyChunk) {
          const int64_t len = std::min(kKeyChunk, N - s);
          if (!seen[s / kKeyChunk]) continue;
          auto p = chunk_logits(qg, kh.narrow(0, s, len).to(at::kFloat), qp, kp.narrow(0, s, len), scale, softcap,
                                visible);
          p.sub_(row_max.unsqueeze(1)).exp_().mul_(inv_sum.unsqueeze(1)).masked_fill_(visible.logical_not(), 0.f);
          auto best_s = best_g.narrow(0, s, len);
          at::maximum_out(best_s, best_s, std::get<0>(p.max(0)));
        }
      }
    }
  }
  return best;
}

}  // namespace cakekv::cpu

TORCH_LIBRARY_IMPL(cakekv, CPU, m) {
  m.impl("attention_max", &cakekv::cpu::attention_max);
}
