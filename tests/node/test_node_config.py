"""NodeConfig: TOML < env < flags, one frozen dataclass, errors that name the key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from raftpbx.config import ConfigError, HostPort, load_config, parse_host_port, render_toml

SECRET = "s" * 32
TOKEN = "t" * 24


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


MINIMAL = f"""
[node]
id = "n1"
data_dir = "data"
[cluster]
secret = "{SECRET}"
[admin]
token = "{TOKEN}"
"""


def test_minimal_config_defaults_to_loopback(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), env={})
    assert config.node_id == "n1"
    assert config.data_dir == tmp_path / "data"  # relative to the file
    for hp in (config.raft_address, config.admin_listen, config.sip_listen):
        assert hp.host == "127.0.0.1"
    assert config.admin_url == "http://127.0.0.1:7002"
    assert config.peers == ()
    assert config.compaction_min_entries == 5000 and config.leader_fallback_timeout == 1.0
    assert config.log_format == "kv"
    assert config.trunk_ping_interval == 5.0
    assert not config.bootstrap
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.node_id = "x"  # type: ignore[misc]


def test_secrets_never_in_repr(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), env={})
    assert SECRET not in repr(config) and TOKEN not in repr(config)


def test_precedence_toml_env_flags(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + '[raft]\naddress = "127.0.0.5:4000"\n')
    assert str(load_config(path, env={}).raft_address) == "127.0.0.5:4000"
    env = {"RAFTPBX_RAFT_ADDRESS": "127.0.0.6:4000", "RAFTPBX_LOG_LEVEL": "debug"}
    config = load_config(path, env=env)
    assert str(config.raft_address) == "127.0.0.6:4000" and config.log_level == "debug"
    config = load_config(path, env=env, overrides={"raft.address": "127.0.0.7:4000"})
    assert str(config.raft_address) == "127.0.0.7:4000"


def test_peers_and_files(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(SECRET + "\n")
    (tmp_path / "token").write_text(TOKEN)
    text = render_toml(
        {"node.id": "n1", "node.data_dir": str(tmp_path / "d"), "cluster.secret_file": "secret",
         "admin.token_file": "token", "raft.address": "127.0.0.11:7001", "raft.compaction_min_entries": 20},
        {"n2": {"raft": "127.0.0.12:7001", "admin_url": "http://127.0.0.12:7002"},
         "n3": {"raft": "127.0.0.13:7001", "admin_url": "http://127.0.0.13:7002/"}},
    )
    config = load_config(write(tmp_path, text), env={})
    assert config.cluster_secret == SECRET and config.admin_token == TOKEN
    assert [(p.id, p.raft, p.admin_url) for p in config.peers] == [
        ("n2", HostPort("127.0.0.12", 7001), "http://127.0.0.12:7002"),
        ("n3", HostPort("127.0.0.13", 7001), "http://127.0.0.13:7002"),
    ]
    assert config.compaction_min_entries == 20


@pytest.mark.parametrize(
    ("extra", "overrides", "key", "fragment"),
    [
        ("", {"raft.address": "localhost"}, "raft.address", "expected host:port, got 'localhost'"),
        ("", {"raft.address": "127.0.0.1:99999"}, "raft.address", "port out of range"),
        ("", {"raft.address": "0.0.0.0:7001"}, "raft.address", "wildcard"),
        ("", {"raft.address": "raft.example:7001"}, "raft.address", "expected an IP address"),
        ("", {"admin.listen": "127.0.0.1"}, "admin.listen", "expected host:port"),
        ("", {"raft.compaction_min_entries": "many"}, "raft.compaction_min_entries", "expected an integer"),
        ("", {"raft.compaction_min_entries": "1"}, "raft.compaction_min_entries", "at least 2"),
        ("", {"log.level": "loud"}, "log.level", "expected one of"),
        ("", {"log.format": "xml"}, "log.format", "expected one of"),
        ("", {"node.id": "bad id"}, "node.id", "expected letters"),
        ("", {"raft.election_timeout_min": "0.5"}, "raft.election_timeout_max", "must exceed"),
        ("", {"raft.bootstrap": "maybe"}, "raft.bootstrap", "expected true or false"),
        ("", {"raft.adress": "x"}, "raft.adress", "unknown key"),
        ("", {"trunks.ping_interval": "0.01"}, "trunks.ping_interval", "between 0.05 and 3600"),
        ("[raft]\ncolour = 1\n", {}, "raft.colour", "unknown key"),
        ("[peers.n2]\nraft = \"127.0.0.2:1\"\n", {}, "peers.n2.admin_url", "missing"),
        ("[peers.n2]\nraft = \"127.0.0.2:1\"\nadmin_url = \"ftp://x\"\n", {}, "peers.n2.admin_url", "expected http"),
        ("[peers.n1]\nraft = \"127.0.0.2:1\"\nadmin_url = \"http://127.0.0.2:2\"\n", {}, "peers.n1", "names this"),
        ("[peers.n2]\nraft = \"127.0.0.1:7001\"\nadmin_url = \"http://127.0.0.2:2\"\n", {}, "peers.n2.raft",
         "used twice"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, extra: str, overrides: dict[str, str], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL + extra), env={}, overrides=overrides)
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")
    assert fragment in str(info.value)


def test_secret_is_mandatory_and_not_short(tmp_path: Path) -> None:
    text = MINIMAL.replace(f'secret = "{SECRET}"', "")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={})
    assert info.value.key == "cluster.secret" and "mandatory" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL), env={}, overrides={"cluster.secret": "short"})
    assert info.value.key == "cluster.secret" and "too short" in str(info.value)
    assert "short" not in info.value.message.replace("too short", "")  # the value is not echoed
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={}, overrides={"cluster.secret_file": "/nonexistent/x"})
    assert info.value.key == "cluster.secret_file"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL), env={}, overrides={"cluster.secret_file": "/nonexistent/x"})
    assert info.value.key == "cluster.secret" and "not both" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL.replace(f'token = "{TOKEN}"', "")), env={})
    assert info.value.key == "admin.token"


def test_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[node\n"), env={})
    assert "invalid TOML" in str(info.value)


def test_host_port_forms() -> None:
    assert parse_host_port("k", "[::1]:5060") == HostPort("::1", 5060)
    assert str(HostPort("::1", 5060)) == "[::1]:5060"
    assert parse_host_port("k", "pbx.example.com:5061") == HostPort("pbx.example.com", 5061)
    for bad in ("", ":5060", "[::1]5060", "a b:1", "1.2.3:x", "[zz]:1"):
        with pytest.raises(ConfigError):
            parse_host_port("k", bad)


def test_cli_reports_config_errors_with_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + '[raft]\naddress = "nowhere"\n')
    done = subprocess.run([sys.executable, "-m", "raftpbx.cli", "node", "--config", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip() == "config error: raft.address: expected host:port, got 'nowhere'"
    ok = subprocess.run([sys.executable, "-m", "raftpbx.cli", "node", "--config", str(write(tmp_path, MINIMAL)),
                         "--check"], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "config ok" in ok.stdout
