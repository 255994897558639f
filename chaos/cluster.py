"""The cluster under test in the loopback lab: real `raftpbx node` processes on their own 127.x addresses.

Theory of operation
-------------------
`LoopbackCluster(root, size, seed)` writes one data dir and node.toml per node under `root` (node i at
127.A.B.(10+i), A.B derived from the seed and the pid so that concurrent runs never share an address), a
shared cluster secret and admin token (mode 0600), and the service address 127.A.B.10:5060 (H1's loopback
mode: the leader binds it). Nodes start with `--bootstrap` on a fresh data dir only. Every process is started
in its own session and killed by its pid on `close()`; nothing here sends to a non-loopback address.

The controller never trusts one node's word: `leader()` asks every live node and needs a majority of the
voters to agree, `digests()` reads each live node's `state.digest`, `snapshot_state()` reads each node's
extensions, call records and active calls for the checkers.

Network faults on loopback (`LoopbackFirewall`, root only): each node runs with its own primary group id
(derived from the controller's pid; the user stays the same), and an nftables table of this run marks every
connection a node opens with that gid (`meta skgid` -> `ct mark`; a conntrack entry covers both directions). A partition between
nodes I and J drops, on receipt (input hook: the sender sees no error, as on a real network), the packets
of connections marked I whose original destination is J's address, and vice versa (one way: only the
I -> J direction of each); loss drops a random share of them. Delay marks
those packets (`meta mark`) and steers them, and only them, into a netem band of a prio qdisc put on `lo`
for the duration of the fault (refused if `lo` already has a root qdisc: never someone else's). Phones,
SIPp and the controller carry no mark and are never affected, nor is any other process on the machine; the
table and the qdisc are removed on heal and on close().

Invariants: a node is `stopped` only between sigstop() and sigcont(); close() resumes and kills every
process it started (and nothing else); RPCs have short timeouts (a stopped node must not stall the run).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from raftpbx.config import render_toml

DOMAIN = "chaos.raftpbx.local"
MARKER_NAME = "raftpbx-node.json"  # present in a data dir once the node has started (demo.py)


class RpcFailure(Exception):
    """A JSON-RPC error reply (code, message, data)."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = data


class Unreachable(Exception):
    """No HTTP reply (connection refused, timeout)."""


def free_port(host: str, kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll `condition` (exceptions count as not yet) until truthy; return it, or None after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except Exception:
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def rpc(url: str, token: str, method: str, params: dict[str, Any] | None = None, timeout: float = 2.0) -> Any:
    body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}})
    request = urllib.request.Request(url + "/rpc", data=body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        if not raw:
            raise RpcFailure(exc.code, f"HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise Unreachable(f"{url}: {getattr(exc, 'reason', exc)}") from None
    try:
        reply = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise RpcFailure(-32700, "invalid JSON reply") from None
    if not isinstance(reply, dict):
        raise RpcFailure(-32600, "malformed reply")
    if reply.get("error") is not None:
        err = reply["error"]
        raise RpcFailure(int(err.get("code", 0)), str(err.get("message", "")), err.get("data"))
    return reply.get("result")


def holds_service(info: dict[str, Any]) -> bool | None:
    """Whether a node's `node.info` says it holds the service address (H1's status field); None if unknown.

    Accepts the shapes H1 may publish: `service: {held: bool}`, `service_address_held: bool`, or
    `service_address: {held: bool}`."""
    for key in ("service", "service_address"):
        value = info.get(key)
        if isinstance(value, dict) and isinstance(value.get("held"), bool):
            return bool(value["held"])
    value = info.get("service_address_held")
    return value if isinstance(value, bool) else None


@dataclass
class ChaosNode:
    cluster: LoopbackCluster
    index: int
    ip: str
    raft_port: int
    admin_port: int
    sip_port: int = 5060
    proc: subprocess.Popen[bytes] | None = None
    stopped: bool = False
    removed: bool = False  # taken out of the membership (replaced)
    gid: int | None = None  # the node runs with this primary group when the firewall is on
    argv_prefix: list[str] = field(default_factory=list)  # e.g. ["ip", "netns", "exec", NS] in the netns lab
    started_once: bool = False

    @property
    def id(self) -> str:
        return f"node{self.index}"

    @property
    def dir(self) -> Path:
        return self.cluster.root / self.id

    @property
    def config_path(self) -> Path:
        return self.dir / "node.toml"

    @property
    def log_path(self) -> Path:
        return self.cluster.root / "logs" / f"{self.id}.log"

    @property
    def raft(self) -> str:
        return f"{self.ip}:{self.raft_port}"

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.admin_port}"

    @property
    def sip(self) -> tuple[str, int]:
        return (self.ip, self.sip_port)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, extra_args: list[str] | None = None) -> None:
        if self.alive:
            return
        args = [*self.argv_prefix, sys.executable, "-P", "-m", "raftpbx.cli", "node", "--config", str(self.config_path)]
        if extra_args:
            args += extra_args
        elif not self.started_once and not (self.dir / MARKER_NAME).exists():
            args.append("--bootstrap")  # only when the cluster is created: a wiped node must never bootstrap
        self.started_once = True
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        user: dict[str, Any] = {}
        if self.gid is not None:
            user = {"group": self.gid, "extra_groups": []}
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== chaos: start {' '.join(args)} at {time.time():.3f}\n".encode())
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, close_fds=True, **user)
        self.stopped = False

    def kill(self) -> None:
        """kill -9 (a stopped process dies too)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.stopped = False

    def sigstop(self) -> None:
        if self.alive:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGSTOP)
            self.stopped = True

    def sigcont(self) -> None:
        if self.proc is not None and self.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
        self.stopped = False

    def terminate(self, timeout: float = 10.0) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def wipe(self) -> None:
        """The disk is gone: remove everything in the data dir but node.toml."""
        for child in list(self.dir.iterdir()):
            if child.name == "node.toml":
                continue
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()

    def call(self, method: str, timeout: float = 2.0, **params: Any) -> Any:
        return self.cluster.rpc(self.url, method, params, timeout)

    def info(self, timeout: float = 1.0) -> dict[str, Any]:
        result = self.call("node.info", timeout=timeout)
        return result if isinstance(result, dict) else {}

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


class LoopbackCluster:
    """N raftpbx nodes on loopback; see the module docstring."""

    lab = "loopback"

    def __init__(self, root: Path, size: int = 3, seed: int = 0, settings: dict[str, Any] | None = None,
                 firewall: bool = True) -> None:
        self.root = root
        self.size = size
        root.mkdir(parents=True, exist_ok=True)
        (root / "logs").mkdir(exist_ok=True)
        a = 100 + (os.getpid() % 100)
        b = 1 + (seed * 7 + os.getpid()) % 250
        self.prefix = f"127.{a}.{b}"
        self.token = secrets.token_urlsafe(24)
        self.secret = secrets.token_urlsafe(32)
        for name, value in (("secret", self.secret), ("token", self.token)):
            path = root / name
            path.write_text(value)
            os.chmod(path, 0o600)
        self.service_address = (f"{self.prefix}.10", 5060)
        self.settings: dict[str, Any] = {
            "raft.proposal_timeout": 2.0,
            "sip.digest_algorithms": ["MD5"],  # SIPp 3.6 knows MD5 only
            **(settings or {}),
        }
        self.nodes: list[ChaosNode] = []
        for i in range(1, size + 1):
            ip = f"{self.prefix}.{10 + i}"
            self.nodes.append(ChaosNode(self, i, ip, free_port(ip), free_port(ip)))
        self.firewall: LoopbackFirewall | None = None
        if firewall and LoopbackFirewall.usable(root):
            base = 200_000 + (os.getpid() % 20_000) * 10
            for node in self.nodes:
                node.gid = base + node.index
            self.firewall = LoopbackFirewall(f"rpbx_chaos_{os.getpid()}", self.nodes)
        for node in self.nodes:
            self.write_config(node)

    # -- what the netns lab changes ---------------------------------------------------------------------
    def rpc(self, url: str, method: str, params: dict[str, Any], timeout: float) -> Any:
        return rpc(url, self.token, method, params, timeout=timeout)

    def phone_address(self, i: int) -> str:
        return f"{self.prefix}.{100 + i}"

    def phone_python(self) -> str | None:
        return None  # this interpreter

    def sipp_address(self, i: int) -> str:
        return f"{self.prefix}.{60 + i}"

    def sipp_ports(self, i: int) -> list[int]:
        ip = self.sipp_address(i)
        return [free_port(ip, socket.SOCK_DGRAM), free_port(ip, socket.SOCK_DGRAM), free_port(ip)]

    def sipp_argv_prefix(self) -> list[str]:
        return []

    def service_settings(self) -> dict[str, Any]:
        return {"service.address": f"{self.service_address[0]}:{self.service_address[1]}"}

    # -- configuration ---------------------------------------------------------------------------------
    def write_config(self, node: ChaosNode, join_token: str | None = None) -> None:
        node.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        values: dict[str, Any] = {
            "node.id": node.id,
            "node.data_dir": str(node.dir),
            "cluster.domain": DOMAIN,
            "cluster.secret_file": str(self.root / "secret"),
            "raft.address": node.raft,
            "admin.listen": f"{node.ip}:{node.admin_port}",
            "admin.token_file": str(self.root / "token"),
            "sip.listen": f"{node.ip}:{node.sip_port}",
            **self.service_settings(),
            "log.level": "info",
            **self.settings,
        }
        if join_token is not None:
            values["raft.join"] = True
            values["raft.join_token"] = join_token
        peers = {p.id: {"raft": p.raft, "admin_url": p.url} for p in self.nodes if p is not node and not p.removed}
        node.config_path.write_text(render_toml(values, peers))

    @property
    def election_timeout_max(self) -> float:
        return float(self.settings.get("raft.election_timeout_max", 0.3))

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> ChaosNode:
        if self.firewall is not None:
            self.firewall.create()
        for node in self.nodes:
            node.start()
        leader = self.wait_leader(timeout)
        if leader is None:
            tails = "\n".join(f"--- {n.id}\n{n.log_tail()}" for n in self.nodes)
            raise RuntimeError(f"no leader within {timeout:.0f} s\n{tails}")
        return leader

    def close(self) -> None:
        for node in self.nodes:
            node.sigcont()
            node.kill()
        if self.firewall is not None:
            self.firewall.destroy()

    def voters(self) -> list[ChaosNode]:
        return [n for n in self.nodes if not n.removed]

    def live(self) -> list[ChaosNode]:
        return [n for n in self.voters() if n.alive and not n.stopped]

    def node(self, node_id: str) -> ChaosNode:
        return next(n for n in self.nodes if n.id == node_id)

    # -- views -----------------------------------------------------------------------------------------
    def infos(self, timeout: float = 0.5) -> dict[str, dict[str, Any] | None]:
        out: dict[str, dict[str, Any] | None] = {}
        for node in self.voters():
            if not node.alive or node.stopped:
                out[node.id] = None
                continue
            try:
                out[node.id] = node.info(timeout=timeout)
            except (Unreachable, RpcFailure):
                out[node.id] = None
        return out

    def leader(self) -> ChaosNode | None:
        """The leader a majority of the voters agree on (and that says it leads), else None."""
        infos = self.infos()
        votes: dict[str, int] = {}
        for info in infos.values():
            if info and info.get("leader"):
                votes[str(info["leader"])] = votes.get(str(info["leader"]), 0) + 1
        majority = len(self.voters()) // 2 + 1
        for leader_id, count in votes.items():
            info = infos.get(leader_id)
            if count >= majority and info is not None and info.get("role") == "leader":
                return self.node(leader_id)
        return None

    def wait_leader(self, timeout: float = 20.0) -> ChaosNode | None:
        return wait_until(self.leader, timeout, interval=0.05)  # type: ignore[no-any-return]

    def service_holders(self) -> tuple[list[str], bool]:
        """Ids of the live nodes that say they hold the service address, and whether any node reports it."""
        holders: list[str] = []
        known = False
        for node_id, info in self.infos(timeout=0.3).items():
            if info is None:
                continue
            held = holds_service(info)
            if held is not None:
                known = True
            if held:
                holders.append(node_id)
        return holders, known

    def digests(self) -> dict[str, tuple[int, str] | None]:
        out: dict[str, tuple[int, str] | None] = {}
        for node in self.voters():
            try:
                d = node.call("state.digest", timeout=2.0)
                out[node.id] = (int(d["applied_index"]), str(d["digest"]))
            except (Unreachable, RpcFailure):
                out[node.id] = None
        return out

    def wait_converged(self, timeout: float = 20.0) -> dict[str, tuple[int, str] | None]:
        """Wait until every voter answers with the same applied index and digest; return the last view."""
        last: dict[str, tuple[int, str] | None] = {}

        def same() -> bool:
            nonlocal last
            last = self.digests()
            values = set(last.values())
            return len(values) == 1 and None not in values

        wait_until(same, timeout, interval=0.1)
        return last

    def wait_caught_up(self, timeout: float = 30.0) -> bool:
        """Wait until a leader is agreed and every voter applied at least the leader's commit index as read
        once the leader is known (under a live workload, equal digests at one instant are a matter of luck;
        equality is checked when the workload has stopped)."""
        deadline = time.monotonic() + timeout
        leader = self.wait_leader(timeout)
        if leader is None:
            return False
        try:
            target = int(leader.info(timeout=2.0).get("commit_index") or 0)
        except (Unreachable, RpcFailure):
            return False

        def caught_up() -> bool:
            for node in self.voters():
                if int(node.info(timeout=1.0).get("applied_index") or 0) < target:
                    return False
            return True

        return bool(wait_until(caught_up, max(0.1, deadline - time.monotonic()), interval=0.05))

    def sip_answers(self, timeout: float = 0.3) -> bool:
        """One OPTIONS to the service address answered (any final status). Loopback only: a lab whose
        address is not 127/8 is probed from inside the lab by its own class, never from here."""
        host, port = self.service_address
        if not host.startswith("127."):
            return True
        branch = "z9hG4bK" + secrets.token_hex(8)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            local = sock.getsockname()
            request = (f"OPTIONS sip:{host}:{port} SIP/2.0\r\nVia: SIP/2.0/UDP {local[0]}:{local[1]};branch={branch}"
                       f";rport\r\nMax-Forwards: 70\r\nFrom: <sip:probe@{local[0]}>;tag={branch[-8:]}\r\n"
                       f"To: <sip:{host}:{port}>\r\nCall-ID: {branch}\r\nCSeq: 1 OPTIONS\r\n"
                       "Content-Length: 0\r\n\r\n")
            sock.settimeout(timeout)
            try:
                sock.sendto(request.encode(), (host, port))
                data, _ = sock.recvfrom(65535)
            except OSError:
                return False
        return data.startswith(b"SIP/2.0 ") and data[8:9] in b"23456"

    def wait_sip_available(self, hold: float = 1.5, timeout: float = 20.0) -> bool:
        """Wait until the service address has answered every probe for `hold` seconds (so that the load has
        at least one whole good second before the next fault); False after `timeout`."""
        deadline = time.monotonic() + timeout
        since: float | None = None
        while time.monotonic() < deadline:
            if self.sip_answers():
                since = since if since is not None else time.monotonic()
                if time.monotonic() - since >= hold:
                    return True
            else:
                since = None
            time.sleep(0.1)  # probe pacing while the condition is being watched
        return False

    def snapshot_state(self) -> dict[str, Any]:
        """Every voter's digest, extensions, call records and active calls (for the checkers)."""
        nodes: dict[str, Any] = {}
        for node in self.voters():
            entry: dict[str, Any] = {"reachable": False}
            try:
                d = node.call("state.digest", timeout=3.0)
                exts = node.call("extension.list", timeout=5.0)
                records: list[dict[str, Any]] = []
                cursor: str | None = None
                for _ in range(1000):
                    params: dict[str, Any] = {"limit": 1000}
                    if cursor:
                        params["cursor"] = cursor
                    page = node.call("cdr.list", timeout=10.0, **params)
                    records.extend(page.get("records", []))
                    cursor = page.get("next_cursor")
                    if not cursor:
                        break
                active = node.call("call.active", timeout=3.0)
                entry = {
                    "reachable": True,
                    "applied_index": d["applied_index"],
                    "digest": d["digest"],
                    "extensions": {e["extension"]: e for e in exts.get("extensions", [])},
                    "cdr": records,
                    "active_calls": active.get("calls", []),
                }
            except (Unreachable, RpcFailure) as exc:
                entry["error"] = str(exc)
            nodes[node.id] = entry
        return {"nodes": nodes}


class FirewallError(Exception):
    """nft refused a command."""


class LoopbackFirewall:
    """Partitions and loss between loopback nodes through an nftables table of this run (module docstring)."""

    DELAY_MARK = 0xC4A05

    def __init__(self, table: str, nodes: list[ChaosNode]) -> None:
        self.table = table
        self.nodes = nodes
        self.created = False
        self.qdisc = False  # we put the prio/netem qdisc on lo

    @staticmethod
    def usable(root: Path) -> bool:
        """Root (to set a process's group and to load nft rules) and nft present."""
        return os.geteuid() == 0 and shutil.which("nft") is not None

    def _nft(self, script: str) -> None:
        proc = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=20)
        if proc.returncode != 0:
            raise FirewallError(f"nft: {proc.stderr.strip()}")

    def create(self) -> None:
        marks = "\n".join(f"    meta skgid {n.gid} ct state new ct mark set {n.gid}" for n in self.nodes)
        self._nft(f"""table inet {self.table} {{
  chain chaos_mark {{
    type filter hook output priority 10;
{marks}
  }}
  chain chaos_faults {{
    type filter hook input priority 0;
  }}
  chain chaos_shape {{
    type filter hook output priority 20;
  }}
}}
""")
        self.created = True

    def destroy(self) -> None:
        self._remove_qdisc()
        if self.created:
            with contextlib.suppress(FirewallError, OSError, subprocess.SubprocessError):
                self._nft(f"delete table inet {self.table}\n")
            self.created = False

    def _rules(self, a: list[ChaosNode], b: list[ChaosNode], oneway: bool, suffix: str) -> list[str]:
        rules = []
        for i in a:
            for j in b:
                if oneway:  # i -> j only: i's packets on i's connections, i's replies on j's connections
                    rules.append(f"ct mark {i.gid} ct original ip daddr {j.ip} ct direction original {suffix}")
                    rules.append(f"ct mark {j.gid} ct original ip daddr {i.ip} ct direction reply {suffix}")
                else:
                    rules.append(f"ct mark {i.gid} ct original ip daddr {j.ip} {suffix}")
                    rules.append(f"ct mark {j.gid} ct original ip daddr {i.ip} {suffix}")
        return rules

    def partition(self, a: list[ChaosNode], b: list[ChaosNode], oneway: bool = False) -> None:
        """Cut every node of `a` from every node of `b` (both ways, or a -> b only with `oneway`)."""
        rules = self._rules(a, b, oneway, "drop")
        self._nft("".join(f"add rule inet {self.table} chaos_faults {r}\n" for r in rules))

    def loss(self, percent: int, nodes: list[ChaosNode]) -> None:
        """Drop `percent`% (1..99) of the packets between any two of `nodes` (Raft, SIP and admin alike)."""
        if not 1 <= percent <= 99:
            raise ValueError("percent: 1..99")
        rules = [r for i in nodes for r in self._rules([i], [j for j in nodes if j is not i], True,
                                                       f"numgen random mod 100 < {percent} drop")]
        self._nft("".join(f"add rule inet {self.table} chaos_faults {r}\n" for r in rules))

    @staticmethod
    def netem_available() -> bool:
        """Whether this kernel has the prio and netem qdiscs (tried in a throwaway namespace, never on lo)."""
        name = f"rpbxchaos{os.getpid()}"
        if subprocess.run(["ip", "netns", "add", name], capture_output=True, timeout=10).returncode != 0:
            return False
        try:
            ok = True
            for spec in (["prio", "bands", "4"], ["netem", "delay", "1ms"]):
                proc = subprocess.run(["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root",
                                       "handle", "1:", *spec], capture_output=True, timeout=10)
                ok = ok and proc.returncode == 0
                subprocess.run(["ip", "netns", "exec", name, "tc", "qdisc", "del", "dev", "lo", "root"],
                               capture_output=True, timeout=10)
            return ok
        finally:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)

    def delay(self, ms: int, jitter_ms: int, nodes: list[ChaosNode]) -> None:
        """Delay every packet between any two of `nodes` by `ms` +- `jitter_ms` (netem on lo, marked only)."""
        shown = subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True, timeout=10)
        if "noqueue" not in shown.stdout or "prio" in shown.stdout or "netem" in shown.stdout:
            raise FirewallError(f"lo already has a qdisc, not touching it: {shown.stdout.strip()}")
        rules = [r for i in nodes for r in self._rules([i], [j for j in nodes if j is not i], True,
                                                       f"meta mark set {self.DELAY_MARK}")]
        self._nft("".join(f"add rule inet {self.table} chaos_shape {r}\n" for r in rules))
        self.qdisc = True
        for cmd in (
            ["qdisc", "add", "dev", "lo", "root", "handle", "1:", "prio", "bands", "4"],
            ["qdisc", "add", "dev", "lo", "parent", "1:4", "handle", "40:", "netem", "delay", f"{ms}ms",
             f"{jitter_ms}ms"],
            ["filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "handle",
             str(self.DELAY_MARK), "fw", "flowid", "1:4"],
        ):
            proc = subprocess.run(["tc", *cmd], capture_output=True, text=True, timeout=10)
            if proc.returncode != 0:
                self._remove_qdisc()
                raise FirewallError(f"tc {' '.join(cmd)}: {proc.stderr.strip()}")

    def _remove_qdisc(self) -> None:
        if self.qdisc:
            subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root", "handle", "1:"], capture_output=True,
                           timeout=10)
            self.qdisc = False

    def heal(self) -> None:
        self._remove_qdisc()
        self._nft(f"flush chain inet {self.table} chaos_faults\nflush chain inet {self.table} chaos_shape\n")
