// CPU kernels of the segment layout (contracts in register.cpp): gather_ragged (one copy per kept K and V row),
// ragged_attention (per segment ATen math in fp32: the G*Q queries of one kv head against its entries, in tiles of
// rows whose logits fit kTileBytes),
// append_entries (first free slots, one row copy per token) and evict_lowest (plain loops in fp32; candidates
// and pooling neighbours read from the position order, like the CUDA kernel).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include <torch/library.h>

#include "../checks.h"
#include "../decode_score.h"
#include "logits.h"

namespace cakekv::cpu {

namespace {

// The segment table checked and contiguous (the CPU kernels read it on the host anyway).
at::Tensor checked_offsets(const at::Tensor& offsets, int64_t total, const char* op) {
  check_offsets(op, offsets, total);
  return offsets.contiguous();
}

constexpr int64_t kTileBytes = int64_t(32) << 20;

// Query rows ragged_attention attends at once over a segment of n entries: their [rows, n] fp32 logits (and the
// few temporaries of that size) within kTileBytes, so that a long chunk's memory does not grow with Q * n.
int64_t rows_per_tile(int64_t n) {
  return std::max<int64_t>(1, kTileBytes / (n * static_cast<int64_t>(sizeof(float))));
}

// Attention weights [rows, n] of query rows q [rows, D] at positions q_pos [rows] over one segment's keys
// ks [n, D] at positions ps [n]: fp32 softmax over the visible entries (0 <= pos <= q_pos), zeros elsewhere and
// on a row that sees none.
at::Tensor visible_softmax(const at::Tensor& q, const at::Tensor& ks, const at::Tensor& ps, const at::Tensor& q_pos,
                           double scale, double softcap) {
  const auto visible = ps.ge(0).unsqueeze(0).logical_and(ps.unsqueeze(0).le(q_pos.unsqueeze(1)));
  auto logits = at::matmul(q, ks.t());
  logits_from_dots_(logits, scale, softcap)
      .masked_fill_(visible.logical_not(), -std::numeric_limits<float>::infinity());
  const auto mx = std::get<0>(logits.max(1, true));
  const auto p = logits.sub_(at::where(mx.isinf(), at::zeros_like(mx), mx)).exp_();  // invisible: exp(-inf) = 0
  const auto denom = p.sum(1, true);
  return p.div_(at::where(denom.eq(0), at::ones_like(denom), denom));
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
  check_indices_in_range("gather_ragged", ic, N);
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

std::tuple<at::Tensor, at::Tensor> ragged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& pos, const at::Tensor& offsets,
                                                    const at::Tensor& q_pos, double scale, double softcap,
                                                    bool return_weights) {
  check_ragged_attention_args(q, k, v, pos, offsets, q_pos, softcap);
  const int64_t B = q.size(0), H = q.size(1), Q = q.size(2), D = q.size(3), T = k.size(0);
  const int64_t segs = offsets.size(0) - 1, Hkv = segs / B, G = H / Hkv;
  const auto oc = checked_offsets(offsets, T, "ragged_attention");
  const int64_t* o = oc.data_ptr<int64_t>();
  // [B, Hkv, G*Q, D]: the rows of one kv head are contiguous (h = g * G + j).
  const auto qf = q.to(at::kFloat).reshape({B, Hkv, G * Q, D});
  auto out = at::zeros({B, Hkv, G * Q, D}, q.options().dtype(at::kFloat));
  auto weights = at::zeros({return_weights ? G * Q : 0, T}, q.options().dtype(at::kFloat));
  const auto qp = q_pos.repeat({1, G});  // [B, G*Q]: row r of a kv head is query r % Q
  for (int64_t s = 0; s < segs; ++s) {
    const int64_t b = s / Hkv, g = s % Hkv, lo = o[s], hi = o[s + 1];
    if (hi == lo) continue;
    const auto ks = k.slice(0, lo, hi).to(at::kFloat), vs = v.slice(0, lo, hi).to(at::kFloat);
    const auto ps = pos.slice(0, lo, hi);
    const int64_t tile = rows_per_tile(hi - lo);
    for (int64_t r0 = 0; r0 < G * Q; r0 += tile) {
      const int64_t r1 = std::min(G * Q, r0 + tile);
      const auto att = visible_softmax(qf[b][g].slice(0, r0, r1), ks, ps, qp[b].slice(0, r0, r1), scale, softcap);
      out[b][g].slice(0, r0, r1).copy_(at::matmul(att, vs));
      if (return_weights) weights.slice(0, r0, r1).slice(1, lo, hi).copy_(att);
    }
  }
  return {out.view({B, H, Q, D}).to(q.scalar_type()), weights};
}

void append_entries(const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos, const at::Tensor& offsets,
                    const at::Tensor& new_k, const at::Tensor& new_v, const at::Tensor& q_pos,
                    const std::optional<at::Tensor>& order) {
  check_append_entries_args(k, v, pos, offsets, new_k, new_v, q_pos, order);
  const int64_t B = new_k.size(0), Hkv = new_k.size(1), Q = new_k.size(2), D = new_k.size(3);
  const auto oc = checked_offsets(offsets, k.size(0), "append_entries");
  const int64_t* o = oc.data_ptr<int64_t>();
  int64_t* p = pos.data_ptr<int64_t>();
  // Every segment's slots first, then the writes: a segment without room leaves the layer as it was.
  std::vector<std::vector<int64_t>> slots(B * Hkv);
  std::vector<int64_t> stored(B * Hkv, 0);
  for (int64_t s = 0; s < B * Hkv; ++s) {
    for (int64_t t = o[s]; t < o[s + 1]; ++t) {
      if (p[t] >= 0) ++stored[s];
      else if (static_cast<int64_t>(slots[s].size()) < Q) slots[s].push_back(t);
    }
    TORCH_CHECK(static_cast<int64_t>(slots[s].size()) == Q, "append_entries: segment ", s, " has ", slots[s].size(),
                " free slots for ", Q, " tokens");
  }
  const auto nk = new_k.contiguous(), nv = new_v.contiguous(), qp = q_pos.contiguous();
  const int64_t* qpp = qp.data_ptr<int64_t>();
  const int64_t row_bytes = D * k.element_size();
  auto* kd = static_cast<char*>(k.data_ptr());
  auto* vd = static_cast<char*>(v.data_ptr());
  const auto* ks = static_cast<const char*>(nk.data_ptr());
  const auto* vs = static_cast<const char*>(nv.data_ptr());
  int32_t* ord = order ? order->data_ptr<int32_t>() : nullptr;
  for (int64_t s = 0; s < B * Hkv; ++s) {
    const int64_t b = s / Hkv;
    for (int64_t r = 0; r < Q; ++r) {
      const int64_t t = slots[s][r];
      std::memcpy(kd + t * row_bytes, ks + (s * Q + r) * row_bytes, row_bytes);
      std::memcpy(vd + t * row_bytes, vs + (s * Q + r) * row_bytes, row_bytes);
      p[t] = qpp[b * Q + r];
      if (ord != nullptr) ord[o[s] + stored[s] + r] = static_cast<int32_t>(t - o[s]);  // newest positions last
    }
  }
}

namespace {

// The stored entries of each segment evict_lowest frees from (over its cap, not empty), each checked to list
// slots of its own segment in its first `stored` ranks of the order, before any segment is touched (the CUDA
// kernel asserts the same on the device).
std::vector<int64_t> checked_stored_entries(const int32_t* ord, const int64_t* o, const int64_t* p, const int64_t* ov,
                                            int64_t segs) {
  std::vector<int64_t> stored(segs, 0);
  for (int64_t s = 0; s < segs; ++s) {
    const int64_t lo = o[s], n = o[s + 1] - lo;
    if (ov[s] <= 0 || n == 0) continue;
    stored[s] = std::count_if(p + lo, p + lo + n, [](int64_t x) { return x >= 0; });
    for (int64_t r = 0; r < stored[s]; ++r)
      TORCH_CHECK(ord[lo + r] >= 0 && ord[lo + r] < n, "evict_lowest: order[", lo + r, "] = ", ord[lo + r],
                  " is not a slot of segment ", s, " (", n, " slots): order must be the segments' position order");
  }
  return stored;
}

}  // namespace

void evict_lowest(const at::Tensor& weights, const at::Tensor& pos, const at::Tensor& order,
                  const at::Tensor& offsets, const at::Tensor& q_pos, const at::Tensor& over, double var_weight,
                  int64_t protect, int64_t kernel_size, bool max_pool, int64_t n_evict, bool by_score) {
  check_evict_lowest_args(weights, pos, order, offsets, q_pos, over, kernel_size, n_evict);
  const int64_t B = q_pos.size(0), Q = q_pos.size(1), T = pos.size(0);
  const int64_t segs = offsets.size(0) - 1, Hkv = segs / B;
  const auto oc = checked_offsets(offsets, T, "evict_lowest");
  if (n_evict == 0 || T == 0 || Q == 0) return;
  const int64_t G = weights.size(0) / Q;
  const int64_t* o = oc.data_ptr<int64_t>();
  const auto qp = q_pos.contiguous();
  const float* w = weights.data_ptr<float>();
  const int64_t* qpp = qp.data_ptr<int64_t>();
  int64_t* p = pos.data_ptr<int64_t>();
  int64_t* ov = over.data_ptr<int64_t>();
  int32_t* ord = order.data_ptr<int32_t>();
  const auto stored = checked_stored_entries(ord, o, p, ov, segs);
  at::parallel_for(0, segs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t b = s / Hkv, lo = o[s], valid = stored[s];
      if (valid == 0) continue;
      // Candidates: the first entries of the position order; their scores pooled, then ranked by key
      // (decode_score.h, the CUDA kernel's): the lowest go (ties: earlier position) and leave the order.
      const int64_t limit = qpp[b * Q + Q - 1] - protect;
      int32_t* seg_order = ord + lo;
      const int64_t nc = std::count_if(p + lo, p + o[s + 1], [&](int64_t x) { return x >= 0 && x <= limit; });
      std::vector<float> score(nc);
      for (int64_t r = 0; r < nc; ++r)
        score[r] = decode_score(w, T, lo + seg_order[r], G, Q, static_cast<float>(var_weight));
      std::vector<uint32_t> key(nc);
      for (int64_t r = 0; r < nc; ++r)
        key[r] = eviction_key(pooled_score(score.data(), nc, r, kernel_size, max_pool));
      std::vector<int64_t> ranked(nc);
      std::iota(ranked.begin(), ranked.end(), 0);
      std::stable_sort(ranked.begin(), ranked.end(), [&](int64_t a, int64_t c) { return key[a] < key[c]; });
      const int64_t drop = std::min({n_evict, ov[s], nc});
      std::vector<bool> chosen(nc, false);
      for (int64_t r = 0; r < drop; ++r) chosen[ranked[r]] = true;
      if (by_score) {  // the remaining candidates by descending key, then the rest as it was
        std::stable_sort(ranked.begin(), ranked.end(), [&](int64_t a, int64_t c) { return key[a] > key[c]; });
        std::vector<int32_t> next;
        for (int64_t r : ranked)
          if (!chosen[r]) next.push_back(seg_order[r]);
        for (int64_t r = nc; r < valid; ++r) next.push_back(seg_order[r]);
        for (int64_t r = 0; r < nc; ++r)
          if (chosen[r]) p[lo + seg_order[r]] = -1;
        std::copy(next.begin(), next.end(), seg_order);
      } else {
        int64_t kept = 0;
        for (int64_t r = 0; r < valid; ++r) {
          if (r < nc && chosen[r]) p[lo + seg_order[r]] = -1;
          else seg_order[kept++] = seg_order[r];
        }
      }
      ov[s] -= drop;
    }
  });
}

}  // namespace cakekv::cpu

TORCH_LIBRARY_IMPL(cakekv, CPU, m) {
  m.impl("gather_ragged", &cakekv::cpu::gather_ragged);
  m.impl("ragged_attention", &cakekv::cpu::ragged_attention);
  m.impl("append_entries", &cakekv::cpu::append_entries);
  m.impl("evict_lowest", &cakekv::cpu::evict_lowest);
}
