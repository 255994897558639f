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
    Command,
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
