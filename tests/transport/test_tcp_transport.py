"""TCP transport over real loopback sockets: framing (RFC 3261 §18.3), CRLF keepalive (RFC 5626 §4.4.1),
idle timeout, connection limit, connection reuse for responses (§18.2.2) and for requests to an aliased
peer (RFC 5923 style), TCP_NODELAY, slow peers, garbage from a peer."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from raftpbx.transport.counters import TransportCounters
from raftpbx.transport.errors import ConnectError, ConnectionLimitError, SendError, TransportError
from raftpbx.transport.flow import Flow
from raftpbx.transport.sip.message import Limits, Request, Response, make_response, parse_message
from raftpbx.transport.sip.stream import StreamParser
from raftpbx.transport.tcp import TcpConfig, TcpTransport

WaitUntil = Callable[..., Awaitable[None]]  # the `wait_until` fixture of conftest.py


def options(
    branch: str, sent_by: str = "127.0.0.1:5999", call_id: str = "c1@127.0.0.1", body: bytes = b""
) -> bytes:
    return (
        f"OPTIONS sip:bob@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/TCP {sent_by};branch={branch}\r\n"
        f"Max-Forwards: 70\r\n"
        f"From: <sip:alice@127.0.0.1>;tag=a1\r\n"
        f"To: <sip:bob@127.0.0.1>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: 1 OPTIONS\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class Server:
    """A TcpTransport whose handler answers every request 200 on the flow it came on."""

    def __init__(self, config: TcpConfig) -> None:
        self.counters = TransportCounters()
        self.received: list[tuple[Request | Response, Flow]] = []
        self.tcp = TcpTransport(self.handle, self.counters, config)

    def handle(self, message: Request | Response, flow: Flow) -> None:
        self.received.append((message, flow))
        if isinstance(message, Request):
            if message.headers.get("X-Raise"):
                raise RuntimeError("handler bug")
            self.tcp.send(flow, make_response(message, 200, to_tag="srv").to_bytes())


@pytest.fixture
async def server(request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    config = getattr(request, "param", TcpConfig())
    srv = Server(config)
    await srv.tcp.listen("127.0.0.1", 0)
    try:
        yield srv
    finally:
        await srv.tcp.aclose()


async def connect(srv: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = srv.tcp.local_addresses[0]
    return await asyncio.open_connection(host, port)


async def read_message(reader: asyncio.StreamReader, within: float = 5.0) -> Request | Response:
    parser = StreamParser()
    async with asyncio.timeout(within):
        while True:
            item = parser.next_message()
            if isinstance(item, Request | Response):
                return item
            data = await reader.read(65536)
            if not data:
                raise EOFError("connection closed")
            parser.feed(data)


async def closed_by_peer(reader: asyncio.StreamReader, within: float = 5.0) -> bool:
    """True when the peer closed (EOF or reset) within `within` seconds; False if it stayed open."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def test_message_split_across_writes_is_framed_once(server: Server, wait_until: WaitUntil) -> None:
    reader, writer = await connect(server)
    data = options("z9hG4bK-split", body=b"v=0\r\n")
    for i in range(0, len(data), 7):
        writer.write(data[i : i + 7])
        await writer.drain()
    response = await read_message(reader)
    assert isinstance(response, Response) and response.status == 200
    assert len(server.received) == 1
    assert server.received[0][0].body == b"v=0\r\n"
    writer.close()


async def test_two_messages_in_one_write_both_answered_in_order(server: Server) -> None:
    reader, writer = await connect(server)
    writer.write(
        options("z9hG4bK-one", call_id="one@127.0.0.1") + options("z9hG4bK-two", call_id="two@127.0.0.1")
    )
    parser = StreamParser()
    responses: list[Request | Response] = []
    async with asyncio.timeout(5):
        while len(responses) < 2:
            data = await reader.read(65536)
            assert data, "closed early"
            parser.feed(data)
            while (item := parser.next_message()) is not None:
                assert isinstance(item, Response)
                responses.append(item)
    assert [m.call_id for m, _ in server.received] == ["one@127.0.0.1", "two@127.0.0.1"]
    assert [r.call_id for r in responses] == ["one@127.0.0.1", "two@127.0.0.1"]
    assert server.counters.stream_messages_received == 2
    writer.close()


async def test_crlf_ping_gets_single_crlf_pong_rfc5626_4_4_1(server: Server, wait_until: WaitUntil) -> None:
    reader, writer = await connect(server)
    writer.write(b"\r\n\r\n")
    async with asyncio.timeout(5):
        pong = await reader.readexactly(2)
    assert pong == b"\r\n"
    # A ping split in two writes is still one ping, and a request after it is still framed.
    writer.write(b"\r\n")
    await writer.drain()
    writer.write(b"\r\n" + options("z9hG4bK-after-ping"))
    async with asyncio.timeout(5):
        assert await reader.readexactly(2) == b"\r\n"
    response = await read_message(reader)
    assert isinstance(response, Response) and response.status == 200
    assert server.counters.keepalive_pings == 2 and server.counters.keepalive_pongs == 2
    writer.close()


@pytest.mark.parametrize("server", [TcpConfig(idle_timeout=0.3)], indirect=True)
async def test_idle_connection_is_closed(server: Server, wait_until: WaitUntil) -> None:
    reader, writer = await connect(server)
    await wait_until(lambda: len(server.tcp.connections) == 1, what="accept")
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await closed_by_peer(reader, within=5)
    assert loop.time() - started >= 0.25
    await wait_until(
        lambda: server.counters.tcp_idle_closed == 1 and not server.tcp.connections, what="idle close"
    )
    writer.close()


@pytest.mark.parametrize("server", [TcpConfig(idle_timeout=0.8)], indirect=True)
async def test_traffic_defers_the_idle_timeout(server: Server, wait_until: WaitUntil) -> None:
    reader, writer = await connect(server)
    loop = asyncio.get_running_loop()
    started = loop.time()
    # Keepalives every 0.1 s for 2 s (2.5 idle periods): the connection must stay open.
    while loop.time() - started < 2.0:
        writer.write(b"\r\n\r\n")
        async with asyncio.timeout(5):
            assert await reader.readexactly(2) == b"\r\n"
        await asyncio.sleep(0.1)
    assert server.counters.tcp_idle_closed == 0
    assert len(server.tcp.connections) == 1
    assert await closed_by_peer(reader, within=5)
    assert server.counters.tcp_idle_closed == 1
    writer.close()


@pytest.mark.parametrize("server", [TcpConfig(max_connections=2)], indirect=True)
async def test_connection_limit_refuses_beyond_max(server: Server, wait_until: WaitUntil) -> None:
    first = await connect(server)
    second = await connect(server)
    await wait_until(lambda: len(server.tcp.connections) == 2, what="two accepted")
    third_reader, third_writer = await connect(server)
    assert await closed_by_peer(third_reader)
    assert server.counters.tcp_refused_limit == 1
    # The admitted connections still work.
    for reader, writer in (first, second):
        writer.write(options(f"z9hG4bK-lim-{id(writer)}"))
        response = await read_message(reader)
        assert isinstance(response, Response) and response.status == 200
    # Outgoing connections respect the same limit.
    with pytest.raises(ConnectionLimitError):
        await server.tcp.connect(("127.0.0.1", 9))
    # Once one closes, a new connection is admitted.
    first[1].close()
    await wait_until(lambda: len(server.tcp.connections) == 1, what="close seen")
    reader, writer = await connect(server)
    writer.write(options("z9hG4bK-lim-new"))
    assert isinstance(await read_message(reader), Response)
    for w in (second[1], third_writer, writer):
        w.close()


async def test_response_reuses_the_request_connection(server: Server, wait_until: WaitUntil) -> None:
    reader, writer = await connect(server)
    writer.write(options("z9hG4bK-reuse"))
    response = await read_message(reader)
    assert isinstance(response, Response) and response.status == 200
    assert len(server.tcp.connections) == 1
    assert server.counters.tcp_connected == 0  # no connection opened by the server
    _, flow = server.received[0]
    local = writer.get_extra_info("sockname")
    assert flow.remote == (local[0], local[1])
    writer.close()


async def test_request_to_aliased_peer_reuses_its_connection(server: Server, wait_until: WaitUntil) -> None:
    # The peer says "I am 127.0.0.1:<port nobody listens on>" in its Via; the server must reach it
    # through the connection it opened, not by dialling that port (it would be refused).
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    unused_port = probe.getsockname()[1]
    probe.close()
    reader, writer = await connect(server)
    writer.write(options("z9hG4bK-alias", sent_by=f"127.0.0.1:{unused_port}"))
    await read_message(reader)
    _, flow = server.received[0]
    server.tcp.add_alias(flow.connection_id, ("127.0.0.1", unused_port))
    conn = await server.tcp.connect(("127.0.0.1", unused_port))
    assert conn.id == flow.connection_id
    request = parse_message(options("z9hG4bK-to-peer", sent_by="127.0.0.1:5060"))
    used = await server.tcp.send_to(("127.0.0.1", unused_port), request.to_bytes())
    assert used.connection_id == flow.connection_id
    got = await read_message(reader)
    assert isinstance(got, Request) and got.branch == "z9hG4bK-to-peer"
    assert server.counters.tcp_connected == 0 and server.counters.tcp_alias_reused >= 1
    # When the peer's connection closes, the alias goes with it: a new request must dial (and fail).
    writer.close()
    await wait_until(lambda: not server.tcp.connections, what="peer gone")
    with pytest.raises(ConnectError):
        await server.tcp.connect(("127.0.0.1", unused_port))
    assert server.counters.tcp_connect_failures == 1


async def test_tcp_nodelay_on_accepted_and_outgoing_sockets(server: Server, wait_until: WaitUntil) -> None:
    _reader, writer = await connect(server)
    await wait_until(lambda: len(server.tcp.connections) == 1, what="accept")
    accepted = server.tcp.connections[0]
    assert accepted.nodelay
    other = Server(TcpConfig())
    try:
        host, port = await other.tcp.listen("127.0.0.1", 0)
        outgoing = await server.tcp.connect((host, port))
        assert outgoing.outbound and outgoing.nodelay
        await wait_until(lambda: len(other.tcp.connections) == 1, what="accept on other")
        assert other.tcp.connections[0].nodelay
        # Reuse: a second connect to the same address returns the same connection.
        assert (await server.tcp.connect((host, port))) is outgoing
        assert server.counters.tcp_connected == 1
    finally:
        await other.tcp.aclose()
    writer.close()


async def test_garbage_closes_only_that_connection_and_server_keeps_answering(
    server: Server, wait_until: WaitUntil
) -> None:
    bad_reader, bad_writer = await connect(server)
    bad_writer.write(b"\x00\xffGARBAGE \x01\x02 not sip at all\r\n\r\n")
    assert await closed_by_peer(bad_reader)
    assert server.counters.tcp_framing_errors == 1
    # A message without Content-Length on a stream is a framing error too (§18.3).
    r2, w2 = await connect(server)
    w2.write(options("z9hG4bK-ncl").replace(b"Content-Length: 0\r\n", b""))
    assert await closed_by_peer(r2)
    assert server.counters.tcp_framing_errors == 2
    # A handler that raises is counted; the loop and the connection survive.
    reader, writer = await connect(server)
    writer.write(options("z9hG4bK-raise").replace(b"CSeq:", b"X-Raise: 1\r\nCSeq:"))
    await wait_until(lambda: server.counters.callback_errors == 1, what="handler error counted")
    writer.write(options("z9hG4bK-fine"))
    response = await read_message(reader)
    assert isinstance(response, Response) and response.status == 200
    bad_writer.close()
    w2.close()
    writer.close()


@pytest.mark.parametrize("server", [TcpConfig(limits=Limits(max_message=4096))], indirect=True)
async def test_oversized_message_closes_connection_before_buffering_it(
    server: Server, wait_until: WaitUntil
) -> None:
    reader, writer = await connect(server)
    # Content-Length announces more than the limit: refused before the body is buffered (413).
    writer.write(options("z9hG4bK-big").replace(b"Content-Length: 0", b"Content-Length: 10000000"))
    assert await closed_by_peer(reader)
    # A header section that never ends is cut at the limit (513).
    r2, w2 = await connect(server)
    w2.write(options("z9hG4bK-big2").split(b"\r\n\r\n")[0] + b"\r\n" + b"X-Pad: y\r\n" * 1000)
    assert await closed_by_peer(r2)
    assert server.counters.tcp_framing_errors == 2
    writer.close()
    w2.close()


@pytest.mark.parametrize(
    "server", [TcpConfig(max_write_buffer=256 * 1024, write_high_water=16 * 1024)], indirect=True
)
async def test_slow_peer_is_dropped_when_write_buffer_overflows(
    server: Server, wait_until: WaitUntil
) -> None:
    reader, writer = await connect(server)
    writer.write(options("z9hG4bK-slow"))
    await read_message(reader)
    _, flow = server.received[0]
    chunk = b"x" * 65536
    with pytest.raises(SendError):
        for _ in range(2000):  # up to 128 MiB; the peer never reads, so kernel buffers fill first
            server.tcp.send(flow, chunk)
            await asyncio.sleep(0)
    assert server.counters.tcp_slow_peers_dropped == 1
    await wait_until(lambda: not server.tcp.connections, what="slow peer dropped")
    with pytest.raises(TransportError):
        server.tcp.send(flow, b"late")
    writer.close()


async def test_connect_refused_maps_to_connect_error() -> None:
    tcp = TcpTransport(lambda m, f: None, TransportCounters(), TcpConfig(connect_timeout=2))
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(ConnectError):
        await tcp.connect(("127.0.0.1", port))
    await tcp.aclose()


async def test_aclose_closes_every_connection(server: Server, wait_until: WaitUntil) -> None:
    clients = [await connect(server) for _ in range(3)]
    await wait_until(lambda: len(server.tcp.connections) == 3, what="three accepted")
    await server.tcp.aclose()
    assert not server.tcp.connections
    for reader, writer in clients:
        assert await closed_by_peer(reader)
        writer.close()
