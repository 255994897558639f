"""The loopback firewall of the chaos suite: partitions and loss between processes told apart by their group
id only (their packets all leave from 127.0.0.1, as pysyncobj's connections do), never touching anyone else.

Two real processes play nodes: B echoes UDP on its own address and prints what it receives; A sends from an
unbound socket (source 127.0.0.1) and prints whether the echo came back. The test process itself (no mark)
plays a phone. Root only (nft, setting a child's group id)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from chaos.cluster import LoopbackFirewall

pytestmark = pytest.mark.timeout(60)

ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
print(s.getsockname()[1], flush=True)
while True:
    data, peer = s.recvfrom(100)
    print("got", data.decode(), flush=True)
    s.sendto(data, peer)
"""

PINGER = """
import socket, sys
for line in sys.stdin:
    host, port, tag = line.split()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.4)
    s.sendto(tag.encode(), (host, int(port)))
    try:
        s.recv(100)
        print("ok", flush=True)
    except OSError:
        print("timeout", flush=True)
    s.close()
"""


@dataclass
class FakeNode:
    ip: str
    gid: int


def test_partition_oneway_and_loss_hit_only_the_marked_processes(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "needs root (nft, group ids)"
    base = 300_000 + (os.getpid() % 20_000) * 10
    prefix = f"127.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    a, b = FakeNode(f"{prefix}.11", base + 1), FakeNode(f"{prefix}.12", base + 2)
    fw = LoopbackFirewall(f"rpbx_chaos_test_{os.getpid()}", [a, b])  # type: ignore[list-item]
    echo = subprocess.Popen([sys.executable, "-c", ECHO, b.ip], stdout=subprocess.PIPE, text=True,
                            group=b.gid, extra_groups=[])
    pinger = subprocess.Popen([sys.executable, "-c", PINGER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, group=a.gid, extra_groups=[])
    assert echo.stdout is not None and pinger.stdin is not None and pinger.stdout is not None
    port = int(echo.stdout.readline())
    seq = iter(range(1000))
    received: list[str] = []
    threading.Thread(target=lambda: received.extend(line.strip() for line in echo.stdout),  # type: ignore[union-attr]
                     daemon=True).start()
    last_tag = ""

    def a_to_b() -> str:
        nonlocal last_tag
        last_tag = f"t{next(seq)}"
        pinger.stdin.write(f"{b.ip} {port} {last_tag}\n")  # type: ignore[union-attr]
        pinger.stdin.flush()  # type: ignore[union-attr]
        return pinger.stdout.readline().strip()  # type: ignore[union-attr]

    def b_got_last() -> bool:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if f"got {last_tag}" in received:
                return True
            time.sleep(0.02)  # polling the reader thread's list with a deadline
        return False

    def phone_to_b() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.4)
            s.sendto(b"phone", (b.ip, port))
            try:
                s.recv(100)
                return True
            except OSError:
                return False

    try:
        fw.create()
        assert a_to_b() == "ok" and phone_to_b()
        fw.partition([a], [b])
        assert a_to_b() == "timeout" and not b_got_last()
        assert phone_to_b(), "an unmarked process (a phone, SIPp) must not be cut"
        fw.heal()
        assert a_to_b() == "ok"
        fw.partition([b], [a], oneway=True)  # b cannot send to a: the request arrives, the echo is lost
        assert a_to_b() == "timeout" and b_got_last()
        fw.heal()
        fw.partition([a], [b], oneway=True)  # a cannot send to b
        assert a_to_b() == "timeout" and not b_got_last()
        fw.heal()
        fw.loss(99, [a, b])  # type: ignore[list-item]  # request and echo: 1 in 10,000 gets through
        assert a_to_b() == "timeout" and phone_to_b()
        fw.heal()
        assert a_to_b() == "ok"
    finally:
        fw.destroy()
        for proc in (echo, pinger):
            proc.kill()
            proc.wait(timeout=5)
    listed = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert fw.table not in listed
