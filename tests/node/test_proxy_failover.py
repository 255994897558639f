"""The proxy across a failover (Contract C of issue 5), in one process: two real `SipNode`s on loopback UDP
take turns holding a service address (an endpoint listener, as raftpbx/service_address.py binds it), raw
SIP user agents on sockets play the phones.

Replication between the two nodes is simulated: every log entry applied on the first node's state machine is
recorded and replayed, in order, on the second one's before it takes over ("the new leader has the log").
What is checked, each rule next to its RFC 3261 section:
- Record-Route names the service address whether or not this node holds it (no probing); mode none: ours.
- A request that arrived on the service address is forwarded with the service address as Via sent-by and
  leaves from it; one that arrived on the node's own address keeps the node's Via (§16.6 step 8).
- A retransmitted INVITE at the new leader: CallStarted is a Duplicate, the fork reuses the same branch and
  sent-by, so the callee sees a retransmission (§17.2.3), and its answer completes the call.
- Stray responses (no client transaction, §16.7): a 2xx commits CallAnswered before it is forwarded; a final
  non-2xx is ACKed hop by hop with the response's branch (§17.1.1.3) and commits CallEnded(failure, code)
  before it is forwarded; once the call is answered, a re-INVITE's failure is forwarded and another fork's
  is not.
Every wait is bounded by a deadline.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from raftpbx.state import ha1_md5
from raftpbx.transport.sip.digest import challenges_for, make_authorization
from raftpbx.transport.sip.message import Request, Response
from test_proxy import _NET, DOMAIN, PASSWORD, UA, Pbx, _ip_counter

from raftpbx.calls import CallSettings
from raftpbx.config import HostPort
from raftpbx.proxy import service_mode

SETTINGS = CallSettings(timer_c=5.0, max_duration=3600.0, ring_timeout=600.0, interval=0.05)


class Pair:
    """Two nodes sharing one service address; entries applied on `first` are replayed on `second`."""

    def __init__(self, tmp: Path, settings: CallSettings = SETTINGS) -> None:
        self.service = (f"{_NET}.{next(_ip_counter)}.9", 5060)
        service = f"{self.service[0]}:{self.service[1]}"
        (tmp / "a").mkdir()
        (tmp / "b").mkdir()
        self.first = Pbx(tmp / "a", settings, service=service)
        self.second = Pbx(tmp / "b", settings, service=service)
        self.log: list[tuple[bytes, int]] = []
        self.dead = False
        machine = self.first.machine
        apply = machine.apply

        def recording(entry: bytes, index: int) -> Any:
            self.log.append((entry, index))
            return apply(entry, index)

        machine.apply = recording  # type: ignore[method-assign]

    async def start(self) -> None:
        await self.first.start()
        await self.second.start()
        await self.first.node.endpoint.add_listener(*self.service)

    async def fail_over(self) -> None:
        """The first node dies (its sockets close); the second applies its log and takes the address."""
        await self.first.proxy.aclose()
        await self.first.node.aclose()
        self.dead = True
        for entry, index in self.log:
            self.second.machine.apply(entry, index)
        self.second.replicator.index = max(i for _, i in self.log)
        await self.second.node.endpoint.add_listener(*self.service)

    async def hand_over(self) -> None:
        """A planned move: the first node stays up but releases the address; the second applies the log
        and takes it. Entries the second commits from now on are replayed on the first by `sync_back`."""
        await self.first.node.endpoint.remove_listener(*self.service)
        for entry, index in self.log:
            self.second.machine.apply(entry, index)
        self.second.replicator.index = max(i for _, i in self.log)
        self._handed_at = len(self.second.replicator.proposals)
        await self.second.node.endpoint.add_listener(*self.service)

    def sync_back(self) -> None:
        for entry in self.second.replicator.proposals[self._handed_at:]:
            self.first.replicator.index += 1
            self.first.machine.apply(entry, self.first.replicator.index)
        self._handed_at = len(self.second.replicator.proposals)

    async def close(self) -> None:
        await self.second.close()
        if self.dead:
            for ua in self.first.clients:
                ua.close()
        else:
            await self.first.close()


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    p = Pair(tmp_path)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


def invite_to(address: tuple[str, int], caller: UA, callee: str, *, call_id: str, cseq: int, branch: str,
              authorization: str | None = None) -> str:
    host, port = address
    lines = [
        f"INVITE sip:{callee}@{host}:{port} SIP/2.0",
        f"Via: SIP/2.0/UDP {caller.ip}:{caller.port};branch={branch};rport",
        "Max-Forwards: 70",
        f"From: <sip:1001@{DOMAIN}>;tag=caller-{call_id[:6]}",
        f"To: <sip:{callee}@{DOMAIN}>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} INVITE",
        f"Contact: <{caller.contact}>",
    ]
    if authorization:
        lines.append(f"Proxy-Authorization: {authorization}")
    lines.append("Content-Length: 0")
    return "\r\n".join(lines) + "\r\n\r\n"


async def invite_through(address: tuple[str, int], caller: UA, callee: str, call_id: str) -> str:
    """INVITE to `address`, answer the 407 challenge, send the authenticated INVITE; returns its text (a
    retransmission is the same text sent again)."""
    mark = len(caller.messages)
    caller.send(invite_to(address, caller, callee, call_id=call_id, cseq=1, branch="z9hG4bK" + secrets.token_hex(8)),
                address)
    challenge = await caller.response(407, since=mark)
    host, port = address
    caller.send("\r\n".join([
        f"ACK sip:{callee}@{host}:{port} SIP/2.0", f"Via: {challenge.headers.get('Via')}", "Max-Forwards: 70",
        f"From: {challenge.headers.get('From')}", f"To: {challenge.headers.get('To')}",
        f"Call-ID: {call_id}", "CSeq: 1 ACK", "Content-Length: 0", "", "",
    ]), address)
    chosen = challenges_for(challenge.headers.values("Proxy-Authenticate"))[0]
    authorization = make_authorization(username="1001", ha1=ha1_md5("1001", DOMAIN, PASSWORD), challenge=chosen,
                                       method="INVITE", uri=f"sip:{callee}@{host}:{port}", cnonce="c0ffee")
    text = invite_to(address, caller, callee, call_id=call_id, cseq=2, branch="z9hG4bK" + secrets.token_hex(8),
                     authorization=authorization)
    caller.send(text, address)
    return text


async def ringing_call(pair: Pair) -> tuple[UA, UA, str, str, Request]:
    """1001 calls 1002 through the service address held by the first node; 1002 rings (180 relayed)."""
    first = pair.first
    first.create("1001")
    first.create("1002")
    caller, phone = await first.ua(), await first.ua()
    first.bind("1002", phone)
    call_id = uuid.uuid4().hex
    text = await invite_through(pair.service, caller, "1002", call_id)
    invite = await phone.request("INVITE")
    phone.answer(invite, 180, tag="callee")
    await caller.response(180, final=False)
    return caller, phone, call_id, text, invite


def via_sent_by(message: Request | Response) -> tuple[str, int | None]:
    via = message.top_via
    return via.host, via.port


# -- pure pieces ------------------------------------------------------------------------------------------


def test_service_mode_follows_the_config_and_defaults_by_address() -> None:
    def cfg(address: str | None, **extra: Any) -> Any:
        host, _, port = (address or ":").rpartition(":")
        return SimpleNamespace(service_address=HostPort(host, int(port)) if address else None, **extra)

    assert service_mode(cfg(None)) == "none"
    assert service_mode(cfg("127.0.0.10:5060")) == "loopback"
    assert service_mode(cfg("192.0.2.10:5060")) == "ip"
    assert service_mode(cfg("192.0.2.10:5060", service_mode="none")) == "none"
    assert service_mode(cfg("127.0.0.10:5060", service=SimpleNamespace(mode="ip"))) == "ip"
    assert service_mode(cfg(None, service_mode="loopback")) == "none"  # no address: nothing to serve


async def test_record_route_names_the_service_address_held_or_not_and_ours_in_mode_none(tmp_path: Path) -> None:
    service = (f"{_NET}.{next(_ip_counter)}.9", 5060)
    pbx = Pbx(tmp_path, SETTINGS, service=f"{service[0]}:{service[1]}")
    bare = Pbx(tmp_path / "bare", SETTINGS)
    await pbx.start()
    await bare.start()
    try:
        assert pbx.proxy.record_route_address() == service  # nobody holds it yet: named all the same
        await pbx.node.endpoint.add_listener(*service)
        assert pbx.proxy.record_route_address() == service
        await pbx.node.endpoint.remove_listener(*service)
        assert pbx.proxy.record_route_address() == service  # another node holds it now
        assert bare.proxy.record_route_address() == bare.address  # mode none: this node's address
        pbx.proxy.service = None  # what mode none means for a configured address
        assert pbx.proxy.record_route_address() == pbx.address
    finally:
        await bare.close()
        await pbx.close()


# -- sent-by ----------------------------------------------------------------------------------------------


async def test_request_on_the_service_address_is_forwarded_with_its_via_and_from_it(pair: Pair) -> None:
    caller, phone, call_id, _, invite = await ringing_call(pair)
    assert via_sent_by(invite) == pair.service  # §16.6 step 8 with the service address as sent-by
    assert invite.headers.values("Record-Route") == [f"<sip:{pair.service[0]}:{pair.service[1]};lr>"]
    assert phone.sources[-1] == pair.service  # left from the service listener (Contract A)

    # The same node, addressed on its own address: its own Via.
    other = await pair.first.ua()
    call2 = uuid.uuid4().hex
    await invite_through(pair.first.address, other, "1002", call2)
    second = await phone.expect(lambda m: isinstance(m, Request) and m.call_id == call2)
    assert isinstance(second, Request)
    assert via_sent_by(second) == pair.first.address
    assert second.headers.values("Record-Route") == [f"<sip:{pair.service[0]}:{pair.service[1]};lr>"]
    del caller, call_id


# -- across a failover ------------------------------------------------------------------------------------


async def test_retransmitted_invite_at_the_new_leader_continues_the_same_downstream_transaction(pair: Pair) -> None:
    caller, phone, call_id, text, invite = await ringing_call(pair)
    await pair.fail_over()
    second = pair.second
    started = len(second.replicator.proposals)
    mark = len(phone.messages)
    caller.send(text, pair.service)  # the caller's INVITE retransmission (timer A) reaches the new leader
    again = await phone.request("INVITE", since=mark)
    assert again.branch == invite.branch  # the same downstream transaction: same branch...
    assert via_sent_by(again) == via_sent_by(invite) == pair.service  # ...and the same sent-by (§17.2.3)
    assert again.headers.get_all("Via")[0] == invite.headers.get_all("Via")[0]
    assert len(second.replicator.proposals) > started  # CallStarted proposed again and came back Duplicate
    row = second.call(call_id)
    assert row is not None and row["answered_at"] is None and row["ended_at"] is None

    phone.answer(again, 200, tag="callee")  # now through the new leader's client transaction
    ok = await caller.response(200, cseq=2)
    row = second.call(call_id)
    assert row is not None and row["answered_at"] is not None  # committed before the 2xx went upstream
    assert ok.to_tag == "callee"


async def test_stray_2xx_after_failover_commits_the_answer_before_forwarding_then_ack_follows(pair: Pair) -> None:
    caller, phone, call_id, _, invite = await ringing_call(pair)
    await pair.fail_over()
    second = pair.second
    row = second.call(call_id)
    assert row is not None and row["answered_at"] is None

    phone.answer(invite, 200, tag="callee")  # to the service address: the new leader has no transaction
    ok = await caller.response(200, cseq=2)
    row = second.call(call_id)
    assert row is not None and row["answered_at"] is not None and row["to_tag"] == "callee"
    assert len(ok.vias) == 1  # our Via stripped
    assert second.proxy.stray_forwarded >= 1

    # The caller's ACK (route set: the service address) reaches the callee through the new leader.
    route = ok.headers.values("Record-Route")
    caller.send("\r\n".join([
        f"ACK {phone.contact} SIP/2.0",
        f"Via: SIP/2.0/UDP {caller.ip}:{caller.port};branch=z9hG4bK{secrets.token_hex(8)};rport",
        "Max-Forwards: 70", *[f"Route: {r}" for r in route], f"From: {ok.headers.get('From')}",
        f"To: {ok.headers.get('To')}", f"Call-ID: {call_id}", "CSeq: 2 ACK", "Content-Length: 0", "", "",
    ]), pair.service)
    ack = await phone.request("ACK")
    assert via_sent_by(ack) == pair.service


async def test_stray_final_failure_is_acked_with_its_branch_and_recorded_before_forwarding(pair: Pair) -> None:
    caller, phone, call_id, _, invite = await ringing_call(pair)
    await pair.fail_over()
    second = pair.second
    mark = len(phone.messages)

    phone.answer(invite, 486, tag="callee")
    busy = await caller.response(486, cseq=2)
    row = second.call(call_id)
    assert row is not None and row["ended_at"] is not None  # committed before the 486 went upstream
    assert row["disposition"] != "answered" and row["cause"] == "failure" and row["status_code"] == 486, row
    ack = await phone.request("ACK", since=mark)  # §17.1.1.3: hop by hop, the response's branch
    assert ack.branch == invite.branch and via_sent_by(ack) == pair.service
    assert ack.to_tag == "callee" and ack.cseq.seq == 2 and ack.uri == phone.contact
    assert busy.to_tag == "callee"

    # A retransmission of the 486 (our ACK lost) is ACKed again; the record is not touched.
    mark = len(phone.messages)
    phone.answer(invite, 486, tag="callee")
    again = await phone.request("ACK", since=mark)
    assert again.branch == invite.branch
    assert second.call(call_id) == row


async def test_stray_failures_for_an_answered_call_reinvite_forwarded_other_fork_dropped(pair: Pair) -> None:
    caller, phone, call_id, _, invite = await ringing_call(pair)
    phone.answer(invite, 200, tag="callee")
    ok = await caller.response(200, cseq=2)
    route = [f"Route: {r}" for r in ok.headers.values("Record-Route")]
    caller.send("\r\n".join([
        f"INVITE {phone.contact} SIP/2.0",
        f"Via: SIP/2.0/UDP {caller.ip}:{caller.port};branch=z9hG4bK{secrets.token_hex(8)};rport",
        "Max-Forwards: 70", *route, f"From: {ok.headers.get('From')}", f"To: {ok.headers.get('To')}",
        f"Call-ID: {call_id}", "CSeq: 3 INVITE", f"Contact: <{caller.contact}>", "Content-Length: 0", "", "",
    ]), pair.service)
    reinvite = await phone.expect(lambda m: isinstance(m, Request) and m.method == "INVITE" and m.cseq.seq == 3)
    assert isinstance(reinvite, Request) and via_sent_by(reinvite) == pair.service
    await pair.fail_over()

    mark = len(phone.messages)
    phone.answer(reinvite, 491)  # the re-INVITE's failure reaches the next leader: forwarded (and ACKed)
    glare = await caller.response(491, cseq=3)
    assert glare.to_tag == "callee"
    ack = await phone.request("ACK", since=mark)
    assert ack.branch == reinvite.branch and ack.cseq.seq == 3

    mark = len(phone.messages)
    phone.answer(invite, 486, tag="other-fork")  # a late failure of another fork: ACKed, not forwarded
    await phone.request("ACK", since=mark)
    host, port = pair.service
    caller.send("\r\n".join([  # a round trip after it: a forwarded 486 would have reached the caller first
        f"OPTIONS sip:{host}:{port} SIP/2.0",
        f"Via: SIP/2.0/UDP {caller.ip}:{caller.port};branch=z9hG4bK{secrets.token_hex(8)};rport",
        "Max-Forwards: 70", f"From: <sip:1001@{DOMAIN}>;tag=o", f"To: <sip:{host}>", "Call-ID: probe-1",
        "CSeq: 1 OPTIONS", "Content-Length: 0", "", "",
    ]), pair.service)
    await caller.response(200, method="OPTIONS")
    assert not [m for m in caller.messages if isinstance(m, Response) and m.status == 486]
    row = pair.second.call(call_id)
    assert row is not None and row["answered_at"] is not None and row["ended_at"] is None


async def test_leadership_moved_while_ringing_old_node_timer_c_neither_cancels_nor_ends_the_answered_call(
    tmp_path: Path,
) -> None:
    pair = Pair(tmp_path, CallSettings(timer_c=1.0, max_duration=3600.0, ring_timeout=600.0, interval=0.05))
    await pair.start()
    try:
        caller, phone, call_id, _, invite = await ringing_call(pair)
        await pair.hand_over()  # the first node lives on, its INVITE context and branch too
        phone.answer(invite, 200, tag="callee")  # follows the address: the second commits, then forwards
        await caller.response(200, cseq=2)
        pair.sync_back()  # the first applies the answer like any follower
        mark = len(phone.messages)
        # Timer C (1 s) fires on the first node: it closes its server transaction (a 408 that the caller,
        # holding its 2xx, absorbs), sends no CANCEL and records nothing.
        await caller.response(408, cseq=2, within=5.0)
        assert not [m for m in phone.messages[mark:] if isinstance(m, Request) and m.method == "CANCEL"]
        assert all(b.tx is None or b.tx.terminated for c in pair.first.proxy._contexts.values()
                   for b in getattr(c, "branches", []))
        row = pair.first.call(call_id)
        assert row is not None and row["answered_at"] is not None and row["ended_at"] is None, row
    finally:
        await pair.close()


async def test_no_100_trying_before_the_fork_so_a_leader_dying_in_between_leaves_a_retransmission(pair: Pair) -> None:
    first = pair.first
    first.create("1001")
    first.create("1002")
    caller, phone = await first.ua(), await first.ua()
    first.bind("1002", phone)
    stuck = asyncio.Event()

    async def never(payload: bytes, timeout: float) -> object:  # noqa: ASYNC109
        stuck.set()
        await asyncio.Event().wait()  # the commit never comes back: the node dies first
        raise AssertionError("unreachable")

    first.replicator.propose = never  # type: ignore[method-assign]
    call_id = uuid.uuid4().hex
    text = await invite_through(pair.service, caller, "1002", call_id)
    await asyncio.wait_for(stuck.wait(), 3.0)  # CallStarted proposed: the INVITE is in the commit
    host, port = pair.service
    caller.send("\r\n".join([  # a round trip: a 100 sent before the commit would have arrived by now
        f"OPTIONS sip:{host}:{port} SIP/2.0",
        f"Via: SIP/2.0/UDP {caller.ip}:{caller.port};branch=z9hG4bK{secrets.token_hex(8)};rport",
        "Max-Forwards: 70", f"From: <sip:1001@{DOMAIN}>;tag=o", f"To: <sip:{host}>", "Call-ID: probe-2",
        "CSeq: 1 OPTIONS", "Content-Length: 0", "", "",
    ]), pair.service)
    await caller.response(200, method="OPTIONS")
    assert not [m for m in caller.messages if isinstance(m, Response) and m.cseq.seq == 2], \
        "100 Trying before the fork: the caller would stop retransmitting"

    first_invite = await phone.request("INVITE")  # forked while CallStarted was committing
    await pair.fail_over()
    seen, heard = len(phone.messages), len(caller.messages)
    caller.send(text, pair.service)  # the caller's retransmission (timer A) reaches the next leader
    invite = await phone.request("INVITE", since=seen)  # the same downstream transaction, from the next leader
    assert via_sent_by(invite) == pair.service and invite.branch == first_invite.branch
    await caller.response(100, final=False, cseq=2, since=heard)  # once the next leader committed the call
    row = pair.second.call(call_id)
    assert row is not None and row["ended_at"] is None
