"""Methods by name, and their declared options."""
from __future__ import annotations

from typing import Any

from .options import OptionInfo, declarations

_REGISTRY: dict[str, type] = {}


def register(cls):
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"method: unknown method {name!r}; available: {available_methods()}")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def describe_options(name: str) -> list[OptionInfo]:
    """A method's options: name, type, default, one-line doc and constraint of each (model-dependent
    defaults, CAKE's tau1/tau2, are shown by their generic value and say so in their doc)."""
    return [d.info for d in declarations(get_method(name).Options)]


def method_options(name: str) -> dict[str, Any]:
    """A method's options with their defaults (see `describe_options` for types and docs)."""
    return {info.name: info.default for info in describe_options(name)}
