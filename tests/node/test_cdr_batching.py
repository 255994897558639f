"""The call-record writer's batched upserts (raftpbx/cdr.py, "Cost"): multi-row statements must mean exactly
what one upsert per row meant, and the writer must take a burst in few transactions.

A naive model (one `_UPSERT` per row, row by row, in a plain SQLite connection) is the reference: the same
items fed to `CdrStore` in one burst must leave the same table, whatever the sizes (chunks of 128, 64, ... 1
rows), the repeated call ids, and the older Raft indexes that must not win.
"""

from __future__ import annotations

import queue
import random
import sqlite3
from pathlib import Path

import pytest
from raftpbx.state import CallAnswered, CallEnded, CallStarted, Command, call_op_id, encode_batch

from raftpbx import cdr
from raftpbx.cdr import CdrProjector, CdrStore
from raftpbx.service import StateMachine

T0 = 1_764_000_000.0


def _row(call_id: str, index: int, answered: float | None) -> tuple[object, ...]:
    return (call_id, "1001", "1002", T0, answered, None, None, 0, None, None, None, None, '["n1"]', index, "", "")


def _table(path: Path) -> list[tuple[object, ...]]:
    db = sqlite3.connect(path)
    try:
        return sorted(db.execute("SELECT * FROM cdr").fetchall())
    finally:
        db.close()


@pytest.mark.parametrize("count", [1, 2, 63, 64, 127, 128, 129, 255, 256, 300, 1000])
def test_chunks_cover_every_row_with_few_distinct_statements(count: int) -> None:
    sizes = cdr._chunks(count)
    assert sum(sizes) == count
    assert all(0 < s <= cdr.UPSERT_CHUNK for s in sizes)
    assert len(set(sizes)) <= 8  # each size is one cached statement


@pytest.mark.parametrize("rows", [1, 7, 128, 200, 777])
def test_a_burst_leaves_what_row_by_row_upserts_leave(tmp_path: Path, rows: int) -> None:
    rng = random.Random(rows)
    ids = [f"c{i}" for i in range(rows)]
    # Two items, each written in one transaction (an item is never split): the first sets random indexes,
    # the second upserts every call again with random indexes, older (must not win) or newer (must win).
    first = [_row(cid, rng.randrange(1, 10_000), T0) for cid in ids if rng.random() < 0.7]
    second = [_row(cid, rng.randrange(1, 10_000), T0 + 1) for cid in ids]
    naive = tmp_path / "naive.sqlite3"
    CdrStore(naive).close()  # the schema
    db = sqlite3.connect(naive, isolation_level=None)
    for row in [*first, *second]:
        db.execute(cdr._UPSERT, row)  # the reference: one upsert per row (the old executemany)
    db.close()
    store = CdrStore(tmp_path / "batched.sqlite3")
    try:
        store.enqueue(10_000, first)
        assert store.flush()
        store.enqueue(10_001, second)
        assert store.flush()
        assert store.last_index() == 10_001
    finally:
        store.close()
    assert _table(tmp_path / "batched.sqlite3") == _table(naive)


def test_projected_calls_build_their_rows_on_the_writer(tmp_path: Path) -> None:
    """The apply listener queues Call values; the rows are the calls' records at their last index."""
    machine = StateMachine()
    store = CdrStore(tmp_path / "cdr.sqlite3")
    CdrProjector(store).attach(machine)
    try:
        entries = []
        for i in range(150):
            cid = f"call-{i}"
            events = [CallStarted(cid, "1001", "1002", "ft", "sip:1001@127.0.0.1", "z9hG4bK1", "n1", T0 + i)]
            if i % 2 == 0:
                events.append(CallAnswered(cid, "tt", "sip:1002@127.0.0.1", None, "n2", T0 + i + 1))
            if i % 3 == 0:
                events.append(CallEnded(cid, "bye-caller", "caller", 200, "n3", T0 + i + 5))
            entries.append(encode_batch([Command(call_op_id(cid, type(e).__name__), e) for e in events]))
        for index, entry in enumerate(entries, 1):
            machine.apply(entry, index)
        records = {r["call_id"]: r for r in store.iter_all()} if store.flush() else {}
        assert len(records) == 150
        assert store.last_index() == 150
        for i in range(150):
            record = records[f"call-{i}"]
            assert (record["answered_at"] is not None) == (i % 2 == 0)
            assert (record["ended_at"] is not None) == (i % 3 == 0)
            if i % 6 == 0:
                assert record["disposition"] == "answered"
                assert record["nodes"] == ["n1", "n2", "n3"]
        assert store.transactions < 150  # a burst of entries is written in few transactions
    finally:
        store.close()


class _CountingQueue(queue.SimpleQueue):  # type: ignore[type-arg]
    """The writer's queue, counting the gets that wait (each is a wake-up when an item arrives)."""

    blocking_gets = 0

    def get(self, block: bool = True, timeout: float | None = None) -> object:
        if block:
            type(self).blocking_gets += 1
        return super().get(block, timeout)


def test_items_queued_during_the_linger_do_not_wake_the_writer_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 8: the writer lingers on one wait that only a flush or stop ends; the 200 call events queued
    meanwhile are drained afterwards, not each handed over by a wake-up (and the GIL) from the Raft thread.
    A flush still ends the linger at once."""
    monkeypatch.setattr(queue, "SimpleQueue", _CountingQueue)
    store = CdrStore(tmp_path / "cdr.sqlite")
    try:
        assert store.flush(5.0)
        _CountingQueue.blocking_gets = 0
        store.enqueue(1, [_row("c-0", 1, None)])  # the writer wakes for the first item, then lingers
        for i in range(1, 200):
            store.enqueue(i + 1, [_row(f"c-{i}", i + 1, None)])
        assert store.flush(5.0)
        assert len(_table(tmp_path / "cdr.sqlite")) == 200
        assert _CountingQueue.blocking_gets <= 4, _CountingQueue.blocking_gets  # 200 before the change
    finally:
        store.close()
