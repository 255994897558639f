"""Late timers (the receive buffer's own test is test_udp_receive_buffer.py).

The loop runs due timers before it polls sockets (uvloop/libuv does; the stdlib loop polls first): after a
stall longer than T1, Timer A (RFC 3261 §17.1.1.2) would retransmit an INVITE whose 180 is already queued on
our socket. The endpoint reads what is queued before it fires a late timer, as the loop would have had it
not stalled: no retransmission. Real loopback sockets, on uvloop and on the stdlib loop (conftest.py).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable

from raftpbx.transport.endpoint import SipEndpoint
from raftpbx.transport.sip.message import Request, Response, make_response, parse_message
from raftpbx.transport.sip.transaction import Event, ResponseReceived, TimerConfig

WaitUntil = Callable[..., Awaitable[None]]  # the `wait_until` fixture of conftest.py

HOST = "127.0.0.1"


def _invite(port: int) -> Request:
    request = parse_message(
        (
            f"INVITE sip:bob@{HOST} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {HOST}:{port};branch=z9hG4bK-late-timer\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:alice@{HOST}>;tag=a1\r\n"
            f"To: <sip:bob@{HOST}>\r\n"
            f"Call-ID: late-timer@{HOST}\r\n"
            "CSeq: 1 INVITE\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()
    )
    assert isinstance(request, Request)
    return request


async def test_a_late_timer_reads_the_queued_180_first_no_invite_retransmission_rfc3261_17_1_1_2(
    wait_until: WaitUntil,
) -> None:
    events: list[Event] = []
    timers = TimerConfig(t1=0.1, t2=0.8, t4=1.0)
    ep = SipEndpoint(lambda e, event, flow: events.append(event), timers=timers)
    await ep.start(HOST, 0, udp=True, tcp=False)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind((HOST, 0))
    peer.setblocking(False)
    loop = asyncio.get_running_loop()
    transports: list[asyncio.BaseTransport] = []
    try:
        assert ep.udp_address is not None
        invite = _invite(ep.udp_address[1])
        ep.send_request(invite, peer.getsockname())
        await wait_until(lambda: _readable(peer), what="the INVITE at the peer")
        received = parse_message(peer.recv(65535))
        assert isinstance(received, Request) and received.method == "INVITE"
        ringing = make_response(received, 180, to_tag="b1")

        class Staller(asyncio.DatagramProtocol):
            """Stalls the loop inside an I/O callback (after the loop's poll, so the next iteration runs
            its due timers before it polls again), right after the 180 was queued on the endpoint."""

            def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
                assert ep.udp_address is not None
                while _readable(peer):  # copies sent before the 180 exists are legitimate retransmissions
                    peer.recv(65535)
                peer.sendto(ringing.to_bytes(), ep.udp_address)  # queued on the endpoint's socket at once
                time.sleep(4 * timers.t1)  # the loop stalls past Timer A (T1): the stimulus under test

        staller, _ = await loop.create_datagram_endpoint(Staller, local_addr=(HOST, 0))
        transports.append(staller)
        poke = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        poke.sendto(b"stall", staller.get_extra_info("sockname"))
        poke.close()
        await wait_until(
            lambda: any(isinstance(e, ResponseReceived) and e.response.status == 180 for e in events),
            what="the 180 at the transaction",
        )
        # Timer A fires synchronously after the stall: had it fired before the 180 was read, the INVITE
        # copy would already sit in the peer's socket now.
        assert not _readable(peer), "the INVITE was retransmitted although its 180 had arrived"
        assert isinstance(ringing, Response)
    finally:
        for transport in transports:
            transport.close()
        peer.close()
        await ep.aclose()


def _readable(sock: socket.socket) -> bool:
    try:
        sock.recv(65535, socket.MSG_PEEK)
    except BlockingIOError:
        return False
    return True
