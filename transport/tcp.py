"""SIP over TCP: a listener, outgoing connections, and the table of open connections.

Theory: every TCP connection, accepted or opened by us, is a `TcpConnection` (an asyncio protocol) with its
own `sip.stream.StreamFramer`, which frames messages by Content-Length (RFC 3261 §18.3). Framed messages go to one
handler (the endpoint) tagged with a `Flow` that names the connection, so a response is written back on the
connection its request came on (RFC 3261 §18.2.2). `TcpTransport` owns the table of connections:

- keyed by remote address (the peer's (host, port) as seen by the socket);
- plus aliases (RFC 5923 style): when a request arrives on a connection, the endpoint registers the top
  Via's sent-by (host, port) as an alias of that connection, so a later request to that address (a
  registered TCP contact) reuses the connection instead of dialling a phone that cannot accept
  connections (behind NAT). Deviation: RFC 5923 §5 asks for an explicit `alias` Via parameter and TLS;
  like RFC 5626 flows we alias every TCP connection a request arrived on (configurable). The risk RFC 5923
  guards against is real: a peer can claim another's sent-by and capture requests meant for it until that
  alias is replaced; the registrar should prefer the flow a REGISTER arrived on (RFC 5626) and this
  transport should gain TLS before aliasing is trusted across networks. A newer request wins the alias.

Several listeners: `listen` may be called for more than one address (the node's own and a floating
service address); each accepted connection remembers the listener that accepted it (`listener`) and an
outgoing one the local host it was asked to bind (`bound_host`), so that `unlisten` can close one listener and
abort exactly the connections that belong to it (RFC 5626 §4.4: a phone notices the reset at once and
re-registers through the address's new holder).

Limits and liveness:
- `max_connections`: an accepted connection beyond it is closed at once (`tcp_refused_limit`); an outgoing
  one raises `ConnectionLimitError`.
- `idle_timeout`: a connection with no bytes in either direction for that long is closed
  (`tcp_idle_closed`). One `call_at` per connection, re-armed lazily when it fires early.
- CRLF keepalive (RFC 5626 §4.4.1): a "\\r\\n\\r\\n" ping between messages is answered with a "\\r\\n" pong.
- Framing (`sip.stream.StreamFramer`, RFC 3261 §18.3): by the raw Content-Length of each header section, then the
  whole frame is parsed. A bad message whose length is known is skipped and reported to the
  `on_parse_error` handler (the endpoint answers a request statelessly, 400 or the parser's status, and
  drops a response) and the connection stays; a framing error (Content-Length missing, repeated or not a
  number; a head or body beyond the parser's limits: 513/413) is reported the same way, then the
  connection closes (`tcp_framing_errors`) because the byte stream can no longer be trusted to be in sync.
- Writes: asyncio's high-water mark pauses us (`pause_writing`); a peer that lets more than
  `max_write_buffer` bytes pile up is dropped (`tcp_slow_peers_dropped`) instead of growing memory.
- `TCP_NODELAY` on every socket (SIP messages are small and latency matters more than packet count).

Invariants: protocol callbacks never raise into the loop (they count `callback_errors` and log); every
OS error surfaced to a caller is a `TransportError`; `aclose()` closes the listener and every connection and
waits for each `connection_lost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from .counters import TransportCounters
from .errors import (
    BindError,
    ConnectError,
    ConnectionClosedError,
    ConnectionLimitError,
    SendError,
    TransportClosedError,
    map_os_error,
)
from .flow import Address, Flow
from .sip.errors import SipParseError
from .sip.message import DEFAULT_LIMITS, Limits, Request, Response
from .sip.stream import PONG, KeepAlive, StreamError, StreamFramer

__all__ = [
    "StreamMessageHandler",
    "StreamParseErrorHandler",
    "TcpConfig",
    "TcpConnection",
    "TcpTransport",
]

log = logging.getLogger(__name__)

StreamMessageHandler = Callable[[Request | Response, Flow], None]
# Called with the error, the bytes of the bad message (the whole frame when framing survived; the header
# section, or what was buffered, when it did not; None if nothing) and the flow; returns bytes to write
# (a stateless error response) or None. `StreamError.framing_lost` tells which case it is.
StreamParseErrorHandler = Callable[[SipParseError, bytes | None, Flow], bytes | None]



_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class TcpConfig:
    """Tunables of the TCP transport (defaults suit a PBX with a few thousand phones)."""

    idle_timeout: float = 300.0
    max_connections: int = 4096
    connect_timeout: float = 5.0
    write_high_water: int = 64 * 1024
    max_write_buffer: int = 1024 * 1024
    limits: Limits = field(default=DEFAULT_LIMITS)
    aliases: bool = True


def _set_nodelay(transport: asyncio.BaseTransport) -> bool:
    """Set TCP_NODELAY and read it back; False when the socket refused (never raises)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    except (OSError, AttributeError):
        return False


class TcpConnection(asyncio.Protocol):
    """One TCP connection: framing, keepalive answers, idle timer, bounded writes."""

    def __init__(
        self,
        owner: TcpTransport,
        *,
        outbound: bool,
        listener: Address | None = None,
        bound_host: str | None = None,
    ) -> None:
        self.id = next(_ids)
        self.outbound = outbound
        # The listening address that accepted this connection (None for outgoing ones), and for an
        # outgoing one the local host it was bound to on request (None: the kernel chose).
        self.listener = listener
        self.bound_host = bound_host
        self._owner = owner
        self._config = owner.config
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = StreamFramer(self._config.limits)
        self.remote: Address = ("", 0)
        self.local: Address = ("", 0)
        self.flow: Flow = Flow("tcp", self.remote, self.local, self.id)
        self.last_activity = self._loop.time()
        self._idle: asyncio.TimerHandle | None = None
        self._registered = False
        self.writing_paused = False
        self.nodelay = False
        self.closed: asyncio.Future[None] = self._loop.create_future()

    # -- asyncio callbacks (never raise) -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        try:
            self._transport = cast(asyncio.Transport, transport)
            peer = transport.get_extra_info("peername")
            sock = transport.get_extra_info("sockname")
            if isinstance(peer, tuple):
                self.remote = (str(peer[0]), int(peer[1]))
            if isinstance(sock, tuple):
                self.local = (str(sock[0]), int(sock[1]))
            self.flow = Flow("tcp", self.remote, self.local, self.id)
            self.nodelay = _set_nodelay(transport)
            self._transport.set_write_buffer_limits(high=self._config.write_high_water)
            if not self._owner._register(self):
                self._transport.abort()
                return
            self._registered = True
            self.last_activity = self._loop.time()
            self._arm_idle()
        except Exception:
            self._owner.counters.callback_errors += 1
            log.exception("tcp: connection_made failed")
            cast(asyncio.Transport, transport).abort()

    def data_received(self, data: bytes) -> None:
        try:
            self._on_data(data)
        except Exception:
            self._owner.counters.callback_errors += 1
            log.exception("tcp %s: failed on data from %s", self.local, self.remote)
            self.abort()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            if self._idle is not None:
                self._idle.cancel()
                self._idle = None
            self._transport = None
            if self._registered:
                self._owner._unregister(self)
                self._registered = False
        except Exception:
            self._owner.counters.callback_errors += 1
            log.exception("tcp: connection_lost failed")
        finally:
            if not self.closed.done():
                self.closed.set_result(None)

    # -- receiving -----------------------------------------------------------------------------------------
    def _on_data(self, data: bytes) -> None:
        counters = self._owner.counters
        if self._transport is None or self._transport.is_closing():
            return
        counters.bytes_received += len(data)
        self.last_activity = self._loop.time()
        self._parser.feed(data)
        while self._transport is not None and not self._transport.is_closing():
            try:
                item = self._parser.next_frame()
            except StreamError as exc:
                # RFC 3261 §18.3: a bad request gets a stateless error reply (the endpoint builds it). The
                # connection stays while the stream is still framed (only that message was bad); when the
                # framing is lost the bytes that follow cannot be trusted: answer, then close.
                reply = self._owner._parse_error(exc.error, exc.data, self.flow)
                if reply is not None:
                    self._write(reply)
                if not exc.framing_lost:
                    continue  # counted by the handler (bad requests answered/dropped, bad responses)
                counters.tcp_framing_errors += 1
                log.info("tcp %s: closing %s after framing error: %s", self.local, self.remote, exc.error)
                self.close()
                return
            if item is None:
                return
            if isinstance(item, KeepAlive):
                if item.ping:  # RFC 5626 §4.4.1: answer a double-CRLF ping with a single-CRLF pong
                    counters.keepalive_pings += 1
                    self._write(PONG)
                    counters.keepalive_pongs += 1
                continue
            counters.stream_messages_received += 1
            try:
                self._owner._handler(item, self.flow)
            except Exception:
                counters.callback_errors += 1
                log.exception("tcp %s: handler failed on a message from %s", self.local, self.remote)

    # -- idle timer ----------------------------------------------------------------------------------------
    def _arm_idle(self) -> None:
        timeout = self._config.idle_timeout
        if timeout > 0:
            self._idle = self._loop.call_at(self.last_activity + timeout, self._idle_check)

    def _idle_check(self) -> None:
        self._idle = None
        try:
            if self._transport is None or self._transport.is_closing():
                return
            if self._loop.time() >= self.last_activity + self._config.idle_timeout:
                self._owner.counters.tcp_idle_closed += 1
                log.info("tcp %s: closing idle connection to %s", self.local, self.remote)
                self.close()
            else:
                self._arm_idle()
        except Exception:
            self._owner.counters.timer_errors += 1
            log.exception("tcp: idle check failed")

    # -- sending -------------------------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        """True while the connection can be written to."""
        return self._transport is not None and not self._transport.is_closing()

    def send(self, data: bytes) -> None:
        """Queue `data` on this connection; raises `ConnectionClosedError` or `SendError` (slow peer)."""
        if self._transport is None or self._transport.is_closing():
            raise ConnectionClosedError(f"tcp connection to {self.remote} is closed")
        self._write(data)
        self._owner.counters.stream_messages_sent += 1

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() + len(data) > self._config.max_write_buffer:
            self._owner.counters.tcp_slow_peers_dropped += 1
            log.warning("tcp %s: dropping slow peer %s (write buffer full)", self.local, self.remote)
            self.abort()
            raise SendError(f"tcp connection to {self.remote}: write buffer full, peer dropped")
        try:
            transport.write(data)
        except (OSError, RuntimeError) as exc:
            self._owner.counters.send_errors += 1
            raise map_os_error(exc, "send", self.remote) from exc
        self._owner.counters.bytes_sent += len(data)
        self.last_activity = self._loop.time()

    def close(self) -> None:
        """Close after flushing what is buffered (idempotent)."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def abort(self) -> None:
        """Close at once, dropping what is buffered (idempotent)."""
        if self._transport is not None:
            self._transport.abort()


class TcpTransport:
    """TCP listener(s), outgoing connections and the connection table (by remote address and alias)."""

    def __init__(
        self,
        handler: StreamMessageHandler,
        counters: TransportCounters | None = None,
        config: TcpConfig | None = None,
        *,
        on_parse_error: StreamParseErrorHandler | None = None,
    ) -> None:
        self._handler = handler
        self._on_parse_error = on_parse_error
        self.counters = counters if counters is not None else TransportCounters()
        self.config = config if config is not None else TcpConfig()
        self._servers: list[asyncio.Server] = []
        self._server_by_address: dict[Address, asyncio.Server] = {}
        self._by_id: dict[int, TcpConnection] = {}
        self._by_remote: dict[Address, TcpConnection] = {}
        self._aliases: dict[Address, TcpConnection] = {}
        self._connecting: dict[Address, asyncio.Future[TcpConnection]] = {}
        self._closing = False

    # -- table ---------------------------------------------------------------------------------------------
    def _register(self, conn: TcpConnection) -> bool:
        if self._closing:
            return False
        if len(self._by_id) >= self.config.max_connections:
            self.counters.tcp_refused_limit += 1
            log.warning(
                "tcp: connection limit %d reached, refusing %s", self.config.max_connections, conn.remote
            )
            return False
        self._by_id[conn.id] = conn
        self._by_remote[conn.remote] = conn
        if conn.outbound:
            self.counters.tcp_connected += 1
        else:
            self.counters.tcp_accepted += 1
        return True

    def _unregister(self, conn: TcpConnection) -> None:
        self.counters.tcp_closed += 1
        self._by_id.pop(conn.id, None)
        if self._by_remote.get(conn.remote) is conn:
            del self._by_remote[conn.remote]
        for alias in [a for a, c in self._aliases.items() if c is conn]:
            del self._aliases[alias]

    def _parse_error(self, exc: SipParseError, frame: bytes | None, flow: Flow) -> bytes | None:
        if self._on_parse_error is None:
            return None
        try:
            return self._on_parse_error(exc, frame, flow)
        except Exception:
            self.counters.callback_errors += 1
            log.exception("tcp: parse error handler failed")
            return None

    @property
    def connections(self) -> list[TcpConnection]:
        """The open connections (a copy)."""
        return list(self._by_id.values())

    def connection(self, connection_id: int) -> TcpConnection | None:
        """The open connection with this id, if any."""
        conn = self._by_id.get(connection_id)
        return conn if conn is not None and conn.is_open else None

    def find(self, address: Address) -> TcpConnection | None:
        """An open connection whose remote address is `address`, or aliased to it (RFC 5923 style)."""
        conn = self._by_remote.get(address)
        if conn is not None and conn.is_open:
            return conn
        conn = self._aliases.get(address)
        if conn is not None and conn.is_open:
            self.counters.tcp_alias_reused += 1
            return conn
        return None

    def add_alias(self, connection_id: int, address: Address) -> None:
        """Let requests to `address` reuse connection `connection_id` (its peer's Via sent-by)."""
        if not self.config.aliases:
            return
        conn = self._by_id.get(connection_id)
        if conn is None or not conn.is_open or address == conn.remote:
            return
        self._aliases[address] = conn

    # -- listening and connecting --------------------------------------------------------------------------
    async def listen(self, host: str, port: int, *, backlog: int = 128) -> Address:
        """Accept connections on (host, port) (port 0: ephemeral); returns the bound address.

        Connections accepted there carry it as `TcpConnection.listener`; `unlisten` undoes it.
        Raises `BindError` (nothing left listening) when the address cannot be bound.
        """
        if self._closing:
            raise TransportClosedError("tcp transport is closed")
        loop = asyncio.get_running_loop()
        # Filled in once bound (port 0); nobody can connect to an ephemeral port before it is known.
        bound: list[Address] = [(host, port)]
        try:
            server = await loop.create_server(
                lambda: TcpConnection(self, outbound=False, listener=bound[0]),
                host,
                port,
                backlog=backlog,
                reuse_address=True,
            )
        except OSError as exc:
            raise map_os_error(exc, "bind", (host, port)) from exc
        sockets = server.sockets or ()
        if not sockets:
            server.close()
            raise BindError(f"bind {(host, port)!r}: no socket")
        name = sockets[0].getsockname()
        bound[0] = (str(name[0]), int(name[1]))
        self._servers.append(server)
        self._server_by_address[bound[0]] = server
        return bound[0]

    async def unlisten(self, address: Address, *, grace: float = 1.0) -> int:
        """Stop listening on `address` (as returned by `listen`) and abort every connection accepted
        there, plus the outgoing ones bound to its host on request (they exist for it: a floating
        address that leaves this node takes them along). Returns how many connections were aborted;
        a no-op (0) when nothing listens there. Waits up to `grace` s for each `connection_lost`."""
        server = self._server_by_address.pop(address, None)
        if server is None:
            return 0
        server.close()
        with contextlib.suppress(ValueError):
            self._servers.remove(server)
        doomed = [
            conn
            for conn in self._by_id.values()
            if conn.listener == address or (conn.bound_host is not None and conn.bound_host == address[0])
        ]
        for conn in doomed:
            conn.abort()
        waiters = [conn.closed for conn in doomed if not conn.closed.done()]
        if waiters:
            await asyncio.wait(waiters, timeout=grace)
        await server.wait_closed()
        return len(doomed)

    async def connect(self, remote: Address, *, local_host: str | None = None) -> TcpConnection:
        """An open connection to `remote`: an existing one (or alias), else a new one, bound to
        `local_host` (port chosen by the kernel) when given.

        Concurrent calls for the same address share one attempt. Raises `ConnectError`,
        `ConnectionLimitError` or `TransportClosedError`.
        """
        existing = self.find(remote)
        if existing is not None:
            return existing
        if self._closing:
            raise TransportClosedError("tcp transport is closed")
        pending = self._connecting.get(remote)
        if pending is not None:
            return await asyncio.shield(pending)
        if len(self._by_id) + len(self._connecting) >= self.config.max_connections:
            self.counters.tcp_refused_limit += 1
            raise ConnectionLimitError(f"connect {remote!r}: {self.config.max_connections} connections open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[TcpConnection] = loop.create_future()
        self._connecting[remote] = future
        try:
            conn = await self._open(remote, local_host)
        except BaseException as exc:
            if not future.done():
                future.set_exception(
                    exc if isinstance(exc, Exception) else ConnectError(f"connect {remote!r}: cancelled")
                )
                future.exception()  # mark retrieved: waiters (if any) get it through shield
            raise
        else:
            future.set_result(conn)
            return conn
        finally:
            self._connecting.pop(remote, None)

    async def _open(self, remote: Address, local_host: str | None = None) -> TcpConnection:
        loop = asyncio.get_running_loop()
        local_addr = (local_host, 0) if local_host is not None else None
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: TcpConnection(self, outbound=True, bound_host=local_host),
                    remote[0],
                    remote[1],
                    local_addr=local_addr,
                )
        except (OSError, TimeoutError) as exc:
            self.counters.tcp_connect_failures += 1
            raise map_os_error(exc, "connect", remote) from exc
        if not protocol.is_open:
            raise ConnectionLimitError(f"connect {remote!r}: refused by the connection limit")
        return protocol

    def send(self, flow: Flow, data: bytes) -> None:
        """Write `data` on the connection of `flow`, or another open one to its remote address.

        Raises `ConnectionClosedError` when there is none (the caller may `connect` and retry).
        """
        conn = self.connection(flow.connection_id) if flow.connection_id else None
        if conn is None:
            conn = self.find(flow.remote)
        if conn is None:
            raise ConnectionClosedError(f"no open tcp connection to {flow.remote!r}")
        conn.send(data)

    async def send_to(self, remote: Address, data: bytes, *, local_host: str | None = None) -> Flow:
        """Write `data` to `remote`, reusing or opening a connection (bound to `local_host` if given);
        returns the flow used."""
        conn = await self.connect(remote, local_host=local_host)
        conn.send(data)
        return conn.flow

    @property
    def local_addresses(self) -> list[Address]:
        """The bound listening addresses."""
        out: list[Address] = []
        for server in self._servers:
            for sock in server.sockets or ():
                name = sock.getsockname()
                out.append((str(name[0]), int(name[1])))
        return out

    async def aclose(self, grace: float = 5.0) -> None:
        """Stop listening, close every connection and wait until each is closed (abort after `grace` s)."""
        self._closing = True
        for server in self._servers:
            server.close()
        conns = list(self._by_id.values())
        for conn in conns:
            conn.close()
        waiters = [conn.closed for conn in conns]
        if waiters:
            _, pending = await asyncio.wait(waiters, timeout=grace)
            for conn in conns:
                if not conn.closed.done():
                    conn.abort()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        self._server_by_address.clear()
