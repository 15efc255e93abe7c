"""SnapKV (Li et al., 2024): window-attention mean per entry, pooled, uniform per-layer budget.

Scored at KV-head granularity (group mean, then pooling, as AdaKV's GQA support does), unlike the
official code which expands GQA to query heads and stores G times more. Defaults are those of the
official LongBench configs (kernel 7, max pooling)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import LayerView, Method, kernel_size_option, pool_candidates, pooling_option, reduce_group
from .options import Options
from .registry import register


@dataclass(frozen=True, kw_only=True)
class SnapKVOptions(Options):
    kernel_size: int = kernel_size_option(7)
    pooling: Literal["avg", "max"] = pooling_option("max")


@register
class SnapKV(Method):
    name = "snapkv"
    Options = SnapKVOptions

    @property
    def pooling(self):
        return self.options.kernel_size, self.options.pooling

    def score_layer(self, view: LayerView):
        mean, _, _ = view.window_stats()
        score = reduce_group(mean, view.keys.shape[1])
        return pool_candidates(score, view.candidates, *self.pooling), None
