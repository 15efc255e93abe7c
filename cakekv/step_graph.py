"""One-token decode steps over a CompressedCache, replayed as CUDA graphs (docs/decode.md).

An eager decode step launches hundreds of small kernels (the model's and cakekv's) and is bound by
launch latency, not by the bytes it reads. After prefill, everything a step touches has a fixed address:
the cache is written in place and its host-side decisions (reallocation, how many entries each layer
evicts) are taken before the step by `CompressedCache.prepare_step`, whose result (with the addresses of every
cache tensor the step touches, the output flags and the inputs' shapes) keys the graph. A new
key runs one step eagerly (warm-up), the next step is captured, and later steps with that key replay it.
If capture fails (an op that syncs with the host, say), the cache decodes eagerly from then on.

A graph must not be destroyed while another is being captured (CUDA refuses, the capture fails and the
destroyed graph leaks): the stored output refers to the cache weakly, so that a cache and its graph are freed
when the last user reference goes, not by a cyclic garbage collection that may fall inside a capture; and the
collector is paused while capturing.
"""
from __future__ import annotations

import gc
import os
import threading
import warnings
import weakref
from typing import Callable

import torch

ENV_SWITCH = "CAKEKV_CUDA_GRAPHS"  # "0" turns capture off (eager decode, as on CPU)


def graphs_enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


class StepGraph:
    """The captured step of one cache: static inputs, the graph, and its output."""

    def __init__(self):
        self.key = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: dict[str, torch.Tensor] = {}
        self.output = None
        self.pool = None
        self.failed: str | None = None
        self.replays = 0
        self.captures = 0

    def run(self, key, step: Callable[[dict[str, torch.Tensor]], object], inputs: dict[str, torch.Tensor]):
        """`step(inputs)` runs the decoder on `inputs`; returns its output (graph-owned tensors cloned). `key`
        says what the step depends on besides its inputs (the cache's addresses and decisions, the flags that
        shape the output); the inputs' names, shapes and dtypes are added to it here."""
        if self.failed is not None:
            return step(inputs)
        key = (key, tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(inputs.items())))
        if key != self.key:  # warm-up for a new key; the next step with this key is captured
            self.key, self.graph, self.output = key, None, None
            return _on_side_stream(step, inputs)
        if self.graph is None:
            if not self._capture(step, inputs):
                return step(inputs)
        else:
            for name, value in inputs.items():
                self.inputs[name].copy_(value)
        self.graph.replay()
        self.replays += 1
        return _detached(self.output)

    def _capture(self, step, inputs) -> bool:
        static = {name: value.clone() for name, value in inputs.items()}
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        inner: list[BaseException] = []

        def captured():
            try:
                return step(static)
            except Exception as error:  # the cause; ending the capture may raise another error over it
                inner.append(error)
                raise

        try:
            with _CAPTURE_LOCK, _COLLECTOR_PAUSED, torch.cuda.graph(graph, pool=self.pool, stream=_side_stream(),
                                                                    capture_error_mode="thread_local"):
                output = captured()
        except Exception as error:  # noqa: BLE001  (any failure to capture falls back to eager decode)
            error = inner[0] if inner else error
            self.pool = None
            self.failed = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            warnings.warn(f"cakekv: decode steps run eagerly, the CUDA graph capture failed ({self.failed})",
                          RuntimeWarning, stacklevel=4)
            return False
        self.graph, self.inputs, self.output = graph, static, _weakened(output)
        self.captures += 1
        return True


class _CollectorPause:
    """Python's cyclic collector off while any thread captures: counted, so that the first capture to start
    turns it off and the last to end restores it (as it was before the first)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._captures = 0
        self._was_enabled = False

    def __enter__(self):
        with self._lock:
            if self._captures == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._captures += 1

    def __exit__(self, *exc):
        with self._lock:
            self._captures -= 1
            if self._captures == 0 and self._was_enabled:
                gc.enable()
        return False


_COLLECTOR_PAUSED = _CollectorPause()
# One capture at a time in the process: entering a capture synchronizes the device and empties the allocator's
# cache, which must not fall inside another thread's capture. A capture is one decode step: threads wait little.
_CAPTURE_LOCK = threading.Lock()


_SIDE_STREAMS = threading.local()  # per thread: {device: stream}


def _side_stream() -> torch.cuda.Stream:
    """One capture stream per device and thread: libraries that keep per-stream state (cuBLAS workspaces) see
    the same stream in the warm-up step and in the capture, and a thread's capture never records another
    thread's step (threads generating under one handle each warm up and capture on their own stream)."""
    streams = _SIDE_STREAMS.__dict__.setdefault("by_device", {})
    device = torch.cuda.current_device()
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


def _on_side_stream(step, inputs):
    """Run `step` eagerly on the capture stream, ordered after and before the current stream's work."""
    current, side = torch.cuda.current_stream(), _side_stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):
        output = step(inputs)
    current.wait_stream(side)
    return output


class _Weak:
    """A field of the stored output held by weak reference (the cache, which owns this graph)."""

    def __init__(self, value):
        self.ref = weakref.ref(value)


def _weakened(output):
    """The model output with its non-tensor objects (the cache) held weakly: no cycle cache -> graph -> cache."""
    def weak(value):
        try:
            return _Weak(value)
        except TypeError:  # None, numbers: no weak reference, and no cycle either
            return value
    return type(output), {name: value if isinstance(value, torch.Tensor) else weak(value)
                          for name, value in output.items()}


def _copied(value):
    """`value` with every tensor in it copied, through tuples and lists (hidden states and attentions of every
    layer are tuples of graph-owned tensors, which the next replay overwrites)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_copied(v) for v in value)
    return value


def _detached(stored):
    """A model output from the stored one: tensors copied, nested ones too, weak fields resolved."""
    kind, fields = stored
    return kind(**{name: value.ref() if isinstance(value, _Weak) else _copied(value) for name, value in fields.items()})
