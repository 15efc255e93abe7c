"""Layer-DefensiveKV (FFY0/DefensiveKV EfficientAdaGlobalScorerPress), docs/methods.md#layer_defensivekv: DefensiveKV
scores compared as they are across layers; one global top-k of the total prefix budget
(budget - window) * layers * Hkv over every layer's (and head's) candidates gives each (layer, head)
its budget.

Options: kernel_size = 5, threshold = 0.9, head_budgets = True (per-(layer, head) winner counts, as
official; False: per-layer counts spread uniformly over the layer's heads, rounded by allocate_budgets),
cascading = False (official: one top-k at the last layer, full KV held until then). cascading=True
re-runs the global top-k over the retained entries after every layer (peak memory like CAKE's
cascade); with head_budgets=True it selects exactly the same entries as the global top-k, because a
top-T over a superset's survivors is nested (an entry dropped early already had T better ones).

official=True: DefensiveKV's official protected set and window_bias (see defensivekv.py), and the
global top-k runs as in EfficientAdaGlobalScorerPress: over every layer's prefix entries *and* its W
window entries per head scored at the layer's (row's) maximum, keeping budget * layers * Hkv entries in
all; a (layer, head) gets as prefix budget the prefix entries it wins there. Only partly reproducible in
prefill-time code: a window entry that loses the global top-k is evicted by the official code, here the
window is always kept (the prefix selection is the official one; the cache holds those extra window
entries)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _ops
from .base import cascading_option
from .defensivekv import DefensiveKV, DefensiveKVOptions
from .registry import register


def official_global_counts(indicators: list[torch.Tensor], window: int, total: int) -> torch.Tensor:
    """[B, l, Hkv] prefix winners of one top-`total` over every layer's candidates plus `window` entries
    per (layer, head) scored at the layer's maximum (appended after the layer's slots, so a tie with a
    prefix entry of the same layer goes to the prefix entry)."""
    b, hkv = indicators[0].shape[:2]
    augmented, prefix_slots = [], []
    for x in indicators:
        x = x.float()
        top = x.flatten(1).amax(-1)[:, None, None].expand(b, hkv, window)
        augmented.append(torch.cat([x, top], -1))
        prefix_slots.append(x.shape[-1])
    sizes = [x.shape[-1] for x in augmented]
    owner = torch.cat([torch.full((hkv * s,), i) for i, s in enumerate(sizes)])
    head = torch.cat([torch.arange(hkv).repeat_interleave(s) for s in sizes])
    is_prefix = torch.cat([(torch.arange(s) < m).repeat(hkv) for s, m in zip(sizes, prefix_slots)])
    flat = torch.cat([x.flatten(1) for x in augmented], 1)
    order = torch.sort(flat, dim=-1, descending=True, stable=True)
    win = (torch.arange(flat.shape[1])[None] < total) & torch.isfinite(order.values) & is_prefix[order.indices]
    counts = torch.zeros(b, len(indicators) * hkv, dtype=torch.long)
    counts.scatter_add_(1, (owner * hkv + head)[order.indices], win.long())
    return counts.view(b, len(indicators), hkv)


def global_counts(indicators: list[torch.Tensor], total: int) -> torch.Tensor:
    """[B, l, Hkv] winners of one top-`total` over all layers' candidate scores (ties: lower layer,
    then lower head, then earlier slot), on the indicators' device with nothing read back: the scores above
    the total-th largest win, then those equal to it in that order (what a stable descending sort keeps)."""
    b, hkv = indicators[0].shape[:2]
    flat = torch.cat([x.float().flatten(1) for x in indicators], 1)
    wins = torch.isfinite(flat) & (total > 0)
    if 0 < total < flat.shape[1]:
        threshold = flat.kthvalue(flat.shape[1] - total + 1, -1, keepdim=True).values
        above, tied = flat > threshold, flat == threshold
        wins &= above | (tied & (tied.cumsum(-1, dtype=torch.int32) <= total - above.sum(-1, keepdim=True)))
    per_layer = wins.split([hkv * x.shape[-1] for x in indicators], 1)
    return torch.stack([w.view(b, hkv, -1).sum(-1) for w in per_layer], 1)


@dataclass(frozen=True, kw_only=True)
class LayerDefensiveKVOptions(DefensiveKVOptions):
    cascading: bool = cascading_option(False)


@register
class LayerDefensiveKV(DefensiveKV):
    name = "layer_defensivekv"
    Options = LayerDefensiveKVOptions

    def layer_budgets(self, preferences, caps, is_last, indicators=None):
        if not self.options.cascading and not is_last:
            return None
        hkv = indicators[0].shape[1]
        per_head_total = (self.budget - self.window) * self.num_layers
        if self.options.official:
            counts = official_global_counts([x.cpu() for x in indicators], self.window,
                                            self.budget * self.num_layers * hkv)
        else:
            counts = global_counts([x.cpu() for x in indicators], per_head_total * hkv)
        if self.options.head_budgets:
            return counts.to(caps.device)
        total = torch.full((caps.shape[0],), per_head_total, dtype=torch.long)
        return _ops.allocate_budgets(counts.sum(-1).double(), caps.cpu(), total).to(caps.device)

    def head_budgets(self, indicator, budgets):
        return None  # per-head counts come from the global top-k (or uniform)
