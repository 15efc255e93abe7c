"""The only module that knows HF attention internals.

transformers 5 looks attention up by name (`AttentionInterface`) from `config._attn_implementation`.
We register one wrapper per supported backend ("cakekv_sdpa", ...) whose mask function is the
backend's own for a prompt and none over a compressed cache, point the model's config at it while
compressed, and wrap the decoder's forward so that it runs on a CompressedCache (one-token CUDA steps
replayed as CUDA graphs, see step_graph.py). Both are undone exactly by `Patch.undo`.

The decoder's cache argument was renamed in transformers 5.24 (`past_key_values` -> `cache`, and the
output field with it). `cache_argument` finds whichever name the model's forward takes, in this one
place: a release that takes neither fails at `compress()` naming its version, and a forward that never
hands our cache to its attention layers fails after the call instead of running uncompressed.
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import sys
import warnings
import weakref

import torch
import torch.nn.functional as F
import transformers
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import _ops
from .cache import CompressedCache
from .step_graph import StepGraph, graphs_enabled

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ATTENTION = ("sdpa", "eager", "flash_attention_2")
_PREFIX = "cakekv_"
# The decoder's cache argument and output field, newest name first (5.24 renamed past_key_values).
CACHE_NAMES = ("cache", "past_key_values")
# transformers releases the test-suite runs on (CI: both ends); newer ones get a warning at compress().
TESTED_TRANSFORMERS = ((5, 17), (5, 24))

# attention module -> the handle compressing its model (weak: a dropped model unregisters itself)
_HANDLE_OF_MODULE: "weakref.WeakKeyDictionary[torch.nn.Module, object]" = weakref.WeakKeyDictionary()
_MISSING = object()


@dataclasses.dataclass(frozen=True)
class _Step:
    """The decoder forward running in this thread/context: whose it is, on which cache, and whether it
    continues a compressed cache (then attention ignores masks: visibility comes from positions)."""
    handle: object
    cache: CompressedCache
    continues: bool


# Per context, so that threads generating under one handle each see their own cache.
_CURRENT_STEP: contextvars.ContextVar[_Step | None] = contextvars.ContextVar("cakekv_step", default=None)
# Keyword arguments a captured decode step may receive besides the cache; anything else runs eagerly.
_GRAPH_TENSORS = ("input_ids", "position_ids", "cache_position")
_GRAPH_FLAGS = ("use_cache", "return_dict", "output_attentions", "output_hidden_states")


def _backend_function(backend: str, module: torch.nn.Module):
    if backend == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[backend]


def _compressed_attention(query, keys, values, visible, scale):
    """Attention of the current queries over a compressed layer with a per-KV-head visibility mask."""
    b, hkv, q, m = visible.shape
    groups = query.shape[1] // hkv
    # expand + reshape, not repeat_interleave (which reads its output size back from the device)
    mask = visible[:, :, None].expand(b, hkv, groups, q, m).reshape(b, hkv * groups, q, m)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).contiguous()


def _make_attention(backend: str):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        step = _CURRENT_STEP.get()
        original = _backend_function(backend, module)
        if step is None or step.handle is not _HANDLE_OF_MODULE.get(module):
            return original(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        cache = step.cache
        scale = scaling if scaling is not None else module.scaling
        layer = cache.layers[module.layer_idx]
        if not layer.is_initialized:
            raise unsupported_release(f"{type(module).__name__} ran without the cakekv cache: the model's forward "
                                      "did not hand the cache to its attention layers")
        if layer.prefilling:
            # The prompt attends over its full K/V with the model's own kernel and mask; only the
            # stored cache is compressed afterwards.
            out = original(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
            cache.after_prefill(module.layer_idx, query, scale, module)
            return out
        if layer.ragged:
            out = _ops.ragged_attention(query, layer.keys, layer.values, layer.pos_flat, layer.offsets,
                                        layer.query_pos, scale).transpose(1, 2).contiguous()
        else:
            out = _compressed_attention(query, layer.keys, layer.values, layer.visibility(), scale)
        cache.after_decode(module.layer_idx, query, scale)
        return out, None

    attention.__name__ = f"{_PREFIX}{backend}_attention"
    return attention


def _make_mask(backend: str):
    original = ALL_MASK_ATTENTION_FUNCTIONS[backend]

    def mask(*args, **kwargs):
        """The backend's mask for a prompt; none over a compressed cache, whose attention reads positions
        (so a step builds no mask of the growing logical length)."""
        step = _CURRENT_STEP.get()
        if step is not None and step.continues:
            return None
        return original(*args, **kwargs)

    return mask


for _backend in SUPPORTED_ATTENTION:
    ALL_ATTENTION_FUNCTIONS.register(_PREFIX + _backend, _make_attention(_backend))
    ALL_MASK_ATTENTION_FUNCTIONS.register(_PREFIX + _backend, _make_mask(_backend))


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]


def sliding_windows(config) -> list[int | None]:
    """Per layer: the sliding-window size of its attention, or None for full attention."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return [window if t == "sliding_attention" else None for t in types]
    return [window] * config.num_hidden_layers


def _release(version: str) -> tuple[int, int]:
    major, minor = (version.split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def warn_if_untested_transformers() -> None:
    low, high = TESTED_TRANSFORMERS
    if not low <= _release(transformers.__version__) <= high:
        warnings.warn(f"cakekv is tested with transformers {low[0]}.{low[1]} to {high[0]}.{high[1]}.x; "
                      f"transformers {transformers.__version__} is installed, results may differ",
                      UserWarning, stacklevel=3)


def unsupported_release(what: str) -> RuntimeError:
    """The one error for a transformers release whose cache plumbing cakekv cannot hold."""
    return RuntimeError(f"cakekv: {what} (transformers {transformers.__version__}); this transformers "
                        "release is not supported by this cakekv version")


def cache_argument(forward) -> str:
    """The name under which `forward` (a model's or decoder's) takes its KV cache."""
    parameters = inspect.signature(forward).parameters
    for name in CACHE_NAMES:
        if name in parameters:
            return name
    raise unsupported_release(f"{getattr(forward, '__qualname__', forward)} takes none of {list(CACHE_NAMES)} "
                              "as its cache argument")


def cache_kwargs(model, cache) -> dict:
    """`{name: cache}` for `model(...)`: the cache argument under the name this transformers uses
    (`cache` from 5.24, `past_key_values` before), so that continuing from a cache is warning-free."""
    return {cache_argument(model.forward): cache}


def cache_of(output):
    """The KV cache a model output returned (`output.cache` from transformers 5.24, else
    `output.past_key_values`), without the deprecation warning of the old name."""
    for name in CACHE_NAMES:
        if name in output.__dataclass_fields__:
            return getattr(output, name)
    raise TypeError(f"output: {type(output).__name__} has no cache field")


def _warn_replaced_cache(handle, past: Cache) -> None:
    """Once per handle: an empty cache of another kind (`generate(cache_implementation="static")` gives a
    StaticCache) is replaced by the compressed cache, which says so rather than ignoring it silently."""
    if type(past) is DynamicCache or getattr(handle, "_warned_replaced_cache", False):
        return
    handle._warned_replaced_cache = True
    warnings.warn(f"cakekv: the empty {type(past).__name__} given to the model is replaced by cakekv's "
                  "compressed cache (fixed-size after compression; on CUDA its decode steps replay as CUDA "
                  "graphs, what a static cache is for)", UserWarning, stacklevel=4)


def _flat(arguments: dict) -> dict:
    """Bound arguments with the forward's **kwargs merged in."""
    out = {k: v for k, v in arguments.items() if k != "kwargs"}
    out.update(arguments.get("kwargs", {}))
    return out


def _graph_inputs(arguments: dict, cache: CompressedCache,
                  cache_name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, flags) of a one-token decode step that can be replayed as a CUDA graph, or None (eager):
    CUDA, no autograd, token ids (not embeddings), flags only among the usual ones. Explicit positions
    are always passed (the model's default reads the cache length on the host)."""
    arguments = _flat(arguments)
    ids = arguments.get("input_ids")
    if (ids is None or ids.device.type != "cuda" or ids.dim() != 2 or ids.shape[1] != 1
            or torch.is_grad_enabled() or torch.cuda.is_current_stream_capturing()):
        return None
    tensors, flags = {}, {}
    for key, value in arguments.items():
        if key in (cache_name, "attention_mask", "self") or value is None:
            continue
        if key in _GRAPH_TENSORS and isinstance(value, torch.Tensor):
            tensors[key] = value
        elif key in _GRAPH_FLAGS and not isinstance(value, torch.Tensor):
            flags[key] = value
        else:
            return None
    if "position_ids" not in tensors:
        seen = cache.get_seq_length()
        tensors["position_ids"] = torch.full((1, 1), seen, dtype=torch.long, device=ids.device)
    return tensors, flags


def check_supported(model) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model, torch.nn.Module) or model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model: unsupported architecture {model_type or type(model).__name__!r}; "
                         f"cakekv supports {list(SUPPORTED_MODEL_TYPES)}")
    impl = config._attn_implementation
    if impl is not None and impl.startswith(_PREFIX):
        raise ValueError("model: already compressed by cakekv (nesting compress() on one model is not allowed)")
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(f"model: attention implementation {impl!r} is not supported; load the model with "
                         f"attn_implementation in {list(SUPPORTED_ATTENTION)}")
    if not attention_modules(model):
        raise ValueError(f"model: no attention layers found in {type(model).__name__}")


class Patch:
    """Swaps the model's attention to cakekv's wrapper and its decoder forward to one that installs
    a CompressedCache; `undo` restores both exactly."""

    def __init__(self, model, handle):
        self.model = model
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        self.config = model.config
        self.original_impl = self.config._attn_implementation
        self.original_forward = self.decoder.__dict__.get("forward", _MISSING)
        self.modules = attention_modules(model)
        try:
            for module in self.modules:
                _HANDLE_OF_MODULE[module] = handle
            self.config._attn_implementation = _PREFIX + self.original_impl
            self.decoder.forward = self._wrap_forward(self.decoder.forward, handle)
        except BaseException:
            self.undo()
            raise

    def undo(self) -> None:
        for module in self.modules:
            _HANDLE_OF_MODULE.pop(module, None)
        self.config._attn_implementation = self.original_impl
        if self.original_forward is _MISSING:
            self.decoder.__dict__.pop("forward", None)
        else:
            self.decoder.forward = self.original_forward

    def _wrap_forward(self, forward, handle):
        signature = inspect.signature(forward)
        name = cache_argument(forward)
        legacy = [n for n in CACHE_NAMES if n != name]  # an older name passed through **kwargs
        past_index = list(signature.parameters).index(name)
        config = self.config

        @functools.wraps(forward)
        def cakekv_forward(*args, **kwargs):
            for old in legacy:
                if old in kwargs:
                    if kwargs.get(name) is not None:
                        raise TypeError(f"{old}: given together with {name}; pass the cache once")
                    kwargs[name] = kwargs.pop(old)
            bound = signature.bind_partial(*args, **kwargs)
            arguments = bound.arguments
            past = arguments.get(name)
            use_cache = arguments.get("use_cache")
            use_cache = config.use_cache if use_cache is None else use_cache
            if isinstance(past, CompressedCache):
                cache = past
            elif (past is None and use_cache) or (isinstance(past, Cache) and past.get_seq_length() == 0):
                if past is not None:
                    _warn_replaced_cache(handle, past)
                cache = handle.new_cache()
            elif past is None:
                return forward(*args, **kwargs)  # no cache kept: nothing to compress
            else:
                raise TypeError(f"{name}: cakekv cannot continue from a filled {type(past).__name__}; "
                                "start from an empty cache or from the cache cakekv returned")
            inputs = arguments.get("input_ids")
            if inputs is None:
                inputs = arguments["inputs_embeds"]
            fresh = cache.is_fresh
            if fresh:
                cache.begin_prefill(arguments.get("attention_mask"), inputs.shape[0], inputs.shape[1], inputs.device)
            if name in kwargs or past_index >= len(args):
                kwargs[name] = cache
            else:
                args = (*args[:past_index], cache, *args[past_index + 1:])
            token = _CURRENT_STEP.set(_Step(handle, cache, continues=not fresh))
            try:
                if fresh:
                    out = forward(*args, **kwargs)
                else:
                    q = inputs.shape[1]
                    key = cache.prepare_step(q)
                    graph_inputs = _graph_inputs(arguments, cache, name) if graphs_enabled() else None
                    if graph_inputs is None:
                        out = forward(*args, **kwargs)
                    else:
                        tensors, flags = graph_inputs
                        if cache.step_graph is None:
                            cache.step_graph = StepGraph()
                        out = cache.step_graph.run(key, lambda t: forward(**t, **flags, **{name: cache}), tensors)
                    cache.finish_step(q)
            finally:
                _CURRENT_STEP.reset(token)
            if fresh and inputs.shape[1] > 0 and cache.is_fresh:
                raise unsupported_release(f"{type(self.decoder).__name__}.forward did not hand the cache to its "
                                          "attention layers")
            return out

        return cakekv_forward
