"""Evaluation of KV-cache compression: LongBench (official protocol and metrics), needle in a
haystack, and synthetic RULER-style tasks, each over methods x budgets under one of two protocols
(question-aware or context-only). Also reachable as ``cakekv eval needle|synthetic|longbench``.

Tasks: :mod:`.longbench` (with :mod:`.metrics`, no third-party dependency), :mod:`.needle`,
:mod:`.synthetic`. Shared by them: :mod:`.haystack` (filler text and needles, also used by
``experiments/tiny_data.py``), :mod:`.models`, :mod:`.prompts`, :mod:`.generation`, :mod:`.runs`,
:mod:`.report`, :mod:`.plots`, :mod:`.args`, :mod:`.errors`.

Names are imported on first use: ``import cakekv.eval`` (and the command line's help) loads no torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import common, metrics
    from .errors import ModelLoadError
    from .generation import generate
    from .models import load_model
    from .prompts import PROTOCOLS

_LAZY = {"PROTOCOLS": "prompts", "ModelLoadError": "errors", "generate": "generation", "load_model": "models"}
__all__ = ["PROTOCOLS", "ModelLoadError", "common", "generate", "load_model", "metrics"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in ("common", "metrics"):
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value
