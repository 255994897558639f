"""Fast paths of the registration hot path agree with the general code they shortcut.

- op_ids: the direct JSON text equals `json.dumps` (an op_id that changed would break retransmission
  dedupe between nodes running different builds);
- `_check_update`: the one-expression test passes only events that every individual check passes, and the
  general checks still name the first failing field;
- the compiled event decoders (`codec._compile`) build exactly what the general converters build, and accept
  nothing the general path refuses (which then names the field);
- `model.fast_constructor` builds instances equal to, and as frozen as, the dataclass constructor's.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from raftpbx.state import Command, Event
from raftpbx.state import codec as _codec
from raftpbx.state.bindings import (
    MAX_CSEQ,
    MAX_EXPIRES,
    MAX_FIELD,
    BindingsUpdated,
    ContactUpdate,
    _check_update,
    _json_parts,
    _update_ok,
    register_op_id,
)
from raftpbx.state.events import EVENT_SPECS, EVENT_TYPES
from raftpbx.state.model import Binding, fast_constructor
from raftpbx.state.schema import fields_from_wire
from state_strategies import any_event, any_instance

_texts = st.one_of(
    st.text(max_size=12),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30),
    st.sampled_from(['"', "\\", "\x7f", "\x00", "é", "\u2028", ""]),
)
_parts = st.lists(st.one_of(_texts, st.integers(min_value=-(2**40), max_value=2**40)), max_size=6).map(tuple)


@settings(max_examples=400, deadline=None)
@given(_parts)
def test_json_parts_is_json_dumps(parts: tuple[object, ...]) -> None:
    assert _json_parts(parts) == json.dumps(parts, ensure_ascii=True, separators=(",", ":"))


def test_json_parts_falls_back_for_other_types() -> None:
    for parts in [(True, 1), (1.5,), (None, "a"), ("a", ["b"])]:
        assert _json_parts(parts) == json.dumps(parts, ensure_ascii=True, separators=(",", ":"))


def test_register_op_id_is_unchanged() -> None:
    # Pinned: the value the json.dumps implementation gave (a change breaks dedupe across builds).
    assert register_op_id("2001", "abc@127.0.0.1", 7, "z9hG4bK1") == (
        "reg-" + __import__("hashlib").sha256(b'["2001","abc@127.0.0.1",7,"z9hG4bK1"]').hexdigest()[:40]
    )


_lengths = st.sampled_from([0, 1, 5, MAX_FIELD, MAX_FIELD + 1])


@st.composite
def _updates(draw: st.DrawFn) -> tuple[BindingsUpdated, list[str]]:
    def text(empty_ok: bool = True) -> str:
        return "x" * draw(_lengths)

    contacts = tuple(
        ContactUpdate(
            contact=text(),
            contact_key=draw(st.sampled_from(["k1", "k2", "", "k" * (MAX_FIELD + 1)])),
            instance_id=text(),
            reg_id=draw(st.sampled_from([-1, 0, 1, MAX_CSEQ, MAX_CSEQ + 1])),
            expires=draw(st.sampled_from([-1, 0, 60, MAX_EXPIRES, MAX_EXPIRES + 1])),
            q=draw(st.sampled_from([None, 0.0, 0.5, 1.0, 1.5, -0.1, math.nan])),
            flow=text(),
        )
        for _ in range(draw(st.integers(min_value=0, max_value=3)))
    )
    event = BindingsUpdated(
        aor="2001",
        call_id=text(),
        cseq=draw(st.sampled_from([-1, 0, 5, MAX_CSEQ, MAX_CSEQ + 1])),
        received=text(),
        transport=text(),
        path=tuple(text() for _ in range(draw(st.integers(min_value=0, max_value=2)))),
        node_id=text(),
        max_contacts=draw(st.sampled_from([0, 1, 10])),
        contacts=contacts,
        at=1.0,
    )
    return event, [c.key for c in contacts]


def _slow(event: BindingsUpdated, keys: list[str]) -> object:
    """`_check_update` with the fast test forced off."""
    import raftpbx.state.bindings as bindings

    saved = bindings._update_ok
    bindings._update_ok = lambda *_: False  # type: ignore[assignment]
    try:
        return _check_update(event, keys)
    finally:
        bindings._update_ok = saved


@settings(max_examples=500, deadline=None)
@given(_updates())
def test_fast_update_check_agrees_with_each_check(case: tuple[BindingsUpdated, list[str]]) -> None:
    event, keys = case
    slow = _slow(event, keys)
    assert _update_ok(event, keys) == (slow is None)
    assert _check_update(event, keys) == slow


# --- compiled decoders and fast constructors (codec._compile, model.fast_constructor) -----------------------

def _general(event_type: type[Event], fields: Any) -> Event:
    return event_type(**fields_from_wire(EVENT_SPECS[event_type], fields, event_type.__name__))


def test_every_registered_event_has_a_compiled_decoder() -> None:
    # A decoder that silently fell back for an event type would only cost speed; this names the type.
    assert [name for name, cls in EVENT_TYPES.items() if _codec._compile(cls) is None] == []


@settings(max_examples=300, deadline=None)
@given(any_event())
def test_compiled_decoder_builds_what_the_general_path_builds(event: Event) -> None:
    fields = msgpack.unpackb(_codec.encode_command(Command("op", event)), raw=False)[1][2]
    fast = _codec._fast_event(type(event), fields)
    assert fast == _general(type(event), fields) == event
    assert type(fast) is type(event)


_odd_values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**64), max_value=2**64), st.floats(), st.text(max_size=3),
    st.binary(max_size=3), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(),
                                                                                max_size=2),
)


@settings(max_examples=400, deadline=None)
@given(any_event(), st.data())
def test_compiled_decoder_never_accepts_what_the_general_path_refuses(event: Event, data: st.DataObject) -> None:
    # Damage one field (a wrong type, a value out of range, a missing or extra key): the compiled decoder
    # either refuses (the general path then names the field) or builds exactly what the general path builds.
    fields = msgpack.unpackb(_codec.encode_command(Command("op", event)), raw=False)[1][2]
    damaged = dict(fields)
    action = data.draw(st.sampled_from(["replace", "drop", "add"]))
    if action == "add":
        damaged["zz_extra"] = 1
    elif damaged:
        key = data.draw(st.sampled_from(sorted(damaged)))
        if action == "drop":
            del damaged[key]
        else:
            damaged[key] = data.draw(_odd_values)
    fast = _codec._fast_event(type(event), damaged)
    try:
        general: Any = _general(type(event), damaged)
    except _codec.CodecError:
        general = _codec._MISS
    if fast is not _codec._MISS:
        assert fast == general
        assert type(fast) is type(event)


@settings(max_examples=200, deadline=None)
@given(any_instance(Binding))
def test_fast_constructor_builds_an_equal_frozen_instance(binding: Binding) -> None:
    make = fast_constructor(Binding)
    assert make is not Binding  # the fast path is in use for the hot record
    values = [getattr(binding, f) for f in Binding.__slots__]
    built = make(*values)
    assert type(built) is Binding
    assert built == binding and hash(built) == hash(binding)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.aor = "x"  # type: ignore[misc]


def test_fast_constructor_keeps_the_plain_constructor_where_it_cannot_help() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Checked:
        value: int

        def __post_init__(self) -> None:
            if self.value < 0:
                raise ValueError("negative")

    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        value: int

    assert fast_constructor(Checked) is Checked
    assert fast_constructor(NoSlots) is NoSlots


# --- compiled encoders and the one-frame command decode ---------------------------------------------------


def _general_wire(event: Event) -> list[Any]:
    cls = type(event)
    return [cls.__name__, cls.schema_version,
            {spec.name: spec.to_wire(getattr(event, spec.name)) for spec in EVENT_SPECS[cls]}]


def test_every_registered_event_has_a_compiled_encoder() -> None:
    assert [name for name, cls in EVENT_TYPES.items() if _codec._compile_encoder(cls) is None] == []


@settings(max_examples=300, deadline=None)
@given(any_event())
def test_compiled_encoder_writes_the_bytes_the_general_path_writes(event: Event) -> None:
    fields = _codec._compile_encoder(type(event))(event)  # type: ignore[misc]
    assert fields is not _codec._MISS
    assert msgpack.packb(fields, use_bin_type=True) == msgpack.packb(_general_wire(event)[2], use_bin_type=True)
    assert _codec.event_to_wire(event) == _general_wire(event)


@settings(max_examples=400, deadline=None)
@given(any_event(), st.data())
def test_compiled_encoder_never_accepts_what_the_general_path_refuses(event: Event, data: st.DataObject) -> None:
    # A field set to a value of another type (as a caller bypassing the annotations could): the compiled
    # encoder refuses it (the general path then converts it, an int for a float, or names the field), or
    # writes exactly what the general path writes.
    name = data.draw(st.sampled_from([f.name for f in dataclasses.fields(event)]))
    object.__setattr__(event, name, data.draw(_odd_values))
    fast = _codec._compile_encoder(type(event))(event)  # type: ignore[misc]
    try:
        general: Any = _general_wire(event)[2]
    except _codec.CodecError:
        general = _codec._MISS
        with pytest.raises(_codec.CodecError, match=name):
            _codec.event_to_wire(event)
    if fast is not _codec._MISS:
        assert msgpack.packb(fast, use_bin_type=True) == msgpack.packb(general, use_bin_type=True)


def test_an_int_for_a_float_field_still_encodes_as_a_float() -> None:
    event = BindingsUpdated("100", "c", 1, "r", "udp", (), "n1", 5, (), 0)  # type: ignore[arg-type]
    assert _codec._compile_encoder(BindingsUpdated)(event) is _codec._MISS  # type: ignore[misc]
    assert _codec.event_to_wire(event)[2]["at"] == 0.0 and type(_codec.event_to_wire(event)[2]["at"]) is float


@settings(max_examples=300, deadline=None)
@given(any_event(), st.text(min_size=1, max_size=128))
def test_one_frame_command_decode_builds_what_decode_command_builds(event: Event, op_id: str) -> None:
    data = _codec.encode_command(Command(op_id, event))
    assert _codec._fast_command(data) == _codec.decode_command(data) == Command(op_id, event)


def _packed(*parts: Any) -> bytes:
    try:
        return msgpack.packb(list(parts), use_bin_type=True)
    except OverflowError:  # an int beyond 64 bits has no msgpack form
        return b"\x90"


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=40),
    st.builds(lambda op, name, version, fields: _packed(op, [name, version, fields]),
              _odd_values, st.sampled_from([*EVENT_TYPES, "Nope"]), _odd_values, _odd_values),
    st.builds(lambda op, event: _packed(op, _codec.event_to_wire(event)), _odd_values, any_event()),
))
def test_one_frame_command_decode_refuses_what_decode_command_refuses(data: bytes) -> None:
    fast = _codec._fast_command(data)
    try:
        general: Any = _codec.decode_command(data)
    except _codec.CodecError:
        general = _codec._MISS
    if fast is not _codec._MISS:
        assert fast == general
