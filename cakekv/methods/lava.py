"""LAVa (MGDDestiny/Lava LavaKVCluster), docs/methods.md#lava: window-mean attention, max-pooled, times the
head's largest value L1 norm, max over the GQA group; head budgets by one flattened top-k with a
floor; layer budgets by the normalised entropy of the layer's scores, cascading like CAKE.

Options: kernel_size = 7, pooling = "max", head_floor = 0.2, cascading = True.
Fixed quirks / decisions: the floor is alpha times the layer's own (dynamic) budget, not of the global
capacity, and head budgets sum exactly to the layer's total (base.flat_head_budgets); layer budgets are
rounded with allocate_budgets so the total is exactly (budget - window) * layers per head; a layer whose
budget exceeds its length keeps everything (the official early return breaks on short prompts).

official=True switches back to the official code's choices (adaptive_mistral_hijack_lava):
  * layer budgets B_i = int(rho_i / sum(rho) * (budget - window) * layers), truncated, no redistribution
    (the total can fall short); a layer with B_i > its prefix is left alone that round;
  * head budgets b_h = round((1 - alpha) * c_h + F) (base.official_head_budgets) with the floor
    F = int(alpha * budget), the budget *including* the window, fixed for every layer and re-cut (the
    official per-layer update assigns a misspelt attribute, so the floor never changes);
  * c_h counts the head's entries among the top-(Hkv * B_i) of the layer's *original* scores (the
    official re-cut reuses the first top-k's order), not among the entries still held;
  * a re-cut whose B_i exceeds the layer's last applied budget changes nothing (official `return`).
Not switched: statistics in fp32 / fp64 (official: the model dtype, bf16 entropies included), so layer
budgets can differ where a share lands on an integer; ties as in base.official_head_budgets; a layer
never compressed keeps everything where the official code fails."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .adakv import AdaKV
from .base import LayerView, cascading_option, head_floor_option, official_head_budgets, official_option, pool_candidates
from .registry import register
from .snapkv import SnapKVOptions


@dataclass(frozen=True, kw_only=True)
class LAVaOptions(SnapKVOptions):
    head_floor: float = head_floor_option(0.2)
    cascading: bool = cascading_option(True)
    official: bool = official_option()


@register
class LAVa(AdaKV):
    name = "lava"
    Options = LAVaOptions

    def __init__(self, config, budget, window, **options):
        super().__init__(config, budget, window, **options)
        self._original: dict[int, torch.Tensor] = {}   # official: each layer's first scores, this prefill
        self._applied: dict[int, list[int | None]] = {}  # official: per layer, per row, last applied B_i

    def compresses_prompt(self, length: int) -> bool:
        return length > self.budget

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
        if self.options.official:
            if view.layer_idx == 0:  # a new prefill
                self._original, self._applied = {}, {}
            self._original[view.layer_idx] = score
        return score, rho

    def layer_budgets(self, preferences, caps, is_last, indicators=None):
        if not self.options.official:
            return self.preference_budgets(preferences, caps, is_last, self.options.cascading)
        if not self.options.cascading and not is_last:
            return None
        return self._official_budgets(preferences, caps)

    def head_budgets(self, indicator, budgets):
        return None if self.options.official else super().head_budgets(indicator, budgets)

    def _official_budgets(self, preferences: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
        """Per-(row, layer, head) prefix budgets [B, l, Hkv] of the official cascade, layers 0..l-1."""
        rows, seen = preferences.shape
        total = (self.budget - self.window) * self.num_layers
        floor = int(self.budget * self.options.head_floor)
        alpha = self.options.head_floor
        hkv = self._original[0].shape[1]
        out = caps[..., None].expand(rows, seen, hkv).clone()  # caps keep everything (nested re-cuts)
        rho, cap = preferences.tolist(), caps.tolist()
        for i in range(seen):
            applied = self._applied.setdefault(i, [None] * rows)
            for r in range(rows):
                s = sum(rho[r])
                b = int(rho[r][i] / s * total) if s > 0 else 0
                if applied[r] is None and b > cap[r][i]:
                    continue                      # official: not compressed this round
                if applied[r] is not None and b > applied[r]:
                    continue                      # official: a larger re-cut budget is ignored
                applied[r] = b
                score = self._original[i][r:r + 1]
                heads = official_head_budgets(score, torch.tensor([b]), alpha, floor=floor)
                out[r, i] = heads[0].to(out.device)
        return out
