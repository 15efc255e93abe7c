// The cakekv op library: each op's schema, with its contract, is defined once here. Kernels register their
// implementations at the end of their own files (cpu/*.cpp, cuda/*.cu: TORCH_LIBRARY_IMPL); argument checks
// shared by the backends are in checks.cpp; fake (meta) kernels and typed wrappers in cakekv/_ops.py.
#include <torch/library.h>

TORCH_LIBRARY(cakekv, m) {
  // ---------------------------------------------------------------------------------------------
  // window_stats — per-key statistics of the attention of a few queries (the observation window)
  //
  //   q     [B, H, Q, D]    queries after RoPE (fp32 / fp16 / bf16)
  //   k     [B, Hkv, N, D]  keys after RoPE, same dtype; H % Hkv == 0 (query head h reads kv head h / (H/Hkv))
  //   q_pos [B, Q]          int64 logical position of each query
  //   k_pos [B, Hkv, N]     int64 logical position of each key slot; -1 marks an empty slot
  //   scale                 softmax scale (1/sqrt(D) for most models)
  //   softcap               logit soft-capping (Gemma 2): logits become softcap * tanh(logit / softcap); 0 = none
  //
  // Key slot j is visible to query i iff 0 <= k_pos[b,g,j] <= q_pos[b,i] (causal, padding and free slots
  // all follow from positions). A[b,h,i,:] = softmax over visible keys of the logits scale * q·k (soft-capped when
  // softcap > 0), in fp32; invisible
  // keys get A = 0. Returns three fp32 tensors of shape [B, H, N]:
  //   mean    = mean_i A[b,h,i,j]
  //   var     = unbiased variance over i of A[b,h,i,j]   (0 when Q == 1)
  //   entropy = sum_i -A[b,h,i,j] * ln(A[b,h,i,j] + 1e-10)
  // Kernels stream over keys: only per-query softmax statistics (running max, sum) are kept, never the
  // whole [Q, N] block of all heads.
  m.def("window_stats(Tensor q, Tensor k, Tensor q_pos, Tensor k_pos, float scale, float softcap=0.0) -> "
        "(Tensor, Tensor, Tensor)");

  // ---------------------------------------------------------------------------------------------
  // attention_max — per key, the largest attention probability it gets (KVzip's re-read scores)
  //
  //   q, k, q_pos, k_pos, scale, softcap as in window_stats (q_pos -1 marks a padding query: it sees no key)
  //
  // With A[b,h,i,j] the softmax of window_stats (fp32 over the keys query i sees, 0 elsewhere), returns fp32
  // [B, Hkv, N]: out[b,g,j] = max over the query heads h of kv head g and over the queries i of A[b,h,i,j]
  // (0 for a key no query sees). Kernels: two passes per query (row max and sum of exp, then each key's
  // largest normalised probability), streaming over keys; never a [Q, N] block of all heads.
  m.def("attention_max(Tensor q, Tensor k, Tensor q_pos, Tensor k_pos, float scale, float softcap=0.0) -> Tensor");

  // ---------------------------------------------------------------------------------------------
  // allocate_budgets — integer budgets proportional to scores, exact total, capped per entry
  //
  //   scores [R, L]  float >= 0 (R independent rows, e.g. batch rows; L layers or heads)
  //   caps   [R, L]  int64 >= 0, the most each entry can take (e.g. its evictable length)
  //   total  [R]     int64 >= 0, what to hand out per row
  // Returns int64 [R, L] with 0 <= out <= caps and sum(out[r]) == min(total[r], sum(caps[r])):
  //   1. out = floor(total * score / sum(score))        (uniform scores when sum(score) == 0)
  //   2. out = min(out, caps)
  //   3. while sum(out) < target: the deficit d is split over the e entries still below their cap,
  //      d / e each and one more to the first d % e of them in index order, each clipped to its room.
  m.def("allocate_budgets(Tensor scores, Tensor caps, Tensor total) -> Tensor");

  // ---------------------------------------------------------------------------------------------
  // gather_kept — compact K and V to kept slots in one pass (the evicted rest is freed by the caller
  // dropping its reference to the old tensors)
  //
  //   k, v [B, Hkv, N, D]  same shape and dtype
  //   idx  [B, Hkv, M]     int64 slot indices in [0, N)
  // Returns (k_out, v_out), each [B, Hkv, M, D]: out[b,g,m,:] = in[b,g,idx[b,g,m],:].
  m.def("gather_kept(Tensor k, Tensor v, Tensor idx) -> (Tensor, Tensor)");

  // ---------------------------------------------------------------------------------------------
  // Ragged layout of one layer (per-head budgets; docs/cache.md): the entries of every (row, kv head)
  // pair are stored flat, segment s = b * Hkv + g holding entries offsets[s] .. offsets[s+1] - 1 of [T, D] tensors, so a
  // layer takes (sum of kept entries) rows instead of B * Hkv * (longest head). offsets is int64
  // [B * Hkv + 1], non-decreasing, offsets[0] = 0, offsets[S] = T. A segment may hold free slots
  // (position -1) as room for appends.
  //
  // gather_ragged — compact K and V of a padded layer into the ragged layout in one pass
  //   k, v    [B, Hkv, N, D]  same shape and dtype
  //   idx     [T]             int64 slot in [0, N) of each kept entry (entry t of segment s reads slot idx[t]
  //                           of (b, g) = (s / Hkv, s % Hkv))
  //   offsets [B*Hkv + 1]     int64 segment starts as above
  // Returns (k_flat, v_flat), each [T, D]: out[t,:] = in[b, g, idx[t], :] for t in segment s.
  m.def("gather_ragged(Tensor k, Tensor v, Tensor idx, Tensor offsets) -> (Tensor, Tensor)");

  // ragged_attention — attention of the current queries over a ragged layer (GQA at kv-head granularity)
  //   q       [B, H, Q, D]    fp32 / fp16 / bf16; H % Hkv == 0 with Hkv = (offsets.size(0) - 1) / B
  //   k, v    [T, D]          same dtype as q
  //   pos     [T]             int64 logical position of each entry, -1 = free slot
  //   offsets [B*Hkv + 1]     int64 segment starts (see above)
  //   q_pos   [B, Q]          int64 logical position of each query
  //   scale                   softmax scale
  //   softcap                 logit soft-capping as in window_stats (0 = none)
  //   return_weights          also return the attention weights (what decode-time eviction scores)
  // Query head h of row b reads segment b * Hkv + h / (H / Hkv); entry t is visible to query i iff
  // 0 <= pos[t] <= q_pos[b, i]. A[h,i,t] = softmax over visible entries of the logits (as in window_stats) in fp32 (0 where not
  // visible); out[b,h,i,:] = sum_t A[h,i,t] v[t], in q's dtype; a query that sees no entry gets zeros.
  // Returns (out [B, H, Q, D], weights): weights is fp32 [G*Q, T] with weights[j*Q + i, t] = A[g*G + j, i, t]
  // for the segment (b, g) holding t (G = H / Hkv), or [0, T] when return_weights is false. Beyond its outputs
  // it takes a bounded workspace whatever Q is (query rows go in tiles): long chunks need no more.
  m.def("ragged_attention(Tensor q, Tensor k, Tensor v, Tensor pos, Tensor offsets, Tensor q_pos, float scale, "
        "float softcap=0.0, bool return_weights=False) -> (Tensor, Tensor)");

  // ---------------------------------------------------------------------------------------------
  // Decode-time ops over a layer seen as segments: segment s = b * Hkv + g (row b, kv head g) holds the
  // entries offsets[s] .. offsets[s+1] - 1 of flat k, v [T, D] and pos [T] (-1 = free slot). The ragged
  // layout is this; the padded layout [B, Hkv, M, D] is it too, viewed flat with offsets = M * arange(S + 1).
  // The position order of a segment (`order`, int32 [T]): order[offsets[s] + r] for r < V_s, V_s the entries
  // of s with pos >= 0, is the slot (counted from offsets[s]) of the entry of rank r by position; what follows
  // is unspecified. Both ops keep it exact when it is exact on entry.
  //
  // append_entries — write the Q new tokens of every segment into its first Q free slots, in place
  //   k, v    [T, D]          (mutated)
  //   pos     [T] int64       (mutated: the slots taken get q_pos)
  //   offsets [B*Hkv + 1]     int64 segment starts
  //   new_k, new_v [B, Hkv, Q, D]  same dtype as k
  //   q_pos   [B, Q] int64    position of each new token
  //   order   [T] int32 or None (mutated: the new entries are listed after the V_s stored ones)
  // Token i of segment s goes to the i-th free slot of s in slot order. A segment with fewer than Q free
  // slots is an error (the caller makes room first): CPU raises before writing anything, CUDA asserts on the
  // device. The new positions must follow every stored one (they do in decoding), so that they extend the
  // position order.
  m.def("append_entries(Tensor(a!) k, Tensor(b!) v, Tensor(c!) pos, Tensor offsets, Tensor new_k, Tensor new_v, "
        "Tensor q_pos, Tensor(d!)? order) -> ()");

  // evict_lowest — decode-time eviction: per segment, free the entries the current queries value least
  //   weights  [G*Q, T] fp32  the current queries' attention weights (ragged_attention with return_weights):
  //                           weights[j*Q + i, t] is A[j,i,t] of query i of query head j of t's segment
  //   pos [T] int64 (mutated: evicted entries get -1), offsets [B*Hkv + 1] as above
  //   order    [T] int32      the exact position order (mutated: evicted entries leave it)
  //   q_pos    [B, Q] int64   positions of the current queries
  //   over     [B, Hkv] int64 (mutated) entries each segment holds above its cap; decreases by what is evicted
  //   var_weight (w), protect (P), kernel_size (K, odd >= 1), max_pool, n_evict (E >= 0), by_score
  // score[t] = mean_j (mean_i A[j,i,t] + w * var_i A[j,i,t]) (unbiased variance over the Q queries, 0 when
  // Q == 1). Candidates: 0 <= pos[t] <= q_pos[b, Q-1] - P, taken in position order; pooled = the K-wide average
  // (zero padded, divided by K) or maximum of the candidates' scores, centred. The min(E, over[b,g]) candidates
  // with the lowest pooled score (ties: earlier position) get pos = -1, and over[b,g] decreases by their number.
  // NaN: a pooled score with a NaN score in reach is NaN (both poolings), and NaN ranks below every number
  // (evicted first: the entry's attention is unusable). `order` must list slots of the segment (CPU raises,
  // CUDA asserts on the device).
  // The freed entries leave `order`; the others keep their relative order, or with by_score the remaining
  // candidates come first by descending pooled score (ties: earlier in the order), then the rest of the order
  // as it was: the storage order of the official CAKE decode evictor (its top-k's), along which it pools. With
  // by_score, `order` is that order (not the position order), and "in position order" above reads "in order".
  m.def("evict_lowest(Tensor weights, Tensor(a!) pos, Tensor(b!) order, Tensor offsets, Tensor q_pos, "
        "Tensor(c!) over, float var_weight, int protect, int kernel_size, bool max_pool, int n_evict, "
        "bool by_score=False) -> ()");
}
