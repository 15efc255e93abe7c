// Loading rows of a head (a query, key or value) in kVec-element slices as fp32, shared by the kernels of the
// segment layout (ragged.cu, evict.cu).
#pragma once
#include <cstdint>

namespace cakekv::cuda {

constexpr int kMaxHeadDim = 256;

// The kVec elements of `row` from `first` (zeros past D). With `vector` (rows 16-byte aligned, D a multiple of
// kVec) that is one or two 16-byte loads. In ragged_attention a lane group of kLanes lanes holds one row: lane l
// the slice from l * kVec.
template <int kVec, typename scalar_t>
__device__ __forceinline__ void load_slice(const scalar_t* __restrict__ row, int first, int D, bool vector,
                                           float (&out)[kVec]) {
  static_assert(kVec * sizeof(scalar_t) % 16 == 0, "a slice is whole 16-byte words");
  if (vector) {
    if (first < D) {
      constexpr int kWords = kVec * sizeof(scalar_t) / 16;
      uint4 words[kWords];
#pragma unroll
      for (int i = 0; i < kWords; ++i) words[i] = reinterpret_cast<const uint4*>(row + first)[i];
      const scalar_t* e = reinterpret_cast<const scalar_t*>(words);
#pragma unroll
      for (int c = 0; c < kVec; ++c) out[c] = static_cast<float>(e[c]);
    } else {
#pragma unroll
      for (int c = 0; c < kVec; ++c) out[c] = 0.f;
    }
  } else {
#pragma unroll
    for (int c = 0; c < kVec; ++c) out[c] = first + c < D ? static_cast<float>(row[first + c]) : 0.f;
  }
}

}  // namespace cakekv::cuda
