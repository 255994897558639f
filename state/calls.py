"""Calls: their lifecycle as events, appliers, timeout decisions, and the call-record (CDR) row model.

Theory of operation. The proxy (in `raftpbx/`, later) proposes one event per step of a call it routes;
every node applies them, so any node can show the active calls and, after a failover, the next leader
knows which calls to finish. Hot state is `State.calls` (active) plus `State.finished_calls`, a bounded
tail of the last `call_tail_limit` ended calls (oldest evicted first); the full history is projected
from the applied events into SQLite outside this layer, so memory and snapshots stay bounded.

Events (all schema v1; `at` and `node_id` stamped by the proposing node):

* `CallStarted(call_id, caller, callee, from_tag, caller_contact, branch, node_id, at)`: the INVITE
  was accepted for routing;
* `CallRinging(call_id, node_id, at)`: the first 18x came back;
* `CallAnswered(call_id, to_tag, callee_contact, session_expires_at, node_id, at)`: the first 2xx;
  `callee_contact` is the contact that answered; `session_expires_at` is the RFC 4028 session expiry
  (None without session timers);
* `CallRefreshed(call_id, session_expires_at, node_id, at)`: a session refresh (RFC 4028 §10);
* `CallEnded(call_id, cause, hangup_by, status_code, node_id, at)`: the call is over. `cause` is one of
  `CAUSES` ("bye-caller", "bye-callee", "cancel", "failure", "timeout"), `hangup_by` one of `HANGUP_BY`
  ("caller", "callee", "system"), `status_code` the final response to the INVITE (200 if answered, the
  failure code, 487 after a CANCEL, 408 for an unanswered timeout).

Apply rules (transitions only move forward; anything else is `Rejected` and changes nothing):

* an event for a call that is neither active nor in the tail -> `Rejected("call_id", "no such call")`;
  `CallStarted` for a call id already active or in the tail -> `Rejected("call_id", "already exists")`;
* any event for a call in the tail (ended) -> `Rejected("call_id", "already ended")`: a BYE handled by
  two nodes around a failover cannot end a call twice, and an answer that loses the race with a CANCEL
  is refused (the SIP side still relays it; the caller then hangs up);
* `CallRinging` after ringing or answer -> `Rejected("state", "already ringing" / "already answered")`;
  a second `CallAnswered` (another forked branch) -> `Rejected("state", "already answered")`;
* `CallRefreshed` before the answer -> `Rejected("state", "not answered")`;
* `CallEnded` with cause "cancel" after the answer -> `Rejected("cause", "already answered")` (a CANCEL
  has no effect once a 2xx was sent, RFC 3261 §9.2); cause "bye-caller" needs hangup_by "caller",
  "bye-callee" needs "callee", "timeout" needs "system".

Disposition of a call record (`cdr_row`, first matching row wins; the table is `disposition`):

    | condition                                            | disposition |
    |------------------------------------------------------|-------------|
    | not ended                                            | None        |
    | answered (answered_at set)                           | answered    |
    | cause "cancel", or "bye-caller" before an answer     | cancelled   |
    | cause "timeout" (ring timeout / Timer C)             | no-answer   |
    | status 486 Busy Here, 600 Busy Everywhere, 603       | busy        |
    | status 408, 480, 487 (terminated by the proxy)       | no-answer   |
    | anything else (404, 403, 5xx, ...)                   | failed      |

603 Decline counts as busy (the user refused the call, as Asterisk maps it), a deliberate extension
of "busy = 486/600". `billable_seconds` is the answered time (to the millisecond) rounded up to whole
seconds (0 if never answered); `duration` is `ended_at - started_at`.

Performance: every applier is O(1) (dict operations; the tail evicts one record at most).
`decide_call_timeouts` scans the active calls (O(active calls)), which the leader runs once a second.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from .apply import applies
from .errors import CodecError, ValidationError
from .events import Event, register_event, upcaster
from .model import Call, State, fast_constructor
from .outcomes import Applied, Rejected
from .trunks import check_name

CAUSES = ("bye-caller", "bye-callee", "cancel", "failure", "timeout")
HANGUP_BY = ("caller", "callee", "system")
DISPOSITIONS = ("answered", "busy", "no-answer", "cancelled", "failed")
BUSY_CODES = frozenset({486, 600, 603})
NO_ANSWER_CODES = frozenset({408, 480, 487})
MAX_FIELD = 2048

_REQUIRED_HANGUP = {"bye-caller": "caller", "bye-callee": "callee", "timeout": "system"}
# Call(*every field) without the frozen __init__'s per-field object.__setattr__ (model.fast_constructor): every
# call event builds one on every node. Field order: the dataclass's.
_make_call = fast_constructor(Call)


# --- events ----------------------------------------------------------------------------------------------


@register_event
@dataclass(frozen=True, slots=True)
class CallStarted(Event):
    """An INVITE from `caller` to `callee` was accepted for routing by `node_id`.

    v2 added `trunk` and `direction` (issue 9): the trunk the call crosses and which way ("inbound" from
    the trunk's peer, "outbound" through a route); both "" for a call between local extensions, which is
    what v1 entries are upcast to.
    """

    schema_version: ClassVar[int] = 2

    call_id: str
    caller: str
    callee: str
    from_tag: str
    caller_contact: str
    branch: str
    node_id: str
    at: float
    trunk: str = ""
    direction: str = ""


@upcaster("CallStarted", 1)
def _call_started_v1_to_v2(fields: dict[str, Any]) -> dict[str, Any]:
    if "trunk" in fields or "direction" in fields:
        raise CodecError("CallStarted v1 has no trunk or direction field")
    return {**fields, "trunk": "", "direction": ""}


@register_event
@dataclass(frozen=True, slots=True)
class CallRinging(Event):
    """The callee's side is ringing (first 18x)."""

    call_id: str
    node_id: str
    at: float


@register_event
@dataclass(frozen=True, slots=True)
class CallAnswered(Event):
    """The call was answered (first 2xx) by `callee_contact`; RFC 4028 session expiry if negotiated."""

    call_id: str
    to_tag: str
    callee_contact: str
    session_expires_at: float | None
    node_id: str
    at: float


@register_event
@dataclass(frozen=True, slots=True)
class CallRefreshed(Event):
    """The session was refreshed (RFC 4028 §10): it now expires at `session_expires_at`."""

    call_id: str
    session_expires_at: float
    node_id: str
    at: float


@register_event
@dataclass(frozen=True, slots=True)
class CallEnded(Event):
    """The call is over: `cause` in `CAUSES`, `hangup_by` in `HANGUP_BY`, final INVITE status."""

    call_id: str
    cause: str
    hangup_by: str
    status_code: int
    node_id: str
    at: float


# --- apply -----------------------------------------------------------------------------------------------


def _text(value: str, *, empty_ok: bool = False) -> str | None:
    if not value and not empty_ok:
        return "must not be empty"
    if len(value) > MAX_FIELD:
        return f"too long: at most {MAX_FIELD} characters"
    return None


def _with_node(nodes: tuple[str, ...], node_id: str) -> tuple[str, ...]:
    if not node_id or node_id in nodes:
        return nodes
    return tuple(sorted((*nodes, node_id)))


def _active(state: State, call_id: str) -> Call | Rejected:
    call = state.calls.get(call_id)
    if call is not None:
        return call
    if call_id in state.finished_calls:
        return Rejected("call_id", "already ended")
    return Rejected("call_id", "no such call")


@applies(CallStarted)
def _call_started(state: State, event: CallStarted) -> Applied | Rejected:
    for field, message in (
        ("call_id", _text(event.call_id)),
        ("caller", _text(event.caller)),
        ("callee", _text(event.callee)),
        ("from_tag", _text(event.from_tag, empty_ok=True)),
        ("caller_contact", _text(event.caller_contact, empty_ok=True)),
        ("branch", _text(event.branch, empty_ok=True)),
        ("node_id", _text(event.node_id, empty_ok=True)),
    ):
        if message is not None:
            return Rejected(field, message)
    if event.direction not in ("", "inbound", "outbound"):
        return Rejected("direction", "must be inbound, outbound or empty (a local call)")
    if (event.trunk == "") != (event.direction == ""):
        return Rejected("trunk", "a call crossing a trunk names it and its direction; a local call neither")
    if event.trunk and check_name(event.trunk) is not None:
        return Rejected("trunk", "malformed trunk name")
    if event.call_id in state.calls or event.call_id in state.finished_calls:
        return Rejected("call_id", "already exists")
    state.calls[event.call_id] = _make_call(
        event.call_id, event.caller, event.callee, event.from_tag, event.caller_contact, event.branch,
        event.at,  # started_at
        None, None, "", "", None, None,  # ringing_at, answered_at, to_tag, callee_contact, session expiry, ended_at
        "", "", 0,  # cause, hangup_by, status_code
        _with_node((), event.node_id), event.trunk, event.direction,
    )
    return Applied({"call_id": event.call_id})


@applies(CallRinging)
def _call_ringing(state: State, event: CallRinging) -> Applied | Rejected:
    call = _active(state, event.call_id)
    if isinstance(call, Rejected):
        return call
    if call.answered_at is not None:
        return Rejected("state", "already answered")
    if call.ringing_at is not None:
        return Rejected("state", "already ringing")
    c = call
    state.calls[c.call_id] = _make_call(
        c.call_id, c.caller, c.callee, c.from_tag, c.caller_contact, c.branch, c.started_at,
        event.at, c.answered_at, c.to_tag, c.callee_contact, c.session_expires_at, c.ended_at,
        c.cause, c.hangup_by, c.status_code, _with_node(c.nodes, event.node_id), c.trunk, c.direction,
    )  # dataclasses.replace(call, ringing_at=..., nodes=...), a third of the cost
    return Applied({"call_id": call.call_id})


@applies(CallAnswered)
def _call_answered(state: State, event: CallAnswered) -> Applied | Rejected:
    call = _active(state, event.call_id)
    if isinstance(call, Rejected):
        return call
    if call.answered_at is not None:
        return Rejected("state", "already answered")
    for field, message in (
        ("to_tag", _text(event.to_tag, empty_ok=True)),
        ("callee_contact", _text(event.callee_contact, empty_ok=True)),
    ):
        if message is not None:
            return Rejected(field, message)
    c = call
    state.calls[c.call_id] = _make_call(
        c.call_id, c.caller, c.callee, c.from_tag, c.caller_contact, c.branch, c.started_at,
        c.ringing_at, event.at, event.to_tag, event.callee_contact, event.session_expires_at, c.ended_at,
        c.cause, c.hangup_by, c.status_code, _with_node(c.nodes, event.node_id), c.trunk, c.direction,
    )
    return Applied({"call_id": call.call_id})


@applies(CallRefreshed)
def _call_refreshed(state: State, event: CallRefreshed) -> Applied | Rejected:
    call = _active(state, event.call_id)
    if isinstance(call, Rejected):
        return call
    if call.answered_at is None:
        return Rejected("state", "not answered")
    c = call
    state.calls[c.call_id] = _make_call(
        c.call_id, c.caller, c.callee, c.from_tag, c.caller_contact, c.branch, c.started_at,
        c.ringing_at, c.answered_at, c.to_tag, c.callee_contact, event.session_expires_at, c.ended_at,
        c.cause, c.hangup_by, c.status_code, _with_node(c.nodes, event.node_id), c.trunk, c.direction,
    )
    return Applied({"call_id": call.call_id})


@applies(CallEnded)
def _call_ended(state: State, event: CallEnded) -> Applied | Rejected:
    call = _active(state, event.call_id)
    if isinstance(call, Rejected):
        return call
    if event.cause not in CAUSES:
        return Rejected("cause", "unknown cause")
    if event.hangup_by not in HANGUP_BY:
        return Rejected("hangup_by", "must be caller, callee or system")
    required = _REQUIRED_HANGUP.get(event.cause)
    if required is not None and event.hangup_by != required:
        return Rejected("hangup_by", f"cause {event.cause} needs hangup_by {required}")
    if not (event.status_code == 0 or 100 <= event.status_code <= 699):
        return Rejected("status_code", "must be 0 or a SIP status code")
    if event.cause == "cancel" and call.answered_at is not None:
        return Rejected("cause", "already answered")  # RFC 3261 §9.2: CANCEL has no effect after a 2xx
    c = call
    ended = _make_call(
        c.call_id, c.caller, c.callee, c.from_tag, c.caller_contact, c.branch, c.started_at,
        c.ringing_at, c.answered_at, c.to_tag, c.callee_contact, c.session_expires_at, event.at,
        event.cause, event.hangup_by, event.status_code, _with_node(c.nodes, event.node_id), c.trunk, c.direction,
    )
    del state.calls[call.call_id]
    tail = state.finished_calls
    tail[call.call_id] = ended
    while len(tail) > state.call_tail_limit:
        tail.popitem(last=False)
    return Applied({"call_id": call.call_id, "disposition": disposition(ended)})


# --- call records ----------------------------------------------------------------------------------------


def disposition(call: Call) -> str | None:
    """The call record's disposition (module table); None while the call is active."""
    if call.ended_at is None:
        return None
    if call.answered_at is not None:
        return "answered"
    if call.cause == "cancel" or call.cause == "bye-caller":
        return "cancelled"
    if call.cause == "timeout":
        return "no-answer"
    if call.status_code in BUSY_CODES:
        return "busy"
    if call.status_code in NO_ANSWER_CODES:
        return "no-answer"
    return "failed"


def cdr_row(call: Call) -> dict[str, Any]:
    """The call record of `call` as a flat JSON-ready row (times are epoch floats or None)."""
    duration = None if call.ended_at is None else call.ended_at - call.started_at
    billable = 0
    if call.ended_at is not None and call.answered_at is not None:
        # Round to the millisecond first: epoch floats near 1.7e9 carry ~1e-7 s of noise, which must
        # not bill an extra second for a call of exactly 60 s.
        billable = max(0, math.ceil(round(call.ended_at - call.answered_at, 3)))
    return {
        "call_id": call.call_id,
        "caller": call.caller,
        "callee": call.callee,
        "started_at": call.started_at,
        "answered_at": call.answered_at,
        "ended_at": call.ended_at,
        "duration": duration,
        "billable_seconds": billable,
        "disposition": disposition(call),
        "cause": call.cause or None,
        "hangup_by": call.hangup_by or None,
        "status_code": call.status_code or None,
        "nodes_involved": list(call.nodes),
    }


# --- decisions -------------------------------------------------------------------------------------------


def call_op_id(call_id: str, step: str, extra: str = "") -> str:
    """A deterministic op_id for one step of a call ("started", "ringing", "answered", "ended", ...).

    Two nodes proposing the same step of the same call (e.g. both saw the BYE around a failover) use the
    same op_id, so the dedupe window answers the second with the first outcome. Use the step "ended" for
    every `CallEnded` whatever its cause, so that a BYE racing a timeout dedupes too (and `apply` refuses
    a second end anyway). `extra` distinguishes repeatable steps (a refresh: its new expiry).
    """
    if _PLAIN.match(call_id) and _PLAIN.match(step) and _PLAIN.match(extra):
        text = f'["{call_id}","{step}","{extra}"]'  # what json.dumps writes for these, at a tenth of the cost
    else:
        text = json.dumps([call_id, step, extra], ensure_ascii=True, separators=(",", ":"))
    return f"call-{hashlib.sha256(text.encode()).hexdigest()[:40]}"


_PLAIN = re.compile(r"[ !#-\[\]-~]*\Z")  # printable ASCII but '"' and '\': json.dumps copies them as they are


def decide_call_timeouts(
    state: State, now: float, max_duration: float, ring_timeout: float, *, node_id: str = ""
) -> list[Event]:
    """`CallEnded(cause="timeout", hangup_by="system")` for every active call that is overdue at `now`.

    Overdue: answered at least `max_duration` ago; or answered with an RFC 4028 session expiry at or
    before `now` (the endpoints stopped refreshing); or unanswered `ring_timeout` after it started
    (Timer C / no answer). Status code 200 if answered, else 408. Calls are taken in start order.
    """
    if type(now) not in (int, float) or not math.isfinite(now):
        raise ValidationError("now", "must be a finite number of epoch seconds")
    if not max_duration > 0 or not ring_timeout > 0:
        raise ValidationError("timeout", "max_duration and ring_timeout must be positive")
    at = float(now)
    events: list[Event] = []
    for call in state.calls.values():
        if call.answered_at is not None:
            overdue = at - call.answered_at >= max_duration or (
                call.session_expires_at is not None and call.session_expires_at <= at
            )
        else:
            overdue = at - call.started_at >= ring_timeout
        if overdue:
            status = 200 if call.answered_at is not None else 408
            events.append(CallEnded(call.call_id, "timeout", "system", status, node_id, at))
    return events


def next_call_timeout(state: State, max_duration: float, ring_timeout: float) -> float | None:
    """When `decide_call_timeouts` would next find an overdue call (O(active calls)), or None."""
    due: float | None = None
    for call in state.calls.values():
        if call.answered_at is not None:
            when = call.answered_at + max_duration
            if call.session_expires_at is not None:
                when = min(when, call.session_expires_at)
        else:
            when = call.started_at + ring_timeout
        due = when if due is None else min(due, when)
    return due


def active_calls(state: State) -> list[Call]:
    """The active calls in start order."""
    return list(state.calls.values())


def recent_calls(state: State) -> list[Call]:
    """The tail of ended calls, oldest first."""
    return list(state.finished_calls.values())
