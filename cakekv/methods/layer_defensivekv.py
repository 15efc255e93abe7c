"""Layer-DefensiveKV (FFY0/DefensiveKV EfficientAdaGlobalScorerPress), methods.md §2.2: DefensiveKV
scores compared as they are across layers; one global top-k of the total prefix budget
(budget - window) * layers * Hkv over every layer's (and head's) candidates gives each (layer, head)
its budget.

Options: kernel_size = 5, threshold = 0.9, head_adaptive = True (per-(layer, head) winner counts, as
official; False: per-layer counts spread uniformly over the layer's heads, rounded by allocate_budgets),
cascading = False (official: one top-k at the last layer, full KV held until then). cascading=True
re-runs the global top-k over the retained entries after every layer (peak memory like CAKE's
cascade); with head_adaptive=True it selects exactly the same entries as the global top-k, because a
top-T over a superset's survivors is nested (an entry dropped early already had T better ones)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _ops
from .base import cascading_option
from .defensivekv import DefensiveKV, DefensiveKVOptions
from .registry import register


def global_counts(indicators: list[torch.Tensor], total: int) -> torch.Tensor:
    """[B, l, Hkv] winners of one top-`total` over all layers' candidate scores (ties: lower layer,
    then lower head, then earlier slot)."""
    b, hkv = indicators[0].shape[:2]
    sizes = [x.shape[-1] for x in indicators]
    owner = torch.cat([torch.full((hkv * s,), i) for i, s in enumerate(sizes)])
    head = torch.cat([torch.arange(hkv).repeat_interleave(s) for s in sizes])
    slot_of = owner * hkv + head
    flat = torch.cat([x.float().flatten(1) for x in indicators], 1)
    order = torch.sort(flat, dim=-1, descending=True, stable=True)
    win = (torch.arange(flat.shape[1])[None] < total) & torch.isfinite(order.values)
    counts = torch.zeros(b, len(indicators) * hkv, dtype=torch.long)
    counts.scatter_add_(1, slot_of[order.indices], win.long())
    return counts.view(b, len(indicators), hkv)


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
        counts = global_counts([x.cpu() for x in indicators], per_head_total * hkv)
        if self.options.head_adaptive:
            return counts.to(caps.device)
        total = torch.full((caps.shape[0],), per_head_total, dtype=torch.long)
        return _ops.allocate_budgets(counts.sum(-1).double(), caps.cpu(), total).to(caps.device)

    def head_budgets(self, indicator, budgets):
        return None  # per-head counts come from the global top-k (or uniform)
