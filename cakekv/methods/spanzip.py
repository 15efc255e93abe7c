"""SpanZip (ours): SpanCAKE's window scores put on the scale of KVzip's query-agnostic re-read scores, and the larger
of the two; one method for a question inside the prompt and for one asked after compression.

What it keeps: the prompt is prefilled whole and re-read after a repeat instruction, as KVzip (kvzip.py,
reconstruction.py): each entry's re-read score r is the largest attention it gets from the queries that reconstruct
the context. At prefill each global layer is also scored from its observation window as SpanCAKE (CAKE's pooled
mean + gamma * var indicator and layer preference; after the re-read, spans lend each peak's score to the entries
after and before it: w). Per (row, layer, KV head) w is brought onto the re-read's scale (`on_reread_scale`): by
rank (`normalise="rank"`: the window's i-th best entry takes the head's i-th best re-read score) or by peak
(`"max"`: w scaled so that its largest equals the largest r); the entry's score is max(r, window_weight * w'). The
sinks (reconstruction.SINK_SCORE) are kept first and lend nothing. Budgets: one top-k over every layer's and KV
head's scores (`ranking="global"`, KVzip's) or CAKE's layer budgets from the window's preferences (`"cake"`, heads
uniform or by score with head_budgets). Decode-time eviction pools over the span radius, as SpanCAKE.

Why: the window's scores are what makes SpanCAKE nearly lossless when the question is in the prompt (the question's
queries peak on the fact it asks for), but when the question comes after compression the window is the context's
last tokens and says nothing about it, where the re-read's scores keep what any question may need (issue 26). The
maximum keeps an entry that either needs; bringing w onto r's scale lets the two compete entry for entry and keeps
r's comparison across layers and heads for the global ranking. The spans go on the window's scores only: they keep
the value after the key a question peaks on, while the re-read scores every token it copies on its own (measured:
spans over the maximum answered 2 of 6 question-aware needles at budget 128, where SpanCAKE answered 6; their lent
half-peaks lose to the many re-read scores near 1).

Cost: KVzip's (one more pass over the prompt) plus CAKE's window statistics at prefill and two sorts per head.

Options: KVzip's re-read (chunk_size, sinks, resume_tokens, repeat_ids, resume_ids, answer_ids: see kvzip.py),
ranking, CAKE's scores (tau1, tau2, gamma, kernel_size, head_budgets, head_floor; no cascade: every layer is cut at
once after the re-read), SpanCAKE's spans (span_before, span_after, span_weight, decode_spans), window_weight
(0: KVzip's scores) and normalise. There is no official mode."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..reconstruction import SINK_SCORE, RepeatTask
from .cake import Cake, CakeScoreOptions
from .kvzip import KVzipOptions, ranked_budgets, repeat_task
from .options import option
from .registry import register
from .spancake import SpanCake, SpanOptions, span_scores


@dataclass(frozen=True, kw_only=True)
class SpanZipOptions(SpanOptions, CakeScoreOptions, KVzipOptions):
    ranking: Literal["global", "cake"] = option(
        "global", "layer budgets: one top-k over every layer's and KV head's scores ('global', KVzip's) or CAKE's "
                  "from the window's layer preferences ('cake')")
    window_weight: float = option(1.0, "weight of the window's scores, on the re-read's scale, against the "
                                       "re-read's (0: the re-read's only)", ge=0)
    normalise: Literal["rank", "max"] = option(
        "rank", "how the window's scores come onto the re-read's scale, per KV head: by rank ('rank': the i-th "
                "best takes the i-th best re-read score) or by peak ('max': the best ties the best re-read score)")
    official: ClassVar[bool] = False


def on_reread_scale(window: torch.Tensor, reread: torch.Tensor, how: str) -> torch.Tensor:
    """[B, Hkv, N] window scores on the scale of the re-read scores of the same candidates (both -inf elsewhere),
    per (row, KV head): each entry takes the re-read score of the window's rank ("rank") or its score times the
    ratio of the two maxima ("max"); 0 on non-candidates."""
    if how == "rank":
        order = torch.sort(window, dim=-1, descending=True, stable=True).indices
        ranked = torch.sort(reread, dim=-1, descending=True).values
        scaled = torch.empty_like(reread).scatter_(-1, order, ranked)
    else:
        ratio = reread.amax(-1, keepdim=True) / window.amax(-1, keepdim=True)
        scaled = window * ratio
    return torch.where(torch.isfinite(scaled), scaled, 0.0)


@register
class SpanZip(SpanCake):
    name = "spanzip"
    Options = SpanZipOptions
    scores_window = True

    @property
    def repeat_task(self) -> RepeatTask:
        return repeat_task(self.options)

    def score_layer(self, view):
        """CAKE's window indicator and layer preference; the spans come after the re-read (`reread_indicator`)."""
        return Cake.score_layer(self, view)

    def reread_indicator(self, reread, window):
        o = self.options
        sinks = reread >= SINK_SCORE
        scores = reread.masked_fill(sinks, float("-inf"))
        spans = span_scores(window.masked_fill(sinks, float("-inf")), o.span_before, o.span_after, o.span_weight)
        scaled = on_reread_scale(spans, scores, o.normalise)
        combined = torch.where(torch.isfinite(scores), torch.maximum(scores, o.window_weight * scaled), scores)
        return torch.where(sinks, reread, combined)

    def layer_budgets(self, preferences, caps, is_last, indicators=None):
        if self.options.ranking == "global":
            return ranked_budgets(self, caps, indicators)
        return self.preference_budgets(preferences, caps, is_last, cascading=False)
