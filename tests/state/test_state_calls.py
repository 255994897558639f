"""Calls: forward-only lifecycle at apply time, the bounded tail, CDR rows and dispositions, timeouts."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import fields
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from raftpbx.state import (
    CAUSES,
    DISPOSITIONS,
    HANGUP_BY,
    Applied,
    Call,
    CallAnswered,
    CallEnded,
    CallRefreshed,
    CallRinging,
    CallStarted,
    CodecError,
    Command,
    Duplicate,
    Event,
    Rejected,
    State,
    ValidationError,
    active_calls,
    apply,
    apply_entry,
    call_op_id,
    cdr_row,
    decide_call_timeouts,
    disposition,
    encode_batch,
    next_call_timeout,
    recent_calls,
    restore,
    snapshot,
)

T0 = 1_700_000_000.0
CID = "a84b4c76e66710@127.0.0.1"


def started(call_id: str = CID, at: float = T0, node: str = "n2") -> CallStarted:
    return CallStarted(call_id, "100", "101", "tag-a", "sip:100@127.0.0.1:5062", "z9hG4bK-in", node, at)


def answered(
    call_id: str = CID, at: float = T0 + 5, node: str = "n3", expires: float | None = None
) -> CallAnswered:
    return CallAnswered(call_id, "tag-b", "sip:101@127.0.0.2:5064", expires, node, at)


def ended(
    cause: str = "bye-caller", hangup_by: str = "caller", status: int = 200, at: float = T0 + 65.2, **kw: Any
) -> CallEnded:
    return CallEnded(kw.get("call_id", CID), cause, hangup_by, status, kw.get("node", "n1"), at)


def run(state: State, *events: Event) -> list[Any]:
    return [apply(state, event) for event in events]


def answered_call() -> State:
    state = State()
    assert all(o.ok for o in run(state, started(), CallRinging(CID, "n2", T0 + 1), answered()))
    return state


# --- lifecycle -------------------------------------------------------------------------------------------


def test_lifecycle_started_ringing_answered_ended_moves_the_call_to_the_tail() -> None:
    state = State()
    assert apply(state, started()) == Applied({"call_id": CID})
    (call,) = active_calls(state)
    assert (call.started_at, call.ringing_at, call.answered_at, call.ended_at, call.nodes) == (
        T0,
        None,
        None,
        None,
        ("n2",),
    )
    assert apply(state, CallRinging(CID, "n2", T0 + 1)).ok
    assert apply(state, answered()).ok
    call = state.calls[CID]
    assert (call.ringing_at, call.answered_at, call.to_tag, call.callee_contact) == (
        T0 + 1,
        T0 + 5,
        "tag-b",
        "sip:101@127.0.0.2:5064",
    )
    assert apply(state, ended()) == Applied({"call_id": CID, "disposition": "answered"})
    assert active_calls(state) == [] and CID not in state.calls
    (record,) = recent_calls(state)
    assert (record.ended_at, record.cause, record.hangup_by, record.status_code, record.nodes) == (
        T0 + 65.2,
        "bye-caller",
        "caller",
        200,
        ("n1", "n2", "n3"),
    )


def test_events_for_unknown_calls_are_rejected() -> None:
    state = State()
    for event in (CallRinging(CID, "n1", T0), answered(), CallRefreshed(CID, T0 + 99, "n1", T0), ended()):
        assert apply(state, event) == Rejected("call_id", "no such call")
    assert state == State()


def test_ringing_after_answer_or_twice_is_refused_with_a_reason() -> None:
    state = answered_call()
    before = snapshot(state)
    assert apply(state, CallRinging(CID, "n1", T0 + 6)) == Rejected("state", "already answered")
    state2 = State()
    run(state2, started(), CallRinging(CID, "n2", T0 + 1))
    assert apply(state2, CallRinging(CID, "n1", T0 + 2)) == Rejected("state", "already ringing")
    assert snapshot(state) == before


def test_a_second_answer_from_another_fork_branch_is_refused() -> None:
    state = answered_call()
    before = snapshot(state)
    other = CallAnswered(CID, "tag-c", "sip:101@127.0.0.3:5064", None, "n1", T0 + 5.1)
    assert apply(state, other) == Rejected("state", "already answered")
    assert snapshot(state) == before and state.calls[CID].to_tag == "tag-b"


def test_a_call_cannot_end_twice_even_when_two_nodes_handle_the_bye() -> None:
    state = answered_call()
    assert apply(state, ended(node="n1")).ok
    before = snapshot(state)
    assert apply(state, ended("bye-callee", "callee", node="n2", at=T0 + 66)) == Rejected(
        "call_id", "already ended"
    )
    assert snapshot(state) == before
    assert recent_calls(state)[0].nodes == ("n1", "n2", "n3")


def test_the_same_bye_proposed_by_two_nodes_dedupes_through_call_op_id() -> None:
    state = answered_call()
    op_id = call_op_id(CID, "ended")
    assert op_id == call_op_id(CID, "ended") != call_op_id(CID, "answered")
    assert call_op_id(CID, "refreshed", "1") != call_op_id(CID, "refreshed", "2")
    (first,) = apply_entry(state, encode_batch([Command(op_id, ended(node="n1"))]), 1)
    (second,) = apply_entry(state, encode_batch([Command(op_id, ended(node="n2", at=T0 + 70))]), 2)
    assert first.ok and second == Duplicate(first)  # type: ignore[arg-type]
    assert recent_calls(state)[0].ended_at == T0 + 65.2


@pytest.mark.parametrize(
    "event",
    [
        CallRinging(CID, "n1", T0 + 70),
        answered(at=T0 + 70),
        CallRefreshed(CID, T0 + 999, "n1", T0 + 70),
        ended(at=T0 + 70),
    ],
    ids=lambda e: type(e).__name__,
)
def test_any_event_after_the_end_is_refused(event: Event) -> None:
    state = State()
    run(state, started(), ended("cancel", "caller", 487, at=T0 + 3))
    before = snapshot(state)
    assert apply(state, event) == Rejected("call_id", "already ended")
    assert snapshot(state) == before


def test_an_answer_that_lost_the_race_with_a_cancel_is_refused_and_a_cancel_after_answer_too() -> None:
    state = State()
    run(state, started(), ended("cancel", "caller", 487, at=T0 + 3))
    assert apply(state, answered(at=T0 + 3.01)) == Rejected("call_id", "already ended")
    # RFC 3261 §9.2: a CANCEL has no effect once the call was answered.
    state = answered_call()
    assert apply(state, ended("cancel", "caller", 487)) == Rejected("cause", "already answered")
    assert CID in state.calls


def test_call_started_twice_is_refused() -> None:
    state = State()
    assert apply(state, started()).ok
    assert apply(state, started(node="n3")) == Rejected("call_id", "already exists")
    assert state.calls[CID].nodes == ("n2",)
    run(state, ended("cancel", "caller", 487))
    assert apply(state, started()) == Rejected("call_id", "already exists")  # still in the tail


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (ended("hangup", "caller"), "cause"),
        (ended("bye-caller", "nobody"), "hangup_by"),
        (ended("bye-caller", "callee"), "hangup_by"),
        (ended("bye-callee", "caller"), "hangup_by"),
        (ended("timeout", "caller"), "hangup_by"),
        (ended("failure", "callee", 99), "status_code"),
        (ended("failure", "callee", 700), "status_code"),
        (CallStarted("", "100", "101", "", "", "", "n1", T0), "call_id"),
        (CallStarted("x", "", "101", "", "", "", "n1", T0), "caller"),
        (CallStarted("x", "100", "", "", "", "", "n1", T0), "callee"),
        (CallStarted("x", "100", "101", "t" * 3000, "", "", "n1", T0), "from_tag"),
    ],
)
def test_malformed_call_events_are_rejected_and_change_nothing(event: Event, field: str) -> None:
    state = answered_call()
    before = snapshot(state)
    outcome = apply(state, event)
    assert isinstance(outcome, Rejected) and outcome.field == field
    assert snapshot(state) == before


def test_causes_and_hangup_parties_are_the_documented_sets() -> None:
    assert CAUSES == ("bye-caller", "bye-callee", "cancel", "failure", "timeout")
    assert HANGUP_BY == ("caller", "callee", "system")
    assert DISPOSITIONS == ("answered", "busy", "no-answer", "cancelled", "failed")


# --- RFC 4028 session timers -----------------------------------------------------------------------------


def test_rfc4028_session_refresh_moves_the_expiry_and_needs_an_answered_call() -> None:
    state = State()
    run(state, started())
    assert apply(state, CallRefreshed(CID, T0 + 1800, "n1", T0 + 1)) == Rejected("state", "not answered")
    run(state, answered(expires=T0 + 5 + 1800))
    assert state.calls[CID].session_expires_at == T0 + 1805
    assert apply(state, CallRefreshed(CID, T0 + 905 + 1800, "n2", T0 + 905)).ok
    assert state.calls[CID].session_expires_at == T0 + 2705
    assert state.calls[CID].nodes == ("n2", "n3")


# --- the bounded tail ------------------------------------------------------------------------------------


def test_the_tail_keeps_the_last_finished_calls_oldest_evicted_first() -> None:
    state = State(call_tail_limit=3)
    for i in range(5):
        run(
            state, started(f"c{i}", at=T0 + i), ended("cancel", "caller", 487, call_id=f"c{i}", at=T0 + i + 1)
        )
    assert [c.call_id for c in recent_calls(state)] == ["c2", "c3", "c4"]
    assert state.calls == {}
    # An evicted call is unknown again: its late events are "no such call" (SQLite keeps its record).
    assert apply(state, ended(call_id="c0")) == Rejected("call_id", "no such call")
    assert State().call_tail_limit == 1000


# --- call records ----------------------------------------------------------------------------------------


def test_cdr_row_of_an_answered_call() -> None:
    state = answered_call()
    run(state, ended(at=T0 + 65.2))
    row = cdr_row(recent_calls(state)[0])
    assert row == {
        "call_id": CID,
        "caller": "100",
        "callee": "101",
        "started_at": T0,
        "answered_at": T0 + 5,
        "ended_at": T0 + 65.2,
        "duration": pytest.approx(65.2),
        "billable_seconds": 61,  # 60.2 s answered, rounded up
        "disposition": "answered",
        "cause": "bye-caller",
        "hangup_by": "caller",
        "status_code": 200,
        "nodes_involved": ["n1", "n2", "n3"],
    }


def test_cdr_row_of_an_active_call_has_no_end_and_no_disposition() -> None:
    state = answered_call()
    row = cdr_row(state.calls[CID])
    assert (row["ended_at"], row["duration"], row["billable_seconds"], row["disposition"]) == (
        None,
        None,
        0,
        None,
    )
    assert (row["cause"], row["hangup_by"], row["status_code"]) == (None, None, None)


def test_billable_seconds_round_up_and_are_exact_on_whole_seconds() -> None:
    for talk, billable in ((0.0, 0), (0.001, 1), (1.0, 1), (59.999, 60), (60.0, 60)):
        state = answered_call()
        run(state, ended(at=T0 + 5 + talk))
        assert cdr_row(recent_calls(state)[0])["billable_seconds"] == billable
    # One ulp of an epoch float (2**-22 s near 1.7e9) over 60 s is noise, not a 61st second.
    state = State()
    run(state, started(), answered(at=T0 + 5), ended(at=T0 + 65 + 2**-22))
    assert (T0 + 65 + 2**-22) - (T0 + 5) > 60.0
    assert cdr_row(recent_calls(state)[0])["billable_seconds"] == 60


DISPOSITION_TABLE = [
    # (answered?, cause, hangup_by, status) -> disposition
    (True, "bye-caller", "caller", 200, "answered"),
    (True, "bye-callee", "callee", 200, "answered"),
    (True, "timeout", "system", 200, "answered"),
    (False, "cancel", "caller", 487, "cancelled"),
    (False, "bye-caller", "caller", 0, "cancelled"),
    (False, "timeout", "system", 408, "no-answer"),
    (False, "timeout", "system", 487, "no-answer"),
    (False, "failure", "callee", 486, "busy"),
    (False, "failure", "callee", 600, "busy"),
    (False, "failure", "callee", 603, "busy"),
    (False, "failure", "system", 408, "no-answer"),
    (False, "failure", "system", 480, "no-answer"),
    (False, "failure", "callee", 487, "no-answer"),
    (False, "failure", "system", 404, "failed"),
    (False, "failure", "callee", 403, "failed"),
    (False, "failure", "callee", 503, "failed"),
    (False, "failure", "system", 0, "failed"),
    (False, "bye-callee", "callee", 0, "failed"),
]


@pytest.mark.parametrize(("was_answered", "cause", "hangup_by", "status", "expected"), DISPOSITION_TABLE)
def test_disposition_table(
    was_answered: bool, cause: str, hangup_by: str, status: int, expected: str
) -> None:
    state = State()
    run(state, started())
    if was_answered:
        run(state, answered())
    (outcome,) = run(state, ended(cause, hangup_by, status))
    assert outcome == Applied({"call_id": CID, "disposition": expected})
    (call,) = recent_calls(state)
    assert disposition(call) == cdr_row(call)["disposition"] == expected
    assert expected in DISPOSITIONS
    if not was_answered:
        assert cdr_row(call)["billable_seconds"] == 0 and cdr_row(call)["answered_at"] is None


# --- timeouts --------------------------------------------------------------------------------------------


def _timeouts(state: State, now: float) -> list[Event]:
    return decide_call_timeouts(state, now, max_duration=3600, ring_timeout=60, node_id="n1")


def test_unanswered_call_times_out_after_ring_timeout_with_408() -> None:
    state = State()
    run(state, started(), CallRinging(CID, "n2", T0 + 1))
    assert next_call_timeout(state, 3600, 60) == T0 + 60
    assert _timeouts(state, T0 + 59.9) == []
    assert _timeouts(state, T0 + 60) == [CallEnded(CID, "timeout", "system", 408, "n1", T0 + 60)]
    run(state, *_timeouts(state, T0 + 60))
    assert disposition(recent_calls(state)[0]) == "no-answer"
    assert _timeouts(state, T0 + 999) == [] and next_call_timeout(state, 3600, 60) is None


def test_answered_call_times_out_after_max_duration() -> None:
    state = answered_call()
    assert next_call_timeout(state, 3600, 60) == T0 + 5 + 3600
    assert _timeouts(state, T0 + 3604) == []
    (event,) = _timeouts(state, T0 + 3605)
    assert event == CallEnded(CID, "timeout", "system", 200, "n1", T0 + 3605)
    run(state, event)
    row = cdr_row(recent_calls(state)[0])
    assert (row["disposition"], row["hangup_by"], row["billable_seconds"]) == ("answered", "system", 3600)


def test_rfc4028_call_whose_session_expired_times_out_and_a_refresh_postpones_it() -> None:
    state = State()
    run(state, started(), answered(expires=T0 + 95))
    assert next_call_timeout(state, 3600, 60) == T0 + 95
    assert _timeouts(state, T0 + 94) == []
    run(state, CallRefreshed(CID, T0 + 185, "n2", T0 + 50))
    assert _timeouts(state, T0 + 95) == [] and next_call_timeout(state, 3600, 60) == T0 + 185
    assert [e.cause for e in _timeouts(state, T0 + 185)] == ["timeout"]  # type: ignore[attr-defined]


def test_timeouts_are_in_start_order_and_leave_healthy_calls_alone() -> None:
    state = State()
    run(state, started("a", at=T0), started("b", at=T0 + 10), started("c", at=T0 + 50))
    run(state, answered("b", at=T0 + 12))
    assert [e.call_id for e in _timeouts(state, T0 + 70)] == ["a"]  # type: ignore[attr-defined]
    assert [e.call_id for e in _timeouts(state, T0 + 110)] == ["a", "c"]  # type: ignore[attr-defined]
    assert [e.call_id for e in _timeouts(state, T0 + 3612)] == ["a", "b", "c"]  # type: ignore[attr-defined]


def test_timeout_decision_refuses_bad_arguments() -> None:
    with pytest.raises(ValidationError):
        decide_call_timeouts(State(), float("inf"), 3600, 60)
    with pytest.raises(ValidationError):
        decide_call_timeouts(State(), T0, 0, 60)


# --- snapshots -------------------------------------------------------------------------------------------


def _state_with_calls() -> State:
    state = State(call_tail_limit=4)
    run(
        state, started("a"), started("b", at=T0 + 1), answered("b", expires=T0 + 900), started("c", at=T0 + 2)
    )
    run(state, ended("cancel", "caller", 487, call_id="a", at=T0 + 3))
    run(state, started("d", at=T0 + 4), ended("failure", "callee", 486, call_id="d", at=T0 + 5))
    return state


def test_snapshot_round_trip_keeps_active_calls_the_tail_and_their_orders() -> None:
    state = _state_with_calls()
    blob = snapshot(state)
    restored = restore(blob)
    assert restored == state and snapshot(restored) == blob
    assert list(restored.calls) == ["b", "c"] and list(restored.finished_calls) == ["a", "d"]
    assert restored.call_tail_limit == 4
    assert apply(restored, ended(call_id="b")).ok and apply(state, ended(call_id="b")).ok
    assert snapshot(restored) == snapshot(state)


def _call_field(name: str) -> int:
    return [f.name for f in fields(Call)].index(name)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.update(calls={}),
        lambda m: m.update(call_tail_limit=0),
        lambda m: m.update(call_tail_limit=1),  # the tail holds 2
        lambda m: m["calls"][0].__setitem__(_call_field("ended_at"), 5.0),  # active but ended
        lambda m: m["finished_calls"][0].__setitem__(_call_field("ended_at"), None),  # finished, not ended
        lambda m: m["calls"][0].__setitem__(_call_field("call_id"), ""),
        lambda m: m["calls"][0].__setitem__(_call_field("nodes"), ["n3", "n2"]),
        lambda m: m["calls"][0].__setitem__(_call_field("nodes"), ["n2", "n2"]),
        lambda m: m["calls"][0].__setitem__(_call_field("status_code"), "200"),
        lambda m: m["calls"][0].pop(),
        lambda m: m["calls"].append(list(m["calls"][0])),
        lambda m: m["calls"].append([*m["finished_calls"][0][:12], None, *m["finished_calls"][0][13:]]),
        lambda m: m.pop("finished_calls"),
    ],
)
def test_malformed_call_sections_are_refused(mutate: Any) -> None:
    obj = msgpack.unpackb(snapshot(_state_with_calls()))
    restore(msgpack.packb(obj, use_bin_type=True))
    mutate(obj)
    with pytest.raises(CodecError):
        restore(msgpack.packb(obj, use_bin_type=True))


# -- fast paths (issue 8): the same values as the general paths ------------------------------------------


@given(st.text(max_size=40), st.sampled_from(["started", "ringing", "answered", "ended", "refreshed"]),
       st.text(max_size=20))
def test_call_op_id_is_sha256_of_the_json_triple_whatever_the_text(call_id: str, step: str, extra: str) -> None:
    """The op_id is a replicated fact (two nodes, two versions must agree): the plain-text fast path gives
    exactly the digest of json.dumps([call_id, step, extra]) as before, quotes, backslashes, controls and
    non-ASCII included (they take the json path)."""
    text = json.dumps([call_id, step, extra], ensure_ascii=True, separators=(",", ":"))
    assert call_op_id(call_id, step, extra) == f"call-{hashlib.sha256(text.encode()).hexdigest()[:40]}"
    assert call_op_id(CID, "ended") == "call-" + hashlib.sha256(
        f'["{CID}","ended",""]'.encode()).hexdigest()[:40]


@given(st.lists(st.sampled_from(["ring", "answer", "refresh", "end"]), max_size=6),
       st.text(min_size=1, max_size=12), st.sampled_from(["", "n1", "n2", "n3"]))
def test_appliers_build_the_same_call_as_dataclasses_replace(steps: list[str], call_id: str, node: str) -> None:
    """The appliers build each new `Call` positionally (model.fast_constructor); the result equals, field
    for field, what `dataclasses.replace` of the previous value gives (and stays frozen)."""
    state = State()
    run(state, started(call_id, node=node))
    expected = state.calls[call_id]
    for i, step in enumerate(steps):
        at = T0 + 1 + i
        before = state.calls.get(call_id)
        if step == "ring":
            event: Event = CallRinging(call_id, node, at)
        elif step == "answer":
            event = CallAnswered(call_id, "tag", "sip:x@127.0.0.1", at + 90, node, at)
        elif step == "refresh":
            event = CallRefreshed(call_id, at + 120, node, at)
        else:
            event = CallEnded(call_id, "bye-caller", "caller", 200, node, at)
        outcome = run(state, event)[0]
        if before is None or not isinstance(outcome, Applied):
            continue
        nodes = tuple(sorted({*before.nodes, node} - {""}))
        changes: dict[str, Any] = {"nodes": nodes}
        if step == "ring":
            changes["ringing_at"] = at
        elif step == "answer":
            changes.update(answered_at=at, to_tag="tag", callee_contact="sip:x@127.0.0.1", session_expires_at=at + 90)
        elif step == "refresh":
            changes["session_expires_at"] = at + 120
        else:
            changes.update(ended_at=at, cause="bye-caller", hangup_by="caller", status_code=200)
        expected = dataclasses.replace(before, **changes)
        after = state.calls.get(call_id) or state.finished_calls[call_id]
        assert after == expected and type(after) is Call
        assert [getattr(after, f.name) for f in fields(Call)] == [getattr(expected, f.name) for f in fields(Call)]
        with pytest.raises(dataclasses.FrozenInstanceError):
            after.cause = "x"  # type: ignore[misc]
    assert expected is not None
