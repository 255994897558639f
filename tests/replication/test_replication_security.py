"""Hazard 3: the Raft port executes nothing sent by a stranger, and listens on the node's address only."""

from __future__ import annotations

import os
import pickle
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

from conftest import free_port, fresh_hosts, wait_for
from replica import encode


class _Exploit:
    """Unpickling this creates a directory: proof that the receiver ran code chosen by the sender."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (self.marker,))


def _frame(obj: object) -> bytes:
    # pysyncobj's wire format: 4-byte length, then zlib(pickle(message)) (Fernet-encrypted with a password).
    data = zlib.compress(pickle.dumps(obj, protocol=2), 3)
    return struct.pack("i", len(data)) + data


def _send_exploit(addr: str, marker: Path) -> None:
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(_frame(_Exploit(marker)))
        s.settimeout(2)
        try:
            while s.recv(4096):  # the server closes the connection on garbage (or keeps it open)
                pass
        except (TimeoutError, ConnectionError):
            pass


_BARE_NODE = """
import sys, time
from pysyncobj import SyncObj, SyncObjConf
obj = SyncObj(sys.argv[1], [], SyncObjConf())  # no password: what the design brief measured
print("READY", flush=True)
time.sleep(30)
"""


def test_unprotected_pysyncobj_runs_the_pickle(tmp_path: Path) -> None:
    """The control experiment that shows the next test can fail: a bare pysyncobj node without a
    password executes the same payload (the marker appears)."""
    host = fresh_hosts(1)[0]
    addr = f"{host}:{free_port(host)}"
    marker = tmp_path / "pwned-bare"
    proc = subprocess.Popen([sys.executable, "-c", _BARE_NODE, addr], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith(b"READY")
        deadline = time.monotonic() + 5
        while not marker.exists() and time.monotonic() < deadline:
            try:
                _send_exploit(addr, marker)
            except ConnectionRefusedError:  # not bound yet
                time.sleep(0.05)
        assert marker.exists()
    finally:
        proc.kill()
        proc.wait(timeout=10)


async def test_raft_port_with_secret_executes_nothing(cluster_factory: Any, tmp_path: Path) -> None:
    c = await cluster_factory()
    lead = await c.leader()
    marker = tmp_path / "pwned"
    for cfg in c.configs:
        _send_exploit(cfg.self_addr, marker)
        # Also as the first message after a valid-looking address announcement.
        host, port = cfg.self_addr.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(_frame(c.configs[(lead + 1) % 3].self_addr) + _frame(_Exploit(marker)))
    assert not marker.exists()
    # The nodes are still healthy and the stranger never became a member.
    assert await c.reps[lead].propose(encode("after", "k", "v"), timeout=5)
    await wait_for(lambda: all(r.status().has_quorum for r in c.reps), 5, "quorum")


async def test_raft_port_binds_only_self_addr(cluster_factory: Any) -> None:
    c = await cluster_factory()
    host, port = c.configs[0].self_addr.rsplit(":", 1)
    other = "127.0.0.1" if host != "127.0.0.1" else "127.0.0.2"
    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex((other, int(port))) != 0  # nothing listens on the wildcard address
    with socket.create_connection((host, int(port)), timeout=2):
        pass
