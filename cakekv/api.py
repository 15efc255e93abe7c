"""`cakekv.compress`: the public entry point (the budget contract: docs/methods.md#the-common-frame)."""
from __future__ import annotations

from typing import Any

from .arguments import check_arguments, check_prefill_chunk
from .cache import CompressedCache
from .methods import get_method
from .patch import (Patch, check_method, check_supported, decoder_config, sliding_windows,
                    warn_if_untested_transformers)


class CompressionHandle:
    """Returned by `compress`: a context manager and handle (`remove()`, `stats`)."""

    def __init__(self, model, method, budget: int, window: int, prefill_chunk: int | None = None):
        self.model = model
        self.budget = budget
        self.window = window
        self.method = method
        self.prefill_chunk = prefill_chunk  # longest prompt read in one forward (None: any)
        self.last_cache: CompressedCache | None = None
        self.warned_replaced_cache = False  # an empty non-dynamic cache given to the model was replaced (warned)
        self._patch: Patch | None = Patch(model, self)

    def new_cache(self) -> CompressedCache:
        """A fresh cache for one generation; also kept as `last_cache` (for `stats`). Returned from the local
        name: another thread may set `last_cache` between the two lines."""
        cache = CompressedCache(self.method, self.window, sliding_windows(self.model.config))
        self.last_cache = cache
        return cache

    @property
    def stats(self) -> list[dict]:
        """Per layer (one type per field):
        `layer` int; per row: `budget` float | None (entries given per KV head, mean over heads; None where
        the row was not compressed), `kept` float (entries held per KV head, mean over heads), `tokens` int
        (seen, padding excluded), `budget_per_head` / `kept_per_head` lists of int per KV head;
        `bytes_before` int (what a full cache of the tokens seen would take), `bytes_after` int (what the
        layer's tensors take, free decode slots and positions included), `bytes_kept` int (the K/V bytes
        of the entries held: `bytes_kept / bytes_before` is the fraction kept), `entry_bytes` int (K+V of
        one entry of one KV head), `ragged` bool."""
        return self.last_cache.layer_stats() if self.last_cache is not None else []

    @property
    def is_active(self) -> bool:
        return self._patch is not None

    def remove(self) -> None:
        """Restore the model exactly; safe to call twice."""
        if self._patch is not None:
            self._patch.undo()
            self._patch = None

    def __enter__(self) -> "CompressionHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.is_active else "removed"
        return f"CompressionHandle(method={self.method.name!r}, budget={self.budget}, window={self.window}, {state})"


def checked_method(model, method: str, budget: Any, window: Any, options: dict[str, Any], prefill_chunk: Any = None):
    """The method instance `compress` would use, every argument and the model checked (`check_arguments`,
    `check_prefill_chunk` and whether the method can prefill in chunks, the options against their declarations,
    the model supported); touches nothing, so the pipeline can refuse bad settings when it is built rather than at
    its first call."""
    method, budget, window = check_arguments(method, budget, window)
    prefill_chunk = check_prefill_chunk(prefill_chunk, window)
    check_supported(model)
    instance = get_method(method)(decoder_config(model), budget, window, **options)  # a composite model's text config
    check_method(model, instance)
    why = instance.chunked_prefill_refusal() if prefill_chunk is not None else None
    if why:
        raise ValueError(f"prefill_chunk: method {method!r} cannot read a prompt in chunks: {why}")
    return instance


def compress(model, method: str = "cake", budget: int = 1024, window: int = 32, prefill_chunk: int | None = None,
             **options: Any) -> CompressionHandle:
    """Compress `model`'s KV cache with `method` while the returned handle is active.

    budget: entries kept per layer per KV head on average, window included. window: the last `window`
    prompt tokens, always kept and used as the observation window (both any integer type, numpy
    included). prefill_chunk: a longer prompt is read `prefill_chunk` tokens at a time, the cache cut back to
    the budget after each chunk, so that prefill memory no longer grows with the prompt (>= window + 1; see
    docs/cache.md, "Chunked prefill"). options: the method's keyword options, each checked against its declared
    type and constraints (`cakekv.describe_options(name)`)."""
    instance = checked_method(model, method, budget, window, options, prefill_chunk)
    warn_if_untested_transformers()
    chunk = None if prefill_chunk is None else int(prefill_chunk)  # checked by checked_method
    return CompressionHandle(model, instance, instance.budget, instance.window, chunk)
