"""The netns lab for the chaos suite: nodes on separate network-namespace hosts joined by a switch.

Theory of operation
-------------------
`NetnsCluster` is a `LoopbackCluster` whose nodes live in the hosts of H4's lab (deploy/netns/lab.py):
node i in host hI at 198.51.100.(10+i), and one more host for the clients (phones, SIPp, and this
controller's RPCs). Each host has its own network stack, so every node uses the same ports; the service
address 198.51.100.10:5060 is in `ip` mode: the leader's hook (deploy/hooks/service-address) adds it to its
eth0 and announces it with gratuitous ARP, so the switch really moves it between hosts.

The controller runs in the root namespace, which has no link into the lab. Its RPCs go through a small
thread pool whose threads entered the client host's network namespace (setns(2) on a thread changes that
thread only; sockets it creates stay in that namespace). Nodes, phones and SIPp are started with
`ip netns exec` (which execs, so the pid is the program's own: kill -9 and SIGSTOP work as on loopback).

Network faults use the lab's switch: partitions are nftables rules on the bridge ports (symmetric or one
way), loss and delay are netem on a host's egress (or lab.sh's user-space relay on kernels without
sch_netem). `NetnsFaults` gives them the interface of `LoopbackFirewall`, so chaos/faults.py is the same
for both labs.

Invariants: the lab is destroyed in `close()` whatever happened (lab.sh kills what is left in it); nothing
here reaches outside the lab (its hosts have no default route).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import importlib.util
import os
import sys
import threading
from pathlib import Path
from typing import Any

from chaos.cluster import ChaosNode, LoopbackCluster, rpc

ROOT = Path(__file__).resolve().parents[1]
CLONE_NEWNET = 0x40000000
RAFT_PORT = 7001
ADMIN_PORT = 8080


def _load_lab_module() -> Any:
    spec = importlib.util.spec_from_file_location("rpbx_netns_lab", ROOT / "deploy" / "netns" / "lab.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("rpbx_netns_lab", module)
    spec.loader.exec_module(module)
    return module


def _enter_netns(namespace: str) -> None:
    """Move the calling thread into a named network namespace (setns(2))."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {namespace}: {os.strerror(err)}")
    finally:
        os.close(fd)


class NetnsFaults:
    """Partitions, loss and delay through the lab's switch, with `LoopbackFirewall`'s interface."""

    def __init__(self, cluster: NetnsCluster) -> None:
        self.cluster = cluster
        self.netlab = cluster.netlab

    def host(self, node: ChaosNode) -> str:
        return f"h{node.index}"

    def partition(self, a: list[ChaosNode], b: list[ChaosNode], oneway: bool = False) -> None:
        self.netlab.partition([self.host(n) for n in a], others=[self.host(n) for n in b], oneway=oneway)

    def loss(self, percent: int, nodes: list[ChaosNode]) -> None:
        """Loss on every node's egress: this also hits the node's SIP to the clients (a lossy network)."""
        for node in nodes:
            self.netlab.netem(self.host(node), "loss", f"{percent}%")

    def delay(self, ms: int, jitter_ms: int, nodes: list[ChaosNode]) -> None:
        for node in nodes:
            self.netlab.netem(self.host(node), "delay", f"{ms}ms", f"{jitter_ms}ms")

    def heal(self) -> None:
        self.netlab.heal()

    @staticmethod
    def netem_available() -> bool:
        return True  # lab.sh falls back to its user-space relay

    def create(self) -> None:
        return None

    def destroy(self) -> None:
        return None


class NetnsCluster(LoopbackCluster):
    """N nodes on N lab hosts plus a client host; see the module docstring."""

    lab = "netns"

    def __init__(self, root: Path, size: int = 3, seed: int = 0, settings: dict[str, Any] | None = None) -> None:
        lab_module = _load_lab_module()
        self.netlab = lab_module.Lab(size + 1, name=f"rpbx-chaos-{os.getpid()}")
        self.client_host = f"h{size + 1}"
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lab_up = False
        super().__init__(root, size, seed, settings, firewall=False)
        self.prefix = lab_module.SUBNET_PREFIX
        self.service_address = (f"{self.prefix}.10", 5060)
        for node in self.nodes:
            node.ip = self.netlab.address(f"h{node.index}")
            node.raft_port, node.admin_port = RAFT_PORT, ADMIN_PORT
            node.argv_prefix = ["ip", "netns", "exec", self.netlab.namespace(f"h{node.index}")]
        for node in self.nodes:
            self.write_config(node)
        self.client_ip = self.netlab.address(self.client_host)
        self.wrapper = root / "netns-python"
        self.wrapper.write_text(f"#!/bin/sh\nexec ip netns exec {self.netlab.namespace(self.client_host)} "
                                f"{sys.executable} \"$@\"\n")
        os.chmod(self.wrapper, 0o755)

    def start(self, timeout: float = 30.0) -> ChaosNode:
        self.netlab.create()
        self._lab_up = True
        namespace = self.netlab.namespace(self.client_host)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=6, thread_name_prefix="chaos-netns",
                                                           initializer=_enter_netns, initargs=(namespace,))
        self.firewall = NetnsFaults(self)  # type: ignore[assignment]
        return super().start(timeout)

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
            if self._lab_up:
                self.netlab.destroy()
                self._lab_up = False

    # -- what differs from loopback ----------------------------------------------------------------------
    def rpc(self, url: str, method: str, params: dict[str, Any], timeout: float) -> Any:
        if self._pool is None or threading.current_thread().name.startswith("chaos-netns"):
            raise RuntimeError("the netns lab is not started")
        future = self._pool.submit(rpc, url, self.token, method, params, timeout)
        return future.result(timeout=timeout + 5.0)

    def phone_address(self, i: int) -> str:
        return str(self.client_ip)

    def phone_python(self) -> str | None:
        return str(self.wrapper)

    def sipp_address(self, i: int) -> str:
        return str(self.client_ip)

    def sipp_ports(self, i: int) -> list[int]:
        return [15060 + 10 * i, 16000 + 10 * i, 17000 + 10 * i]

    def sipp_argv_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netlab.namespace(self.client_host)]

    def service_settings(self) -> dict[str, Any]:
        return {
            "service.address": f"{self.service_address[0]}:{self.service_address[1]}",
            "service.mode": "ip",
            "service.interface": "eth0",
            "service.prefix": 24,
            "service.hook": str(ROOT / "deploy" / "hooks" / "service-address"),
        }
