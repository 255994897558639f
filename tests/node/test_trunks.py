"""Trunks on a node (raftpbx/trunks.py): the trunk.* / route.* RPCs over real HTTP with a fake replicator
applying to the real state, `choose_peer`, and the OPTIONS pinger against real SIP responders on loopback
(UDP and TCP; a silent port; a peer answering 503; a peer that stops and comes back)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from raftpbx.state import (
    Applied,
    Command,
    State,
    TrunkCreated,
    TrunkDeleted,
    apply,
    decode_batch,
    encode_batch,
)
from raftpbx.state.trunks import PeerAddress
from raftpbx.transport.endpoint import SipEndpoint
from raftpbx.transport.flow import Flow
from raftpbx.transport.responder import Responder, ResponderConfig
from raftpbx.transport.sip.message import make_response
from raftpbx.transport.sip.transaction import Event as SipEvent
from raftpbx.transport.sip.transaction import RequestReceived

from raftpbx.config import load_config
from raftpbx.rpc import INVALID_PARAMS, NOT_FOUND, REJECTED, RpcServer
from raftpbx.service import AdminService, StateMachine
from raftpbx.trunks import PeerHealth, TrunkPinger, TrunkService, attach, choose_peer

TOKEN = "test-token-0123456789"
NOW = 1_700_000_000.0
PASSWORD = "trunk-Secret-42"
HOST = "127.0.0.1"


@dataclass
class Status:
    role: str
    leader: str | None
    term: int
    commit_index: int
    caught_up: bool = True


class FakeReplicator:
    """Applies each proposal to the real `StateMachine` at once (replication is tested elsewhere)."""

    def __init__(self, machine: StateMachine) -> None:
        self.machine = machine
        self.index = 0
        self.proposals: list[bytes] = []
        self.before_apply: list[bytes] = []  # entries that "win the race" and commit first

    async def propose(self, payload: bytes, timeout: float) -> object:  # noqa: ASYNC109 (the contract)
        self.proposals.append(payload)
        for entry in self.before_apply:
            self.index += 1
            self.machine.apply(entry, self.index)
        self.before_apply.clear()
        self.index += 1
        return self.machine.apply(payload, self.index)

    def status(self) -> Status:
        return Status("leader", "n1", 3, self.index)


@dataclass
class Harness:
    client: TestClient
    replicator: FakeReplicator
    machine: StateMachine
    trunks: TrunkService

    async def call(self, method: str, params: Any) -> dict[str, Any]:
        body = {"jsonrpc": "2.0", "id": 7, "method": method, "params": params}
        response = await self.client.post("/rpc", data=orjson.dumps(body), headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status == 200
        reply: dict[str, Any] = orjson.loads(await response.read())
        return reply

    async def ok(self, method: str, **params: Any) -> Any:
        reply = await self.call(method, params)
        assert "result" in reply, reply
        return reply["result"]

    async def error(self, method: str, **params: Any) -> dict[str, Any]:
        before = len(self.replicator.proposals)
        reply = await self.call(method, params)
        assert "error" in reply, reply
        err: dict[str, Any] = reply["error"]
        if err["code"] == INVALID_PARAMS:
            assert len(self.replicator.proposals) == before, "refused input must not be proposed"
        return err


@pytest.fixture
async def rpc(tmp_path: Path) -> AsyncIterator[Harness]:
    config = load_config(None, env={}, overrides={
        "node.id": "n1", "node.data_dir": str(tmp_path), "cluster.secret": "s" * 32, "admin.token": TOKEN,
        "cluster.domain": "pbx.test"})
    machine = StateMachine()
    replicator = FakeReplicator(machine)
    service = AdminService(config, machine, replicator, clock=lambda: NOW)
    server = RpcServer(TOKEN, metrics=service.metrics)
    service.register(server)
    trunks = attach(config, machine, server, service, interval=0.1)
    client = TestClient(TestServer(server.app()))
    await client.start_server()
    try:
        yield Harness(client, replicator, machine, trunks)
    finally:
        await client.close()
        await trunks.aclose()
        await service.close()


# --- RPCs ---------------------------------------------------------------------------------------------------


async def test_trunk_add_commits_before_the_reply_and_never_keeps_the_password(rpc: Harness) -> None:
    result = await rpc.ok("trunk.add", name="office-b", peers=["127.0.0.21", "127.0.0.22:5070;transport=tcp"],
                          username="office-a", realm="b.test", password=PASSWORD, allow=["127.0.0.20/30"],
                          register_expires=600)
    assert result["status"] == "applied" and result["result"] == {"name": "office-b"}
    with rpc.machine.lock:
        assert result["applied_index"] == rpc.machine.state.applied_index == 1  # committed when answered
        assert "office-b" in rpc.machine.state.trunks
    listed = await rpc.ok("trunk.list")
    (trunk,) = listed["trunks"]
    assert trunk["peers"] == ["127.0.0.21:5060", "127.0.0.22:5070;transport=tcp"]
    assert trunk["credentials"] is True and trunk["allow"] == ["127.0.0.20/30"] and trunk["register_expires"] == 600
    assert [h["state"] for h in trunk["health"]] == ["unknown", "unknown"]  # the pinger is not started here
    got = await rpc.ok("trunk.get", name="office-b")
    assert got["routes"] == [] and got["name"] == "office-b"
    everything = orjson.dumps([listed, got]) + b"".join(rpc.replicator.proposals)
    assert PASSWORD.encode() not in everything
    assert b"ha1" not in orjson.dumps([listed, got])


@pytest.mark.parametrize(("params", "field"), [
    ({"name": "bad name", "peers": ["127.0.0.21"]}, "name"),
    ({"name": "b"}, "peers"),
    ({"name": "b", "peers": "127.0.0.21:99999"}, "peers"),
    ({"name": "b", "peers": [5060]}, "peers"),
    ({"name": "b", "peers": ["127.0.0.21"], "transport": "tls"}, "transport"),
    ({"name": "b", "peers": ["127.0.0.21"], "username": "a", "realm": "b.test"}, "password"),
    ({"name": "b", "peers": ["127.0.0.21"], "allow": ["0.0.0.0/0"]}, "allow"),
    ({"name": "b", "peers": ["127.0.0.21"], "register_expires": 300}, "register_expires"),
    ({"name": "b", "peers": ["127.0.0.21"], "register_expires": "300"}, "register_expires"),
    ({"name": "b", "peers": ["127.0.0.21"], "colour": "red"}, "colour"),
    ({"name": "b", "peers": ["127.0.0.21"], "op_id": "no spaces allowed"}, "op_id"),
])
async def test_bad_trunk_input_names_the_field_and_changes_nothing(rpc: Harness, params: dict[str, Any],
                                                                   field: str) -> None:
    err = await rpc.error("trunk.add", **params)
    assert err["code"] == INVALID_PARAMS and err["data"]["field"] == field, err
    with rpc.machine.lock:
        assert rpc.machine.state.trunks == {} and rpc.machine.state.applied_index == 0


async def test_overlaps_unknown_trunks_and_used_trunks_are_refused(rpc: Harness) -> None:
    await rpc.ok("trunk.add", name="office-b", peers="127.0.0.21", allow="127.0.0.0/28")  # comma lists work too
    err = await rpc.error("trunk.add", name="office-c", peers=["127.0.0.31"], allow=["127.0.0.8/29"])
    assert err["data"]["field"] == "allow" and "office-b" in err["data"]["message"]
    err = await rpc.error("route.add", name="to-c", pattern="3XXX", trunk="office-c")
    assert err["code"] == INVALID_PARAMS and err["data"]["field"] == "trunk"
    err = await rpc.error("trunk.update", name="office-c", peers=["127.0.0.31"])
    assert err["data"]["field"] == "name"
    await rpc.ok("route.add", name="to-b", pattern="2xxx", trunk="office-b", order=5)
    err = await rpc.error("trunk.delete", name="office-b")
    assert err["code"] == INVALID_PARAMS and err["data"]["field"] == "name" and "to-b" in err["data"]["message"]
    assert (await rpc.error("trunk.get", name="office-z"))["code"] == NOT_FOUND
    # A write that raced past the decision is refused when applied: REJECTED, naming the field.
    await rpc.ok("trunk.add", name="office-c", peers=["127.0.0.31"])
    rpc.replicator.before_apply.append(encode_batch([Command("rival", TrunkDeleted("office-c", NOW))]))
    err = await rpc.error("route.add", name="to-c", pattern="3XXX", trunk="office-c")
    assert err["code"] == REJECTED and err["data"]["field"] == "trunk"
    with rpc.machine.lock:
        assert "to-c" not in rpc.machine.state.routes


async def test_routes_list_in_dial_order_update_delete_and_test(rpc: Harness) -> None:
    await rpc.ok("trunk.add", name="office-b", peers=["127.0.0.21", "127.0.0.22"])
    await rpc.ok("route.add", name="wide", pattern="2.", trunk="office-b", order=20)
    await rpc.ok("route.add", name="exact", pattern="2XXX", trunk="office-b", order=10, strip=1, prepend="9")
    listed = await rpc.ok("route.list")
    assert [r["name"] for r in listed["routes"]] == ["exact", "wide"]
    assert listed["routes"][0] == {"name": "exact", "pattern": "2XXX", "trunk": "office-b", "strip": 1,
                                   "prepend": "9", "order": 10, "created_at": NOW, "updated_at": NOW}
    test = await rpc.ok("route.test", number="2001")
    assert test == {"number": "2001", "target": "trunk", "route": "exact", "trunk": "office-b", "send": "9001",
                    "peers": ["127.0.0.21:5060;transport=udp", "127.0.0.22:5060;transport=udp"]}
    assert (await rpc.ok("route.test", number="555"))["target"] == "none"
    await rpc.ok("extension.create", extension="2001", password="Extension-pass-9")
    assert (await rpc.ok("route.test", number="2001"))["target"] == "extension"  # local extensions win
    await rpc.ok("route.update", name="exact", order=30)
    assert [r["name"] for r in (await rpc.ok("route.list"))["routes"]] == ["wide", "exact"]
    err = await rpc.error("route.update", name="exact", order=30)
    assert err["data"]["field"] == "name" and "nothing to change" in err["data"]["message"]
    err = await rpc.error("route.update", name="exact", strip=99)
    assert err["data"]["field"] == "strip"
    await rpc.ok("route.delete", name="exact")
    await rpc.ok("route.delete", name="wide")
    assert (await rpc.error("route.delete", name="wide"))["data"]["field"] == "name"
    await rpc.ok("trunk.delete", name="office-b")
    # Retrying a write with its op_id applies it at most once (the second answer is a duplicate).
    first = await rpc.ok("trunk.add", name="office-d", peers=["127.0.0.41"], op_id="add-d-1")
    again = await rpc.ok("trunk.add", name="office-d", peers=["127.0.0.41"], op_id="add-d-1")
    assert (first["status"], again["status"]) == ("applied", "duplicate")


async def test_trunk_update_changes_credentials_only_with_the_password(rpc: Harness) -> None:
    await rpc.ok("trunk.add", name="office-b", peers=["127.0.0.21"])
    err = await rpc.error("trunk.update", name="office-b", username="a")
    assert err["data"]["field"] == "password"
    await rpc.ok("trunk.update", name="office-b", username="a", realm="b.test", password=PASSWORD,
                 register_expires=120)
    got = await rpc.ok("trunk.get", name="office-b")
    assert (got["username"], got["realm"], got["credentials"], got["register_expires"]) == ("a", "b.test", True, 120)
    err = await rpc.error("trunk.update", name="office-b", clear_credentials=True)  # still registering
    assert err["data"]["field"] == "register_expires"
    await rpc.ok("trunk.update", name="office-b", clear_credentials=True, register_expires=0)
    got = await rpc.ok("trunk.get", name="office-b")
    assert got["credentials"] is False and got["username"] == ""
    assert (await rpc.error("trunk.update", name="office-b", clear_credentials="yes"))["data"]["field"] == (
        "clear_credentials")
    commands = [c for entry in rpc.replicator.proposals for c in decode_batch(entry)]
    assert all(PASSWORD not in repr(c) for c in commands)


# --- choose_peer --------------------------------------------------------------------------------------------


def _trunk_state(peers: tuple[str, ...]) -> State:
    state = State()
    assert isinstance(apply(state, TrunkCreated("t", peers, "udp", "", "", "", "", (), 0, NOW)), Applied)
    return state


def test_choose_peer_keeps_preference_order_skips_down_peers_and_falls_back_to_all() -> None:
    trunk = _trunk_state(("127.0.0.21:5060", "127.0.0.22:5060;transport=tcp", "127.0.0.23:5070")).trunks["t"]
    a, b, c = (PeerAddress("127.0.0.21", 5060, "udp"), PeerAddress("127.0.0.22", 5060, "tcp"),
               PeerAddress("127.0.0.23", 5070, "udp"))
    assert choose_peer(trunk, {}) == [a, b, c]  # nothing known yet: every peer, configured order
    health = {str(a): PeerHealth(state="down"), str(b): PeerHealth(state="up"), str(c): PeerHealth()}
    assert choose_peer(trunk, health) == [b, c]
    health[str(a)] = PeerHealth(state="up")
    assert choose_peer(trunk, health) == [a, b, c]
    every_down = {str(p): PeerHealth(state="down") for p in (a, b, c)}
    assert choose_peer(trunk, every_down) == [a, b, c]


# --- the pinger against real SIP peers on loopback ---------------------------------------------------------


async def _until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:  # noqa: ASYNC109
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def _answer_503(endpoint: SipEndpoint, event: SipEvent, flow: Flow | None) -> None:
    if isinstance(event, RequestReceived) and event.transaction is not None and event.request.method != "ACK":
        endpoint.respond(event.transaction, make_response(event.request, 503, "Service Unavailable",
                                                          to_tag="t503", headers=[("Retry-After", "5")]))


async def _peer(tu: Any, port: int = 0) -> SipEndpoint:
    endpoint = SipEndpoint(tu)
    await endpoint.start(HOST, port, udp=True, tcp=True)
    return endpoint


def _silent_port() -> tuple[socket.socket, int]:
    """A bound UDP socket that never answers (a peer whose host is up but whose SIP stack hangs)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    return sock, int(sock.getsockname()[1])


async def test_pinger_marks_peers_up_down_and_up_again(rpc: Harness) -> None:
    responder = await _peer(Responder(ResponderConfig()))
    busy = await _peer(_answer_503)
    silent, silent_port = _silent_port()
    closers: list[Callable[[], Awaitable[None]]] = [responder.aclose, busy.aclose]
    try:
        assert responder.udp_address is not None and busy.udp_address is not None
        port = responder.udp_address[1]
        await rpc.ok("trunk.add", name="office-b", peers=[f"{HOST}:{port}", f"{HOST}:{port};transport=tcp",
                                                          f"{HOST}:{silent_port}", f"{HOST}:{busy.udp_address[1]}"])
        pinger = rpc.trunks.pinger
        pinger.timeout = 0.4
        await rpc.trunks.start()
        assert pinger.address is not None and pinger.address[0] == HOST

        def states() -> list[str]:
            return [h["state"] for h in pinger.health_of(rpc.machine.state.trunks["office-b"])]

        await _until(lambda: states() == ["up", "up", "down", "down"], "udp+tcp up, silent and 503 down")
        trunk = (await rpc.ok("trunk.get", name="office-b"))
        assert trunk["health"][0]["last_status"] == 200 and trunk["health"][0]["rtt_ms"] is not None
        assert trunk["health"][2]["last_error"].startswith("no answer")
        assert trunk["health"][3]["last_status"] == 503
        assert trunk["next_peers"] == [f"{HOST}:{port}", f"{HOST}:{port}"]
        metrics = await (await rpc.client.get("/metrics")).text()
        labels = f'node="n1",trunk="office-b",peer="{HOST}:{silent_port}"'
        assert f"raftpbx_trunk_peer_up{{{labels}}} 0" in metrics
        assert f'raftpbx_trunk_peer_up{{node="n1",trunk="office-b",peer="{HOST}:{port}"}} 1' in metrics
        assert "# TYPE raftpbx_trunk_pings_total counter" in metrics

        # The peer stops answering: marked down and skipped; it answers again: back up.
        await responder.aclose()
        await _until(lambda: states()[:2] == ["down", "down"], "stopped peer down")
        assert choose_peer(rpc.machine.state.trunks["office-b"], pinger.health) == [
            PeerAddress(HOST, p, t) for p, t in ((port, "udp"), (port, "tcp"), (silent_port, "udp"),
                                                 (busy.udp_address[1], "udp"))]  # all down: all, in order
        responder = await _peer(Responder(ResponderConfig()), port)
        closers[0] = responder.aclose
        await _until(lambda: states()[:2] == ["up", "up"], "restarted peer up again")

        # The proxy's verdict: a call attempt that timed out marks the peer down until a ping answers.
        pinger.report(PeerAddress(HOST, port, "udp"), ok=False, reason="INVITE timed out")
        assert states()[0] == "down"
        await _until(lambda: states()[0] == "up", "reported peer up after the next ping")

        # A peer removed from every trunk is forgotten.
        await rpc.ok("trunk.update", name="office-b", peers=[f"{HOST}:{port}"])
        assert await pinger.wait_round(5.0) and await pinger.wait_round(5.0)
        assert set(pinger.health) == {f"{HOST}:{port};transport=udp"}
    finally:
        silent.close()
        for close in closers:
            await close()


async def test_pinger_refuses_an_absurd_interval_and_survives_a_bad_round() -> None:
    machine = StateMachine()
    with pytest.raises(ValueError):
        TrunkPinger(machine, interval=0.0)
    pinger = TrunkPinger(machine, interval=0.05, timeout=0.2)
    calls = 0
    real = pinger.ping_all

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        await real()

    pinger.ping_all = flaky  # type: ignore[method-assign]
    await pinger.start()
    try:
        await _until(lambda: pinger.rounds >= 2, "rounds after a failed one")
        # The pinger's socket is no SIP service: a request to it is refused at once (nothing lingers).
        assert pinger.address is not None
        loop = asyncio.get_running_loop()
        replies: asyncio.Queue[bytes] = asyncio.Queue()

        class Client(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                replies.put_nowait(data)

        transport, _ = await loop.create_datagram_endpoint(Client, local_addr=(HOST, 0))
        try:
            port = transport.get_extra_info("sockname")[1]
            transport.sendto((f"OPTIONS sip:{HOST} SIP/2.0\r\nVia: SIP/2.0/UDP {HOST}:{port};branch=z9hG4bK-p1;rport\r\n"
                              f"From: <sip:t@{HOST}>;tag=1\r\nTo: <sip:{HOST}>\r\nCall-ID: p1\r\nCSeq: 1 OPTIONS\r\n"
                              "Content-Length: 0\r\n\r\n").encode(), pinger.address)
            async with asyncio.timeout(5):
                reply = await replies.get()
        finally:
            transport.close()
        assert reply.startswith(b"SIP/2.0 403 ")
    finally:
        await pinger.aclose()
    assert pinger.address is None
