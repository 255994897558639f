"""RFC 5626 outbound (raftpbx/outbound.py and the registrar's flow registrations), in one process.

A real `SipNode` with its `Registrar` (which installs the `Outbound` pre-router) and `Proxy`, UDP and TCP
on loopback, the real state machine behind a one-node "replicator" that applies each proposal at once, a
raw TCP "phone" (one connection = one flow) and a raw UDP peer standing for another node's proxy. Each rule
is named after its RFC section; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from local_replicator import LocalReplicator
from raftpbx.state import Command, current_bindings, decide_create_extension, encode_batch, ha1_md5
from raftpbx.transport.sip.digest import challenges_for, make_authorization
from raftpbx.transport.sip.message import Request, Response, parse_message
from raftpbx.transport.sip.stream import KeepAlive, StreamParser
from raftpbx.transport.sip.uri import SipUri

from raftpbx.config import HostPort, load_config
from raftpbx.outbound import FlowToken, decode_flow_token, derive_flow_key, encode_flow_token
from raftpbx.proxy import Proxy
from raftpbx.registrar import Registrar
from raftpbx.service import StateMachine
from raftpbx.sipnode import SipNode

pytestmark = pytest.mark.timeout(60)

DOMAIN = "outbound.test.local"
PASSWORD = "outbound-Secret-9"
SECRET = "k" * 32
INSTANCE = "<urn:uuid:00000000-0000-4000-8000-00000000b001>"
_ips = iter(range(10, 250))
_NET = f"127.{150 + os.getpid() % 50}"  # per-process addresses: concurrent runs never share one


# -- the token (pure) ---------------------------------------------------------------------------------------


def test_flow_token_round_trip_rfc5626_5_2() -> None:
    key = derive_flow_key(SECRET)
    token = FlowToken("node2", "a1b2c3d4", "tcp", 17, ("127.0.0.5", 40123))
    text = encode_flow_token(key, token)
    assert decode_flow_token(key, text) == token
    assert all(c.isalnum() or c in "-_" for c in text)  # legal, unescaped, in a SIP URI user part
    udp = FlowToken("n|odd", "00000000", "udp", 0, ("::1", 5060))  # separators and IPv6 survive
    assert decode_flow_token(key, encode_flow_token(key, udp)) == udp


def test_flow_token_forgery_refused_rfc5626_5_2() -> None:
    key = derive_flow_key(SECRET)
    text = encode_flow_token(key, FlowToken("node2", "a1b2c3d4", "tcp", 17, ("127.0.0.5", 40123)))
    assert decode_flow_token(derive_flow_key("another cluster secret 12345678"), text) is None
    for i in range(len(text)):  # any single changed character: refused
        other = "A" if text[i] != "A" else "B"
        assert decode_flow_token(key, text[:i] + other + text[i + 1:]) is None
    for junk in ("", "x", "=====", "a" * 400, "%41%42", "Zm9v"):
        assert decode_flow_token(key, junk) is None


@given(st.text(max_size=400))
def test_flow_token_decode_never_raises(text: str) -> None:
    assert decode_flow_token(derive_flow_key(SECRET), text) is None


# -- harness ------------------------------------------------------------------------------------------------


class Peer:
    """Anything that sends and receives SIP messages (a TCP connection or a UDP socket) and keeps them."""

    def __init__(self, ip: str) -> None:
        self.ip = ip
        self.port = 0
        self.messages: list[Request | Response] = []
        self.pongs = 0
        self._new = asyncio.Event()

    def _got(self, message: Request | Response) -> None:
        self.messages.append(message)
        self._new.set()

    async def expect(self, predicate: Callable[[Request | Response], bool], within: float = 3.0,
                     since: int = 0) -> Request | Response:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        index = since
        while True:
            while index < len(self.messages):
                message = self.messages[index]
                index += 1
                if predicate(message):
                    return message
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"{self.ip}:{self.port}: nothing matching in {within} s; got "
                                     f"{[m.start_line() for m in self.messages]}")
            self._new.clear()
            try:
                await asyncio.wait_for(self._new.wait(), remaining)
            except TimeoutError:
                pass

    async def request(self, method: str, since: int = 0, within: float = 3.0) -> Request:
        message = await self.expect(lambda m: isinstance(m, Request) and m.method == method, within, since)
        assert isinstance(message, Request)
        return message

    async def response(self, method: str, status: int | None = None, since: int = 0,
                       within: float = 3.0) -> Response:
        message = await self.expect(
            lambda m: isinstance(m, Response) and m.cseq.method == method and m.status >= 200
            and (status is None or m.status == status), within, since)
        assert isinstance(message, Response)
        return message

    def send(self, data: str | bytes) -> None:
        raise NotImplementedError

    def answer(self, request: Request, status: int, *, tag: str = "phone") -> None:
        """Answer as a UAS: the request's Vias, From, To (+tag), Call-ID, CSeq, Record-Route, Contact."""
        lines = [f"SIP/2.0 {status} X"]
        lines += [f"Via: {v}" for v in request.headers.get_all("Via")]
        lines.append(f"From: {request.headers.get('From')}")
        to = request.headers.get("To") or ""
        lines.append(f"To: {to}" if ";tag=" in to else f"To: {to};tag={tag}")
        lines += [f"Call-ID: {request.call_id}", f"CSeq: {request.headers.get('CSeq')}"]
        lines += [f"Record-Route: {v}" for v in request.headers.values("Record-Route")]
        if request.method == "INVITE" and 200 <= status < 300:
            lines.append(f"Contact: <sip:phone@{self.ip}:{self.port};transport=tcp;ob>")
        lines.append("Content-Length: 0")
        self.send("\r\n".join(lines) + "\r\n\r\n")


class TcpPhone(Peer):
    """One TCP connection to the node: the flow."""

    def __init__(self, ip: str) -> None:
        super().__init__(ip)
        self.writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def connect(self, target: tuple[str, int]) -> TcpPhone:
        reader, self.writer = await asyncio.open_connection(target[0], target[1], local_addr=(self.ip, 0))
        self.port = self.writer.get_extra_info("sockname")[1]
        self._task = asyncio.get_running_loop().create_task(self._read(reader))
        return self

    async def _read(self, reader: asyncio.StreamReader) -> None:
        parser = StreamParser()
        while data := await reader.read(65536):
            parser.feed(data)
            while (item := parser.next_message()) is not None:
                if isinstance(item, KeepAlive):
                    continue
                self._got(item)
            if parser.take_pong():
                self.pongs += 1
                self._new.set()

    def send(self, data: str | bytes) -> None:
        assert self.writer is not None
        self.writer.write(data.encode() if isinstance(data, str) else data)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def register_text(self, target: tuple[str, int], *, call_id: str, cseq: int, outbound: bool = True,
                      reg_ids: tuple[int, ...] = (1,), extra: tuple[str, ...] = (),
                      authorization: str | None = None) -> str:
        contacts = [f'<sip:2001@{self.ip}:{self.port};transport=tcp;ob>;+sip.instance="{INSTANCE[:-3]}{i:02d}>"'
                    f";reg-id={i}" for i in reg_ids]
        lines = [
            f"REGISTER sip:{target[0]}:{target[1]};transport=tcp SIP/2.0",
            *extra,
            f"Via: SIP/2.0/TCP {self.ip}:{self.port};branch=z9hG4bK{secrets.token_hex(8)};rport",
            "Max-Forwards: 70",
            f"From: <sip:2001@{DOMAIN}>;tag={secrets.token_hex(4)}",
            f"To: <sip:2001@{DOMAIN}>",
            f"Call-ID: {call_id}",
            f"CSeq: {cseq} REGISTER",
            *(f"Contact: {c}" for c in contacts),
            "Expires: 300",
            f"Supported: path{', outbound' if outbound else ''}",
        ]
        if authorization:
            lines.append(f"Authorization: {authorization}")
        lines.append("Content-Length: 0")
        return "\r\n".join(lines) + "\r\n\r\n"

    async def register(self, target: tuple[str, int], *, call_id: str | None = None, cseq: int = 1,
                       **kwargs: Any) -> Response:
        call_id = call_id or uuid.uuid4().hex
        mark = len(self.messages)
        self.send(self.register_text(target, call_id=call_id, cseq=cseq, **kwargs))
        first = await self.response("REGISTER", since=mark)
        if first.status != 401:
            return first
        challenge = challenges_for(first.headers.values("WWW-Authenticate"))[0]
        auth = make_authorization(username="2001", ha1=ha1_md5("2001", DOMAIN, PASSWORD), challenge=challenge,
                                  method="REGISTER", uri=f"sip:{target[0]}:{target[1]};transport=tcp",
                                  cnonce=secrets.token_hex(4))
        mark = len(self.messages)
        self.send(self.register_text(target, call_id=call_id, cseq=cseq + 1, authorization=auth, **kwargs))
        return await self.response("REGISTER", since=mark)


class UdpPeer(Peer):
    """A UDP socket standing for another node's proxy (or a phone)."""

    def __init__(self, ip: str) -> None:
        super().__init__(ip)
        self.transport: asyncio.DatagramTransport | None = None
        self.target: tuple[str, int] = ("", 0)

    async def open(self, target: tuple[str, int]) -> UdpPeer:
        peer = self

        class Protocol(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                peer._got(parse_message(data))

        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(Protocol, local_addr=(self.ip, 0))
        self.port = self.transport.get_extra_info("sockname")[1]
        self.target = target
        return self

    def send(self, data: str | bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data.encode() if isinstance(data, str) else data, self.target)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def request_text(self, method: str, ruri: str, route: str | None, *, call_id: str, cseq: int = 1,
                     to_tag: str | None = None, branch: str | None = None, max_forwards: int = 70) -> str:
        lines = [
            f"{method} {ruri} SIP/2.0",
            f"Via: SIP/2.0/UDP {self.ip}:{self.port};branch={branch or 'z9hG4bK' + secrets.token_hex(8)};rport",
            f"Max-Forwards: {max_forwards}",
            *([f"Route: {route}"] if route else []),
            f"From: <sip:1001@{DOMAIN}>;tag=caller",
            f"To: <sip:2001@{DOMAIN}>{';tag=' + to_tag if to_tag else ''}",
            f"Call-ID: {call_id}",
            f"CSeq: {cseq} {method}",
            f"Contact: <sip:1001@{self.ip}:{self.port}>",
            "Content-Length: 0",
        ]
        return "\r\n".join(lines) + "\r\n\r\n"


class Pbx:
    """One in-process node: SipNode (UDP + TCP) + Registrar (+ Outbound) + Proxy over a LocalReplicator."""

    def __init__(self, tmp: Path) -> None:
        self.ip = f"{_NET}.{next(_ips)}.1"
        cfg = load_config(None, overrides={
            "node.id": "n1", "node.data_dir": str(tmp / "n1"), "cluster.secret": SECRET,
            "admin.token": "t" * 32, "cluster.domain": DOMAIN, "sip.listen": f"{self.ip}:5060",
            "sip.digest_algorithms": "MD5",
        })
        cfg = dataclasses.replace(cfg, sip=dataclasses.replace(cfg.sip, listen=HostPort(self.ip, 0)))
        self.machine = StateMachine()
        self.node = SipNode(cfg, self.machine, LocalReplicator(self.machine))
        self.registrar = Registrar(self.node)
        self.proxy = Proxy(self.node, None)
        self.outbound = self.registrar.outbound
        self.peers: list[Peer] = []

    async def start(self) -> None:
        await self.node.start()
        self.proxy.start()
        address = self.node.endpoint.tcp_address
        assert address is not None
        self.address: tuple[str, int] = (address[0], address[1])
        events = decide_create_extension(self.machine.state, "2001", PASSWORD, None, DOMAIN, self.node.now())
        with self.machine.lock:
            self.machine.apply(encode_batch([Command(f"ext.{i}", e) for i, e in enumerate(events)]), 1)

    async def phone(self) -> TcpPhone:
        phone = await TcpPhone(f"{_NET}.{next(_ips)}.2").connect(self.address)
        self.peers.append(phone)
        return phone

    async def udp_peer(self) -> UdpPeer:
        peer = await UdpPeer(f"{_NET}.{next(_ips)}.3").open(self.address)
        self.peers.append(peer)
        return peer

    def bindings(self) -> list[Any]:
        with self.machine.lock:
            return current_bindings(self.machine.state, "2001", self.node.now())

    async def close(self) -> None:
        for peer in self.peers:
            if isinstance(peer, TcpPhone):
                await peer.close()
            elif isinstance(peer, UdpPeer):
                peer.close()
        await self.registrar.aclose()
        await self.proxy.aclose()
        await self.node.aclose()


@pytest.fixture
async def pbx(tmp_path: Path) -> AsyncIterator[Pbx]:
    p = Pbx(tmp_path)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


def route_uri(value: str) -> SipUri:
    from raftpbx.transport.sip.headers import parse_name_addr

    uri = parse_name_addr(value).uri
    assert isinstance(uri, SipUri)
    return uri


async def registered(pbx: Pbx) -> tuple[TcpPhone, str]:
    """A phone with a flow registration; returns it and the route (Path) to its flow."""
    phone = await pbx.phone()
    ok = await phone.register(pbx.address)
    assert ok.status == 200, ok.start_line()
    (binding,) = pbx.bindings()
    return phone, binding.path[0]


# -- registrar: flow registrations (RFC 5626 §6) -------------------------------------------------------------


async def test_flow_registration_stores_token_and_path_rfc5626_6(pbx: Pbx) -> None:
    phone = await pbx.phone()
    ok = await phone.register(pbx.address)
    assert ok.status == 200
    assert ok.headers.get("Require") == "outbound"  # §6
    assert ok.headers.get("Flow-Timer") == "120"  # §4.4.1 (TCP default)
    assert INSTANCE[:-3] in (ok.headers.get("Contact") or "") and "reg-id=1" in (ok.headers.get("Contact") or "")
    (binding,) = pbx.bindings()
    token = decode_flow_token(pbx.outbound.key, binding.flow)
    assert token is not None
    assert (token.node_id, token.transport, token.remote) == ("n1", "tcp", (phone.ip, phone.port))
    assert token.connection_id in {c.id for c in pbx.node.endpoint.tcp.connections}
    (path,) = binding.path  # the route to this node carrying the token
    uri = route_uri(path)
    assert (uri.user, uri.host, uri.port, uri.transport) == (binding.flow, pbx.address[0], pbx.address[1], "tcp")
    assert {name for name, _ in uri.params} >= {"lr", "ob"}
    # The same instance and reg-id over a new connection (the phone reconnected) replaces the binding.
    call_id = binding.call_id
    again = await pbx.phone()
    assert (await again.register(pbx.address, call_id=call_id, cseq=binding.cseq + 1)).status == 200
    (replaced,) = pbx.bindings()
    new = decode_flow_token(pbx.outbound.key, replaced.flow)
    assert new is not None and new.remote == (again.ip, again.port) and replaced.path != binding.path


async def test_without_supported_outbound_it_is_a_plain_registration_rfc5626_6(pbx: Pbx) -> None:
    phone = await pbx.phone()
    ok = await phone.register(pbx.address, outbound=False)
    assert ok.status == 200 and ok.headers.get("Require") is None and ok.headers.get("Flow-Timer") is None
    (binding,) = pbx.bindings()
    assert binding.flow == "" and binding.path == ()


async def test_two_reg_ids_400_and_first_hop_without_ob_439_rfc5626_6(pbx: Pbx) -> None:
    phone = await pbx.phone()
    assert (await phone.register(pbx.address, reg_ids=(1, 2))).status == 400
    proxied = "Via: SIP/2.0/UDP 127.0.0.9:5060;branch=z9hG4bKedge1"  # a proxy that did not add an ob Path
    refused = await phone.register(pbx.address, extra=(proxied,))
    assert (refused.status, refused.reason) == (439, "First Hop Lacks Outbound Support")
    # Through an edge proxy that supports outbound (its Path has `ob`): accepted, its Path kept, no token.
    edge = (proxied, "Path: <sip:edge-token@127.0.0.9:5060;lr;ob>")
    ok = await phone.register(pbx.address, extra=edge)
    assert ok.status == 200 and ok.headers.get("Require") == "outbound" and ok.headers.get("Flow-Timer") is None
    (binding,) = pbx.bindings()
    assert binding.flow == "" and binding.path == ("<sip:edge-token@127.0.0.9:5060;lr;ob>",)


# -- the pre-router (RFC 5626 §5.3) -------------------------------------------------------------------------


async def test_request_routed_to_a_token_goes_over_the_flow_rfc5626_5_3(pbx: Pbx) -> None:
    phone, path = await registered(pbx)
    peer = await pbx.udp_peer()
    call_id = uuid.uuid4().hex
    contact = f"sip:phone@{phone.ip}:{phone.port};transport=tcp;ob"
    mark = len(phone.messages)
    peer.send(peer.request_text("INVITE", contact, path, call_id=call_id))
    invite = await phone.request("INVITE", since=mark)
    assert invite.routes == ()  # our Route value was consumed
    assert invite.max_forwards == 69
    top = invite.top_via
    assert (top.host, top.port, top.transport.upper()) == (pbx.address[0], pbx.address[1], "TCP")
    assert len(invite.vias) == 2
    (rr,) = invite.record_routes  # §5.3: the edge proxy record-routes with the flow token
    rr_uri = rr.uri
    assert isinstance(rr_uri, SipUri) and rr_uri.user == route_uri(path).user
    assert (rr_uri.host, rr_uri.port, rr_uri.transport) == (pbx.address[0], pbx.address[1], "tcp")
    phone.answer(invite, 180)
    phone.answer(invite, 200)
    ringing = await peer.expect(lambda m: isinstance(m, Response) and m.status == 180)
    ok = await peer.response("INVITE", 200)
    assert len(ringing.vias) == 1 and len(ok.vias) == 1 and ok.to_tag == "phone"
    # The ACK of the 2xx and a BYE, routed by the Record-Route: over the flow again.
    mark = len(phone.messages)
    peer.send(peer.request_text("ACK", contact, f"<{rr_uri}>", call_id=call_id, to_tag="phone"))
    ack = await phone.request("ACK", since=mark)
    assert ack.routes == () and ack.top_via.host == pbx.address[0]
    peer.send(peer.request_text("BYE", contact, f"<{rr_uri}>", call_id=call_id, cseq=2, to_tag="phone"))
    bye = await phone.request("BYE", since=mark)
    phone.answer(bye, 200)
    assert (await peer.response("BYE", 200)).call_id == call_id
    assert pbx.outbound.counters["relayed"] == 2 and pbx.outbound.counters["acks_relayed"] == 1


async def test_cancel_follows_the_invite_over_the_flow_rfc3261_16_10(pbx: Pbx) -> None:
    phone, path = await registered(pbx)
    peer = await pbx.udp_peer()
    call_id = uuid.uuid4().hex
    branch = "z9hG4bK" + secrets.token_hex(8)
    contact = f"sip:phone@{phone.ip}:{phone.port};transport=tcp;ob"
    mark = len(phone.messages)
    peer.send(peer.request_text("INVITE", contact, path, call_id=call_id, branch=branch))
    invite = await phone.request("INVITE", since=mark)
    phone.answer(invite, 180)
    await peer.expect(lambda m: isinstance(m, Response) and m.status == 180)
    peer.send(peer.request_text("CANCEL", contact, path, call_id=call_id, branch=branch))
    assert (await peer.response("CANCEL", 200)).call_id == call_id
    cancel = await phone.request("CANCEL", since=mark)
    assert cancel.branch == invite.branch  # §9.1: the CANCEL matches the INVITE downstream
    phone.answer(cancel, 200)
    phone.answer(invite, 487)
    assert (await peer.response("INVITE", 487)).call_id == call_id
    ack = await phone.request("ACK", since=mark)  # our client transaction ACKs the 487 hop by hop
    assert ack.branch == invite.branch


async def test_dead_flow_430_forged_token_403_foreign_token_430_rfc5626_5_3(pbx: Pbx) -> None:
    phone, path = await registered(pbx)
    peer = await pbx.udp_peer()
    uri = route_uri(path)
    contact = f"sip:phone@{phone.ip}:{phone.port};transport=tcp;ob"
    forged = path.replace(uri.user or "", (uri.user or "")[:-2] + "AA")
    peer.send(peer.request_text("INVITE", contact, forged, call_id="forged"))
    assert (await peer.response("INVITE", since=0)).status == 403
    key = pbx.outbound.key
    elsewhere = encode_flow_token(key, FlowToken("n2", pbx.outbound.boot, "tcp", 1, (phone.ip, phone.port)))
    earlier = encode_flow_token(key, FlowToken("n1", "00000000", "tcp", 1, (phone.ip, phone.port)))
    for i, token in enumerate((elsewhere, earlier)):
        mark = len(peer.messages)
        peer.send(peer.request_text("INVITE", contact, path.replace(uri.user or "", token), call_id=f"f{i}"))
        assert (await peer.response("INVITE", since=mark)).status == 430
    # The phone's connection goes away: its flow is dead.
    await phone.close()

    def closed() -> bool:
        token = decode_flow_token(key, uri.user or "")
        return token is not None and pbx.node.endpoint.tcp.connection(token.connection_id) is None

    await poll(closed, "the node notices the closed connection")
    mark = len(peer.messages)
    peer.send(peer.request_text("INVITE", contact, path, call_id="dead"))
    dead = await peer.response("INVITE", since=mark)
    assert (dead.status, dead.reason) == (430, "Flow Failed")
    # Max-Forwards 0 on a live flow: 483 (RFC 3261 §16.3 step 3), nothing relayed.
    other, live = await registered_again(pbx)
    mark = len(peer.messages)
    peer.send(peer.request_text("INVITE", contact, live, call_id="mf", max_forwards=0))
    assert (await peer.response("INVITE", since=mark)).status == 483
    assert not [m for m in other.messages if isinstance(m, Request) and m.method == "INVITE"]


async def registered_again(pbx: Pbx) -> tuple[TcpPhone, str]:
    phone = await pbx.phone()
    (binding,) = pbx.bindings()
    ok = await phone.register(pbx.address, call_id=binding.call_id, cseq=binding.cseq + 1)
    assert ok.status == 200
    (binding,) = pbx.bindings()
    return phone, binding.path[0]


async def test_request_arriving_on_its_own_flow_is_left_to_the_proxy_rfc5626_5_3(pbx: Pbx) -> None:
    """The phone's own in-dialog request through our Record-Route travels away from the flow: the proxy
    routes it (our token Route is one of its own values), it is not sent back to the phone."""
    phone, path = await registered(pbx)
    peer = await pbx.udp_peer()
    lines = [
        f"BYE sip:1001@{peer.ip}:{peer.port} SIP/2.0",
        f"Via: SIP/2.0/TCP {phone.ip}:{phone.port};branch=z9hG4bK{secrets.token_hex(8)};rport",
        "Max-Forwards: 70", f"Route: {path}", f"From: <sip:2001@{DOMAIN}>;tag=phone",
        f"To: <sip:1001@{DOMAIN}>;tag=caller", "Call-ID: from-the-flow", "CSeq: 5 BYE", "Content-Length: 0",
    ]
    mark = len(phone.messages)
    phone.send("\r\n".join(lines) + "\r\n\r\n")
    bye = await peer.request("BYE")
    assert bye.routes == () and bye.call_id == "from-the-flow"
    peer.answer(bye, 200)
    assert (await phone.response("BYE", 200, since=mark)).call_id == "from-the-flow"
    assert pbx.outbound.counters["from_flow"] == 1 and pbx.outbound.counters["relayed"] == 0


async def test_crlf_keepalive_answered_rfc5626_4_4_1(pbx: Pbx) -> None:
    phone = await pbx.phone()
    phone.send(b"\r\n\r\n")
    await poll(lambda: phone.pongs == 1, "a CRLF pong")


async def test_call_through_the_proxy_reaches_the_flow_rfc5626_5_3(pbx: Pbx) -> None:
    """An authenticated INVITE to the extension: the proxy forks to the binding's Path (this node), the
    pre-router relays it over the flow, and the answer comes back through both."""
    phone, _ = await registered(pbx)
    with pbx.machine.lock:
        events = decide_create_extension(pbx.machine.state, "1001", PASSWORD, None, DOMAIN, pbx.node.now())
        pbx.machine.apply(encode_batch([Command(f"ext1001.{i}", e) for i, e in enumerate(events)]),
                          pbx.machine.state.applied_index + 1)
    caller = await pbx.udp_peer()
    call_id = uuid.uuid4().hex
    ruri = f"sip:2001@{pbx.address[0]}:{pbx.address[1]}"
    caller.send(caller.request_text("INVITE", ruri, None, call_id=call_id))
    challenge = await caller.response("INVITE", 407)
    chosen = challenges_for(challenge.headers.values("Proxy-Authenticate"))[0]
    auth = make_authorization(username="1001", ha1=ha1_md5("1001", DOMAIN, PASSWORD), challenge=chosen,
                              method="INVITE", uri=ruri, cnonce="c0ffee")
    text = caller.request_text("INVITE", ruri, None, call_id=call_id, cseq=2)
    caller.send(text.replace("Content-Length: 0", f"Proxy-Authorization: {auth}\r\nContent-Length: 0"))
    invite = await phone.request("INVITE")
    assert invite.call_id == call_id and len(invite.vias) == 3  # caller, proxy, outbound relay
    phone.answer(invite, 200)
    ok = await caller.response("INVITE", 200, since=0)
    assert ok.call_id == call_id and len(ok.vias) == 1


async def poll(condition: Callable[[], bool], what: str, within: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_relay_forgotten_when_its_transaction_ends(pbx: Pbx) -> None:
    """Memory stays bounded: a relayed request is forgotten once its server transaction terminates (over
    TCP a non-INVITE one ends with its final response, RFC 3261 §17.2.2)."""
    phone, path = await registered(pbx)
    other = await pbx.phone()  # another node's TCP connection, say
    lines = [
        f"MESSAGE sip:phone@{phone.ip}:{phone.port};transport=tcp SIP/2.0",
        f"Via: SIP/2.0/TCP {other.ip}:{other.port};branch=z9hG4bK{secrets.token_hex(8)};rport",
        "Max-Forwards: 70", f"Route: {path}", f"From: <sip:1001@{DOMAIN}>;tag=m",
        f"To: <sip:2001@{DOMAIN}>", "Call-ID: relay-forgotten", "CSeq: 1 MESSAGE", "Content-Length: 0",
    ]
    other.send("\r\n".join(lines) + "\r\n\r\n")
    message = await phone.request("MESSAGE")
    assert message.record_routes == ()  # not dialog-creating: no Record-Route
    assert pbx.outbound.relays == 1
    phone.answer(message, 202)
    assert (await other.response("MESSAGE", 202)).call_id == "relay-forgotten"
    await poll(lambda: pbx.outbound.relays == 0, "the relay to be forgotten")


async def test_udp_flow_registration_and_relay_rfc5626_5_2(pbx: Pbx) -> None:
    """A UDP flow (NAT binding): the token names the phone's address; requests routed to it go there."""
    phone = await pbx.udp_peer()
    call_id = uuid.uuid4().hex

    def register_text(cseq: int, authorization: str | None = None) -> str:
        lines = [
            f"REGISTER sip:{pbx.address[0]}:{pbx.address[1]} SIP/2.0",
            f"Via: SIP/2.0/UDP {phone.ip}:{phone.port};branch=z9hG4bK{secrets.token_hex(8)};rport",
            "Max-Forwards: 70", f"From: <sip:2001@{DOMAIN}>;tag=u", f"To: <sip:2001@{DOMAIN}>",
            f"Call-ID: {call_id}", f"CSeq: {cseq} REGISTER",
            f'Contact: <sip:2001@{phone.ip}:{phone.port};ob>;+sip.instance="{INSTANCE}";reg-id=1',
            "Supported: outbound, path", "Expires: 300",
            *([f"Authorization: {authorization}"] if authorization else []), "Content-Length: 0",
        ]
        return "\r\n".join(lines) + "\r\n\r\n"

    phone.send(register_text(1))
    challenge = challenges_for((await phone.response("REGISTER", 401)).headers.values("WWW-Authenticate"))[0]
    auth = make_authorization(username="2001", ha1=ha1_md5("2001", DOMAIN, PASSWORD), challenge=challenge,
                              method="REGISTER", uri=f"sip:{pbx.address[0]}:{pbx.address[1]}", cnonce="u1")
    phone.send(register_text(2, auth))
    ok = await phone.response("REGISTER", 200)
    assert ok.headers.get("Require") == "outbound" and ok.headers.get("Flow-Timer") == "29"
    (binding,) = pbx.bindings()
    token = decode_flow_token(pbx.outbound.key, binding.flow)
    assert token is not None and (token.transport, token.remote) == ("udp", (phone.ip, phone.port))
    uri = route_uri(binding.path[0])
    assert uri.transport is None and (uri.host, uri.port) == pbx.address
    peer = await pbx.udp_peer()
    mark = len(phone.messages)
    peer.send(peer.request_text("MESSAGE", f"sip:2001@{phone.ip}:{phone.port}", binding.path[0], call_id="udp"))
    message = await phone.request("MESSAGE", since=mark)
    assert message.routes == () and message.top_via.transport.upper() == "UDP"
    phone.answer(message, 200)
    assert (await peer.response("MESSAGE", 200)).call_id == "udp"
