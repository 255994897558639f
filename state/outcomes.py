"""Outcomes: what applying one command did, as returned to the proposer.

* `Applied(result)`: the event changed the state; `result` is a small map of scalars for the caller.
* `Rejected(field, message)`: the event was invalid against the current state (or malformed) and changed
  nothing; `field` names the culprit like `ValidationError` does.
* `Duplicate(first)`: the command's op_id was already applied; `first` is the outcome it had then.

Outcomes are frozen and msgpack-serialisable (`outcome_to_wire` / `outcome_from_wire`) because the first
outcome of every op_id in the dedupe window is part of the replicated state and of snapshots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import CodecError

Scalar = str | int | float | bool | None


@dataclass(frozen=True, slots=True)
class Outcome:
    """Base of `Applied`, `Rejected` and `Duplicate`."""

    @property
    def ok(self) -> bool:
        """True if the command took effect (now or, for a duplicate, the first time)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """The outcome as a JSON-ready mapping for the RPC layer."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Applied(Outcome):
    """The event took effect. Treat `result` as read-only."""

    result: dict[str, Scalar] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"status": "applied", "result": dict(self.result)}


@dataclass(frozen=True, slots=True)
class Rejected(Outcome):
    """The event was refused against the current state and changed nothing."""

    field: str
    message: str

    @property
    def ok(self) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        return {"status": "rejected", "field": self.field, "message": self.message}


@dataclass(frozen=True, slots=True)
class Duplicate(Outcome):
    """The op_id was seen before; nothing changed. `first` is the outcome of the first application."""

    first: Applied | Rejected

    @property
    def ok(self) -> bool:
        return self.first.ok

    def to_dict(self) -> dict[str, Any]:
        return {"status": "duplicate", "first": self.first.to_dict()}


_APPLIED = 0
_REJECTED = 1


def outcome_to_wire(outcome: Applied | Rejected) -> list[Any]:
    """`[0, result]` or `[1, field, message]`."""
    if type(outcome) is Applied:
        return [_APPLIED, outcome.result]
    if type(outcome) is Rejected:
        return [_REJECTED, outcome.field, outcome.message]
    raise CodecError(f"cannot encode outcome {type(outcome).__name__}")


def _check_scalar(value: Any) -> Scalar:
    kind = type(value)
    if value is None or kind is str or kind is bool or kind is int:
        return value  # type: ignore[no-any-return]
    if kind is float and math.isfinite(value):
        return value  # type: ignore[no-any-return]
    raise CodecError(f"outcome result values must be scalars, got {kind.__name__}")


def outcome_from_wire(data: Any) -> Applied | Rejected:
    """Inverse of `outcome_to_wire`; CodecError on anything malformed."""
    if type(data) is not list or not data:
        raise CodecError("outcome must be a non-empty array")
    tag = data[0]
    if tag == _APPLIED and type(tag) is int and len(data) == 2 and type(data[1]) is dict:
        result: dict[str, Scalar] = {}
        for key, value in data[1].items():
            if type(key) is not str:
                raise CodecError("outcome result keys must be strings")
            result[key] = _check_scalar(value)
        return Applied(result)
    if tag == _REJECTED and type(tag) is int and len(data) == 3:
        if type(data[1]) is not str or type(data[2]) is not str:
            raise CodecError("rejected outcome needs string field and message")
        return Rejected(data[1], data[2])
    raise CodecError("malformed outcome")
