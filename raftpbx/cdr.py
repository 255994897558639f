"""Call records: a SQLite projection of the applied call events, one database per node.

Theory of operation
-------------------
The Raft log is the source of truth; `cdr.sqlite3` in the node's data dir is a read model of it (DESIGN
decision 7), so history can grow without growing the hot state or its snapshots.

* Feeding. `CdrProjector.attach(machine)` registers two listeners on the `StateMachine`. The apply listener
  runs on the Raft thread right after each entry: it looks only at the `Applied` outcomes (free); if one
  of them is a call's (its result names a `call_id`), it reads the call's current record from the state
  (`cdr_row`, active calls and the finished tail) and puts `(index, rows)` on a queue. It never touches
  SQLite, so apply is not slowed by disk I/O.
* Writing. One writer thread (`CdrStore`) drains the queue, lingers up to `LINGER` (1 s) for more (a
  flush or a stop ends the wait at once), and writes everything it found in ONE transaction (WAL,
  synchronous=NORMAL: the log can rebuild what a power cut loses), keeping the last row per call. The
  `meta.last_index` row, the highest Raft index whose effects are in the database, is written in the same
  transaction, so the database is always a prefix of the log as projected.
* Cost (issue 8: the writer shares the node's GIL with the asyncio and Raft threads). The apply listener
  queues the calls' frozen `Call` values, not rows: the rows (`cdr_row`, the nodes' JSON) are built on the
  writer thread, only for the last version of each call in a transaction, so the Raft thread's apply
  path pays one dict lookup per call event. The upserts go as multi-row statements (chunks of 128, 64, ...
  rows, so at most 8 distinct cached statements): the sqlite3 module releases and re-takes the GIL around
  every statement step, and `executemany` steps once per row, so a transaction of 100 rows used to force
  ~100 GIL hand-offs with the busy asyncio thread (each up to the 5 ms switch interval on a loaded
  machine); now it is ~5 per transaction. `last_index` is kept in memory (this thread is the only writer).
  The linger is 1 s, not 50 ms: a row costs ~50 us of writer CPU (built, upserted into a table with four
  indexes) and a transaction ~100 us more, and a call's events (CallStarted, CallRinging + CallAnswered,
  CallEnded) that land in one transaction are one row. At 100 calls/s (3 nodes, 1 s calls) a 50 ms linger
  wrote 2.6 rows per call and node in 0.16 transactions. Nothing reads the database without a flush first
  (`cdr.*` flush, bounded; a backup copies what is committed and a restore reconciles the lag, backup.py),
  so the longer linger changes no answer; at most 1 s of records more wait in memory (the journal still
  holds their entries: a kill -9 loses nothing, see "Restart").
* Idempotence. Rows are upserted by `call_id`, and an upsert only wins if its `raft_index` is at least the
  stored one: replaying entries (pysyncobj replays the journal after the dump on every restart) rewrites
  the same rows and never moves a record backwards; nothing is ever inserted twice.
* Restart. pysyncobj replays the journal after the dump on every start; the projector reads the database's
  `last_index` L when it attaches and does not project replayed entries <= L again (their rows, or newer
  ones, are committed: the database is a prefix of the log). Projecting them again was harmless (the
  upserts are idempotent) but cost a restart with a long journal tail as much SQLite work, competing for
  the GIL with the replay, as the original writes (5 of 20 s measured). Entries after L are projected as
  usual, so a database that lost its last transactions (kill -9) is completed from the journal.
* Restore. Entries folded into a dump are never replayed. After every restore (the dump at startup, or a
  snapshot installed from the leader by a node that fell behind) the restore listener reconciles: every
  active call and every call of the state's finished tail (`State.finished_calls`, the last
  `call_tail_limit` ended calls, 1000 by default) is upserted at the dump's index.

Schema. `meta.schema_version` is 2 since issue 9 added `trunk` and `direction` (the trunk a call crossed and
which way; "" for local calls). A version 1 database is migrated in place when the store opens (two ALTER
TABLE ... ADD COLUMN with a "" default and an index, in one transaction: old records read as local calls,
which they were); a database of a newer version is refused rather than half understood.

Completeness bound (honest limit). A record can be missing from one node's database only if that node's
database stopped at index L (crash with unflushed rows, node down, database deleted), the node then
restored a dump at index D > L, and more than `call_tail_limit` calls ended between L and D, so that some
were evicted from the tail before D. The reconcile flags it, conservatively: it never misses such a
gap, and flags one when the tail is full and its oldest call is not in the database as ended (if that call
ended before L, every evicted call did too and is already there; otherwise some may be missing, and the
state holds no record of where each evicted call ended to tell more). It logs `cdr.gap` and counts
`gaps` (metric `raftpbx_cdr_gaps_total`). Other nodes still hold those records. Within the bound (a node down for fewer than `call_tail_limit` ended calls, or catching
up from the journal) every record is present on every node.

Invariants: the apply listener never raises and never blocks on I/O (the queue is unbounded; its depth is
a metric); `flush()` returns only after everything enqueued before it is committed; a query after `flush()`
sees every call event applied before it. Times are epoch seconds (floats) or NULL.
"""

from __future__ import annotations

import builtins
import contextlib
import csv
import functools
import io
import math
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .logs import get_logger
from .state import DISPOSITIONS, Call, State, cdr_row

__all__ = [
    "CDR_FIELDS",
    "DB_NAME",
    "CdrPage",
    "CdrProjector",
    "CdrStore",
    "records_to_csv",
    "records_to_json",
]

log = get_logger("raftpbx.cdr")

DB_NAME = "cdr.sqlite3"
SCHEMA_VERSION = 2
MAX_LIMIT = 1000
MAX_BATCH = 10_000  # queue items per transaction
LINGER = 1.0  # seconds the writer waits for more rows before a transaction (not when asked to flush)
UPSERT_CHUNK = 128  # rows per multi-row upsert statement (16 parameters a row: far below SQLite's 32766)

CDR_FIELDS = (
    "call_id", "caller", "callee", "started_at", "answered_at", "ended_at", "duration", "billable_seconds",
    "disposition", "cause", "hangup_by", "status_code", "nodes", "trunk", "direction",
)
"""The fields of a record, in CSV column order. `trunk` names the trunk an inter-office call crossed and
`direction` is "inbound" or "outbound" ("" and "" for a call between local extensions; issue 9); they come
last so that readers of the version 1 columns keep working."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cdr (
    call_id TEXT PRIMARY KEY,
    caller TEXT NOT NULL,
    callee TEXT NOT NULL,
    started_at REAL NOT NULL,
    answered_at REAL,
    ended_at REAL,
    duration REAL,
    billable_seconds INTEGER NOT NULL,
    disposition TEXT,
    cause TEXT,
    hangup_by TEXT,
    status_code INTEGER,
    nodes TEXT NOT NULL,
    raft_index INTEGER NOT NULL,
    trunk TEXT NOT NULL DEFAULT '',
    direction TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS cdr_started ON cdr (started_at, call_id);
CREATE INDEX IF NOT EXISTS cdr_caller ON cdr (caller, started_at, call_id);
CREATE INDEX IF NOT EXISTS cdr_callee ON cdr (callee, started_at, call_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

_TRUNK_INDEX = "CREATE INDEX IF NOT EXISTS cdr_trunk ON cdr (trunk, started_at, call_id)"

# Schema 1 -> 2 (issue 9): the two trunk columns, "" for every record written before (those calls crossed no
# trunk: trunks did not exist yet). ALTER TABLE ... ADD COLUMN with a constant default rewrites nothing.
_MIGRATE_1_TO_2 = (
    "ALTER TABLE cdr ADD COLUMN trunk TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE cdr ADD COLUMN direction TEXT NOT NULL DEFAULT ''",
)

_UPSERT = """
INSERT INTO cdr (call_id, caller, callee, started_at, answered_at, ended_at, duration, billable_seconds,
                 disposition, cause, hangup_by, status_code, nodes, raft_index, trunk, direction)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (call_id) DO UPDATE SET
    caller = excluded.caller, callee = excluded.callee, started_at = excluded.started_at,
    answered_at = excluded.answered_at, ended_at = excluded.ended_at, duration = excluded.duration,
    billable_seconds = excluded.billable_seconds, disposition = excluded.disposition, cause = excluded.cause,
    hangup_by = excluded.hangup_by, status_code = excluded.status_code, nodes = excluded.nodes,
    raft_index = excluded.raft_index, trunk = excluded.trunk, direction = excluded.direction
WHERE excluded.raft_index >= cdr.raft_index
"""


def _split_upsert() -> tuple[str, str, str]:
    """`_UPSERT` around its one row of placeholders, which `_upsert_many` repeats."""
    head, values = _UPSERT.split("VALUES ")
    row, tail = values.split("\n", 1)
    return head + "VALUES ", row, "\n" + tail


_UPSERT_HEAD, _UPSERT_VALUES, _UPSERT_TAIL = _split_upsert()


@functools.lru_cache(maxsize=16)
def _upsert_many(rows: int) -> str:
    """The upsert of `rows` rows in one statement (same semantics as `_UPSERT` row by row: a row only
    replaces one with a lower or equal `raft_index`)."""
    return _UPSERT_HEAD + ", ".join([_UPSERT_VALUES] * rows) + _UPSERT_TAIL


def _chunks(count: int) -> list[int]:
    """Statement sizes for `count` rows: full chunks, then the binary digits of the rest (few distinct
    statements, each compiled once and kept in the connection's statement cache)."""
    sizes = [UPSERT_CHUNK] * (count // UPSERT_CHUNK)
    rest = count % UPSERT_CHUNK
    size = UPSERT_CHUNK // 2
    while rest:
        if rest >= size:
            sizes.append(size)
            rest -= size
        size //= 2
    return sizes


_COLUMNS = ", ".join(CDR_FIELDS)

Row = tuple[Any, ...]


def _db_row(call: Call, index: int) -> Row:
    record = cdr_row(call)
    return (
        record["call_id"], record["caller"], record["callee"], record["started_at"], record["answered_at"],
        record["ended_at"], record["duration"], record["billable_seconds"], record["disposition"],
        record["cause"], record["hangup_by"], record["status_code"],
        orjson.dumps(record["nodes_involved"]).decode(), index, call.trunk, call.direction,
    )


def _record(row: Sequence[Any]) -> dict[str, Any]:
    record = dict(zip(CDR_FIELDS, row, strict=True))
    record["nodes"] = orjson.loads(record["nodes"])
    return record


@dataclass(frozen=True, slots=True)
class CdrPage:
    """One page of records (`list`), ordered by (started_at, call_id).

    `next_offset` / `next_cursor` continue after this page (None when it was the last one).
    """

    records: list[dict[str, Any]]
    total: int
    next_offset: int | None
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class _Rows:
    index: int
    rows: list[Row]


@dataclass(frozen=True, slots=True)
class _Calls:
    """Calls (frozen values) as applied at Raft index `index`; their rows are built by the writer."""

    index: int
    calls: list[Call]


@dataclass(frozen=True, slots=True)
class _Reconcile:
    index: int
    rows: list[Row]
    tail_full: bool
    oldest_tail_call: str | None


@dataclass(frozen=True, slots=True)
class _Flush:
    done: threading.Event


_STOP = object()


class CdrStore:
    """The SQLite database of call records and its writer thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._urgent = threading.Event()  # set with a flush or stop request: ends the writer's linger
        self._db = self._connect(check_same_thread=False)  # used by the writer thread only after start
        try:
            self._migrate()
        except BaseException:
            self._db.close()
            raise
        self.rows_written = 0
        self.transactions = 0
        self._last_index = self.last_index()  # the writer thread's copy (it is the only writer)
        self.gaps = 0
        self.write_errors = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"cdr-writer-{self.path.parent.name}", daemon=True)
        self._thread.start()

    def _migrate(self) -> None:
        """Create the schema, or bring an older database up to `SCHEMA_VERSION` (in one transaction)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('last_index', 0)")
            version = int(db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: call records of schema {version}, newer than this version "
                                   f"({SCHEMA_VERSION}) understands")
            columns = {row[1] for row in db.execute("PRAGMA table_info(cdr)")}
            if version < 2 and "trunk" not in columns:
                for statement in _MIGRATE_1_TO_2:
                    db.execute(statement)
            db.execute(_TRUNK_INDEX)
            if version != SCHEMA_VERSION:
                db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,))
                log.info("cdr.migrated", path=str(self.path), from_version=version, to_version=SCHEMA_VERSION)
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def _connect(self, *, check_same_thread: bool = True) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=check_same_thread)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    # --- producer side (any thread; the Raft thread in a node) -----------------------------------------

    def enqueue(self, index: int, rows: list[Row]) -> None:
        """Queue rows built at Raft index `index` (never blocks)."""
        self._queue.put(_Rows(index, rows))

    def enqueue_calls(self, index: int, calls: list[Call]) -> None:
        """Queue the records of `calls` (frozen `Call` values) as applied at Raft index `index`; the rows
        are built on the writer thread (never blocks)."""
        self._queue.put(_Calls(index, calls))

    def enqueue_reconcile(self, index: int, rows: list[Row], *, tail_full: bool, oldest_tail_call: str | None) -> None:
        """Queue a reconcile from a state restored at `index` (see the module doc)."""
        self._queue.put(_Reconcile(index, rows, tail_full, oldest_tail_call))

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued before this call is committed; False on timeout or if closed."""
        if self._closed or not self._thread.is_alive():
            return False
        done = threading.Event()
        self._queue.put(_Flush(done))
        self._urgent.set()
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, stop the writer thread and close the database. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._urgent.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("cdr.close_timeout", path=str(self.path), queued=self._queue.qsize())
            return
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    # --- writer thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        stop = False
        while not stop:
            items = [self._queue.get()]
            self._gather(items)
            flushes = [item.done for item in items if isinstance(item, _Flush)]
            stop = any(item is _STOP for item in items)
            work = [item for item in items if isinstance(item, _Rows | _Calls | _Reconcile)]
            if work:
                try:
                    self._write(work)
                except sqlite3.Error as exc:
                    # The rows are lost for this node until the next restore reconciles them (module doc).
                    self.write_errors += 1
                    log.error("cdr.write_failed", error=str(exc), items=len(work))
            for done in flushes:
                done.set()

    def _gather(self, items: builtins.list[object]) -> None:
        """Add to `items` what arrives within `LINGER` of the first item (a burst makes one transaction),
        up to `MAX_BATCH`; a flush or a stop request ends the wait at once.

        The linger is one wait on `_urgent`, not a `get(timeout)` per item: a blocked `get` is woken by every
        `put`, so each call event applied during the linger cost a thread wake-up and a GIL hand-off from
        the Raft thread (2.4% of a node's GIL samples at 100 calls/s sat in `enqueue_calls`). Producers never
        wake the lingering writer; a flush or stop sets `_urgent` after queueing its item, so that item is
        in the queue when the writer drains it."""
        first = items[-1]
        if not (isinstance(first, _Flush) or first is _STOP):
            self._urgent.wait(LINGER)
        self._urgent.clear()
        while len(items) < MAX_BATCH:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return

    def _write(self, work: builtins.list[_Rows | _Calls | _Reconcile]) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            last = self._last_index
            pending: dict[str, Row | tuple[Call, int]] = {}  # call id -> its last row (or call, index)
            top = last
            for item in work:
                if isinstance(item, _Reconcile):
                    if pending:  # the gap check must see everything before it
                        self._upsert(db, pending)
                        pending.clear()
                    self._check_gap(db, item, top)
                if isinstance(item, _Calls):
                    for call in item.calls:
                        pending[call.call_id] = (call, item.index)
                else:
                    for row in item.rows:
                        pending[row[0]] = row
                top = max(top, item.index)
            if pending:
                self._upsert(db, pending)
            if top != last:
                db.execute("UPDATE meta SET value = ? WHERE key = 'last_index'", (top,))
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        self._last_index = top
        self.transactions += 1

    def _upsert(self, db: sqlite3.Connection, pending: dict[str, Row | tuple[Call, int]]) -> None:
        """Upsert the pending rows in a few multi-row statements (see "Cost" in the module doc)."""
        rows = [_db_row(*value) if len(value) == 2 else value for value in pending.values()]
        start = 0
        for size in _chunks(len(rows)):
            params = [field for row in rows[start:start + size] for field in row]
            db.execute(_upsert_many(size), params)
            start += size
        self.rows_written += len(rows)

    def _check_gap(self, db: sqlite3.Connection, item: _Reconcile, last: int) -> None:
        if item.index <= last or not item.tail_full or item.oldest_tail_call is None:
            return
        row = db.execute("SELECT ended_at FROM cdr WHERE call_id = ?", (item.oldest_tail_call,)).fetchone()
        if row is not None and row[0] is not None:
            return  # everything evicted before the tail's oldest call ended before `last`: already here
        self.gaps += 1
        log.warning("cdr.gap", path=str(self.path), projected_up_to=last, restored_at=item.index,
                    advice="calls that ended between these indexes and left the finished tail may be missing "
                           "from this node's records; other nodes hold them")

    # --- queries (any thread; each opens its own connection) -------------------------------------------

    def last_index(self) -> int:
        """The highest Raft index whose effects are committed to the database."""
        with contextlib.closing(self._connect()) as db:
            return int(db.execute("SELECT value FROM meta WHERE key = 'last_index'").fetchone()[0])

    def get(self, call_id: str) -> dict[str, Any] | None:
        """One record by call id, or None."""
        with contextlib.closing(self._connect()) as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM cdr WHERE call_id = ?", (call_id,)).fetchone()
        return None if row is None else _record(row)

    def list(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        extension: str | None = None,
        disposition: str | None = None,
        limit: int = 100,
        offset: int = 0,
        cursor: str | None = None,
        trunk: str | None = None,
    ) -> CdrPage:
        """Records with `since <= started_at < until`, `extension` as caller or callee, `disposition`, and
        `trunk` (the trunk the call crossed; "" selects the calls that crossed none).

        Ordered by (started_at, call_id). Page with `offset`, or with `cursor` (a page's `next_cursor`:
        keyset paging, stable while records are added). Raises ValueError naming a bad argument.
        """
        if disposition is not None and disposition not in DISPOSITIONS:
            raise ValueError(f"disposition: expected one of {', '.join(DISPOSITIONS)}")
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit: expected 1..{MAX_LIMIT}")
        if offset < 0:
            raise ValueError("offset: must not be negative")
        for name, value in (("since", since), ("until", until)):
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name}: must be a finite number of epoch seconds")
        where: list[str] = []
        args: list[Any] = []
        if since is not None:
            where.append("started_at >= ?")
            args.append(since)
        if until is not None:
            where.append("started_at < ?")
            args.append(until)
        if extension is not None:
            where.append("(caller = ? OR callee = ?)")
            args += [extension, extension]
        if disposition is not None:
            where.append("disposition = ?")
            args.append(disposition)
        if trunk is not None:
            where.append("trunk = ?")
            args.append(trunk)
        page_where = list(where)
        page_args = list(args)
        if cursor is not None:
            after = _decode_cursor(cursor)
            page_where.append("(started_at > ? OR (started_at = ? AND call_id > ?))")
            page_args += [after[0], after[0], after[1]]
            offset = 0
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        page_clause = (" WHERE " + " AND ".join(page_where)) if page_where else ""
        with contextlib.closing(self._connect()) as db:
            db.execute("BEGIN")  # one read snapshot for the count and the page
            total = int(db.execute(f"SELECT count(*) FROM cdr{clause}", args).fetchone()[0])
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM cdr{page_clause} ORDER BY started_at, call_id LIMIT ? OFFSET ?",
                [*page_args, limit + 1, offset],
            ).fetchall()
            db.execute("COMMIT")
        more = len(rows) > limit
        records = [_record(row) for row in rows[:limit]]
        next_cursor = None
        next_offset = None
        if more:
            last = records[-1]
            next_cursor = _encode_cursor(last["started_at"], last["call_id"])
            next_offset = None if cursor is not None else offset + limit
        return CdrPage(records, total, next_offset, next_cursor)

    def iter_all(self, **filters: Any) -> Iterable[dict[str, Any]]:
        """Every record matching `filters` (as `list`), page by page with cursors."""
        cursor: str | None = None
        while True:
            page = self.list(**filters, limit=MAX_LIMIT, cursor=cursor)
            yield from page.records
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def metrics(self, node: str) -> builtins.list[str]:
        """Prometheus lines for this store."""
        lines = []
        for name, kind, help_text, value in (
            ("raftpbx_cdr_rows_written_total", "counter", "call record upserts written to SQLite", self.rows_written),
            ("raftpbx_cdr_transactions_total", "counter", "SQLite transactions of the CDR writer", self.transactions),
            ("raftpbx_cdr_queue_depth", "gauge", "call record batches waiting for the writer", self.queue_depth),
            ("raftpbx_cdr_gaps_total", "counter", "restores after which records may be missing (see docs)", self.gaps),
            ("raftpbx_cdr_write_errors_total", "counter", "failed CDR transactions", self.write_errors),
        ):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f'{name}{{node="{node}"}} {value}']
        return lines


def _encode_cursor(started_at: float, call_id: str) -> str:
    return orjson.dumps([started_at, call_id]).decode()


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        value = orjson.loads(cursor)
    except orjson.JSONDecodeError:
        raise ValueError("cursor: not a cursor returned by a previous page") from None
    if (not isinstance(value, list) or len(value) != 2 or isinstance(value[0], bool)
            or not isinstance(value[0], int | float) or not isinstance(value[1], str)):
        raise ValueError("cursor: not a cursor returned by a previous page")
    return float(value[0]), value[1]


class CdrProjector:
    """Feeds a `CdrStore` from a `StateMachine`'s apply and restore listeners (see the module doc)."""

    def __init__(self, store: CdrStore) -> None:
        self.store = store
        self.entries_projected = 0
        self.entries_skipped = 0
        self.reconciles = 0
        self.skip_through = 0

    def attach(self, machine: Any) -> None:
        """Register on `machine` (a `raftpbx.service.StateMachine`); do it before the replicator starts.

        Reads the database's `last_index` L once: the journal replayed at startup re-applies entries that the
        database already holds (everything up to L is committed there, in order), so entries <= L are not
        projected again (see "Restart" in the module doc)."""
        self._machine = machine
        self.skip_through = self.store.last_index()
        machine.add_apply_listener(self.on_apply)
        machine.add_restore_listener(self.on_restore)

    def on_apply(self, index: int, applied: Any) -> None:
        """Apply listener (Raft thread, under the state lock): queue the records of the calls touched."""
        if index <= self.skip_through:
            self.entries_skipped += 1
            return  # a replayed entry whose effects the database already holds
        call_ids = [o.result["call_id"] for o in applied.outcomes if "call_id" in o.result]
        if not call_ids:
            return
        state: State = self._machine.state
        active, finished = state.calls, state.finished_calls
        calls = []
        for call_id in call_ids:
            call = active.get(call_id) or finished.get(call_id)
            if call is not None:
                calls.append(call)  # frozen: the writer thread builds its row later (module doc, "Cost")
        if calls:
            self.entries_projected += 1
            self.store.enqueue_calls(index, calls)

    def on_restore(self, state: State) -> None:
        """Restore listener: reconcile from the active calls and the finished tail."""
        self.reconciles += 1
        index, rows, tail_full, oldest = reconcile_rows(state)
        self.store.enqueue_reconcile(index, rows, tail_full=tail_full, oldest_tail_call=oldest)


def reconcile_rows(state: State) -> tuple[int, list[Row], bool, str | None]:
    """What a reconcile from `state` writes: (index, rows of the tail and active calls, tail full?, oldest
    call id of the tail)."""
    index = state.applied_index
    rows = [_db_row(call, index) for call in state.finished_calls.values()]
    rows += [_db_row(call, index) for call in state.calls.values()]
    tail_full = len(state.finished_calls) >= state.call_tail_limit
    oldest = next(iter(state.finished_calls), None)
    return index, rows, tail_full, oldest


# --- export ----------------------------------------------------------------------------------------------


def _iso(value: Any) -> str:
    if value is None:
        return ""
    seconds = float(value)
    whole = math.floor(seconds)
    millis = round((seconds - whole) * 1000)
    if millis == 1000:
        whole, millis = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def records_to_csv(records: Iterable[Mapping[str, Any]]) -> str:
    """RFC 4180 CSV with a header row (`CDR_FIELDS`); times as ISO 8601 UTC with milliseconds, empty if
    null; `nodes` joined with ';'."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CDR_FIELDS)
    for record in records:
        cells = []
        for name in CDR_FIELDS:
            value = record.get(name)
            if name in ("started_at", "answered_at", "ended_at"):
                cells.append(_iso(value))
            elif name == "nodes":
                cells.append(";".join(value or ()))
            elif name == "duration" and value is not None:
                cells.append(f"{float(value):.3f}")
            else:
                cells.append("" if value is None else str(value))
        writer.writerow(cells)
    return out.getvalue()


def records_to_json(records: Iterable[Mapping[str, Any]]) -> str:
    """A JSON array of records (times in epoch seconds or null), one record per line."""
    lines = [orjson.dumps(dict(record)).decode() for record in records]
    if not lines:
        return "[]\n"
    return "[\n" + ",\n".join(lines) + "\n]\n"
