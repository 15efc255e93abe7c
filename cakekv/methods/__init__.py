"""One file per method, named as the method; a method's module is imported when it is first asked for
(`get_method`), so that names, options' declarations and argument checks load no torch."""
from __future__ import annotations

import importlib

from .options import OptionInfo, Options, option
from .registry import METHOD_NAMES, available_methods, describe_options, get_method, method_options

__all__ = ["LayerView", "METHOD_NAMES", "Method", "OptionInfo", "Options", "available_methods", "describe_options",
           "get_method", "method_options", "option"]


def __getattr__(name: str):
    if name in ("LayerView", "Method"):  # the base classes need torch
        return getattr(importlib.import_module(".base", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
