"""The method interface: a method turns a layer's window statistics into an eviction indicator and,
across layers, into per-layer budgets (docs/methods.md; a new method: docs/adding_a_method.md). Storage,
positions and masks are the cache's business."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .. import _ops
from ..storage import soft_capped
from .options import Options, option


@dataclass
class LayerView:
    """What a method sees of one layer at prefill (slots in position order, left padding at the front).

    q_win: [B, H, W, D] window queries (after RoPE); keys/values: [B, Hkv, N, D]; k_pos: [B, Hkv, N]
    (-1 = empty); q_pos: [B, W]; window_start: [B] first window position of each row; scale: softmax scale;
    softcap: the model's attention logit soft-capping (Gemma 2), 0 = none: every score computed from attention
    must see the logits the model computes (`soft_capped`).
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
    softcap: float = 0.0

    @property
    def candidates(self) -> torch.Tensor:
        """[B, Hkv, N] slots that may be evicted: real tokens before the window."""
        return (self.k_pos >= 0) & (self.k_pos < self.window_start[:, None, None])

    def window_stats(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _ops.window_stats(self.q_win, self.keys, self.q_pos, self.k_pos, self.scale, self.softcap)

    def soft_capped(self, logits: torch.Tensor) -> torch.Tensor:
        """The layer's scaled logits soft-capped as the model does (`soft_capped`)."""
        return soft_capped(logits, self.softcap)


def reduce_group(x: torch.Tensor, num_kv_heads: int, how: str = "mean") -> torch.Tensor:
    """[B, H, N] per query head -> [B, Hkv, N] per KV head (GQA scoring stays at KV-head granularity)."""
    b, h, n = x.shape
    grouped = x.view(b, num_kv_heads, h // num_kv_heads, n)
    return grouped.mean(2) if how == "mean" else grouped.amax(2)


def group_indicator(mean: torch.Tensor, var: torch.Tensor, weight: float, num_kv_heads: int) -> torch.Tensor:
    """[B, H, N] attention mean / variance -> [B, Hkv, N] group mean of (mean + weight * var)."""
    return reduce_group(mean + weight * var if weight else mean, num_kv_heads)


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


# Declarations shared by several methods: one doc per concept, each method picks its name and default.
def kernel_size_option(default: int) -> Any:
    return option(default, "width of the 1-D pooling of the scores along positions (1: none)", ge=1, odd=True)


def pooling_option(default: str) -> Any:
    return option(default, "kind of the pooling along positions")


def cascading_option(default: bool) -> Any:
    return option(default, "re-cut the layer budgets after every layer while prefilling, which bounds peak "
                           "memory (False: once, after the last layer)")


def per_head_option(default: bool) -> Any:
    return option(default, "split each layer's budget over its KV heads by score (False: the same budget in "
                           "every head)")


def official_option() -> Any:
    return option(False, "reproduce the official repository's selection rules, quirks included (what it "
                         "switches is listed in the method's docstring)")


def head_floor_option(default: float) -> Any:
    return option(default, "fraction of its layer's budget every KV head keeps at least when budgets go per "
                           "head", ge=0, le=1)


class Method:
    """Base class: subclasses set `name`, `Options` (a dataclass of `option(...)` fields, see
    methods/options.py) and override the hooks; `self.options` holds the checked values."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = Options
    # What a model must offer (checked by compress): the attention output projection `o_proj` (value norms).
    uses_output_projection: ClassVar[bool] = False

    def __init__(self, config, budget: int, window: int, **options: Any):
        self.budget = budget
        self.window = window
        self.num_layers = config.num_hidden_layers
        self.options = self.Options.build(self.name, {**self.resolved_defaults(config, budget), **options})

    # ---- hooks -------------------------------------------------------------------------------
    def compresses_prompt(self, length: int) -> bool:
        """Whether a prompt row of `length` tokens is compressed at prefill (default: longer than the
        budget); a row left alone is held at its decode cap from the first decode step if decode_evict."""
        return length > self.budget

    def resolved_defaults(self, config, budget: int) -> dict[str, Any]:
        """Defaults that depend on the model or budget (CAKE's tau table), over the declared ones."""
        return {}

    def score_layer(self, view: LayerView) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (indicator [B, Hkv, N] fp32, -inf on non-candidates; layer preference [B] or None)."""
        raise NotImplementedError

    @property
    def repeat_task(self):
        """How the method re-reads the prompt after its prefill to score it (a `reconstruction.RepeatTask`), or
        None: scored at prefill by `score_layer`. A re-reading method keeps every entry while prefilling."""
        return None

    def chunked_prefill_refusal(self) -> str | None:
        """Why this method cannot cut a prompt read chunk by chunk (`compress(prefill_chunk=...)`), or None. Each
        later chunk is scored from its own window over the cache cut so far: a method whose scores need the whole
        prompt, or the official code's one-shot rules, cannot be."""
        if self.repeat_task is not None:
            return "it re-reads the whole prompt after its prefill to score it"
        if getattr(self.options, "official", False):
            return "official=True follows the official code's one-shot prefill"
        return None

    # A re-reading method that also scores the prompt's window at prefill (`score_layer`, layer preferences
    # included) and combines both scores in `reread_indicator`.
    scores_window: ClassVar[bool] = False

    def reread_indicator(self, reread: torch.Tensor, window: torch.Tensor | None) -> torch.Tensor:
        """A global layer's indicator [B, Hkv, N] after the re-read, from its re-read scores (-inf on non-candidates,
        reconstruction.SINK_SCORE on the sinks) and, where the method `scores_window`, its window indicator."""
        return reread

    @property
    def decode_evict(self) -> bool:
        return self.options.decode_evict

    @property
    def decode_variance_weight(self) -> float:
        """Weight w of the variance term of the decode-time score: each cached entry is scored by the group
        mean, over its KV head's query heads, of (mean + w * variance) of the current queries' attention
        (the evict_lowest op), then pooled with `pooling` along positions."""
        return 0.0

    @property
    def decode_score_order(self) -> bool:
        """Whether decode-time eviction pools along the official CAKE storage order (the kept entries listed by
        descending score of the last selection, then the newest) instead of along positions."""
        return False

    @property
    def pooling(self) -> tuple[int, str]:
        """(kernel size, "avg" | "max") of the 1-D pooling along positions, reused at decode time;
        (1, "avg") is none."""
        return 1, "avg"

    def preference_budgets(self, preferences: torch.Tensor, caps: torch.Tensor, is_last: bool, cascading: bool):
        """Layer budgets proportional to preferences over the whole prefix total, re-cut after every
        layer (`cascading`, CAKE and LAVa) or once after the last layer."""
        if not cascading and not is_last:
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


def official_head_budgets(indicator: torch.Tensor, budgets: torch.Tensor, alpha: float,
                          floor: int | None = None) -> torch.Tensor:
    """Head budgets [B, Hkv] as AdaKV / LAVa compute them (AdaptiveSnapKVCluster, LavaKVCluster):
    c_h = how many of the top (Hkv * budget) entries of the layer's flattened scores lie in head h, then
    b_h = round(c_h * (1 - alpha) + F) with F = int(alpha * budget) unless `floor` is given (LAVa's fixed
    floor). As there: c_h is an int64 count, the product and sum are float32 (torch promotion of an
    integer tensor with a Python float), rounding is half to even, and the b_h need not sum to
    Hkv * budget. Only finite (still held) entries are counted; ties go to the lower head, then the
    earlier slot (the official torch.topk leaves their order unspecified)."""
    b, hkv, n = indicator.shape
    budgets = budgets.to(indicator.device).long()
    flat = indicator.float().flatten(1)
    order = torch.sort(flat, dim=-1, descending=True, stable=True)
    want = (budgets * hkv).clamp(min=0)[:, None]
    win = (torch.arange(hkv * n, device=indicator.device)[None] < want) & torch.isfinite(order.values)
    head = torch.div(order.indices, n, rounding_mode="floor")
    counts = torch.zeros(b, hkv, dtype=torch.long, device=indicator.device).scatter_add_(1, head, win.long())
    if floor is None:
        floors = torch.tensor([int(x * alpha) for x in budgets.tolist()], dtype=torch.long,
                              device=indicator.device)[:, None]
    else:
        floors = torch.full((b, 1), int(floor), dtype=torch.long, device=indicator.device)
    return torch.round(counts * (1 - alpha) + floors).long().clamp(min=0)
