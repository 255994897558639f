"""The registrar on a real 3-node cluster: real pjsua2 phones and a small raw-socket SIP client, loopback only.

One cluster serves the whole module (starting three nodes costs seconds); each test uses its own
extensions, so tests do not see each other's bindings. Bindings are observed through REGISTER queries
(a REGISTER without Contact is answered with the AoR's current bindings, RFC 3261 §10.3 step 8) sent to
each node, and through `state.digest` (every node applied the same log). Every wait polls a condition
against a deadline.
"""

from __future__ import annotations

import functools
import re
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nodecluster import Cluster, Node, sip_up, wait_for
from raftpbx.state import ha1_md5, ha1_sha256
from raftpbx.transport.sip.digest import challenges_for, make_authorization
from raftpbx.transport.sip.message import Response, parse_message
from raftpbx.transport.sip.stream import StreamParser

from chaos.phone import PhoneProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DOMAIN = "test.raftpbx.local"
PASSWORD = "reg-Secret-42"
MIN_EXPIRES = 2


# --- a raw SIP client (UDP or TCP), enough for REGISTER with digest -----------------------------------


class RawSip:
    """Sends REGISTERs to one node from a loopback address and reads the responses (deadline-bound)."""

    def __init__(self, local_ip: str, node: Node, transport: str = "udp") -> None:
        self.node = node
        self.transport = transport
        self.remote = (node.ip, 5060)
        if transport == "udp":
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind((local_ip, 0))
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.bind((local_ip, 0))
            self.sock.settimeout(5.0)
            self.sock.connect(self.remote)
            self.parser = StreamParser()
        self.local = self.sock.getsockname()

    def close(self) -> None:
        self.sock.close()

    def request_text(
        self,
        ext: str,
        *,
        call_id: str,
        cseq: int,
        branch: str,
        contacts: list[str] | None = None,
        expires: int | None = None,
        authorization: str | None = None,
        to_user: str | None = None,
        extra: list[str] | None = None,
    ) -> bytes:
        host, port = self.local
        proto = self.transport.upper()
        lines = [
            f"REGISTER sip:{self.node.ip}:5060 SIP/2.0",
            f"Via: SIP/2.0/{proto} {host}:{port};branch=z9hG4bK{branch};rport",
            "Max-Forwards: 70",
            f"From: <sip:{ext}@{DOMAIN}>;tag=f{call_id[:8]}",
            f"To: <sip:{to_user or ext}@{DOMAIN}>",
            f"Call-ID: {call_id}",
            f"CSeq: {cseq} REGISTER",
        ]
        lines += [f"Contact: {c}" for c in contacts or []]
        if expires is not None:
            lines.append(f"Expires: {expires}")
        if authorization is not None:
            lines.append(f"Authorization: {authorization}")
        lines += extra or []
        lines.append("Content-Length: 0")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def exchange(self, data: bytes, timeout: float = 5.0) -> Response:
        """Send `data`; return the first final response (UDP: retransmit every 0.5 s like Timer E)."""
        deadline = time.monotonic() + timeout
        if self.transport == "udp":
            self.sock.sendto(data, self.remote)
            next_send = time.monotonic() + 0.5
            while True:
                now = time.monotonic()
                if now > deadline:
                    raise AssertionError("no final response")
                self.sock.settimeout(max(0.01, min(deadline, next_send) - now))
                try:
                    raw = self.sock.recv(65535)
                except TimeoutError:
                    if time.monotonic() >= next_send:
                        self.sock.sendto(data, self.remote)
                        next_send = time.monotonic() + 0.5
                    continue
                message = parse_message(raw)
                if isinstance(message, Response) and message.status >= 200:
                    return message
        self.sock.sendall(data)
        while True:
            message = self.parser.next_message()
            if isinstance(message, Response) and message.status >= 200:
                return message
            if message is not None:
                continue
            if time.monotonic() > deadline:
                raise AssertionError("no final response")
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65535)
            assert chunk, "connection closed"
            self.parser.feed(chunk)

    def register(
        self,
        ext: str,
        password: str = PASSWORD,
        *,
        contacts: list[str] | None = None,
        expires: int | None = None,
        call_id: str | None = None,
        cseq: int = 1,
        algorithm: str = "MD5",
        to_user: str | None = None,
        extra: list[str] | None = None,
    ) -> Response:
        """REGISTER, answer the 401 with a digest for `password`, return the final response."""
        call_id = call_id or uuid.uuid4().hex
        first = self.exchange(
            self.request_text(ext, call_id=call_id, cseq=cseq, branch=secrets.token_hex(8), contacts=contacts,
                              expires=expires, to_user=to_user, extra=extra)
        )
        if first.status != 401:
            return first
        challenge = next(c for c in challenges_for(first.headers.values("WWW-Authenticate"))
                         if c.algorithm.upper() == algorithm)
        ha1 = (ha1_md5 if algorithm == "MD5" else ha1_sha256)(ext, DOMAIN, password)
        uri = f"sip:{self.node.ip}:5060"
        authorization = make_authorization(username=ext, ha1=ha1, challenge=challenge, method="REGISTER",
                                           uri=uri, cnonce=secrets.token_hex(4))
        return self.exchange(
            self.request_text(ext, call_id=call_id, cseq=cseq + 1, branch=secrets.token_hex(8),
                              contacts=contacts, expires=expires, authorization=authorization,
                              to_user=to_user, extra=extra)
        )


def contacts_of(response: Response) -> dict[str, int]:
    """Contact URI -> expires, from a 200 to REGISTER."""
    out = {}
    for value in response.headers.values("Contact"):
        for item in re.findall(r"<([^>]*)>;expires=(\d+)", value):
            out[item[0].replace(";transport=TCP", ";transport=tcp")] = int(item[1])
    return out


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("registrar")
    settings = {"sip.min_expires": MIN_EXPIRES, "sip.default_expires": 600, "sip.max_expires": 3600,
                "raft.proposal_timeout": 3.0}
    c = Cluster(root, 3, settings)
    try:
        c.start()
        for node in c.nodes:  # SIP is up once the node answers a query on it
            wait_for(functools.partial(_sip_up, node), 15.0, f"SIP on {node.id}")
        yield c
        c.assert_converged(timeout=15.0)
    finally:
        c.kill_all()


def _sip_up(node: Node) -> bool:
    return sip_up(node, DOMAIN)


_ext_counter = iter(range(3100, 3999))


@pytest.fixture
def ext(cluster: Cluster) -> str:
    """A fresh extension with PASSWORD, created through the leader."""
    number = str(next(_ext_counter))
    cluster.wait_leader().call("extension.create", extension=number, password=PASSWORD)
    for node in cluster.nodes:
        wait_for(functools.partial(node.call, "extension.get", extension=number), 5.0, f"{number} on {node.id}")
    return number


def side_ip(node: Node, last: int) -> str:
    """A loopback address in the cluster's /24 for a client (phones, raw sockets)."""
    return node.ip.rsplit(".", 1)[0] + f".{last}"


@pytest.fixture
def raw(cluster: Cluster) -> Iterator[Callable[..., RawSip]]:
    clients: list[RawSip] = []

    def make(node: Node, transport: str = "udp", last: int = 40) -> RawSip:
        client = RawSip(side_ip(node, last), node, transport)
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for client in clients:
            client.close()


def bindings_on(node: Node, ext: str, make: Callable[..., RawSip]) -> dict[str, int]:
    """Ask `node` for `ext`'s bindings with an authenticated REGISTER without Contact (§10.3 step 8)."""
    response = make(node).register(ext)
    assert response.status == 200, (response.status, response.reason)
    return contacts_of(response)


def wait_bindings(cluster: Cluster, ext: str, make: Callable[..., RawSip],
                  predicate: Callable[[dict[str, int]], bool], what: str, timeout: float = 5.0) -> None:
    seen: dict[str, dict[str, int]] = {}

    def check(node: Node) -> bool:
        seen[node.id] = bindings_on(node, ext, make)
        return predicate(seen[node.id])

    for node in cluster.nodes:
        try:
            wait_for(functools.partial(check, node), timeout, f"{what} on {node.id}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last bindings seen: {seen}") from None


@pytest.fixture
def phone(cluster: Cluster, tmp_path: Path) -> Iterator[PhoneProcess]:
    p = PhoneProcess(side_ip(cluster.nodes[0], 30), log=tmp_path / "phone.log")
    p.start()
    try:
        yield p
        assert p.errors() == []
    finally:
        p.close()


def reg_state(phone: PhoneProcess, since: int, timeout: float = 8.0) -> dict[str, Any]:
    return phone.wait_event(lambda e: e["event"] == "reg_state", timeout, since=since)


# --- tests ---------------------------------------------------------------------------------------------


def test_phone_registers_through_node2_visible_everywhere_refresh_and_unregister(
    cluster: Cluster, ext: str, phone: PhoneProcess, raw: Callable[..., RawSip]
) -> None:
    node2 = cluster.nodes[1]
    port = phone.transports(udp=True)["udp"]
    mark = phone.mark()
    phone.account_add("a", f"sip:{ext}@{DOMAIN}", registrar=f"sip:{node2.ip}:5060", register=True,
                      user=ext, password=PASSWORD, expires=300)
    state = reg_state(phone, mark)
    assert state["code"] == 200 and state["active"], state
    contact = f"sip:{ext}@{phone.bind}:{port}"
    wait_bindings(cluster, ext, raw, lambda b: any(uri.startswith(contact) for uri in b), "the phone's binding")
    cluster.assert_converged()

    # A refresh with another interval (raw client, same Contact) is visible on every node.
    (uri,) = bindings_on(cluster.nodes[0], ext, raw)
    refreshed = raw(cluster.nodes[2]).register(ext, contacts=[f"<{uri}>"], expires=1200)
    assert refreshed.status == 200
    assert 1190 <= contacts_of(refreshed)[uri] <= 1200
    wait_bindings(cluster, ext, raw, lambda b: 1150 <= b.get(uri, 0) <= 1200, "the refreshed interval")

    # The phone unregisters (expires=0): gone everywhere.
    mark = phone.mark()
    phone.unregister("a")
    state = reg_state(phone, mark)
    assert state["code"] == 200, state
    wait_bindings(cluster, ext, raw, lambda b: b == {}, "no binding")


def test_wrong_password_gets_401_and_no_binding_unknown_extension_looks_the_same(
    cluster: Cluster, ext: str, phone: PhoneProcess, raw: Callable[..., RawSip]
) -> None:
    node2 = cluster.nodes[1]
    phone.transports(udp=True)
    mark = phone.mark()
    phone.account_add("a", f"sip:{ext}@{DOMAIN}", registrar=f"sip:{node2.ip}:5060", register=True,
                      user=ext, password="wrong-" + PASSWORD, expires=300)
    state = reg_state(phone, mark)
    assert state["code"] == 401 and not state["active"], state
    wait_bindings(cluster, ext, raw, lambda b: b == {}, "no binding")

    contact = [f"<sip:{ext}@{side_ip(node2, 40)}:5999>"]
    wrong = raw(node2).register(ext, "wrong-" + PASSWORD, contacts=contact)
    unknown = raw(node2).register("3998", PASSWORD, contacts=[f"<sip:3998@{side_ip(node2, 40)}:5999>"])

    def shape(response: Response) -> tuple[Any, ...]:
        challenges = [re.sub(r'nonce="[^"]*"', "nonce=N", v) for v in response.headers.values("WWW-Authenticate")]
        names = sorted(name.lower() for name, _ in response.headers)
        return response.status, response.reason, names, challenges

    assert shape(wrong) == shape(unknown)
    assert wrong.status == 401
    wait_bindings(cluster, ext, raw, lambda b: b == {}, "still no binding")


def test_tcp_registration_retransmission_on_another_node_and_restart(
    cluster: Cluster, ext: str, phone: PhoneProcess, raw: Callable[..., RawSip]
) -> None:
    node3 = cluster.nodes[2]
    phone.transports(udp=False, tcp=True)
    mark = phone.mark()
    phone.account_add("t", f"sip:{ext}@{DOMAIN}", transport="tcp", registrar=f"sip:{node3.ip}:5060",
                      register=True, user=ext, password=PASSWORD, expires=300)
    state = reg_state(phone, mark)
    assert state["code"] == 200 and state["active"], state
    # pjsua's TCP Contact names its connection's port, not the listening one.
    def tcp_contact(b: dict[str, int]) -> str | None:
        return next((u for u in b if u.startswith(f"sip:{ext}@{phone.bind}:") and u.endswith(";transport=tcp")),
                    None)

    wait_bindings(cluster, ext, raw, lambda b: tcp_contact(b) is not None, "the TCP binding")
    contact = tcp_contact(bindings_on(cluster.nodes[0], ext, raw))

    # Raw TCP client too, and the same REGISTER (same branch, Call-ID, CSeq) reaching two nodes dedupes.
    tcp = raw(node3, "tcp")
    assert tcp.register(ext, contacts=[f"<sip:{ext}@{tcp.local[0]}:{tcp.local[1]};transport=tcp>"]).status == 200
    client1, client2 = raw(cluster.nodes[0]), raw(cluster.nodes[1])
    call_id = uuid.uuid4().hex
    first = client1.exchange(client1.request_text(ext, call_id=call_id, cseq=1, branch="x"))
    challenge = challenges_for(first.headers.values("WWW-Authenticate"))[-1]
    auth = make_authorization(username=ext, ha1=ha1_md5(ext, DOMAIN, PASSWORD), challenge=challenge,
                              method="REGISTER", uri=f"sip:{cluster.nodes[0].ip}:5060", cnonce="c")
    dup_contact = f"sip:{ext}@{side_ip(node3, 41)}:5098"
    text = client1.request_text(ext, call_id=call_id, cseq=2, branch="dup" + call_id[:8],
                                contacts=[f"<{dup_contact}>"], expires=900, authorization=auth)
    # The digest-uri names node 1; the registrar does not pin it to the Request-URI, so node 2 accepts it.
    a, b = client1.exchange(text), client2.exchange(text.replace(cluster.nodes[0].ip.encode(),
                                                                 cluster.nodes[1].ip.encode(), 1))
    assert a.status == b.status == 200
    assert a.to_tag == b.to_tag
    assert contacts_of(a).keys() == contacts_of(b).keys()
    digest = cluster.assert_converged()
    # The later CSeq of the same Call-ID applies; a lower one is out of order (§10.3 step 7).
    stale_text = client1.request_text(ext, call_id=call_id, cseq=1, branch="old" + call_id[:8],
                                      contacts=[f"<{dup_contact}>"], expires=900, authorization=auth)
    assert client1.exchange(stale_text).status == 500
    assert cluster.assert_converged() == digest  # nothing was proposed for the refused request

    # A restarted node serves the same bindings.
    assert node3.terminate() == 0
    node3.start()
    wait_for(lambda: _sip_up(node3), 20.0, "node3 SIP after restart")
    cluster.wait_leader()
    got = bindings_on(node3, ext, raw)
    assert contact in got and dup_contact in got


def test_423_with_min_expires_and_contact_star_removes_all(
    cluster: Cluster, ext: str, raw: Callable[..., RawSip]
) -> None:
    node1 = cluster.nodes[0]
    client = raw(node1)
    brief = client.register(ext, contacts=[f"<sip:{ext}@{side_ip(node1, 40)}:5001>"], expires=1)
    assert brief.status == 423
    assert brief.headers.get("Min-Expires") == str(MIN_EXPIRES)
    call_id = uuid.uuid4().hex
    two = [f"<sip:{ext}@{side_ip(node1, 40)}:5001>", f"<sip:{ext}@{side_ip(node1, 40)}:5002>;q=0.5"]
    ok = client.register(ext, contacts=two, expires=600, call_id=call_id, cseq=10)
    assert ok.status == 200 and len(contacts_of(ok)) == 2
    assert ok.headers.get("Date", "").endswith("GMT")
    wait_bindings(cluster, ext, raw, lambda b: len(b) == 2, "two bindings")
    star = client.register(ext, contacts=["*"], expires=0, call_id=call_id, cseq=20)
    assert star.status == 200 and contacts_of(star) == {}
    wait_bindings(cluster, ext, raw, lambda b: b == {}, "no binding after Contact: *")
    # `*` with a non-zero Expires is malformed (§10.3 step 6).
    assert client.register(ext, contacts=["*"], expires=60).status == 400
    # The To user must be the authenticated one.
    assert client.register(ext, to_user="3997").status == 403


def test_expiry_is_an_event_proposed_by_the_leader(cluster: Cluster, ext: str, raw: Callable[..., RawSip]) -> None:
    leader = cluster.wait_leader()
    follower = cluster.followers(leader)[0]
    response = raw(follower).register(ext, contacts=[f"<sip:{ext}@{side_ip(follower, 40)}:5003>"],
                                      expires=MIN_EXPIRES)
    assert response.status == 200 and len(contacts_of(response)) == 1
    before = cluster.assert_converged()
    index = next(iter(before.values()))[0]

    def swept() -> bool:
        digests = cluster.digests()
        return len(set(digests.values())) == 1 and next(iter(digests.values()))[0] > index

    wait_for(swept, 10.0, "the leader's expiry entry applied on all nodes")
    assert "registrar.expired" in leader.log_path.read_text()
    for node in cluster.followers(leader):
        assert "registrar.expired" not in node.log_path.read_text()
    wait_bindings(cluster, ext, raw, lambda b: b == {}, "no binding")
