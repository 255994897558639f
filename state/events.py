"""Events: the facts the cluster must not forget.

Theory of operation: every change to the replicated state is an event, a frozen dataclass named in the
past tense. Events carry everything `apply` needs (times as float epoch seconds in `at`, ids, derived
values such as HA1 digests) because `apply` has no clock, no randomness and no I/O: whoever proposes an
event stamps it.

Each event class has a `schema_version` and is registered by its class name with `@register_event`; the
name and version go on the wire (see `codec.py`), so renaming a registered class or changing its fields
without bumping `schema_version` and adding an upcaster breaks old logs. To evolve an event:

1. bump `schema_version` on the class and change its fields;
2. register an upcaster `(name, old_version) -> fields of old_version + 1` with `@upcaster`.

Decoding an old log entry then runs the chain of upcasters up to the current version before the fields are
checked (pyeventsourcing calls this upcasting). Versions newer than the code knows are refused.

Invariants:
* registered events are frozen, slotted dataclasses whose field types the codec supports (checked at
  import time by `schema.field_specs`);
* an event never contains a password; credentials travel as HA1 digests only (RFC 7616 §3.4.2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from .errors import CodecError
from .schema import FieldSpec, field_specs

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every event. Subclasses are frozen slotted dataclasses registered with `@register_event`."""

    schema_version: ClassVar[int] = 1


EVENT_TYPES: dict[str, type[Event]] = {}
"""Registered event classes by wire name (the class name)."""

EVENT_SPECS: dict[type[Event], tuple[FieldSpec, ...]] = {}
"""Field converters of each registered event class, built at registration."""

UPCASTERS: dict[tuple[str, int], Upcaster] = {}
"""`(event name, version v) -> function turning the fields of v into the fields of v + 1`."""

_E = TypeVar("_E", bound=Event)


def register_event(cls: type[_E]) -> type[_E]:
    """Class decorator: register `cls` under its class name (TypeError if misdeclared or taken)."""
    name = cls.__name__
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{name}: events must be frozen dataclasses with slots")
    if name in EVENT_TYPES:
        raise TypeError(f"{name}: an event with this name is already registered")
    if type(cls.schema_version) is not int or cls.schema_version < 1:
        raise TypeError(f"{name}: schema_version must be a positive int")
    EVENT_SPECS[cls] = field_specs(cls)
    EVENT_TYPES[name] = cls
    return cls


def upcaster(name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Decorator: register a function that turns the fields of `name` v`from_version` into v+1."""

    def register(function: Upcaster) -> Upcaster:
        key = (name, from_version)
        if key in UPCASTERS:
            raise TypeError(f"an upcaster for {name} v{from_version} is already registered")
        UPCASTERS[key] = function
        return function

    return register


# --- extensions ------------------------------------------------------------------------------------------


@register_event
@dataclass(frozen=True, slots=True)
class ExtensionCreated(Event):
    """A new extension with its credentials (HA1 digests, lowercase hex; RFC 7616 §3.4.2).

    v1 had no `display_name`; v2 added it (upcast to "" = no display name).
    """

    schema_version: ClassVar[int] = 2

    extension: str
    display_name: str
    realm: str
    ha1_md5: str
    ha1_sha256: str
    at: float


@upcaster("ExtensionCreated", 1)
def _extension_created_v1_to_v2(fields: dict[str, Any]) -> dict[str, Any]:
    if "display_name" in fields:
        raise CodecError("ExtensionCreated v1 has no display_name field")
    return {**fields, "display_name": ""}


@register_event
@dataclass(frozen=True, slots=True)
class ExtensionUpdated(Event):
    """The extension's display name changed ("" clears it)."""

    extension: str
    display_name: str
    at: float


@register_event
@dataclass(frozen=True, slots=True)
class ExtensionDeleted(Event):
    """The extension is gone, with its credentials."""

    extension: str
    at: float


@register_event
@dataclass(frozen=True, slots=True)
class CredentialChanged(Event):
    """The extension's password changed: new HA1 digests for `realm` (RFC 7616 §3.4.2)."""

    extension: str
    realm: str
    ha1_md5: str
    ha1_sha256: str
    at: float
