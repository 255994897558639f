"""What one call costs one node, in process (a benchmark, not a test): counts and CPU per call.

    .venv/bin/python bench/call_path.py [--calls 300] [--warm 30] [--profile]
    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        /tmp/dv/bin/python bench/call_path.py --calls 60 --warm 5   # and --calls 10: the difference / 50

One node: the real `SipNode`, `Proxy`, `StateMachine` and call-record projection (`CdrStore` on a temporary
SQLite file), over a one-node replicator that applies each proposal `--commit-ms` (2) after it is made (no
Raft, no followers: what a commit costs on three nodes is `bench/replication.py`'s figure; the delay puts
the callee's answers inside the CallStarted commit, as in the cluster). The caller and the callee are raw UDP
user agents that send and read bytes (templates and two regexes; no SIP parser), so nearly all the CPU
measured is the node's. Each call is bench/sipp/uac_call_auth.xml against bench/sipp/uas.xml, in the cluster
benchmark's order: INVITE -> 407 -> ACK; INVITE with Proxy-Authorization -> 100, 180, 200 (with SDP) ->
ACK -> BYE -> 200. One node serves it all (in the cluster the ACK and the BYE go to the leader through the
service address: the same work on another node).

Printed per call: datagrams in and out, SIP transactions created (server and client), timers armed
(`loop.call_at`) and cancelled, tasks created, proposals and commands, call-record rows written, and the
process CPU per call (both user agents included; they are a small share). `--profile` adds a cProfile of
the timed loop (the functions with the most own time and the node's entry points, inclusive).

Everything binds loopback addresses only; the temporary folder is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import gc
import hashlib
import io
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from raftpbx.state import (
    Command,
    ContactSpec,
    RegisterAccepted,
    decide_create_extension,
    decide_register,
    encode_batch,
)
from raftpbx.transport.sip import transaction

from raftpbx.calls import CallSettings
from raftpbx.cdr import DB_NAME, CdrProjector, CdrStore
from raftpbx.config import HostPort, load_config
from raftpbx.proxy import Proxy
from raftpbx.service import StateMachine
from raftpbx.sipnode import SipNode

DOMAIN = "bench.call.local"
PASSWORD = "bench-Secret-9"
NET = "127.0.77"
SDP = ("v=0\r\no=u 53655765 2353687637 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
       "m=audio 6000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
       "a=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n")
_STATUS = re.compile(rb"^SIP/2\.0 (\d{3})")
_HEADER = re.compile(rb"^(Via|From|To|Call-ID|CSeq|Record-Route|Proxy-Authenticate|Contact): (.*?)\r$", re.M)
_NONCE = re.compile(r'nonce="([^"]+)"')


class LocalReplicator:
    """One node: a proposal is applied by the real state machine `delay` seconds after it is made (a Raft
    commit's latency without its CPU: the callee's 180 and 200 arrive while CallStarted is in flight, as
    in the cluster, where a commit takes milliseconds and a loopback callee answers in well under one)."""

    def __init__(self, machine: StateMachine, delay: float) -> None:
        self.machine = machine
        self.delay = delay
        self.index = 0
        self.proposals = 0
        self.commands = 0

    async def propose(self, payload: bytes, timeout: float) -> object:  # noqa: ASYNC109
        if self.delay > 0:
            await asyncio.sleep(self.delay)  # the commit's latency (a stand-in for Raft's round trip)
        with self.machine.lock:
            self.index = max(self.index, self.machine.state.applied_index) + 1
        self.proposals += 1
        return self.machine.apply(payload, self.index)

    def status(self) -> Any:
        return type("Status", (), {"role": "leader", "leader": "n1", "caught_up": True})()

    def on_leader_change(self, callback: Any) -> None:
        del callback


class RawUA(asyncio.DatagramProtocol):
    """A user agent on one UDP socket that reads only the first line and a few header fields."""

    def __init__(self) -> None:
        self.inbox: collections.deque[tuple[bytes, dict[bytes, list[bytes]]]] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.address = ("", 0)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        head = data.split(b"\r\n\r\n", 1)[0] + b"\r\n"
        fields: dict[bytes, list[bytes]] = {}
        for name, value in _HEADER.findall(head):
            fields.setdefault(name, []).append(value)
        self.inbox.append((data.split(b"\r\n", 1)[0], fields))
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def next(self, want: bytes) -> dict[bytes, list[bytes]]:
        """The next message whose first line contains `want` (others are skipped); the caller bounds the
        wait (one deadline per call, so the user agents arm no timer of their own per message)."""
        while True:
            while self.inbox:
                line, fields = self.inbox.popleft()
                if want in line:
                    return fields
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter

    def send(self, text: str, to: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(text.encode(), to)


async def open_ua(ip: str) -> RawUA:
    transport, ua = await asyncio.get_running_loop().create_datagram_endpoint(RawUA, local_addr=(ip, 0))
    ua.transport = transport
    ua.address = transport.get_extra_info("sockname")[:2]
    return ua


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


class Bench:
    def __init__(self, tmp: Path, commit_delay: float) -> None:
        overrides = {
            "node.id": "n1", "node.data_dir": str(tmp / "n1"), "cluster.secret": "s" * 32,
            "admin.token": "t" * 32, "cluster.domain": DOMAIN, "sip.listen": f"{NET}.1:5060",
            "sip.digest_algorithms": "MD5",
        }
        cfg = load_config(None, overrides=overrides)
        cfg = dataclasses.replace(cfg, sip=dataclasses.replace(cfg.sip, listen=HostPort(f"{NET}.1", 0)))
        self.machine = StateMachine()
        self.store = CdrStore(tmp / DB_NAME)
        CdrProjector(self.store).attach(self.machine)
        self.replicator = LocalReplicator(self.machine, commit_delay)
        self.node = SipNode(cfg, self.machine, self.replicator)
        self.proxy = Proxy(self.node, self.replicator, settings=CallSettings(
            timer_c=180.0, max_duration=3600.0, ring_timeout=600.0, interval=1.0))
        self.number = 0

    def apply(self, op_id: str, events: Any) -> None:
        self.replicator.index += 1
        self.machine.apply(encode_batch([Command(f"{op_id}.{i}", e) for i, e in enumerate(events)]),
                           self.replicator.index)

    async def start(self) -> None:
        await self.node.start()
        self.proxy.start()
        address = self.node.endpoint.udp_address
        assert address is not None
        self.address = (address[0], address[1])
        self.caller, self.callee = await open_ua(f"{NET}.2"), await open_ua(f"{NET}.3")
        now = self.node.now()
        for ext in ("1001", "1002"):
            with self.machine.lock:
                events = decide_create_extension(self.machine.state, ext, PASSWORD, None, DOMAIN, now)
            self.apply(f"ext-{ext}", events)
        contact = f"sip:1002@{self.callee.address[0]}:{self.callee.address[1]}"
        with self.machine.lock:
            decision = decide_register(
                self.machine.state, aor="1002", contacts=[ContactSpec(contact, contact)], star=False,
                expires_header=3600, call_id=uuid.uuid4().hex, cseq=1,
                received=f"{self.callee.address[0]}:{self.callee.address[1]}", transport="udp", node_id="n1",
                now=now, min_expires=1, max_expires=3600, default_expires=3600, max_contacts=10)
        assert isinstance(decision, RegisterAccepted)
        self.apply(decision.op_id, decision.events)

    async def close(self) -> None:
        for ua in (self.caller, self.callee):
            if ua.transport is not None:
                ua.transport.close()
        await self.proxy.aclose()
        await self.node.aclose()
        self.store.close()

    def _caller_request(self, method: str, uri: str, cseq: int, branch: str, tag: str, call_id: str,
                        to: str, extra: list[str], body: str = "") -> None:
        ip, port = self.caller.address
        lines = [f"{method} {uri} SIP/2.0", f"Via: SIP/2.0/UDP {ip}:{port};rport;branch={branch}",
                 "Max-Forwards: 70", *extra, f"From: <sip:1001@{self.address[0]}>;tag={tag}", f"To: {to}",
                 f"Call-ID: {call_id}", f"CSeq: {cseq} {method}"]
        if method in ("INVITE", "BYE") or (method == "ACK" and cseq == 2):
            lines.append(f"Contact: <sip:1001@{ip}:{port};transport=udp>")
        if body:
            lines += ["User-Agent: sipp-bench", "Content-Type: application/sdp"]
        lines += [f"Content-Length: {len(body)}", "", body]
        self.caller.send("\r\n".join(lines), self.address)

    async def call(self, within: float) -> None:
        async with asyncio.timeout(within):  # a hang guard only (under callgrind a call takes ~1 s)
            await self._call()

    async def _call(self) -> None:
        self.number += 1
        n = self.number
        call_id, tag = f"{n}-bench@{self.caller.address[0]}", f"{n}A"
        uri = f"sip:1002@{self.address[0]}:{self.address[1]}"
        to = f"<sip:1002@{self.address[0]}>"
        body = SDP.format(ip=self.caller.address[0])
        b1 = f"z9hG4bK-{n}-1"
        self._caller_request("INVITE", uri, 1, b1, tag, call_id, to, [], body)
        challenge = await self.caller.next(b"407")
        to_407 = challenge[b"To"][0].decode()
        self._caller_request("ACK", uri, 1, b1, tag, call_id, to_407, [])
        nonce_match = _NONCE.search(challenge[b"Proxy-Authenticate"][0].decode())
        assert nonce_match is not None
        nonce = nonce_match.group(1)
        ha1 = _md5(f"1001:{DOMAIN}:{PASSWORD}")
        response = _md5(f"{ha1}:{nonce}:{_md5(f'INVITE:{uri}')}")
        auth = (f'Proxy-Authorization: Digest username="1001",realm="{DOMAIN}",nonce="{nonce}",uri="{uri}",'
                f'response="{response}",algorithm=MD5')
        self._caller_request("INVITE", uri, 2, f"z9hG4bK-{n}-2", tag, call_id, to, [auth], body)
        # The callee (uas.xml): 180 then 200 with SDP at once, Record-Route copied.
        invite = await self.callee.next(b"INVITE")
        common = [f"Via: {v.decode()}" for v in invite[b"Via"]]
        common += [f"From: {invite[b'From'][0].decode()}", f"To: {invite[b'To'][0].decode()};tag={n}U",
                   f"Call-ID: {invite[b'Call-ID'][0].decode()}", f"CSeq: {invite[b'CSeq'][0].decode()}"]
        common += [f"Record-Route: {v.decode()}" for v in invite.get(b"Record-Route", [])]
        cip, cport = self.callee.address
        contact = f"Contact: <sip:{cip}:{cport};transport=udp>"
        top = invite[b"Via"][0].decode()
        via_host = top.split(" ", 1)[1].split(";", 1)[0]
        back = (via_host.rsplit(":", 1)[0], int(via_host.rsplit(":", 1)[1]))
        self.callee.send("\r\n".join(["SIP/2.0 180 Ringing", *common, contact, "Content-Length: 0", "", ""]), back)
        answer = SDP.format(ip=cip)
        self.callee.send("\r\n".join(["SIP/2.0 200 OK", *common, contact, "Content-Type: application/sdp",
                                      f"Content-Length: {len(answer)}", "", answer]), back)
        ok = await self.caller.next(b"200")
        routes = [f"Route: {v.decode()}" for v in reversed(ok.get(b"Record-Route", []))]
        to_ok = ok[b"To"][0].decode()
        target = ok[b"Contact"][0].decode().strip("<>")
        self._caller_request("ACK", target, 2, f"z9hG4bK-{n}-3", tag, call_id, to_ok, routes)
        await self.callee.next(b"ACK")
        self._caller_request("BYE", target, 3, f"z9hG4bK-{n}-4", tag, call_id, to_ok, routes)
        bye = await self.callee.next(b"BYE")
        lines = ["SIP/2.0 200 OK", *[f"Via: {v.decode()}" for v in bye[b"Via"]],
                 f"From: {bye[b'From'][0].decode()}", f"To: {bye[b'To'][0].decode()}",
                 f"Call-ID: {bye[b'Call-ID'][0].decode()}", f"CSeq: {bye[b'CSeq'][0].decode()}",
                 "Content-Length: 0", "", ""]
        via_host = bye[b"Via"][0].decode().split(" ", 1)[1].split(";", 1)[0]
        self.callee.send("\r\n".join(lines), (via_host.rsplit(":", 1)[0], int(via_host.rsplit(":", 1)[1])))
        await self.caller.next(b"200 OK")


class Counts:
    """Counters of the loop's timers and tasks and of the transactions created (patched in for the run)."""

    def __init__(self) -> None:
        self.c: collections.Counter[str] = collections.Counter()

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        counter = self.c
        call_at, create_task = loop.call_at, loop.create_task

        def counted_call_at(when: float, callback: Any, *args: Any, **kw: Any) -> asyncio.TimerHandle:
            counter["timers armed"] += 1
            return call_at(when, callback, *args, **kw)

        def counted_create_task(coro: Any, **kw: Any) -> asyncio.Task[Any]:
            counter["tasks created"] += 1
            return create_task(coro, **kw)

        loop.call_at = counted_call_at  # type: ignore[method-assign]
        loop.create_task = counted_create_task  # type: ignore[method-assign]
        if not str(transaction.__file__).endswith(".py"):
            # Compiled (setup.py): compiled code constructs transactions without looking up a patched
            # __init__, so they cannot be counted this way; say so rather than print zeros.
            print("transactions not counted: raftpbx.transport.sip.transaction is compiled")
            return
        for cls, name in ((transaction.ServerTransaction, "server transactions"),
                          (transaction.ClientTransaction, "client transactions")):
            init = cls.__init__

            def counted_init(self: Any, *args: Any, __init: Any = init, __name: str = name, **kw: Any) -> None:
                counter[__name] += 1
                __init(self, *args, **kw)

            cls.__init__ = counted_init  # type: ignore[method-assign]


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="raftpbx-callpath-") as tmp:
        bench = Bench(Path(tmp), args.commit_ms / 1000)
        await bench.start()
        try:
            for _ in range(args.warm):
                await bench.call(args.call_timeout)
            bench.store.flush()
            counts = Counts()
            if args.count:
                counts.install(asyncio.get_running_loop())
            sip = bench.node.endpoint.counters
            before = (sip.datagrams_received, sip.datagrams_sent, bench.replicator.proposals,
                      bench.store.rows_written, bench.store.transactions)
            with bench.machine.lock:
                applied0 = bench.machine.state.applied_index
            gc.collect()
            profiler = _profiler() if args.profile else None
            c0, w0 = time.process_time(), time.perf_counter()
            if profiler is not None:
                profiler.enable()
            for _ in range(args.calls):
                await bench.call(args.call_timeout)
            if profiler is not None:
                profiler.disable()
            c1, w1 = time.process_time(), time.perf_counter()
            bench.store.flush()
            n = args.calls
            after = (sip.datagrams_received, sip.datagrams_sent, bench.replicator.proposals,
                     bench.store.rows_written, bench.store.transactions)
            with bench.machine.lock:
                applied = bench.machine.state.applied_index - applied0
            names = ("datagrams in", "datagrams out", "proposals (log entries)", "CDR rows written",
                     "CDR transactions")
            print(f"{sys.executable}: {n} calls, {1e6 * (c1 - c0) / n:.0f} us CPU/call (process), "
                  f"{1e3 * (w1 - w0) / n:.2f} ms wall/call")
            for name, b, a in zip(names, before, after, strict=True):
                print(f"  {name:28s} {(a - b) / n:6.2f}")
            print(f"  {'entries applied':28s} {applied / n:6.2f}")
            for name, value in sorted(counts.c.items()):
                print(f"  {name:28s} {value / n:6.2f}")
            if profiler is not None:
                import pstats

                out = io.StringIO()
                stats = pstats.Stats(profiler, stream=out)
                stats.sort_stats("tottime").print_stats(35)
                stats.sort_stats("cumulative").print_stats(r"proxy|calls|sipnode|endpoint|transaction|cdr", 45)
                print(out.getvalue())
        finally:
            await bench.close()


def _profiler() -> Any:
    """A cProfile profiler (bench/profile.py would shadow the standard library's `profile`, which cProfile
    imports, while this folder is first on sys.path)."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    import cProfile

    return cProfile.Profile()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--warm", type=int, default=30)
    parser.add_argument("--profile", action="store_true", help="cProfile the timed calls")
    parser.add_argument("--call-timeout", type=float, default=120.0, help="seconds before a call counts as hung")
    parser.add_argument("--commit-ms", type=float, default=2.0,
                        help="latency of a commit in the one-node stand-in (0: at once)")
    parser.add_argument("--no-count", dest="count", action="store_false",
                        help="no counting patches (for callgrind: measure the code alone)")
    asyncio.run(run(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
