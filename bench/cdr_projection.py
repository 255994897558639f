"""Call-record projection costs: what the CDR hook adds to apply on the Raft thread, and the SQLite write rate.

    .venv/bin/python bench/cdr_projection.py [--calls 5000] [--registers 20000]

Prints, for the same entries applied to a StateMachine without and with the projector attached:
- REGISTER entries (the hook sees their outcomes but no call id: it must cost ~nothing);
- call entries (CallStarted, CallRinging, CallAnswered, CallEnded: one record built and queued each);
with CPU time of the applying thread (the hook's own cost) and wall time (which also shows the writer
thread competing for the GIL); then how far the writer lags behind an apply loop running flat out, and the
writer's own rate (new records per second, batched transactions, WAL, synchronous=NORMAL). Medians of 5
runs; on a shared machine read the figures as orders of magnitude.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from raftpbx.state import (
    CallAnswered,
    CallEnded,
    CallRinging,
    CallStarted,
    Command,
    ContactSpec,
    RegisterAccepted,
    State,
    apply_entry,
    call_op_id,
    decide_create_extension,
    decide_register,
    encode_batch,
)

from raftpbx.cdr import CdrProjector, CdrStore
from raftpbx.service import StateMachine

T0 = 1_764_000_000.0


def register_entries(n: int) -> list[bytes]:
    state = State()
    entries = [encode_batch([Command("ext", e) for e in decide_create_extension(
        state, "1001", "bench-Password-1", None, "pbx", T0)])]
    apply_entry(state, entries[0], 1)
    for i in range(n):
        decision = decide_register(
            state, aor="1001", contacts=[ContactSpec(f"sip:1001@127.0.0.1:{1024 + i}", f"k{i}")], star=False,
            expires_header=3600, call_id=f"r{i}", cseq=1, received="127.0.0.1:5060", transport="udp",
            node_id="n1", now=T0 + i, min_expires=60, max_expires=7200, default_expires=3600, max_contacts=n + 1)
        assert isinstance(decision, RegisterAccepted)
        entries.append(encode_batch([Command(decision.op_id, e) for e in decision.events]))
    return entries


def call_entries(n: int) -> list[bytes]:
    entries = []
    for i in range(n):
        cid, t = f"call-{i}", T0 + i
        for step, event in (
            ("started", CallStarted(cid, "1001", "1002", "ft", "sip:1001@127.0.0.1", "z9hG4bK1", "n1", t)),
            ("ringing", CallRinging(cid, "n1", t + 1)),
            ("answered", CallAnswered(cid, "tt", "sip:1002@127.0.0.1", None, "n2", t + 2)),
            ("ended", CallEnded(cid, "bye-caller", "caller", 200, "n3", t + 30)),
        ):
            entries.append(encode_batch([Command(call_op_id(cid, step), event)]))
    return entries


def apply_all(entries: list[bytes], store: CdrStore | None) -> tuple[float, float]:
    """(wall, CPU of this thread) seconds per entry."""
    machine = StateMachine()
    if store is not None:
        CdrProjector(store).attach(machine)
    wall, cpu = time.perf_counter(), time.thread_time()
    for index, entry in enumerate(entries, 1):
        machine.apply(entry, index)
    return (time.perf_counter() - wall) / len(entries), (time.thread_time() - cpu) / len(entries)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--registers", type=int, default=20000)
    ns = parser.parse_args(argv)
    regs, calls = register_entries(ns.registers), call_entries(ns.calls)
    with tempfile.TemporaryDirectory() as tmp:
        for name, entries in (("REGISTER entries", regs), ("call entries", calls)):
            bare, hooked = [], []
            for run in range(5):
                bare.append(apply_all(entries, None))
                store = CdrStore(Path(tmp) / f"{name[:4]}-{run}.sqlite3")
                hooked.append(apply_all(entries, store))
                store.close()
            for what, k in (("CPU", 1), ("wall", 0)):
                b = statistics.median(x[k] for x in bare)
                h = statistics.median(x[k] for x in hooked)
                print(f"{name:17s} apply {what:4s} {b * 1e6:6.1f} us/entry bare, {h * 1e6:6.1f} us/entry with "
                      f"the CDR hook ({(h - b) * 1e6:+.1f} us, {100 * (h - b) / b:+.0f}%)")
        lags, totals = [], []
        for run in range(5):
            store = CdrStore(Path(tmp) / f"rate-{run}.sqlite3")
            machine = StateMachine()
            CdrProjector(store).attach(machine)
            started = time.perf_counter()
            for index, entry in enumerate(calls, 1):
                machine.apply(entry, index)
            applied = time.perf_counter()
            assert store.flush(120.0)
            lags.append(time.perf_counter() - applied)
            totals.append(time.perf_counter() - started)
            assert store.list(limit=1).total == ns.calls
            store.close()
        print(f"applying {len(calls)} call entries as fast as possible: {statistics.median(totals):.2f} s; the "
              f"records were all committed {statistics.median(lags) * 1000:.0f} ms after the last apply")
        raw = []
        for run in range(5):
            store = CdrStore(Path(tmp) / f"raw-{run}.sqlite3")
            rows = [(f"r{run}-{i}", "1001", "1002", T0 + i, T0 + i + 2, T0 + i + 30, 30.0, 28, "answered",
                     "bye-caller", "caller", 200, '["n1"]', "", "", i + 1) for i in range(ns.calls * 4)]
            started = time.perf_counter()
            for row in rows:
                store.enqueue(row[-1], [row])
            assert store.flush(120.0)
            raw.append(len(rows) / (time.perf_counter() - started))
            store.close()
        print(f"SQLite writer alone: {statistics.median(raw):,.0f} new records/s (distinct call ids, one "
              "enqueue each, until flush() returns)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
