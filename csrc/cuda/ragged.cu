// CUDA kernels of the ragged layout (contracts in ops.h).
//
// gather_ragged: a grid-stride loop over kept entries; each entry finds its segment by binary search in
// offsets (B * Hkv + 1 values) and copies its K and V rows. Indices are checked on the device
// (CUDA_KERNEL_ASSERT), so the op needs no host sync.
//
// ragged_attention: one block per (b, h, query). The query row is staged in shared memory as fp32; each
// warp streams over every kWarps-th entry of the segment, lanes split the head dim for the dot product
// (warp shuffle reduction) and keep an online softmax (running max, running sum, fp32 accumulator of
// D / 32 values per lane). The warps' partial states are merged in shared memory at the end.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

#include "../ops.h"

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

template <typename scalar_t>
__global__ void ragged_attention_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                        const scalar_t* __restrict__ v, const int64_t* __restrict__ pos,
                                        const int64_t* __restrict__ offsets, const int64_t* __restrict__ q_pos,
                                        scalar_t* __restrict__ out, int64_t H, int64_t Q, int64_t D,
                                        int64_t Hkv, float scale) {
  extern __shared__ float smem[];
  float* q_s = smem;                          // [D]
  float* acc_s = q_s + D;                     // [kWarps, D]
  float* stat_s = acc_s + kWarps * D;         // [kWarps, 2]: running max, running sum
  const int64_t row = blockIdx.x;             // (b * H + h) * Q + i
  const int64_t i = row % Q, bh = row / Q, h = bh % H, b = bh / H;
  const int64_t seg = b * Hkv + h / (H / Hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) q_s[d] = static_cast<float>(q[row * D + d]);
  __syncthreads();

  const int64_t qp = q_pos[b * Q + i], lo = offsets[seg], hi = offsets[seg + 1];
  float m = -INFINITY, l = 0.f, acc[kMaxPerLane];
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) acc[c] = 0.f;
  for (int64_t t = lo + warp; t < hi; t += kWarps) {
    const int64_t p = pos[t];
    if (p < 0 || p > qp) continue;  // uniform across the warp
    const scalar_t* kt = k + t * D;
    float dot = 0.f;
    for (int64_t d = lane; d < D; d += 32) dot += q_s[d] * static_cast<float>(kt[d]);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    const float sc = dot * scale, m_new = fmaxf(m, sc);
    const float corr = expf(m - m_new), w = expf(sc - m_new);  // m = -inf at first: corr = 0
    l = l * corr + w;
    const scalar_t* vt = v + t * D;
#pragma unroll
    for (int c = 0; c < kMaxPerLane; ++c) {
      const int64_t d = lane + 32 * c;
      if (d < D) acc[c] = acc[c] * corr + w * static_cast<float>(vt[d]);
    }
    m = m_new;
  }
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) {
    const int64_t d = lane + 32 * c;
    if (d < D) acc_s[warp * D + d] = acc[c];
  }
  if (lane == 0) {
    stat_s[2 * warp] = m;
    stat_s[2 * warp + 1] = l;
  }
  __syncthreads();
  float mx = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, stat_s[2 * w]);
  float f[kWarps], denom = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    f[w] = mx == -INFINITY ? 0.f : expf(stat_s[2 * w] - mx);  // a warp that saw nothing: exp(-inf) = 0
    denom += f[w] * stat_s[2 * w + 1];
  }
  const float inv = denom > 0.f ? 1.f / denom : 0.f;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += f[w] * acc_s[w * D + d];
    out[row * D + d] = static_cast<scalar_t>(o * inv);
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
  const int64_t B = q_in.size(0), H = q_in.size(1), Q = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = (offsets_in.size(0) - 1) / B;
  TORCH_CHECK(D <= 32 * kMaxPerLane, "ragged_attention (CUDA): head dim ", D, " above ", 32 * kMaxPerLane);
  auto out = at::empty({B, H, Q, D}, q_in.options());
  if (out.numel() == 0) return out;
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(), pos = pos_in.contiguous(),
             offsets = offsets_in.contiguous(), q_pos = q_pos_in.contiguous();
  const size_t smem = sizeof(float) * size_t(D + kWarps * D + 2 * kWarps);
  const auto rows = static_cast<unsigned>(B * H * Q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "ragged_attention_cuda", [&] {
    ragged_attention_kernel<scalar_t><<<rows, 32 * kWarps, smem, at::cuda::getCurrentCUDAStream()>>>(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        pos.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(), q_pos.const_data_ptr<int64_t>(),
        out.mutable_data_ptr<scalar_t>(), H, Q, D, Hkv, static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace cakekv::cuda
