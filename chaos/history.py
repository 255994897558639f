"""The history of a chaos run: one JSON object per line, appended as things happen (Jepsen style).

Theory of operation
-------------------
Every workload operation and every fault is recorded here *when it happens*, with a wall-clock stamp `t`
(epoch seconds, comparable with the nodes' call records) and a CLOCK_MONOTONIC stamp `mono`. The checkers
(chaos/checkers.py) read the file back and judge it against the states collected from the nodes; they never
look at live objects. Record kinds (field `kind`):

- `write`   admin writes. `phase` is `invoke` then exactly one of `ok` (acknowledged), `fail` (definitely
            not applied: refused before or at the decision, or nothing was proposed) or `unknown` (proposed,
            outcome not known after the retries with the same op_id). Fields: `op` (sequence number), `f`
            (`create` | `update` | `delete`), `key` (extension), `value` (the display name the write sets,
            unique per op, or null for delete), `password` (whether it changes the password; the password
            itself is never recorded), `op_id`, `node`, `error`, `latency_ms`.
- `register` one second of SIPp REGISTER load per SIPp instance: `t0`, `ok`, `failed`, `lat_ms` (list of
            round-trip times of the successful ones, first REGISTER to final 200).
- `fault`   `round`, `name`, `phase` (`inject` | `heal` | `recovered`), `targets`, `detail`.
- `sample`  periodic cluster view: `leader` (agreed or null), `holders` (nodes that say they hold the
            service address), `known` (whether nodes report it at all), `live` (answering nodes).
- `call`    a workload call: `phase` (`placed` | `confirmed` | `failed` | `ended`), `call` (workload id),
            `caller`, `callee` (extensions), `sip_call_id`, `code`, and for `ended`: `bye_code` and `rtp`
            ({caller: rtp_gaps, callee: rtp_gaps} measured just before the BYE).
- `round`   `round`, `phase` (`start` | `end`), `fault`.
- `note`    free text for humans (`text`).

Invariant: lines are written whole under a lock and flushed at once, so a killed run keeps a readable
history up to its last event. Passwords are never written.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

Json = dict[str, Any]


class History:
    """An append-only JSONL history file (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()

    def record(self, kind: str, **fields: Any) -> Json:
        entry: Json = {"t": round(time.time(), 4), "mono": round(time.monotonic(), 4), "kind": kind, **fields}
        if not isinstance(entry.get("password", False), bool):  # only whether a write changed it
            raise ValueError("passwords are never recorded")
        line = json.dumps(entry, separators=(",", ":"), default=str)
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()
        return entry

    def close(self) -> None:
        with self._lock:
            self._fh.close()


def load(path: Path) -> list[Json]:
    """Read a history file back; a torn last line (a killed run) is ignored."""
    out: list[Json] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                out.append(entry)
    return out
