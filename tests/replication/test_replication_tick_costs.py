"""The Raft thread's fixed costs per tick and per readiness event (patches of pysyncobj 0.3.17 behind the seam).

- A tick with no queued command does not poll pysyncobj's command queue: pysyncobj's `_checkCommandsToApply`
  takes the queue's lock and raises and catches `Queue.Empty` on every tick (hundreds a second per node);
  commands still go through as soon as they are queued.
- A readiness event on a Raft connection reads until a short read, not until EAGAIN: pysyncobj's reader makes
  one more `recv` (raising) and a `getsockopt(SO_ERROR)` per read; what arrives later raises the next
  (level-triggered) event, and a backlog larger than one read is still read in the same event.
"""

from __future__ import annotations

import pickle
import socket
import struct
from typing import Any

from conftest import SECRET, wait_for
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection
from replica import encode

from raftpbx.replication import _FrameCipher, _SealedConnection


async def test_idle_ticks_do_not_poll_the_command_queue(cluster_factory: Any) -> None:
    c = await cluster_factory()
    lead = await c.leader()
    node = c.reps[lead]._node
    queue = node._SyncObj__commandsQueue
    polls: list[int] = []
    ticks: list[int] = []
    real_get, real_tick = queue.get_nowait, node.doTick

    def counting_get() -> Any:
        polls.append(1)
        return real_get()

    def counting_tick(*args: Any) -> Any:
        ticks.append(1)
        return real_tick(*args)

    queue.get_nowait = counting_get  # instance attributes: the Raft thread looks them up on every call
    node.doTick = counting_tick
    await wait_for(lambda: len(ticks) >= 30, 5, "30 ticks of the leader")
    assert polls == []  # without the patch: at least one poll (and one caught Queue.Empty) per tick
    assert await c.reps[lead].propose(encode("op-1", "k", "v"), timeout=5)
    assert polls  # a queued command is taken at once


class _CountingSocket:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.recvs = 0

    def recv(self, size: int) -> bytes:
        self.recvs += 1
        return self.sock.recv(size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


class _Poller:
    def subscribe(self, *args: Any) -> None:
        pass

    def unsubscribe(self, *args: Any) -> None:
        pass


def _receiver() -> tuple[_SealedConnection, socket.socket, _CountingSocket]:
    a, b = socket.socketpair()
    a.setblocking(False)  # as pysyncobj's own connections are
    conn = TcpConnection(poller=_Poller(), socket=a, timeout=60.0)
    conn.__class__ = _SealedConnection
    conn.adopt(_FrameCipher(SECRET))
    counting = _CountingSocket(a)
    conn._TcpConnection__socket = counting
    return conn, b, counting


def _frame(cipher: _FrameCipher, obj: object) -> bytes:
    sealed = cipher.seal(b"\x00" + pickle.dumps(obj))
    return struct.pack("i", len(sealed)) + sealed


def test_a_readiness_event_stops_at_a_short_read() -> None:
    conn, peer, counting = _receiver()
    try:
        peer.sendall(_frame(_FrameCipher(SECRET), {"n": 1}))
        conn._TcpConnection__tryReadBuffer()
        assert counting.recvs == 1  # without the patch: a second recv, which raises EAGAIN
        assert conn._TcpConnection__processParseMessage() == {"n": 1}
        assert conn.state == CONNECTION_STATE.CONNECTED
    finally:
        conn.disconnect()
        peer.close()


def test_a_backlog_larger_than_one_read_is_read_in_one_event() -> None:
    conn, peer, counting = _receiver()
    try:
        size = conn._TcpConnection__recvBufferSize
        cipher = _FrameCipher(SECRET)
        frames = b"".join(_frame(cipher, {"n": i, "pad": b"x" * 1000}) for i in range(3 * size // 1000))
        peer.setblocking(True)
        peer.sendall(frames)
        conn._TcpConnection__tryReadBuffer()
        assert counting.recvs > 1
        got = [conn._TcpConnection__processParseMessage() for _ in range(3 * size // 1000)]
        assert [m["n"] for m in got] == list(range(3 * size // 1000))
    finally:
        conn.disconnect()
        peer.close()
