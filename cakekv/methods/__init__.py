"""One file per method; importing this package registers them all."""
from . import cake, full, snapkv  # noqa: F401  (registration side effect)
from .base import LayerView, Method
from .registry import available_methods, get_method

__all__ = ["LayerView", "Method", "available_methods", "get_method"]
