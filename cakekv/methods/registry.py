"""Methods by name, and their declared options. Each method lives in the module of its name
(cakekv/methods/<name>.py), imported when the method is first asked for: names and argument checks need no torch,
so the command line refuses a bad method before it loads anything."""
from __future__ import annotations

import importlib
from typing import Any

from .options import OptionInfo, declarations

METHOD_NAMES = ("adakv", "cake", "defensivekv", "full", "h2o", "kvzip", "lava", "layer_defensivekv", "pyramidkv",
                "snapkv", "spancake", "spanzip", "streamingllm")
_REGISTRY: dict[str, type] = {}


def register(cls):
    """Class decorator of a method: its `name` must be listed in METHOD_NAMES and be its module's name."""
    if cls.name not in METHOD_NAMES or cls.__module__ != f"{__package__}.{cls.name}":
        raise TypeError(f"method {cls.name!r} must be listed in METHOD_NAMES and defined in {__package__}.{cls.name}")
    _REGISTRY[cls.name] = cls
    return cls


def check_method_name(name: Any) -> str:
    """`name` if it names a method (no import), else the error that lists the methods."""
    if not isinstance(name, str) or name not in METHOD_NAMES:
        raise ValueError(f"method: unknown method {name!r}; available: {available_methods()}")
    return name


def get_method(name: str) -> type:
    if check_method_name(name) not in _REGISTRY:
        importlib.import_module(f".{name}", __package__)
    return _REGISTRY[name]


def available_methods() -> list[str]:
    return sorted(METHOD_NAMES)


def describe_options(name: str) -> list[OptionInfo]:
    """A method's options: name, type, default, one-line doc and constraint of each (model-dependent
    defaults, CAKE's tau1/tau2, are shown by their generic value and say so in their doc)."""
    return [d.info for d in declarations(get_method(name).Options)]


def method_options(name: str) -> dict[str, Any]:
    """A method's options with their defaults (see `describe_options` for types and docs)."""
    return {info.name: info.default for info in describe_options(name)}
