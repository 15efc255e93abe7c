"""Plain-PyTorch references of the math in docs/methods.md, written independently of cakekv's code path:
one prompt at a time, full window-attention matrices, Python loops for the allocation."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def soft_capped(logits, softcap):
    """Gemma 2's logit soft-capping in transformers' eager order (softcap 0: none)."""
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def window_attention(q_win: torch.Tensor, keys: torch.Tensor, scale: float, softcap: float = 0.0) -> torch.Tensor:
    """A[h, i, j] of one unpadded prompt: q_win [H, W, D], keys [Hkv, n, D] -> [H, W, n] fp32."""
    heads, window = q_win.shape[0], q_win.shape[1]
    n = keys.shape[1]
    k = keys.float().repeat_interleave(heads // keys.shape[0], 0)
    logits = soft_capped(q_win.float() @ k.transpose(1, 2) * scale, softcap)
    query_pos = torch.arange(n - window, n)
    logits = logits.masked_fill(torch.arange(n)[None, :] > query_pos[:, None], float("-inf"))
    return logits.softmax(-1)


def masked_window_stats(q, k, q_pos, k_pos, scale, softcap=0.0):
    """Reference of the window_stats op: materialises the whole attention block."""
    heads = q.shape[1]
    kk = k.float().repeat_interleave(heads // k.shape[1], 1)
    kp = k_pos.repeat_interleave(heads // k.shape[1], 1)[:, :, None, :]
    visible = (kp >= 0) & (kp <= q_pos[:, None, :, None])
    logits = soft_capped(q.float() @ kk.transpose(-1, -2) * scale, softcap).masked_fill(~visible, float("-inf"))
    a = torch.nan_to_num(logits.softmax(-1), nan=0.0)
    var = a.var(2) if q.shape[2] > 1 else torch.zeros_like(a[:, :, 0])
    return a.mean(2), var, -(a * torch.log(a + 1e-10)).sum(2)


def attention_max(query, keys, query_pos, key_pos, scale, softcap=0.0, block=256):
    """Reference of the attention_max op (KVzip's scores; the PyTorch code the op replaced): [B, Hkv, M] fp32, each
    key's largest softmax probability over the real queries of its KV head's query heads, `block` queries at a
    time, each query's softmax over the keys it sees (0 <= key_pos <= query_pos)."""
    b, h, q, d = query.shape
    hkv, m = keys.shape[1], keys.shape[2]
    keys = keys.float()[:, :, None]
    best = torch.zeros(b, hkv, m, dtype=torch.float32)
    for start in range(0, q, block):
        rows = query[:, :, start:start + block].float().view(b, hkv, h // hkv, -1, d)
        logits = soft_capped(torch.matmul(rows * scale, keys.transpose(-1, -2)), softcap)
        qp = query_pos[:, None, None, start:start + block, None]
        kp = key_pos[:, :, None, None, :]
        logits = logits.masked_fill(~((kp >= 0) & (kp <= qp)), float("-inf"))
        norm = logits.logsumexp(-1, keepdim=True)
        norm = norm.masked_fill(norm.isinf(), float("inf"))  # a query that sees nothing gives nothing
        best = torch.maximum(best, (logits - norm).exp().amax((2, 3)))
    return best


def ragged_attention(q, k, v, pos, offsets, q_pos, scale, softcap=0.0, weights=True, query_chunk=None):
    """Reference of the ragged_attention op: for each segment s = b * Hkv + g, the G query heads of kv head g
    attend over entries offsets[s]..offsets[s+1]-1 with a plain fp32 softmax over the visible ones
    (0 <= pos <= q_pos); a query that sees no entry gets zeros. Returns fp32 out [B, H, Q, D] and the
    attention weights [G * Q, T] (row j * Q + i: query i of the segment's j-th query head), or None without
    `weights`, on q's device. `query_chunk`: queries per matmul (a long chunk's [G, Q, n] logits need not fit)."""
    batch, heads, q_len, _ = q.shape
    kv_heads = (offsets.numel() - 1) // batch
    group = heads // kv_heads
    out = q.new_zeros(batch, heads, q_len, v.shape[1], dtype=torch.float32)
    att_all = q.new_zeros(group, q_len, k.shape[0], dtype=torch.float32) if weights else None
    step = query_chunk or max(q_len, 1)
    for s in range(batch * kv_heads):
        b, g = divmod(s, kv_heads)
        lo, hi = int(offsets[s]), int(offsets[s + 1])
        ks, vs, ps = k[lo:hi].float(), v[lo:hi].float(), pos[lo:hi]
        for i0 in range(0, q_len, step):
            qs = q[b, g * group:(g + 1) * group, i0:i0 + step].float()                 # [G, q, D]
            visible = (ps[None, :] >= 0) & (ps[None, :] <= q_pos[b, i0:i0 + step][:, None])  # [q, n]
            logits = soft_capped(qs @ ks.T * scale, softcap).masked_fill(~visible, float("-inf"))
            att = torch.nan_to_num(logits.softmax(-1), nan=0.0)                           # all -inf rows -> zeros
            out[b, g * group:(g + 1) * group, i0:i0 + step] = att @ vs
            if weights:
                att_all[:, i0:i0 + step, lo:hi] = att
    return out, att_all.view(group * q_len, k.shape[0]) if weights else None

def allocate(scores: list[float], caps: list[int], total: int) -> list[int]:
    """Budgets proportional to scores, capped, summing to min(total, sum(caps)) (contract in csrc/register.cpp)."""
    s = [max(x, 0.0) for x in scores]
    ssum = sum(s)
    out = []
    for x, c in zip(s, caps):
        share = x / ssum if ssum > 0 else 1.0 / len(s)
        out.append(min(max(int(share * total), 0), c))
    target = min(total, sum(caps))
    while sum(out) < target:
        eligible = [i for i in range(len(out)) if out[i] < caps[i]]
        deficit = target - sum(out)
        each, extra = divmod(deficit, len(eligible))
        for rank, i in enumerate(eligible):
            out[i] += min(each + (1 if rank < extra else 0), caps[i] - out[i])
    return out


def pool(x: torch.Tensor, kernel: int, kind: str) -> torch.Tensor:
    if kind == "avg":
        return F.avg_pool1d(x[:, None], kernel, 1, kernel // 2, count_include_pad=True)[:, 0]
    return F.max_pool1d(x[:, None], kernel, 1, kernel // 2)[:, 0]


def cake_layer(a: torch.Tensor, num_kv_heads: int, window: int, gamma: float, kernel: int):
    """-> (S [Hkv, P] per-KV-head indicator, dispersion, shift) of one layer (docs/methods.md#cake)."""
    heads, _, n = a.shape
    prefix = n - window
    mean, var = a.mean(1), a.var(1)
    ind = pool((mean + gamma * var)[:, :prefix], kernel, "avg")
    score = ind.view(num_kv_heads, heads // num_kv_heads, prefix).mean(1)
    ap = a[:, :, :prefix].double()
    dispersion = -(ap * torch.log(ap + 1e-10)).sum().item()
    shift = a[:, :, :prefix].var(1).double().sum().item()
    return score, dispersion, shift


def snapkv_layer(a: torch.Tensor, num_kv_heads: int, window: int, kernel: int, kind: str):
    heads, _, n = a.shape
    prefix = n - window
    mean = a.mean(1)[:, :prefix].view(num_kv_heads, heads // num_kv_heads, prefix).mean(1)
    return pool(mean, kernel, kind)


def top_set(score: torch.Tensor, among: list[int], b: int) -> list[int]:
    """The b entries of `among` with the highest score, sorted by position."""
    if b >= len(among):
        return sorted(among)
    idx = torch.tensor(among)
    best = score[idx].topk(b).indices
    return sorted(idx[best].tolist())


def cake_reference(layers_qk, scale, budget, window, tau1, tau2, gamma=200.0, kernel=5, cascading=True,
                   score_map=None):
    """CAKE's kept prefix entries and prefix budgets of one prompt.

    layers_qk: per layer (q [H, n, D], k [Hkv, n, D]). score_map: applied to each layer's indicator [Hkv, P]
    before selection (methods built on CAKE's scores). Returns (kept[layer][kv_head] -> positions,
    budgets[layer], scores[layer]) or None when the prompt is not compressed."""
    n = layers_qk[0][1].shape[1]
    if n <= budget:
        return None
    num_layers, prefix = len(layers_qk), n - window
    total = (budget - window) * num_layers
    prefs, scores, kept, budgets = [], [], [], []
    for layer, (q, k) in enumerate(layers_qk):
        a = window_attention(q[:, -window:], k, scale)
        score, dispersion, shift = cake_layer(a, k.shape[0], window, gamma, kernel)
        if score_map is not None:
            score = score_map(score)
        prefs.append(dispersion ** (1.0 / tau1) * shift ** (1.0 / tau2))
        scores.append(score)
        kept.append([list(range(prefix)) for _ in range(k.shape[0])])
        budgets.append(prefix)
        if cascading or layer == num_layers - 1:
            alloc = allocate(prefs, [prefix] * len(prefs), total)
            for i in range(len(prefs)):
                b = min(alloc[i], len(kept[i][0]))
                kept[i] = [top_set(scores[i][h], kept[i][h], b) for h in range(len(kept[i]))]
                budgets[i] = b
    return kept, budgets, scores


def snapkv_reference(layers_qk, scale, budget, window, kernel=7, kind="max", softcap=0.0):
    n = layers_qk[0][1].shape[1]
    if n <= budget:
        return None
    prefix = n - window
    kept, scores = [], []
    for q, k in layers_qk:
        score = snapkv_layer(window_attention(q[:, -window:], k, scale, softcap), k.shape[0], window, kernel, kind)
        scores.append(score)
        kept.append([top_set(score[h], list(range(prefix)), budget - window) for h in range(k.shape[0])])
    return kept, [budget - window] * len(layers_qk), scores


def assert_same_selection(got: list[int], want: list[int], score: torch.Tensor, rel_tol: float = 1e-4):
    """Selections must match; an entry may differ only where its reference score ties the cut-off
    within floating-point tolerance (the two sides sum in different orders)."""
    got_set, want_set = set(got), set(want)
    assert len(got_set) == len(want_set), f"kept {len(got_set)} entries, reference keeps {len(want_set)}"
    if got_set == want_set:
        return
    cutoff = min(score[j].item() for j in want_set)
    for j in got_set ^ want_set:
        assert math.isclose(score[j].item(), cutoff, rel_tol=rel_tol, abs_tol=1e-7), (
            f"entry {j} (score {score[j].item():.6g}) differs from the reference selection (cut-off {cutoff:.6g})")


def append_entries(k, v, pos, offsets, new_k, new_v, q_pos):
    """Reference of the append_entries op (in place): token i of segment s goes to its i-th free slot."""
    batch, kv_heads, q_len, _ = new_k.shape
    for s in range(batch * kv_heads):
        b, g = divmod(s, kv_heads)
        lo, hi = int(offsets[s]), int(offsets[s + 1])
        free = [lo + j for j in range(hi - lo) if int(pos[lo + j]) < 0][:q_len]
        assert len(free) == q_len, "reference: not enough free slots"
        for i, t in enumerate(free):
            k[t], v[t], pos[t] = new_k[b, g, i], new_v[b, g, i], q_pos[b, i]


def evict_scores(q, k, pos, offsets, q_pos, scale, var_weight):
    """Per segment: fp32 [n] score mean_heads(mean_i A + w * var_i A) of the attention of the G*Q query rows."""
    batch, heads, q_len, _ = q.shape
    kv_heads = (offsets.numel() - 1) // batch
    group = heads // kv_heads
    scores = []
    for s in range(batch * kv_heads):
        b, g = divmod(s, kv_heads)
        lo, hi = int(offsets[s]), int(offsets[s + 1])
        ps = pos[lo:hi]
        visible = (ps[None, :] >= 0) & (ps[None, :] <= q_pos[b][:, None])                # [Q, n]
        logits = (q[b, g * group:(g + 1) * group].float() @ k[lo:hi].float().T * scale)  # [G, Q, n]
        a = torch.nan_to_num(logits.masked_fill(~visible, float("-inf")).softmax(-1), nan=0.0)
        var = a.var(1) if q_len > 1 and hi > lo else torch.zeros_like(a[:, 0])
        scores.append((a.mean(1) + var_weight * var).mean(0))
    return scores


def evict_lowest(q, k, pos, offsets, q_pos, over, scale, var_weight, protect, kernel_size, pooling, n_evict):
    """Reference of the evict_lowest op (in place on pos and over). Returns, per segment, the pooled score of
    each candidate by flat slot index (for tie-tolerant comparisons)."""
    batch = q.shape[0]
    kv_heads = (offsets.numel() - 1) // batch
    pooled_by_slot = []
    for s, score in enumerate(evict_scores(q, k, pos, offsets, q_pos, scale, var_weight)):
        b, g = divmod(s, kv_heads)
        lo = int(offsets[s])
        newest = int(q_pos[b, -1])
        cand = [lo + j for j in range(score.shape[0]) if 0 <= int(pos[lo + j]) <= newest - protect]
        cand.sort(key=lambda t: int(pos[t]))
        x = score[[t - lo for t in cand]] if cand else torch.zeros(0)
        pooled = pool(x[None], kernel_size, pooling)[0] if cand else x
        pooled_by_slot.append(dict(zip(cand, pooled.tolist())))
        if int(over[b, g]) <= 0:
            continue
        drop = min(n_evict, int(over[b, g]), len(cand))
        order = sorted(range(len(cand)), key=lambda r: (pooled[r].item(), r))
        for r in order[:drop]:
            pos[cand[r]] = -1
        over[b, g] -= drop
    return pooled_by_slot


def official_cake_decode_step(q, k, storage, q_pos_b, scale, window, kernel_size):
    """One step of the official CAKE decode evictor (CakeDecodingKVCache_LayerWise, re-stated) on one segment
    whose entries are `storage` (flat slots in the official storage order, the newest last; one over the cap):
    attention of the G query rows over the stored entries, its mean over the queries, of the entries before the
    last `window`, average-pooled along the storage (zero padding), averaged over the query heads; the top
    len - 1 by that score, in descending order (ties: earlier in the storage), then the last `window`. Returns
    (the new storage, the slot evicted)."""
    keys = k[storage].float()                                         # [n, D]
    logits = q.float() @ keys.T * scale                               # [G, Q, n]
    visible = torch.tensor([True] * len(storage))[None, :] & (q_pos_b[:, None] >= 0)
    a = torch.nan_to_num(logits.masked_fill(~visible, float("-inf")).softmax(-1), nan=0.0).mean(1)  # [G, n]
    cands = len(storage) - window
    score = pool(a[:, :cands], kernel_size, "avg").mean(0)            # [cands]
    ranked = sorted(range(cands), key=lambda i: (-score[i].item(), i))
    return [storage[i] for i in ranked[:cands - 1]] + storage[cands:], storage[ranked[-1]]
