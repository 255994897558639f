"""The proxy (raftpbx/proxy.py) in one process: a real `SipNode` on loopback UDP, the real state machine
behind a one-node "replicator" that applies each proposal at once, and raw SIP user agents on sockets.

What the phone tests (tests/integration/test_calls.py) cannot reach cheaply is checked here, each rule next
to its RFC 3261 section: 407 for any bad credential (§22.3), 483 (§16.3 step 3), 482 (§16.3 step 4),
404/480 recorded, parallel forking with deterministic branches, Record-Route and Via (§16.6), the first 2xx
forwarded only after CallAnswered is committed and the other branch CANCELled (§16.7 step 10), the best
final response (§16.7 step 6), CANCEL (§16.10), Timer C (§16.6 step 11), loose routing of ACK and BYE
(§16.4), and the leader's timeout job (BYE to both ends). Every wait is bounded by a deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from local_replicator import LocalReplicator
from raftpbx.state import (
    Command,
    ContactSpec,
    RegisterAccepted,
    cdr_row,
    decide_create_extension,
    decide_register,
    encode_batch,
    ha1_md5,
)
from raftpbx.transport.sip.digest import challenges_for, make_authorization
from raftpbx.transport.sip.message import Request, Response, parse_message
from raftpbx.transport.sip.stream import StreamParser

from raftpbx.calls import CallSettings
from raftpbx.config import HostPort, load_config
from raftpbx.proxy import Proxy, best_response, loop_hash, session_expires
from raftpbx.service import StateMachine
from raftpbx.sipnode import SipNode

DOMAIN = "proxy.test.local"
PASSWORD = "proxy-Secret-9"
_ip_counter = iter(range(10, 250))
_NET = f"127.{200 + os.getpid() % 50}"  # per-process addresses: concurrent test runs never share one


class UA:
    """A raw SIP user agent on one UDP socket: sends text, collects every message it receives."""

    def __init__(self, ip: str) -> None:
        self.ip = ip
        self.port = 0
        self.messages: list[Request | Response] = []
        self.sources: list[tuple[str, int]] = []  # the source address of each message, in order
        self._new = asyncio.Event()
        self.transport: asyncio.DatagramTransport | None = None

    async def open(self) -> UA:
        loop = asyncio.get_running_loop()
        ua = self

        class Protocol(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                ua.messages.append(parse_message(data))
                ua.sources.append((addr[0], addr[1]))
                ua._new.set()

        transport, _ = await loop.create_datagram_endpoint(Protocol, local_addr=(self.ip, 0))
        self.transport = transport
        self.port = transport.get_extra_info("sockname")[1]
        return self

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    @property
    def contact(self) -> str:
        return f"sip:ua@{self.ip}:{self.port}"

    def send(self, message: Request | Response | str, to: tuple[str, int]) -> None:
        data = message.encode() if isinstance(message, str) else message.to_bytes()
        assert self.transport is not None
        self.transport.sendto(data, to)

    async def expect(
        self, predicate: Callable[[Request | Response], bool], within: float = 3.0, since: int = 0
    ) -> Request | Response:
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

    async def request(self, method: str, within: float = 3.0, since: int = 0) -> Request:
        message = await self.expect(lambda m: isinstance(m, Request) and m.method == method, within, since)
        assert isinstance(message, Request)
        return message

    async def response(self, status: int | None = None, method: str = "INVITE", within: float = 3.0,
                       since: int = 0, final: bool = True, cseq: int | None = None) -> Response:
        def match(m: Request | Response) -> bool:
            return (isinstance(m, Response) and m.cseq.method == method
                    and (status is None or m.status == status) and (not final or m.status >= 200)
                    and (cseq is None or m.cseq.seq == cseq))

        message = await self.expect(match, within, since)
        assert isinstance(message, Response)
        return message

    def answer(self, request: Request, status: int, *, tag: str = "callee", headers: list[str] | None = None) -> None:
        """Answer `request` as a UAS: its Vias, From, To (+tag), Call-ID, CSeq, Record-Route, Contact."""
        lines = [f"SIP/2.0 {status} X"]
        lines += [f"Via: {v}" for v in request.headers.get_all("Via")]
        lines.append(f"From: {request.headers.get('From')}")
        to = request.headers.get("To") or ""
        lines.append(f"To: {to}" if status == 100 or ";tag=" in to else f"To: {to};tag={tag}")
        lines += [f"Call-ID: {request.call_id}", f"CSeq: {request.headers.get('CSeq')}"]
        lines += [f"Record-Route: {v}" for v in request.headers.values("Record-Route")]
        if request.method == "INVITE" and 200 <= status < 300:
            lines.append(f"Contact: <{self.contact}>")
        lines += headers or []
        lines.append("Content-Length: 0")
        top = request.top_via
        self.send("\r\n".join(lines) + "\r\n\r\n", (top.received or top.host, top.rport or top.port or 5060))


class Pbx:
    """One in-process node: SipNode + Proxy over a LocalReplicator."""

    def __init__(self, tmp: Path, settings: CallSettings, service: str | None = None) -> None:
        self.ip = f"{_NET}.{next(_ip_counter)}.1"
        overrides = {
            "node.id": "n1", "node.data_dir": str(tmp / "n1"), "cluster.secret": "s" * 32,
            "admin.token": "t" * 32, "cluster.domain": DOMAIN, "sip.listen": f"{self.ip}:5060",
            "sip.digest_algorithms": "MD5",
        }
        if service is not None:
            overrides["service.address"] = service
        cfg = load_config(None, overrides=overrides)
        cfg = dataclasses.replace(cfg, sip=dataclasses.replace(cfg.sip, listen=HostPort(self.ip, 0)))
        self.machine = StateMachine()
        self.replicator = LocalReplicator(self.machine)
        self.node = SipNode(cfg, self.machine, self.replicator)
        self.proxy = Proxy(self.node, self.replicator, settings=settings)
        self.clients: list[UA] = []

    async def start(self) -> None:
        await self.node.start()
        self.proxy.start()
        address = self.node.endpoint.udp_address
        assert address is not None
        self.address = address

    async def close(self) -> None:
        for ua in self.clients:
            ua.close()
        await self.proxy.aclose()
        await self.node.aclose()

    def apply(self, op_id: str, events: Any) -> None:
        self.replicator.index += 1  # the same log as the proxy's proposals
        self.machine.apply(encode_batch([Command(f"{op_id}.{i}", e) for i, e in enumerate(events)]),
                           self.replicator.index)

    def create(self, extension: str) -> None:
        with self.machine.lock:
            events = decide_create_extension(self.machine.state, extension, PASSWORD, None, DOMAIN,
                                             self.node.now())
        self.apply(f"ext-{extension}", events)

    def bind(self, extension: str, ua: UA) -> None:
        with self.machine.lock:
            decision = decide_register(
                self.machine.state, aor=extension, contacts=[ContactSpec(ua.contact, ua.contact)], star=False,
                expires_header=600, call_id=uuid.uuid4().hex, cseq=1, received=f"{ua.ip}:{ua.port}",
                transport="udp", node_id="n1", now=self.node.now(), min_expires=1, max_expires=3600,
                default_expires=600, max_contacts=10,
            )
        assert isinstance(decision, RegisterAccepted)
        self.apply(decision.op_id, decision.events)

    async def ua(self) -> UA:
        ua = await UA(self.ip.rsplit(".", 1)[0] + f".{len(self.clients) + 2}").open()
        self.clients.append(ua)
        return ua

    def call(self, call_id: str) -> dict[str, Any] | None:
        with self.machine.lock:
            call = self.machine.state.calls.get(call_id) or self.machine.state.finished_calls.get(call_id)
        return None if call is None else cdr_row(call) | {"to_tag": call.to_tag, "ringing_at": call.ringing_at}


@pytest.fixture
async def pbx(tmp_path: Path) -> AsyncIterator[Pbx]:
    p = Pbx(tmp_path, CallSettings(timer_c=1.0, max_duration=3600.0, ring_timeout=600.0, interval=0.05))
    await p.start()
    try:
        yield p
    finally:
        await p.close()


def invite_text(pbx: Pbx, caller: UA, callee: str, *, call_id: str, cseq: int = 1, branch: str | None = None,
                authorization: str | None = None, max_forwards: int = 70, extra: list[str] | None = None,
                from_user: str = "1001") -> str:
    host, port = pbx.address
    lines = [
        f"INVITE sip:{callee}@{host}:{port} SIP/2.0",
        f"Via: SIP/2.0/UDP {caller.ip}:{caller.port};branch={branch or 'z9hG4bK' + secrets.token_hex(8)};rport",
        f"Max-Forwards: {max_forwards}",
        f"From: <sip:{from_user}@{DOMAIN}>;tag=caller-{call_id[:6]}",
        f"To: <sip:{callee}@{DOMAIN}>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} INVITE",
        f"Contact: <{caller.contact}>",
    ]
    if authorization:
        lines.append(f"Proxy-Authorization: {authorization}")
    lines += extra or []
    lines.append("Content-Length: 0")
    return "\r\n".join(lines) + "\r\n\r\n"


async def authenticated_invite(pbx: Pbx, caller: UA, callee: str, call_id: str, *, user: str = "1001",
                               password: str = PASSWORD) -> Response:
    """INVITE, 407, ACK, INVITE with Proxy-Authorization; returns the 407."""
    mark = len(caller.messages)
    caller.send(invite_text(pbx, caller, callee, call_id=call_id, from_user=user), pbx.address)
    challenge = await caller.response(407, since=mark)
    caller.send(ack_text(challenge, pbx), pbx.address)  # §17.1.1.3: the hop-by-hop ACK of the 407
    chosen = challenges_for(challenge.headers.values("Proxy-Authenticate"))[0]
    host, port = pbx.address
    authorization = make_authorization(username=user, ha1=ha1_md5(user, DOMAIN, password), challenge=chosen,
                                       method="INVITE", uri=f"sip:{callee}@{host}:{port}", cnonce="c0ffee")
    caller.send(invite_text(pbx, caller, callee, call_id=call_id, cseq=2, authorization=authorization,
                            from_user=user), pbx.address)
    return challenge


def ack_text(response: Response, pbx: Pbx) -> str:
    host, port = pbx.address
    return "\r\n".join([
        f"ACK sip:{response.to.uri.user}@{host}:{port} SIP/2.0",  # type: ignore[union-attr]
        f"Via: {response.headers.get('Via')}", "Max-Forwards: 70", f"From: {response.headers.get('From')}",
        f"To: {response.headers.get('To')}", f"Call-ID: {response.call_id}", f"CSeq: {response.cseq.seq} ACK",
        "Content-Length: 0", "", "",
    ])


# -- pure helpers -----------------------------------------------------------------------------------------


def test_best_response_rfc3261_16_7_step_6() -> None:
    assert best_response([]) is None
    assert best_response([486, 603, 404]) == 603  # a 6xx wins
    assert best_response([500, 486, 302]) == 302  # else the lowest class
    assert best_response([486, 404, 407]) == 407  # 401/407/415/420/484 preferred within 4xx
    assert best_response([486, 404]) == 486  # else the first received
    assert best_response([503]) == 503


def test_session_expires_rfc4028() -> None:
    assert session_expires(Response(200, headers=[("Session-Expires", "1800;refresher=uac")])) == 1800
    assert session_expires(Response(200, headers=[("x", "90")])) == 90
    assert session_expires(Response(200, headers=[("Session-Expires", "soon")])) is None
    assert session_expires(Response(200)) is None


# -- the proxy on sockets -----------------------------------------------------------------------------------


async def test_407_for_no_wrong_or_unknown_credentials_rfc3261_22_3(pbx: Pbx) -> None:
    pbx.create("1001")
    pbx.create("1002")
    caller = await pbx.ua()
    shapes = []
    for user, password in (("1001", "wrong-" + PASSWORD), ("1999", PASSWORD)):
        call_id = uuid.uuid4().hex
        await authenticated_invite(pbx, caller, "1002", call_id, user=user, password=password)
        second = await caller.expect(lambda m, c=call_id: isinstance(m, Response) and m.call_id == c
                                     and m.cseq.seq == 2 and m.status >= 200)
        assert isinstance(second, Response)
        shapes.append((second.status, sorted(n.lower() for n, _ in second.headers)))
    assert shapes[0] == shapes[1] and shapes[0][0] == 407  # unknown caller == wrong password
    assert not pbx.machine.state.calls and not pbx.machine.state.finished_calls


async def test_max_forwards_0_gets_483_rfc3261_16_3_step_3(pbx: Pbx) -> None:
    caller = await pbx.ua()
    caller.send(invite_text(pbx, caller, "1002", call_id=uuid.uuid4().hex, max_forwards=0), pbx.address)
    assert (await caller.response()).status == 483


async def test_loop_gets_482_rfc3261_16_3_step_4(pbx: Pbx) -> None:
    caller = await pbx.ua()
    call_id = uuid.uuid4().hex
    text = invite_text(pbx, caller, "1002", call_id=call_id)
    looped = loop_hash(parse_message(text.encode()))  # type: ignore[arg-type]
    host, port = pbx.address
    ours = f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK{'0' * 32}.{looped}"
    text = text.replace("Max-Forwards", ours + "\r\nMax-Forwards", 1)
    caller.send(text, pbx.address)
    assert (await caller.response()).status == 482
    # A spiral (same fields but another Request-URI) is not a loop: it gets the usual 407.
    caller.send(text.replace("INVITE sip:1002@", "INVITE sip:1003@", 1).replace("z9hG4bK", "z9hG4bKs", 1),
                pbx.address)
    assert (await caller.response(407)).status == 407


async def test_unknown_extension_404_and_unregistered_480_are_recorded_before_the_reply(pbx: Pbx) -> None:
    pbx.create("1001")
    pbx.create("1002")
    caller = await pbx.ua()
    for callee, status, disposition in (("1777", 404, "failed"), ("1002", 480, "no-answer")):
        call_id = uuid.uuid4().hex
        mark = len(caller.messages)
        await authenticated_invite(pbx, caller, callee, call_id)
        final = await caller.response(status, cseq=2, since=mark)
        assert final.status == status
        row = pbx.call(call_id)
        assert row is not None and row["disposition"] == disposition and row["status_code"] == status, row
        assert row["caller"] == "1001" and row["callee"] == callee


async def test_fork_to_two_contacts_first_2xx_wins_other_cancelled_then_ack_and_bye_loose_routed(pbx: Pbx) -> None:
    pbx.create("1001")
    pbx.create("1002")
    caller, phone_a, phone_b = await pbx.ua(), await pbx.ua(), await pbx.ua()
    pbx.bind("1002", phone_a)
    pbx.bind("1002", phone_b)
    call_id = uuid.uuid4().hex
    await authenticated_invite(pbx, caller, "1002", call_id)
    await caller.response(100, final=False, cseq=2)
    inv_a, inv_b = await phone_a.request("INVITE"), await phone_b.request("INVITE")
    host, port = pbx.address
    for invite, phone in ((inv_a, phone_a), (inv_b, phone_b)):
        assert invite.uri == phone.contact  # §16.6 step 6: Request-URI = the contact
        assert invite.max_forwards == 69  # §16.6 step 3
        assert invite.headers.values("Record-Route") == [f"<sip:{host}:{port};lr>"]  # §16.6 step 4
        assert invite.top_via.host == host and invite.top_via.port == port
        assert "Proxy-Authorization" not in invite.headers  # our credentials are consumed
    assert inv_a.branch != inv_b.branch
    phone_a.answer(inv_a, 180, tag="a")
    phone_b.answer(inv_b, 180, tag="b")
    ringing = await caller.response(180, final=False)
    assert len(ringing.vias) == 1  # our Via is stripped from responses going upstream (§16.7 step 3)
    row = pbx.call(call_id)
    assert row is not None and row["disposition"] is None

    # Commit before reply: when the 2xx reaches the caller, CallAnswered is applied.
    phone_a.answer(inv_a, 200, tag="a")
    ok = await caller.response(200)
    row = pbx.call(call_id)
    assert row is not None and row["answered_at"] is not None
    assert ok.to_tag == "a"
    # §16.7 step 10: the other branch is CANCELled; it answers 487, which the proxy ACKs and absorbs.
    cancel = await phone_b.request("CANCEL")
    assert cancel.branch == inv_b.branch
    phone_b.answer(cancel, 200, tag="b")
    phone_b.answer(inv_b, 487, tag="b")
    await phone_b.request("ACK")
    assert not [m for m in caller.messages if isinstance(m, Response) and m.status >= 300 and m.cseq.seq == 2]

    # ACK and BYE carry the route set (the Record-Route as received) and reach phone A (§16.4).
    route = ok.headers.values("Record-Route")
    dialog = [f"Route: {r}" for r in route]
    for method, cseq in (("ACK", 2), ("BYE", 3)):
        caller.send("\r\n".join([
            f"{method} {phone_a.contact} SIP/2.0",
            f"Via: SIP/2.0/UDP {caller.ip}:{caller.port};branch=z9hG4bK{secrets.token_hex(8)};rport",
            "Max-Forwards: 70", *dialog,
            f"From: <sip:1001@{DOMAIN}>;tag=caller-{call_id[:6]}", f"To: <sip:1002@{DOMAIN}>;tag=a",
            f"Call-ID: {call_id}", f"CSeq: {cseq} {method}", "Content-Length: 0", "", "",
        ]), pbx.address)
        forwarded = await phone_a.request(method)
        assert "Route" not in forwarded.headers and forwarded.max_forwards == 69
    bye = await phone_a.request("BYE")
    phone_a.answer(bye, 200, tag="a")
    bye_ok = await caller.response(200, method="BYE")
    assert bye_ok.status == 200
    row = pbx.call(call_id)
    assert row is not None and row["disposition"] == "answered" and row["cause"] == "bye-caller", row
    assert row["hangup_by"] == "caller" and row["ringing_at"] is not None


async def test_all_branches_fail_best_response_and_503_becomes_500(pbx: Pbx) -> None:
    pbx.create("1001")
    pbx.create("1002")
    caller, phone_a, phone_b = await pbx.ua(), await pbx.ua(), await pbx.ua()
    pbx.bind("1002", phone_a)
    pbx.bind("1002", phone_b)
    call_id = uuid.uuid4().hex
    await authenticated_invite(pbx, caller, "1002", call_id)
    inv_a, inv_b = await phone_a.request("INVITE"), await phone_b.request("INVITE")
    phone_a.answer(inv_a, 503, tag="a")
    await phone_a.request("ACK")  # hop-by-hop ACK of a non-2xx (§17.1.1.3)
    phone_b.answer(inv_b, 486, tag="b")
    final = await caller.response(cseq=2)
    assert final.status == 486 and final.to_tag == "b"
    row = pbx.call(call_id)
    assert row is not None and row["disposition"] == "busy" and row["status_code"] == 486

    call_id = uuid.uuid4().hex
    mark_a = len(phone_a.messages)
    mark_c = len(caller.messages)
    await authenticated_invite(pbx, caller, "1002", call_id)
    inv_a = await phone_a.request("INVITE", since=mark_a)
    inv_b = await phone_b.request("INVITE", since=len(phone_b.messages) - 1)
    phone_a.answer(inv_a, 503, tag="a")
    phone_b.answer(inv_b, 603, tag="b")
    final = await caller.response(cseq=2, since=mark_c)
    assert final.status == 603  # 6xx wins


async def test_cancel_while_ringing_gives_487_and_a_cancelled_record_rfc3261_16_10(pbx: Pbx) -> None:
    caller, phone, call_id, invite = await ringing_call(pbx)
    phone.answer(invite, 180, tag="p")
    await caller.response(180, final=False)
    # The caller's CANCEL: same Request-URI, Call-ID, From, To, CSeq number and top Via as its INVITE.
    host, port = pbx.address
    invite_branch = (await caller.response(180, final=False)).branch
    caller.send("\r\n".join([
        f"CANCEL sip:1002@{host}:{port} SIP/2.0",
        f"Via: SIP/2.0/UDP {caller.ip}:{caller.port};branch={invite_branch};rport",
        "Max-Forwards: 70", f"From: <sip:1001@{DOMAIN}>;tag=caller-{call_id[:6]}", f"To: <sip:1002@{DOMAIN}>",
        f"Call-ID: {call_id}", "CSeq: 2 CANCEL", "Content-Length: 0", "", "",
    ]), pbx.address)
    assert (await caller.response(200, method="CANCEL")).status == 200
    cancel = await phone.request("CANCEL")
    phone.answer(cancel, 200, tag="p")
    phone.answer(invite, 487, tag="p")
    final = await caller.response(cseq=2)
    assert final.status == 487
    row = pbx.call(call_id)
    assert row is not None and row["disposition"] == "cancelled" and row["cause"] == "cancel", row


async def test_timer_c_cancels_the_ringing_branch_and_the_caller_gets_408(pbx: Pbx) -> None:
    caller, phone, call_id, invite = await ringing_call(pbx)
    phone.answer(invite, 180, tag="p")
    cancel = await phone.request("CANCEL", within=4.0)  # Timer C = 1 s in this fixture
    phone.answer(cancel, 200, tag="p")
    phone.answer(invite, 487, tag="p")
    final = await caller.response(cseq=2)
    assert final.status == 408
    row = pbx.call(call_id)
    assert row is not None and row["cause"] == "timeout" and row["disposition"] == "no-answer", row


async def test_leader_job_ends_an_overlong_call_and_sends_bye_to_both_ends(tmp_path: Path) -> None:
    pbx = Pbx(tmp_path, CallSettings(timer_c=200.0, max_duration=1.0, ring_timeout=600.0, interval=0.05))
    await pbx.start()
    try:
        caller, phone, call_id, invite = await ringing_call(pbx, leads=True)
        phone.answer(invite, 200, tag="p")
        await caller.response(200)
        bye_callee = await phone.request("BYE", within=4.0)
        bye_caller = await caller.request("BYE", within=4.0)
        assert bye_callee.call_id == bye_caller.call_id == call_id
        assert bye_callee.to_tag == "p" and bye_caller.to_tag == f"caller-{call_id[:6]}"
        row = pbx.call(call_id)
        assert row is not None and row["cause"] == "timeout" and row["hangup_by"] == "system", row
        assert row["disposition"] == "answered"
    finally:
        await pbx.close()


async def ringing_call(pbx: Pbx, *, leads: bool = False) -> tuple[UA, UA, str, Request]:
    """1001 calls 1002 (registered on one phone) with credentials; returns (caller, phone, call_id, the INVITE
    the phone got). `leads`: this node is told it leads first, so the leader's timeout job runs."""
    pbx.create("1001")
    pbx.create("1002")
    caller, phone = await pbx.ua(), await pbx.ua()
    pbx.bind("1002", phone)
    if leads:
        for callback in pbx.replicator.callbacks:
            callback(True, "n1")
    call_id = uuid.uuid4().hex
    await authenticated_invite(pbx, caller, "1002", call_id)
    return caller, phone, call_id, await phone.request("INVITE")


async def _answered_call(pbx: Pbx) -> tuple[UA, UA, str, Response]:
    caller, phone, call_id, invite = await ringing_call(pbx)
    phone.answer(invite, 200, tag="p", headers=["Session-Expires: 1800;refresher=uac"])
    ok = await caller.response(200, cseq=2)
    return caller, phone, call_id, ok


def in_dialog(method: str, sender: UA, target: str, route: list[str], from_: str, to: str, call_id: str,
              cseq: int, extra: list[str] | None = None) -> str:
    return "\r\n".join([
        f"{method} {target} SIP/2.0",
        f"Via: SIP/2.0/UDP {sender.ip}:{sender.port};branch=z9hG4bK{secrets.token_hex(8)};rport",
        "Max-Forwards: 70", *[f"Route: {r}" for r in route], f"From: {from_}", f"To: {to}",
        f"Call-ID: {call_id}", f"CSeq: {cseq} {method}", *(extra or []), "Content-Length: 0", "", "",
    ])


async def test_session_refresh_rfc4028_and_bye_from_the_callee(pbx: Pbx) -> None:
    caller, phone, call_id, ok = await _answered_call(pbx)
    row = pbx.call(call_id)
    with pbx.machine.lock:
        first_expiry = pbx.machine.state.calls[call_id].session_expires_at
    assert row is not None and first_expiry is not None and 1790 < first_expiry - row["answered_at"] <= 1800
    route = ok.headers.values("Record-Route")
    caller_side = (f"<sip:1001@{DOMAIN}>;tag=caller-{call_id[:6]}", f"<sip:1002@{DOMAIN}>;tag=p")
    # A re-INVITE (session refresh) from the caller: relayed, its 2xx with Session-Expires refreshes the call.
    caller.send(in_dialog("INVITE", caller, phone.contact, route, *caller_side, call_id, 3,
                          ["Session-Expires: 600;refresher=uac"]), pbx.address)
    reinvite = await phone.request("INVITE", since=1)
    phone.answer(reinvite, 200, tag="p", headers=["Session-Expires: 600;refresher=uac"])
    await caller.response(200, cseq=3)

    def refreshed() -> bool:
        with pbx.machine.lock:
            expiry = pbx.machine.state.calls[call_id].session_expires_at
        return expiry is not None and expiry < first_expiry - 1000

    deadline = asyncio.get_running_loop().time() + 3.0
    while not refreshed():
        assert asyncio.get_running_loop().time() < deadline, "CallRefreshed not applied"
        await asyncio.sleep(0.01)
    # The callee hangs up: its BYE follows the route set (reversed: the same single entry) to the caller.
    phone.send(in_dialog("BYE", phone, caller.contact, route, caller_side[1], caller_side[0], call_id, 1),
               pbx.address)
    bye = await caller.request("BYE")
    caller.answer(bye, 200)
    assert (await phone.response(200, method="BYE")).status == 200
    row = pbx.call(call_id)
    assert row is not None and row["cause"] == "bye-callee" and row["hangup_by"] == "callee", row


async def test_in_dialog_request_not_routed_through_us_gets_481(pbx: Pbx) -> None:
    caller, phone = await pbx.ua(), await pbx.ua()
    caller.send(in_dialog("BYE", caller, phone.contact, [], f"<sip:1001@{DOMAIN}>;tag=x", f"<sip:1002@{DOMAIN}>;tag=y",
                          uuid.uuid4().hex, 5), pbx.address)
    assert (await caller.response(method="BYE")).status == 481
    assert not phone.messages  # never an open relay


async def test_udp_caller_tcp_callee_double_record_route_rfc5658(pbx: Pbx) -> None:
    """Inbound UDP, outbound TCP: two Record-Route values, the callee's facing TCP first; the callee's
    BYE over its own connection reaches the caller over UDP once both our Route values are removed."""
    pbx.create("1001")
    pbx.create("1002")
    caller = await pbx.ua()
    ip = caller.ip.rsplit(".", 1)[0] + ".99"
    received: list[Request | Response] = []
    arrived = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        parser = StreamParser()
        while data := await reader.read(65535):
            parser.feed(data)
            while (message := parser.next_message()) is not None:
                if isinstance(message, Request | Response):
                    received.append(message)
                    arrived.set()

    server = await asyncio.start_server(serve, ip, 0)
    port = server.sockets[0].getsockname()[1]
    contact = f"sip:ua@{ip}:{port};transport=tcp"
    with pbx.machine.lock:
        decision = decide_register(
            pbx.machine.state, aor="1002", contacts=[ContactSpec(contact, contact)], star=False,
            expires_header=600, call_id=uuid.uuid4().hex, cseq=1, received=f"{ip}:{port}", transport="tcp",
            node_id="n1", now=pbx.node.now(), min_expires=1, max_expires=3600, default_expires=600, max_contacts=10)
    assert isinstance(decision, RegisterAccepted)
    pbx.apply(decision.op_id, decision.events)
    try:
        call_id = uuid.uuid4().hex
        await authenticated_invite(pbx, caller, "1002", call_id)
        async with asyncio.timeout(3.0):
            while not any(isinstance(m, Request) and m.method == "INVITE" for m in received):
                arrived.clear()
                await arrived.wait()
        invite = next(m for m in received if isinstance(m, Request) and m.method == "INVITE")
        host, our_port = pbx.address
        assert invite.headers.values("Record-Route") == [
            f"<sip:{host}:{our_port};transport=tcp;lr>", f"<sip:{host}:{our_port};lr>"]
        assert invite.top_via.transport == "TCP"
        lines = ["SIP/2.0 200 OK", *[f"Via: {v}" for v in invite.headers.get_all("Via")],
                 f"From: {invite.headers.get('From')}", f"To: {invite.headers.get('To')};tag=t",
                 f"Call-ID: {call_id}", f"CSeq: {invite.headers.get('CSeq')}",
                 *[f"Record-Route: {v}" for v in invite.headers.values("Record-Route")],
                 f"Contact: <{contact}>", "Content-Length: 0", "", ""]
        writers[0].write("\r\n".join(lines).encode())
        ok = await caller.response(200, cseq=2)
        assert ok.to_tag == "t"
        # The callee's BYE uses the route set in order: our TCP-facing value, then our UDP-facing one.
        bye = in_dialog("BYE", caller, caller.contact, invite.headers.values("Record-Route"),
                        f"<sip:1002@{DOMAIN}>;tag=t", f"<sip:1001@{DOMAIN}>;tag=caller-{call_id[:6]}", call_id, 1)
        bye = bye.replace(f"SIP/2.0/UDP {caller.ip}:{caller.port}", f"SIP/2.0/TCP {ip}:{port}")
        writers[0].write(bye.encode())
        forwarded = await caller.request("BYE")
        assert "Route" not in forwarded.headers and forwarded.top_via.transport == "UDP"
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_unsupported_scheme_416_and_proxy_require_420_rfc3261_16_3(pbx: Pbx) -> None:
    caller = await pbx.ua()
    text = invite_text(pbx, caller, "1002", call_id=uuid.uuid4().hex)
    host, port = pbx.address
    caller.send(text.replace(f"INVITE sip:1002@{host}:{port}", "INVITE tel:+15551234", 1), pbx.address)
    assert (await caller.response()).status == 416
    mark = len(caller.messages)
    caller.send(invite_text(pbx, caller, "1002", call_id=uuid.uuid4().hex, extra=["Proxy-Require: foo, bar"]),
                pbx.address)
    refused = await caller.response(since=mark)
    assert refused.status == 420 and refused.headers.get("Unsupported") == "foo, bar"


async def test_a_bye_on_a_node_behind_the_read_barrier_still_ends_the_record(pbx: Pbx) -> None:
    """Right after a whole-cluster restart a node's state can lack a call that was answered before it: its
    BYE used to be relayed without ending the record (found by the chaos suite). The node now waits for
    the read barrier, finds the call and records the end before relaying the 200."""
    caller, phone, call_id, ok = await _answered_call(pbx)
    route = ok.headers.values("Record-Route")
    machine = pbx.machine
    behind = {"caught_up": False}
    with machine.lock:  # the state before the new leader's first commit: the call is not in it yet
        hidden = machine.state.calls.pop(call_id)

    async def wait_caught_up(timeout: float) -> bool:  # noqa: ASYNC109 (the Replicator contract)
        with machine.lock:
            machine.state.calls[call_id] = hidden
        behind["caught_up"] = True
        return True

    pbx.replicator.status = lambda: SimpleNamespace(role="follower", leader="n2", caught_up=behind["caught_up"])  # type: ignore[method-assign]
    pbx.replicator.wait_caught_up = wait_caught_up  # type: ignore[attr-defined]
    caller.send(in_dialog("BYE", caller, phone.contact, route, f"<sip:1001@{DOMAIN}>;tag=caller-{call_id[:6]}",
                          f"<sip:1002@{DOMAIN}>;tag=p", call_id, 3), pbx.address)
    bye = await phone.request("BYE")
    phone.answer(bye, 200, tag="p")
    assert (await caller.response(200, method="BYE")).status == 200
    row = pbx.call(call_id)
    assert row is not None and row["cause"] == "bye-caller" and row["ended_at"] is not None, row


async def test_a_binding_committed_elsewhere_but_not_yet_applied_here_is_waited_for_not_480(
    pbx: Pbx, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The negative lookup's read barrier: the callee registered through another node (its 200 went out
    after the commit) and this node has not applied that entry yet; the INVITE must reach the phone."""
    pbx.create("1001")
    pbx.create("1002")
    caller, phone = await pbx.ua(), await pbx.ua()
    committed = pbx.replicator.index + 1  # the callee's REGISTER: committed by the cluster, not applied here
    waits: list[int] = []

    async def read_barrier(timeout: float) -> bool:  # noqa: ASYNC109
        pbx.bind("1002", phone)  # the barrier's wait: this node's Raft thread applies the entry
        waits.append(pbx.replicator.index)
        return True

    monkeypatch.setattr(pbx.replicator, "read_barrier", read_barrier, raising=False)
    call_id = uuid.uuid4().hex
    await authenticated_invite(pbx, caller, "1002", call_id)
    invite = await phone.request("INVITE")
    assert invite.call_id == call_id and waits == [committed]
    assert all(not (isinstance(m, Response) and m.status == 480) for m in caller.messages)
