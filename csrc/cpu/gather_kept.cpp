// CPU kernel of gather_kept (contract in register.cpp): one copy of each kept K and V row.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <cstring>

#include <torch/library.h>

#include "../checks.h"

namespace cakekv::cpu {

std::tuple<at::Tensor, at::Tensor> gather_kept(const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx) {
  check_gather_kept_args(k, v, idx);
  const int64_t B = k.size(0), Hkv = k.size(1), N = k.size(2), D = k.size(3), M = idx.size(2);
  const auto kc = k.contiguous(), vc = v.contiguous(), ic = idx.contiguous();
  auto k_out = at::empty({B, Hkv, M, D}, k.options()), v_out = at::empty({B, Hkv, M, D}, v.options());
  const int64_t row_bytes = D * k.element_size();
  const auto* ks = static_cast<const char*>(kc.data_ptr());
  const auto* vs = static_cast<const char*>(vc.data_ptr());
  auto* kd = static_cast<char*>(k_out.data_ptr());
  auto* vd = static_cast<char*>(v_out.data_ptr());
  const int64_t* ip = ic.data_ptr<int64_t>();
  check_indices_in_range("gather_kept", ic, N);
  at::parallel_for(0, B * Hkv * M, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bg = r / M, j = ip[r];
      std::memcpy(kd + r * row_bytes, ks + (bg * N + j) * row_bytes, row_bytes);
      std::memcpy(vd + r * row_bytes, vs + (bg * N + j) * row_bytes, row_bytes);
    }
  });
  return {k_out, v_out};
}

}  // namespace cakekv::cpu

TORCH_LIBRARY_IMPL(cakekv, CPU, m) {
  m.impl("gather_kept", &cakekv::cpu::gather_kept);
}
