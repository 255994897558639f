"""Faults: what one chaos round does to the cluster, and how it heals.

Theory of operation
-------------------
A `Fault` has a name, the labs and cluster sizes it applies to, `inject(ctx)` (returns the targets and a
detail string for the history) and `heal(ctx)`. Between the two the runner holds the fault for
`hold(ctx)` seconds: a fault's duration is part of the fault (a pause must outlast the election timeout),
not a wait for a condition. After `heal` the runner waits, with a deadline, until a leader is agreed and
every voter has converged, and records how long that took.

The schedule is deterministic: `schedule(names, rounds, seed)` draws from a `random.Random(seed)` only, and
each fault draws its targets from the context's generator, seeded from (seed, round). The same command
line replays the same faults on the same node ids (timing-dependent targets, like "the leader", resolve to
whichever node leads at that moment).

Faults (loopback lab): kill -9 of the leader / a follower / two of five (leader and a follower); SIGSTOP of
the leader / a follower longer than the election timeout, then SIGCONT; graceful restart of the leader from
its data dir; kill -9 of the whole cluster and restart; a follower wiped and replaced by remove-then-add;
rolling restart (followers first, one at a time, each caught up before the next); leadership transfer; drain
of the leader and undrain (when the cluster has `cluster.drain`). Network faults (partitions, loss, delay)
(partitions symmetric or one way, loss and delay between nodes) use the loopback firewall
(chaos/cluster.py, root only).

Invariant: every `inject` is matched by its `heal` (the runner calls heal in a finally block, also when
inject failed half-way: heal undoes whatever inject recorded in `ctx.state`), and heal leaves every voter
running and not stopped. An inject that fails (the cluster refused a drain, a transfer timed out) is
recorded as `inject-failed` and reported by the `fault-injection` checker; the run goes on.
"""

from __future__ import annotations

import functools
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chaos.cluster import ChaosNode, LoopbackCluster, RpcFailure, Unreachable, wait_until


class FaultError(Exception):
    """A fault could not be injected or healed (e.g. no leader to kill)."""


@dataclass
class Context:
    cluster: LoopbackCluster
    rng: random.Random
    round: int
    state: dict[str, Any] = field(default_factory=dict)  # what inject remembers for heal


@dataclass(frozen=True)
class Fault:
    name: str
    description: str
    inject: Callable[[Context], tuple[list[str], str]]
    heal: Callable[[Context], None]
    hold: Callable[[Context], float]
    labs: tuple[str, ...] = ("loopback", "netns")
    min_nodes: int = 3
    requires: str | None = None  # an RPC method the cluster must offer, or "firewall" / "netem"

    def applies(self, lab: str, nodes: int, methods: set[str] | None = None) -> bool:
        if lab not in self.labs or nodes < self.min_nodes:
            return False
        return self.requires is None or methods is None or self.requires in methods


def _leader(ctx: Context) -> ChaosNode:
    leader = ctx.cluster.wait_leader(15.0)
    if leader is None:
        raise FaultError("no agreed leader to inject the fault on")
    return leader


def _follower(ctx: Context, leader: ChaosNode) -> ChaosNode:
    followers = [n for n in ctx.cluster.live() if n is not leader]
    if not followers:
        raise FaultError("no live follower")
    return ctx.rng.choice(sorted(followers, key=lambda n: n.id))


def _restart(nodes: list[ChaosNode]) -> None:
    for node in nodes:
        node.sigcont()
        if not node.alive:
            node.start()


def _pause_hold(ctx: Context) -> float:
    # Longer than the election timeout and than the leader fallback timeout (a paused leader must lose).
    return max(2.0, 5 * ctx.cluster.election_timeout_max)


def _hold(seconds: float) -> Callable[[Context], float]:
    return lambda ctx: seconds


# -- process faults ---------------------------------------------------------------------------------------
def _kill_leader(ctx: Context) -> tuple[list[str], str]:
    leader = _leader(ctx)
    leader.kill()
    ctx.state["down"] = [leader]
    return [leader.id], "kill -9"


def _kill_follower(ctx: Context) -> tuple[list[str], str]:
    leader = _leader(ctx)
    victim = _follower(ctx, leader)
    victim.kill()
    ctx.state["down"] = [victim]
    return [victim.id], "kill -9"


def _kill_two(ctx: Context) -> tuple[list[str], str]:
    leader = _leader(ctx)
    victim = _follower(ctx, leader)
    leader.kill()
    victim.kill()
    ctx.state["down"] = [leader, victim]
    return [leader.id, victim.id], "kill -9 of the leader and a follower (3 of 5 remain)"


def _heal_down(ctx: Context) -> None:
    _restart(ctx.state.get("down", []))


def _pause_leader(ctx: Context) -> tuple[list[str], str]:
    leader = _leader(ctx)
    leader.sigstop()
    ctx.state["down"] = [leader]
    return [leader.id], f"SIGSTOP for {_pause_hold(ctx):.1f} s"


def _pause_follower(ctx: Context) -> tuple[list[str], str]:
    leader = _leader(ctx)
    victim = _follower(ctx, leader)
    victim.sigstop()
    ctx.state["down"] = [victim]
    return [victim.id], f"SIGSTOP for {_pause_hold(ctx):.1f} s"


def _restart_leader(ctx: Context) -> tuple[list[str], str]:
    leader = _leader(ctx)
    leader.terminate()
    ctx.state["down"] = [leader]
    return [leader.id], "SIGTERM, then start from the data dir"


def _kill_all(ctx: Context) -> tuple[list[str], str]:
    nodes = ctx.cluster.voters()
    for node in nodes:
        node.kill()
    ctx.state["down"] = nodes
    return [n.id for n in nodes], "kill -9 of every node, then start them all from their data dirs"


def _wipe_replace(ctx: Context) -> tuple[list[str], str]:
    leader = _leader(ctx)
    victim = _follower(ctx, leader)
    victim.kill()
    victim.wipe()
    ctx.state["victim"] = victim
    return [victim.id], "kill -9, data dir wiped, replaced by remove-node then add-node (catch-up by snapshot)"


def _heal_wipe_replace(ctx: Context) -> None:
    cluster = ctx.cluster
    victim: ChaosNode = ctx.state["victim"]
    deadline = time.monotonic() + 60.0
    removed = added = False
    token = ""
    last: Exception | None = None
    while time.monotonic() < deadline and not added:
        leader = cluster.wait_leader(10.0)
        if leader is None or leader is victim:
            continue
        try:
            if not removed:
                try:
                    leader.call("cluster.remove_node", timeout=15.0, id=victim.id)
                except RpcFailure as exc:
                    if "not a member" not in exc.message and "no such" not in exc.message:
                        raise
                removed = True
            result = leader.call("cluster.add_node", timeout=15.0, id=victim.id, raft=victim.raft,
                                 admin_url=victim.url)
            token = str(result["token"])
            added = True
        except (RpcFailure, Unreachable) as exc:
            last = exc
            time.sleep(0.2)  # back off before retrying the membership change
    if not added:
        victim.start()  # leave no node down; the checkers will report the damage
        raise FaultError(f"could not replace {victim.id}: {last}")
    # One argv element: a token may begin with "-", which argparse would take for an option.
    victim.start(extra_args=["--join", f"--join-token={token}"])


def _rolling_restart(ctx: Context) -> tuple[list[str], str]:
    cluster = ctx.cluster
    leader = _leader(ctx)
    order = [*sorted((n for n in cluster.voters() if n is not leader), key=lambda n: n.id), leader]
    for node in order:
        node.terminate()
        node.start()
        target = max((int(i.get("commit_index") or 0) for i in cluster.infos().values() if i), default=0)
        caught = wait_until(functools.partial(_caught_up, node, target), 30.0, 0.1)
        if caught is None:
            raise FaultError(f"{node.id} did not catch up after its restart")
        if cluster.wait_leader(15.0) is None:
            raise FaultError(f"no leader after restarting {node.id}")
    return [n.id for n in order], "SIGTERM and restart one node at a time, followers first, each caught up"


def _caught_up(node: ChaosNode, target: int) -> bool:
    return int(node.info().get("applied_index", 0)) >= target


def _transfer_leader(ctx: Context) -> tuple[list[str], str]:
    leader = _leader(ctx)
    leader.call("cluster.transfer_leader", timeout=10.0)  # a failure is recorded as inject-failed
    return [leader.id], "cluster.transfer_leader"


def _drain_leader(ctx: Context) -> tuple[list[str], str]:
    leader = _leader(ctx)
    ctx.state["drained"] = leader  # the drain may commit even when the call then fails: always undrain
    leader.call("cluster.drain", timeout=10.0, node=leader.id)
    return [leader.id], "raftpbx admin cluster drain (leadership moves away, new INVITEs refused there)"


def _undrain(ctx: Context) -> None:
    node: ChaosNode | None = ctx.state.get("drained")
    if node is None:
        return
    deadline = time.monotonic() + 30.0
    while True:
        leader = ctx.cluster.wait_leader(10.0)
        try:
            if leader is not None:
                leader.call("cluster.undrain", timeout=10.0, node=node.id)
                return
        except (RpcFailure, Unreachable):
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise FaultError("no leader to undrain through")
        time.sleep(0.2)  # back off before retrying


# -- network faults (loopback firewall) -------------------------------------------------------------------
def _firewall(ctx: Context) -> Any:
    if ctx.cluster.firewall is None:
        raise FaultError("network faults need the loopback firewall (root, nft, a workdir others can traverse)")
    return ctx.cluster.firewall


def _isolate_leader(ctx: Context) -> tuple[list[str], str]:
    fw = _firewall(ctx)
    leader = _leader(ctx)
    others = [n for n in ctx.cluster.voters() if n is not leader]
    fw.partition([leader], others)
    return [leader.id], "leader cut from every other node, both ways (Raft, SIP, admin); phones still reach it"


def _split(ctx: Context) -> tuple[list[str], str]:
    fw = _firewall(ctx)
    voters = sorted(ctx.cluster.voters(), key=lambda n: n.id)
    ctx.rng.shuffle(voters)
    minority = voters[: (len(voters) - 1) // 2]
    majority = voters[len(minority):]
    fw.partition(minority, majority)
    return [n.id for n in minority], f"symmetric partition {[n.id for n in minority]} | {[n.id for n in majority]}"


def _oneway_leader(ctx: Context) -> tuple[list[str], str]:
    fw = _firewall(ctx)
    leader = _leader(ctx)
    others = [n for n in ctx.cluster.voters() if n is not leader]
    fw.partition([leader], others, oneway=True)
    return [leader.id], "asymmetric: the leader's packets to the others are dropped, theirs to it pass"


def _oneway_follower(ctx: Context) -> tuple[list[str], str]:
    fw = _firewall(ctx)
    leader = _leader(ctx)
    victim = _follower(ctx, leader)
    fw.partition([victim], [n for n in ctx.cluster.voters() if n is not victim], oneway=True)
    return [victim.id], "asymmetric: a follower's packets to the others are dropped (it hears the leader)"


def _loss(ctx: Context) -> tuple[list[str], str]:
    fw = _firewall(ctx)
    nodes = ctx.cluster.voters()
    fw.loss(20, nodes)
    return [n.id for n in nodes], "20% packet loss between every two nodes (Raft, SIP between nodes, admin)"


def _delay(ctx: Context) -> tuple[list[str], str]:
    fw = _firewall(ctx)
    nodes = ctx.cluster.voters()
    fw.delay(50, 10, nodes)
    return [n.id for n in nodes], "50 ms +- 10 ms delay on every packet between two nodes (Raft, SIP, admin)"


def _heal_network(ctx: Context) -> None:
    if ctx.cluster.firewall is not None:
        ctx.cluster.firewall.heal()


def _nothing(ctx: Context) -> None:
    return None


FAULTS: dict[str, Fault] = {f.name: f for f in (
    Fault("kill-leader", "kill -9 the leader, restart it from its data dir", _kill_leader, _heal_down, _hold(3.0)),
    Fault("kill-follower", "kill -9 a follower, restart it from its data dir", _kill_follower, _heal_down,
          _hold(3.0)),
    Fault("kill-two-of-five", "kill -9 the leader and a follower of five, restart both", _kill_two, _heal_down,
          _hold(3.0), min_nodes=5),
    Fault("pause-leader", "SIGSTOP the leader past the election timeout, then SIGCONT", _pause_leader,
          _heal_down, _pause_hold),
    Fault("pause-follower", "SIGSTOP a follower past the election timeout, then SIGCONT", _pause_follower,
          _heal_down, _pause_hold),
    Fault("restart-leader", "SIGTERM the leader and start it again from its data dir", _restart_leader,
          _heal_down, _hold(0.5)),
    Fault("kill-all", "kill -9 every node, then restart the whole cluster from its data dirs", _kill_all,
          _heal_down, _hold(1.0)),
    Fault("wipe-replace", "kill a follower, wipe its disk, replace it by remove-node then add-node",
          _wipe_replace, _heal_wipe_replace, _hold(0.5)),
    Fault("rolling-restart", "restart every node in turn, followers first", _rolling_restart, _nothing,
          _hold(0.0)),
    Fault("transfer-leader", "move leadership to another node", _transfer_leader, _nothing, _hold(1.0)),
    Fault("drain-leader", "drain the leader, hold, undrain", _drain_leader, _undrain, _hold(3.0),
          requires="cluster.drain"),
    Fault("isolate-leader", "cut the leader from the other nodes (symmetric), heal", _isolate_leader,
          _heal_network, _hold(4.0), requires="firewall"),
    Fault("partition-split", "symmetric partition of a random minority from the majority, heal", _split,
          _heal_network, _hold(4.0), requires="firewall"),
    Fault("oneway-leader", "asymmetric partition: the leader cannot send to the others", _oneway_leader,
          _heal_network, _hold(4.0), requires="firewall"),
    Fault("oneway-follower", "asymmetric partition: a follower cannot send to the others", _oneway_follower,
          _heal_network, _hold(4.0), requires="firewall"),
    Fault("loss", "20% packet loss on Raft, SIP and admin traffic between nodes", _loss, _heal_network,
          _hold(5.0), requires="firewall"),
    Fault("delay", "50 ms (+- 10) delay on Raft, SIP and admin traffic between nodes", _delay, _heal_network,
          _hold(5.0), requires="netem"),
)}


def register(fault: Fault) -> None:
    """Add a fault (chaos/netns.py registers the network faults)."""
    FAULTS[fault.name] = fault


def schedule(names: list[str], rounds: int, seed: int) -> list[str]:
    """The fault of each round: every listed fault once in a seeded order, then seeded draws, repeated."""
    if not names:
        raise ValueError("no fault applies")
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < rounds:
        batch = list(names)
        rng.shuffle(batch)
        out.extend(batch)
    return out[:rounds]


def round_rng(seed: int, round_no: int) -> random.Random:
    return random.Random(seed * 100_003 + round_no)


def cluster_methods(cluster: LoopbackCluster) -> set[str]:
    """Which optional RPC methods the running cluster offers (probed with empty params)."""
    methods: set[str] = set()
    if cluster.firewall is not None:
        methods.add("firewall")
        if cluster.firewall.netem_available():
            methods.add("netem")
    leader = cluster.wait_leader(10.0)
    if leader is None:
        return methods
    for method in ("cluster.drain",):
        try:
            leader.call(method, timeout=3.0, node="chaos-probe-no-such-node")
            methods.add(method)
        except RpcFailure as exc:
            if exc.code != -32601:  # anything but "method not found": it exists
                methods.add(method)
        except Unreachable as exc:
            print(f"chaos: probing {method}: {exc}", file=sys.stderr)
    return methods
