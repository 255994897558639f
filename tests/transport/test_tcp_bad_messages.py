"""Malformed messages over TCP on loopback (RFC 3261 §18.3, §8.2.6.2; issue 3: "a bad request gets a
stateless error reply"): while the stream is still framed (a readable Content-Length, only the message is
bad) a request is answered 400 (or the parser's status, e.g. 505) on its connection, which stays open and
serves the next message; when framing is lost (no or bad Content-Length, oversize) the error goes out and
the connection closes. A bad response is dropped and counted, the connection kept."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from raftpbx.transport.endpoint import SipEndpoint
from raftpbx.transport.responder import Responder, ResponderConfig
from raftpbx.transport.sip.message import DEFAULT_LIMITS, Request, Response, parse_message
from raftpbx.transport.sip.stream import KeepAlive, StreamError, StreamFramer, StreamParser

HOST = "127.0.0.1"


def request(
    branch: str,
    *,
    method: str = "OPTIONS",
    version: str = "SIP/2.0",
    extra: str = "",
    length: str | None = "0",
    body: str = "",
) -> bytes:
    lines = [
        f"{method} sip:svc@{HOST} {version}",
        f"Via: SIP/2.0/TCP {HOST}:5999;branch={branch};rport",
        "Max-Forwards: 70",
        f"From: <sip:a@{HOST}>;tag=f1",
        f"To: <sip:svc@{HOST}>",
        f"Call-ID: {branch}@{HOST}",
        f"CSeq: 1 {method}",
    ]
    if extra:
        lines.append(extra)
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


@pytest.fixture
async def endpoint() -> AsyncIterator[SipEndpoint]:
    ep = SipEndpoint(Responder(ResponderConfig()))
    await ep.start(HOST, 0, udp=False, tcp=True)
    try:
        yield ep
    finally:
        await ep.aclose()


class Peer:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.parser = StreamParser()

    async def next(self, within: float = 5.0) -> Response:
        async with asyncio.timeout(within):
            while True:
                item = self.parser.next_message()
                if isinstance(item, Response):
                    return item
                if item is not None:
                    continue
                data = await self.reader.read(65536)
                if not data:
                    raise EOFError("closed by the server")
                self.parser.feed(data)

    async def closed(self, within: float = 5.0) -> bool:
        async with asyncio.timeout(within):
            while True:
                data = await self.reader.read(65536)
                if not data:
                    return True
                self.parser.feed(data)


async def connect(endpoint: SipEndpoint) -> Peer:
    assert endpoint.tcp_address is not None
    reader, writer = await asyncio.open_connection(*endpoint.tcp_address)
    return Peer(reader, writer)


async def test_a_bad_header_gets_400_and_the_connection_serves_the_next_request(
    endpoint: SipEndpoint,
) -> None:
    peer = await connect(endpoint)
    peer.writer.write(request("z9hG4bK-bad1", extra="Max-Forwards: x"))  # a second, bad Max-Forwards: 400
    reply = await peer.next()
    assert reply.status == 400 and reply.call_id == f"z9hG4bK-bad1@{HOST}" and reply.branch == "z9hG4bK-bad1"
    assert reply.to_tag  # a stateless answer still tags To (§8.2.6.2)
    peer.writer.write(request("z9hG4bK-good1"))
    good = await peer.next()
    assert good.status == 200 and good.branch == "z9hG4bK-good1"
    assert endpoint.counters.bad_requests_answered == 1 and endpoint.counters.tcp_framing_errors == 0
    assert len(endpoint.tcp.connections) == 1
    peer.writer.close()


async def test_a_bad_message_with_a_body_is_skipped_whole(endpoint: SipEndpoint) -> None:
    """The body of the bad request (which looks like a request itself) is not read as the next message."""
    peer = await connect(endpoint)
    inner = request("z9hG4bK-inner").decode()
    peer.writer.write(
        request("z9hG4bK-bad2", extra="Max-Forwards: x", length=str(len(inner)), body=inner)
        + request("z9hG4bK-good2")
    )
    first, second = await peer.next(), await peer.next()
    assert (first.status, first.branch) == (400, "z9hG4bK-bad2")
    assert (second.status, second.branch) == (200, "z9hG4bK-good2")
    assert endpoint.counters.requests_received == 1  # the inner text never reached the transaction layer
    peer.writer.close()


async def test_the_parsers_status_is_kept_505_for_another_sip_version(endpoint: SipEndpoint) -> None:
    peer = await connect(endpoint)
    peer.writer.write(request("z9hG4bK-v3", version="SIP/3.0"))
    reply = await peer.next()
    assert reply.status == 505
    peer.writer.write(request("z9hG4bK-after-v3"))
    assert (await peer.next()).status == 200
    peer.writer.close()


async def test_split_across_segments_the_same_answers(endpoint: SipEndpoint) -> None:
    peer = await connect(endpoint)
    data = request("z9hG4bK-seg-bad", extra="Max-Forwards: x") + request("z9hG4bK-seg-good")
    for i in range(0, len(data), 7):
        peer.writer.write(data[i : i + 7])
        await peer.writer.drain()
    assert (await peer.next()).status == 400
    assert (await peer.next()).status == 200
    peer.writer.close()


@pytest.mark.parametrize(
    ("length", "reason"),
    [(None, "missing"), ("abc", "not a number"), ("-1", "negative")],
)
async def test_lost_framing_gets_400_then_close(
    endpoint: SipEndpoint, length: str | None, reason: str
) -> None:
    peer = await connect(endpoint)
    peer.writer.write(
        request(f"z9hG4bK-frame-{reason.replace(' ', '-')}", length=length) + request("z9hG4bK-x")
    )
    reply = await peer.next()
    assert reply.status == 400
    assert await peer.closed()  # nothing after the lost framing is read as a message
    assert endpoint.counters.tcp_framing_errors == 1 and endpoint.counters.bad_requests_answered == 1
    assert endpoint.counters.requests_received == 0


async def test_two_content_lengths_lose_framing(endpoint: SipEndpoint) -> None:
    peer = await connect(endpoint)
    peer.writer.write(request("z9hG4bK-twocl", extra="Content-Length: 5"))
    assert (await peer.next()).status == 400
    assert await peer.closed()


async def test_an_oversized_body_gets_413_then_close(endpoint: SipEndpoint) -> None:
    peer = await connect(endpoint)
    peer.writer.write(request("z9hG4bK-big", length=str(DEFAULT_LIMITS.max_message + 1)))
    reply = await peer.next()
    assert reply.status == 413
    assert await peer.closed()


async def test_a_bad_response_is_dropped_and_counted_and_the_connection_kept(endpoint: SipEndpoint) -> None:
    peer = await connect(endpoint)
    bad_response = (
        "SIP/2.0 200 OK\r\n"
        f"Via: SIP/2.0/TCP {HOST}:5999;branch=z9hG4bK-resp\r\n"
        f"From: <sip:a@{HOST}>;tag=f1\r\nTo: <sip:svc@{HOST}>;tag=t\r\n"
        "Call-ID: r@127.0.0.1\r\nCSeq: nope\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    peer.writer.write(bad_response + request("z9hG4bK-after-resp"))
    reply = await peer.next()
    assert (reply.status, reply.branch) == (200, "z9hG4bK-after-resp")  # nothing answered the bad response
    assert endpoint.counters.bad_responses_dropped == 1 and endpoint.counters.bad_requests_answered == 0
    peer.writer.close()


async def test_an_unanswerable_bad_request_is_dropped_and_counted(endpoint: SipEndpoint) -> None:
    """No Call-ID: no stateless answer can be built (§8.2.6.2 copies it); dropped, connection kept."""
    peer = await connect(endpoint)
    data = request("z9hG4bK-nocid").replace(f"Call-ID: z9hG4bK-nocid@{HOST}\r\n".encode(), b"")
    peer.writer.write(data + request("z9hG4bK-after-nocid"))
    reply = await peer.next()
    assert (reply.status, reply.branch) == (200, "z9hG4bK-after-nocid")
    assert endpoint.counters.bad_requests_dropped == 1
    peer.writer.close()


# --- the framer alone: what parse_message gives for each message, however the stream is split ---------------


def _frames(data: bytes, step: int) -> list[object]:
    framer = StreamFramer()
    out: list[object] = []
    for i in range(0, len(data), step):
        framer.feed(data[i : i + step])
        while (item := framer.next_frame()) is not None:
            out.append(item)
    return out


def test_the_framer_gives_each_message_as_parse_message_does_however_the_stream_is_split() -> None:
    body = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n"
    messages = [
        request("z9hG4bK-f1", method="MESSAGE", extra="Content-Type: text/plain", length=str(len(body)), body=body),
        request("z9hG4bK-f2").replace(b"Content-Length: 0", b"l: 0"),
        request("z9hG4bK-f3"),
    ]
    data = b"\r\n\r\n" + messages[0] + b"\r\n" + messages[1] + messages[2]
    want: list[object] = [KeepAlive(ping=True), parse_message(messages[0]), KeepAlive(ping=False),
                          parse_message(messages[1]), parse_message(messages[2])]
    for step in (1, 3, 64, len(data)):
        got = _frames(data, step)
        assert [type(x) for x in got] == [type(x) for x in want]
        for a, b in zip(got, want, strict=True):
            if isinstance(a, KeepAlive):
                assert a == b
            else:
                assert isinstance(a, Request) and isinstance(b, Request)
                assert a.to_bytes() == b.to_bytes() and a.body == b.body


def test_the_framer_skips_a_bad_frame_and_poisons_on_lost_framing() -> None:
    framer = StreamFramer()
    framer.feed(request("z9hG4bK-b", extra="CSeq: 3 OPTIONS") + request("z9hG4bK-g"))
    with pytest.raises(StreamError) as bad:
        framer.next_frame()
    assert not bad.value.framing_lost and bad.value.error.status == 400 and bad.value.data is not None
    assert parse_message(request("z9hG4bK-g")).branch == framer.next_frame().branch  # type: ignore[union-attr]
    framer.feed(request("z9hG4bK-nolen", length=None))
    with pytest.raises(StreamError) as lost:
        framer.next_frame()
    assert lost.value.framing_lost
    with pytest.raises(StreamError):
        framer.feed(b"more")


_PIECES = [
    request("z9hG4bK-p1"),
    request("z9hG4bK-p2", extra="Max-Forwards: x"),
    request("z9hG4bK-p3", length=None),
    request("z9hG4bK-p4", length="3", body="abc"),
    b"\r\n\r\n",
    b"\r\n",
    b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"garbage\r\n\r\n",
]


def _outcomes(data: bytes, step: int) -> list[str]:
    framer = StreamFramer()
    out: list[str] = []
    for i in range(0, len(data), step):
        try:
            framer.feed(data[i : i + step])
        except StreamError:
            break
        while True:
            try:
                item = framer.next_frame()
            except StreamError as exc:
                out.append(f"error {exc.error.status} lost={exc.framing_lost}")
                if exc.framing_lost:
                    return out
                continue
            if item is None:
                break
            out.append(
                repr(item) if isinstance(item, KeepAlive) else item.to_bytes().decode(errors="replace")
            )
    return out


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.sampled_from(_PIECES) | st.binary(max_size=40), max_size=6),
    st.integers(min_value=1, max_value=50),
)
def test_any_stream_gives_the_same_outcomes_however_it_is_split(pieces: list[bytes], step: int) -> None:
    data = b"".join(pieces)
    assert _outcomes(data, step) == _outcomes(data, max(1, len(data)))
