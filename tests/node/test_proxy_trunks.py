"""The proxy routing calls to and from trunks (issue 9; raftpbx/trunk_calls.py, docs/trunks.md), in one
process: a real `SipNode` + `Proxy` on loopback UDP/TCP over the real state machine (one-node replicator,
test_proxy.py's harness), the real `TrunkPinger` health map (not pinging: the proxy's reports are what is
checked), and raw SIP sockets playing the phones and the peer PBX's UAS, scripted per test (answer, 503,
silence, digest challenge).

Checked on the wire and in the recorded call events:
- outbound: local extensions win over routes; the route's number in the Request-URI `sip:N@host:port`,
  Max-Forwards, Record-Route, our credentials consumed; CallStarted with trunk and direction "outbound";
  ACK/BYE loose-routed to the peer;
- serial failover (RFC 3263 §4.3): silence for `attempt_timeout`, a 503, a transport error (TCP refused)
  -> the next peer, and the failed peer reported down so the next call skips it; no failover after a
  provisional response; every peer failed -> 503 + Retry-After, recorded as a failure;
- credentials towards the peer (RFC 3261 §22.2): one resend with Proxy-Authorization and CSeq + 1, the
  responses, ACK and BYE translated; a second challenge or another realm is the final response;
- inbound: an allow-listed source address calls without a challenge; a stranger (even one forging the
  allowed address in Via/From/Contact) gets 407; an inbound call only reaches local extensions (a number
  that a route would send to a trunk gets 404).
Every wait is bounded by a deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from raftpbx.state import decide_create_route, decide_create_trunk, ha1_md5, ha1_sha256
from raftpbx.state.trunks import PeerAddress
from raftpbx.transport.sip.digest import (
    AuthStatus,
    challenges_for,
    make_authorization,
    make_challenge,
    make_nonce,
    parse_authorization,
    verify,
)
from raftpbx.transport.sip.message import Request, Response, parse_message
from raftpbx.transport.sip.uri import parse_uri
from test_proxy import DOMAIN, PASSWORD, UA, Pbx, ack_text, invite_text
from test_proxy_failover import Pair, invite_through

from raftpbx.calls import CallSettings
from raftpbx.config import ConfigError, load_config
from raftpbx.proxy import Proxy, loop_hash
from raftpbx.sipnode import SipNode
from raftpbx.trunk_calls import cseq_shift_of_route, tag_hash, trunk_uri
from raftpbx.trunks import TrunkPinger

# trunks.attempt_timeout in these tests (default 2 s): short, yet long enough that a scripted peer's answer
# always beats it on a loaded machine (the peer answers within a few loop turns).
ATTEMPT = 1.0
PEER_REALM = "peer.test.local"
PEER_PASSWORD = "trunk-Secret-7"
PEER_SECRET = b"k" * 32


class TrunkPbx(Pbx):
    """test_proxy's in-process node, with trunks: a real (idle) pinger and a short attempt timeout."""

    def __init__(self, tmp: Path, settings: CallSettings) -> None:
        super().__init__(tmp, settings)
        self.pinger = TrunkPinger(self.machine, interval=60.0)
        self.proxy.trunk_calls.pinger = self.pinger
        self.proxy.trunk_calls.attempt_timeout = ATTEMPT
        self.peer_ips = iter(range(100, 200))

    async def peer(self) -> UA:
        """A peer PBX's UAS on its own loopback address (outside the phones' range)."""
        ua = await UA(self.ip.rsplit(".", 1)[0] + f".{next(self.peer_ips)}").open()
        self.clients.append(ua)
        return ua

    def trunk(self, name: str, peers: list[str], *, allow: tuple[str, ...] = (), username: str | None = None,
              realm: str | None = None, password: str | None = None) -> None:
        add_trunk(self, name, peers, allow=allow, username=username, realm=realm, password=password)

    def route(self, name: str, pattern: str, trunk: str, *, strip: int = 0, prepend: str = "") -> None:
        add_route(self, name, pattern, trunk, strip=strip, prepend=prepend)

    def call(self, call_id: str) -> dict[str, Any] | None:
        """test_proxy's CDR row of the call, with the Call's trunk and direction."""
        row = super().call(call_id)
        if row is None:
            return None
        with self.machine.lock:
            call = self.machine.state.calls.get(call_id) or self.machine.state.finished_calls.get(call_id)
        assert call is not None
        return row | {"trunk": call.trunk, "direction": call.direction}

    def health(self, peer: UA, transport: str = "udp") -> str:
        key = str(PeerAddress(peer.ip, peer.port, transport))
        entry = self.pinger.health.get(key)
        return "unknown" if entry is None else entry.state


def add_trunk(pbx: Pbx, name: str, peers: list[str], *, allow: tuple[str, ...] = (), username: str | None = None,
              realm: str | None = None, password: str | None = None) -> None:
    with pbx.machine.lock:
        events = decide_create_trunk(pbx.machine.state, name, peers=peers, allow=allow, username=username,
                                     realm=realm, password=password, now=pbx.node.now())
    pbx.apply(f"trunk-{name}", events)


def add_route(pbx: Pbx, name: str, pattern: str, trunk: str, *, strip: int = 0, prepend: str = "") -> None:
    with pbx.machine.lock:
        events = decide_create_route(pbx.machine.state, name, pattern=pattern, trunk=trunk, strip=strip,
                                     prepend=prepend, now=pbx.node.now())
    pbx.apply(f"route-{name}", events)


@pytest.fixture
async def pbx(tmp_path: Path) -> AsyncIterator[TrunkPbx]:
    p = TrunkPbx(tmp_path, CallSettings(timer_c=5.0, max_duration=3600.0, ring_timeout=600.0, interval=0.05))
    await p.start()
    try:
        yield p
    finally:
        await p.close()


def addr(ua: UA) -> str:
    return f"{ua.ip}:{ua.port}"


async def place_call(pbx: TrunkPbx, callee: str) -> tuple[UA, str]:
    """Extension 1001 (authenticated) dials `callee`; returns the caller's socket and the Call-ID."""
    caller, call_id, _ = await place_call_text(pbx, callee)
    return caller, call_id


async def place_call_text(pbx: TrunkPbx, callee: str) -> tuple[UA, str, str]:
    """As `place_call`, also returning the authenticated INVITE as sent (to CANCEL or retransmit it)."""
    if "1001" not in pbx.machine.state.extensions:
        pbx.create("1001")
    caller = await pbx.ua()
    call_id = uuid.uuid4().hex
    caller.send(invite_text(pbx, caller, callee, call_id=call_id), pbx.address)
    challenge = await caller.response(407)
    caller.send(ack_text(challenge, pbx), pbx.address)  # §17.1.1.3: the hop-by-hop ACK of the 407
    chosen = challenges_for(challenge.headers.values("Proxy-Authenticate"))[0]
    host, port = pbx.address
    authorization = make_authorization(username="1001", ha1=ha1_md5("1001", DOMAIN, PASSWORD), challenge=chosen,
                                       method="INVITE", uri=f"sip:{callee}@{host}:{port}", cnonce="c0ffee")
    text = invite_text(pbx, caller, callee, call_id=call_id, cseq=2, authorization=authorization,
                       branch="z9hG4bK" + secrets.token_hex(8))
    caller.send(text, pbx.address)
    return caller, call_id, text


def in_dialog(method: str, caller: UA, ok: Response, call_id: str, cseq: int, to: str) -> str:
    """An ACK/BYE from the caller along the route set of `ok` (the 2xx as the caller received it)."""
    return "\r\n".join([
        f"{method} {to} SIP/2.0",
        f"Via: SIP/2.0/UDP {caller.ip}:{caller.port};branch=z9hG4bK{secrets.token_hex(8)};rport",
        "Max-Forwards: 70", *[f"Route: {r}" for r in ok.headers.values("Record-Route")],
        f"From: {ok.headers.get('From')}", f"To: {ok.headers.get('To')}",
        f"Call-ID: {call_id}", f"CSeq: {cseq} {method}", "Content-Length: 0", "", "",
    ])


# -- pure helpers -----------------------------------------------------------------------------------------


def test_trunk_uri_and_the_cseq_shift_route_parameter() -> None:
    assert trunk_uri("2001", PeerAddress("127.0.0.9", 5070, "udp")) == "sip:2001@127.0.0.9:5070"
    assert trunk_uri("+4930", PeerAddress("pbx.b.test", 5060, "tcp")) == "sip:+4930@pbx.b.test:5060;transport=tcp"
    escaped = trunk_uri("*21#", PeerAddress("127.0.0.9", 5060, "udp"))
    assert escaped == "sip:*21%23@127.0.0.9:5060" and parse_uri(escaped).user == "*21#"  # type: ignore[union-attr]
    uri = parse_uri(f"sip:127.0.0.1:5060;lr;tcs=1;ftag={tag_hash('abc')}")
    assert cseq_shift_of_route(uri, "abc") == 1  # from the caller: towards the peer
    assert cseq_shift_of_route(uri, "xyz") == 0  # from the peer: its own CSeq space
    assert cseq_shift_of_route(parse_uri("sip:127.0.0.1;lr"), "abc") == 0


def test_config_trunks_attempt_timeout_default_override_and_bounds(tmp_path: Path) -> None:
    base = {"node.id": "n1", "node.data_dir": str(tmp_path), "cluster.secret": "s" * 32, "admin.token": "t" * 32}
    assert load_config(None, overrides=base).trunk_attempt_timeout == 2.0
    assert load_config(None, overrides=base | {"trunks.attempt_timeout": "0.5"}).trunk_attempt_timeout == 0.5
    for bad in ("0.01", "31"):
        with pytest.raises(ConfigError) as refused:
            load_config(None, overrides=base | {"trunks.attempt_timeout": bad})
        assert "trunks.attempt_timeout" in str(refused.value)


def test_proxy_takes_the_pinger_and_the_configured_attempt_timeout(tmp_path: Path) -> None:
    pbx = Pbx(tmp_path, CallSettings())  # never started: only its config, state and replicator are used
    cfg = dataclasses.replace(pbx.node.cfg, trunk_attempt_timeout=0.7)
    pinger = TrunkPinger(pbx.machine)
    proxy = Proxy(SipNode(cfg, pbx.machine, pbx.replicator), pbx.replicator, trunks=pinger)
    assert proxy.trunk_calls.pinger is pinger and proxy.trunk_calls.attempt_timeout == 0.7
    explicit = Proxy(SipNode(cfg, pbx.machine, pbx.replicator), attempt_timeout=0.2)
    assert explicit.trunk_calls.attempt_timeout == 0.2 and explicit.trunk_calls.pinger is None


# -- outbound -----------------------------------------------------------------------------------------------


async def test_outbound_call_goes_to_the_peer_recorded_outbound_and_local_extensions_win(pbx: TrunkPbx) -> None:
    peer = await pbx.peer()
    pbx.trunk("office-b", [addr(peer)])
    pbx.route("to-b", "2XXX", "office-b")
    pbx.route("prefix-9", "9.", "office-b", strip=1, prepend="+49")
    caller, call_id, sent = await place_call_text(pbx, "2001")
    invite = await peer.request("INVITE")
    host, port = pbx.address
    assert invite.uri == f"sip:2001@{peer.ip}:{peer.port}"
    assert invite.max_forwards == 69
    assert invite.headers.values("Record-Route") == [f"<sip:{host}:{port};lr>"]
    assert invite.top_via.host == host and invite.top_via.port == port
    received = parse_message(sent.encode())
    assert isinstance(received, Request)
    assert (invite.branch or "").endswith("." + loop_hash(received))  # §16.6 step 8: loop detection works
    assert "Proxy-Authorization" not in invite.headers
    assert invite.cseq.seq == 2  # the caller's CSeq, untouched
    row = pbx.call(call_id)
    assert row is not None and row["trunk"] == "office-b" and row["direction"] == "outbound", row
    assert row["caller"] == "1001" and row["callee"] == "2001"

    peer.answer(invite, 180, tag="peer")
    await caller.response(180, final=False)
    peer.answer(invite, 200, tag="peer")
    ok = await caller.response(200)
    assert ok.cseq.seq == 2
    row = pbx.call(call_id)
    assert row is not None and row["answered_at"] is not None
    caller.send(in_dialog("ACK", caller, ok, call_id, 2, peer.contact), pbx.address)
    ack = await peer.request("ACK")
    assert ack.cseq.seq == 2 and "Route" not in ack.headers
    caller.send(in_dialog("BYE", caller, ok, call_id, 3, peer.contact), pbx.address)
    bye = await peer.request("BYE")
    peer.answer(bye, 200, tag="peer")
    assert (await caller.response(200, method="BYE")).cseq.seq == 3
    row = pbx.call(call_id)
    assert row is not None and row["cause"] == "bye-caller", row

    # strip 1, prepend +49: the peer sees the transformed number; the record keeps what was dialled.
    mark = len(peer.messages)
    _, call_9 = await place_call(pbx, "92001")
    invite = await peer.request("INVITE", since=mark)
    assert invite.uri == f"sip:+492001@{peer.ip}:{peer.port}"
    row = pbx.call(call_9)
    assert row is not None and row["callee"] == "92001" and row["trunk"] == "office-b"
    peer.answer(invite, 486, tag="busy")
    await peer.request("ACK", since=mark)

    # A local extension matching the route's pattern is called locally; the peer sees nothing.
    pbx.create("2002")
    phone = await pbx.ua()
    pbx.bind("2002", phone)
    mark = len(peer.messages)
    _, local_id = await place_call(pbx, "2002")
    await phone.request("INVITE")
    row = pbx.call(local_id)
    assert row is not None and row["trunk"] == "" and row["direction"] == ""
    assert not [m for m in peer.messages[mark:] if isinstance(m, Request) and m.method == "INVITE"]


async def test_busy_peer_final_response_is_relayed_and_recorded(pbx: TrunkPbx) -> None:
    first, second = await pbx.peer(), await pbx.peer()
    pbx.trunk("office-b", [addr(first), addr(second)])
    pbx.route("to-b", "2XXX", "office-b")
    caller, call_id = await place_call(pbx, "2001")
    invite = await first.request("INVITE")
    first.answer(invite, 486, tag="busy")
    final = await caller.response(cseq=2)
    assert final.status == 486  # a peer's decision ends the call: no failover on 486
    assert not [m for m in second.messages if isinstance(m, Request)]
    row = pbx.call(call_id)
    assert row is not None and row["status_code"] == 486 and row["disposition"] == "busy", row
    assert pbx.health(first) != "down"


async def test_failover_on_silence_503_and_transport_error_then_answer(pbx: TrunkPbx) -> None:
    silent, busy, good = await pbx.peer(), await pbx.peer(), await pbx.peer()
    closed = _closed_tcp_port(good.ip)
    pbx.trunk("office-b", [addr(silent), f"{good.ip}:{closed};transport=tcp", addr(busy), addr(good)])
    pbx.route("to-b", "2XXX", "office-b")
    loop = asyncio.get_running_loop()
    caller, call_id = await place_call(pbx, "2001")
    first = await silent.request("INVITE")
    started = loop.time()
    # Silence: after attempt_timeout the TCP peer is tried (refused at once), then the 503 peer.
    overload = await busy.request("INVITE", within=ATTEMPT + 3.0)
    waited = loop.time() - started
    assert ATTEMPT * 0.9 <= waited < ATTEMPT + 2.0, waited
    assert overload.branch != first.branch and overload.uri == f"sip:2001@{busy.ip}:{busy.port}"
    busy.answer(overload, 503, tag="busy", headers=["Retry-After: 30"])
    await busy.request("ACK")  # the client transaction ACKs the 503 (§17.1.1.3)
    invite = await good.request("INVITE")
    assert invite.cseq.seq == 2 and invite.uri == f"sip:2001@{good.ip}:{good.port}"
    assert [pbx.health(silent), pbx.health(busy), pbx.health(good)] == ["down", "down", "unknown"]
    assert pbx.pinger.health[str(PeerAddress(good.ip, closed, "tcp"))].state == "down"
    metrics = pbx.proxy.trunk_calls.metrics_lines()
    for line in (f'raftpbx_trunk_call_attempts_failed_total{{node="n1",trunk="office-b",peer="{addr(silent)}",'
                 'reason="timeout"} 1',
                 f'raftpbx_trunk_call_attempts_failed_total{{node="n1",trunk="office-b",'
                 f'peer="{good.ip}:{closed};transport=tcp",reason="transport"}} 1',
                 f'raftpbx_trunk_call_attempts_failed_total{{node="n1",trunk="office-b",peer="{addr(busy)}",'
                 'reason="503"} 1',
                 f'raftpbx_trunk_call_attempts_total{{node="n1",trunk="office-b",peer="{addr(good)}"}} 1'):
        assert line in metrics, (line, metrics)
    good.answer(invite, 180, tag="good")
    await caller.response(180, final=False)
    good.answer(invite, 200, tag="good")
    ok = await caller.response(200)
    assert ok.to_tag == "good"
    assert not [m for m in caller.messages if isinstance(m, Response) and m.cseq.seq == 2 and m.status >= 300]
    row = pbx.call(call_id)
    assert row is not None and row["answered_at"] is not None and row["trunk"] == "office-b"

    # The abandoned attempt wakes up and rings: it is CANCELled (never before a provisional, §9.1).
    silent.answer(first, 180, tag="late")
    cancel = await silent.request("CANCEL")
    assert cancel.branch == first.branch
    assert not [m for m in caller.messages if isinstance(m, Response) and m.to_tag == "late"]

    # The next call skips the peers reported down and goes straight to the good one.
    marks = [len(silent.messages), len(busy.messages)]
    _, second_id = await place_call(pbx, "2002")
    # The peers reported down get nothing: the good one is the first tried (else it would come after them).
    again = await good.expect(lambda m: isinstance(m, Request) and m.method == "INVITE" and m.call_id == second_id)
    assert not [m for m in silent.messages[marks[0]:] if isinstance(m, Request) and m.call_id == second_id]
    assert not [m for m in busy.messages[marks[1]:] if isinstance(m, Request) and m.call_id == second_id]
    assert isinstance(again, Request)


async def test_peer_named_by_dns_is_resolved_off_the_loop(pbx: TrunkPbx) -> None:
    # Only "localhost" (/etc/hosts): a test must not send DNS queries off the machine.
    local = await UA("127.0.0.1").open()
    pbx.clients.append(local)
    pbx.trunk("office-b", [f"localhost:{local.port}"])
    pbx.route("to-b", "2XXX", "office-b")
    caller, call_id = await place_call(pbx, "2001")
    invite = await local.request("INVITE")
    assert invite.uri == f"sip:2001@localhost:{local.port}" and invite.call_id == call_id
    local.answer(invite, 200, tag="dns")
    assert (await caller.response(200)).to_tag == "dns"


async def test_slow_peer_that_rings_after_its_attempt_was_abandoned_gets_the_call_back(pbx: TrunkPbx) -> None:
    """A raftpbx peer answers 100 only after its commit: one slower than attempt_timeout must not make the
    call reach the callee twice (through two of its nodes). Its late 180 revives its attempt; the next
    peer's attempt is given up (CANCELled once it rings, §9.1), and the slow peer counts as up again."""
    slow, other = await pbx.peer(), await pbx.peer()
    pbx.trunk("office-b", [addr(slow), addr(other)])
    pbx.route("to-b", "2XXX", "office-b")
    caller, call_id = await place_call(pbx, "2001")
    first = await slow.request("INVITE")
    second = await other.request("INVITE", within=ATTEMPT + 3.0)
    assert pbx.health(slow) == "down"
    slow.answer(first, 100)  # its late 100 is enough: the next attempt's failure no longer decides the call
    await _until(lambda: pbx.health(slow) == "up")
    other.answer(second, 482, tag="other")  # e.g. the callee saw our two INVITEs: merged request (§8.2.2.2)
    await other.request("ACK")
    slow.answer(first, 180, tag="slow")
    ringing = await caller.response(180, final=False)
    assert ringing.to_tag == "slow"
    slow.answer(first, 200, tag="slow")
    ok = await caller.response(200)
    assert ok.to_tag == "slow"
    assert not [m for m in caller.messages if isinstance(m, Response) and m.to_tag == "other"]
    assert not [m for m in slow.messages if isinstance(m, Request) and m.method == "CANCEL"]
    row = pbx.call(call_id)
    assert row is not None and row["answered_at"] is not None


async def test_revived_attempt_gives_the_later_one_up_cancel_once_it_rings(pbx: TrunkPbx) -> None:
    slow, other = await pbx.peer(), await pbx.peer()
    pbx.trunk("office-b", [addr(slow), addr(other)])
    pbx.route("to-b", "2XXX", "office-b")
    caller, _ = await place_call(pbx, "2001")
    first = await slow.request("INVITE")
    second = await other.request("INVITE", within=ATTEMPT + 3.0)
    slow.answer(first, 180, tag="slow")
    assert (await caller.response(180, final=False)).to_tag == "slow"
    other.answer(second, 180, tag="other")
    cancel = await other.request("CANCEL")  # §9.1: only now that it rang
    assert cancel.branch == second.branch
    other.answer(cancel, 200, tag="other")
    other.answer(second, 487, tag="other")
    slow.answer(first, 200, tag="slow")
    assert (await caller.response(200)).to_tag == "slow"
    assert not [m for m in caller.messages if isinstance(m, Response) and m.to_tag == "other"]


def _closed_tcp_port(ip: str) -> int:
    """A TCP port on `ip` that nothing listens on (bound then closed: connecting is refused at once)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((ip, 0))
        return int(sock.getsockname()[1])


async def test_every_peer_failed_gives_503_retry_after_and_a_failure_record(pbx: TrunkPbx) -> None:
    silent, busy = await pbx.peer(), await pbx.peer()
    pbx.trunk("office-b", [addr(silent), addr(busy)])
    pbx.route("to-b", "2XXX", "office-b")
    caller, call_id = await place_call(pbx, "2001")
    await silent.request("INVITE")
    overload = await busy.request("INVITE", within=ATTEMPT + 3.0)
    busy.answer(overload, 503, tag="busy")
    final = await caller.response(cseq=2)
    assert final.status == 503 and final.headers.get("Retry-After") == "5"
    assert 'raftpbx_trunk_calls_unavailable_total{node="n1",trunk="office-b"} 1' in pbx.proxy.trunk_calls.metrics_lines()
    row = pbx.call(call_id)
    assert row is not None and row["status_code"] == 503 and row["cause"] == "failure", row
    assert row["trunk"] == "office-b" and row["direction"] == "outbound"


async def test_no_failover_after_a_provisional_response_rfc3261_16_7(pbx: TrunkPbx) -> None:
    first, second = await pbx.peer(), await pbx.peer()
    pbx.trunk("office-b", [addr(first), addr(second)])
    pbx.route("to-b", "2XXX", "office-b")
    caller, _ = await place_call(pbx, "2001")
    invite = await first.request("INVITE")
    first.answer(invite, 183, tag="early")
    await caller.response(183, final=False)
    first.answer(invite, 503, tag="early")
    final = await caller.response(cseq=2)
    assert final.status == 500  # §16.7 step 6: a downstream 503 goes upstream as 500
    assert not [m for m in second.messages if isinstance(m, Request)]
    # A 100 Trying stops the attempt timer too: the peer has the request.
    mark = len(first.messages)
    caller_2, call_2 = await place_call(pbx, "2001")
    invite = await first.request("INVITE", since=mark)
    first.answer(invite, 100)
    await asyncio.sleep(0)  # let the 100 arrive before the deadline below starts counting
    deadline = asyncio.get_running_loop().time() + ATTEMPT * 1.5
    while asyncio.get_running_loop().time() < deadline:  # bounded: the attempt timer would have fired by now
        assert not [m for m in second.messages if isinstance(m, Request) and m.call_id == call_2]
        await asyncio.sleep(0.05)
    first.answer(invite, 200, tag="late-ok")
    assert (await caller_2.response(200, cseq=2)).to_tag == "late-ok"


def _cancel_text(invite_sent: str) -> str:
    """The caller's CANCEL of the INVITE it sent as `invite_sent` (§9.1: same Request-URI, Via, CSeq number)."""
    lines = invite_sent.split("\r\n")
    keep = [line for line in lines[1:] if line.split(":", 1)[0] in ("Via", "From", "To", "Call-ID", "CSeq")]
    keep = [line.replace(" INVITE", " CANCEL") if line.startswith("CSeq") else line for line in keep]
    return "\r\n".join([lines[0].replace("INVITE", "CANCEL", 1), "Max-Forwards: 70", *keep,
                        "Content-Length: 0", "", ""])


async def test_caller_cancel_during_an_attempt_stops_the_failover_rfc3261_16_10(pbx: TrunkPbx) -> None:
    first, second = await pbx.peer(), await pbx.peer()
    pbx.trunk("office-b", [addr(first), addr(second)])
    pbx.route("to-b", "2XXX", "office-b")
    for rang in (True, False):
        mark = len(first.messages)
        caller, call_id, caller_invite = await place_call_text(pbx, "2001")
        invite = await first.request("INVITE", since=mark)
        if rang:
            first.answer(invite, 180, tag="ring")
            await caller.response(180, final=False)
        caller.send(_cancel_text(caller_invite), pbx.address)
        assert (await caller.response(200, method="CANCEL")).status == 200
        if rang:
            cancel = await first.request("CANCEL", since=mark)  # §16.10: the pending branch is CANCELled
            assert cancel.branch == invite.branch and cancel.cseq.seq == invite.cseq.seq
            first.answer(cancel, 200, tag="ring")
            first.answer(invite, 487, tag="ring")
        final = await caller.response(cseq=2)
        assert final.status == 487
        row = await _ended(pbx, call_id)
        assert row["cause"] == "cancel" and row["trunk"] == "office-b", row
    # The unanswered attempt is neither failed over nor reported: the caller gave up, not the peer.
    deadline = asyncio.get_running_loop().time() + ATTEMPT * 1.5
    while asyncio.get_running_loop().time() < deadline:
        assert not [m for m in second.messages if isinstance(m, Request)]
        await asyncio.sleep(0.05)
    assert pbx.health(first) == "unknown"


# -- credentials towards the peer --------------------------------------------------------------------------


def _challenge(peer: UA, request: Request, status: int = 407, realm: str = PEER_REALM, md5_only: bool = False) -> None:
    """A digest challenge as a raftpbx peer makes it: SHA-256 and MD5 offered (or MD5 only, as Kamailio)."""
    header = "Proxy-Authenticate" if status == 407 else "WWW-Authenticate"
    nonce = make_nonce(PEER_SECRET, realm, time.time())
    values = [v for v in make_challenge(realm, nonce) if not md5_only or "SHA-256" not in v]
    peer.answer(request, status, tag=f"auth{status}", headers=[f"{header}: {v}" for v in values])


def _check_digest(request: Request, header: str = "Proxy-Authorization", algorithm: str = "SHA-256") -> bool:
    """The peer's check of our answer (the real verifier); SHA-256 is chosen when offered."""
    value = request.headers.get(header)
    assert value is not None, f"no {header}"
    credentials = parse_authorization(value)
    assert credentials.algorithm == algorithm and credentials.username == "office-a"
    hash_a1 = ha1_sha256 if algorithm == "SHA-256" else ha1_md5
    result = verify(credentials, method="INVITE", ha1=hash_a1("office-a", PEER_REALM, PEER_PASSWORD),
                    expected_realm=PEER_REALM, secret=PEER_SECRET, now=time.time(), lifetime=30.0,
                    request_uri=request.uri)
    return result.status is AuthStatus.OK


async def test_peer_challenge_is_answered_once_with_cseq_translation_rfc3261_22_2(pbx: TrunkPbx) -> None:
    peer = await pbx.peer()
    pbx.trunk("office-b", [addr(peer)], username="office-a", realm=PEER_REALM, password=PEER_PASSWORD)
    pbx.route("to-b", "2XXX", "office-b")
    caller, call_id = await place_call(pbx, "2001")
    first = await peer.request("INVITE")
    _challenge(peer, first)
    await peer.request("ACK")
    second = await peer.request("INVITE", since=peer.messages.index(first) + 1)
    assert second.cseq.seq == first.cseq.seq + 1  # §8.1.3.5 / §22.2: CSeq incremented
    assert second.branch != first.branch
    assert _check_digest(second)
    assert not [m for m in caller.messages if isinstance(m, Response) and m.status == 407 and m.cseq.seq == 2]
    peer.answer(second, 180, tag="peer")
    ringing = await caller.response(180, final=False)
    assert ringing.cseq.seq == 2  # mapped back to the caller's CSeq
    peer.answer(second, 200, tag="peer")
    ok = await caller.response(200)
    assert ok.cseq.seq == 2
    caller.send(in_dialog("ACK", caller, ok, call_id, 2, peer.contact), pbx.address)
    ack = await peer.request("ACK", since=peer.messages.index(second))
    assert ack.cseq.seq == 3  # the ACK of the 2xx carries the INVITE's CSeq as the peer knows it
    # A PRACK names the INVITE's CSeq in RAck (RFC 3262 §7.2): translated too.
    caller.send(in_dialog("PRACK", caller, ok, call_id, 3, peer.contact).replace(
        "Content-Length", "RAck: 1 2 INVITE\r\nContent-Length"), pbx.address)
    prack = await peer.request("PRACK")
    assert prack.cseq.seq == 4 and prack.headers.get("RAck") == "1 3 INVITE"
    peer.answer(prack, 200, tag="peer")
    assert (await caller.response(200, method="PRACK")).cseq.seq == 3
    caller.send(in_dialog("BYE", caller, ok, call_id, 4, peer.contact), pbx.address)
    bye = await peer.request("BYE")
    assert bye.cseq.seq == 5  # above the peer's view of our INVITE (§12.2.2)
    peer.answer(bye, 200, tag="peer")
    bye_ok = await caller.response(200, method="BYE")
    assert bye_ok.cseq.seq == 4
    # A request from the peer's side is in its own CSeq space: not translated.
    peer.send("\r\n".join([
        f"INFO {caller.contact} SIP/2.0",
        f"Via: SIP/2.0/UDP {peer.ip}:{peer.port};branch=z9hG4bK{secrets.token_hex(8)};rport",
        "Max-Forwards: 70", *[f"Route: {r}" for r in second.headers.values("Record-Route")],
        f"From: <sip:2001@{DOMAIN}>;tag=peer", f"To: {ok.headers.get('From')}",
        f"Call-ID: {call_id}", "CSeq: 7 INFO", "Content-Length: 0", "", "",
    ]), pbx.address)
    info = await caller.request("INFO")
    assert info.cseq.seq == 7
    row = pbx.call(call_id)
    assert row is not None and row["answered_at"] is not None and row["cause"] == "bye-caller"


async def test_second_challenge_other_realm_or_no_credentials_are_relayed_never_looped(pbx: TrunkPbx) -> None:
    peer, plain = await pbx.peer(), await pbx.peer()
    pbx.trunk("office-b", [addr(peer)], username="office-a", realm=PEER_REALM, password=PEER_PASSWORD)
    pbx.trunk("office-c", [addr(plain)])
    pbx.route("to-b", "2XXX", "office-b")
    pbx.route("to-c", "3XXX", "office-c")
    # A second challenge on the same peer: relayed as the final response.
    caller, call_id = await place_call(pbx, "2001")
    first = await peer.request("INVITE")
    _challenge(peer, first, status=401, md5_only=True)
    second = await peer.request("INVITE", since=peer.messages.index(first) + 1)
    assert _check_digest(second, "Authorization", "MD5")  # a 401 is answered with Authorization
    _challenge(peer, second, status=401)
    final = await caller.response(cseq=2)
    assert final.status == 401 and final.cseq.seq == 2
    invites = [m for m in peer.messages if isinstance(m, Request) and m.method == "INVITE" and m.call_id == call_id]
    assert len(invites) == 2
    row = pbx.call(call_id)
    assert row is not None and row["status_code"] == 401
    # Another realm: not answered.
    mark = len(peer.messages)
    _, other_id = await place_call(pbx, "2002")
    invite = await peer.request("INVITE", since=mark)
    _challenge(peer, invite, realm="elsewhere.test")
    await peer.request("ACK", since=mark)
    row = await _ended(pbx, other_id)
    assert row["status_code"] == 407
    assert len([m for m in peer.messages[mark:] if isinstance(m, Request) and m.method == "INVITE"]) == 1
    # No credentials on the trunk: the challenge is the final response.
    _, plain_id = await place_call(pbx, "3001")
    invite = await plain.request("INVITE")
    _challenge(plain, invite)
    row = await _ended(pbx, plain_id)
    assert row["status_code"] == 407 and row["trunk"] == "office-c"


async def _until(condition: Callable[[], bool], within: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def _ended(pbx: TrunkPbx, call_id: str, within: float = 3.0) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        row = pbx.call(call_id)
        if row is not None and row["ended_at"] is not None:
            return row
        assert loop.time() < deadline, f"call {call_id} not ended: {row}"
        await asyncio.sleep(0.02)


# -- inbound ------------------------------------------------------------------------------------------------


def _peer_invite(pbx: TrunkPbx, peer: UA, callee: str, call_id: str, *, via_host: str | None = None,
                 from_user: str = "2001") -> str:
    host, port = pbx.address
    sent_by = via_host or peer.ip
    return "\r\n".join([
        f"INVITE sip:{callee}@{host}:{port} SIP/2.0",
        f"Via: SIP/2.0/UDP {sent_by}:{peer.port};branch=z9hG4bK{secrets.token_hex(8)};rport",
        "Max-Forwards: 70",
        f"From: <sip:{from_user}@{sent_by}>;tag=peer-{call_id[:6]}",
        f"To: <sip:{callee}@{host}>",
        f"Call-ID: {call_id}", "CSeq: 1 INVITE",
        f"Contact: <sip:{from_user}@{sent_by}:{peer.port}>",
        "Content-Length: 0", "", "",
    ])


async def test_inbound_from_allow_listed_source_needs_no_challenge_and_reaches_local_extensions_only(
        pbx: TrunkPbx) -> None:
    peer = await pbx.peer()
    pbx.trunk("office-b", [addr(peer)], allow=(f"{peer.ip}/32",))
    pbx.route("to-b", "2XXX", "office-b")
    pbx.create("1001")
    phone = await pbx.ua()
    pbx.bind("1001", phone)
    call_id = uuid.uuid4().hex
    peer.send(_peer_invite(pbx, peer, "1001", call_id), pbx.address)
    invite = await phone.request("INVITE")
    assert invite.call_id == call_id
    row = pbx.call(call_id)
    assert row is not None and row["trunk"] == "office-b" and row["direction"] == "inbound", row
    assert row["caller"] == "2001" and row["callee"] == "1001"
    phone.answer(invite, 200, tag="phone")
    ok = await peer.response(200)
    assert ok.to_tag == "phone"
    assert not [m for m in peer.messages if isinstance(m, Response) and m.status == 407]
    # No transit: a number a route would send to a trunk is not a local extension -> 404, recorded inbound.
    transit = uuid.uuid4().hex
    peer.send(_peer_invite(pbx, peer, "2555", transit), pbx.address)
    refused = await peer.expect(lambda m: isinstance(m, Response) and m.call_id == transit and m.status >= 200)
    assert isinstance(refused, Response) and refused.status == 404
    row = pbx.call(transit)
    assert row is not None and row["status_code"] == 404 and row["direction"] == "inbound"
    assert len([m for m in peer.messages if isinstance(m, Request) and m.method == "INVITE"]) == 0
    # An extension without a binding: 480.
    pbx.create("1002")
    nobody = uuid.uuid4().hex
    peer.send(_peer_invite(pbx, peer, "1002", nobody), pbx.address)
    unavailable = await peer.expect(lambda m: isinstance(m, Response) and m.call_id == nobody and m.status >= 200)
    assert isinstance(unavailable, Response) and unavailable.status == 480


async def test_stranger_gets_407_even_when_forging_the_allowed_address_in_headers(pbx: TrunkPbx) -> None:
    peer, stranger = await pbx.peer(), await pbx.peer()
    pbx.trunk("office-b", [addr(peer)], allow=(f"{peer.ip}/32",))
    pbx.create("1001")
    phone = await pbx.ua()
    pbx.bind("1001", phone)
    call_id = uuid.uuid4().hex
    stranger.send(_peer_invite(pbx, stranger, "1001", call_id, via_host=peer.ip), pbx.address)
    challenge = await stranger.expect(lambda m: isinstance(m, Response) and m.call_id == call_id)
    assert isinstance(challenge, Response) and challenge.status == 407
    stranger.send(ack_text(challenge, pbx), pbx.address)
    assert pbx.call(call_id) is None
    assert not [m for m in phone.messages if isinstance(m, Request)]


# -- across a failover of the serving node (Contract C) -----------------------------------------------------


@pytest.mark.parametrize("challenged", [False, True])
async def test_retransmitted_invite_at_the_next_leader_continues_the_same_peer_transaction(
        tmp_path: Path, challenged: bool) -> None:
    """The node that forked to the peer dies before the answer; the caller's INVITE retransmission reaches
    the next holder of the service address, which sends the peer the SAME transaction (same branch, same
    sent-by: §17.2.3), and the peer's 2xx, a stray response there, is committed and relayed with the
    caller's CSeq (the offset rides in our Record-Route when the INVITE was resent with credentials)."""
    pair = Pair(tmp_path)
    await pair.start()
    try:
        first = pair.first
        first.create("1001")
        peer = await UA(first.ip.rsplit(".", 1)[0] + ".150").open()
        first.clients.append(peer)
        credentials: dict[str, Any] = (
            {"username": "office-a", "realm": PEER_REALM, "password": PEER_PASSWORD} if challenged else {})
        add_trunk(first, "office-b", [addr(peer)], **credentials)
        add_route(first, "to-b", "2XXX", "office-b")
        caller = await first.ua()
        call_id = uuid.uuid4().hex
        text = await invite_through(pair.service, caller, "2001", call_id)
        invite = await peer.request("INVITE")
        if challenged:
            _challenge(peer, invite)
            invite = await peer.request("INVITE", since=peer.messages.index(invite) + 1)
            assert invite.cseq.seq == 3 and _check_digest(invite)
        assert invite.top_via.host == pair.service[0] and invite.top_via.port == pair.service[1]
        await pair.fail_over()
        mark = len(peer.messages)
        caller.send(text, pair.service)  # the caller retransmits (it got no provisional response yet)
        if challenged:
            again = await peer.request("INVITE", since=mark)  # attempt 0 again: the peer repeats its 407
            assert again.cseq.seq == 2
            _challenge(peer, again)
            again = await peer.expect(lambda m: isinstance(m, Request) and m.method == "INVITE"
                                      and m.cseq.seq == 3, since=mark)
        else:
            again = await peer.request("INVITE", since=mark)
        assert isinstance(again, Request)
        assert again.branch == invite.branch  # a retransmission of the transaction the peer already has
        assert again.top_via.host == pair.service[0]
        peer.answer(invite, 200, tag="peer")
        ok = await caller.response(200, cseq=2)
        assert ok.to_tag == "peer" and ok.cseq.seq == 2
        with pair.second.machine.lock:
            call = pair.second.machine.state.calls[call_id]
        assert call.answered_at is not None and call.trunk == "office-b" and call.direction == "outbound"
        caller.send(in_dialog("ACK", caller, ok, call_id, 2, peer.contact), pair.service)
        ack = await peer.expect(lambda m: isinstance(m, Request) and m.method == "ACK" and m.to_tag == "peer",
                                since=mark)
        assert ack.cseq.seq == (3 if challenged else 2)
    finally:
        await pair.close()
