"""RFC 3261 §17 / RFC 6026 transactions, driven through an in-memory network with a fake clock.

Two `TransactionLayer`s (a client and a server) exchange real bytes (`to_bytes` then `parse_message`)
over a tiny network that can drop messages; the test is the TU on both sides. Test names cite the
section they check. Retransmission schedules are asserted exactly, from T1/T2/T4. Every timer A..M
(and the 100 Trying timer) also has a golden transcript under tests/data/sip/transcripts/;
regenerate them on purpose with RAFTPBX_REGEN_TRANSCRIPTS=1 and review the diff.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from raftpbx.transport.sip.errors import SipValueError
from raftpbx.transport.sip.message import Request, Response, make_response, parse_message
from raftpbx.transport.sip.transaction import (
    DEFAULT_TIMERS,
    ClientTransaction,
    Event,
    InviteClientTransaction,
    InviteServerTransaction,
    NonInviteClientTransaction,
    NonInviteServerTransaction,
    RequestReceived,
    ResponseReceived,
    ServerTransaction,
    State,
    Terminated,
    TimedOut,
    TimerConfig,
    TransactionLayer,
    TransportError,
    build_ack,
    build_cancel,
    derive_branch,
    server_key,
)

CLIENT = ("127.0.0.1", 5070)
SERVER = ("127.0.0.1", 5060)
T1, T2, T4 = DEFAULT_TIMERS.t1, DEFAULT_TIMERS.t2, DEFAULT_TIMERS.t4
TRANSCRIPTS = Path(__file__).resolve().parents[1] / "data" / "sip" / "transcripts"

Message = Request | Response


def request(
    method: str = "INVITE",
    *,
    branch: str | None = "z9hG4bKinv1",
    cseq: int = 1,
    cseq_method: str | None = None,
    to_tag: str | None = None,
    from_tag: str = "a1",
    call_id: str = "call-1@127.0.0.1",
    sent_by: str = "127.0.0.1:5070",
    uri: str = "sip:bob@127.0.0.1:5060",
    extra: str = "",
) -> Request:
    to = "<sip:bob@127.0.0.1>" + (f";tag={to_tag}" if to_tag else "")
    via = f"SIP/2.0/UDP {sent_by}" + (f";branch={branch}" if branch else "")
    text = (
        f"{method} {uri} SIP/2.0\r\n"
        f"Via: {via}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:alice@127.0.0.1>;tag={from_tag}\r\n"
        f"To: {to}\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {cseq} {cseq_method or method}\r\n"
        f"{extra}"
        "Content-Length: 0\r\n\r\n"
    )
    msg = parse_message(text.encode())
    assert isinstance(msg, Request)
    return msg


def summary(msg: Message) -> str:
    if isinstance(msg, Request):
        tag = f" to-tag={msg.to_tag}" if msg.to_tag else ""
        return f"{msg.method} cseq={msg.cseq.seq} branch={msg.branch}{tag}"
    tag = f" to-tag={msg.to_tag}" if msg.to_tag else ""
    return f"{msg.status} {msg.reason} ({msg.cseq.method}){tag}"


def describe(event: Event) -> str:
    if isinstance(event, RequestReceived):
        owner = event.transaction.kind if event.transaction else "no transaction"
        return f"RequestReceived {event.request.method} [{owner}]"
    if isinstance(event, ResponseReceived):
        owner = event.transaction.kind if event.transaction else "no transaction"
        again = " retransmission" if event.retransmission else ""
        return f"ResponseReceived {event.response.status}{again} [{owner}]"
    if isinstance(event, TimedOut):
        return f"TimedOut timer {event.timer} [{event.transaction.kind}]"
    if isinstance(event, TransportError):
        return f"TransportError {event.reason} [{event.transaction.kind}]"
    return f"Terminated by {event.cause} [{event.transaction.kind} {event.transaction.request.method}]"


Tu = Callable[["Net", Event], None]


class Net:
    """Two transaction layers, a lossy in-memory network between them and a fake clock."""

    def __init__(self, timers: TimerConfig = DEFAULT_TIMERS, *, reliable: bool = False) -> None:
        self.t0 = 1000.0
        self.now = self.t0
        self.reliable = reliable
        self.client = TransactionLayer(timers=timers)
        self.server = TransactionLayer(timers=timers)
        self.wire: list[tuple[str, bytes, Message]] = []
        self.log: list[str] = []
        self.sent: list[tuple[float, str, str, str | None]] = []  # (t, side, summary, timer)
        self.events: dict[str, list[Event]] = {"client": [], "server": []}
        self.tu: dict[str, Tu | None] = {"client": None, "server": None}
        self.lose: Callable[[str, Message], bool] = lambda side, msg: False

    @property
    def t(self) -> float:
        return round(self.now - self.t0, 9)

    def layer(self, side: str) -> TransactionLayer:
        return self.client if side == "client" else self.server

    def note(self, text: str) -> None:
        self.log.append(f"{self.t:7.3f}  {text}")

    def pump(self) -> None:
        """Collect transmissions and events of both layers, letting the TUs react, until quiet."""
        for _ in range(100):
            busy = False
            for side in ("client", "server"):
                layer = self.layer(side)
                for tr in layer.messages_to_send():
                    busy = True
                    assert tr.destination == (SERVER if side == "client" else CLIENT)
                    assert tr.reliable is self.reliable
                    why = ""
                    if tr.retransmission:
                        why = f"  (retransmission{', timer ' + tr.timer if tr.timer else ''})"
                    elif tr.timer:
                        why = f"  (timer {tr.timer})"
                    self.note(f"{side} sends {summary(tr.message)}{why}")
                    self.sent.append((self.t, side, summary(tr.message), tr.timer))
                    self.wire.append((side, tr.message.to_bytes(), tr.message))
                while (event := layer.next_event()) is not None:
                    busy = True
                    self.events[side].append(event)
                    self.note(f"{side} event {describe(event)}")
                    tu = self.tu[side]
                    if tu is not None:
                        tu(self, event)
            if not busy:
                return
        raise AssertionError("TUs did not settle")

    def transfer(self) -> None:
        """Deliver (or lose, per `self.lose`) everything in flight, and what that provokes."""
        for _ in range(100):
            self.pump()
            if not self.wire:
                return
            wire, self.wire = self.wire, []
            for side, data, msg in wire:
                if self.lose(side, msg):
                    self.note(f"network loses {summary(msg)}")
                    continue
                other = "server" if side == "client" else "client"
                source = CLIENT if side == "client" else SERVER
                self.layer(other).receive(parse_message(data), self.now, source, reliable=self.reliable)
        raise AssertionError("network did not settle")

    def drop(self) -> None:
        """Lose everything in flight."""
        self.pump()
        for _, _, msg in self.wire:
            self.note(f"network loses {summary(msg)}")
        self.wire = []

    def next_timer(self) -> float | None:
        times = [t for t in (self.client.next_timer(), self.server.next_timer()) if t is not None]
        return min(times) if times else None

    def advance(self, dt: float) -> None:
        """Move the clock by `dt`, firing every timer on the way, each at its exact time, and
        transferring what it sends."""
        target = self.now + dt
        for _ in range(10_000):
            deadline = self.next_timer()
            if deadline is None or deadline > target:
                break
            self.now = deadline
            self.client.handle_timer(self.now)
            self.server.handle_timer(self.now)
            self.transfer()
        self.now = target
        self.transfer()

    def advance_to(self, t: float) -> None:
        self.advance(self.t0 + t - self.now)

    def run_out(self) -> None:
        """Advance until no timer is left (bounded)."""
        for _ in range(1000):
            deadline = self.next_timer()
            if deadline is None:
                return
            self.advance(deadline - self.now)
        raise AssertionError("timers never ran out")

    def timer_times(self, side: str, timer: str) -> list[float]:
        return [t for t, s, _, why in self.sent if s == side and why == timer]

    def times(self, side: str, text: str) -> list[float]:
        return [t for t, s, what, _ in self.sent if s == side and what.startswith(text)]

    def kinds(self, side: str, cls: type) -> list[Event]:
        return [e for e in self.events[side] if isinstance(e, cls)]

    def start(self, req: Request) -> ClientTransaction:
        tx = self.client.send_request(req, self.now, SERVER, reliable=self.reliable)
        self.transfer()
        return tx


def answer(status: int, *, to_tag: str = "b1", when: str = "INVITE") -> Tu:
    """A server TU that answers every new request of method `when` with `status`."""

    def tu(net: Net, event: Event) -> None:
        if isinstance(event, RequestReceived) and event.transaction and event.request.method == when:
            net.server.send_response(
                event.transaction, make_response(event.request, status, to_tag=to_tag), net.now
            )

    return tu


def lose_all(side: str, msg: Message) -> bool:
    return True


def schedule(start: float, first: float, cap: float | None, end: float) -> list[float]:
    """Retransmission times: start+first, then intervals doubling (capped at `cap`), before `end`."""
    out = []
    t, interval = start + first, first
    while t < end:
        out.append(t)
        interval = interval * 2 if cap is None else min(interval * 2, cap)
        t += interval
    return out


# ------------------------------------------------------------------------------------------------
# §17.1.1 INVITE client transaction


def test_17_1_1_2_timer_a_doubles_without_cap_until_timer_b() -> None:
    # Timer A starts at T1 and doubles each time; unlike timer E it is not capped at T2, so over
    # UDP an unanswered INVITE is sent at 0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 and timer B fires at 64*T1.
    net = Net()
    net.lose = lose_all
    tx = net.start(request())
    net.run_out()
    assert net.times("client", "INVITE") == [0.0, *schedule(0.0, T1, None, 64 * T1)]
    assert net.times("client", "INVITE") == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    [timeout] = net.kinds("client", TimedOut)
    assert isinstance(timeout, TimedOut) and timeout.timer == "B" and timeout.transaction is tx
    assert net.log[-1].startswith(f"{64 * T1:7.3f}")
    assert tx.state is State.TERMINATED and len(net.client) == 0


def test_17_1_1_2_provisional_stops_retransmissions_and_timer_b() -> None:
    net = Net()
    net.tu["server"] = None  # the server TU stays silent: only the transaction's 100 Trying
    tx = net.start(request())
    net.advance(0.2)  # 100 Trying from the server at 200 ms
    assert tx.state is State.PROCEEDING
    assert tx.next_timer() is None  # A and B stopped: Proceeding has no timer (§17.1.1.2)
    net.advance(200.0)
    assert net.times("client", "INVITE") == [0.0]
    assert not net.kinds("client", TimedOut)
    assert tx.state is State.PROCEEDING  # the TU (proxy timer C) decides, not the transaction


def test_17_1_1_2_non_2xx_final_goes_to_completed_and_timer_d() -> None:
    net = Net()
    net.tu["server"] = answer(486)
    tx = net.start(request())
    assert tx.state is State.COMPLETED
    [resp] = net.kinds("client", ResponseReceived)
    assert isinstance(resp, ResponseReceived) and resp.response.status == 486
    assert net.times("client", "ACK") == [0.0]
    assert tx.next_timer() == net.now + DEFAULT_TIMERS.timer_d
    net.run_out()
    assert net.kinds("client", Terminated)[0].transaction is tx  # type: ignore[attr-defined]
    assert len(net.client) == 0 and len(net.server) == 0


def test_17_1_1_2_completed_resends_ack_for_retransmitted_final_not_to_tu() -> None:
    net = Net()
    net.tu["server"] = answer(486)
    net.lose = lambda side, msg: isinstance(msg, Request) and msg.method == "ACK"  # every ACK lost
    tx = net.start(request())
    net.advance(2.0)
    # The server retransmits 486 on timer G (0.5, 1.5); each time the client re-ACKs, TU sees one 486.
    assert net.times("server", "486") == [0.0, 0.5, 1.5]
    assert net.times("client", "ACK") == [0.0, 0.5, 1.5]
    assert [e.response.status for e in net.kinds("client", ResponseReceived)] == [486]  # type: ignore[attr-defined]
    assert tx.state is State.COMPLETED


def test_17_1_1_3_ack_for_non_2xx_is_built_by_the_client_transaction() -> None:
    invite = request(extra="Route: <sip:127.0.0.1:5061;lr>\r\nRoute: <sip:127.0.0.1:5062;lr>\r\n")
    response = make_response(invite, 404, to_tag="t404")
    ack = build_ack(invite, response)
    assert ack.method == "ACK"
    assert ack.uri == invite.uri
    assert [str(v) for v in ack.vias] == [str(invite.top_via)]
    assert ack.branch == invite.branch
    assert ack.call_id == invite.call_id
    assert ack.from_ == invite.from_
    assert ack.to == response.to and ack.to_tag == "t404"
    assert (ack.cseq.seq, ack.cseq.method) == (invite.cseq.seq, "ACK")
    assert [str(r.uri) for r in ack.routes] == ["sip:127.0.0.1:5061;lr", "sip:127.0.0.1:5062;lr"]
    assert ack.body == b""
    again = parse_message(ack.to_bytes())
    assert again == ack


def test_17_1_1_3_ack_matches_the_server_transaction_and_confirms_it() -> None:
    net = Net()
    net.tu["server"] = answer(486)
    net.start(request())
    [ist] = [e.transaction for e in net.kinds("server", RequestReceived)]  # type: ignore[attr-defined]
    assert isinstance(ist, InviteServerTransaction)
    assert ist.state is State.CONFIRMED  # the ACK built by the client matched (same branch)
    assert len(net.kinds("server", RequestReceived)) == 1  # the ACK did not reach the TU


def test_rfc6026_8_4_2xx_goes_to_accepted_and_timer_m() -> None:
    net = Net()
    net.tu["server"] = answer(200)
    tx = net.start(request())
    assert tx.state is State.ACCEPTED
    assert net.times("client", "ACK") == []  # the TU ACKs a 2xx, never the transaction
    assert tx.next_timer() == net.now + 64 * T1
    net.advance(64 * T1)
    assert tx.state is State.TERMINATED


def test_rfc6026_accepted_state_absorbs_2xx_retransmit() -> None:
    # The UAS core retransmits its 2xx (§13.3.1.4). While Accepted, the client transaction matches
    # each copy (no stray response), hands it to the TU marked as a retransmission so that the TU
    # re-sends its ACK, and sends no ACK itself (RFC 6026 §8.4).
    net = Net()
    net.tu["server"] = answer(200)
    tx = net.start(request())
    ok = next(e for e in net.kinds("server", RequestReceived))
    assert isinstance(ok, RequestReceived)
    two_hundred = make_response(ok.request, 200, to_tag="b1")
    net.server.send_stateless(two_hundred, CLIENT, reliable=False)  # the UAS core's retransmission
    net.advance(0.5)
    responses = net.kinds("client", ResponseReceived)
    assert [(e.response.status, e.retransmission, e.transaction) for e in responses] == [  # type: ignore[attr-defined]
        (200, False, tx),
        (200, True, tx),
    ]
    assert net.times("client", "ACK") == []
    assert tx.state is State.ACCEPTED


def test_rfc6026_8_4_forked_2xx_with_another_tag_is_not_a_retransmission() -> None:
    net = Net()
    net.tu["server"] = answer(200, to_tag="fork1")
    tx = net.start(request())
    ok = net.kinds("server", RequestReceived)[0]
    assert isinstance(ok, RequestReceived)
    net.server.send_stateless(make_response(ok.request, 200, to_tag="fork2"), CLIENT)
    net.transfer()
    assert [(e.response.to_tag, e.retransmission) for e in net.kinds("client", ResponseReceived)] == [  # type: ignore[attr-defined]
        ("fork1", False),
        ("fork2", False),
    ]
    assert tx.state is State.ACCEPTED


def test_17_1_1_2_reliable_transport_no_timer_a_and_timer_d_zero() -> None:
    net = Net(reliable=True)
    net.lose = lose_all
    tx = net.start(request())
    assert set(tx._deadlines) == {"B"}
    net.run_out()
    assert net.times("client", "INVITE") == [0.0]
    assert [e.timer for e in net.kinds("client", TimedOut)] == ["B"]  # type: ignore[attr-defined]

    net = Net(reliable=True)
    net.tu["server"] = answer(503)
    tx = net.start(request())
    assert tx.state is State.TERMINATED  # timer D = 0: Terminated as soon as the ACK is sent
    assert net.times("client", "ACK") == [0.0]
    assert len(net.client) == 0


def test_17_1_4_transport_error_informs_tu_and_terminates() -> None:
    net = Net()
    tx = net.client.send_request(request(), net.now, SERVER)
    net.client.messages_to_send()
    net.client.transport_error(tx, net.now, "connection refused")
    events = []
    while (e := net.client.next_event()) is not None:
        events.append(e)
    assert [type(e) for e in events] == [TransportError, Terminated]
    assert isinstance(events[0], TransportError) and events[0].reason == "connection refused"
    assert net.client.next_timer() is None and len(net.client) == 0


# ------------------------------------------------------------------------------------------------
# §17.1.2 non-INVITE client transaction


def test_17_1_2_2_timer_e_doubles_until_t2_then_timer_f() -> None:
    net = Net()
    net.lose = lose_all
    tx = net.start(request("OPTIONS", branch="z9hG4bKopt1"))
    net.run_out()
    expected = [0.0, *schedule(0.0, T1, T2, 64 * T1)]
    assert net.times("client", "OPTIONS") == expected
    assert expected == [0.0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert [e.timer for e in net.kinds("client", TimedOut)] == ["F"]  # type: ignore[attr-defined]
    assert net.log[-2].startswith(f"{64 * T1:7.3f}")
    assert tx.state is State.TERMINATED


def test_17_1_2_2_timer_e_is_t2_in_proceeding() -> None:
    net = Net()

    def tu(net: Net, event: Event) -> None:
        if isinstance(event, RequestReceived) and event.transaction:
            net.server.send_response(event.transaction, make_response(event.request, 183), net.now)

    net.tu["server"] = tu
    net.lose = lambda side, msg: side == "client" and net.t > 0  # retransmissions are lost
    tx = net.start(request("REGISTER", branch="z9hG4bKreg1"))
    assert tx.state is State.PROCEEDING
    net.run_out()
    # The first E was armed with T1 in Trying; once Proceeding every interval is T2 (§17.1.2.2).
    assert net.times("client", "REGISTER") == [0.0, 0.5, 4.5, 8.5, 12.5, 16.5, 20.5, 24.5, 28.5]
    assert [e.timer for e in net.kinds("client", TimedOut)] == ["F"]  # type: ignore[attr-defined]


def test_17_1_2_2_final_response_then_timer_k_absorbs_retransmissions() -> None:
    net = Net()
    net.tu["server"] = answer(200, when="OPTIONS")
    net.lose = lambda side, msg: side == "server" and net.t < 1.0  # first two 200s lost
    tx = net.start(request("OPTIONS", branch="z9hG4bKopt2"))
    net.advance(2.0)
    assert net.times("client", "OPTIONS") == [0.0, 0.5, 1.5]
    assert net.times("server", "200") == [0.0, 0.5, 1.5]
    assert tx.state is State.COMPLETED
    assert len(net.kinds("client", ResponseReceived)) == 1
    assert len(net.kinds("server", RequestReceived)) == 1
    assert tx._deadlines == {"K": net.t0 + 1.5 + T4}  # only timer K is left (E and F stopped)
    net.advance(T4 - 0.5)
    assert tx.state is State.TERMINATED  # timer K = T4 after the 200 at 1.5


def test_17_1_2_2_reliable_no_timer_e_and_timer_k_zero() -> None:
    net = Net(reliable=True)
    net.tu["server"] = answer(200, when="OPTIONS")
    tx = net.start(request("OPTIONS", branch="z9hG4bKopt3"))
    assert tx.state is State.TERMINATED
    assert len(net.client) == 0
    # And the server transaction: timer J = 0 over a reliable transport (§17.2.2).
    assert len(net.server) == 0
    net = Net(reliable=True)
    net.lose = lose_all
    tx = net.start(request("OPTIONS", branch="z9hG4bKopt4"))
    assert set(tx._deadlines) == {"F"}


def test_17_1_3_responses_match_by_branch_and_cseq_method() -> None:
    # A CANCEL shares its INVITE's branch; responses are told apart by the CSeq method (§17.1.3).
    layer = TransactionLayer()
    invite = request()
    cancel = request("CANCEL")
    ict = layer.send_request(invite, 0.0, SERVER)
    nict = layer.send_request(cancel, 0.0, SERVER)
    layer.receive(make_response(cancel, 200), 0.1, SERVER)
    layer.receive(make_response(invite, 487, to_tag="x"), 0.1, SERVER)
    events = []
    while (e := layer.next_event()) is not None:
        events.append(e)
    received = [(e.response.status, e.transaction) for e in events if isinstance(e, ResponseReceived)]
    assert received == [(200, nict), (487, ict)]


def test_17_1_3_stray_response_reaches_tu_without_transaction() -> None:
    layer = TransactionLayer()
    stray = make_response(request(branch="z9hG4bKnobody"), 200, to_tag="x")
    layer.receive(stray, 0.0, SERVER)
    event = layer.next_event()
    assert isinstance(event, ResponseReceived) and event.transaction is None
    assert len(layer) == 0 and layer.next_timer() is None


def test_client_transaction_needs_a_magic_cookie_branch_and_no_ack() -> None:
    layer = TransactionLayer()
    with pytest.raises(SipValueError):
        layer.send_request(request(branch="old2543"), 0.0, SERVER)
    with pytest.raises(SipValueError):
        layer.send_request(request(branch=None), 0.0, SERVER)
    with pytest.raises(SipValueError):
        layer.send_request(request("ACK", branch="z9hG4bKa"), 0.0, SERVER)
    layer.send_request(request(), 0.0, SERVER)
    with pytest.raises(SipValueError):
        layer.send_request(request(), 0.0, SERVER)


# ------------------------------------------------------------------------------------------------
# §17.2.1 INVITE server transaction


def test_17_2_1_sends_100_trying_after_200_ms_when_tu_is_silent() -> None:
    net = Net()
    net.start(request())
    assert net.times("server", "100") == []
    net.advance_to(0.199)
    assert net.times("server", "100") == []
    net.advance_to(0.2)
    assert net.times("server", "100") == [DEFAULT_TIMERS.trying_delay]
    trying = net.kinds("client", ResponseReceived)[0]
    assert isinstance(trying, ResponseReceived)
    assert trying.response.to_tag is None  # §17.2.1: no To tag on the 100


def test_17_2_1_no_100_trying_when_tu_answers_within_200_ms() -> None:
    net = Net()

    def tu(net: Net, event: Event) -> None:
        if isinstance(event, RequestReceived) and event.transaction:
            net.server.send_response(
                event.transaction, make_response(event.request, 180, to_tag="b1"), net.now
            )

    net.tu["server"] = tu
    net.start(request())
    net.advance(1.0)
    assert net.times("server", "100") == []
    assert net.times("server", "180") == [0.0]


def test_17_2_1_absorbs_retransmitted_invite() -> None:
    net = Net()

    def tu(net: Net, event: Event) -> None:
        if isinstance(event, RequestReceived) and event.transaction:
            net.server.send_response(
                event.transaction, make_response(event.request, 180, to_tag="b1"), net.now
            )

    net.tu["server"] = tu
    net.lose = lambda side, msg: side == "server" and net.t < 1.0  # the 180 and its first resend lost
    tx = net.start(request())
    net.advance(2.0)
    # Each retransmitted INVITE is answered with the last provisional; the TU saw one request.
    assert net.times("client", "INVITE") == [0.0, 0.5, 1.5]
    assert net.times("server", "180") == [0.0, 0.5, 1.5]
    assert len(net.kinds("server", RequestReceived)) == 1
    assert tx.state is State.PROCEEDING


def test_17_2_1_retransmitted_invite_before_any_response_gets_100_at_once() -> None:
    layer = TransactionLayer(timers=TimerConfig(trying_delay=1.0))
    layer.receive(request(), 0.0, CLIENT)
    assert layer.messages_to_send() == []
    layer.receive(request(), 0.5, CLIENT)
    [trying] = layer.messages_to_send()
    assert isinstance(trying.message, Response) and trying.message.status == 100
    layer.handle_timer(1.0)
    assert layer.messages_to_send() == []  # the Trying timer was cancelled


def test_17_2_1_timer_g_doubles_until_t2_and_timer_h_times_out() -> None:
    net = Net()
    net.tu["server"] = answer(486)
    net.lose = lambda side, msg: side == "server"  # every response is lost
    net.start(request())
    net.run_out()
    # 486 at 0; timer G resends at T1, 3*T1, 7*T1, then every T2; H gives up at 64*T1. (The client's
    # own INVITE retransmissions also make the server resend the 486, outside timer G.)
    assert net.timer_times("server", "G") == schedule(0.0, T1, T2, 64 * T1)
    assert net.timer_times("server", "G") == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert [e.timer for e in net.kinds("server", TimedOut)] == ["H"]  # type: ignore[attr-defined]
    assert [e.timer for e in net.kinds("client", TimedOut)] == ["B"]  # type: ignore[attr-defined]
    assert len(net.server) == 0 and len(net.client) == 0


def test_17_2_1_ack_confirms_then_timer_i_absorbs_acks() -> None:
    net = Net()
    net.tu["server"] = answer(486)
    net.start(request())
    ist = net.kinds("server", RequestReceived)[0].transaction  # type: ignore[attr-defined]
    assert isinstance(ist, InviteServerTransaction)
    assert ist.state is State.CONFIRMED
    assert set(ist._deadlines) == {"I"} and ist.next_timer() == net.now + T4
    # A retransmitted ACK (e.g. for a retransmitted 486) is absorbed.
    net.client.send_stateless(build_ack(request(), make_response(request(), 486, to_tag="b1")), SERVER)
    net.transfer()
    assert len(net.kinds("server", RequestReceived)) == 1
    net.advance(T4)
    assert ist.state is State.TERMINATED and len(net.server) == 0


def test_17_2_1_reliable_no_timer_g_and_timer_i_zero() -> None:
    net = Net(reliable=True)
    net.tu["server"] = answer(486)
    net.lose = lambda side, msg: isinstance(msg, Request) and msg.method == "ACK"
    net.start(request())
    ist = net.kinds("server", RequestReceived)[0].transaction  # type: ignore[attr-defined]
    assert isinstance(ist, InviteServerTransaction)
    assert set(ist._deadlines) == {"H"}  # no G over TCP, H still guards the ACK
    net.lose = lambda side, msg: False
    net.client.send_stateless(
        build_ack(request(), make_response(request(), 486, to_tag="b1")), SERVER, reliable=True
    )
    net.transfer()
    assert ist.state is State.TERMINATED  # timer I = 0


def test_rfc6026_8_7_accepted_absorbs_invite_retransmissions_until_timer_l() -> None:
    net = Net()
    net.tu["server"] = answer(200)
    net.lose = lambda side, msg: side == "server" and net.t < 1.0  # the 200 is lost: the client resends
    net.start(request())
    ist = net.kinds("server", RequestReceived)[0].transaction  # type: ignore[attr-defined]
    assert isinstance(ist, InviteServerTransaction) and ist.state is State.ACCEPTED
    net.advance(1.0)
    assert net.times("client", "INVITE") == [0.0, 0.5]
    assert net.times("server", "200") == [0.0]  # the transaction never resends a 2xx itself
    assert len(net.kinds("server", RequestReceived)) == 1
    # The TU's own retransmission of the 2xx is passed to the transport (RFC 6026 §8.6).
    assert net.server.send_response(ist, make_response(ist.request, 200, to_tag="b1"), net.now)
    assert not net.server.send_response(ist, make_response(ist.request, 180, to_tag="b1"), net.now)
    net.transfer()
    assert net.times("server", "200") == [0.0, 1.0]
    net.advance(64 * T1 - 1.0)
    assert ist.state is State.TERMINATED


def test_rfc6026_8_7_ack_in_accepted_goes_to_tu() -> None:
    net = Net()
    net.tu["server"] = answer(200)
    net.start(request())
    ist = net.kinds("server", RequestReceived)[0].transaction  # type: ignore[attr-defined]
    # A 2xx ACK normally has a new branch and matches nothing: the TU gets it without transaction.
    net.client.send_stateless(request("ACK", branch="z9hG4bKack2xx", to_tag="b1"), SERVER)
    # A sloppy UA reusing the INVITE branch: matches the Accepted transaction, still goes to the TU.
    net.client.send_stateless(request("ACK", to_tag="b1"), SERVER)
    net.transfer()
    acks = [e for e in net.kinds("server", RequestReceived) if e.request.method == "ACK"]  # type: ignore[attr-defined]
    assert [e.transaction for e in acks] == [None, ist]  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------------
# §17.2.2 non-INVITE server transaction


def test_17_2_2_trying_absorbs_then_proceeding_and_completed_resend_last_response() -> None:
    layer = TransactionLayer()
    options = request("OPTIONS", branch="z9hG4bKo")
    layer.receive(options, 0.0, CLIENT)
    event = layer.next_event()
    assert isinstance(event, RequestReceived) and isinstance(event.transaction, NonInviteServerTransaction)
    nist = event.transaction
    layer.receive(options, 0.5, CLIENT)
    assert layer.messages_to_send() == [] and layer.next_event() is None  # Trying: discarded
    layer.send_response(nist, make_response(options, 100), 0.6)
    layer.messages_to_send()
    layer.receive(options, 1.5, CLIENT)
    [again] = layer.messages_to_send()
    assert isinstance(again.message, Response) and again.message.status == 100 and again.retransmission
    layer.send_response(nist, make_response(options, 200, to_tag="x"), 2.0)
    layer.messages_to_send()
    assert not layer.send_response(nist, make_response(options, 500, to_tag="x"), 2.1)  # discarded
    layer.receive(options, 3.5, CLIENT)
    [final] = layer.messages_to_send()
    assert isinstance(final.message, Response) and final.message.status == 200
    assert layer.next_event() is None
    assert layer.next_timer() == 2.0 + 64 * T1  # timer J
    layer.handle_timer(2.0 + 64 * T1)
    ended = layer.next_event()
    assert isinstance(ended, Terminated) and ended.transaction is nist
    assert len(layer) == 0


def test_17_2_2_completed_keeps_the_request_as_fields_only_and_still_absorbs_retransmissions() -> None:
    """In Completed (unreliable) the transaction holds an equal copy of its request without the parsed
    objects (less for the garbage collector to walk over 64*T1); matching and answering are unchanged."""
    layer = TransactionLayer()
    register = request("REGISTER", branch="z9hG4bKreg", extra="Contact: <sip:alice@127.0.0.1:5070>\r\n")
    parsed_from = register.from_
    layer.receive(register, 0.0, CLIENT)
    event = layer.next_event()
    assert isinstance(event, RequestReceived) and isinstance(event.transaction, NonInviteServerTransaction)
    nist = event.transaction
    assert nist.request is register  # the TU's request, until the final response
    ok = make_response(register, 200, to_tag="r")
    layer.send_response(nist, ok, 0.1)
    layer.messages_to_send()
    assert nist.request is not register and nist.request == register
    assert nist.request.to_bytes() == register.to_bytes()
    assert nist.request.from_ == parsed_from and register.from_ is parsed_from  # the TU's copy is untouched
    layer.receive(
        request("REGISTER", branch="z9hG4bKreg", extra="Contact: <sip:alice@127.0.0.1:5070>\r\n"), 1.0, CLIENT
    )
    [again] = layer.messages_to_send()
    assert again.message is ok and again.retransmission and layer.next_event() is None


# ------------------------------------------------------------------------------------------------
# §17.2.3 matching requests to server transactions


def _server_events(layer: TransactionLayer) -> list[Event]:
    out = []
    while (e := layer.next_event()) is not None:
        out.append(e)
    return out


def test_17_2_3_key_is_branch_sent_by_and_method() -> None:
    layer = TransactionLayer()
    layer.receive(request(), 0.0, CLIENT)
    layer.receive(request(), 0.1, CLIENT)  # retransmission: same transaction
    layer.receive(request(sent_by="127.0.0.2:5070"), 0.1, ("127.0.0.2", 5070))  # other sent-by: new
    layer.receive(request("CANCEL"), 0.2, CLIENT)  # CANCEL: a transaction of its own
    layer.receive(request(branch="z9hG4bKinv2"), 0.3, CLIENT)  # other branch: new
    events = [e for e in _server_events(layer) if isinstance(e, RequestReceived)]
    assert [(e.request.method, type(e.transaction).__name__) for e in events] == [
        ("INVITE", "InviteServerTransaction"),
        ("INVITE", "InviteServerTransaction"),
        ("CANCEL", "NonInviteServerTransaction"),
        ("INVITE", "InviteServerTransaction"),
    ]
    assert len(layer) == 4
    assert server_key(request("ACK")) == server_key(request())  # ACK matches its INVITE


def test_17_2_3_branch_comparison_is_exact_and_sent_by_host_case_insensitive() -> None:
    assert server_key(request(branch="z9hG4bKabc")) != server_key(request(branch="z9hG4bKABC"))
    assert server_key(request(sent_by="LOCALHOST:5070")) == server_key(request(sent_by="localhost:5070"))
    assert server_key(request(sent_by="127.0.0.1")) != server_key(request(sent_by="127.0.0.1:5060"))


def test_9_2_cancel_matching_helper_finds_the_invite_transaction() -> None:
    layer = TransactionLayer()
    layer.receive(request(), 0.0, CLIENT)
    ist = layer.next_event().transaction  # type: ignore[union-attr]
    assert layer.find_cancel_target(request("CANCEL")) is ist
    assert layer.find_cancel_target(request("CANCEL", branch="z9hG4bKother")) is None
    assert layer.find_cancel_target(request("CANCEL", sent_by="127.0.0.3:5070")) is None


def test_17_2_3_rfc2543_fallback_without_magic_cookie() -> None:
    layer = TransactionLayer()
    old = request(branch=None)
    layer.receive(old, 0.0, CLIENT)
    ist = layer.next_event().transaction  # type: ignore[union-attr]
    assert isinstance(ist, InviteServerTransaction) and ist.key[0] == "2543"
    # The retransmission matches on Request-URI, From tag, Call-ID, CSeq, top Via and To tag.
    layer.receive(request(branch=None), 0.5, CLIENT)
    assert layer.next_event() is None
    # A different From tag, Call-ID, CSeq or Request-URI is another request.
    for other in (
        request(branch=None, from_tag="zz"),
        request(branch=None, call_id="other@127.0.0.1"),
        request(branch=None, cseq=2),
        request(branch=None, uri="sip:carol@127.0.0.1"),
    ):
        layer.receive(other, 0.6, CLIENT)
        event = layer.next_event()
        assert isinstance(event, RequestReceived) and event.transaction is not ist
    # CANCEL matches by the same fields (§9.2), and the ACK by the To tag of our final response.
    assert layer.find_cancel_target(request("CANCEL", branch=None)) is ist
    assert layer.find_cancel_target(request("CANCEL", branch=None, from_tag="zz")) is not ist
    assert layer.find_cancel_target(request("CANCEL", branch=None, to_tag="t9")) is None  # To tag differs
    layer.send_response(ist, make_response(old, 404, to_tag="t404"), 1.0)
    layer.receive(request("ACK", branch=None, to_tag="wrong"), 1.1, CLIENT)
    assert ist.state is State.COMPLETED
    stray = layer.next_event()
    assert isinstance(stray, RequestReceived) and stray.transaction is None
    layer.receive(request("ACK", branch=None, to_tag="t404"), 1.2, CLIENT)
    assert ist.state is State.CONFIRMED


def test_layer_next_timer_is_the_minimum_over_transactions() -> None:
    layer = TransactionLayer()
    layer.send_request(request("OPTIONS", branch="z9hG4bK1"), 0.0, SERVER)  # E at 0.5
    layer.send_request(request("OPTIONS", branch="z9hG4bK2"), 0.25, SERVER)  # E at 0.75
    layer.receive(request(branch="z9hG4bK3"), 0.125, CLIENT)  # Trying timer at 0.325
    assert len(layer.messages_to_send()) == 2
    fired = []
    for _ in range(5):
        deadline = layer.next_timer()
        assert deadline is not None
        layer.handle_timer(deadline)
        fired.append(
            (deadline, [str(t.message.cseq.method) + (t.timer or "") for t in layer.messages_to_send()])
        )
    assert fired == [
        (0.125 + 0.2, ["INVITETrying"]),  # the 100 Trying (a response to the INVITE)
        (0.5, ["OPTIONSE"]),
        (0.75, ["OPTIONSE"]),
        (1.5, ["OPTIONSE"]),
        (1.75, ["OPTIONSE"]),
    ]


def test_timers_follow_configured_t1_t2_t4() -> None:
    timers = TimerConfig(t1=0.25, t2=1.0, t4=2.0)
    net = Net(timers)
    net.lose = lose_all
    net.start(request("OPTIONS", branch="z9hG4bKcfg"))
    net.run_out()
    assert net.times("client", "OPTIONS") == [0.0, *schedule(0.0, 0.25, 1.0, 16.0)]
    assert net.times("client", "OPTIONS")[:6] == [0.0, 0.25, 0.75, 1.75, 2.75, 3.75]
    assert [e.timer for e in net.kinds("client", TimedOut)] == ["F"]  # type: ignore[attr-defined]
    with pytest.raises(SipValueError):
        TimerConfig(t1=0)
    with pytest.raises(SipValueError):
        TimerConfig(t1=1.0, t2=0.5)


def test_late_wakeup_shifts_the_schedule_instead_of_bursting() -> None:
    layer = TransactionLayer()
    layer.send_request(request("OPTIONS", branch="z9hG4bKlate"), 0.0, SERVER)
    layer.messages_to_send()
    layer.handle_timer(3.0)  # E was due at 0.5; the loop woke late
    assert len(layer.messages_to_send()) == 1
    assert layer.next_timer() == 4.0  # re-armed at now + min(2*T1, T2)


def test_derive_branch_is_deterministic_with_magic_cookie() -> None:
    a = derive_branch("z9hG4bKin", "127.0.0.1:5070", "node")
    assert a == derive_branch("z9hG4bKin", "127.0.0.1:5070", "node")
    assert a != derive_branch("z9hG4bKin", "127.0.0.1:5071", "node")
    assert a.startswith("z9hG4bK") and len(a) == 7 + 32


def test_machines_refuse_wrong_methods() -> None:
    with pytest.raises(SipValueError):
        InviteClientTransaction(request("OPTIONS", branch="z9hG4bKx"), SERVER, 0.0)
    with pytest.raises(SipValueError):
        NonInviteClientTransaction(request(), SERVER, 0.0)
    with pytest.raises(SipValueError):
        InviteServerTransaction(request("BYE"), CLIENT, 0.0)
    with pytest.raises(SipValueError):
        NonInviteServerTransaction(request("ACK"), CLIENT, 0.0)


def test_datagrams_to_send_are_the_wire_bytes() -> None:
    layer = TransactionLayer()
    req = request("OPTIONS", branch="z9hG4bKdg")
    tx = layer.send_request(req, 0.0, SERVER)
    [(data, dest)] = layer.datagrams_to_send()
    assert dest == SERVER and parse_message(data) == req
    layer.handle_timer(0.5)
    [(again, _)] = tx.datagrams_to_send() or layer.datagrams_to_send()
    assert again == data


def test_sip_core_imports_no_io_modules() -> None:
    # DESIGN: no asyncio, socket, time or os in transport/sip (here: the modules this file tests).
    root = Path(__file__).resolve().parents[2] / "transport" / "sip"
    for name in ("transaction.py", "digest.py"):
        tree = ast.parse((root / name).read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & {"asyncio", "socket", "time", "os", "random", "threading"}, name


def test_9_1_cancel_is_built_from_the_invite() -> None:
    invite = request(extra="Route: <sip:127.0.0.1:5061;lr>\r\n")
    cancel = build_cancel(invite)
    assert cancel.method == "CANCEL" and cancel.uri == invite.uri
    assert [str(v) for v in cancel.vias] == [str(invite.top_via)]
    assert (cancel.cseq.seq, cancel.cseq.method) == (invite.cseq.seq, "CANCEL")
    assert cancel.from_ == invite.from_ and cancel.to == invite.to and cancel.call_id == invite.call_id
    assert [str(r.uri) for r in cancel.routes] == ["sip:127.0.0.1:5061;lr"]
    assert parse_message(cancel.to_bytes()) == cancel


def test_9_1_9_2_cancel_flow_end_to_end() -> None:
    # UAC: INVITE, 180, CANCEL. UAS TU: finds the INVITE by the CANCEL (§9.2), answers 200 to the
    # CANCEL and 487 to the INVITE; the client transaction ACKs the 487 (§17.1.1.3).
    net = Net()

    def uas(net: Net, event: Event) -> None:
        if not isinstance(event, RequestReceived) or event.transaction is None:
            return
        if event.request.method == "INVITE":
            net.server.send_response(
                event.transaction, make_response(event.request, 180, to_tag="b1"), net.now
            )
        elif event.request.method == "CANCEL":
            target = net.server.find_cancel_target(event.request)
            assert target is not None and target.state is State.PROCEEDING
            net.server.send_response(
                event.transaction, make_response(event.request, 200, to_tag="b1"), net.now
            )
            net.server.send_response(target, make_response(target.request, 487, to_tag="b1"), net.now)

    net.tu["server"] = uas
    invite = request()
    ict = net.start(invite)
    assert ict.state is State.PROCEEDING
    net.advance(1.0)
    nict = net.client.send_request(build_cancel(invite), net.now, SERVER)
    net.transfer()
    statuses = [(e.response.status, e.transaction) for e in net.kinds("client", ResponseReceived)]  # type: ignore[attr-defined]
    assert statuses == [(180, ict), (200, nict), (487, ict)]
    assert net.times("client", "ACK") == [1.0]
    assert ict.state is State.COMPLETED and nict.state is State.COMPLETED
    ist = net.kinds("server", RequestReceived)[0].transaction  # type: ignore[attr-defined]
    assert isinstance(ist, InviteServerTransaction) and ist.state is State.CONFIRMED
    net.run_out()
    assert len(net.client) == 0 and len(net.server) == 0


def test_layer_drops_and_counts_messages_it_cannot_key() -> None:
    layer = TransactionLayer()
    no_via = Request("OPTIONS", "sip:bob@127.0.0.1", [("Call-ID", "x"), ("CSeq", "1 OPTIONS")])
    layer.receive(no_via, 0.0, CLIENT)
    layer.receive(Response(200, None, [("CSeq", "1 OPTIONS")]), 0.0, SERVER)  # no Via: a stray
    assert layer.dropped == 1
    stray = layer.next_event()
    assert isinstance(stray, ResponseReceived) and stray.transaction is None
    assert layer.next_event() is None and len(layer) == 0


_methods = st.sampled_from(["INVITE", "ACK", "CANCEL", "OPTIONS", "BYE"])
_branches = st.sampled_from([None, "z9hG4bK1", "z9hG4bK2", "old2543"])
_tags = st.sampled_from([None, "t1", "t2"])


@st.composite
def _network_message(draw: st.DrawFn) -> tuple[str, Message]:
    method = draw(_methods)
    req = request(
        method,
        branch=draw(_branches),
        to_tag=draw(_tags),
        from_tag=draw(st.sampled_from(["a1", "a2"])),
        cseq=draw(st.integers(1, 2)),
        sent_by=draw(st.sampled_from(["127.0.0.1:5070", "127.0.0.2"])),
    )
    if draw(st.booleans()):
        return "request", req
    status = draw(st.sampled_from([100, 180, 200, 486, 503]))
    return "response", make_response(req, status, to_tag=draw(st.sampled_from(["t1", "t2"])))


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(_network_message(), st.floats(0, 5), st.sampled_from([None, 180, 200, 486])), max_size=25
    ),
    st.booleans(),
)
def test_property_any_message_sequence_never_raises_and_nothing_leaks(
    script: list[tuple[tuple[str, Message], float, int | None]], reliable: bool
) -> None:
    # A layer acting as both client and server is fed arbitrary matching and non-matching
    # messages; a TU answers (or not) at random. Nothing raises; once the TU has answered every
    # request with a final response and timers have run out, no transaction is left.
    layer = TransactionLayer()
    now = 0.0
    pending: list[ServerTransaction] = []
    for i, ((kind, msg), dt, tu_status) in enumerate(script):
        now += dt
        if kind == "request" and isinstance(msg, Request) and msg.method != "ACK" and i % 3 == 0:
            # Every third request is sent by the layer as a client instead (responses may match it).
            branch = msg.branch if msg.branch and msg.branch.startswith("z9hG4bK") else f"z9hG4bKc{i}"
            out = request(msg.method, branch=branch, cseq=msg.cseq.seq)
            if (branch, out.method) not in layer.client_transactions:
                layer.send_request(out, now, SERVER, reliable=reliable)
        else:
            layer.receive(msg, now, CLIENT, reliable=reliable)
        layer.handle_timer(now)
        while (event := layer.next_event()) is not None:
            stx = event.transaction if isinstance(event, RequestReceived) else None
            if stx is not None and stx not in pending:
                pending.append(stx)
        for stx in list(pending):
            if tu_status is not None and not stx.terminated:
                layer.send_response(stx, make_response(stx.request, tu_status, to_tag="tu"), now)
        layer.messages_to_send()
    for stx in pending:
        layer.send_response(stx, make_response(stx.request, 500, to_tag="tu"), now)
    for _ in range(1000):
        deadline = layer.next_timer()
        if deadline is None:
            break
        assert deadline >= now
        now = deadline
        layer.handle_timer(now)
        layer.messages_to_send()
        while layer.next_event() is not None:
            pass
    # What may remain: INVITE client transactions that got a provisional and wait for the TU
    # (§17.1.1.2: no timer in Proceeding; a proxy's timer C or the UAC core ends them).
    left = list(layer.client_transactions.values()) + list(layer.server_transactions.values())
    assert all(isinstance(t, InviteClientTransaction) and t.state is State.PROCEEDING for t in left), left
    assert layer.next_timer() is None


# ------------------------------------------------------------------------------------------------
# Property: whatever the network loses and whenever the TU answers, nothing leaks or raises.


@settings(max_examples=60, deadline=None)
@given(
    method=st.sampled_from(["INVITE", "OPTIONS"]),
    provisional=st.booleans(),
    final=st.sampled_from([200, 486, 503]),
    loss=st.lists(st.booleans(), max_size=12),
    reliable=st.booleans(),
    answer_at=st.sampled_from([0.0, 0.1, 0.3, 2.0, 40.0]),
)
def test_property_transactions_always_end_and_tu_sees_one_request(
    method: str, provisional: bool, final: int, loss: list[bool], reliable: bool, answer_at: float
) -> None:
    # Whatever the network loses and whenever the TU answers, every transaction on both sides
    # terminates (nothing leaks), each emits one Terminated, and the TU sees the request once.
    net = Net(reliable=reliable)
    pattern = iter([] if reliable else loss)  # a reliable transport loses nothing (or errors)
    net.lose = lambda side, msg: next(pattern, False)
    tx = net.start(request(method, branch="z9hG4bKprop"))
    net.advance_to(answer_at)
    answered: set[int] = set()
    seen = {"client": 0, "server": 0}
    two_xx: tuple[ServerTransaction, Response, float] | None = None
    acked = False
    for _ in range(500):
        # Server TU: answer each new request once; as UAS core, resend an unACKed 2xx (§13.3.1.4).
        for event in net.events["server"][seen["server"] :]:
            if not isinstance(event, RequestReceived):
                continue
            if event.request.method == "ACK":
                acked = True
                continue
            stx = event.transaction
            if stx is None or id(stx) in answered:
                continue
            answered.add(id(stx))
            if provisional:
                net.server.send_response(stx, make_response(event.request, 180, to_tag="p"), net.now)
            response = make_response(event.request, final, to_tag="p")
            net.server.send_response(stx, response, net.now)
            if method == "INVITE" and final < 300:
                two_xx = (stx, response, net.now)
        seen["server"] = len(net.events["server"])
        resending = two_xx is not None and not acked and net.now - two_xx[2] < 64 * T1
        if two_xx is not None and resending:
            net.server.send_response(two_xx[0], two_xx[1], net.now)
        # Client TU: ACK every 2xx to the INVITE, on a branch of its own (§13.2.2.4).
        for event in net.events["client"][seen["client"] :]:
            if (
                isinstance(event, ResponseReceived)
                and event.response.cseq.method == "INVITE"
                and 200 <= event.response.status < 300
            ):
                ack = request("ACK", branch="z9hG4bKack", to_tag=event.response.to_tag)
                net.client.send_stateless(ack, SERVER, reliable=reliable)
        seen["client"] = len(net.events["client"])
        net.transfer()
        deadline = net.next_timer()
        if deadline is None and not resending:
            break
        step = 1.0 if deadline is None else deadline - net.now
        net.advance(min(step, 1.0) if resending else step)
    assert tx.state is State.TERMINATED
    assert len(net.client) == 0 and len(net.server) == 0
    assert net.client.next_timer() is None and net.server.next_timer() is None
    assert len([e for e in net.kinds("server", RequestReceived) if e.transaction]) <= 1  # type: ignore[attr-defined]
    for side in ("client", "server"):
        ended = [e.transaction for e in net.kinds(side, Terminated)]  # type: ignore[attr-defined]
        assert len(ended) == len(set(map(id, ended)))


# ------------------------------------------------------------------------------------------------
# Golden transcripts: one per timer.


def _scenario_a() -> Net:
    net = Net()
    net.lose = lambda side, msg: side == "client" and net.t < 3.0  # the first three INVITEs are lost
    net.start(request())
    net.advance(4.0)
    return net


def _scenario_b() -> Net:
    net = Net()
    net.lose = lose_all
    net.start(request())
    net.run_out()
    return net


def _scenario_d() -> Net:
    net = Net()
    net.tu["server"] = answer(486)
    net.lose = lambda side, msg: isinstance(msg, Request) and msg.method == "ACK" and net.t < 1.0
    net.start(request())
    net.run_out()
    return net


def _scenario_e() -> Net:
    net = Net()
    net.tu["server"] = answer(200, when="OPTIONS")
    net.lose = lambda side, msg: side == "client" and net.t < 10.0
    net.start(request("OPTIONS", branch="z9hG4bKopt"))
    net.advance(12.0)
    return net


def _scenario_f() -> Net:
    net = Net()
    net.lose = lose_all
    net.start(request("OPTIONS", branch="z9hG4bKopt"))
    net.run_out()
    return net


def _scenario_g() -> Net:
    net = Net()
    net.tu["server"] = answer(486)
    net.lose = lambda side, msg: side == "server" and net.t < 3.0  # 486 and its first two resends lost
    net.start(request())
    net.advance(4.0)
    return net


def _scenario_h() -> Net:
    net = Net()
    net.tu["server"] = answer(486)
    net.lose = lambda side, msg: isinstance(msg, Request) and msg.method == "ACK"
    net.start(request())
    net.run_out()
    return net


def _scenario_i() -> Net:
    net = Net()
    net.tu["server"] = answer(486)
    net.start(request())
    net.advance(T4)
    return net


def _scenario_j() -> Net:
    net = Net()
    net.tu["server"] = answer(200, when="OPTIONS")
    net.lose = lambda side, msg: side == "server" and net.t < 1.0
    net.start(request("OPTIONS", branch="z9hG4bKopt"))
    net.run_out()
    return net


def _scenario_k() -> Net:
    net = Net()
    net.tu["server"] = answer(200, when="OPTIONS")
    net.start(request("OPTIONS", branch="z9hG4bKopt"))
    net.advance(T4)
    return net


def _scenario_l() -> Net:
    net = Net()
    net.tu["server"] = answer(200)
    net.lose = lambda side, msg: side == "server" and net.t < 0.5
    net.start(request())
    net.advance_to(0.5)  # the client's timer A resends the INVITE: absorbed in Accepted
    ist = net.kinds("server", RequestReceived)[0].transaction  # type: ignore[attr-defined]
    net.note("server TU retransmits its 2xx through the Accepted transaction (RFC 6026 §8.6)")
    net.server.send_response(ist, make_response(ist.request, 200, to_tag="b1"), net.now)
    net.transfer()
    net.run_out()
    return net


def _scenario_m() -> Net:
    net = Net()
    net.tu["server"] = answer(200)
    net.start(request())
    ok = net.kinds("server", RequestReceived)[0]
    assert isinstance(ok, RequestReceived)
    net.advance(T1)
    net.note("server TU retransmits its 2xx (§13.3.1.4)")
    net.server.send_stateless(make_response(ok.request, 200, to_tag="b1"), CLIENT)
    net.transfer()
    net.run_out()
    return net


def _scenario_trying() -> Net:
    net = Net()
    net.start(request())
    net.advance(0.5)
    return net


SCENARIOS: dict[str, tuple[str, Callable[[], Net]]] = {
    "timer_A": (
        "INVITE over UDP; the first three copies are lost: timer A resends at T1, 2*T1, 4*T1",
        _scenario_a,
    ),
    "timer_B": (
        "INVITE over UDP; everything lost: A doubles without cap, timer B gives up at 64*T1",
        _scenario_b,
    ),
    "timer_D": (
        "INVITE answered 486; the first ACK is lost: G resends, the client re-ACKs; D ends it",
        _scenario_d,
    ),
    "timer_E": ("OPTIONS over UDP; copies lost for 10 s: timer E doubles up to T2", _scenario_e),
    "timer_F": ("OPTIONS over UDP; everything lost: timer F gives up at 64*T1", _scenario_f),
    "timer_G": ("INVITE answered 486; 486 lost for 3 s: timer G resends at T1, 2*T1, 4*T1", _scenario_g),
    "timer_H": ("INVITE answered 486; every ACK lost: timer H gives up at 64*T1", _scenario_h),
    "timer_I": ("INVITE answered 486 and ACKed: Confirmed, timer I ends it after T4", _scenario_i),
    "timer_J": (
        "OPTIONS answered 200; 200 lost for 1 s: retransmissions answered, timer J ends it",
        _scenario_j,
    ),
    "timer_K": ("OPTIONS answered 200: timer K ends the client transaction after T4", _scenario_k),
    "timer_L": (
        "INVITE answered 200, lost; Accepted absorbs the INVITE resend, timer L ends it",
        _scenario_l,
    ),
    "timer_M": (
        "INVITE answered 200; the UAS resends its 2xx: Accepted passes it up, timer M ends it",
        _scenario_m,
    ),
    "timer_Trying": ("INVITE, silent TU: 100 Trying after 200 ms (§17.2.1)", _scenario_trying),
}


def _render(name: str, title: str, net: Net) -> str:
    header = [
        f"# {name}: {title}",
        f"# T1={T1} T2={T2} T4={T4}; times in seconds from the first send; regenerate with",
        "# RAFTPBX_REGEN_TRANSCRIPTS=1 and review the diff.",
    ]
    return "\n".join(header + net.log) + "\n"


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_golden_transcript(name: str) -> None:
    title, scenario = SCENARIOS[name]
    text = _render(name, title, scenario())
    path = TRANSCRIPTS / f"{name}.txt"
    if os.environ.get("RAFTPBX_REGEN_TRANSCRIPTS") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden transcript {path}; generate it with RAFTPBX_REGEN_TRANSCRIPTS=1"
    assert text == path.read_text()
    assert f"timer {name.removeprefix('timer_')}" in text
