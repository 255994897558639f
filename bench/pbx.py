"""PBX benchmarks with SIPp against a real 3-node raftpbx cluster on loopback (a benchmark, not a test).

    .venv/bin/python bench/pbx.py register [--runs 3] [--users 2000] [--step 8] [--targets 3]

`register`: maximum sustained rate of authenticated REGISTERs (bench/sipp/reg_auth.xml: REGISTER, 401,
REGISTER with digest, 200) with under 1% failures, and p50/p99 response times. Every 200 is sent only after
the binding event is committed on a quorum and on disk (DESIGN decision 3), so this measures the whole
path: SIP parsing, digest, the decision, Raft replication with fsync, apply, the response.

How: `raftpbx demo --detach` starts 3 nodes in a temporary workdir (free ports, digest MD5 only), the
benchmark users are created through the admin RPC, then SIPp runs steps of `--step` seconds. A step passes
with under 1% failed registrations, at least 97% of the target rate achieved, and p99 under 500 ms (the
criteria of the Kamailio baseline in /work/shared/bench-anchor/README.md). Rates double from `--start`
until a step fails, then bisect to 5%. With `--targets 3` the rate is split over three SIPp instances, one
per node, each with its own users (a phone population spread over the cluster); `--targets 1` sends
everything to node 1. Each run starts a fresh cluster; the table shows medians (and ranges) over runs.

Response times come from SIPp's -trace_rtt (rtd "register": first REGISTER -> final 200, two round
trips; rtd "auth_reg": authenticated REGISTER -> 200, one round trip including the commit). SIPp's clock
has 4 ms steps, so sub-4 ms figures read as 0-4 ms.

Users: the same scheme as the anchor's gen_users.py (password = sha256("seed:user")[:16], extensions
from 100000), written to the run's temporary folder and removed with it; nothing with a password is
committed. Everything binds loopback addresses only; every process started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raftpbx.admin import AdminClient, AdminError, load_cluster_file

HERE = Path(__file__).resolve().parent
SCENARIOS = HERE / "sipp"
PYTHON = sys.executable
SIPP = shutil.which("sipp")
SIPP_IPS = ("127.0.0.61", "127.0.0.62", "127.0.0.63")  # one loopback address per SIPp instance
MAX_FAILURE_RATIO = 0.01
MIN_ACHIEVED_RATIO = 0.97
MAX_P99_MS = 500.0


# --------------------------------------------------------------------------------------------- cluster
def _port_free_on(port: int, ips: Sequence[str]) -> bool:
    for ip in ips:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as s:
                try:
                    s.bind((ip, port))
                except OSError:
                    return False
    return True


def common_free_port(ips: Sequence[str], avoid: set[int]) -> int:
    """A port free on every address in `ips` (TCP and UDP), not in `avoid`."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ips[0], 0))
            port = int(s.getsockname()[1])
        if port not in avoid and _port_free_on(port, ips):
            avoid.add(port)
            return port
    raise RuntimeError("no common free port")


@dataclass
class DemoCluster:
    """A `raftpbx demo --detach` cluster in `workdir`; stop() stops exactly its nodes."""

    workdir: Path
    nodes: list[dict[str, Any]] = field(default_factory=list)
    token: str = ""

    @classmethod
    def start(cls, workdir: Path, n: int = 3, settings: dict[str, str] | None = None) -> DemoCluster:
        ips = [f"127.0.0.{10 + i}" for i in range(1, n + 1)]
        used: set[int] = set()
        raft, admin, sip = (common_free_port(ips, used) for _ in range(3))
        argv = [PYTHON, "-P", "-m", "raftpbx.cli", "demo", "--detach", "--nodes", str(n), "--workdir", str(workdir),
                "--raft-port", str(raft), "--admin-port", str(admin), "--sip-port", str(sip),
                "--extensions", "1001-1001"]
        for key, value in (settings or {}).items():
            argv += ["--raft-set", f"{key}={value}"]
        cluster = cls(workdir)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)
        if proc.returncode != 0:
            cluster.stop()
            tails = []
            for log in sorted(workdir.glob("node*/node.log")):
                lines = log.read_text(errors="replace").splitlines()[-5:]
                tails.append(f"--- {log.parent.name}:\n" + "\n".join(line[:300] for line in lines))
            raise RuntimeError(f"demo failed to start:\n{proc.stdout}\n{proc.stderr}\n" + "\n".join(tails))
        doc = load_cluster_file(workdir / "cluster.json")
        cluster.nodes, cluster.token = doc["nodes"], doc["admin_token"]
        return cluster

    def sip(self, i: int) -> tuple[str, int]:
        host, _, port = self.nodes[i]["sip"].rpartition(":")
        return host, int(port)

    def client(self, i: int | None = None) -> AdminClient:
        urls = [n["admin_url"] for n in self.nodes] if i is None else [self.nodes[i]["admin_url"]]
        return AdminClient(urls, self.token, timeout=10.0)

    def stop(self) -> None:
        subprocess.run([PYTHON, "-P", "-m", "raftpbx.cli", "demo", "--stop", "--workdir", str(self.workdir)],
                       capture_output=True, timeout=60, check=False)

    def cpu_seconds(self) -> float:
        """User+system CPU seconds used so far by the node processes (from /proc)."""
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        for node in self.nodes:
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = Path(f"/proc/{node['pid']}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
        return total


@contextlib.contextmanager
def demo_cluster(settings: dict[str, str]) -> Iterator[tuple[DemoCluster, Path]]:
    """A fresh cluster in a temporary folder, always stopped and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="raftpbx-bench-"))
    cluster: DemoCluster | None = None
    try:
        cluster = DemoCluster.start(root / "demo", settings=settings)
        yield cluster, root
    finally:
        if cluster is not None:
            cluster.stop()
        else:  # a half-started demo: stop whatever it recorded
            DemoCluster(root / "demo").stop()
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------------------------- users
def password_for(user: str, seed: str) -> str:
    """The anchor's scheme (bench-anchor/gen_users.py), so both benchmarks feed the same users."""
    return hashlib.sha256(f"{seed}:{user}".encode()).hexdigest()[:16]


def make_users(count: int, first: int = 100000, seed: str = "sipbench") -> list[tuple[str, str]]:
    return [(str(first + i), password_for(str(first + i), seed)) for i in range(count)]


def write_users_csv(path: Path, users: Sequence[tuple[str, str]], callees: int = 1000, first: int = 100000) -> Path:
    """SIPp injection file like the anchor's users.csv: SEQUENTIAL; user;password;callee."""
    with open(path, "w", newline="") as fh:
        fh.write("SEQUENTIAL\n")
        writer = csv.writer(fh, delimiter=";", lineterminator="\n")
        for i, (user, password) in enumerate(users):
            writer.writerow([user, password, str(first + i % max(1, callees))])
    return path


def create_extensions(cluster: DemoCluster, users: Sequence[tuple[str, str]], workers: int = 12) -> float:
    """Create the users through the admin RPC (idempotent op_ids), spread over the nodes; seconds taken."""
    started = time.monotonic()
    clients = [cluster.client(i) for i in range(len(cluster.nodes))]

    def create(i: int, user: str, password: str) -> None:
        try:
            clients[i % len(clients)].call("extension.create", {
                "extension": user, "password": password, "op_id": f"bench-ext-{user}"})
        except AdminError as exc:
            if "exists" not in str(exc):
                raise

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(create, i, u, p) for i, (u, p) in enumerate(users)]:
            future.result()
    return time.monotonic() - started


# --------------------------------------------------------------------------------------------- SIPp
@dataclass
class SippResult:
    created: int
    successful: int
    failed: int
    rtt_register: list[float]  # ms, rtd 1
    rtt_auth: list[float]  # ms, rtd 2
    first_ms: float | None
    last_ms: float | None
    returncode: int
    stderr: str = ""


def _read_stats(stat_file: Path) -> dict[str, str]:
    with contextlib.suppress(OSError, IndexError):
        with open(stat_file, newline="") as fh:
            rows = list(csv.reader(fh, delimiter=";"))
        return dict(zip(rows[0], rows[-1], strict=False))
    return {}


def _read_rtt(folder: Path) -> tuple[list[float], list[float], float | None, float | None]:
    register: list[float] = []
    auth: list[float] = []
    first = last = None
    for path in folder.glob("*_rtt.csv"):
        with open(path, newline="") as fh:
            for row in csv.reader(fh, delimiter=";"):
                if len(row) < 3 or not row[0].replace(".", "").isdigit():
                    continue
                at, rt, rtd = float(row[0]), float(row[1]), row[2].strip()
                if rtd in ("1", "register"):
                    register.append(rt)
                    first = at if first is None else min(first, at)
                    last = at if last is None else max(last, at)
                elif rtd in ("2", "auth_reg"):
                    auth.append(rt)
    return register, auth, first, last


def sipp_argv(scenario: Path, target: tuple[str, int], local_ip: str, users_csv: Path, rate: float, calls: int,
              transport: str, folder: Path) -> list[str]:
    assert SIPP is not None
    used: set[int] = set()
    port, media, control = (common_free_port([local_ip], used) for _ in range(3))
    return [
        SIPP, f"{target[0]}:{target[1]}",
        "-sf", str(scenario), "-inf", str(users_csv), "-t", transport,
        "-i", local_ip, "-bind_local", "-p", str(port), "-mp", str(media), "-ci", local_ip, "-cp", str(control),
        "-r", f"{rate:g}", "-rp", "1000", "-m", str(calls), "-l", str(max(200, int(rate * 3))),
        "-timeout", "60s", "-timeout_error", "-recv_timeout", "5000", "-max_recv_loops", "10000",
        "-buff_size", "4194304", "-nostdin",
        "-trace_rtt", "-rtt_freq", "1",
        "-trace_stat", "-stf", str(folder / "stat.csv"), "-fd", "1",
        "-trace_err", "-error_file", str(folder / "errors.log"),
    ]  # fmt: skip


def run_step(cluster: DemoCluster, users_csvs: Sequence[Path], rate: float, seconds: float, transport: str,
             targets: int, work: Path) -> SippResult:
    """One step: `targets` SIPp instances (one per node) at rate/targets each for `seconds`."""
    per_rate = rate / targets
    calls = max(1, round(per_rate * seconds))
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    for i in range(targets):
        folder = work / f"sipp-{int(rate)}-{i}-{time.monotonic_ns()}"
        folder.mkdir()
        argv = sipp_argv(SCENARIOS / "reg_auth.xml", cluster.sip(i), SIPP_IPS[i], users_csvs[i], per_rate, calls,
                         transport, folder)
        with open(folder / "stdout.log", "wb") as out, open(folder / "stderr.log", "wb") as err:
            procs.append((subprocess.Popen(argv, cwd=folder, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                           start_new_session=True), folder))
    deadline = time.monotonic() + seconds + 70
    for proc, _ in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGUSR1)  # SIPp: stop now
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
    total = SippResult(0, 0, 0, [], [], None, None, 0)
    for proc, folder in procs:
        stats = _read_stats(folder / "stat.csv")
        register, auth, first, last = _read_rtt(folder)
        total.created += int(stats.get("TotalCallCreated", 0) or 0)
        total.successful += int(stats.get("SuccessfulCall(C)", 0) or 0)
        total.failed += int(stats.get("FailedCall(C)", 0) or 0)
        total.rtt_register += register
        total.rtt_auth += auth
        if first is not None:
            total.first_ms = first if total.first_ms is None else min(total.first_ms, first)
        if last is not None:
            total.last_ms = last if total.last_ms is None else max(total.last_ms, last)
        total.returncode = max(total.returncode, proc.returncode or 0)
        if proc.returncode not in (0, None):
            errors = (folder / "errors.log")
            total.stderr += errors.read_text(errors="replace")[-400:] if errors.exists() else ""
    return total


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Step:
    rate: float
    achieved: float
    failed_ratio: float
    p50: float | None
    p99: float | None
    p50_auth: float | None
    p99_auth: float | None
    cpu: float  # node CPU seconds per successful registration, in microseconds
    passed: bool
    quiet: bool = True  # no other raftpbx/SIPp/pytest process ran on the machine during the step

    def line(self) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.0f}"

        return (f"  target {self.rate:7.0f}/s  achieved {self.achieved:7.0f}/s  failed {100 * self.failed_ratio:5.2f}%"
                f"  p50/p99 {ms(self.p50)}/{ms(self.p99)} ms (auth REGISTER {ms(self.p50_auth)}/{ms(self.p99_auth)})"
                f"  node CPU {self.cpu:5.0f} us/reg  {'PASS' if self.passed else 'fail'}"
                f"{'' if self.quiet else '  (machine shared with other load)'}")


def foreign_load(cluster: DemoCluster) -> list[str]:
    """Other raftpbx nodes, SIPp or pytest processes on this machine (they share our two cores)."""
    ours = {int(n["pid"]) for n in cluster.nodes if isinstance(n.get("pid"), int)}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in ours or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "raftpbx.cli node" in cmd or cmd.startswith("/usr/bin/sipp") or "pytest" in cmd:
                found.append(cmd[:80])
    return found


def wait_quiet(cluster: DemoCluster, limit: float) -> bool:
    """Wait (at most `limit` s) until no foreign load runs; True if quiet."""
    deadline = time.monotonic() + limit
    while foreign_load(cluster):
        if time.monotonic() > deadline:
            return False
        time.sleep(1.0)  # polling other processes' lifetime, bounded by `limit`
    return True


def measure(cluster: DemoCluster, users_csvs: Sequence[Path], rate: float, seconds: float, transport: str,
            targets: int, work: Path, quiet_wait: float = 0.0) -> Step:
    quiet = wait_quiet(cluster, quiet_wait)
    cpu_before = cluster.cpu_seconds()
    result = run_step(cluster, users_csvs, rate, seconds, transport, targets, work)
    cpu = cluster.cpu_seconds() - cpu_before
    attempted = max(result.created, 1)
    failed_ratio = (result.failed + max(0, result.created - result.successful - result.failed)) / attempted
    if result.first_ms is not None and result.last_ms is not None and result.successful > 1:
        span = (result.last_ms - result.first_ms) / 1000 + 1 / rate
        achieved = result.successful / span
    else:
        achieved = 0.0
    p99 = percentile(result.rtt_register, 99)
    passed = (
        result.created > 0
        and failed_ratio < MAX_FAILURE_RATIO
        and achieved >= MIN_ACHIEVED_RATIO * rate
        and p99 is not None
        and p99 < MAX_P99_MS
    )
    return Step(rate, achieved, failed_ratio, percentile(result.rtt_register, 50), p99,
                percentile(result.rtt_auth, 50), percentile(result.rtt_auth, 99),
                1e6 * cpu / max(1, result.successful), passed, quiet and not foreign_load(cluster))


def ramp(cluster: DemoCluster, users_csvs: Sequence[Path], args: argparse.Namespace, work: Path) -> tuple[Step | None, list[Step]]:
    """Double from args.start until a step fails, then bisect to 5%; the best passing step and all steps."""
    steps: list[Step] = []
    best: Step | None = None
    low, high = 0.0, None
    rate = float(args.start)
    while rate <= args.max_rate:
        step = measure(cluster, users_csvs, rate, args.step, args.transport, args.targets, work, args.quiet_wait)
        steps.append(step)
        print(step.line(), flush=True)
        if step.passed:
            best, low = step, rate
            rate *= 2
        else:
            high = rate
            break
    while high is not None and high - low > 0.05 * high and low > 0:
        rate = round((low + high) / 2)
        step = measure(cluster, users_csvs, rate, args.step, args.transport, args.targets, work, args.quiet_wait)
        steps.append(step)
        print(step.line(), flush=True)
        if step.passed:
            best, low = step, rate
        else:
            high = rate
    return best, steps


def bench_register(args: argparse.Namespace) -> int:
    if SIPP is None:
        print("sipp not found (Debian package sip-tester)", file=sys.stderr)
        return 2
    if not 1 <= args.targets <= 3:
        print("--targets: 1 to 3", file=sys.stderr)
        return 2
    settings = {"sip.digest_algorithms": "MD5", "log.level": "warning"}
    users = make_users(args.users)
    bests: list[Step] = []
    light: list[Step] = []
    for run in range(1, args.runs + 1):
        with demo_cluster(settings) as (cluster, root):
            took = create_extensions(cluster, users)
            share = len(users) // args.targets
            csvs = [write_users_csv(root / f"users{i}.csv", users[i * share:(i + 1) * share])
                    for i in range(args.targets)]
            print(f"run {run}: 3-node cluster up, {len(users)} extensions created in {took:.1f} s; "
                  f"{args.targets} SIPp instance(s), {args.transport}, {args.step:g} s steps", flush=True)
            warm = measure(cluster, csvs, 100.0, min(args.step, 5.0), args.transport, args.targets, root,
                           args.quiet_wait)
            print("  light load (100/s):\n" + warm.line(), flush=True)
            light.append(warm)
            best, _ = ramp(cluster, csvs, args, root)
            if best is not None:
                bests.append(best)
                print(f"run {run}: max sustained {best.rate:.0f}/s", flush=True)
            else:
                print(f"run {run}: no step passed", flush=True)
    report(bests, light, args)
    return 0


def _median_range(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def report(bests: Sequence[Step], light: Sequence[Step], args: argparse.Namespace) -> None:
    print()
    print(f"Authenticated REGISTER (401 + digest + commit on a durable quorum) on 3 nodes, {args.transport}, "
          f"{args.targets} SIPp target node(s); median (range) of {len(bests)} run(s):")
    print("| measure | value |")
    print("|---|---|")
    print(f"| max sustained rate (<1% failed, >=97% achieved, p99 < 500 ms) | {_median_range([b.rate for b in bests])}/s |")
    print(f"| p50 / p99 at max, whole registration (ms) | {_median_range([b.p50 or 0 for b in bests])} / "
          f"{_median_range([b.p99 or 0 for b in bests])} |")
    print(f"| p50 / p99 at max, authenticated REGISTER -> 200 (ms) | {_median_range([b.p50_auth or 0 for b in bests])} / "
          f"{_median_range([b.p99_auth or 0 for b in bests])} |")
    print(f"| p50 / p99 at 100/s, whole registration (ms) | {_median_range([s.p50 or 0 for s in light])} / "
          f"{_median_range([s.p99 or 0 for s in light])} |")
    print(f"| node CPU per registration at max (us, 3 nodes summed) | {_median_range([b.cpu for b in bests])} |")
    print(f"machine: {os.cpu_count()} cores shared by SIPp and the three nodes; steps that ran beside other "
          f"load: {sum(1 for b in [*bests, *light] if not b.quiet)} of the {len(bests) + len(light)} reported")
    print(json.dumps({"max_rate": [b.rate for b in bests], "p50_ms": [b.p50 for b in bests],
                      "p99_ms": [b.p99 for b in bests]}))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    reg = sub.add_parser("register", help="maximum sustained authenticated REGISTERs/s")
    reg.add_argument("--runs", type=int, default=3)
    reg.add_argument("--users", type=int, default=3000)
    reg.add_argument("--step", type=float, default=8.0, help="seconds per rate step")
    reg.add_argument("--start", type=float, default=200.0, help="first rate of the ramp (/s)")
    reg.add_argument("--max-rate", type=float, default=20000.0)
    reg.add_argument("--targets", type=int, default=3, help="SIPp instances, one per node (1-3)")
    reg.add_argument("--transport", default="u1", choices=["u1", "t1"], help="SIPp transport (UDP or TCP)")
    reg.add_argument("--quiet-wait", type=float, default=120.0,
                     help="before each step, wait up to this many seconds for other raftpbx/SIPp/pytest processes")
    args = parser.parse_args(argv)
    if args.what == "register":
        return bench_register(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
