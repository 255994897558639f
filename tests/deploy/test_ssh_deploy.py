"""deploy/ssh/deploy.sh for real: sshd in three lab hosts, deploy a 3-node cluster, rolling restart.

Lab hosts h1..h3 each run their own sshd (host key and authorized key made here, listening only on the
host's lab address); h4 is the operator's machine that runs deploy.sh, which reaches the hosts through
ssh only (strict host key checking against the keys made here). The hosts share this machine's
filesystem, so each gets its own prefix, config dir, data dir and run dir under a temp dir (real hosts use
/opt/raftpbx, /etc/raftpbx, /var/lib/raftpbx); they have no systemd, so deploy.sh uses its fallback
(setsid and pid files). The hosts have no package index: the dependency wheels are repacked from this
interpreter's installed distributions (tests/deploy/wheelhouse.py); `deploy.sh INVENTORY build` builds
the raftpbx wheel outside the lab (it may need the package index), deploy.sh ships it from h4.

Needs root (CI runs as root); fails, never skips, when the lab cannot be built.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import labkit
import pytest
import wheelhouse
from labkit import Lab, wait_for

DEPLOY_SH = str(labkit.DEPLOY / "ssh" / "deploy.sh")
NODES = ["h1", "h2", "h3"]
OPERATOR = "h4"
WRITER = str(Path(__file__).with_name("writer.py"))


@dataclass
class Deployment:
    lab: Lab
    tmp: Path
    inventory: Path
    out: Path
    env: dict[str, str]

    def deploy_sh(self, *args: str, timeout: float = 200.0) -> subprocess.CompletedProcess[str]:
        """deploy.sh run on the operator's lab host, with the wheels built beforehand."""
        proc = self.lab.run(OPERATOR, "bash", DEPLOY_SH, str(self.inventory), *args, check=False,
                            timeout=timeout, env={**self.env, "RAFTPBX_WHEELS_READY": "1"})
        assert proc.returncode == 0, f"deploy.sh {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def admin(self, host: str, *args: str) -> Any:
        """`raftpbx admin --json ...` against the node on `host`, run from the operator's machine."""
        proc = self.lab.run(OPERATOR, sys.executable, "-m", "raftpbx.cli", "admin", "--url",
                            f"http://{self.lab.address(host)}:7002", "--token-file", str(self.out / "token"),
                            "--json", *args, check=False, timeout=30)
        assert proc.returncode == 0, f"raftpbx admin {' '.join(args)} on {host}: {proc.stderr}"
        return json.loads(proc.stdout)

    def pid(self, host: str) -> int:
        return int((self.tmp / host / "run" / f"node{host[1:]}.pid").read_text())


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rpbx-test", "-f", str(path)],
                   check=True, capture_output=True)
    return Path(f"{path}.pub").read_text().strip()


def _start_sshd(lab: Lab, host: str, tmp: Path, authorized: Path) -> subprocess.Popen[bytes]:
    hdir = tmp / host
    hdir.mkdir(parents=True, exist_ok=True)
    key = hdir / "ssh_host_ed25519_key"
    _keygen(key)
    config = hdir / "sshd_config"
    config.write_text("\n".join([
        f"ListenAddress {lab.address(host)}:22",
        f"HostKey {key}",
        f"PidFile {hdir / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized}",
        "StrictModes no",  # the temp dir's modes are pytest's
        "UsePAM no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password",
        "LogLevel ERROR",
        "",
    ]))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    log = (hdir / "sshd.log").open("ab")
    return lab.popen(host, ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stdout=log, stderr=log)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    labkit.require_lab_tools("ssh", "ssh-keygen", "sshd")
    tmp = tmp_path_factory.mktemp("deploy")
    wheels = tmp / "wheelhouse"
    wheelhouse.build_wheelhouse(wheels)
    with Lab(4) as lab:
        client_key = tmp / "client_key"
        authorized = tmp / "authorized_keys"
        authorized.write_text(_keygen(client_key) + "\n")
        sshds = [_start_sshd(lab, h, tmp, authorized) for h in NODES]
        known = [f"{lab.address(h)} {(tmp / h / 'ssh_host_ed25519_key.pub').read_text().strip()}" for h in NODES]
        (tmp / "known_hosts").write_text("\n".join(known) + "\n")
        ssh_config = tmp / "ssh_config"
        ssh_config.write_text("\n".join([
            "Host *",
            "  User root",
            f"  IdentityFile {client_key}",
            "  IdentitiesOnly yes",
            f"  UserKnownHostsFile {tmp / 'known_hosts'}",
            "  GlobalKnownHostsFile /dev/null",
            "  StrictHostKeyChecking yes",
            "  LogLevel ERROR",
            "",
        ]))
        python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
        hosts = "\n".join(
            f'[[hosts]]\nid = "node{h[1:]}"\nssh = "root@{lab.address(h)}"\naddress = "{lab.address(h)}"\n'
            f'prefix = "{tmp / h / "opt"}"\nconfig_dir = "{tmp / h / "etc"}"\n'
            f'data_dir = "{tmp / h / "var"}"\nrun_dir = "{tmp / h / "run"}"\n'
            for h in NODES)
        inventory = tmp / "lab.toml"
        inventory.write_text(f'[cluster]\ndomain = "lab.example"\nservice_address = "198.51.100.100:5060"\n'
                             f'interface = "eth0"\npython = "{python}"\nsystemd = "no"\n\n{hosts}')
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": str(tmp),
               "RAFTPBX_DEPLOY_OUT": str(tmp / "out"), "RAFTPBX_SSH_CONFIG": str(ssh_config),
               "RAFTPBX_WHEELHOUSE": str(wheels), "PYTHON": sys.executable}
        dep = Deployment(lab, tmp, inventory, tmp / "out", env)
        # The build step runs here, outside the lab: building the wheel may need the package index
        # (pip's isolated build fetches setuptools), which the lab hosts cannot reach by design.
        build = subprocess.run(["bash", DEPLOY_SH, str(inventory), "build"], capture_output=True, text=True,
                               env={**os.environ, **env}, timeout=180)
        assert build.returncode == 0, f"deploy.sh build failed:\n{build.stdout}\n{build.stderr}"
        assert list((tmp / "out" / "wheels").glob("raftpbx-*.whl"))
        ssh = ["ssh", "-F", str(ssh_config), "-o", "BatchMode=yes"]
        for h in NODES:
            wait_for(lambda h=h: lab.run(OPERATOR, *ssh, f"root@{lab.address(h)}", "true", check=False,
                                         timeout=10).returncode == 0, 15, f"sshd on {h}")
        try:
            yield dep
        finally:
            lab.run(OPERATOR, "bash", DEPLOY_SH, str(inventory), "stop", check=False, timeout=90, env=env)
            for proc in sshds:
                proc.terminate()
                proc.wait(timeout=10)


def test_deploy_installs_configures_and_starts_a_healthy_cluster(deployment: Deployment) -> None:
    dep = deployment
    proc = dep.deploy_sh(timeout=240)
    assert "healthy: leader" in proc.stdout
    assert "bootstrapping a new cluster of 3 nodes" in proc.stderr
    for h in NODES:
        etc = dep.tmp / h / "etc"
        for name in ("secret", "token", f"node{h[1:]}.toml"):
            assert (etc / name).stat().st_mode & 0o777 == 0o600, f"{h}: {name} is not mode 0600"
        assert (dep.tmp / h / "var").stat().st_mode & 0o777 == 0o700
        assert not (etc / f"node{h[1:]}.env").exists()
        assert (dep.tmp / h / "opt" / "venv" / "bin" / "raftpbx").exists()
        assert not (dep.tmp / h / "opt" / "stage" / "secret").exists()
    status = dep.admin("h1", "cluster", "status")
    assert status["leader"] and len(status["nodes"]) == 3 and all(n["healthy"] for n in status["nodes"])
    # The nodes really run in their hosts: each one's admin address is its own lab address.
    assert {n["admin_url"] for n in status["nodes"]} >= {f"http://{dep.lab.address(h)}:7002" for h in NODES[1:]}

    dep.admin("h2", "ext", "create", "5001", "--password", "correct-horse-battery", "--display-name", "Lab")
    for h in NODES:
        got = wait_for(lambda h=h: dep.admin(h, "ext", "get", "5001"), 10, f"extension 5001 on {h}")
        assert got["display_name"] == "Lab"

    # A second deploy is idempotent: nothing restarts, nothing bootstraps, the cluster stays healthy.
    pids = {h: dep.pid(h) for h in NODES}
    proc = dep.deploy_sh(timeout=240)
    assert "bootstrapping" not in proc.stderr
    assert {h: dep.pid(h) for h in NODES} == pids


def test_rolling_restart_under_writes_loses_no_acknowledged_write(deployment: Deployment) -> None:
    dep = deployment
    if not (dep.tmp / "h1" / "run" / "node1.pid").exists():  # this test run alone
        dep.deploy_sh(timeout=240)
    pids = {h: dep.pid(h) for h in NODES}
    acks, stop = dep.tmp / f"acks-{uuid.uuid4().hex}", dep.tmp / f"stop-{uuid.uuid4().hex}"
    acks.touch()
    errlog = (dep.tmp / "writer.log").open("ab")
    writer = dep.lab.popen(OPERATOR, [sys.executable, WRITER, str(dep.out / "cluster.json"), str(acks),
                                      str(stop), "60000"], stdout=errlog, stderr=errlog)
    try:
        wait_for(lambda: len(acks.read_text().split()) >= 10, 30, "the first acknowledged writes")
        proc = dep.deploy_sh("rolling-restart", timeout=200)
        restarted = len(acks.read_text().split())
        wait_for(lambda: len(acks.read_text().split()) >= restarted + 10, 30, "writes after the restart")
    finally:
        stop.touch()
        writer.wait(timeout=30)
    assert proc.stderr.count("caught up") + proc.stdout.count("caught up") == 3, proc.stdout + proc.stderr
    assert all(dep.pid(h) != pids[h] for h in NODES), "every node was restarted"

    acked = set(acks.read_text().split())
    assert len(acked) >= 20
    digests: dict[str, tuple[int, str]] = {}

    def converged() -> bool:
        for h in NODES:
            d = dep.admin(h, "state", "digest")
            digests[h] = (d["applied_index"], d["digest"])
        return len(set(digests.values())) == 1

    wait_for(converged, 20, "equal applied indexes and digests on every node")
    for h in NODES:
        listed = {e["extension"] for e in dep.admin(h, "ext", "list")["extensions"]}
        missing = acked - listed
        assert not missing, f"{h} lost acknowledged writes: {sorted(missing)[:10]}"
