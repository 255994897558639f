"""The PBX admin reads and `raftpbx admin reg list | calls | cdr` on a real 3-node cluster, fed by real SIP.

Real processes only: three `raftpbx node` processes, pjsua2 phones (chaos/phone.py) that REGISTER and call
through the cluster, and the `raftpbx` CLI run as a subprocess. What is covered here (the proxy's own
behaviour is tests/integration/test_calls.py's job):
- `binding.list` on every node shows a phone's registration made through node 2 (node_id, transport,
  expires_in), filtered by extension, and no longer shows it once the phone unregisters;
- `call.active` on every node shows a call in progress through the proxy;
- `cdr.list` on every node returns the same records for real calls (answered, busy, not registered), and
  its filters (extension, disposition, time window) and paging work on them; CSV and JSON exports from the
  CLI match the RPC;
- a node restarted with SIGTERM lists the same records (its SQLite database persisted, nothing duplicated);
  a node killed with -9 whose `cdr.sqlite3` was then deleted lists them all again after restart: the log is
  compacted every few entries here, so they come back through the dump's restore and the reconcile from
  the finished-calls tail, plus the journal replay.
Every wait polls a condition against a deadline.
"""

from __future__ import annotations

import csv
import io
import itertools
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from nodecluster import Cluster, Node, create_extension, phone_group, running_pbx, wait_for

from chaos.phone import PhoneProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

DOMAIN = "test.raftpbx.local"
PASSWORD = "cdr-Secret-4242"
_ext = itertools.count(5100)



@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("pbxadmin")
    # Compaction every few entries, so that a restarting node restores a dump (the reconcile path).
    with running_pbx(root, {"raft.proposal_timeout": 3.0, "raft.compaction_min_entries": 8}, DOMAIN) as c:
        yield c


def new_extension(cluster: Cluster) -> str:
    return create_extension(cluster, str(next(_ext)), PASSWORD)


@pytest.fixture
def phones(cluster: Cluster, tmp_path: Path) -> Iterator[Callable[[int], list[PhoneProcess]]]:
    with phone_group(cluster, tmp_path) as make:
        yield make


def register(phone: PhoneProcess, ext: str, node: Node) -> int:
    port = phone.transports(udp=True)["udp"]
    mark = phone.mark()
    phone.account_add("a", f"sip:{ext}@{DOMAIN}", registrar=f"sip:{node.ip}:5060", register=True, user=ext,
                      password=PASSWORD, expires=300)
    state = phone.wait_event(lambda e: e["event"] == "reg_state", 8.0, since=mark)
    assert state["code"] == 200 and state["active"], state
    return port


def cli(cluster: Cluster, node: Node, *args: str) -> str:
    """Run `raftpbx admin --url NODE ...` as a real process; return its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "raftpbx.cli", "admin", "--url", node.url, "--token-file",
         str(cluster.root / "token"), *args],
        capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, (args, done.returncode, done.stderr)
    return done.stdout


def records_of(node: Node, **filters: Any) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    cursor = None
    for _ in range(100):
        page = node.call("cdr.list", **filters, limit=2, **({"cursor": cursor} if cursor else {}))
        records += page["records"]
        cursor = page["next_cursor"]
        if cursor is None:
            return records
    raise AssertionError("paging did not end")


def same_everywhere(cluster: Cluster, nodes: list[Node], count: int, **filters: Any) -> list[dict[str, Any]]:
    """`cdr.list` with `filters`: `count` ended records, identical on every node of `nodes`."""
    seen: dict[str, list[dict[str, Any]]] = {}

    def ready(node: Node) -> bool:
        seen[node.id] = records_of(node, **filters)
        return len(seen[node.id]) == count and all(r["ended_at"] is not None for r in seen[node.id])

    for node in nodes:
        wait_for(lambda n=node: ready(n), 10.0, f"{count} records on {node.id}")
    first = seen[nodes[0].id]
    assert all(records == first for records in seen.values()), seen
    return first


def test_binding_list_on_every_node_after_a_real_register(
    cluster: Cluster, phones: Callable[[int], list[PhoneProcess]]
) -> None:
    ext, other = new_extension(cluster), new_extension(cluster)
    phone, phone2 = phones(2)
    node2 = cluster.nodes[1]
    started = time.time()
    port = register(phone, ext, node2)
    register(phone2, other, cluster.nodes[2])
    contact = f"sip:{ext}@{phone.bind}:{port}"

    def listed(node: Node) -> dict[str, Any] | None:
        result = node.call("binding.list", extension=ext)
        mine = [b for b in result["bindings"] if b["contact"].strip("<>").startswith(contact)]
        return mine[0] if len(mine) == 1 and result["total"] == 1 else None

    for node in cluster.nodes:
        binding = wait_for(lambda n=node: listed(n), 8.0, f"{ext}'s binding on {node.id}")
        assert binding["extension"] == ext and binding["node_id"] == node2.id and binding["transport"] == "udp"
        assert 250 <= binding["expires_in"] <= 300, binding
        assert started - 1 <= binding["registered_at"] <= time.time() + 1
        assert binding["received"].startswith(phone.bind + ":")
    everyone = cluster.nodes[0].call("binding.list")["bindings"]
    assert {ext, other} <= {b["extension"] for b in everyone}
    text = cli(cluster, cluster.nodes[2], "reg", "list", ext)
    assert contact in text and node2.id in text and other not in text
    as_json = orjson.loads(cli(cluster, cluster.nodes[0], "--json", "reg", "list", ext))
    assert [b["extension"] for b in as_json["bindings"]] == [ext]

    mark = phone.mark()
    phone.unregister("a")
    assert phone.wait_event(lambda e: e["event"] == "reg_state", 8.0, since=mark)["code"] == 200
    for node in cluster.nodes:
        wait_for(lambda n=node: n.call("binding.list", extension=ext)["bindings"] == [], 8.0,
                 f"no binding of {ext} on {node.id}")


def test_call_records_everywhere_filters_exports_and_restarts(
    cluster: Cluster, phones: Callable[[int], list[PhoneProcess]]
) -> None:
    node1, node2, node3 = cluster.nodes
    caller, callee, idle = new_extension(cluster), new_extension(cluster), new_extension(cluster)
    a, b = phones(2)
    register(a, caller, node2)
    register(b, callee, node3)
    t0 = time.time()

    # 1. answered, caller hangs up; visible in call.active on every node while it lasts.
    b.auto_answer("a", 200, delay=0.1)
    call = a.call("a", f"sip:{callee}@{node2.ip}:5060")
    a.wait_call_state(call, "confirmed", timeout=10)
    answered_id = a.call_info(call)["sip_call_id"]
    for node in cluster.nodes:
        active = wait_for(lambda n=node: [c for c in n.call("call.active")["calls"] if c["call_id"] == answered_id],
                          8.0, f"the active call on {node.id}")
        assert active[0]["progress"] == "answered" and active[0]["caller"] == caller
    assert answered_id in cli(cluster, node3, "calls")
    mark = a.mark()
    a.bye(call)
    assert a.wait_event(lambda e: e["event"] == "bye_result", 8.0, since=mark)["code"] == 200

    # 2. busy (486 passed through); 3. an extension with no binding (480).
    b.auto_answer("a", 486, ring=False)
    busy = a.call("a", f"sip:{callee}@{node2.ip}:5060")
    assert a.wait_call_state(busy, "disconnected", timeout=10)["code"] == 486
    busy_id = a.call_info(busy)["sip_call_id"]
    unreachable = a.call("a", f"sip:{idle}@{node2.ip}:5060")
    assert a.wait_call_state(unreachable, "disconnected", timeout=10)["code"] == 480
    unreachable_id = a.call_info(unreachable)["sip_call_id"]
    t1 = time.time()

    records = same_everywhere(cluster, cluster.nodes, 3, extension=caller)
    by_id = {r["call_id"]: r for r in records}
    assert [r["call_id"] for r in records] == [answered_id, busy_id, unreachable_id]  # by start time
    assert by_id[answered_id]["disposition"] == "answered" and by_id[answered_id]["hangup_by"] == "caller"
    assert by_id[answered_id]["billable_seconds"] >= 0 and by_id[answered_id]["nodes"]
    assert by_id[busy_id]["disposition"] == "busy" and by_id[busy_id]["status_code"] == 486
    assert by_id[unreachable_id]["disposition"] == "no-answer" and by_id[unreachable_id]["status_code"] == 480
    for r in records:
        assert t0 - 1 <= r["started_at"] <= r["ended_at"] <= t1 + 1, r
        assert r["callee"] in (callee, idle) and r["caller"] == caller

    # Filters and paging on a real node.
    assert [r["call_id"] for r in records_of(node3, extension=callee)] == [answered_id, busy_id]
    assert [r["call_id"] for r in records_of(node1, extension=caller, disposition="busy")] == [busy_id]
    window = records_of(node2, extension=caller, since=by_id[busy_id]["started_at"],
                        until=by_id[unreachable_id]["started_at"])
    assert [r["call_id"] for r in window] == [busy_id]
    page = node1.call("cdr.list", extension=caller, limit=2, offset=1)
    assert page["total"] == 3 and [r["call_id"] for r in page["records"]] == [busy_id, unreachable_id]
    assert node1.call("cdr.get", call_id=busy_id) == by_id[busy_id]

    # CLI exports (real processes) match the RPC.
    rows = list(csv.DictReader(io.StringIO(cli(cluster, node2, "cdr", "--extension", caller, "--csv"))))
    assert [(r["call_id"], r["disposition"], r["status_code"]) for r in rows] == [
        (answered_id, "answered", "200"), (busy_id, "busy", "486"), (unreachable_id, "no-answer", "480")]
    assert orjson.loads(cli(cluster, node3, "cdr", "--extension", caller, "--json")) == records
    assert "(3 of 3 call records)" in cli(cluster, node1, "cdr", "--extension", caller)

    # A graceful restart: the database persisted, nothing is duplicated.
    everything_before = records_of(node3)
    assert node3.terminate() == 0
    node3.start()
    cluster.wait_leader(timeout=30.0)
    cluster.assert_converged(timeout=20.0)
    assert records_of(node3) == everything_before
    assert same_everywhere(cluster, cluster.nodes, 3, extension=caller) == records

    # kill -9, then the database is lost: the restart restores the dump, reconciles from the finished
    # tail and replays the journal, and lists every record again, once.
    wait_for(lambda: (node2.dir / "raft.dump").exists(), 10.0, "a compacted log on node2")
    node2.kill()
    for suffix in ("", "-wal", "-shm"):
        (node2.dir / f"cdr.sqlite3{suffix}").unlink(missing_ok=True)
    node2.start()
    cluster.wait_leader(timeout=30.0)
    cluster.assert_converged(timeout=20.0)
    wait_for(lambda: records_of(node2) == everything_before, 10.0, "node2's records rebuilt")
    assert "state restored from full dump" in node2.log_path.read_text(errors="replace")
    metrics = urlopen_text(node2.url + "/metrics")
    assert f'raftpbx_cdr_gaps_total{{node="{node2.id}"}} 0' in metrics


def urlopen_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())
