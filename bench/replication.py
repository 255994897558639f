"""Benchmark of raftpbx.replication on a 3-node loopback cluster with durable (msync'ed) journals.

Prints, as medians over several runs: committed proposals/s and p50/p99 latency through the leader
and through a follower (concurrent proposers, so group commit is exercised), then failover time
(SIGKILL of the leader -> first successful write through a survivor) over repeated kills.

    .venv/bin/python bench/replication.py [--runs 3] [--proposals 3000] [--concurrency 32] [--kills 10]

Each node is this script in `--node` mode: a Replicator around a small dedupe-by-op_id KV, with a
line-based JSON control socket on loopback. Nothing listens outside 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack

from raftpbx.replication import ReplicationConfig, ReplicationError, Replicator

SECRET = "bench-cluster-secret-0123456789"


# ---------------------------------------------------------------------------- node mode
class _KV:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.seen: set[str] = set()

    def apply(self, entry: bytes, index: int) -> object:
        op, key, value = msgpack.unpackb(entry)
        if op in self.seen:
            return False
        self.seen.add(op)
        self.data[key] = value
        return index

    def snapshot(self) -> bytes:
        return msgpack.packb([self.data, sorted(self.seen)])

    def restore(self, blob: bytes) -> None:
        data, seen = msgpack.unpackb(blob)
        self.data, self.seen = dict(data), set(seen)


async def _load(rep: Replicator, prefix: str, n: int, concurrency: int, size: int) -> dict[str, Any]:
    latencies: list[float] = []
    counter = iter(range(n))
    value = os.urandom(size)

    async def worker() -> None:
        for i in counter:
            payload = msgpack.packb([f"{prefix}-{i}", f"k{i % 1000}", value])
            t = time.perf_counter()
            await rep.propose(payload, timeout=10)
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return {"rate": n / elapsed, "p50": latencies[len(latencies) // 2],
            "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]}


async def _first_write(rep: Replicator, op: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            await rep.propose(msgpack.packb([op, "failover", b"x"]), timeout=0.5)
            return
        except ReplicationError:
            continue
    raise RuntimeError("no successful write within 10 s")


async def _node(doc: dict[str, Any]) -> None:
    control = doc.pop("control_port")
    kv = _KV()
    cfg = ReplicationConfig(**{**doc, "data_dir": Path(doc["data_dir"])})
    rep = Replicator(cfg, apply=kv.apply, snapshot=kv.snapshot, restore=kv.restore)
    await rep.start()
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            req = json.loads(line)
            reply: dict[str, Any] = {"ok": True}
            try:
                if req["cmd"] == "status":
                    st = rep.status()
                    reply.update(role=st.role, leader=st.leader, commit=st.commit_index, applied=st.applied_index)
                elif req["cmd"] == "load":
                    reply.update(await _load(rep, req["prefix"], req["n"], req["concurrency"], req["size"]))
                elif req["cmd"] == "first_write":
                    await _first_write(rep, req["op"])
                elif req["cmd"] == "stop":
                    done.set()
            except Exception as exc:
                reply = {"ok": False, "error": repr(exc)}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, cfg.self_addr.rsplit(":", 1)[0], control)
    print("READY", flush=True)
    async with server:
        await done.wait()
    await rep.stop()


# ---------------------------------------------------------------------------- orchestrator
def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        hosts = [f"127.0.{200 + os.getpid() % 50}.{i}" for i in (11, 12, 13)]
        self.addrs = {f"n{i + 1}": f"{h}:{_free_port(h)}" for i, h in enumerate(hosts)}
        self.control = {nid: _free_port(a.rsplit(":", 1)[0]) for nid, a in self.addrs.items()}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, nid: str) -> None:
        doc = {"self_id": nid, "self_addr": self.addrs[nid],
               "peers": {k: v for k, v in self.addrs.items() if k != nid},
               "data_dir": str(self.root / nid), "secret": SECRET, "bootstrap": True,
               "control_port": self.control[nid]}
        log = open(self.root / f"{nid}.log", "ab")  # noqa: SIM115 (lives as long as the process)
        proc = subprocess.Popen([sys.executable, __file__, "--node", json.dumps(doc)],
                                stdout=subprocess.PIPE, stderr=log)
        log.close()
        assert proc.stdout is not None
        if not proc.stdout.readline().startswith(b"READY"):
            raise RuntimeError(f"node {nid} failed to start, see {self.root / (nid + '.log')}")
        self.procs[nid] = proc

    def request(self, nid: str, **req: Any) -> dict[str, Any]:
        host = self.addrs[nid].rsplit(":", 1)[0]
        with socket.create_connection((host, self.control[nid]), timeout=120) as s:
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError(nid)
                buf += chunk
        reply: dict[str, Any] = json.loads(buf)
        if not reply["ok"]:
            raise RuntimeError(f"{nid}: {reply}")
        return reply

    def leader(self, within: float = 10.0) -> str:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            sts = {nid: self.request(nid, cmd="status") for nid in self.procs}
            leaders = [n for n, s in sts.items() if s["role"] == "leader"]
            if len(leaders) == 1 and all(s["leader"] == leaders[0] for s in sts.values()):
                caught_up = min(s["applied"] for s in sts.values()) >= sts[leaders[0]]["commit"] - 0
                if caught_up:
                    return leaders[0]
            time.sleep(0.02)
        raise RuntimeError("no stable leader")

    def kill(self, nid: str) -> None:
        proc = self.procs.pop(nid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def close(self) -> None:
        for nid in list(self.procs):
            self.kill(nid)


def _cpu_seconds(procs: dict[str, subprocess.Popen[bytes]]) -> float:
    """User + system CPU of the node processes so far (/proc/<pid>/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for proc in procs.values():
        with open(f"/proc/{proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--node", help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--proposals", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--size", type=int, default=200, help="value bytes per proposal")
    ap.add_argument("--kills", type=int, default=10)
    args = ap.parse_args()
    if args.node:
        asyncio.run(_node(json.loads(args.node)))
        return

    root = Path(tempfile.mkdtemp(prefix="raftpbx-bench-"))
    cluster = _Cluster(root)
    try:
        for nid in cluster.addrs:
            cluster.start(nid)
        plans = [("leader", args.concurrency), ("follower", args.concurrency), ("leader", 8),
                 ("leader", 1), ("follower", 1)]
        rows: dict[tuple[str, int], list[dict[str, Any]]] = {plan: [] for plan in plans}
        for run in range(args.runs):
            lead = cluster.leader()
            follower = next(n for n in cluster.procs if n != lead)
            for via, conc in plans:
                nid = lead if via == "leader" else follower
                n = args.proposals if conc > 1 else max(200, args.proposals // 6)
                cpu0 = _cpu_seconds(cluster.procs)
                row = cluster.request(nid, cmd="load", prefix=f"r{run}{via}{conc}", n=n,
                                      concurrency=conc, size=args.size)
                row["cpu_us"] = (_cpu_seconds(cluster.procs) - cpu0) / n * 1e6  # 3 nodes, per commit
                rows[via, conc].append(row)
        failovers: list[float] = []
        for k in range(args.kills):
            lead = cluster.leader()
            survivor = next(n for n in cluster.procs if n != lead)
            t0 = time.perf_counter()
            cluster.kill(lead)
            cluster.request(survivor, cmd="first_write", op=f"failover-{k}")
            failovers.append(time.perf_counter() - t0)
            cluster.start(lead)  # same data dir: restarts with its journal and dump
        print(f"raftpbx replication bench: 3 nodes on loopback, durable journals (msync per batch), "
              f"{args.proposals} proposals per run (1/6 at concurrency 1) x {args.runs} runs, "
              f"{args.size}-byte values; {os.cpu_count()} CPUs")
        print(f"load average {os.getloadavg()[0]:.1f}")
        print(f"{'path':<10} {'proposers':>9} {'commits/s':>10} {'p50':>10} {'p99':>10} {'CPU us/commit':>14}"
              f"   (median of {args.runs} runs; CPU of the 3 nodes)")
        for (via, conc), rs in rows.items():
            print(f"{via:<10} {conc:>9} {statistics.median(r['rate'] for r in rs):>10.0f} "
                  f"{_fmt_ms(statistics.median(r['p50'] for r in rs)):>10} "
                  f"{_fmt_ms(statistics.median(r['p99'] for r in rs)):>10} "
                  f"{statistics.median(r['cpu_us'] for r in rs):>14.0f}")
        if not failovers:
            return
        failovers.sort()
        print(f"failover (kill -9 leader -> first write via a survivor), {len(failovers)} kills: "
              f"p50 {statistics.median(failovers):.3f} s, max {failovers[-1]:.3f} s, "
              f"all: {' '.join(f'{f:.2f}' for f in failovers)}")
    finally:
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
