"""The endpoint shell over TCP on loopback: responses reuse the request's connection (RFC 3261 §18.2.2),
requests to a peer's Via sent-by reuse its connection (RFC 5923 style alias), a response whose connection
has gone opens one to `received` and the sent-by port (§18.2.2), and a failed connect becomes the
transaction's TransportError (§17.1.4)."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from raftpbx.transport.endpoint import SipEndpoint
from raftpbx.transport.flow import Flow
from raftpbx.transport.responder import Responder, ResponderConfig
from raftpbx.transport.sip.message import Request, Response, make_response, parse_message
from raftpbx.transport.sip.stream import StreamParser
from raftpbx.transport.sip.transaction import Event, RequestReceived, TransportError

HOST = "127.0.0.1"

WaitUntil = Callable[..., Awaitable[None]]  # the `wait_until` fixture of conftest.py


def unused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def request_bytes(method: str, branch: str, sent_by_port: int, *, rport: bool = True) -> bytes:
    return (
        f"{method} sip:svc@{HOST} SIP/2.0\r\n"
        f"Via: SIP/2.0/TCP {HOST}:{sent_by_port};branch={branch}{';rport' if rport else ''}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:a@{HOST}>;tag=f1\r\n"
        f"To: <sip:svc@{HOST}>\r\n"
        f"Call-ID: {branch}@{HOST}\r\n"
        f"CSeq: 1 {method}\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


async def read_message(reader: asyncio.StreamReader) -> Request | Response:
    parser = StreamParser()
    async with asyncio.timeout(5):
        while True:
            item = parser.next_message()
            if isinstance(item, Request | Response):
                return item
            data = await reader.read(65536)
            if not data:
                raise EOFError("closed")
            parser.feed(data)


@pytest.fixture
async def endpoint() -> AsyncIterator[SipEndpoint]:
    ep = SipEndpoint(Responder(ResponderConfig()))
    await ep.start(HOST, 0, udp=False, tcp=True)
    try:
        yield ep
    finally:
        await ep.aclose()


async def test_tcp_response_on_the_request_connection(endpoint: SipEndpoint) -> None:
    assert endpoint.tcp_address is not None
    reader, writer = await asyncio.open_connection(*endpoint.tcp_address)
    local_port = writer.get_extra_info("sockname")[1]
    writer.write(request_bytes("OPTIONS", "z9hG4bK-t1", 5999))
    response = await read_message(reader)
    assert isinstance(response, Response) and response.status == 200
    assert response.top_via.rport == local_port and response.top_via.received == HOST
    assert endpoint.counters.tcp_accepted == 1 and endpoint.counters.tcp_connected == 0
    # Unknown method: 501; SIP method not supported here: 405 with Allow (§8.2.1).
    writer.write(request_bytes("FOO", "z9hG4bK-t2", 5999))
    foo = await read_message(reader)
    assert isinstance(foo, Response) and foo.status == 501
    writer.write(request_bytes("SUBSCRIBE", "z9hG4bK-t3", 5999))
    sub = await read_message(reader)
    assert isinstance(sub, Response) and sub.status == 405 and sub.headers.get("Allow")
    writer.close()


async def test_request_to_aliased_peer_reuses_its_connection(endpoint: SipEndpoint) -> None:
    # The peer's Via says it is 127.0.0.1:<port nobody listens on>: only the alias can reach it.
    assert endpoint.tcp_address is not None
    alias_port = unused_port()
    reader, writer = await asyncio.open_connection(*endpoint.tcp_address)
    writer.write(request_bytes("REGISTER", "z9hG4bK-reg", alias_port))
    await read_message(reader)  # the 401
    outgoing = parse_message(request_bytes("OPTIONS", "z9hG4bK-to-phone", endpoint.tcp_address[1]))
    assert isinstance(outgoing, Request)
    endpoint.send_request(outgoing, (HOST, alias_port), transport="tcp")
    got = await read_message(reader)
    assert isinstance(got, Request) and got.method == "OPTIONS" and got.branch == "z9hG4bK-to-phone"
    assert endpoint.counters.tcp_connected == 0 and endpoint.counters.tcp_alias_reused >= 1
    writer.close()


async def test_response_after_connection_loss_goes_to_received_and_sent_by_port(
    wait_until: WaitUntil,
) -> None:
    held: list[RequestReceived] = []

    def tu(ep: SipEndpoint, event: Event, flow: Flow | None) -> None:
        if isinstance(event, RequestReceived) and event.transaction is not None:
            held.append(event)  # answer later, after the peer hung up

    ep = SipEndpoint(tu)
    await ep.start(HOST, 0, udp=False, tcp=True)
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await accepted.put((r, w))

    phone = await asyncio.start_server(on_connect, HOST, 0)
    phone_port = phone.sockets[0].getsockname()[1]
    try:
        assert ep.tcp_address is not None
        _, writer = await asyncio.open_connection(*ep.tcp_address)
        writer.write(request_bytes("OPTIONS", "z9hG4bK-late", phone_port, rport=False))
        await wait_until(lambda: bool(held), what="request held by the TU")
        writer.close()
        await wait_until(lambda: not ep.tcp.connections, what="connection gone")
        event = held[0]
        assert event.transaction is not None
        ep.respond(event.transaction, make_response(event.request, 200, to_tag="late"))
        async with asyncio.timeout(5):
            r2, w2 = await accepted.get()
        response = await read_message(r2)
        assert isinstance(response, Response) and response.status == 200 and response.branch == "z9hG4bK-late"
        assert ep.counters.tcp_connected == 1
        w2.close()
    finally:
        phone.close()
        await ep.aclose()


async def test_failed_connect_is_the_transactions_transport_error(wait_until: WaitUntil) -> None:
    events: list[Event] = []
    ep = SipEndpoint(lambda e, event, flow: events.append(event))
    await ep.start(HOST, 0, udp=False, tcp=True)
    try:
        assert ep.tcp_address is not None
        request = parse_message(request_bytes("OPTIONS", "z9hG4bK-nowhere", ep.tcp_address[1]))
        assert isinstance(request, Request)
        tx = ep.send_request(request, (HOST, unused_port()), transport="tcp")
        await wait_until(lambda: any(isinstance(e, TransportError) for e in events), what="transport error")
        assert tx.terminated
        assert ep.counters.tcp_connect_failures == 1 and ep.counters.send_errors == 1
    finally:
        await ep.aclose()


async def test_fuzzed_streams_never_crash_the_server(endpoint: SipEndpoint, wait_until: WaitUntil) -> None:
    """Mutated messages, each on its own connection, sometimes split: no callback error, every connection
    either answered or closed, and a clean client is answered at the end."""
    assert endpoint.tcp_address is not None
    rng = random.Random(5626)
    base = request_bytes("OPTIONS", "z9hG4bK-fz", 5999)
    for i in range(150):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(data))
            choice = rng.randrange(3)
            if choice == 0:
                data[pos] = rng.randrange(256)
            elif choice == 1:
                data[pos:pos] = bytes(
                    rng.choice(b"\r\n:;,<> \t\x00\xff0123456789") for _ in range(rng.randint(1, 5))
                )
            else:
                del data[pos : pos + rng.randint(1, 10)]
        reader, writer = await asyncio.open_connection(*endpoint.tcp_address)
        cut = rng.randrange(len(data) + 1)
        writer.write(bytes(data[:cut]))
        await writer.drain()
        writer.write(bytes(data[cut:]) + (b"\r\n\r\n" if i % 3 == 0 else b""))
        writer.write_eof()
        async with asyncio.timeout(5):
            while await reader.read(65536):  # answers, then EOF from our side's half-close
                pass
        writer.close()
    await wait_until(lambda: not endpoint.tcp.connections, what="all fuzz connections closed")
    assert endpoint.counters.callback_errors == 0 and endpoint.counters.timer_errors == 0
    assert endpoint.counters.tcp_framing_errors > 0 and endpoint.counters.requests_received > 0
    reader, writer = await asyncio.open_connection(*endpoint.tcp_address)
    writer.write(request_bytes("OPTIONS", "z9hG4bK-clean", 5999))
    response = await read_message(reader)
    assert isinstance(response, Response) and response.status == 200
    writer.close()
