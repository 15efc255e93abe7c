"""Compressed greedy generation: one prompt or a left-padded batch, under either protocol
(:mod:`.prompts`), with the cache's memory per row from the cache's stats. Under context-only, the
prompts sharing a context are answered from one compressed prefill of it."""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

import torch

from ..reconstruction import with_repeat_prompt
from .prompts import Encoded, check_protocol, context_groups


@dataclasses.dataclass
class Generation:
    text: str
    tokens: list[int]
    prompt_tokens: int
    seconds: float
    bytes_before: int | None
    bytes_after: int | None   # memory held by the cache (spare slots and positions included)
    bytes_kept: int | None    # K/V bytes of the entries kept
    kept_per_layer: list[float] | None
    questions_per_prefill: int = 1  # context-only: the questions answered from this row's context prefill

    @property
    def kv_fraction(self) -> float | None:
        """Fraction of the full cache's K/V entries kept."""
        if not self.bytes_before:
            return None
        return self.bytes_kept / self.bytes_before


def summarize_stats(stats: list[dict], rows: int = 1) -> list[tuple]:
    """Per row of a batch: (bytes of a full cache of the row's tokens, bytes held, bytes kept, kept
    entries per layer) from ``handle.stats`` (or a cache's ``layer_stats()``).

    Bytes held are the batch's allocation shared equally by its rows; the others are the row's own.
    A row that ended early is fed (and stores) tokens until the batch's last row ends: they count in
    its tokens and kept entries alike."""
    if not stats:
        return [(None, None, None, None)] * rows
    after = sum(int(layer["bytes_after"]) for layer in stats) // rows

    out = []
    for row in range(rows):
        before = sum(layer["tokens"][row] * len(layer["kept_per_head"][row]) * layer["entry_bytes"] for layer in stats)
        kept = sum(sum(layer["kept_per_head"][row]) * layer["entry_bytes"] for layer in stats)
        out.append((before, after, kept, [float(layer["kept"][row]) for layer in stats]))
    return out


def _eos_ids(tokenizer, model, extra: Sequence[int] = ()) -> list[int]:
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is None:
            continue
        ids.extend(eos if isinstance(eos, (list, tuple)) else [eos])
    ids.extend(extra)
    return list(dict.fromkeys(int(i) for i in ids))


def newline_token_id(tokenizer) -> int | None:
    """The id LongBench adds as an extra EOS for samsum: the last token of ``"\\n"`` without specials."""
    ids = tokenizer.encode("\n", add_special_tokens=False)
    return ids[-1] if ids else None


def run_budget(budget: int | None, window: int) -> int:
    """The budget a run compresses with: ``full`` (budget None) gets the smallest valid one, which it ignores."""
    return window + 1 if budget is None else int(budget)


def compress_context(model, method: str, budget: int | None, window: int, options: dict | None = None):
    """``cakekv.compress`` for one run (:func:`run_budget`)."""
    import cakekv
    return cakekv.compress(model, method=method, budget=run_budget(budget, window), window=int(window),
                           **(options or {}))


def generate(model, tokenizer, encoded: Encoded, **kwargs) -> Generation:
    """Greedy answer to one prompt: :func:`generate_batch` with one row (same keyword arguments)."""
    return generate_batch(model, tokenizer, [encoded], **kwargs)[0]


@torch.no_grad()
def generate_batch(model, tokenizer, encoded_list: Sequence[Encoded], *, method: str, budget: int | None,
                   window: int, protocol: str, max_new_tokens: int, options: dict | None = None,
                   extra_eos: Sequence[int] = (), min_new_tokens: int = 0) -> list[Generation]:
    """Greedy answers to several prompts with ``method``/``budget`` under ``protocol``, one per prompt,
    each what that prompt alone would give.

    ``question-aware``: one left-padded batch, one ``model.generate``; a row's ``seconds`` is the
    batch's wall time divided by its rows (rows share every forward). ``context-only``: one context
    at a time (a batch would need padding between a row's context and its question, which the cache
    would store and attend to as real tokens); the prompts with the same context ids share one
    compressed prefill of it, each question continuing from its own copy of the cache, and a row's
    ``seconds`` is its share of that prefill plus its own continuation.

    Bytes are per row as :func:`summarize_stats` says."""
    check_protocol(protocol)
    eos = _eos_ids(tokenizer, model, extra_eos)
    options = with_repeat_prompt(method, options, tokenizer)
    with compress_context(model, method, budget, window, options) as handle:
        if protocol == "question-aware":
            return _generate_padded(model, tokenizer, encoded_list, handle, eos, max_new_tokens, min_new_tokens)
        return _generate_by_context(model, tokenizer, encoded_list, eos, max_new_tokens, min_new_tokens)


def _generate_padded(model, tokenizer, encoded_list, handle, eos, max_new_tokens, min_new_tokens):
    """Question-aware: the whole prompts in one left-padded ``model.generate``."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    start = time.perf_counter()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    ids, mask = left_pad([e.full for e in encoded_list], pad, device)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=eos or None, pad_token_id=pad, min_new_tokens=min_new_tokens or None)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    answers = [cut_at_eos(row, eos) for row in out[:, ids.shape[1]:].tolist()]
    seconds = _since(start, device) / len(encoded_list)
    return [_generation(tokenizer, encoded, tokens, seconds, row_stats)
            for encoded, tokens, row_stats in zip(encoded_list, answers,
                                                  summarize_stats(handle.stats, len(answers)))]


def _generate_by_context(model, tokenizer, encoded_list, eos, max_new_tokens, min_new_tokens):
    """Context-only: the prompts grouped by context (:func:`.prompts.context_groups`), each group
    answered by :func:`_answer_context`; answers in the prompts' order."""
    out: list[Generation | None] = [None] * len(encoded_list)
    for group in context_groups(encoded_list):
        answers = _answer_context(model, tokenizer, [encoded_list[i] for i in group], eos, max_new_tokens,
                                  min_new_tokens)
        for i, gen in zip(group, answers):
            out[i] = gen
    return out


def _answer_context(model, tokenizer, encoded_list, eos, max_new_tokens, min_new_tokens) -> list[Generation]:
    """The prompts of one context: one compressed prefill of the context
    (:func:`cakekv.pipeline.prefill_context`), then each question from its own copy of the cache
    (:func:`cakekv.pipeline.question_caches`), decoded greedily. The compressed context and one copy
    are held at a time, and freed on return."""
    from ..pipeline import prefill_context, question_caches

    device = next(model.parameters()).device
    start = time.perf_counter()
    cache = prefill_context(model, encoded_list[0].context.to(device)[None])
    prefill_share = _since(start, device) / len(encoded_list)
    caches = question_caches(cache, len(encoded_list))
    out = []
    for encoded in encoded_list:
        start = time.perf_counter()
        own = next(caches)  # its copy is part of its time
        tokens = _greedy_answer(model, own, encoded.question.to(device)[None], max_new_tokens, eos, min_new_tokens)
        seconds = prefill_share + _since(start, device)
        (row_stats,) = summarize_stats(own.layer_stats())
        out.append(_generation(tokenizer, encoded, tokens, seconds, row_stats, len(encoded_list)))
        del own  # freed before the next copy is made
    return out


def _since(start: float, device) -> float:
    """Seconds since ``start``, once the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _generation(tokenizer, encoded: Encoded, tokens: list[int], seconds: float, row_stats: tuple,
                questions_per_prefill: int = 1) -> Generation:
    return Generation(tokenizer.decode(tokens, skip_special_tokens=True), tokens, int(encoded.full.numel()),
                      seconds, *row_stats, questions_per_prefill)


def left_pad(rows: Sequence[torch.Tensor], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, longest], attention mask) of 1-D id tensors padded on the left, as cakekv requires."""
    longest = max(row.numel() for row in rows)
    ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, longest - row.numel():] = row
        mask[i, longest - row.numel():] = 1
    return ids.to(device), mask.to(device)


def cut_at_eos(tokens: list[int], eos: Sequence[int]) -> list[int]:
    """``tokens`` up to and including the first EOS: what ``generate`` returns for a row alone (in a
    batch, rows that ended early are filled with padding until the last one ends)."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[:i + 1]
    return tokens


def _greedy_answer(model, cache, question_ids, max_new_tokens, eos, min_new_tokens):
    """Append the question to ``cache`` (a compressed context), decode greedily."""
    from ..patch import cache_kwargs
    out = model(input_ids=question_ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    tokens: list[int] = []
    eos_set = set(eos)
    for step in range(max_new_tokens):
        logits = out.logits[0, -1].float()
        if step < min_new_tokens and eos:
            logits[list(eos_set)] = -math.inf
        nxt = int(torch.argmax(logits))
        tokens.append(nxt)
        if nxt in eos_set or step + 1 == max_new_tokens:
            break
        out = model(input_ids=torch.tensor([[nxt]], device=question_ids.device),
                    **cache_kwargs(model, cache), use_cache=True)
    return tokens
