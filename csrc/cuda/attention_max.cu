// CUDA kernels of attention_max (contract in register.cpp): pass 1 and the combine of attention_tiles.cuh over
// row groups of kRowsPerBlock rows (any run of a kv head's G * Q rows: the max needs no whole column), then
//
//   pass 2  column_max_kernel        grid (tiles, groups, B*Hkv): logits again, normalised, max over the
//                                    group's rows per key, merged across groups by atomicMax on the float's
//                                    bits (valid for floats >= 0, which order as their bit patterns)
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <torch/library.h>

#include "../checks.h"
#include "attention_tiles.cuh"

namespace cakekv::cuda {

namespace {

constexpr int kRowsPerBlock = 2 * kRows;  // two GEMM sub-tiles per key tile: half the key reads of one
constexpr int kLanesPerKey = kThreads / kKeys;
static_assert(kLanesPerKey == 4, "the shuffle below reduces 4 adjacent lanes");

// Pass 2: one key tile per block; each key's largest probability over the block's rows.
template <typename scalar_t, bool kMma>
__global__ void __launch_bounds__(kThreads) column_max_kernel(
    const scalar_t* __restrict__ q, const scalar_t* __restrict__ k, const int64_t* __restrict__ q_pos,
    const int64_t* __restrict__ k_pos, const float2* __restrict__ stats, Geometry geo, float* __restrict__ best) {
  const Smem s = carve_smem(geo.rows_alloc);
  const BlockRows br = block_rows(geo);
  const int64_t j0 = int64_t(blockIdx.x) * kKeys;
  const int nkeys = int(geo.N - j0 < kKeys ? geo.N - j0 : kKeys);
  normalised_logits<scalar_t, kMma>(q, k, q_pos, k_pos, stats, geo, br, j0, nkeys, s);

  // Every thread has a key (4 lanes each, adjacent), and all take the same number of row steps.
  const int j = threadIdx.x / kLanesPerKey, part = threadIdx.x % kLanesPerKey;
  float m = 0.f;
  for (int r = part; r < br.rows; r += kLanesPerKey) m = fmaxf(m, tile_probability(s, geo, r, j));
  m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
  m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
  if (part == 0 && j < nkeys && m > 0.f)
    atomicMax(reinterpret_cast<int*>(best + int64_t(blockIdx.z) * geo.N + j0 + j), __float_as_int(m));
}

template <typename scalar_t, bool kMma>
void launch_attention_max(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_pos, const at::Tensor& k_pos,
                          const TilePlan& plan, int64_t BG, at::Tensor& best) {
  const Geometry& geo = plan.geo;
  auto stats = at::empty({BG * geo.R, 2}, q.options().dtype(at::kFloat));
  softmax_stats<scalar_t, kMma>(q, k, q_pos, k_pos, geo, BG, plan.num_groups, stats);
  const int64_t smem = smem_bytes(geo.rows_alloc);
  auto pass2 = column_max_kernel<scalar_t, kMma>;
  allow_smem(pass2, smem);
  pass2<<<dim3(geo.num_tiles, plan.num_groups, BG), kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), q_pos.const_data_ptr<int64_t>(),
      k_pos.const_data_ptr<int64_t>(), reinterpret_cast<const float2*>(stats.const_data_ptr<float>()), geo,
      best.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor attention_max(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& q_pos_in,
                         const at::Tensor& k_pos_in, double scale, double softcap) {
  check_attention_args("attention_max", q_in, k_in, q_pos_in, k_pos_in, softcap);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), H = q_in.size(1), Q = q_in.size(2), Hkv = k_in.size(1), N = k_in.size(2);
  auto best = at::zeros({B, Hkv, N}, q_in.options().dtype(at::kFloat));  // atomicMax's starting point
  if (B * H * Q * N == 0) return best;
  const auto q = q_in.contiguous(), k = k_in.contiguous();
  const auto q_pos = q_pos_in.contiguous(), k_pos = k_pos_in.contiguous();
  const TilePlan plan = plan_tiles("attention_max", q, k, kRowsPerBlock, scale, softcap);
  with_tile_gemm(q, k, [&]<typename scalar_t, bool kMma>() {
    launch_attention_max<scalar_t, kMma>(q, k, q_pos, k_pos, plan, B * Hkv, best);
  });
  return best;
}

}  // namespace cakekv::cuda

TORCH_LIBRARY_IMPL(cakekv, CUDA, m) {
  m.impl("attention_max", &cakekv::cuda::attention_max);
}
