"""Typed method options: each method declares its options as a frozen dataclass whose fields carry a
type (the annotation), a default, a one-line doc and constraints (`option(...)`). Values are checked
and normalised once, when the options are built, so a bad value fails at `compress()` with an error
naming the option instead of deep inside torch, and `method_options()` / `cakekv methods` are
generated from the same declarations.

Types: `int` (any numbers.Integral but bool; numpy ints become int), `float` (any numbers.Real but
bool, finite; becomes float), `bool` (bool or numpy bool only: "no" and 1 are refused, not read as
truthy), `Literal["a", "b"]` (one of the strings), `tuple[int, ...]` (token ids: a sequence of non-negative
integers, a 1-D tensor included; becomes a tuple of int)."""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import typing
import warnings
from typing import Any, Callable, Literal

_META = "cakekv"  # the key of an option's Constraint in its field's metadata
# Options renamed so that one idea has one name in every method (old name -> new name).
RENAMED = {"head_adaptive": "head_budgets", "floor_alpha": "head_floor"}


@dataclasses.dataclass(frozen=True)
class Constraint:
    """An option's doc and value constraints (bounds inclusive with ge/le, exclusive with gt)."""

    doc: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    odd: bool = False

    def text(self) -> str:
        """The constraint in words (empty when there is none), as errors and listings show it."""
        if self.ge is not None and self.le is not None:
            parts = [f"in [{self.ge}, {self.le}]"]
        else:
            parts = [f"{op} {bound}" for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le))
                     if bound is not None]
        return " and ".join((["odd"] if self.odd else []) + parts)

    def holds(self, value) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (not self.odd or value % 2 == 1))


def option(default: Any, doc: str, *, ge: float | None = None, gt: float | None = None,
           le: float | None = None, odd: bool = False) -> Any:
    """Declare an option field: its default, one-line doc and constraints; the type is the annotation."""
    return dataclasses.field(default=default, metadata={_META: Constraint(doc, ge, gt, le, odd)})


def decode_evict_option(default: bool) -> Any:
    """Every method has decode_evict; a method may change its default (CAKE evicts by default)."""
    return option(default, "evict while generating, holding each layer at its budget (False: the cache "
                           "grows by the generated tokens)")


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or _is_numpy_bool(value) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: must be an integer, got {_shown(value)}")
    return int(value)


def as_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or _is_numpy_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: must be a real number, got {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{name}: must be finite, got {value!r}")
    return number


def as_bool(name: str, value: Any) -> bool:
    if not (isinstance(value, bool) or _is_numpy_bool(value)):
        raise TypeError(f"{name}: must be True or False, got {_shown(value)}")
    return bool(value)


def _is_numpy_bool(value: Any) -> bool:
    # Checked by name so that numpy stays an optional import.
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")


def as_token_ids(name: str, value: Any) -> tuple[int, ...]:
    if hasattr(value, "tolist"):  # a tensor or array of ids
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name}: must be a sequence of token ids, got {_shown(value)}")
    ids = tuple(as_int(name, v) for v in value)
    if any(i < 0 for i in ids):
        raise ValueError(f"{name}: must be token ids >= 0, got {min(ids)}")
    return ids


def _choice_checker(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    def as_choice(name: str, value: Any) -> str:
        allowed = ", ".join(map(repr, choices))
        if not isinstance(value, str):
            raise TypeError(f"{name}: must be one of {allowed}, got {_shown(value)}")
        if value not in choices:
            raise ValueError(f"{name}: must be one of {allowed}, got {value!r}")
        return str(value)
    return as_choice


_CHECKERS = {int: as_int, float: as_real, bool: as_bool, tuple[int, ...]: as_token_ids}


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    """One declared option, as `describe_options()` lists it."""

    name: str
    type: str          # "int", "float", "bool", "token ids" or the choices, e.g. "'avg' | 'max'"
    default: Any
    doc: str
    constraint: str    # e.g. "odd and >= 1", "in [0, 1]"; "" when none


@dataclasses.dataclass(frozen=True)
class _Declared:
    info: OptionInfo
    check: Callable[[str, Any], Any]
    constraint: Constraint


@functools.cache
def declarations(cls: type) -> tuple[_Declared, ...]:
    """The declared options of an options class, method-specific ones first, then the shared ones."""
    if "__dataclass_fields__" not in vars(cls):
        raise TypeError(f"{cls.__name__}: decorate options classes with @dataclass(frozen=True, kw_only=True)")
    hints = typing.get_type_hints(cls)
    own = [f for f in dataclasses.fields(cls) if f.name not in _SHARED]
    shared = [f for f in dataclasses.fields(cls) if f.name in _SHARED]
    out = []
    for f in own + shared:
        hint = hints[f.name]
        if typing.get_origin(hint) is Literal:
            choices = typing.get_args(hint)
            check, shown = _choice_checker(choices), " | ".join(map(repr, choices))
        elif hint in _CHECKERS:
            check, shown = _CHECKERS[hint], "token ids" if hint == tuple[int, ...] else hint.__name__
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported option type {hint!r}")
        constraint = f.metadata.get(_META)
        if constraint is None:
            raise TypeError(f"{cls.__name__}.{f.name}: declare options with option(...)")
        out.append(_Declared(OptionInfo(f.name, shown, f.default, constraint.doc, constraint.text()), check,
                             constraint))
    return tuple(out)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    """Base of every method's options (subclasses add `option(...)` fields); built values are checked
    and normalised, so a method reads them as plain int / float / bool / str."""

    decode_evict: bool = decode_evict_option(False)

    def __post_init__(self):
        for declared in declarations(type(self)):
            name = declared.info.name
            value = declared.check(name, getattr(self, name))
            if not declared.constraint.holds(value):
                raise ValueError(f"{name}: must be {declared.constraint.text()}, got {value!r}")
            object.__setattr__(self, name, value)

    @classmethod
    def build(cls, method: str, values: dict[str, Any]) -> "Options":
        """Options from keyword values; an unknown name is refused with the method's valid names, a renamed
        one is read under its new name with a FutureWarning."""
        allowed = [d.info.name for d in declarations(cls)]
        values = dict(values)
        for old, new in RENAMED.items():
            if old in values and new in allowed and new not in values:
                warnings.warn(f"{old}: renamed {new} (one name for the option across methods); {old} will be "
                              "removed", FutureWarning, stacklevel=4)
                values[new] = values.pop(old)
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise TypeError(f"{unknown[0]}: method {method!r} takes no option {unknown[0]!r}; "
                            f"its options are {sorted(allowed)}")
        return cls(**values)


_SHARED = frozenset(f.name for f in dataclasses.fields(Options))
