"""Plain-PyTorch references of issue 4's methods (methods.md §2-§4), one unpadded prompt at a time,
with whole attention matrices and Python loops. Each returns (kept[layer][kv_head] -> sorted prefix
positions, prefix budgets[layer][kv_head], scores[layer] [Hkv, P]) or None when not compressed."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from reference import allocate, pool, top_set, window_attention


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


def defensive_layer(q, k, v, wo, scale, window, budget, kernel=5, threshold=0.9):
    """DefensiveKV score [Hkv, P] of one layer (methods.md §2.1, decisions in defensivekv.py)."""
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
        cum, need = 0.0, 0
        target = threshold - bias[h].item()
        if target > 0:
            for x in vals.tolist():
                need += 1
                cum += x
                if cum >= target:
                    break
        out[h, order[: min(need, cap)]] = top
    return out


def defensivekv_reference(layers, scale, budget, window, head_adaptive=True):
    n = layers[0][1].shape[1]
    if n <= budget:
        return None
    scores = [defensive_layer(q, k, v, wo, scale, window, budget) for q, k, v, wo in layers]
    if not head_adaptive:
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


def lava_reference(layers, scale, budget, window, alpha=0.2):
    """Cascading LAVa: after every layer, layer budgets by normalised entropy, head budgets by the
    flattened top-k with floor over the entries each layer still holds (nested re-trims)."""
    n, nl = layers[0][1].shape[1], len(layers)
    if n <= budget:
        return None
    p = n - window
    scores, rhos, kept, budgets = [], [], [], []
    for q, k, v, _ in layers:
        hkv, g = k.shape[0], q.shape[0] // k.shape[0]
        a = window_attention(q[:, -window:], k, scale)
        pooled = pool(a.mean(1)[:, :p], 7, "max").view(hkv, g, p)
        nu = v[:, :p].float().abs().sum(-1).amax(-1)
        s = (pooled * nu[:, None, None]).amax(1)
        pr = (s / s.sum()).double().flatten()
        rhos.append((-(pr * torch.log(pr + 1e-16)).sum() / torch.log(torch.tensor(float(hkv * p)))).item())
        scores.append(s)
        kept.append([list(range(p)) for _ in range(hkv)])
        budgets.append([p] * hkv)
        alloc = allocate(rhos, [p] * len(rhos), (budget - window) * nl)
        for i in range(len(rhos)):
            held = torch.full_like(scores[i], float("-inf"))
            for h, ks in enumerate(kept[i]):
                held[h, ks] = scores[i][h, ks]
            hb = flat_heads_held(held, alloc[i], alpha)
            hb = [min(b, len(kept[i][h])) for h, b in enumerate(hb)]
            kept[i] = [top_set(scores[i][h], kept[i][h], hb[h]) for h in range(hkv)]
            budgets[i] = hb
    return kept, budgets, scores


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
