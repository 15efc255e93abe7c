// The budget-allocation algorithm of one row, shared by the CPU and CUDA kernels (host/device).
#pragma once
#include <cstdint>

#include "host_device.h"

namespace cakekv {

// See allocate_budgets in register.cpp for the contract.
CAKEKV_HD inline void allocate_row(const double* score, const int64_t* cap, int64_t total, int64_t L, int64_t* out) {
  double sum = 0.0;
  int64_t cap_sum = 0;
  for (int64_t i = 0; i < L; ++i) {
    sum += score[i] > 0.0 ? score[i] : 0.0;
    cap_sum += cap[i] > 0 ? cap[i] : 0;
  }
  const int64_t target = total < cap_sum ? total : cap_sum;
  int64_t given = 0;
  for (int64_t i = 0; i < L; ++i) {
    const double share = sum > 0.0 ? (score[i] > 0.0 ? score[i] : 0.0) / sum : 1.0 / (double)L;
    int64_t b = (int64_t)(share * (double)total);
    const int64_t c = cap[i] > 0 ? cap[i] : 0;
    b = b < 0 ? 0 : (b > c ? c : b);
    out[i] = b;
    given += b;
  }
  while (given < target) {
    int64_t eligible = 0;
    for (int64_t i = 0; i < L; ++i) eligible += out[i] < cap[i];
    const int64_t deficit = target - given;
    const int64_t each = deficit / eligible, extra = deficit % eligible;
    int64_t rank = 0;
    for (int64_t i = 0; i < L; ++i) {
      if (out[i] >= cap[i]) continue;
      int64_t add = each + (rank < extra ? 1 : 0);
      const int64_t room = cap[i] - out[i];
      add = add < room ? add : room;
      out[i] += add;
      given += add;
      ++rank;
    }
  }
}

}  // namespace cakekv
