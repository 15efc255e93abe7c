"""CAKE (Qin et al., ICLR 2025): layer preferences from attention dispersion and shift, cascading
budget allocation across layers, and the mean + gamma * variance eviction indicator.

Differences from the official code (antgroup/cakekv), all deliberate: statistics are computed in fp32
(the official code casts the window attention back to fp16/bf16 first); a prompt no longer than
`budget` is left alone (the official threshold is budget + window); layer budgets are an exact
water-filling under the caps (allocate_budgets); decode-time scoring reuses the prefill indicator (for
one query the variance term is zero, as in the official decode evictor) and pools along positions
rather than along the cache's storage order.

official=True switches back to the official code's choices, as far as prefill-time code reaches:
  * statistics in the model dtype: the window attention is computed as the official code does (matmul
    in the model dtype, / sqrt(head_dim), softmax in fp32, cast back to the model dtype), then entropy
    in fp32, variance / mean / mean + gamma * var / pooling / group mean in the model dtype, one
    unpadded row at a time (the official shapes); the preference disp^(1/tau1) * var^(1/tau2) is fp32;
  * layer budgets by the official adjust_budgets (`official_cake_budgets`): float32 shares of the total,
    truncated, clamped to the prefix, the excess shared equally among the layers below the prefix
    without re-clamping, the sum forced to the total, then clamped again at eviction (budget can be
    lost);
  * a prompt of n <= budget + window tokens is not compressed at prefill; with decode_evict it is cut
    to `budget` at the first decode step (by the decode-time scores, as the official decode evictor);
  * head_budgets=True uses AdaKV's official rounding (base.official_head_budgets) with head_floor, the
    counts c_h taken over the layer's scores as first computed (as LAVa's official re-cuts do);
  * decode-time eviction pools along the official storage order (`decode_score_order`): after prefill the
    kept prefix by descending indicator, then the window; after each eviction the remaining candidates by
    descending pooled score (the official top-k's order), then the newest entries.
Not exact: torch.topk
orders ties unspecified where we keep the earlier position, and in bf16 the indicator ties often;
matmul / reduction kernels may round differently on another device or torch version."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import (LayerView, Method, cascading_option, flat_head_budgets, group_indicator, head_floor_option,
                   kernel_size_option, official_head_budgets, official_option, per_head_option, pool_candidates)
from .options import Options, decode_evict_option, option
from .registry import register

# Official per-model (tau1, tau2) at cache sizes 128 and 1024 (experiments/LongBench/config/model2tau.json).
# Any other model or budget gets (1.0, 1.0), as the official code does.
TAU_TABLE: dict[str, dict[int, tuple[float, float]]] = {
    "llama-2-7b-chat": {128: (0.9, 2.3), 1024: (1.9, 1.8)},
    "llama-2-13b-chat": {128: (1.8, 2.0), 1024: (0.5, 0.4)},
    "llama-3.1-8b-instruct": {128: (1.6, 0.6), 1024: (1.6, 0.4)},
    "mistral-7b-instruct-v0.3": {128: (1.0, 0.8), 1024: (0.8, 0.5)},
    "qwen2.5-7b-instruct": {128: (0.4, 0.6), 1024: (1.5, 0.6)},
}


def tau_entry(name_or_path: str) -> str | None:
    """The TAU_TABLE key found in a model's name or path (lowercased), as the official scripts pick a row by the
    model's name; None for a model the table lacks (its taus are then 1.0)."""
    name = (name_or_path or "").lower()
    return next((key for key in TAU_TABLE if key in name), None)


def default_taus(name_or_path: str, budget: int) -> tuple[float, float]:
    return TAU_TABLE.get(tau_entry(name_or_path), {}).get(budget, (1.0, 1.0))


@dataclass(frozen=True, kw_only=True)
class CakeScoreOptions(Options):
    """CAKE's options but `official` and `cascading`: its scores and budgets (shared with methods built on CAKE,
    also those that cut every layer at once)."""

    tau1: float = option(1.0, "dispersion exponent 1/tau1 of the layer preference (default: the official "
                              "value for the model and budget, else 1.0)", gt=0)
    tau2: float = option(1.0, "shift exponent 1/tau2 of the layer preference (default as tau1)", gt=0)
    gamma: float = option(200.0, "weight of the attention variance in the indicator mean + gamma * var", ge=0)
    kernel_size: int = kernel_size_option(5)
    # Not in the CAKE paper (our decision): AdaKV-style head budgets with AdaKV's floor.
    head_budgets: bool = per_head_option(False)
    head_floor: float = head_floor_option(0.2)
    decode_evict: bool = decode_evict_option(True)


@dataclass(frozen=True, kw_only=True)
class CakeCoreOptions(CakeScoreOptions):
    """CAKE's options but `official` (shared with methods built on CAKE's cascade)."""

    cascading: bool = cascading_option(True)


@dataclass(frozen=True, kw_only=True)
class CakeOptions(CakeCoreOptions):
    official: bool = official_option()


@register
class Cake(Method):
    name = "cake"
    Options = CakeOptions

    def __init__(self, config, budget, window, **options):
        super().__init__(config, budget, window, **options)
        self._original: dict[int, torch.Tensor] = {}  # official: each layer's scores, this prefill

    def resolved_defaults(self, config, budget):
        tau1, tau2 = default_taus(getattr(config, "_name_or_path", ""), budget)
        return {"tau1": tau1, "tau2": tau2}

    @property
    def pooling(self):
        return self.options.kernel_size, "avg"

    @property
    def decode_variance_weight(self) -> float:
        return self.options.gamma

    @property
    def decode_score_order(self) -> bool:
        return self.options.official

    def compresses_prompt(self, length: int) -> bool:
        return length > self.budget + (self.window if self.options.official else 0)

    def head_budgets(self, indicator, budgets):
        if not self.options.head_budgets or self.options.official:
            return None  # official head budgets come per head from layer_budgets
        return flat_head_budgets(indicator, budgets, self.options.head_floor)

    def score_layer(self, view: LayerView):
        if self.options.official:
            return self._official_scores(view)
        mean, var, entropy = view.window_stats()
        num_kv_heads = view.keys.shape[1]
        # Average pooling is linear, so the group mean may come before it (same result, fewer rows).
        indicator = group_indicator(mean, var, self.options.gamma, num_kv_heads)
        score = pool_candidates(indicator, view.candidates, self.options.kernel_size, "avg")
        # Dispersion and shift are summed over query heads and prefix keys of each row.
        prefix = view.candidates.repeat_interleave(mean.shape[1] // num_kv_heads, dim=1)
        dispersion = torch.where(prefix, entropy, torch.zeros_like(entropy)).sum((1, 2)).double()
        shift = torch.where(prefix, var, torch.zeros_like(var)).sum((1, 2)).double()
        preference = dispersion.pow(1.0 / self.options.tau1) * shift.pow(1.0 / self.options.tau2)
        return score, preference

    def layer_budgets(self, preferences, caps, is_last, indicators=None):
        if not self.options.official:
            return self.preference_budgets(preferences, caps, is_last, self.options.cascading)
        if not self.options.cascading and not is_last:
            return None
        total = (self.budget - self.window) * self.num_layers
        budgets = official_cake_budgets(preferences, caps, total)
        if not self.options.head_budgets:
            return budgets
        # AdaKV's official rounding over the layer's scores as first computed (as LAVa's official
        # re-cuts count them), so that a re-cut with an unchanged budget changes nothing; the cache
        # trims nested (a head never regains what it dropped).
        heads = [official_head_budgets(self._original[i], budgets[:, i], self.options.head_floor)
                 for i in range(budgets.shape[1])]
        return torch.stack([h.to(budgets.device) for h in heads], 1)

    def _official_scores(self, view: LayerView):
        """The official statistics (llama_attn_forward_cake), row by row over the row's real tokens."""
        q_all, k_all = view.q_win, view.keys
        b, h, w, d = q_all.shape
        hkv, n = k_all.shape[1], k_all.shape[2]
        g = h // hkv
        kernel = self.options.kernel_size
        # The official code divides by sqrt(head_dim); keep that op where the model's scale is the same.
        divisor = math.sqrt(d) if math.isclose(view.scale, d ** -0.5, rel_tol=1e-12) else 1.0 / view.scale
        score = torch.full((b, hkv, n), float("-inf"), device=k_all.device)
        preference = torch.zeros(b, dtype=torch.float64, device=k_all.device)
        real = (view.k_pos[:, 0] >= 0).sum(-1).tolist()
        starts = view.window_start.tolist()
        for r in range(b):
            length, prefix = real[r], starts[r]
            if prefix <= 0 or length < w:
                continue  # nothing to evict in this row (it is not compressed)
            keys = k_all[r:r + 1, :, n - length:]                                   # [1, Hkv, n_r, D]
            keys = keys[:, :, None].expand(1, hkv, g, length, d).reshape(1, h, length, d)
            logits = view.soft_capped(torch.matmul(q_all[r:r + 1], keys.transpose(2, 3)) / divisor)  # [1, H, W, n_r]
            causal = torch.ones(w, w, dtype=torch.bool, device=logits.device).triu(1)
            logits[..., length - w:] = logits[..., length - w:].masked_fill(causal, float("-inf"))
            attn = F.softmax(logits, dim=-1, dtype=torch.float32).to(q_all.dtype)
            head = attn[..., :prefix]
            dispersion = head.to(torch.float32)
            dispersion = -torch.sum(dispersion * torch.log(dispersion + 1e-10))
            shift = torch.var(head, dim=-2).sum(0).sum(0).sum(0)
            pref = dispersion ** (1 / self.options.tau1) * shift ** (1 / self.options.tau2)
            preference[r] = pref.to(torch.float64)
            ind = attn.mean(dim=-2) + self.options.gamma * attn.var(dim=-2)
            ind = F.avg_pool1d(ind[:, :, :prefix], kernel_size=kernel, padding=kernel // 2, stride=1)
            ind = ind.reshape(1, hkv, g, -1).mean(dim=-2)
            score[r, :, n - length:n - length + prefix] = ind[0].float()
        if view.layer_idx == 0:  # a new prefill
            self._original = {}
        self._original[view.layer_idx] = score
        return score, preference


def official_cake_budgets(preferences: torch.Tensor, caps: torch.Tensor, total: int) -> torch.Tensor:
    """The official CAKE layer budgets [B, l] (CakeprefillKVCache + utils.adjust_budgets), per row:
    shares pref_i / sum(pref) * total in float32 (the preferences are float32 there; sum accumulated left
    to right), truncated to int; clamped to the prefix P (the excess is remembered); the total excess in
    equal shares (remainder to the first layers) to the layers below P, not re-clamped; the sum then
    forced to `total` (a deficit to the layers below P, a surplus taken from the layers above 1); finally
    clamped to P again (so budget can be lost). Budgets below 0 (the forced sum can push there, where the
    official top-k would fail) become 0; all-zero preferences give zero shares. The share times the total
is float32 as numpy >= 2 computes it (numpy 1.x promotes that product to float64; the two differ only
where a share lands within a float32 ulp of an integer)."""
    rows, seen = preferences.shape
    out = []
    for r in range(rows):
        prefix = int(caps[r, 0])
        prefs = preferences[r].to(torch.float32).cpu()
        acc = torch.zeros((), dtype=torch.float32)
        for x in prefs:
            acc = acc + x
        shares = prefs / acc * total if acc > 0 else torch.zeros_like(prefs)
        budget = shares.long().tolist()             # truncation toward zero, as numpy's int cast
        excess = sum(max(x - prefix, 0) for x in budget)
        budget = [min(x, prefix) for x in budget]
        if excess > 0:
            valid = [i for i, x in enumerate(budget) if x < prefix]
            if valid:
                each, extra = divmod(excess, len(valid))
                for rank, i in enumerate(valid):
                    budget[i] += each + (1 if rank < extra else 0)
        diff = total - sum(budget)
        if diff != 0:
            valid = [i for i, x in enumerate(budget) if (x < prefix if diff > 0 else x > 1)]
            if valid:
                each, extra = divmod(abs(diff), len(valid))
                sign = 1 if diff > 0 else -1
                for rank, i in enumerate(valid):
                    budget[i] += sign * (each + (1 if rank < extra else 0))
        out.append([max(0, min(x, int(caps[r, i]))) for i, x in enumerate(budget)])
    return torch.tensor(out, dtype=torch.long, device=caps.device)
