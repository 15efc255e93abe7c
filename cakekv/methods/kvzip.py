"""KVzip (Kim et al., 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction"; official code
snu-mllab/KVzip, `ModelKVzip.scoring` and `KVScore`; also kvpress's `KVzipPress`): keeps the entries the model needs
to reconstruct the context, so that whatever is asked later finds them.

The model re-reads the prompt, chunk by chunk, after a repeat instruction and against the prompt's cache
(cakekv/reconstruction.py), layer by layer along the prefill: each layer holds every entry until the chunks have
gone through it and it is cut. In each global layer every query of a chunk
attends, for the score, to the first `sinks` positions, the chunk's span of the prompt and the chunk itself (the
softmax over that subset, as both official codes compute it); a stored entry's score is the largest probability
it gets (over the chunk's queries and its KV head's query heads). The sinks are always kept. Budgets: one top-k over
every layer's and KV head's scores (`ranking="global"`, the paper's non-uniform budgets), over each layer's heads
(`"layer"`, kvpress's `layerwise=True`), or within each head (`"head"`, the official `level="pair-uniform"`).
The re-read's own keys and values are never stored; it costs about one more prefill.

Options: chunk_size = 2000 (official; kvpress 2048), sinks = 4 (kvpress's n_sink), resume_tokens = 8 (official
`prev_postfix_size`), the instruction as token ids (`repeat_ids`, `resume_ids`, `answer_ids`):
`cakekv.reconstruction.repeat_prompt(tokenizer)` builds the official texts, and the pipeline and `cakekv eval`
pass them; given none (`compress()` has no tokenizer), each chunk is re-read after the previous chunk's last
`resume_tokens` tokens only. reread = "full" (the paper's: a chunk attends to the whole prompt); "span" (ours): in a
global layer a chunk attends only to the sinks, `reread_lookback` = 2000 positions before its span, the span and
itself, so the re-read's attention no longer grows with the prompt.

Deliberate deviations from the official code:
* the budget contract: the last `window` prompt positions are kept outside the ranking, and exactly the budget is
  kept (the official threshold keeps the entries strictly above the score at rank int(ratio * n) - 1: one fewer,
  fewer on ties);
* the sinks are the first `sinks` positions, counted in the budget (official: the system prompt, which cakekv
  cannot tell from the context; kvpress: the first 4 tokens, while the chat template's other prefix tokens score
  0 there);
* scores in fp32 (official: the softmax in the model's dtype);
* a batch with left padding: each row re-reads its own positions (official: one row);
* the re-read runs layer by layer along the prefill, the global ranking cutting the layers seen so far as a
  cascade (the official code prefills, then re-reads chunk by chunk through every layer): the same scores and the
  same kept entries, with one layer at a time holding the whole prompt instead of all of them.
There is no official mode: the official code's departures from the paper are those quirks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .base import Method, flat_head_budgets
from .layer_defensivekv import global_counts
from .options import Options, option
from .registry import register
from ..reconstruction import RepeatTask


@dataclass(frozen=True, kw_only=True)
class KVzipOptions(Options):
    ranking: Literal["global", "layer", "head"] = option(
        "global", "where scores compete for the budget: over every layer and KV head ('global': non-uniform layer "
                  "and head budgets), over each layer's KV heads ('layer') or within each head ('head')")
    chunk_size: int = option(2000, "prompt tokens re-read per forward (bounds the re-read's memory)", ge=1)
    sinks: int = option(4, "first prompt positions every chunk attends to, always kept", ge=0)
    resume_tokens: int = option(8, "tokens of the previous chunk repeated before a chunk, after resume_ids", ge=0)
    repeat_ids: tuple[int, ...] = option((), "token ids of the instruction before the first chunk (see "
                                             "cakekv.reconstruction.repeat_prompt)")
    resume_ids: tuple[int, ...] = option((), "token ids of the instruction before each later chunk")
    answer_ids: tuple[int, ...] = option((), "token ids between the instruction and the chunk (a chat template's "
                                             "end of the user turn)")
    reread: Literal["full", "span"] = option(
        "full", "what a re-read chunk attends to in a global layer: the whole stored prompt ('full', the paper's) or "
                "the sinks, reread_lookback positions before its span and the span ('span': cheaper at long prompts)")
    reread_lookback: int = option(2000, "with reread='span': prompt positions before a chunk's span it attends to",
                                  ge=0)


def repeat_task(options: KVzipOptions) -> RepeatTask:
    """The re-read the options describe (shared with the methods that re-read as KVzip does)."""
    o = options
    return RepeatTask(o.chunk_size, o.sinks, o.repeat_ids, o.resume_ids, o.answer_ids, o.resume_tokens,
                      o.reread_lookback if o.reread == "span" else None)


def ranked_budgets(method: Method, caps: torch.Tensor, indicators: list[torch.Tensor]) -> torch.Tensor:
    """[B, l, Hkv] budgets of one top-k of the whole prefix budget over every layer's and KV head's scores: a layer
    or head whose scores are higher than another's gets more of the budget (KVzip's non-uniform budgets)."""
    total = (method.budget - method.window) * method.num_layers * indicators[0].shape[1]
    return global_counts(indicators, total).to(caps.device)


@register
class KVzip(Method):
    name = "kvzip"
    Options = KVzipOptions

    @property
    def repeat_task(self) -> RepeatTask:
        return repeat_task(self.options)

    def layer_budgets(self, preferences, caps, is_last, indicators=None):
        if self.options.ranking != "global":
            return super().layer_budgets(preferences, caps, is_last, indicators)
        return ranked_budgets(self, caps, indicators)

    def head_budgets(self, indicator, budgets):
        return flat_head_budgets(indicator, budgets) if self.options.ranking == "layer" else None
