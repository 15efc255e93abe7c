// Device helpers shared by the kernels of the segment layout (ragged.cu, evict.cu): segment s = b * Hkv + g
// holds the flat entries offsets[s] .. offsets[s+1] - 1 (contracts in register.cpp).
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace cakekv::cuda {

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
// (r, G and Q are small: 32-bit division.)
__device__ __forceinline__ int64_t query_row_offset(int64_t b, int64_t g, int r, int64_t H, int G, int Q,
                                                    int64_t D) {
  return ((b * H + g * G + r / Q) * Q + r % Q) * D;
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
