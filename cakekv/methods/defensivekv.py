"""DefensiveKV (Feng et al., ICLR 2026; FFY0/DefensiveKV EfficientDefensiveKVPress); docs/methods.md#defensivekv.

Score per KV head and prefix entry: mass-preserving average pooling of every window-attention row,
max over the GQA group and the window queries, floored at the head's mean of those maxima (defensive
aggregation), times the value-norm factor through o_proj (CriticalKV), with CriticalKV's protected set
lifted to the layer's top score. Budgets: head-adaptive (one top-k over the flattened heads of a layer,
no floor), or uniform per head with head_budgets=False.

Options: kernel_size = 5, threshold = 0.9 (protected-set mass), protected_set = "reach", head_budgets = True.
Decisions where the code/paper are silent or quirky:
  * the compression ratio r of the protected-set cap int((n-W)(1-r) - W) is read as 1 - r = budget / n;
  * window_bias is the intended mean attention mass on the window keys (per KV head, averaged over the
    group and window queries), not the official slice that measures the last W prefix tokens;
  * the value-norm factor keeps the official per-token normalisation across KV heads (it makes the
    factor scale-free, which the cross-layer comparison of Layer-DefensiveKV relies on);
  * probabilities in fp32 throughout (the official casts attention to the model dtype);
  * the protected set (option protected_set) is by default the paper's: the top entries "selected until
    the cumulative attention mass reaches" threshold - window_bias (the authors' description of stage 1
    in the official code), so the entry whose mass crosses the threshold is in; "below" takes the
    official code's count argmax(cumsum >= mass), which leaves that entry out (0 when never reached).

official=True switches back to the official code's choices (EfficientDefensiveKVPress.vwl1norm):
  * protected_set defaults to "below" (the official count argmax(cumsum >= threshold - window_bias); an
    explicit protected_set="reach" is kept), clamped above by int((n - W) * budget / n - W) without a
    floor at 0, and the set is sorted_indices[:count] with Python slicing, so a negative cap protects
    all but the last |cap| entries (short prompts with a budget barely above the window);
  * window_bias is one scalar per row and layer: the attention mass on the last W *prefix* keys, summed
    per window query and averaged over every query head and window query.
Not switched: probabilities and scores in fp32 (official: the model dtype); ties (many among the
protected entries, all at the top score) keep the earlier position where torch.topk is unspecified."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .base import LayerView, Method, flat_head_budgets, kernel_size_option, official_option, per_head_option
from .options import Options, option
from .registry import register

_VNORM_CHUNK = 1024  # tokens per block of the value-through-o_proj norms


def defensive_scores(view: LayerView, budget: int, kernel: int, threshold: float, official: bool = False,
                     protected_set: str = "reach") -> torch.Tensor:
    """[B, Hkv, N] fp32 DefensiveKV score, -inf on non-candidates (`official`: the official protected-set
    cap and window_bias; `protected_set`: "reach" or "below", see the module docstring).

    Plain torch over one KV head's [B, G, W, N] window-attention block at a time (O(H*W*N) work; the
    pooled per-row max needs whole rows, so the fused window_stats op does not cover it). Candidate for a
    fused op: a second streaming pass that pools each normalised row on the fly and keeps the running
    max over (group, window) per key."""
    q, k, v = view.q_win.float(), view.keys, view.values
    b, h, w, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = h // hkv
    cand = view.candidates
    window_key = (view.k_pos >= view.window_start[:, None, None])
    if official:  # the last W prefix keys stand for the window
        window_key = cand & (view.k_pos >= (view.window_start - w)[:, None, None])
    visible = (view.k_pos[:, :, None, :] >= 0) & (view.k_pos[:, :, None, :] <= view.q_pos[:, None, :, None])
    maxed = torch.zeros(b, hkv, n, device=k.device)
    mean_attn = torch.zeros(b, hkv, n, device=k.device)
    bias = torch.zeros(b, hkv, device=k.device)
    vnorm = torch.zeros(b, hkv, n, device=k.device)
    wo = view.module.o_proj.weight.float()  # [hidden, H * D]
    for kv in range(hkv):
        logits = view.soft_capped(q[:, kv * g:(kv + 1) * g] @ k[:, kv].float()[:, None].transpose(-1, -2) * view.scale)
        a = torch.nan_to_num(logits.masked_fill(~visible[:, kv, None], float("-inf")).softmax(-1), nan=0.0)
        c = cand[:, kv, None, None, :]
        ap = torch.where(c, a, 0.0)                                     # [B, G, W, N], prefix only
        mass = ap.sum(-1, keepdim=True)
        pooled = F.avg_pool1d(ap.reshape(-1, 1, n), kernel, 1, kernel // 2, count_include_pad=True)
        pooled = torch.where(c, pooled.reshape(ap.shape), 0.0)
        pooled = pooled / pooled.sum(-1, keepdim=True).clamp_min(1e-30) * mass
        maxed[:, kv] = pooled.amax((1, 2))
        mean_attn[:, kv] = ap.mean((1, 2))
        bias[:, kv] = torch.where(window_key[:, kv, None, None, :], a, 0.0).sum(-1).mean((1, 2))
        wo_g = wo[:, kv * g * d:(kv + 1) * g * d].view(-1, g, d)
        for s in range(0, n, _VNORM_CHUNK):
            proj = torch.einsum("bnd,ogd->bgno", v[:, kv, s:s + _VNORM_CHUNK].float(), wo_g)
            vnorm[:, kv, s:s + _VNORM_CHUNK] = proj.abs().sum(-1).mean(1)
    if official:  # one scalar per row: the mean over every query head (all KV heads) and window query
        bias = bias.mean(-1, keepdim=True).expand_as(bias)
    count = cand.sum(-1).clamp(min=1)
    head_mean = torch.where(cand, maxed, 0.0).sum(-1) / count
    score = torch.maximum(maxed, head_mean[..., None])
    score = score * (vnorm / vnorm.sum(1, keepdim=True).clamp_min(1e-30))
    score = torch.where(cand, score, float("-inf"))
    # CriticalKV protected set: the smallest top set of each head holding `threshold - window_bias` of
    # its (group- and window-averaged) attention mass, capped at int((n - W) * budget / n - W).
    p = torch.where(cand, mean_attn, 0.0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    sorted_p, order = torch.sort(p, dim=-1, descending=True, stable=True)
    target = (threshold - bias)[..., None]
    lengths = view.window_start.float() + w
    rank = torch.arange(n, device=k.device)[None, None]
    reached = sorted_p.cumsum(-1) >= target
    below = (~reached).sum(-1)                                          # the entries before the crossing one
    if protected_set == "reach":
        need = below + (target[..., 0] > 0).long()                      # and the crossing one
    else:
        need = torch.where(reached.any(-1), below, 0)                   # argmax of the first True
    if official:
        cap = [int(x * budget / (x + w) - w) for x in view.window_start.tolist()]
        need = torch.minimum(need, torch.tensor(cap, device=k.device)[:, None])
        # sorted_indices[:need] over the row's candidates (sorted first): negative need counts from the end
        need = torch.where(need < 0, (cand.sum(-1) + need).clamp(min=0), need)
    else:
        cap = ((view.window_start.float() * budget / lengths).floor() - w).clamp(min=0).long()
        need = torch.minimum(need, cap[:, None])
    need = torch.minimum(need, cand.sum(-1))
    protected = torch.zeros_like(cand).scatter_(-1, order, rank < need[..., None])
    top = score.flatten(1).amax(-1)[:, None, None].expand_as(score)
    return torch.where(protected & cand, top, score)


@dataclass(frozen=True, kw_only=True)
class DefensiveKVOptions(Options):
    kernel_size: int = kernel_size_option(5)
    threshold: float = option(0.9, "attention mass of each head's protected set (CriticalKV)", ge=0, le=1)
    protected_set: Literal["reach", "below"] = option(
        "reach", "protected entries of a head: the top ones until their attention mass reaches threshold - "
                 "window_bias, the crossing one included (reach, the paper's), or those before it (below, the "
                 "official code's count; the default under official=True)")
    head_budgets: bool = per_head_option(True)
    official: bool = official_option()


@register
class DefensiveKV(Method):
    name = "defensivekv"
    uses_output_projection = True  # value norms through module.o_proj (CriticalKV)
    Options = DefensiveKVOptions

    def __init__(self, config, budget, window, **options):
        super().__init__(config, budget, window, **options)
        if self.options.official and "protected_set" not in options:  # official=True: the official count
            self.options = dataclasses.replace(self.options, protected_set="below")

    @property
    def pooling(self):
        return self.options.kernel_size, "avg"

    def score_layer(self, view: LayerView):
        return defensive_scores(view, self.budget, self.options.kernel_size, self.options.threshold,
                                self.options.official, self.options.protected_set), None

    def head_budgets(self, indicator, budgets):
        return flat_head_budgets(indicator, budgets, 0.0) if self.options.head_budgets else None
