"""The call-record projection (raftpbx/cdr.py) fed by the real StateMachine and pure state, into real SQLite.

Every test drives `StateMachine.apply` with encoded call events, exactly as the Raft thread does, and
reads the database back through `CdrStore` queries (after `flush()`), or through a second store opened on
the same file (what a restarted node sees).
"""

from __future__ import annotations

import csv
import io
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from raftpbx.state import (
    CallAnswered,
    CallEnded,
    CallRinging,
    CallStarted,
    Command,
    State,
    call_op_id,
    cdr_row,
    encode_batch,
    snapshot,
)

from raftpbx.cdr import CDR_FIELDS, CdrProjector, CdrStore, records_to_csv, records_to_json
from raftpbx.service import StateMachine

T0 = 1_764_000_000.0


@dataclass
class Feed:
    """A StateMachine with a projector, and the log of entries it applied."""

    machine: StateMachine
    store: CdrStore
    entries: list[bytes] = field(default_factory=list)

    def apply(self, *events: CallStarted | CallRinging | CallAnswered | CallEnded, step: str = "") -> None:
        commands = [Command(call_op_id(e.call_id, type(e).__name__ + step), e) for e in events]
        entry = encode_batch(commands)
        self.entries.append(entry)
        self.machine.apply(entry, len(self.entries))

    def call(self, call_id: str, caller: str, callee: str, start: float, outcome: str, *,
             talk: float = 30.0, node: str = "n1", end_node: str | None = None) -> None:
        """Drive one complete call; outcome in answered|busy|cancelled|no-answer|failed|active."""
        self.apply(CallStarted(call_id, caller, callee, "ft", f"sip:{caller}@127.0.0.1", "z9hG4bK1", node, start))
        self.apply(CallRinging(call_id, node, start + 1))
        end = end_node or node
        if outcome == "active":
            return
        if outcome == "answered":
            self.apply(CallAnswered(call_id, "tt", f"sip:{callee}@127.0.0.1", None, node, start + 2))
            self.apply(CallEnded(call_id, "bye-caller", "caller", 200, end, start + 2 + talk))
        elif outcome == "busy":
            self.apply(CallEnded(call_id, "failure", "callee", 486, end, start + 3))
        elif outcome == "cancelled":
            self.apply(CallEnded(call_id, "cancel", "caller", 487, end, start + 4))
        elif outcome == "no-answer":
            self.apply(CallEnded(call_id, "timeout", "system", 408, end, start + 60))
        else:
            self.apply(CallEnded(call_id, "failure", "system", 503, end, start + 1.5))


def open_feed(path: Path, state: State | None = None) -> Feed:
    machine = StateMachine()
    if state is not None:
        machine.state = state
    store = CdrStore(path)
    CdrProjector(store).attach(machine)
    return Feed(machine, store)


@pytest.fixture
def feed(tmp_path: Path) -> Iterator[Feed]:
    f = open_feed(tmp_path / "cdr.sqlite3")
    try:
        yield f
    finally:
        f.store.close()


def expected(machine: StateMachine) -> dict[str, dict[str, Any]]:
    """What the database must hold: cdr_row of every call the state knows, under the record's names."""
    out = {}
    for call in [*machine.state.finished_calls.values(), *machine.state.calls.values()]:
        row = cdr_row(call)
        row["nodes"] = row.pop("nodes_involved")
        row["trunk"], row["direction"] = call.trunk, call.direction
        out[call.call_id] = row
    return out


def everything(store: CdrStore) -> dict[str, dict[str, Any]]:
    assert store.flush()
    return {r["call_id"]: r for r in store.iter_all()}


def test_records_follow_the_call_lifecycle(feed: Feed) -> None:
    feed.apply(CallStarted("c1", "1001", "1002", "ft", "sip:1001@127.0.0.1", "b", "n2", T0))
    assert feed.store.flush()
    record = feed.store.get("c1")
    assert record is not None
    assert record["ended_at"] is None and record["answered_at"] is None and record["disposition"] is None
    assert record["nodes"] == ["n2"]
    feed.apply(CallAnswered("c1", "tt", "sip:1002@127.0.0.1", None, "n3", T0 + 2.5))
    feed.apply(CallEnded("c1", "bye-callee", "callee", 200, "n1", T0 + 62.5))
    assert feed.store.flush()
    record = feed.store.get("c1")
    assert record == {
        "call_id": "c1", "caller": "1001", "callee": "1002", "started_at": T0, "answered_at": T0 + 2.5,
        "ended_at": T0 + 62.5, "duration": 62.5, "billable_seconds": 60, "disposition": "answered",
        "cause": "bye-callee", "hangup_by": "callee", "status_code": 200, "nodes": ["n1", "n2", "n3"],
        "trunk": "", "direction": "",
    }
    assert feed.store.last_index() == 3
    assert everything(feed.store) == expected(feed.machine)


def test_rejected_and_duplicate_commands_write_nothing(feed: Feed) -> None:
    feed.call("c1", "1001", "1002", T0, "busy")
    assert feed.store.flush()
    written = feed.store.rows_written
    feed.apply(CallEnded("c1", "bye-caller", "caller", 200, "n1", T0 + 99), step="again")  # already ended
    same = encode_batch([Command(call_op_id("c1", "CallStarted"), CallStarted("c1", "1", "2", "", "", "", "", T0))])
    feed.entries.append(same)
    feed.machine.apply(same, len(feed.entries))  # a duplicate op_id
    assert feed.store.flush()
    assert feed.store.rows_written == written
    assert feed.store.get("c1")["disposition"] == "busy"  # type: ignore[index]


def test_replay_and_restart_never_duplicate_or_regress(tmp_path: Path) -> None:
    path = tmp_path / "cdr.sqlite3"
    first = open_feed(path)
    for i in range(20):
        first.call(f"c{i}", "1001", f"10{i:02d}", T0 + i, ("answered", "busy", "cancelled", "active")[i % 4])
    want = expected(first.machine)
    assert everything(first.store) == want
    first.store.close()
    # A restart without a dump: a fresh state, the same database, the whole journal replayed.
    second = open_feed(path)
    second.entries = []
    for entry in first.entries:
        second.entries.append(entry)
        second.machine.apply(entry, len(second.entries))
    # The same index applied twice is ignored by apply_entry (no listener call, nothing queued).
    second.machine.apply(first.entries[-1], len(first.entries))
    assert everything(second.store) == want
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM cdr").fetchone()[0] == 20
    # Stale rows (an old index replayed late) never move a record backwards.
    second.store.enqueue(1, [(
        "c0", "1001", "1000", T0, None, None, None, 0, None, None, None, None, "[]", 1)])
    assert everything(second.store) == want
    second.store.close()


def test_reconcile_after_restart_restores_lost_rows(tmp_path: Path) -> None:
    path = tmp_path / "cdr.sqlite3"
    feed = open_feed(path)
    for i in range(30):
        feed.call(f"c{i}", "1001", "1002", T0 + 10 * i, ("answered", "busy", "no-answer", "failed", "active")[i % 5])
    want = expected(feed.machine)
    assert everything(feed.store) == want
    dump = snapshot(feed.machine.state)  # what the node's full dump holds
    feed.store.close()
    # The last transactions never reached the disk (kill -9 with rows still queued).
    with sqlite3.connect(path) as db:
        cut = db.execute("SELECT raft_index FROM cdr ORDER BY raft_index DESC LIMIT 1 OFFSET 12").fetchone()[0]
        db.execute("DELETE FROM cdr WHERE raft_index > ?", (cut,))
        db.execute("UPDATE meta SET value = ? WHERE key = 'last_index'", (cut,))
    lost = 30 - sqlite3.connect(path).execute("SELECT count(*) FROM cdr").fetchone()[0]
    assert lost >= 10
    restarted = open_feed(path)
    restarted.machine.restore(dump)  # the dump loaded at startup: nothing before it is replayed
    assert everything(restarted.store) == want
    assert restarted.store.gaps == 0
    assert restarted.store.last_index() == len(feed.entries)
    # Restoring the same dump again (a snapshot installed twice) changes nothing.
    restarted.machine.restore(dump)
    assert everything(restarted.store) == want
    restarted.store.close()


@pytest.mark.parametrize("lost_calls, flagged, missing", [(2, False, set()), (3, True, set()), (5, True, {"c3", "c4"})])
def test_reconcile_beyond_the_tail_is_flagged(tmp_path: Path, lost_calls: int, flagged: bool, missing: set[str]) -> None:
    """The documented bound, with a tail of 3 ended calls: losing up to 3 is repaired, losing 5 loses the 2
    that left the tail, and that case is always flagged (the flag is conservative: 3 is flagged too)."""
    path = tmp_path / "cdr.sqlite3"
    feed = open_feed(path, State(call_tail_limit=3))
    for i in range(8):
        feed.call(f"c{i}", "1001", "1002", T0 + i, "busy")
    feed.store.close()
    with sqlite3.connect(path) as db:
        keep = 8 - lost_calls
        db.execute("DELETE FROM cdr WHERE CAST(substr(call_id, 2) AS INTEGER) >= ?", (keep,))
        last = db.execute("SELECT max(raft_index) FROM cdr").fetchone()[0]
        db.execute("UPDATE meta SET value = ? WHERE key = 'last_index'", (last,))
    restarted = open_feed(path)
    restarted.machine.restore(snapshot(feed.machine.state))
    records = everything(restarted.store)
    assert restarted.store.gaps == (1 if flagged else 0)
    assert set(records) == {f"c{i}" for i in range(8)} - missing
    restarted.store.close()


def test_filters_and_paging_agree_with_a_naive_filter(feed: Feed) -> None:
    outcomes = ("answered", "busy", "cancelled", "no-answer", "failed", "active")
    for i in range(120):
        caller, callee = f"10{i % 7:02d}", f"20{i % 5:02d}"
        start = T0 + (i * 37) % 500  # not in id order; some equal start times
        feed.call(f"call-{i:03d}", caller, callee, start, outcomes[i % 6])
    all_records = list(everything(feed.store).values())
    assert len(all_records) == 120

    def naive(since: float | None = None, until: float | None = None, extension: str | None = None,
              disposition: str | None = None) -> list[dict[str, Any]]:
        rows = [r for r in all_records
                if (since is None or r["started_at"] >= since) and (until is None or r["started_at"] < until)
                and (extension is None or extension in (r["caller"], r["callee"]))
                and (disposition is None or r["disposition"] == disposition)]
        return sorted(rows, key=lambda r: (r["started_at"], r["call_id"]))

    for filters in ({}, {"since": T0 + 100}, {"until": T0 + 250}, {"since": T0 + 37, "until": T0 + 38},
                    {"extension": "1003"}, {"extension": "2001"}, {"disposition": "busy"},
                    {"disposition": "answered", "extension": "1002", "since": T0 + 50}, {"extension": "9999"}):
        want = naive(**filters)
        for limit in (1, 7, 1000):
            by_offset: list[dict[str, Any]] = []
            offset: int | None = 0
            while offset is not None:
                page = feed.store.list(**filters, limit=limit, offset=offset)
                assert page.total == len(want)
                by_offset += page.records
                offset = page.next_offset
            assert by_offset == want, filters
            by_cursor: list[dict[str, Any]] = []
            cursor = None
            while True:
                page = feed.store.list(**filters, limit=limit, cursor=cursor)
                by_cursor += page.records
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
            assert by_cursor == want, filters
    for bad, message in (({"disposition": "rejected"}, "disposition"), ({"limit": 1001}, "limit"),
                         ({"limit": 0}, "limit"), ({"offset": -1}, "offset"),
                         ({"since": float("nan")}, "since"), ({"cursor": "nope"}, "cursor"),
                         ({"cursor": "[1, 2]"}, "cursor")):
        with pytest.raises(ValueError, match=f"^{message}:"):
            feed.store.list(**bad)


def test_csv_and_json_export(feed: Feed) -> None:
    feed.call("a,1", "1001", "1002", T0 + 0.25, "answered", talk=61.5)
    feed.call("b\"2", "1003", "1004", T0 + 10, "active", node="n2")
    records = feed.store.list().records if feed.store.flush() else []
    text = records_to_csv(records)
    assert text.startswith(",".join(CDR_FIELDS) + "\r\n")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["call_id"] for r in rows] == ["a,1", "b\"2"]
    answered, active = rows
    assert answered["started_at"] == "2025-11-24T16:00:00.250Z"
    assert answered["answered_at"] == "2025-11-24T16:00:02.250Z"
    assert answered["ended_at"] == "2025-11-24T16:01:03.750Z"
    assert answered["duration"] == "63.500" and answered["billable_seconds"] == "62"
    assert answered["disposition"] == "answered" and answered["hangup_by"] == "caller"
    assert answered["status_code"] == "200" and answered["nodes"] == "n1"
    assert active["ended_at"] == "" and active["disposition"] == "" and active["duration"] == ""
    assert active["nodes"] == "n2"
    parsed = orjson.loads(records_to_json(records))
    assert parsed == records
    assert records_to_json([]) == "[]\n"


def test_writer_thread_batches_and_flush_on_close(tmp_path: Path) -> None:
    path = tmp_path / "cdr.sqlite3"
    store = CdrStore(path)
    stop = threading.Event()
    seen: list[int] = []

    def reader() -> None:
        while not stop.is_set():
            seen.append(store.list(limit=1).total)  # concurrent readers never block the writer

    def producer(p: int) -> None:
        for i in range(2000):
            store.enqueue(p * 10_000 + i, [(f"p{p}-{i}", "1001", "1002", T0 + i, None, None, None, 0, None, None,
                                           None, None, "[]", p * 10_000 + i, "", "")])

    thread = threading.Thread(target=reader)
    thread.start()
    producers = [threading.Thread(target=producer, args=(p,)) for p in range(3)]
    for t in producers:
        t.start()
    for t in producers:
        t.join()
    assert store.flush()
    assert store.list(limit=1).total == 6000  # a query after flush() sees every row queued before it
    stop.set()
    thread.join()
    assert seen == sorted(seen)  # the count only grows: each transaction is all or nothing
    assert store.transactions < 6000  # rows were batched
    for i in range(3000):  # queued, then closed at once: close writes them
        store.enqueue(50_000 + i, [(f"late-{i}", "1001", "1002", T0, None, None, None, 0, None, None, None, None,
                                    "[]", 50_000 + i, "", "")])
    store.close()
    store.close()  # idempotent
    assert not store.flush()
    reopened = CdrStore(path)
    assert reopened.list(limit=1).total == 9000
    assert reopened.last_index() == 50_000 + 2999
    reopened.close()


def test_a_failing_listener_never_breaks_apply(tmp_path: Path) -> None:
    feed = open_feed(tmp_path / "cdr.sqlite3")
    calls: list[int] = []

    def broken(index: int, applied: Any) -> None:
        calls.append(index)
        raise RuntimeError("boom")

    feed.machine.add_apply_listener(broken)
    feed.call("c1", "1001", "1002", T0, "busy")
    assert calls == [1, 2, 3] and feed.machine.listener_errors == 3
    assert everything(feed.store)["c1"]["disposition"] == "busy"  # the other listener still ran
    feed.store.close()


def test_applied_commands_pairs_and_lazy_decode(tmp_path: Path) -> None:
    machine = StateMachine()
    got: list[Any] = []
    machine.add_apply_listener(lambda index, applied: got.append((index, applied)))
    start = CallStarted("c1", "1001", "1002", "ft", "", "", "n1", T0)
    entry = encode_batch([Command("op-1", start), Command("op-2", CallRinging("nope", "n1", T0)),
                          Command("op-3", CallRinging("c1", "n1", T0 + 1))])
    machine.apply(entry, 1)
    (index, applied), = got
    assert index == 1 and len(applied) == 2
    assert [o.result["call_id"] for o in applied.outcomes] == ["c1", "c1"]
    assert applied._pairs is None  # outcomes cost no decode
    assert [(c.op_id, type(c.event).__name__) for c, _ in applied] == [("op-1", "CallStarted"),
                                                                       ("op-3", "CallRinging")]
    assert applied[0][0].event == start
    # An entry where nothing applied does not call the listeners.
    machine.apply(encode_batch([Command("op-4", CallRinging("nope", "n1", T0))]), 2)
    assert len(got) == 1


_SCHEMA_V1 = """
CREATE TABLE cdr (call_id TEXT PRIMARY KEY, caller TEXT NOT NULL, callee TEXT NOT NULL, started_at REAL NOT NULL,
    answered_at REAL, ended_at REAL, duration REAL, billable_seconds INTEGER NOT NULL, disposition TEXT, cause TEXT,
    hangup_by TEXT, status_code INTEGER, nodes TEXT NOT NULL, raft_index INTEGER NOT NULL);
CREATE INDEX cdr_started ON cdr (started_at, call_id);
CREATE INDEX cdr_caller ON cdr (caller, started_at, call_id);
CREATE INDEX cdr_callee ON cdr (callee, started_at, call_id);
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO meta VALUES ('schema_version', 1), ('last_index', 7);
INSERT INTO cdr VALUES ('old', '1001', '1002', 1764000000.0, 1764000002.0, 1764000032.0, 32.0, 30, 'answered',
    'bye-caller', 'caller', 200, '["n1"]', 7);
"""


def test_a_schema_1_database_is_migrated_in_place(tmp_path: Path) -> None:
    """Issue 9: a node's existing call records (schema 1, before trunks) gain `trunk` and `direction` ("" for
    every old record: those calls crossed no trunk), and new records carry them."""
    path = tmp_path / "cdr.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(_SCHEMA_V1)
    feed = open_feed(path)
    try:
        old = feed.store.get("old")
        assert old is not None and old["trunk"] == "" and old["direction"] == "" and old["billable_seconds"] == 30
        assert feed.store.last_index() == 7  # the projection carries on from where it was
        feed.machine.state.applied_index = 7
        feed.entries = [b""] * 7
        feed.apply(CallStarted("new", "1001", "2001", "ft", "sip:1001@127.0.0.1", "b", "n1", T0 + 100,
                               "office-b", "outbound"))
        assert feed.store.flush()
        assert [r["call_id"] for r in feed.store.list(trunk="office-b").records] == ["new"]
        assert [r["call_id"] for r in feed.store.list(trunk="").records] == ["old"]
        new = feed.store.get("new")
        assert new is not None and (new["trunk"], new["direction"]) == ("office-b", "outbound")
    finally:
        feed.store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (2,)
        assert "cdr_trunk" in {row[1] for row in db.execute("PRAGMA index_list(cdr)")}
    again = CdrStore(path)  # opening a migrated database again changes nothing
    try:
        assert {r["call_id"] for r in again.iter_all()} == {"old", "new"}
    finally:
        again.close()


def test_a_database_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cdr.sqlite3"
    CdrStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    with pytest.raises(RuntimeError, match="schema 99"):
        CdrStore(path)


def test_a_restart_does_not_project_again_what_the_database_holds(tmp_path: Path) -> None:
    """The journal replayed at startup re-applies entries up to the database's last_index: those are not
    written again (no SQLite work on a restart), later ones are (a database that lost its last transactions
    is completed from the journal)."""
    path = tmp_path / "cdr.sqlite3"
    first = open_feed(path)
    for i in range(12):
        first.call(f"c{i}", "1001", f"10{i:02d}", T0 + i, ("answered", "busy", "active")[i % 3])
    want = expected(first.machine)
    assert everything(first.store) == want
    first.store.close()
    with sqlite3.connect(path) as db:  # the last 5 entries' transactions never reached the disk
        cut = len(first.entries) - 5
        db.execute("DELETE FROM cdr WHERE raft_index > ?", (cut,))
        db.execute("UPDATE meta SET value = ? WHERE key = 'last_index'", (cut,))
    machine, store = StateMachine(), CdrStore(path)
    projector = CdrProjector(store)
    projector.attach(machine)
    assert projector.skip_through == cut
    for index, entry in enumerate(first.entries, start=1):
        machine.apply(entry, index)
    assert everything(store) == want
    assert projector.entries_skipped == cut
    assert 0 < projector.entries_projected <= 5
    assert 0 < store.rows_written <= 5  # only what the database lacked
    store.close()
