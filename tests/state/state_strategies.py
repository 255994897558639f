"""Hypothesis strategies shared by the tests of raftpbx.state (imported by file name; unique on purpose)."""

from __future__ import annotations

import dataclasses
import hashlib
import types
import typing
from typing import Any

from hypothesis import strategies as st
from raftpbx.state import (
    EVENT_TYPES,
    BindingRemoved,
    BindingsCleared,
    BindingsExpired,
    BindingsUpdated,
    CallAnswered,
    CallEnded,
    CallRefreshed,
    CallRinging,
    CallStarted,
    Command,
    ContactUpdate,
    CredentialChanged,
    Event,
    ExtensionCreated,
    ExtensionDeleted,
    ExtensionUpdated,
)

finite_floats = st.floats(allow_nan=False, allow_infinity=False)
times = st.floats(min_value=1.6e9, max_value=2.0e9, allow_nan=False)


def for_annotation(annotation: Any) -> st.SearchStrategy[Any]:
    """Any value the codec must round-trip for a field annotated `annotation`."""
    simple: dict[Any, st.SearchStrategy[Any]] = {
        str: st.text(max_size=40),
        int: st.integers(min_value=-(2**63), max_value=2**63 - 1),
        float: finite_floats,
        bool: st.booleans(),
        bytes: st.binary(max_size=40),
    }
    if annotation in simple:
        return simple[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [arg for arg in args if arg is not type(None)]
        return st.none() | for_annotation(inner)
    if origin is tuple:
        return st.lists(for_annotation(args[0]), max_size=4).map(tuple)
    if dataclasses.is_dataclass(annotation):
        return any_instance(annotation)
    raise AssertionError(f"test strategies do not cover {annotation!r}: add it")


def any_instance(cls: Any) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls)
    return st.builds(cls, **{f.name: for_annotation(hints[f.name]) for f in dataclasses.fields(cls)})


def any_event() -> st.SearchStrategy[Event]:
    """Any instance of any registered event type, with arbitrary (type-correct) field values."""
    return st.one_of([any_instance(cls) for cls in EVENT_TYPES.values()])


op_ids = st.text(min_size=1, max_size=128)
any_command = st.builds(Command, op_id=op_ids, event=any_event())


# --- plausible workloads: mostly valid, some invalid against the state or malformed ------------------------

NUMBERS = ["100", "101", "102", "2000", "31337"]
BAD_NUMBERS = ["1", "x12", "12345678901234567"]
_good_numbers = st.sampled_from(NUMBERS)
numbers = st.one_of(_good_numbers, _good_numbers, _good_numbers, st.sampled_from(BAD_NUMBERS))
display_names = st.sampled_from(["", "Alice", "Bob Smith", "Réception", 'Say "hi"', " padded", "x" * 65])
realms = st.sampled_from(["pbx.test", "other.test", "", 'bad"realm'])


def _ha1(algorithm: str) -> st.SearchStrategy[str]:
    good = st.text(max_size=12).map(lambda s: hashlib.new(algorithm, s.encode()).hexdigest())
    return st.one_of(good, good, good, st.sampled_from(["", "XYZ", "ABCDEF" * 11]))


workload_events = st.one_of(
    st.builds(ExtensionCreated, numbers, display_names, realms, _ha1("md5"), _ha1("sha256"), times),
    st.builds(ExtensionUpdated, numbers, display_names, times),
    st.builds(ExtensionDeleted, numbers, times),
    st.builds(CredentialChanged, numbers, realms, _ha1("md5"), _ha1("sha256"), times),
)
workload_op_ids = st.sampled_from([f"op-{i}" for i in range(12)]) | st.uuids().map(str)
workload_commands = st.builds(Command, op_id=workload_op_ids, event=workload_events)
workload_batches = st.lists(st.lists(workload_commands, max_size=5), max_size=25)


# --- registrations and calls: small pools so that keys, Call-IDs and times collide often ------------------


MD5_OK = hashlib.md5(b"x").hexdigest()
SHA_OK = hashlib.sha256(b"x").hexdigest()
small_times = st.integers(0, 13).map(lambda n: 30.0 * n)  # coarse: equal times are common
aors = st.sampled_from(["100", "101", "102", "100", "101", "102", "999"])  # 999 is never created
contact_keys = st.sampled_from([f"sip:100@127.0.0.{i}:5060" for i in range(1, 5)])
instances = st.sampled_from(["", "", "<urn:uuid:00000000-0000-0000-0000-000000000001>"])
binding_keys = st.sampled_from(
    [f"c:sip:100@127.0.0.{i}:5060" for i in range(1, 5)]
    + [
        "i:0:<urn:uuid:00000000-0000-0000-0000-000000000001>",
        "i:1:<urn:uuid:00000000-0000-0000-0000-000000000001>",
    ]
)
contact_updates = st.builds(
    ContactUpdate,
    contact=contact_keys,
    contact_key=contact_keys,
    instance_id=instances,
    reg_id=st.integers(0, 1),
    expires=st.sampled_from([0, 30, 60, 120, 3600]),
    q=st.sampled_from([None, 0.1, 0.5, 1.0, None, 0.1, 0.5, 1.0, 1.5]),
    flow=st.sampled_from(["", "n1/udp/127.0.0.1:5060"]),
)
register_call_ids = st.sampled_from(["reg-a", "reg-b"])
_valid_contact_lists = st.lists(
    contact_updates.filter(lambda c: c.q is None or c.q <= 1.0),
    min_size=1,
    max_size=2,
    unique_by=lambda c: c.key,
)
_any_contact_lists = st.lists(contact_updates, min_size=0, max_size=3)


def _binding_updates(
    contacts: st.SearchStrategy[list[ContactUpdate]], max_contacts: st.SearchStrategy[int]
) -> Any:
    return st.builds(
        BindingsUpdated,
        aor=aors,
        call_id=register_call_ids,
        cseq=st.integers(0, 6),
        received=st.just("127.0.0.1:5062"),
        transport=st.sampled_from(["udp", "tcp"]),
        path=st.sampled_from([(), ("<sip:127.0.0.9;lr>",)]),
        node_id=st.sampled_from(["n1", "n2", "n3"]),
        max_contacts=max_contacts,
        contacts=contacts.map(tuple),
        at=small_times,
    )


_plausible_updates = _binding_updates(_valid_contact_lists, st.integers(1, 3))
binding_events = st.one_of(
    st.builds(
        ExtensionCreated,
        aors,
        st.just(""),
        st.just("pbx.test"),
        st.just(MD5_OK),
        st.just(SHA_OK),
        small_times,
    ),
    st.builds(ExtensionDeleted, aors, small_times),
    *[_plausible_updates] * 6,
    _binding_updates(_any_contact_lists, st.integers(0, 3)),
    st.builds(
        BindingsCleared, aors, st.sampled_from(["", "reg-a", "reg-b"]), st.integers(-1, 6), small_times
    ),
    st.builds(BindingRemoved, aors, binding_keys, small_times),
    *[st.builds(BindingsExpired, small_times)] * 3,
)

call_ids = st.sampled_from(["c1", "c2", "c3", "c4", "c1", "c2", ""])
nodes = st.sampled_from(["n1", "n2", "n3"])
call_events = st.one_of(
    st.builds(
        CallStarted,
        call_ids,
        st.sampled_from(["100", "101"]),
        st.sampled_from(["101", "102", ""]),
        st.just("ft"),
        st.just("sip:100@127.0.0.1"),
        st.just("z9hG4bKx"),
        nodes,
        small_times,
    ),
    st.builds(CallRinging, call_ids, nodes, small_times),
    st.builds(
        CallAnswered,
        call_ids,
        st.just("tt"),
        st.just("sip:101@127.0.0.2"),
        st.none() | small_times,
        nodes,
        small_times,
    ),
    st.builds(CallRefreshed, call_ids, small_times, nodes, small_times),
    st.builds(
        CallEnded,
        call_ids,
        st.sampled_from(["bye-caller", "bye-callee", "cancel", "failure", "timeout", "hangup"]),
        st.sampled_from(["caller", "callee", "system"]),
        st.sampled_from([0, 200, 404, 486, 487, 603, 1000]),
        nodes,
        small_times,
    ),
)
_consistent_endings = st.sampled_from(
    [
        ("bye-caller", "caller", 200),
        ("bye-callee", "callee", 200),
        ("cancel", "caller", 487),
        ("failure", "callee", 486),
        ("failure", "system", 480),
        ("timeout", "system", 408),
    ]
)
consistent_call_ends = st.builds(
    lambda call_id, ending, node, at: CallEnded(call_id, *ending, node, at),
    st.sampled_from(["c1", "c2", "c3", "c4"]),
    _consistent_endings,
    nodes,
    small_times,
)
pbx_events = st.one_of(binding_events, binding_events, call_events, consistent_call_ends, workload_events)
PBX_SETUP = [
    Command(f"setup-{number}", ExtensionCreated(number, "", "pbx.test", MD5_OK, SHA_OK, 0.0))
    for number in ("100", "101", "102")
]


@st.composite
def pbx_batches(draw: st.DrawFn) -> list[list[Command]]:
    """The setup batch, then batches of mostly fresh op_ids with some retries of earlier ones."""
    batches: list[list[Command]] = [PBX_SETUP]
    used: list[str] = []
    for _ in range(draw(st.integers(0, 30))):
        batch = []
        for _ in range(draw(st.integers(1, 6))):
            if used and draw(st.integers(0, 9)) == 0:
                op_id = draw(st.sampled_from(used))
            else:
                op_id = f"op-{len(used)}"
                used.append(op_id)
            batch.append(Command(op_id, draw(pbx_events)))
        batches.append(batch)
    return batches
