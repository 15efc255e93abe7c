// The decode-time eviction score of one entry, shared by the CPU and CUDA kernels of evict_lowest (host/device).
#pragma once
#include <cstdint>

#include "host_device.h"

namespace cakekv {

// Entry t's score from the attention weights [G*Q, T] of its segment's G query heads and Q queries (contract of
// evict_lowest in register.cpp): mean over heads of (mean + w * unbiased variance) over the queries, Welford.
CAKEKV_HD inline float decode_score(const float* weights, int64_t T, int64_t t, int64_t G, int64_t Q,
                                    float var_weight) {
  float score = 0.f;
  for (int64_t j = 0; j < G; ++j) {
    float mean = 0.f, m2 = 0.f;
    for (int64_t i = 0; i < Q; ++i) {
      const float a = weights[(j * Q + i) * T + t], delta = a - mean;
      mean += delta / static_cast<float>(i + 1);
      m2 += delta * (a - mean);
    }
    score += mean + var_weight * (Q > 1 ? m2 / static_cast<float>(Q - 1) : 0.f);
  }
  return score / static_cast<float>(G);
}

}  // namespace cakekv
