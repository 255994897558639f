"""Registrations: RFC 3261 §10.3 rules in decide_register and at apply time, expiry, op_id dedupe."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import fields, replace
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from raftpbx.state import (
    SNAPSHOT_FORMAT,
    BadRegister,
    Binding,
    BindingRemoved,
    BindingsCleared,
    BindingsExpired,
    BindingsUpdated,
    CallEnded,
    CallStarted,
    CodecError,
    Command,
    ContactSpec,
    ContactUpdate,
    Duplicate,
    Event,
    ExtensionCreated,
    ExtensionDeleted,
    IntervalTooBrief,
    NoSuchAor,
    OutOfOrder,
    RegisterAccepted,
    RegisterDecision,
    Rejected,
    State,
    TooManyContacts,
    ValidationError,
    apply,
    apply_entry,
    binding_key,
    current_bindings,
    decide_clear_bindings,
    decide_expire,
    decide_register,
    decide_remove_binding,
    encode_batch,
    expiry_op_id,
    next_expiry,
    refusal_for,
    register_op_id,
    restore,
    snapshot,
)
from snapshot_formats import as_format_4
from state_strategies import pbx_batches

MD5 = hashlib.md5(b"100:pbx.test:pw").hexdigest()
SHA = hashlib.sha256(b"100:pbx.test:pw").hexdigest()
T0 = 1_700_000_000.0
PHONE = "sip:100@127.0.0.1:5062"
PHONE2 = "sip:100@127.0.0.2:5062"
PHONE3 = "sip:100@127.0.0.3:5062"
UUID = "<urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6>"


def pbx(*numbers: str) -> State:
    state = State()
    for number in numbers or ("100", "101"):
        assert apply(state, ExtensionCreated(number, "", "pbx.test", MD5, SHA, T0 - 100)).ok
    return state


def contact(uri: str = PHONE, **kw: Any) -> ContactSpec:
    return ContactSpec(uri=uri, contact_key=uri, **kw)


def decide(state: State, **overrides: Any) -> RegisterDecision:
    args: dict[str, Any] = {
        "aor": "100",
        "contacts": [contact()],
        "star": False,
        "expires_header": None,
        "call_id": "reg-1@127.0.0.1",
        "cseq": 1,
        "received": "127.0.0.1:5062",
        "transport": "udp",
        "path": (),
        "node_id": "n1",
        "now": T0,
        "min_expires": 60,
        "max_expires": 7200,
        "default_expires": 3600,
        "max_contacts": 3,
    }
    args.update(overrides)
    return decide_register(state, **args)


def accepted(decision: RegisterDecision) -> tuple[Event, ...]:
    assert isinstance(decision, RegisterAccepted), decision
    return decision.events


def register(state: State, **overrides: Any) -> list[Any]:
    """Decide and apply (as the registrar would after commit); returns the outcomes."""
    return [apply(state, event) for event in accepted(decide(state, **overrides))]


def update_event(
    cseq: int,
    *contacts: ContactUpdate,
    call_id: str = "reg-1@127.0.0.1",
    at: float = T0,
    max_contacts: int = 3,
) -> BindingsUpdated:
    return BindingsUpdated(
        "100", call_id, cseq, "127.0.0.1:5062", "udp", (), "n1", max_contacts, contacts, at
    )


def cu(
    uri: str = PHONE, expires: int = 3600, q: float | None = None, instance: str = "", reg_id: int = 0
) -> ContactUpdate:
    return ContactUpdate(uri, uri, instance, reg_id, expires, q, "")


def contacts_of(state: State, now: float = T0) -> list[str]:
    return [b.contact for b in current_bindings(state, "100", now)]


# --- §10.3 step 7: expiration interval -------------------------------------------------------------------


def test_10_3_step7_new_binding_takes_the_default_interval_and_stores_what_the_proxy_needs() -> None:
    state = pbx()
    (outcome,) = register(state, path=("<sip:127.0.0.9;lr>",), contacts=[contact(flow="n1/tcp/7", q=0.7)])
    assert outcome.ok and outcome.result == {"aor": "100", "added": 1, "removed": 0}
    (binding,) = current_bindings(state, "100", T0)
    assert binding == Binding(
        aor="100",
        key=f"c:{PHONE}",
        contact=PHONE,
        contact_key=PHONE,
        expires_at=T0 + 3600,
        q=0.7,
        call_id="reg-1@127.0.0.1",
        cseq=1,
        received="127.0.0.1:5062",
        transport="udp",
        path=("<sip:127.0.0.9;lr>",),
        instance_id="",
        reg_id=0,
        flow="n1/tcp/7",
        node_id="n1",
        registered_at=T0,
        updated_at=T0,
    )
    assert binding.to_dict()["path"] == ["<sip:127.0.0.9;lr>"]


def test_10_3_step7_contact_expires_parameter_beats_the_expires_header() -> None:
    state = pbx()
    register(state, contacts=[contact(expires=120), contact(PHONE2)], expires_header=300)
    assert {b.contact: b.expires_at - T0 for b in current_bindings(state, "100", T0)} == {
        PHONE: 120,
        PHONE2: 300,
    }


def test_10_3_step7_interval_is_shortened_to_max_expires() -> None:
    state = pbx()
    register(state, expires_header=2**32 + 5)
    assert current_bindings(state, "100", T0)[0].expires_at == T0 + 7200


def test_10_3_step7_423_interval_too_brief_carries_min_expires() -> None:
    state = pbx()
    decision = decide(state, contacts=[contact(expires=30)])
    assert decision == IntervalTooBrief(min_expires=60)
    assert decision.status == 423
    assert decide(state, expires_header=59) == IntervalTooBrief(60)
    assert isinstance(decide(state, expires_header=60), RegisterAccepted)
    # Only intervals shorter than one hour may get a 423: 3600 below a larger minimum is accepted.
    assert isinstance(
        decide(state, expires_header=3600, min_expires=4000, default_expires=4000), RegisterAccepted
    )


def test_10_3_step7_expires_zero_removes_the_binding_and_is_not_too_brief() -> None:
    state = pbx()
    register(state, contacts=[contact(), contact(PHONE2)])
    (outcome,) = register(state, cseq=2, contacts=[contact(expires=0)])
    assert outcome.result == {"aor": "100", "added": 0, "removed": 1}
    assert contacts_of(state) == [PHONE2]
    register(state, cseq=3, contacts=[contact(PHONE2)], expires_header=0)
    assert "100" not in state.bindings and next_expiry(state) is None


def test_negative_intervals_are_bad_requests() -> None:
    state = pbx()
    assert decide(state, expires_header=-1) == BadRegister("expires", "must not be negative")
    assert isinstance(decide(state, contacts=[contact(expires=-5)]), BadRegister)
    assert isinstance(decide(state, contacts=[contact(q=1.5)]), BadRegister)
    assert isinstance(decide(state, contacts=[contact("")]), BadRegister)
    assert isinstance(decide(state, call_id=""), BadRegister)
    assert isinstance(decide(state, cseq=2**31), BadRegister)


def test_bad_configuration_raises_validation_error() -> None:
    with pytest.raises(ValidationError):
        decide(pbx(), min_expires=100, default_expires=50)
    with pytest.raises(ValidationError):
        decide(pbx(), max_contacts=0)
    with pytest.raises(ValidationError):
        decide(pbx(), now=float("nan"))


# --- §10.3 step 6: Contact: * and queries ----------------------------------------------------------------


def test_10_3_step6_star_with_expires_zero_removes_every_binding() -> None:
    state = pbx()
    register(state, contacts=[contact(), contact(PHONE2)])
    events = accepted(decide(state, star=True, contacts=[], expires_header=0, cseq=2))
    assert events == (BindingsCleared("100", "reg-1@127.0.0.1", 2, T0),)
    assert apply(state, events[0]).result == {"aor": "100", "removed": 2}
    assert current_bindings(state, "100", T0) == [] and next_expiry(state) is None


@pytest.mark.parametrize(
    "overrides",
    [
        {"expires_header": 3600},
        {"expires_header": None},
        {"expires_header": 0, "contacts": [contact()]},
    ],
    ids=["nonzero-expires", "no-expires", "other-contacts"],
)
def test_10_3_step6_star_needs_expires_zero_and_no_other_contact(overrides: dict[str, Any]) -> None:
    args = {"star": True, "contacts": [], **overrides}
    decision = decide(pbx(), **args)
    assert isinstance(decision, BadRegister) and decision.status == 400 and decision.field == "contact"


def test_10_3_step6_star_with_an_older_cseq_of_the_same_call_id_changes_nothing() -> None:
    state = pbx()
    register(state, cseq=5)
    before = snapshot(state)
    assert decide(state, star=True, contacts=[], expires_header=0, cseq=4) == OutOfOrder()
    assert apply(state, BindingsCleared("100", "reg-1@127.0.0.1", 5, T0)) == Rejected("cseq", "out of order")
    assert snapshot(state) == before
    assert apply(state, BindingsCleared("100", "another-call-id", 1, T0)).ok


def test_10_3_register_without_contact_is_a_query_that_proposes_nothing() -> None:
    state = pbx()
    decision = decide(state, contacts=[])
    assert isinstance(decision, RegisterAccepted) and decision.events == ()
    assert decision.op_id == register_op_id("100", "reg-1@127.0.0.1", 1)


# --- §10.3 step 7: Call-ID and CSeq ordering -------------------------------------------------------------


def test_10_3_step7_out_of_order_cseq_changes_nothing() -> None:
    state = pbx()
    assert apply(state, update_event(5, cu(expires=3600))).ok
    before = snapshot(state)
    for cseq in (4, 5):  # lower, and equal (a retransmission that escaped the dedupe window)
        assert apply(state, update_event(cseq, cu(expires=0))) == Rejected("cseq", "out of order")
        assert apply(state, update_event(cseq, cu(expires=60))) == Rejected("cseq", "out of order")
    assert snapshot(state) == before
    assert apply(state, update_event(6, cu(expires=60))).ok
    assert current_bindings(state, "100", T0)[0].expires_at == T0 + 60


def test_10_3_step7_decision_refuses_a_lower_cseq_but_proposes_an_equal_one() -> None:
    state = pbx()
    register(state, cseq=5)
    assert decide(state, cseq=4) == OutOfOrder()
    assert OutOfOrder.status == 500
    assert isinstance(decide(state, cseq=5), RegisterAccepted)  # a retransmission: left to dedupe


def test_10_3_step7_a_different_call_id_always_updates() -> None:
    state = pbx()
    register(state, cseq=50, expires_header=300)
    (outcome,) = register(state, cseq=1, call_id="rebooted@127.0.0.1", expires_header=600)
    assert outcome.ok
    (binding,) = current_bindings(state, "100", T0)
    assert (binding.call_id, binding.cseq, binding.expires_at) == ("rebooted@127.0.0.1", 1, T0 + 600)


def test_10_3_one_request_is_all_or_nothing() -> None:
    state = pbx()
    assert apply(state, update_event(5, cu(PHONE))).ok
    assert apply(state, update_event(1, cu(PHONE2), call_id="other")).ok
    before = snapshot(state)
    # PHONE3 would be new, PHONE2 has another Call-ID, but PHONE is out of order: nothing happens.
    outcome = apply(state, update_event(3, cu(PHONE3), cu(PHONE2, expires=0), cu(PHONE, expires=60)))
    assert outcome == Rejected("cseq", "out of order")
    assert snapshot(state) == before


def test_an_expired_binding_does_not_block_or_count() -> None:
    state = pbx()
    assert apply(state, update_event(9, cu(PHONE, expires=60))).ok
    later = T0 + 61  # expired, though BindingsExpired has not been applied
    assert apply(state, update_event(1, cu(PHONE, expires=60), at=later)).ok
    (binding,) = current_bindings(state, "100", later)
    assert (binding.cseq, binding.registered_at) == (1, later)  # a new registration, not a refresh


def test_refresh_keeps_registered_at_and_position() -> None:
    state = pbx()
    register(state, contacts=[contact(), contact(PHONE2)])
    register(state, cseq=2, now=T0 + 100)
    first, second = state.bindings["100"].values()
    assert (first.contact, first.registered_at, first.updated_at, first.expires_at) == (
        PHONE,
        T0,
        T0 + 100,
        T0 + 3700,
    )
    assert second.contact == PHONE2


# --- max contacts ----------------------------------------------------------------------------------------


def test_max_contacts_refuses_one_more_binding_in_the_decision_and_at_apply() -> None:
    state = pbx()
    register(state, contacts=[contact(), contact(PHONE2)], max_contacts=2)
    decision = decide(state, call_id="third", contacts=[contact(PHONE3)], max_contacts=2)
    assert decision == TooManyContacts(2) and decision.status == 403
    before = snapshot(state)
    outcome = apply(state, update_event(1, cu(PHONE3), call_id="third", max_contacts=2))
    assert outcome == Rejected("contact", "too many contacts")
    assert snapshot(state) == before
    # Replacing one contact by another in the same request is fine.
    assert apply(state, update_event(2, cu(PHONE3), cu(PHONE2, expires=0), max_contacts=2)).ok
    assert sorted(contacts_of(state)) == [PHONE, PHONE3]


def test_max_contacts_lowered_never_blocks_a_refresh_and_expired_bindings_do_not_count() -> None:
    state = pbx()
    register(state, contacts=[contact(), contact(PHONE2, expires=60)], max_contacts=3)
    assert apply(state, update_event(2, cu(PHONE), max_contacts=1)).ok  # 2 live before, 2 after
    assert apply(state, update_event(3, cu(PHONE3), max_contacts=1)) == Rejected(
        "contact", "too many contacts"
    )
    later = T0 + 61  # PHONE2 expired: PHONE + PHONE3 = 2 <= 2
    assert apply(state, update_event(4, cu(PHONE3), max_contacts=2, at=later)).ok


# --- keys: RFC 3261 §10.3 step 5 and RFC 5626 §6 ---------------------------------------------------------


def test_rfc5626_6_instance_id_and_reg_id_key_the_binding() -> None:
    state = pbx()
    register(state, contacts=[contact(PHONE, instance_id=UUID, reg_id=1)])
    # Same instance and reg-id from a new address (NAT rebinding): replaces the binding.
    register(state, cseq=2, contacts=[contact(PHONE2, instance_id=UUID, reg_id=1)])
    assert contacts_of(state) == [PHONE2]
    # A second flow of the same instance (reg-id 2) is a second binding.
    register(state, cseq=3, contacts=[contact(PHONE3, instance_id=UUID, reg_id=2)])
    assert sorted(contacts_of(state)) == [PHONE2, PHONE3]
    assert set(state.bindings["100"]) == {f"i:1:{UUID}", f"i:2:{UUID}"}


def test_reg_id_without_instance_id_is_ignored_and_the_contact_keys_the_binding() -> None:
    state = pbx()
    register(state, contacts=[contact(PHONE, reg_id=1)])
    (binding,) = current_bindings(state, "100", T0)
    assert (binding.key, binding.reg_id) == (f"c:{PHONE}", 0)
    assert binding_key(PHONE, "", 7) == f"c:{PHONE}"
    assert binding_key("x", "i:1:y", 0) != binding_key("x", "y", 1)


def test_10_3_step5_the_callers_normalised_contact_key_decides_equality() -> None:
    state = pbx()
    register(state, contacts=[ContactSpec("sip:100@127.0.0.1:5062;transport=UDP", PHONE)])
    register(state, cseq=2, contacts=[ContactSpec("sip:100@127.0.0.1:5062;TRANSPORT=udp", PHONE)])
    assert contacts_of(state) == ["sip:100@127.0.0.1:5062;TRANSPORT=udp"]


def test_the_same_binding_twice_in_one_register_counts_once_the_last_wins() -> None:
    state = pbx()
    (event,) = accepted(decide(state, contacts=[contact(expires=100), contact(expires=200)]))
    assert (
        isinstance(event, BindingsUpdated) and len(event.contacts) == 1 and event.contacts[0].expires == 200
    )
    assert apply(state, update_event(1, cu(), cu())) == Rejected(
        "contact", "the same binding twice in one request"
    )


# --- lookups ---------------------------------------------------------------------------------------------


def test_current_bindings_sort_by_q_descending_then_registration_time() -> None:
    state = pbx()
    register(state, contacts=[contact(PHONE, q=0.5)])
    register(state, call_id="b", contacts=[contact(PHONE2, q=0.9)], now=T0 + 1)
    register(state, call_id="c", contacts=[contact(PHONE3)], now=T0 + 2)  # no q sorts like 1.0
    register(state, call_id="d", contacts=[contact("sip:100@127.0.0.4", q=0.5)], now=T0 + 3, max_contacts=4)
    assert contacts_of(state, T0 + 3) == [PHONE3, PHONE2, PHONE, "sip:100@127.0.0.4"]
    assert current_bindings(state, "101", T0) == [] and current_bindings(state, "nobody", T0) == []


# --- expiry ----------------------------------------------------------------------------------------------


def test_expiry_by_query_filter_then_by_the_leaders_event() -> None:
    state = pbx()
    register(state, contacts=[contact(expires=60), contact(PHONE2, expires=120)])
    assert next_expiry(state) == T0 + 60
    assert decide_expire(state, T0 + 59) == []
    assert contacts_of(state, T0 + 60) == [PHONE2]  # filtered at the boundary, still held
    assert len(state.bindings["100"]) == 2
    events = decide_expire(state, T0 + 60)
    assert events == [BindingsExpired(T0 + 60)]
    assert apply(state, events[0]).result == {"removed": 1}
    assert list(state.bindings["100"]) == [f"c:{PHONE2}"] and next_expiry(state) == T0 + 120
    assert apply(state, BindingsExpired(T0 + 500)).result == {"removed": 1}
    assert state.bindings == {} and next_expiry(state) is None and decide_expire(state, T0 + 999) == []
    assert expiry_op_id(T0) == expiry_op_id(T0) != expiry_op_id(T0 + 1)


def test_next_expiry_follows_refreshes_and_removals() -> None:
    state = pbx()
    register(state, contacts=[contact(expires=60)])
    register(state, cseq=2, contacts=[contact(expires=600)])
    assert next_expiry(state) == T0 + 600
    assert apply(state, BindingsExpired(T0 + 60)).result == {"removed": 0}  # the stale index entry is dead
    assert contacts_of(state, T0 + 61) == [PHONE]
    register(state, cseq=3, contacts=[contact(expires=0)])
    assert next_expiry(state) is None


def test_deleting_an_extension_removes_its_bindings() -> None:
    state = pbx()
    register(state, contacts=[contact(), contact(PHONE2)])
    register(state, aor="101", contacts=[contact("sip:101@127.0.0.5", expires=60)])
    assert apply(state, ExtensionDeleted("100", T0)).ok
    assert "100" not in state.bindings and next_expiry(state) == T0 + 60
    assert state.binding_count() == 1
    assert apply(state, ExtensionCreated("100", "", "pbx.test", MD5, SHA, T0)).ok
    assert current_bindings(state, "100", T0) == []
    assert restore(snapshot(state)) == state


def test_many_bindings_expire_through_the_index() -> None:
    state = pbx()
    count = 5000
    for i in range(count):
        outcome = apply(
            state,
            update_event(
                1,
                cu(f"sip:100@127.0.{i // 250}.{i % 250}", expires=60 + i),
                call_id=f"r{i}",
                max_contacts=count,
            ),
        )
        assert outcome.ok
    assert state.binding_count() == count and next_expiry(state) == T0 + 60
    assert apply(state, BindingsExpired(T0 + 60 + count // 2 - 1)).result == {"removed": count // 2}
    assert state.binding_count() == count // 2 and next_expiry(state) == T0 + 60 + count // 2
    assert len(state.binding_expiry) == count // 2
    assert restore(snapshot(state)) == state


# --- unknown AoR, admin, refusal mapping -----------------------------------------------------------------


def test_unknown_aor_is_a_typed_result_and_rejected_at_apply() -> None:
    state = pbx()
    assert decide(state, aor="555") == NoSuchAor()
    assert NoSuchAor.status == 404
    assert apply(state, replace(update_event(1, cu()), aor="555")) == Rejected("aor", "no such extension")
    assert apply(state, BindingsCleared("555", "x", 1, T0)) == Rejected("aor", "no such extension")
    assert apply(state, BindingRemoved("555", "k", T0)) == Rejected("aor", "no such extension")


def test_operator_removes_one_binding_or_all() -> None:
    state = pbx()
    register(state, contacts=[contact(), contact(PHONE2)])
    events = decide_remove_binding(state, "100", f"c:{PHONE}", T0)
    assert apply(state, events[0]).ok and contacts_of(state) == [PHONE2]
    assert apply(state, events[0]) == Rejected("key", "no such binding")
    with pytest.raises(ValidationError):
        decide_remove_binding(state, "100", f"c:{PHONE}", T0)
    (clear,) = decide_clear_bindings(state, "100", T0)
    assert apply(state, clear).result == {"aor": "100", "removed": 1}
    with pytest.raises(ValidationError):
        decide_clear_bindings(state, "555", T0)


def test_refusal_for_maps_apply_rejections_back_to_register_refusals() -> None:
    assert refusal_for(Rejected("aor", "no such extension"), max_contacts=3) == NoSuchAor()
    assert refusal_for(Rejected("cseq", "out of order"), max_contacts=3) == OutOfOrder()
    assert refusal_for(Rejected("contact", "too many contacts"), max_contacts=3) == TooManyContacts(3)
    assert refusal_for(Rejected("q", "bad"), max_contacts=3) == BadRegister("q", "bad")


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (update_event(-1, cu()), "cseq"),
        (update_event(2**31, cu()), "cseq"),
        (update_event(1), "contact"),
        (update_event(1, cu(q=1.5)), "q"),
        (update_event(1, cu(q=-0.1)), "q"),
        (update_event(1, cu(expires=-1)), "expires"),
        (update_event(1, cu(reg_id=-1, instance="u")), "reg_id"),
        (update_event(1, cu(), max_contacts=0), "max_contacts"),
        (update_event(1, cu(), call_id=""), "call_id"),
        (update_event(1, cu("")), "contact"),
        (replace(update_event(1, cu()), path=("",)), "path"),
        (BindingsCleared("100", "x", -1, T0), "cseq"),
    ],
)
def test_malformed_binding_events_are_rejected_and_change_nothing(event: Event, field: str) -> None:
    state = pbx()
    register(state)
    before = snapshot(state)
    outcome = apply(state, event)
    assert isinstance(outcome, Rejected) and outcome.field == field
    assert snapshot(state) == before


# --- op_id dedupe of a retransmitted REGISTER ------------------------------------------------------------


def test_a_retransmitted_register_at_another_node_dedupes_through_the_op_id() -> None:
    node1, node2 = pbx(), pbx()
    log: list[bytes] = []

    def commit(decision: RegisterDecision) -> list[Any]:
        assert isinstance(decision, RegisterAccepted)
        entry = encode_batch([Command(decision.op_id, event) for event in decision.events])
        log.append(entry)
        index = node1.applied_index + 1
        out = apply_entry(node1, entry, index)
        assert apply_entry(node2, entry, index) == out
        return out

    first = decide(node1, cseq=7, branch="z9hG4bK-1", node_id="n1")
    (outcome,) = commit(first)
    assert outcome.ok
    # The 200 was lost; the phone retransmits; it lands on node 2 a little later.
    again = decide(node2, cseq=7, branch="z9hG4bK-1", node_id="n2", now=T0 + 0.5)
    assert isinstance(again, RegisterAccepted) and again.op_id == first.op_id  # type: ignore[union-attr]
    before = snapshot(node2)
    (duplicate,) = commit(again)
    assert duplicate == Duplicate(outcome)
    earlier = restore(before)  # only the applied index moved: same bindings, same digest
    assert (node2.bindings, node2.digest) == (earlier.bindings, earlier.digest)
    assert node2.applied_index == earlier.applied_index + 1 and node1 == node2
    # A new REGISTER (next CSeq, new transaction) gets a new op_id.
    assert register_op_id("100", "reg-1@127.0.0.1", 8, "z9hG4bK-2") != first.op_id  # type: ignore[union-attr]
    assert register_op_id("100", "reg-1@127.0.0.1", 7, "z9hG4bK-2") != first.op_id  # type: ignore[union-attr]
    assert register_op_id("101", "reg-1@127.0.0.1", 7, "z9hG4bK-1") != first.op_id  # type: ignore[union-attr]


# --- properties: the expiry index agrees with a naive scan; replay determinism ----------------------------


def _naive_next_expiry(state: State) -> float | None:
    times = [b.expires_at for table in state.bindings.values() for b in table.values()]
    return min(times) if times else None


@settings(max_examples=80, deadline=None)
@given(pbx_batches())
def test_replay_with_bindings_and_calls_is_deterministic_and_the_index_agrees_with_a_scan(
    batches: list[list[Command]],
) -> None:
    node_a, node_b = State(dedupe_limit=8, call_tail_limit=2), State(dedupe_limit=8, call_tail_limit=2)
    for index, commands in enumerate(batches, start=1):
        data = encode_batch(commands)
        expected_removed = None
        expired = [c.event for c in commands if isinstance(c.event, BindingsExpired)]
        if len(commands) == 1 and expired:
            expected_removed = sum(
                1
                for table in node_a.bindings.values()
                for b in table.values()
                if b.expires_at <= expired[0].at
            )
        outcomes = apply_entry(node_a, data, index)
        assert apply_entry(node_b, data, index) == outcomes
        if expected_removed is not None and outcomes[0].ok and not isinstance(outcomes[0], Duplicate):
            assert outcomes[0].result == {"removed": expected_removed}  # type: ignore[attr-defined]
        last = commands[-1].event if commands else None
        if isinstance(last, BindingsExpired) and not isinstance(outcomes[-1], Duplicate):
            assert all(b.expires_at > last.at for t in node_a.bindings.values() for b in t.values())
        due = next_expiry(node_a)
        assert due == _naive_next_expiry(node_a)
        if due is not None:  # sweep a copy (stale index entries included) exactly at the boundary
            probe = copy.deepcopy(node_a)
            expected = sum(1 for t in probe.bindings.values() for b in t.values() if b.expires_at <= due)
            assert apply(probe, BindingsExpired(due)).result == {"removed": expected}  # type: ignore[union-attr]
            assert expected >= 1 and all(
                b.expires_at > due for t in probe.bindings.values() for b in t.values()
            )
            assert next_expiry(probe) == _naive_next_expiry(probe)
        assert node_a.binding_count() == sum(len(t) for t in node_a.bindings.values())
        for aor, table in node_a.bindings.items():
            assert aor in node_a.extensions and table
            assert all(b.aor == aor and b.key == key for key, b in table.items())
        assert len(node_a.finished_calls) <= 2
        assert node_a.calls.keys().isdisjoint(node_a.finished_calls.keys())
    assert node_a == node_b and node_a.digest == node_b.digest
    blob = snapshot(node_a)
    assert blob == snapshot(node_b)
    restored = restore(blob)
    assert restored == node_a and snapshot(restored) == blob
    assert next_expiry(restored) == next_expiry(node_a)
    assert msgpack.unpackb(blob)["format"] == SNAPSHOT_FORMAT  # 3: drained nodes, 4: trunks and routes


# --- snapshots -------------------------------------------------------------------------------------------


def _state_with_bindings() -> State:
    state = pbx("100", "101", "102")
    register(state, contacts=[contact(PHONE2, q=0.2), contact(PHONE, instance_id=UUID, reg_id=1)])
    register(
        state, aor="102", contacts=[contact("sip:102@127.0.0.7", expires=100)], path=("<sip:127.0.0.9;lr>",)
    )
    register(state, aor="101", contacts=[contact("sip:101@127.0.0.6")])
    register(state, cseq=2, contacts=[contact(PHONE3)])
    return state


def test_snapshot_round_trip_keeps_bindings_their_order_and_the_expiry_index() -> None:
    state = _state_with_bindings()
    blob = snapshot(state)
    restored = restore(blob)
    assert restored == state and snapshot(restored) == blob
    assert list(restored.bindings) == ["100", "102", "101"]
    assert list(restored.bindings["100"]) == list(state.bindings["100"])
    assert next_expiry(restored) == T0 + 100 and restored.binding_count() == 5
    assert apply(restored, BindingsExpired(T0 + 100)).result == {"removed": 1}


def test_format_1_snapshots_still_restore_without_bindings_or_calls() -> None:
    state = pbx("100")
    obj = as_format_4(msgpack.unpackb(snapshot(state)))
    v1 = {key: obj[key] for key in ("applied_index", "digest", "dedupe_limit", "dedupe", "extensions")}
    v1["format"] = 1
    restored = restore(msgpack.packb(v1, use_bin_type=True))
    assert restored == state and restored.bindings == {} and restored.calls == {}
    assert restored.call_tail_limit == 1000
    v1["bindings"] = []  # a format 1 snapshot with a format 2 section is malformed
    with pytest.raises(CodecError):
        restore(msgpack.packb(v1, use_bin_type=True))


def _binding_field(name: str) -> int:
    return [f.name for f in fields(Binding)].index(name)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.update(bindings={}),
        lambda m: m["bindings"][0].__setitem__(_binding_field("aor"), "555"),  # not an extension
        lambda m: m["bindings"][0].__setitem__(_binding_field("key"), "c:other"),
        lambda m: m["bindings"][0].__setitem__(_binding_field("q"), 2.0),
        lambda m: m["bindings"][0].__setitem__(_binding_field("expires_at"), "soon"),
        lambda m: m["bindings"][0].pop(),
        lambda m: m["bindings"].append(list(m["bindings"][0])),  # duplicate, and not contiguous
        lambda m: m["bindings"].insert(1, list(m["bindings"][0])),  # duplicate
        lambda m: m["bindings"].append(list(m["bindings"][1])),  # AoR 100 again after 102 and 101
        lambda m: m.pop("bindings"),
    ],
)
def test_malformed_binding_sections_are_refused(mutate: Any) -> None:
    """Format 4 rows (the format 5 columns: `test_malformed_binding_columns_are_refused`)."""
    obj = as_format_4(msgpack.unpackb(snapshot(_state_with_bindings())))
    restore(msgpack.packb(obj, use_bin_type=True))
    mutate(obj)
    with pytest.raises(CodecError):
        restore(msgpack.packb(obj, use_bin_type=True))


def _set(name: str, value: Any, row: int = 0) -> Any:
    return lambda m: m["bindings"][name].__setitem__(row, value)


def _dup(row: int, at: int | None = None) -> Any:
    def mutate(m: dict[str, Any]) -> None:
        for column in m["bindings"].values():
            column.insert(len(column) if at is None else at, column[row])

    return mutate


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.update(bindings=[]),
        lambda m: m["bindings"].pop("q"),
        lambda m: m["bindings"]["q"].pop(),
        _set("aor", "555"),  # not an extension
        _set("aor", 100),
        _set("key", "c:other"),
        _set("q", 2.0),
        _set("q", 1),
        _set("expires_at", "soon"),
        _set("expires_at", float("inf")),
        _set("cseq", 2**63),
        _set("cseq", 1.0),
        _set("reg_id", True),
        _set("path", "<sip:127.0.0.9;lr>"),
        _set("path", [1]),
        _set("transport", None),
        _set("node_id", b"n1"),
        _dup(0),  # duplicate, and not contiguous
        _dup(0, 1),  # duplicate
        _dup(2),  # AoR 100 again after 102 and 101
    ],
)
def test_malformed_binding_columns_are_refused(mutate: Any) -> None:
    obj = msgpack.unpackb(snapshot(_state_with_bindings()))
    assert obj["format"] == 5 and list(obj["bindings"]) == [f.name for f in fields(Binding)]
    restore(msgpack.packb(obj, use_bin_type=True))
    mutate(obj)
    with pytest.raises(CodecError):
        restore(msgpack.packb(obj, use_bin_type=True))


def test_restored_bindings_share_repeated_strings() -> None:
    """Memory (issue 8): a restored binding's AoR is its extension's own key object, and transports and node
    ids are shared between bindings instead of one copy per record."""
    restored = restore(snapshot(_state_with_bindings()))
    keys = {number: number for number in restored.extensions}
    everything = [b for table in restored.bindings.values() for b in table.values()]
    assert all(b.aor is next(k for k in keys if k == b.aor) for b in everything)
    assert len({id(b.transport) for b in everything}) == len({b.transport for b in everything})
    assert len({id(b.node_id) for b in everything}) == len({b.node_id for b in everything})


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_corrupted_snapshots_with_bindings_and_calls_restore_or_raise_codec_error(
    data: st.DataObject,
) -> None:
    state = _state_with_bindings()
    apply(state, CallStarted("c1", "100", "101", "ft", PHONE, "z9hG4bK1", "n1", T0))
    apply(state, CallStarted("c2", "101", "100", "ft", PHONE, "z9hG4bK2", "n2", T0))
    apply(state, CallEnded("c2", "cancel", "caller", 487, "n2", T0 + 1))
    blob = bytearray(snapshot(state))
    for _ in range(data.draw(st.integers(1, 3))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    try:
        restored = restore(bytes(blob))
    except CodecError:
        return
    assert restore(snapshot(restored)) == restored
    assert next_expiry(restored) == _naive_next_expiry(restored)
