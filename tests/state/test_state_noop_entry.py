"""The read barrier's entry (`replication.NOOP_ENTRY`, an empty batch) changes nothing but `applied_index`.

`apply_leader_commits` proposes it on every 404/480 and admin refusal re-check, so it must be taken by
everything that sees committed entries: apply (no outcome), the dedupe window, the digest chain, the apply
listeners (the call-record projection, the drain flag, membership), snapshots.
"""

from __future__ import annotations

import hashlib
from typing import Any

from raftpbx.state import (
    Command,
    ExtensionCreated,
    State,
    apply_entry,
    decode_batch,
    digest_hex,
    encode_batch,
    restore,
    snapshot,
)

from raftpbx.replication import NOOP_ENTRY
from raftpbx.service import StateMachine

MD5 = hashlib.md5(b"100:pbx.test:correct horse").hexdigest()
SHA = hashlib.sha256(b"100:pbx.test:correct horse").hexdigest()


def created(op_id: str, number: str) -> bytes:
    return encode_batch([Command(op_id, ExtensionCreated(number, "", "pbx.test", MD5, SHA, 10.0))])


def test_the_noop_entry_is_an_empty_batch() -> None:
    assert encode_batch([]) == NOOP_ENTRY
    assert decode_batch(NOOP_ENTRY) == []


def test_applying_the_noop_moves_the_index_and_nothing_else() -> None:
    state = State()
    apply_entry(state, created("op-1", "100"), 1)
    before = snapshot(state)
    digest, window = state.digest, list(state.dedupe.items())
    assert apply_entry(state, NOOP_ENTRY, 2) == []
    assert state.applied_index == 2
    assert state.digest == digest and list(state.dedupe.items()) == window
    assert list(state.extensions) == ["100"]
    # A node that applied the no-op and one that did not agree on everything but the index.
    other = restore(before)
    other.applied_index = 2
    assert snapshot(other) == snapshot(state)
    assert digest_hex(restore(snapshot(state))) == digest_hex(state)
    # Entries after it apply as usual, and chain on the same digest on every node.
    plain = restore(before)
    apply_entry(plain, created("op-2", "101"), 3)
    apply_entry(state, created("op-2", "101"), 3)
    assert state.digest == plain.digest


def test_a_replayed_noop_is_ignored() -> None:
    state = State()
    apply_entry(state, NOOP_ENTRY, 5)
    assert apply_entry(state, NOOP_ENTRY, 5) == [] and state.applied_index == 5


def test_no_apply_listener_sees_the_noop() -> None:
    machine = StateMachine()
    seen: list[tuple[int, Any]] = []
    machine.add_apply_listener(lambda index, applied: seen.append((index, list(applied))))
    assert machine.apply(NOOP_ENTRY, 1) == []
    assert seen == [] and machine.state.applied_index == 1
    machine.apply(created("op-1", "100"), 2)
    assert [index for index, _ in seen] == [2]
