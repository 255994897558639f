"""Fixtures for replication tests: in-process clusters and clusters of real replica processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from replica import KV

from raftpbx.replication import ReplicationConfig, Replicator

HERE = Path(__file__).parent
SECRET = "test-cluster-secret-0123456789"
_next_host = [20]


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def fresh_hosts(n: int) -> list[str]:
    """Distinct loopback addresses per cluster, so a leftover socket never collides with a new test."""
    hosts = []
    for _ in range(n):
        _next_host[0] = 20 + (_next_host[0] - 19) % 200
        hosts.append(f"127.0.{os.getpid() % 200 + 1}.{_next_host[0]}")
    return hosts


def make_configs(data_root: Path, n: int = 3, **overrides: Any) -> list[ReplicationConfig]:
    hosts = fresh_hosts(n)
    addrs = {f"n{i + 1}": f"{h}:{free_port(h)}" for i, h in enumerate(hosts)}
    configs = []
    for node_id, addr in addrs.items():
        peers = {k: v for k, v in addrs.items() if k != node_id}
        configs.append(ReplicationConfig(self_id=node_id, self_addr=addr, peers=peers,
                                         data_dir=data_root / node_id, secret=SECRET,
                                         bootstrap=True, **overrides))
    return configs


async def wait_for(cond: Callable[[], bool], within: float, what: str, interval: float = 0.01) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)


class Cluster:
    """In-process replicators (one Raft thread each) around `KV` state machines."""

    def __init__(self, configs: list[ReplicationConfig]) -> None:
        self.configs = configs
        self.kvs: list[KV] = []
        self.reps: list[Replicator] = []

    async def start(self, configure: Callable[[int, Replicator], None] | None = None) -> None:
        self.kvs = [KV() for _ in self.configs]
        self.reps = [Replicator(c, apply=kv.apply, snapshot=kv.snapshot, restore=kv.restore,
                                fork_locks=())  # KV.snapshot takes no lock: dumps are forked (hazard 8)
                     for c, kv in zip(self.configs, self.kvs, strict=True)]
        for i, rep in enumerate(self.reps):
            if configure is not None:
                configure(i, rep)
        await asyncio.gather(*(r.start() for r in self.reps))

    async def stop(self) -> None:
        await asyncio.gather(*(r.stop() for r in self.reps))

    async def leader(self, within: float = 5.0) -> int:
        found: list[int] = []

        def one_leader() -> bool:
            leaders = [i for i, r in enumerate(self.reps) if r.status().role == "leader"]
            ids = {r.status().leader for r in self.reps}
            if len(leaders) == 1 and ids == {self.configs[leaders[0]].self_id}:
                found[:] = leaders
                return True
            return False

        await wait_for(one_leader, within, "a leader known to every node")
        return found[0]


@pytest.fixture
async def cluster_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Cluster]]]:
    made: list[Cluster] = []

    async def factory(n: int = 3, configure: Callable[[int, Replicator], None] | None = None,
                      **overrides: Any) -> Cluster:
        c = Cluster(make_configs(tmp_path / f"c{len(made)}", n, **overrides))
        made.append(c)
        await c.start(configure)
        return c

    yield factory
    for c in made:
        await c.stop()


class ProcCluster:
    """Replica processes (tests/replication/replica.py) that tests can kill -9 or SIGSTOP."""

    def __init__(self, root: Path, n: int = 3, **overrides: Any) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.logs: list[Any] = []
        self.overrides = overrides
        self.configs = make_configs(root, n, **overrides)
        self.control = [free_port(c.self_addr.rsplit(":", 1)[0]) for c in self.configs]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * n

    def doc(self, i: int, **changes: Any) -> dict[str, Any]:
        c = replace(self.configs[i], **changes)
        return {"self_id": c.self_id, "self_addr": c.self_addr, "peers": dict(c.peers),
                "data_dir": str(c.data_dir), "secret": c.secret, "bootstrap": c.bootstrap,
                "join": c.join, "control_port": self.control[i], **self.overrides}

    def start(self, i: int, **changes: Any) -> None:
        log = open(self.root / f"n{i + 1}.log", "ab")  # noqa: SIM115 (closed in close())
        self.logs.append(log)
        proc = subprocess.Popen([sys.executable, str(HERE / "replica.py"), json.dumps(self.doc(i, **changes))],
                                stdout=subprocess.PIPE, stderr=log)
        self.procs[i] = proc
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded: the replica exits (EOF) if start fails
        if not line.startswith(b"READY"):
            raise AssertionError(f"replica n{i + 1} failed to start: {(self.root / f'n{i + 1}.log').read_text()}")

    def request(self, i: int, io_timeout: float = 15.0, **req: Any) -> dict[str, Any]:
        host = self.configs[i].self_addr.rsplit(":", 1)[0]
        with socket.create_connection((host, self.control[i]), timeout=io_timeout) as s:
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("replica closed the control connection")
                buf += chunk
        result: dict[str, Any] = json.loads(buf)
        return result

    def signal(self, i: int, sig: int) -> None:
        proc = self.procs[i]
        assert proc is not None
        os.kill(proc.pid, sig)

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(timeout=10)
        self.procs[i] = None

    def leader(self, timeout: float = 5.0, among: list[int] | None = None) -> int:
        deadline = time.monotonic() + timeout
        nodes = among if among is not None else [i for i, p in enumerate(self.procs) if p is not None]
        while time.monotonic() < deadline:
            sts = {i: self.request(i, cmd="status") for i in nodes}
            leaders = [i for i, s in sts.items() if s["role"] == "leader"]
            if len(leaders) == 1 and all(s["leader"] == f"n{leaders[0] + 1}" for s in sts.values()):
                return leaders[0]
            time.sleep(0.02)
        raise AssertionError("no single leader in time")

    def close(self) -> None:
        for i in range(len(self.procs)):
            self.kill(i)
        for log in self.logs:
            log.close()


@pytest.fixture
def proc_cluster(tmp_path: Path) -> Iterator[Callable[..., ProcCluster]]:
    made: list[ProcCluster] = []

    def factory(n: int = 3, start: bool = True, **overrides: Any) -> ProcCluster:
        c = ProcCluster(tmp_path / f"p{len(made)}", n, **overrides)
        made.append(c)
        if start:
            for i in range(n):
                c.start(i)
        return c

    yield factory
    for c in made:
        c.close()
