"""compress()'s own arguments checked without torch: the command line runs the same checks before it loads
anything, so a bad budget or method fails in a fraction of a second with compress()'s message."""
from __future__ import annotations

from typing import Any

from .methods.options import as_int
from .methods.registry import check_method_name


def check_arguments(method: str, budget: Any, window: Any) -> tuple[str, int, int]:
    """The method is known, budget and window are integers, window >= 1, budget >= window + 1."""
    method = check_method_name(method)
    budget, window = as_int("budget", budget), as_int("window", window)
    if window < 1:
        raise ValueError(f"window: must be >= 1, got {window}")
    if budget < window + 1:
        raise ValueError(f"budget: must be >= window + 1 = {window + 1}, got {budget}")
    return method, budget, window


def check_prefill_chunk(prefill_chunk: Any, window: int) -> int | None:
    """None (the prompt is read in one forward), or an integer >= window + 1: every chunk after the first holds its
    own observation window (its last `window` tokens, whose queries score the cache) and at least one token before
    it, so that no window reaches back into a chunk whose queries are gone."""
    if prefill_chunk is None:
        return None
    prefill_chunk = as_int("prefill_chunk", prefill_chunk)
    if prefill_chunk < window + 1:
        raise ValueError(f"prefill_chunk: must be >= window + 1 = {window + 1}, got {prefill_chunk}")
    return prefill_chunk
