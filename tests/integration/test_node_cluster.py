"""Three real `raftpbx node` processes: replication through the admin RPC, failover, restarts, dedupe.

Every test ends with the `make_cluster` teardown asserting equal applied_index and digest on all live nodes.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
import time
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nodecluster import (  # the *_fixture names register the `cluster` and `make_cluster` fixtures
    Cluster,
    Node,
    RpcFailure,
    cluster_fixture,  # noqa: F401
    make_cluster_fixture,  # noqa: F401
    rpc_raw,
    wait_for,
)

from raftpbx.rpc import INVALID_PARAMS, NO_QUORUM, NOT_FOUND, UNAUTHORIZED

pytestmark = pytest.mark.integration

PASSWORD = "correct-Horse-7"


def create(node: Any, extension: str, **extra: Any) -> Any:
    return node.call("extension.create", extension=extension, password=PASSWORD, **extra)


def test_extension_created_through_a_follower_is_visible_on_all_three(cluster: Cluster) -> None:
    leader = cluster.wait_leader()
    follower = cluster.followers(leader)[0]
    result = create(follower, "2001", display_name="Alice")
    assert result["status"] == "applied"
    for node in cluster.nodes:
        got = wait_for(lambda n=node: n.call("extension.get", extension="2001"), 5.0, f"2001 on {node.id}")
        assert got["display_name"] == "Alice"
        assert got["realm"] == "test.raftpbx.local"
        assert not any("ha1" in key or "password" in key for key in got)
    listed = follower.call("extension.list")["extensions"]
    assert [e["extension"] for e in listed] == ["2001"]



def test_each_node_tunes_malloc_first_and_the_collector_once_started(cluster: Cluster) -> None:
    """node.py: glibc's malloc before the state is restored (tests/node/test_node_malloc.py says why), the
    cyclic collector once the node has started (tests/node/test_node_gc.py)."""
    cluster.wait_leader()

    def started_log(node: Node) -> str | None:
        text = node.log_path.read_text(errors="replace")
        return text if "node.started" in text else None

    for node in cluster.nodes:
        text = wait_for(lambda n=node: started_log(n), 10.0, f"node.started in {node.id}'s log")
        assert -1 < text.index("node.malloc_tuned") < text.index("node.gc_tuned") < text.index("node.started")

def test_kill_leader_new_leader_and_write_within_1_5_s(cluster: Cluster) -> None:
    leader = cluster.wait_leader()
    create(leader, "2001")
    survivor = cluster.followers(leader)[0]
    op_id = uuid.uuid4().hex
    killed_at = leader.kill()
    deadline = killed_at + 5.0
    while True:
        try:
            result = survivor.call("extension.create", timeout=3.0, extension="2002", password=PASSWORD, op_id=op_id)
            break
        except RpcFailure as exc:  # unknown outcome or no leader yet: retry with the same op_id
            assert time.monotonic() < deadline, f"no successful write 5 s after the kill: {exc}"
    elapsed = time.monotonic() - killed_at
    assert result["result"] == {"extension": "2002"}
    new_leader = cluster.wait_leader()
    assert new_leader is not leader
    print(f"failover: kill -9 of {leader.id} to first committed write: {elapsed * 1000:.0f} ms")
    assert elapsed < 1.5, f"write succeeded {elapsed:.3f} s after the kill"


def test_killed_node_restarts_from_its_data_dir_and_catches_up(cluster: Cluster) -> None:
    victim = cluster.wait_leader()  # the leader is killed, as in the failover test
    create(victim, "2001")
    survivors = cluster.followers(victim)
    victim.kill()
    new_leader = cluster.wait_leader(among=survivors)
    for i, n in enumerate(range(2002, 2012)):
        create(survivors[i % 2], str(n))
    assert cluster.digests(survivors)[new_leader.id][0] >= 11
    victim.start()  # no --bootstrap: it must come back from its own data dir
    cluster.wait_leader()
    digests = cluster.assert_converged()
    assert digests[victim.id][0] >= 11
    assert len(victim.call("extension.list")["extensions"]) == 11


def test_kill_all_three_and_restart_keeps_every_acknowledged_write_after_compaction(
    make_cluster: Callable[..., Cluster],
) -> None:
    c = make_cluster(settings={"raft.compaction_min_entries": 10, "raft.compaction_min_time": 1000.0})
    leader = c.start()
    acked = []
    for i, n in enumerate(range(3001, 3041)):
        node = c.nodes[i % 3]  # through the leader and both followers
        create(node, str(n))
        acked.append(str(n))
    wait_for(lambda: all((n.dir / "raft.dump").exists() for n in c.nodes), 10.0, "log compaction on every node")
    before = c.assert_converged()
    for node in c.nodes:
        node.kill()
    c.start(bootstrap=False)
    # After a restart each node restores its dump, then applies the journal's tail once a new leader
    # has committed an entry of its term: wait for every node to be back at the pre-kill state.
    (expected,) = set(before.values())
    wait_for(lambda: set(c.digests().values()) == {expected}, 15.0, f"every node back at {expected}")
    for node in c.nodes:
        present = [e["extension"] for e in node.call("extension.list")["extensions"]]
        assert present == acked, f"{node.id} lost acknowledged writes"
    assert leader.call("extension.get", extension="3040")["extension"] == "3040"
    create(c.wait_leader(), "3999")  # and the restarted cluster takes writes


def test_retried_op_id_applies_once(cluster: Cluster) -> None:
    leader = cluster.wait_leader()
    follower = cluster.followers(leader)[0]
    op_id = "retry-" + uuid.uuid4().hex
    first = create(follower, "2001", op_id=op_id)
    assert first["status"] == "applied"
    deleted = leader.call("extension.delete", extension="2001")
    assert deleted["status"] == "applied"
    # The client retries the create (as after an unknown outcome) through another node.
    for node in cluster.nodes:
        again = create(node, "2001", op_id=op_id)
        assert again["status"] == "duplicate"
        assert again["result"] == {"extension": "2001"}
    with pytest.raises(RpcFailure) as info:
        leader.call("extension.get", extension="2001")
    assert info.value.code == NOT_FOUND
    cluster.assert_converged()
    for node in cluster.nodes:
        assert node.call("extension.list")["extensions"] == []


def test_sigstop_both_followers_leader_steps_down_within_2_s_and_writes_fail_with_no_quorum(
    cluster: Cluster,
) -> None:
    leader = cluster.wait_leader()
    create(leader, "2001")
    followers = cluster.followers(leader)
    for f in followers:
        f.sigstop()
    stopped_at = time.monotonic()
    wait_for(lambda: leader.info()["role"] != "leader", 4.0, "the isolated leader to step down")
    elapsed = time.monotonic() - stopped_at
    print(f"isolated leader stepped down after {elapsed * 1000:.0f} ms")
    assert elapsed < 2.0
    digest_before = leader.call("state.digest")
    with pytest.raises(RpcFailure) as info:
        create(leader, "2002")
    assert info.value.code == NO_QUORUM
    assert "no quorum" in info.value.message
    assert leader.call("state.digest") == digest_before
    status = leader.call("cluster.status")
    assert {n["id"]: n["healthy"] for n in status["nodes"]} == {leader.id: True, **{f.id: False for f in followers}}
    for f in followers:
        f.sigcont()
    cluster.wait_leader()


class _Marker:
    """Unpickling this creates a directory: proof that a pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (str(self.path),))


def _pysyncobj_frame(obj: Any) -> bytes:
    data = zlib.compress(pickle.dumps(obj))
    return struct.pack("i", len(data)) + data


def test_pickle_payload_to_raft_port_executes_nothing(cluster: Cluster, tmp_path: Path) -> None:
    leader = cluster.wait_leader()
    # The payload is live: unpickled here, it does create its marker.
    control = tmp_path / "control-marker"
    pickle.loads(zlib.decompress(_pysyncobj_frame(_Marker(control))[4:]))
    assert control.is_dir()
    marker = tmp_path / "pwned-marker"
    frame = _pysyncobj_frame(_Marker(marker))
    for node in cluster.nodes:
        with socket.create_connection((node.ip, node.raft_port), timeout=2.0) as sock:
            sock.sendall(frame)
            sock.sendall(frame)
            sock.settimeout(0.2)

            def closed_or_quiet(s: socket.socket = sock) -> bool:
                try:
                    return s.recv(4096) == b""
                except TimeoutError:
                    return True  # still open but nothing executed; checked below
                except OSError:
                    return True

            wait_for(closed_or_quiet, 3.0, "the node to drop the garbage")
    # Every node still serves, and has processed later traffic on its Raft thread.
    create(cluster.nodes[1], "2001")
    cluster.assert_converged()
    for node in cluster.nodes:
        assert node.alive
        assert node.call("extension.get", extension="2001")["extension"] == "2001"
    assert leader.info()["role"] in ("leader", "follower")
    assert not marker.exists(), "a pickle from the network was executed"


def test_bad_admin_input_names_the_field_and_changes_nothing(cluster: Cluster) -> None:
    leader = cluster.wait_leader()
    follower = cluster.followers(leader)[0]
    create(leader, "2001")
    cluster.assert_converged()
    before = cluster.digests()

    def error_of(node: Any, method: str, **params: Any) -> RpcFailure:
        with pytest.raises(RpcFailure) as info:
            node.call(method, **params)
        return info.value

    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("extension.get", {"extension": "9999"}, NOT_FOUND, "extension"),
        ("extension.update", {"extension": "9999", "display_name": "X"}, INVALID_PARAMS, "extension"),
        ("extension.delete", {"extension": "9999"}, INVALID_PARAMS, "extension"),
        ("extension.create", {"extension": "12ab", "password": PASSWORD}, INVALID_PARAMS, "extension"),
        ("extension.create", {"extension": "", "password": PASSWORD}, INVALID_PARAMS, "extension"),
        ("extension.create", {"extension": 2002, "password": PASSWORD}, INVALID_PARAMS, "extension"),
        ("extension.create", {"extension": "2002", "password": ""}, INVALID_PARAMS, "password"),
        ("extension.create", {"extension": "2002"}, INVALID_PARAMS, "password"),
        ("extension.create", {"extension": "2002", "password": "short"}, INVALID_PARAMS, "password"),
        ("extension.create", {"extension": "2002", "password": "password123"}, INVALID_PARAMS, "password"),
        ("extension.create", {"extension": "2001", "password": PASSWORD}, INVALID_PARAMS, "extension"),
        ("extension.create", {"extension": "2002", "password": PASSWORD, "colour": "red"}, INVALID_PARAMS, "colour"),
        ("extension.create", {"extension": "2002", "password": PASSWORD, "display_name": 'a"b'}, INVALID_PARAMS,
         "display_name"),
    ]
    for method, params, code, field in cases:
        for node in (leader, follower):
            err = error_of(node, method, **params)
            assert (err.code, err.data["field"]) == (code, field), (method, params, err)
            assert field in err.message
            assert PASSWORD not in err.message and "password123" not in err.message
    status, reply = rpc_raw(follower.url, None, "extension.create", {"extension": "2003", "password": PASSWORD})
    assert status == 401 and reply["error"]["code"] == UNAUTHORIZED
    status, reply = rpc_raw(follower.url, "x" * 32, "state.digest")
    assert status == 401
    status, reply = rpc_raw(leader.url, cluster.token, "no.such.method")
    assert reply["error"]["code"] == -32601
    assert cluster.digests() == before
    logs = "".join(n.log_path.read_text() for n in cluster.nodes)
    assert PASSWORD not in logs and cluster.token not in logs and cluster.secret not in logs


def test_sigterm_stops_a_node_gracefully_and_it_restarts(cluster: Cluster) -> None:
    leader = cluster.wait_leader()
    create(leader, "2001")
    victim = cluster.followers(leader)[0]
    assert victim.terminate() == 0
    assert "node.stopped" in victim.log_path.read_text()
    victim.start()
    cluster.wait_leader()
    cluster.assert_converged()


def test_metrics_endpoint(cluster: Cluster) -> None:
    import urllib.request

    leader = cluster.wait_leader()
    create(leader, "2001")
    with urllib.request.urlopen(leader.url + "/metrics", timeout=2) as response:
        text = response.read().decode()
    assert f'raftpbx_raft_role{{node="{leader.id}",role="leader"}} 1' in text
    assert f'raftpbx_proposals_total{{node="{leader.id}",result="ok"}} 1' in text
    assert "raftpbx_state_applied_index" in text
    # A malformed SIP request is answered 400 and counted where an operator sees it.
    before = _metric(text, "raftpbx_sip_bad_requests_answered_total", leader.id)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((leader.ip, 0))
        s.settimeout(3)
        s.sendto(b"REGISTER sip:test.raftpbx.local SIP/2.0\r\nVia: SIP/2.0/UDP " + leader.ip.encode() +
                 b";branch=z9hG4bKbad1\r\nCSeq: one REGISTER\r\nCall-ID: bad1@" + leader.ip.encode() +
                 b"\r\nFrom: <sip:2001@test.raftpbx.local>;tag=b\r\nTo: <sip:2001@test.raftpbx.local>\r\n"
                 b"Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n", (leader.ip, 5060))
        assert s.recv(4096).startswith(b"SIP/2.0 400 ")
    with urllib.request.urlopen(leader.url + "/metrics", timeout=2) as response:
        text = response.read().decode()
    assert _metric(text, "raftpbx_sip_bad_requests_answered_total", leader.id) == before + 1
    assert "# TYPE raftpbx_sip_bad_responses_dropped_total counter" in text


def _metric(text: str, name: str, node: str) -> int:
    prefix = f'{name}{{node="{node}"}} '
    values = [int(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix)]
    assert len(values) == 1, f"{name} for {node}: {values}"
    return values[0]


def test_node_start_failures_exit_1_with_a_clear_log(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster()
    node = c.nodes[0]
    node.start(bootstrap=False)  # an empty data dir without --bootstrap must not join as a voter
    assert node.proc is not None and node.proc.wait(timeout=30) == 1
    log = node.log_path.read_text()
    assert "node.start_failed" in log and "bootstrap" in log
    with socket.socket() as squatter:  # the admin address is taken
        squatter.bind((node.ip, node.admin_port))
        squatter.listen()
        node.start(bootstrap=True)
        assert node.proc.wait(timeout=30) == 1
    assert "stage=admin" in node.log_path.read_text()
