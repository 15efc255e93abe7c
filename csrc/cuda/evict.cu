// evict_lowest (CUDA, contract in register.cpp): decode-time eviction in one kernel that never syncs with the
// host, so a decode step that evicts can be captured as a CUDA graph. The attention weights come from the step's
// ragged_attention (return_weights): keys are not read again.
//
// One block per segment. Candidates are a prefix of the segment's position order (`order`, kept exact by
// append_entries and by this op): each candidate's score (decode_score.h) is stored by rank, so pooling reads
// its neighbours next to it; the lowest rank keys of the pooled scores (decode_score.h: NaN lowest) are found
// by a block minimum (one entry per step) or a radix select (4 passes of 8 bits; ties go to the earlier
// position), then the freed slots get pos = -1 and leave `order` by a stable compaction. All O(n). With by_score
// (CAKE's official mode), the survivors are re-listed by descending key instead, ranked by counting
// (O(n^2 / threads)).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

#include <torch/library.h>

#include "../checks.h"
#include "../decode_score.h"
#include "segments.cuh"

namespace cakekv::cuda {

namespace {

constexpr int kSelectThreads = 1024;

using u64 = unsigned long long;
constexpr int kHalfBits = 32;  // two counts packed in one uint64 scan

// Radix select over keys[0, n): the key `threshold` and the number `remaining` of the keys equal to it such
// that {keys < threshold} plus the first `remaining` keys == threshold are the `want` lowest (1 <= want <= n).
__device__ void radix_select(const uint32_t* __restrict__ keys, int n, int want, int* hist, int* digit_s,
                             int* remaining_s, uint32_t& threshold, int& remaining) {
  const int lane = threadIdx.x % 32;
  uint32_t mask = 0;
  threshold = 0;
  remaining = want;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int x = threadIdx.x; x < 256; x += blockDim.x) hist[x] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const uint32_t u = keys[i];
      if ((u & mask) == threshold) atomicAdd(&hist[(u >> shift) & 0xFFu], 1);
    }
    __syncthreads();
    if (threadIdx.x < 32) {  // a lane per 8 digits: the digit where the running count reaches `remaining`
      int mine = 0;
#pragma unroll
      for (int c = 0; c < 8; ++c) mine += hist[lane * 8 + c];
      int incl = mine;
#pragma unroll
      for (int off = 1; off < 32; off *= 2) {
        const int up = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += up;
      }
      int before = incl - mine;
      if (before < remaining && remaining <= incl) {
        for (int c = 0; c < 8; ++c) {
          const int h = hist[lane * 8 + c];
          if (before + h >= remaining) {
            *digit_s = lane * 8 + c;
            *remaining_s = remaining - before;
            break;
          }
          before += h;
        }
      }
    }
    __syncthreads();
    threshold |= uint32_t(*digit_s) << shift;
    mask |= 0xFFu << shift;
    remaining = *remaining_s;
    __syncthreads();
  }
}

// Smallest of one key per thread over the block (a barrier inside).
__device__ uint32_t block_min(uint32_t v, uint32_t* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v = min(v, __shfl_xor_sync(0xffffffffu, v, off));
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  uint32_t out = scratch[0];
  for (int w = 1; w < int(blockDim.x / 32); ++w) out = min(out, scratch[w]);
  __syncthreads();
  return out;
}

__global__ void __launch_bounds__(kSelectThreads) evict_select_kernel(
    const float* __restrict__ weights, int64_t* __restrict__ pos, int32_t* __restrict__ order,
    const int64_t* __restrict__ offsets, const int64_t* __restrict__ q_pos, int64_t* __restrict__ over,
    float* __restrict__ score, uint32_t* __restrict__ keys, int32_t* __restrict__ stash, int64_t T, int64_t Q,
    int64_t Hkv, int64_t G, int64_t protect, float var_weight, int kernel_size, bool max_pool,
    int64_t n_evict, bool by_score) {
  __shared__ u64 scratch[33];
  __shared__ int hist[256];
  __shared__ int digit_s, remaining_s;
  const int64_t seg = blockIdx.x, b = seg / Hkv, lo = offsets[seg], n = offsets[seg + 1] - lo;
  if (over[seg] <= 0 || n == 0) return;  // uniform over the block
  const int64_t limit = q_pos[b * Q + Q - 1] - protect;
  uint32_t* seg_keys = keys + lo;
  float* seg_score = score + lo;
  int32_t* seg_stash = stash + lo;  // by_score: the order's slots, -1 where freed
  int32_t* seg_order = order + lo;

  // Stored entries and candidates (the first ncand entries of the position order), in one packed scan.
  u64 counts = 0;
  for (int64_t e = threadIdx.x; e < n; e += kSelectThreads) {
    const int64_t p = pos[lo + e];
    counts += (u64(p >= 0) << kHalfBits) | u64(p >= 0 && p <= limit);
  }
  u64 totals;
  block_exclusive_scan<u64>(counts, scratch, totals);
  const int nvalid = int(totals >> kHalfBits), ncand = int(totals & 0xFFFFFFFFu);
  const int drop = int(std::min<int64_t>(std::min<int64_t>(n_evict, over[seg]), ncand));
  if (drop == 0) return;

  // Each candidate's score, by rank in the position order.
  for (int i = threadIdx.x; i < ncand; i += kSelectThreads) {
    const int32_t slot = seg_order[i];
    CUDA_KERNEL_ASSERT(slot >= 0 && slot < n && "evict_lowest: order holds a slot outside its segment");
    seg_score[i] = decode_score(weights, T, lo + slot, G, Q, var_weight);
  }
  __syncthreads();
  // Pooled over its neighbours in position order; ranked by its key (NaN lowest: decode_score.h).
  uint32_t lowest = 0xFFFFFFFFu;
  for (int i = threadIdx.x; i < ncand; i += kSelectThreads) {
    const uint32_t key = eviction_key(pooled_score(seg_score, ncand, i, kernel_size, max_pool));
    seg_keys[i] = key;
    lowest = min(lowest, key);
  }
  // The drop lowest: keys below `threshold`, then the first `remaining` equal to it (earlier positions).
  uint32_t threshold;
  int remaining;
  if (drop == 1) {  // one token per step: the minimum is enough
    threshold = block_min(lowest, reinterpret_cast<uint32_t*>(scratch));
    remaining = 1;
  } else {
    __syncthreads();
    radix_select(seg_keys, ncand, drop, hist, &digit_s, &remaining_s, threshold, remaining);
  }

  // Free the chosen slots and compact `order` in place: entry i moves to i - (chosen before it); writes land
  // at or before what this chunk read, and the scan's barriers order them after every read.
  u64 before = 0;  // (keys < threshold, keys == threshold) among candidates of earlier chunks
  for (int base = 0; base < nvalid; base += kSelectThreads) {
    const int i = base + threadIdx.x;
    const bool in = i < nvalid, is_cand = i < ncand;
    const int32_t slot = in ? seg_order[i] : 0;
    const uint32_t u = is_cand ? seg_keys[i] : 0u;
    const bool lt = is_cand && u < threshold, eq = is_cand && u == threshold;
    u64 chunk_total;
    const u64 prefix = before + block_exclusive_scan<u64>((u64(lt) << kHalfBits) | u64(eq), scratch, chunk_total);
    const int lt_before = int(prefix >> kHalfBits), eq_before = int(prefix & 0xFFFFFFFFu);
    const bool chosen = lt || (eq && eq_before < remaining);
    if (chosen) pos[lo + slot] = -1;
    if (by_score) {
      if (in) seg_stash[i] = chosen ? -1 : slot;  // reordered below, once every chunk is read
    } else if (!chosen && in) {
      seg_order[i - lt_before - min(eq_before, remaining)] = slot;
    }
    before += chunk_total;
  }
  if (by_score) {
    // The remaining candidates by descending pooled score (ties: earlier in the order), ranked by counting
    // (the official evictor's order, official mode only), then the rest of the order as it was.
    __syncthreads();
    for (int i = threadIdx.x; i < nvalid; i += kSelectThreads) {
      const int32_t slot = seg_stash[i];
      if (slot < 0) continue;
      if (i >= ncand) {
        seg_order[i - drop] = slot;
        continue;
      }
      const uint32_t u = seg_keys[i];
      int rank = 0;
      for (int j = 0; j < ncand; ++j) {
        const uint32_t v = seg_keys[j];
        rank += seg_stash[j] >= 0 && (v > u || (v == u && j < i));
      }
      seg_order[rank] = slot;
    }
  }
  if (threadIdx.x == 0) over[seg] -= drop;
}

}  // namespace

void evict_lowest(const at::Tensor& weights, const at::Tensor& pos, const at::Tensor& order,
                  const at::Tensor& offsets_in, const at::Tensor& q_pos_in, const at::Tensor& over, double var_weight,
                  int64_t protect, int64_t kernel_size, bool max_pool, int64_t n_evict, bool by_score) {
  check_evict_lowest_args(weights, pos, order, offsets_in, q_pos_in, over, kernel_size, n_evict);
  const c10::cuda::CUDAGuard guard(pos.device());
  const int64_t B = q_pos_in.size(0), Q = q_pos_in.size(1), T = pos.size(0);
  const int64_t segs = offsets_in.size(0) - 1, Hkv = segs / B;
  if (n_evict == 0 || T == 0 || Q == 0) return;
  const auto offsets = offsets_in.contiguous(), q_pos = q_pos_in.contiguous();
  auto score = at::empty({T}, weights.options());
  auto keys = at::empty({T}, weights.options().dtype(at::kInt));
  auto stash = at::empty({by_score ? T : 0}, weights.options().dtype(at::kInt));
  evict_select_kernel<<<unsigned(segs), kSelectThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      weights.const_data_ptr<float>(), pos.mutable_data_ptr<int64_t>(), order.mutable_data_ptr<int32_t>(),
      offsets.const_data_ptr<int64_t>(), q_pos.const_data_ptr<int64_t>(), over.mutable_data_ptr<int64_t>(),
      score.mutable_data_ptr<float>(), reinterpret_cast<uint32_t*>(keys.mutable_data_ptr<int32_t>()),
      stash.mutable_data_ptr<int32_t>(), T, Q, Hkv, weights.size(0) / Q, protect, static_cast<float>(var_weight),
      int(kernel_size), max_pool, n_evict, by_score);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cakekv::cuda

TORCH_LIBRARY_IMPL(cakekv, CUDA, m) {
  m.impl("evict_lowest", &cakekv::cuda::evict_lowest);
}
