"""Extra listeners of the endpoint (a floating service address next to the node's own), over real loopback
sockets: messages received on a listener carry its address as `Flow.local`; replies to them come FROM that
address (RFC 3261 §18.2.2, what a phone matches its response against); requests whose top Via names the
listener leave from it, retransmissions included (§18.1.1: the Via sent-by is where responses come back);
a TCP connection opened for such a request binds the listener's host; `send_stateless(source=)` picks the
socket; removing a listener closes the connections accepted on it (RFC 5626 §4.4: the phone notices at once)
and later sends fall back to the primary socket; a failed bind leaves nothing bound."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from raftpbx.transport.endpoint import SipEndpoint
from raftpbx.transport.errors import BindError
from raftpbx.transport.flow import Address, Flow
from raftpbx.transport.sip.message import Request, Response, make_response, parse_message
from raftpbx.transport.sip.transaction import Event, RequestReceived, TimerConfig

PRIMARY_HOST = "127.0.0.1"
# A loopback address of our own (per process, so concurrent runs never collide), as a floating address.
LISTENER_HOST = f"127.{20 + os.getpid() % 200}.{os.getpid() // 200 % 250 + 1}.77"

WaitUntil = Callable[..., Awaitable[None]]  # the `wait_until` fixture of conftest.py


def options(branch: str, via: Address, target: Address, *, transport: str = "UDP") -> bytes:
    return (
        f"OPTIONS sip:svc@{target[0]}:{target[1]} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} {via[0]}:{via[1]};branch={branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:a@{PRIMARY_HOST}>;tag=f1\r\n"
        f"To: <sip:svc@{target[0]}>\r\n"
        f"Call-ID: {branch}@{PRIMARY_HOST}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


class Answerer:
    """A TU that answers every request 200 and remembers the flow each arrived on."""

    def __init__(self) -> None:
        self.flows: list[Flow] = []
        self.stateless: Address | None = None  # answer statelessly from this source instead

    def __call__(self, endpoint: SipEndpoint, event: Event, flow: Flow | None) -> None:
        if not isinstance(event, RequestReceived) or event.transaction is None or flow is None:
            return
        self.flows.append(flow)
        response = make_response(event.request, 200, "OK", to_tag="t1")
        if self.stateless is not None:
            endpoint.send_stateless(response, event.source, transport=flow.transport, source=self.stateless)
        else:
            endpoint.respond(event.transaction, response)


class Peer(asyncio.DatagramProtocol):
    """A UDP socket that records every datagram with its source address."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.received.put_nowait((data, (str(addr[0]), int(addr[1]))))

    async def get(self) -> tuple[Request | Response, Address]:
        async with asyncio.timeout(5):
            data, addr = await self.received.get()
        return parse_message(data), addr


@pytest.fixture
async def setup() -> AsyncIterator[tuple[SipEndpoint, Answerer, Address]]:
    tu = Answerer()
    ep = SipEndpoint(tu, timers=TimerConfig(t1=0.05, t2=0.4))
    await ep.start(PRIMARY_HOST, 0)
    try:
        listener = await ep.add_listener(LISTENER_HOST, 0)
        yield ep, tu, listener
    finally:
        await ep.aclose()


class UdpPeer:
    """A UDP socket on loopback: sends requests, records what arrives and from where."""

    def __init__(self, transport: asyncio.DatagramTransport, protocol: Peer) -> None:
        self.transport = transport
        self.protocol = protocol
        name = transport.get_extra_info("sockname")
        self.address: Address = (str(name[0]), int(name[1]))

    def send(self, data: bytes, to: Address) -> None:
        self.transport.sendto(data, to)

    async def get(self) -> tuple[Request | Response, Address]:
        return await self.protocol.get()


@pytest.fixture
async def peer() -> AsyncIterator[UdpPeer]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(Peer, local_addr=(PRIMARY_HOST, 0))
    try:
        yield UdpPeer(transport, protocol)
    finally:
        transport.close()


def outgoing_options(branch: str, via: Address, target: Address, *, transport: str = "UDP") -> Request:
    request = parse_message(options(branch, via, target, transport=transport).replace(b";rport", b""))
    assert isinstance(request, Request)
    return request


async def test_add_listener_binds_and_is_idempotent(setup: tuple[SipEndpoint, Answerer, Address]) -> None:
    ep, _, listener = setup
    assert listener[0] == LISTENER_HOST and listener[1] > 0
    assert ep.listeners == [listener]
    assert await ep.add_listener(*listener) == listener  # a no-op when it exists
    assert ep.listeners == [listener]
    assert ep.udp_address is not None and ep.udp_address[0] == PRIMARY_HOST


async def test_udp_reply_comes_from_the_listener_it_was_sent_to_rfc3261_18_2_2(
    setup: tuple[SipEndpoint, Answerer, Address], peer: UdpPeer
) -> None:
    ep, tu, listener = setup
    assert ep.udp_address is not None
    peer.send(options("z9hG4bK-l1", peer.address, listener), listener)
    response, source = await peer.get()
    assert isinstance(response, Response) and response.status == 200
    assert source == listener
    assert tu.flows[-1].local == listener and tu.flows[-1].transport == "udp"
    # The same peer asking the primary address is answered from the primary address.
    peer.send(options("z9hG4bK-l2", peer.address, ep.udp_address), ep.udp_address)
    response, source = await peer.get()
    assert isinstance(response, Response) and source == ep.udp_address
    assert tu.flows[-1].local == ep.udp_address


async def test_retransmitted_final_response_comes_from_the_listener(
    setup: tuple[SipEndpoint, Answerer, Address], peer: UdpPeer
) -> None:
    ep, _, listener = setup
    request = options("z9hG4bK-l3", peer.address, listener)
    peer.send(request, listener)
    first, source1 = await peer.get()
    peer.send(request, listener)  # absorbed by the server transaction, which resends its last response
    second, source2 = await peer.get()
    assert isinstance(first, Response) and isinstance(second, Response)
    assert first.to_bytes() == second.to_bytes()
    assert source1 == source2 == listener
    assert ep.counters.requests_absorbed == 1


async def test_stateless_response_with_source_leaves_from_that_listener(
    setup: tuple[SipEndpoint, Answerer, Address], peer: UdpPeer
) -> None:
    ep, tu, listener = setup
    assert ep.udp_address is not None
    tu.stateless = listener
    peer.send(options("z9hG4bK-l4", peer.address, ep.udp_address), ep.udp_address)  # arrives on the primary
    response, source = await peer.get()
    assert isinstance(response, Response) and source == listener
    tu.stateless = ep.udp_address
    peer.send(options("z9hG4bK-l5", peer.address, listener), listener)
    response, source = await peer.get()
    assert source == ep.udp_address


async def test_request_with_via_naming_the_listener_leaves_from_it_with_retransmissions(
    setup: tuple[SipEndpoint, Answerer, Address], peer: UdpPeer
) -> None:
    ep, _, listener = setup
    assert ep.udp_address is not None
    ep.send_request(outgoing_options("z9hG4bK-c1", listener, peer.address), peer.address)
    sources = []
    for _ in range(3):  # the request and two Timer E retransmissions (§17.1.2.2), never answered
        request, source = await peer.get()
        assert isinstance(request, Request) and request.top_via.branch == "z9hG4bK-c1"
        sources.append(source)
    assert sources == [listener] * 3
    # A request naming the primary address in its Via leaves from the primary socket.
    ep.send_request(outgoing_options("z9hG4bK-c2", ep.udp_address, peer.address), peer.address)
    while True:
        request, source = await peer.get()
        assert isinstance(request, Request)
        if request.top_via.branch == "z9hG4bK-c2":
            break
    assert source == ep.udp_address
    # A stateless request (the ACK of a 2xx, a stateless forward) follows its Via too.
    ep.send_stateless(outgoing_options("z9hG4bK-c3", listener, peer.address), peer.address)
    while True:
        request, source = await peer.get()
        assert isinstance(request, Request)
        if request.top_via.branch == "z9hG4bK-c3":
            break
    assert source == listener


async def test_after_removal_requests_fall_back_to_the_primary_socket(
    setup: tuple[SipEndpoint, Answerer, Address], peer: UdpPeer
) -> None:
    ep, _, listener = setup
    assert ep.udp_address is not None
    ep.send_request(outgoing_options("z9hG4bK-c4", listener, peer.address), peer.address)
    _, source = await peer.get()
    assert source == listener
    await ep.remove_listener(*listener)
    await ep.remove_listener(*listener)  # a no-op when absent
    assert ep.listeners == []
    request, source = await peer.get()  # the next retransmission of the same transaction
    assert isinstance(request, Request) and request.top_via.branch == "z9hG4bK-c4"
    assert source == ep.udp_address
    assert ep.source_fallbacks >= 1
    # The UDP port is free again: we can bind it ourselves.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(listener)


async def test_tcp_request_on_listener_has_flow_local_and_reply_on_the_connection(
    setup: tuple[SipEndpoint, Answerer, Address],
) -> None:
    _ep, tu, listener = setup
    reader, writer = await asyncio.open_connection(*listener)
    try:
        mine = writer.get_extra_info("sockname")
        writer.write(options("z9hG4bK-t1", (str(mine[0]), int(mine[1])), listener, transport="TCP"))
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"SIP/2.0 200")
        assert tu.flows[-1].local == listener and tu.flows[-1].transport == "tcp"
    finally:
        writer.close()


async def test_remove_listener_aborts_connections_accepted_on_it_rfc5626_4_4(
    setup: tuple[SipEndpoint, Answerer, Address], wait_until: WaitUntil
) -> None:
    ep, _tu, listener = setup
    assert ep.tcp_address is not None
    on_listener = await asyncio.open_connection(*listener)
    on_primary = await asyncio.open_connection(*ep.tcp_address)
    try:
        for (_, writer), target in ((on_listener, listener), (on_primary, ep.tcp_address)):
            mine = writer.get_extra_info("sockname")
            writer.write(
                options(f"z9hG4bK-t{target[1]}", (str(mine[0]), int(mine[1])), target, transport="TCP")
            )
        for reader, _ in (on_listener, on_primary):
            async with asyncio.timeout(5):
                await reader.readuntil(b"\r\n\r\n")
        await wait_until(lambda: len(ep.tcp.connections) == 2, what="two accepted connections")
        await ep.remove_listener(*listener)
        # The phone on the listener sees its connection end at once (EOF or reset), not at a timeout.
        async with asyncio.timeout(2):
            try:
                rest = await on_listener[0].read(100)
            except ConnectionResetError:
                rest = b""
        assert rest == b""
        assert len(ep.tcp.connections) == 1 and ep.tcp.connections[0].listener == ep.tcp_address
        with pytest.raises(OSError):  # nobody listens there any more
            await asyncio.open_connection(*listener)
        # The connection on the primary address still works.
        reader, writer = on_primary
        mine = writer.get_extra_info("sockname")
        writer.write(
            options("z9hG4bK-t-again", (str(mine[0]), int(mine[1])), ep.tcp_address, transport="TCP")
        )
        async with asyncio.timeout(5):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"SIP/2.0 200")
    finally:
        for _, writer in (on_listener, on_primary):
            writer.close()


async def test_tcp_connection_opened_for_a_request_via_the_listener_binds_its_host(
    setup: tuple[SipEndpoint, Answerer, Address],
) -> None:
    ep, _, listener = setup
    accepted: asyncio.Queue[tuple[Address, bytes]] = asyncio.Queue()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        data = await reader.readuntil(b"\r\n\r\n")
        accepted.put_nowait(((str(peer[0]), int(peer[1])), data))
        writer.close()

    server = await asyncio.start_server(on_connection, PRIMARY_HOST, 0)
    try:
        target = server.sockets[0].getsockname()
        target = (str(target[0]), int(target[1]))
        ep.send_request(
            outgoing_options("z9hG4bK-tc1", listener, target, transport="TCP"), target, transport="tcp"
        )
        async with asyncio.timeout(5):
            source, data = await accepted.get()
        assert source[0] == LISTENER_HOST and b"z9hG4bK-tc1" in data
    finally:
        server.close()


async def test_bind_failure_leaves_nothing_bound(setup: tuple[SipEndpoint, Answerer, Address]) -> None:
    ep, _, _ = setup
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind((LISTENER_HOST, 0))
        blocker.listen()
        port = int(blocker.getsockname()[1])
        with pytest.raises(BindError):
            await ep.add_listener(LISTENER_HOST, port)  # UDP binds, TCP cannot: UDP is released
        assert (LISTENER_HOST, port) not in ep.listeners
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((LISTENER_HOST, port))
            # And with UDP taken, the listener is refused before anything of it is bound.
            with pytest.raises(BindError):
                await ep.add_listener(LISTENER_HOST, port)
    assert (LISTENER_HOST, port) not in ep.listeners
    assert all(address[0] != LISTENER_HOST or address[1] != port for address in ep.tcp.local_addresses)
