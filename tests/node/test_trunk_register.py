"""Registration to the peer (raftpbx/trunk_register.py) against scripted registrars on loopback sockets.

Each scripted registrar is a real `SipEndpoint` (UDP and TCP on 127.0.0.1, an ephemeral port) whose
request handler the test writes: it records every REGISTER, challenges with real stateless nonces and
checks the answers with the server-side `verify` (and, once, against an MD5 digest computed here by hand),
grants expiries, answers 423/503/401-forever, or stays silent. The trunks live in a real `StateMachine`
(events applied as the replicator would); leadership is a flag the test flips. Every wait polls a
condition against a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from raftpbx.state import State, apply, decide_create_trunk, decide_delete_trunk, decide_update_trunk
from raftpbx.transport.endpoint import SipEndpoint
from raftpbx.transport.flow import Flow
from raftpbx.transport.sip.digest import (
    AuthStatus,
    compute_ha1,
    make_challenge,
    make_nonce,
    parse_authorization,
    verify,
)
from raftpbx.transport.sip.message import Request, Response, make_response
from raftpbx.transport.sip.transaction import Event as SipEvent
from raftpbx.transport.sip.transaction import RequestReceived

from raftpbx.trunk_register import (
    CSEQ_EPOCH,
    CSEQ_TICKS_PER_SECOND,
    TrunkRegistrar,
    call_id_for,
)

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
REALM = "peer.test"
USER = "office-a"
PASSWORD = "trunk-Secret-42"
SECRET = b"peer-registrar-secret"
CONTACT = ("127.0.0.77", 5060)  # the cluster's service address, as the registrar is told


# --- a scripted registrar ------------------------------------------------------------------------------------


@dataclass
class Registrar:
    """A peer's registrar: `script(request, n)` answers the n-th REGISTER (0-based) with a Response or None."""

    script: Callable[[Request, int], Response | None]
    requests: list[Request] = field(default_factory=list)
    endpoint: SipEndpoint | None = None

    async def start(self) -> Registrar:
        self.endpoint = SipEndpoint(self._on_event)
        await self.endpoint.start(HOST, 0, udp=True, tcp=True)
        return self

    @property
    def port(self) -> int:
        assert self.endpoint is not None and self.endpoint.udp_address is not None
        return self.endpoint.udp_address[1]

    def _on_event(self, endpoint: SipEndpoint, event: SipEvent, flow: Flow | None) -> None:
        if not isinstance(event, RequestReceived) or event.transaction is None or event.request.method != "REGISTER":
            return
        self.requests.append(event.request)
        response = self.script(event.request, len(self.requests) - 1)
        if response is not None:
            endpoint.respond(event.transaction, response)

    async def aclose(self) -> None:
        if self.endpoint is not None:
            await self.endpoint.aclose()


def challenge(request: Request, *, stale: bool = False, code: int = 401, now: float | None = None) -> Response:
    nonce = make_nonce(SECRET, REALM, now if now is not None else 1_800_000_000.0)
    header = "WWW-Authenticate" if code == 401 else "Proxy-Authenticate"
    return make_response(request, code, to_tag="reg", headers=[(header, v) for v in
                                                               make_challenge(REALM, nonce, stale=stale)])


def check_answer(request: Request, header: str = "Authorization") -> AuthStatus:
    """The server side: is the request's Authorization right for our user and password?"""
    value = request.headers.get(header)
    if value is None:
        return AuthStatus.FAILED
    creds = parse_authorization(value)
    ha1 = compute_ha1(USER, REALM, PASSWORD, creds.algorithm)
    return verify(creds, method="REGISTER", ha1=ha1, expected_realm=REALM, secret=SECRET,
                  now=1_800_000_000.0, lifetime=300, request_uri=request.uri).status


def granted(request: Request, expires: int) -> Response:
    contact = request.headers.get("Contact") or ""
    return make_response(request, 200, to_tag="reg", headers=[("Contact", f"{contact};expires={expires}")])


def digest_registrar(expires: int = 3600) -> Callable[[Request, int], Response | None]:
    """Challenge any REGISTER without a right answer; grant `expires` to a right one."""
    def script(request: Request, n: int) -> Response:
        if check_answer(request) is AuthStatus.OK:
            return granted(request, expires)
        return challenge(request)
    return script


# --- harness --------------------------------------------------------------------------------------------------


class Machine:
    """The two things the registrar reads from the node's StateMachine: `lock` and `state`."""

    def __init__(self) -> None:
        self.state = State()
        self.lock = threading.RLock()
        self.now = 1_800_000_000.0

    def add(self, name: str, peers: list[str], expires: int = 60, **fields: Any) -> None:
        self.now += 1
        params = {"username": USER, "realm": REALM, "password": PASSWORD, **fields}
        with self.lock:
            for event in decide_create_trunk(self.state, name, peers=peers, register_expires=expires, now=self.now,
                                             **params):
                apply(self.state, event)

    def update(self, name: str, **fields: Any) -> None:
        self.now += 1
        with self.lock:
            for event in decide_update_trunk(self.state, name, now=self.now, **fields):
                apply(self.state, event)

    def delete(self, name: str) -> None:
        self.now += 1
        with self.lock:
            for event in decide_delete_trunk(self.state, name, self.now):
                apply(self.state, event)


@dataclass
class Harness:
    machine: Machine
    registrar: TrunkRegistrar
    leader: list[bool]

    def lead(self, value: bool) -> None:
        self.leader[0] = value
        self.registrar.leadership_changed(value, "n1" if value else "n2")


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    machine = Machine()
    leader = [True]
    registrar = TrunkRegistrar(machine, is_leader=lambda: leader[0], contact=CONTACT, bind_host=HOST, node_id="n1",
                               timeout=0.6, retry_interval=0.3, takeover_delay=0.0, check_interval=0.05)
    try:
        yield Harness(machine, registrar, leader)
    finally:
        await registrar.aclose()


async def until(condition: Callable[[], Any], what: str, timeout: float = 5.0) -> Any:  # noqa: ASYNC109
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := condition()):
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)
    return value


def cseq(request: Request) -> int:
    return int(request.cseq.seq)


# --- tests ----------------------------------------------------------------------------------------------------


async def test_registers_through_the_challenge_and_refreshes_at_half_the_granted_expiry(harness: Harness) -> None:
    peer = await Registrar(digest_registrar(expires=2)).start()
    try:
        harness.machine.add("peer", [f"{HOST}:{peer.port}"])
        await harness.registrar.start()
        reg = harness.registrar
        trunk = harness.machine.state.trunks["peer"]
        await until(lambda: (s := reg.status.get("peer")) is not None and s.state == "registered", "registered")
        first, second = peer.requests[:2]
        # The first REGISTER carries no credentials and is challenged; the answer is right (server's verify).
        assert first.headers.get("Authorization") is None
        assert check_answer(second) is AuthStatus.OK
        # ... and right by a digest computed here by hand for the MD5 challenge, if the client chose MD5.
        creds = parse_authorization(str(second.headers.get("Authorization")))
        assert creds.username == USER and creds.realm == REALM and creds.uri == second.uri == f"sip:{REALM}"
        if creds.algorithm.upper() == "MD5":
            h = lambda s: hashlib.md5(s.encode()).hexdigest()  # noqa: E731
            ha1, ha2 = h(f"{USER}:{REALM}:{PASSWORD}"), h(f"REGISTER:{second.uri}")
            assert creds.response == h(f"{ha1}:{creds.nonce}:{creds.nc}:{creds.cnonce}:auth:{ha2}")
        for request in (first, second):
            assert request.uri == f"sip:{REALM}"
            assert request.to.uri == request.from_.uri and str(request.to.uri) == f"sip:{USER}@{REALM}"
            assert request.headers.get("Contact") == f"<sip:{USER}@{CONTACT[0]}:{CONTACT[1]}>"
            assert request.headers.get("Expires") == "60"
            assert request.call_id == call_id_for(trunk)
            assert request.top_via.host == HOST and request.top_via.port == reg.address[1]  # type: ignore[index]
        # Refreshed at half the granted 2 s: a third REGISTER ~1 s later, same Call-ID, growing CSeq.
        loop = asyncio.get_running_loop()
        registered_at = loop.time()
        await until(lambda: len(peer.requests) >= 4, "a refresh", timeout=5.0)
        waited = loop.time() - registered_at
        assert 0.7 <= waited <= 3.0, waited
        numbers = [cseq(r) for r in peer.requests]
        assert numbers == sorted(set(numbers)), numbers
        assert {r.call_id for r in peer.requests} == {call_id_for(trunk)}
        status = reg.status_of(trunk)
        assert status is not None and status["state"] == "registered" and status["expires"] == 2
        assert status["peer"] == f"{HOST}:{peer.port}" and status["last_status"] == 200
        lines = "\n".join(reg.metrics_lines())
        assert 'raftpbx_trunk_registered{node="n1",trunk="peer"} 1' in lines
        assert 'raftpbx_trunk_registrations_total{node="n1",trunk="peer",result="ok"}' in lines
        assert PASSWORD not in lines and PASSWORD not in repr(status)
    finally:
        await peer.aclose()


async def test_only_the_leader_registers_and_a_new_leadership_registers_again(harness: Harness) -> None:
    peer = await Registrar(digest_registrar(expires=3600)).start()
    try:
        harness.machine.add("peer", [f"{HOST}:{peer.port}"])
        harness.lead(False)
        reg = harness.registrar
        reg.takeover_delay = 0.3
        await reg.start()
        await asyncio.sleep(0.3)  # a follower: give it the chance to (wrongly) send something
        assert peer.requests == []
        status = reg.status_of(harness.machine.state.trunks["peer"])
        assert status is not None and status["state"] == "standby"
        assert 'raftpbx_trunk_registered{node="n1",trunk="peer"} 0' in reg.metrics_lines()
        loop = asyncio.get_running_loop()
        became = loop.time()
        harness.lead(True)
        await until(lambda: reg.status["peer"].state == "registered", "registered by the new leader")
        assert loop.time() - became >= 0.3  # the takeover delay (CSeq ordering after another leader)
        count = len(peer.requests)
        harness.lead(False)
        await until(lambda: reg.status["peer"].state == "standby", "standby after losing leadership")
        last = cseq(peer.requests[-1])
        harness.lead(True)
        await until(lambda: len(peer.requests) >= count + 2 and reg.status["peer"].state == "registered",
                    "registered again on a new leadership")
        assert cseq(peer.requests[count]) > last
        assert {r.call_id for r in peer.requests} == {call_id_for(harness.machine.state.trunks["peer"])}
    finally:
        await peer.aclose()


async def test_refused_credentials_are_not_retried_in_a_loop(harness: Harness) -> None:
    peer = await Registrar(lambda request, n: challenge(request)).start()  # every answer refused
    try:
        harness.machine.add("peer", [f"{HOST}:{peer.port}"])
        reg = harness.registrar
        reg.retry_interval = 5.0
        await reg.start()
        await until(lambda: reg.status.get("peer") is not None and reg.status["peer"].failed >= 1, "a failure")
        await asyncio.sleep(0.3)  # nothing more until the retry interval
        assert len(peer.requests) == 2  # the plain REGISTER and one answer, no loop
        status = reg.status["peer"]
        assert status.state == "failed" and "credentials refused" in str(status.last_error)
        assert status.last_status == 401
        assert 'raftpbx_trunk_registrations_total{node="n1",trunk="peer",result="failed"} 1' in reg.metrics_lines()
    finally:
        await peer.aclose()


async def test_wrong_realm_is_not_answered(harness: Harness) -> None:
    peer = await Registrar(lambda request, n: make_response(request, 401, to_tag="x", headers=[
        ("WWW-Authenticate", 'Digest realm="elsewhere", nonce="abc", qop="auth"')])).start()
    try:
        harness.machine.add("peer", [f"{HOST}:{peer.port}"])
        await harness.registrar.start()
        reg = harness.registrar
        await until(lambda: reg.status.get("peer") is not None and reg.status["peer"].failed >= 1, "a failure")
        assert len(peer.requests) == 1 and "realm" in str(reg.status["peer"].last_error)
    finally:
        await peer.aclose()


async def test_stale_nonce_is_answered_again_and_407_uses_proxy_authorization(harness: Harness) -> None:
    def script(request: Request, n: int) -> Response:
        if n == 0:
            return challenge(request, code=407)
        if n == 1:
            assert check_answer(request, "Proxy-Authorization") is AuthStatus.OK
            return challenge(request, code=407, stale=True, now=1_800_000_001.0)  # a new nonce, stale=true
        assert check_answer(request, "Proxy-Authorization") is AuthStatus.OK
        return granted(request, 120)

    peer = await Registrar(script).start()
    try:
        harness.machine.add("peer", [f"{HOST}:{peer.port}"])
        await harness.registrar.start()
        reg = harness.registrar
        await until(lambda: reg.status.get("peer") is not None and reg.status["peer"].state == "registered",
                    "registered after a stale challenge")
        assert len(peer.requests) == 3 and reg.status["peer"].expires == 120
        assert peer.requests[1].headers.get("Authorization") is None
    finally:
        await peer.aclose()


async def test_423_asks_again_with_min_expires(harness: Harness) -> None:
    def script(request: Request, n: int) -> Response:
        if request.headers.get("Expires") != "900":
            return make_response(request, 423, to_tag="x", headers=[("Min-Expires", "900")])
        return make_response(request, 200, to_tag="x", headers=[("Expires", "900")])

    peer = await Registrar(script).start()
    try:
        harness.machine.add("peer", [f"{HOST}:{peer.port}"], expires=60)
        await harness.registrar.start()
        reg = harness.registrar
        await until(lambda: reg.status.get("peer") is not None and reg.status["peer"].state == "registered", "ok")
        assert [r.headers.get("Expires") for r in peer.requests] == ["60", "900"]
        assert reg.status["peer"].expires == 900  # from the Expires header: the 200 lists no Contact
    finally:
        await peer.aclose()


async def test_silent_and_503_peers_are_skipped_for_the_next_one_over_tcp_too(harness: Harness) -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind((HOST, 0))
    busy = await Registrar(lambda request, n: make_response(request, 503, to_tag="b")).start()
    good = await Registrar(digest_registrar(expires=600)).start()
    try:
        harness.machine.add("peer", [f"{HOST}:{silent.getsockname()[1]}", f"{HOST}:{busy.port}",
                                     f"{HOST}:{good.port};transport=tcp"])
        await harness.registrar.start()
        reg = harness.registrar
        await until(lambda: reg.status.get("peer") is not None and reg.status["peer"].state == "registered",
                    "registered at the third peer")
        assert reg.status["peer"].peer == f"{HOST}:{good.port}" and len(busy.requests) == 1
        tcp_request = good.requests[-1]
        assert tcp_request.top_via.transport.upper() == "TCP"
        assert tcp_request.headers.get("Contact") == f"<sip:{USER}@{CONTACT[0]}:{CONTACT[1]};transport=tcp>"
    finally:
        silent.close()
        await busy.aclose()
        await good.aclose()


async def test_deleting_or_disabling_the_registration_unregisters(harness: Harness) -> None:
    peer = await Registrar(lambda request, n: make_response(request, 200, to_tag="x", headers=[
        ("Expires", request.headers.get("Expires") or "0")])).start()
    try:
        harness.machine.add("peer", [f"{HOST}:{peer.port}"], allow=["127.0.0.64/30"])
        await harness.registrar.start()
        reg = harness.registrar
        await until(lambda: reg.status.get("peer") is not None and reg.status["peer"].state == "registered", "ok")
        harness.machine.update("peer", register_expires=0)
        await until(lambda: peer.requests[-1].headers.get("Expires") == "0", "an un-REGISTER")
        assert cseq(peer.requests[-1]) > cseq(peer.requests[-2])
        assert "peer" not in reg.status and reg.status_of(harness.machine.state.trunks["peer"]) is None
        count = len(peer.requests)
        await asyncio.sleep(0.2)
        assert len(peer.requests) == count  # no refresh of a disabled registration
        # Re-enabled, then deleted: registered again, then un-registered.
        harness.machine.update("peer", register_expires=60)
        await until(lambda: reg.status.get("peer") is not None and reg.status["peer"].state == "registered", "again")
        harness.machine.delete("peer")
        await until(lambda: peer.requests[-1].headers.get("Expires") == "0", "an un-REGISTER after delete")
    finally:
        await peer.aclose()


def test_cseq_follows_the_wall_clock_and_only_grows() -> None:
    clock = [CSEQ_EPOCH + 1000.0]
    machine = Machine()
    a = TrunkRegistrar(machine, is_leader=lambda: True, contact=CONTACT, wall_clock=lambda: clock[0])
    burst = [a._next_cseq("x") for _ in range(3)]  # a plain REGISTER, its answer, a 423 retry: same instant
    assert burst == [1000 * CSEQ_TICKS_PER_SECOND + i for i in range(3)]
    clock[0] -= 5.0  # the wall clock stepped back: CSeq still grows
    a_last = a._next_cseq("x")
    assert a_last == burst[-1] + 1
    # Another node takes over one takeover delay (1 s) after a's burst: its first CSeq is beyond a's last.
    clock[0] = CSEQ_EPOCH + 1000.0 + 1.0
    b = TrunkRegistrar(machine, is_leader=lambda: True, contact=CONTACT, wall_clock=lambda: clock[0])
    assert b._next_cseq("x") > a_last
    clock[0] = CSEQ_EPOCH + (2**31 - 1) / CSEQ_TICKS_PER_SECOND - 3600  # 2040: still below 2**31
    assert b._next_cseq("x") < 2**31


async def test_garbage_and_requests_to_the_registrar_socket_do_no_harm(harness: Harness) -> None:
    peer = await Registrar(digest_registrar(expires=3600)).start()
    try:
        harness.machine.add("peer", [f"{HOST}:{peer.port}"])
        await harness.registrar.start()
        reg = harness.registrar
        address = reg.address
        assert address is not None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((HOST, 0))
            s.settimeout(2.0)
            s.sendto(b"\x00\xffnot sip at all\r\n\r\n", address)
            s.sendto(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bK-nope\r\nCSeq: 1 REGISTER\r\n"
                     b"Call-ID: x\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\nContent-Length: 0\r\n\r\n", address)
            port = s.getsockname()[1]
            s.sendto((f"OPTIONS sip:{address[0]}:{address[1]} SIP/2.0\r\nVia: SIP/2.0/UDP {HOST}:{port};"
                      "branch=z9hG4bK-probe\r\nMax-Forwards: 70\r\nFrom: <sip:x@127.0.0.1>;tag=1\r\n"
                      "To: <sip:y@127.0.0.1>\r\nCall-ID: probe\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
                      ).encode(), address)
            reply = await asyncio.to_thread(s.recv, 65535)  # the loop must keep running to answer
        assert reply.startswith(b"SIP/2.0 403")  # not a service
        await until(lambda: reg.status.get("peer") is not None and reg.status["peer"].state == "registered", "ok")
    finally:
        await peer.aclose()


# --- wired by trunks.attach: the RPC view and /metrics ------------------------------------------------------


@dataclass
class _Status:
    role: str
    leader: str | None = None
    term: int = 1
    commit_index: int = 0
    caught_up: bool = True


class _Replicator:
    """Applies proposals at once; its role and leader-change callbacks are the test's to drive."""

    def __init__(self, machine: Any) -> None:
        self.machine = machine
        self.index = 0
        self.role = "follower"
        self.callbacks: list[Callable[[bool, str | None], None]] = []

    async def propose(self, payload: bytes, timeout: float) -> object:  # noqa: ASYNC109 (the contract)
        self.index += 1
        return self.machine.apply(payload, self.index)

    def status(self) -> _Status:
        return _Status(self.role, "n1" if self.role == "leader" else "n2", commit_index=self.index)

    def on_leader_change(self, callback: Callable[[bool, str | None], None]) -> None:
        self.callbacks.append(callback)

    def become(self, role: str) -> None:
        self.role = role
        for callback in self.callbacks:
            callback(role == "leader", "n1" if role == "leader" else "n2")


async def test_attach_wires_leadership_the_rpc_view_and_metrics(tmp_path: Any) -> None:
    import orjson
    from aiohttp.test_utils import TestClient, TestServer

    from raftpbx.config import load_config
    from raftpbx.rpc import RpcServer
    from raftpbx.service import AdminService, StateMachine
    from raftpbx.trunks import attach

    token = "test-token-0123456789"
    config = load_config(None, env={}, overrides={
        "node.id": "n1", "node.data_dir": str(tmp_path), "cluster.secret": "s" * 32, "admin.token": token,
        "cluster.domain": "pbx.test", "sip.listen": f"{HOST}:5060", "service.address": "127.0.0.78:5060"})
    machine = StateMachine()
    replicator = _Replicator(machine)
    service = AdminService(config, machine, replicator)
    server = RpcServer(token, metrics=service.metrics)
    service.register(server)
    trunks = attach(config, machine, server, service, interval=0.2, register_options={
        "timeout": 0.6, "takeover_delay": 0.0, "check_interval": 5.0})  # only the leader callback wakes it
    assert replicator.callbacks, "attach must follow leadership changes"
    client = TestClient(TestServer(server.app()))
    await client.start_server()
    peer = await Registrar(digest_registrar(expires=3600)).start()

    async def call(method: str, **params: Any) -> Any:
        body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
        response = await client.post("/rpc", data=orjson.dumps(body), headers={"Authorization": f"Bearer {token}"})
        reply = orjson.loads(await response.read())
        assert "result" in reply, reply
        return reply["result"]

    try:
        await trunks.start()
        await call("trunk.add", name="peer", peers=[f"{HOST}:{peer.port}"], username=USER, realm=REALM,
                   password=PASSWORD, register_expires=60)
        await call("trunk.add", name="plain", peers=["127.0.0.79"])
        await asyncio.sleep(0.2)
        assert peer.requests == []  # a follower never registers
        assert (await call("trunk.get", name="peer"))["registration"]["state"] == "standby"
        assert (await call("trunk.get", name="plain"))["registration"] is None
        replicator.become("leader")
        await until(lambda: len(peer.requests) >= 2, "the leader's REGISTER and its answer", timeout=3.0)
        for _ in range(200):
            registration = {t["name"]: t["registration"] for t in (await call("trunk.list"))["trunks"]}
            if registration["peer"]["state"] == "registered":
                break
            await asyncio.sleep(0.02)
        assert registration["plain"] is None and registration["peer"]["state"] == "registered", registration
        assert peer.requests[-1].headers.get("Contact") == f"<sip:{USER}@127.0.0.78:5060>"  # the service address
        text = await (await client.get("/metrics")).text()
        assert 'raftpbx_trunk_registered{node="n1",trunk="peer"} 1' in text
        assert 'trunk="plain"' not in "".join(line for line in text.splitlines() if "raftpbx_trunk_regist" in line)
        replicator.become("follower")
        await until(lambda: trunks.registrar is not None and trunks.registrar.status["peer"].state == "standby",
                    "standby")
    finally:
        await client.close()
        await trunks.aclose()
        await service.close()
        await peer.aclose()
