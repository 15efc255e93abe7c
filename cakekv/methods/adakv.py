"""Ada-KV (Feng et al., 2024; FFY0/AdaKV AdaptiveSnapKVCluster): SnapKV-style scores, head budgets by
one top-k over the flattened per-head scores of a layer with a per-head floor.

Options: kernel_size = 7, pooling = "max" (config_compress), floor_alpha = 0.2 (the LongBench / GQA
scripts; config_compress says 0.5), gqa = "mean" (group reduction before pooling, official default).
Decisions: scores are the mean over window queries (as official). The head budgets sum exactly to
Hkv * (budget - window) (see base.flat_head_budgets for the one deliberate difference in rounding).
normalize (off in the official scripts) and skip layers are not offered."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import LayerView, Method, flat_head_budgets, head_floor_option, pool_candidates, reduce_group
from .options import option
from .registry import register
from .snapkv import SnapKVOptions


@dataclass(frozen=True, kw_only=True)
class AdaKVOptions(SnapKVOptions):
    floor_alpha: float = head_floor_option(0.2)
    gqa: Literal["mean", "max"] = option("mean", "how a KV head's query heads are reduced, before pooling")


@register
class AdaKV(Method):
    name = "adakv"
    Options = AdaKVOptions

    @property
    def pooling(self):
        return self.options.kernel_size, self.options.pooling

    def score_layer(self, view: LayerView):
        mean, _, _ = view.window_stats()
        score = reduce_group(mean, view.keys.shape[1], self.options.gqa)
        return pool_candidates(score, view.candidates, *self.pooling), None

    def head_budgets(self, indicator, budgets):
        return flat_head_budgets(indicator, budgets, self.options.floor_alpha)
