"""The proxy forks a new call while its CallStarted commits (raftpbx/proxy.py `_fork_while_starting`).

In one process, over loopback UDP, with the shared one-node `LocalReplicator` holding the commit back
(`hold()`/`release()`) or failing it (`fail_next`): the callee's INVITE leaves during the commit; the
caller's provisional responses and the 2xx wait for it (DESIGN decision 3: every call event is committed
before the answer that depends on it; the 2xx also waits for CallAnswered, proposed after CallStarted);
a failed commit CANCELs the fork (RFC 3261 §9.1), answers 503 upstream and records nothing; a
retransmitted INVITE never forks twice (§17.2.1); a stray 2xx for a call with no record is not forwarded.
Every wait is bounded by a deadline.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from raftpbx.state import CallAnswered, CallRinging, CallStarted, decode_batch
from raftpbx.transport.sip.message import Response
from test_proxy import DOMAIN, UA, Pbx
from test_proxy_failover import invite_through

from raftpbx.calls import CallSettings
from raftpbx.replication import NoQuorum

SETTINGS = CallSettings(timer_c=5.0, max_duration=3600.0, ring_timeout=600.0, interval=0.05)


@pytest.fixture
async def pbx(tmp_path: Path) -> AsyncIterator[Pbx]:
    p = Pbx(tmp_path, SETTINGS)
    await p.start()
    try:
        yield p
    finally:
        p.replicator.release()
        await asyncio.wait_for(p.close(), 15)  # bounded: a close that hangs fails the test


async def until(condition: Callable[[], bool], within: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def probe(pbx: Pbx, ua: UA) -> None:
    """An OPTIONS round trip from `ua`: everything `ua` sent before it has been handled by the node."""
    host, port = pbx.address
    mark = len(ua.messages)
    ua.send("\r\n".join([
        f"OPTIONS sip:{host}:{port} SIP/2.0",
        f"Via: SIP/2.0/UDP {ua.ip}:{ua.port};branch=z9hG4bK{secrets.token_hex(8)};rport",
        "Max-Forwards: 70", f"From: <sip:probe@{DOMAIN}>;tag=p", f"To: <sip:{host}>",
        f"Call-ID: probe-{secrets.token_hex(4)}", "CSeq: 1 OPTIONS", "Content-Length: 0", "", "",
    ]), pbx.address)
    await ua.response(200, method="OPTIONS", since=mark)


def invite_responses(ua: UA, call_id: str) -> list[int]:
    return [m.status for m in ua.messages
            if isinstance(m, Response) and m.call_id == call_id and m.cseq.method == "INVITE" and m.cseq.seq == 2]


def entries(pbx: Pbx) -> list[list[type]]:
    return [[type(c.event) for c in decode_batch(p)] for p in pbx.replicator.proposals]


async def test_callee_rings_during_the_callstarted_commit_and_the_caller_hears_only_after_it(pbx: Pbx) -> None:
    pbx.create("1001")
    pbx.create("1002")
    caller, phone = await pbx.ua(), await pbx.ua()
    pbx.bind("1002", phone)
    pbx.replicator.hold()
    call_id = uuid.uuid4().hex
    await invite_through(pbx.address, caller, "1002", call_id)
    invite = await phone.request("INVITE")  # forked while CallStarted is in flight
    assert pbx.replicator.held == 1 and pbx.call(call_id) is None

    phone.answer(invite, 180, tag="callee")
    phone.answer(invite, 200, tag="callee")
    await probe(pbx, phone)
    await probe(pbx, caller)
    heard = invite_responses(caller, call_id)
    assert 180 not in heard and 200 not in heard, heard  # nothing that depends on the commit went up
    before = len(heard)  # at most the transaction layer's own 100 after 200 ms (§17.2.1)

    pbx.replicator.release()
    ok = await caller.response(200, cseq=2)
    assert ok.to_tag == "callee"
    heard = invite_responses(caller, call_id)
    assert heard.index(180) < heard.index(200), heard  # the held 180 first, in order
    # The held 180 went up in place of the proxy's 100 Trying (it stops the INVITE retransmissions as well).
    assert heard[before:] == [180, 200], heard
    row = pbx.call(call_id)
    assert row is not None and row["answered_at"] is not None and row["ringing_at"] is not None
    # Two entries on the setup path: CallStarted, then CallRinging + CallAnswered proposed after it.
    assert entries(pbx) == [[CallStarted], [CallRinging, CallAnswered]]


async def test_a_failed_callstarted_commit_cancels_the_fork_503_upstream_and_records_nothing(pbx: Pbx) -> None:
    pbx.create("1001")
    pbx.create("1002")
    caller, ringing, silent = await pbx.ua(), await pbx.ua(), await pbx.ua()
    pbx.bind("1002", ringing)
    pbx.bind("1002", silent)
    pbx.replicator.hold()
    pbx.replicator.fail_next(NoQuorum("no quorum in time", submitted=False))
    call_id = uuid.uuid4().hex
    await invite_through(pbx.address, caller, "1002", call_id)
    inv_r, inv_s = await ringing.request("INVITE"), await silent.request("INVITE")
    ringing.answer(inv_r, 180, tag="r")
    await probe(pbx, ringing)

    pbx.replicator.release()  # the commit fails
    final = await caller.response(cseq=2)
    assert final.status == 503 and final.headers.get("Retry-After") == "2"
    assert 180 not in invite_responses(caller, call_id)
    cancel = await ringing.request("CANCEL")  # §9.1: the branch that rang is CANCELled at once
    assert cancel.branch == inv_r.branch
    ringing.answer(cancel, 200, tag="r")
    ringing.answer(inv_r, 487, tag="r")
    await ringing.request("ACK")
    # The silent branch is CANCELled only once it sends a provisional response (§9.1); its 2xx (a race
    # with that CANCEL) is never forwarded: the call has no record.
    silent.answer(inv_s, 180, tag="s")
    cancel_s = await silent.request("CANCEL")
    assert cancel_s.branch == inv_s.branch
    silent.answer(inv_s, 200, tag="s")
    await probe(pbx, silent)
    await probe(pbx, caller)
    assert invite_responses(caller, call_id) == [503]
    await until(lambda: pbx.replicator.held == 0 and not pbx.proxy.recorder._tasks)
    assert pbx.call(call_id) is None  # neither started nor ended: no record, and none half-made
    assert not pbx.machine.state.calls and not pbx.machine.state.finished_calls


async def test_a_retransmitted_invite_during_the_commit_never_forks_twice(pbx: Pbx) -> None:
    pbx.create("1001")
    pbx.create("1002")
    caller, phone = await pbx.ua(), await pbx.ua()
    pbx.bind("1002", phone)
    pbx.replicator.hold()
    call_id = uuid.uuid4().hex
    text = await invite_through(pbx.address, caller, "1002", call_id)
    invite = await phone.request("INVITE")
    for _ in range(3):  # the caller's timer A retransmissions, while CallStarted is in flight
        caller.send(text, pbx.address)
    await probe(pbx, caller)
    assert pbx.proxy.forwarded == 1 and pbx.replicator.held == 1

    pbx.replicator.release()
    await caller.response(100, final=False, cseq=2)
    caller.send(text, pbx.address)  # and after it
    await probe(pbx, caller)
    assert pbx.proxy.forwarded == 1
    assert {m.branch for m in phone.messages if getattr(m, "method", None) == "INVITE"} == {invite.branch}
    assert entries(pbx) == [[CallStarted]]  # one CallStarted, proposed once
    phone.answer(invite, 200, tag="callee")
    await caller.response(200, cseq=2)
    assert entries(pbx) == [[CallStarted], [CallAnswered]]


async def test_a_stray_2xx_for_a_call_with_no_record_is_not_forwarded(pbx: Pbx) -> None:
    """What a node that forked and died before its CallStarted commit leaves behind at the next one."""
    caller, phone = await pbx.ua(), await pbx.ua()
    host, port = pbx.address
    call_id = uuid.uuid4().hex
    phone.send("\r\n".join([
        "SIP/2.0 200 OK",
        f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK{secrets.token_hex(8)};rport",
        f"Via: SIP/2.0/UDP {caller.ip}:{caller.port};branch=z9hG4bK{secrets.token_hex(8)};rport",
        f"From: <sip:1001@{DOMAIN}>;tag=caller", f"To: <sip:1002@{DOMAIN}>;tag=callee",
        f"Call-ID: {call_id}", "CSeq: 2 INVITE", f"Contact: <{phone.contact}>", "Content-Length: 0", "", "",
    ]), pbx.address)
    await probe(pbx, phone)
    await probe(pbx, caller)
    assert not [m for m in caller.messages if isinstance(m, Response) and m.call_id == call_id]


async def test_the_byes_200_goes_up_only_after_callended_commits(pbx: Pbx) -> None:
    """The BYE's CallEnded continues in a callback (no task): its 200 still waits for the commit."""
    pbx.create("1001")
    pbx.create("1002")
    caller, phone = await pbx.ua(), await pbx.ua()
    pbx.bind("1002", phone)
    call_id = uuid.uuid4().hex
    await invite_through(pbx.address, caller, "1002", call_id)
    invite = await phone.request("INVITE")
    phone.answer(invite, 200, tag="callee")
    ok = await caller.response(200, cseq=2)
    route = [f"Route: {r}" for r in ok.headers.values("Record-Route")]
    pbx.replicator.hold()
    caller.send("\r\n".join([
        f"BYE {phone.contact} SIP/2.0",
        f"Via: SIP/2.0/UDP {caller.ip}:{caller.port};branch=z9hG4bK{secrets.token_hex(8)};rport",
        "Max-Forwards: 70", *route, f"From: <sip:1001@{DOMAIN}>;tag=caller-{call_id[:6]}",
        f"To: <sip:1002@{DOMAIN}>;tag=callee", f"Call-ID: {call_id}", "CSeq: 3 BYE", "Content-Length: 0", "", "",
    ]), pbx.address)
    bye = await phone.request("BYE")  # relayed while CallEnded is in flight
    phone.answer(bye, 200, tag="callee")
    await probe(pbx, phone)
    await probe(pbx, caller)
    assert pbx.replicator.held == 1
    assert not [m for m in caller.messages if isinstance(m, Response) and m.cseq.method == "BYE"]
    row = pbx.call(call_id)
    assert row is not None and row["ended_at"] is None
    pbx.replicator.release()
    assert (await caller.response(200, method="BYE")).status == 200
    row = pbx.call(call_id)
    assert row is not None and row["cause"] == "bye-caller" and row["ended_at"] is not None
