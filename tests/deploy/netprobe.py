"""Probe program run inside lab hosts by the lab tests.

    netprobe.py serve                 UDP sink on :9000 (records sender and token), TCP echo on :9002,
                                      records dumped to whoever connects to 127.0.0.1:9001
    netprobe.py send TOKEN ADDR...    one UDP datagram "TOKEN" to ADDR:9000 each, three times
    netprobe.py rtt ADDR COUNT SIZE   COUNT TCP echo round trips of SIZE bytes to ADDR:9002; prints the
                                      median in ms; exits 1 if an echo differs from what was sent
"""

from __future__ import annotations

import selectors
import socket
import statistics
import sys
import time

UDP_PORT, DUMP_PORT, ECHO_PORT = 9000, 9001, 9002


def serve() -> None:
    sel = selectors.DefaultSelector()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", UDP_PORT))
    dump = socket.create_server(("127.0.0.1", DUMP_PORT))
    echo = socket.create_server(("0.0.0.0", ECHO_PORT))
    for s in (udp, dump, echo):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    records: list[str] = []
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            if sock is udp:
                data, (ip, _port) = udp.recvfrom(2048)
                records.append(f"{ip} {data.decode(errors='replace')}")
            elif sock is dump:
                conn, _ = dump.accept()
                with conn:
                    conn.setblocking(True)
                    conn.sendall(("\n".join(records) + "\n").encode())
            elif sock is echo:
                conn, _ = echo.accept()
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
            else:
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if data:
                    sock.setblocking(True)
                    sock.sendall(data)
                    sock.setblocking(False)
                else:
                    sel.unregister(sock)
                    sock.close()


def send(token: str, addrs: list[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(3):
            for addr in addrs:
                s.sendto(token.encode(), (addr, UDP_PORT))


def rtt(addr: str, count: int, size: int) -> int:
    payload = bytes(i % 251 for i in range(size))
    times = []
    with socket.create_connection((addr, ECHO_PORT), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            start = time.monotonic()
            s.sendall(payload)
            got = b""
            while len(got) < size:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
            times.append((time.monotonic() - start) * 1000)
            if got != payload:
                print(f"echo differs: sent {size} bytes, got {len(got)}", file=sys.stderr)
                return 1
    print(f"{statistics.median(times):.3f}")
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    elif sys.argv[1] == "send":
        send(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(rtt(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
