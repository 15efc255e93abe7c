"""cakekv: KV-cache eviction (CAKE and siblings) for long-context inference with transformers.

The public names are imported on first use, so that `import cakekv` and the command line's argument
parsing do not pay for torch and transformers (seconds) before a command needs them."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names below, for type checkers and IDEs
    from .api import CompressionHandle, compress
    from .cache import CompressedCache
    from .methods import available_methods, describe_options, method_options
    from .patch import cache_kwargs, cache_of

_LAZY = {  # public name -> the submodule that defines it
    "CompressedCache": "cache", "CompressionHandle": "api", "compress": "api", "available_methods": "methods",
    "describe_options": "methods", "method_options": "methods", "cache_kwargs": "patch", "cache_of": "patch",
}
__all__ = sorted(_LAZY)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
