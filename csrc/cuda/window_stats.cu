// CUDA kernels of window_stats (contract in register.cpp): pass 1 and the combine of attention_tiles.cuh (row
// groups of whole heads: 64 / Q heads when Q <= 64, else one head), then
//
//   pass 2  column_stats_kernel      grid (tiles, groups, B*Hkv): logits again, normalised, then per
//                                    (head, key) column: mean, two-pass unbiased variance, entropy
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <torch/library.h>

#include "../checks.h"
#include "attention_tiles.cuh"

namespace cakekv::cuda {

namespace {

// ---------------------------------------------------------------------------------------------
// Pass 2: one key tile per block; probabilities of the row group, then (head, key) column statistics.
template <typename scalar_t, bool kMma>
__global__ void __launch_bounds__(kThreads) column_stats_kernel(
    const scalar_t* __restrict__ q, const scalar_t* __restrict__ k, const int64_t* __restrict__ q_pos,
    const int64_t* __restrict__ k_pos, const float2* __restrict__ stats, Geometry geo, float* __restrict__ mean,
    float* __restrict__ var, float* __restrict__ ent) {
  const Smem s = carve_smem(geo.rows_alloc);
  const BlockRows br = block_rows(geo);
  const int t = threadIdx.x;
  const int64_t j0 = int64_t(blockIdx.x) * kKeys;
  const int nkeys = int(geo.N - j0 < kKeys ? geo.N - j0 : kKeys);
  const int g0 = br.r0 / geo.Q, hcnt = br.rows / geo.Q;  // the row group is whole heads
  normalised_logits<scalar_t, kMma>(q, k, q_pos, k_pos, stats, geo, br, j0, nkeys, s);

  // Columns are (head hh, key j); P adjacent lanes share a column and split its Q rows (P = 1, 2 or 4,
  // P * ncols <= 256). With P > 1 there is a single pass and the active lanes end on a warp boundary, so
  // every named lane reaches the shuffles.
  const int ncols = hcnt * kKeys;
  int P = 1;
  while (P * 2 * ncols <= kThreads && P * 2 <= geo.Q) P *= 2;
  const int part = t % P;
  const unsigned maskP = P == 1 ? 0u : ((1u << P) - 1u) << ((t % 32) & ~(P - 1));
  for (int col = t / P; col < ncols; col += kThreads / P) {
    const int hh = col / kKeys, j = col % kKeys;
    float* cells = s.tile + (hh * geo.Q) * kLdS + j;
    // First sweep: probabilities (stored back for the second sweep), their sum and sum of p ln(p + 1e-10).
    float sum = 0.f, plogp = 0.f;
    for (int i = part; i < geo.Q; i += P) {
      const float p = tile_probability(s, geo, hh * geo.Q + i, j);
      cells[i * kLdS] = p;
      sum += p;
      plogp += p * logf(p + 1e-10f);
    }
    sum = group_sum(sum, maskP, P);
    plogp = group_sum(plogp, maskP, P);
    const float mu = sum / float(geo.Q);
    // Second sweep: exact two-pass variance around the column mean.
    float m2 = 0.f;
    for (int i = part; i < geo.Q; i += P) {
      const float d = cells[i * kLdS] - mu;
      m2 = fmaf(d, d, m2);
    }
    m2 = group_sum(m2, maskP, P);
    if (part == 0 && j < nkeys) {
      const int64_t o = (int64_t(blockIdx.z) * geo.G + g0 + hh) * geo.N + j0 + j;
      mean[o] = mu;
      var[o] = geo.Q > 1 ? m2 / float(geo.Q - 1) : 0.f;
      ent[o] = -plogp;
    }
  }
}

template <typename scalar_t, bool kMma>
void launch_window_stats(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_pos, const at::Tensor& k_pos,
                         const Geometry& geo, int64_t BG, int num_groups, at::Tensor& mean, at::Tensor& var,
                         at::Tensor& ent) {
  auto stats = at::empty({BG * geo.R, 2}, q.options().dtype(at::kFloat));
  softmax_stats<scalar_t, kMma>(q, k, q_pos, k_pos, geo, BG, num_groups, stats);
  const int64_t smem = smem_bytes(geo.rows_alloc);
  auto pass2 = column_stats_kernel<scalar_t, kMma>;
  allow_smem(pass2, smem);
  pass2<<<dim3(geo.num_tiles, num_groups, BG), kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), q_pos.const_data_ptr<int64_t>(),
      k_pos.const_data_ptr<int64_t>(), reinterpret_cast<const float2*>(stats.const_data_ptr<float>()), geo,
      mean.mutable_data_ptr<float>(), var.mutable_data_ptr<float>(), ent.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The statistics of one run of queries whose (head, key) columns fit in shared memory.
std::tuple<at::Tensor, at::Tensor, at::Tensor> window_stats_fitting(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                    const at::Tensor& q_pos_in,
                                                                    const at::Tensor& k_pos_in, double scale,
                                                                    double softcap) {
  const int64_t B = q_in.size(0), H = q_in.size(1), Q = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), N = k_in.size(2), G = H / Hkv;
  auto opts = q_in.options().dtype(at::kFloat);
  if (B * H * Q * N == 0) {
    return {at::zeros({B, H, N}, opts), at::zeros({B, H, N}, opts), at::zeros({B, H, N}, opts)};
  }
  const auto q = q_in.contiguous(), k = k_in.contiguous();
  const auto q_pos = q_pos_in.contiguous(), k_pos = k_pos_in.contiguous();

  // Row groups of whole heads: all Q queries of a (head, key) column are in one block.
  const int64_t heads_per_group = Q <= kRows ? std::min<int64_t>(G, kRows / Q) : 1;
  const TilePlan plan = plan_tiles("window_stats", q, k, heads_per_group * Q, scale, softcap);
  auto mean = at::empty({B, H, N}, opts), var = at::empty({B, H, N}, opts), ent = at::empty({B, H, N}, opts);
  with_tile_gemm(q, k, [&]<typename scalar_t, bool kMma>() {
    launch_window_stats<scalar_t, kMma>(q, k, q_pos, k_pos, plan.geo, B * Hkv, plan.num_groups, mean, var, ent);
  });
  return {mean, var, ent};
}

// Most queries whose columns fit in the shared memory of one block (rows come in tiles of kRows).
int64_t max_fitting_queries() {
  const int64_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  int64_t rows = kRows;
  while (smem_bytes(int(rows + kRows)) <= optin) rows += kRows;
  return rows;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_stats(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& q_pos, const at::Tensor& k_pos,
                                                            double scale, double softcap) {
  check_attention_args("window_stats", q, k, q_pos, k_pos, softcap);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t Q = q.size(2), chunk = max_fitting_queries();
  if (Q <= chunk) return window_stats_fitting(q, k, q_pos, k_pos, scale, softcap);
  // Long windows (H2O scores every prompt query): runs of queries, merged exactly. Mean and entropy are
  // sums over queries; the variance merges by Chan et al.'s pairwise update of (count, mean, M2).
  at::Tensor mean, m2, ent;
  int64_t seen = 0;
  for (int64_t start = 0; start < Q; start += chunk) {
    const int64_t n = std::min(chunk, Q - start);
    auto [m, v, e] = window_stats_fitting(q.narrow(2, start, n), k, q_pos.narrow(1, start, n), k_pos, scale,
                                         softcap);
    if (seen == 0) {
      mean = m, m2 = v * double(n - 1), ent = e;
    } else {
      const auto delta = m - mean;
      const double total = double(seen + n);
      m2 = m2 + v * double(n - 1) + delta * delta * (double(seen) * double(n) / total);
      mean = mean + delta * (double(n) / total);
      ent = ent + e;
    }
    seen += n;
  }
  return {mean, m2 / double(Q - 1), ent};
}

}  // namespace cakekv::cuda

TORCH_LIBRARY_IMPL(cakekv, CUDA, m) {
  m.impl("window_stats", &cakekv::cuda::window_stats);
}
