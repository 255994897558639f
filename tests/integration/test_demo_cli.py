"""`raftpbx demo --detach`, `raftpbx admin --cluster ...` and `raftpbx demo --stop`, as a user runs them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from nodecluster import rpc_raw, wait_for

pytestmark = pytest.mark.integration

DEMO_IPS = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]


def _port_free_on_all(port: int) -> bool:
    for ip in DEMO_IPS:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):  # SIP binds both
            with socket.socket(socket.AF_INET, kind) as s:
                try:
                    s.bind((ip, port))
                except OSError:
                    return False
    return True


def _free_common_port(exclude: set[int]) -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind((DEMO_IPS[0], 0))
            port = int(s.getsockname()[1])
        if port not in exclude and _port_free_on_all(port):
            return port
    raise AssertionError("no free port common to the demo addresses")


def raftpbx(*args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "raftpbx.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=timeout)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z":
            return False
    return True


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    work = tmp_path / "demo"
    try:
        yield work
    finally:  # whatever happened, no node survives the test
        with contextlib.suppress(OSError, ValueError, KeyError):
            for node in orjson.loads((work / "cluster.json").read_bytes())["nodes"]:
                if isinstance(node.get("pid"), int) and _alive(node["pid"]):
                    os.kill(node["pid"], signal.SIGKILL)


def test_demo_detach_cluster_json_admin_and_stop(workdir: Path) -> None:
    raft_port = _free_common_port(set())
    admin_port = _free_common_port({raft_port})
    # The nodes bind SIP (UDP and TCP) too: a free port, not 5060, so a developer's `make run` or another
    # suite's cluster cannot collide with this test.
    sip_port = _free_common_port({raft_port, admin_port})
    started = raftpbx("demo", "--detach", "--nodes", "3", "--workdir", str(workdir), "--raft-port", str(raft_port),
                      "--admin-port", str(admin_port), "--sip-port", str(sip_port), "--softphone-help")
    assert started.returncode == 0, started.stderr + started.stdout
    assert "127.0.0.10:5060" in started.stdout
    cluster_file = workdir / "cluster.json"
    assert stat.S_IMODE(cluster_file.stat().st_mode) == 0o600
    doc = orjson.loads(cluster_file.read_bytes())
    assert set(doc) == {"nodes", "service_address", "domain", "admin_token"}
    assert doc["service_address"] == "127.0.0.10:5060"
    assert [n["id"] for n in doc["nodes"]] == ["node1", "node2", "node3"]
    for i, node in enumerate(doc["nodes"], start=1):
        assert set(node) == {"id", "sip", "raft", "admin_url", "pid", "data_dir"}
        assert node["sip"] == f"127.0.0.{10 + i}:{sip_port}"
        assert node["raft"] == f"127.0.0.{10 + i}:{raft_port}"
        assert node["admin_url"] == f"http://127.0.0.{10 + i}:{admin_port}"
        assert node["data_dir"] == str(workdir.resolve() / f"node{i}")
        assert _alive(node["pid"])
        assert stat.S_IMODE(Path(node["data_dir"]).stat().st_mode) == 0o700
    for name in ("cluster.secret", "admin.token"):
        assert stat.S_IMODE((workdir / name).stat().st_mode) == 0o600
    # The demo passwords were printed, and are stored nowhere in clear.
    passwords = [line.split("password: ")[1].strip() for line in started.stdout.splitlines() if "password: " in line
                 and line.strip()[:4].isdigit()]
    assert len(passwords) == 4
    stored = b"".join(p.read_bytes() for p in workdir.rglob("*") if p.is_file())
    assert not any(pw.encode() in stored for pw in passwords)

    status = raftpbx("admin", "--cluster", str(cluster_file), "--json", "cluster", "status")
    assert status.returncode == 0, status.stderr
    body = orjson.loads(status.stdout)
    assert body["leader"] in {"node1", "node2", "node3"}
    assert [n["healthy"] for n in body["nodes"]] == [True, True, True]
    table = raftpbx("admin", "--cluster", str(cluster_file), "cluster", "status")
    assert table.returncode == 0 and "leader:" in table.stdout and "node3" in table.stdout
    listed = raftpbx("admin", "--cluster", str(cluster_file), "--json", "ext", "list")
    assert [e["extension"] for e in orjson.loads(listed.stdout)["extensions"]] == ["1001", "1002", "1003", "1004"]
    created = raftpbx("admin", "--cluster", str(cluster_file), "ext", "create", "2001", "--password-stdin",
                      stdin="Tr0ub4dor-and-3\n")
    assert created.returncode == 0, created.stderr
    bad = raftpbx("admin", "--cluster", str(cluster_file), "ext", "create", "20x1", "--password", "Tr0ub4dor-and-3")
    assert bad.returncode == 1 and "extension" in bad.stderr
    usage = raftpbx("admin", "--cluster", str(cluster_file), "ext", "frobnicate")
    assert usage.returncode == 2
    wrong = raftpbx("admin", "--cluster", str(cluster_file), "--token", "not-the-token-at-all", "state", "digest")
    assert wrong.returncode == 1 and "unauthorized" in wrong.stderr

    again = raftpbx("demo", "--detach", "--workdir", str(workdir), "--raft-port", str(raft_port),
                    "--admin-port", str(admin_port), "--sip-port", str(sip_port))
    assert again.returncode == 1 and "running" in again.stderr

    def digests() -> set[tuple[int, str]]:
        out = set()
        for node in doc["nodes"]:
            _, reply = rpc_raw(node["admin_url"], doc["admin_token"], "state.digest")
            out.add((reply["result"]["applied_index"], reply["result"]["digest"]))
        return out

    wait_for(lambda: len(digests()) == 1, 10.0, "equal digests on the demo nodes")

    pids = [n["pid"] for n in doc["nodes"]]
    stopped = raftpbx("demo", "--stop", "--workdir", str(workdir))
    assert stopped.returncode == 0, stopped.stderr
    wait_for(lambda: not any(_alive(p) for p in pids), 10.0, "every demo node to exit")
    for i in range(1, 4):
        assert "node.stopped" in (workdir / f"node{i}" / "node.log").read_text()

    # Reusing the workdir brings back the same cluster, extensions included (not re-created).
    restarted = raftpbx("demo", "--detach", "--workdir", str(workdir), "--raft-port", str(raft_port),
                        "--admin-port", str(admin_port), "--sip-port", str(sip_port))
    assert restarted.returncode == 0, restarted.stderr
    assert "existing" in restarted.stdout
    listed = raftpbx("admin", "--cluster", str(cluster_file), "--json", "ext", "list")
    assert [e["extension"] for e in orjson.loads(listed.stdout)["extensions"]] == ["1001", "1002", "1003", "1004",
                                                                                   "2001"]
    wait_for(lambda: len(digests()) == 1, 10.0, "equal digests on the demo nodes")
    assert raftpbx("demo", "--stop", "--workdir", str(workdir)).returncode == 0


def test_demo_in_the_foreground_stops_every_node_on_ctrl_c(workdir: Path) -> None:
    raft_port = _free_common_port(set())
    admin_port = _free_common_port({raft_port})
    sip_port = _free_common_port({raft_port, admin_port})
    demo = subprocess.Popen([sys.executable, "-m", "raftpbx.cli", "demo", "--nodes", "3", "--workdir", str(workdir),
                             "--raft-port", str(raft_port), "--admin-port", str(admin_port),
                             "--sip-port", str(sip_port), "--extensions", "1001"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert demo.stdout is not None
        lines = []
        for line in demo.stdout:  # bounded: the demo exits (and closes stdout) if it cannot start
            lines.append(line)
            if "Ctrl-C stops every node" in line:
                break
        assert any("1001  password: " in line for line in lines), "".join(lines)
        pids = [n["pid"] for n in orjson.loads((workdir / "cluster.json").read_bytes())["nodes"]]
        assert all(_alive(p) for p in pids)
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=20) == 0
        assert not any(_alive(p) for p in pids)
        assert [n["pid"] for n in orjson.loads((workdir / "cluster.json").read_bytes())["nodes"]] == [None] * 3
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(timeout=10)
