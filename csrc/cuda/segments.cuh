// Device helpers shared by the kernels of the segment layout (ragged.cu, evict.cu): segment s = b * Hkv + g
// holds the flat entries offsets[s] .. offsets[s+1] - 1 (contracts in register.cpp).
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace cakekv::cuda {

constexpr int kMaxPerLane = 8;  // head dim up to 32 * 8 = 256

// Calls f(std::integral_constant<int, P>) with P the head dims each lane of a warp holds (D <= 32 * P): the
// row loops of the kernels are then unrolled for the head dim at hand (64, 128, up to 256).
template <typename F>
void with_dims_per_lane(int64_t D, F&& f) {
  if (D <= 64) f(std::integral_constant<int, 2>{});
  else if (D <= 128) f(std::integral_constant<int, 4>{});
  else f(std::integral_constant<int, kMaxPerLane>{});
}

// Last s with offsets[s] <= t (empty segments share a start; the entry belongs to the non-empty one).
__device__ __forceinline__ int64_t segment_of(const int64_t* __restrict__ offsets, int64_t segs, int64_t t) {
  int64_t lo = 0, hi = segs - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= t) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Query row r (of G*Q) of segment (b, g) is query i = r % Q of head h = g * G + r / Q.
__device__ __forceinline__ int64_t query_row_offset(int64_t b, int64_t g, int64_t r, int64_t H, int64_t G,
                                                    int64_t Q, int64_t D) {
  return ((b * H + g * G + r / Q) * Q + r % Q) * D;
}

// One key row in registers, spread over the lanes of a warp (lane holds dims lane, lane + 32, ...): loads
// are coalesced, a warp reads one row.
template <int kPerLane, typename scalar_t>
__device__ __forceinline__ void load_row(const scalar_t* row, int D, int lane, float (&out)[kPerLane]) {
#pragma unroll
  for (int c = 0; c < kPerLane; ++c) {
    const int d = lane + 32 * c;
    out[c] = d < D ? static_cast<float>(row[d]) : 0.f;
  }
}

// q_row · (the row in `kv`), summed over the warp: every lane returns the dot product.
template <int kPerLane>
__device__ __forceinline__ float warp_dot(const float* q_row, const float (&kv)[kPerLane], int D, int lane) {
  float dot = 0.f;
#pragma unroll
  for (int c = 0; c < kPerLane; ++c) {
    const int d = lane + 32 * c;
    if (d < D) dot += q_row[d] * kv[c];
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
  return dot;
}

constexpr int kUnroll = 4;  // entries a warp loads at once in for_warp_entries

// visit(t, p, dot) for each entry t of [lo, hi) this warp takes, p = pos[t], dot[r] = q_s[r] · k[t] for the
// R (<= kRows) rows staged in q_s. A warp loads kUnroll entries (positions and rows) before using any: these
// short loops are bound by load latency, not bandwidth.
template <int kRows, int kPerLane, typename scalar_t, typename Visit>
__device__ __forceinline__ void for_warp_entries(const scalar_t* __restrict__ k, const int64_t* __restrict__ pos,
                                                 int64_t lo, int64_t hi, const float* q_s, int R, int D,
                                                 Visit&& visit) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int64_t t0 = lo + int64_t(warp) * kUnroll; t0 < hi; t0 += int64_t(warps) * kUnroll) {
    int64_t p[kUnroll];
    float kv[kUnroll][kPerLane];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t t = std::min(t0 + u, hi - 1);  // past the end: a repeat, never visited
      p[u] = pos[t];
      load_row<kPerLane>(k + t * D, D, lane, kv[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (t0 + u >= hi) break;
      float dot[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) dot[r] = r < R ? warp_dot<kPerLane>(q_s + r * D, kv[u], D, lane) : 0.f;
      visit(t0 + u, p[u], dot);
    }
  }
}

// Block-wide exclusive prefix sum of one value per thread (blockDim.x a multiple of 32, at most 1024).
// `scratch` is 33 values of shared memory; every thread gets its prefix and the block total. Contains barriers:
// all threads of the block must call it. Two counts can share one scan packed in the halves of a uint64.
template <typename T>
__device__ __forceinline__ T block_exclusive_scan(T value, T* scratch, T& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  T incl = value;
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const T up = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += up;
  }
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const T mine = lane < warps ? scratch[lane] : T(0);
    T w_incl = mine;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const T up = __shfl_up_sync(0xffffffffu, w_incl, off);
      if (lane >= off) w_incl += up;
    }
    if (lane < warps) scratch[lane] = w_incl - mine;
    if (lane == 31) scratch[32] = w_incl;
  }
  __syncthreads();
  const T prefix = scratch[warp] + incl - value;
  total = scratch[32];
  __syncthreads();  // scratch may be reused right away
  return prefix;
}

}  // namespace cakekv::cuda
