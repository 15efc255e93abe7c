"""LAVa (MGDDestiny/Lava LavaKVCluster), methods.md §3: window-mean attention, max-pooled, times the
head's largest value L1 norm, max over the GQA group; head budgets by one flattened top-k with a
floor; layer budgets by the normalised entropy of the layer's scores, cascading like CAKE.

Options: kernel_size = 7, pooling = "max", floor_alpha = 0.2, cascading = True.
Fixed quirks / decisions: the floor is alpha times the layer's own (dynamic) budget, not of the global
capacity, and head budgets sum exactly to the layer's total (base.flat_head_budgets); layer budgets are
rounded with allocate_budgets so the total is exactly (budget - window) * layers per head; a layer whose
budget exceeds its length keeps everything (the official early return breaks on short prompts)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .adakv import AdaKV
from .base import LayerView, cascading_option, head_floor_option, pool_candidates
from .registry import register
from .snapkv import SnapKVOptions


@dataclass(frozen=True, kw_only=True)
class LAVaOptions(SnapKVOptions):
    floor_alpha: float = head_floor_option(0.2)
    cascading: bool = cascading_option(True)


@register
class LAVa(AdaKV):
    name = "lava"
    Options = LAVaOptions

    def score_layer(self, view: LayerView):
        mean, _, _ = view.window_stats()
        hkv = view.keys.shape[1]
        g = mean.shape[1] // hkv
        cand = view.candidates
        pooled = pool_candidates(mean, cand.repeat_interleave(g, 1), *self.pooling)
        norms = view.values.float().abs().sum(-1)                                   # [B, Hkv, N]
        nu = torch.where(cand, norms, 0.0).amax(-1)                                 # [B, Hkv]
        score = (pooled.view(mean.shape[0], hkv, g, -1) * nu[:, :, None, None]).amax(2)
        score = torch.where(cand, score, float("-inf"))
        s = torch.where(cand, score, 0.0).flatten(1).double()
        p = s / s.sum(-1, keepdim=True).clamp_min(1e-300)
        count = cand.flatten(1).sum(-1).double()
        rho = -(p * torch.log(p + 1e-16)).sum(-1) / torch.log(count.clamp(min=2))
        return score, rho

    def layer_budgets(self, preferences, caps, is_last, indicators=None):
        return self.preference_budgets(preferences, caps, is_last, self.options.cascading)
