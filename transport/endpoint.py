"""The asyncio shell around the sans-I/O SIP core: sockets in, `TransactionLayer` in the middle, TU out.

Theory of operation (STYLE.md, the aioquic shape)::

    datagram / framed stream message
        -> parse (UDP; TCP frames in tcp.py)     bad request: stateless error reply; bad response: drop, count
        -> top Via fix-up (RFC 3261 §18.2.1, RFC 3581 §4: received, rport)
        -> core.receive(message, now=loop.time(), source, reliable)
        -> drain: transmit every `Transmit`, hand every event to the TU
        -> re-arm ONE loop.call_at at core.next_timer(); when it fires: core.handle_timer(now), drain

Everything SIP-specific (matching, retransmission absorption, timers) happens in `transport.sip`; this module
only moves bytes, keeps the clock, and decides where a response goes (§18.2.2):

- UDP: the response destination is given to the core with the request: the packet source when the top Via
  asked for `rport` (RFC 3581 §4), else the `received` address and the sent-by port (default 5060).
  Deviation: `maddr` (multicast responses) is ignored; responses never go anywhere but unicast.
- TCP: the packet source, i.e. the connection the request came on (the connection table is keyed by remote
  address). If that connection is gone, §18.2.2 says to open one to `received` and the sent-by port, which
  `_transmit` does. The request's Via sent-by becomes an alias of its connection (RFC 5923 style, tcp.py).

Deviation: §18.1.2 wants a client transport to discard a response whose top Via sent-by is not one it
inserts; here every response goes to the transaction layer, which matches by branch and hands unmatched ones
to the TU (a proxy forwards those, §16.7), so the check belongs to the TU that knows its advertised addresses.

Extra listeners (a floating service address next to the node's own): `add_listener(host, port)` binds UDP
and TCP there too; messages received on it carry `Flow.local == (host, port)`. Which socket a message leaves
from (the source address the peer sees and answers to, §18.2.1/§18.2.2):

- a response of a server transaction: the socket its request arrived on (remembered per transaction);
- a request (client transaction, its retransmissions, a CANCEL or ACK built from it, a stateless one) whose
  top Via sent-by equals a listener's (host, port): that listener's UDP socket, and a TCP connection opened
  for it binds that host locally (an existing connection to the destination is reused as is);
- `send_stateless(..., source=)`: the listener named, for a stateless response;
- anything else, or when the wanted listener is gone by now: the primary socket (the latter is counted in
  `source_fallbacks` and logged at debug level).

`remove_listener` closes the listener's UDP socket and TCP server and aborts the TCP connections accepted on
it (and the outgoing ones bound to its host), so phones with RFC 5626 flows notice at once and reconnect.

A `Transmit` towards an address with no open TCP connection opens one in a task (kept in `self._tasks`
until done); a failure to connect or send is reported to the core with `transport_error` (§17.1.4, §17.2.4).

Invariants:
- Nothing here raises into the event loop: every entry point from the loop (datagram, stream message,
  timer, task completion) catches, counts (`TransportCounters`) and logs.
- One timer handle at most, always armed at `core.next_timer()` after every drain. The loop runs due timers
  before it polls sockets (uvloop), so a timer firing more than `LATE_TIMER` late first reads what the UDP
  sockets already hold (a 180 that arrived in time must stop Timer A, §17.1.1.2, not follow it).
- Drains do not nest: a TU that answers from inside its event callback queues into the core, and the
  running drain sends it.
- `aclose()` cancels and awaits every task, closes every socket and waits for every TCP connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from .counters import TransportCounters
from .errors import BindError, TransportClosedError, TransportError
from .flow import Address, Flow, TransportName, strip_brackets
from .sip.errors import SipParseError
from .sip.headers import Via
from .sip.message import (
    DEFAULT_LIMITS,
    HeaderField,
    Headers,
    Limits,
    Request,
    Response,
    canonical_name,
    parse_message,
)
from .sip.stream import is_keepalive
from .sip.transaction import (
    DEFAULT_TIMERS,
    ClientTransaction,
    Event,
    RequestReceived,
    ServerTransaction,
    TimerConfig,
    TransactionLayer,
    Transmit,
)
from .sip.uri import Params
from .tcp import TcpConfig, TcpTransport
from .udp import MAX_DATAGRAM, UdpTransport, open_udp

__all__ = ["EventHandler", "SipEndpoint", "TransactionUser", "salvage_error_response"]

log = logging.getLogger(__name__)

DEFAULT_SIP_PORT = 5060  # §18.2.2, §19.1.2
LATE_TIMER = 0.01  # s: a timer firing later than this first reads what the UDP sockets hold (_on_timer)
_MAX_DRAIN_STEPS = 100_000  # a TU that answers every event with another message is a bug; stop, log


class TransactionUser(Protocol):
    """What the endpoint calls with every event of the transaction layer."""

    def on_event(self, endpoint: SipEndpoint, event: Event, flow: Flow | None) -> None:
        """`flow` is the flow of the network message that caused the event, None for timer events."""


EventHandler = Callable[["SipEndpoint", Event, "Flow | None"], None]


@dataclass(slots=True)
class _Listener:
    """An extra listening address: its UDP socket and/or the address its TCP server is bound to."""

    address: Address
    udp: UdpTransport | None
    tcp: Address | None


def _host_for_param(ip: str) -> str:
    # RFC 5118 §4.5 / RFC 3261 §25.1: `received` holds an IPv4address or IPv6address; we bracket IPv6 so
    # the Via parameter grammar of the parser (which accepts IPv6 references) round-trips.
    return f"[{ip}]" if ":" in ip else ip


def fix_top_via(request: Request, source: Address) -> Via:
    """RFC 3261 §18.2.1 and RFC 3581 §4 on a received request: add `received` when the sent-by host
    differs from the packet source (or rport was asked), fill `rport` with the source port when asked.
    Returns the top Via as it now stands.

    The other Via values keep their bytes; the top one is rewritten only when a parameter changes.
    Raises SipParseError if the top Via is malformed (never for a message `parse_message` returned).
    """
    return _fix_top_via(request, source)[0]


def _fix_top_via(request: Request, source: Address) -> tuple[Via, bool]:
    """`fix_top_via`, and whether the top Via asked for rport (then responses go to `source`)."""
    via = request.top_via
    ip, port = source
    params = via.params
    rport_requested = False  # via.rport_requested, inlined without a generator (this runs per request)
    for n, _ in params:
        if n == "rport" or n.lower() == "rport":
            rport_requested = True
            break
    if rport_requested:
        # with_param("received", ip).with_param("rport", port) in one pass: the first of each replaced
        # where it stands, else appended (received, then rport).
        items: list[tuple[str, str | None]] = []
        received: str | None = _host_for_param(ip)
        rport: str | None = str(port)
        for n, v in params:
            low = n.lower()
            if low == "received" and received is not None:
                items.append(("received", received))
                received = None
            elif low == "rport" and rport is not None:
                items.append(("rport", rport))
                rport = None
            else:
                items.append((n, v))
        if received is not None:
            items.append(("received", received))
        if rport is not None:
            items.append(("rport", rport))
        new = Via(via.transport, via.host, via.port, Params(items), via.protocol)
    elif strip_brackets(via.host) != ip:
        new = via.with_param("received", _host_for_param(ip))
    else:
        return via, False
    if not request.headers.replace_top_via(via, new):
        headers = request.headers
        headers.remove_first_value("Via")
        headers.add("Via", str(new), first=True)
    return new, rport_requested


def response_address(via: Via, flow: Flow) -> Address:
    """Where responses go for a request whose top Via (after `fix_top_via`) is `via` and that arrived
    on `flow` (RFC 3261 §18.2.2, RFC 3581 §4)."""
    if flow.reliable or via.rport_requested:
        return flow.remote
    host = strip_brackets(via.received or flow.remote[0])
    return (host, via.port if via.port is not None else DEFAULT_SIP_PORT)


_SALVAGED = ("via", "from", "to", "call-id", "cseq")


def salvage_error_response(data: bytes, error: SipParseError) -> Response | None:
    """A stateless error response (status and reason from `error`) to a request that failed to parse,
    built from the Via, From, To, Call-ID and CSeq lines found verbatim in `data` (§8.2.6.2); None when
    `data` is not recognisably a request, is an ACK (never answered, §17), or lacks one of those fields.

    Workaround until transport/sip offers this (see /work/notes-for-message-helper.md): it only copies
    whole header lines and adds nothing it would have to parse.
    """
    end = data.find(b"\r\n\r\n")
    head = data[: end if end >= 0 else min(len(data), DEFAULT_LIMITS.max_message)]
    try:
        text = head.decode("utf-8", "strict")
    except UnicodeDecodeError:
        return None
    lines = text.lstrip("\r\n").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].upper().startswith("SIP/") or not parts[0].isalpha():
        return None
    if parts[0].upper() == "ACK":
        return None
    fields: list[HeaderField] = []
    seen: set[str] = set()
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or line[:1] in (" ", "\t") or any(ch < " " or ch == "\x7f" for ch in line):
            continue
        key = canonical_name(name.strip()).lower()
        if key not in _SALVAGED:
            continue
        if key != "via" and key in seen:
            return None  # ambiguous: two From/To/Call-ID/CSeq
        seen.add(key)
        value = value.strip()
        if key == "to" and ";tag=" not in value.replace(" ", ""):
            fields.append(HeaderField("To", value + ";tag=stateless", None))
        else:
            fields.append(HeaderField(name.strip(), value, line))
    if seen != set(_SALVAGED) or len(fields) > DEFAULT_LIMITS.max_headers:
        return None
    status = error.status if 400 <= error.status <= 699 else 400
    return Response(status, error.reason, Headers.from_fields(fields))


def _describe(message: Request | Response) -> str:
    return message.method if isinstance(message, Request) else str(message.status)


class SipEndpoint:
    """UDP and TCP transports bound to one address, driving one `TransactionLayer` for one TU."""

    def __init__(
        self,
        tu: TransactionUser | EventHandler,
        *,
        timers: TimerConfig = DEFAULT_TIMERS,
        tcp_config: TcpConfig | None = None,
        limits: Limits = DEFAULT_LIMITS,
        counters: TransportCounters | None = None,
        max_datagram: int = MAX_DATAGRAM,
    ) -> None:
        self._on_event: EventHandler = tu.on_event if not callable(tu) else tu
        self.counters = counters if counters is not None else TransportCounters()
        self.core = TransactionLayer(timers=timers)
        self.limits = limits
        self.max_datagram = max_datagram
        tcp_config = tcp_config if tcp_config is not None else TcpConfig(limits=limits)
        self.tcp = TcpTransport(
            self._on_stream_message, self.counters, tcp_config, on_parse_error=self._bad_stream_message
        )
        self.udp: UdpTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._draining = False
        self._current_request: Request | None = None
        self._delivered_current = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._primary: Address | None = None
        self._listeners: dict[Address, _Listener] = {}
        self._former_listeners: set[Address] = set()
        self._listener_lock = asyncio.Lock()
        # send_stateless(source=...): the message object (kept alive until sent) and the wanted source.
        self._stateless_sources: dict[int, tuple[Request | Response, Address]] = {}
        self._current_flow: Flow | None = None
        # Messages that wanted a listener which was gone by the time they left (sent from the primary).
        self.source_fallbacks = 0
        # Datagrams read from the sockets by a late timer before it fired (`_read_pending_before_timers`).
        self.read_before_timers = 0
        # Optional hook for tests of retransmission (responder --drop-first-final): return True to
        # pretend the datagram/segment was lost.
        self.drop_filter: Callable[[Transmit], bool] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def start(self, host: str, port: int, *, udp: bool = True, tcp: bool = True) -> None:
        """Bind UDP and/or TCP on (host, port). With port 0 and both, TCP binds the port UDP got."""
        self._loop = asyncio.get_running_loop()
        attempts = 20 if port == 0 and udp and tcp else 1
        for attempt in range(attempts):
            if udp:
                self.udp = await open_udp(
                    host, port, self._on_datagram, self.counters, max_datagram=self.max_datagram
                )
            if not tcp:
                self._primary = self.udp_address
                return
            tcp_port = self.udp.local_address[1] if self.udp is not None else port
            try:
                self._primary = await self.tcp.listen(host, tcp_port)
            except BindError:
                if self.udp is not None:
                    await self.udp.aclose()
                    self.udp = None
                if attempt == attempts - 1:
                    raise
                continue
            return

    async def add_listener(self, host: str, port: int, *, udp: bool = True, tcp: bool = True) -> Address:
        """Bind extra UDP and/or TCP sockets on (host, port) next to the primary ones; returns the bound
        address (port 0: UDP's ephemeral port, TCP the same). A no-op if that listener exists.

        Raises `BindError` when it cannot bind (in use: e.g. the previous holder of a floating address
        has not released it yet; address not available), leaving nothing of it bound, and
        `TransportClosedError` after `aclose()`.
        """
        if not udp and not tcp:
            raise ValueError("a listener needs UDP or TCP")
        async with self._listener_lock:
            if self._closed:
                raise TransportClosedError("endpoint is closed")
            if (host, port) in self._listeners:
                return (host, port)
            self._loop = asyncio.get_running_loop()
            udp_transport: UdpTransport | None = None
            try:
                if udp:
                    udp_transport = await open_udp(
                        host, port, self._on_datagram, self.counters, max_datagram=self.max_datagram
                    )
                tcp_address: Address | None = None
                if tcp:
                    tcp_port = udp_transport.local_address[1] if udp_transport is not None else port
                    tcp_address = await self.tcp.listen(host, tcp_port)
            except BaseException:
                if udp_transport is not None:
                    await udp_transport.aclose()
                raise
            address = udp_transport.local_address if udp_transport is not None else tcp_address
            assert address is not None
            self._listeners[address] = _Listener(address, udp_transport, tcp_address)
            self._former_listeners.discard(address)
            log.info("endpoint: listening on %s:%d too", address[0], address[1])
            return address

    async def remove_listener(self, host: str, port: int) -> None:
        """Close the listener on (host, port): its UDP socket, its TCP server, and every TCP connection
        accepted on it (or opened from its host for it). A no-op if there is none. From the moment it is
        called, messages that wanted this listener leave from the primary socket."""
        async with self._listener_lock:
            listener = self._listeners.pop((host, port), None)
            if listener is None:
                return
            self._former_listeners.add(listener.address)
            if listener.udp is not None:
                await listener.udp.aclose()
            aborted = 0
            if listener.tcp is not None:
                aborted = await self.tcp.unlisten(listener.tcp)
            log.info("endpoint: stopped listening on %s:%d (%d tcp connections aborted)", host, port, aborted)

    @property
    def listeners(self) -> list[Address]:
        """The extra listening addresses (not the primary one)."""
        return list(self._listeners)

    @property
    def udp_address(self) -> Address | None:
        return self.udp.local_address if self.udp is not None else None

    @property
    def tcp_address(self) -> Address | None:
        addresses = self.tcp.local_addresses
        return addresses[0] if addresses else None

    async def aclose(self) -> None:
        """Stop timers and tasks, close UDP and every TCP connection, and wait for all of it."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.udp is not None:
            await self.udp.aclose()
        for listener in list(self._listeners.values()):
            if listener.udp is not None:
                await listener.udp.aclose()
        self._listeners.clear()
        self._stateless_sources.clear()
        await self.tcp.aclose()

    # -- TU API ------------------------------------------------------------------------------------------
    def respond(self, transaction: ServerTransaction, response: Response, *, linger: bool = True) -> bool:
        """Send `response` through its server transaction; False if the transaction's state refuses it.
        `linger=False`: a non-INVITE transaction ends with its final response (no 64*T1 in Completed; a
        retransmitted request is answered again by the TU), for answers that need no state, like a
        digest challenge (`TransactionLayer.send_response`)."""
        sent = self.core.send_response(transaction, response, self._now(), linger=linger)
        self._drain(None)
        return sent

    def send_request(
        self, request: Request, destination: Address, *, transport: TransportName = "udp"
    ) -> ClientTransaction:
        """Start a client transaction for `request` towards `destination` (top Via branch set by the TU)."""
        if self._closed:
            raise TransportClosedError("endpoint is closed")
        tx = self.core.send_request(request, self._now(), destination, reliable=transport != "udp")
        self._drain(None)
        return tx

    def send_stateless(
        self,
        message: Request | Response,
        destination: Address,
        *,
        transport: TransportName = "udp",
        source: Address | None = None,
    ) -> None:
        """Send a message outside any transaction (ACK of a 2xx, stateless forward or response).

        `source` names the local address to send from (a listener's (host, port), or the primary one);
        None: a request leaves from the listener its top Via names, anything else from the primary.
        """
        if source is not None:
            self._stateless_sources[id(message)] = (message, source)
        self.core.send_stateless(message, destination, reliable=transport != "udp")
        self._drain(None)

    # -- network -> core ---------------------------------------------------------------------------------
    def _now(self) -> float:
        loop = self._loop if self._loop is not None else asyncio.get_running_loop()
        return loop.time()

    def _on_datagram(self, data: bytes, flow: Flow) -> None:
        if is_keepalive(data):
            return  # CRLF keep-alives over UDP (RFC 5626 §3.5.1 uses STUN; phones send CRLF): ignore
        try:
            message = parse_message(data, self.limits)
        except SipParseError as exc:
            self._bad_datagram(data, exc, flow)
            return
        self._on_message(message, flow)

    def _error_reply(self, data: bytes | None, exc: SipParseError, flow: Flow, proto: str) -> Response | None:
        """The stateless error reply to a message that failed to parse (§8.2.6.2: 400 or the parser's status,
        e.g. 505, 413, 513, built from its own header lines), or None: a response is dropped, and so is a
        request too broken to answer; both counted."""
        if data is not None and data.lstrip(b"\r\n")[:4].upper() == b"SIP/":
            self.counters.bad_responses_dropped += 1
            log.debug("%s: dropped malformed response from %s: %s", proto, flow.remote, exc)
            return None
        reply = salvage_error_response(data, exc) if data is not None else None
        if reply is None:
            self.counters.bad_requests_dropped += 1
            log.debug("%s: could not answer malformed request from %s: %s", proto, flow.remote, exc)
        return reply

    def _bad_datagram(self, data: bytes, exc: SipParseError, flow: Flow) -> None:
        reply = self._error_reply(data, exc, flow, "udp")
        if reply is None:
            return
        sock = self._udp_socket(flow.local)  # None: the listener it reached is gone
        try:
            if sock is not None:
                # Stateless reply to the packet source (RFC 3581 symmetric: the only address we trust here),
                # from the socket it reached.
                sock.send(reply.to_bytes(), flow.remote)
                self.counters.bad_requests_answered += 1
                return
        except TransportError as err:
            log.debug("udp: could not answer malformed request from %s: %s", flow.remote, err)
        self.counters.bad_requests_dropped += 1

    def _bad_stream_message(self, exc: SipParseError, data: bytes | None, flow: Flow) -> bytes | None:
        """A stream message that failed to parse or frame (tcp.py writes what this returns, then keeps or
        closes the connection): a request gets its error reply on the connection (§18.3), a response is
        dropped and counted. Never raises (tcp.py counts a handler failure)."""
        reply = self._error_reply(data, exc, flow, "tcp")
        if reply is None:
            return None
        self.counters.bad_requests_answered += 1
        return reply.to_bytes()

    def _on_stream_message(self, message: Request | Response, flow: Flow) -> None:
        self._on_message(message, flow)

    def _on_message(self, message: Request | Response, flow: Flow) -> None:
        if self._closed:
            return
        if isinstance(message, Request):
            self.counters.requests_received += 1
            try:
                via, rport = _fix_top_via(message, flow.remote)
                destination = flow.remote if rport else response_address(via, flow)  # rport known already
                if flow.reliable:
                    self.tcp.add_alias(
                        flow.connection_id,
                        (strip_brackets(via.host), via.port if via.port is not None else DEFAULT_SIP_PORT),
                    )
            except SipParseError as exc:  # pragma: no cover - parse_message validated the Via
                self.counters.bad_requests_dropped += 1
                log.debug("dropped request with unusable Via from %s: %s", flow.remote, exc)
                return
            self._current_request = message
            self._current_flow = flow
            self._delivered_current = False
            self.core.receive(message, self._now(), destination, reliable=flow.reliable)
        else:
            self.counters.responses_received += 1
            self._current_request = None
            self.core.receive(message, self._now(), flow.remote, reliable=flow.reliable)
        try:
            self._drain(flow)
        finally:
            self._current_flow = None
        if isinstance(message, Request) and not self._delivered_current and message.method != "ACK":
            self.counters.requests_absorbed += 1
        self._current_request = None

    # -- core -> network and TU --------------------------------------------------------------------------
    def _drain(self, flow: Flow | None) -> None:
        if self._draining:
            return
        self._draining = True
        core = self.core
        try:
            for _ in range(_MAX_DRAIN_STEPS):
                progressed = False
                for transmit in core.messages_to_send():
                    progressed = True
                    try:
                        self._transmit(transmit)
                    except Exception:
                        self.counters.callback_errors += 1
                        log.exception("endpoint: transmit failed")
                event = core.next_event()
                if event is not None:
                    progressed = True
                    self._dispatch(event, flow)
                if not progressed:
                    break
            else:
                log.error("endpoint: drain did not settle after %d steps", _MAX_DRAIN_STEPS)
        finally:
            self._draining = False
            self._rearm()

    def _dispatch(self, event: Event, flow: Flow | None) -> None:
        if isinstance(event, RequestReceived) and event.request is self._current_request:
            self._delivered_current = True
            if (
                self._listeners
                and event.transaction is not None
                and flow is not None
                and flow.local in self._listeners
            ):
                event.transaction.local = flow.local  # the listener its request arrived on
        try:
            self._on_event(self, event, flow)
        except Exception:
            self.counters.callback_errors += 1
            log.exception("endpoint: transaction user failed on %s", type(event).__name__)

    # -- source selection --------------------------------------------------------------------------------
    def _udp_socket(self, local: Address | None) -> UdpTransport | None:
        """The UDP socket bound to `local` (a listener), else the primary one."""
        if local is not None:
            listener = self._listeners.get(local)
            if listener is not None and listener.udp is not None:
                return listener.udp
        return self.udp

    def _via_listener(self, request: Request) -> Address | None:
        """The (host, port) of the request's top Via sent-by if it names a listener, present or former."""
        try:
            via = request.top_via
        except SipParseError:
            return None
        sent_by = (strip_brackets(via.host), via.port if via.port is not None else DEFAULT_SIP_PORT)
        if sent_by in self._listeners or sent_by in self._former_listeners:
            return sent_by
        return None

    def _source_for(self, transmit: Transmit) -> Address | None:
        """The listener `transmit` must leave from, or None for the primary socket (see the module doc)."""
        message, tx = transmit.message, transmit.transaction
        wanted: Address | None = None
        if tx is None:
            entry = self._stateless_sources.pop(id(message), None) if self._stateless_sources else None
            if entry is not None and entry[0] is message:
                wanted = entry[1]
            elif isinstance(message, Request) and (self._listeners or self._former_listeners):
                wanted = self._via_listener(message)
        elif isinstance(tx, ServerTransaction):
            wanted = tx.local
            if (
                wanted is None
                and self._current_flow is not None
                and tx.request is self._current_request
                and self._current_flow.local in self._listeners
            ):
                # The first transmission of a transaction just created by a request that reached a listener
                # (before the TU saw it: 100 Trying, an absorbed retransmission's answer).
                wanted = self._current_flow.local
                tx.local = wanted
        elif isinstance(message, Request) and (self._listeners or self._former_listeners):
            wanted = self._via_listener(message)
        if wanted is None or wanted == self._primary:
            return None
        if wanted in self._listeners:
            return wanted
        self.source_fallbacks += 1
        log.debug(
            "endpoint: listener %s is gone, %s leaves from the primary socket", wanted, _describe(message)
        )
        return None

    def _transmit(self, transmit: Transmit) -> None:
        if self.drop_filter is not None and self.drop_filter(transmit):
            return
        data = transmit.message.to_bytes()
        source = (
            self._source_for(transmit)
            if self._listeners or self._former_listeners or self._stateless_sources
            else None
        )
        try:
            if not transmit.reliable:
                sock = self.udp if source is None else self._udp_socket(source)
                if sock is None:
                    raise TransportClosedError("no UDP transport")
                sock.send(data, transmit.destination)
                return
            conn = self.tcp.find(transmit.destination)
            if conn is not None:
                conn.send(data)
                return
        except TransportError as exc:
            self.counters.send_errors += 1
            self._transport_failed(transmit, str(exc))
            return
        # No open connection: connect in a task. For a response (§18.2.2) go to `received` and the
        # sent-by port, not the source port of a connection that is gone.
        destination = transmit.destination
        if isinstance(transmit.message, Response):
            via = transmit.message.top_via
            host = strip_brackets(via.received or via.host)
            destination = (host, via.port if via.port is not None else DEFAULT_SIP_PORT)
        self._spawn(self._connect_and_send(transmit, destination, data, source[0] if source else None))

    async def _connect_and_send(
        self, transmit: Transmit, destination: Address, data: bytes, local_host: str | None
    ) -> None:
        try:
            await self.tcp.send_to(destination, data, local_host=local_host)
        except TransportError as exc:
            self.counters.send_errors += 1
            self._transport_failed(transmit, str(exc))

    def _transport_failed(self, transmit: Transmit, reason: str) -> None:
        log.info("endpoint: send to %s failed: %s", transmit.destination, reason)
        if transmit.transaction is not None and not self._closed:
            self.core.transport_error(transmit.transaction, self._now(), reason)
            self._drain(None)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        loop = self._loop if self._loop is not None else asyncio.get_running_loop()
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.counters.callback_errors += 1
            log.error("endpoint: task failed: %r", exc)

    # -- late timers -------------------------------------------------------------------------------------
    def _read_pending_before_timers(self, now: float) -> float:
        """The loop runs due timers before it polls sockets: after a stall longer than T1, a retransmission
        timer would fire although the response that stops it is already in our socket (seen: SIPp aborting
        calls on an INVITE retransmitted 500 ms after its 180 had arrived). Read what is queued on the UDP
        sockets first, as the loop would have had it not lagged; returns the (new) time."""
        read = 0
        for sock in (self.udp, *(listener.udp for listener in list(self._listeners.values()))):
            if sock is not None:
                read += sock.read_pending()
        if read:
            self.read_before_timers += read
            return max(now, self._now())
        return now

    # -- the one timer -----------------------------------------------------------------------------------
    def _rearm(self) -> None:
        if self._closed:
            return
        deadline = self.core.next_timer()
        if deadline == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            loop = self._loop if self._loop is not None else asyncio.get_running_loop()
            self._timer = loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        deadline = self._timer_at
        self._timer = None
        self._timer_at = None
        try:
            # call_at may fire a hair early (clock resolution): never pass a `now` before the deadline.
            now = self._now()
            if deadline is not None and now < deadline:
                now = deadline
            if deadline is not None and now - deadline > LATE_TIMER:
                now = self._read_pending_before_timers(now)
            self.core.handle_timer(now)
        except Exception:
            self.counters.timer_errors += 1
            log.exception("endpoint: timer handling failed")
        self._drain(None)
