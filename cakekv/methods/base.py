"""The method interface: a method turns a layer's window statistics into an eviction indicator and,
across layers, into per-layer budgets. Storage, positions and masks are the cache's business."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .. import _ops


@dataclass
class LayerView:
    """What a method sees of one layer at prefill (slots in position order, left padding at the front).

    q_win: [B, H, W, D] window queries (after RoPE); keys/values: [B, Hkv, N, D]; k_pos: [B, Hkv, N]
    (-1 = empty); q_pos: [B, W]; window_start: [B] first window position of each row; scale: softmax scale.
    """

    q_win: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    k_pos: torch.Tensor
    q_pos: torch.Tensor
    window_start: torch.Tensor
    scale: float
    layer_idx: int
    module: torch.nn.Module
    queries: torch.Tensor | None = None          # [B, H, n, D] all prompt queries (H2O)
    query_positions: torch.Tensor | None = None  # [B, n] their positions (-1 on padding)

    @property
    def candidates(self) -> torch.Tensor:
        """[B, Hkv, N] slots that may be evicted: real tokens before the window."""
        return (self.k_pos >= 0) & (self.k_pos < self.window_start[:, None, None])

    def window_stats(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _ops.window_stats(self.q_win, self.keys, self.q_pos, self.k_pos, self.scale)


def reduce_group(x: torch.Tensor, num_kv_heads: int, how: str = "mean") -> torch.Tensor:
    """[B, H, N] per query head -> [B, Hkv, N] per KV head (GQA scoring stays at KV-head granularity)."""
    b, h, n = x.shape
    grouped = x.view(b, num_kv_heads, h // num_kv_heads, n)
    return grouped.mean(2) if how == "mean" else grouped.amax(2)


def pool_candidates(x: torch.Tensor, candidates: torch.Tensor, kernel_size: int, kind: str) -> torch.Tensor:
    """1-D pooling along the slots of the candidate scores only, as if the candidates were sliced out
    (zero padding, edges damped for "avg"); non-candidates come out as -inf so they are never picked."""
    x = torch.where(candidates, x, torch.zeros_like(x))
    if kernel_size > 1:
        flat = x.reshape(-1, 1, x.shape[-1])
        pad = kernel_size // 2
        if kind == "avg":
            flat = F.avg_pool1d(flat, kernel_size, stride=1, padding=pad, count_include_pad=True)
        elif kind == "max":
            flat = F.max_pool1d(flat, kernel_size, stride=1, padding=pad)
        else:
            raise ValueError(f"pooling: unknown kind {kind!r} (use 'avg' or 'max')")
        x = flat[..., : x.shape[-1]].reshape(x.shape)
    return torch.where(candidates, x, torch.full_like(x, float("-inf")))


class Method:
    """Base class: subclasses set `name`, `defaults` (option -> default) and override the hooks."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    decode_evict_default: ClassVar[bool] = False

    def __init__(self, config, budget: int, window: int, **options: Any):
        allowed = set(self.defaults) | {"decode_evict"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(f"{unknown[0]}: method {self.name!r} takes no option {unknown[0]!r}; "
                            f"its options are {sorted(allowed)}")
        self.config = config
        self.budget = budget
        self.window = window
        self.num_layers = config.num_hidden_layers
        self.opts = {**self.resolved_defaults(config, budget), **options}
        self.decode_evict = bool(self.opts.pop("decode_evict", self.decode_evict_default))
        self.validate()

    # ---- hooks -------------------------------------------------------------------------------
    def resolved_defaults(self, config, budget: int) -> dict[str, Any]:
        """Defaults that may depend on the model or budget (CAKE's tau table)."""
        return dict(self.defaults)

    def validate(self) -> None:
        """Raise ValueError naming an option with a bad value."""

    def score_layer(self, view: LayerView) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (indicator [B, Hkv, N] fp32, -inf on non-candidates; layer preference [B] or None)."""
        raise NotImplementedError

    def decode_indicator(self, mean: torch.Tensor, var: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
        """Per-KV-head score [B, Hkv, M] of the cached entries from the current queries' attention."""
        return reduce_group(mean, num_kv_heads)

    @property
    def pooling(self) -> tuple[int, str]:
        """(kernel size, "avg" | "max") of the 1-D pooling along positions, reused at decode time."""
        return int(self.opts.get("kernel_size", 1)), self.opts.get("pooling", "avg")

    def preference_budgets(self, preferences: torch.Tensor, caps: torch.Tensor, is_last: bool):
        """Layer budgets proportional to preferences over the whole prefix total, re-cut after every
        layer (cascading, CAKE and LAVa) or once after the last layer (`cascading=False`)."""
        if not self.opts.get("cascading", True) and not is_last:
            return None
        total = torch.full((caps.shape[0],), (self.budget - self.window) * self.num_layers,
                           dtype=torch.long, device=caps.device)
        return _ops.allocate_budgets(preferences, caps, total)

    def layer_budgets(self, preferences: torch.Tensor, caps: torch.Tensor, is_last: bool,
                      indicators: list[torch.Tensor] | None = None) -> torch.Tensor | None:
        """Prefix budgets [B, l] (per head on average) of the l layers seen so far, or [B, l, Hkv] per
        head, or None to wait (no eviction yet).

        preferences: [B, l] (float64; zeros for methods without preferences); caps: [B, l] int64, the
        evictable length of each layer (budgets above it keep everything); indicators: the l layers'
        current indicators [B, Hkv, M_i] (-inf on non-candidates), for methods that compare entries
        across layers."""
        prefix = self.budget - self.window
        return caps.clamp(max=prefix)

    def head_budgets(self, indicator: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor | None:
        """Per-head prefix budgets [B, Hkv] of one layer given its per-head average `budgets` [B], or
        None for the same budget in every head."""
        return None

    @property
    def compresses(self) -> bool:
        return True


def flat_head_budgets(indicator: torch.Tensor, budgets: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    """AdaKV-style head budgets [B, Hkv] from one top-k over the flattened candidate scores of a layer.

    Every head first gets the floor F = floor(alpha * budget) (capped by what it holds); the remaining
    Hkv * budget - sum(F) entries go to the best-scoring entries not already in a head's floor.
    Deliberate difference from AdaKV/LAVa (`round(c_h (1 - alpha) + F)` with c_h from a top-(Hkv*B)):
    this form sums exactly to Hkv * budget, as our budget contract requires, with the same intent
    (a guaranteed floor per head, the rest by score across heads)."""
    b, hkv, n = indicator.shape
    cand = torch.isfinite(indicator)
    have = cand.sum(-1)
    budgets = budgets.to(have.device).long()
    floor = torch.minimum((budgets.double() * alpha).floor().long()[:, None], have)
    vals = torch.sort(indicator, dim=-1, descending=True, stable=True).values
    rank = torch.arange(n, device=indicator.device)
    eligible = (rank >= floor[..., None]) & torch.isfinite(vals)
    flat = torch.where(eligible, vals, float("-inf")).flatten(1)
    rest = (budgets * hkv - floor.sum(-1)).clamp(min=0)
    order = torch.sort(flat, dim=-1, descending=True, stable=True)
    win = (torch.arange(hkv * n, device=indicator.device) < rest[:, None]) & torch.isfinite(order.values)
    head = torch.div(order.indices, n, rounding_mode="floor")
    extra = torch.zeros(b, hkv, dtype=torch.long, device=indicator.device).scatter_add_(1, head, win.long())
    return floor + extra
