// CPU kernel of allocate_budgets (contract in register.cpp). Rows are independent and tiny (L entries), so a
// plain loop per row is the whole algorithm; the CUDA kernel runs the same loop in one thread per row.
#include <ATen/Parallel.h>

#include <torch/library.h>

#include "../checks.h"
#include "../budget_math.h"

namespace cakekv::cpu {

at::Tensor allocate_budgets(const at::Tensor& scores, const at::Tensor& caps, const at::Tensor& total) {
  check_allocate_budgets_args(scores, caps, total);
  check_allocate_budgets_values(scores, caps, total);
  const int64_t R = scores.size(0), L = scores.size(1);
  const auto s = scores.to(at::kDouble).contiguous();
  const auto c = caps.contiguous();
  const auto t = total.contiguous();
  auto out = at::empty({R, L}, caps.options());
  const double* sp = s.data_ptr<double>();
  const int64_t* cp = c.data_ptr<int64_t>();
  const int64_t* tp = t.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) allocate_row(sp + r * L, cp + r * L, tp[r], L, op + r * L);
  });
  return out;
}

}  // namespace cakekv::cpu

TORCH_LIBRARY_IMPL(cakekv, CPU, m) {
  m.impl("allocate_budgets", &cakekv::cpu::allocate_budgets);
}
