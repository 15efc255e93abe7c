// CUDA kernels of the segment layout (contracts in register.cpp). None syncs with the host, so a decode step
// that uses them can be captured as a CUDA graph.
//
// gather_ragged: a grid-stride loop over kept entries; each entry finds its segment by binary search in
// offsets (B * Hkv + 1 values) and copies its K and V rows. Offsets and indices are checked on the host
// before the launch (a prefill-time op: one sync), indices asserted again on the device.
//
// ragged_attention: split-K (flash-decoding), balanced by entries: the layer's T entries are cut into equal
// chunks, one block each, whatever the segment sizes (per-head budgets make them very unequal: one long head
// must not serialise the step). A piece is the part of segment s inside block j; its partial results live at
// index j + s (one-to-one: segments are contiguous and ordered). The G*Q query rows of one kv head share every
// K/V load: a block takes up to kAttnRows rows and walks its pieces in steps of kChunk entries: warps score
// entries (lanes split the head dim, shuffle reduction), each row's online softmax is updated per step, and
// threads accumulate P·V for their head dims. A second kernel merges the pieces of every (segment, row).
// Asked for the attention weights (what decode-time eviction scores), the first kernel also writes each
// entry's logit per row and the merge turns the segment's logits into weights with the row's max and sum: the
// keys are read once per step for both attention and eviction.
//
// append_entries: one block per segment finds its first Q free slots (warp ballots, in slot order) and
// copies the tokens there; given the position order, it lists the new entries at its end.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

#include <torch/library.h>

#include "../checks.h"
#include "logits.cuh"
#include "segments.cuh"

namespace cakekv::cuda {

namespace {

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

constexpr int kAttnRows = 4;         // query rows per ragged_attention block (more rows: more blocks in y)
constexpr int kAttnThreads = 128;
constexpr int kEntriesPerGroup = 8;  // entries a lane group takes per step, loaded kBatch at a time
constexpr int kBatch = 4;
constexpr int kMaxHeadDim = 256;

// A lane group of kLanes lanes holds one row of a head (a query, key or value): lane l the kVec elements from
// l * kVec. With `vector` (rows 16-byte aligned, D a multiple of kVec) that is one or two 16-byte loads.
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

// Calls f(kVec, kLanes) (integral constants) for a head dim D <= kMaxHeadDim: kVec elements of at least 16 bytes
// per lane, kLanes = 8, 16 or 32 lanes per row.
template <typename scalar_t, typename F>
void with_row_layout(int64_t D, F&& f) {
  using std::integral_constant;
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (D <= 8 * kVec) f(integral_constant<int, kVec>{}, integral_constant<int, 8>{});
  else if (D <= 16 * kVec) f(integral_constant<int, kVec>{}, integral_constant<int, 16>{});
  else if (D <= 32 * kVec) f(integral_constant<int, kVec>{}, integral_constant<int, 32>{});
  else if constexpr (32 * kVec < kMaxHeadDim)  // fp32 rows of 129..256 (fp64 of 65..256): wider slices
    f(integral_constant<int, kMaxHeadDim / 32>{}, integral_constant<int, 32>{});
}

template <typename scalar_t, int kVec, int kLanes>
__global__ void __launch_bounds__(kAttnThreads) ragged_attention_partial_kernel(
    const scalar_t* __restrict__ q, const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
    const int64_t* __restrict__ pos, const int64_t* __restrict__ offsets, const int64_t* __restrict__ q_pos,
    float* __restrict__ part_acc, float* __restrict__ part_ml, float* __restrict__ weights, int64_t T, int64_t segs,
    int64_t chunk, int64_t H, int64_t Q, int64_t D, int64_t Hkv, float scale, float softcap, bool vector) {
  constexpr int kGroups = kAttnThreads / kLanes, kStep = kGroups * kEntriesPerGroup, kWidth = kLanes * kVec;
  __shared__ float p_s[kAttnRows][kStep];                  // logits of a step, then their exp
  __shared__ float red_s[kGroups * kAttnRows * kWidth];    // the groups' P·V, summed at the piece's end
  __shared__ float m_s[kAttnRows], l_s[kAttnRows], corr_s[kAttnRows];  // running max, sum, this step's rescale
  __shared__ int64_t qp_s[kAttnRows];
  const int64_t G = H / Hkv, rows = G * Q, r0 = int64_t(blockIdx.y) * kAttnRows;
  const int64_t start = int64_t(blockIdx.x) * chunk, end = std::min(T, start + chunk);
  const int R = int(std::min<int64_t>(kAttnRows, rows - r0));
  const int group = threadIdx.x / kLanes, lane = threadIdx.x % kLanes, first = lane * kVec;
  const int warp = threadIdx.x / 32, wlane = threadIdx.x % 32;
  for (int64_t seg = segment_of(offsets, segs, start); seg < segs && offsets[seg] < end; ++seg) {
    const int64_t lo = std::max(offsets[seg], start), hi = std::min(offsets[seg + 1], end);
    if (lo >= hi) continue;  // an empty segment: its rows get zeros from the merge
    const int64_t b = seg / Hkv, g = seg % Hkv, piece = int64_t(blockIdx.x) + seg;
    float qv[kAttnRows][kVec], acc[kAttnRows][kVec];
#pragma unroll
    for (int r = 0; r < kAttnRows; ++r) {
      if (r < R) load_slice<kVec>(q + query_row_offset(b, g, r0 + r, H, G, Q, D), first, int(D), vector, qv[r]);
#pragma unroll
      for (int c = 0; c < kVec; ++c) acc[r][c] = 0.f;
    }
    __syncthreads();  // the previous piece is done with shared memory
    if (threadIdx.x < R) {
      qp_s[threadIdx.x] = q_pos[b * Q + (r0 + threadIdx.x) % Q];
      m_s[threadIdx.x] = -INFINITY;
      l_s[threadIdx.x] = 0.f;
    }
    __syncthreads();
    for (int64_t c0 = lo; c0 < hi; c0 += kStep) {
      const int n = int(std::min<int64_t>(kStep, hi - c0));
      // Scores: group takes entries group + kGroups * u, a batch of rows loaded before any is used.
#pragma unroll
      for (int u0 = 0; u0 < kEntriesPerGroup; u0 += kBatch) {
        if (kGroups * u0 >= n) break;  // uniform: a short step skips the batch
        float kv[kBatch][kVec];
        int64_t p[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const int64_t t = c0 + std::min(group + kGroups * (u0 + u), n - 1);  // past the end: a repeat, unused
          p[u] = pos[t];
          load_slice<kVec>(k + t * D, first, int(D), vector, kv[u]);
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const int e = group + kGroups * (u0 + u);
#pragma unroll
          for (int r = 0; r < kAttnRows; ++r) {
            if (r >= R) break;  // uniform: every lane of the warp takes part in the shuffles
            float dot = 0.f;
#pragma unroll
            for (int c = 0; c < kVec; ++c) dot += qv[r][c] * kv[u][c];
#pragma unroll
            for (int off = kLanes / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
            if (lane == 0 && e < n)
              p_s[r][e] = (p[u] >= 0 && p[u] <= qp_s[r]) ? attention_logit(dot, scale, softcap) : -INFINITY;
          }
        }
      }
      __syncthreads();
      for (int r = warp; r < R; r += kAttnThreads / 32) {  // online softmax of row r over this step
        float mx = -INFINITY;
        for (int e = wlane; e < n; e += 32) mx = fmaxf(mx, p_s[r][e]);
#pragma unroll
        for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        const float m_old = m_s[r], m_new = fmaxf(m_old, mx);
        float sum = 0.f;
        for (int e = wlane; e < n; e += 32) {
          const float sc = p_s[r][e];
          if (weights != nullptr) weights[(r0 + r) * T + c0 + e] = sc;  // the logit; the merge normalises it
          const float w = sc == -INFINITY ? 0.f : expf(sc - m_new);
          p_s[r][e] = w;
          sum += w;
        }
#pragma unroll
        for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        __syncwarp();  // every lane has read m_s[r] before lane 0 rewrites it
        if (wlane == 0) {
          const float corr = m_old == -INFINITY ? 0.f : expf(m_old - m_new);  // nothing before: acc is 0
          corr_s[r] = corr;
          l_s[r] = l_s[r] * corr + sum;
          m_s[r] = m_new;
        }
      }
      __syncthreads();
      // P·V: each group over its entries, for its lanes' slices of the head dim.
#pragma unroll
      for (int r = 0; r < kAttnRows; ++r)
#pragma unroll
        for (int c = 0; c < kVec; ++c) acc[r][c] *= r < R ? corr_s[r] : 0.f;
#pragma unroll
      for (int u0 = 0; u0 < kEntriesPerGroup; u0 += kBatch) {
        if (kGroups * u0 >= n) break;
        float vv[kBatch][kVec];
#pragma unroll
        for (int u = 0; u < kBatch; ++u)
          load_slice<kVec>(v + (c0 + std::min(group + kGroups * (u0 + u), n - 1)) * D, first, int(D), vector, vv[u]);
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const int e = group + kGroups * (u0 + u);
          if (e >= n) break;
#pragma unroll
          for (int r = 0; r < kAttnRows; ++r) {
            if (r >= R) break;
            const float w = p_s[r][e];
#pragma unroll
            for (int c = 0; c < kVec; ++c) acc[r][c] += w * vv[u][c];
          }
        }
      }
      __syncthreads();  // p_s is rewritten by the next step
    }
    // The piece's P·V: the groups' partial sums added up.
#pragma unroll
    for (int r = 0; r < kAttnRows; ++r)
#pragma unroll
      for (int c = 0; c < kVec; ++c) red_s[(group * kAttnRows + r) * kWidth + first + c] = acc[r][c];
    __syncthreads();
    for (int64_t x = threadIdx.x; x < int64_t(R) * D; x += kAttnThreads) {
      const int r = int(x / D), d = int(x % D);
      float sum = 0.f;
#pragma unroll 4
      for (int gr = 0; gr < kGroups; ++gr) sum += red_s[(gr * kAttnRows + r) * kWidth + d];
      part_acc[(piece * rows + r0 + r) * D + d] = sum;
    }
    if (threadIdx.x < R) {
      const int64_t slot = piece * rows + r0 + threadIdx.x;
      part_ml[2 * slot] = m_s[threadIdx.x];
      part_ml[2 * slot + 1] = l_s[threadIdx.x];
    }
  }
}

template <typename scalar_t>
__global__ void ragged_attention_merge_kernel(const float* __restrict__ part_acc, const float* __restrict__ part_ml,
                                              const int64_t* __restrict__ offsets, scalar_t* __restrict__ out,
                                              float* __restrict__ weights, int64_t T, int64_t chunk, int64_t H,
                                              int64_t Q, int64_t D, int64_t Hkv) {
  const int64_t G = H / Hkv, rows = G * Q;
  const int64_t seg = blockIdx.x / rows, r = blockIdx.x % rows, b = seg / Hkv, g = seg % Hkv;
  const int64_t lo = offsets[seg], hi = offsets[seg + 1];
  // The segment's pieces: blocks first .. last (none when it is empty), merged online, kLoads at a time.
  constexpr int kLoads = 8;
  const int64_t first = lo / chunk, last = hi > lo ? (hi - 1) / chunk : first - 1;
  scalar_t* o = out + query_row_offset(b, g, r, H, G, Q, D);
  float mx = -INFINITY, denom = 0.f;
  for (int64_t d0 = 0; d0 < D; d0 += blockDim.x) {  // one pass for head dims up to blockDim.x
    const int64_t d = d0 + threadIdx.x;
    float m_run = -INFINITY, l_run = 0.f, sum = 0.f;
    for (int64_t j0 = first; j0 <= last; j0 += kLoads) {
      float m[kLoads], l[kLoads], a[kLoads];
#pragma unroll
      for (int u = 0; u < kLoads; ++u) {
        const int64_t slot = (j0 + u + seg) * rows + r;
        const bool in = j0 + u <= last;
        m[u] = in ? part_ml[2 * slot] : -INFINITY;
        l[u] = in ? part_ml[2 * slot + 1] : 0.f;
        a[u] = in && d < D ? part_acc[slot * D + d] : 0.f;
      }
#pragma unroll
      for (int u = 0; u < kLoads; ++u) {
        if (m[u] == -INFINITY) continue;  // a piece that sees nothing
        const float m_new = fmaxf(m_run, m[u]);
        const float old = m_run == -INFINITY ? 0.f : expf(m_run - m_new), fresh = expf(m[u] - m_new);
        l_run = l_run * old + l[u] * fresh;
        sum = sum * old + a[u] * fresh;
        m_run = m_new;
      }
    }
    if (d < D) o[d] = static_cast<scalar_t>(l_run > 0.f ? sum / l_run : 0.f);  // sees no entry: zeros
    mx = m_run;
    denom = l_run;
  }
  const float inv = denom > 0.f ? 1.f / denom : 0.f;
  if (weights != nullptr) {  // the row's logits over the segment become weights; loads batched before stores
    float* w = weights + r * T;
    for (int64_t t0 = lo + threadIdx.x; t0 < hi; t0 += kLoads * int64_t(blockDim.x)) {
      float logit[kLoads];
#pragma unroll
      for (int u = 0; u < kLoads; ++u) {
        const int64_t t = t0 + u * int64_t(blockDim.x);
        logit[u] = t < hi ? w[t] : -INFINITY;
      }
#pragma unroll
      for (int u = 0; u < kLoads; ++u) {
        const int64_t t = t0 + u * int64_t(blockDim.x);
        if (t < hi) w[t] = logit[u] == -INFINITY ? 0.f : expf(logit[u] - mx) * inv;
      }
    }
  }
}

constexpr int kAppendThreads = 512;

template <typename scalar_t>
__global__ void append_entries_kernel(scalar_t* __restrict__ k, scalar_t* __restrict__ v, int64_t* __restrict__ pos,
                                      const int64_t* __restrict__ offsets, const scalar_t* __restrict__ new_k,
                                      const scalar_t* __restrict__ new_v, const int64_t* __restrict__ q_pos,
                                      int32_t* __restrict__ order, int64_t* __restrict__ slots, int64_t Hkv,
                                      int64_t Q, int64_t D) {
  __shared__ int warp_free[kAppendThreads / 32];
  __shared__ int scratch[33];
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
  int valid = 0;  // entries stored before this append: the length of the position order
  if (order != nullptr) {
    int mine = 0;
    for (int64_t t = lo + threadIdx.x; t < hi; t += kAppendThreads) mine += pos[t] >= 0;
    block_exclusive_scan<int>(mine, scratch, valid);  // ends with a barrier: pos is read before it is written
  }
  __syncthreads();
  for (int64_t x = threadIdx.x; x < Q * D; x += kAppendThreads) {
    const int64_t r = x / D, d = x % D, t = seg_slots[r];
    k[t * D + d] = new_k[(seg * Q + r) * D + d];
    v[t * D + d] = new_v[(seg * Q + r) * D + d];
  }
  for (int64_t r = threadIdx.x; r < Q; r += kAppendThreads) {
    pos[seg_slots[r]] = q_pos[b * Q + r];
    if (order != nullptr) order[lo + valid + r] = int32_t(seg_slots[r] - lo);  // the newest positions come last
  }
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

std::tuple<at::Tensor, at::Tensor> ragged_attention(const at::Tensor& q_in, const at::Tensor& k_in,
                                                    const at::Tensor& v_in, const at::Tensor& pos_in,
                                                    const at::Tensor& offsets_in, const at::Tensor& q_pos_in,
                                                    double scale, double softcap, bool return_weights) {
  check_ragged_attention_args(q_in, k_in, v_in, pos_in, offsets_in, q_pos_in, softcap);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), H = q_in.size(1), Q = q_in.size(2), D = q_in.size(3), T = k_in.size(0);
  const int64_t segs = offsets_in.size(0) - 1, Hkv = segs / B, rows = (H / Hkv) * Q;
  TORCH_CHECK(D <= kMaxHeadDim, "ragged_attention (CUDA): head dim ", D, " above ", kMaxHeadDim);
  auto out = at::empty({B, H, Q, D}, q_in.options());
  auto weights = at::empty({return_weights ? rows : 0, T}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, weights.zero_()};
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(), pos = pos_in.contiguous(),
             offsets = offsets_in.contiguous(), q_pos = q_pos_in.contiguous();
  // About two blocks per SM, at least a step of entries each (the host does not read the offsets).
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t tiles = (rows + kAttnRows - 1) / kAttnRows;
  auto f32 = q_in.options().dtype(at::kFloat);
  float* weights_ptr = return_weights ? weights.mutable_data_ptr<float>() : nullptr;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "ragged_attention_cuda", [&] {
    with_row_layout<scalar_t>(D, [&](auto vec, auto lanes) {
      constexpr int kVec = decltype(vec)::value, kLanes = decltype(lanes)::value;
      constexpr int64_t kStep = kAttnThreads / kLanes * kEntriesPerGroup;
      const int64_t chunk = std::max<int64_t>(kStep, (T + 2 * sms - 1) / (2 * sms));
      const int64_t blocks = std::max<int64_t>(1, (T + chunk - 1) / chunk), pieces = blocks + segs;
      auto part_acc = at::empty({pieces * rows, D}, f32), part_ml = at::empty({pieces * rows, 2}, f32);
      const auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; };
      const bool vector = D % kVec == 0 && aligned(q) && aligned(k) && aligned(v);
      if (T > 0) {
        ragged_attention_partial_kernel<scalar_t, kVec, kLanes>
            <<<dim3(unsigned(blocks), unsigned(tiles)), kAttnThreads, 0, stream>>>(
            q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
            pos.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(), q_pos.const_data_ptr<int64_t>(),
            part_acc.mutable_data_ptr<float>(), part_ml.mutable_data_ptr<float>(), weights_ptr, T, segs, chunk, H,
            Q, D, Hkv, static_cast<float>(scale), static_cast<float>(softcap), vector);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      ragged_attention_merge_kernel<scalar_t><<<unsigned(segs * rows), 128, 0, stream>>>(
          part_acc.const_data_ptr<float>(), part_ml.const_data_ptr<float>(), offsets.const_data_ptr<int64_t>(),
          out.mutable_data_ptr<scalar_t>(), weights_ptr, T, chunk, H, Q, D, Hkv);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, weights};
}

void append_entries(const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos, const at::Tensor& offsets_in,
                    const at::Tensor& new_k_in, const at::Tensor& new_v_in, const at::Tensor& q_pos_in,
                    const std::optional<at::Tensor>& order) {
  check_append_entries_args(k, v, pos, offsets_in, new_k_in, new_v_in, q_pos_in, order);
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
        q_pos.const_data_ptr<int64_t>(), order ? order->mutable_data_ptr<int32_t>() : nullptr,
        slots.mutable_data_ptr<int64_t>(), Hkv, Q, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cakekv::cuda

TORCH_LIBRARY_IMPL(cakekv, CUDA, m) {
  m.impl("gather_ragged", &cakekv::cuda::gather_ragged);
  m.impl("ragged_attention", &cakekv::cuda::ragged_attention);
  m.impl("append_entries", &cakekv::cuda::append_entries);
}
