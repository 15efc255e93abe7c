"""One file per method; importing this package registers them all."""
from . import (adakv, cake, defensivekv, full, h2o, kvzip, lava, layer_defensivekv, pyramidkv,  # noqa: F401
               snapkv, spancake, spanzip, streamingllm)
from .base import LayerView, Method
from .options import OptionInfo, Options, option
from .registry import available_methods, describe_options, get_method, method_options

__all__ = ["LayerView", "Method", "OptionInfo", "Options", "available_methods", "describe_options", "get_method",
           "method_options", "option"]
