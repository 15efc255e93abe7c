"""cakekv: KV-cache eviction (CAKE and siblings) for long-context inference with transformers."""
from . import _ops  # noqa: F401  (loads the ops library)
from .api import CompressionHandle, compress
from .cache import CompressedCache
from .methods import available_methods, get_method
from .patch import cache_kwargs, cache_of


def method_options(name: str) -> dict:
    """The options of a method with their defaults (model-dependent defaults shown generically)."""
    cls = get_method(name)
    return {**cls.defaults, "decode_evict": cls.decode_evict_default}


__all__ = ["CompressedCache", "CompressionHandle", "available_methods", "cache_kwargs", "cache_of", "compress",
           "method_options"]
__version__ = "0.1.0"
