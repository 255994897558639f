"""Harness and fixtures for integration tests with real `raftpbx node` processes on loopback addresses.

Test modules import the fixtures from here (`from nodecluster import cluster_fixture`): this folder
has no conftest.py on purpose, so that `from conftest import ...` elsewhere in tests/ never resolves to it.

Each cluster gets its own loopback addresses (127.<pid-derived>.<cluster#>.<11..>) and free ports, its own
data dirs under tmp_path, and real processes started with subprocess. With `service=True` the cluster also has
a service address in loopback mode on its own 127.<pid-derived>.<cluster#>.10:5060 (`Cluster.service_address`),
served by the leader (raftpbx/service_address.py); `Cluster.service_holder()` says who serves it. Teardown always resumes stopped
processes, checks that every live node converged to the same applied index and state digest, then kills
everything (even if the test failed). Waits poll a condition with a deadline; nothing sleeps blindly.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from raftpbx.config import render_toml

_cluster_counter = itertools.count(1)
_OCTET = 40 + os.getpid() % 150


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll `condition` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = condition()
        except Exception as exc:  # the condition may fail while things settle
            value, last_exc = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last_exc!r})")
        time.sleep(interval)


class RpcFailure(Exception):
    def __init__(self, code: int, message: str, data: Any, http_status: int = 200) -> None:
        super().__init__(f"{code}: {message} {data}")
        self.code = code
        self.message = message
        self.data = data
        self.http_status = http_status


def rpc_raw(url: str, token: str | None, method: str, params: dict[str, Any] | None = None,
            timeout: float = 5.0) -> tuple[int, Any]:
    body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}})
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url + "/rpc", data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, orjson.loads(raw) if raw else None


class Node:
    def __init__(self, cluster: Cluster, index: int, ip: str) -> None:
        self.cluster = cluster
        self.id = f"node{index}"
        self.ip = ip
        self.raft_port = free_port(ip)
        self.admin_port = free_port(ip)
        self.dir = cluster.root / self.id
        self.config_path = self.dir / "node.toml"
        self.log_path = self.dir / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False  # SIGSTOPped

    @property
    def raft(self) -> str:
        return f"{self.ip}:{self.raft_port}"

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.admin_port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, bootstrap: bool = False) -> None:
        assert not self.alive
        # -P: a checkout's raftpbx/ must not shadow an installed package (bench/failover.py uses this class)
        args = [sys.executable, "-P", "-m", "raftpbx.cli", "node", "--config", str(self.config_path)]
        if bootstrap:
            args.append("--bootstrap")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def kill(self) -> float:
        """kill -9; returns the monotonic time of the kill."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        at = time.monotonic()
        self.proc.wait(timeout=10)
        self.stopped = False
        return at

    def sigstop(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.stopped = True

    def sigcont(self) -> None:
        if self.proc is not None and self.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
        self.stopped = False

    def terminate(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def call(self, method: str, timeout: float = 5.0, **params: Any) -> Any:
        status, reply = rpc_raw(self.url, self.cluster.token, method, params, timeout=timeout)
        if reply is None or "error" in reply:
            err = (reply or {}).get("error") or {}
            raise RpcFailure(err.get("code", 0), err.get("message", f"HTTP {status}"), err.get("data"), status)
        return reply["result"]

    def info(self, timeout: float = 3.0) -> dict[str, Any]:
        result: dict[str, Any] = self.call("node.info", timeout=timeout)
        return result

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Cluster:
    def __init__(self, root: Path, size: int = 3, settings: dict[str, Any] | None = None, *,
                 service: bool = False) -> None:
        self.root = root
        number = next(_cluster_counter)
        self.token = secrets.token_urlsafe(24)
        self.secret = secrets.token_urlsafe(32)
        self.nodes = [Node(self, i, f"127.{_OCTET}.{number}.{10 + i}") for i in range(1, size + 1)]
        # The cluster's floating SIP address (loopback mode), on an address of its own: never a node's.
        self.service_ip: str | None = f"127.{_OCTET}.{number}.10" if service else None
        self.service_address: str | None = f"{self.service_ip}:5060" if service else None
        (root / "secret").write_text(self.secret)
        (root / "token").write_text(self.token)
        os.chmod(root / "secret", 0o600)
        os.chmod(root / "token", 0o600)
        for node in self.nodes:
            node.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            values: dict[str, Any] = {
                "node.id": node.id,
                "node.data_dir": str(node.dir),
                "cluster.domain": "test.raftpbx.local",
                "cluster.secret_file": str(root / "secret"),
                "raft.address": node.raft,
                "raft.proposal_timeout": 2.0,
                "admin.listen": f"{node.ip}:{node.admin_port}",
                "admin.token_file": str(root / "token"),
                "sip.listen": f"{node.ip}:5060",
                "log.level": "info",
            }
            if self.service_address is not None:
                values["service.address"] = self.service_address
                values["service.mode"] = "loopback"
            values.update(settings or {})
            peers = {p.id: {"raft": p.raft, "admin_url": p.url} for p in self.nodes if p is not node}
            node.config_path.write_text(render_toml(values, peers))

    def start(self, bootstrap: bool = True) -> Node:
        for node in self.nodes:
            node.start(bootstrap=bootstrap)
        return self.wait_leader()

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.alive and not n.stopped]

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.id == node_id)

    def wait_leader(self, timeout: float = 20.0, among: list[Node] | None = None) -> Node:
        """Wait until every given live node answers and they agree on one leader among them."""
        candidates = among if among is not None else self.live()

        def agreed() -> Node | None:
            for node in candidates:
                if not node.alive:
                    raise AssertionError(f"{node.id} exited ({node.proc and node.proc.returncode}):\n"
                                         f"{node.log_tail()}")
            leaders = {n.info().get("leader") for n in candidates}
            if len(leaders) == 1:
                (leader,) = leaders
                if leader is not None and any(n.id == leader for n in candidates):
                    return self.node(leader)
            return None

        return wait_for(agreed, timeout, "an agreed leader")  # type: ignore[no-any-return]

    def followers(self, leader: Node) -> list[Node]:
        return [n for n in self.live() if n is not leader]

    def digests(self, nodes: list[Node] | None = None) -> dict[str, tuple[int, str]]:
        out = {}
        for node in nodes if nodes is not None else self.live():
            d = node.call("state.digest", timeout=2.0)
            out[node.id] = (d["applied_index"], d["digest"])
        return out

    def assert_converged(self, timeout: float = 10.0) -> dict[str, tuple[int, str]]:
        """Every live node reaches the same applied_index and digest (after a fresh write has settled)."""
        last: dict[str, tuple[int, str]] = {}

        def same() -> bool:
            nonlocal last
            last = self.digests()
            return len(set(last.values())) == 1

        try:
            wait_for(same, timeout, "equal digests")
        except AssertionError:
            raise AssertionError(f"nodes did not converge: {last}") from None
        return last

    def service_holders(self, nodes: list[Node] | None = None) -> list[Node]:
        """The nodes (live, not stopped, among `nodes`) whose status says they serve the service address."""
        out = []
        for node in nodes if nodes is not None else self.live():
            service = node.info().get("service") or {}
            if service.get("held"):
                out.append(node)
        return out

    def service_holder(self, timeout: float = 10.0, among: list[Node] | None = None) -> Node:
        """Wait until exactly one live node (of `among`) serves the service address, and it answers OPTIONS
        there; return it."""
        assert self.service_ip is not None, "this cluster has no service address (Cluster(service=True))"

        def one() -> Node | None:
            holders = self.service_holders(among)
            if len(holders) == 1 and sip_probe(self.service_ip or "", 5060):
                return holders[0]
            return None

        return wait_for(one, timeout, "exactly one holder of the service address")  # type: ignore[no-any-return]

    def transfer_leader(self, to: Node, timeout: float = 15.0) -> None:
        """Hand leadership (and with it the service address) to `to`; wait until every live node agrees and,
        with a service address, until `to` serves it."""
        def moved() -> bool:
            leader = self.wait_leader(timeout=5.0)
            if leader is not to:
                with contextlib.suppress(RpcFailure, OSError):
                    leader.call("cluster.transfer_leader", timeout=timeout, to=to.id)
                return False
            return True

        wait_for(moved, timeout, f"{to.id} leading", interval=0.1)
        if self.service_ip is not None:
            assert self.service_holder(timeout=timeout) is to

    def service_up(self, timeout: float = 0.5) -> bool:
        """An OPTIONS to the service address gets a 200 (whoever answers)."""
        assert self.service_ip is not None
        return sip_probe(self.service_ip, 5060, timeout=timeout)

    def kill_all(self) -> None:
        for node in self.nodes:
            node.sigcont()
            if node.alive:
                assert node.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.proc.pid, signal.SIGKILL)
                node.proc.wait(timeout=10)


@pytest.fixture(name="make_cluster")
def make_cluster_fixture(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """A factory of clusters; each is checked for convergence and always killed at teardown."""
    clusters: list[Cluster] = []

    def factory(size: int = 3, settings: dict[str, Any] | None = None, name: str = "c", *,
                service: bool = False) -> Cluster:
        root = tmp_path / f"{name}{len(clusters) + 1}"
        root.mkdir()
        cluster = Cluster(root, size, settings, service=service)
        clusters.append(cluster)
        return cluster

    try:
        yield factory
        check_converged(clusters)
    finally:
        for cluster in clusters:
            cluster.kill_all()


def check_converged(clusters: list[Cluster]) -> None:
    """At teardown: resume paused nodes; each cluster with a live majority must have converged."""
    for cluster in clusters:
        for node in cluster.nodes:
            node.sigcont()
        if len(cluster.live()) * 2 > len(cluster.nodes):
            cluster.assert_converged(timeout=15.0)


@pytest.fixture(name="cluster")
def cluster_fixture(make_cluster: Callable[..., Cluster]) -> Cluster:
    """A started 3-node cluster with a leader."""
    c: Cluster = make_cluster()
    c.start()
    return c


def sip_probe(ip: str, port: int = 5060, domain: str = "raftpbx.test", timeout: float = 0.5) -> bool:
    """An OPTIONS sent over UDP to (ip, port) gets a 200, from that very address (RFC 3261 §18.2.2: a reply
    from another source would not match at a phone)."""
    from raftpbx.transport.sip.message import Response, parse_message

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((ip.rsplit(".", 1)[0] + ".1", 0))  # an address of the cluster's /24 that no node uses
        s.settimeout(timeout)
        host, sport = s.getsockname()
        s.sendto((f"OPTIONS sip:{ip}:{port} SIP/2.0\r\nVia: SIP/2.0/UDP {host}:{sport};branch=z9hG4bK"
                  f"{secrets.token_hex(6)}\r\nMax-Forwards: 70\r\nFrom: <sip:probe@{domain}>;tag=p\r\n"
                  f"To: <sip:{ip}>\r\nCall-ID: {secrets.token_hex(16)}\r\nCSeq: 1 OPTIONS\r\n"
                  "Content-Length: 0\r\n\r\n").encode(), (ip, port))
        try:
            data, source = s.recvfrom(65535)
            reply = parse_message(data)
        except TimeoutError:
            return False
        except OSError:  # ICMP port unreachable reported on the socket: nobody there
            return False
        return isinstance(reply, Response) and reply.status == 200 and source == (ip, port)


def sip_up(node: Node, domain: str = "raftpbx.test") -> bool:
    """An OPTIONS sent over UDP to the node's SIP address (port 5060 on its own IP) gets a 200."""
    return sip_probe(node.ip, 5060, domain)


_phone_octets = itertools.cycle(range(30, 250))  # one counter for the whole run: phones never share an address


@contextlib.contextmanager
def phone_group(cluster: Cluster, log_dir: Path) -> Iterator[Callable[[int], list[Any]]]:
    """`make(count)` starts pjsua2 phone processes on fresh addresses in the cluster's /24; on exit every
    phone is closed, after checking that none reported an error."""
    from chaos.phone import PhoneProcess

    started: list[PhoneProcess] = []
    prefix = cluster.nodes[0].ip.rsplit(".", 1)[0]

    def make(count: int) -> list[PhoneProcess]:
        group = [PhoneProcess(f"{prefix}.{next(_phone_octets)}", log=log_dir / f"phone{len(started) + i}.log")
                 for i in range(count)]
        PhoneProcess.start_all(group)
        started.extend(group)
        return group

    try:
        yield make
        for phone in started:
            assert phone.errors() == [], phone.errors()
    finally:
        for phone in started:
            phone.close()


@contextlib.contextmanager
def running_pbx(root: Path, settings: dict[str, Any], domain: str, *, service: bool = True,
                first_node_leads: bool = True, service_on_first_node: bool | None = None) -> Iterator[Cluster]:
    """A started 3-node cluster whose every node answers SIP; on exit, checked converged, then killed.

    With `service` (the default) the cluster has a real service address in loopback mode
    (`c.service_address`, on its own 127.x.y.10:5060) that the leader serves; this waits until it answers.
    With `first_node_leads` (the default) leadership, and so the service address, is moved to node 1 first,
    so a test that registers its phones on node 1 starts from a known layout (TCP phones registered on node 1
    are reachable from the holder without RFC 5626 flows). `service_on_first_node` is the former name of
    `service` (kept for older callers)."""
    if service_on_first_node is not None:
        service = service_on_first_node
    c = Cluster(root, 3, settings, service=service)
    try:
        c.start()
        for node in c.nodes:
            wait_for(lambda n=node: sip_up(n, domain), 15.0, f"SIP on {node.id}")
        if first_node_leads:
            c.transfer_leader(c.nodes[0])
        if service:
            c.service_holder(timeout=15.0)
        yield c
        c.assert_converged(timeout=15.0)
    finally:
        c.kill_all()


def create_extension(cluster: Cluster, number: str, password: str) -> str:
    """Create an extension through the leader and wait until every node serves it."""
    cluster.wait_leader().call("extension.create", extension=number, password=password)
    for node in cluster.nodes:
        wait_for(lambda n=node: n.call("extension.get", extension=number), 5.0, f"{number} on {node.id}")
    return number
