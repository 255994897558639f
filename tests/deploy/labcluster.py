"""A raftpbx cluster whose nodes run as real processes inside lab hosts (deploy/netns), for the lab tests.

Host hN runs node `nodeN` bound to the host's lab address (Raft 7001, admin 7002, SIP 5060). The configs
come from deploy/gen_configs.py (an inventory of the member hosts, regenerated as hosts are added, like an
operator would), written into one folder with the shared secret and token; each node's data dir is
ROOT/hN/var. The hosts share this machine's filesystem, so the test reads logs and wipes data dirs
directly. Admin calls are made from inside the operator's lab host (`labkit.rpc`), since nothing outside
the lab reaches its addresses.

`kill_all()` (always called by the fixtures) kills every node; the Lab's destroy would kill them anyway.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import labkit
from labkit import Lab, RpcFailure, wait_for

_spec = importlib.util.spec_from_file_location("rpbx_gen_configs", labkit.DEPLOY / "gen_configs.py")
assert _spec is not None and _spec.loader is not None
gen_configs = importlib.util.module_from_spec(_spec)
sys.modules["rpbx_gen_configs"] = gen_configs
_spec.loader.exec_module(gen_configs)

DOMAIN = "lab.example"


class LabNode:
    def __init__(self, cluster: LabCluster, host: str) -> None:
        self.cluster = cluster
        self.host = host
        self.id = f"node{cluster.lab.index(host)}"
        self.ip = cluster.lab.address(host)
        self.data_dir = cluster.root / host / "var"
        self.log_path = cluster.root / host / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.cluster.out / f"{self.id}.toml"

    @property
    def raft(self) -> str:
        return f"{self.ip}:7001"

    @property
    def url(self) -> str:
        return f"http://{self.ip}:7002"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, *extra: str) -> None:
        """`raftpbx node --config ID.toml EXTRA...` inside the node's host."""
        assert not self.alive, f"{self.id} already runs"
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = self.cluster.lab.popen(
                self.host, [sys.executable, "-P", "-m", "raftpbx.cli", "node", "--config", str(self.config_path),
                            *extra], stdout=log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def wipe(self) -> None:
        """The disk is gone: the data dir is emptied (the node must not run)."""
        assert not self.alive
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def call(self, method: str, timeout: float = 5.0, **params: Any) -> Any:
        return self.cluster.rpc(self.url, method, timeout=timeout, **params)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""


class LabCluster:
    """Nodes on `hosts` of `lab`; configs generated for the hosts passed to `configure`."""

    def __init__(self, lab: Lab, root: Path, operator: str, settings: dict[str, Any] | None = None) -> None:
        self.lab = lab
        self.root = root
        self.out = root / "out"
        self.operator = operator
        self.settings = {"log.level": "info", "raft.proposal_timeout": 2.0, **(settings or {})}
        self.nodes: dict[str, LabNode] = {}

    # -- configuration -------------------------------------------------------------------------------
    def configure(self, hosts: list[str]) -> list[LabNode]:
        """Write an inventory of `hosts` and run gen_configs on it (secret and token kept across runs)."""
        entries = []
        for host in hosts:
            node = self.nodes.setdefault(host, LabNode(self, host))
            entries.append(f'[[hosts]]\nid = "{node.id}"\nssh = "root@{node.ip}"\naddress = "{node.ip}"\n'
                           f'data_dir = "{node.data_dir}"\n')
        settings = "\n".join(f'"{k}" = {json.dumps(v)}' for k, v in self.settings.items())
        inventory = self.root / "inventory.toml"
        inventory.write_text(f'[cluster]\ndomain = "{DOMAIN}"\nconfig_dir = "{self.out}"\n\n'
                             f'[settings]\n{settings}\n\n' + "\n".join(entries))
        gen_configs.generate(inventory, self.out)
        return [self.nodes[h] for h in hosts]

    @property
    def token(self) -> str:
        return (self.out / "token").read_text().strip()

    def rpc(self, url: str, method: str, timeout: float = 5.0, **params: Any) -> Any:
        return labkit.rpc(self.lab.namespace(self.operator), url, self.token, method, timeout=timeout, **params)

    # -- running -------------------------------------------------------------------------------------
    def live(self) -> list[LabNode]:
        return [n for n in self.nodes.values() if n.alive]

    def by_id(self, node_id: str) -> LabNode:
        return next(n for n in self.nodes.values() if n.id == node_id)

    def start(self, hosts: list[str], *extra: str) -> LabNode:
        for host in hosts:
            self.nodes[host].start(*extra)
        return self.wait_leader([self.nodes[h] for h in hosts])

    def wait_leader(self, among: list[LabNode] | None = None, timeout: float = 30.0) -> LabNode:
        """Every node of `among` (default: the live ones) answers and names the same leader among them."""
        candidates = among if among is not None else self.live()

        def agreed() -> LabNode | None:
            for node in candidates:
                if not node.alive:
                    raise AssertionError(f"{node.id} exited:\n{node.log()[-3000:]}")
            leaders = {n.call("node.info", timeout=1.0).get("leader") for n in candidates}
            if len(leaders) == 1:
                (leader,) = leaders
                if leader is not None and any(n.id == leader for n in candidates):
                    return self.by_id(leader)
            return None

        return wait_for(agreed, timeout, "an agreed leader")  # type: ignore[no-any-return]

    def digests(self, nodes: list[LabNode] | None = None) -> dict[str, tuple[int, str]]:
        out = {}
        for node in nodes if nodes is not None else self.live():
            d = node.call("state.digest", timeout=2.0)
            out[node.id] = (d["applied_index"], d["digest"])
        return out

    def assert_converged(self, nodes: list[LabNode] | None = None, timeout: float = 20.0) -> tuple[int, str]:
        last: dict[str, tuple[int, str]] = {}

        def same() -> bool:
            nonlocal last
            last = self.digests(nodes)
            return len(set(last.values())) == 1

        try:
            wait_for(same, timeout, "equal applied indexes and digests")
        except AssertionError:
            raise AssertionError(f"nodes did not converge: {last}") from None
        return next(iter(last.values()))

    def extensions(self, node: LabNode) -> set[str]:
        return {e["extension"] for e in node.call("extension.list", timeout=10.0)["extensions"]}

    def kill_all(self) -> None:
        for node in self.nodes.values():
            node.kill()


def applied(node: LabNode) -> int:
    return int(node.call("state.digest", timeout=2.0)["applied_index"])


def writes_acked(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


class Writer:
    """tests/deploy/writer.py in the operator's host: admin writes to the cluster, acks into a file."""

    def __init__(self, cluster: LabCluster, first: int) -> None:
        stamp = time.monotonic_ns()
        self.cluster = cluster
        self.acks = cluster.root / f"acks-{stamp}"
        self.stop_file = cluster.root / f"stop-{stamp}"
        self.first = first
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def acked(self) -> list[str]:
        return writes_acked(self.acks)

    def __enter__(self) -> Writer:
        self.acks.touch()
        with open(self.cluster.root / "writer.log", "ab") as log:
            self.proc = self.cluster.lab.popen(
                self.cluster.operator, [sys.executable, str(Path(__file__).with_name("writer.py")),
                                        str(self.cluster.out / "cluster.json"), str(self.acks),
                                        str(self.stop_file), str(self.first)], stdout=log, stderr=log)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_file.touch()
        assert self.proc is not None
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def wait_more(self, count: int, timeout: float, what: str) -> None:
        target = len(self.acked) + count
        wait_for(lambda: len(self.acked) >= target, timeout, what)


__all__ = ["LabCluster", "LabNode", "RpcFailure", "Writer", "applied", "gen_configs"]
