"""The pjsua2 test phone (chaos/phone.py), proven phone to phone on loopback without any PBX.

Real phone processes on 127.0.0.21 (A) and 127.0.0.22 (B); A calls B directly at B's listening port.
Every wait is a condition polled against a deadline; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from chaos.phone import PhoneCommandFailed, PhoneProcess, poll_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

A_ADDR = "127.0.0.21"
B_ADDR = "127.0.0.22"
REGISTRAR_ADDR = "127.0.0.23"


@pytest.fixture
def phones(tmp_path: Path) -> Iterator[tuple[PhoneProcess, PhoneProcess]]:
    a, b = PhoneProcess(A_ADDR, log=tmp_path / "a.log"), PhoneProcess(B_ADDR, log=tmp_path / "b.log")
    PhoneProcess.start_all([a, b])
    try:
        yield a, b
        # Exceptions inside pjsua2 callbacks are reported as events, never lost (note 12).
        assert a.errors() == []
        assert b.errors() == []
    finally:
        a.close()
        b.close()


def _setup(a: PhoneProcess, b: PhoneProcess, transport: str) -> str:
    """Create transports and one account per phone; return the URI that reaches B directly."""
    a.transports(udp=True, tcp=True)
    ports = b.transports(udp=True, tcp=True)
    a.account_add("a", f"sip:a@{A_ADDR}", transport=transport)
    b.account_add("b", f"sip:b@{B_ADDR}", transport=transport)
    # No ;transport=tcp here: the phone adds it for a TCP account (its Contact depends on it).
    return f"sip:b@{B_ADDR}:{ports[transport]}"


def _is_state(call: str, state: str, code: int | None = None) -> Callable[[dict[str, Any]], bool]:
    def match(e: dict[str, Any]) -> bool:
        return (
            e["event"] == "call_state"
            and e.get("call") == call
            and e.get("state") == state
            and (code is None or e.get("code") == code)
        )

    return match


def _bye_result(phone: PhoneProcess, call: str) -> dict[str, Any]:
    return phone.wait_event(lambda e: e["event"] == "bye_result" and e.get("call") == call, 5)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_call_rings_answers_carries_rtp_both_ways_and_bye_gets_200(
    phones: tuple[PhoneProcess, PhoneProcess], transport: str
) -> None:
    a, b = phones
    to = _setup(a, b, transport)

    call_a = a.call("a", to)
    incoming = b.wait_incoming("b", timeout=5)
    call_b = incoming["call"]
    assert incoming["remote_uri"].strip("<>") == f"sip:a@{A_ADDR}"
    # A's Contact names its transport, so that whoever routes to it (B here, a proxy later) uses TCP.
    assert ("transport=tcp" in incoming["remote_contact"].lower()) == (transport == "tcp"), incoming

    b.answer(call_b, 180)
    a.wait_event(_is_state(call_a, "early", 180), 5)
    b.answer(call_b, 200)
    a.wait_call_state(call_a, "confirmed", timeout=5)
    b.wait_call_state(call_b, "confirmed", timeout=5)

    # RTP flows both ways: received and sent counters grow on both sides.
    def flowing() -> bool:
        ia, ib = a.call_info(call_a), b.call_info(call_b)
        return bool(min(ia["rx"], ia["tx"], ib["rx"], ib["tx"]) >= 10)

    poll_until(flowing, timeout=5, what="RTP flowing both ways")

    # Two seconds of call, then the longest stretch without received RTP must stay under 200 ms.
    poll_until(lambda: a.rtp_gaps(call_a)["confirmed_ms"] >= 2000, timeout=10, what="2 s of call")
    poll_until(lambda: b.rtp_gaps(call_b)["confirmed_ms"] >= 2000, timeout=10, what="2 s of call")
    gaps_a, gaps_b = a.rtp_gaps(call_a), b.rtp_gaps(call_b)
    for gaps in (gaps_a, gaps_b):
        assert gaps["max_gap_ms"] < 200, gaps
        assert gaps["rx"] >= 60, gaps  # nominally 50 packets/s with VAD off (note 9)
        assert gaps["samples"] >= 40, gaps  # the pump really sampled every ~20 ms

    # A's BYE is sent as a request so its final status is observable (note 6).
    a.bye(call_a)
    result = a.wait_event(lambda e: e["event"] == "bye_result" and e.get("call") == call_a, 5)
    assert result["code"] == 200
    a.wait_call_state(call_a, "disconnected", timeout=5)
    b.wait_call_state(call_b, "disconnected", timeout=5)

    # A disconnected call keeps its final figures and refuses further signalling.
    info = a.call_info(call_a)
    assert info["state"] == "disconnected" and info["bye_code"] == 200 and info["rx"] >= 60
    with pytest.raises(PhoneCommandFailed, match="disconnected"):
        a.bye(call_a)


def test_rtp_gap_meter_sees_a_peer_that_vanished(phones: tuple[PhoneProcess, PhoneProcess]) -> None:
    """The gap meter can fail: killing B mid-call shows as a growing gap at A, and A's BYE to the dead
    TCP peer fails at once."""
    a, b = phones
    to = _setup(a, b, "tcp")
    b.auto_answer("b", 200, ring=False)
    call_a = a.call("a", to)
    a.wait_call_state(call_a, "confirmed", timeout=5)
    poll_until(lambda: a.call_info(call_a)["rx"] >= 10, timeout=5, what="RTP from B")
    b.kill()
    poll_until(lambda: a.rtp_gaps(call_a)["current_gap_ms"] >= 300, timeout=5, what="a visible RTP gap")
    a.bye(call_a)
    result = a.wait_event(lambda e: e["event"] == "bye_result" and e.get("call") == call_a, 5)
    assert result["code"] >= 400
    gaps = a.rtp_gaps(call_a)
    assert gaps["ended"] and gaps["max_gap_ms"] >= 300 and gaps["current_gap_ms"] == 0


def test_busy_callee_486_reaches_caller(phones: tuple[PhoneProcess, PhoneProcess]) -> None:
    a, b = phones
    to = _setup(a, b, "udp")
    call_a = a.call("a", to)
    call_b = b.wait_incoming("b", timeout=5)["call"]
    b.answer(call_b, 486)
    ended = a.wait_call_state(call_a, "disconnected", timeout=5)
    assert ended["code"] == 486
    assert b.wait_call_state(call_b, "disconnected", timeout=5)["code"] == 486
    # A busy answer never confirms the call.
    assert not any(_is_state(call_a, "confirmed")(e) for e in a.events)


def test_cancel_while_ringing_gives_487(phones: tuple[PhoneProcess, PhoneProcess]) -> None:
    a, b = phones
    to = _setup(a, b, "udp")
    call_a = a.call("a", to)
    call_b = b.wait_incoming("b", timeout=5)["call"]
    b.answer(call_b, 180)
    a.wait_event(_is_state(call_a, "early", 180), 5)
    a.cancel(call_a)
    assert a.wait_call_state(call_a, "disconnected", timeout=5)["code"] == 487
    assert b.wait_call_state(call_b, "disconnected", timeout=5)["code"] == 487


def test_auto_answer_rings_then_answers_after_the_delay_and_callee_hangs_up_over_tcp(
    phones: tuple[PhoneProcess, PhoneProcess],
) -> None:
    a, b = phones
    to = _setup(a, b, "tcp")
    b.auto_answer("b", 200, delay=0.3)
    call_a = a.call("a", to)
    early = a.wait_event(_is_state(call_a, "early", 180), 5)
    confirmed = a.wait_call_state(call_a, "confirmed", timeout=5)
    assert confirmed["t"] - early["t"] >= 0.25
    # B hangs up: its BYE must find A through A's Contact, over TCP.
    call_b = b.wait_incoming("b", timeout=5)["call"]
    b.wait_call_state(call_b, "confirmed", timeout=5)
    b.hangup(call_b)
    a.wait_call_state(call_a, "disconnected", timeout=5)


def test_four_concurrent_calls_twice_reusing_call_slots(phones: tuple[PhoneProcess, PhoneProcess]) -> None:
    """4 legs is the per-process maximum (note 1); the 5th is refused. A second round reuses pjsua's call
    slots, which must not disturb the new calls (note 3): every BYE gets its 200."""
    a, b = phones
    to = _setup(a, b, "udp")
    b.auto_answer("b", 200, ring=False)
    for _ in range(2):
        calls = [a.call("a", to) for _ in range(4)]
        with pytest.raises(PhoneCommandFailed, match="PJ_ETOOMANY"):
            a.call("a", to)
        for call in calls:
            a.wait_call_state(call, "confirmed", timeout=5)

        def all_flowing(calls: list[str] = calls) -> bool:
            return all(a.rtp_gaps(c)["confirmed_ms"] >= 500 and a.rtp_gaps(c)["rx"] >= 10 for c in calls)

        poll_until(all_flowing, timeout=10, what="RTP on all four calls")
        for call in calls:
            assert a.rtp_gaps(call)["max_gap_ms"] < 200
            a.bye(call)
        for call in calls:
            assert _bye_result(a, call)["code"] == 200
        poll_until(
            lambda: all(c["state"] == "disconnected" for c in b.request("calls")["calls"]),
            timeout=5,
            what="B's legs ended",
        )
    assert len(b.request("calls")["calls"]) == 8


def test_limits_and_bad_commands_are_refused_without_killing_the_phone(
    phones: tuple[PhoneProcess, PhoneProcess],
) -> None:
    a, _ = phones
    a.transports(udp=True)
    with pytest.raises(PhoneCommandFailed, match="transport: 'tcp' not created"):
        a.account_add("y", f"sip:y@{A_ADDR}", transport="tcp")
    for i in range(8):
        a.account_add(f"x{i}", f"sip:x{i}@{A_ADDR}")
    # The 9th account would abort the interpreter inside pjsua (note 2): refused instead.
    with pytest.raises(PhoneCommandFailed, match="at most 8 accounts"):
        a.account_add("x8", f"sip:x8@{A_ADDR}")
    with pytest.raises(PhoneCommandFailed, match="no such call"):
        a.answer("c99")
    with pytest.raises(PhoneCommandFailed, match="unknown command"):
        a.request("dial")
    assert a.request("ping")["bind"] == A_ADDR


# ---------------------------------------------------------------------------------------------------------
# Registration, against a minimal digest-checking registrar stub (not the PBX: just enough to observe the
# phone's REGISTER, its credentials on the wire, and its reg_state events).
# ---------------------------------------------------------------------------------------------------------

REALM = "stub"
NONCE = "0123456789abcdef"


class RegistrarStub:
    """Answers REGISTER with 401, then 200 once the digest (RFC 2617 §3.2.2, qop=auth) verifies.

    Listens on UDP (`port`) and TCP (`tcp_port`); TCP messages are framed by Content-Length and answered
    on the connection they came in on (RFC 3261 §18.2.2).
    """

    def __init__(self, address: str, user: str, password: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind((address, 0))
        self.listener.listen(4)
        self.listener.settimeout(0.1)
        self.tcp_port = self.listener.getsockname()[1]
        self.user = user
        self.password = password
        self.seen: list[tuple[str, int]] = []  # (what happened, expires)
        self.contacts: list[str] = []
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run_udp, daemon=True),
            threading.Thread(target=self._run_tcp, daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(5)
        self.sock.close()
        self.listener.close()

    def _run_udp(self) -> None:
        while not self.stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            reply = self._handle(data.decode("utf-8", "replace"))
            if reply is not None:
                self.sock.sendto(reply.encode(), peer)

    def _run_tcp(self) -> None:
        conns: list[socket.socket] = []
        try:
            while not self.stop.is_set():
                try:
                    conn, _ = self.listener.accept()
                except TimeoutError:
                    continue
                conn.settimeout(0.1)
                conns.append(conn)
                threading.Thread(target=self._serve_conn, args=(conn,), daemon=True).start()
        finally:
            for conn in conns:
                conn.close()

    def _serve_conn(self, conn: socket.socket) -> None:
        buf = b""
        while not self.stop.is_set():
            try:
                chunk = conn.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\r\n\r\n" in buf:
                head, rest = buf.split(b"\r\n\r\n", 1)
                length = re.search(rb"(?im)^(?:content-length|l)\s*:\s*(\d+)", head)
                size = int(length.group(1)) if length else 0
                if len(rest) < size:
                    break
                buf = rest[size:]
                if not head.strip():
                    continue  # CRLF keep-alive
                reply = self._handle(head.decode("utf-8", "replace") + "\r\n\r\n")
                if reply is not None:
                    conn.sendall(reply.encode())

    def _handle(self, text: str) -> str | None:
        head = text.split("\r\n\r\n", 1)[0].split("\r\n")
        if not head[0].startswith("REGISTER "):
            return None
        uri = head[0].split(" ")[1]
        headers: list[tuple[str, str]] = []
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))

        def get(name: str) -> str:
            return next((v for n, v in headers if n == name), "")

        expires = int(get("expires") or re.search(r"expires=(\d+)", get("contact")).group(1))  # type: ignore[union-attr]
        base = [f"Via: {v}" for n, v in headers if n in ("via", "v")]
        to = get("to")
        base += [
            f"From: {get('from')}",
            f"To: {to}{'' if 'tag=' in to else ';tag=stub'}",
            f"Call-ID: {get('call-id')}",
            f"CSeq: {get('cseq')}",
        ]
        self.contacts.append(get("contact") or get("m"))
        auth = get("authorization")
        if not auth:
            self.seen.append(("challenged", expires))
            return "\r\n".join(
                [
                    "SIP/2.0 401 Unauthorized",
                    *base,
                    f'WWW-Authenticate: Digest realm="{REALM}", nonce="{NONCE}", qop="auth"',
                    "Content-Length: 0",
                    "",
                    "",
                ]
            )
        params = dict(re.findall(r'(\w+)="?([^",]*)"?', auth))
        ha1 = hashlib.md5(f"{self.user}:{REALM}:{self.password}".encode()).hexdigest()
        ha2 = hashlib.md5(f"REGISTER:{params.get('uri', uri)}".encode()).hexdigest()
        expected = hashlib.md5(
            f"{ha1}:{NONCE}:{params.get('nc')}:{params.get('cnonce')}:auth:{ha2}".encode()
        ).hexdigest()
        if params.get("username") != self.user or params.get("response") != expected:
            self.seen.append(("bad digest", expires))
            return "\r\n".join(["SIP/2.0 403 Forbidden", *base, "Content-Length: 0", "", ""])
        self.seen.append(("registered" if expires else "unregistered", expires))
        contact = f"Contact: {get('contact')}" if expires else ""
        return "\r\n".join(
            [
                "SIP/2.0 200 OK",
                *base,
                *([contact] if contact else []),
                f"Expires: {expires}",
                "Content-Length: 0",
                "",
                "",
            ]
        )


@pytest.fixture
def registrar() -> Iterator[RegistrarStub]:
    stub = RegistrarStub(REGISTRAR_ADDR, "alice", "s3cret")
    yield stub
    stub.close()


def test_register_with_digest_then_unregister(registrar: RegistrarStub, tmp_path: Path) -> None:
    with PhoneProcess(A_ADDR, log=tmp_path / "a.log") as a:
        a.transports(udp=True)
        a.account_add(
            "alice",
            f"sip:alice@{REGISTRAR_ADDR}",
            registrar=f"sip:{REGISTRAR_ADDR}:{registrar.port}",
            register=True,
            user="alice",
            password="s3cret",
            expires=120,
        )
        up = a.wait_event(lambda e: e["event"] == "reg_state" and e.get("account") == "alice", 5)
        assert up["code"] == 200 and up["active"] is True and up["expiration"] > 0
        assert registrar.seen[:2] == [("challenged", 120), ("registered", 120)]

        mark = a.mark()
        a.unregister("alice")
        down = a.wait_event(lambda e: e["event"] == "reg_state", 5, since=mark)
        assert down["code"] == 200 and down["active"] is False
        assert registrar.seen[-1] == ("unregistered", 0)
        assert a.errors() == []
    # The password is on the wire only as a digest, and never in the phone's log.
    assert "s3cret" not in (tmp_path / "a.log").read_text()


def test_wrong_password_is_reported_as_a_failed_registration(registrar: RegistrarStub) -> None:
    with PhoneProcess(A_ADDR) as a:
        a.transports(udp=True)
        a.account_add(
            "alice",
            f"sip:alice@{REGISTRAR_ADDR}",
            registrar=f"sip:{REGISTRAR_ADDR}:{registrar.port}",
            register=True,
            user="alice",
            password="wrong",
        )
        failed = a.wait_event(lambda e: e["event"] == "reg_state", 5)
        assert failed["code"] == 403 and failed["active"] is False
        assert ("bad digest", 300) in registrar.seen


def test_outbound_parameters_reach_the_registrar_over_tcp(registrar: RegistrarStub) -> None:
    """RFC 5626 §4.2: with outbound asked for, the Contact carries +sip.instance and reg-id.

    pjsua adds them only on a reliable transport; over UDP it sends just `;ob` (measured)."""
    instance = "<urn:uuid:00000000-0000-4000-8000-000000000021>"
    with PhoneProcess(A_ADDR) as a:
        a.transports(udp=True, tcp=True)
        a.account_add(
            "alice",
            f"sip:alice@{REGISTRAR_ADDR}",
            transport="tcp",
            registrar=f"sip:{REGISTRAR_ADDR}:{registrar.tcp_port}",
            register=True,
            user="alice",
            password="s3cret",
            outbound={"instance_id": instance, "reg_id": 1},
        )
        up = a.wait_event(lambda e: e["event"] == "reg_state", 5)
        assert up["code"] == 200
        assert a.errors() == []
    contact = registrar.contacts[1]
    assert ";transport=tcp" in contact.lower() and ";ob" in contact, contact
    assert "reg-id=1" in contact and f'+sip.instance="{instance}"' in contact, contact
