"""`[service]` config (Contract B): address, mode (loopback by default for 127.0.0.0/8, else explicit),
ip mode's interface, prefix and hook; every error names the key and says what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from raftpbx.config import ConfigError, HostPort, default_hook, load_config

MINIMAL = {"node.id": "n1", "node.data_dir": "data", "cluster.secret": "s" * 32, "admin.token": "t" * 24}


def load(**service: object) -> object:
    overrides = dict(MINIMAL)
    overrides.update({f"service.{key}": str(value) for key, value in service.items()})
    return load_config(None, env={}, overrides=overrides)


def error(**service: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(**service)
    return info.value


def test_no_address_is_mode_none() -> None:
    cfg = load_config(None, env={}, overrides=MINIMAL)
    assert cfg.service.mode == "none" and cfg.service.address is None and cfg.service_address is None


def test_loopback_address_defaults_to_loopback_mode() -> None:
    cfg = load(address="127.0.0.10:5060")
    assert cfg.service.mode == "loopback"  # type: ignore[attr-defined]
    assert cfg.service.address == HostPort("127.0.0.10", 5060)  # type: ignore[attr-defined]
    assert cfg.service_address == HostPort("127.0.0.10", 5060)  # type: ignore[attr-defined]


def test_routable_address_needs_an_explicit_mode() -> None:
    err = error(address="198.51.100.10:5060")
    assert err.key == "service.mode" and "ip" in err.message


def test_ip_mode_needs_an_interface_and_defaults_prefix_and_hook() -> None:
    err = error(address="198.51.100.10:5060", mode="ip")
    assert err.key == "service.interface"
    cfg = load(address="198.51.100.10:5060", mode="ip", interface="eth0")
    service = cfg.service  # type: ignore[attr-defined]
    assert service.mode == "ip" and service.interface == "eth0" and service.prefix == 32
    assert service.hook == default_hook() and service.hook.name == "service-address"
    cfg = load(address="[2001:db8::10]:5060", mode="ip", interface="eth0", prefix=64, hook="/usr/local/bin/h")
    assert cfg.service.prefix == 64 and cfg.service.hook == Path("/usr/local/bin/h")  # type: ignore[attr-defined]


def test_the_default_hook_is_the_one_in_this_tree() -> None:
    hook = default_hook()
    assert hook.exists() and hook.stat().st_mode & 0o111, hook


@pytest.mark.parametrize(
    ("service", "key", "words"),
    [
        ({"address": "127.0.0.10:5060", "mode": "sideways"}, "service.mode", "expected one of"),
        ({"mode": "loopback"}, "service.address", "required"),
        ({"mode": "ip", "interface": "eth0"}, "service.address", "required"),
        ({"address": "198.51.100.10:5060", "mode": "loopback"}, "service.address", "loopback address"),
        ({"address": "127.0.0.10:5060", "mode": "ip", "interface": "lo"}, "service.address", "loopback mode"),
        ({"address": "pbx.example:5060", "mode": "loopback"}, "service.address", "IP address"),
        ({"address": "0.0.0.0:5060", "mode": "ip", "interface": "eth0"}, "service.address", "wildcard"),
        ({"address": "127.0.0.1:5060"}, "service.address", "sip.listen"),
        ({"address": "127.0.0.10:5060", "interface": "eth0"}, "service.interface", "only meaningful"),
        ({"address": "127.0.0.10:5060", "prefix": 24}, "service.prefix", "only meaningful"),
        ({"address": "127.0.0.10:5060", "hook": "/bin/true"}, "service.hook", "only meaningful"),
        ({"address": "198.51.100.10:5060", "mode": "ip", "interface": "eth0;rm"}, "service.interface", "interface"),
        ({"address": "198.51.100.10:5060", "mode": "ip", "interface": "eth0", "prefix": 33}, "service.prefix",
         "between 1 and 32"),
        ({"address": "127.0.0.10:nope"}, "service.address", "host:port"),
    ],
)
def test_bad_service_settings_name_the_key(service: dict[str, object], key: str, words: str) -> None:
    err = error(**service)
    assert err.key == key and words in err.message, str(err)


def test_mode_none_keeps_the_address_for_the_record() -> None:
    cfg = load(address="198.51.100.10:5060", mode="none")
    assert cfg.service.mode == "none" and cfg.service.address == HostPort("198.51.100.10", 5060)  # type: ignore[attr-defined]


def test_service_keys_from_the_environment(tmp_path: Path) -> None:
    env = {"RAFTPBX_SERVICE_ADDRESS": "198.51.100.10:5060", "RAFTPBX_SERVICE_MODE": "ip",
           "RAFTPBX_SERVICE_INTERFACE": "eth1"}
    cfg = load_config(None, env=env, overrides=MINIMAL)
    assert cfg.service.mode == "ip" and cfg.service.interface == "eth1"
