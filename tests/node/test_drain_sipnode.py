"""A drained SipNode (raftpbx/sipnode.py): new INVITEs get 503 + Retry-After before the INVITE handler runs;
in-dialog INVITEs, INVITEs of calls already started, CANCEL, REGISTER and OPTIONS go on. The flag follows
the replicated state through apply and restore. Real UDP sockets on 127.0.0.1, the real state machine."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import socket
import types
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from raftpbx.state import CallStarted, Command, NodeDrained, NodeUndrained, State, encode_batch, snapshot
from raftpbx.transport.sip.message import Response, parse_message

from raftpbx.config import HostPort, load_config
from raftpbx.service import StateMachine
from raftpbx.sipnode import DRAIN_RETRY_AFTER, RequestContext, SipNode

pytestmark = pytest.mark.timeout(30)

HOST = "127.0.0.1"


class Replicator:
    role = "follower"

    def status(self) -> Any:
        return types.SimpleNamespace(role=self.role)

    def on_leader_change(self, callback: Any) -> None:
        pass


@dataclasses.dataclass
class Harness:
    node: SipNode
    machine: StateMachine
    handled: list[str]
    sock: socket.socket
    replicator: Replicator

    def apply(self, *events: Any) -> None:
        with self.machine.lock:
            index = self.machine.state.applied_index + 1
        self.machine.apply(encode_batch([Command(uuid.uuid4().hex, e) for e in events]), index)

    async def send(self, method: str, *, to_tag: str = "", call_id: str = "", user: str = "1001") -> Response:
        host, port = self.sock.getsockname()
        target = self.node.endpoint.udp_address
        assert target is not None
        tag = f";tag={to_tag}" if to_tag else ""
        call_id = call_id or secrets.token_hex(8)
        uri = f"sip:{user}@{HOST}:{target[1]}" if user else f"sip:{HOST}:{target[1]}"
        message = (f"{method} {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {host}:{port};branch=z9hG4bK{secrets.token_hex(6)}"
                   f"\r\nMax-Forwards: 70\r\nFrom: <sip:9@{HOST}>;tag=f1\r\nTo: <sip:{user or 'x'}@{HOST}>{tag}\r\n"
                   f"Call-ID: {call_id}\r\nCSeq: 1 {method}\r\nContact: <sip:9@{host}:{port}>\r\n"
                   "Content-Length: 0\r\n\r\n").encode()
        loop = asyncio.get_running_loop()
        await loop.sock_sendto(self.sock, message, target)
        async with asyncio.timeout(5):
            while True:
                reply = parse_message(await loop.sock_recv(self.sock, 65535))
                if isinstance(reply, Response) and reply.status >= 200:
                    return reply


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    cfg = load_config(None, overrides={"node.id": "n1", "node.data_dir": str(tmp_path), "cluster.domain": "d.test",
                                       "cluster.secret": "s" * 32, "admin.token": "t" * 20,
                                       "sip.listen": f"{HOST}:5060", "sip.transports": "udp"})
    cfg = dataclasses.replace(cfg, sip=dataclasses.replace(cfg.sip, listen=HostPort(HOST, 0)))
    machine = StateMachine()
    replicator = Replicator()
    node = SipNode(cfg, machine, replicator)
    handled: list[str] = []

    def answer(ctx: RequestContext) -> None:
        handled.append(ctx.method)
        ctx.reply(486 if ctx.method == "INVITE" else 200)

    for method in ("INVITE", "REGISTER", "BYE"):
        node.register(method, answer)
    await node.start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    sock.setblocking(False)
    try:
        yield Harness(node, machine, handled, sock, replicator)
    finally:
        sock.close()
        await node.aclose()


async def test_new_invites_get_503_with_retry_after_while_drained_and_the_rest_goes_on(harness: Harness) -> None:
    assert (await harness.send("INVITE")).status == 486 and harness.handled == ["INVITE"]
    harness.apply(NodeDrained("n2", 1.0, "x"))  # another node's drain changes nothing here
    assert not harness.node.drained
    harness.apply(NodeDrained("n1", 2.0, "x"))
    assert harness.node.drained
    harness.handled.clear()

    refused = await harness.send("INVITE")
    assert refused.status == 503 and refused.headers.get("Retry-After") == str(DRAIN_RETRY_AFTER)
    assert harness.handled == [] and harness.node.drain_refused == 1  # the handler never ran

    assert (await harness.send("INVITE", to_tag="t1")).status == 486  # re-INVITE (RFC 3261 §12.1: in a dialog)
    harness.apply(CallStarted("known-call", "1001", "1002", "f1", "sip:9@127.0.0.1", "z9hG4bKx", "n3", 3.0))
    assert (await harness.send("INVITE", call_id="known-call")).status == 486  # a call already started
    assert (await harness.send("BYE", to_tag="t1")).status == 200
    assert (await harness.send("REGISTER", user="")).status == 200
    assert (await harness.send("OPTIONS", user="")).status == 200
    assert (await harness.send("CANCEL")).status == 481  # no INVITE to cancel: served, not refused
    assert harness.handled == ["INVITE", "INVITE", "BYE", "REGISTER"]

    harness.apply(NodeUndrained("n1", 4.0))
    assert not harness.node.drained
    assert (await harness.send("INVITE")).status == 486


async def test_the_drain_flag_follows_a_restored_snapshot(harness: Harness) -> None:
    drained = State(drained={"n1": 5.0})
    harness.machine.restore(snapshot(drained))
    assert harness.node.drained
    assert (await harness.send("INVITE")).status == 503
    harness.machine.restore(snapshot(State()))
    assert not harness.node.drained


async def test_a_drained_leader_still_takes_new_calls(harness: Harness) -> None:
    """It hands leadership away at once; one that cannot holds the service address (module doc)."""
    harness.apply(NodeDrained("n1", 1.0, "x"))
    harness.replicator.role = "leader"
    assert (await harness.send("INVITE")).status == 486
    harness.replicator.role = "follower"
    assert (await harness.send("INVITE")).status == 503
