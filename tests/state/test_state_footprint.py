"""Memory of the hot state (issue 8): compact records, shared strings, a compact dedupe window.

Each test checks a representation choice through the public behaviour it must not change (equality, reads,
snapshots) and the property that saves the memory (shared objects, bytes instead of objects).
"""

from __future__ import annotations

from collections import OrderedDict

import msgpack
from raftpbx.state import (
    Applied,
    BindingsUpdated,
    Command,
    ContactUpdate,
    Duplicate,
    ExtensionCreated,
    Rejected,
    State,
    apply_entry,
    encode_batch,
    restore,
    snapshot,
)
from raftpbx.state.model import DedupeWindow, Extension, intern_text

MD5 = "0123456789abcdef" * 2
SHA = "fedcba9876543210" * 4
T0 = 1_764_000_000.0


def _register(number: str, host: str, node: str = "node1") -> Command:
    uri = f"sip:{number}@{host}:5062"
    return Command(f"reg-{number}", BindingsUpdated(number, f"cid-{number}", 1, f"{host}:5062", "udp", (), node, 10,
                                                    (ContactUpdate(uri, uri, "", 0, 3600, None, ""),), T0))


def _state() -> State:
    state = State()
    commands = [Command(f"x-{n}", ExtensionCreated(n, "", "pbx.test", MD5, SHA, T0)) for n in ("1001", "1002")]
    apply_entry(state, encode_batch(commands), 1)
    apply_entry(state, encode_batch([_register("1001", "127.0.0.5"), _register("1002", "127.0.0.6")]), 2)
    return state


def test_extension_keeps_its_ha1s_as_48_bytes_and_gives_the_hex_back() -> None:
    record = Extension("1001", "Alice", "pbx.test", MD5, SHA, T0, T0)
    assert record.ha1 == bytes.fromhex(MD5 + SHA) and len(record.ha1) == 48
    assert (record.ha1_md5, record.ha1_sha256) == (MD5, SHA)
    assert record == Extension("1001", "Alice", "pbx.test", MD5, SHA, T0, T0)
    assert record != Extension("1001", "Alice", "pbx.test", MD5, SHA[::-1], T0, T0)
    assert MD5 not in repr(record) and "ha1" not in repr(record)  # password-equivalent: never in a log
    odd = Extension("1001", "Alice", "pbx.test", MD5.upper(), "x", T0, T0)  # never accepted by apply
    assert (odd.ha1_md5, odd.ha1_sha256) == (MD5.upper(), "x")


def test_records_share_repeated_strings() -> None:
    state = _state()
    for number, table in state.bindings.items():
        key = next(k for k in state.extensions if k == number)
        for binding in table.values():
            assert binding.aor is key  # the extension's own key object, not the event's copy
    first, second = (next(iter(t.values())) for t in state.bindings.values())
    assert first.transport is second.transport and first.node_id is second.node_id
    a, b = state.extensions.values()
    assert a.realm is b.realm
    assert intern_text("x" * 65) == "x" * 65  # long strings are left alone (still equal)


def test_dedupe_window_keeps_packed_outcomes_and_reads_them_back() -> None:
    window = DedupeWindow()
    window["a"] = Applied({"aor": "1001", "added": 1, "removed": 0})
    window["b"] = Rejected("aor", "no such extension")
    raw = OrderedDict.__getitem__(window, "a")
    assert type(raw) is bytes and msgpack.unpackb(raw) == [0, {"aor": "1001", "added": 1, "removed": 0}]
    assert window["a"] == Applied({"aor": "1001", "added": 1, "removed": 0})
    assert window.get("b") == Rejected("aor", "no such extension") and window.get("c") is None
    assert window.items() == [("a", window["a"]), ("b", window["b"])] and list(window) == ["a", "b"]
    assert window == DedupeWindow(OrderedDict(window.items()))
    assert window != DedupeWindow({"a": Applied({"aor": "1001", "added": 1, "removed": 1})})
    window.popitem(last=False)
    assert list(window) == ["b"]


def test_duplicates_still_answer_the_first_outcome_after_a_restore() -> None:
    state = _state()
    restored = restore(snapshot(state))
    assert restored == state and type(restored.dedupe) is DedupeWindow
    again = apply_entry(restored, encode_batch([_register("1001", "127.0.0.5")]), 3)
    assert again == [Duplicate(Applied({"aor": "1001", "added": 1, "removed": 0}))]
    plain = State(dedupe=OrderedDict([("z", Applied({"k": 1}))]))  # any mapping given is made compact
    assert type(plain.dedupe) is DedupeWindow and plain.dedupe["z"] == Applied({"k": 1})
