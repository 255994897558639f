"""Registrations: the bindings of an AoR to contacts, as events, appliers and the registrar's decisions.

Theory of operation. The registrar (in `raftpbx/`, later) parses and authenticates a REGISTER, extracts
plain values (AoR, contacts, Call-ID, CSeq, source address...) and calls `decide_register`, which reads
the local state and returns either the events to propose with a deterministic op_id, or a typed refusal
that the registrar maps to a SIP status (each refusal carries a `status` hint). The 200 is sent only
once the event is committed; it lists `current_bindings(state, aor, now)`.

Events (all schema v1; times are epoch floats stamped by the proposer; declared, with the decisions'
records, in `binding_types.py`, which stays interpreted when this module is compiled: see there):

* `BindingsUpdated(aor, call_id, cseq, received, transport, path, node_id, max_contacts, contacts, at)`:
  one accepted REGISTER with contacts. Each `ContactUpdate` adds or refreshes (expires > 0: the binding
  expires at `at + expires`) or removes (expires == 0) one binding. One event per REGISTER, not one per
  contact, because RFC 3261 §10.3 requires the updates of one request to be committed all or nothing.
* `BindingsCleared(aor, call_id, cseq, at)`: `Contact: *` with `Expires: 0` (§10.3 step 6) removes
  every binding of the AoR; an operator's "clear" uses call_id "" (never equal to a real Call-ID).
* `BindingRemoved(aor, key, at)`: an operator removed one binding.
* `BindingsExpired(at)`: proposed by the leader; removes every binding with `expires_at <= at`.

Apply rules (checked at apply time, so concurrent REGISTERs resolve identically on every node). A binding
is *live* at time t if `expires_at > t`; apply uses the event's `at` as t, so an expired binding that the
leader has not swept yet never blocks or counts:

* unknown AoR (no such extension) -> `Rejected("aor", "no such extension")`;
* §10.3 step 7 (and step 6 for `*`): if a live binding touched by the request has the same Call-ID and
  a CSeq >= the request's, the whole request is refused with `Rejected("cseq", "out of order")` and
  nothing changes; a different Call-ID always updates;
* max contacts: the proposer stamps its configured maximum into the event; if the request would leave
  more live bindings than that *and* more than there were before, it is refused with
  `Rejected("contact", "too many contacts")` (a refresh never fails because the limit was lowered);
* the binding key is `binding_key(contact_key, instance_id, reg_id)` (RFC 5626 §6 / RFC 3261 §10.3
  step 5; `contact_key` is the normalised contact the registrar computed);
* deleting an extension drops its bindings (`apply._extension_deleted`).

Invariants: see `model.State` (bindings belong to existing extensions, the expiry heap's top is live).
Performance: apply of `BindingsUpdated` costs O(contacts in the request x log n), plus a count of the
AoR's bindings only when it is near its maximum; `BindingsExpired` costs O(k log n) for k removed;
`next_expiry` is O(1). Nothing scans all bindings.

Deliberate choices: a retransmitted REGISTER (same Call-ID and CSeq) is not refused by the decision but
proposed again under the same op_id (`register_op_id`), so the dedupe window answers it with the first
outcome (a 200 again), whichever node it reached. A missing q-value sorts like q=1.0.
"""

from __future__ import annotations

import hashlib
import json
import math

from .apply import applies
from .binding_types import (  # also importable from here, where they were declared until compiled
    BadRegister,
    BindingRemoved,
    BindingsCleared,
    BindingsExpired,
    BindingsUpdated,
    ContactSpec,
    ContactUpdate,
    IntervalTooBrief,
    NoSuchAor,
    OutOfOrder,
    RegisterAccepted,
    RegisterDecision,
    TooManyContacts,
)
from .errors import ValidationError
from .events import Event
from .model import _INTERNED, Binding, State, binding_key, fast_constructor, intern_text
from .outcomes import Applied, Rejected

MAX_CSEQ = 2**31 - 1
"""RFC 3261 §8.1.1.5: the CSeq sequence number is below 2**31."""
MAX_EXPIRES = 2**32 - 1
"""RFC 3261 §20.19/§10.2.1.1: larger delta-seconds are taken as 2**32 - 1."""
MAX_FIELD = 2048
SHORT_INTERVAL = 3600
"""RFC 3261 §10.3 step 7: 423 only for intervals shorter than one hour."""


# --- apply -----------------------------------------------------------------------------------------------


def _is_live(binding: Binding, now: float) -> bool:
    return binding.expires_at > now


def _check_text(value: str, *, empty_ok: bool = False) -> str | None:
    if not value and not empty_ok:
        return "must not be empty"
    if len(value) > MAX_FIELD:
        return f"too long: at most {MAX_FIELD} characters"
    return None


def _check_q(q: float | None) -> str | None:
    if q is not None and not 0.0 <= q <= 1.0:
        return "q must be between 0 and 1"
    return None


def _check_cseq(cseq: int) -> str | None:
    return None if 0 <= cseq <= MAX_CSEQ else "CSeq must be between 0 and 2**31 - 1"


def _update_ok(event: BindingsUpdated, keys: list[str]) -> bool:
    """The common case of `_check_update` in one frame: every check passes (no message to build). Loops,
    not `all()` over generators: a generator is a Python call on every resumption (five per REGISTER)."""
    if not (
        0 < len(event.call_id) <= MAX_FIELD
        and 0 <= event.cseq <= MAX_CSEQ
        and len(event.received) <= MAX_FIELD
        and len(event.transport) <= MAX_FIELD
        and len(event.node_id) <= MAX_FIELD
        and event.max_contacts >= 1
        and len(event.contacts) > 0
    ):
        return False
    for hop in event.path:
        if not 0 < len(hop) <= MAX_FIELD:
            return False
    for c in event.contacts:
        if not (
            0 < len(c.contact) <= MAX_FIELD
            and 0 < len(c.contact_key) <= MAX_FIELD
            and len(c.instance_id) <= MAX_FIELD
            and len(c.flow) <= MAX_FIELD
            and (c.q is None or 0.0 <= c.q <= 1.0)
            and 0 <= c.reg_id <= MAX_CSEQ
            and 0 <= c.expires <= MAX_EXPIRES
        ):
            return False
    return len(set(keys)) == len(keys)


def _check_update(event: BindingsUpdated, keys: list[str]) -> Rejected | None:
    # Every apply of every REGISTER runs this on every node: the fast test first, the first failing check
    # (in this order, so every node names the same field) only when something is wrong.
    if _update_ok(event, keys):
        return None
    for field, message in (
        ("call_id", _check_text(event.call_id)),
        ("cseq", _check_cseq(event.cseq)),
        ("received", _check_text(event.received, empty_ok=True)),
        ("transport", _check_text(event.transport, empty_ok=True)),
        ("node_id", _check_text(event.node_id, empty_ok=True)),
    ):
        if message is not None:
            return Rejected(field, message)
    if event.max_contacts < 1:
        return Rejected("max_contacts", "must be at least 1")
    if not event.contacts:
        return Rejected("contact", "no contacts")
    if any(_check_text(hop) is not None for hop in event.path):
        return Rejected("path", "malformed Path entry")
    for contact in event.contacts:
        for field, message in (
            ("contact", _check_text(contact.contact)),
            ("contact", _check_text(contact.contact_key)),
            ("instance_id", _check_text(contact.instance_id, empty_ok=True)),
            ("flow", _check_text(contact.flow, empty_ok=True)),
            ("q", _check_q(contact.q)),
        ):
            if message is not None:
                return Rejected(field, message)
        if not 0 <= contact.reg_id <= MAX_CSEQ:
            return Rejected("reg_id", "must be between 0 and 2**31 - 1")
        if not 0 <= contact.expires <= MAX_EXPIRES:
            return Rejected("expires", "must be between 0 and 2**32 - 1")
    if len(set(keys)) != len(keys):
        return Rejected("contact", "the same binding twice in one request")
    return None


def _out_of_order(current: dict[str, Binding], keys: list[str], call_id: str, cseq: int, now: float) -> bool:
    # RFC 3261 §10.3 step 7: same Call-ID and a CSeq not higher than the stored one aborts the update.
    for key in keys:
        binding = current.get(key)
        if (
            binding is not None
            and _is_live(binding, now)
            and binding.call_id == call_id
            and binding.cseq >= cseq
        ):
            return True
    return False


def _too_many(
    current: dict[str, Binding], keys: list[str], added: int, max_contacts: int, now: float
) -> bool:
    """Would the AoR end with more than `max_contacts` live bindings, and more than it had before?"""
    if len(current) + added <= max_contacts:
        return False  # fast path: even counting expired bindings as live, the limit holds
    touched = set(keys)
    live_before = sum(1 for binding in current.values() if _is_live(binding, now))
    live_after = added + sum(
        1 for key, binding in current.items() if key not in touched and _is_live(binding, now)
    )
    return live_after > max_contacts and live_after > live_before


_make_binding = fast_constructor(Binding)  # Binding(*fields) at a third of the cost (every REGISTER, every node)
_NO_BINDINGS: dict[str, Binding] = {}  # read only: an AoR without bindings


@applies(BindingsUpdated)
def _bindings_updated(state: State, event: BindingsUpdated) -> Applied | Rejected:
    extension = state.extensions.get(event.aor)
    if extension is None:
        return Rejected("aor", "no such extension")
    # Every REGISTER on every node (the Raft thread): the common cases are inlined (the fast
    # test of _check_update, the count of contacts added, _too_many's fast path, intern_text's hit).
    keys = [binding_key(contact.contact_key, contact.instance_id, contact.reg_id) for contact in event.contacts]
    if not _update_ok(event, keys) and (rejected := _check_update(event, keys)) is not None:
        return rejected
    current = state.bindings.get(event.aor, _NO_BINDINGS)
    if current and _out_of_order(current, keys, event.call_id, event.cseq, event.at):
        return Rejected("cseq", "out of order")
    added = 0
    for contact in event.contacts:
        if contact.expires > 0:
            added += 1
    if len(current) + added > event.max_contacts and _too_many(current, keys, added, event.max_contacts, event.at):
        return Rejected("contact", "too many contacts")
    removed = 0
    # Memory (issue 8): the records keep shared strings, not the decoded event's copies: the AoR is the
    # extension's own key object, transport and node id are interned (one copy for all bindings).
    aor = extension.extension
    transport = _INTERNED.get(event.transport) or intern_text(event.transport)
    node_id = _INTERNED.get(event.node_id) or intern_text(event.node_id)
    for key, contact in zip(keys, event.contacts, strict=True):
        previous = current.get(key)
        if contact.expires == 0:
            if state.drop_binding(event.aor, key) is not None:
                removed += 1
            continue
        keep_since = previous is not None and _is_live(previous, event.at)
        state.put_binding(
            _make_binding(  # positional, in field order (see Binding)
                aor,
                key,
                contact.contact,
                contact.contact_key,
                event.at + contact.expires,
                contact.q,
                event.call_id,
                event.cseq,
                event.received,
                transport,
                event.path,
                contact.instance_id,
                contact.reg_id,
                contact.flow,
                node_id,
                previous.registered_at if keep_since and previous is not None else event.at,
                event.at,
            )
        )
    return Applied({"aor": event.aor, "added": added, "removed": removed})


@applies(BindingsCleared)
def _bindings_cleared(state: State, event: BindingsCleared) -> Applied | Rejected:
    if event.aor not in state.extensions:
        return Rejected("aor", "no such extension")
    if (message := _check_cseq(event.cseq)) is not None:
        return Rejected("cseq", message)
    current = state.bindings.get(event.aor, {})
    if event.call_id and _out_of_order(current, list(current), event.call_id, event.cseq, event.at):
        return Rejected("cseq", "out of order")  # RFC 3261 §10.3 step 6
    return Applied({"aor": event.aor, "removed": state.drop_bindings_of(event.aor)})


@applies(BindingRemoved)
def _binding_removed(state: State, event: BindingRemoved) -> Applied | Rejected:
    if event.aor not in state.extensions:
        return Rejected("aor", "no such extension")
    if state.drop_binding(event.aor, event.key) is None:
        return Rejected("key", "no such binding")
    return Applied({"aor": event.aor, "removed": 1})


@applies(BindingsExpired)
def _bindings_expired(state: State, event: BindingsExpired) -> Applied | Rejected:
    return Applied({"removed": len(state.pop_expired_bindings(event.at))})


# --- queries ---------------------------------------------------------------------------------------------


def _order(binding: Binding) -> tuple[float, float, str]:
    return (-(1.0 if binding.q is None else binding.q), binding.registered_at, binding.key)


def current_bindings(state: State, aor: str, now: float) -> list[Binding]:
    """Live bindings of `aor` at `now`, by q descending, then oldest registration, then key.

    Filters out `expires_at <= now`, so lookups are right before the leader's `BindingsExpired` lands.
    This is the 200 OK's Contact list (RFC 3261 §10.3 step 8) and the proxy's target set (§16.5).
    """
    table = state.bindings.get(aor)
    if not table:
        return []
    return sorted((binding for binding in table.values() if _is_live(binding, now)), key=_order)


def next_expiry(state: State) -> float | None:
    """When the leader should next propose `BindingsExpired` (the earliest `expires_at`), or None."""
    return state.next_binding_expiry()


def decide_expire(state: State, now: float) -> list[Event]:
    """`[BindingsExpired(now)]` if some binding has expired at `now`, else `[]` (O(1))."""
    due = state.next_binding_expiry()
    return [BindingsExpired(at=now)] if due is not None and due <= now else []


def _json_parts(parts: tuple[object, ...]) -> str:
    """`json.dumps(parts, ensure_ascii=True, separators=(",", ":"))`, built directly when every part is an
    int or a string that JSON writes as is (printable ASCII without '"' or '\\'): the op_id of every
    REGISTER goes through here, and the encoder's setup cost more than the hash. Same text either way."""
    out = []
    for part in parts:
        if type(part) is str and part.isascii() and part.isprintable() and '"' not in part and "\\" not in part:
            out.append(f'"{part}"')
        elif type(part) is int:
            out.append(str(part))
        else:
            return json.dumps(parts, ensure_ascii=True, separators=(",", ":"))
    return "[" + ",".join(out) + "]"


def _op_id(prefix: str, *parts: object) -> str:
    text = _json_parts(parts)
    return f"{prefix}-{hashlib.sha256(text.encode()).hexdigest()[:40]}"


def register_op_id(aor: str, call_id: str, cseq: int, branch: str = "") -> str:
    """A deterministic op_id for a REGISTER: a retransmission (same AoR, Call-ID, CSeq and top-Via branch)
    gets the same op_id on every node, so the dedupe window answers it with the first outcome."""
    return _op_id("reg", aor, call_id, cseq, branch)


def expiry_op_id(now: float) -> str:
    """A deterministic op_id for the leader's `BindingsExpired(now)` (a retry dedupes)."""
    return _op_id("expire", repr(float(now)))


def binding_admin_op_id(action: str, aor: str, key: str, now: float) -> str:
    """A deterministic op_id for an operator's binding removal or clear issued at `now`."""
    return _op_id("binding", action, aor, key, repr(float(now)))


# --- decisions (the records they build are in `binding_types.py`) ----------------------------------------


def refusal_for(rejected: Rejected, *, max_contacts: int) -> RegisterDecision:
    """The refusal matching a `Rejected` outcome of a register event (after a concurrent change)."""
    if rejected.field == "aor":
        return NoSuchAor()
    if rejected.field == "cseq" and rejected.message == "out of order":
        return OutOfOrder()
    if rejected.field == "contact" and rejected.message == "too many contacts":
        return TooManyContacts(max_contacts)
    return BadRegister(rejected.field, rejected.message)


# The records of every accepted REGISTER (the proposing node's SIP thread), built without the frozen
# dataclasses' per-field object.__setattr__ (19 per single-contact REGISTER): model.fast_constructor.
_make_contact_update = fast_constructor(ContactUpdate)
_make_bindings_updated = fast_constructor(BindingsUpdated)
_make_accepted = fast_constructor(RegisterAccepted)


def _check_config(
    now: float, min_expires: int, max_expires: int, default_expires: int, max_contacts: int
) -> None:
    if type(now) not in (int, float) or not math.isfinite(now):
        raise ValidationError("now", "must be a finite number of epoch seconds")
    if not 0 <= min_expires <= default_expires <= max_expires <= MAX_EXPIRES:
        raise ValidationError("expires", "need 0 <= min_expires <= default_expires <= max_expires")
    if max_contacts < 1:
        raise ValidationError("max_contacts", "must be at least 1")


def decide_register(
    state: State,
    *,
    aor: str,
    contacts: list[ContactSpec],
    star: bool,
    expires_header: int | None,
    call_id: str,
    cseq: int,
    received: str,
    transport: str = "",
    path: tuple[str, ...] = (),
    node_id: str,
    now: float,
    min_expires: int,
    max_expires: int,
    default_expires: int,
    max_contacts: int,
    branch: str = "",
) -> RegisterDecision:
    """Decide an (authenticated) REGISTER for `aor` per RFC 3261 §10.3 steps 6-7 (see the module doc).

    Raises ValidationError only for a bad configuration or `now`; anything wrong with the request is a
    typed refusal. A retransmission (same Call-ID and CSeq) is accepted with the same op_id on purpose.
    """
    _check_config(now, min_expires, max_expires, default_expires, max_contacts)
    at = float(now)
    op_id = register_op_id(aor, call_id, cseq, branch)
    if aor not in state.extensions:
        return NoSuchAor()
    if not call_id or len(call_id) > MAX_FIELD:
        return BadRegister("call_id", "missing or too long")
    if _check_cseq(cseq) is not None:
        return BadRegister("cseq", "must be between 0 and 2**31 - 1")
    current = state.bindings.get(aor, {})
    if star:
        # §10.3 step 6: `*` only alone and only with Expires: 0.
        if contacts or expires_header != 0:
            return BadRegister("contact", "Contact: * needs Expires: 0 and no other contact")
        if _out_of_order(current, list(current), call_id, cseq + 1, at):
            return OutOfOrder()
        return RegisterAccepted((BindingsCleared(aor=aor, call_id=call_id, cseq=cseq, at=at),), op_id)
    if not contacts:
        return RegisterAccepted((), op_id)
    if expires_header is not None and expires_header < 0:
        return BadRegister("expires", "must not be negative")
    updates: dict[str, ContactUpdate] = {}
    for spec in contacts:
        if _check_text(spec.uri) is not None or _check_text(spec.contact_key) is not None:
            return BadRegister("contact", "missing or too long contact")
        if _check_q(spec.q) is not None:
            return BadRegister("q", "q must be between 0 and 1")
        if spec.expires is not None and spec.expires < 0:
            return BadRegister("expires", "must not be negative")
        # §10.3 step 7: the contact's expires parameter, else the Expires header, else the default.
        expires = spec.expires if spec.expires is not None else expires_header
        expires = default_expires if expires is None else min(expires, MAX_EXPIRES)
        if 0 < expires < min_expires and expires < SHORT_INTERVAL:
            return IntervalTooBrief(min_expires)
        expires = min(expires, max_expires)  # the registrar MAY shorten the interval
        reg_id = spec.reg_id if spec.instance_id else 0
        if not 0 <= reg_id <= MAX_CSEQ:
            return BadRegister("reg_id", "must be between 0 and 2**31 - 1")
        # ContactUpdate(contact, contact_key, instance_id, reg_id, expires, q, flow), positional
        update = _make_contact_update(spec.uri, spec.contact_key, spec.instance_id, reg_id, expires, spec.q, spec.flow)
        key = update.key
        updates.pop(key, None)  # the same binding twice: the last one counts
        updates[key] = update
    # Strictly lower CSeq only: an equal one is a retransmission, left to the dedupe window.
    keys = list(updates)
    if _out_of_order(current, keys, call_id, cseq + 1, at):
        return OutOfOrder()
    added = 0
    for update in updates.values():
        if update.expires > 0:
            added += 1
    if _too_many(current, keys, added, max_contacts, at):
        return TooManyContacts(max_contacts)
    # BindingsUpdated(aor, call_id, cseq, received, transport, path, node_id, max_contacts, contacts, at)
    event = _make_bindings_updated(
        aor, call_id, cseq, received, transport, tuple(path), node_id, max_contacts, tuple(updates.values()), at
    )
    return _make_accepted((event,), op_id)


def decide_remove_binding(state: State, aor: str, key: str, now: float) -> list[Event]:
    """An operator's removal of one binding; ValidationError if there is no such binding."""
    if key not in state.bindings.get(aor, {}):
        raise ValidationError("key", "no such binding")
    return [BindingRemoved(aor=aor, key=key, at=float(now))]


def decide_clear_bindings(state: State, aor: str, now: float) -> list[Event]:
    """An operator's removal of every binding of `aor`; ValidationError if it is not an extension."""
    if aor not in state.extensions:
        raise ValidationError("extension", "no such extension")
    return [BindingsCleared(aor=aor, call_id="", cseq=0, at=float(now))]
