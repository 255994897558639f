"""Cluster operations on lab hosts with real, distinct addresses (deploy/netns): grow 3 -> 5 and shrink back
to 3 under a stream of admin writes, replace a wiped node by remove-then-add (a plain rejoin is refused),
backup and restore into a new cluster (extensions, digest and the call history of a real pjsua2 call).

Hosts h1..h5 run nodes (configs from deploy/gen_configs.py), h6 is the operator's machine: the write
stream (tests/deploy/writer.py), the admin CLI and every admin call of the test run from there. A lab
for the module; a cluster per test, always killed. Needs root (CI runs as root): fails, never skips.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import labkit
import pytest
from labcluster import LabCluster, LabNode, RpcFailure, Writer, applied
from labkit import Lab, wait_for

OPERATOR = "h6"
FIRST = ["h1", "h2", "h3"]
PASSWORD = "correct-Horse-7"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    labkit.require_lab_tools()
    with Lab(6) as lab:
        yield lab


@pytest.fixture()
def cluster(lab: Lab, tmp_path: Path) -> Iterator[LabCluster]:
    c = LabCluster(lab, tmp_path, OPERATOR, settings={"raft.compaction_min_entries": 50})
    try:
        yield c
    finally:
        c.kill_all()


def admin_cli(c: LabCluster, *args: str) -> subprocess.CompletedProcess[str]:
    """`raftpbx admin --cluster cluster.json ARGS` on the operator's host."""
    return c.lab.run(OPERATOR, sys.executable, "-m", "raftpbx.cli", "admin", "--cluster", str(c.out / "cluster.json"),
                     *args, check=False, timeout=60)


def join(c: LabCluster, host: str) -> float:
    """Add the node of `host` (add-node through the CLI, start with --join) and wait until it caught up.
    Returns the seconds from add-node to caught up."""
    node = c.configure([n.host for n in c.live()] + [host])[-1]
    t0 = time.monotonic()
    added = admin_cli(c, "--json", "cluster", "add-node", node.id, "--raft", node.raft, "--admin-url", node.url)
    assert added.returncode == 0, added.stderr
    token = json.loads(added.stdout)["token"]
    node.start("--join", "--join-token", token)
    target = applied(c.wait_leader([n for n in c.live() if n is not node]))
    wait_for(lambda: node.alive and applied(node) >= target, 30.0, f"{node.id} to catch up")
    return time.monotonic() - t0


def remove(c: LabCluster, victim: LabNode) -> None:
    leader = c.wait_leader()
    if leader is victim:
        leader.call("cluster.transfer_leader", timeout=10.0)
        leader = c.wait_leader([n for n in c.live() if n is not victim])
    done = admin_cli(c, "cluster", "remove-node", victim.id)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: not victim.alive, 15.0, f"{victim.id} to exit once removed")
    assert "removed from the cluster" in victim.log()


def assert_all_present(c: LabCluster, acked: list[str]) -> None:
    c.assert_converged()
    for node in c.live():
        missing = set(acked) - c.extensions(node)
        assert not missing, f"{node.id} lacks acknowledged writes {sorted(missing)[:5]}"


def test_grow_to_five_and_shrink_to_three_under_writes(cluster: LabCluster) -> None:
    c = cluster
    c.configure(FIRST)
    c.start(FIRST, "--bootstrap")
    figures: dict[str, float] = {}
    with Writer(c, first=40000) as writer:
        writer.wait_more(20, 30.0, "writes before the change")
        for host in ("h4", "h5"):
            figures[f"add {host}"] = join(c, host)
            writer.wait_more(10, 20.0, f"writes after adding {host}")
        members = c.wait_leader().call("cluster.members")["members"]
        assert {m["id"] for m in members} == {f"node{i}" for i in range(1, 6)}
        status = c.wait_leader().call("cluster.status", timeout=5.0)
        assert len(status["nodes"]) == 5 and all(n["healthy"] for n in status["nodes"]), status
        # Shrink: an original member that leads or not, and one of the new ones.
        for victim in (c.nodes["h2"], c.nodes["h4"]):
            t0 = time.monotonic()
            remove(c, victim)
            figures[f"remove {victim.host}"] = time.monotonic() - t0
            writer.wait_more(10, 20.0, f"writes after removing {victim.id}")
    members = c.wait_leader().call("cluster.members")["members"]
    assert {m["id"] for m in members} == {n.id for n in c.live()} == {"node1", "node3", "node5"}
    assert len(writer.acked) >= 60
    assert_all_present(c, writer.acked)
    print(f"\nmembership in the lab: {', '.join(f'{k} {v:.2f} s' for k, v in figures.items())}; "
          f"{len(writer.acked)} writes acknowledged")


def test_replace_a_wiped_node_by_remove_then_add(cluster: LabCluster) -> None:
    c = cluster
    c.configure(FIRST)
    leader = c.start(FIRST, "--bootstrap")
    for i in range(80):  # past a compaction (50 entries): the replacement catches up by snapshot
        c.nodes[FIRST[i % 3]].call("extension.create", extension=str(5000 + i), password=PASSWORD)
    victim = next(n for n in c.live() if n is not leader)
    victim.kill()
    victim.wipe()
    # A plain rejoin under its old identity is refused with a clear error, and changes nothing.
    mark = len(victim.log())
    victim.start("--join", "--join-token", "a-token-never-issued")
    assert victim.proc is not None
    assert victim.proc.wait(timeout=30) == 1
    refusal = victim.log()[mark:]
    assert "the cluster refused this node" in refusal and "never simply rejoin" in refusal, refusal[-2000:]
    others = [n for n in c.live() if n is not victim]
    c.wait_leader(others).call("extension.create", extension="5998", password=PASSWORD)

    victim.wipe()
    leader = c.wait_leader(others)
    t0 = time.monotonic()
    leader.call("cluster.remove_node", timeout=15.0, id=victim.id)
    token = leader.call("cluster.add_node", timeout=15.0, id=victim.id, raft=victim.raft,
                        admin_url=victim.url)["token"]
    victim.start("--join", "--join-token", token)
    target = applied(leader)
    wait_for(lambda: victim.alive and applied(victim) >= target, 30.0, "the replacement to catch up")
    elapsed = time.monotonic() - t0
    assert (victim.data_dir / "raft.dump").exists()  # it was sent a snapshot
    c.wait_leader().call("extension.create", extension="5999", password=PASSWORD)
    assert_all_present(c, [str(5000 + i) for i in range(80)] + ["5998", "5999"])
    print(f"\nreplace a wiped node in the lab (remove + add + snapshot catch-up): {elapsed:.2f} s")


def test_backup_and_restore_round_trip(cluster: LabCluster, tmp_path: Path) -> None:
    c = cluster
    c.configure(FIRST)
    leader = c.start(FIRST, "--bootstrap")
    for i in range(30):
        leader.call("extension.create", extension=str(7000 + i), password=PASSWORD, display_name=f"User {i}")
    # Call history: a phone on the operator's host registers 7001 and calls 7003, who has no binding (480).
    phone = labkit.lab_phone(c.lab, OPERATOR, tmp_path)
    try:
        phone.start()
        phone.transports(udp=True)
        mark = phone.mark()
        phone.account_add("a", "sip:7001@lab.example", registrar=f"sip:{c.nodes['h2'].ip}:5060", register=True,
                          user="7001", password=PASSWORD, expires=300)
        state = phone.wait_event(lambda e: e["event"] == "reg_state", 10.0, since=mark)
        assert state["code"] == 200 and state["active"], state
        call = phone.call("a", f"sip:7003@{c.nodes['h3'].ip}:5060")
        assert phone.wait_call_state(call, "disconnected", timeout=10)["code"] == 480
    finally:
        phone.close()
    wait_for(lambda: all(len(n.call("cdr.list", limit=100)["records"]) == 1 for n in c.live()), 10.0,
             "the call record on every node")
    backup = tmp_path / "lab.backup"
    done = admin_cli(c, "backup", str(backup))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(os.stat(backup).st_mode) == 0o600
    applied_index, digest = c.assert_converged()
    expected = c.nodes["h1"].call("extension.list")["extensions"]
    expected_cdr = c.nodes["h1"].call("cdr.list", limit=100)["records"]

    # The old cluster is gone; a new one on the same hosts, empty data dirs, stands on the backup alone.
    c.kill_all()
    for host in FIRST:
        c.nodes[host].wipe()
        seeded = c.lab.run(host, sys.executable, "-m", "raftpbx.cli", "restore", str(backup), "--config",
                           str(c.nodes[host].config_path), check=False, timeout=60)
        assert seeded.returncode == 0, seeded.stderr
        assert f"applied index {applied_index}" in seeded.stdout
    again = c.lab.run("h1", sys.executable, "-m", "raftpbx.cli", "restore", str(backup), "--config",
                      str(c.nodes["h1"].config_path), check=False, timeout=60)
    assert again.returncode == 1 and "already holds node state" in again.stderr
    leader = c.start(FIRST)  # no --bootstrap: the restored data dirs carry the cluster
    assert c.assert_converged() == (applied_index, digest)
    assert len(expected_cdr) == 1 and expected_cdr[0]["callee"] == "7003"
    for node in c.live():
        assert node.call("extension.list")["extensions"] == expected
        wait_for(lambda n=node: n.call("cdr.list", limit=100)["records"] == expected_cdr, 10.0,
                 f"the call history on {node.id}")
    leader.call("extension.create", extension="7999", password=PASSWORD)  # and it takes writes
    c.assert_converged()
    with pytest.raises(RpcFailure):
        leader.call("extension.create", extension="7000", password=PASSWORD)  # restored, so it exists
