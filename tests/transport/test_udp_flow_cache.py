"""UdpTransport reuses one (immutable) Flow per peer address, over a real socket on loopback; the cache of
them is bounded."""

from __future__ import annotations

import socket

from conftest import WaitUntil
from raftpbx.transport import udp
from raftpbx.transport.flow import Flow
from raftpbx.transport.udp import open_udp


async def test_datagrams_from_one_peer_share_a_flow_and_the_cache_is_bounded(wait_until: WaitUntil) -> None:
    got: list[tuple[bytes, Flow]] = []

    def handler(data: bytes, flow: Flow) -> None:
        got.append((data, flow))

    transport = await open_udp("127.0.0.1", 0, handler)
    peers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        for peer in peers:
            peer.bind(("127.0.0.1", 0))

        async def send(peer: socket.socket, data: bytes, total: int) -> None:
            peer.sendto(data, transport.local_address)
            await wait_until(lambda: len(got) >= total, what=f"datagram {total}")

        await send(peers[0], b"one", 1)
        await send(peers[0], b"two", 2)
        await send(peers[1], b"three", 3)
        (_, a), (_, b), (_, c) = got
        assert a is b and a != c
        assert a == Flow("udp", peers[0].getsockname(), transport.local_address)
        assert c == Flow("udp", peers[1].getsockname(), transport.local_address)
        # Bounded: past FLOW_CACHE peers the cache starts over (a Flow equal to the old one is made again).
        for k in range(udp.FLOW_CACHE + 5):
            transport._flow((f"127.0.0.{k % 250 + 1}", 10000 + k))
            assert len(transport._flows) <= udp.FLOW_CACHE
        again = transport._flow(tuple(peers[0].getsockname()))  # type: ignore[arg-type]
        assert again == a
    finally:
        for peer in peers:
            peer.close()
        await transport.aclose()
