"""Two offices joined by trunks (issue 9): two real 3-node raftpbx clusters on loopback, each with a service
address, trunks and routes written through the admin RPC, plus a raw SIP UDP client for hostile callers.

Layout (nodecluster.Cluster gives each cluster its own /24, 127.<pid-derived>.<cluster#>.0/24):

    office A: nodes .11 .12 .13, service address .10:5060, domain office-a.raftpbx.test, extensions 1xxx
    office B: the same in its own /24, domain office-b.raftpbx.test, extensions 2xxx

Each office's addresses fit in the /28 at .0 (`Office.net`): nodes and service address, nothing else. Phones
(nodecluster.phone_group) take octets from 30 up, outside that /28, so a phone is never allow-listed by the
other office. `join(a, b)` writes, through `a`'s admin RPC (a follower, to exercise forwarding of writes):

    trunk `office-b`  peers = B's three node SIP addresses (in node order), allow = [B.net]
    route `to-office-b` pattern 2XXX -> office-b

and the same on B towards A, then waits until every node of both clusters has both and every node sees
every peer "up" (its own OPTIONS pinger, raftpbx/trunks.py). `start_offices` starts the six processes
together (wall time: one cluster start, not two), moves each cluster's leadership (and so its service
address) to node 1, so the first peer of the other office's trunk is the leader: the layout is known.

`SipUdpClient` sends hand-written requests from a chosen loopback source address (the allow-list is about
the packet's source address) and collects responses; it ACKs non-2xx finals as a UAC must (RFC 3261
§17.1.1.3). Every wait polls a condition against a deadline; nothing sleeps blindly.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodecluster import Cluster, Node, check_converged, sip_up, wait_for
from raftpbx.transport.sip.message import Response, parse_message

DEFAULT_SETTINGS: dict[str, Any] = {
    "raft.proposal_timeout": 3.0,
    # Peers' health moves within ~2 intervals; 1 s keeps the harness's "every peer up" wait short.
    "trunks.ping_interval": 1.0,
}


@dataclass
class Office:
    """One office: a cluster, its SIP domain and the first digit of its extensions."""

    name: str  # the trunk name the OTHER office uses for it ("office-a")
    cluster: Cluster
    domain: str
    digit: str  # extensions are {digit}XXX

    @property
    def prefix(self) -> str:
        """The office's /24 as "127.x.y" (its nodes are .11-.13, its service address .10)."""
        return self.cluster.nodes[0].ip.rsplit(".", 1)[0]

    @property
    def net(self) -> str:
        """The /28 that holds every address this office sends SIP from (nodes and service address)."""
        return str(ipaddress.ip_network(f"{self.prefix}.0/28"))

    @property
    def service(self) -> tuple[str, int]:
        assert self.cluster.service_ip is not None
        return self.cluster.service_ip, 5060

    @property
    def peers(self) -> list[str]:
        """This office's node SIP addresses, as the other office's trunk names them (node order)."""
        return [f"{n.ip}:5060" for n in self.cluster.nodes]

    @property
    def cluster_ips(self) -> set[str]:
        """Every address this office sends SIP from: its nodes' and its service address."""
        return {n.ip for n in self.cluster.nodes} | {self.service[0]}

    def node_by_peer(self, peer: str) -> Node:
        host = peer.split(";", 1)[0].rsplit(":", 1)[0]
        return next(n for n in self.cluster.nodes if n.ip == host)

    def write_node(self) -> Node:
        """A live follower if there is one (writes are forwarded to the leader), else the leader."""
        leader = self.cluster.wait_leader()
        followers = self.cluster.followers(leader)
        return followers[0] if followers else leader

    def extension(self, number: str, password: str) -> str:
        """Create an extension through a follower; wait until every live node has it."""
        self.write_node().call("extension.create", extension=number, password=password)
        for node in self.cluster.live():
            wait_for(lambda n=node: n.call("extension.get", extension=number), 10.0, f"{number} on {node.id}")
        return number

    def log_lines(self, needle: str, limit: int = 40) -> list[str]:
        """Lines of the nodes' logs containing `needle` (e.g. a Call-ID), prefixed with the node id."""
        out: list[str] = []
        for node in self.cluster.nodes:
            with contextlib.suppress(OSError):
                for line in node.log_path.read_text(errors="replace").splitlines():
                    if needle in line:
                        out.append(f"{self.name}/{node.id}: {line}")
        return out[-limit:]


@dataclass
class Offices:
    a: Office
    b: Office
    killed: list[Node] = field(default_factory=list)  # B nodes a test killed (restarted ones are removed)
    calls: dict[str, str] = field(default_factory=dict)  # SIP Call-IDs a test leaves for a later one, by name


def _wait_sip(cluster: Cluster, domain: str, timeout: float) -> None:
    for node in cluster.nodes:
        wait_for(lambda n=node: sip_up(n, domain), timeout, f"SIP on {node.id}")


def join(src: Office, dst: Office) -> None:
    """On `src`: trunk `dst.name` to dst's nodes, allowing dst's /28; route {dst.digit}XXX to it."""
    node = src.write_node()
    node.call("trunk.add", name=dst.name, peers=dst.peers, allow=[dst.net], transport="udp")
    node.call("route.add", name=f"to-{dst.name}", pattern=f"{dst.digit}XXX", trunk=dst.name)


def peer_states(node: Node, trunk: str) -> dict[str, str]:
    result: dict[str, Any] = node.call("trunk.get", name=trunk)
    return {row["peer"]: row["state"] for row in result["health"]}


def wait_trunks_ready(src: Office, dst: Office, timeout: float = 30.0) -> None:
    """Every live node of `src` has the trunk to `dst` and its route, and sees every live peer "up"."""
    live_peers = {f"{n.ip}:5060" for n in dst.cluster.live()}
    for node in src.cluster.live():
        def ready(n: Node = node) -> bool:
            test = n.call("route.test", number=f"{dst.digit}001")
            if test.get("trunk") != dst.name:
                return False
            states = peer_states(n, dst.name)
            return all(states.get(p) == "up" for p in live_peers)

        wait_for(ready, timeout, f"{src.name}/{node.id}: trunk {dst.name} routed and its peers up", interval=0.1)


@contextlib.contextmanager
def start_offices(root: Path, settings: dict[str, Any] | None = None) -> Iterator[Offices]:
    """Two started offices joined both ways; on exit each is checked converged (live majority), then killed."""
    clusters: list[Cluster] = []
    try:
        offices = []
        for name, digit in (("office-a", "1"), ("office-b", "2")):
            domain = f"{name}.raftpbx.test"
            croot = root / name
            croot.mkdir()
            cluster = Cluster(croot, 3, {**DEFAULT_SETTINGS, "cluster.domain": domain, **(settings or {})},
                              service=True)
            clusters.append(cluster)
            offices.append(Office(name, cluster, domain, digit))
        for cluster in clusters:  # all six processes start together
            for node in cluster.nodes:
                node.start(bootstrap=True)
        for office in offices:
            office.cluster.wait_leader(timeout=30.0)
            _wait_sip(office.cluster, office.domain, 20.0)
            office.cluster.transfer_leader(office.cluster.nodes[0])
            office.cluster.service_holder(timeout=15.0)
        a, b = offices
        join(a, b)
        join(b, a)
        wait_trunks_ready(a, b)
        wait_trunks_ready(b, a)
        yield Offices(a, b)
        check_converged(clusters)
    finally:
        for cluster in clusters:
            cluster.kill_all()


# --- a raw SIP client over UDP ---------------------------------------------------------------------------


@dataclass
class Transaction:
    """One INVITE client transaction: what was sent and the responses received, in order."""

    request: str
    branch: str
    ruri: str
    from_header: str
    call_id: str
    cseq: int
    responses: list[Response] = field(default_factory=list)

    @property
    def final(self) -> Response | None:
        finals = [r for r in self.responses if r.status >= 200]
        return finals[0] if finals else None

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]


class SipUdpClient:
    """A UAC on one UDP socket bound to (`ip`, ephemeral port): sends hand-written requests and collects
    the responses of each transaction (matched by the top Via branch, RFC 3261 §17.1.3)."""

    def __init__(self, ip: str, domain: str) -> None:
        self.ip = ip
        self.domain = domain
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, 0))
        self.port = int(self.sock.getsockname()[1])
        self.sock.settimeout(0.05)
        self.stray: list[Response] = []

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SipUdpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def invite(self, dest: tuple[str, int], ruri: str, *, from_user: str, call_id: str | None = None,
               cseq: int = 1, from_tag: str | None = None, extra: list[str] | None = None) -> tuple[Transaction, str,
                                                                                                      str]:
        """Send an INVITE without a body; returns (transaction, call_id, from_tag). Nothing is waited for."""
        call_id = call_id or f"{secrets.token_hex(12)}@{self.ip}"
        from_tag = from_tag or secrets.token_hex(4)
        branch = "z9hG4bK" + secrets.token_hex(8)
        lines = [
            f"INVITE {ruri} SIP/2.0",
            f"Via: SIP/2.0/UDP {self.ip}:{self.port};branch={branch};rport",
            "Max-Forwards: 70",
            f"From: <sip:{from_user}@{self.domain}>;tag={from_tag}",
            f"To: <{ruri}>",
            f"Call-ID: {call_id}",
            f"CSeq: {cseq} INVITE",
            f"Contact: <sip:{from_user}@{self.ip}:{self.port}>",
            *(extra or []),
            "Content-Length: 0",
        ]
        text = "\r\n".join(lines) + "\r\n\r\n"
        self.sock.sendto(text.encode(), dest)
        return Transaction(text, branch, ruri, lines[3][len("From: "):], call_id, cseq), call_id, from_tag

    def ack(self, tx: Transaction, dest: tuple[str, int]) -> None:
        """ACK a non-2xx final response: same branch, To with the response's tag (RFC 3261 §17.1.1.3)."""
        final = tx.final
        assert final is not None and final.status >= 300
        lines = [
            f"ACK {tx.ruri} SIP/2.0",
            f"Via: SIP/2.0/UDP {self.ip}:{self.port};branch={tx.branch};rport",
            "Max-Forwards: 70",
            f"From: {tx.from_header}",
            f"To: {final.headers.get('To')}",
            f"Call-ID: {tx.call_id}",
            f"CSeq: {tx.cseq} ACK",
            "Content-Length: 0",
        ]
        self.sock.sendto(("\r\n".join(lines) + "\r\n\r\n").encode(), dest)

    def call_attempt(self, dest: tuple[str, int], ruri: str, *, from_user: str, timeout: float = 10.0,
                     call_id: str | None = None, cseq: int = 1, from_tag: str | None = None,
                     extra: list[str] | None = None) -> tuple[Transaction, str, str]:
        """INVITE, wait for its final response, ACK it if it is not a 2xx (2xx are not expected here)."""
        tx, call_id, from_tag = self.invite(dest, ruri, from_user=from_user, call_id=call_id, cseq=cseq,
                                            from_tag=from_tag, extra=extra)
        final = self.collect(tx, dest, timeout)
        if final.status >= 300:
            self.ack(tx, dest)
        return tx, call_id, from_tag

    def collect(self, tx: Transaction, dest: tuple[str, int], timeout: float) -> Response:
        """Read responses until `tx` has a final one (returned); resend the INVITE as Timer A would
        (RFC 3261 §17.1.1.2: from 0.5 s, doubling) until a provisional response arrives."""
        deadline = time.monotonic() + timeout
        next_resend, interval = time.monotonic() + 0.5, 0.5
        while tx.final is None:
            now = time.monotonic()
            if now > deadline:
                raise AssertionError(f"no final response within {timeout} s; got {tx.statuses}")
            if not tx.responses and now >= next_resend:
                self.sock.sendto(tx.request.encode(), dest)
                interval = min(interval * 2, 4.0)
                next_resend = now + interval
            try:
                data, _source = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:  # ICMP port unreachable: keep trying until the deadline
                continue
            message = parse_message(data)
            if not isinstance(message, Response):
                continue
            if message.branch == tx.branch:
                tx.responses.append(message)
            else:
                self.stray.append(message)
        final = tx.final
        assert final is not None
        return final


def established_tcp(remote: tuple[str, int]) -> list[tuple[str, int]]:
    """Local ends of the ESTABLISHED TCP connections to `remote` on this host (/proc/net/tcp)."""
    want_ip = socket.inet_aton(remote[0])[::-1].hex().upper()  # little-endian hex, as the kernel prints it
    want = f"{want_ip}:{remote[1]:04X}"
    out = []
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, peer, state = fields[1], fields[2], fields[3]
            if peer == want and state == "01":
                ip_hex, port_hex = local.split(":")
                out.append((socket.inet_ntoa(bytes.fromhex(ip_hex)[::-1]), int(port_hex, 16)))
    return out
