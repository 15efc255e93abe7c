// CUDA kernel of gather_kept (contract in register.cpp): one pass that copies each kept K row and V row.
// A block is a 2-D grid of threads: x walks the vectors of a row (the widest of 16/8/4/2/1 bytes that the
// row size and pointers allow), y walks rows, so a warp reads whole contiguous rows. Indices are checked on
// the host before the launch (one sync: a prefill-time op), and asserted again on the device.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

#include <torch/library.h>

#include "../checks.h"

namespace cakekv::cuda {

namespace {

template <typename vec_t>
__global__ void gather_rows_kernel(const vec_t* __restrict__ k, const vec_t* __restrict__ v,
                                   const int64_t* __restrict__ idx, vec_t* __restrict__ k_out,
                                   vec_t* __restrict__ v_out, int64_t rows, int64_t M, int64_t N,
                                   int64_t vecs_per_row) {
  for (int64_t r = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; r < rows; r += int64_t(gridDim.x) * blockDim.y) {
    const int64_t j = idx[r];
    CUDA_KERNEL_ASSERT(j >= 0 && j < N && "gather_kept: index out of range [0, N)");
    // Output row r = (b * Hkv + g) * M + m reads input row (b * Hkv + g) * N + j.
    const int64_t src = ((r / M) * N + j) * vecs_per_row, dst = r * vecs_per_row;
    for (int64_t c = threadIdx.x; c < vecs_per_row; c += blockDim.x) {
      k_out[dst + c] = k[src + c];
      v_out[dst + c] = v[src + c];
    }
  }
}

template <typename vec_t>
void launch_gather(const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx, at::Tensor& k_out,
                   at::Tensor& v_out, int64_t rows, int64_t M, int64_t N, int64_t row_bytes) {
  const int64_t vecs_per_row = row_bytes / int64_t(sizeof(vec_t));
  const int bx = int(std::min<int64_t>(vecs_per_row, 256));
  const int by = std::max(1, 256 / bx);
  const int64_t max_blocks = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((rows + by - 1) / by, max_blocks));
  gather_rows_kernel<vec_t><<<blocks, dim3(bx, by), 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const vec_t*>(k.const_data_ptr()), static_cast<const vec_t*>(v.const_data_ptr()),
      idx.const_data_ptr<int64_t>(), static_cast<vec_t*>(k_out.mutable_data_ptr()),
      static_cast<vec_t*>(v_out.mutable_data_ptr()), rows, M, N, vecs_per_row);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gather_kept(const at::Tensor& k_in, const at::Tensor& v_in,
                                               const at::Tensor& idx_in) {
  check_gather_kept_args(k_in, v_in, idx_in);
  const c10::cuda::CUDAGuard guard(k_in.device());
  const int64_t B = k_in.size(0), Hkv = k_in.size(1), N = k_in.size(2), D = k_in.size(3), M = idx_in.size(2);
  auto k_out = at::empty({B, Hkv, M, D}, k_in.options()), v_out = at::empty({B, Hkv, M, D}, v_in.options());
  if (k_out.numel() == 0) return {k_out, v_out};
  TORCH_CHECK(N > 0, "gather_kept: index into an empty cache (N = 0)");
  const auto k = k_in.contiguous(), v = v_in.contiguous(), idx = idx_in.contiguous();
  check_indices_in_range("gather_kept", idx, N);

  // Widest vector that divides the row and keeps every row start aligned (outputs are freshly allocated).
  const int64_t row_bytes = D * k.element_size();
  const auto addr_bits = reinterpret_cast<uintptr_t>(k.const_data_ptr()) |
                         reinterpret_cast<uintptr_t>(v.const_data_ptr()) |
                         reinterpret_cast<uintptr_t>(k_out.const_data_ptr()) |
                         reinterpret_cast<uintptr_t>(v_out.const_data_ptr()) | uintptr_t(row_bytes);
  const int64_t rows = B * Hkv * M;
  if (addr_bits % 16 == 0)
    launch_gather<uint4>(k, v, idx, k_out, v_out, rows, M, N, row_bytes);
  else if (addr_bits % 8 == 0)
    launch_gather<uint2>(k, v, idx, k_out, v_out, rows, M, N, row_bytes);
  else if (addr_bits % 4 == 0)
    launch_gather<uint32_t>(k, v, idx, k_out, v_out, rows, M, N, row_bytes);
  else if (addr_bits % 2 == 0)
    launch_gather<uint16_t>(k, v, idx, k_out, v_out, rows, M, N, row_bytes);
  else
    launch_gather<uint8_t>(k, v, idx, k_out, v_out, rows, M, N, row_bytes);
  return {k_out, v_out};
}

}  // namespace cakekv::cuda

TORCH_LIBRARY_IMPL(cakekv, CUDA, m) {
  m.impl("gather_kept", &cakekv::cuda::gather_kept);
}
