"""The chaos runner: scenarios, and one run = cluster + workload + one fault per round + checks + report.

Theory of operation
-------------------
`run(options)`:
1. starts the cluster (loopback lab: chaos/cluster.py; netns lab: chaos/netns.py) in the run's workdir, creates the workload's users,
   and finds out whether the nodes publish and serve the service address (then phones and SIPp use it;
   otherwise phones are spread over the nodes' own addresses and SIPp targets each node);
2. starts the workload: the admin writer, SIPp REGISTER load, phone pairs, and a sampler thread that
   records every 0.25 s the agreed leader and which nodes hold the service address;
3. for each round of the seeded schedule: places the calls, injects the fault, holds it, heals it, waits
   (with a deadline) until a leader is agreed and every voter applied what the leader had committed, ends
   the calls with BYE, and prints
   one progress line;
4. stops the workload, waits for convergence, collects every node's state, runs every checker
   (chaos/checkers.py) and writes report.json, summary.txt and timeline.html.
A passing run removes the nodes' data dirs (history, logs and report stay); a failing run keeps everything
and prints the command that replays it with the same seed.

Invariant: every process the run starts (nodes, phones, SIPp) is stopped before `run` returns, whatever
happened (finally blocks); the sampler and writer threads are joined.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chaos import checkers, faults
from chaos.cluster import LoopbackCluster, holds_service, wait_until
from chaos.history import History, load
from chaos.report import write_all
from chaos.workload import AdminWriter, CallWorkload, RegisterLoad


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    faults: tuple[str, ...]
    nodes: int = 3
    lab: str = "loopback"
    rounds: int = 10
    pairs: int = 2
    register_rate: float = 10.0


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("smoke", "leader kill, leader pause and a leader partition mid-call (the `make chaos-smoke` gate)",
             ("kill-leader", "isolate-leader", "pause-leader", "kill-follower"), rounds=4),
    Scenario("network", "partitions (symmetric, one way, leader isolated) and loss between nodes",
             ("isolate-leader", "partition-split", "oneway-leader", "oneway-follower", "loss", "delay"),
             rounds=12),
    Scenario("mixed", "every fault the loopback lab offers",
             ("kill-leader", "kill-follower", "pause-leader", "pause-follower", "restart-leader", "kill-all",
              "wipe-replace", "rolling-restart", "transfer-leader", "drain-leader", "isolate-leader",
              "partition-split", "oneway-leader", "oneway-follower", "loss", "delay"), rounds=100),
    Scenario("mixed5", "every fault on five nodes, two nodes at a time included",
             ("kill-leader", "kill-follower", "kill-two-of-five", "pause-leader", "pause-follower",
              "restart-leader", "kill-all", "wipe-replace", "rolling-restart", "drain-leader", "isolate-leader",
              "partition-split", "oneway-leader", "loss", "delay"),
             nodes=5, rounds=30),
    Scenario("degraded", "packet loss and delay between nodes", ("loss", "delay"), rounds=4),
    Scenario("kills", "kill -9 only (leader and follower)", ("kill-leader", "kill-follower"), rounds=10),
    Scenario("pauses", "SIGSTOP/SIGCONT only (leader and follower)", ("pause-leader", "pause-follower"), rounds=10),
    Scenario("membership", "wipe-and-replace and rolling restarts", ("wipe-replace", "rolling-restart"), rounds=6),
)}


@dataclass
class Options:
    scenario: str
    rounds: int | None = None
    seed: int = 1
    lab: str | None = None
    nodes: int | None = None
    workdir: Path | None = None
    keep: bool = False
    quiet: bool = False


def replay_command(opts: Options, scenario: Scenario, rounds: int, nodes: int, lab: str) -> str:
    argv = ["raftpbx-chaos", "run", "--scenario", scenario.name, "--rounds", str(rounds), "--seed", str(opts.seed),
            "--lab", lab, "--nodes", str(nodes)]
    return shlex.join(argv)


class Sampler:
    """Records the agreed leader and the service address holders every `interval` seconds."""

    def __init__(self, cluster: LoopbackCluster, history: History, interval: float = 0.25) -> None:
        self.cluster = cluster
        self.history = history
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="chaos-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                infos = self.cluster.infos(timeout=0.3)
                votes = Counter(str(i["leader"]) for i in infos.values() if i and i.get("leader"))
                majority = len(infos) // 2 + 1
                leader = next((n for n, c in votes.items() if c >= majority), None)
                holders = []
                known = False
                for node_id, info in infos.items():
                    if info is None:
                        continue
                    held = holds_service(info)
                    known = known or held is not None
                    if held:
                        holders.append(node_id)
                self.history.record("sample", leader=leader, holders=holders, known=known,
                                    live=sorted(n for n, i in infos.items() if i))
            except Exception as exc:  # the sampler must never die quietly
                self.history.record("note", text=f"sampler: {exc!r}")
            self._stop.wait(self.interval)


def _print(opts: Options, text: str) -> None:
    if not opts.quiet:
        print(text, flush=True)


def run(opts: Options) -> tuple[bool, Path, dict[str, Any]]:
    """One chaos run; returns (all checkers passed, workdir, report meta)."""
    scenario = SCENARIOS[opts.scenario]
    lab = opts.lab or scenario.lab
    nodes = opts.nodes or scenario.nodes
    rounds = opts.rounds if opts.rounds is not None else scenario.rounds
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = opts.workdir or Path("workdir") / "chaos" / f"{scenario.name}-s{opts.seed}-{stamp}"
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    replay = replay_command(opts, scenario, rounds, nodes, lab)
    history = History(workdir / "history.jsonl")
    cluster: LoopbackCluster
    if lab == "netns":
        from chaos.netns import NetnsCluster

        cluster = NetnsCluster(workdir / "cluster", nodes, opts.seed)
    else:
        cluster = LoopbackCluster(workdir / "cluster", nodes, opts.seed)
    writer = AdminWriter(cluster, history, opts.seed)
    sipp = RegisterLoad(cluster, history, workdir / "sipp", rate=scenario.register_rate)
    calls = CallWorkload(cluster, history, workdir / "phones", pairs=scenario.pairs)
    sampler = Sampler(cluster, history)
    t_start = time.monotonic()
    fault_counts: Counter[str] = Counter()
    aborted: str | None = None
    meta: dict[str, Any] = {"scenario": scenario.name, "seed": opts.seed, "rounds": rounds, "lab": lab,
                            "nodes": nodes, "workdir": str(workdir), "replay": replay}
    _print(opts, f"chaos: {scenario.name} seed {opts.seed}, {rounds} rounds, {nodes} nodes ({lab}); "
                 f"workdir {workdir}")
    results: list[checkers.CheckResult] = []
    try:
        history.record("note", text=f"run {replay}")
        cluster.start()
        methods = faults.cluster_methods(cluster)
        names = [n for n in scenario.faults if faults.FAULTS[n].applies(lab, nodes, methods)]
        skipped = [n for n in scenario.faults if n not in names]
        if skipped:
            history.record("note", text=f"faults not applicable here: {skipped}")
            _print(opts, f"chaos: skipping faults not applicable here: {', '.join(skipped)}")
        plan = faults.schedule(names, rounds, opts.seed)
        sampler.start()
        _, service_known = cluster.service_holders()
        # The service address is used when the nodes serve it (H1's loopback mode); a holder must appear.
        use_service = service_known and bool(
            wait_until(lambda: cluster.service_holders()[0], 10.0, 0.1))
        meta["service_address"] = use_service
        history.record("note", text=f"service address in use: {use_service}")
        sipp.prepare()
        calls.start(use_service)
        sipp.start(use_service)
        writer.start()
        for r, name in enumerate(plan, start=1):
            fault = faults.FAULTS[name]
            ctx = faults.Context(cluster, faults.round_rng(opts.seed, r), r)
            history.record("round", round=r, phase="start", fault=name)
            t_round = time.monotonic()
            calls.start_round(r)
            targets: list[str] = []
            t_inject = time.time()
            try:
                targets, detail = fault.inject(ctx)
                history.record("fault", round=r, name=name, phase="inject", targets=targets, detail=detail,
                               started=t_inject)
                time.sleep(fault.hold(ctx))  # the fault's duration (part of the fault, not a wait)
            except Exception as exc:  # the cluster refused or botched the operation: a finding, not the end
                history.record("fault", round=r, name=name, phase="inject-failed", error=f"{type(exc).__name__}: "
                               f"{exc}", started=t_inject)
                _print(opts, f"round {r:3d}: {name} could not be injected: {exc}")
            finally:
                fault.heal(ctx)
                history.record("fault", round=r, name=name, phase="heal", targets=targets)
            t_heal = time.monotonic()
            converged = cluster.wait_caught_up(30.0)
            leader = cluster.leader()
            recovered = time.monotonic() - t_heal
            if use_service:  # recovered means serving too: the next fault waits for a stretch of answered SIP
                history.record("fault", round=r, name=name, phase="sip-available",
                               ok=cluster.wait_sip_available(), seconds=round(time.monotonic() - t_heal, 3))
            history.record("fault", round=r, name=name, phase="recovered", seconds=round(recovered, 3),
                           leader=leader.id if leader else None, caught_up=converged)
            calls.end_round(r)
            fault_counts[name] += 1
            history.record("round", round=r, phase="end", fault=name)
            _print(opts, f"round {r:3d}/{rounds} {name:16s} on {','.join(targets) or '-':14s} "
                         f"recovered in {recovered:5.2f} s, leader {leader.id if leader else 'NONE'}, "
                         f"{'caught up' if converged else 'NOT CAUGHT UP'}; writes ok {writer.counts['ok']} "
                         f"fail {writer.counts['fail']} unknown {writer.counts['unknown']} "
                         f"({time.monotonic() - t_round:.1f} s)")
            if not converged and leader is None:
                aborted = f"round {r}: the cluster did not recover (no leader within 30 s)"
                break
    except BaseException as exc:
        aborted = f"{type(exc).__name__}: {exc}"
        history.record("note", text=f"aborted: {aborted}", traceback=traceback.format_exc())
        if isinstance(exc, KeyboardInterrupt):
            raise
    finally:
        writer.stop()
        for node in cluster.nodes:
            node.sigcont()
        try:
            if any(p.call for p in calls.pairs):
                calls.end_round(0)
        except Exception as exc:
            history.record("note", text=f"ending calls: {exc!r}")
        sipp.stop()
        sampler.stop()
        phone_errors = calls.errors()
        calls.close()
        states: dict[str, Any] = {"nodes": {}}
        try:
            for node in cluster.voters():
                if not node.alive:
                    node.start()
            cluster.wait_leader(30.0)
            cluster.wait_converged(30.0)
            states = cluster.snapshot_state()
        except Exception as exc:
            history.record("note", text=f"collecting the final states: {exc!r}")
        finally:
            cluster.close()
        history.record("note", text="collected final states")
        history.close()
    (workdir / "states.json").write_text(json.dumps(states, default=str))
    entries = load(workdir / "history.jsonl")
    results = checkers.run_all(entries, states)  # the service address must be reported (H1)
    if aborted:
        results.append(checkers.CheckResult("run", False, f"aborted: {aborted}"))
    if phone_errors:
        results.append(checkers.CheckResult("phones", False, f"{len(phone_errors)} errors inside the phones",
                                            violations=phone_errors[:20]))
    meta["duration_s"] = round(time.monotonic() - t_start, 1)
    meta["fault_counts"] = dict(fault_counts)
    ok = all(r.ok for r in results)
    text = write_all(workdir, meta, results, entries)
    _print(opts, text)
    _print(opts, f"report: {workdir / 'report.json'}, timeline: {workdir / 'timeline.html'}")
    if ok and not opts.keep:
        for node in cluster.nodes:
            shutil.rmtree(node.dir, ignore_errors=True)
    return ok, workdir, meta


def main_run(opts: Options) -> int:
    try:
        ok, _, _ = run(opts)
    except KeyboardInterrupt:
        print("chaos: interrupted", file=sys.stderr)
        return 130
    return 0 if ok else 1


def describe() -> str:
    lines = ["scenarios:"]
    for s in SCENARIOS.values():
        lines.append(f"  {s.name:12s} {s.nodes} nodes, {s.lab}, {s.rounds} rounds by default: {s.description}")
        lines.append(f"  {'':12s} faults: {', '.join(s.faults)}")
    lines.append("faults:")
    for f in faults.FAULTS.values():
        extra = f" (labs: {'/'.join(f.labs)}, at least {f.min_nodes} nodes"
        extra += f", needs {f.requires})" if f.requires else ")"
        lines.append(f"  {f.name:18s} {f.description}{extra}")
    return "\n".join(lines)




