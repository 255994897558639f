"""Drain state (state/cluster.py): decisions, appliers, snapshots of the drained nodes, and a model check."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from raftpbx.state import (
    SNAPSHOT_FORMAT,
    Applied,
    CodecError,
    Command,
    Duplicate,
    NodeDrained,
    NodeUndrained,
    Rejected,
    State,
    ValidationError,
    apply,
    apply_entry,
    decide_drain,
    decide_undrain,
    drained_nodes,
    encode_batch,
    is_drained,
    restore,
    snapshot,
)
from snapshot_formats import as_format_4

T0 = 1_700_000_000.0


# --- decisions -------------------------------------------------------------------------------------------


def test_decide_drain_and_undrain_make_one_event_each() -> None:
    state = State()
    assert decide_drain(state, "node2", "node1", T0) == [NodeDrained("node2", T0, "node1")]
    assert decide_undrain(state, "node2", T0 + 1) == [NodeUndrained("node2", T0 + 1)]


@pytest.mark.parametrize("node_id", ["", "-n1", "node 1", "n" * 64, "nöde", "n1/x", "n1\n"])
def test_decide_refuses_a_malformed_node_id_naming_the_field(node_id: str) -> None:
    for decide in (lambda: decide_drain(State(), node_id, "", T0), lambda: decide_undrain(State(), node_id, T0)):
        with pytest.raises(ValidationError) as caught:
            decide()
        assert caught.value.field == "node_id"


def test_decide_refuses_bad_by_and_now() -> None:
    with pytest.raises(ValidationError) as caught:
        decide_drain(State(), "n1", "x" * 129, T0)
    assert caught.value.field == "by"
    with pytest.raises(ValidationError) as caught:
        decide_drain(State(), "n1", "a\x00b", T0)
    assert caught.value.field == "by"
    for now in (math.nan, math.inf):
        with pytest.raises(ValidationError) as caught:
            decide_drain(State(), "n1", "", now)
        assert caught.value.field == "now"
        with pytest.raises(ValidationError) as caught:
            decide_undrain(State(), "n1", now)
        assert caught.value.field == "now"


def test_decide_accepts_an_already_drained_node() -> None:
    state = State(drained={"n1": T0})
    assert decide_drain(state, "n1", "", T0 + 5) == [NodeDrained("n1", T0 + 5, "")]
    assert decide_undrain(State(), "n1", T0) == [NodeUndrained("n1", T0)]


# --- apply -----------------------------------------------------------------------------------------------


def test_drain_then_undrain() -> None:
    state = State()
    assert apply(state, NodeDrained("node3", T0, "node1")) == Applied(
        {"node_id": "node3", "drained": True, "changed": True}
    )
    assert is_drained(state, "node3") and not is_drained(state, "node1")
    assert drained_nodes(state) == [("node3", T0)]
    assert apply(state, NodeUndrained("node3", T0 + 1)) == Applied(
        {"node_id": "node3", "drained": False, "changed": True}
    )
    assert state.drained == {} and not is_drained(state, "node3")


def test_drain_is_idempotent_and_keeps_the_first_time() -> None:
    state = State()
    apply(state, NodeDrained("n2", T0, "a"))
    assert apply(state, NodeDrained("n2", T0 + 9, "b")) == Applied(
        {"node_id": "n2", "drained": True, "changed": False}
    )
    assert state.drained == {"n2": T0}
    assert apply(state, NodeUndrained("n9", T0)) == Applied({"node_id": "n9", "drained": False, "changed": False})
    assert state.drained == {"n2": T0}


def test_drained_nodes_are_sorted_and_the_map_keeps_drain_order() -> None:
    state = State()
    for node_id in ("n3", "n1", "n2"):
        apply(state, NodeDrained(node_id, T0, ""))
    assert list(state.drained) == ["n3", "n1", "n2"]
    assert [n for n, _ in drained_nodes(state)] == ["n1", "n2", "n3"]


def test_apply_rejects_malformed_events_and_changes_nothing() -> None:
    state = State(drained={"n1": T0})
    for event, field in (
        (NodeDrained("bad id", T0, ""), "node_id"),
        (NodeDrained("n2", T0, "x" * 200), "by"),
        (NodeUndrained("", T0), "node_id"),
        (NodeUndrained("n1/", T0), "node_id"),
    ):
        outcome = apply(state, event)
        assert isinstance(outcome, Rejected) and outcome.field == field, outcome
    assert state.drained == {"n1": T0}


def test_a_retried_drain_is_a_duplicate_and_does_not_move_the_digest() -> None:
    state = State()
    entry = encode_batch([Command("drain-1", NodeDrained("n1", T0, "n2"))])
    (first,) = apply_entry(state, entry, 1)
    digest = state.digest
    (again,) = apply_entry(state, encode_batch([Command("drain-1", NodeDrained("n1", T0 + 3, "n2"))]), 2)
    assert again == Duplicate(first) and state.digest == digest and state.drained == {"n1": T0}


# --- snapshots -------------------------------------------------------------------------------------------


def _map(state: State) -> dict[str, Any]:
    obj: dict[str, Any] = msgpack.unpackb(snapshot(state))
    return obj


def test_snapshot_carries_the_drained_nodes_in_order() -> None:
    state = State()
    apply_entry(state, encode_batch([Command("a", NodeDrained("n2", T0, "")), Command("b", NodeDrained(
        "n1", T0 + 1, ""))]), 1)
    blob = snapshot(state)
    assert _map(state)["format"] == SNAPSHOT_FORMAT >= 3
    assert _map(state)["drained"] == [["n2", T0], ["n1", T0 + 1]]
    restored = restore(blob)
    assert restored == state and list(restored.drained) == ["n2", "n1"] and snapshot(restored) == blob


def test_format_2_snapshot_restores_with_no_drained_node() -> None:
    state = State()
    apply_entry(state, encode_batch([Command("a", NodeUndrained("n2", T0))]), 1)
    obj = as_format_4(_map(state))
    for section in ("drained", "trunks", "routes"):  # format 4 (trunks) came later: see test_trunks_state
        del obj[section]
    obj["format"] = 2
    restored = restore(msgpack.packb(obj, use_bin_type=True))
    assert restored.drained == {} and restored.digest == state.digest and restored.applied_index == 1
    assert _map(restored)["format"] == SNAPSHOT_FORMAT  # rewritten in the current format


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.pop("drained"),  # format 3 without its section
        lambda m: m.update(format=2),  # format 2 with a format 3 section
        lambda m: m.update(drained={}),
        lambda m: m.update(drained=[["n1"]]),
        lambda m: m.update(drained=[["n1", T0, 1]]),
        lambda m: m.update(drained=[["bad id", T0]]),
        lambda m: m.update(drained=[[1, T0]]),
        lambda m: m.update(drained=[["n1", "T0"]]),
        lambda m: m.update(drained=[["n1", 5]]),
        lambda m: m.update(drained=[["n1", math.nan]]),
        lambda m: m.update(drained=[["n1", T0], ["n1", T0]]),
    ],
)
def test_malformed_drained_sections_are_refused(mutate: Any) -> None:
    obj = _map(State(drained={"n1": T0}))
    restore(msgpack.packb(obj, use_bin_type=True))
    mutate(obj)
    with pytest.raises(CodecError):
        restore(msgpack.packb(obj, use_bin_type=True))


# --- model check -----------------------------------------------------------------------------------------

_ids = st.sampled_from(["node1", "node2", "node3", "n.4", "bad id"])
_ops = st.lists(
    st.tuples(st.booleans(), _ids, st.integers(0, 5), st.floats(1.6e9, 2.0e9)), min_size=1, max_size=30
)


@settings(max_examples=100, deadline=None)
@given(_ops, st.data())
def test_replay_matches_a_naive_model_and_survives_a_snapshot_anywhere(
    ops: list[tuple[bool, str, int, float]], data: st.DataObject
) -> None:
    """Drains and undrains (some retried with the same op_id, some malformed) agree with a plain dict, on
    two replicas, and a snapshot taken at any point continues to the same state and digest."""
    entries = []
    model: dict[str, float] = {}
    seen: set[str] = set()
    for drain, node_id, op, at in ops:
        op_id = f"{'d' if drain else 'u'}-{node_id}-{op}"
        event = NodeDrained(node_id, at, "op") if drain else NodeUndrained(node_id, at)
        entries.append(encode_batch([Command(op_id, event)]))
        if op_id in seen or node_id == "bad id":
            continue
        seen.add(op_id)
        if drain:
            model.setdefault(node_id, at)
        else:
            model.pop(node_id, None)
    cut = data.draw(st.integers(0, len(entries)))
    a, b = State(), State()
    for index, entry in enumerate(entries, start=1):
        assert apply_entry(a, entry, index) == apply_entry(b, entry, index)
    assert a == b and a.drained == model and list(a.drained) == list(model)
    c = State()
    for index, entry in enumerate(entries[:cut], start=1):
        apply_entry(c, entry, index)
    c = restore(snapshot(c))
    for index, entry in enumerate(entries[cut:], start=cut + 1):
        apply_entry(c, entry, index)
    assert c == a and c.digest == a.digest and snapshot(c) == snapshot(a)
