"""deploy/gen_configs.py (inventory -> node.toml per host, credentials) and the systemd unit."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import labkit
import pytest

from raftpbx.config import load_config

GEN = str(labkit.DEPLOY / "gen_configs.py")
EXAMPLE = labkit.DEPLOY / "inventory.example.toml"
UNIT = labkit.DEPLOY / "systemd" / "raftpbx@.service"


def gen(inventory: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, GEN, str(inventory), str(out)], capture_output=True, text=True,
                          timeout=60)


def test_one_valid_node_toml_per_host_and_private_credentials(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = gen(EXAMPLE, out)
    assert proc.returncode == 0, proc.stderr
    for name in ("secret", "token", "cluster.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o600
    secret = (out / "secret").read_text()
    assert len(secret.strip()) >= 32
    for i in (1, 2, 3):
        text = (out / f"node{i}.toml").read_text()
        cfg = load_config(out / f"node{i}.toml", overrides={
            "cluster.secret_file": str(out / "secret"), "admin.token_file": str(out / "token")})
        assert cfg.node_id == f"node{i}"
        assert str(cfg.data_dir) == "/var/lib/raftpbx"
        assert 'secret_file = "/etc/raftpbx/secret"' in text  # the path on the host
        assert sorted(p.id for p in cfg.peers) == sorted(f"node{j}" for j in (1, 2, 3) if j != i)
        assert f'address = "10.0.0.{i}:7001"' in text and f'listen = "10.0.0.{i}:5060"' in text
        assert 'address = "10.0.0.100:5060"' in text
        assert (cfg.service.mode, cfg.service.interface, cfg.service.prefix) == ("ip", "eth0", 32)
        assert str(cfg.service.hook) == "/opt/raftpbx/hooks/service-address"  # where deploy.sh installs it
    doc = json.loads((out / "cluster.json").read_text())
    assert [n["admin_url"] for n in doc["nodes"]] == [f"http://10.0.0.{i}:7002" for i in (1, 2, 3)]
    assert doc["admin_token"] == (out / "token").read_text().strip()
    plan = (out / "hosts.tsv").read_text().splitlines()
    assert plan[0].split("\t")[:4] == ["node1", "root@10.0.0.1", "22", "/opt/raftpbx"]
    assert plan[0].split("\t")[-1] == "ip"
    # A second run keeps the cluster's credentials.
    assert gen(EXAMPLE, out).returncode == 0
    assert (out / "secret").read_text() == secret


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: t.replace('id = "node2"', 'id = "node1"'), "hosts[2].id"),
    (lambda t: t.replace('address = "10.0.0.3"', 'address = "nowhere"'), "hosts[3].address"),
    (lambda t: t.replace('domain = "pbx.example.com"', 'domain = "pbx.example.com"\ncolour = "red"'),
     "cluster.colour: unknown key"),
    (lambda t: t.replace('address = "10.0.0.1"', 'address = "10.0.0.1"\ndata_dir = "var/lib"'),
     "hosts[1].data_dir: must be an absolute path"),
    (lambda t: t.replace('ssh = "root@10.0.0.2"', 'ssh = "root@10.0.0.2; rm -rf /"'), "hosts[2].ssh"),
    (lambda t: t.replace('"log.level" = "info"', '"log.level" = "chatty"'), "log.level"),
    (lambda t: t.replace('"log.level" = "info"', '"raft.colour" = 1'), "raft.colour: unknown key"),
    (lambda t: t.replace('service_mode = "ip"', 'service_mode = "floating"'), "cluster.service_mode: expected"),
    (lambda t: "\n".join(x for x in t.splitlines() if not x.startswith(("service_mode", "interface"))),
     "cluster.service_mode: required"),
    (lambda t: t.replace('interface = "eth0"\n', ''), "hosts[1].interface: required"),
    (lambda t: t.replace('service_address = "10.0.0.100:5060"', 'service_address = "10.0.0.100:5060"\n'
                         'service_prefix = 40'), "service.prefix: must be between 1 and 32"),
])
def test_bad_inventories_are_refused_naming_the_entry(tmp_path: Path, change: object, message: str) -> None:
    inventory = tmp_path / "inv.toml"
    inventory.write_text(change(EXAMPLE.read_text()))  # type: ignore[operator]
    proc = gen(inventory, tmp_path / "out")
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not list((tmp_path / "out").glob("*.toml*")), "nothing is written from a bad inventory"


def test_systemd_unit_is_hardened_and_valid(tmp_path: Path) -> None:
    text = UNIT.read_text()
    directives = dict(re.findall(r"^(\w+)=(.*)$", text, flags=re.M))
    for key, value in {"User": "raftpbx", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "ProtectHome": "yes", "PrivateTmp": "yes", "StateDirectory": "raftpbx",
                       "ConfigurationDirectory": "raftpbx", "Restart": "on-failure",
                       "CapabilityBoundingSet": "", "AmbientCapabilities": ""}.items():
        assert directives.get(key) == value, key
    assert directives["ExecStart"] == "/opt/raftpbx/venv/bin/raftpbx node --config /etc/raftpbx/%i.toml"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing (Debian: systemd; run scripts/bootstrap.sh --test)", pytrace=False)
    # An instance whose ExecStart exists here; systemd-analyze reports unknown or misspelt keys on stderr.
    instance = tmp_path / "raftpbx@node1.service"
    instance.write_text(text.replace("/opt/raftpbx/venv/bin/raftpbx", "/bin/true"))
    proc = subprocess.run([analyze, "verify", str(instance)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


@pytest.mark.parametrize("service_mode", ["ip", "none"])
def test_systemd_drop_in_grants_the_ip_mode_its_capabilities_only(tmp_path: Path, service_mode: str) -> None:
    stage = tmp_path / "stage"
    stage.mkdir()
    shutil.copy(labkit.DEPLOY / "ssh" / "host.sh", stage / "host.sh")
    (stage / "host.env").write_text(f"PREFIX=/bin\nCONFIG_DIR=/etc/raftpbx\nDATA_DIR=/srv/raftpbx\nRUN_DIR=/run/raftpbx\n"
                                    f"PYTHON=python3\nMODE=yes\nSERVICE_MODE={service_mode}\n")
    proc = subprocess.run(["sh", str(stage / "host.sh"), "dropin", "node1"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    dropin = proc.stdout
    assert "ReadWritePaths=/srv/raftpbx" in dropin
    caps = "CAP_NET_ADMIN CAP_NET_RAW"
    if service_mode == "ip":
        assert f"AmbientCapabilities={caps}\n" in dropin and f"CapabilityBoundingSet={caps}\n" in dropin
        assert "AF_PACKET" in dropin  # arping's packet socket
    else:
        assert "Capabilit" not in dropin and "AF_PACKET" not in dropin
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing (Debian: systemd; run scripts/bootstrap.sh --test)", pytrace=False)
    # The unit with its drop-in appended (systemd reads drop-ins after the unit, in order: the same
    # settings), ExecStart pointing at a binary that exists here.
    instance = tmp_path / "raftpbx@node1.service"
    instance.write_text(UNIT.read_text() + "\n" + dropin.replace("/bin/venv/bin/raftpbx", "/bin/true"))
    proc = subprocess.run([analyze, "verify", str(instance)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
