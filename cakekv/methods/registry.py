"""Methods by name."""
from __future__ import annotations

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
