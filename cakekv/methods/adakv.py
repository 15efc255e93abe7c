"""Ada-KV (Feng et al., 2024; FFY0/AdaKV AdaptiveSnapKVCluster): SnapKV-style scores, head budgets by
one top-k over the flattened per-head scores of a layer with a per-head floor.

Options: kernel_size = 7, pooling = "max" (config_compress), head_floor = 0.2 (the LongBench / GQA
scripts; config_compress says 0.5), gqa = "mean" (group reduction before pooling, official default).
Decisions: scores are the mean over window queries (as official). The head budgets sum exactly to
Hkv * (budget - window) (see base.flat_head_budgets for the one deliberate difference in rounding).
normalize (off in the official scripts) and skip layers are not offered.

official=True switches back to the official code's choices:
  * head budgets b_h = round((1 - alpha) * c_h + int(alpha * B)), c_h the head's count in the flattened
    top-(Hkv * B), B = budget - window (base.official_head_budgets): every head shrinks toward the
    floor and the budgets need not sum to Hkv * B;
  * a prompt of exactly `budget` tokens is compressed too (official skips only n < budget).
Not switched: the window attention is averaged in fp32 (official: cast to the model dtype first, which
in bf16 makes many scores tie; torch.topk orders ties unspecified, we keep the earlier position)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import (LayerView, Method, flat_head_budgets, head_floor_option, official_head_budgets, official_option,
                   pool_candidates, reduce_group)
from .options import option
from .registry import register
from .snapkv import SnapKVOptions


@dataclass(frozen=True, kw_only=True)
class AdaKVOptions(SnapKVOptions):
    head_floor: float = head_floor_option(0.2)
    gqa: Literal["mean", "max"] = option("mean", "how a KV head's query heads are reduced, before pooling")
    official: bool = official_option()


@register
class AdaKV(Method):
    name = "adakv"
    Options = AdaKVOptions

    @property
    def pooling(self):
        return self.options.kernel_size, self.options.pooling

    def compresses_prompt(self, length: int) -> bool:
        return length >= self.budget if self.options.official else length > self.budget

    def score_layer(self, view: LayerView):
        mean, _, _ = view.window_stats()
        score = reduce_group(mean, view.keys.shape[1], self.options.gqa)
        return pool_candidates(score, view.candidates, *self.pooling), None

    def layer_budgets(self, preferences, caps, is_last, indicators=None):
        if not self.options.official:
            return super().layer_budgets(preferences, caps, is_last, indicators)
        # Official: each layer is cut once, when it is scored (the rule is not idempotent: re-applied to
        # what a layer holds it would shrink its heads again); layers cut before keep what they hold.
        rows, seen = caps.shape
        out = caps[..., None].expand(rows, seen, indicators[-1].shape[1]).clone()
        budgets = caps[:, -1].clamp(max=self.budget - self.window)
        out[:, -1] = official_head_budgets(indicators[-1], budgets, self.options.head_floor).to(out.device)
        return out

    def head_budgets(self, indicator, budgets):
        if self.options.official:
            return official_head_budgets(indicator, budgets, self.options.head_floor)
        return flat_head_budgets(indicator, budgets, self.options.head_floor)
