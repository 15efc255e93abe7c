"""CAKE (Qin et al., ICLR 2025): layer preferences from attention dispersion and shift, cascading
budget allocation across layers, and the mean + gamma * variance eviction indicator.

Differences from the official code (antgroup/cakekv), all deliberate: statistics are computed in fp32
(the official code casts the window attention back to fp16/bf16 first); a prompt no longer than
`budget` is left alone (the official threshold is budget + window); decode-time scoring reuses the
prefill indicator (for one query the variance term is zero, as in the official decode evictor) and
pools along positions rather than along the cache's storage order."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import (LayerView, Method, cascading_option, flat_head_budgets, group_indicator, head_floor_option,
                   kernel_size_option, per_head_option, pool_candidates)
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


def default_taus(name_or_path: str, budget: int) -> tuple[float, float]:
    name = (name_or_path or "").lower()
    for key, by_budget in TAU_TABLE.items():
        if key in name and budget in by_budget:
            return by_budget[budget]
    return 1.0, 1.0


@dataclass(frozen=True, kw_only=True)
class CakeOptions(Options):
    tau1: float = option(1.0, "dispersion exponent 1/tau1 of the layer preference (default: the official "
                              "value for the model and budget, else 1.0)", gt=0)
    tau2: float = option(1.0, "shift exponent 1/tau2 of the layer preference (default as tau1)", gt=0)
    gamma: float = option(200.0, "weight of the attention variance in the indicator mean + gamma * var", ge=0)
    kernel_size: int = kernel_size_option(5)
    cascading: bool = cascading_option(True)
    # Not in the CAKE paper (our decision): AdaKV-style head budgets with AdaKV's floor.
    head_budgets: bool = per_head_option(False)
    head_floor: float = head_floor_option(0.2)
    decode_evict: bool = decode_evict_option(True)


@register
class Cake(Method):
    name = "cake"
    Options = CakeOptions

    def resolved_defaults(self, config, budget):
        tau1, tau2 = default_taus(getattr(config, "_name_or_path", ""), budget)
        return {"tau1": tau1, "tau2": tau2}

    @property
    def pooling(self):
        return self.options.kernel_size, "avg"

    @property
    def decode_variance_weight(self) -> float:
        return self.options.gamma

    def head_budgets(self, indicator, budgets):
        if not self.options.head_budgets:
            return None
        return flat_head_budgets(indicator, budgets, self.options.head_floor)

    def score_layer(self, view: LayerView):
        mean, var, entropy = view.window_stats()
        num_kv_heads = view.keys.shape[1]
        # Average pooling is linear, so the group mean may come before it (same result, fewer rows).
        indicator = group_indicator(mean, var, self.options.gamma, num_kv_heads)
        score = pool_candidates(indicator, view.candidates, *self.pooling)
        # Dispersion and shift are summed over query heads and prefix keys of each row.
        prefix = view.candidates.repeat_interleave(mean.shape[1] // num_kv_heads, dim=1)
        dispersion = torch.where(prefix, entropy, torch.zeros_like(entropy)).sum((1, 2)).double()
        shift = torch.where(prefix, var, torch.zeros_like(var)).sum((1, 2)).double()
        preference = dispersion.pow(1.0 / self.options.tau1) * shift.pow(1.0 / self.options.tau2)
        return score, preference

    def layer_budgets(self, preferences, caps, is_last, indicators=None):
        return self.preference_budgets(preferences, caps, is_last, self.options.cascading)
