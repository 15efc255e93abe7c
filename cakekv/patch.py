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

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import sys
import warnings
import weakref

import torch
import transformers
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .cache import CompressedCache
from .reconstruction import Reread
from .step_graph import StepGraph, graphs_enabled

# Families the test-suite runs every contract test on (tests/conftest.py FAMILIES and COMPOSITE, kept in step by
# a test); another decoder whose attention layers look standard is accepted with a warning (check_supported).
TESTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "gemma3", "mixtral",
                      "qwen2_moe", "qwen3_moe")
SUPPORTED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
_PREFIX = "cakekv_"
# The decoder's cache argument and output field, newest name first (5.24 renamed past_key_values).
CACHE_NAMES = ("cache", "past_key_values")
# transformers releases the test-suite runs on (CI: both ends); newer ones get a warning at compress().
TESTED_TRANSFORMERS = ((5, 17), (5, 25))

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
# Arguments of the decoder's forward that run along the prompt, cut per chunk of a chunked prefill (along their
# second dimension for inputs_embeds, their last for the others); and the outputs such a prefill cannot give.
_SEQUENCE_ARGUMENTS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "cache_position",
                       "token_type_ids")
_WHOLE_PROMPT_OUTPUTS = ("output_attentions", "output_hidden_states")
# Arguments of a composite model's base forward that bring another modality's tokens (refused at prefill).
_OTHER_MODALITIES = ("pixel_values", "mm_encoder_outputs", "image_", "video_", "audio_", "input_features")


def _backend_function(backend: str, module: torch.nn.Module):
    if backend == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[backend]


class _ConfigAs:
    """A config read through, except `_attn_implementation`, which names the backend (see `_ModuleAs`)."""

    def __init__(self, config, backend: str):
        self._config = config
        self._attn_implementation = backend

    def __getattr__(self, name):
        return getattr(self._config, name)


class _ModuleAs:
    """The attention module as its backend function must see it while compressed: transformers' flash-attention
    integration loads its kernels by `module.config._attn_implementation`, which names cakekv's wrapper
    ("cakekv_flash_attention_2") while the model is compressed; this view names the backend itself and reads
    everything else through to the module (per call: threads and models sharing a config are not affected)."""

    def __init__(self, module: torch.nn.Module, backend: str):
        self._module = module
        self.config = _ConfigAs(module.config, backend)

    def __getattr__(self, name):
        return getattr(self._module, name)


def _backend_caller(backend: str):
    """original(module, ...) -> the backend's attention over `module` (seen through `_ModuleAs` by the backends
    that read the implementation name from the module's config)."""
    if not backend.startswith("flash_attention"):
        return lambda original, module, *args, **kwargs: original(module, *args, **kwargs)
    return lambda original, module, *args, **kwargs: original(_ModuleAs(module, backend), *args, **kwargs)


def _check_attention_call(module, query, key, value, layer, kwargs) -> None:
    """At prefill, once per layer: the call has the usual q/k/v shapes, no attention feature the decode
    path would drop, and the sliding window the cache was built with."""
    name = f"{type(module).__name__} (layer {module.layer_idx})"
    if (query.dim() != 4 or key.dim() != 4 or key.shape != value.shape or query.shape[0] != key.shape[0]
            or query.shape[2] != key.shape[2] or query.shape[3] != key.shape[3] or query.shape[1] % key.shape[1]):
        raise ValueError(f"model: {name} calls attention with query {tuple(query.shape)}, key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)}; cakekv needs [batch, heads, tokens, head_dim] with as many "
                         "query heads as a multiple of the key/value heads and keys and values of one shape")
    for sink in ("s_aux", "sinks"):
        if kwargs.get(sink) is not None:
            raise ValueError(f"model: {name} passes attention sinks ({sink}), which cakekv's decode attention does "
                             "not apply")
    declared = kwargs["sliding_window"] if "sliding_window" in kwargs else getattr(module, "sliding_window", None)
    if (declared or None) != layer.sliding_window:
        raise ValueError(f"model: {name} attends over a sliding window of {declared}, but its config gives "
                         f"{layer.sliding_window} (config.sliding_window / layer_types); cakekv cannot tell which "
                         "positions this layer sees")


def _skipped_layers_error(skipped: list[int]) -> ValueError:
    return ValueError(f"model: layers {skipped} did not run their attention through transformers' attention "
                      "interface with cakekv's cache; this architecture is not supported")


def _check_layers_before(cache, layer_idx: int) -> None:
    """Layers are scored in order, and cascading budgets re-cut every layer seen so far: each earlier
    layer must have gone through this wrapper (the end of the forward checks the last ones)."""
    skipped = [i for i in range(layer_idx) if cache.layers[i].prefilling or not cache.layers[i].is_initialized]
    if skipped:
        raise _skipped_layers_error(skipped)


def _make_attention(backend: str):
    call = _backend_caller(backend)

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        step = _CURRENT_STEP.get()
        original = _backend_function(backend, module)
        if step is None or step.handle is not _HANDLE_OF_MODULE.get(module):
            return call(original, module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                        **kwargs)
        cache = step.cache
        scale = scaling if scaling is not None else module.scaling
        layer = cache.layers[module.layer_idx]
        if not layer.is_initialized:
            raise unsupported_release(f"{type(module).__name__} ran without the cakekv cache: the model's forward "
                                      "did not hand the cache to its attention layers")
        if layer.prefilling:
            _check_layers_before(cache, module.layer_idx)
            if step.continues:  # a later chunk of a chunked prefill: over the cut cache and itself, by positions
                out = layer.attend_chunk(query, scale, kwargs.get("softcap")), None
            else:  # the prompt attends over its full K/V with the model's own kernel and mask
                _check_attention_call(module, query, key, value, layer, kwargs)
                out = call(original, module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                           **kwargs)
            # only the stored cache is compressed afterwards
            cache.after_prefill(module.layer_idx, query, scale, module, kwargs.get("softcap"))
            return out
        if cache.reread is not None:
            return cache.reread.attend(layer, query, key, value, scale, kwargs.get("softcap")), None
        out = layer.attend(query, scale, kwargs.get("softcap"))
        cache.after_decode(module.layer_idx)
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


def decoder_config(model):
    """The config of the model's text decoder: the model's own, or the text config of a composite model."""
    config = model.config
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config(decoder=True) if callable(get_text_config) else config


def is_composite(model) -> bool:
    """A model whose text decoder has a config of its own (multimodal: Gemma 3 with its vision tower)."""
    return decoder_config(model) is not model.config


def decoder_module(model) -> torch.nn.Module:
    """The module whose forward cakekv wraps: it takes the cache and the 2-D padding mask and hands the cache
    to the attention layers (the decoder of a text model; the base model of a composite one, which builds
    the masks and merges the other modalities' embeddings before calling its text decoder)."""
    if is_composite(model):
        return model.base_model
    return model.get_decoder() if hasattr(model, "get_decoder") else model


def _is_attention(module: torch.nn.Module) -> bool:
    """A decoder self-attention layer as transformers writes them: an `...Attention` module with its layer
    index and softmax scale (its projections, separate q_proj/k_proj/v_proj or fused like Phi-3's qkv_proj,
    are not looked at)."""
    return (type(module).__name__.endswith("Attention") and isinstance(getattr(module, "layer_idx", None), int)
            and isinstance(getattr(module, "scaling", None), (int, float)))


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if _is_attention(m)]


def decoder_layers(model: torch.nn.Module, modules: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The decoder layer of each attention module (`modules`, in layer order): the module that holds it."""
    names = {id(module): name for name, module in model.named_modules()}
    by_index = sorted(modules, key=lambda module: module.layer_idx)
    return [model.get_submodule(names[id(module)].rpartition(".")[0]) for module in by_index]


def sliding_windows(config) -> list[int | None]:
    """Per layer: the sliding-window size of its attention, or None for full attention (`layer_types` where
    the config has them, else `sliding_window` for every layer; 0 is none, as Qwen2-MoE writes it)."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None) or None
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
    if type(past) is DynamicCache or handle.warned_replaced_cache:
        return
    handle.warned_replaced_cache = True
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


def _unsupported(model, why: str) -> ValueError:
    kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    return ValueError(f"model: unsupported architecture {kind!r}: {why}")


def _config_refusal(config) -> str | None:
    """Why a decoder config describes attention cakekv cannot hold, or None."""
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention (use_bidirectional_attention): cakekv's visibility rule is causal"
    if getattr(config, "num_kv_shared_layers", 0):
        return "layers share another layer's KV cache (num_kv_shared_layers)"
    if getattr(config, "attention_chunk_size", None):
        return "chunked attention (attention_chunk_size): cakekv's visibility rule has no chunks"
    if getattr(config, "kv_lora_rank", None) or getattr(config, "v_head_dim", None) not in (None, getattr(
            config, "head_dim", None)):
        return "multi-head latent attention / keys and values of different head sizes"
    return None


def check_supported(model) -> None:
    """Refuse, with the reason, a model cakekv cannot compress exactly; warn on a family the tests do not cover.

    Supported: a decoder whose every layer has a self-attention module (`_is_attention`) that calls
    transformers' attention interface with the usual [batch, heads, tokens, head_dim] q/k/v, causal, optionally
    over a sliding window (per layer: `sliding_windows`) and with soft-capped logits (applied by every score
    and attention cakekv computes; not under `sdpa`, which drops them). What cannot be seen
    here is checked at the first prefill: the q/k/v shapes, sliding windows and features each layer's call
    passes, and that every layer went through the interface."""
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or config is None:
        raise _unsupported(model, "not a transformers model")
    if getattr(config, "is_encoder_decoder", False):
        raise _unsupported(model, "an encoder-decoder model (cakekv compresses decoder-only self-attention)")
    config = decoder_config(model)  # of a composite (multimodal) model: its text decoder's
    why = _config_refusal(config)
    if why:
        raise _unsupported(model, why)
    modules = attention_modules(model)
    if not modules:
        raise _unsupported(model, f"no self-attention layers cakekv recognises in {type(model).__name__} (modules "
                                  "named ...Attention with layer_idx and scaling, calling transformers' attention "
                                  "interface)")
    layers = getattr(config, "num_hidden_layers", None)
    found = sorted(m.layer_idx for m in modules)
    if found != list(range(layers or 0)):
        raise _unsupported(model, f"its attention layers have indices {found}, not one per decoder layer "
                                  f"(0..{(layers or 0) - 1}): layers without attention (linear attention, "
                                  "state-space) or cross-attention are not supported")
    for module in modules:
        if hasattr(module, "sinks"):
            raise _unsupported(model, f"{type(module).__name__} has attention sinks, which cakekv's decode "
                                      "attention does not apply")
        if getattr(module, "is_causal", True) is False:
            raise _unsupported(model, f"{type(module).__name__} is not causal")
    impl = config._attn_implementation
    if impl is not None and impl.startswith(_PREFIX):
        raise ValueError("model: already compressed by cakekv (nesting compress() on one model is not allowed)")
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(f"model: attention implementation {impl!r} is not supported; load the model with "
                         f"attn_implementation in {list(SUPPORTED_ATTENTION)}")
    softcaps = _softcaps(model)
    if softcaps and impl == "sdpa":
        raise ValueError(f"model: attention implementation 'sdpa' drops the attention logit soft-capping "
                         f"(softcap={softcaps[0]}) this model's layers declare (transformers applies it in 'eager' "
                         "and 'flash_attention_2' only); load the model with attn_implementation='eager'")
    if model.config.model_type not in TESTED_MODEL_TYPES:
        warnings.warn(f"cakekv: model type {model.config.model_type!r} is not among the tested families "
                      f"{list(TESTED_MODEL_TYPES)}; its attention layers look standard and are checked at the "
                      "first prefill, results may still differ", UserWarning,
                      stacklevel=4)  # the caller of compress (through checked_method)


def _softcaps(model) -> list:
    return [m.attn_logit_softcapping for m in attention_modules(model)
            if getattr(m, "attn_logit_softcapping", None) is not None]


def check_method(model, method) -> None:
    """Refuse a method the model's attention makes impossible: value norms through a missing `o_proj`."""
    if method.uses_output_projection:
        missing = {type(m).__name__ for m in attention_modules(model) if not hasattr(m, "o_proj")}
        if missing:
            raise ValueError(f"method: {method.name!r} weighs values through the attention output projection "
                             f"`o_proj`, which {sorted(missing)} do not have")


def _check_text_only(arguments: dict) -> None:
    """A composite model's prompt must be text: other modalities' tokens may attend bidirectionally (Gemma 3's
    image tokens do), which cakekv's scores and visibility rule do not model."""
    other = [k for k, v in _flat(arguments).items() if k.startswith(_OTHER_MODALITIES)
             and v is not None and not (isinstance(v, (dict, list, tuple)) and not any(
                 x is not None for x in (v.values() if isinstance(v, dict) else v)))]
    if other:
        raise ValueError(f"{other[0]}: cakekv compresses text prompts; image, video and audio inputs are not "
                         "supported yet (their tokens may attend bidirectionally, which cakekv's scores and "
                         "visibility rule do not model)")


def _check_chunk_unpadded(attention_mask, q: int) -> None:
    """A chunk that continues a compressed cache is stored token by token, each at the row's next position: its
    rows must hold no padding (checked for chunks of several tokens, which run eagerly; a one-token step is
    never padded by `generate`)."""
    if attention_mask is None or q < 2 or attention_mask.dim() != 2:
        return
    chunk = attention_mask[:, -q:]
    if not bool(chunk.all()):
        rows = (~chunk.bool()).any(-1).nonzero().flatten().tolist()
        raise ValueError(f"attention_mask: rows {rows} of the {q}-token chunk that continues the compressed cache "
                         "hold padding, which cakekv would store and attend to; continue rows whose new tokens "
                         "differ in length one at a time (or pad each row's new text to one length with real "
                         "tokens)")


def prefill_chunks(length: int, size: int, attention_mask: torch.Tensor | None) -> list[tuple[int, int]]:
    """Column ranges [start, end) of a prompt of `length` columns read `size` tokens at a time. Cut from the end:
    every chunk but the first holds exactly `size` tokens and no padding (chunks continue the cache token by
    token), and the last one, with the question, is whole. The first chunk takes the rest: the remainder and the
    left padding of every row, so that each row's first real token is in it."""
    shortest = length
    if attention_mask is not None and attention_mask.dim() == 2:
        shortest = int(attention_mask[:, -length:].sum(-1).min())
    later = max(shortest - 1, 0) // size
    first = length - later * size
    return [(0, first)] + [(first + i * size, first + (i + 1) * size) for i in range(later)]


def _chunk_argument(key: str, value, start: int, end: int, length: int):
    """Columns [start, end) of a forward argument that runs along the prompt of `length` columns (counted from
    its end: a mask may be longer than the prompt); any other argument as it is."""
    if key not in _SEQUENCE_ARGUMENTS or not isinstance(value, torch.Tensor):
        return value
    dim = 1 if key == "inputs_embeds" else value.dim() - 1
    return value.narrow(dim, value.shape[dim] - length + start, end - start)


def _with_probes(part: dict, arguments: dict, start: int, end: int, length: int, probes: int, device) -> dict:
    """The forward arguments of columns [start, end) of a prompt of `length` columns (`part`), followed by the
    prompt's last `probes` tokens at their own positions: the question's tokens, whose queries score the chunk
    (docs/cache.md, "Chunked prefill"). Positions: the given `position_ids`' columns, or the columns themselves
    (what the decoder would number them in one forward); `cache_position`, the cache's index, runs on."""
    if part.get("position_ids") is None:  # the columns, as the decoder numbers the tokens of one forward
        columns = torch.arange(length, device=device)[None]
        part, arguments = {**part, "position_ids": columns[:, start:end]}, {**arguments, "position_ids": columns}
    joined = {}
    for key, value in part.items():
        if key not in _SEQUENCE_ARGUMENTS or not isinstance(value, torch.Tensor):
            joined[key] = value
        elif key == "cache_position":
            joined[key] = torch.cat([value, value[-1] + 1 + torch.arange(probes, device=value.device)])
        else:
            tail = _chunk_argument(key, arguments[key], length - probes, length, length)
            joined[key] = torch.cat([value, tail], 1 if key == "inputs_embeds" else value.dim() - 1)
    return joined


class RereadAlongPrefill:
    """A re-reading method's scores (its `repeat_task`, reconstruction.py), layer by layer along the prompt's
    prefill: after each decoder layer has read the prompt (storing all of it), every chunk of the re-read goes
    through that layer over the stored prompt (`Reread.attend`), then a global layer is scored and the global layers
    so far cut (`Eviction.recut_reread`) before the next layer reads the prompt. So one layer at a time holds the
    whole prompt, as in a one-shot prefill, and what is kept is what a re-read after the prefill would keep. The
    chunks' hidden states wait between layers (about the prompt's size: one vector per token). What each layer
    takes besides them (position embeddings, ...) comes from a forward of the decoder over each chunk whose layers
    only record their inputs (`_layer_inputs`), so the decoder's own code computes it."""

    def __init__(self, forward, name: str, layers: list[torch.nn.Module], cache: CompressedCache,
                 prompt_ids: torch.Tensor | None):
        if prompt_ids is None:
            raise ValueError(f"inputs_embeds: method {cache.method.name!r} re-reads the prompt's token ids; pass "
                             "input_ids")
        self.cache, self.layers = cache, layers
        self.reread = Reread(cache, cache.method.repeat_task, prompt_ids)
        self.hidden: list[torch.Tensor] = []
        self.calls: list[list[tuple[tuple, dict]]] = []  # per chunk, per layer: its arguments but the hidden states
        with torch.no_grad():
            for chunk in self.reread.chunks:
                hidden, calls = _layer_inputs(forward, name, layers, chunk.ids, chunk.positions)
                for _, kwargs in calls:
                    kwargs.update({name: cache, "attention_mask": None})  # the re-read attends by positions
                    if "use_cache" in kwargs:
                        kwargs["use_cache"] = True
                self.hidden.append(hidden)
                self.calls.append(calls)
        self.running = False
        self.hooks: list = []

    def __enter__(self):
        self.hooks = [layer.register_forward_hook(functools.partial(self._after_layer, i))
                      for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        return False

    def _after_layer(self, index: int, module, args, output) -> None:
        if self.running:  # a chunk going through this layer
            return
        cache, reread = self.cache, self.reread
        self.running, cache.reread = True, reread
        try:
            with torch.no_grad():
                for i, chunk in enumerate(reread.chunks):
                    reread.chunk = chunk
                    call_args, kwargs = self.calls[i][index]
                    self.hidden[i] = _hidden_states(module(self.hidden[i], *call_args, **kwargs))
        finally:
            self.running, cache.reread = False, None
        layer = cache.layers[index]
        if layer.sliding_window is None:
            cache.eviction.recut_reread(cache, layer, reread.indicator(layer, cache.window), cache.compress_rows())
        if index == len(self.layers) - 1:  # every layer re-read and cut: the prefill is finished
            self.hidden, self.calls = [], []
            cache.finish_reread()


def _hidden_states(output):
    """A decoder layer's hidden states: its output, or the first item where it returns a tuple."""
    return output[0] if isinstance(output, tuple) else output


def _layer_inputs(forward, name: str, layers: list[torch.nn.Module], ids: torch.Tensor, positions: torch.Tensor):
    """The decoder's first layer's hidden states and every layer's other arguments (args, kwargs) for `ids` at
    `positions`, from a forward of the decoder (no cache) whose layers record their inputs and pass the hidden
    states on unchanged."""
    calls: list = [None] * len(layers)
    first: list[torch.Tensor] = []
    saved = [layer.__dict__.get("forward", _MISSING) for layer in layers]

    def recorder(i):
        def record(hidden_states, *args, **kwargs):
            if i == 0:
                first.append(hidden_states)
            calls[i] = (args, dict(kwargs))
            return hidden_states
        return record

    try:
        for i, layer in enumerate(layers):
            layer.forward = recorder(i)
        forward(input_ids=ids, position_ids=positions, use_cache=False, **{name: None})
    finally:
        for layer, original in zip(layers, saved):
            if original is _MISSING:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = original
    if not first or any(c is None for c in calls):
        raise unsupported_release("the decoder's forward did not call each of its layers once with the hidden states")
    return first[0], calls


class Patch:
    """Swaps the model's attention to cakekv's wrapper and its decoder forward to one that installs
    a CompressedCache; `undo` restores both exactly."""

    def __init__(self, model, handle):
        self.model = model
        self.config = decoder_config(model)  # what the attention layers read the implementation from
        self.decoder = decoder_module(model)
        self.original_impl = self.config._attn_implementation
        self.original_forward = self.decoder.__dict__.get("forward", _MISSING)
        self.modules = attention_modules(model)
        self.layers = decoder_layers(model, self.modules)
        # A CUDA graph captures the work of one device's stream: a model that accelerate's device_map spreads over
        # several devices (or offloads to the CPU) decodes eagerly.
        self.graphs = len({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}) <= 1
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
            reread = contextlib.nullcontext()  # or the re-read of a re-reading method's prompt
            if fresh:
                _check_text_only(arguments)
                if handle.prefill_chunk is not None and inputs.shape[1] > handle.prefill_chunk:
                    return self._chunked_prefill(forward, {**_flat(arguments), name: cache}, handle, cache)
                cache.begin_prefill(arguments.get("attention_mask"), inputs.shape[0], inputs.shape[1], inputs.device)
                if cache.rereads():
                    reread = RereadAlongPrefill(forward, name, self.layers, cache, arguments.get("input_ids"))
            if name in kwargs or past_index >= len(args):
                kwargs[name] = cache
            else:
                args = (*args[:past_index], cache, *args[past_index + 1:])
            token = _CURRENT_STEP.set(_Step(handle, cache, continues=not fresh))
            try:
                if fresh:
                    with reread:
                        out = forward(*args, **kwargs)
                else:
                    q = inputs.shape[1]
                    _check_chunk_unpadded(arguments.get("attention_mask"), q)
                    key = cache.prepare_step(q)
                    graph_inputs = (_graph_inputs(arguments, cache, name) if graphs_enabled() and self.graphs
                                    else None)
                    if graph_inputs is None:
                        out = forward(*args, **kwargs)
                    else:
                        tensors, flags = graph_inputs
                        if cache.step_graph is None:
                            cache.step_graph = StepGraph()
                        key = (key, tuple(sorted(flags.items())))
                        out = cache.step_graph.run(key, lambda t: forward(**t, **flags, **{name: cache}), tensors)
                    cache.finish_step(q)
            finally:
                _CURRENT_STEP.reset(token)
            if fresh and inputs.shape[1] > 0:
                self._check_prefilled(cache)
            return out

        return cakekv_forward

    def _check_prefilled(self, cache: CompressedCache) -> None:
        """After a prefill forward: every layer stored and cut its part through cakekv's attention."""
        if cache.is_fresh:
            raise unsupported_release(f"{type(self.decoder).__name__}.forward did not hand the cache to its attention "
                                      "layers")
        skipped = [layer.layer_idx for layer in cache.layers if not layer.is_initialized or layer.prefilling]
        if skipped:
            raise _skipped_layers_error(skipped)

    def _chunked_prefill(self, forward, arguments: dict, handle, cache: CompressedCache):
        """A prompt longer than `handle.prefill_chunk` read chunk by chunk (`prefill_chunks`; docs/cache.md, "Chunked
        prefill"): the first chunk is prefilled and cut as a prompt is, each later one attends over the cut cache and
        itself at its true positions, then every layer is scored and cut again. Returns the last chunk's output:
        its logits, not the earlier chunks' (a prompt too long to read at once has logits too large to return)."""
        for flag in _WHOLE_PROMPT_OUTPUTS:
            if arguments.get(flag) or getattr(self.config, flag, False):
                raise ValueError(f"{flag}: a prompt read in chunks (prefill_chunk={handle.prefill_chunk}) gives the "
                                 "outputs of its last chunk only; run without it, or without prefill_chunk")
        inputs = arguments["input_ids"] if arguments.get("input_ids") is not None else arguments["inputs_embeds"]
        length = inputs.shape[1]
        chunks = prefill_chunks(length, handle.prefill_chunk, arguments.get("attention_mask"))
        for i, (start, end) in enumerate(chunks):
            part = {key: _chunk_argument(key, value, start, end, length) for key, value in arguments.items()}
            more = i < len(chunks) - 1
            probes = cache.window if more else 0  # the question's tokens score every chunk but the last
            if probes:
                part = _with_probes(part, arguments, start, end, length, probes, inputs.device)
            q = end - start + probes
            if i == 0:
                cache.begin_prefill(part.get("attention_mask"), inputs.shape[0], q, inputs.device, more, probes)
            else:
                cache.begin_chunk(q, more, probes)
            token = _CURRENT_STEP.set(_Step(handle, cache, continues=i > 0))
            try:
                out = forward(**part)
            finally:
                _CURRENT_STEP.reset(token)
            self._check_prefilled(cache)
        return out
