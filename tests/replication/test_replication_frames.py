"""Hazard 3 with sealed frames: Raft traffic between raftpbx nodes is AES-GCM sealed under the cluster
secret (replacing pysyncobj's zlib + Fernet per message, for CPU), and stays authenticated: a frame sealed
under another secret, tampered with, replayed or reordered is refused before anything is unpickled; a peer
that does not announce sealed frames (an older version) keeps getting Fernet."""

from __future__ import annotations

import os
import pickle
import socket
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from conftest import SECRET, wait_for
from pysyncobj.encryptor import getEncryptor
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection
from replica import encode

from raftpbx.replication import Replicator, _FrameCipher, _SealedConnection


class _Exploit:
    """Unpickling this creates a directory: proof that the receiver parsed the frame's pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (self.marker,))


def _sealed(cipher: _FrameCipher, obj: object) -> bytes:
    frame = cipher.seal(b"\x00" + pickle.dumps(obj))
    return struct.pack("i", len(frame)) + frame


def _send(addr: str, data: bytes) -> None:
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(data)
        s.settimeout(2)
        try:
            while s.recv(4096):
                pass
        except (TimeoutError, ConnectionError):
            pass


def _conns(rep: Replicator) -> list[Any]:
    assert rep._transport is not None
    return [c for c in rep._transport._connections.values() if c.state == CONNECTION_STATE.CONNECTED]


async def test_cluster_traffic_is_sealed_after_the_hello(cluster_factory: Any) -> None:
    c = await cluster_factory()
    lead = await c.leader()
    assert await c.reps[lead].propose(encode("a", "k", "v"), timeout=5)
    assert await c.reps[(lead + 1) % 3].propose(encode("b", "k", "v"), timeout=5)

    def all_sealed() -> bool:
        conns = [conn for rep in c.reps for conn in _conns(rep)]
        # Each node keeps one connection per peer; both ends send and receive sealed frames.
        return len(conns) == 6 and all(isinstance(x, _SealedConnection) and x.sealed and x._peer_salt
                                       for x in conns)

    await wait_for(all_sealed, 5, "every connection to send and receive sealed frames")


async def test_a_frame_sealed_under_another_secret_executes_nothing(cluster_factory: Any, tmp_path: Path) -> None:
    c = await cluster_factory()
    lead = await c.leader()
    marker = tmp_path / "pwned"
    stranger = _FrameCipher("not-the-cluster-secret")
    for cfg in c.configs:
        _send(cfg.self_addr, _sealed(stranger, _Exploit(marker)))
    assert not marker.exists()
    assert await c.reps[lead].propose(encode("after", "k", "v"), timeout=5)
    # Control: the same frame sealed under the cluster secret is parsed (the format above is right, so the
    # refusal is the key's doing). Holders of the secret are trusted, exactly as with pysyncobj's Fernet.
    _send(c.configs[lead].self_addr, _sealed(_FrameCipher(SECRET), _Exploit(marker)))
    await wait_for(marker.exists, 5, "the control frame to be parsed")


_FERNET = getEncryptor(SECRET)


class _Poller:
    def subscribe(self, *args: Any) -> None:
        pass

    def unsubscribe(self, *args: Any) -> None:
        pass


def _receiver() -> tuple[_SealedConnection, socket.socket]:
    a, b = socket.socketpair()
    conn = TcpConnection(poller=_Poller(), socket=a, timeout=60.0)
    conn.encryptor = _FERNET  # as pysyncobj sets it with a password
    conn.__class__ = _SealedConnection
    conn.adopt(_FrameCipher(SECRET))
    return conn, b


def _parse(conn: _SealedConnection, data: bytes) -> Any:
    conn._TcpConnection__readBuffer += data
    return conn._TcpConnection__processParseMessage()


@pytest.mark.parametrize("attack", ["tampered", "replayed", "reordered", "other_sender", "fernet_after_sealed"])
def test_a_frame_that_is_not_the_next_authentic_one_closes_the_connection(attack: str) -> None:
    conn, peer = _receiver()
    sender = _FrameCipher(SECRET)
    first, second = _sealed(sender, {"n": 1}), _sealed(sender, {"n": 2})
    try:
        assert _parse(conn, first) == {"n": 1}
        bad = {
            "tampered": second[:-1] + bytes([second[-1] ^ 1]),
            "replayed": first,
            "reordered": b"",
            "other_sender": _sealed(_FrameCipher(SECRET), {"n": 2}),  # another process, same secret
            "fernet_after_sealed": b"",
        }[attack]
        if attack == "reordered":
            third = _sealed(sender, {"n": 3})
            assert _parse(conn, third) == {"n": 3}
            bad = second
        if attack == "fernet_after_sealed":
            # A well-formed Fernet frame (pysyncobj's own format, readable before the peer went sealed).
            token = _FERNET.encrypt_at_time(zlib.compress(pickle.dumps({"n": 2}, protocol=2), 3), 1)
            bad = struct.pack("i", len(token)) + token
        assert _parse(conn, bad) is None
        assert conn.state == CONNECTION_STATE.DISCONNECTED
    finally:
        conn.disconnect()
        peer.close()


def test_sealed_frames_round_trip_large_messages_compressed() -> None:
    conn, peer = _receiver()
    sender = _FrameCipher(SECRET)
    try:
        big = {"data": os.urandom(16) * 20_000}  # 320 KB: compressed above 64 KB of pickle
        frame = sender.seal(b"\x01" + zlib.compress(pickle.dumps(big), 1))
        assert _parse(conn, struct.pack("i", len(frame)) + frame) == big
        assert conn.state == CONNECTION_STATE.CONNECTED
    finally:
        conn.disconnect()
        peer.close()


async def test_a_peer_that_does_not_announce_sealed_frames_keeps_fernet(cluster_factory: Any) -> None:
    old = 0

    def configure(i: int, rep: Replicator) -> None:
        if i == old:  # an older raftpbx: its hello has no "frames", and it ignores that of its peers
            hello, on_hello = rep._hello, rep._on_hello
            rep._hello = lambda: {k: v for k, v in hello().items() if k != "frames"}  # type: ignore[method-assign]
            rep._on_hello = lambda node, peer, msg: on_hello(  # type: ignore[method-assign]
                node, peer, {k: v for k, v in msg.items() if k != "frames"})

    c = await cluster_factory(configure=configure)
    lead = await c.leader()
    for i in range(3):
        assert await c.reps[i].propose(encode(f"op{i}", "k", "v"), timeout=5)
    assert lead in (0, 1, 2)
    old_addr = c.configs[old].self_addr

    def settled() -> bool:
        for i, rep in enumerate(c.reps):
            assert rep._transport is not None
            for node, conn in rep._transport._connections.items():
                if conn.state != CONNECTION_STATE.CONNECTED:
                    return False
                to_old = node.id == old_addr or i == old
                if conn.sealed == to_old:  # sealed exactly between the two new nodes
                    return False
        return True

    await wait_for(settled, 5, "sealed frames between new nodes only")
    assert c.reps[old]._transport is not None
    assert all(conn._peer_salt is None for conn in c.reps[old]._transport._connections.values())
    assert await c.reps[old].propose(encode("late", "k", "v"), timeout=5)
