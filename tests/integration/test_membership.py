"""Membership changes with real `raftpbx node` processes: grow 3 -> 5 and shrink back to 3 under writes,
replace a wiped node by remove-then-add, refuse a wiped node that rejoins under its old identity, one
change at a time (Raft §6 single-server changes; hazard 6 of the design brief)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nodecluster import (  # the *_fixture names register the `make_cluster` fixture
    Cluster,
    Node,
    RpcFailure,
    make_cluster_fixture,  # noqa: F401
    wait_for,
)

from raftpbx.config import render_toml
from raftpbx.rpc import PROPOSAL_TIMEOUT, REJECTED

pytestmark = pytest.mark.integration

PASSWORD = "correct-Horse-7"


def new_node(c: Cluster, number: int) -> Node:
    """A node object for `c` with fresh ports and a node.toml listing the current members as peers."""
    ip = c.nodes[0].ip.rsplit(".", 1)[0] + f".{10 + number}"
    node = Node(c, number, ip)
    node.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_config(c, node, [n for n in c.nodes if n.alive and n is not node])
    return node


def write_config(c: Cluster, node: Node, peers: list[Node]) -> None:
    values: dict[str, Any] = {
        "node.id": node.id, "node.data_dir": str(node.dir), "cluster.domain": "test.raftpbx.local",
        "cluster.secret_file": str(c.root / "secret"), "raft.address": node.raft,
        "raft.proposal_timeout": 2.0, "admin.listen": f"{node.ip}:{node.admin_port}",
        "admin.token_file": str(c.root / "token"), "sip.listen": f"{node.ip}:5060", "log.level": "info",
    }
    node.config_path.write_text(render_toml(values, {p.id: {"raft": p.raft, "admin_url": p.url} for p in peers}))


def start_joining(node: Node, token: str) -> None:
    args = [sys.executable, "-P", "-m", "raftpbx.cli", "node", "--config", str(node.config_path), "--join",
            "--join-token", token]
    with open(node.log_path, "ab") as log:
        node.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)


def add(c: Cluster, node: Node) -> str:
    leader = c.wait_leader()
    result = leader.call("cluster.add_node", timeout=15.0, id=node.id, raft=node.raft, admin_url=node.url)
    if node not in c.nodes:
        c.nodes.append(node)
    return str(result["token"])


def caught_up(node: Node, target: int) -> bool:
    """The node answers and has applied at least `target` (the leader's applied index when it started)."""
    return bool(node.alive and node.call("state.digest", timeout=2.0)["applied_index"] >= target)


def applied(node: Node) -> int:
    return int(node.call("state.digest", timeout=2.0)["applied_index"])


class Writer:
    """Creates extensions through every live node in turn until stopped; remembers the acknowledged ones."""

    def __init__(self, c: Cluster) -> None:
        self.c = c
        self.acked: list[str] = []
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set() and n < 5000:
            n += 1
            live = self.c.live()
            node = live[n % len(live)]
            ext = str(40000 + n)
            try:
                node.call("extension.create", timeout=3.0, extension=ext, password=PASSWORD,
                          op_id=f"w-{ext}")
                self.acked.append(ext)
            except (RpcFailure, OSError):
                self.failed += 1
            self._stop.wait(0.01)  # a steady trickle, not a benchmark

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def assert_all_present(c: Cluster, acked: list[str]) -> None:
    c.assert_converged(timeout=15.0)
    for node in c.live():
        present = {e["extension"] for e in node.call("extension.list", timeout=5.0)["extensions"]}
        missing = [e for e in acked if e not in present]
        assert not missing, f"{node.id} lacks acknowledged writes {missing[:5]}"


def test_grow_to_five_and_shrink_to_three_under_writes(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(settings={"raft.compaction_min_entries": 50})
    c.start()
    figures = {}
    with Writer(c) as writer:
        wait_for(lambda: len(writer.acked) >= 30, 20.0, "writes before the change")
        for number in (4, 5):
            node = new_node(c, number)
            t0 = time.monotonic()
            token = add(c, node)
            start_joining(node, token)
            target = applied(c.wait_leader())
            wait_for(lambda n=node, t=target: caught_up(n, t), 30.0, f"{node.id} to catch up")  # type: ignore[misc]
            figures[node.id] = time.monotonic() - t0
            members = c.wait_leader().call("cluster.members")["members"]
            assert len(members) == number
        status = c.wait_leader().call("cluster.status", timeout=5.0)
        assert {n["id"] for n in status["nodes"] if n["healthy"]} == {n.id for n in c.nodes}
        wait_for(lambda: len(writer.acked) >= 80, 20.0, "writes with five members")
        # Shrink: an original follower and the newest node.
        leader = c.wait_leader()
        for victim in [next(n for n in c.nodes[:3] if n is not leader), c.node("node5")]:
            leader = c.wait_leader()
            if leader is victim:
                leader.call("cluster.transfer_leader", timeout=10.0)
                leader = c.wait_leader(among=[n for n in c.live() if n is not victim])
            leader.call("cluster.remove_node", timeout=15.0, id=victim.id)
            # The removed node receives the entry that removes it and exits on its own.
            wait_for(lambda v=victim: not v.alive, 15.0, f"{victim.id} to exit")  # type: ignore[misc]
            assert "removed from the cluster" in victim.log_path.read_text()
        wait_for(lambda: len(writer.acked) >= 120, 20.0, "writes after shrinking")
    members = c.wait_leader().call("cluster.members")["members"]
    assert len(members) == 3 and {m["id"] for m in members} == {n.id for n in c.live()}
    assert_all_present(c, writer.acked)
    print(f"\nadd + catch-up times: {figures}; writes acked {len(writer.acked)}, failed {writer.failed}")


def test_replace_a_wiped_node_by_remove_then_add(make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    c = make_cluster(settings={"raft.compaction_min_entries": 20})
    leader = c.start()
    for i in range(60):  # past a compaction: the replacement catches up by snapshot install
        c.nodes[i % 3].call("extension.create", extension=str(5000 + i), password=PASSWORD)
    victim = next(n for n in c.nodes if n is not leader)
    victim.kill()
    for child in list(victim.dir.iterdir()):  # the disk is gone (the test keeps its config and log)
        if child.name not in ("node.toml", "node.log"):
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    leader = c.wait_leader(among=[n for n in c.nodes if n is not victim])
    leader.call("cluster.remove_node", timeout=15.0, id=victim.id)
    t0 = time.monotonic()
    token = leader.call("cluster.add_node", timeout=15.0, id=victim.id, raft=victim.raft,
                        admin_url=victim.url)["token"]
    start_joining(victim, token)
    target = applied(leader)
    wait_for(lambda: caught_up(victim, target), 30.0, "the replacement to catch up")
    elapsed = time.monotonic() - t0
    assert (victim.dir / "raft.dump").exists()  # it was sent a snapshot
    leader.call("extension.create", extension="5999", password=PASSWORD)
    assert_all_present(c, [str(5000 + i) for i in range(60)] + ["5999"])
    print(f"\nreplace (remove + add + snapshot catch-up): {elapsed:.2f} s")


def test_wiped_node_with_its_old_identity_is_refused(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster()
    leader = c.start()
    for i in range(10):
        leader.call("extension.create", extension=str(6000 + i), password=PASSWORD)
    victim = next(n for n in c.nodes if n is not leader)
    victim.kill()
    for name in ("raft.journal", "raft.journal.meta", "raftpbx-node.json", "raft.dump"):
        (victim.dir / name).unlink(missing_ok=True)
    before = victim.log_path.read_text()
    start_joining(victim, "any-token")  # `--join` with its old id, never removed and re-added
    assert victim.proc is not None
    status = victim.proc.wait(timeout=20)
    log = victim.log_path.read_text()[len(before):]
    assert status == 1 and "the cluster refused this node" in log and "never simply rejoin" in log
    victim.proc = None
    # Unaffected: the other two commit, and nothing the wiped node said counted.
    others = [n for n in c.nodes if n is not victim]
    c.wait_leader(among=others).call("extension.create", extension="6999", password=PASSWORD)
    for node in others:
        wait_for(lambda n=node: len(n.call("extension.list")["extensions"]) == 11, 10.0, f"the write on {node.id}")


def test_one_membership_change_at_a_time(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster()
    leader = c.start()
    # With one follower down, adding a fourth member (not started) needs 3 of 4 votes and only 2 are
    # alive: the change stays uncommitted, and every other change is refused until it commits.
    down = next(n for n in c.nodes if n is not leader)
    down.kill()
    extra = new_node(c, 4)
    outcome: list[Any] = []

    def add_extra() -> None:
        try:
            outcome.append(leader.call("cluster.add_node", timeout=15.0, id=extra.id, raft=extra.raft,
                                       admin_url=extra.url))
        except RpcFailure as exc:
            outcome.append(exc)

    pending = threading.Thread(target=add_extra, daemon=True)
    pending.start()
    wait_for(lambda: len(leader.call("cluster.members")["members"]) == 4, 10.0, "the add appended")
    with pytest.raises(RpcFailure) as refused:
        leader.call("cluster.remove_node", timeout=15.0, id=down.id)
    assert refused.value.code == REJECTED and "one at a time" in refused.value.message
    with pytest.raises(RpcFailure) as dup:
        leader.call("cluster.add_node", timeout=15.0, id=leader.id, raft="127.0.0.1:9", admin_url="http://x:1")
    assert dup.value.code == REJECTED and "already a member" in dup.value.message
    down.start()  # the third vote: the add commits, and changes are possible again
    pending.join(timeout=30)
    # Success, or (on a slow machine, past the 10 s deadline) an unknown outcome that commits anyway.
    assert outcome and (not isinstance(outcome[0], RpcFailure) or outcome[0].code == PROPOSAL_TIMEOUT), outcome
    leader = c.wait_leader(among=[n for n in c.nodes if n.alive])
    wait_for(lambda: len(down.call("cluster.members")["members"]) == 4, 20.0, "the follower sees the add")
    wait_for(lambda: leader.call("cluster.members") == down.call("cluster.members"), 10.0, "the add committed")
    leader.call("cluster.remove_node", timeout=15.0, id=extra.id)
    assert len(leader.call("cluster.members")["members"]) == 3
