"""Wire converters built once from dataclass annotations.

Theory of operation: every field type that may appear in an event (or in a record nested in an event) has
a pair of converters, built once when the event class is registered:

* `to_wire(value)` checks a Python value and turns it into plain msgpack data (tuples become lists,
  nested dataclasses become maps keyed by field name, ints given for float fields become floats);
* `from_wire(value)` checks data that came out of `msgpack.unpackb` and rebuilds the Python value.

Both raise `CodecError` and nothing else on a value of the wrong shape. Checks use exact types
(`type(v) is str`), so `bool` never passes for `int` and subclasses never sneak in.

Supported annotations: `str`, `int` (signed 64-bit), `float` (finite), `bool`, `bytes`, `X | None`,
`tuple[X, ...]`, and frozen dataclasses whose fields are themselves supported. Anything else is a
programming error and raises `TypeError` at registration (import) time, never at decode time.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any

from .errors import CodecError

Converter = Callable[[Any], Any]

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


@dataclasses.dataclass(frozen=True, slots=True)
class FieldSpec:
    """One dataclass field with its converters."""

    name: str
    to_wire: Converter
    from_wire: Converter


def _check_str(value: Any) -> str:
    if type(value) is not str:
        raise CodecError(f"expected a string, got {type(value).__name__}")
    return value


def _check_bytes(value: Any) -> bytes:
    if type(value) is not bytes:
        raise CodecError(f"expected bytes, got {type(value).__name__}")
    return value


def _check_bool(value: Any) -> bool:
    if type(value) is not bool:
        raise CodecError(f"expected a boolean, got {type(value).__name__}")
    return value


def _check_int(value: Any) -> int:
    if type(value) is not int:
        raise CodecError(f"expected an integer, got {type(value).__name__}")
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise CodecError("integer out of 64-bit range")
    return value


def _float_from_wire(value: Any) -> float:
    if type(value) is not float:
        raise CodecError(f"expected a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise CodecError("float is not finite")
    return value


def _float_to_wire(value: Any) -> float:
    if type(value) is int:
        value = float(value)
    return _float_from_wire(value)


_SCALARS: dict[Any, tuple[Converter, Converter]] = {
    str: (_check_str, _check_str),
    bytes: (_check_bytes, _check_bytes),
    bool: (_check_bool, _check_bool),
    int: (_check_int, _check_int),
    float: (_float_to_wire, _float_from_wire),
}


def _optional(inner: tuple[Converter, Converter]) -> tuple[Converter, Converter]:
    inner_to, inner_from = inner

    def to_wire(value: Any) -> Any:
        return None if value is None else inner_to(value)

    def from_wire(value: Any) -> Any:
        return None if value is None else inner_from(value)

    return to_wire, from_wire


def _tuple_of(inner: tuple[Converter, Converter]) -> tuple[Converter, Converter]:
    inner_to, inner_from = inner

    def to_wire(value: Any) -> Any:
        if type(value) is not tuple:
            raise CodecError(f"expected a tuple, got {type(value).__name__}")
        return [inner_to(item) for item in value]

    def from_wire(value: Any) -> Any:
        if type(value) is not list:
            raise CodecError(f"expected an array, got {type(value).__name__}")
        return tuple([inner_from(item) for item in value])

    return to_wire, from_wire


def _record(cls: type[Any]) -> tuple[Converter, Converter]:
    specs = field_specs(cls)

    def to_wire(value: Any) -> Any:
        if type(value) is not cls:
            raise CodecError(f"expected {cls.__name__}, got {type(value).__name__}")
        return {spec.name: spec.to_wire(getattr(value, spec.name)) for spec in specs}

    def from_wire(value: Any) -> Any:
        return cls(**fields_from_wire(specs, value, cls.__name__))

    return to_wire, from_wire


def _converters(annotation: Any) -> tuple[Converter, Converter]:
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        others = [arg for arg in args if arg is not type(None)]
        if len(args) == 2 and len(others) == 1:
            return _optional(_converters(others[0]))
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _tuple_of(_converters(args[0]))
    elif dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return _record(annotation)
    raise TypeError(f"unsupported field type for the state codec: {annotation!r}")


def field_specs(cls: type[Any]) -> tuple[FieldSpec, ...]:
    """Converters for every field of dataclass `cls`, in declaration order (TypeError if unsupported)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    specs = []
    for field in dataclasses.fields(cls):
        to_wire, from_wire = _converters(hints[field.name])
        specs.append(FieldSpec(field.name, to_wire, from_wire))
    return tuple(specs)


def fields_from_wire(specs: tuple[FieldSpec, ...], data: Any, what: str) -> dict[str, Any]:
    """Check that `data` is a map with exactly the fields of `specs` and convert each value."""
    if type(data) is not dict:
        raise CodecError(f"{what}: expected a map of fields, got {type(data).__name__}")
    if len(data) == len(specs):
        # The common case in one comprehension (every apply of every entry, on every node); on any failure
        # the checks below run again one by one to name the field.
        try:
            return {spec.name: spec.from_wire(data[spec.name]) for spec in specs}
        except (KeyError, CodecError):
            pass
    if len(data) != len(specs):
        expected = sorted(spec.name for spec in specs)
        got = sorted(str(key) for key in data)
        raise CodecError(f"{what}: expected fields {expected}, got {got}")
    kwargs: dict[str, Any] = {}
    for spec in specs:
        if spec.name not in data:
            raise CodecError(f"{what}: missing field {spec.name!r}")
        try:
            kwargs[spec.name] = spec.from_wire(data[spec.name])
        except CodecError as exc:
            raise CodecError(f"{what}.{spec.name}: {exc}") from None
    return kwargs
