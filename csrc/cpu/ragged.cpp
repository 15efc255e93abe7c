// CPU kernels of the ragged layout (contracts in ops.h): gather_ragged (one copy per kept K and V row) and
// ragged_attention (per segment ATen math in fp32: the G*Q queries of one kv head against its entries).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cstring>
#include <limits>

#include "../ops.h"

namespace cakekv::cpu {

namespace {

// Checks the segment table on the host (the CPU kernels read it anyway) and returns it contiguous.
at::Tensor checked_offsets(const at::Tensor& offsets, int64_t total, const char* op) {
  auto oc = offsets.contiguous();
  const int64_t* o = oc.data_ptr<int64_t>();
  const int64_t segs = oc.size(0) - 1;
  TORCH_CHECK(o[0] == 0, op, ": offsets[0] must be 0, got ", o[0]);
  for (int64_t s = 0; s < segs; ++s)
    TORCH_CHECK(o[s + 1] >= o[s], op, ": offsets must be non-decreasing (segment ", s, ")");
  TORCH_CHECK(o[segs] == total, op, ": offsets[-1] = ", o[segs], " must equal T = ", total);
  return oc;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gather_ragged(const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx,
                                                 const at::Tensor& offsets) {
  check_gather_ragged_args(k, v, idx, offsets);
  const int64_t N = k.size(2), D = k.size(3), T = idx.size(0), segs = offsets.size(0) - 1;
  const auto oc = checked_offsets(offsets, T, "gather_ragged");
  const auto kc = k.contiguous(), vc = v.contiguous(), ic = idx.contiguous();
  auto k_out = at::empty({T, D}, k.options()), v_out = at::empty({T, D}, v.options());
  const int64_t row_bytes = D * k.element_size();
  const auto* ks = static_cast<const char*>(kc.data_ptr());
  const auto* vs = static_cast<const char*>(vc.data_ptr());
  auto* kd = static_cast<char*>(k_out.data_ptr());
  auto* vd = static_cast<char*>(v_out.data_ptr());
  const int64_t* ip = ic.data_ptr<int64_t>();
  const int64_t* o = oc.data_ptr<int64_t>();
  check_indices_in_range("gather_ragged", ip, ic.numel(), N);
  at::parallel_for(0, segs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      for (int64_t t = o[s]; t < o[s + 1]; ++t) {
        const int64_t j = ip[t];
        std::memcpy(kd + t * row_bytes, ks + (s * N + j) * row_bytes, row_bytes);
        std::memcpy(vd + t * row_bytes, vs + (s * N + j) * row_bytes, row_bytes);
      }
    }
  });
  return {k_out, v_out};
}

at::Tensor ragged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos,
                            const at::Tensor& offsets, const at::Tensor& q_pos, double scale) {
  check_ragged_attention_args(q, k, v, pos, offsets, q_pos);
  const int64_t B = q.size(0), H = q.size(1), Q = q.size(2), D = q.size(3);
  const int64_t segs = offsets.size(0) - 1, Hkv = segs / B, G = H / Hkv;
  const auto oc = checked_offsets(offsets, k.size(0), "ragged_attention");
  const int64_t* o = oc.data_ptr<int64_t>();
  // [B, Hkv, G*Q, D]: the rows of one kv head are contiguous (h = g * G + j).
  const auto qf = q.to(at::kFloat).reshape({B, Hkv, G * Q, D});
  auto out = at::zeros({B, Hkv, G * Q, D}, q.options().dtype(at::kFloat));
  const auto qp = q_pos.repeat({1, G});  // [B, G*Q]: row r of a kv head is query r % Q
  for (int64_t s = 0; s < segs; ++s) {
    const int64_t b = s / Hkv, g = s % Hkv, lo = o[s], hi = o[s + 1];
    if (hi == lo) continue;
    const auto ks = k.slice(0, lo, hi).to(at::kFloat), vs = v.slice(0, lo, hi).to(at::kFloat);
    const auto ps = pos.slice(0, lo, hi);
    const auto qpos = qp[b].unsqueeze(1);                           // [G*Q, 1]
    const auto visible = ps.ge(0).unsqueeze(0).logical_and(ps.unsqueeze(0).le(qpos));  // [G*Q, n]
    auto logits = at::matmul(qf[b][g], ks.t()).mul_(scale);         // [G*Q, n]
    logits.masked_fill_(visible.logical_not(), -std::numeric_limits<float>::infinity());
    const auto mx = std::get<0>(logits.max(1, true));
    const auto safe_mx = at::where(mx.isinf(), at::zeros_like(mx), mx);
    const auto p = (logits - safe_mx).exp_();                       // invisible: exp(-inf) = 0
    const auto denom = p.sum(1, true);
    const auto att = p / at::where(denom.eq(0), at::ones_like(denom), denom);
    out[b][g].copy_(at::matmul(att, vs));
  }
  return out.view({B, H, Q, D}).to(q.scalar_type());
}

}  // namespace cakekv::cpu
