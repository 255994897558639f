"""A test replica: a `Replicator` around a tiny key-value state machine, driven over a control socket.

Used in-process (the `KV` class) and as a process (`python replica.py CONFIG_JSON`), so that tests can
kill -9 or SIGSTOP real nodes. The control protocol is one JSON object per line on a loopback TCP
socket: {"cmd": "propose", "key", "value", "op_id", "timeout"} -> {"ok": true, "result": ...} or
{"ok": false, "error": "<ExceptionClass>"}; {"cmd": "status"}; {"cmd": "state"}; {"cmd": "stop"}.
The process prints "READY <control port>" on stdout once the replicator has started.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack

from raftpbx.replication import ReplicationConfig, ReplicationError, Replicator


def encode(op_id: str, key: str, value: str) -> bytes:
    return msgpack.packb({"op": op_id, "k": key, "v": value}, use_bin_type=True)


class KV:
    """Deterministic KV with op_id dedupe; counts how often each op_id reached apply."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.results: dict[str, int] = {}  # op_id -> raft index of its first application
        self.deliveries: Counter[str] = Counter()  # op_id -> apply calls (duplicates included)
        self.applied_index = 0
        self.restores = 0

    def apply(self, entry: bytes, index: int) -> object:
        cmd = msgpack.unpackb(entry, raw=False)
        op = cmd["op"]
        self.deliveries[op] += 1
        self.applied_index = index
        if op in self.results:
            return {"dup": True, "index": self.results[op]}
        self.results[op] = index
        self.data[cmd["k"]] = cmd["v"]
        return {"dup": False, "index": index}

    def snapshot(self) -> bytes:
        return msgpack.packb(
            {"data": self.data, "results": self.results, "applied": self.applied_index}, use_bin_type=True
        )

    def restore(self, blob: bytes) -> None:
        doc = msgpack.unpackb(blob, raw=False)
        self.data = dict(doc["data"])
        self.results = dict(doc["results"])
        self.applied_index = doc["applied"]
        self.restores += 1


def config_from_json(doc: dict[str, Any]) -> ReplicationConfig:
    doc = dict(doc)
    doc["data_dir"] = Path(doc["data_dir"])
    doc.pop("control_port", None)
    return ReplicationConfig(**doc)


async def _serve(doc: dict[str, Any]) -> None:
    kv = KV()
    rep = Replicator(config_from_json(doc), apply=kv.apply, snapshot=kv.snapshot, restore=kv.restore, fork_locks=())
    await rep.start()
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                req = json.loads(line)
                reply: dict[str, Any]
                if req["cmd"] == "propose":
                    payload = encode(req["op_id"], req["key"], req["value"])
                    try:
                        result = await rep.propose(payload, req.get("timeout", 2.0))
                        reply = {"ok": True, "result": result}
                    except ReplicationError as exc:
                        reply = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
                elif req["cmd"] == "status":
                    st = rep.status()
                    reply = {"ok": True, "role": st.role, "leader": st.leader, "term": st.term,
                             "commit_index": st.commit_index, "applied_index": st.applied_index,
                             "has_quorum": st.has_quorum}
                elif req["cmd"] == "state":
                    with rep.lock:
                        reply = {"ok": True, "data": kv.data, "deliveries": dict(kv.deliveries),
                                 "restores": kv.restores, "applied_index": kv.applied_index}
                elif req["cmd"] == "stop":
                    reply = {"ok": True}
                    done.set()
                else:
                    reply = {"ok": False, "error": "unknown command"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, ValueError, KeyError):
            pass
        finally:
            writer.close()

    host = doc["self_addr"].rsplit(":", 1)[0]
    server = await asyncio.start_server(handle, host, doc["control_port"])
    print(f"READY {doc['control_port']}", flush=True)
    async with server:
        await done.wait()
    await rep.stop()


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(_serve(json.loads(sys.argv[1])))


if __name__ == "__main__":
    main()
