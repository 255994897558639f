"""UDP socket and the endpoint shell over real loopback sockets: request/response through the transaction
layer, RFC 3581 / RFC 3261 §18.2.1-§18.2.2 Via handling, bad input answered or dropped and counted, client
transaction retransmissions driven by the one re-armed timer, errors mapped to TransportError."""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from raftpbx.transport.counters import TransportCounters
from raftpbx.transport.endpoint import SipEndpoint, fix_top_via, response_address, salvage_error_response
from raftpbx.transport.errors import BindError, SendError, TransportClosedError
from raftpbx.transport.flow import Flow
from raftpbx.transport.responder import Responder, ResponderConfig, User
from raftpbx.transport.sip.errors import SipParseError
from raftpbx.transport.sip.message import Request, Response, parse_message
from raftpbx.transport.sip.transaction import Event, ResponseReceived, TimedOut, TimerConfig
from raftpbx.transport.udp import open_udp

HOST = "127.0.0.1"

WaitUntil = Callable[..., Awaitable[None]]  # the `wait_until` fixture of conftest.py


def options(branch: str, local_port: int, *, rport: bool = True, sent_by_host: str = HOST) -> bytes:
    return (
        f"OPTIONS sip:svc@{HOST} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {sent_by_host}:{local_port};branch={branch}{';rport' if rport else ''}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:a@{HOST}>;tag=f1\r\n"
        f"To: <sip:svc@{HOST}>\r\n"
        f"Call-ID: {branch}@{HOST}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


class Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()
        self.arrivals: list[float] = []

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.arrivals.append(asyncio.get_running_loop().time())
        self.received.put_nowait(data)


ClientPair = tuple[asyncio.DatagramTransport, Client]


@pytest.fixture
async def endpoint() -> AsyncIterator[SipEndpoint]:
    responder = Responder(ResponderConfig(users={"alice": User.from_password("alice", "raftpbx.test", "pw")}))
    ep = SipEndpoint(responder)
    await ep.start(HOST, 0, udp=True, tcp=True)
    try:
        yield ep
    finally:
        await ep.aclose()


@pytest.fixture
async def client() -> AsyncIterator[ClientPair]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(Client, local_addr=(HOST, 0))
    try:
        yield transport, protocol
    finally:
        transport.close()


async def recv(client: Client) -> Request | Response:
    async with asyncio.timeout(5):
        return parse_message(await client.received.get())


async def test_udp_request_gets_response_with_received_and_rport_rfc3581(
    endpoint: SipEndpoint, client: ClientPair
) -> None:
    transport, proto = client
    local_port = transport.get_extra_info("sockname")[1]
    assert endpoint.udp_address is not None and endpoint.tcp_address == endpoint.udp_address
    transport.sendto(options("z9hG4bK-u1", local_port), endpoint.udp_address)
    response = await recv(proto)
    assert isinstance(response, Response) and response.status == 200
    assert response.top_via.received == HOST and response.top_via.rport == local_port
    assert endpoint.counters.requests_received == 1 and endpoint.counters.datagrams_sent == 1


async def test_udp_retransmitted_request_absorbed_and_answered_identically(
    endpoint: SipEndpoint, client: ClientPair
) -> None:
    transport, proto = client
    request = options("z9hG4bK-retx", transport.get_extra_info("sockname")[1])
    transport.sendto(request, endpoint.udp_address)
    first = await proto.received.get()
    transport.sendto(request, endpoint.udp_address)
    async with asyncio.timeout(5):
        second = await proto.received.get()
    assert first == second
    assert endpoint.counters.requests_absorbed == 1


async def test_response_without_rport_goes_to_sent_by_port_rfc3261_18_2_2(
    endpoint: SipEndpoint, client: ClientPair
) -> None:
    transport, _ = client
    # The request comes from the client socket but names another port in its Via, without rport: the
    # response goes to the Via port (§18.2.2), where a second socket listens.
    loop = asyncio.get_running_loop()
    other_transport, other = await loop.create_datagram_endpoint(Client, local_addr=(HOST, 0))
    try:
        other_port = other_transport.get_extra_info("sockname")[1]
        transport.sendto(options("z9hG4bK-norport", other_port, rport=False), endpoint.udp_address)
        response = await recv(other)
        assert isinstance(response, Response) and response.status == 200
        # Same host as the source: no received parameter needed (§18.2.1).
        assert response.top_via.received is None and not response.top_via.rport_requested
    finally:
        other_transport.close()


def test_fix_top_via_adds_received_when_sent_by_differs_and_keeps_other_vias() -> None:
    raw = (
        b"OPTIONS sip:x@127.0.0.1 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP phone.invalid:5062;branch=z9hG4bK-1\r\n"
        b"Via:   SIP/2.0/UDP 127.0.0.9:5060 ;branch=z9hG4bK-0\r\n"
        b"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:x@127.0.0.1>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    request = parse_message(raw)
    assert isinstance(request, Request)
    via = fix_top_via(request, ("127.0.0.2", 40000))
    assert via == request.top_via
    assert request.top_via.received == "127.0.0.2" and request.top_via.rport is None
    assert request.top_via.branch == "z9hG4bK-1"
    assert b"Via:   SIP/2.0/UDP 127.0.0.9:5060 ;branch=z9hG4bK-0\r\n" in request.to_bytes()  # verbatim
    flow = Flow("udp", ("127.0.0.2", 40000), (HOST, 5060))
    assert response_address(via, flow) == ("127.0.0.2", 5062)
    assert response_address(via, Flow("tcp", ("127.0.0.2", 40000), (HOST, 5060), 7)) == (
        "127.0.0.2",
        40000,
    )


_VIA_CASES = [
    # (top Via field(s), source): rport asked, received needed, both, nothing, several Vias, compact form
    ("Via: SIP/2.0/UDP 127.0.0.61:5061;rport;branch=z9hG4bK-a", ("127.0.0.61", 5061)),
    ("Via: SIP/2.0/UDP 127.0.0.61:5061;branch=z9hG4bK-b;rport", ("127.0.0.62", 40000)),
    ("Via: SIP/2.0/UDP phone.invalid;branch=z9hG4bK-c", ("127.0.0.3", 5060)),
    ("Via: SIP/2.0/UDP 127.0.0.4:5060;branch=z9hG4bK-d", ("127.0.0.4", 5060)),
    (
        "Via: SIP/2.0/UDP 127.0.0.5:5070;rport;branch=z9hG4bK-e\r\nVia: SIP/2.0/UDP 127.0.0.9;branch=z9hG4bK-0",
        ("127.0.0.5", 5070),
    ),
    (
        "v: SIP/2.0/TCP 127.0.0.6:5071;branch=z9hG4bK-f;rport, SIP/2.0/UDP 127.0.0.9;branch=z9hG4bK-0",
        ("127.0.0.7", 5071),
    ),
    ("Via: SIP/2.0/UDP [::1]:5072;rport;branch=z9hG4bK-g", ("::1", 5072)),
    ("Via: SIP/2.0/UDP 127.0.0.8:5073;Received=127.0.0.99;RPORT=1;branch=z9hG4bK-h;x", ("127.0.0.8", 5073)),
]


@pytest.mark.parametrize(("via_lines", "source"), _VIA_CASES)
def test_fix_top_via_reads_back_like_a_fresh_parse_of_its_bytes(
    via_lines: str, source: tuple[str, int]
) -> None:
    """The fix-up rewrites the top Via in place and keeps the parser's cached fields (From, To, CSeq,
    Contact...): everything must read exactly as a fresh parse of the rewritten bytes would."""
    raw = (
        f"REGISTER sip:127.0.0.1 SIP/2.0\r\n{via_lines}\r\nMax-Forwards: 70\r\n"
        "From: <sip:2001@127.0.0.1>;tag=ft\r\nTo: <sip:2001@127.0.0.1>\r\nCall-ID: via-fix@127.0.0.1\r\n"
        "CSeq: 7 REGISTER\r\nContact: <sip:2001@127.0.0.61:5061>;expires=60\r\nExpires: 3600\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    request = parse_message(raw)
    assert isinstance(request, Request)
    parsed = (request.from_, request.to, request.contacts, request.cseq)
    via = fix_top_via(request, source)
    # The fields parsed once are not parsed again (the fix-up used to drop the whole cache), unless the
    # top Via shares its field with others (the generic path).
    assert (request.from_, request.to, request.contacts, request.cseq) == parsed
    assert "," in via_lines.split("\r\n")[0] or all(
        a is b
        for a, b in zip((request.from_, request.to, request.contacts, request.cseq), parsed, strict=True)
    )
    fresh = parse_message(request.to_bytes())
    assert isinstance(fresh, Request)
    assert via == request.top_via == fresh.top_via
    assert request.vias == fresh.vias and request.branch == fresh.branch
    assert request.from_ == fresh.from_ and request.to == fresh.to and request.from_tag == fresh.from_tag
    assert request.call_id == fresh.call_id and request.cseq == fresh.cseq
    assert request.contacts == fresh.contacts and request.expires == fresh.expires
    assert request.max_forwards == fresh.max_forwards
    assert request.headers.get_all("Via") == fresh.headers.get_all("Via")
    assert request.to_bytes() == fresh.to_bytes()
    assert fix_top_via(fresh, source) == via  # idempotent: a second fix-up changes nothing
    assert fresh.to_bytes() == request.to_bytes()
    if via.rport_requested:
        assert via.received == (f"[{source[0]}]" if ":" in source[0] else source[0])
        assert via.rport == source[1]


async def test_malformed_request_gets_stateless_400_and_garbage_is_dropped(
    endpoint: SipEndpoint, client: ClientPair
) -> None:
    transport, proto = client
    local_port = transport.get_extra_info("sockname")[1]
    bad = options("z9hG4bK-bad", local_port).replace(b"Max-Forwards: 70", b"Max-Forwards: seventy")
    transport.sendto(bad, endpoint.udp_address)
    reply = await recv(proto)
    assert isinstance(reply, Response) and reply.status == 400
    assert reply.branch == "z9hG4bK-bad" and reply.to_tag is not None
    assert endpoint.counters.bad_requests_answered == 1
    # Unsalvageable garbage, a broken response, an ACK that fails to parse: dropped and counted.
    transport.sendto(b"\xff\xfe\x00 not sip", endpoint.udp_address)
    transport.sendto(b"SIP/2.0 200 OK\r\nVia: nonsense\r\n\r\n", endpoint.udp_address)
    transport.sendto(bad.replace(b"OPTIONS", b"ACK"), endpoint.udp_address)
    transport.sendto(b"\r\n\r\n", endpoint.udp_address)  # CRLF keep-alive: ignored silently
    transport.sendto(options("z9hG4bK-good", local_port), endpoint.udp_address)
    good = await recv(proto)
    assert isinstance(good, Response) and good.status == 200 and good.branch == "z9hG4bK-good"
    assert endpoint.counters.bad_requests_dropped == 2 and endpoint.counters.bad_responses_dropped == 1
    assert endpoint.counters.callback_errors == 0


def test_salvage_error_response_needs_a_request_with_the_mandatory_fields() -> None:
    error = SipParseError(400, "Malformed CSeq header")
    good = options("z9hG4bK-s", 5060).replace(b"CSeq: 1", b"CSeq: x")
    reply = salvage_error_response(good, error)
    assert reply is not None and reply.status == 400 and reply.reason == "Malformed CSeq header"
    assert b"Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-s;rport\r\n" in reply.to_bytes()
    assert salvage_error_response(good.replace(b"Call-ID", b"X-Call-ID"), error) is None
    assert salvage_error_response(b"SIP/2.0 200 OK\r\n\r\n", error) is None
    assert salvage_error_response(b"\xff\xfe", error) is None
    assert salvage_error_response(good.replace(b"OPTIONS sip", b"ACK sip"), error) is None


async def test_client_transaction_retransmits_on_timer_e_and_times_out_timer_f(wait_until: WaitUntil) -> None:
    """The one `call_at` timer drives Timer E retransmissions (RFC 3261 §17.1.2.2) and Timer F."""
    events: list[Event] = []
    timers = TimerConfig(t1=0.02, t2=0.08, t4=0.1)  # F = 64*T1 = 1.28 s
    ep = SipEndpoint(lambda e, event, flow: events.append(event), timers=timers)
    await ep.start(HOST, 0, udp=True, tcp=False)
    loop = asyncio.get_running_loop()
    sink_transport, sink = await loop.create_datagram_endpoint(Client, local_addr=(HOST, 0))
    try:
        assert ep.udp_address is not None
        sink_address = sink_transport.get_extra_info("sockname")
        request = parse_message(options("z9hG4bK-client", ep.udp_address[1]))
        assert isinstance(request, Request)
        sent_at: list[float] = []  # when each copy left (the sink's arrival times also carry its read lag)
        ep.drop_filter = lambda transmit: sent_at.append(loop.time()) is not None  # never drops
        started = loop.time()
        tx = ep.send_request(request, (sink_address[0], sink_address[1]))
        await wait_until(lambda: any(isinstance(e, TimedOut) for e in events), what="Timer F")
        elapsed = loop.time() - started
        copies = len(sent_at)
        # Intervals T1, 2T1, 4T1 capped at T2 (0.02, 0.04, 0.08, 0.08...) within F = 1.28 s: about 17
        # sends on an idle machine. A loaded machine wakes late and sends fewer, never earlier.
        assert 6 <= copies <= 18, copies
        await wait_until(lambda: sink.received.qsize() >= len(sent_at), what="every copy at the sink")
        gaps = [b - a for a, b in itertools.pairwise(sent_at)]
        for i, gap in enumerate(gaps):
            assert gap >= min(timers.t1 * 2**i, timers.t2) - 0.005, (i, gaps)
        assert 1.28 - 0.005 <= elapsed < 3.0
        assert tx.terminated
        timed_out = [e for e in events if isinstance(e, TimedOut)]
        assert timed_out[0].timer == "F"
        assert ep.core.next_timer() is None
    finally:
        sink_transport.close()
        await ep.aclose()


async def test_client_transaction_gets_response_from_endpoint_peer(
    endpoint: SipEndpoint, wait_until: WaitUntil
) -> None:
    events: list[Event] = []
    ua = SipEndpoint(lambda e, event, flow: events.append(event))
    await ua.start(HOST, 0, udp=True, tcp=False)
    try:
        assert ua.udp_address is not None and endpoint.udp_address is not None
        request = parse_message(options("z9hG4bK-ua", ua.udp_address[1]))
        assert isinstance(request, Request)
        ua.send_request(request, endpoint.udp_address)
        await wait_until(lambda: any(isinstance(e, ResponseReceived) for e in events), what="response")
        response = next(e for e in events if isinstance(e, ResponseReceived))
        assert response.response.status == 200 and response.transaction is not None
        assert ua.counters.responses_received == 1
    finally:
        await ua.aclose()


async def test_udp_socket_errors_map_to_transport_errors() -> None:
    counters = TransportCounters()
    udp = await open_udp(HOST, 0, lambda data, flow: None, counters, max_datagram=1000)
    try:
        with pytest.raises(BindError):
            await open_udp(HOST, udp.local_address[1], lambda data, flow: None)
        with pytest.raises(SendError):
            udp.send(b"x" * 1001, (HOST, 9))
        assert counters.oversized_dropped == 1
    finally:
        await udp.aclose()
    with pytest.raises(TransportClosedError):
        udp.send(b"x", (HOST, 9))


async def test_udp_handler_exception_is_counted_not_raised(wait_until: WaitUntil) -> None:
    counters = TransportCounters()

    def handler(data: bytes, flow: Flow) -> None:
        if data == b"boom":
            raise RuntimeError("consumer bug")
        seen.append(data)

    seen: list[bytes] = []
    udp = await open_udp(HOST, 0, handler, counters, max_datagram=100)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"boom", udp.local_address)
            s.sendto(b"y" * 200, udp.local_address)  # oversized: dropped
            s.sendto(b"fine", udp.local_address)
            await wait_until(lambda: seen == [b"fine"], what="datagram after the failing one")
        assert counters.callback_errors == 1 and counters.oversized_dropped == 1
    finally:
        await udp.aclose()


def _mutations(seed: int, count: int) -> list[bytes]:
    """Deterministic fuzz corpus: valid OPTIONS/REGISTER/INVITE/responses with bytes flipped, inserted,
    deleted, lines duplicated or cut, plus pure noise."""
    rng = random.Random(seed)
    bases = [
        options("z9hG4bK-fz", 5999),
        options("z9hG4bK-fz", 5999).replace(b"OPTIONS", b"REGISTER"),
        options("z9hG4bK-fz", 5999).replace(b"OPTIONS", b"INVITE"),
        b"SIP/2.0 200 OK\r\n" + options("z9hG4bK-fz", 5999).split(b"\r\n", 1)[1],
    ]
    out: list[bytes] = []
    for _ in range(count):
        data = bytearray(rng.choice(bases))
        for _ in range(rng.randint(1, 6)):
            op = rng.randrange(6)
            pos = rng.randrange(len(data) + 1)
            if op == 0 and data:
                data[min(pos, len(data) - 1)] = rng.randrange(256)
            elif op == 1:
                data[pos:pos] = bytes(
                    rng.choice(b'\r\n:;,<>"\\ \t=@[]%\x00\xff') for _ in range(rng.randint(1, 4))
                )
            elif op == 2:
                del data[pos : pos + rng.randint(1, 20)]
            elif op == 3:
                lines = bytes(data).split(b"\r\n")
                i = rng.randrange(len(lines))
                lines.insert(i, lines[i])
                data = bytearray(b"\r\n".join(lines))
            elif op == 4:
                data = data[:pos]
            else:
                data[pos:pos] = str(rng.randint(0, 2**40)).encode()
        out.append(bytes(data))
    out += [bytes(rng.randrange(256) for _ in range(rng.randint(0, 300))) for _ in range(count // 10)]
    return out


async def test_fuzzed_datagrams_never_raise_and_are_answered_or_counted(endpoint: SipEndpoint) -> None:
    """Bad network input never raises into the event loop (STYLE.md): thousands of mutated datagrams
    through the whole shell (parse, Via fix-up, transactions, responder) raise nothing, and every one is
    accounted for: answered, absorbed, passed to the TU or counted as dropped."""
    assert endpoint.udp_address is not None
    # Replies go to a real socket nobody reads (they must be sendable, not necessarily read).
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind((HOST, 0))
    try:
        flow = Flow("udp", sink.getsockname(), endpoint.udp_address)
        corpus = _mutations(seed=20261126, count=2000)
        for data in corpus:
            endpoint._on_datagram(data, flow)  # what UdpTransport.datagram_received calls
        c = endpoint.counters
        assert c.callback_errors == 0 and c.timer_errors == 0
        handled = c.requests_received + c.responses_received + c.bad_requests_answered
        dropped = c.bad_requests_dropped + c.bad_responses_dropped
        keepalives = sum(1 for d in corpus if not d.strip(b"\r\n"))
        assert handled + dropped + keepalives == len(corpus)
        assert c.bad_requests_answered > 0 and c.requests_received > 0  # the corpus exercises both paths
    finally:
        sink.close()
