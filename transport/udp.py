"""SIP over UDP: one asyncio datagram endpoint per listening address (listener and sender in one).

Theory: `UdpTransport` is glue. `datagram_received` wraps the bytes in a `Flow` (remote and local address)
and hands them to one callback (the endpoint), which parses them and drives the transaction layer; the
transport itself knows nothing of SIP. Sending is `send(data, remote)`: the same socket sends requests and
responses, so responses leave from the port the request reached (RFC 3261 §18.2.2, RFC 3581 §4 symmetric
response routing works through NATs).

Invariants:
- Callbacks never raise into the loop: an exception from the consumer is logged and counted
  (`callback_errors`); ICMP errors reported by the OS (`error_received`) are counted (`socket_errors`).
- Datagrams above `max_datagram` bytes are neither accepted nor sent (counted as `oversized_dropped`);
  RFC 3261 §18.1.1 wants large requests over TCP, which is the caller's choice.
- If the kernel send buffer is full and asyncio starts buffering, at most `max_write_buffer` bytes are
  queued; beyond that datagrams are dropped and counted (`send_errors`): UDP is lossy anyway and the
  transaction layer retransmits.
- Only addresses given by the caller are ever sent to; the transport never picks a destination.

Cost: the socket is ours (bound here, handed to the loop with `sock=`), and `send` calls its `sendto`
directly while the loop has nothing buffered: CPython's socket releases the GIL during the system call
(on loopback the kernel delivers the datagram and wakes the receiver inside it), whereas uvloop's
`transport.sendto` holds the GIL throughout, so the node's Raft thread could not run meanwhile. When the
kernel buffer is full (EAGAIN) or the loop already buffers, the datagram goes through the transport, which
queues it in order.

Receive buffer: `open_udp` asks for `RECEIVE_BUFFER` (4 MiB; Linux clamps it to net.core.rmem_max and
doubles it for bookkeeping). The default (rmem_default, 208 KiB) holds only ~100 SIP datagrams on loopback
(each costs ~2 KB of skb truesize): at ~2,000 datagrams/s per node any loop stall of a few tens of ms (GIL
hand-off, GC, a burst) overflowed it. Measured at 200 calls/s: 223-508 drops per node socket in a 6 s step
with the default, none with 4 MiB; each drop costs a T1 (500 ms) retransmission, and a dropped 180 made SIPp
abort the call. `read_pending()` lets the endpoint read what is already queued before it fires timers that
are late (endpoint.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import cast

from .counters import TransportCounters
from .errors import SendError, TransportClosedError, map_os_error
from .flow import Address, Flow

__all__ = ["RECEIVE_BUFFER", "DatagramHandler", "UdpTransport", "open_udp"]

log = logging.getLogger(__name__)

DatagramHandler = Callable[[bytes, Flow], None]

MAX_DATAGRAM = 65507  # IPv4 UDP payload limit
MAX_WRITE_BUFFER = 1 << 20
FLOW_CACHE = 4096  # peer addresses whose Flow is kept for reuse (UdpTransport._flow)
RECEIVE_BUFFER = 4 << 20  # bytes asked for with SO_RCVBUF (module doc)


class UdpTransport(asyncio.DatagramProtocol):
    """A bound UDP socket that delivers datagrams to `handler` and sends datagrams to given addresses."""

    def __init__(
        self,
        handler: DatagramHandler,
        counters: TransportCounters,
        *,
        max_datagram: int = MAX_DATAGRAM,
        max_write_buffer: int = MAX_WRITE_BUFFER,
    ) -> None:
        self._handler = handler
        self.counters = counters
        self.max_datagram = max_datagram
        self.max_write_buffer = max_write_buffer
        self._transport: asyncio.DatagramTransport | None = None
        self._sock: socket.socket | None = None  # set by open_udp: sent on directly (module doc)
        self._local: Address = ("0.0.0.0", 0)
        self._closed = asyncio.get_running_loop().create_future()
        # The Flow of each recent peer address: a Flow is immutable, and building one per datagram (a frozen
        # dataclass: object.__setattr__ per field) cost more than the lookup. Bounded: emptied when full.
        self._flows: dict[object, Flow] = {}

    # -- asyncio callbacks (never raise) -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)
        sockname = transport.get_extra_info("sockname")
        if isinstance(sockname, tuple) and len(sockname) >= 2:
            self._local = (str(sockname[0]), int(sockname[1]))

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        try:
            self.counters.datagrams_received += 1
            self.counters.bytes_received += len(data)
            if len(data) > self.max_datagram:
                self.counters.oversized_dropped += 1
                return
            self._handler(data, self._flow(addr))
        except Exception:
            self.counters.callback_errors += 1
            log.exception("udp %s: handler failed on a datagram from %s", self._local, addr)

    def _flow(self, addr: tuple[str | object, int]) -> Flow:
        flow = self._flows.get(addr)
        if flow is None:
            if len(self._flows) >= FLOW_CACHE:
                self._flows.clear()
            flow = self._flows[addr] = Flow("udp", (str(addr[0]), int(addr[1])), self._local)
        return flow

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and friends, reported for an earlier sendto; the transaction layer times out.
        self.counters.socket_errors += 1
        log.debug("udp %s: socket error %s", self._local, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self._closed.done():
            self._closed.set_result(None)

    # -- API ---------------------------------------------------------------------------------------------
    @property
    def local_address(self) -> Address:
        """The bound (host, port)."""
        return self._local

    @property
    def receive_buffer(self) -> int:
        """The socket's receive buffer as granted by the kernel, in the bytes one asks for (Linux reports
        twice the usable size: its bookkeeping); 0 before the socket is bound."""
        sock = self._sock
        if sock is None:
            return 0
        try:
            return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)) // 2
        except OSError:
            return 0

    @property
    def closed(self) -> bool:
        """True once the socket is closed or closing."""
        return self._transport is None or self._transport.is_closing()

    def send(self, data: bytes, remote: Address) -> None:
        """Send one datagram to `remote`; raises a `TransportError` if it cannot be queued."""
        transport = self._transport
        if transport is None or transport.is_closing():
            raise TransportClosedError(f"udp {self._local}: closed")
        if len(data) > self.max_datagram:
            self.counters.oversized_dropped += 1
            raise SendError(f"udp {self._local}: datagram of {len(data)} bytes exceeds {self.max_datagram}")
        buffered: Callable[[], int] | None = getattr(transport, "get_write_buffer_size", None)
        queued = buffered() if buffered is not None else 0
        if queued > self.max_write_buffer:
            self.counters.send_errors += 1
            raise SendError(f"udp {self._local}: send buffer full, datagram to {remote} dropped")
        try:
            sock = self._sock
            if sock is not None and queued == 0:
                try:
                    sock.sendto(data, remote)
                except (BlockingIOError, InterruptedError):
                    transport.sendto(data, remote)  # kernel buffer full: the loop queues it, in order
            else:
                transport.sendto(data, remote)
        except (OSError, RuntimeError) as exc:
            self.counters.send_errors += 1
            raise map_os_error(exc, "send", remote) from exc
        self.counters.datagrams_sent += 1
        self.counters.bytes_sent += len(data)

    def read_pending(self, limit: int = 256) -> int:
        """Deliver the datagrams already queued on the socket (non-blocking reads until EAGAIN, at most
        `limit`) exactly as the loop would; returns how many. Never raises."""
        sock = self._sock
        count = 0
        if sock is None or self.closed:
            return 0
        while count < limit:
            try:
                data, addr = sock.recvfrom(self.max_datagram + 1)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. an ICMP error queued on the socket: what error_received sees
                self.error_received(exc)
                break
            count += 1
            self.datagram_received(data, addr)
        return count

    def close(self) -> None:
        """Start closing the socket (idempotent)."""
        if self._transport is not None:
            self._transport.close()
        elif not self._closed.done():
            self._closed.set_result(None)

    async def wait_closed(self) -> None:
        """Wait until the socket is closed."""
        await asyncio.shield(self._closed)

    async def aclose(self) -> None:
        """Close the socket and wait for it."""
        self.close()
        await self.wait_closed()


async def open_udp(
    host: str,
    port: int,
    handler: DatagramHandler,
    counters: TransportCounters | None = None,
    *,
    max_datagram: int = MAX_DATAGRAM,
    receive_buffer: int = RECEIVE_BUFFER,
) -> UdpTransport:
    """Bind a UDP socket on (host, port) (port 0: ephemeral) and return its `UdpTransport`.

    `receive_buffer`: SO_RCVBUF asked for (the kernel clamps it; 0 keeps the system default).
    Raises `BindError` when the address cannot be bound.
    """
    loop = asyncio.get_running_loop()
    counters = counters if counters is not None else TransportCounters()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if receive_buffer > 0:
            with contextlib.suppress(OSError):  # a lower cap (rmem_max) is not an error: the kernel clamps
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.bind((host, port))
        _, protocol = await loop.create_datagram_endpoint(
            lambda: UdpTransport(handler, counters, max_datagram=max_datagram), sock=sock
        )
    except OSError as exc:
        sock.close()
        raise map_os_error(exc, "bind", (host, port)) from exc
    except BaseException:
        sock.close()
        raise
    protocol._sock = sock
    return protocol
