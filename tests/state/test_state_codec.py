"""Log entry codec: round trips, golden bytes, upcasting, and total rejection of malformed input."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
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
    CodecError,
    Command,
    ContactUpdate,
    CredentialChanged,
    Event,
    ExtensionCreated,
    ExtensionDeleted,
    ExtensionUpdated,
    NodeDrained,
    NodeUndrained,
    RouteCreated,
    RouteDeleted,
    RouteUpdated,
    StateError,
    TrunkCreated,
    TrunkDeleted,
    TrunkUpdated,
    decode_batch,
    decode_command,
    encode_batch,
    encode_command,
    register_event,
)
from raftpbx.state.events import EVENT_SPECS
from state_strategies import any_command, any_event, any_instance

MD5 = "0" * 31 + "a"
SHA = "f" * 64

ONE_OF_EACH: list[Event] = [
    ExtensionCreated("1001", "Alice", "pbx.test", MD5, SHA, 1_700_000_000.25),
    ExtensionUpdated("1001", "Alice B", 1_700_000_001.5),
    CredentialChanged("1001", "pbx.test", MD5, SHA, 1_700_000_002.0),
    ExtensionDeleted("1001", 1_700_000_003.0),
    BindingsUpdated(
        "1001",
        "reg-1@127.0.0.1",
        7,
        "127.0.0.1:5062",
        "udp",
        ("<sip:127.0.0.1:5070;lr>",),
        "n1",
        5,
        (ContactUpdate("sip:1001@127.0.0.1:5062", "sip:1001@127.0.0.1:5062", "", 0, 3600, 0.5, ""),),
        1_700_000_004.0,
    ),
    BindingRemoved("1001", "c:sip:1001@127.0.0.1:5062", 1_700_000_005.0),
    BindingsCleared("1001", "reg-1@127.0.0.1", 8, 1_700_000_006.0),
    BindingsExpired(1_700_000_007.0),
    CallStarted(
        "c1@127.0.0.1", "1001", "1002", "ft", "sip:1001@127.0.0.1", "z9hG4bK1", "n1", 1_700_000_008.0
    ),
    CallRinging("c1@127.0.0.1", "n2", 1_700_000_009.0),
    CallAnswered("c1@127.0.0.1", "tt", "sip:1002@127.0.0.1", None, "n2", 1_700_000_010.0),
    CallRefreshed("c1@127.0.0.1", 1_700_001_810.0, "n2", 1_700_000_011.0),
    CallEnded("c1@127.0.0.1", "bye-caller", "caller", 200, "n3", 1_700_000_012.0),
    NodeDrained("node2", 1_700_000_013.0, "node1"),
    NodeUndrained("node2", 1_700_000_014.0),
    TrunkCreated("office-b", ("127.0.0.21:5060",), "udp", "", "", "", "", ("127.0.0.0/24",), 0, 1_700_000_015.0),
    TrunkUpdated("office-b", ("127.0.0.21:5060;transport=tcp",), "udp", "b.test", "a", MD5, SHA, (), 300,
                 1_700_000_016.0),
    RouteCreated("to-b", "2XXX", "office-b", 0, "", 10, 1_700_000_017.0),
    RouteUpdated("to-b", "9.", "office-b", 1, "00", 5, 1_700_000_018.0),
    RouteDeleted("to-b", 1_700_000_019.0),
    TrunkDeleted("office-b", 1_700_000_020.0),
]


def test_every_registered_event_is_exercised_here() -> None:
    assert {type(e) for e in ONE_OF_EACH} == set(EVENT_TYPES.values())


def test_codec_error_is_a_state_error() -> None:
    assert issubclass(CodecError, StateError)


@pytest.mark.parametrize("event", ONE_OF_EACH, ids=lambda e: type(e).__name__)
def test_round_trip_each_event_type(event: Event) -> None:
    commands = [Command("op-1", event), Command("op-2", event)]
    assert decode_batch(encode_batch(commands)) == commands


@given(st.lists(any_command, max_size=6))
def test_round_trip_any_batch(commands: list[Command]) -> None:
    assert decode_batch(encode_batch(commands)) == commands


@given(any_command)
def test_encoding_is_deterministic(command: Command) -> None:
    assert encode_command(command) == encode_command(decode_command(encode_command(command)))


def test_events_are_frozen_and_slotted() -> None:
    event = ONE_OF_EACH[0]
    with pytest.raises(AttributeError):
        event.extension = "2"  # type: ignore[misc]
    assert not hasattr(event, "__dict__")


# Golden bytes pin the wire format: a change here breaks every existing log and must be deliberate
# (bump schema_version and add an upcaster instead).
GOLDEN_COMMAND_V2 = bytes.fromhex(
    "".join(
        [
            "92",  # [op_id, event]
            "a46f702d31",  # "op-1"
            "93b0457874656e73696f6e43726561746564",  # ["ExtensionCreated",
            "02",  # schema_version 2,
            "86",  # {6 fields}
            "a9657874656e73696f6ea431303031",  # extension: "1001"
            "ac646973706c61795f6e616d65a5416c696365",  # display_name: "Alice"
            "a57265616c6da87062782e74657374",  # realm: "pbx.test"
            "a76861315f6d6435d920" + "30" * 31 + "61",  # ha1_md5: str8 of 32 chars
            "aa6861315f736861323536d940" + "66" * 64,  # ha1_sha256: str8 of 64 chars
            "a26174cb41d954fc40100000",  # at: float64 1700000000.25
        ]
    )
)


def test_golden_command_bytes() -> None:
    command = Command("op-1", ONE_OF_EACH[0])
    assert encode_command(command) == GOLDEN_COMMAND_V2
    assert decode_command(GOLDEN_COMMAND_V2) == command


def _v1_created(**overrides: Any) -> bytes:
    fields: dict[str, Any] = {
        "extension": "1001",
        "realm": "pbx.test",
        "ha1_md5": MD5,
        "ha1_sha256": SHA,
        "at": 1_600_000_000.0,
    }
    fields.update(overrides)
    return msgpack.packb(["old-op", ["ExtensionCreated", 1, fields]], use_bin_type=True)


def test_extension_created_v1_is_upcast_to_v2_without_display_name() -> None:
    """A v1 ExtensionCreated (before display names existed), as written by old nodes, still decodes."""
    v1 = _v1_created()
    entry = msgpack.packb([1, [v1]], use_bin_type=True)
    (command,) = decode_batch(entry)
    assert command == Command("old-op", ExtensionCreated("1001", "", "pbx.test", MD5, SHA, 1_600_000_000.0))
    assert ExtensionCreated.schema_version == 2


def test_v1_with_a_display_name_is_malformed() -> None:
    with pytest.raises(CodecError, match="v1"):
        decode_command(_v1_created(display_name="Alice"))


def test_v1_missing_a_field_is_rejected_after_upcasting() -> None:
    with pytest.raises(CodecError, match="ha1_md5"):
        decode_command(_v1_created(ha1_md5=None))
    fields_without_at = {"extension": "1001", "realm": "r", "ha1_md5": MD5, "ha1_sha256": SHA}
    with pytest.raises(CodecError):
        decode_command(msgpack.packb(["x", ["ExtensionCreated", 1, fields_without_at]]))


def _command_bytes(name: Any, version: Any, fields: Any, op_id: Any = "op") -> bytes:
    return msgpack.packb([op_id, [name, version, fields]], use_bin_type=True)


def _created_fields() -> dict[str, Any]:
    return {
        "extension": "1001",
        "display_name": "",
        "realm": "pbx.test",
        "ha1_md5": MD5,
        "ha1_sha256": SHA,
        "at": 1.0,
    }


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_command_bytes("ExtensionCreated", 3, _created_fields()), "newer"),
        (_command_bytes("ExtensionCreated", 0, _created_fields()), "positive"),
        (_command_bytes("ExtensionCreated", True, _created_fields()), "positive"),
        (_command_bytes("ExtensionExploded", 1, _created_fields()), "unknown event"),
        (_command_bytes("ExtensionCreated", 2, {**_created_fields(), "pin": "1234"}), "expected fields"),
        (_command_bytes("ExtensionCreated", 2, {**_created_fields(), "at": 1}), "float"),
        (_command_bytes("ExtensionCreated", 2, {**_created_fields(), "at": math.nan}), "finite"),
        (_command_bytes("ExtensionCreated", 2, {**_created_fields(), "at": math.inf}), "finite"),
        (_command_bytes("ExtensionCreated", 2, {**_created_fields(), "extension": b"1001"}), "string"),
        (_command_bytes("ExtensionCreated", 2, _created_fields(), op_id=""), "op_id"),
        (_command_bytes("ExtensionCreated", 2, _created_fields(), op_id=7), "op_id"),
        (_command_bytes("ExtensionCreated", 2, _created_fields(), op_id="x" * 129), "op_id"),
        (_command_bytes("ExtensionCreated", 2, [1, 2]), "map"),
        (msgpack.packb(["op", ["ExtensionCreated", 2]]), "array"),
        (msgpack.packb(["op"]), "array"),
        (b"\xc1", "msgpack"),
        (msgpack.packb(["op", ["ExtensionDeleted", 1, {"extension": "10", "at": 1.0}]]) + b"\x00", "msgpack"),
    ],
)
def test_malformed_commands_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(CodecError, match=reason):
        decode_command(data)


@pytest.mark.parametrize(
    "entry",
    [
        b"",
        msgpack.packb([2, []]),
        msgpack.packb([1]),
        msgpack.packb({"format": 1}),
        msgpack.packb([1, ["not bytes"]]),
        msgpack.packb([1, [b"\x93"]], use_bin_type=True),
        msgpack.packb([True, []]),
    ],
)
def test_malformed_entries_are_refused(entry: bytes) -> None:
    with pytest.raises(CodecError):
        decode_batch(entry)


def test_one_bad_command_refuses_the_whole_batch() -> None:
    good = encode_command(Command("a", ONE_OF_EACH[3]))
    bad = _command_bytes("ExtensionCreated", 9, _created_fields())
    with pytest.raises(CodecError, match="command 1"):
        decode_batch(msgpack.packb([1, [good, bad]], use_bin_type=True))


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_codec_error(data: bytes) -> None:
    try:
        decode_batch(data)
    except CodecError:
        pass
    try:
        decode_command(data)
    except CodecError:
        pass


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)


_ANY_EVENT = any_event()  # built once: building it per draw made generation too slow


@st.composite
def plausible_garbage_commands(draw: st.DrawFn) -> bytes:
    """A valid command's wire form with one thing broken: a field value, a field, the name or version."""
    event = draw(_ANY_EVENT)
    op_id, (name, version, fields) = msgpack.unpackb(encode_command(Command("op", event)))
    mutation = draw(st.sampled_from(["value", "drop", "add", "name", "version", "op_id", "fields"]))
    if mutation == "value":
        fields[draw(st.sampled_from(sorted(fields)))] = draw(msgpack_values)
    elif mutation == "drop":
        del fields[draw(st.sampled_from(sorted(fields)))]
    elif mutation == "add":
        fields[draw(st.text(max_size=12))] = draw(msgpack_values)
    elif mutation == "name":
        name = draw(st.sampled_from(sorted(EVENT_TYPES)) | msgpack_values)
    elif mutation == "version":
        version = draw(st.integers(-2, 4) | msgpack_values)
    elif mutation == "op_id":
        op_id = draw(msgpack_values)
    else:
        fields = draw(msgpack_values)
    return _command_bytes(name, version, fields, op_id)


@settings(max_examples=200)
@given(plausible_garbage_commands())
def test_plausible_garbage_decodes_or_raises_codec_error(data: bytes) -> None:
    try:
        command = decode_command(data)
    except CodecError:
        return
    # Whatever got through (possibly upcast) must be a well-typed command that round-trips.
    assert decode_command(encode_command(command)) == command


@settings(max_examples=100)
@given(msgpack_values, st.lists(st.binary(max_size=30) | msgpack_values, max_size=3))
def test_garbage_envelopes_raise_codec_error_only(top: Any, items: list[Any]) -> None:
    for obj in (top, [1, items], [top, items]):
        try:
            decode_batch(msgpack.packb(obj, use_bin_type=True))
        except CodecError:
            pass


@given(any_event(), st.data())
def test_flipping_bytes_of_a_valid_entry_never_raises_anything_else(
    event: Event, data: st.DataObject
) -> None:
    entry = bytearray(encode_batch([Command("op", event)]))
    position = data.draw(st.integers(0, len(entry) - 1))
    entry[position] = data.draw(st.integers(0, 255))
    try:
        decode_batch(bytes(entry))
    except CodecError:
        pass


def test_encoding_refuses_values_that_would_not_decode() -> None:
    with pytest.raises(CodecError):
        encode_command(Command("op", ExtensionDeleted(None, 1.0)))  # type: ignore[arg-type]
    with pytest.raises(CodecError):
        encode_command(Command("op", ExtensionDeleted("10", math.nan)))
    with pytest.raises(CodecError):
        encode_command(Command("", ExtensionDeleted("10", 1.0)))
    with pytest.raises(CodecError):
        encode_command(Command("op", Event()))


def test_int_times_are_encoded_as_floats() -> None:
    (command,) = decode_batch(encode_batch([Command("op", ExtensionDeleted("10", 5))]))
    assert type(command.event.at) is float  # type: ignore[attr-defined]


def test_registration_refuses_misdeclared_events() -> None:
    from dataclasses import dataclass

    with pytest.raises(TypeError):

        @register_event
        @dataclass(frozen=True, slots=True)
        class ExtensionUpdated(Event):  # name already taken
            extension: str

    with pytest.raises(TypeError):

        @register_event
        @dataclass(slots=True)
        class SomethingHappened(Event):  # not frozen
            what: str

    with pytest.raises(TypeError):

        @register_event
        @dataclass(frozen=True, slots=True)
        class ListMade(Event):  # unsupported field type
            items: list[str]

    assert "SomethingHappened" not in EVENT_TYPES and "ListMade" not in EVENT_TYPES


# A richer event, registered by this test module, exercises optional, tuple, bytes, bool, int and nested
# record fields the way later events (bindings, calls) will use them.
from dataclasses import dataclass as _dataclass  # noqa: E402


@_dataclass(frozen=True, slots=True)
class _Contact:
    uri: str
    expires: int
    q: float | None


@_dataclass(frozen=True, slots=True)
class _Later(Event):
    aor: str
    contacts: tuple[_Contact, ...]
    flow: bytes
    secure: bool
    note: str | None
    at: float


@pytest.fixture
def later_registered() -> Iterator[None]:
    register_event(_Later)
    yield
    del EVENT_TYPES["_Later"]
    del EVENT_SPECS[_Later]


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(any_instance(_Later))
def test_round_trip_includes_nested_records(later_registered: None, event: Event) -> None:
    command = Command("op", event)
    assert decode_command(encode_command(command)) == command


def test_nested_record_malformed_is_codec_error(later_registered: None) -> None:
    good = encode_command(
        Command("op", _Later("a", (_Contact("sip:a@127.0.0.1", 60, None),), b"", True, None, 1.0))
    )
    obj = msgpack.unpackb(good)
    obj[1][2]["contacts"][0]["expires"] = "60"
    with pytest.raises(CodecError, match="contacts"):
        decode_command(msgpack.packb(obj, use_bin_type=True))
    obj[1][2]["contacts"] = [{"uri": "x"}]
    with pytest.raises(CodecError):
        decode_command(msgpack.packb(obj, use_bin_type=True))
