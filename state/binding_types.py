"""The records of registrations: the binding events, the contacts they carry and `decide_register`'s answers.

Theory of operation: these are plain frozen dataclasses, declared here rather than in `bindings.py` (which
holds their rules: the appliers, queries and decisions, and re-exports every name below) because
`bindings.py` is compiled with mypyc in a normal install (setup.py) and this module is not: in a compiled
module a class's annotations become erased run-time types (`tuple`, `type`, `int` for `ClassVar[int]`), and
the codec builds each event's converters from its annotations (`schema.field_specs`, `codec._field_code`),
and a dataclass needs `ClassVar` to tell a class constant (`RegisterDecision.status`) from a field. The
events' wire form is `codec.py`'s (name, schema_version, fields): declaring them in another module changes no
byte. Invariants and apply rules: see `bindings.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .events import Event, register_event
from .model import binding_key

# --- events ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContactUpdate:
    """One Contact of a REGISTER: `expires` seconds from the event's `at` (0 removes the binding)."""

    contact: str
    contact_key: str
    instance_id: str
    reg_id: int
    expires: int
    q: float | None
    flow: str

    @property
    def key(self) -> str:
        """The binding key within the AoR (`model.binding_key`)."""
        return binding_key(self.contact_key, self.instance_id, self.reg_id)


@register_event
@dataclass(frozen=True, slots=True)
class BindingsUpdated(Event):
    """A REGISTER with contacts was accepted for `aor` (RFC 3261 §10.3 step 7), all contacts at once."""

    aor: str
    call_id: str
    cseq: int
    received: str
    transport: str
    path: tuple[str, ...]
    node_id: str
    max_contacts: int
    contacts: tuple[ContactUpdate, ...]
    at: float


@register_event
@dataclass(frozen=True, slots=True)
class BindingsCleared(Event):
    """Every binding of `aor` was removed (`Contact: *`, RFC 3261 §10.3 step 6; or an operator)."""

    aor: str
    call_id: str
    cseq: int
    at: float


@register_event
@dataclass(frozen=True, slots=True)
class BindingRemoved(Event):
    """An operator removed the binding `key` of `aor`."""

    aor: str
    key: str
    at: float


@register_event
@dataclass(frozen=True, slots=True)
class BindingsExpired(Event):
    """The leader's sweep: every binding with `expires_at <= at` is gone."""

    at: float



# --- decisions -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContactSpec:
    """One Contact of a REGISTER as extracted by the registrar.

    `contact_key` is the contact URI normalised for RFC 3261 §19.1.4 comparison (computed by the caller);
    `expires` is the Contact's expires parameter (None if absent); `reg_id` is 0 when absent and is
    ignored without an `instance_id` (RFC 5626 §6); `flow` names the node and connection (RFC 5626).
    """

    uri: str
    contact_key: str
    expires: int | None = None
    q: float | None = None
    instance_id: str = ""
    reg_id: int = 0
    flow: str = ""


class RegisterDecision:
    """Base of what `decide_register` returns: `RegisterAccepted` or a refusal."""

    status: ClassVar[int] = 200
    """The SIP status the registrar would normally answer with (a hint; the registrar owns the table)."""


@dataclass(frozen=True, slots=True)
class RegisterAccepted(RegisterDecision):
    """Propose `events` under `op_id` and answer 200 once committed. No events: a query (§10.3 step 6:
    no Contact) answered from `current_bindings` without proposing anything."""

    events: tuple[Event, ...]
    op_id: str


@dataclass(frozen=True, slots=True)
class NoSuchAor(RegisterDecision):
    """The AoR is not an extension. The registrar must not reveal this before authentication."""

    status: ClassVar[int] = 404


@dataclass(frozen=True, slots=True)
class IntervalTooBrief(RegisterDecision):
    """RFC 3261 §10.3 step 7: 423 Interval Too Brief, with `Min-Expires: min_expires`."""

    status: ClassVar[int] = 423
    min_expires: int


@dataclass(frozen=True, slots=True)
class BadRegister(RegisterDecision):
    """400: an invalid request (e.g. `Contact: *` with other contacts or a non-zero Expires, §10.3 step 6)."""

    status: ClassVar[int] = 400
    field: str
    message: str


@dataclass(frozen=True, slots=True)
class OutOfOrder(RegisterDecision):
    """§10.3 step 7: same Call-ID with a lower CSeq than a binding's: the update is aborted (500)."""

    status: ClassVar[int] = 500


@dataclass(frozen=True, slots=True)
class TooManyContacts(RegisterDecision):
    """More live bindings than the configured maximum per AoR (403)."""

    status: ClassVar[int] = 403
    max_contacts: int
