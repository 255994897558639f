"""Trunks on a real 3-node cluster (issue 9, the replicated configuration and health parts).

Real `raftpbx node` processes on loopback, the real `raftpbx admin` CLI in a subprocess, and a real SIP peer
(`python -m raftpbx.transport.responder`, which answers OPTIONS) standing in for the other office's PBX:

* a trunk and a route written through a follower are committed and visible on every node;
* every node pings the peer addresses on its own: the live responder is "up" and a port where nothing
  answers is "down" on every node (`trunk list` and /metrics);
* the responder stops: every node marks it down; it comes back on the same port: up again;
* a node restarted from its data dir still has the trunk and the route and pings again.

The calls over the trunk (two clusters, pjsua2 phones, Kamailio) need the proxy integration described in
docs/trunks.md and are not here yet. Needs node.py to call `trunks.attach` (docs/trunks.md, "Wiring").
Every wait polls a condition against a deadline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nodecluster import (
    Cluster,
    Node,
    RpcFailure,
    free_port,
    make_cluster_fixture,  # noqa: F401 (the make_cluster fixture)
    wait_for,
)

from raftpbx.rpc import METHOD_NOT_FOUND

PEER_HOST = "127.0.0.1"
# Health moves within one ping interval plus the ping timeout (the default 5 s + 2 s); generous for load.
HEALTH_WAIT = 25.0


class Peer:
    """A SIP responder process on (PEER_HOST, port) that answers OPTIONS with 200."""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        out = open(self.log, "a")  # noqa: SIM115 (closed with the process below)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "raftpbx.transport.responder", "--listen", f"{PEER_HOST}:{self.port}", "--udp"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=out, text=True, start_new_session=True)
        out.close()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the responder prints READY once bound (or exits)
        assert line.startswith("READY"), f"responder did not start: {line!r}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Peer]:
    p = Peer(free_port(PEER_HOST), tmp_path / "responder.log")
    p.start()
    try:
        yield p
    finally:
        p.stop()


def admin(cluster: Cluster, node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAFTPBX_ADMIN_TOKEN": cluster.token}
    return subprocess.run([sys.executable, "-m", "raftpbx.cli", "admin", "--url", node.url, *args],
                          capture_output=True, text=True, timeout=30, env=env, check=False)


def peer_states(node: Node, trunk: str = "office-b") -> dict[str, str]:
    result: dict[str, Any] = node.call("trunk.get", name=trunk)
    return {row["peer"]: row["state"] for row in result["health"]}


def _serves_trunks(node: Node) -> bool:
    try:
        node.call("trunk.list")
    except RpcFailure as exc:
        if exc.code == METHOD_NOT_FOUND:
            return False
        raise
    return True


def metrics(node: Node) -> str:
    with urllib.request.urlopen(f"{node.url}/metrics", timeout=5) as response:
        return str(response.read().decode())


def test_trunk_config_replicates_and_every_node_tracks_peer_health(make_cluster: Any, peer: Peer) -> None:
    cluster: Cluster = make_cluster()
    cluster.start()
    leader = cluster.wait_leader()
    follower = cluster.followers(leader)[0]
    assert _serves_trunks(leader), "node.py does not call raftpbx.trunks.attach yet (docs/trunks.md, Wiring)"
    dead_port = free_port(PEER_HOST)  # nothing listens there: pings go unanswered
    live, dead = f"{PEER_HOST}:{peer.port}", f"{PEER_HOST}:{dead_port}"

    done = admin(cluster, follower, "trunk", "add", "office-b", "--peer", live, "--peer", dead,
                 "--allow", "127.0.0.0/30")
    assert done.returncode == 0, done.stderr
    done = admin(cluster, follower, "route", "add", "to-b", "--pattern", "2XXX", "--trunk", "office-b")
    assert done.returncode == 0, done.stderr
    for node in cluster.nodes:  # committed before the answer; applied everywhere shortly after
        wait_for(lambda n=node: [r["name"] for r in n.call("route.list")["routes"]] == ["to-b"], 10.0,
                 f"the route on {node.id}")
        assert node.call("route.test", number="2001")["trunk"] == "office-b"

    for node in cluster.nodes:
        wait_for(lambda n=node: peer_states(n) == {live: "up", dead: "down"}, HEALTH_WAIT,
                 f"{node.id}: live peer up, silent peer down")
        text = metrics(node)
        assert f'raftpbx_trunk_peer_up{{node="{node.id}",trunk="office-b",peer="{live}"}} 1' in text
        assert f'raftpbx_trunk_peer_up{{node="{node.id}",trunk="office-b",peer="{dead}"}} 0' in text
    listed = admin(cluster, leader, "trunk", "list")
    assert listed.returncode == 0 and f"{live}/udp up" in listed.stdout and f"{dead}/udp down" in listed.stdout
    as_json = json.loads(admin(cluster, leader, "--json", "trunk", "list").stdout)
    assert as_json["trunks"][0]["next_peers"] == [live]

    peer.stop()
    for node in cluster.nodes:
        wait_for(lambda n=node: peer_states(n)[live] == "down", HEALTH_WAIT, f"{node.id}: stopped peer down")
    assert follower.call("route.test", number="2001")["peers"] == [f"{live};transport=udp",
                                                                    f"{dead};transport=udp"]  # all down: all
    peer.start()
    for node in cluster.nodes:
        wait_for(lambda n=node: peer_states(n)[live] == "up", HEALTH_WAIT, f"{node.id}: peer up again")

    restarted = cluster.nodes[-1]
    assert restarted.terminate() == 0
    restarted.start()
    wait_for(lambda: peer_states(restarted) == {live: "up", dead: "down"}, HEALTH_WAIT + 10.0,
             f"{restarted.id} restarted: trunk restored and pinged again")
    assert [r["name"] for r in restarted.call("route.list")["routes"]] == ["to-b"]
