"""One file per method; importing this package registers them all."""
from . import (adakv, cake, defensivekv, full, h2o, lava, layer_defensivekv, pyramidkv,  # noqa: F401
               snapkv, streamingllm)
from .base import LayerView, Method
from .registry import available_methods, get_method

__all__ = ["LayerView", "Method", "available_methods", "get_method"]
