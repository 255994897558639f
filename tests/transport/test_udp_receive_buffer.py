"""open_udp asks the kernel for a 4 MiB receive buffer (transport/udp.py: the 208 KB default held ~100 SIP
datagrams and overflowed in loop stalls) and reports what the kernel granted. Real loopback sockets."""

from __future__ import annotations

from pathlib import Path

from raftpbx.transport.counters import TransportCounters
from raftpbx.transport.udp import RECEIVE_BUFFER, open_udp

HOST = "127.0.0.1"


def _sysctl(name: str) -> int:
    return int(Path("/proc/sys/net/core", name).read_text())


async def test_the_default_asks_for_4_mib_clamped_by_rmem_max() -> None:
    udp = await open_udp(HOST, 0, lambda data, flow: None, TransportCounters())
    try:
        assert RECEIVE_BUFFER == 4 << 20
        assert udp.receive_buffer == min(RECEIVE_BUFFER, _sysctl("rmem_max"))
    finally:
        await udp.aclose()


async def test_an_explicit_size_and_zero_for_the_system_default() -> None:
    small = await open_udp(HOST, 0, lambda data, flow: None, TransportCounters(), receive_buffer=65536)
    system = await open_udp(HOST, 0, lambda data, flow: None, TransportCounters(), receive_buffer=0)
    try:
        assert small.receive_buffer == 65536
        # Linux reports rmem_default itself for a socket that asked for nothing: what asking for half of it gives
        assert system.receive_buffer == _sysctl("rmem_default") // 2
    finally:
        await small.aclose()
        await system.aclose()
