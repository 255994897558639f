"""snapshot / restore: exact round trip, continuing after a restore, and total rejection of garbage."""

from __future__ import annotations

from collections import OrderedDict
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
    ExtensionCreated,
    Rejected,
    State,
    apply_entry,
    encode_batch,
    restore,
    snapshot,
)
from state_strategies import workload_batches

MD5 = "0123456789abcdef" * 2
SHA = "0123456789abcdef" * 4


def run(state: State, batches: list[list[Command]], first_index: int = 1) -> list[Any]:
    return [apply_entry(state, encode_batch(b), i) for i, b in enumerate(batches, start=first_index)]


def test_empty_state_round_trip() -> None:
    state = State()
    assert restore(snapshot(state)) == state
    assert restore(snapshot(State(dedupe_limit=5))).dedupe_limit == 5


def test_round_trip_keeps_every_order() -> None:
    state = State(dedupe_limit=4)
    for i, number in enumerate(["30", "10", "20"], start=1):
        apply_entry(
            state, encode_batch([Command(f"op-{number}", ExtensionCreated(number, "", "r", MD5, SHA, i))]), i
        )
    apply_entry(state, encode_batch([Command("op-x", ExtensionCreated("10", "", "r", MD5, SHA, 9.0))]), 9)
    restored = restore(snapshot(state))
    assert restored == state
    assert list(restored.extensions) == ["30", "10", "20"]
    assert list(restored.dedupe.items()) == [
        ("op-30", Applied({"extension": "30"})),
        ("op-10", Applied({"extension": "10"})),
        ("op-20", Applied({"extension": "20"})),
        ("op-x", Rejected("extension", "already exists")),
    ]
    assert (restored.applied_index, restored.digest, restored.dedupe_limit) == (9, state.digest, 4)
    assert isinstance(restored.dedupe, OrderedDict)


@settings(max_examples=40, deadline=None)
@given(workload_batches, st.data())
def test_restore_then_continue_equals_never_snapshotting(
    batches: list[list[Command]], data: st.DataObject
) -> None:
    cut = data.draw(st.integers(0, len(batches)))
    straight = State(dedupe_limit=6)
    outcomes_straight = run(straight, batches)

    before = State(dedupe_limit=6)
    outcomes = run(before, batches[:cut])
    blob = snapshot(before)
    after = restore(blob)
    assert after == before
    assert snapshot(after) == blob
    outcomes += run(after, batches[cut:], first_index=cut + 1)

    assert outcomes == outcomes_straight
    assert after == straight
    assert snapshot(after) == snapshot(straight)


def _valid_snapshot_map() -> dict[str, Any]:
    state = State(dedupe_limit=3)
    apply_entry(state, encode_batch([Command("a", ExtensionCreated("10", "Al", "r", MD5, SHA, 1.0))]), 1)
    apply_entry(state, encode_batch([Command("b", ExtensionCreated("10", "Al", "r", MD5, SHA, 1.0))]), 2)
    obj = msgpack.unpackb(snapshot(state))
    assert obj["format"] == SNAPSHOT_FORMAT
    return obj  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.update(format=SNAPSHOT_FORMAT + 1),
        lambda m: m.update(format=1),  # format 1 has no bindings or calls sections
        lambda m: m.pop("digest"),
        lambda m: m.update(extra=1),
        lambda m: m.update(digest=b"\x00" * 31),
        lambda m: m.update(digest="00" * 32),
        lambda m: m.update(applied_index=-1),
        lambda m: m.update(applied_index=1.0),
        lambda m: m.update(dedupe_limit=0),
        lambda m: m.update(dedupe_limit=1),  # window holds 2 > limit
        lambda m: m.update(dedupe=[["a", [0, {}]], ["a", [0, {}]]]),
        lambda m: m.update(dedupe=[["a", [2, "x"]]]),
        lambda m: m.update(dedupe=[["a", [0, {"k": [1]}]]]),
        lambda m: m.update(dedupe=[["", [0, {}]]]),
        lambda m: m.update(dedupe={"a": 1}),
        lambda m: m.update(extensions=[m["extensions"][0], m["extensions"][0]]),
        lambda m: m["extensions"][0].__setitem__(0, "1"),
        lambda m: m["extensions"][0].__setitem__(3, "XYZ"),
        lambda m: m["extensions"][0].__setitem__(5, None),
        lambda m: m["extensions"][0].pop(),
        lambda m: m.update(extensions={}),
    ],
)
def test_malformed_snapshots_are_refused(mutate: Any) -> None:
    obj = _valid_snapshot_map()
    restore(msgpack.packb(obj, use_bin_type=True))  # the unmutated map is fine
    mutate(obj)
    with pytest.raises(CodecError):
        restore(msgpack.packb(obj, use_bin_type=True))


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_any_bytes_restore_or_raise_codec_error(data: bytes) -> None:
    try:
        restore(data)
    except CodecError:
        pass


@given(st.data())
def test_corrupted_snapshot_bytes_restore_or_raise_codec_error(data: st.DataObject) -> None:
    blob = bytearray(msgpack.packb(_valid_snapshot_map(), use_bin_type=True))
    for _ in range(data.draw(st.integers(1, 3))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    try:
        state = restore(bytes(blob))
    except CodecError:
        return
    assert restore(snapshot(state)) == state
