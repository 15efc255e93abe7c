"""SpanCAKE (ours): CAKE's layer budgets and indicator, with whole spans kept around the peaks.

What it keeps: each candidate entry i gets the score max(s_i, span_weight * max_{j in [i - span_after,
i + span_before]} s_j), s being CAKE's pooled mean + gamma * var indicator of the KV head. A peak thus
lends a share of its score to the `span_after` entries that follow it and the `span_before` entries
that precede it, so the top-k of a layer keeps the strongest peaks with their neighbourhoods before weaker
isolated entries, and still keeps isolated entries that score above span_weight x any nearby peak
(the token-level picks). span_weight = 0 is CAKE; span_weight = 1 keeps pure spans (dilated peaks).

Why: on retrieval prompts the window queries peak on the key of a fact ("... of NAME is"), while the
value the answer must copy follows it ("48213."); a token-level top-k keeps the key and drops the tail of
the value, so the model answers the first digits only. Spans keep what follows a peak; the fraction of
the budget they take is decided by scores, not fixed, so prompts without sharp peaks stay token-level.

The same holds while generating: CAKE's decode-time eviction (decode_evict) frees, each step, the entry the
current query values least, which mid-answer is the next digit to copy; with decode_spans it pools the
decode scores by max over the span radius, so the neighbours of what is being copied stay.

Costs: one max pooling per layer over the candidate scores at prefill (O(n * span) elementwise, no extra
attention); each decode step's eviction pools over 2 * max(span_before, span_after) + 1 neighbours instead
of CAKE's 5.

Ingredients and their options (defaults chosen by the ablations in benchmarks/results/beyond_2026-11-29_cpu):
CAKE's layer preferences and cascade (tau1, tau2, cascading), its indicator (gamma, kernel_size), optional
AdaKV-style head budgets (head_budgets, head_floor) over the span scores, the spans (span_before,
span_after, span_weight) and their decode-time counterpart (decode_spans). There is no official mode."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import LayerView
from .cake import Cake, CakeCoreOptions
from .options import option
from .registry import register


@dataclass(frozen=True, kw_only=True)
class SpanOptions:
    """The spans' options (a mixin of the options of the methods that lend scores to spans)."""

    span_before: int = option(2, "entries before a peak that share its score", ge=0)
    span_after: int = option(16, "entries after a peak that share its score (the value that follows a key)", ge=0)
    span_weight: float = option(0.5, "share of a peak's score its span gets (0: CAKE's token-level top-k, "
                                     "1: whole spans)", ge=0, le=1)
    decode_spans: bool = option(True, "decode-time eviction pools scores by max over the span radius, so the "
                                      "neighbours of attended entries stay (False: CAKE's average pooling)")


@dataclass(frozen=True, kw_only=True)
class SpanCakeOptions(SpanOptions, CakeCoreOptions):
    official: ClassVar[bool] = False  # CAKE's official mode does not apply


def span_scores(score: torch.Tensor, before: int, after: int, weight: float) -> torch.Tensor:
    """[B, Hkv, N] scores (-inf on non-candidates) -> max(s_i, weight * max of s over [i - after, i +
    before]) on the candidates, -inf elsewhere. Slots are in position order, so slot neighbours are
    position neighbours (left padding and the window are non-candidates and lend nothing)."""
    if weight == 0 or before + after == 0:
        return score
    b, h, n = score.shape
    flat = F.pad(score.reshape(b * h, 1, n), (after, before), value=float("-inf"))
    lent = F.max_pool1d(flat, before + after + 1, stride=1).reshape(b, h, n)
    out = torch.maximum(score, weight * lent)
    return torch.where(torch.isfinite(score), out, score)


@register
class SpanCake(Cake):
    name = "spancake"
    Options = SpanCakeOptions

    @property
    def pooling(self):
        """Decode-time eviction (decode_evict): max over the entries within the span radius, so that an entry
        next to one the current query attends (the rest of a value being copied) is not evicted; CAKE's
        average pooling otherwise scores the digits not yet copied low and evicts them mid-answer."""
        o = self.options
        if not o.decode_spans or o.span_weight == 0 or o.span_before + o.span_after == 0:
            return super().pooling
        return 2 * max(o.span_before, o.span_after) + 1, "max"

    def score_layer(self, view: LayerView):
        score, preference = super().score_layer(view)
        o = self.options
        return span_scores(score, o.span_before, o.span_after, o.span_weight), preference
