"""A real raftpbx node with one bench-only admin RPC, `bench.load`, to build a large replicated state fast.

    .venv/bin/python bench/footprint_node.py node --config node.toml [--bootstrap]

Exactly `raftpbx node` (raftpbx.cli.main), plus `bench.load {kind, start, count, batch, inflight}` on the admin
server: the node generates `count` synthetic items of `kind` and proposes them through its own Replicator, in
log entries of `batch` commands (the proxy's ProposalBatcher puts up to 64 commands in one entry), `inflight`
entries at a time. Every command is an ordinary event (`ExtensionCreated`, `BindingsUpdated`, `CallStarted` +
`CallAnswered` + `CallEnded`) committed on a durable quorum and applied by every node like one from SIP,
including the call-record projection into SQLite. Used by bench/footprint.py only; never in production.
With RAFTPBX_BENCH_FDATASYNC=1 the journal is flushed with os.fdatasync instead of mmap.flush (the A/B
experiment of bench/ab_journal_sync.py).

kinds: `extensions` (200000 + i, HA1s of a throwaway password), `bindings` (one UDP contact on a loopback
address per extension, 2 h expiry), `calls` (answered calls between those extensions, 60 s, caller hangs up).
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from typing import Any

from raftpbx.state import (
    BindingsUpdated,
    CallAnswered,
    CallEnded,
    CallStarted,
    Command,
    ContactUpdate,
    ExtensionCreated,
    Rejected,
    encode_batch,
)
from raftpbx.state.credentials import ha1_md5, ha1_sha256

from raftpbx import service as service_module
from raftpbx.cli import main as cli_main
from raftpbx.rpc import Params, RpcServer

FIRST = 200000


def extension(i: int) -> str:
    return str(FIRST + i)


def _commands(kind: str, start: int, count: int, node_id: str, realm: str, now: float, users: int) -> list[Command]:
    out: list[Command] = []
    for i in range(start, start + count):
        if kind == "extensions":
            ext = extension(i)
            password = hashlib.sha256(f"footprint:{ext}".encode()).hexdigest()[:16]
            out.append(Command(f"fp-x-{ext}", ExtensionCreated(ext, "", realm, ha1_md5(ext, realm, password),
                                                                ha1_sha256(ext, realm, password), now)))
        elif kind == "bindings":
            ext = extension(i)
            host = f"127.0.{(i >> 8) & 255}.{i & 255 or 1}"
            uri = f"sip:{ext}@{host}:5062"
            contact = ContactUpdate(f"<{uri};transport=udp>", uri, "", 0, 7200, None, "")
            out.append(Command(f"fp-b-{ext}", BindingsUpdated(ext, f"fpreg{i}@{host}", 1, f"{host}:5062", "UDP", (),
                                                              node_id, 10, (contact,), now)))
        else:
            caller, callee = extension(i % users), extension((i * 7 + 1) % users)
            call_id = f"fpcall{i:08d}-{hashlib.md5(str(i).encode()).hexdigest()[:12]}@127.0.0.99"
            at = now - 120 + (i % 60)
            out.append(Command(f"fp-s-{i}", CallStarted(call_id, caller, callee, f"ft{i}", f"<sip:{caller}@127.0.0.98:5062>",
                                                        f"z9hG4bKfp{i}", node_id, at)))
            out.append(Command(f"fp-a-{i}", CallAnswered(call_id, f"tt{i}", f"<sip:{callee}@127.0.0.97:5062>", None,
                                                         node_id, at + 2)))
            out.append(Command(f"fp-e-{i}", CallEnded(call_id, "bye-caller", "caller", 200, node_id, at + 62)))
    return out


def _install() -> None:
    original = service_module.AdminService.register

    def register(self: service_module.AdminService, server: RpcServer) -> None:
        original(self, server)

        async def bench_load(params: Params) -> dict[str, Any]:
            params.check_allowed("kind", "start", "count", "batch", "inflight", "users")
            kind = params.text("kind")
            if kind not in ("extensions", "bindings", "calls"):
                raise ValueError("kind: extensions, bindings or calls")
            start = params.integer("start", default=0)
            count = params.integer("count", default=1000)
            batch = params.integer("batch", default=64, minimum=1, maximum=10000)
            inflight = params.integer("inflight", default=4, minimum=1, maximum=64)
            users = params.integer("users", default=100000, minimum=1)
            began = time.monotonic()
            try:
                commands = _commands(kind, start, count, self.config.node_id, self.config.domain, time.time(), users)
            except Exception as exc:  # a bench tool: report what went wrong to the driver
                return {"error": repr(exc)[:500]}
            entries = [encode_batch(commands[i:i + batch]) for i in range(0, len(commands), batch)]
            rejected = 0
            queue = iter(entries)

            async def worker() -> None:
                nonlocal rejected
                for payload in queue:
                    for attempt in range(10):  # the same bytes again: apply dedupes by op_id
                        try:
                            result = await self.replicator.propose(payload, timeout=30.0)
                            break
                        except Exception:
                            if attempt == 9:
                                raise
                            await asyncio.sleep(0.5)  # back off while a new leader is elected
                    outcomes = list(result) if isinstance(result, list) else []
                    rejected += sum(1 for o in outcomes if isinstance(o, Rejected))

            try:
                await asyncio.gather(*(worker() for _ in range(inflight)))
            except Exception as exc:  # a bench tool: report what went wrong to the driver
                return {"error": repr(exc)[:500]}
            return {"commands": len(commands), "entries": len(entries), "rejected": rejected,
                    "seconds": round(time.monotonic() - began, 3)}

        server.register("bench.load", bench_load)

    service_module.AdminService.register = register  # type: ignore[method-assign]


def _fdatasync_journal() -> None:
    """Experiment (bench/ab_journal_sync.py): the journal flush as os.fdatasync, which releases the GIL,
    instead of pysyncobj's mmap.flush() (msync with the GIL held in CPython 3.11)."""
    import os

    from pysyncobj.journal import ResizableFile

    def flush(self: ResizableFile) -> None:
        os.fdatasync(self._ResizableFile__f.fileno())

    ResizableFile.flush = flush


if __name__ == "__main__":
    import os

    if os.environ.get("RAFTPBX_BENCH_FDATASYNC") == "1":
        _fdatasync_journal()
    _install()
    sys.exit(cli_main(sys.argv[1:]))
