// CPU kernel of window_stats (contract in register.cpp): per (batch, kv head), two streaming passes over
// key chunks — softmax statistics first, then the per-key column statistics.
#include <torch/library.h>

#include "../checks.h"
#include "logits.h"

namespace cakekv::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_stats(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& q_pos, const at::Tensor& k_pos,
                                                            double scale, double softcap) {
  check_attention_args("window_stats", q, k, q_pos, k_pos, softcap);
  const int64_t B = q.size(0), H = q.size(1), Q = q.size(2), Hkv = k.size(1), N = k.size(2);
  const int64_t G = H / Hkv;
  auto opts = q.options().dtype(at::kFloat);
  auto mean = at::zeros({B, H, N}, opts), var = at::zeros({B, H, N}, opts), ent = at::zeros({B, H, N}, opts);
  if (B * H * Q * N == 0) return {mean, var, ent};
  const auto qf = q.to(at::kFloat);

  // One (batch row, kv head) at a time with its G heads' queries in each matrix product: the ATen ops
  // parallelise inside (a parallel loop around them would nest thread pools and oversubscribe). Queries go
  // in tiles of kQueryTile per head, so a key chunk's logits stay [G * kQueryTile, kKeyChunk] however many
  // queries there are (H2O passes the whole prompt); the tiles' per-key mean and variance are merged
  // exactly (Chan et al.'s pairwise update), a single tile keeps torch's own unbiased variance.
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < Hkv; ++g) {
      const auto kh = k[b][g];
      const auto kp = k_pos[b][g];
      auto mean_g = mean[b].narrow(0, g * G, G), var_g = var[b].narrow(0, g * G, G), ent_g = ent[b].narrow(0, g * G, G);
      auto m2_g = at::zeros_like(var_g);  // sum of squared deviations, while merging tiles
      for (int64_t i0 = 0; i0 < Q; i0 += kQueryTile) {
        const int64_t qt = std::min(kQueryTile, Q - i0), done = i0;
        const auto qg = qf[b].narrow(0, g * G, G).narrow(1, i0, qt).reshape({G * qt, q.size(3)});
        const auto qp = q_pos[b].narrow(0, i0, qt).repeat({G});  // [G*qt], query-major within each head
        // Key chunks no query of the tile sees (all empty or after the tile's last query) are skipped.
        const auto seen_chunk = seen_chunks(kp, qp.max().item<int64_t>());
        // Pass 1: row max and sum of exponentials per query.
        const auto [safe_max, inv_sum] = softmax_rows(qg, kh, qp, kp, seen_chunk, scale, softcap);
        at::Tensor visible;
        // Pass 2: normalised probabilities of each chunk, reduced over the tile's queries of each head.
        for (int64_t s = 0; s < N; s += kKeyChunk) {
          const int64_t len = std::min(kKeyChunk, N - s);
          auto mean_s = mean_g.narrow(1, s, len), var_s = var_g.narrow(1, s, len), m2_s = m2_g.narrow(1, s, len);
          const double w = double(qt) / double(done + qt);
          if (!seen_chunk[s / kKeyChunk]) {  // probabilities all 0: merge a tile of zeros
            if (qt == Q) continue;
            m2_s.add_(mean_s.square() * (double(done) * w));
            mean_s.mul_(1.0 - w);
            if (i0 + qt == Q) var_s.copy_(m2_s / double(Q - 1));
            continue;
          }
          auto logits = chunk_logits(qg, kh.narrow(0, s, len).to(at::kFloat), qp, kp.narrow(0, s, len), scale, softcap,
                                     visible);
          auto p = at::exp(logits - safe_max.unsqueeze(1)).mul_(inv_sum.unsqueeze(1));
          p.masked_fill_(visible.logical_not(), 0.f);
          p = p.view({G, qt, len});
          auto tile_mean = p.mean(1);
          ent_g.narrow(1, s, len).add_(p.mul(at::log(p + 1e-10)).sum(1).neg_());
          if (qt == Q) {  // one tile: the plain statistics
            mean_s.copy_(tile_mean);
            if (Q > 1) var_s.copy_(p.var(1, /*unbiased=*/true));
            continue;
          }
          const auto tile_m2 = (p - tile_mean.unsqueeze(1)).square_().sum(1);
          const auto delta = tile_mean - mean_s;
          mean_s.add_(delta * w);
          m2_s.add_(tile_m2 + delta.square() * (double(done) * w));
          if (i0 + qt == Q) var_s.copy_(m2_s / double(Q - 1));
        }
      }
    }
  }
  return {mean, var, ent};
}

}  // namespace cakekv::cpu

TORCH_LIBRARY_IMPL(cakekv, CPU, m) {
  m.impl("window_stats", &cakekv::cpu::window_stats);
}
