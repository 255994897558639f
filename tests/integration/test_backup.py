"""Backup and restore with real processes: `raftpbx admin backup FILE` from a live 3-node cluster that has
extensions and call history (a real call from a pjsua2 phone), `raftpbx restore FILE --config` into the
data dirs of a fresh 3-node cluster, which then serves the same extensions (a phone registers with the
same password), the same call records and digest, and takes writes. A corrupted backup, or a data dir
that already holds node state, is refused with a clear error and nothing is written."""

from __future__ import annotations

import itertools
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nodecluster import Cluster, Node, make_cluster_fixture, sip_up, wait_for  # noqa: F401

from chaos.phone import PhoneProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

_octet = itertools.count(120)
DOMAIN = "backup.raftpbx.local"
PASSWORD = "backup-Secret-4242"


def _sip_up(node: Node) -> bool:
    return sip_up(node, DOMAIN)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "raftpbx.cli", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def records(node: Node) -> list[dict[str, Any]]:
    return list(node.call("cdr.list", limit=100)["records"])


@pytest.fixture
def phones(tmp_path: Path) -> Iterator[Callable[[str], PhoneProcess]]:
    started: list[PhoneProcess] = []

    def make(prefix: str) -> PhoneProcess:
        phone = PhoneProcess(f"{prefix}.{next(_octet)}", log=tmp_path / f"phone{len(started)}.log")
        PhoneProcess.start_all([phone])
        started.append(phone)
        return phone

    try:
        yield make
    finally:
        for phone in started:
            phone.close()


def register(phone: PhoneProcess, ext: str, node: Node, account: str) -> None:
    phone.transports(udp=True)
    mark = phone.mark()
    phone.account_add(account, f"sip:{ext}@{DOMAIN}", registrar=f"sip:{node.ip}:5060", register=True,
                      user=ext, password=PASSWORD, expires=300)
    state = phone.wait_event(lambda e: e["event"] == "reg_state", 8.0, since=mark)
    assert state["code"] == 200 and state["active"], state


def test_backup_and_restore_round_trip(make_cluster: Callable[..., Cluster], tmp_path: Path,
                                       phones: Callable[[str], PhoneProcess]) -> None:
    settings = {"cluster.domain": DOMAIN}
    old = make_cluster(settings=settings, name="old")
    leader = old.start()
    for node in old.nodes:
        wait_for(lambda n=node: _sip_up(n), 15.0, f"SIP on {node.id}")
    for ext in ("7001", "7002", "7003"):
        leader.call("extension.create", extension=ext, password=PASSWORD, display_name=f"User {ext}")
    phone = phones(old.nodes[0].ip.rsplit(".", 1)[0])
    register(phone, "7001", old.nodes[1], "a")
    call = phone.call("a", f"sip:7003@{old.nodes[1].ip}:5060")  # 7003 has no binding: 480, a record
    assert phone.wait_call_state(call, "disconnected", timeout=10)["code"] == 480
    wait_for(lambda: all(len(records(n)) == 1 for n in old.nodes), 10.0, "the call record everywhere")

    backup = tmp_path / "cluster.backup"
    done = run_cli("admin", "--url", old.nodes[2].url, "--token-file", str(old.root / "token"), "backup",
                   str(backup))
    assert done.returncode == 0, done.stderr
    assert "call history included" in done.stdout
    assert stat.S_IMODE(os.stat(backup).st_mode) == 0o600  # it holds HA1 digests
    ((applied, digest),) = set(old.assert_converged().values())
    expected_exts = old.nodes[0].call("extension.list")["extensions"]
    expected_cdr = records(old.nodes[0])

    # A corrupted copy is refused, and writes nothing.
    fresh = make_cluster(settings=settings, name="new")
    corrupted = tmp_path / "corrupted.backup"
    blob = bytearray(backup.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    corrupted.write_bytes(bytes(blob))
    bad = run_cli("restore", str(corrupted), "--config", str(fresh.nodes[0].config_path))
    assert bad.returncode == 1 and "corrupted (checksum mismatch)" in bad.stderr, bad.stderr
    assert not (fresh.nodes[0].dir / "raft.journal").exists()

    for node in fresh.nodes:
        done = run_cli("restore", str(backup), "--config", str(node.config_path))
        assert done.returncode == 0, done.stderr
        assert f"applied index {applied}" in done.stdout
    again = run_cli("restore", str(backup), "--config", str(fresh.nodes[0].config_path))
    assert again.returncode == 1 and "already holds node state" in again.stderr, again.stderr

    old.kill_all()  # the old cluster is gone; the new one stands on the backup alone
    new_leader = fresh.start(bootstrap=False)
    assert set(fresh.digests().values()) == {(applied, digest)}
    for node in fresh.nodes:
        assert node.call("extension.list")["extensions"] == expected_exts
        wait_for(lambda n=node: records(n) == expected_cdr, 10.0, f"the call history on {node.id}")
    for node in fresh.nodes:
        wait_for(lambda n=node: _sip_up(n), 15.0, f"SIP on {node.id}")
    register(phones(fresh.nodes[0].ip.rsplit(".", 1)[0]), "7002", fresh.nodes[2], "b")  # same HA1s
    new_leader.call("extension.create", extension="7999", password=PASSWORD)  # and it takes writes
    fresh.assert_converged()
