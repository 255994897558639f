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
from snapshot_formats import as_format_4
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
        lambda m: m.update(extensions=7),
    ],
)
@pytest.mark.parametrize("layout", [5, 4])
def test_malformed_snapshots_are_refused(mutate: Any, layout: int) -> None:
    obj = _valid_snapshot_map() if layout == 5 else as_format_4(_valid_snapshot_map())
    restore(msgpack.packb(obj, use_bin_type=True))  # the unmutated map is fine
    mutate(obj)
    with pytest.raises(CodecError):
        restore(msgpack.packb(obj, use_bin_type=True))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.update(extensions=[m["extensions"][0], m["extensions"][0]]),
        lambda m: m["extensions"][0].__setitem__(0, "1"),
        lambda m: m["extensions"][0].__setitem__(3, "XYZ"),
        lambda m: m["extensions"][0].__setitem__(3, MD5.upper()),
        lambda m: m["extensions"][0].__setitem__(5, None),
        lambda m: m["extensions"][0].pop(),
        lambda m: m.update(extensions={}),
    ],
)
def test_malformed_format_4_rows_are_refused(mutate: Any) -> None:
    obj = as_format_4(_valid_snapshot_map())
    restore(msgpack.packb(obj, use_bin_type=True))
    mutate(obj)
    with pytest.raises(CodecError):
        restore(msgpack.packb(obj, use_bin_type=True))


def _pack(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def _column(name: str, value: Any) -> Any:
    return lambda m: m["extensions"][name].__setitem__(0, value)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.update(extensions=[]),
        lambda m: m["extensions"].pop("realm"),
        lambda m: m["extensions"].update(extra=[1]),
        lambda m: m["extensions"].update(realm="r"),
        lambda m: m["extensions"]["realm"].append("r"),  # columns of different lengths
        lambda m: [m["extensions"][name].append(m["extensions"][name][0]) for name in m["extensions"]],  # duplicate
        _column("extension", "1"),
        _column("extension", 10),
        _column("display_name", "x" * 1000),
        _column("realm", ""),
        _column("ha1", b"\x00" * 47),
        _column("ha1", "00" * 48),
        _column("created_at", 1),
        _column("created_at", float("nan")),
        _column("updated_at", None),
        lambda m: m["dedupe"].update(op_id=["a", "a"], outcome=[_pack([0, {}]), _pack([0, {}])]),
        lambda m: m["dedupe"].update(op_id=[""]),
        lambda m: m["dedupe"].update(op_id=[1]),
        lambda m: m["dedupe"]["outcome"].__setitem__(0, [0, {}]),  # not packed
        lambda m: m["dedupe"]["outcome"].__setitem__(0, _pack([0, {"k": [1]}])),
        lambda m: m["dedupe"]["outcome"].__setitem__(0, _pack([2, "x"])),
        lambda m: m["dedupe"]["outcome"].__setitem__(0, b"\xc1"),  # not msgpack
        lambda m: m["dedupe"]["outcome"].__setitem__(0, _pack([0, {}]) + b"\x00"),  # trailing bytes
        lambda m: m["dedupe"]["outcome"].__setitem__(0, b"\x92\x00\xde\x00\x00"),  # not canonical
        lambda m: m["dedupe"]["outcome"].pop(),
        lambda m: m["dedupe"].pop("outcome"),
    ],
)
def test_malformed_format_5_columns_are_refused(mutate: Any) -> None:
    obj = _valid_snapshot_map()
    restore(msgpack.packb(obj, use_bin_type=True))
    mutate(obj)
    with pytest.raises(CodecError):
        restore(msgpack.packb(obj, use_bin_type=True))


def test_format_4_snapshots_restore_to_the_same_state() -> None:
    """Compatibility: a format 4 snapshot (rows, hex HA1s) of a state restores to that state, whose snapshot is
    then written in format 5."""
    state = State(dedupe_limit=10)
    run(state, [[Command("a", ExtensionCreated("10", "Al", "r", MD5, SHA, 1.0))],
                [Command("b", ExtensionCreated("11", "", "r", SHA[:32], SHA, 2.0))]])
    v5 = msgpack.unpackb(snapshot(state))
    v4 = msgpack.packb(as_format_4(v5), use_bin_type=True)
    restored = restore(v4)
    assert restored == state and restored.extensions["11"].ha1_md5 == SHA[:32]
    assert snapshot(restored) == snapshot(state)


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
