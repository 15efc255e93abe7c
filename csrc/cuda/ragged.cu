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

constexpr int kAttnRows = 8;     // query rows per ragged_attention block
constexpr int kChunk = 64;       // entries scored per step by a ragged_attention block
constexpr int kAttnThreads = 128;
constexpr int kMaxDimSlots = (32 * kMaxPerLane + kAttnThreads - 1) / kAttnThreads;  // head dims per thread

template <typename scalar_t, int kPerLane>
__global__ void ragged_attention_partial_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                                const scalar_t* __restrict__ v, const int64_t* __restrict__ pos,
                                                const int64_t* __restrict__ offsets,
                                                const int64_t* __restrict__ q_pos, float* __restrict__ part_acc,
                                                float* __restrict__ part_ml, float* __restrict__ weights,
                                                int64_t T, int64_t segs, int64_t chunk,
                                                int64_t H, int64_t Q, int64_t D, int64_t Hkv, float scale) {
  extern __shared__ float smem[];
  float* q_s = smem;                              // [kAttnRows, D]
  float* p_s = q_s + kAttnRows * D;               // [kAttnRows, kChunk] scores, then probabilities
  float* m_s = p_s + kAttnRows * kChunk;          // [kAttnRows] running max
  float* l_s = m_s + kAttnRows;                   // [kAttnRows] running sum
  float* corr_s = l_s + kAttnRows;                // [kAttnRows] rescale of this step
  __shared__ int64_t qp_s[kAttnRows];
  const int64_t G = H / Hkv, rows = G * Q, r0 = int64_t(blockIdx.y) * kAttnRows;
  const int64_t start = int64_t(blockIdx.x) * chunk, end = std::min(T, start + chunk);
  const int R = int(std::min<int64_t>(kAttnRows, rows - r0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = kAttnThreads / 32;
  for (int64_t seg = segment_of(offsets, segs, start); seg < segs && offsets[seg] < end; ++seg) {
    const int64_t lo = std::max(offsets[seg], start), hi = std::min(offsets[seg + 1], end);
    if (lo >= hi) continue;  // an empty segment: its rows get zeros from the merge
    const int64_t b = seg / Hkv, g = seg % Hkv, piece = int64_t(blockIdx.x) + seg;
    __syncthreads();  // the previous piece is done with shared memory
    for (int64_t x = threadIdx.x; x < int64_t(R) * D; x += kAttnThreads) {
      const int64_t r = x / D, d = x % D;
      q_s[r * D + d] = static_cast<float>(q[query_row_offset(b, g, r0 + r, H, G, Q, D) + d]);
    }
    if (threadIdx.x < R) {
      qp_s[threadIdx.x] = q_pos[b * Q + (r0 + threadIdx.x) % Q];
      m_s[threadIdx.x] = -INFINITY;
      l_s[threadIdx.x] = 0.f;
    }
    float acc[kAttnRows][kMaxDimSlots];
#pragma unroll
    for (int r = 0; r < kAttnRows; ++r)
#pragma unroll
      for (int c = 0; c < kMaxDimSlots; ++c) acc[r][c] = 0.f;
    __syncthreads();

    for (int64_t c0 = lo; c0 < hi; c0 += kChunk) {
      const int n = int(std::min<int64_t>(kChunk, hi - c0));
      for_warp_entries<kAttnRows, kPerLane>(k, pos, c0, c0 + n, q_s, R, int(D),  // scores of the entries against every row
                                  [&](int64_t t, int64_t p, const float (&dot)[kAttnRows]) {
        if (lane == 0)
          for (int r = 0; r < R; ++r)
            p_s[r * kChunk + (t - c0)] = (p >= 0 && p <= qp_s[r]) ? dot[r] * scale : -INFINITY;
      });
      __syncthreads();
      for (int r = warp; r < R; r += warps) {  // online softmax of row r over this step
        float mx = -INFINITY;
        for (int e = lane; e < n; e += 32) mx = fmaxf(mx, p_s[r * kChunk + e]);
#pragma unroll
        for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        const float m_old = m_s[r], m_new = fmaxf(m_old, mx);
        float sum = 0.f;
        for (int e = lane; e < n; e += 32) {
          const float sc = p_s[r * kChunk + e];
          if (weights != nullptr) weights[(r0 + r) * T + c0 + e] = sc;  // the logit; the merge normalises it
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
      const int64_t slot = piece * rows + r0 + r;
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
}

template <typename scalar_t>
__global__ void ragged_attention_merge_kernel(const float* __restrict__ part_acc, const float* __restrict__ part_ml,
                                              const int64_t* __restrict__ offsets, scalar_t* __restrict__ out,
                                              float* __restrict__ weights, int64_t T, int64_t chunk, int64_t H,
                                              int64_t Q, int64_t D, int64_t Hkv) {
  const int64_t G = H / Hkv, rows = G * Q;
  const int64_t seg = blockIdx.x / rows, r = blockIdx.x % rows, b = seg / Hkv, g = seg % Hkv;
  const int64_t lo = offsets[seg], hi = offsets[seg + 1];
  // The segment's pieces: blocks first .. last (none when it is empty).
  const int64_t first = lo / chunk, last = hi > lo ? (hi - 1) / chunk : first - 1;
  float mx = -INFINITY;
  for (int64_t j = first; j <= last; ++j) mx = fmaxf(mx, part_ml[2 * ((j + seg) * rows + r)]);
  float denom = 0.f;
  for (int64_t j = first; j <= last; ++j) {
    const int64_t slot = (j + seg) * rows + r;
    const float m = part_ml[2 * slot];
    denom += (m == -INFINITY ? 0.f : expf(m - mx)) * part_ml[2 * slot + 1];
  }
  const float inv = denom > 0.f ? 1.f / denom : 0.f;  // a query that sees no entry gets zeros
  scalar_t* o = out + query_row_offset(b, g, r, H, G, Q, D);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float sum = 0.f;
    for (int64_t j = first; j <= last; ++j) {
      const int64_t slot = (j + seg) * rows + r;
      const float m = part_ml[2 * slot];
      if (m != -INFINITY) sum += expf(m - mx) * part_acc[slot * D + d];
    }
    o[d] = static_cast<scalar_t>(sum * inv);
  }
  if (weights != nullptr)
    for (int64_t t = lo + threadIdx.x; t < hi; t += blockDim.x) {
      const float logit = weights[r * T + t];
      weights[r * T + t] = logit == -INFINITY ? 0.f : expf(logit - mx) * inv;
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
                                                    double scale, bool return_weights) {
  check_ragged_attention_args(q_in, k_in, v_in, pos_in, offsets_in, q_pos_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), H = q_in.size(1), Q = q_in.size(2), D = q_in.size(3), T = k_in.size(0);
  const int64_t segs = offsets_in.size(0) - 1, Hkv = segs / B, rows = (H / Hkv) * Q;
  TORCH_CHECK(D <= 32 * kMaxPerLane, "ragged_attention (CUDA): head dim ", D, " above ", 32 * kMaxPerLane);
  auto out = at::empty({B, H, Q, D}, q_in.options());
  auto weights = at::empty({return_weights ? rows : 0, T}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, weights.zero_()};
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(), pos = pos_in.contiguous(),
             offsets = offsets_in.contiguous(), q_pos = q_pos_in.contiguous();
  // About two blocks per SM, at least kChunk entries each (the host does not read the offsets).
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t chunk = std::max<int64_t>(kChunk, (T + 2 * sms - 1) / (2 * sms));
  const int64_t blocks = std::max<int64_t>(1, (T + chunk - 1) / chunk), pieces = blocks + segs;
  const int64_t tiles = (rows + kAttnRows - 1) / kAttnRows;
  auto part_acc = at::empty({pieces * rows, D}, q_in.options().dtype(at::kFloat));
  auto part_ml = at::empty({pieces * rows, 2}, q_in.options().dtype(at::kFloat));
  float* weights_ptr = return_weights ? weights.mutable_data_ptr<float>() : nullptr;
  const size_t smem = sizeof(float) * size_t(kAttnRows * D + kAttnRows * kChunk + 3 * kAttnRows);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "ragged_attention_cuda", [&] {
    if (T > 0) with_dims_per_lane(D, [&](auto per_lane) {
      ragged_attention_partial_kernel<scalar_t, decltype(per_lane)::value>
          <<<dim3(unsigned(blocks), unsigned(tiles)), kAttnThreads, smem, stream>>>(
          q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
          pos.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(), q_pos.const_data_ptr<int64_t>(),
          part_acc.mutable_data_ptr<float>(), part_ml.mutable_data_ptr<float>(), weights_ptr, T, segs, chunk, H, Q,
          D, Hkv, static_cast<float>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    ragged_attention_merge_kernel<scalar_t><<<unsigned(segs * rows), 128, 0, stream>>>(
        part_acc.const_data_ptr<float>(), part_ml.const_data_ptr<float>(), offsets.const_data_ptr<int64_t>(),
        out.mutable_data_ptr<scalar_t>(), weights_ptr, T, chunk, H, Q, D, Hkv);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
