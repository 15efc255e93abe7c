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
