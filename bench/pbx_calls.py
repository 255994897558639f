"""Call benchmark with SIPp against a real 3-node raftpbx cluster on loopback (a benchmark, not a test).

    .venv/bin/python bench/pbx_calls.py [--runs 1] [--step 8] [--start 50] [--hold 1000] [--targets 3]

What it measures: the maximum sustained rate of calls (bench/sipp/uac_call_auth.xml: INVITE, 407, ACK,
INVITE with Proxy-Authorization, 100/180/200, ACK, hold, BYE, 200) with under 1% failed calls, at least 97%
of the target rate achieved and p99 call setup under 500 ms (the criteria of the Kamailio baseline in
/work/shared/bench-anchor/README.md), and the call-setup and BYE response times. Every call commits
CallStarted (while the INVITE is forked), CallRinging with CallAnswered (one entry, before the 200 is relayed:
the UAS answers within RINGING_LINGER) and CallEnded (before the BYE's 200 is relayed) on a durable quorum:
four commands in three proposals per call (fewer Raft entries under load, where the node batches proposals).

How: `raftpbx demo --detach` starts 3 nodes (MD5 digest only: SIPp 3.6 answers only the first challenge
and knows only MD5); per target node i a UAS SIPp (bench/sipp/uas.xml) is registered through node i+1 (so
calls cross nodes) with bench/sipp/reg_auth.xml from the same address and port, then UAC SIPp instances
send calls to node i with callers from an injection CSV. Rates double from `--start` until a step fails,
then bisect to 5%.

Commit-before-reply latency: at a light rate the UAS and UAC also run with -trace_msg; on one host their
timestamps share a clock, so "UAS sent the 200 -> UAC received it" is the proxy's relay time of the 2xx
including the CallAnswered commit, and the same for the 180 is the baseline (it waits for no commit of its
own: only for CallStarted, proposed when the INVITE was forked, if that is still in flight). Their difference
is the latency that commit-before-reply adds to call setup.

Everything binds loopback addresses only; every process started here is stopped at the end; users and
passwords live in a temporary folder removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pbx import (  # bench/pbx.py: the REGISTER benchmark's cluster and SIPp plumbing
    SCENARIOS,
    SIPP,
    DemoCluster,
    _port_free_on,
    _read_stats,
    common_free_port,
    create_extensions,
    demo_cluster,
    make_users,
    percentile,
)

UAC_IPS = ("127.0.0.81", "127.0.0.82", "127.0.0.83")
UAS_IPS = ("127.0.0.91", "127.0.0.92", "127.0.0.93")
MAX_FAILURE_RATIO = 0.01
MIN_ACHIEVED_RATIO = 0.97
MAX_P99_MS = 500.0


def write_csv(path: Path, rows: Sequence[Sequence[str]]) -> Path:
    with open(path, "w", newline="") as fh:
        fh.write("SEQUENTIAL\n")
        writer = csv.writer(fh, delimiter=";", lineterminator="\n")
        writer.writerows(rows)
    return path


def _common(ip: str, transport: str, folder: Path, port: int) -> list[str]:
    used: set[int] = {port}
    media, control = (common_free_port([ip], used) for _ in range(2))
    return ["-t", transport, "-i", ip, "-bind_local", "-p", str(port), "-mp", str(media), "-ci", ip,
            "-cp", str(control), "-buff_size", "4194304", "-nostdin",
            "-trace_err", "-error_file", str(folder / "errors.log")]


def _stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGUSR1)  # SIPp: stop now
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)


@dataclass
class Uas:
    proc: subprocess.Popen[bytes]
    folder: Path
    ip: str
    port: int


# The UAS port of each callee, per registrar: every step starts a fresh UAS, and one on a new port would
# leave the previous UAS's binding registered (Expires 3600, a new Call-ID each time), so every later call
# would also be forked to the dead ports of earlier steps: an INVITE retransmitted by timer A for 32 s and a
# client transaction per dead binding and call (measured: 4.2 of 11.2 datagrams sent per call at 100/s
# with one stale binding; a ramp has one more per step, in both raftpbx and Kamailio, whose registrar
# appends every contact). The same contact re-registered with another Call-ID replaces its binding
# (RFC 3261 §10.3 step 7), so each callee keeps exactly one binding: the live UAS.
_UAS_PORTS: dict[tuple[str, int, int], int] = {}


def _uas_port(registrar: tuple[str, int], i: int, ip: str) -> int:
    key = (registrar[0], registrar[1], i)
    port = _UAS_PORTS.get(key)
    if port is None or not _port_free_on(port, [ip]):
        port = _UAS_PORTS[key] = common_free_port([ip], set())
    return port


def start_uas(cluster: DemoCluster, i: int, ext: str, password: str, transport: str, work: Path,
              trace: bool) -> Uas:
    """Register `ext` at (UAS_IPS[i], port) through node (i + 1) % 3, then run uas.xml on that address (the
    same port as the previous UAS of this callee, which is stopped by now: its binding is replaced)."""
    ip = UAS_IPS[i]
    registrar = cluster.sip((i + 1) % len(cluster.nodes))
    port = _uas_port(registrar, i, ip)
    folder = work / f"uas-{i}-{time.monotonic_ns()}"
    folder.mkdir()
    users = write_csv(folder / "uas.csv", [[ext, password, ext]])
    reg = subprocess.run(
        [str(SIPP), f"{registrar[0]}:{registrar[1]}", "-sf", str(SCENARIOS / "reg_auth.xml"), "-inf", str(users),
         "-m", "1", "-timeout", "15s", "-timeout_error", *_common(ip, transport, folder, port)],
        cwd=folder, capture_output=True, timeout=30, check=False)
    if reg.returncode != 0:
        raise RuntimeError(f"UAS {ext} failed to register: {(folder / 'errors.log').read_text(errors='replace')[-400:]}"
                           if (folder / "errors.log").exists() else f"UAS {ext} failed to register")
    argv = [str(SIPP), "-sf", str(SCENARIOS / "uas.xml"), *_common(ip, transport, folder, port),
            "-trace_stat", "-stf", str(folder / "stat.csv"), "-fd", "1"]
    if trace:
        argv += ["-trace_msg", "-message_file", str(folder / "messages.log")]
    with open(folder / "stdout.log", "wb") as out, open(folder / "stderr.log", "wb") as err:
        proc = subprocess.Popen(argv, cwd=folder, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return Uas(proc, folder, ip, port)


@dataclass
class Result:
    created: int = 0
    successful: int = 0
    failed: int = 0
    setup: list[float] | None = None
    bye: list[float] | None = None
    first: float | None = None
    last: float | None = None


def _read_rtt(folder: Path, result: Result) -> None:
    assert result.setup is not None and result.bye is not None
    for path in folder.glob("*_rtt.csv"):
        with open(path, newline="") as fh:
            for row in csv.reader(fh, delimiter=";"):
                if len(row) < 3 or not row[0].replace(".", "").isdigit():
                    continue
                at, rt, rtd = float(row[0]), float(row[1]), row[2].strip()
                if rtd in ("1", "setup"):
                    result.setup.append(rt)
                    result.first = at if result.first is None else min(result.first, at)
                    result.last = at if result.last is None else max(result.last, at)
                elif rtd in ("2", "bye"):
                    result.bye.append(rt)


def run_step(cluster: DemoCluster, csvs: Sequence[Path], rate: float, seconds: float, hold_ms: int,
             transport: str, work: Path, trace: bool = False) -> tuple[Result, list[Path]]:
    targets = len(csvs)
    per_rate = rate / targets
    calls = max(1, round(per_rate * seconds))
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    for i in range(targets):
        folder = work / f"uac-{int(rate)}-{i}-{time.monotonic_ns()}"
        folder.mkdir()
        ip = UAC_IPS[i]
        port = common_free_port([ip], set())
        target = cluster.sip(i)
        argv = [str(SIPP), f"{target[0]}:{target[1]}", "-sf", str(SCENARIOS / "uac_call_auth.xml"),
                "-inf", str(csvs[i]), *_common(ip, transport, folder, port),
                "-r", f"{per_rate:g}", "-rp", "1000", "-m", str(calls), "-d", str(hold_ms),
                "-l", str(max(200, int(per_rate * (hold_ms / 1000 + 3)))),
                "-timeout", f"{int(seconds + 60)}s", "-timeout_error", "-recv_timeout", "8000",
                "-max_recv_loops", "10000", "-trace_rtt", "-rtt_freq", "1",
                "-trace_stat", "-stf", str(folder / "stat.csv"), "-fd", "1"]
        if trace:
            argv += ["-trace_msg", "-message_file", str(folder / "messages.log")]
        with open(folder / "stdout.log", "wb") as out, open(folder / "stderr.log", "wb") as err:
            procs.append((subprocess.Popen(argv, cwd=folder, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                           start_new_session=True), folder))
    deadline = time.monotonic() + seconds + hold_ms / 1000 + 70
    for proc, _ in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _stop(proc)
    total = Result(setup=[], bye=[])
    for _, folder in procs:
        stats = _read_stats(folder / "stat.csv")
        total.created += int(stats.get("TotalCallCreated", 0) or 0)
        total.successful += int(stats.get("SuccessfulCall(C)", 0) or 0)
        total.failed += int(stats.get("FailedCall(C)", 0) or 0)
        _read_rtt(folder, total)
    return total, [folder for _, folder in procs]


@dataclass
class Step:
    rate: float
    achieved: float
    failed_ratio: float
    p50: float | None
    p99: float | None
    p50_bye: float | None
    p99_bye: float | None
    cpu: float
    passed: bool

    def line(self) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.0f}"

        return (f"  target {self.rate:6.0f}/s  achieved {self.achieved:6.0f}/s  failed {100 * self.failed_ratio:5.2f}%"
                f"  setup p50/p99 {ms(self.p50)}/{ms(self.p99)} ms  BYE p50/p99 {ms(self.p50_bye)}/{ms(self.p99_bye)} ms"
                f"  node CPU {self.cpu:5.0f} us/call  {'PASS' if self.passed else 'fail'}")


def settle(cluster: DemoCluster, limit: float = 30.0) -> None:
    """Wait (bounded) until the nodes are nearly idle: an overloaded step leaves retransmissions and half
    calls behind, which would otherwise be charged to the next step."""
    deadline = time.monotonic() + limit
    before = cluster.cpu_seconds()
    while time.monotonic() < deadline:
        time.sleep(0.5)  # a CPU-time sample needs an interval; the condition is checked every sample
        now = cluster.cpu_seconds()
        if now - before < 0.05:  # under 0.1 core summed over the three nodes
            return
        before = now


def measure(cluster: DemoCluster, csvs: Sequence[Path], rate: float, args: argparse.Namespace, work: Path,
            seconds: float | None = None, trace: bool = False) -> Step:
    wait_for_other_benchmarks()
    settle(cluster)
    cpu_before = cluster.cpu_seconds()
    result, _ = run_step(cluster, csvs, rate, seconds or args.step, args.hold, args.transport, work, trace=trace)
    cpu = cluster.cpu_seconds() - cpu_before
    attempted = max(result.created, 1)
    failed_ratio = (result.failed + max(0, result.created - result.successful - result.failed)) / attempted
    achieved = 0.0
    if result.first is not None and result.last is not None and result.successful > 1:
        achieved = result.successful / ((result.last - result.first) / 1000 + 1 / rate)
    setup, bye = result.setup or [], result.bye or []
    p99 = percentile(setup, 99)
    passed = (result.created > 0 and failed_ratio < MAX_FAILURE_RATIO and achieved >= MIN_ACHIEVED_RATIO * rate
              and p99 is not None and p99 < MAX_P99_MS)
    return Step(rate, achieved, failed_ratio, percentile(setup, 50), p99, percentile(bye, 50), percentile(bye, 99),
                1e6 * cpu / max(1, result.successful), passed)


# --- commit-before-reply latency from SIPp message traces --------------------------------------------------

_BLOCK = re.compile(r"^-{10,} (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\s*$", re.M)


def _messages(path: Path) -> list[tuple[float, str, str, str]]:
    """(epoch time, direction 'sent'/'received', start line, key 'call-id|CSeq') of each traced message."""
    if not path.exists():
        return []
    text = path.read_text(errors="replace")
    out = []
    marks = list(_BLOCK.finditer(text))
    for index, mark in enumerate(marks):
        body = text[mark.end(): marks[index + 1].start() if index + 1 < len(marks) else len(text)]
        at = datetime.strptime(mark.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
        direction = "sent" if "message sent" in body[:200] else "received"
        lines = [line.strip() for line in body.strip().splitlines() if line.strip()]
        start = lines[1] if len(lines) > 1 else ""
        call_id = next((line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("call-id:")), "")
        cseq = next((line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("cseq:")), "")
        out.append((at, direction, start, f"{call_id}|{cseq}"))
    return out


def relay_latency(uas: Sequence[Uas], uac_folders: Sequence[Path]) -> dict[str, list[float]]:
    """ms from the UAS sending a 180 / 200 (INVITE) / 200 (BYE)... to the UAC receiving it."""
    sent: dict[tuple[str, str], float] = {}
    for server in uas:
        for at, direction, start, key in _messages(server.folder / "messages.log"):
            if direction == "sent" and start.startswith("SIP/2.0 "):
                sent.setdefault((start.split()[1], key), at)
    out: dict[str, list[float]] = {"180": [], "200": []}
    for folder in uac_folders:
        for at, direction, start, key in _messages(folder / "messages.log"):
            if direction != "received" or not start.startswith("SIP/2.0 "):
                continue
            status = start.split()[1]
            if status in out and key.endswith("INVITE") and (status, key) in sent:
                out[status].append(1000 * (at - sent[(status, key)]))
    return out


def wait_for_other_benchmarks(limit: float = 1800.0) -> None:
    """Two benchmarks on 2 shared cores distort each other: wait (bounded) while `bench/pbx.py` runs."""
    deadline = time.monotonic() + limit
    told = False
    while time.monotonic() < deadline:
        probe = subprocess.run(["pgrep", "-f", "bench/pbx.py"], capture_output=True, text=True, check=False)
        if not probe.stdout.strip():
            return
        if not told:
            print("  (waiting while bench/pbx.py runs)", flush=True)
            told = True
        time.sleep(5.0)  # polling another process's lifetime: there is no event to wait on
    print("  (bench/pbx.py still running: measuring anyway, figures are disturbed)", flush=True)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM: unwind, so that every SIPp process and the cluster are stopped


def restart_uas(cluster: DemoCluster, uas: list[Uas], callees: Sequence[tuple[str, str]],
                args: argparse.Namespace, work: Path) -> list[Uas]:
    """Fresh UAS instances (no trace, no calls left over from the previous step)."""
    for server in uas:
        _stop(server.proc)
    return [start_uas(cluster, i, *callees[i], args.transport, work, trace=args.trace)
            for i in range(args.targets)]


def bench_calls(args: argparse.Namespace) -> int:
    if SIPP is None:
        print("sipp not found (Debian package sip-tester)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    wait_for_other_benchmarks()
    settings = {"sip.digest_algorithms": "MD5", "log.level": args.log_level}
    service: list[tuple[str, int]] = []
    if args.service:  # as bench/suite.py: Record-Route names the service address (the leader's)
        service_ip = "127.0.0.70"
        service.append((service_ip, common_free_port([service_ip], set())))
        settings["service.address"] = f"{service_ip}:{service[0][1]}"
    callers = make_users(args.users)
    callees = make_users(args.targets, first=190000)
    bests: list[Step] = []
    for run in range(1, args.runs + 1):
        with _cluster(settings, args.keep) as (cluster, root):
            took = create_extensions(cluster, [*callers, *callees])
            share = len(callers) // args.targets
            csvs = [write_csv(root / f"callers{i}.csv",
                              [[u, p, callees[i][0]] for u, p in callers[i * share:(i + 1) * share]])
                    for i in range(args.targets)]
            print(f"run {run}: 3-node cluster up, {len(callers) + len(callees)} extensions in {took:.1f} s; "
                  f"{args.targets} UAC/UAS pairs, {args.transport}, hold {args.hold} ms, {args.step:g} s steps",
                  flush=True)
            uas = [start_uas(cluster, i, *callees[i], args.transport, root, trace=not args.rates)
                   for i in range(args.targets)]
            try:
                if args.rates:  # fixed rates (diagnosis): no light step, no ramp
                    for text in args.rates.split(","):
                        uas = restart_uas(cluster, uas, callees, args, root)
                        load = os.getloadavg()[0]
                        drops = udp_drops(cluster, service)
                        _save_metrics(cluster, root, f"before-{text}")  # per-node counts of the step: after - before
                        step = measure(cluster, csvs, float(text), args, root, trace=args.trace)
                        print(step.line() + f"  load {load:.1f}  node UDP drops "
                              f"{udp_drops(cluster, service) - drops}", flush=True)
                        _save_metrics(cluster, root, f"after-{text}")
                    continue
                # Light load with message traces: relay latency of 180 (no commit) vs 200 (CallAnswered commit).
                wait_for_other_benchmarks()
                light, folders = run_step(cluster, csvs, args.light, 5.0, args.hold, args.transport, root, trace=True)
                latency = relay_latency(uas, folders)
                setup = light.setup or []
                print(f"  light load {args.light:g}/s: {light.successful}/{light.created} calls ok; setup p50/p99 "
                      f"{percentile(setup, 50)}/{percentile(setup, 99)} ms (SIPp's 4 ms clock)", flush=True)
                for status in ("180", "200"):
                    values = latency[status]
                    if values:
                        print(f"  relay UAS->UAC of the {status}: n={len(values)} p50 {statistics.median(values):.2f} ms"
                              f"  p99 {percentile(values, 99):.2f} ms", flush=True)
                if latency["180"] and latency["200"]:
                    added = statistics.median(latency["200"]) - statistics.median(latency["180"])
                    print(f"  => commit-before-reply adds {added:.2f} ms (p50) to the 2xx", flush=True)
                best = None
                low, high = 0.0, None
                rate = float(args.start)
                while rate <= args.max_rate:
                    uas = restart_uas(cluster, uas, callees, args, root)
                    step = measure(cluster, csvs, rate, args, root)
                    print(step.line(), flush=True)
                    if step.passed:
                        best, low, rate = step, rate, rate * 2
                    else:
                        high = rate
                        break
                while high is not None and low > 0 and high - low > 0.05 * high:
                    rate = round((low + high) / 2)
                    uas = restart_uas(cluster, uas, callees, args, root)
                    step = measure(cluster, csvs, rate, args, root)
                    print(step.line(), flush=True)
                    if step.passed:
                        best, low = step, rate
                    else:
                        high = rate
                if best is not None:
                    bests.append(best)
                    print(f"run {run}: max sustained {best.rate:.0f} calls/s", flush=True)
            finally:
                for server in uas:
                    _stop(server.proc)
    if bests:
        rates = [b.rate for b in bests]
        print(f"\ncalls (INVITE with 407 .. BYE, hold {args.hold} ms, 3 commits each) on 3 nodes: max sustained "
              f"{statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f}) calls/s over {len(bests)} run(s)")
    return 0


@contextlib.contextmanager
def _cluster(settings: dict[str, str], keep: Path | None) -> Iterator[tuple[DemoCluster, Path]]:
    """A fresh cluster: in a temporary folder removed afterwards, or in `keep` (node logs, SIPp folders
    and /metrics snapshots stay there for diagnosis; the nodes are always stopped)."""
    if keep is None:
        with demo_cluster(settings) as pair:
            yield pair
        return
    keep.mkdir(parents=True, exist_ok=False)
    cluster = DemoCluster.start(keep / "demo", settings=settings)
    try:
        yield cluster, keep
    finally:
        cluster.stop()


def udp_drops(cluster: DemoCluster, extra: Sequence[tuple[str, int]] = ()) -> int:
    """Datagrams the kernel dropped so far on the nodes' SIP UDP sockets (and on `extra` addresses, e.g. the
    service address) because their receive buffer was full (Linux: the last column of /proc/net/udp, per
    socket; 0 elsewhere)."""
    ours = set(extra)
    for node in cluster.nodes:
        host, _, port = str(node["sip"]).rpartition(":")
        ours.add((host, int(port)))
    total = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
            fields = line.split()
            address, _, port = fields[1].partition(":")
            host = ".".join(str(b) for b in reversed(bytes.fromhex(address)))
            if (host, int(port, 16)) in ours:
                total += int(fields[-1])
    return total


def _save_metrics(cluster: DemoCluster, folder: Path, label: str) -> None:
    """Each node's /metrics text into `folder` (diagnosis; failures are written instead)."""
    for i, node in enumerate(cluster.nodes):
        url = str(node["admin_url"]).rstrip("/") + "/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode(errors="replace")
        except OSError as exc:
            text = f"# error: {exc!r}\n"
        (folder / f"metrics-{label}-node{i + 1}.txt").write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--step", type=float, default=8.0, help="seconds per rate step")
    parser.add_argument("--start", type=float, default=50.0, help="first rate of the ramp (calls/s)")
    parser.add_argument("--max-rate", type=float, default=5000.0)
    parser.add_argument("--light", type=float, default=20.0, help="rate of the traced light-load step")
    parser.add_argument("--hold", type=int, default=1000, help="ms between ACK and BYE")
    parser.add_argument("--targets", type=int, default=3, choices=[1, 2, 3])
    parser.add_argument("--transport", default="u1", choices=["u1"], help="SIPp transport (UDP)")
    parser.add_argument("--rates", default="", help="run these rates (comma-separated calls/s) instead of the ramp")
    parser.add_argument("--keep", type=Path, default=None,
                        help="a new folder for the cluster and SIPp folders, kept afterwards (diagnosis)")
    parser.add_argument("--service", action="store_true",
                        help="a service address as in bench/suite.py (Record-Route names the leader's address)")
    parser.add_argument("--log-level", default="warning", help="the nodes' log level")
    parser.add_argument("--trace", action="store_true", help="with --rates: SIPp message traces (-trace_msg)")
    args = parser.parse_args(argv)
    return bench_calls(args)


if __name__ == "__main__":
    sys.exit(main())
