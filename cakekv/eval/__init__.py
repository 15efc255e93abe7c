"""Evaluation of KV-cache compression: LongBench (official protocol and metrics), needle in a
haystack, and synthetic RULER-style tasks, each over methods x budgets under one of two protocols
(question-aware or context-only). Also reachable as ``cakekv eval needle|synthetic|longbench``.

Submodules: :mod:`.metrics` (LongBench metrics, no third-party dependency), :mod:`.longbench`,
:mod:`.needle`, :mod:`.synthetic`, :mod:`.common` (model loading, the two protocols, the runner,
result writing).
"""
from . import common, metrics
from .common import PROTOCOLS, ModelLoadError, generate, load_model

__all__ = ["PROTOCOLS", "ModelLoadError", "common", "generate", "load_model", "metrics"]
