"""Fast paths of the registration hot path agree with the general code they shortcut.

- op_ids: the direct JSON text equals `json.dumps` (an op_id that changed would break retransmission
  dedupe between nodes running different builds);
- `_check_update`: the one-expression test passes only events that every individual check passes, and the
  general checks still name the first failing field.
"""

from __future__ import annotations

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st
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
