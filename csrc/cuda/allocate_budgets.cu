// CUDA kernel of allocate_budgets (contract in register.cpp). Rows are independent and tiny (L entries, a few
// loop passes), so one thread runs the shared allocate_row loop of budget_math.h per row: the result is
// bit-identical to the CPU kernel's.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "../budget_math.h"
#include <torch/library.h>

#include "../checks.h"

namespace cakekv::cuda {

namespace {

__global__ void allocate_budgets_kernel(const double* __restrict__ scores, const int64_t* __restrict__ caps,
                                        const int64_t* __restrict__ total, int64_t R, int64_t L,
                                        int64_t* __restrict__ out) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < R) allocate_row(scores + r * L, caps + r * L, total[r], L, out + r * L);
}

}  // namespace

at::Tensor allocate_budgets(const at::Tensor& scores, const at::Tensor& caps, const at::Tensor& total) {
  check_allocate_budgets_args(scores, caps, total);
  check_allocate_budgets_values(scores, caps, total);
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t R = scores.size(0), L = scores.size(1);
  auto out = at::empty({R, L}, caps.options());
  if (R == 0) return out;
  // Same inputs as the CPU kernel: scores in double, all contiguous.
  const auto s = scores.to(at::kDouble).contiguous();
  const auto c = caps.contiguous();
  const auto t = total.contiguous();
  constexpr int kThreads = 128;
  const auto blocks = static_cast<unsigned>((R + kThreads - 1) / kThreads);
  allocate_budgets_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      s.const_data_ptr<double>(), c.const_data_ptr<int64_t>(), t.const_data_ptr<int64_t>(), R, L,
      out.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace cakekv::cuda

TORCH_LIBRARY_IMPL(cakekv, CUDA, m) {
  m.impl("allocate_budgets", &cakekv::cuda::allocate_budgets);
}
