// The decode-time eviction score of one entry, its pooling and its rank key, shared by the CPU and CUDA kernels
// of evict_lowest (host/device): both backends rank candidates by the same integers, so they free the same ones.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

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

// Candidate i's pooled score from the scores of the n candidates (by rank in the order): the kernel_size-wide
// average (zero padded, divided by kernel_size) or maximum, centred. Both are NaN when a score in reach is NaN
// (as torch's pooling): see eviction_key.
CAKEKV_HD inline float pooled_score(const float* score, int64_t n, int64_t i, int64_t kernel_size, bool max_pool) {
  const int64_t half = kernel_size / 2, first = i > half ? i - half : 0, last = i + half < n ? i + half : n - 1;
  float acc = max_pool ? -INFINITY : 0.f;
  for (int64_t x = first; x <= last; ++x) {
    const float s = score[x];
    acc = max_pool ? (s > acc || s != s ? s : acc) : acc + s;  // a NaN acc stays: nothing compares above it
  }
  return max_pool ? acc : acc / static_cast<float>(kernel_size);
}

// The rank key of a pooled score: unsigned ints in the order of the floats (-0 ties with +0), lowest first, and
// NaN below every number. A NaN score comes from non-finite keys or queries: such an entry poisons the attention
// of every query that sees it, so it and the candidates pooled with it are evicted first, the earliest position
// first (as among equal scores), rather than kept forever.
CAKEKV_HD inline uint32_t eviction_key(float pooled) {
  if (pooled != pooled) return 0u;  // every number maps above 0x007FFFFF (the key of -inf)
  if (pooled == 0.f) pooled = 0.f;
#ifdef __CUDA_ARCH__
  const uint32_t u = __float_as_uint(pooled);
#else
  uint32_t u;
  std::memcpy(&u, &pooled, sizeof u);
#endif
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

}  // namespace cakekv
