"""A user-space stand-in for tc netem on kernels built without sch_netem (used by lab.sh).

Theory of operation: lab.sh takes the host's switch port hI off the bridge and adds a veth pair qI/rI
whose rI end joins the bridge. This relay, running in the switch namespace, reads every frame on the two
ends with AF_PACKET sockets and forwards it to the other end:

- hI -> qI (frames the host SENDS): lost with probability `loss`, sent at once with probability
  `reorder` (netem's meaning: those overtake the delayed ones), else held for `delay` +- `jitter`
  (uniform) and sent when due, in due order (a FIFO for equal times);
- qI -> hI (frames TO the host): forwarded at once. Like netem on the host's egress, only what the host
  sends is disturbed.

Invariants: our own transmissions (PACKET_OUTGOING) are never read back as input; the virtio-net header
(PACKET_VNET_HDR) is passed through untouched, so checksum offload and GSO survive the trip; the relay
never originates a frame; a send that fails (buffer full) drops that frame, as a congested link would.
"""

from __future__ import annotations

import argparse
import heapq
import os
import random
import select
import signal
import socket
import sys
import time
from pathlib import Path

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_VNET_HDR = 15
PACKET_OUTGOING = 4
MAX_FRAME = 65536 + 64


class NetemSpec:
    """The subset of netem's arguments the relay implements: delay, loss, reorder, duplicate."""

    def __init__(self, delay: float = 0.0, jitter: float = 0.0, loss: float = 0.0, reorder: float = 0.0,
                 duplicate: float = 0.0) -> None:
        self.delay, self.jitter, self.loss, self.reorder, self.duplicate = delay, jitter, loss, reorder, duplicate


def _time(text: str) -> float:
    """netem time: 50ms, 1s, 200us or a bare number of microseconds (tc's default unit) -> seconds."""
    for suffix, scale in (("usec", 1e-6), ("msec", 1e-3), ("sec", 1.0), ("us", 1e-6), ("ms", 1e-3), ("s", 1.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text) * 1e-6


def _percent(text: str) -> float:
    value = float(text.rstrip("%"))
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"percentage out of range: {text}")
    return value / 100.0


def _is_number(text: str) -> bool:
    try:
        _time(text)
    except ValueError:
        return False
    return True


def parse_netem(args: list[str]) -> NetemSpec:
    """Parse `delay 50ms [5ms [25%]] loss [random] 5% [25%] reorder 25% [50%] duplicate 1%`."""
    spec = NetemSpec()
    i = 0
    while i < len(args):
        word = args[i]
        if word == "delay":
            spec.delay = _time(args[i + 1])
            i += 2
            if i < len(args) and _is_number(args[i].rstrip("%")) and not args[i].endswith("%"):
                spec.jitter = _time(args[i])
                i += 1
            if i < len(args) and args[i].endswith("%"):
                i += 1  # correlation: accepted, not modelled
        elif word in ("loss", "reorder", "duplicate"):
            i += 1
            if word == "loss" and i < len(args) and args[i] == "random":
                i += 1
            setattr(spec, word, _percent(args[i]))
            i += 1
            if i < len(args) and args[i].endswith("%"):
                i += 1  # correlation: accepted, not modelled
        else:
            raise ValueError(f"unsupported netem argument {word!r} (the relay knows delay, loss, reorder, duplicate)")
    return spec


def _open(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.bind((ifname, 0))
    index = socket.if_nametoindex(ifname)
    mreq = index.to_bytes(4, sys.byteorder) + PACKET_MR_PROMISC.to_bytes(2, sys.byteorder) + bytes(10)
    sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
    sock.setblocking(False)
    return sock


def _send(sock: socket.socket, frame: bytes) -> None:
    try:
        sock.send(frame)
    except OSError:
        pass  # ENOBUFS and the like: the frame is lost, as on a congested link


def relay(host_port: str, bridge_port: str, spec: NetemSpec, ready_file: str | None) -> None:
    host = _open(host_port)
    bridge = _open(bridge_port)
    if ready_file:
        Path(ready_file).write_text(f"{os.getpid()}\n")
    rng = random.Random()
    queue: list[tuple[float, int, bytes]] = []
    seq = 0
    while True:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _send(bridge, heapq.heappop(queue)[2])
        timeout = max(0.0, queue[0][0] - now) if queue else 1.0
        readable, _, _ = select.select([host, bridge], [], [], timeout)
        for sock in readable:
            for _ in range(64):  # drain a burst, bounded
                try:
                    frame, addr = sock.recvfrom(MAX_FRAME)
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING:
                    continue
                if sock is bridge:
                    _send(host, frame)
                    continue
                if spec.loss and rng.random() < spec.loss:
                    continue
                copies = 2 if spec.duplicate and rng.random() < spec.duplicate else 1
                for _ in range(copies):
                    if spec.reorder and rng.random() < spec.reorder:
                        _send(bridge, frame)
                        continue
                    hold = spec.delay + (rng.uniform(-spec.jitter, spec.jitter) if spec.jitter else 0.0)
                    seq += 1
                    heapq.heappush(queue, (time.monotonic() + max(0.0, hold), seq, frame))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="user-space netem between two interfaces")
    parser.add_argument("--host-port", required=True)
    parser.add_argument("--bridge-port", required=True)
    parser.add_argument("--ready-file")
    parser.add_argument("netem", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    args = [a for a in ns.netem if a != "--"]
    try:
        spec = parse_netem(args)
    except (ValueError, IndexError) as exc:
        print(f"netem_relay: bad netem arguments {' '.join(args)!r}: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        relay(ns.host_port, ns.bridge_port, spec, ns.ready_file)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
