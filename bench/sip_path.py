"""The SIP thread's CPU per authenticated REGISTER, in process and without sockets; not a test.

REGISTER -> 401, REGISTER with digest -> commit -> 200, through the real `SipEndpoint` (top-Via fix-up,
transaction layer, drain), `SipNode` (dispatch, digest, ProposalBatcher) and `Registrar` (decision, 200
with the bindings). Datagrams are fed to the endpoint as the UDP transport would; what it sends goes to a
fake socket. The replicator applies each entry inline to the real `StateMachine` (its CPU is measured apart
and subtracted from the printed figure; Raft itself is bench/replication.py's). Messages have SIPp's
reg_auth.xml shape (bench/sipp/) and are built before the timed part, nonce included.

    python bench/sip_path.py [--n 3000] [--rounds 5] [--gc on|off|freeze|node|tN] [--dry] [--apply-thread]

Prints CPU time per REGISTER for each round (process CPU, so a loaded machine still inflates it) and the
minimum. For a load-independent figure count instructions and take the difference of two round counts:

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/sip_path.py --n 400 --rounds 1
    valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/sip_path.py --n 400 --rounds 3
    # ("Collected" of the second - the first) / (2 * 400) = instructions per REGISTER

That figure includes what each round does besides the SIP path: building the round's 2n messages (with
their digests) and one full `gc.collect()` before the clock starts. `--dry` does only that (the same
rounds, nothing fed to the endpoint); subtracting its round difference gives the SIP path alone:

    (full(3) - full(1) - (dry(3) - dry(1))) / (2 * 400)

In a node the entry is applied on the Raft thread, not on the SIP thread. `--apply-thread` does that here
(a thread of its own applies each entry and hands the outcome back with call_soon_threadsafe, as
raftpbx/replication.py does); callgrind with `--separate-threads=yes` then counts each thread apart, and the
main thread's round difference is the SIP thread alone (what the event loop does per REGISTER, including
the wake-ups the handoff costs it, without the apply):

    valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file=/tmp/sp.%p \
        python bench/sip_path.py --n 400 --rounds 1 --apply-thread      # and --rounds 3
    # ("summary:" of /tmp/sp.<pid>-01 for rounds 3 - the same for rounds 1) / (2 * 400), minus the
    # --dry figure above (the bench's own message building runs on the main thread too)

`--gc node` runs the cyclic GC as a node does (`raftpbx.node._tune_gc`: collect, freeze the start-up heap,
thresholds 20,000/50/50); the default keeps CPython's (700/10/10), as the figures below were taken.

Measured 2026-11-26 (Debian python 3.11, callgrind): 1.82M instructions per REGISTER before the session-4
SIP-path changes, 1.63M after (same tree otherwise); the cyclic GC is about 6% of it.

Measured 2026-11-27 (pyenv python 3.11.7, callgrind, --apply-thread, --dry subtracted: the SIP thread alone),
per REGISTER: 1.163M pure Python; 1.003M with the parser compiled (setup.py, session 7's start); 0.951M with
digest, transaction and stream compiled too; 0.905M with the transport glue (udp, endpoint...); 0.834M with
the node's SIP path (sipnode, registrar, proxy, calls). What stays interpreted there is mostly state/
(decide_register, encode_batch) and asyncio.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import hashlib
import queue
import tempfile
import threading
import time
import uuid
from typing import Any

from raftpbx.state import Command, decide_create_extension, encode_batch
from raftpbx.transport.counters import TransportCounters
from raftpbx.transport.flow import Flow
from raftpbx.transport.sip.digest import make_nonce
from raftpbx.transport.udp import UdpTransport

from raftpbx.config import HostPort, load_config
from raftpbx.registrar import Registrar
from raftpbx.service import StateMachine
from raftpbx.sipnode import SipNode

REALM = "bench.local"
SERVER = ("127.0.0.1", 5060)
CLIENT = ("127.0.0.61", 5061)


class FakeReplicator:
    def __init__(self, machine: StateMachine) -> None:
        self.machine = machine
        self.apply_cpu = 0.0

    async def propose(self, payload: bytes, timeout: float) -> object:  # noqa: ASYNC109 (the contract)
        t0 = time.thread_time()
        with self.machine.lock:
            outcomes = self.machine.apply(payload, self.machine.state.applied_index + 1)
        self.apply_cpu += time.thread_time() - t0
        await asyncio.sleep(0)  # a commit is never synchronous
        return outcomes

    def status(self) -> Any:
        return type("S", (), {"role": "leader"})()

    def on_leader_change(self, cb: Any) -> None:
        pass


class ThreadReplicator(FakeReplicator):
    """`--apply-thread`: entries are applied on a thread of their own, as pysyncobj's Raft thread applies them
    in a node, and the outcome comes back to the loop through call_soon_threadsafe (replication.py does the
    same). Under callgrind with --separate-threads=yes the main thread's count is then the SIP thread alone."""

    def __init__(self, machine: StateMachine) -> None:
        super().__init__(machine)
        self._queue: queue.SimpleQueue[tuple[bytes, asyncio.Future[object]] | None] = queue.SimpleQueue()
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="apply", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            payload, future = item
            t0 = time.thread_time()
            with self.machine.lock:
                outcomes = self.machine.apply(payload, self.machine.state.applied_index + 1)
            self.apply_cpu += time.thread_time() - t0  # read by the loop after the result: ordered
            self._loop.call_soon_threadsafe(future.set_result, outcomes)

    async def propose(self, payload: bytes, timeout: float) -> object:  # noqa: ASYNC109 (the contract)
        future: asyncio.Future[object] = self._loop.create_future()
        self._queue.put((payload, future))
        return await future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


class FakeDatagramTransport(asyncio.DatagramTransport):
    """What the loop's UDP transport would be under the real `UdpTransport`: it keeps what is sent instead of
    calling sendto. (The endpoint's `udp` must be a real `UdpTransport`: compiled with mypyc, the endpoint
    checks its attributes' declared types, so a duck-typed stand-in for the whole UdpTransport is refused.)"""

    def __init__(self, protocol: UdpTransport) -> None:
        super().__init__()
        self.protocol = protocol
        self.sent: list[bytes] = []
        self.closing = False

    def sendto(self, data: Any, addr: Any = None) -> None:
        self.sent.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.protocol.connection_lost(None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return SERVER if name == "sockname" else default


def fake_udp(handler: Any) -> tuple[UdpTransport, FakeDatagramTransport]:
    """A real `UdpTransport` bound to nothing (no socket: `send` hands the datagram to the transport) whose
    loop transport keeps the datagrams; `read_pending` (a late timer reads the socket first) reads nothing."""
    udp = UdpTransport(handler, TransportCounters())
    transport = FakeDatagramTransport(udp)
    udp.connection_made(transport)
    return udp, transport


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def register(user: str, password: str, i: int, cseq: int, nonce: str | None, branch: str) -> bytes:
    ruri = f"sip:{SERVER[0]}:{SERVER[1]}"
    lines = [
        f"REGISTER {ruri} SIP/2.0",
        f"Via: SIP/2.0/UDP {CLIENT[0]}:{CLIENT[1]};rport;branch={branch}",
        "Max-Forwards: 70",
        f"From: <sip:{user}@{SERVER[0]}>;tag=4242R{i}",
        f"To: <sip:{user}@{SERVER[0]}>",
        f"Call-ID: {i}-4242@{CLIENT[0]}",
        f"CSeq: {cseq} REGISTER",
        f"Contact: <sip:{user}@{CLIENT[0]}:{CLIENT[1]};transport=UDP>",
    ]
    if nonce is not None:
        ha1 = md5(f"{user}:{REALM}:{password}")
        ha2 = md5(f"REGISTER:{ruri}")
        cnonce, nc = "6b8b4567", "00000001"
        resp = md5(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}")
        lines.append(
            f'Authorization: Digest username="{user}",realm="{REALM}",cnonce="{cnonce}",nc={nc},'
            f'qop=auth,uri="{ruri}",nonce="{nonce}",response="{resp}",algorithm=MD5'
        )
    lines += ["Expires: 3600", "User-Agent: sipp-bench", "Content-Length: 0"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def main(args: argparse.Namespace) -> None:
    cfg = load_config(
        None,
        overrides={
            "node.id": "n1",
            "node.data_dir": tempfile.mkdtemp(prefix="sip-path-"),
            "cluster.domain": REALM,
            "cluster.secret": "s" * 32,
            "admin.token": "t" * 20,
            "sip.listen": "127.0.0.1:5060",
            "sip.digest_algorithms": "MD5",
            "sip.transports": "udp",
            # Under valgrind on a loaded host a round crawls: a queued proposal must not time out (a 500
            # instead of the 200 fails the round's check); the bench counts work, not deadlines.
            "raft.proposal_timeout": "60",
        },
    )
    cfg = dataclasses.replace(cfg, sip=dataclasses.replace(cfg.sip, listen=HostPort("127.0.0.1", 0)))
    machine = StateMachine()
    users = [(str(100000 + k), f"pw{k:06d}") for k in range(args.n)]
    for user, password in users:
        events = decide_create_extension(machine.state, user, password, None, REALM, 1.0)
        with machine.lock:
            machine.apply(
                encode_batch([Command(uuid.uuid4().hex, e) for e in events]), machine.state.applied_index + 1
            )
    replicator = ThreadReplicator(machine) if args.apply_thread else FakeReplicator(machine)
    node = SipNode(cfg, machine, replicator)
    registrar = Registrar(node)
    endpoint = node.endpoint
    endpoint._loop = asyncio.get_running_loop()
    endpoint.udp, udp = fake_udp(endpoint._on_datagram)
    endpoint._primary = SERVER
    flow = Flow("udp", CLIENT, SERVER)
    if args.gc == "off":
        gc.disable()
    elif args.gc == "freeze":
        gc.collect()
        gc.freeze()
    elif args.gc == "node":
        from raftpbx.node import GC_THRESHOLDS

        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
    elif args.gc.startswith("t"):
        gc.set_threshold(int(args.gc[1:]), 10, 10)
    results = []
    serial = 0
    for rnd in range(args.rounds):
        nonce = make_nonce(node.nonce_key, REALM, time.time())
        firsts, auths = [], []
        for user, password in users:
            serial += 1
            firsts.append(register(user, password, serial, 1, None, f"z9hG4bK-{serial}-1"))
            auths.append(register(user, password, serial, 2, nonce, f"z9hG4bK-{serial}-2"))
        udp.sent.clear()
        if args.gc != "off":
            gc.collect()
        if args.dry:
            print(f"round {rnd}: dry (messages built, nothing fed)", flush=True)
            continue
        a0 = replicator.apply_cpu
        c0 = time.process_time()
        batch = args.batch
        for start in range(0, len(users), batch):
            for data in firsts[start : start + batch]:
                endpoint._on_datagram(data, flow)
            for data in auths[start : start + batch]:
                endpoint._on_datagram(data, flow)
            for _ in range(20):
                await asyncio.sleep(0)
                if len(udp.sent) >= 2 * min(len(users), start + batch):
                    break
        while len(udp.sent) < 2 * len(users):  # noqa: ASYNC110 - let the commit continuations run, no waiting
            await asyncio.sleep(0)
        cpu = time.process_time() - c0 - (replicator.apply_cpu - a0)
        oks = sum(1 for d in udp.sent if d.startswith(b"SIP/2.0 200"))
        chal = sum(1 for d in udp.sent if d.startswith(b"SIP/2.0 401"))
        assert oks == len(users) and chal == len(users), (oks, chal, udp.sent[-1][:200])
        results.append(cpu / len(users) * 1e6)
        print(f"round {rnd}: {results[-1]:.1f} us per REGISTER (SIP thread, apply excluded)", flush=True)
    if results:
        print(f"min {min(results):.1f} median {sorted(results)[len(results) // 2]:.1f} us per REGISTER")
    await registrar.aclose()
    node._closing = True
    if isinstance(replicator, ThreadReplicator):
        replicator.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument(
        "--gc", default="on", help="on (default), off, freeze, node (as a node tunes it), tN: gen0 N"
    )
    p.add_argument("--dry", action="store_true", help="build each round's messages only (see the docstring)")
    p.add_argument(
        "--apply-thread", action="store_true", help="apply entries on a thread of their own (see the docstring)"
    )
    import uvloop

    uvloop.run(main(p.parse_args()))
