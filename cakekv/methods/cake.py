"""CAKE (Qin et al., ICLR 2025): layer preferences from attention dispersion and shift, cascading
budget allocation across layers, and the mean + gamma * variance eviction indicator.

Differences from the official code (antgroup/cakekv), all deliberate: statistics are computed in fp32
(the official code casts the window attention back to fp16/bf16 first); a prompt no longer than
`budget` is left alone (the official threshold is budget + window); decode-time scoring reuses the
prefill indicator (for one query the variance term is zero, as in the official decode evictor) and
pools along positions rather than along the cache's storage order."""
from __future__ import annotations

import torch

from .base import LayerView, Method, flat_head_budgets, pool_candidates, reduce_group
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


@register
class Cake(Method):
    name = "cake"
    # head_budgets (not in the CAKE paper): split each layer's budget over its KV heads by one top-k
    # over the flattened head scores with AdaKV's floor head_floor = 0.2 (our decision).
    defaults = {"tau1": 1.0, "tau2": 1.0, "gamma": 200.0, "kernel_size": 5, "cascading": True,
                "head_budgets": False, "head_floor": 0.2}
    decode_evict_default = True

    def resolved_defaults(self, config, budget):
        tau1, tau2 = default_taus(getattr(config, "_name_or_path", ""), budget)
        return {**self.defaults, "tau1": tau1, "tau2": tau2}

    def validate(self):
        for key in ("tau1", "tau2"):
            if not float(self.opts[key]) > 0:
                raise ValueError(f"{key}: must be > 0, got {self.opts[key]!r}")
        if int(self.opts["kernel_size"]) < 1 or int(self.opts["kernel_size"]) % 2 == 0:
            raise ValueError(f"kernel_size: must be a positive odd integer, got {self.opts['kernel_size']!r}")
        if not 0.0 <= float(self.opts["head_floor"]) <= 1.0:
            raise ValueError(f"head_floor: must be in [0, 1], got {self.opts['head_floor']!r}")

    def head_budgets(self, indicator, budgets):
        if not self.opts["head_budgets"]:
            return None
        return flat_head_budgets(indicator, budgets, float(self.opts["head_floor"]))

    def indicator(self, mean: torch.Tensor, var: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
        # Average pooling is linear, so the group mean may come before it (same result, fewer rows).
        return reduce_group(mean + self.opts["gamma"] * var, num_kv_heads)

    def score_layer(self, view: LayerView):
        mean, var, entropy = view.window_stats()
        num_kv_heads = view.keys.shape[1]
        score = pool_candidates(self.indicator(mean, var, num_kv_heads), view.candidates, *self.pooling)
        # Dispersion and shift are summed over query heads and prefix keys of each row.
        prefix = view.candidates.repeat_interleave(mean.shape[1] // num_kv_heads, dim=1)
        dispersion = torch.where(prefix, entropy, torch.zeros_like(entropy)).sum((1, 2)).double()
        shift = torch.where(prefix, var, torch.zeros_like(var)).sum((1, 2)).double()
        preference = dispersion.pow(1.0 / self.opts["tau1"]) * shift.pow(1.0 / self.opts["tau2"])
        return score, preference

    def decode_indicator(self, mean, var, num_kv_heads):
        return self.indicator(mean, var, num_kv_heads)

    def layer_budgets(self, preferences, caps, is_last, indicators=None):
        return self.preference_budgets(preferences, caps, is_last)
