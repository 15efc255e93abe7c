"""PyramidKV (Cai et al., 2024; KVCache-Factory PyramidKVCluster): SnapKV scores with per-layer budgets
that shrink linearly with depth.

Options: kernel_size = 7, pooling = "max" (KVCache-Factory's run_longbench), beta = 20.
Budgets (docs/methods.md#pyramidkv, C = budget, P = C - window): uniform P when n < 2P; otherwise the linear
profile from max = 2P - floor(P / beta) down to min = floor(P / beta) (max clamped to n - window with
min = 2P - max), the profile of the official code and the paper at any depth: on a shallow model the
step between layers is steep (8 layers, P = 480: 936, 806, ..., 154, 24). Fixed quirk: the official
integer step floor((max - min) / (NL - 1)) makes the layers sum to more than NL * P; we take the exact
linear profile and round it with allocate_budgets so the prefix budgets sum to exactly NL * P (our
contract), extra units going to the lowest layers. official=True takes the integer step (budgets
max - l * step, their sum above NL * P). `handle.stats[l]["budget"]` shows each layer's budget."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _ops
from .base import official_option
from .options import option
from .registry import register
from .snapkv import SnapKV, SnapKVOptions


@dataclass(frozen=True, kw_only=True)
class PyramidKVOptions(SnapKVOptions):
    beta: int = option(20, "pyramid steepness: the deepest layer gets 1/beta of the mean prefix budget, "
                           "the first 2 - 1/beta of it (beta=1: uniform, as snapkv)", ge=1)
    official: bool = official_option()


@register
class PyramidKV(SnapKV):
    name = "pyramidkv"
    Options = PyramidKVOptions

    def profile(self, evictable: int) -> list[float]:
        """Prefix budget of every layer for a row with `evictable` = n - window (unrounded, or the
        official integer-step budgets)."""
        p, layers, n = self.budget - self.window, self.num_layers, evictable + self.window
        if n < 2 * p or layers == 1:
            return [float(p)] * layers
        low = p // self.options.beta
        high = 2 * p - low
        if high >= n - self.window:
            high = n - self.window
            low = 2 * p - high
        if self.options.official:
            step = (high - low) // (layers - 1)
            return [float(high - i * step) for i in range(layers)]
        return [high - i * (high - low) / (layers - 1) for i in range(layers)]

    def layer_budgets(self, preferences, caps, is_last, indicators=None):
        rows, seen = caps.shape
        evictable = caps[:, 0].tolist()
        scores = torch.tensor([self.profile(e) for e in evictable], dtype=torch.float64)
        if self.options.official:
            return scores.long()[:, :seen].to(caps.device)
        full_caps = torch.tensor(evictable, dtype=torch.long)[:, None].expand(rows, self.num_layers).contiguous()
        total = torch.full((rows,), (self.budget - self.window) * self.num_layers, dtype=torch.long)
        return _ops.allocate_budgets(scores, full_caps, total)[:, :seen].to(caps.device)
