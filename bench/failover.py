"""Failover benchmark (issue 5): kill -9 the leader again and again under REGISTER and call load.

    .venv/bin/python bench/failover.py [--kills 20] [--reg-rate 50] [--held 4] [--json FILE]

A real 3-node cluster on loopback (tests/integration/nodecluster.py's `Cluster`, real `raftpbx node`
processes) with a service address in loopback mode (the leader binds 127.x.y.10:5060). Load, all of it
through the service address:
- SIPp (bench/sipp/reg_auth.xml: REGISTER, 401, REGISTER with digest, 200) at `--reg-rate` per second,
  cycling over `--users` extensions, for the whole run;
- a REGISTER prober (this process, one thread): one digest registration after another, every
  `--probe-interval` s, each request retransmitted every 20 ms until answered (an impatient phone), so the
  first successful REGISTER after a kill is timed to ~20 ms;
- `--held` established calls between two pjsua2 phone processes (chaos/phone.py), held for the whole run
  (media phone to phone); at the end each is hung up by the caller, whose BYE must get 200;
- per kill, two new calls between two other phones: one placed at the moment of the kill, one as soon as
  the prober has succeeded again (the phones retransmit their INVITE as RFC 3261 says: 0.5 s, 1 s, 2 s...).

Per kill: the holder of the service address (the leader) is killed with SIGKILL; measured are the time from
the kill to the end of the first successful REGISTER of the prober (kill -> first success through the
service address), the new call attempts that failed (not established within 10 s), their setup time from
the kill, and whether every held call is still up with RTP flowing both ways. Then the killed node is
restarted, and the next kill waits until it has caught up. At the end: the held calls dropped (a leg that
disconnected before our BYE, a BYE without 200, or RTP that stopped), the SIPp totals, p50/p99/max of the
recovery time. Targets (issue 5): p50 < 0.5 s, p99 < 1.5 s, 0 dropped established calls.

Prints a table and writes JSON (`--json`, default bench/results/failover-<time>.json). Loopback only; every
process started here is stopped at the end, the temporary folder removed. Pacing of the load generators is
the only waiting on time; everything else waits for a condition with a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))  # the integration harness: Cluster, Node
sys.path.insert(0, str(HERE))

from nodecluster import Cluster, Node, sip_up, wait_for  # noqa: E402
from pbx import SIPP, common_free_port, make_users, percentile, write_users_csv  # noqa: E402
from raftpbx.transport.sip.digest import challenges_for, compute_ha1, make_authorization  # noqa: E402
from raftpbx.transport.sip.message import Response, parse_message  # noqa: E402

from chaos.phone import PhoneProcess, poll_until  # noqa: E402

DOMAIN = "test.raftpbx.local"  # the harness's cluster domain
PASSWORD = "failover-Bench-5"
SETTINGS: dict[str, Any] = {"raft.proposal_timeout": 3.0, "sip.digest_algorithms": ["MD5"], "log.level": "info",
                            "log.format": "json"}
RETRANSMIT = 0.02  # s: the prober's retransmission interval
NEW_CALL_TIMEOUT = 10.0
TARGET_P50, TARGET_P99 = 0.5, 1.5


# --------------------------------------------------------------------------------------------- prober
@dataclass
class Attempt:
    start: float  # monotonic
    end: float
    status: int | None  # final status of the authenticated REGISTER (None: no answer in time)


class Prober:
    """Digest REGISTERs through the service address, one after another, in a thread (see module doc)."""

    def __init__(self, bind_ip: str, service: tuple[str, int], user: str, password: str, interval: float) -> None:
        self.service = service
        self.user = user
        self.password = password
        self.interval = interval
        self.attempts: list[Attempt] = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((bind_ip, 0))
        self.local = self.sock.getsockname()
        self.thread = threading.Thread(target=self._run, name="prober", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=10)
        self.sock.close()

    def _request(self, call_id: str, cseq: int, authorization: str | None) -> bytes:
        host, port = self.service
        me, my_port = self.local
        lines = [
            f"REGISTER sip:{host}:{port} SIP/2.0",
            f"Via: SIP/2.0/UDP {me}:{my_port};branch=z9hG4bK{secrets.token_hex(8)};rport",
            "Max-Forwards: 70", f"From: <sip:{self.user}@{DOMAIN}>;tag={call_id[:8]}",
            f"To: <sip:{self.user}@{DOMAIN}>", f"Call-ID: {call_id}", f"CSeq: {cseq} REGISTER",
            f"Contact: <sip:{self.user}@{me}:{my_port}>", "Expires: 600",
        ]
        if authorization:
            lines.append(f"Authorization: {authorization}")
        lines.append("Content-Length: 0")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def _exchange(self, data: bytes, call_id: str, cseq: int, deadline: float) -> Response | None:
        """Send `data`, retransmitted every RETRANSMIT s, until a final response to it or the deadline."""
        next_send = 0.0
        while not self.stop_event.is_set():
            now = time.monotonic()
            if now >= deadline:
                return None
            if now >= next_send:
                with contextlib.suppress(OSError):
                    self.sock.sendto(data, self.service)
                next_send = now + RETRANSMIT
            self.sock.settimeout(max(0.001, min(next_send, deadline) - now))
            try:
                raw = self.sock.recv(65535)
            except (TimeoutError, OSError):
                continue
            with contextlib.suppress(Exception):
                reply = parse_message(raw)
                if (isinstance(reply, Response) and reply.call_id == call_id and reply.cseq.seq == cseq
                        and reply.status >= 200):
                    return reply
        return None

    def _attempt(self) -> Attempt:
        start = time.monotonic()
        deadline = start + 5.0
        call_id = secrets.token_hex(12)
        challenge = self._exchange(self._request(call_id, 1, None), call_id, 1, deadline)
        status: int | None = None
        if challenge is not None and challenge.status == 401:
            chosen = challenges_for(challenge.headers.values("WWW-Authenticate"))[0]
            host, port = self.service
            ha1 = compute_ha1(self.user, chosen.realm, self.password, "MD5")
            authorization = make_authorization(username=self.user, ha1=ha1, challenge=chosen,
                                               method="REGISTER", uri=f"sip:{host}:{port}",
                                               cnonce=secrets.token_hex(4))
            final = self._exchange(self._request(call_id, 2, authorization), call_id, 2, deadline)
            status = final.status if final is not None else None
        elif challenge is not None:
            status = challenge.status
        return Attempt(start, time.monotonic(), status)

    def _run(self) -> None:
        while not self.stop_event.is_set():
            attempt = self._attempt()
            with self.lock:
                self.attempts.append(attempt)
            pause = attempt.start + self.interval - time.monotonic()
            if pause > 0:
                self.stop_event.wait(pause)  # pacing of the load generator

    def first_success_after(self, at: float) -> Attempt | None:
        """The first successful registration that ended after `at` + 10 ms: one that ends sooner was
        answered before `at` (no election completes in 10 ms: the election timeout is at least 150 ms)."""
        with self.lock:
            for attempt in self.attempts:
                if attempt.end > at + 0.010 and attempt.status == 200:
                    return attempt
        return None


# --------------------------------------------------------------------------------------------- SIPp
def start_sipp(service: tuple[str, int], local_ip: str, users_csv: Path, rate: float, folder: Path
               ) -> subprocess.Popen[bytes]:
    assert SIPP is not None, "sipp is not installed (Debian sip-tester)"
    used: set[int] = set()
    port, media, control = (common_free_port([local_ip], used) for _ in range(3))
    argv = [
        SIPP, f"{service[0]}:{service[1]}", "-sf", str(HERE / "sipp" / "reg_auth.xml"), "-inf", str(users_csv),
        "-t", "u1", "-i", local_ip, "-bind_local", "-p", str(port), "-mp", str(media),
        "-ci", local_ip, "-cp", str(control), "-r", f"{rate:g}", "-rp", "1000", "-l", str(max(200, int(rate * 6))),
        "-recv_timeout", "10000", "-max_recv_loops", "10000", "-nostdin",
        "-trace_stat", "-stf", str(folder / "stat.csv"), "-fd", "1",
        "-trace_err", "-error_file", str(folder / "errors.log"),
    ]  # fmt: skip
    out = open(folder / "stdout.log", "wb")  # noqa: SIM115 (closed with the process below)
    proc = subprocess.Popen(argv, cwd=folder, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    out.close()
    return proc


def stop_sipp(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGUSR1)  # SIPp: stop now, write the final statistics
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def sipp_totals(folder: Path) -> dict[str, int]:
    import csv

    with contextlib.suppress(OSError, IndexError):
        with open(folder / "stat.csv", newline="") as fh:
            rows = list(csv.reader(fh, delimiter=";"))
        last = dict(zip(rows[0], rows[-1], strict=False))
        return {"created": int(last.get("TotalCallCreated", 0) or 0),
                "successful": int(last.get("SuccessfulCall(C)", 0) or 0),
                "failed": int(last.get("FailedCall(C)", 0) or 0)}
    return {"created": 0, "successful": 0, "failed": 0}


# --------------------------------------------------------------------------------------------- phones
def register(phone: PhoneProcess, account: str, ext: str, service: tuple[str, int]) -> None:
    phone.transports(udp=True, tcp=False)
    mark = phone.mark()
    phone.account_add(account, f"sip:{ext}@{DOMAIN}", transport="udp", registrar=f"sip:{service[0]}:{service[1]}",
                      register=True, user=ext, password=PASSWORD, expires=300)
    state = phone.wait_event(lambda e: e["event"] == "reg_state" and e.get("account") == account, 15.0, since=mark)
    if state["code"] != 200:
        raise RuntimeError(f"registration of {ext} failed: {state}")


@dataclass
class Held:
    caller_call: str
    callee_call: str
    rx: int = 0  # caller's received RTP packets at the last check
    dropped: str | None = None  # why, if it was


def call_state(phone: PhoneProcess, call: str) -> str:
    return str(phone.call_info(call)["state"])


def place(a: PhoneProcess, to: str) -> tuple[str, int]:
    mark = a.mark()
    return a.call("a", to), mark


def outcome(a: PhoneProcess, call: str, since: int) -> dict[str, Any] | None:
    for event in a.iter_events(since):
        if event["event"] == "call_state" and event.get("call") == call and event["state"] in (
                "confirmed", "disconnected"):
            return event
    return None


# --------------------------------------------------------------------------------------------- run
@dataclass
class KillResult:
    kill: int
    victim: str
    recovery_s: float | None  # kill -> end of the first successful REGISTER through the service address
    new_calls: list[dict[str, Any]] = field(default_factory=list)
    held_up: int = 0
    held_dropped: int = 0
    restart_s: float | None = None
    elected_s: float | None = None  # kill -> a survivor logs that it became leader
    held_s: float | None = None  # kill -> a survivor logs that it acquired the service address


@contextlib.contextmanager
def cluster_at(root: Path) -> Iterator[Cluster]:
    root.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(root, 3, SETTINGS, service=True)
    try:
        cluster.start()
        for node in cluster.nodes:
            wait_for(lambda n=node: sip_up(n, DOMAIN), 20.0, f"SIP on {node.id}")
        cluster.service_holder(timeout=20.0)
        yield cluster
    finally:
        cluster.kill_all()


def create(cluster: Cluster, users: list[tuple[str, str]]) -> None:
    import concurrent.futures

    leader = cluster.wait_leader()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda u: leader.call("extension.create", extension=u[0], password=u[1]), users))
    for node in cluster.nodes:
        wait_for(lambda n=node: n.call("extension.get", extension=users[-1][0]), 20.0, f"extensions on {node.id}")


def milestones(nodes: list[Node], since: float) -> dict[str, float | None]:
    """From the survivors' logs: seconds from `since` (wall clock) to the first `raft.leader_changed` with
    is_leader true, and to the first `service_address.acquired`, logged after it."""
    import datetime

    found: dict[str, float | None] = {"elected_s": None, "held_s": None}
    for node in nodes:
        with contextlib.suppress(OSError):
            for line in node.log_path.read_text(errors="replace").splitlines()[-400:]:
                if '"raft.leader_changed"' not in line and '"service_address.acquired"' not in line:
                    continue
                with contextlib.suppress(ValueError, KeyError):
                    entry = json.loads(line)
                    at = datetime.datetime.fromisoformat(entry["ts"].replace("Z", "+00:00")).timestamp()
                    if at < since:
                        continue
                    key = "elected_s" if entry["event"] == "raft.leader_changed" else "held_s"
                    if key == "elected_s" and not entry.get("is_leader"):
                        continue
                    if found[key] is None or at - since < found[key]:  # type: ignore[operator]
                        found[key] = round(at - since, 3)
    return found


def holder(cluster: Cluster, timeout: float = 60.0) -> Node:
    """The one live node that says it holds the service address, once the address answers OPTIONS (admin
    calls get 5 s each: on a loaded machine a node may answer slowly)."""

    def one() -> Node | None:
        held = [n for n in cluster.live() if (n.call("node.info", timeout=5.0).get("service") or {}).get("held")]
        return held[0] if len(held) == 1 and cluster.service_up(timeout=0.5) else None

    return wait_for(one, timeout, "exactly one holder of the service address")  # type: ignore[no-any-return]


def caught_up(cluster: Cluster, node: Node, timeout: float = 30.0) -> None:
    leader = cluster.wait_leader(timeout=timeout, among=cluster.live())
    target = leader.call("state.digest", timeout=5.0)["applied_index"]
    wait_for(lambda: node.call("state.digest", timeout=5.0)["applied_index"] >= target, timeout, f"{node.id} caught up")


def check_held(held: list[Held], a: PhoneProcess, b: PhoneProcess, killed_at: float) -> None:
    """Every held call still confirmed on both legs, and the caller received RTP after the kill."""
    for h in held:
        if h.dropped:
            continue
        try:
            if call_state(a, h.caller_call) != "confirmed" or call_state(b, h.callee_call) != "confirmed":
                h.dropped = "disconnected"
                continue
            before = h.rx

            def flowing(h: Held = h, before: int = before) -> bool:
                ga, gb = a.rtp_gaps(h.caller_call), b.rtp_gaps(h.callee_call)
                h.rx = int(ga["rx"])
                return h.rx >= before + 25 and ga["current_gap_ms"] < 500 and gb["current_gap_ms"] < 500

            poll_until(flowing, timeout=5.0, what="RTP on a held call")
        except Exception as exc:
            h.dropped = f"{type(exc).__name__}: {exc}"
    del killed_at


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="raftpbx-failover-"))
    phones: list[PhoneProcess] = []
    sipp: subprocess.Popen[bytes] | None = None
    prober: Prober | None = None
    results: list[KillResult] = []
    try:
        with cluster_at(root / "cluster") as cluster:
            assert cluster.service_ip is not None
            service = (cluster.service_ip, 5060)
            prefix = cluster.service_ip.rsplit(".", 1)[0]
            users = make_users(args.users)
            phone_exts = [(str(9000 + i), PASSWORD) for i in range(4)]
            create(cluster, users + phone_exts + [("8999", PASSWORD)])
            print(f"cluster up, service address {service[0]}:{service[1]}, {len(users)} SIPp users", flush=True)

            a, b, c, d = (PhoneProcess(f"{prefix}.{40 + i}", log=root / f"phone{i}.log") for i in range(4))
            phones = [a, b, c, d]
            PhoneProcess.start_all(phones)
            for phone, account, (ext, _) in zip(phones, "abcd", phone_exts, strict=True):
                register(phone, "a" if account in "ac" else "b", ext, service)
            b.auto_answer("b", 200, delay=0.0)
            d.auto_answer("b", 200, delay=0.0)

            held: list[Held] = []
            for _ in range(args.held):
                mark_b = b.mark()
                call_a, mark = place(a, f"sip:{phone_exts[1][0]}@{service[0]}:{service[1]}")
                final = poll_until(lambda call_a=call_a, mark=mark: outcome(a, call_a, mark), 10.0, what="held call")
                if final["state"] != "confirmed":
                    raise RuntimeError(f"could not set up a held call: {final}")
                call_b = b.wait_incoming("b", timeout=5, since=mark_b)["call"]
                held.append(Held(call_a, call_b))
            print(f"{len(held)} calls held", flush=True)

            folder = root / "sipp"
            folder.mkdir()
            sipp = start_sipp(service, f"{prefix}.5", write_users_csv(root / "users.csv", users), args.reg_rate,
                              folder)
            prober = Prober(f"{prefix}.6", service, "8999", PASSWORD, args.probe_interval)
            prober.start()
            wait_for(lambda: prober is not None and prober.first_success_after(time.monotonic() - 1.0), 10.0,
                     "the prober's first registration")
            wait_for(lambda: sipp_totals(folder)["successful"] > 0 or sipp.poll() is not None, 20.0, "SIPp registering")
            if sipp.poll() is not None:
                raise RuntimeError(f"SIPp exited: {(folder / 'stdout.log').read_text(errors='replace')[-800:]}")

            for k in range(1, args.kills + 1):
                victim = holder(cluster)
                for h in held:
                    if not h.dropped:
                        h.rx = int(a.rtp_gaps(h.caller_call)["rx"])
                first_call, first_mark = place(c, f"sip:{phone_exts[3][0]}@{service[0]}:{service[1]}")
                killed_at = victim.kill()
                killed_wall = time.time() - (time.monotonic() - killed_at)
                result = KillResult(k, victim.id, None)
                try:
                    first = poll_until(lambda killed_at=killed_at: prober.first_success_after(killed_at), 10.0,
                                       interval=0.005, what="a successful REGISTER after the kill")
                    result.recovery_s = first.end - killed_at
                except Exception:
                    result.recovery_s = None
                second_call, second_mark = place(c, f"sip:{phone_exts[3][0]}@{service[0]}:{service[1]}")
                for call, mark in ((first_call, first_mark), (second_call, second_mark)):
                    try:
                        final = poll_until(lambda call=call, mark=mark: outcome(c, call, mark), NEW_CALL_TIMEOUT,
                                           what="the new call's outcome")
                        ok = final["state"] == "confirmed"
                        result.new_calls.append({"ok": ok, "code": final.get("code"),
                                                 "setup_from_kill_s": round(final["mono"] - killed_at, 3)})
                        if ok:
                            c.hangup(call)
                    except Exception as exc:
                        result.new_calls.append({"ok": False, "code": None, "error": str(exc)})
                        with contextlib.suppress(Exception):
                            c.hangup(call)
                marks = milestones(cluster.live(), killed_wall)
                result.elected_s, result.held_s = marks["elected_s"], marks["held_s"]
                check_held(held, a, b, killed_at)
                result.held_up = sum(1 for h in held if not h.dropped)
                result.held_dropped = sum(1 for h in held if h.dropped)
                # The new calls' legs are gone on both phones before the next round (4 legs per process).
                for phone in (c, d):
                    poll_until(lambda phone=phone: all(x["state"] == "disconnected"
                                                       for x in phone.request("calls")["calls"]), 15.0,
                               what="the new calls ended")
                restarted = time.monotonic()
                victim.start()
                wait_for(lambda victim=victim: sip_up(victim, DOMAIN), 30.0, f"{victim.id} back")
                caught_up(cluster, victim)
                result.restart_s = round(time.monotonic() - restarted, 2)
                results.append(result)
                calls = " ".join(f"{'ok' if n['ok'] else 'FAIL'}@{n.get('setup_from_kill_s', '-')}s"
                                 for n in result.new_calls)
                rec = "-" if result.recovery_s is None else f"{result.recovery_s:.3f}"
                print(f"kill {k:2d} {victim.id}: elected {result.elected_s} s, address held {result.held_s} s, "
                      f"first REGISTER {rec} s; new calls {calls}; held up "
                      f"{result.held_up}/{len(held)}; restart+catch-up {result.restart_s} s", flush=True)

            prober.close()
            stop_sipp(sipp)
            totals = sipp_totals(folder)

            gaps = []  # the longest RTP gap each held call's two legs saw over the whole run
            for h in held:
                with contextlib.suppress(Exception):
                    gaps.append(max(float(a.rtp_gaps(h.caller_call)["max_gap_ms"]),
                                    float(b.rtp_gaps(h.callee_call)["max_gap_ms"])))
            # Hang up the held calls: each BYE must get 200.
            for h in held:
                if h.dropped:
                    continue
                mark = a.mark()
                try:
                    a.bye(h.caller_call)
                    bye = a.wait_event(lambda e, h=h: e["event"] == "bye_result" and e.get("call") == h.caller_call,
                                       10, since=mark)
                    if bye.get("code") != 200:
                        h.dropped = f"BYE got {bye.get('code')}"
                except Exception as exc:
                    h.dropped = f"BYE: {exc}"
            recoveries = [r.recovery_s for r in results if r.recovery_s is not None]
            elected = [r.elected_s for r in results if r.elected_s is not None]
            helds = [r.held_s for r in results if r.held_s is not None]
            new_calls = [n for r in results for n in r.new_calls]
            return {
                "kills": len(results),
                "reg_rate": args.reg_rate,
                "held_calls": len(held),
                "recovery_s": {
                    "p50": percentile(recoveries, 50), "p99": percentile(recoveries, 99),
                    "max": max(recoveries) if recoveries else None,
                    "mean": statistics.fmean(recoveries) if recoveries else None,
                    "missing": len(results) - len(recoveries),
                },
                "elected_s": {"p50": percentile(elected, 50), "p99": percentile(elected, 99),
                              "max": max(elected) if elected else None},
                "address_held_s": {"p50": percentile(helds, 50), "p99": percentile(helds, 99),
                                   "max": max(helds) if helds else None},
                "held_dropped": sum(1 for h in held if h.dropped),
                "held_drop_reasons": [h.dropped for h in held if h.dropped],
                "held_max_rtp_gap_ms": max(gaps) if gaps else None,
                "new_calls": {
                    "attempted": len(new_calls),
                    "failed": sum(1 for n in new_calls if not n["ok"]),
                    "failed_per_kill": sum(1 for n in new_calls if not n["ok"]) / max(1, len(results)),
                    "setup_from_kill_s_p50": percentile([n["setup_from_kill_s"] for n in new_calls
                                                         if n.get("setup_from_kill_s") is not None], 50),
                },
                "sipp": totals,
                "prober_attempts": len(prober.attempts),
                "prober_failed": sum(1 for x in prober.attempts if x.status != 200),
                "per_kill": [asdict(r) for r in results],
            }
    finally:
        if prober is not None:
            prober.close()
        if sipp is not None and sipp.poll() is None:
            stop_sipp(sipp)
        for phone in phones:
            with contextlib.suppress(Exception):
                phone.close()
        if args.keep:
            print(f"  kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def report(summary: dict[str, Any]) -> None:
    rec = summary["recovery_s"]

    def s(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    ok_p50 = rec["p50"] is not None and rec["p50"] < TARGET_P50
    ok_p99 = rec["p99"] is not None and rec["p99"] < TARGET_P99
    print()
    print(f"failover: {summary['kills']} leader kills, REGISTER load {summary['reg_rate']}/s (SIPp) + prober, "
          f"{summary['held_calls']} held calls")
    print(f"  kill -> first successful REGISTER via the service address: p50 {s(rec['p50'])} s "
          f"({'ok' if ok_p50 else 'MISSED'} < {TARGET_P50}), p99 {s(rec['p99'])} s "
          f"({'ok' if ok_p99 else 'MISSED'} < {TARGET_P99}), max {s(rec['max'])} s, none within 10 s: {rec['missing']}")
    el, ad = summary["elected_s"], summary["address_held_s"]
    print(f"  of which: kill -> new leader p50 {s(el['p50'])} s, p99 {s(el['p99'])} s; kill -> service address "
          f"bound p50 {s(ad['p50'])} s, p99 {s(ad['p99'])} s (from the nodes' logs)")
    print(f"  established calls dropped: {summary['held_dropped']} of {summary['held_calls']} (target 0) "
          f"{summary['held_drop_reasons'] or ''}; longest RTP gap on a held call {summary['held_max_rtp_gap_ms']} ms")
    nc = summary["new_calls"]
    print(f"  new call attempts: {nc['attempted']}, failed {nc['failed']} ({nc['failed_per_kill']:.2f} per kill), "
          f"setup from the kill p50 {s(nc['setup_from_kill_s_p50'])} s")
    sipp = summary["sipp"]
    print(f"  SIPp registrations: {sipp['successful']} ok, {sipp['failed']} failed of {sipp['created']}; prober "
          f"{summary['prober_attempts']} attempts, {summary['prober_failed']} without 200")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--reg-rate", type=float, default=50.0, help="SIPp REGISTERs per second")
    parser.add_argument("--users", type=int, default=300, help="SIPp users")
    parser.add_argument("--held", type=int, default=4, help="established calls held through every kill (max 4)")
    parser.add_argument("--probe-interval", type=float, default=0.05, help="s between prober registrations")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (node logs) for diagnosis")
    args = parser.parse_args(argv)
    if not 1 <= args.held <= 4:
        parser.error("--held: 1..4 (pjsua's 4 call legs per phone process)")
    summary = run(args)
    report(summary)
    out = args.json or HERE / "results" / f"failover-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"  JSON: {out}")
    held_ok = summary["held_dropped"] == 0
    rec = summary["recovery_s"]
    met = held_ok and rec["p50"] is not None and rec["p50"] < TARGET_P50 and rec["p99"] < TARGET_P99
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
