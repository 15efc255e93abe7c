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

    def layer_budgets(self, preferences: torch.Tensor, caps: torch.Tensor, is_last: bool) -> torch.Tensor | None:
        """Prefix budgets [B, l] of the l layers seen so far, or None to wait (no eviction yet).

        preferences: [B, l] (float64; zeros for methods without preferences); caps: [B, l] int64, the
        evictable length of each layer (budgets above it keep everything)."""
        prefix = self.budget - self.window
        return caps.clamp(max=prefix)

    @property
    def compresses(self) -> bool:
        return True
