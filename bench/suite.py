"""raftpbx against Kamailio 5.6 with the same SIPp load in the same run (issue 8); a benchmark, not a test.

    .venv/bin/python bench/suite.py [register] [calls] [failover] [footprint] [all] [--runs 3] [--step 5] [--json FILE]

Parts (each runnable alone, `all` runs them in this order):
- register: maximum sustained rate of authenticated REGISTERs (bench/sipp/reg_auth.xml: REGISTER, 401,
  REGISTER with digest, 200) found by ramping, and p50/p99 at that rate; on the 3-node raftpbx cluster
  (SIPp spread over the three nodes, every binding committed on a durable quorum before the 200), on
  Kamailio single node and on a 3-node Kamailio `dmq_usrloc` cluster (REGISTERs to node 1, replicated).
- calls: maximum sustained calls/s (bench/sipp/uac_call_auth.xml: INVITE, 407, ACK, INVITE with
  Proxy-Authorization, 100/180/200, ACK, `--hold` ms, BYE, 200; UAS bench/sipp/uas.xml) with setup p50/p99,
  on raftpbx (3 nodes, four commits per call) and on Kamailio single node (`-A WITH_INVITE_AUTH`).
- failover: runs bench/failover.py (issue 5's figures, owned by its author) and includes its JSON.
- footprint: bench/footprint.py (RSS per node with 100,000 bindings and 1,000,000 call records, cold restart,
  catch-up of a new node).

A step passes with under 1% failed transactions, at least 97% of the target rate achieved and p99 under
500 ms (the criteria of the Kamailio anchor, /work/shared/bench-anchor/README.md); rates double from
`--start` until a step fails, then bisect to 5%. A run after the first starts its ramp at half the previous
run's maximum. The systems are interleaved in each run (raftpbx, Kamailio, Kamailio DMQ, then the next run),
so machine noise hits both sides alike; each figure is the median (and range) of `--runs` runs.

CPU: each step records the CPU seconds used by the server processes (raftpbx nodes; Kamailio main process
and its children) and by SIPp (UAC instances via RUSAGE_CHILDREN, UAS instances from /proc/<pid>/stat),
divided by the step's wall time: cores used. The machine's two cores are shared by both and by SIPp.

Same load on both sides: users come from bench/gen_users.py (the anchor's generator: one users.csv for SIPp,
credentials.csv for raftpbx's extensions, a db_text table of HA1s for Kamailio); Kamailio runs the anchor's
configurations from bench/kamailio/ with only the listen address and port filled in. Everything binds
loopback addresses only; every process started here is stopped at the end (by pid). Kamailio and SIPp are
installed with apt-get when missing.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import pbx  # noqa: E402  (bench/pbx.py: raftpbx demo cluster and SIPp REGISTER plumbing)
import pbx_calls  # noqa: E402  (bench/pbx_calls.py: SIPp UAC/UAS call plumbing)

PYTHON = sys.executable
KAMAILIO_IPS = ("127.0.0.31", "127.0.0.32", "127.0.0.33")
KAMAILIO_MODULES = Path("/usr/lib/x86_64-linux-gnu/kamailio/modules")
REALM = "bench.local"
TICK = os.sysconf("SC_CLK_TCK")
MAX_FAILURE_RATIO = 0.01
MIN_ACHIEVED_RATIO = 0.97
MAX_P99_MS = 500.0
RAFTPBX = "raftpbx"
KAM1 = "kamailio"
KAM3 = "kamailio-dmq"


# ------------------------------------------------------------------------------------------- tools
def ensure_packages() -> None:
    """Install SIPp (sip-tester) and Kamailio with apt-get when missing (Debian packages)."""
    missing = []
    if shutil.which("sipp") is None:
        missing.append("sip-tester")
    if shutil.which("kamailio") is None or not (KAMAILIO_MODULES / "dmq_usrloc.so").exists():
        missing.append("kamailio")
    if not missing:
        return
    print(f"installing {' '.join(missing)} with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    argv = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if subprocess.run(argv, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(argv, env=env, check=True)
    pbx.SIPP = shutil.which("sipp")
    pbx_calls.SIPP = pbx.SIPP


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of one live process (0 when it is gone)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    return 0.0


def proc_rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def children_of(pids: set[int]) -> set[int]:
    """`pids` and every live descendant (from /proc/*/stat ppid)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found = set(pids)
    grew = True
    while grew:
        new = {pid for pid, ppid in parents.items() if ppid in found and pid not in found}
        found |= new
        grew = bool(new)
    return found


def children_cpu() -> float:
    """CPU seconds of this process's waited-for children (the SIPp instances of a step)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def sip_ping(host: str, port: int, timeout: float = 0.3) -> bool:
    """True if something answers an OPTIONS on (host, port) over UDP (any SIP response)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(timeout)
        lport = s.getsockname()[1]
        msg = (f"OPTIONS sip:{host}:{port} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{lport};branch=z9hG4bKping{time.monotonic_ns()}\r\n"
               f"Max-Forwards: 70\r\nFrom: <sip:ping@127.0.0.1>;tag=p\r\nTo: <sip:{host}:{port}>\r\n"
               f"Call-ID: ping{time.monotonic_ns()}@127.0.0.1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
        try:
            s.sendto(msg.encode(), (host, port))
            data = s.recv(4096)
        except OSError:
            return False
        return data.startswith(b"SIP/2.0 ")


# ------------------------------------------------------------------------------------------- users
@dataclass
class Users:
    folder: Path
    users: list[tuple[str, str]]  # (extension, password)
    callees: list[tuple[str, str]]  # the UAS extensions of the call benchmark

    @property
    def csv(self) -> Path:
        return self.folder / "users.csv"

    @property
    def dbtext(self) -> Path:
        return self.folder / "dbtext"

    def split(self, parts: int, work: Path) -> list[Path]:
        """users.csv in `parts` consecutive slices (one SIPp instance per raftpbx node)."""
        if parts == 1:
            return [self.csv]
        rows = self.csv.read_text().splitlines()[1:]
        share = len(rows) // parts
        out = []
        for i in range(parts):
            path = work / f"users-{parts}-{i}.csv"
            path.write_text("SEQUENTIAL\n" + "\n".join(rows[i * share:(i + 1) * share]) + "\n")
            out.append(path)
        return out


def make_users(folder: Path, count: int, callees: int) -> Users:
    """The anchor's generator (bench/gen_users.py): same users, passwords and callees for both sides."""
    subprocess.run([PYTHON, str(HERE / "gen_users.py"), "-n", str(count), "--callees", str(callees),
                    "--realm", REALM, "--out", str(folder)], check=True, capture_output=True)
    users = []
    with open(folder / "credentials.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            users.append((row["user"], row["password"]))
    return Users(folder, users, users[:callees])


# ------------------------------------------------------------------------------------------- Kamailio
class Kamailio:
    """Kamailio 5.6 with the anchor's configuration: one node, or a 3-node dmq_usrloc cluster."""

    def __init__(self, work: Path, dbtext: Path, n: int, invite_auth: bool, children: int) -> None:
        self.work = work
        self.dbtext = dbtext
        self.n = n
        self.invite_auth = invite_auth
        self.children = children
        self.nodes: list[dict[str, Any]] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tree: set[int] = set()

    def _render(self, i: int, port: int) -> Path:
        ip = KAMAILIO_IPS[i]
        if self.n == 1:
            text = (HERE / "kamailio" / "kamailio-single.cfg.tmpl").read_text()
        else:
            peers = [p for p in KAMAILIO_IPS[: self.n] if p != ip]
            text = (HERE / "kamailio" / "kamailio-dmq.cfg.tmpl").read_text()
            text = (text.replace("@PEER_A@", peers[0]).replace("@PEER_B@", peers[1])
                    .replace("@DMQ_WORKERS@", "2").replace("@BATCH_CONTACTS@", "50"))
        path = self.work / f"kamailio-node{i + 1}.cfg"
        path.write_text(text.replace("@NODE_IP@", ip).replace("@SIP_PORT@", str(port)))
        return path

    def start(self) -> Kamailio:
        ips = list(KAMAILIO_IPS[: self.n])
        port = pbx.common_free_port(ips, set())
        for i, ip in enumerate(ips):
            cfg = self._render(i, port)
            argv = ["kamailio", "-DD", "-E", "-f", str(cfg), "-n", str(self.children), "-m", "1024", "-M", "16",
                    "-A", f'DBTEXT_URL="text://{self.dbtext}"', "-A", f'CTL_SOCK="unix:{self.work}/node{i + 1}.ctl"']
            if self.n > 1:
                argv += ["-A", f'JSONRPC_SOCK="{self.work}/node{i + 1}.jsonrpc"']
            if self.invite_auth:
                argv += ["-A", "WITH_INVITE_AUTH"]
            with open(self.work / f"kamailio-node{i + 1}.log", "ab") as log:
                proc = subprocess.Popen(argv, cwd=self.work, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        start_new_session=True)
            self.procs.append(proc)
            self.nodes.append({"id": f"kam{i + 1}", "sip": f"{ip}:{port}", "pid": proc.pid})
        deadline = time.monotonic() + 30
        for i in range(len(self.nodes)):
            host, port_ = self.sip(i)
            while not sip_ping(host, port_):
                if self.procs[i].poll() is not None or time.monotonic() > deadline:
                    log = (self.work / f"kamailio-node{i + 1}.log").read_text(errors="replace")[-1500:]
                    self.stop()
                    raise RuntimeError(f"kamailio node {i + 1} did not start:\n{log}")
        self.tree = children_of({p.pid for p in self.procs})
        return self

    def sip(self, i: int) -> tuple[str, int]:
        host, _, port = self.nodes[i]["sip"].rpartition(":")
        return host, int(port)

    def cpu_seconds(self) -> float:
        self.tree |= children_of({p.pid for p in self.procs})
        return sum(proc_cpu(pid) for pid in self.tree)

    def rss_mb(self) -> list[float]:
        return [sum(proc_rss_mb(pid) for pid in children_of({p.pid})) for p in self.procs]

    def registered(self, i: int) -> int | None:
        """usrloc's registered_users on node i (kamcmd over the ctl socket), None if unknown."""
        with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
            out = subprocess.run(["kamcmd", "-s", f"unix:{self.work}/node{i + 1}.ctl", "stats.get_statistics",
                                  "registered_users"], capture_output=True, text=True, timeout=10).stdout
            for token in out.replace("=", " ").split():
                if token.isdigit():
                    return int(token)
        return None

    def stop(self) -> None:
        tree = children_of({p.pid for p in self.procs}) | self.tree
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for pid in tree:  # children left behind by a main process that died first
            if Path(f"/proc/{pid}").exists() and "kamailio" in Path(f"/proc/{pid}/comm").read_text(errors="replace"):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def kamailio(work: Path, users: Users, n: int, invite_auth: bool, children: int) -> Iterator[Kamailio]:
    folder = Path(tempfile.mkdtemp(prefix=f"kam{n}-", dir=work))
    k = Kamailio(folder, users.dbtext, n, invite_auth, children)
    k.start()
    try:
        yield k
    finally:
        k.stop()


@contextlib.contextmanager
def raftpbx(work: Path, users: Users) -> Iterator[pbx.DemoCluster]:
    """A fresh 3-node demo cluster (MD5 digest for SIPp) with every user created; always stopped."""
    service_ip = "127.0.0.70"
    settings = {"sip.digest_algorithms": "MD5", "log.level": "warning",
                "service.address": f"{service_ip}:{pbx.common_free_port([service_ip], set())}"}
    with pbx.demo_cluster(settings) as (cluster, _root):
        took = pbx.create_extensions(cluster, users.users)
        print(f"    raftpbx: 3 nodes up, {len(users.users)} extensions created in {took:.1f} s", flush=True)
        yield cluster


# ------------------------------------------------------------------------------------------- steps
@dataclass
class Step:
    system: str
    rate: float
    achieved: float
    failed_ratio: float
    p50: float | None
    p99: float | None
    p50_b: float | None  # authenticated REGISTER alone / BYE
    p99_b: float | None
    server_cores: float
    sipp_cores: float
    server_us_per_op: float
    load1: float
    passed: bool
    idle_cores: float = 0.0  # the servers' CPU rate just before the step (heartbeats, timers)
    server_us_per_op_net: float = 0.0  # server CPU per op with the idle rate taken out

    def line(self) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.0f}"

        return (f"    {self.system:13s} target {self.rate:6.0f}/s achieved {self.achieved:6.0f}/s "
                f"failed {100 * self.failed_ratio:5.2f}% p50/p99 {ms(self.p50)}/{ms(self.p99)} ms "
                f"server {self.server_cores:4.2f} cores ({self.server_us_per_op_net:5.0f} us/op net of idle "
                f"{self.idle_cores:4.2f}) "
                f"SIPp {self.sipp_cores:4.2f} cores load {self.load1:4.1f} {'PASS' if self.passed else 'fail'}")


def _judge(system: str, rate: float, created: int, successful: int, failed: int, first_ms: float | None,
           last_ms: float | None, main: list[float], other: list[float], server_cpu: float, sipp_cpu: float,
           wall: float, load1: float, idle: float) -> Step:
    attempted = max(created, 1)
    failed_ratio = (failed + max(0, created - successful - failed)) / attempted
    achieved = 0.0
    if first_ms is not None and last_ms is not None and successful > 1:
        achieved = successful / ((last_ms - first_ms) / 1000 + 1 / rate)
    p99 = pbx.percentile(main, 99)
    passed = (created > 0 and failed_ratio < MAX_FAILURE_RATIO and achieved >= MIN_ACHIEVED_RATIO * rate
              and p99 is not None and p99 < MAX_P99_MS)
    net = max(0.0, server_cpu - idle * wall)
    return Step(system, rate, round(achieved, 1), round(failed_ratio, 5), pbx.percentile(main, 50), p99,
                pbx.percentile(other, 50), pbx.percentile(other, 99), round(server_cpu / wall, 3),
                round(sipp_cpu / wall, 3), round(1e6 * server_cpu / max(1, successful), 1), load1, passed,
                round(idle, 3), round(1e6 * net / max(1, successful), 1))


def idle_rate(target: Any, seconds: float = 2.0) -> float:
    """The servers' CPU rate (cores) over `seconds` with no load: what they burn on their own."""
    before, t0 = target.cpu_seconds(), time.monotonic()
    time.sleep(seconds)  # a CPU-rate sample needs an interval
    return (target.cpu_seconds() - before) / (time.monotonic() - t0)


def register_step(system: str, target: Any, csvs: Sequence[Path], rate: float, seconds: float, work: Path) -> Step:
    pbx_calls.settle(target, limit=15.0)
    idle = idle_rate(target)
    load1 = os.getloadavg()[0]
    sipp0, server0, t0 = children_cpu(), target.cpu_seconds(), time.monotonic()
    r = pbx.run_step(target, csvs, rate, seconds, "u1", len(csvs), work)
    wall = time.monotonic() - t0
    return _judge(system, rate, r.created, r.successful, r.failed, r.first_ms, r.last_ms, r.rtt_register,
                  r.rtt_auth, target.cpu_seconds() - server0, children_cpu() - sipp0, wall, load1, idle)


def call_step(system: str, target: Any, csvs: Sequence[Path], callees: Sequence[tuple[str, str]], rate: float,
              seconds: float, hold: int, work: Path) -> Step:
    uas = [pbx_calls.start_uas(target, i, *callees[i], "u1", work, trace=False) for i in range(len(callees))]
    try:
        pbx_calls.settle(target, limit=15.0)
        idle = idle_rate(target)
        load1 = os.getloadavg()[0]
        sipp0, server0, t0 = children_cpu(), target.cpu_seconds(), time.monotonic()
        uas0 = sum(proc_cpu(u.proc.pid) for u in uas)
        r, _ = pbx_calls.run_step(target, csvs, rate, seconds, hold, "u1", work)
        wall = time.monotonic() - t0
        sipp = children_cpu() - sipp0 + sum(proc_cpu(u.proc.pid) for u in uas) - uas0
        server = target.cpu_seconds() - server0
    finally:
        for u in uas:
            pbx_calls._stop(u.proc)
    return _judge(system, rate, r.created, r.successful, r.failed, r.first, r.last, r.setup or [], r.bye or [],
                  server, sipp, wall, load1, idle)


def ramp(measure: Callable[[float], Step], start: float, max_rate: float) -> tuple[Step | None, list[Step]]:
    """Double from `start` until a step fails, then bisect to 5%: the best passing step and all steps."""
    steps: list[Step] = []
    best: Step | None = None
    low, high = 0.0, None
    rate = start
    while rate <= max_rate:
        step = measure(rate)
        steps.append(step)
        print(step.line(), flush=True)
        if step.passed:
            best, low, rate = step, rate, rate * 2
        else:
            high = rate
            break
    while high is not None and high - low > 0.05 * high and high > 20:
        rate = round((low + high) / 2)
        step = measure(rate)
        steps.append(step)
        print(step.line(), flush=True)
        if step.passed:
            best, low = step, rate
        else:
            high = rate
    return best, steps


# ------------------------------------------------------------------------------------------- parts
def part_register(args: argparse.Namespace, users: Users, work: Path) -> dict[str, Any]:
    systems = [s for s in (RAFTPBX, KAM1, KAM3) if s in args.systems]
    out: dict[str, Any] = {s: {"best": [], "light": [], "steps": []} for s in systems}
    starts = {s: args.start_register for s in systems}
    for run in range(1, args.runs + 1):
        for system in systems:
            print(f"  REGISTER run {run}/{args.runs}: {system}", flush=True)
            with contextlib.ExitStack() as stack:
                if system == RAFTPBX:
                    target: Any = stack.enter_context(raftpbx(work, users))
                    csvs = users.split(3, work)
                else:
                    target = stack.enter_context(kamailio(work, users, 3 if system == KAM3 else 1, False,
                                                          args.kamailio_children))
                    csvs = [users.csv]

                def measure(rate: float, target: Any = target, csvs: list[Path] = csvs, system: str = system) -> Step:
                    return register_step(system, target, csvs, rate, args.step, work)

                light = measure(100.0)
                print("    light load " + light.line().strip(), flush=True)
                if args.fixed_rates:  # CPU per operation at the same rates for every system (no ramp)
                    steps = [measure(float(r)) for r in args.fixed_rates.split(",")]
                    for step in steps:
                        print(step.line(), flush=True)
                    best = max((st for st in steps if st.passed), key=lambda st: st.rate, default=None)
                else:
                    best, steps = ramp(measure, starts[system], args.max_rate)
                if system == KAM3:
                    print(f"    dmq_usrloc: registered_users per node {[target.registered(i) for i in range(3)]}",
                          flush=True)
            out[system]["light"].append(asdict(light))
            out[system]["steps"].append([asdict(s) for s in steps])
            out[system]["best"].append(asdict(best) if best else None)
            if best is not None:
                starts[system] = max(args.start_register, round(best.rate / 2))
            print(f"  REGISTER run {run}: {system} max sustained {best.rate if best else 0:.0f}/s", flush=True)
    return out


def part_calls(args: argparse.Namespace, users: Users, work: Path) -> dict[str, Any]:
    systems = [s for s in (RAFTPBX, KAM1) if s in args.systems]
    out: dict[str, Any] = {s: {"best": [], "steps": []} for s in systems}
    starts = {s: args.start_calls for s in systems}
    callers_csv = users.csv
    for run in range(1, args.runs + 1):
        for system in systems:
            print(f"  calls run {run}/{args.runs}: {system}", flush=True)
            with contextlib.ExitStack() as stack:
                if system == RAFTPBX:
                    target: Any = stack.enter_context(raftpbx(work, users))
                    csvs = users.split(3, work)
                else:
                    target = stack.enter_context(kamailio(work, users, 1, True, args.kamailio_children))
                    csvs = [callers_csv]

                def measure(rate: float, target: Any = target, csvs: list[Path] = csvs, system: str = system) -> Step:
                    return call_step(system, target, csvs, users.callees, rate, args.step, args.hold, work)

                best, steps = ramp(measure, starts[system], args.max_rate)
            out[system]["steps"].append([asdict(s) for s in steps])
            out[system]["best"].append(asdict(best) if best else None)
            if best is not None:
                starts[system] = max(args.start_calls, round(best.rate / 2))
            print(f"  calls run {run}: {system} max sustained {best.rate if best else 0:.0f}/s", flush=True)
    return out


def part_failover(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """bench/failover.py (issue 5) as a subprocess with `--json FILE`; that JSON (or the last JSON object it
    printed) is included. Its absence, a failure or a timeout is reported, not raised."""
    script = HERE / "failover.py"
    if not script.exists():
        message = "bench/failover.py is not there yet (issue 5 failover benchmark): no failover figures"
        print(f"  {message}", flush=True)
        return {"available": False, "message": message}
    out_file = work / "failover.json"
    argv = [PYTHON, str(script), "--json", str(out_file), *args.failover_args]
    print(f"  running {' '.join(argv)}", flush=True)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.failover_timeout, check=False)
    except subprocess.TimeoutExpired:
        message = f"bench/failover.py did not finish within {args.failover_timeout:g} s"
        print(f"  {message}", flush=True)
        return {"available": True, "message": message, "argv": argv}
    sys.stdout.write(proc.stdout[-4000:])
    result: dict[str, Any] = {"available": True, "returncode": proc.returncode, "argv": argv}
    doc = None
    if out_file.exists():
        with contextlib.suppress(ValueError):
            doc = json.loads(out_file.read_text())
    if doc is None:
        for line in reversed(proc.stdout.splitlines()):
            if line.strip().startswith("{"):
                with contextlib.suppress(ValueError):
                    doc = json.loads(line)
                    break
    if doc is None:
        result["message"] = "bench/failover.py printed no JSON object" + (
            f" (exit {proc.returncode}: {proc.stderr.strip()[-600:]})" if proc.returncode else "")
        print(f"  {result['message']}", flush=True)
    result["result"] = doc
    return result


def part_footprint(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import footprint  # bench/footprint.py

    return footprint.run(args, work)


# ------------------------------------------------------------------------------------------- report
def _values(bests: Sequence[dict[str, Any] | None], key: str) -> list[float]:
    return [float(b[key]) for b in bests if b is not None and b.get(key) is not None]


def _net(steps: Sequence[dict[str, Any] | None]) -> str:
    """Per-op CPU net of idle where the results have it (older JSON: gross)."""
    return "server_us_per_op_net" if all(s is None or "server_us_per_op_net" in s for s in steps) else "server_us_per_op"


def _mr(values: Sequence[float], digits: int = 0) -> str:
    if not values:
        return "-"
    f = f"{{:,.{digits}f}}"
    return f"{f.format(statistics.median(values))} ({f.format(min(values))}-{f.format(max(values))})"


def _ratio(a: Sequence[float], b: Sequence[float]) -> str:
    if not a or not b or statistics.median(b) == 0:
        return "-"
    return f"{statistics.median(a) / statistics.median(b):.2f}"


def table(results: dict[str, Any]) -> str:
    lines = ["| benchmark | system | max sustained /s | p50 / p99 at max (ms) | server cores | SIPp cores | "
             "server CPU us/op (net of idle if measured) | raftpbx/Kamailio |", "|---|---|---|---|---|---|---|---|"]
    for part, label in (("register", "REGISTER with digest"), ("calls", "call 407..BYE")):
        data = results.get(part)
        if not data:
            continue
        ours = _values(data.get(RAFTPBX, {}).get("best", []), "rate")
        for system, values in data.items():
            bests = values["best"]
            rates = _values(bests, "rate")
            ratio = "" if system == RAFTPBX else _ratio(ours, rates)
            lines.append(f"| {label} | {system} | {_mr(rates)} | {_mr(_values(bests, 'p50'))} / "
                         f"{_mr(_values(bests, 'p99'))} | {_mr(_values(bests, 'server_cores'), 2)} | "
                         f"{_mr(_values(bests, 'sipp_cores'), 2)} | {_mr(_values(bests, _net(bests)))} | "
                         f"{ratio} |")
        if part == "register":
            for system, values in data.items():
                light = values.get("light", [])
                lines.append(f"| REGISTER at 100/s | {system} | | {_mr(_values(light, 'p50'))} / "
                             f"{_mr(_values(light, 'p99'))} | | | {_mr(_values(light, _net(light)))} | |")
    fo = results.get("failover")
    if fo is not None:
        doc = fo.get("result")
        rec = doc.get("recovery_s") if isinstance(doc, dict) else None
        if isinstance(rec, dict):
            def s(v: Any) -> str:
                return "-" if v is None else f"{float(v):.3f}"

            lines.append(f"| failover, kill -9 leader -> first REGISTER 200 via service address (s) | raftpbx | "
                         f"{doc.get('kills')} kills: p50 {s(rec.get('p50'))}, p99 {s(rec.get('p99'))}, max "
                         f"{s(rec.get('max'))}, none in 10 s: {rec.get('missing')}; established calls dropped "
                         f"{doc.get('held_dropped')} of {doc.get('held_calls')}; new calls failed per kill "
                         f"{(doc.get('new_calls') or {}).get('failed_per_kill')} | | | | | |")
        else:
            lines.append(f"| failover | raftpbx | {fo.get('message', '-')} | | | | | |")
    fp = results.get("footprint")
    if fp:
        for key, value in fp.get("summary", {}).items():
            lines.append(f"| footprint | raftpbx | {key}: {value} | | | | | |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        info["mem_mb"] = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    for tool, argv in (("kamailio", ["kamailio", "-v"]), ("sipp", ["sipp", "-v"])):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            text = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
            first = (text.stdout + text.stderr).strip().splitlines()
            info[tool] = next((line.strip() for line in first if "version" in line.lower() or "SIPp v" in line),
                              first[0] if first else "?")
    return info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", nargs="*", default=["all"], choices=["register", "calls", "failover", "footprint", "all"],
                        help="parts to run, in this order (default all)")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median and range)")
    parser.add_argument("--step", type=float, default=5.0, help="seconds per rate step")
    parser.add_argument("--users", type=int, default=3000, help="users in users.csv (extensions on both sides)")
    parser.add_argument("--start-register", type=float, default=400.0)
    parser.add_argument("--start-calls", type=float, default=100.0)
    parser.add_argument("--max-rate", type=float, default=20000.0)
    parser.add_argument("--fixed-rates", default="",
                        help="register: run these rates (comma-separated /s) instead of the ramp")
    parser.add_argument("--hold", type=int, default=1000, help="call hold time, ms between ACK and BYE")
    parser.add_argument("--kamailio-children", type=int, default=2, help="Kamailio -n (the anchor used 2)")
    parser.add_argument("--systems", default=f"{RAFTPBX},{KAM1},{KAM3}",
                        help="comma list among raftpbx, kamailio, kamailio-dmq")
    parser.add_argument("--failover-args", default="", help="extra arguments for bench/failover.py (one string)")
    parser.add_argument("--failover-timeout", type=float, default=1800.0)
    parser.add_argument("--bindings", type=int, default=100_000, help="footprint: bindings")
    parser.add_argument("--calls", type=int, default=1_000_000, help="footprint: call records")
    parser.add_argument("--batch", type=int, default=64, help="footprint: commands per log entry when loading")
    parser.add_argument("--inflight", type=int, default=2, help="footprint: log entries in flight when loading")
    parser.add_argument("--json", type=Path, default=None, help="write the results here (default bench/results/)")
    args = parser.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    args.failover_args = args.failover_args.split()
    parts = [p for p in ("register", "calls", "failover", "footprint") if p in args.what or "all" in args.what]
    if "register" in parts or "calls" in parts:
        ensure_packages()
    started = datetime.now(UTC)
    results: dict[str, Any] = {"started": started.isoformat(timespec="seconds"), "machine": machine(),
                               "loadavg_start": os.getloadavg(), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                          for k, v in vars(args).items()}}
    signal.signal(signal.SIGTERM, pbx_calls._terminate)
    work = Path(tempfile.mkdtemp(prefix="raftpbx-suite-"))
    try:
        users = make_users(work / "data", args.users, 3)
        for part in parts:
            print(f"== {part} ({datetime.now(UTC):%H:%M:%S} UTC, load {os.getloadavg()[0]:.1f})", flush=True)
            if part == "register":
                results[part] = part_register(args, users, work)
            elif part == "calls":
                results[part] = part_calls(args, users, work)
            elif part == "failover":
                results[part] = part_failover(args, work)
            else:
                results[part] = part_footprint(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["loadavg_end"] = os.getloadavg()
    text = table(results)
    results["table"] = text
    print()
    print(f"raftpbx (3 nodes, durable quorum commits) vs Kamailio 5.6, same SIPp scenarios, {args.runs} run(s), "
          f"median (range); load average at start {results['loadavg_start'][0]:.1f}, end {results['loadavg_end'][0]:.1f}")
    print(text)
    path = args.json or HERE / "results" / f"suite-{'-'.join(parts)}-{started:%Y%m%dT%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
