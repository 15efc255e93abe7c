"""Ada-KV (Feng et al., 2024; FFY0/AdaKV AdaptiveSnapKVCluster): SnapKV-style scores, head budgets by
one top-k over the flattened per-head scores of a layer with a per-head floor.

Options: kernel_size = 7, pooling = "max" (config_compress), floor_alpha = 0.2 (the LongBench / GQA
scripts; config_compress says 0.5), gqa = "mean" (group reduction before pooling, official default).
Decisions: scores are the mean over window queries (as official). The head budgets sum exactly to
Hkv * (budget - window) (see base.flat_head_budgets for the one deliberate difference in rounding).
normalize (off in the official scripts) and skip layers are not offered."""
from __future__ import annotations

from .base import LayerView, Method, flat_head_budgets, pool_candidates, reduce_group
from .registry import register


@register
class AdaKV(Method):
    name = "adakv"
    defaults = {"kernel_size": 7, "pooling": "max", "floor_alpha": 0.2, "gqa": "mean"}

    def validate(self):
        if self.opts["pooling"] not in ("avg", "max"):
            raise ValueError(f"pooling: must be 'avg' or 'max', got {self.opts['pooling']!r}")
        if int(self.opts["kernel_size"]) < 1 or int(self.opts["kernel_size"]) % 2 == 0:
            raise ValueError(f"kernel_size: must be a positive odd integer, got {self.opts['kernel_size']!r}")
        if not 0.0 <= float(self.opts["floor_alpha"]) <= 1.0:
            raise ValueError(f"floor_alpha: must be in [0, 1], got {self.opts['floor_alpha']!r}")
        if self.opts["gqa"] not in ("mean", "max"):
            raise ValueError(f"gqa: must be 'mean' or 'max', got {self.opts['gqa']!r}")

    def score_layer(self, view: LayerView):
        mean, _, _ = view.window_stats()
        score = reduce_group(mean, view.keys.shape[1], self.opts["gqa"])
        return pool_candidates(score, view.candidates, *self.pooling), None

    def head_budgets(self, indicator, budgets):
        return flat_head_budgets(indicator, budgets, float(self.opts["floor_alpha"]))
