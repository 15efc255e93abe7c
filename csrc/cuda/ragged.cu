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
// index j + s (one-to-one: segments are contiguous and ordered). The grid is one wave (the step is latency-
// bound: what pays is warps in flight and loads issued early, not fewer bytes). A block takes up to kAttnRows of
// the G*Q query rows of one kv head, a team of threads per row; their K/V reads are the same rows (L1 serves all
// but the first). In a team, lane groups split the head dim (16-byte slices, shuffle reductions) and each group
// loads its next entries' positions, keys and values at once, then keeps its own online softmax in registers;
// the groups are combined once per piece. A second kernel merges the pieces of every (segment, row). A long
// chunk's rows go in tiles, a launch pair each, so that the partial results stay within kPartialBytes and the
// grid within CUDA's limits whatever Q is (decode steps are one tile).
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
#include <limits>

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

constexpr int kAttnRows = 4;          // query rows per ragged_attention block (more rows: more blocks in y)
constexpr int64_t kMaxGridY = 65535;  // CUDA's limit on gridDim.y
constexpr int64_t kPartialBytes = int64_t(32) << 20;  // partial results of one tile of query rows, at most
constexpr int kRowThreads = 128;      // the team of threads that attends for one query row
constexpr int kEntriesPerGroup = 4;   // entries a lane group takes per step, all loaded before any is used
constexpr int kMaxHeadDim = 256;

// The kVec elements of one row of a head (a query, key or value) that lane l of a lane group holds: those from
// l * kVec, kept in their storage type until used (registers: a slice of bf16 is one 16-byte word).
template <typename scalar_t, int kVec>
struct alignas(16) Slice {
  static_assert(kVec * sizeof(scalar_t) % 16 == 0, "a slice is whole 16-byte words");
  static constexpr int kWords = kVec * sizeof(scalar_t) / 16;
  scalar_t e[kVec];
};

// With `vector` (rows 16-byte aligned, D a multiple of kVec) one or more 16-byte loads; zeros past D.
template <typename scalar_t, int kVec>
__device__ __forceinline__ void load_slice(const scalar_t* __restrict__ row, int first, int D, bool vector,
                                           Slice<scalar_t, kVec>& out) {
  if (vector) {
    uint4* words = reinterpret_cast<uint4*>(out.e);
#pragma unroll
    for (int i = 0; i < Slice<scalar_t, kVec>::kWords; ++i)
      words[i] = first < D ? reinterpret_cast<const uint4*>(row + first)[i] : make_uint4(0, 0, 0, 0);
  } else {
#pragma unroll
    for (int c = 0; c < kVec; ++c) out.e[c] = first + c < D ? row[first + c] : scalar_t(0.f);
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

// A block attends for up to kAttnRows query rows of one kv head, a team of kRowThreads threads per row (more
// warps per SM than one team walking all rows: the step is latency-bound). The teams read the same keys and
// values (the other teams' reads hit L1). In a team each lane group keeps its own online softmax (running max,
// sum and P·V, in registers) over the entries it takes, so the step loop has no barrier and no shared memory;
// the groups are combined once per piece.
template <typename scalar_t, int kVec, int kLanes>
__global__ void __launch_bounds__(kRowThreads * kAttnRows) ragged_attention_partial_kernel(
    const scalar_t* __restrict__ q, const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
    const int64_t* __restrict__ pos, const int64_t* __restrict__ offsets, const int64_t* __restrict__ q_pos,
    float* __restrict__ part_acc, float* __restrict__ part_ml, float* __restrict__ weights, int64_t T, int64_t segs,
    int64_t chunk, int row0, int tile, int64_t H, int64_t Q, int64_t D, int64_t Hkv, float scale, float softcap,
    bool vector) {
  constexpr int kGroups = kRowThreads / kLanes, kStep = kGroups * kEntriesPerGroup, kWidth = kLanes * kVec;
  using SliceT = Slice<scalar_t, kVec>;
  __shared__ float red_s[kAttnRows][kGroups][kWidth];  // the groups' P·V, rescaled to the team's max
  __shared__ float ml_s[kAttnRows][kGroups][2];        // the groups' running max and sum
  __shared__ int64_t first_seg_s;
  const int G = int(H / Hkv), team = threadIdx.x / kRowThreads, tid = threadIdx.x % kRowThreads;
  const int local = int(blockIdx.y) * kAttnRows + team;  // this team's row in the tile (rows row0 .. row0 + tile)
  const int r = row0 + local;
  const bool active = local < tile;  // past the tile's last row a team only takes barriers
  const int64_t start = int64_t(blockIdx.x) * chunk, end = std::min(T, start + chunk);
  const int group = tid / kLanes, lane = tid % kLanes, first = lane * kVec, dim = int(D);
  // The segment holding `start` (the one non-empty segment around it), found in one parallel pass.
  for (int64_t s = threadIdx.x; s < segs; s += blockDim.x)
    if (offsets[s] <= start && start < offsets[s + 1]) first_seg_s = s;
  __syncthreads();
  for (int64_t seg = first_seg_s; seg < segs; ++seg) {
    if (offsets[seg] >= end) break;
    const int64_t lo = std::max(offsets[seg], start), hi = std::min(offsets[seg + 1], end);
    if (lo >= hi) continue;  // an empty segment: its rows get zeros from the merge
    const int64_t b = seg / Hkv, g = seg % Hkv, piece = int64_t(blockIdx.x) + seg;
    float qv[kVec], acc[kVec], m = -INFINITY, l = 0.f;
    int64_t qp = -1;
    {
      SliceT qs;
      if (active) {
        load_slice(q + query_row_offset(b, g, r, H, G, int(Q), D), first, dim, vector, qs);
        qp = q_pos[b * Q + r % int(Q)];
      }
#pragma unroll
      for (int c = 0; c < kVec; ++c) {
        qv[c] = active ? static_cast<float>(qs.e[c]) : 0.f;
        acc[c] = 0.f;
      }
    }
    // Steps uniform over the team (every lane takes part in the shuffles); a group past the piece's end scores
    // repeats of its last entry, masked.
    for (int64_t step = lo; active && step < hi; step += kStep) {
      const int64_t c0 = step + group * kEntriesPerGroup;
      SliceT ks[kEntriesPerGroup], vs[kEntriesPerGroup];
      int64_t p[kEntriesPerGroup];
#pragma unroll
      for (int u = 0; u < kEntriesPerGroup; ++u) {
        const int64_t t = std::min(c0 + u, hi - 1);
        p[u] = c0 + u < hi ? pos[t] : -1;
        load_slice(k + t * D, first, dim, vector, ks[u]);
        load_slice(v + t * D, first, dim, vector, vs[u]);
      }
      float logit[kEntriesPerGroup];
#pragma unroll
      for (int u = 0; u < kEntriesPerGroup; ++u) {
        float dot = 0.f;
#pragma unroll
        for (int c = 0; c < kVec; ++c) dot += qv[c] * static_cast<float>(ks[u].e[c]);
#pragma unroll
        for (int off = kLanes / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        logit[u] = (p[u] >= 0 && p[u] <= qp) ? attention_logit(dot, scale, softcap) : -INFINITY;
      }
      if (weights != nullptr) {  // the logits; the merge normalises them. Lane u % kLanes writes entry u.
#pragma unroll
        for (int u = 0; u < kEntriesPerGroup; ++u)
          if (lane == u % kLanes && c0 + u < hi) weights[int64_t(r) * T + c0 + u] = logit[u];
      }
      float mx = m;
#pragma unroll
      for (int u = 0; u < kEntriesPerGroup; ++u) mx = fmaxf(mx, logit[u]);
      if (mx == -INFINITY) continue;  // nothing visible yet: acc stays 0
      const float corr = m == -INFINITY ? 0.f : expf(m - mx);
      l *= corr;
#pragma unroll
      for (int c = 0; c < kVec; ++c) acc[c] *= corr;
#pragma unroll
      for (int u = 0; u < kEntriesPerGroup; ++u) {
        const float w = logit[u] == -INFINITY ? 0.f : expf(logit[u] - mx);
        l += w;
#pragma unroll
        for (int c = 0; c < kVec; ++c) acc[c] += w * static_cast<float>(vs[u].e[c]);
      }
      m = mx;
    }
    // The piece's result for this row: the groups' states rescaled to the team's max and added up.
    if (lane == 0) {
      ml_s[team][group][0] = m;
      ml_s[team][group][1] = l;
    }
    __syncthreads();
    float top = -INFINITY;
#pragma unroll
    for (int gr = 0; gr < kGroups; ++gr) top = fmaxf(top, ml_s[team][gr][0]);
    const float mine = m == -INFINITY ? 0.f : expf(m - top);
#pragma unroll
    for (int c = 0; c < kVec; ++c) red_s[team][group][first + c] = acc[c] * mine;
    __syncthreads();
    const int64_t slot = piece * tile + local;
    for (int d = tid; active && d < dim; d += kRowThreads) {
      float sum = 0.f;
#pragma unroll
      for (int gr = 0; gr < kGroups; ++gr) sum += red_s[team][gr][d];
      part_acc[slot * D + d] = sum;
    }
    if (active && tid == 0) {
      float sum = 0.f;
#pragma unroll
      for (int gr = 0; gr < kGroups; ++gr)
        sum += ml_s[team][gr][0] == -INFINITY ? 0.f : ml_s[team][gr][1] * expf(ml_s[team][gr][0] - top);
      part_ml[2 * slot] = top;
      part_ml[2 * slot + 1] = sum;
    }
    __syncthreads();  // shared memory is rewritten by the next piece
  }
}

template <typename scalar_t>
__global__ void ragged_attention_merge_kernel(const float* __restrict__ part_acc, const float* __restrict__ part_ml,
                                              const int64_t* __restrict__ offsets, scalar_t* __restrict__ out,
                                              float* __restrict__ weights, int64_t T, int64_t chunk, int row0,
                                              int tile, int64_t H, int64_t Q, int64_t D, int64_t Hkv) {
  const int G = int(H / Hkv), local = int(blockIdx.x % unsigned(tile)), r = row0 + local;
  const int64_t seg = blockIdx.x / unsigned(tile), b = seg / Hkv, g = seg % Hkv;
  const int64_t lo = offsets[seg], hi = offsets[seg + 1];
  // The segment's pieces: blocks first .. last (none when it is empty), merged online, kLoads at a time.
  constexpr int kLoads = 16;
  const int64_t first = lo / chunk, last = hi > lo ? (hi - 1) / chunk : first - 1;
  scalar_t* o = out + query_row_offset(b, g, r, H, G, int(Q), D);
  float mx = -INFINITY, denom = 0.f;
  for (int64_t d0 = 0; d0 < D; d0 += blockDim.x) {  // one pass for head dims up to blockDim.x
    const int64_t d = d0 + threadIdx.x;
    float m_run = -INFINITY, l_run = 0.f, sum = 0.f;
    for (int64_t j0 = first; j0 <= last; j0 += kLoads) {
      float m[kLoads], l[kLoads], a[kLoads];
#pragma unroll
      for (int u = 0; u < kLoads; ++u) {
        const int64_t slot = (j0 + u + seg) * tile + local;
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
    float* w = weights + int64_t(r) * T;
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

// One launch pair of ragged_attention over `rows` consecutive query rows: the layer's entries cut into `blocks`
// chunks of `chunk` entries, times row_blocks() blocks of kAttnRows rows.
struct RowTile {
  int64_t rows, chunk, blocks;
  int64_t row_blocks() const { return (rows + kAttnRows - 1) / kAttnRows; }
  int64_t pieces(int64_t segs) const { return blocks + segs; }  // partial results per row (see the top)
  int64_t partial_bytes(int64_t segs, int64_t D) const {
    return pieces(segs) * rows * (D + 2) * int64_t(sizeof(float));
  }
};

// How ragged_attention cuts its G*Q query rows into tiles: each tile's blocks make one wave of `wave` blocks,
// with at least `step` entries each (the host does not read the offsets), and its partial results fit
// kPartialBytes (down to one block of rows: then they grow with the segments, never with Q).
struct RowTiling {
  int64_t T, segs, D, wave, step;

  RowTile tile(int64_t rows) const {
    const int64_t row_blocks = (rows + kAttnRows - 1) / kAttnRows;
    const int64_t chunk = std::max(step, (T * row_blocks + wave - 1) / wave);
    return {rows, chunk, std::max<int64_t>(1, (T + chunk - 1) / chunk)};
  }

  // Rows of every tile but the last (which has fewer, and no larger partial results).
  int64_t tile_rows(int64_t rows) const {
    int64_t n = std::min(rows, kMaxGridY * kAttnRows);
    while (n > kAttnRows && tile(n).partial_bytes(segs, D) > kPartialBytes)
      n = (n / 2 + kAttnRows - 1) / kAttnRows * kAttnRows;
    return n;
  }
};

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
  TORCH_CHECK(rows <= std::numeric_limits<int>::max(), "ragged_attention (CUDA): ", rows,
              " query rows per kv head (query heads per kv head times Q) above 2^31 - 1");
  auto out = at::empty({B, H, Q, D}, q_in.options());
  auto weights = at::empty({return_weights ? rows : 0, T}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, weights.zero_()};
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(), pos = pos_in.contiguous(),
             offsets = offsets_in.contiguous(), q_pos = q_pos_in.contiguous();
  // A team of threads per query row, up to kAttnRows rows per block.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const auto threads = unsigned(kRowThreads * std::min<int64_t>(kAttnRows, rows));
  float* weights_ptr = return_weights ? weights.mutable_data_ptr<float>() : nullptr;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "ragged_attention_cuda", [&] {
    with_row_layout<scalar_t>(D, [&](auto vec, auto lanes) {
      constexpr int kVec = decltype(vec)::value, kLanes = decltype(lanes)::value;
      const auto kernel = ragged_attention_partial_kernel<scalar_t, kVec, kLanes>;
      int resident = 1;  // blocks per SM: a tile's blocks make one wave
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, int(threads), 0));
      const RowTiling tiling{T, segs, D, std::max(1, resident) * sms, kRowThreads / kLanes * kEntriesPerGroup};
      const auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; };
      const bool vector = D % kVec == 0 && aligned(q) && aligned(k) && aligned(v);
      const int64_t tile_rows = tiling.tile_rows(rows);
      for (int64_t row0 = 0; row0 < rows; row0 += tile_rows) {
        const RowTile tile = tiling.tile(std::min(tile_rows, rows - row0));
        auto part_acc = at::empty({tile.pieces(segs) * tile.rows, D}, q_in.options().dtype(at::kFloat));
        auto part_ml = at::empty({tile.pieces(segs) * tile.rows, 2}, part_acc.options());
        if (T > 0) {
          kernel<<<dim3(unsigned(tile.blocks), unsigned(tile.row_blocks())), threads, 0, stream>>>(
              q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
              pos.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(), q_pos.const_data_ptr<int64_t>(),
              part_acc.mutable_data_ptr<float>(), part_ml.mutable_data_ptr<float>(), weights_ptr, T, segs,
              tile.chunk, int(row0), int(tile.rows), H, Q, D, Hkv, static_cast<float>(scale),
              static_cast<float>(softcap), vector);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        ragged_attention_merge_kernel<scalar_t><<<unsigned(segs * tile.rows), 128, 0, stream>>>(
            part_acc.const_data_ptr<float>(), part_ml.const_data_ptr<float>(), offsets.const_data_ptr<int64_t>(),
            out.mutable_data_ptr<scalar_t>(), weights_ptr, T, tile.chunk, int(row0), int(tile.rows), H, Q, D, Hkv);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
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
