"""Plain-PyTorch references of the methods beyond CAKE and SnapKV (docs/methods.md), one unpadded prompt at a time,
with whole attention matrices and Python loops. Each returns (kept[layer][kv_head] -> sorted prefix
positions, prefix budgets[layer][kv_head], scores[layer] [Hkv, P]) or None when not compressed."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from helpers import capture_qkv
from reference import allocate, cake_layer, cake_reference, pool, top_set, window_attention


def _uniform(scores, budgets):
    kept = [[top_set(s[h], list(range(s.shape[1])), b) for h in range(s.shape[0])] for s, b in zip(scores, budgets)]
    return kept, [[b] * s.shape[0] for s, b in zip(scores, budgets)], scores


def _per_head(scores, head_budgets):
    kept = [[top_set(s[h], list(range(s.shape[1])), bh[h]) for h in range(s.shape[0])]
            for s, bh in zip(scores, head_budgets)]
    return kept, head_budgets, scores


def streamingllm_reference(layers, budget, window, sinks=4):
    n = layers[0][1].shape[1]
    if n <= budget:
        return None
    p, b = n - window, budget - window
    keep = sorted(set(range(min(sinks, b))) | set(range(p - max(b - sinks, 0), p)))
    hkv = layers[0][1].shape[0]
    return [[keep] * hkv for _ in layers], [[b] * hkv for _ in layers], None


def h2o_reference(layers, scale, budget, window):
    n = layers[0][1].shape[1]
    if n <= budget:
        return None
    scores = []
    for q, k, *_ in layers:
        a = window_attention(q, k, scale)          # all n queries as the "window": full causal n x n
        col = a.sum(1)[:, : n - window]
        scores.append(col.view(k.shape[0], -1, n - window).mean(1))
    return _uniform(scores, [budget - window] * len(layers))


def snap_scores(layers, scale, window, kernel=7, kind="max"):
    out = []
    for q, k, *_ in layers:
        n = k.shape[1]
        a = window_attention(q[:, -window:], k, scale)
        out.append(pool(a.mean(1)[:, : n - window].view(k.shape[0], -1, n - window).mean(1), kernel, kind))
    return out


def pyramidkv_reference(layers, scale, budget, window, beta=20):
    n, nl = layers[0][1].shape[1], len(layers)
    if n <= budget:
        return None
    p = budget - window
    if n < 2 * p or nl == 1:
        prof = [float(p)] * nl
    else:
        lo = p // beta
        hi = 2 * p - lo
        if hi >= n - window:
            hi, lo = n - window, 2 * p - (n - window)
        prof = [hi - i * (hi - lo) / (nl - 1) for i in range(nl)]
    return _uniform(snap_scores(layers, scale, window), allocate(prof, [n - window] * nl, p * nl))


def pyramidkv_official_budgets(n, layers, budget, window, beta=20):
    """PyramidKVCluster's per-layer prefix budgets: all layers P below 2P tokens, else max_num - l * steps
    with min_num = P // beta, max_num = 2P - min_num (max_num >= n - W: n - W, min_num = 2P - max_num)
    and the integer steps = (max_num - min_num) // (layers - 1)."""
    p = budget - window
    if n < 2 * p:
        return [p] * layers
    min_num = p // beta
    max_num = p * 2 - min_num
    if max_num >= n - window:
        max_num = n - window
        min_num = p * 2 - max_num
    steps = (max_num - min_num) // (layers - 1)
    return [max_num - i * steps for i in range(layers)]


def pyramidkv_official_reference(layers, scale, budget, window):
    n = layers[0][1].shape[1]
    if n <= budget:
        return None
    return _uniform(snap_scores(layers, scale, window), pyramidkv_official_budgets(n, len(layers), budget, window))


def flat_heads(score, budget, alpha):
    """Floor floor(alpha*budget) per head, the rest by one top-k over the heads' remaining entries."""
    hkv, p = score.shape
    floor = min(int(alpha * budget), p)
    rest = []
    for h in range(hkv):
        vals = sorted(score[h].tolist(), reverse=True)
        rest += [(v, h) for v in vals[floor:]]
    rest.sort(key=lambda t: -t[0])
    out = [floor] * hkv
    for _, h in rest[: max(budget * hkv - floor * hkv, 0)]:
        out[h] += 1
    return out


def adakv_reference(layers, scale, budget, window, alpha=0.2):
    n = layers[0][1].shape[1]
    if n <= budget:
        return None
    scores = snap_scores(layers, scale, window)
    return _per_head(scores, [flat_heads(s, budget - window, alpha) for s in scores])


def defensive_layer(q, k, v, wo, scale, window, budget, kernel=5, threshold=0.9, protected_set="reach"):
    """DefensiveKV score [Hkv, P] of one layer (docs/methods.md#defensivekv, decisions in defensivekv.py);
    protected_set "reach": the top entries until their mass reaches the target, "below": those before the
    one that reaches it (none if it is never reached)."""
    hkv, n, d = k.shape
    heads, p = q.shape[0], n - window
    g = heads // hkv
    a = window_attention(q[:, -window:], k, scale).view(hkv, g, window, n)
    ap = a[..., :p]
    pooled = F.avg_pool1d(ap.reshape(-1, 1, p), kernel, 1, kernel // 2, count_include_pad=True).view(ap.shape)
    pooled = pooled / pooled.sum(-1, keepdim=True) * ap.sum(-1, keepdim=True)
    m = pooled.amax((1, 2))
    dd = torch.maximum(m, m.mean(-1, keepdim=True))
    wo_heads = wo.float().view(wo.shape[0], heads, d)           # [hidden, H, D]
    norms = torch.stack([torch.stack([(v[kv, :p].float() @ wo_heads[:, kv * g + j].t()).abs().sum(-1)
                                      for j in range(g)]).mean(0) for kv in range(hkv)])
    s = dd * norms / norms.sum(0, keepdim=True)
    bias = a[..., p:].sum(-1).mean((1, 2))
    mean = ap.mean((1, 2))
    mean = mean / mean.sum(-1, keepdim=True)
    cap = max(int((n - window) * budget / n) - window, 0)
    top = s.max()
    out = s.clone()
    for h in range(hkv):
        vals, order = torch.sort(mean[h], descending=True, stable=True)
        cum, need, reached = 0.0, 0, False
        target = threshold - bias[h].item()
        if target > 0:
            for x in vals.tolist():
                need += 1
                cum += x
                if cum >= target:
                    reached = True
                    break
        if protected_set == "below":
            need = need - 1 if reached else 0
        out[h, order[: min(need, cap)]] = top
    return out


def defensivekv_reference(layers, scale, budget, window, head_budgets=True, protected_set="reach"):
    n = layers[0][1].shape[1]
    if n <= budget:
        return None
    scores = [defensive_layer(q, k, v, wo, scale, window, budget, protected_set=protected_set)
              for q, k, v, wo in layers]
    if not head_budgets:
        return _uniform(scores, [budget - window] * len(layers))
    return _per_head(scores, [flat_heads(s, budget - window, 0.0) for s in scores])


def layer_defensivekv_reference(layers, scale, budget, window):
    """Non-cascaded, head-adaptive: one global top-k over all layers' and heads' scores."""
    n = layers[0][1].shape[1]
    if n <= budget:
        return None
    scores = [defensive_layer(q, k, v, wo, scale, window, budget) for q, k, v, wo in layers]
    hkv = scores[0].shape[0]
    entries = [(s[h, j].item(), i, h) for i, s in enumerate(scores) for h in range(hkv) for j in range(s.shape[1])]
    entries.sort(key=lambda t: -t[0])
    counts = [[0] * hkv for _ in scores]
    for _, i, h in entries[: (budget - window) * len(scores) * hkv]:
        counts[i][h] += 1
    return _per_head(scores, counts)


def lava_layer_score(q, k, v, scale, window, p):
    """One layer of LAVa: (per-KV-head scores [Hkv, p] = max over the group of max-pooled window attention
    times the value-norm bound, normalised entropy of the layer's scores)."""
    hkv, g = k.shape[0], q.shape[0] // k.shape[0]
    a = window_attention(q[:, -window:], k, scale)
    pooled = pool(a.mean(1)[:, :p], 7, "max").view(hkv, g, p)
    nu = v[:, :p].float().abs().sum(-1).amax(-1)
    s = (pooled * nu[:, None, None]).amax(1)
    pr = (s / s.sum()).double().flatten()
    rho = (-(pr * torch.log(pr + 1e-16)).sum() / torch.log(torch.tensor(float(hkv * p)))).item()
    return s, rho


def lava_cascade(layers, scale, window, p, recut):
    """The LAVa cascade both references share: each layer scored as it comes (every head holding the prefix
    p), then every layer seen so far re-cut: `recut(i, rhos, scores_i, kept_i)` gives (b_h to keep per
    head, budgets to record), or None to leave layer i as it is. Returns (kept, budgets, scores)."""
    scores, rhos, kept, budgets = [], [], [], []
    for q, k, v, _ in layers:
        s, rho = lava_layer_score(q, k, v, scale, window, p)
        hkv = k.shape[0]
        rhos.append(rho)
        scores.append(s)
        kept.append([list(range(p)) for _ in range(hkv)])
        budgets.append([p] * hkv)
        for i in range(len(rhos)):
            cut = recut(i, rhos, scores[i], kept[i])
            if cut is not None:
                hb, budgets[i] = cut
                kept[i] = [top_set(scores[i][h], kept[i][h], hb[h]) for h in range(hkv)]
    return kept, budgets, scores


def lava_reference(layers, scale, budget, window, alpha=0.2):
    """Cascading LAVa: after every layer, layer budgets by normalised entropy, head budgets by the
    flattened top-k with floor over the entries each layer still holds (nested re-trims)."""
    n, nl = layers[0][1].shape[1], len(layers)
    if n <= budget:
        return None
    p = n - window

    def recut(i, rhos, scores_i, kept_i):
        alloc = allocate(rhos, [p] * len(rhos), (budget - window) * nl)
        held = torch.full_like(scores_i, float("-inf"))
        for h, ks in enumerate(kept_i):
            held[h, ks] = scores_i[h, ks]
        hb = [min(b, len(kept_i[h])) for h, b in enumerate(flat_heads_held(held, alloc[i], alpha))]
        return hb, hb

    return lava_cascade(layers, scale, window, p, recut)


def flat_heads_held(held, budget, alpha):
    """flat_heads over only the finite (still held) entries of each head."""
    hkv = held.shape[0]
    have = [int(torch.isfinite(held[h]).sum()) for h in range(hkv)]
    floors = [min(int(alpha * budget), x) for x in have]
    rest = []
    for h in range(hkv):
        vals = sorted([x for x in held[h].tolist() if x != float("-inf")], reverse=True)
        rest += [(x, h) for x in vals[floors[h]:]]
    rest.sort(key=lambda t: -t[0])
    out = list(floors)
    for _, h in rest[: max(budget * hkv - sum(floors), 0)]:
        out[h] += 1
    return out


# ---- the official code's rules (official=True), restated from reading the official code ----

def official_flat_heads(score, budget, alpha, floor=None):
    """AdaKV / LAVa head budgets: c_h = head h's share of the top (Hkv * budget) entries of the layer's
    flattened finite scores (ties: lower head, then earlier slot), b_h = round_half_even(c_h * (1 - alpha)
    + F) evaluated in float32 (an int64 count times a Python float is float32 in torch), F = int(alpha *
    budget) unless given (LAVa's fixed floor)."""
    import numpy as np
    hkv, p = score.shape
    entries = sorted(((score[h, j].item(), h, j) for h in range(hkv) for j in range(p)
                      if score[h, j].item() != float("-inf")), key=lambda t: (-t[0], t[1], t[2]))
    counts = [0] * hkv
    for _, h, _ in entries[: hkv * budget]:
        counts[h] += 1
    f = int(budget * alpha) if floor is None else floor
    return [int(np.rint(np.float32(np.float32(c) * np.float32(1 - alpha)) + np.float32(f))) for c in counts]


def adakv_official_reference(layers, scale, budget, window, alpha=0.2):
    """Official AdaKV: compresses when n >= budget; head budgets by official_flat_heads."""
    n = layers[0][1].shape[1]
    if n < budget:
        return None
    scores = snap_scores(layers, scale, window)
    return _per_head(scores, [official_flat_heads(s, budget - window, alpha) for s in scores])


def lava_official_reference(layers, scale, budget, window, alpha=0.2):
    """The official LAVa cascade (hijack loop + LavaKVCluster.update_kv_gqa / re_update_kv_gqa): after
    layer l, B_i = int(rho_i / sum(rho) * (budget - window) * L) for i <= l; a layer compressed for the
    first time keeps per head the top b_h of its original scores (skipped while B_i > its prefix); a
    later re-cut applies only if B_i <= the last applied B_i and keeps the top b_h of what the head
    holds; b_h from the original scores' flattened top-(Hkv * B_i) with the floor int(alpha * budget)."""
    n, nl = layers[0][1].shape[1], len(layers)
    if n <= budget:
        return None
    p = n - window
    total = (budget - window) * nl
    floor = int(alpha * budget)
    applied = [None] * nl  # the last B_i applied to each layer

    def recut(i, rhos, scores_i, kept_i):
        b = int(rhos[i] / sum(rhos) * total)
        if (applied[i] is None and b > p) or (applied[i] is not None and b > applied[i]):
            return None
        applied[i] = b
        hb = official_flat_heads(scores_i, b, alpha, floor)
        return hb, [min(x, p) for x in hb]

    return lava_cascade(layers, scale, window, p, recut)


def official_adjust_budgets(budgets, total, prefix):
    """CAKE's adjust_budgets restated: ints (truncated), clamp to prefix remembering the excess, the
    excess in equal shares (remainder to the first) to the layers under the prefix (no re-clamp), then
    the sum forced to total (deficit to layers under the prefix, surplus from layers above 1)."""
    out = [int(x) for x in budgets]
    excess = sum(max(x - prefix, 0) for x in out)
    out = [min(x, prefix) for x in out]
    if excess > 0:
        under = [i for i in range(len(out)) if out[i] < prefix]
        for rank, i in enumerate(under):
            out[i] += excess // len(under) + (1 if rank < excess % len(under) else 0)
    diff = total - sum(out)
    if diff > 0:
        pick = [i for i in range(len(out)) if out[i] < prefix]
    else:
        pick = [i for i in range(len(out)) if out[i] > 1]
    if diff != 0 and pick:
        for rank, i in enumerate(pick):
            step = abs(diff) // len(pick) + (1 if rank < abs(diff) % len(pick) else 0)
            out[i] += step if diff > 0 else -step
    return out


def cake_official_layer(q, k, window, gamma, kernel, tau1, tau2):
    """One layer of official CAKE in the model's dtype: -> (hh score [Hkv, P] in the model dtype,
    preference as a float32 tensor). q [H, n, D], k [Hkv, n, D] of one unpadded prompt."""
    import math
    heads, n, d = q.shape
    hkv = k.shape[0]
    dt = q.dtype
    kk = torch.repeat_interleave(k, heads // hkv, dim=0)
    logits = (q[None, :, -window:] @ kk[None].transpose(2, 3)) / math.sqrt(d)
    block = torch.full((window, window), torch.finfo(dt).min, dtype=dt).triu(1)
    logits[..., -window:] = logits[..., -window:] + block
    a = torch.softmax(logits, dim=-1, dtype=torch.float32).to(dt)             # [1, H, W, n]
    prefix = a[..., : n - window]
    x = prefix.float()
    disp = -(x * torch.log(x + 1e-10)).sum()
    var = prefix.var(dim=2)[0].sum(0).sum(0)
    pref = disp ** (1 / tau1) * var ** (1 / tau2)
    ind = a.mean(dim=2) + gamma * a.var(dim=2)
    ind = F.avg_pool1d(ind[..., : n - window], kernel, 1, kernel // 2)
    return ind.view(hkv, heads // hkv, n - window).mean(1), pref


def cake_official_reference(layers_qk, budget, window, tau1=1.0, tau2=1.0, gamma=200.0, kernel=5,
                            cascading=True):
    """Official CAKE prefill: no eviction if n <= budget + window; else per layer the official scores,
    after every layer (cascading) or the last, shares pref_i / sum * total in float32, adjusted, clamped
    to the prefix, and a nested top-k of each head."""
    n, nl = layers_qk[0][1].shape[1], len(layers_qk)
    if n <= budget + window:
        return None
    p, total = n - window, (budget - window) * nl
    prefs, scores, kept, budgets = [], [], [], []
    for layer, (q, k) in enumerate(layers_qk):
        s, pref = cake_official_layer(q, k, window, gamma, kernel, tau1, tau2)
        scores.append(s.float())
        prefs.append(pref)
        kept.append([list(range(p)) for _ in range(k.shape[0])])
        budgets.append(p)
        if cascading or layer == nl - 1:
            acc = torch.tensor(0.0)
            for x in prefs:
                acc = acc + x
            shares = [(x / acc * total).item() for x in prefs]
            alloc = official_adjust_budgets(shares, total, p)
            for i, b in enumerate(alloc):
                b = max(0, min(b, p, len(kept[i][0])))
                kept[i] = [top_set(scores[i][h], kept[i][h], b) for h in range(len(kept[i]))]
                budgets[i] = b
    return kept, budgets, scores


def defensive_layer_official(q, k, v, wo, scale, window, budget, kernel=5, threshold=0.9):
    """DefensiveKV score [Hkv, P] with the official protected set: window_bias = mean over all query heads
    and window queries of the mass on the last W prefix keys; count = index of the first cumsum >=
    threshold - bias (0 if never); cap = int((n - W) * budget / n - W), may be negative; protected =
    order[:min(count, cap)] with Python slicing."""
    hkv, n, d = k.shape
    p = n - window
    base = defensive_layer(q, k, v, wo, scale, window, budget, kernel, threshold=-1.0)  # nothing protected
    heads = q.shape[0]
    a = window_attention(q[:, -window:], k, scale).view(hkv, heads // hkv, window, n)
    ap = a[..., :p]
    bias = ap[..., -window:].sum(-1).mean().item()
    mean = ap.mean((1, 2))
    mean = mean / mean.sum(-1, keepdim=True)
    cap = int((n - window) * budget / n - window)
    top = base.max()
    out = base.clone()
    for h in range(hkv):
        vals, order = torch.sort(mean[h], descending=True, stable=True)
        csum = vals.cumsum(0).tolist()
        crossing = [i for i, c in enumerate(csum) if c >= threshold - bias]
        count = crossing[0] if crossing else 0
        out[h, order[: min(count, cap)]] = top
    return out


def lend_spans(score, before, after, weight):
    """SpanCAKE's scores [Hkv, P]: each entry keeps the larger of its own score and `weight` x the best score
    within `after` entries before it and `before` entries after it (a peak lends to its neighbourhood)."""
    out = score.clone()
    hkv, p = score.shape
    for h in range(hkv):
        for i in range(p):
            best = max(score[h, j].item() for j in range(max(0, i - after), min(p, i + before + 1)))
            out[h, i] = max(score[h, i].item(), weight * best)
    return out


def spancake_reference(layers, scale, budget, window, before=2, after=16, weight=0.5, **cake):
    """CAKE's cascade (reference.cake_reference, taus 1) over the span scores."""
    qk = [(q, k) for q, k, *_ in layers]
    out = cake_reference(qk, scale, budget, window, cake.pop("tau1", 1.0), cake.pop("tau2", 1.0),
                         score_map=lambda s: lend_spans(s, before, after, weight), **cake)
    if out is None:
        return None
    kept, budgets, scores = out
    return kept, [[b] * len(heads) for b, heads in zip(budgets, kept)], scores


def kvzip_scores(model, ids, chunk_size, sinks=4, overlap=8, first=(), resume=(), answer=(), lookback=None):
    """KVzip's scores [layer][Hkv, n] of one prompt `ids` [1, n], written from the paper and the official
    `KVScore._get_score`: each chunk re-read by a plain forward over prompt + instruction + chunk (so the chunk
    attends to the whole prompt and itself), then per layer the whole attention matrix of the re-read's queries
    over the first `sinks` positions (those before the chunk), the chunk's span and the re-read itself (causal),
    softmax over those; an entry's score is its largest probability over the queries and the group's heads.
    With `lookback` (kvzip's reread='span'), the re-read's forward attends only to the first `sinks` positions,
    the `lookback` positions before the span, the span and itself (a mask over the plain forward)."""
    n = ids.shape[1]
    row = ids[0].tolist()
    hkv = model.config.num_key_value_heads
    scores = [torch.zeros(hkv, n) for _ in range(model.config.num_hidden_layers)]
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        head = list(first) if start == 0 else list(resume) + row[max(start - overlap, 0):start]
        reread = head + list(answer) + row[start:end]
        q_len = len(reread)
        mask = None
        if lookback is not None:
            mask = torch.ones(n + q_len, n + q_len).tril().bool()
            seen = torch.zeros(n, dtype=torch.bool)
            seen[:sinks] = True
            seen[max(start - lookback, 0):end] = True
            mask[n:, :n] = seen
        layers = capture_qkv(model, torch.tensor([row + reread]), mask)
        keys_at = list(range(min(sinks, start))) + list(range(start, end)) + list(range(n, n + q_len))
        causal = torch.ones(q_len, len(keys_at), dtype=torch.bool)
        causal[:, -q_len:] = torch.ones(q_len, q_len).tril().bool()
        for layer, (q, k, *_) in enumerate(layers):
            scale = model.model.layers[layer].self_attn.scaling
            logits = (q[:, n:].float() @ k[:, keys_at].float().repeat_interleave(q.shape[0] // hkv, 0).transpose(1, 2))
            a = torch.softmax((logits * scale).masked_fill(~causal, float("-inf")), -1)  # [H, q, keys]
            span = a[:, :, min(sinks, start):min(sinks, start) + end - start]
            scores[layer][:, start:end] = span.amax(1).view(hkv, -1, end - start).amax(1)
    return scores


def kvzip_reference(model, ids, budget, window, chunk_size, sinks=4, ranking="global", **task):
    """KVzip's kept prefix entries: the sinks first, then the best scores of one top-k over every layer's and
    head's candidates (ranking='global'), each layer's heads ('layer') or each head ('head')."""
    n, nl = ids.shape[1], model.config.num_hidden_layers
    if n <= budget:
        return None
    p = n - window
    scores = [torch.where(torch.arange(p) < sinks, 2.0, s[:, :p])
              for s in kvzip_scores(model, ids, chunk_size, sinks, **task)]
    if ranking == "head":
        return _uniform(scores, [budget - window] * nl)
    if ranking == "layer":
        return _per_head(scores, [flat_heads(s, budget - window, 0.0) for s in scores])
    return _global(scores, budget - window)


def _global(scores, prefix_budget):
    """Each (layer, head) keeps its winners of one top-k of prefix_budget x layers x heads over all the scores."""
    nl, (hkv, p) = len(scores), scores[0].shape
    flat = torch.stack(scores).flatten()
    best = torch.sort(flat, descending=True, stable=True).indices[: prefix_budget * nl * hkv]
    counts = torch.zeros(nl * hkv, dtype=torch.long).scatter_add_(0, best // p, torch.ones_like(best))
    return _per_head(scores, counts.view(nl, hkv).tolist())


def global_counts(indicators, total):
    """Reference of layer_defensivekv.global_counts: one stable descending sort of every layer's, head's and
    slot's score in that order; the first `total` finite ones win. [B, l, Hkv] winners."""
    b, hkv = indicators[0].shape[:2]
    owner = torch.cat([torch.full((hkv * x.shape[-1],), i * hkv) + torch.arange(hkv).repeat_interleave(x.shape[-1])
                       for i, x in enumerate(indicators)])
    flat = torch.cat([x.float().flatten(1) for x in indicators], 1)
    order = torch.sort(flat, dim=-1, descending=True, stable=True)
    win = (torch.arange(flat.shape[1])[None] < total) & torch.isfinite(order.values)
    counts = torch.zeros(b, len(indicators) * hkv, dtype=torch.long)
    return counts.scatter_add_(1, owner[order.indices], win.long()).view(b, len(indicators), hkv)


def window_on_reread_scale(w, r, normalise):
    """One head's window scores w [m] on the scale of its re-read scores r [m]: the re-read score of the same rank
    (ties in w: the earlier entry ranks first) or w x max(r) / max(w)."""
    if normalise == "max":
        return w * (r.max() / w.max())
    ranked = sorted(r.tolist(), reverse=True)
    order = sorted(range(len(w)), key=lambda i: (-w[i].item(), i))
    out = torch.empty_like(r)
    for rank, i in enumerate(order):
        out[i] = ranked[rank]
    return out


def spanzip_reference(model, ids, budget, window, chunk_size, sinks=4, ranking="global", normalise="rank",
                      window_weight=1.0, before=2, after=16, weight=0.5, gamma=200.0, kernel=5, **task):
    """SpanZip's kept prefix entries: per head, max(re-read score, window_weight x CAKE's window score with spans
    lent over the non-sink candidates, on the re-read's scale), the sinks first; budgets by one top-k over
    all layers and heads ('global') or CAKE's layer preferences (taus 1), heads uniform ('cake')."""
    n, nl = ids.shape[1], model.config.num_hidden_layers
    if n <= budget:
        return None
    p = n - window
    reread = kvzip_scores(model, ids, chunk_size, sinks, **task)
    scores, prefs = [], []
    for layer, (q, k, *_) in enumerate(capture_qkv(model, ids)):
        a = window_attention(q[:, -window:], k, model.model.layers[layer].self_attn.scaling)
        w, dispersion, shift = cake_layer(a, k.shape[0], window, gamma, kernel)
        prefs.append(dispersion * shift)
        r, w = reread[layer][:, sinks:p], lend_spans(w[:, sinks:], before, after, weight)
        combined = torch.stack([torch.maximum(rh, window_weight * window_on_reread_scale(wh, rh, normalise))
                                for rh, wh in zip(r, w)])
        scores.append(torch.cat([torch.full((k.shape[0], sinks), 2.0), combined], 1))
    if ranking == "global":
        return _global(scores, budget - window)
    return _uniform(scores, allocate(prefs, [p] * nl, (budget - window) * nl))
