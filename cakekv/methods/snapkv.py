"""SnapKV (Li et al., 2024): window-attention mean per entry, pooled, uniform per-layer budget.

Scored at KV-head granularity (group mean, then pooling, as AdaKV's GQA support does), unlike the
official code which expands GQA to query heads and stores G times more. Defaults are those of the
official LongBench configs (kernel 7, max pooling)."""
from __future__ import annotations

from .base import LayerView, Method, pool_candidates, reduce_group
from .registry import register


@register
class SnapKV(Method):
    name = "snapkv"
    defaults = {"kernel_size": 7, "pooling": "max"}

    def validate(self):
        if self.opts["pooling"] not in ("avg", "max"):
            raise ValueError(f"pooling: must be 'avg' or 'max', got {self.opts['pooling']!r}")
        if int(self.opts["kernel_size"]) < 1 or int(self.opts["kernel_size"]) % 2 == 0:
            raise ValueError(f"kernel_size: must be a positive odd integer, got {self.opts['kernel_size']!r}")

    def score_layer(self, view: LayerView):
        mean, _, _ = view.window_stats()
        score = reduce_group(mean, view.keys.shape[1])
        return pool_candidates(score, view.candidates, *self.pooling), None
