"""Benchmark of raftpbx.replication on a 3-node loopback cluster with durable (msync'ed) journals.

Prints, as medians over several runs: committed proposals/s and p50/p99 latency through the leader
and through a follower (concurrent proposers, so group commit is exercised), then failover time
(SIGKILL of the leader -> first successful write through a survivor) over repeated kills.

    .venv/bin/python bench/replication.py [--runs 3] [--proposals 3000] [--concurrency 32] [--kills 10]
    .venv/bin/python bench/replication.py --rate 700 [--seconds 5] [--runs 3] [--via leader|follower]

`--rate R` is the moderate-load figure (issue 8): R single-command proposals per second, open loop (one
task per proposal, as SIP requests arrive), through the leader or a follower, and per node role the CPU
per commit of the whole process and of its Raft thread alone, and the frames sent and ticks run per commit
(a tick is one Raft-thread wake-up; idle ticks, every `tick_period`, are counted too).

    .venv/bin/python bench/replication.py --register 1600 [--seconds 5] [--runs 3] [--users 3000] [--inflight 2]
    .venv/bin/python bench/replication.py --hot-path gen|encode|apply --runs ROUNDS [--per 16]   (callgrind)

`--register R` is the REGISTER bench's replication load: R REGISTER commands per second in all, a third
proposed on each node (the suite spreads its REGISTERs over the three nodes), each decided by the real
`decide_register` on that node's state and proposed through the node's real `ProposalBatcher` (1-64
commands per entry, 2 entries in flight), applied by the real `StateMachine` (`apply_entry`, digest, dedupe
window, an outcome-reading listener like the call recorder's). Per node role and per committed command: CPU
of the process and of the Raft thread (user, system), frames sent and received, ticks, fdatasyncs, and the
entries and the time spent in the apply callback; and the commands per entry.

Each node is this script in `--node` mode: a Replicator around a small dedupe-by-op_id KV, with a
line-based JSON control socket on loopback. Nothing listens outside 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
from raftpbx.state import (
    Command,
    ContactSpec,
    ExtensionCreated,
    RegisterAccepted,
    State,
    apply_entry,
    decide_register,
    encode_batch,
)

from raftpbx.replication import ReplicationConfig, ReplicationError, Replicator, _SealedConnection
from raftpbx.service import StateMachine
from raftpbx.sipnode import ProposalBatcher

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


async def _paced(rep: Replicator, prefix: str, rate: float, seconds: float, size: int) -> dict[str, Any]:
    """`rate` proposals/s for `seconds`, each its own task (open loop); latencies of those that committed."""
    loop = asyncio.get_running_loop()
    value = os.urandom(size)
    latencies: list[float] = []
    failed = 0

    async def one(i: int) -> None:
        nonlocal failed
        t = time.perf_counter()
        try:
            await rep.propose(msgpack.packb([f"{prefix}-{i}", f"k{i % 1000}", value]), timeout=10)
        except ReplicationError:
            failed += 1
            return
        latencies.append(time.perf_counter() - t)

    tasks = []
    start = loop.time()
    n = int(rate * seconds)
    for i in range(n):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    latencies.sort()
    return {"n": n, "failed": failed, "p50": latencies[len(latencies) // 2] if latencies else 0.0,
            "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else 0.0}


# Frames sent and received, ticks run, fdatasyncs, entries applied and seconds in apply, by this node
# (wrappers installed by _count).
_COUNTS: dict[str, float] = {"frames": 0, "frames_in": 0, "ticks": 0, "fsyncs": 0, "entries": 0, "apply_s": 0.0}


def _count(rep: Replicator) -> None:
    """Count frames (one TCP write of one message or batch of messages) and ticks (Raft-thread wake-ups)."""
    node = rep._node
    assert node is not None
    real_send = _SealedConnection.send

    def send(self: Any, message: Any) -> None:
        _COUNTS["frames"] += 1
        real_send(self, message)

    _SealedConnection.send = send  # type: ignore[method-assign]
    real_parse = _SealedConnection._TcpConnection__processParseMessage

    def parse(self: Any) -> Any:
        message = real_parse(self)
        if message is not None:
            _COUNTS["frames_in"] += 1
        return message

    _SealedConnection._TcpConnection__processParseMessage = parse  # type: ignore[method-assign]
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        _COUNTS["fsyncs"] += 1
        real_fdatasync(fd)

    os.fdatasync = fdatasync
    real_apply = rep._apply

    def apply(entry: bytes, index: int) -> object:
        t = time.thread_time()  # CPU of this thread: the wall time includes waits for the GIL
        try:
            return real_apply(entry, index)
        finally:
            _COUNTS["apply_s"] += time.thread_time() - t
            _COUNTS["entries"] += 1

    rep._apply = apply
    real_tick = node._onTick

    def tick(*args: Any, **kwargs: Any) -> None:
        _COUNTS["ticks"] += 1
        real_tick(*args, **kwargs)

    node._onTick = tick  # type: ignore[method-assign]


_REALM = "bench.invalid"


async def _create_users(rep: Replicator, users: int) -> None:
    """Extensions 1000.. (the REGISTER load's AoRs), 64 per entry."""
    commands = [Command(f"create-{u}", ExtensionCreated(str(1000 + u), "", _REALM, "0" * 32, "0" * 64, 1.0))
                for u in range(users)]
    for i in range(0, len(commands), 64):
        await rep.propose(encode_batch(commands[i:i + 64]), timeout=10)


async def _registers(rep: Replicator, machine: StateMachine, node_id: str, users: range, rate: float,
                     seconds: float, cseq: int, inflight: int = 2) -> dict[str, Any]:
    """`rate` REGISTERs/s for `seconds` through this node's ProposalBatcher (what SipNode.propose_then does):
    each decided by `decide_register` on the local state, its callback answers (here: records latency)."""
    loop = asyncio.get_running_loop()
    batcher = ProposalBatcher(rep, max_inflight=inflight)
    latencies: list[float] = []
    failed = 0
    pending: set[asyncio.Future[Any]] = set()
    all_done = asyncio.Event()
    n = int(rate * seconds)
    submitted_all = False
    start = loop.time()
    for i in range(n):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        user = str(1000 + users[i % len(users)])
        contact = f"sip:{user}@127.0.0.1:{5060 + i % 1000}"
        with machine.lock:
            decision = decide_register(
                machine.state, aor=user, contacts=[ContactSpec(contact, contact, 300)], star=False,
                expires_header=None, call_id=f"{node_id}-{user}-{cseq}", cseq=cseq + i, received="127.0.0.1:5060",
                transport="udp", node_id=node_id, now=time.time(), min_expires=60, max_expires=3600,
                default_expires=300, max_contacts=10, branch=f"z9hG4bK{i}")
        if not isinstance(decision, RegisterAccepted):
            failed += 1
            continue
        commands = [Command(decision.op_id, event) for event in decision.events]
        t = time.perf_counter()
        future = batcher.submit(commands, 10.0)
        pending.add(future)

        def done(fut: asyncio.Future[Any], t: float = t) -> None:
            nonlocal failed
            pending.discard(fut)
            if not pending and submitted_all:
                all_done.set()
            if fut.cancelled() or fut.exception() is not None:
                failed += 1
            else:
                latencies.append(time.perf_counter() - t)

        future.add_done_callback(done)
    submitted_all = True
    if pending:
        await all_done.wait()
    await batcher.aclose()
    latencies.sort()
    return {"n": n, "failed": failed, "entries": batcher.entries, "commands": batcher.commands,
            "p50": latencies[len(latencies) // 2] if latencies else 0.0,
            "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else 0.0}


def _recorder_listener(machine: StateMachine) -> None:
    """An apply listener that reads the outcomes as the call recorder's does (no decode)."""
    def on_apply(_index: int, applied: Any) -> None:
        [o.result["call_id"] for o in applied.outcomes if "call_id" in o.result]

    machine.add_apply_listener(on_apply)


async def _first_write(rep: Replicator, op: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            await rep.propose(msgpack.packb([op, "failover", b"x"]), timeout=0.5)
            return
        except ReplicationError:
            continue
    raise RuntimeError("no successful write within 10 s")


def _profile_raft_thread(path: Path) -> None:
    """cProfile the Raft thread (`Replicator._run`) and write its stats to `path` when it ends."""
    here, saved = Path(__file__).resolve().parent, sys.path[:]
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != here]  # bench/profile.py is not `profile`
    try:
        import cProfile
    finally:
        sys.path = saved

    real_run = Replicator._run

    def run(self: Replicator) -> None:
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            real_run(self)
        finally:
            profiler.disable()
            profiler.dump_stats(str(path))

    Replicator._run = run  # type: ignore[method-assign]


async def _node(doc: dict[str, Any]) -> None:
    control = doc.pop("control_port")
    profile = doc.pop("profile", None)
    if profile:
        _profile_raft_thread(Path(profile) / f"{doc['self_id']}.pstats")
    machine: StateMachine | None = None
    if doc.pop("state", False):
        machine = StateMachine()
        _recorder_listener(machine)
        cfg = ReplicationConfig(**{**doc, "data_dir": Path(doc["data_dir"])})
        rep = Replicator(cfg, apply=machine.apply, snapshot=machine.snapshot, restore=machine.restore,
                         fork_locks=(machine.lock,))
    else:
        kv = _KV()
        cfg = ReplicationConfig(**{**doc, "data_dir": Path(doc["data_dir"])})
        rep = Replicator(cfg, apply=kv.apply, snapshot=kv.snapshot, restore=kv.restore)
    await rep.start()
    _count(rep)
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            req = json.loads(line)
            reply: dict[str, Any] = {"ok": True}
            try:
                if req["cmd"] == "status":
                    st = rep.status()
                    reply.update(role=st.role, leader=st.leader, commit=st.commit_index, applied=st.applied_index)
                elif req["cmd"] == "counters":
                    thread = rep._thread
                    reply.update(_COUNTS, raft_tid=thread.native_id if thread is not None else None)
                elif req["cmd"] == "users":
                    await _create_users(rep, req["users"])
                elif req["cmd"] == "register":
                    assert machine is not None
                    reply.update(await _registers(rep, machine, cfg.self_id, range(*req["users"]), req["rate"],
                                                  req["seconds"], req["cseq"], req.get("inflight", 2)))
                elif req["cmd"] == "paced":
                    reply.update(await _paced(rep, req["prefix"], req["rate"], req["seconds"], req["size"]))
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
        self.profile: str | None = None  # a directory: each node's Raft thread is profiled into it

    def start(self, nid: str, *, state: bool = False) -> None:
        doc = {"self_id": nid, "self_addr": self.addrs[nid],
               "peers": {k: v for k, v in self.addrs.items() if k != nid},
               "data_dir": str(self.root / nid), "secret": SECRET, "bootstrap": True,
               "control_port": self.control[nid], "state": state, "profile": self.profile}
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

    def stop(self) -> None:
        """Stop every node cleanly (profiles are written at a clean stop)."""
        for nid in list(self.procs):
            with contextlib.suppress(OSError, RuntimeError):
                self.request(nid, cmd="stop")
        for proc in self.procs.values():
            proc.wait(timeout=30)
        self.procs.clear()

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


def _thread_cpu(pid: int, tid: int) -> tuple[float, float]:
    """User and system CPU seconds of one thread so far."""
    tick = os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / tick, int(fields[12]) / tick


def _paced_runs(cluster: _Cluster, args: argparse.Namespace) -> None:
    """The moderate-load figure: CPU, frames and ticks per commit, leader and followers apart."""
    rows: list[dict[Any, Any]] = []
    for run in range(args.runs):
        lead = cluster.leader()
        via = lead if args.via == "leader" else next(n for n in cluster.procs if n != lead)

        def sample() -> dict[str, tuple[float, float, float, int, int]]:
            out = {}
            for nid, proc in cluster.procs.items():
                c = cluster.request(nid, cmd="counters")
                user, system = _thread_cpu(proc.pid, c["raft_tid"])
                out[nid] = (_cpu_seconds({nid: proc}), user + system, user, c["frames"], c["ticks"])
            return out

        before = sample()
        reply = cluster.request(via, cmd="paced", prefix=f"p{run}", rate=args.rate, seconds=args.seconds,
                                size=args.size)
        after = sample()
        n = reply["n"] - reply["failed"]
        row: dict[Any, Any] = {"p50": reply["p50"], "p99": reply["p99"], "failed": reply["failed"]}
        for role, nids in (("leader", [lead]), ("follower", [x for x in cluster.procs if x != lead])):
            for k, name in enumerate(("cpu", "raft", "raft_user", "frames", "ticks")):
                row[role, name] = sum(after[x][k] - before[x][k] for x in nids) / len(nids) / n
        rows.append(row)
    print(f"raftpbx replication bench, fixed rate: 3 nodes on loopback, durable journals, {args.rate:g} "
          f"single-command proposals/s for {args.seconds:g} s through the {args.via} x {args.runs} runs, "
          f"{args.size}-byte values; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
    print(f"p50 {_fmt_ms(statistics.median(r['p50'] for r in rows))}, p99 "
          f"{_fmt_ms(statistics.median(r['p99'] for r in rows))}, failed {sum(r['failed'] for r in rows)}"
          f"   (medians of {args.runs} runs; per commit, per node; follower = mean of the two)")
    print(f"{'node':<10} {'CPU us':>8} {'Raft thread us':>15} {'of it user':>11} {'frames sent':>12} {'ticks':>7}")
    for role in ("leader", "follower"):
        print(f"{role:<10} {statistics.median(r[role, 'cpu'] for r in rows) * 1e6:>8.0f} "
              f"{statistics.median(r[role, 'raft'] for r in rows) * 1e6:>15.0f} "
              f"{statistics.median(r[role, 'raft_user'] for r in rows) * 1e6:>11.0f} "
              f"{statistics.median(r[role, 'frames'] for r in rows):>12.2f} "
              f"{statistics.median(r[role, 'ticks'] for r in rows):>7.2f}")


_REG_FIELDS = ("cpu", "user", "system", "raft", "raft_user", "raft_system", "frames", "frames_in", "ticks",
               "fsyncs", "entries", "apply_s")


def _register_runs(cluster: _Cluster, args: argparse.Namespace) -> None:
    """The REGISTER bench's replication load: per committed command, per node role."""
    tick = os.sysconf("SC_CLK_TCK")
    lead = cluster.leader()
    cluster.request(lead, cmd="users", users=args.users)
    nids = sorted(cluster.procs)
    thirds = [(k * args.users // 3, (k + 1) * args.users // 3) for k in range(3)]
    rows: list[dict[Any, Any]] = []

    def sample() -> dict[str, tuple[float, ...]]:
        out = {}
        for nid, proc in cluster.procs.items():
            c = cluster.request(nid, cmd="counters")
            with open(f"/proc/{proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user, system = int(fields[11]) / tick, int(fields[12]) / tick
            r_user, r_system = _thread_cpu(proc.pid, c["raft_tid"])
            out[nid] = (user + system, user, system, r_user + r_system, r_user, r_system, c["frames"],
                        c["frames_in"], c["ticks"], c["fsyncs"], c["entries"], c["apply_s"])
        return out

    for run in range(args.runs):
        lead = cluster.leader()
        before = sample()
        replies: dict[str, dict[str, Any]] = {}

        def drive(nid: str, users: tuple[int, int], run: int = run,
                  replies: dict[str, dict[str, Any]] = replies) -> None:
            replies[nid] = cluster.request(nid, cmd="register", users=list(users), rate=args.register / 3,
                                           seconds=args.seconds, cseq=1 + run * 1_000_000,
                                           inflight=args.inflight)

        threads = [threading.Thread(target=drive, args=(nid, thirds[k])) for k, nid in enumerate(nids)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = sample()
        n = sum(r["n"] - r["failed"] for r in replies.values())
        row: dict[Any, Any] = {
            "p50": statistics.median(r["p50"] for r in replies.values()),
            "p99": max(r["p99"] for r in replies.values()),
            "failed": sum(r["failed"] for r in replies.values()),
            "per_entry": sum(r["commands"] for r in replies.values()) / max(1, sum(r["entries"] for r in replies.values())),
        }
        for role, members in (("leader", [lead]), ("follower", [x for x in cluster.procs if x != lead])):
            for k, name in enumerate(_REG_FIELDS):
                row[role, name] = sum(after[x][k] - before[x][k] for x in members) / len(members) / n
        rows.append(row)

    def med(key: Any) -> float:
        return statistics.median(r[key] for r in rows)

    print(f"raftpbx replication bench, REGISTER load: 3 nodes on loopback, durable journals, {args.register:g} "
          f"REGISTER commands/s in all (a third proposed on each node through its ProposalBatcher) for "
          f"{args.seconds:g} s x {args.runs} runs, {args.users} users (leader {lead}), {args.inflight} entries in "
          f"flight per node; {os.cpu_count()} CPUs; "
          f"load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"p50 {_fmt_ms(med('p50'))}, p99 {_fmt_ms(med('p99'))}, failed {sum(r['failed'] for r in rows)}, "
          f"commands per entry {med('per_entry'):.1f}   (medians of {args.runs} runs; per committed command, "
          f"per node; follower = mean of the two)")
    print(f"{'node':<9} {'CPU us':>7} {'usr':>5} {'sys':>5} {'Raft us':>8} {'usr':>5} {'sys':>5} {'frames out':>10} "
          f"{'in':>6} {'ticks':>6} {'fsyncs':>7} {'entries':>7} {'apply us':>8}")
    for role in ("leader", "follower"):
        print(f"{role:<9} {med((role, 'cpu')) * 1e6:>7.0f} {med((role, 'user')) * 1e6:>5.0f} "
              f"{med((role, 'system')) * 1e6:>5.0f} {med((role, 'raft')) * 1e6:>8.0f} "
              f"{med((role, 'raft_user')) * 1e6:>5.0f} {med((role, 'raft_system')) * 1e6:>5.0f} "
              f"{med((role, 'frames')):>10.3f} {med((role, 'frames_in')):>6.3f} {med((role, 'ticks')):>6.3f} "
              f"{med((role, 'fsyncs')):>7.3f} {med((role, 'entries')):>7.3f} {med((role, 'apply_s')) * 1e6:>8.1f}")


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def _hot_path(mode: str, per: int, rounds: int, users: int = 1000) -> None:
    """In process, no cluster: decide (`gen`), + encode (`encode`), + apply (`apply`) `rounds` entries of `per`
    REGISTER commands, after every user registered once (so the counted ones are refreshes). Run it under
    callgrind at two round counts; the difference per command, mode minus mode, is each step's cost:

        PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \
            .venv/bin/python bench/replication.py --hot-path apply --rounds 40   (then 120; gen, encode alike)
    """
    state = State()
    created = [Command(f"create-{u}", ExtensionCreated(str(1000 + u), "", _REALM, "0" * 32, "0" * 64, 1.0))
               for u in range(users)]
    index = 1
    for i in range(0, users, 64):
        apply_entry(state, encode_batch(created[i:i + 64]), index)
        index += 1

    def batch(r: int) -> list[Command]:
        out: list[Command] = []
        for j in range(r * per, (r + 1) * per):
            user = str(1000 + j % users)
            contact = f"sip:{user}@127.0.0.1:{5060 + j % 1000}"
            decision = decide_register(
                state, aor=user, contacts=[ContactSpec(contact, contact, 300)], star=False, expires_header=None,
                call_id=f"c-{user}", cseq=1 + j, received="127.0.0.1:5060", transport="udp", node_id="n1",
                now=1000.0 + j * 0.001, min_expires=60, max_expires=3600, default_expires=300, max_contacts=10,
                branch=f"z{j}")
            assert isinstance(decision, RegisterAccepted)
            out.extend(Command(decision.op_id, event) for event in decision.events)
        return out

    warm = users // per + 1
    for r in range(warm):
        apply_entry(state, encode_batch(batch(r)), index)
        index += 1
    groups = [batch(warm + r) for r in range(rounds)]
    if mode == "gen":
        return
    entries = [encode_batch(group) for group in groups]
    if mode == "apply":
        for entry in entries:
            apply_entry(state, entry, index)
            index += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--node", help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--proposals", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--size", type=int, default=200, help="value bytes per proposal")
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--rate", type=float, help="fixed-rate mode: single-command proposals per second")
    ap.add_argument("--seconds", type=float, default=5.0, help="fixed-rate mode: duration of one run")
    ap.add_argument("--via", choices=("leader", "follower"), default="leader", help="fixed-rate mode")
    ap.add_argument("--register", type=float, help="REGISTER mode: commands per second in all, over 3 nodes")
    ap.add_argument("--users", type=int, default=3000, help="REGISTER mode: extensions")
    ap.add_argument("--inflight", type=int, default=2,
                    help="REGISTER mode: the batcher's entries in flight per node (SipNode uses 2)")
    ap.add_argument("--hot-path", choices=("gen", "encode", "apply"),
                    help="in process, for callgrind: decide / + encode / + apply of REGISTER entries")
    ap.add_argument("--per", type=int, default=16, help="hot-path mode: commands per entry")
    ap.add_argument("--profile", help="a directory: cProfile each node's Raft thread into <node>.pstats")
    args = ap.parse_args()
    if args.node:
        asyncio.run(_node(json.loads(args.node)))
        return
    if args.hot_path:
        _hot_path(args.hot_path, args.per, args.runs)
        return

    root = Path(tempfile.mkdtemp(prefix="raftpbx-bench-"))
    cluster = _Cluster(root)
    cluster.profile = str(Path(args.profile).resolve()) if args.profile else None
    try:
        for nid in cluster.addrs:
            cluster.start(nid, state=bool(args.register))
        if args.register:
            _register_runs(cluster, args)
            if args.profile:
                cluster.stop()
            return
        if args.rate:
            _paced_runs(cluster, args)
            return
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
