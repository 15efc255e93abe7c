"""H2O (Zhang et al., NeurIPS 2023) as the one-shot prefill policy of KVCache-Factory's H2OKVCluster:
each prefix key is scored by the attention it accumulates from ALL prompt queries (full causal n x n
attention, fp32), heavy hitters + the recent window are kept.

No options. Decisions: the accumulated attention is computed with the fused window_stats op by
passing every prompt query as the "window" (it streams over key chunks, so the n x n matrix is never
materialised); its mean over queries is the column sum / n, the same ranking. Causality is exact (the
pre-2026 KVCache-Factory quirk that masked only the last W x W block is not reproduced). GQA: mean over
the group (scores and cache stay at KV-head granularity). No pooling. No decode eviction by default
(the original H2O evicts at decode; decode_evict=True gives the generic attention-based evictor)."""
from __future__ import annotations

from .base import LayerView, Method, pool_candidates, reduce_group
from .registry import register
from .. import _ops


@register
class H2O(Method):
    name = "h2o"

    def chunked_prefill_refusal(self) -> str | None:
        return "it scores every entry by the attention of every prompt query, which a later chunk no longer has"

    def score_layer(self, view: LayerView):
        mean, _, _ = _ops.window_stats(view.queries, view.keys, view.query_positions, view.k_pos, view.scale,
                                       view.softcap)
        score = reduce_group(mean, view.keys.shape[1])
        return pool_candidates(score, view.candidates, 1, "avg"), None
