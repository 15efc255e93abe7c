"""Context reconstruction (KVzip; docs/methods.md#kvzip): scores that do not depend on a question.

Along a prompt's prefill, the model re-reads the prompt chunk by chunk after a repeat instruction (`Reread.chunks`),
layer by layer: once a layer has read the prompt and stored every entry of it, every chunk goes through that layer
(patch.py, `RereadAlongPrefill`), and the layer is scored and cut before the next layer reads the prompt. In each
layer a chunk attends over the stored prompt and over itself (`Reread.attend`), as a continuation would, but its
own keys and values are never stored (the cache hands them back without keeping them), so the cache and its
positions are the prompt's afterwards. In each global layer, every query of the chunk also scores the stored
entries: its softmax over the first `sinks` positions, the chunk's span of the prompt and the chunk itself, and each
entry of the span keeps the largest probability it gets (over the chunk's queries and its KV head's query heads, the `attention_max` op).
Memory is one chunk's, never an n x n or q x n matrix of all heads: an unpadded chunk of a global layer attends
with SDPA's lower-right causal bias (no mask: flash attention on the GPU); a padded batch, a sliding window or
soft-capping take masks of a few query rows at a time (`_QUERY_TILE_ELEMENTS`); the scores stream in the op.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import torch

from ._ops import attention_max
from .storage import masked_attention, trailing_causal_attention, visible_entries

SINK_SCORE = 2.0  # above any attention probability: the sinks are kept first
# elements of one query tile's visibility mask (and soft-capped logits) in a masked re-read: 64M, 256 MiB in fp32
_QUERY_TILE_ELEMENTS = 1 << 26


@dataclasses.dataclass(frozen=True)
class RepeatTask:
    """How a method re-reads the prompt: chunks of `chunk_size` positions; the first after `first`, each later one
    after `resume` and the previous chunk's last `overlap` tokens; then `answer` (the turn that answers, e.g. a chat
    template's end of the user turn), then the chunk. `sinks`: the first positions every chunk attends to and
    that are always kept. `lookback`: None, each chunk attends to the whole stored prompt in every layer (KVzip);
    k, in a global layer only to the sinks, the k positions before its span and the span (the part it repeats):
    the re-read's attention then costs O(chunk) per query instead of O(prompt)."""

    chunk_size: int
    sinks: int
    first: tuple[int, ...] = ()
    resume: tuple[int, ...] = ()
    answer: tuple[int, ...] = ()
    overlap: int = 8
    lookback: int | None = None  # None: the whole stored prompt; k: the sinks, k positions before the span, the span


@dataclasses.dataclass(frozen=True)
class RereadChunk:
    """One chunk of a re-read: its forward's `ids` and `positions` [B, q] (left-padded); `span_start`, `span_stop`:
    the prompt positions it repeats (`span_end` [B]: where each row's span ends); `query_pos` [B, q] its positions,
    -1 on padding; `unpadded`: no padding in the prompt nor in the chunk (its attention needs no mask)."""

    ids: torch.Tensor
    positions: torch.Tensor
    span_start: int
    span_stop: int
    span_end: torch.Tensor
    query_pos: torch.Tensor
    unpadded: bool


class Reread:
    """One re-read of a prompt being prefilled (`prompt_ids` [B, n], left-padded as prefilled): the chunks' inputs
    (`chunks`), the attention of the chunk being read (`chunk`) in a layer that stored the prompt (`attend`, which
    scores a global layer's stored entries), and a layer's scores as its indicator (`indicator`)."""

    def __init__(self, cache, task: RepeatTask, prompt_ids: torch.Tensor):
        self.cache, self.task = cache, task
        lengths = cache.prompt.host_lengths
        width = prompt_ids.shape[1]
        self.rows = [ids[width - n:].tolist() for ids, n in zip(prompt_ids.cpu(), lengths)]
        self.pad = torch.tensor([width - n for n in lengths], device=prompt_ids.device)
        self.lengths = cache.prompt.lengths.to(prompt_ids.device)
        self.scores: dict[int, torch.Tensor] = {}  # per global layer: the largest probability each slot got so far
        self.width = width
        self.chunks = list(self._plan())
        self.chunk: RereadChunk | None = None  # the chunk whose queries `attend` and `_score` take

    def _plan(self) -> Iterator[RereadChunk]:
        """Each chunk's forward inputs, left-padded; each chunk's tokens take the positions right after its row's
        prompt, as a continuation's would."""
        task, device = self.task, self.pad.device
        for start in range(0, max(map(len, self.rows)), task.chunk_size):
            inputs, ends = [], []
            for row in self.rows:
                end = min(start + task.chunk_size, len(row))
                ends.append(max(end, start))
                if end <= start:
                    inputs.append([])  # this row is read through: padding only
                    continue
                head = task.first if start == 0 else (*task.resume, *row[max(start - task.overlap, 0):start])
                inputs.append([*head, *task.answer, *row[start:end]])
            q = max(map(len, inputs))
            ids = torch.zeros(len(inputs), q, dtype=torch.long)
            query_pos = torch.full((len(inputs), q), -1, dtype=torch.long)
            for b, (tokens, n) in enumerate(zip(inputs, self.cache.prompt.host_lengths)):
                ids[b, q - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
                query_pos[b, q - len(tokens):] = n + torch.arange(len(tokens))
            unpadded = all(len(tokens) == q for tokens in inputs) and self.width == min(map(len, self.rows))
            query_pos = query_pos.to(device)
            yield RereadChunk(ids.to(device), query_pos.clamp(min=0), start, max(ends),
                              torch.tensor(ends, device=device), query_pos, unpadded)

    def attend(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
               softcap: float | None) -> torch.Tensor:
        """Attention [B, q, H, D] of the chunk (query, key, value: its own, not stored) over the layer's stored
        entries (those of `lookback`'s reach on a global layer) and itself, with the visibility rule (a padding
        query sees itself only, so it stays finite); a global layer's entries are scored on the way."""
        stored = layer.storage
        local = self.task.lookback is not None and layer.sliding_window is None
        if local:
            first = max(self.chunk.span_start - self.task.lookback, 0)
            reach = torch.arange(first, self.chunk.span_stop, device=self.pad.device)[None].expand(len(self.pad), -1)
            sub_keys, sub_values, sub_pos = self._gather(stored, torch.cat([self._sinks(first), reach], -1),
                                                         values=True)
        else:
            sub_keys, sub_values, sub_pos = stored.keys, stored.values, stored.pos[:, :1]
        keys, values = torch.cat([sub_keys, key], 2), torch.cat([sub_values, value], 2)
        if self.chunk.unpadded and layer.sliding_window is None and softcap is None:
            out = trailing_causal_attention(query, keys, values, scale)  # every entry given, the chunk causally
        else:
            tile = max(1, _QUERY_TILE_ELEMENTS // (query.shape[0] * query.shape[1] * keys.shape[2]))
            out = torch.cat([self._attend_tile(layer, query[:, :, start:start + tile], keys, values, sub_pos,
                                               start, scale, softcap) for start in range(0, query.shape[2], tile)], 1)
        if layer.sliding_window is None:  # a global layer: scored
            self._score(layer, query, key, scale, softcap)
        return out

    def _attend_tile(self, layer, query, keys, values, stored_pos, start, scale, softcap):
        """`attend` for the chunk's queries start.. (query [B, H, t, D]) with a visibility mask, one per row
        ([B, 1, t, m + q]: the same for every KV head). `stored_pos` [B, 1, m]: the positions of the stored entries
        in `keys` (-1: none)."""
        query_pos = self.chunk.query_pos
        t = query.shape[2]
        tile_pos = query_pos[:, start:start + t]
        own = visible_entries(query_pos[:, None], tile_pos, layer.sliding_window)
        own |= torch.arange(query_pos.shape[1], device=own.device) == start + torch.arange(t, device=own.device)[:, None]
        visible = torch.cat([visible_entries(stored_pos, tile_pos, layer.sliding_window), own], -1)
        return masked_attention(query, keys, values, visible, scale, softcap)

    def _sinks(self, first: int) -> torch.Tensor:
        """[B, min(sinks, first)] the sink positions below `first` (the others are in the part that follows
        them), -1 past a row's prompt."""
        sinks = torch.arange(min(self.task.sinks, first), device=self.pad.device)
        return torch.where(sinks < self.lengths[:, None], sinks, -1)

    def _gather(self, stored, positions: torch.Tensor, values: bool = False):
        """The stored keys (and values) [B, Hkv, m, D] at prompt `positions` [B, m] (those at or past a row's span
        end become -1), with their positions [B, 1, m]."""
        b, hkv, n, d = stored.keys.shape
        positions = torch.where(positions < self.chunk.span_end[:, None], positions, -1)
        slots = (self.pad[:, None] + positions).clamp(0, n - 1)[:, None, :, None].expand(b, hkv, -1, d)
        return (stored.keys.gather(2, slots), stored.values.gather(2, slots) if values else None,
                positions[:, None])

    def _score(self, layer, query, key, scale, softcap):
        """The chunk's largest attention to each entry of its span, the softmax over the sinks, the span and the
        chunk itself; written to the span's slots (each slot is in one span)."""
        stored, task = layer.storage, self.task
        start = self.chunk.span_start
        span = start + torch.arange(task.chunk_size, device=self.pad.device)
        sinks = self._sinks(start)
        sub_keys, _, sub_pos = self._gather(stored, torch.cat([sinks, span[None].expand(len(self.pad), -1)], -1))
        b, hkv = sub_keys.shape[:2]
        query_pos = self.chunk.query_pos
        key_pos = torch.cat([sub_pos[:, 0], query_pos], -1)[:, None].expand(b, hkv, -1)
        probs = attention_max(query, torch.cat([sub_keys, key], 2), query_pos, key_pos, scale, softcap)
        s = sinks.shape[1]
        span_pos = sub_pos[:, :, s:]  # [B, 1, c]
        span_probs = torch.where(span_pos >= 0, probs[..., s:s + task.chunk_size], 0.0)
        span_slots = (self.pad[:, None, None] + span_pos).clamp(0, stored.keys.shape[2] - 1).expand(b, hkv, -1)
        if layer.layer_idx not in self.scores:
            self.scores[layer.layer_idx] = torch.zeros(stored.pos.shape, dtype=torch.float32, device=stored.pos.device)
        self.scores[layer.layer_idx].scatter_reduce_(-1, span_slots, span_probs, "amax")

    def indicator(self, layer, window: int) -> torch.Tensor:
        """Global `layer`'s indicator from its scores, once every chunk has read it: -inf on non-candidates
        (padding and the last `window` positions), SINK_SCORE on the sinks, so the cut keeps them first."""
        pos = layer.storage.pos
        window_start = (layer.next_pos - window).clamp(min=0)[:, None, None]
        score = torch.where(pos < self.task.sinks, SINK_SCORE, self.scores.pop(layer.layer_idx))
        return torch.where((pos >= 0) & (pos < window_start), score, float("-inf"))


def repeat_prompt(tokenizer) -> dict[str, tuple[int, ...]]:
    """KVzip's repeat instruction as the options of a re-reading method (`repeat_ids`, `resume_ids`, `answer_ids`),
    in `tokenizer`'s ids: the official texts ("\\n\\nRepeat the previous context exactly." before the first chunk,
    "\\n\\nRepeat the part of the previous context exactly, starting with" before the others), then the chat
    template's end of the user turn and start of the answer when the tokenizer has a template ("\\n" otherwise,
    as kvpress)."""
    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer.encode(text, add_special_tokens=False))

    answer = "\n"
    if getattr(tokenizer, "chat_template", None):
        marker = "\x00cakekv-repeat\x00"
        turn = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=True)
        answer = turn.split(marker, 1)[1]
    return {"repeat_ids": ids("\n\nRepeat the previous context exactly."),
            "resume_ids": ids("\n\nRepeat the part of the previous context exactly, starting with"),
            "answer_ids": ids(answer)}


def with_repeat_prompt(method: str, options: dict | None, tokenizer) -> dict:
    """`options` for `method`, with the repeat instruction from `tokenizer` where the method re-reads the prompt
    and the caller gave none: what the pipeline and `cakekv eval` pass, which have the tokenizer."""
    from .methods import method_options

    options = dict(options or {})
    if "repeat_ids" in method_options(method) and tokenizer is not None:
        for name, value in repeat_prompt(tokenizer).items():
            options.setdefault(name, value)
    return options
