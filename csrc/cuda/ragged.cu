// CUDA kernels of the segment layout (contracts in register.cpp). None syncs with the host, so a decode step
// that uses them can be captured as a CUDA graph.
//
// gather_ragged: a grid-stride loop over kept entries; each entry finds its segment by binary search in
// offsets (B * Hkv + 1 values) and copies its K and V rows. Offsets and indices are checked on the host
// before the launch (a prefill-time op: one sync), indices asserted again on the device.
//
// ragged_attention: split-K (flash-decoding). The G*Q query rows of one kv head share every K/V load: a
// block takes up to kAttnRows rows of one segment and one of `splits` equal parts of its entries, in
// chunks of kChunk: warps score entries (lanes split the head dim, shuffle reduction), each row's online
// softmax is updated per chunk, and threads accumulate P·V for their head dims. A second kernel merges
// the splits' (max, sum, accumulator) of every row.
//
// append_entries: one block per segment finds its first Q free slots (warp ballots, in slot order) and
// copies the tokens there.
//
// evict_lowest: one block per segment. Scores: a warp per entry computes its logits against the rows
// (query tile in shared memory): first the rows' softmax max and sum (block reductions), then the
// probabilities, reduced per head (Welford over queries) into the entry's score. Position order and the
// lowest pooled scores are ranks found by counting against tiles staged in shared memory (O(n^2 / threads),
// no sort); per-entry intermediates live in a global workspace.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include <torch/library.h>

#include "../checks.h"

namespace cakekv::cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kMaxPerLane = 8;  // head dim up to 32 * 8 = 256

__device__ __forceinline__ int64_t segment_of(const int64_t* __restrict__ offsets, int64_t segs, int64_t t) {
  // Last s with offsets[s] <= t (empty segments share a start; the entry belongs to the non-empty one).
  int64_t lo = 0, hi = segs - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= t) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename scalar_t>
__global__ void gather_ragged_kernel(const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                                     const int64_t* __restrict__ idx, const int64_t* __restrict__ offsets,
                                     scalar_t* __restrict__ k_out, scalar_t* __restrict__ v_out, int64_t T,
                                     int64_t segs, int64_t N, int64_t D) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; t < T; t += int64_t(gridDim.x) * blockDim.y) {
    const int64_t s = segment_of(offsets, segs, t), j = idx[t];
    CUDA_KERNEL_ASSERT(j >= 0 && j < N && "gather_ragged: index out of range [0, N)");
    const int64_t src = (s * N + j) * D, dst = t * D;
    for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
      k_out[dst + c] = k[src + c];
      v_out[dst + c] = v[src + c];
    }
  }
}

// One key row in registers, spread over the lanes of a warp (lane holds dims lane, lane + 32, ...): loads
// are coalesced, a warp reads one row.
template <typename scalar_t>
__device__ __forceinline__ void load_row(const scalar_t* row, int64_t D, int lane, float (&out)[kMaxPerLane]) {
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) {
    const int64_t d = lane + 32 * c;
    out[c] = d < D ? static_cast<float>(row[d]) : 0.f;
  }
}

// q_row · (the row in `kv`), summed over the warp: every lane returns the dot product.
__device__ __forceinline__ float warp_dot(const float* q_row, const float (&kv)[kMaxPerLane], int64_t D, int lane) {
  float dot = 0.f;
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) {
    const int64_t d = lane + 32 * c;
    if (d < D) dot += q_row[d] * kv[c];
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
  return dot;
}

constexpr int kAttnRows = 8;     // query rows per ragged_attention block
constexpr int kChunk = 64;       // entries scored per step by a ragged_attention block
constexpr int kAttnThreads = 128;
constexpr int kMaxDimSlots = (32 * kMaxPerLane + kAttnThreads - 1) / kAttnThreads;  // head dims per thread

// Query row r (of G*Q) of segment (b, g) is query i = r % Q of head h = g * G + r / Q.
__device__ __forceinline__ int64_t query_row_offset(int64_t b, int64_t g, int64_t r, int64_t H, int64_t G,
                                                    int64_t Q, int64_t D) {
  return ((b * H + g * G + r / Q) * Q + r % Q) * D;
}

template <typename scalar_t>
__global__ void ragged_attention_partial_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                                const scalar_t* __restrict__ v, const int64_t* __restrict__ pos,
                                                const int64_t* __restrict__ offsets,
                                                const int64_t* __restrict__ q_pos, float* __restrict__ part_acc,
                                                float* __restrict__ part_ml, int64_t H, int64_t Q, int64_t D,
                                                int64_t Hkv, int splits, float scale) {
  extern __shared__ float smem[];
  float* q_s = smem;                              // [kAttnRows, D]
  float* p_s = q_s + kAttnRows * D;               // [kAttnRows, kChunk] scores, then probabilities
  float* m_s = p_s + kAttnRows * kChunk;          // [kAttnRows] running max
  float* l_s = m_s + kAttnRows;                   // [kAttnRows] running sum
  float* corr_s = l_s + kAttnRows;                // [kAttnRows] rescale of this chunk
  __shared__ int64_t qp_s[kAttnRows];
  const int64_t seg = blockIdx.x, G = H / Hkv, rows = G * Q, r0 = int64_t(blockIdx.z) * kAttnRows;
  const int64_t b = seg / Hkv, g = seg % Hkv;
  const int R = int(std::min<int64_t>(kAttnRows, rows - r0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = kAttnThreads / 32;
  for (int64_t x = threadIdx.x; x < int64_t(R) * D; x += kAttnThreads) {
    const int64_t r = x / D, d = x % D;
    q_s[r * D + d] = static_cast<float>(q[query_row_offset(b, g, r0 + r, H, G, Q, D) + d]);
  }
  if (threadIdx.x < R) {
    qp_s[threadIdx.x] = q_pos[b * Q + (r0 + threadIdx.x) % Q];
    m_s[threadIdx.x] = -INFINITY;
    l_s[threadIdx.x] = 0.f;
  }
  const int64_t lo = offsets[seg], hi = offsets[seg + 1];
  const int64_t per = (hi - lo + splits - 1) / splits;
  const int64_t start = lo + per * blockIdx.y, end = std::min<int64_t>(hi, start + per);
  float acc[kAttnRows][kMaxDimSlots];
#pragma unroll
  for (int r = 0; r < kAttnRows; ++r)
#pragma unroll
    for (int c = 0; c < kMaxDimSlots; ++c) acc[r][c] = 0.f;
  __syncthreads();

  for (int64_t c0 = start; c0 < end; c0 += kChunk) {
    const int n = int(std::min<int64_t>(kChunk, end - c0));
    for (int e = warp; e < n; e += warps) {  // scores of entry c0 + e against every row
      const int64_t t = c0 + e, p = pos[t];
      float kv[kMaxPerLane];
      load_row(k + t * D, D, lane, kv);
      for (int r = 0; r < R; ++r) {
        const float dot = warp_dot(q_s + r * D, kv, D, lane);
        if (lane == 0) p_s[r * kChunk + e] = (p >= 0 && p <= qp_s[r]) ? dot * scale : -INFINITY;
      }
    }
    __syncthreads();
    for (int r = warp; r < R; r += warps) {  // online softmax of row r over this chunk
      float mx = -INFINITY;
      for (int e = lane; e < n; e += 32) mx = fmaxf(mx, p_s[r * kChunk + e]);
#pragma unroll
      for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_old = m_s[r], m_new = fmaxf(m_old, mx);
      float sum = 0.f;
      for (int e = lane; e < n; e += 32) {
        const float sc = p_s[r * kChunk + e];
        const float w = sc == -INFINITY ? 0.f : expf(sc - m_new);
        p_s[r * kChunk + e] = w;
        sum += w;
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      if (lane == 0) {
        const float corr = m_old == -INFINITY ? 0.f : expf(m_old - m_new);  // nothing before: acc is 0
        corr_s[r] = corr;
        l_s[r] = l_s[r] * corr + sum;
        m_s[r] = m_new;
      }
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kMaxDimSlots; ++c) {
      const int64_t d = threadIdx.x + int64_t(kAttnThreads) * c;
      if (d >= D) continue;
#pragma unroll
      for (int r = 0; r < kAttnRows; ++r)
        if (r < R) acc[r][c] *= corr_s[r];
#pragma unroll 8
      for (int e = 0; e < n; ++e) {  // unrolled: several V loads in flight per thread
        const float val = static_cast<float>(v[(c0 + e) * D + d]);
#pragma unroll
        for (int r = 0; r < kAttnRows; ++r)
          if (r < R) acc[r][c] += p_s[r * kChunk + e] * val;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < kAttnRows; ++r) {
    if (r >= R) break;
    const int64_t slot = (seg * rows + r0 + r) * splits + blockIdx.y;
#pragma unroll
    for (int c = 0; c < kMaxDimSlots; ++c) {
      const int64_t d = threadIdx.x + int64_t(kAttnThreads) * c;
      if (d < D) part_acc[slot * D + d] = acc[r][c];
    }
    if (threadIdx.x == 0) {
      part_ml[2 * slot] = m_s[r];
      part_ml[2 * slot + 1] = l_s[r];
    }
  }
}

template <typename scalar_t>
__global__ void ragged_attention_merge_kernel(const float* __restrict__ part_acc, const float* __restrict__ part_ml,
                                              scalar_t* __restrict__ out, int64_t H, int64_t Q, int64_t D,
                                              int64_t Hkv, int splits) {
  const int64_t G = H / Hkv, rows = G * Q, row = blockIdx.x;  // row of (segment, r)
  const int64_t seg = row / rows, r = row % rows, b = seg / Hkv, g = seg % Hkv;
  float mx = -INFINITY;
  for (int sp = 0; sp < splits; ++sp) mx = fmaxf(mx, part_ml[2 * (row * splits + sp)]);
  float denom = 0.f;
  for (int sp = 0; sp < splits; ++sp) {
    const float m = part_ml[2 * (row * splits + sp)];
    denom += (m == -INFINITY ? 0.f : expf(m - mx)) * part_ml[2 * (row * splits + sp) + 1];
  }
  const float inv = denom > 0.f ? 1.f / denom : 0.f;  // a query that sees no entry gets zeros
  scalar_t* o = out + query_row_offset(b, g, r, H, G, Q, D);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float sum = 0.f;
    for (int sp = 0; sp < splits; ++sp) {
      const float m = part_ml[2 * (row * splits + sp)];
      if (m != -INFINITY) sum += expf(m - mx) * part_acc[(row * splits + sp) * D + d];
    }
    o[d] = static_cast<scalar_t>(sum * inv);
  }
}

constexpr int kAppendThreads = 512;

template <typename scalar_t>
__global__ void append_entries_kernel(scalar_t* __restrict__ k, scalar_t* __restrict__ v, int64_t* __restrict__ pos,
                                      const int64_t* __restrict__ offsets, const scalar_t* __restrict__ new_k,
                                      const scalar_t* __restrict__ new_v, const int64_t* __restrict__ q_pos,
                                      int64_t* __restrict__ slots, int64_t Hkv, int64_t Q, int64_t D) {
  __shared__ int warp_free[kAppendThreads / 32];
  __shared__ int64_t taken_s;
  const int64_t seg = blockIdx.x, b = seg / Hkv, lo = offsets[seg], hi = offsets[seg + 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int64_t* seg_slots = slots + seg * Q;
  if (threadIdx.x == 0) taken_s = 0;
  __syncthreads();
  for (int64_t base = lo; base < hi; base += kAppendThreads) {
    const int64_t taken = taken_s;  // uniform: written before the last barrier
    if (taken >= Q) break;
    const int64_t t = base + threadIdx.x;
    const bool free = t < hi && pos[t] < 0;
    const unsigned mask = __ballot_sync(0xffffffffu, free);
    if (lane == 0) warp_free[warp] = __popc(mask);
    __syncthreads();
    int64_t before = 0, total = 0;
    for (int w = 0; w < kAppendThreads / 32; ++w) {
      before += w < warp ? warp_free[w] : 0;
      total += warp_free[w];
    }
    const int64_t rank = taken + before + __popc(mask & ((1u << lane) - 1u));
    if (free && rank < Q) seg_slots[rank] = t;
    __syncthreads();
    if (threadIdx.x == 0) taken_s = taken + total;
    __syncthreads();
  }
  CUDA_KERNEL_ASSERT(taken_s >= Q && "append_entries: a segment has fewer free slots than new tokens");
  __syncthreads();
  for (int64_t x = threadIdx.x; x < Q * D; x += kAppendThreads) {
    const int64_t r = x / D, d = x % D, t = seg_slots[r];
    k[t * D + d] = new_k[(seg * Q + r) * D + d];
    v[t * D + d] = new_v[(seg * Q + r) * D + d];
  }
  for (int64_t r = threadIdx.x; r < Q; r += kAppendThreads) pos[seg_slots[r]] = q_pos[b * Q + r];
}

constexpr int kEvictThreads = 1024;
constexpr int kEvictWarps = kEvictThreads / 32;
constexpr int kEvictRows = 8;    // query rows staged at a time
constexpr int kRankTile = 1024;  // entries staged per counting step

// Online-softmax merge of (m, l) pairs.
__device__ __forceinline__ void merge_max_sum(float& m, float& l, float m2, float l2) {
  const float mx = fmaxf(m, m2);
  if (mx == -INFINITY) return;
  l = (m == -INFINITY ? 0.f : l * expf(m - mx)) + (m2 == -INFINITY ? 0.f : l2 * expf(m2 - mx));
  m = mx;
}

// Exclusive count, for each of this thread's entries, of the entries u of the segment that come first in
// `before(u, t)`: tiles of the segment's keys are staged in shared memory and compared by every thread.
template <typename Key, typename Less>
__device__ void count_before(int64_t lo, int64_t n, const Key* keys, Key* tile, int32_t* counts, Less before) {
  constexpr int kMine = 2;  // entries per thread per round: one round for segments up to 2048 entries
  for (int64_t round = 0; round < n; round += int64_t(kMine) * kEvictThreads) {
    Key me[kMine];
    int32_t count[kMine];
#pragma unroll
    for (int j = 0; j < kMine; ++j) {
      const int64_t mine = round + j * kEvictThreads + threadIdx.x;
      if (mine < n) me[j] = keys[lo + mine];
      count[j] = 0;
    }
    for (int64_t base = 0; base < n; base += kRankTile) {
      const int len = int(std::min<int64_t>(kRankTile, n - base));
      __syncthreads();
      for (int x = threadIdx.x; x < len; x += kEvictThreads) tile[x] = keys[lo + base + x];
      __syncthreads();
      for (int x = 0; x < len; ++x) {
        const Key u = tile[x];
#pragma unroll
        for (int j = 0; j < kMine; ++j) count[j] += before(u, me[j]) ? 1 : 0;
      }
    }
#pragma unroll
    for (int j = 0; j < kMine; ++j) {
      const int64_t mine = round + j * kEvictThreads + threadIdx.x;
      if (mine < n) counts[lo + mine] = count[j];
    }
  }
}

// Position of a candidate (int64 max for the others, which never come before a candidate).
struct PosKey {
  int64_t pos;
};
// Pooled score of a candidate and its position (ties: earlier position); +inf for the others.
struct PooledKey {
  float pooled;
  int64_t pos;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kEvictThreads) evict_lowest_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                    int64_t* __restrict__ pos, const int64_t* __restrict__ offsets,
                                    const int64_t* __restrict__ q_pos, int64_t* __restrict__ over,
                                    float* __restrict__ score, float* __restrict__ mean, float* __restrict__ m2,
                                    PosKey* __restrict__ pos_key, PooledKey* __restrict__ pooled_key,
                                    int32_t* __restrict__ rank, int32_t* __restrict__ by_rank, int64_t H,
                                    int64_t Q, int64_t D, int64_t Hkv, float scale, float var_weight,
                                    int64_t protect, int half, bool max_pool, int64_t n_evict) {
  extern __shared__ float smem[];
  float* q_s = smem;                                   // [kEvictRows, D]
  __shared__ float red_m[kEvictThreads / 32][kEvictRows], red_l[kEvictThreads / 32][kEvictRows];
  __shared__ float row_m[kEvictRows], row_inv[kEvictRows];
  __shared__ int ncand_s;
  const int64_t seg = blockIdx.x, b = seg / Hkv, g = seg % Hkv, G = H / Hkv, rows = G * Q;
  const int64_t lo = offsets[seg], n = offsets[seg + 1] - lo;
  if (over[seg] <= 0 || n == 0) return;  // uniform over the block
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t newest = q_pos[b * Q + Q - 1];

  // 1. score[t] = sum over heads j of (mean_i A + w * var_i A), Welford over the queries i of head j.
  for (int64_t r0 = 0; r0 < rows; r0 += kEvictRows) {
    const int R = int(std::min<int64_t>(kEvictRows, rows - r0));
    __syncthreads();
    for (int64_t x = threadIdx.x; x < int64_t(R) * D; x += kEvictThreads)
      q_s[x] = static_cast<float>(q[query_row_offset(b, g, r0 + x / D, H, G, Q, D) + x % D]);
    __syncthreads();
    float m[kEvictRows], l[kEvictRows];
#pragma unroll
    for (int r = 0; r < kEvictRows; ++r) m[r] = -INFINITY, l[r] = 0.f;
    for (int64_t e = warp; e < n; e += kEvictWarps) {  // a warp per entry; every lane ends with the same state
      const int64_t p = pos[lo + e];
      float kv[kMaxPerLane];
      load_row(k + (lo + e) * D, D, lane, kv);
#pragma unroll
      for (int r = 0; r < kEvictRows; ++r) {
        if (r >= R) break;
        const float dot = warp_dot(q_s + r * D, kv, D, lane);
        if (p >= 0 && p <= q_pos[b * Q + (r0 + r) % Q]) merge_max_sum(m[r], l[r], dot * scale, 1.f);
      }
    }
#pragma unroll
    for (int r = 0; r < kEvictRows; ++r)
      if (r < R && lane == 0) red_m[warp][r] = m[r], red_l[warp][r] = l[r];
    __syncthreads();
    if (threadIdx.x < R) {
      float mm = -INFINITY, ll = 0.f;
      for (int w = 0; w < kEvictThreads / 32; ++w) merge_max_sum(mm, ll, red_m[w][threadIdx.x], red_l[w][threadIdx.x]);
      row_m[threadIdx.x] = mm;
      row_inv[threadIdx.x] = ll > 0.f ? 1.f / ll : 0.f;
    }
    __syncthreads();
    for (int64_t e = warp; e < n; e += kEvictWarps) {
      const int64_t t = lo + e, p = pos[t];
      float kv[kMaxPerLane];
      load_row(k + t * D, D, lane, kv);
      float s = r0 == 0 ? 0.f : score[t], mu = r0 == 0 ? 0.f : mean[t], sq = r0 == 0 ? 0.f : m2[t];
#pragma unroll
      for (int r = 0; r < kEvictRows; ++r) {
        if (r >= R) break;
        const int64_t row = r0 + r, i = row % Q;
        const float dot = warp_dot(q_s + r * D, kv, D, lane);
        float a = 0.f;
        if (p >= 0 && p <= q_pos[b * Q + i]) a = expf(dot * scale - row_m[r]) * row_inv[r];
        if (i == 0) mu = 0.f, sq = 0.f;  // a new head
        const float delta = a - mu;
        mu += delta / float(i + 1);
        sq += delta * (a - mu);
        if (i == Q - 1) s += mu + var_weight * (Q > 1 ? sq / float(Q - 1) : 0.f);
      }
      if (lane == 0) score[t] = s, mean[t] = mu, m2[t] = sq;
    }
  }
  // 2. Rank of each candidate in position order; by_rank inverts it.
  __shared__ int cand_count[kEvictThreads / 32];
  int mine = 0;
  for (int64_t e = threadIdx.x; e < n; e += kEvictThreads) {
    const int64_t p = pos[lo + e];
    const bool cand = p >= 0 && p <= newest - protect;
    pos_key[lo + e] = PosKey{cand ? p : std::numeric_limits<int64_t>::max()};
    mine += cand;
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) mine += __shfl_xor_sync(0xffffffffu, mine, off);
  if (lane == 0) cand_count[warp] = mine;
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 0;
    for (int w = 0; w < kEvictThreads / 32; ++w) total += cand_count[w];
    ncand_s = total;
  }
  __shared__ PooledKey tile_mem[kRankTile];  // staging for both counts (PooledKey is the larger key)
  count_before(lo, n, pos_key, reinterpret_cast<PosKey*>(tile_mem), rank,
               [](const PosKey& u, const PosKey& t) { return u.pos < t.pos; });
  __syncthreads();
  const int ncand = ncand_s;
  for (int64_t e = threadIdx.x; e < n; e += kEvictThreads)
    if (pos_key[lo + e].pos != std::numeric_limits<int64_t>::max()) by_rank[lo + rank[lo + e]] = int32_t(e);
  __syncthreads();
  // 3. Pooled score of each candidate over its neighbours in position order (mean over heads: / G).
  for (int64_t e = threadIdx.x; e < n; e += kEvictThreads) {
    const PosKey key = pos_key[lo + e];
    float pooled = INFINITY;
    if (key.pos != std::numeric_limits<int64_t>::max()) {
      const int rk = rank[lo + e];
      float accum = max_pool ? -INFINITY : 0.f;
      for (int x = rk - half; x <= rk + half; ++x) {
        if (x < 0 || x >= ncand) continue;
        const float val = score[lo + by_rank[lo + x]] / float(G);
        accum = max_pool ? fmaxf(accum, val) : accum + val;
      }
      pooled = max_pool ? accum : accum / float(2 * half + 1);
    }
    pooled_key[lo + e] = PooledKey{pooled, key.pos};
  }
  // 4. The lowest pooled scores go.
  count_before(lo, n, pooled_key, tile_mem, rank, [](const PooledKey& u, const PooledKey& t) {
    return u.pooled < t.pooled || (u.pooled == t.pooled && u.pos < t.pos);
  });
  __syncthreads();
  const int64_t drop = std::min<int64_t>(std::min<int64_t>(n_evict, over[seg]), ncand);
  for (int64_t e = threadIdx.x; e < n; e += kEvictThreads)
    if (pooled_key[lo + e].pos != std::numeric_limits<int64_t>::max() && rank[lo + e] < drop) pos[lo + e] = -1;
  __syncthreads();
  if (threadIdx.x == 0) over[seg] -= drop;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gather_ragged(const at::Tensor& k_in, const at::Tensor& v_in,
                                                 const at::Tensor& idx_in, const at::Tensor& offsets_in) {
  check_gather_ragged_args(k_in, v_in, idx_in, offsets_in);
  const c10::cuda::CUDAGuard guard(k_in.device());
  const int64_t N = k_in.size(2), D = k_in.size(3), T = idx_in.size(0), segs = offsets_in.size(0) - 1;
  auto k_out = at::empty({T, D}, k_in.options()), v_out = at::empty({T, D}, v_in.options());
  if (k_out.numel() == 0) return {k_out, v_out};
  TORCH_CHECK(N > 0, "gather_ragged: index into an empty cache (N = 0)");
  const auto k = k_in.contiguous(), v = v_in.contiguous(), idx = idx_in.contiguous(),
             offsets = offsets_in.contiguous();
  check_offsets("gather_ragged", offsets, T);
  check_indices_in_range("gather_ragged", idx, N);
  const int bx = int(std::min<int64_t>(D, 128)), by = std::max(1, 256 / bx);
  const int64_t max_blocks = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((T + by - 1) / by, max_blocks));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "gather_ragged_cuda", [&] {
    gather_ragged_kernel<scalar_t><<<blocks, dim3(bx, by), 0, at::cuda::getCurrentCUDAStream()>>>(
        k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
        offsets.const_data_ptr<int64_t>(), k_out.mutable_data_ptr<scalar_t>(), v_out.mutable_data_ptr<scalar_t>(),
        T, segs, N, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {k_out, v_out};
}

at::Tensor ragged_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                            const at::Tensor& pos_in, const at::Tensor& offsets_in, const at::Tensor& q_pos_in,
                            double scale) {
  check_ragged_attention_args(q_in, k_in, v_in, pos_in, offsets_in, q_pos_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), H = q_in.size(1), Q = q_in.size(2), D = q_in.size(3), T = k_in.size(0);
  const int64_t segs = offsets_in.size(0) - 1, Hkv = segs / B, rows = (H / Hkv) * Q;
  TORCH_CHECK(D <= 32 * kMaxPerLane, "ragged_attention (CUDA): head dim ", D, " above ", 32 * kMaxPerLane);
  auto out = at::empty({B, H, Q, D}, q_in.options());
  if (out.numel() == 0) return out;
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(), pos = pos_in.contiguous(),
             offsets = offsets_in.contiguous(), q_pos = q_pos_in.contiguous();
  // Splits from the average segment (the host does not read the offsets): about kChunk entries per block,
  // at most 64 splits.
  const int splits = int(std::clamp<int64_t>((T / segs + kChunk - 1) / kChunk, 1, 64));
  const int64_t tiles = (rows + kAttnRows - 1) / kAttnRows;
  auto part_acc = at::empty({segs * rows, splits, D}, q_in.options().dtype(at::kFloat));
  auto part_ml = at::empty({segs * rows, splits, 2}, q_in.options().dtype(at::kFloat));
  const size_t smem = sizeof(float) * size_t(kAttnRows * D + kAttnRows * kChunk + 3 * kAttnRows);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "ragged_attention_cuda", [&] {
    ragged_attention_partial_kernel<scalar_t><<<dim3(unsigned(segs), unsigned(splits), unsigned(tiles)),
                                                kAttnThreads, smem, stream>>>(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        pos.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(), q_pos.const_data_ptr<int64_t>(),
        part_acc.mutable_data_ptr<float>(), part_ml.mutable_data_ptr<float>(), H, Q, D, Hkv, splits,
        static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ragged_attention_merge_kernel<scalar_t><<<unsigned(segs * rows), 128, 0, stream>>>(
        part_acc.const_data_ptr<float>(), part_ml.const_data_ptr<float>(), out.mutable_data_ptr<scalar_t>(), H, Q,
        D, Hkv, splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void append_entries(const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos, const at::Tensor& offsets_in,
                    const at::Tensor& new_k_in, const at::Tensor& new_v_in, const at::Tensor& q_pos_in) {
  check_append_entries_args(k, v, pos, offsets_in, new_k_in, new_v_in, q_pos_in);
  const c10::cuda::CUDAGuard guard(k.device());
  const int64_t B = new_k_in.size(0), Hkv = new_k_in.size(1), Q = new_k_in.size(2), D = new_k_in.size(3);
  if (B * Hkv * Q == 0) return;
  const auto offsets = offsets_in.contiguous(), new_k = new_k_in.contiguous(), new_v = new_v_in.contiguous(),
             q_pos = q_pos_in.contiguous();
  auto slots = at::empty({B * Hkv, Q}, pos.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "append_entries_cuda", [&] {
    append_entries_kernel<scalar_t><<<unsigned(B * Hkv), kAppendThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        k.mutable_data_ptr<scalar_t>(), v.mutable_data_ptr<scalar_t>(), pos.mutable_data_ptr<int64_t>(),
        offsets.const_data_ptr<int64_t>(), new_k.const_data_ptr<scalar_t>(), new_v.const_data_ptr<scalar_t>(),
        q_pos.const_data_ptr<int64_t>(), slots.mutable_data_ptr<int64_t>(), Hkv, Q, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void evict_lowest(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& pos, const at::Tensor& offsets_in,
                  const at::Tensor& q_pos_in, const at::Tensor& over, double scale, double var_weight,
                  int64_t protect, int64_t kernel_size, bool max_pool, int64_t n_evict) {
  check_evict_lowest_args(q_in, k_in, pos, offsets_in, q_pos_in, over, kernel_size, n_evict);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), H = q_in.size(1), Q = q_in.size(2), D = q_in.size(3), T = k_in.size(0);
  const int64_t segs = offsets_in.size(0) - 1, Hkv = segs / B;
  TORCH_CHECK(D <= 32 * kMaxPerLane, "evict_lowest (CUDA): head dim ", D, " above ", 32 * kMaxPerLane);
  if (n_evict == 0 || T == 0 || Q == 0) return;
  const auto q = q_in.contiguous(), k = k_in.contiguous(), offsets = offsets_in.contiguous(),
             q_pos = q_pos_in.contiguous();
  const auto f32 = q.options().dtype(at::kFloat);
  auto score = at::empty({T}, f32), mean = at::empty({T}, f32), m2 = at::empty({T}, f32);
  auto pos_key = at::empty({T * int64_t(sizeof(PosKey))}, q.options().dtype(at::kByte));
  auto pooled_key = at::empty({T * int64_t(sizeof(PooledKey))}, q.options().dtype(at::kByte));
  auto rank = at::empty({T}, q.options().dtype(at::kInt)), by_rank = at::empty({T}, q.options().dtype(at::kInt));
  const size_t smem = sizeof(float) * size_t(kEvictRows * D);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "evict_lowest_cuda", [&] {
    evict_lowest_kernel<scalar_t><<<unsigned(segs), kEvictThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), pos.mutable_data_ptr<int64_t>(),
        offsets.const_data_ptr<int64_t>(), q_pos.const_data_ptr<int64_t>(), over.mutable_data_ptr<int64_t>(),
        score.mutable_data_ptr<float>(), mean.mutable_data_ptr<float>(), m2.mutable_data_ptr<float>(),
        reinterpret_cast<PosKey*>(pos_key.mutable_data_ptr()), reinterpret_cast<PooledKey*>(pooled_key.mutable_data_ptr()),
        rank.mutable_data_ptr<int32_t>(), by_rank.mutable_data_ptr<int32_t>(), H, Q, D, Hkv,
        static_cast<float>(scale), static_cast<float>(var_weight), protect, int(kernel_size / 2), max_pool, n_evict);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cakekv::cuda

TORCH_LIBRARY_IMPL(cakekv, CUDA, m) {
  m.impl("gather_ragged", &cakekv::cuda::gather_ragged);
  m.impl("ragged_attention", &cakekv::cuda::ragged_attention);
  m.impl("append_entries", &cakekv::cuda::append_entries);
  m.impl("evict_lowest", &cakekv::cuda::evict_lowest);
}
