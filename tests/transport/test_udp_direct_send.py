"""UdpTransport.send writes on its own socket (the GIL is released in the system call) while the loop has
nothing queued, and falls back to the loop's transport (which queues in order) when the kernel says EAGAIN.
Real loopback sockets, on uvloop and on the stdlib loop (conftest.py)."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from raftpbx.transport.counters import TransportCounters
from raftpbx.transport.errors import TransportClosedError
from raftpbx.transport.flow import Flow
from raftpbx.transport.udp import open_udp

HOST = "127.0.0.1"


class _NoTransportSend:
    """Wraps the loop's transport: sendto through it fails the test (the direct path must be taken)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def sendto(self, data: bytes, addr: Any = None) -> None:
        raise AssertionError("the loop's transport was used although nothing was queued")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _FullSocket:
    """A socket whose kernel buffer is full: sendto raises BlockingIOError (EAGAIN)."""

    def __init__(self) -> None:
        self.calls = 0

    def sendto(self, data: bytes, addr: Any) -> int:
        self.calls += 1
        raise BlockingIOError(11, "Resource temporarily unavailable")


def _receiver() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    sock.settimeout(2.0)
    return sock


async def test_send_goes_through_the_socket_itself_when_nothing_is_queued() -> None:
    received: list[tuple[bytes, Flow]] = []
    udp = await open_udp(HOST, 0, lambda data, flow: received.append((data, flow)), TransportCounters())
    sink = _receiver()
    try:
        udp._transport = _NoTransportSend(udp._transport)  # type: ignore[assignment]
        udp.send(b"direct", sink.getsockname())
        data, source = sink.recvfrom(100)
        assert data == b"direct" and source == udp.local_address  # from the bound socket (§18.2.2 symmetry)
        assert udp.counters.datagrams_sent == 1 and udp.counters.bytes_sent == 6
    finally:
        udp._transport = udp._transport.inner  # type: ignore[union-attr]
        sink.close()
        await udp.aclose()


async def test_send_falls_back_to_the_loop_when_the_kernel_buffer_is_full(wait_until: Any) -> None:
    udp = await open_udp(HOST, 0, lambda data, flow: None, TransportCounters())
    sink = _receiver()
    real = udp._sock
    full = _FullSocket()
    try:
        udp._sock = full  # type: ignore[assignment]
        udp.send(b"queued", sink.getsockname())
        assert full.calls == 1
        data, _ = sink.recvfrom(100)  # the loop's transport sent it
        assert data == b"queued"
        assert udp.counters.send_errors == 0 and udp.counters.datagrams_sent == 1
    finally:
        udp._sock = real
        sink.close()
        await udp.aclose()


async def test_send_after_close_raises_and_the_socket_is_released() -> None:
    udp = await open_udp(HOST, 0, lambda data, flow: None, TransportCounters())
    address = udp.local_address
    await udp.aclose()
    with pytest.raises(TransportClosedError):
        udp.send(b"late", (HOST, 9))
    again = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        again.bind(address)  # the port is free again: the loop closed our socket
    finally:
        again.close()
