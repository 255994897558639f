"""Footprint of a 3-node raftpbx cluster holding a large state (issue 8); a benchmark, not a test.

    .venv/bin/python bench/footprint.py [--bindings 100000] [--calls 1000000] [--runs 3] [--batch 64]
                                        [--stop term|kill|both]
    (also `bench/suite.py footprint`)

Measures, with `--bindings` extensions each with one binding and `--calls` answered call records:
- resident memory (VmRSS) of every node once all three applied the whole state, and again after restarts;
- cold restart: a follower stopped and started again by plain `raftpbx node`; time from spawn to its admin
  RPC answering with the whole state applied (`applied_index` back to where it was) and its SIP port answering
  OPTIONS. How it is stopped (`--stop`, every figure names it):
  - `term` (default): SIGTERM, a clean stop: the node writes a full dump first (replication,
    `stop_dump_min_entries`), so the restart loads the dump and replays almost nothing;
  - `kill`: SIGKILL to the node's process group, a crash (kill -9, power loss but with the OS page cache
    kept): the restart loads the last compaction's dump and replays the journal tail written since. That
    tail is whatever the load left (bounded by compaction: `raft.compaction_min_entries` entries, 300 s, 16 MB
    of commands), so each figure prints the tail the restart found (entries and command bytes, read from the
    journal file after the stop) and the RSS of the node right before the stop;
  - `both`: the `kill` runs first (a clean stop would dump the tail away), then the `term` runs; both
    figures side by side.
  With `--kill-tail-mb X` (kill runs only) more calls are added before each kill, 1,000 at a time, until the
  follower's journal holds at least X MB of commands: the crash near the worst case (compaction starts past
  16 MB, so X = 15 is the tail just before it; the journal is read from its file, the node running). The
  extra calls are counted in the figure; a compaction during the top-up empties the tail and it goes on.
  The OS page cache is not dropped (a shared machine): "cold" is the process;
- catch-up of a new node: a fourth member added (`cluster.add_node` on the leader, then `raftpbx node --join
  --join-token` with an empty data dir, like a replacement machine); time from its start until its
  `applied_index` reaches the leader's (the last state entry) taken at its start; then it is removed again.
Each restart / catch-up measure is repeated `--runs` times: median and range.

How the state is generated quickly: the nodes run bench/footprint_node.py, which is `raftpbx node` plus a
bench-only admin RPC `bench.load` that builds ordinary events on the leader (ExtensionCreated,
BindingsUpdated, CallStarted + CallAnswered + CallEnded per call) and proposes them through the node's own
Replicator in log entries of `--batch` commands, several entries in flight. Every node applies them like
events from SIP (state, dedupe window, call-record projection into SQLite); nothing is written around Raft.
Restarts and the catch-up use plain `raftpbx node` (no loader).

Loopback only; every node started here is stopped at the end by pid; the workdir is removed (kept, with the
node logs, when FOOTPRINT_KEEP=1).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from pbx import common_free_port  # noqa: E402

from raftpbx.admin import AdminClient, AdminError, ConnectionFailed  # noqa: E402
from raftpbx.demo import MARKER_NAME, node_layout, write_configs  # noqa: E402

PYTHON = sys.executable
STOPS = {"term": "SIGTERM (clean stop, dump written)", "kill": "SIGKILL (crash, journal tail replayed)"}
TICK = os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def load_avg() -> str:
    """The 1-minute load average, for every printed figure (the machine is shared: read figures with it)."""
    return f"load {os.getloadavg()[0]:.1f}"


def journal_tail(data_dir: Path) -> tuple[int, int]:
    """(entries, command bytes) in the node's Raft journal file, i.e. what its next start replays after the
    dump. Read from the file (pysyncobj's FileJournal layout: a 40-byte header whose last 4 bytes are the end
    offset of the records, then records `size | idx, term | command | size`) while the node is stopped."""
    with contextlib.suppress(OSError, struct.error):
        data = (data_dir / "raft.journal").read_bytes()
        end = struct.unpack_from("<I", data, 36)[0]
        offset, entries, size = 40, 0, 0
        while offset < end:
            record = struct.unpack_from("<I", data, offset)[0]
            entries += 1
            size += record - 16
            offset += record + 8
        return entries, size
    return -1, -1


def top_up_tail(cluster: Cluster, follower: int, target_mb: float, next_call: int, users: int, batch: int,
                inflight: int) -> int:
    """Add calls (numbered from `next_call`, 1,000 per `bench.load`) until the follower's journal file holds
    at least `target_mb` MB of commands and the follower applied all of them; at most 200 rounds. Returns
    the next call number."""
    data_dir = Path(cluster.nodes[follower]["data_dir"])
    for _ in range(200):
        leader = cluster.leader()
        target = int((cluster.info(leader) or {}).get("applied_index") or 0)
        if cluster.wait_applied(follower, target, 120) is None:
            raise RuntimeError(f"node{follower + 1} did not apply index {target} in 120 s while topping up")
        if journal_tail(data_dir)[1] >= target_mb * 2**20:
            return next_call
        result = cluster.client(leader, timeout=180.0).call("bench.load", {
            "kind": "calls", "start": next_call, "count": 1000, "batch": batch, "inflight": inflight,
            "users": users}, retry=False)
        if not isinstance(result, dict) or "error" in result:
            raise RuntimeError(f"bench.load while topping up the journal: {result}")
        next_call += 1000
    raise RuntimeError(f"the journal of node{follower + 1} did not reach {target_mb} MB in 200 rounds")


def du_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1)


class Cluster:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        ips = [f"127.0.0.{10 + i}" for i in (1, 2, 3)]
        used: set[int] = set()
        raft, admin, sip = (common_free_port(ips, used) for _ in range(3))
        self.nodes = node_layout(workdir, 3, raft, admin, sip)
        service_ip = "127.0.0.71"
        write_configs(workdir, self.nodes, {"log.level": "warning", "sip.digest_algorithms": "MD5",
                                            "service.address": f"{service_ip}:{common_free_port([service_ip], set())}"})
        self.token = (workdir / "admin.token").read_text().strip()
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def new_node(self, k: int) -> int:
        """A fourth node's config (id node{4+k}, address 127.0.0.{14+k}, node3's ports); its index."""
        src = self.nodes[2]
        node_id, ip = f"node{4 + k}", f"127.0.0.{14 + k}"
        node = {key: str(value).replace("node3", node_id).replace("127.0.0.13", ip) for key, value in src.items()}
        Path(node["data_dir"]).mkdir(mode=0o700, parents=True, exist_ok=True)
        text = Path(src["config"]).read_text().replace("node3", node_id).replace("127.0.0.13", ip)
        # node3's config lists node1 and node2 only: the new member must know node3 too (it may lead, and
        # pysyncobj connects a pair from the higher address only, so node4 must dial node3 itself).
        text += f'\n[peers."node3"]\nraft = "{src["raft"]}"\nadmin_url = "{src["admin_url"]}"\n'
        Path(node["config"]).write_text(text)
        self.nodes.append(node)
        return len(self.nodes) - 1

    def start(self, i: int, loader: bool, join_token: str | None = None) -> float:
        node = self.nodes[i]
        argv = [PYTHON, str(HERE / "footprint_node.py")] if loader else [PYTHON, "-P", "-m", "raftpbx.cli"]
        argv += ["node", "--config", node["config"]]
        if join_token is not None:
            argv += ["--join", "--join-token", join_token]
        elif not (Path(node["data_dir"]) / MARKER_NAME).exists():
            argv.append("--bootstrap")
        with open(node["log"], "ab") as log:
            self.procs[i] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)
        node["pid"] = self.procs[i].pid
        return time.monotonic()

    def sip(self, i: int) -> tuple[str, int]:
        host, _, port = self.nodes[i]["sip"].rpartition(":")
        return host, int(port)

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self.procs.values():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / TICK
        return total

    def stop(self, i: int, crash: bool = False) -> None:
        """SIGTERM (a clean stop), or with `crash` SIGKILL to the node's whole process group (it was started
        in a session of its own: a forked dump writer dies with it, as on a power loss)."""
        proc = self.procs.pop(i, None)
        if proc is None or proc.poll() is not None:
            return
        if crash:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            return
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def rss_all(self) -> list[float]:
        return [rss_mb(self.procs[i].pid) for i in sorted(self.procs)]

    def views(self) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        for i in range(len(self.nodes)):
            info = self.info(i) or {}
            out.append((self.nodes[i]["id"], info.get("role"), info.get("term"), info.get("commit_index"),
                        info.get("applied_index")))
        return out

    def stop_all(self) -> None:
        for i in list(self.procs):
            self.stop(i)

    def client(self, i: int, timeout: float = 10.0) -> AdminClient:
        return AdminClient([self.nodes[i]["admin_url"]], self.token, timeout=timeout)

    def info(self, i: int) -> dict[str, Any] | None:
        with contextlib.suppress(AdminError, ConnectionFailed, OSError):
            result = self.client(i, timeout=2.0).call("node.info", retry=False)
            return result if isinstance(result, dict) else None
        return None

    def leader(self, limit: float = 60.0) -> int:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            for i in range(3):
                info = self.info(i)
                if info is not None and info.get("role", "").lower().endswith("leader") and info.get("leader"):
                    return i
            time.sleep(0.2)  # polling the election: no event to wait on from outside
        raise RuntimeError("no leader within the limit")

    def wait_applied(self, i: int, index: int, limit: float,
                     proc: subprocess.Popen[bytes] | None = None) -> float | None:
        """Seconds (monotonic clock) at which node i reports applied_index >= index; None at the limit or
        as soon as `proc` (the node's process) has exited."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and (proc is None or proc.poll() is None):
            info = self.info(i)
            if info is not None and int(info.get("applied_index") or 0) >= index:
                return time.monotonic()
            time.sleep(0.05)  # polling another process's progress through its RPC
        return None


def load(cluster: Cluster, kind: str, total: int, chunk: int, batch: int, users: int, inflight: int,
         checkpoints: list[dict[str, Any]]) -> dict[str, Any]:
    """`total` items of `kind` through `bench.load` on the leader, one chunk at a time (a chunk again after a
    leader change: its op_ids dedupe what already committed). Raises RuntimeError when a chunk fails 5 times."""
    began = time.monotonic()
    rejected = entries = done = 0
    for start in range(0, total, chunk):
        error = ""
        for _ in range(5):
            try:
                result = cluster.client(cluster.leader(), timeout=180.0).call("bench.load", {
                    "kind": kind, "start": start, "count": min(chunk, total - start), "batch": batch,
                    "inflight": inflight, "users": users}, retry=False)
            except (AdminError, ConnectionFailed, RuntimeError) as exc:
                error = repr(exc)
                continue
            assert isinstance(result, dict)
            if "error" not in result:
                break
            error = str(result["error"])
        else:
            raise RuntimeError(f"bench.load {kind} from {start} failed 5 times: {error}; "
                               f"nodes (role, term, commit, applied): {cluster.views()}")
        rejected += int(result["rejected"])
        entries += int(result["entries"])
        done = start + min(chunk, total - start)
        if kind == "calls" and done % max(chunk, total // 5) == 0:
            checkpoints.append({"after": f"{done} calls", "rss_mb": cluster.rss_all()})
            print(f"    {done} calls loaded ({done / (time.monotonic() - began):,.0f}/s), RSS {cluster.rss_all()} MB "
                  f"({load_avg()})",
                  flush=True)
    took = time.monotonic() - began
    checkpoints.append({"after": f"{total} {kind}", "rss_mb": cluster.rss_all()})
    print(f"    loaded {total} {kind} in {took:.1f} s ({total / took:,.0f}/s, {entries} entries, "
          f"{rejected} rejected), RSS {checkpoints[-1]['rss_mb']} MB", flush=True)
    return {"kind": kind, "count": total, "seconds": round(took, 2), "entries": entries, "rejected": rejected}


def sip_answers(cluster: Cluster, i: int) -> bool:
    from suite import sip_ping

    host, _, port = cluster.nodes[i]["sip"].rpartition(":")
    return sip_ping(host, int(port))


def _mr(values: list[float], unit: str, digits: int = 2) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.{digits}f} {unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="footprint-", dir=work))
    cluster = Cluster(workdir)
    out: dict[str, Any] = {"bindings": args.bindings, "calls": args.calls, "batch": args.batch, "loads": []}
    try:
        for i in range(3):
            cluster.start(i, loader=True)
        leader = cluster.leader()
        print(f"  footprint: 3 nodes up, leader node{leader + 1}; generating the state", flush=True)
        out["rss_empty_mb"] = [rss_mb(cluster.procs[i].pid) for i in range(3)]
        out["rss_checkpoints"] = checkpoints = []
        try:
            for kind, total in (("extensions", args.bindings), ("bindings", args.bindings), ("calls", args.calls)):
                out["loads"].append(load(cluster, kind, total, 10000, args.batch, args.bindings, args.inflight,
                                         checkpoints))
        except RuntimeError as exc:
            out["load_error"] = str(exc)
            out["rss_partial_mb"] = cluster.rss_all()
            out["summary"] = {"state generation FAILED": str(exc)[:600],
                              "RSS when it stopped (MB)": out["rss_partial_mb"],
                              "RSS checkpoints": "; ".join(f"{c['after']}: {c['rss_mb']}" for c in checkpoints)}
            print(f"    state generation failed: {exc}", flush=True)
            return out
        leader = cluster.leader()
        target = int((cluster.info(leader) or {}).get("applied_index") or 0)
        for i in range(3):
            if cluster.wait_applied(i, target, 600) is None:
                raise RuntimeError(f"node{i + 1} did not apply the state in 600 s")
        time.sleep(2.0)  # let the SQLite writer finish its queue before sampling memory (not a condition)
        out["applied_index"] = target
        out["rss_loaded_mb"] = [rss_mb(cluster.procs[i].pid) for i in range(3)]
        out["disk_mb"] = [du_mb(Path(n["data_dir"])) for n in cluster.nodes]
        print(f"    RSS with the state: {out['rss_loaded_mb']} MB; data dirs {out['disk_mb']} MB ({load_avg()})", flush=True)
        follower = next(i for i in range(3) if i != leader)
        stop_mode = getattr(args, "stop", "term")  # bench/suite.py's arguments have no --stop
        modes = ["kill", "term"] if stop_mode == "both" else [stop_mode]
        measured: dict[str, dict[str, list[Any]]] = {
            m: {"applied_s": [], "sip_s": [], "rss_after_mb": [], "rss_before_stop_mb": [], "tail_entries": [],
                "tail_mb": []} for m in modes}
        kill_tail_mb = float(getattr(args, "kill_tail_mb", 0.0))
        next_call = args.calls
        catchups: list[float] = []
        rss_caught: list[float] = []
        data_dir = Path(cluster.nodes[follower]["data_dir"])
        try:
            for mode in modes:  # the kill runs first: a clean stop writes a dump and the tail is gone
                fig = measured[mode]
                for k in range(args.runs):
                    if mode == "kill" and kill_tail_mb > 0:
                        began = time.monotonic()
                        added = top_up_tail(cluster, follower, kill_tail_mb, next_call, args.bindings, args.batch,
                                            args.inflight) - next_call
                        next_call += added
                        print(f"    {added} more calls to fill the journal to {kill_tail_mb} MB "
                              f"({time.monotonic() - began:.1f} s)", flush=True)
                    before = int((cluster.info(follower) or {}).get("applied_index") or 0)
                    rss_before = rss_mb(cluster.procs[follower].pid)
                    cluster.stop(follower, crash=mode == "kill")
                    entries, size = journal_tail(data_dir)
                    t0 = cluster.start(follower, loader=False)
                    done = cluster.wait_applied(follower, before, 300)
                    if done is None:
                        raise RuntimeError(f"node{follower + 1} did not come back in 300 s after {STOPS[mode]}")
                    deadline = time.monotonic() + 30
                    while not sip_answers(cluster, follower) and time.monotonic() < deadline:
                        pass  # sip_answers waits up to 0.3 s per probe
                    fig["applied_s"].append(round(done - t0, 2))
                    fig["sip_s"].append(round(time.monotonic() - t0, 2))
                    fig["rss_after_mb"].append(rss_mb(cluster.procs[follower].pid))
                    fig["rss_before_stop_mb"].append(rss_before)
                    fig["tail_entries"].append(entries)
                    fig["tail_mb"].append(round(size / 2**20, 2))
                    print(f"    cold restart after {STOPS[mode]} {k + 1}: node{follower + 1} (RSS {rss_before} MB before "
                          f"the stop; journal tail to replay {entries} entries, {fig['tail_mb'][-1]} MB of commands) "
                          f"had its state applied {fig['applied_s'][-1]:.2f} s after spawn, SIP answering after "
                          f"{fig['sip_s'][-1]:.2f} s, RSS {fig['rss_after_mb'][-1]} MB ({load_avg()})", flush=True)
            for k in range(args.runs):
                leader = cluster.leader()
                i = cluster.new_node(k)
                node = cluster.nodes[i]
                joined = cluster.client(leader, timeout=30.0).call(
                    "cluster.add_node", {"id": node["id"], "raft": node["raft"], "admin_url": node["admin_url"]})
                # the last state entry (membership entries after it move commit_index, not applied_index)
                target = int((cluster.info(leader) or {}).get("applied_index") or 0)
                t0 = cluster.start(i, loader=False, join_token=str(joined["token"]))
                done = cluster.wait_applied(i, target, 600, proc=cluster.procs[i])
                if done is None:
                    tail = Path(node["log"]).read_text(errors="replace")[-400:]
                    exited = cluster.procs[i].poll()
                    why = f"exited with {exited}" if exited is not None else "still behind after 600 s"
                    raise RuntimeError(f"{node['id']} did not catch up ({why}); nodes (id, role, term, commit, "
                                       f"applied): {cluster.views()}; its log: {tail}")
                catchups.append(round(done - t0, 2))
                rss_caught.append(rss_mb(cluster.procs[i].pid))
                print(f"    catch-up {k + 1}: new member {node['id']} reached index {target} {catchups[-1]:.2f} s after "
                      f"its start, RSS {rss_caught[-1]} MB ({load_avg()})", flush=True)
                cluster.client(leader, timeout=30.0).call("cluster.remove_node", {"id": node["id"]})
                cluster.stop(i)
        except (RuntimeError, AdminError, ConnectionFailed) as exc:  # keep what was measured
            out["measure_error"] = str(exc)[:600]
            print(f"    measuring stopped: {exc}", flush=True)
        out["cold_restart"] = measured  # per stop mode: "term" and/or "kill"
        out["calls_added_for_the_tail"] = next_call - args.calls
        if "term" in measured:  # the keys of earlier runs (SIGTERM)
            out.update({"cold_restart_s": measured["term"]["applied_s"], "cold_restart_sip_s": measured["term"]["sip_s"],
                        "rss_after_restart_mb": measured["term"]["rss_after_mb"]})
        out.update({"catch_up_s": catchups, "rss_after_catch_up_mb": rss_caught})
        out["summary"] = {
            f"RSS per node with {args.bindings:,} bindings + {args.calls:,} call records": _mr(out["rss_loaded_mb"], "MB", 0)}
        for mode, fig in measured.items():
            out["summary"].update({
                f"cold restart after {STOPS[mode]} (spawn -> whole state applied)": _mr(fig["applied_s"], "s"),
                f"cold restart after {STOPS[mode]} (spawn -> SIP answering OPTIONS)": _mr(fig["sip_s"], "s"),
                f"cold restart after SIG{mode.upper()}: journal tail replayed (entries; MB of commands)": f"{fig['tail_entries']}; {fig['tail_mb']}",
                f"cold restart after SIG{mode.upper()}: RSS before the stop / after the restart (MB)": f"{fig['rss_before_stop_mb']} / {fig['rss_after_mb']}",
            })
        if kill_tail_mb > 0:
            out["summary"]["calls added to fill the journal before the kills"] = f"{next_call - args.calls:,}"
        out["summary"].update({
            "new member catch-up (start with join token -> leader's applied index)": _mr(catchups, "s"),
            "RSS checkpoints (MB per node)": "; ".join(f"{c['after']}: {c['rss_mb']}" for c in checkpoints),
            "state generation": ", ".join(f"{ld['kind']} {ld['count'] / ld['seconds']:,.0f}/s" for ld in out["loads"]),
        })
        if "measure_error" in out:
            out["summary"]["measuring stopped early"] = out["measure_error"]
    finally:
        cluster.stop_all()
        if os.environ.get("FOOTPRINT_KEEP") == "1":  # keep data dirs and node logs for a post-mortem
            out["workdir"] = str(workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return out


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM: unwind so that every node started here is stopped


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bindings", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--inflight", type=int, default=2, help="log entries in flight while loading")
    parser.add_argument("--batch", type=int, default=64, help="commands per log entry")
    parser.add_argument("--stop", choices=("term", "kill", "both"), default="term",
                        help="how the follower is stopped for the cold restart: SIGTERM (clean stop), SIGKILL (crash) "
                             "or both (kill runs first)")
    parser.add_argument("--kill-tail-mb", type=float, default=0.0,
                        help="before each kill, add calls until the follower's journal holds this many MB of commands "
                             "(compaction starts past 16: 15 is near the worst crash)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raftpbx-footprint-"))
    try:
        out = run(args, work)
    finally:
        if os.environ.get("FOOTPRINT_KEEP") != "1":
            shutil.rmtree(work, ignore_errors=True)
    for key, value in out.get("summary", {}).items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
