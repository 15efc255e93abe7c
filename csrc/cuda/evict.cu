// evict_lowest (CUDA, contract in register.cpp): decode-time eviction in three kernels, none of which syncs
// with the host, so a decode step that evicts can be captured as a CUDA graph.
//
// Work is spread by entries, not by segments: the layer's T flat entries are cut into equal chunks, one block
// each, whatever the segment sizes (a long segment gets many blocks, short ones share a block). A piece is the
// part of one segment s inside one block j; its partial results live at index j + s (one-to-one, because
// segments are contiguous and ordered).
//  1. evict_partial: per piece and query row, the softmax max and sum over the piece's visible entries.
//  2. evict_score: per entry, each row's probability (max and sum merged over the segment's pieces), Welford
//     mean / variance over the queries of each head, summed over heads: score[t].
//  3. evict_select: one block per segment. Candidates are a prefix of the segment's position order (`order`,
//     kept exact by append_entries and by this op), so pooling reads the neighbours directly; the lowest pooled
//     scores are found by a radix select on their float bits (4 passes of 8 bits; ties go to the earlier
//     position), then the freed slots get pos = -1 and leave `order` by a stable compaction. All O(n).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

#include <torch/library.h>

#include "../checks.h"
#include "segments.cuh"

namespace cakekv::cuda {

namespace {

constexpr int kScoreThreads = 256;
constexpr int kScoreWarps = kScoreThreads / 32;
constexpr int kScoreRows = 8;   // query rows staged in shared memory at a time
constexpr int64_t kMinChunk = int64_t(kScoreWarps) * kUnroll;  // fewest entries per scoring block
constexpr int kSelectThreads = 1024;
static_assert(kScoreRows <= kScoreWarps, "a warp merges each staged row");

// Stage query rows r0 .. r0 + R - 1 of segment (b, g) in shared memory as fp32, with their positions.
template <typename scalar_t>
__device__ __forceinline__ void stage_rows(float* q_s, int64_t* qp_s, const scalar_t* __restrict__ q,
                                           const int64_t* __restrict__ q_pos, int64_t b, int64_t g, int64_t r0,
                                           int R, int64_t H, int64_t G, int64_t Q, int64_t D) {
  for (int64_t x = threadIdx.x; x < int64_t(R) * D; x += blockDim.x)
    q_s[x] = static_cast<float>(q[query_row_offset(b, g, r0 + x / D, H, G, Q, D) + x % D]);
  if (threadIdx.x < R) qp_s[threadIdx.x] = q_pos[b * Q + (r0 + threadIdx.x) % Q];
}

// Pass 1: per piece and staged row, the max and sum of exp over the piece's visible entries.
template <typename scalar_t, int kPerLane>
__global__ void __launch_bounds__(kScoreThreads) evict_partial_kernel(
    const scalar_t* __restrict__ q, const scalar_t* __restrict__ k, const int64_t* __restrict__ pos,
    const int64_t* __restrict__ offsets, const int64_t* __restrict__ q_pos, const int64_t* __restrict__ over,
    float2* __restrict__ part_ml, int64_t T, int64_t segs, int64_t chunk, int64_t H, int64_t Q, int64_t D,
    int64_t Hkv, float scale) {
  extern __shared__ float q_s[];  // [kScoreRows, D]
  __shared__ int64_t qp_s[kScoreRows];
  __shared__ float red_m[kScoreWarps][kScoreRows], red_l[kScoreWarps][kScoreRows];
  const int64_t G = H / Hkv, rows = G * Q, start = int64_t(blockIdx.x) * chunk, end = std::min(T, start + chunk);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t s = segment_of(offsets, segs, start); s < segs && offsets[s] < end; ++s) {
    const int64_t lo = std::max(offsets[s], start), hi = std::min(offsets[s + 1], end);
    if (lo >= hi || over[s] <= 0) continue;  // uniform over the block
    const int64_t b = s / Hkv, g = s % Hkv, piece = int64_t(blockIdx.x) + s;
    for (int64_t r0 = 0; r0 < rows; r0 += kScoreRows) {
      const int R = int(std::min<int64_t>(kScoreRows, rows - r0));
      __syncthreads();
      stage_rows(q_s, qp_s, q, q_pos, b, g, r0, R, H, G, Q, D);
      __syncthreads();
      float m[kScoreRows], l[kScoreRows];
#pragma unroll
      for (int r = 0; r < kScoreRows; ++r) m[r] = -INFINITY, l[r] = 0.f;
      for_warp_entries<kScoreRows, kPerLane>(k, pos, lo, hi, q_s, R, int(D), [&](int64_t, int64_t p, const float (&dot)[kScoreRows]) {
#pragma unroll
        for (int r = 0; r < kScoreRows; ++r)
          if (r < R && p >= 0 && p <= qp_s[r]) merge_max_sum(m[r], l[r], dot[r] * scale, 1.f);
      });
      if (lane == 0)
#pragma unroll
        for (int r = 0; r < kScoreRows; ++r) red_m[warp][r] = m[r], red_l[warp][r] = l[r];
      __syncthreads();
      if (threadIdx.x < R) {
        float mm = -INFINITY, ll = 0.f;
        for (int w = 0; w < kScoreWarps; ++w) merge_max_sum(mm, ll, red_m[w][threadIdx.x], red_l[w][threadIdx.x]);
        part_ml[piece * rows + r0 + threadIdx.x] = make_float2(mm, ll);
      }
    }
  }
}

// Pass 2: per entry, sum over heads of (mean + w * var) over the queries of each head of its probabilities.
template <typename scalar_t, int kPerLane>
__global__ void __launch_bounds__(kScoreThreads) evict_score_kernel(
    const scalar_t* __restrict__ q, const scalar_t* __restrict__ k, const int64_t* __restrict__ pos,
    const int64_t* __restrict__ offsets, const int64_t* __restrict__ q_pos, const int64_t* __restrict__ over,
    const float2* __restrict__ part_ml, float* __restrict__ score, float* __restrict__ mean, float* __restrict__ m2,
    int64_t T, int64_t segs, int64_t chunk, int64_t H, int64_t Q, int64_t D, int64_t Hkv, float scale,
    float var_weight) {
  extern __shared__ float q_s[];  // [kScoreRows, D]
  __shared__ int64_t qp_s[kScoreRows];
  __shared__ float row_m[kScoreRows], row_inv[kScoreRows];
  const int64_t G = H / Hkv, rows = G * Q, start = int64_t(blockIdx.x) * chunk, end = std::min(T, start + chunk);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t s = segment_of(offsets, segs, start); s < segs && offsets[s] < end; ++s) {
    const int64_t lo = std::max(offsets[s], start), hi = std::min(offsets[s + 1], end);
    if (lo >= hi || over[s] <= 0) continue;
    const int64_t b = s / Hkv, g = s % Hkv;
    const int64_t first = offsets[s] / chunk, last = (offsets[s + 1] - 1) / chunk;  // the segment's blocks
    for (int64_t r0 = 0; r0 < rows; r0 += kScoreRows) {
      const int R = int(std::min<int64_t>(kScoreRows, rows - r0));
      __syncthreads();
      stage_rows(q_s, qp_s, q, q_pos, b, g, r0, R, H, G, Q, D);
      if (warp < R) {  // warp r merges row r over the segment's pieces, lanes striding over them
        float mm = -INFINITY, ll = 0.f;
        for (int64_t j = first + lane; j <= last; j += 32) {
          const float2 ml = part_ml[(j + s) * rows + r0 + warp];
          merge_max_sum(mm, ll, ml.x, ml.y);
        }
#pragma unroll
        for (int off = 16; off > 0; off /= 2) {
          const float m_other = __shfl_xor_sync(0xffffffffu, mm, off), l_other = __shfl_xor_sync(0xffffffffu, ll, off);
          merge_max_sum(mm, ll, m_other, l_other);
        }
        if (lane == 0) {
          row_m[warp] = mm;
          row_inv[warp] = ll > 0.f ? 1.f / ll : 0.f;
        }
      }
      __syncthreads();
      for_warp_entries<kScoreRows, kPerLane>(k, pos, lo, hi, q_s, R, int(D), [&](int64_t t, int64_t p, const float (&dot)[kScoreRows]) {
        float sc = r0 == 0 ? 0.f : score[t], mu = r0 == 0 ? 0.f : mean[t], sq = r0 == 0 ? 0.f : m2[t];
#pragma unroll
        for (int r = 0; r < kScoreRows; ++r) {
          if (r >= R) break;
          const int64_t i = (r0 + r) % Q;
          const float a = (p >= 0 && p <= qp_s[r]) ? expf(dot[r] * scale - row_m[r]) * row_inv[r] : 0.f;
          if (i == 0) mu = 0.f, sq = 0.f;  // a new head
          const float delta = a - mu;
          mu += delta / float(i + 1);
          sq += delta * (a - mu);
          if (i == Q - 1) sc += mu + var_weight * (Q > 1 ? sq / float(Q - 1) : 0.f);
        }
        if (lane == 0) score[t] = sc, mean[t] = mu, m2[t] = sq;
      });
    }
  }
}

// Float bits mapped to unsigned ints of the same order.
__device__ __forceinline__ uint32_t ordered_bits(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

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
    int64_t* __restrict__ pos, int32_t* __restrict__ order, const int64_t* __restrict__ offsets,
    const int64_t* __restrict__ q_pos, int64_t* __restrict__ over, const float* __restrict__ score,
    uint32_t* __restrict__ keys, int64_t Q, int64_t Hkv, int64_t G, int64_t protect, int half, int kernel_size,
    bool max_pool, int64_t n_evict) {
  __shared__ u64 scratch[33];
  __shared__ int hist[256];
  __shared__ int digit_s, remaining_s;
  const int64_t seg = blockIdx.x, b = seg / Hkv, lo = offsets[seg], n = offsets[seg + 1] - lo;
  if (over[seg] <= 0 || n == 0) return;  // uniform over the block
  const int64_t limit = q_pos[b * Q + Q - 1] - protect;
  uint32_t* seg_keys = keys + lo;
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

  // Pooled score of each candidate over its neighbours in position order (mean over heads: / G).
  uint32_t lowest = 0xFFFFFFFFu;
  for (int i = threadIdx.x; i < ncand; i += kSelectThreads) {
    float acc = max_pool ? -INFINITY : 0.f;
    for (int x = i - half; x <= i + half; ++x) {
      if (x < 0 || x >= ncand) continue;
      const int32_t slot = seg_order[x];
      CUDA_KERNEL_ASSERT(slot >= 0 && slot < n && "evict_lowest: order holds a slot outside its segment");
      const float val = score[lo + slot] / float(G);
      acc = max_pool ? fmaxf(acc, val) : acc + val;
    }
    const uint32_t key = ordered_bits(max_pool ? acc : acc / float(kernel_size));
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
    else if (in) seg_order[i - lt_before - min(eq_before, remaining)] = slot;
    before += chunk_total;
  }
  if (threadIdx.x == 0) over[seg] -= drop;
}

}  // namespace

void evict_lowest(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& pos, const at::Tensor& order,
                  const at::Tensor& offsets_in, const at::Tensor& q_pos_in, const at::Tensor& over, double scale,
                  double var_weight, int64_t protect, int64_t kernel_size, bool max_pool, int64_t n_evict) {
  check_evict_lowest_args(q_in, k_in, pos, order, offsets_in, q_pos_in, over, kernel_size, n_evict);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), H = q_in.size(1), Q = q_in.size(2), D = q_in.size(3), T = k_in.size(0);
  const int64_t segs = offsets_in.size(0) - 1, Hkv = segs / B, G = H / Hkv, rows = G * Q;
  TORCH_CHECK(D <= 32 * kMaxPerLane, "evict_lowest (CUDA): head dim ", D, " above ", 32 * kMaxPerLane);
  if (n_evict == 0 || T == 0 || Q == 0) return;
  const auto q = q_in.contiguous(), k = k_in.contiguous(), offsets = offsets_in.contiguous(),
             q_pos = q_pos_in.contiguous();
  // About four scoring blocks per SM, at least kMinChunk entries each (the host never reads the offsets).
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t chunk = std::max(kMinChunk, (T + 4 * sms - 1) / (4 * sms)), blocks = (T + chunk - 1) / chunk;
  const auto f32 = q.options().dtype(at::kFloat);
  auto part_ml = at::empty({(blocks + segs) * rows, 2}, f32);
  auto score = at::empty({T}, f32), mean = at::empty({T}, f32), m2 = at::empty({T}, f32);
  auto keys = at::empty({T}, q.options().dtype(at::kInt));
  const size_t smem = sizeof(float) * size_t(kScoreRows * D);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "evict_lowest_cuda", [&] {
    with_dims_per_lane(D, [&](auto per_lane) {
      constexpr int P = decltype(per_lane)::value;
      evict_partial_kernel<scalar_t, P><<<unsigned(blocks), kScoreThreads, smem, stream>>>(
          q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), pos.const_data_ptr<int64_t>(),
          offsets.const_data_ptr<int64_t>(), q_pos.const_data_ptr<int64_t>(), over.const_data_ptr<int64_t>(),
          reinterpret_cast<float2*>(part_ml.mutable_data_ptr<float>()), T, segs, chunk, H, Q, D, Hkv,
          static_cast<float>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      evict_score_kernel<scalar_t, P><<<unsigned(blocks), kScoreThreads, smem, stream>>>(
          q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), pos.const_data_ptr<int64_t>(),
          offsets.const_data_ptr<int64_t>(), q_pos.const_data_ptr<int64_t>(), over.const_data_ptr<int64_t>(),
          reinterpret_cast<const float2*>(part_ml.const_data_ptr<float>()), score.mutable_data_ptr<float>(),
          mean.mutable_data_ptr<float>(), m2.mutable_data_ptr<float>(), T, segs, chunk, H, Q, D, Hkv,
          static_cast<float>(scale), static_cast<float>(var_weight));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  evict_select_kernel<<<unsigned(segs), kSelectThreads, 0, stream>>>(
      pos.mutable_data_ptr<int64_t>(), order.mutable_data_ptr<int32_t>(), offsets.const_data_ptr<int64_t>(),
      q_pos.const_data_ptr<int64_t>(), over.mutable_data_ptr<int64_t>(), score.const_data_ptr<float>(),
      reinterpret_cast<uint32_t*>(keys.mutable_data_ptr<int32_t>()), Q, Hkv, G, protect, int(kernel_size / 2),
      int(kernel_size), max_pool, n_evict);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cakekv::cuda

TORCH_LIBRARY_IMPL(cakekv, CUDA, m) {
  m.impl("evict_lowest", &cakekv::cuda::evict_lowest);
}
