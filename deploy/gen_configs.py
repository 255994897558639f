#!/usr/bin/env python3
"""Write one node.toml per host of an inventory, plus the shared cluster secret and admin token.

    python3 deploy/gen_configs.py INVENTORY.toml OUTDIR

Inventory (TOML; see deploy/inventory.example.toml):

    [cluster]
    domain = "pbx.example.com"              # SIP domain and digest realm
    service_address = "10.0.0.100:5060"     # floating service address held by the leader (optional)
    service_mode = "ip"                     # loopback | ip | none; default: loopback for 127.0.0.0/8,
                                            # ip when an interface is given, else required
    interface = "eth0"                      # ip mode: the interface that carries the address
    service_prefix = 32                     # ip mode: prefix length of the address (default 32 / 128)
    service_hook = "/opt/raftpbx/hooks/service-address"   # ip mode (default PREFIX/hooks/service-address,
                                            # installed there by deploy.sh)
    prefix = "/opt/raftpbx"                 # venv at PREFIX/venv; defaults shown for every path
    config_dir = "/etc/raftpbx"             # ID.toml, secret, token
    data_dir = "/var/lib/raftpbx"           # Raft journal and dumps
    run_dir = "/run/raftpbx"                # pid files and logs when the host has no systemd
    python = "python3"                      # interpreter that creates the venv on the host
    raft_port = 7001
    admin_port = 7002
    sip_port = 5060
    systemd = "auto"                        # auto | yes | no

    [settings]                              # extra node.toml settings for every node (dotted keys)
    "log.level" = "info"

    [[hosts]]
    id = "node1"
    ssh = "root@10.0.0.1"                   # ssh destination (user@host); ssh_port = 22 optional
    address = "10.0.0.1"                    # the node binds Raft, admin and SIP here
    # any [cluster] path, python, systemd, interface or service_hook setting may be overridden per host

OUTDIR receives ID.toml for every host (paths are those ON THE HOST), `secret` and `token` (mode 0600,
generated once and reused: rerunning keeps the cluster's credentials), `hosts.tsv` (the plan deploy.sh
reads: one line per host) and `cluster.json` (mode 0600: admin URLs and token for `raftpbx admin
--cluster`, from a machine that reaches the admin addresses).

The node.toml schema is raftpbx.config's: the files are written with raftpbx.config.render_toml and every
generated file is validated with raftpbx.config.load_config before this script succeeds.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

try:
    from raftpbx.config import ConfigError, load_config, render_toml
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from raftpbx.config import ConfigError, load_config, render_toml

CLUSTER_DEFAULTS: dict[str, Any] = {
    "domain": "raftpbx.local",
    "service_address": None,
    "service_mode": None,
    "interface": None,
    "service_prefix": None,
    "service_hook": None,
    "prefix": "/opt/raftpbx",
    "config_dir": "/etc/raftpbx",
    "data_dir": "/var/lib/raftpbx",
    "run_dir": "/run/raftpbx",
    "python": "python3",
    "raft_port": 7001,
    "admin_port": 7002,
    "sip_port": 5060,
    "systemd": "auto",
}
PER_HOST = ("prefix", "config_dir", "data_dir", "run_dir", "python", "systemd", "interface", "service_hook")
SERVICE_MODES = ("loopback", "ip", "none")
ID_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
SAFE_RE = re.compile(r"^[A-Za-z0-9_.,/@:+=-]+$")  # values that go into hosts.tsv and shell commands


class InventoryError(Exception):
    """A bad inventory; the message names the entry."""


def _write_private(path: Path, data: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:  # mkstemp creates it mode 0600
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.chmod(path, 0o600)


def _credential(path: Path, nbytes: int) -> None:
    if not path.exists():
        _write_private(path, secrets.token_urlsafe(nbytes) + "\n")
    os.chmod(path, 0o600)


def _safe(where: str, value: object) -> str:
    text = str(value)
    if not SAFE_RE.match(text):
        raise InventoryError(f"{where}: {text!r} holds characters not allowed here (spaces, quotes, ...)")
    return text


def load_inventory(path: Path) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """(cluster settings with defaults, extra node settings, hosts with per-host settings merged)."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InventoryError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InventoryError(f"{path}: invalid TOML: {exc}") from None
    unknown = set(doc) - {"cluster", "settings", "hosts"}
    if unknown:
        raise InventoryError(f"unknown section(s): {', '.join(sorted(unknown))}")
    cluster = dict(CLUSTER_DEFAULTS)
    for key, value in doc.get("cluster", {}).items():
        if key not in CLUSTER_DEFAULTS:
            raise InventoryError(f"cluster.{key}: unknown key")
        cluster[key] = value
    if cluster["systemd"] not in ("auto", "yes", "no"):
        raise InventoryError("cluster.systemd: expected auto, yes or no")
    cluster["service_mode"] = _service_mode(doc.get("cluster", {}), doc.get("hosts", []), cluster)
    settings = doc.get("settings", {})
    if not isinstance(settings, dict):
        raise InventoryError("settings: expected a table of dotted keys")
    raw_hosts = doc.get("hosts", [])
    if not isinstance(raw_hosts, list) or not raw_hosts:
        raise InventoryError("hosts: give at least one [[hosts]] entry")
    hosts: list[dict[str, Any]] = []
    seen: set[str] = set()
    for n, raw in enumerate(raw_hosts, 1):
        where = f"hosts[{n}]"
        for key in ("id", "ssh", "address"):
            if not raw.get(key):
                raise InventoryError(f"{where}.{key}: required")
        extra = set(raw) - {"id", "ssh", "ssh_port", "address", *PER_HOST}
        if extra:
            raise InventoryError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
        if not ID_RE.match(raw["id"]) or raw["id"] in seen:
            raise InventoryError(f"{where}.id: {raw['id']!r} is not a valid, unique node id")
        seen.add(raw["id"])
        try:
            ipaddress.ip_address(raw["address"])
        except ValueError:
            raise InventoryError(f"{where}.address: {raw['address']!r} is not an IP address") from None
        host = {key: cluster[key] for key in PER_HOST}
        host.update(raw)
        host.setdefault("ssh_port", 22)
        for key in ("ssh", "ssh_port", "prefix", "config_dir", "data_dir", "run_dir", "python", "systemd"):
            _safe(f"{where}.{key}", host[key])
        for key in ("prefix", "config_dir", "data_dir", "run_dir"):
            if not str(host[key]).startswith("/"):
                raise InventoryError(f"{where}.{key}: must be an absolute path on the host")
        if cluster["service_mode"] == "ip":
            if not host["interface"]:
                raise InventoryError(f"{where}.interface: required with service_mode = \"ip\" (cluster.interface "
                                     "or per host: the interface that carries the service address)")
            if not host["service_hook"]:
                host["service_hook"] = f"{host['prefix']}/hooks/service-address"
            _safe(f"{where}.service_hook", host["service_hook"])
            if not str(host["service_hook"]).startswith("/"):
                raise InventoryError(f"{where}.service_hook: must be an absolute path on the host")
        hosts.append(host)
    return cluster, settings, hosts


def _service_mode(raw_cluster: dict[str, Any], raw_hosts: Any, cluster: dict[str, Any]) -> str | None:
    """The service-address mode: given, or loopback for a 127.0.0.0/8 address, or ip when an interface is
    named (for the cluster or every host); None without a service address."""
    mode = cluster["service_mode"]
    if mode is not None and mode not in SERVICE_MODES:
        raise InventoryError(f"cluster.service_mode: expected one of {', '.join(SERVICE_MODES)}, got {mode!r}")
    address = cluster["service_address"]
    if address is None:
        for key in ("service_mode", "service_prefix", "service_hook"):
            if key in raw_cluster:
                raise InventoryError(f"cluster.{key}: only meaningful with cluster.service_address")
        return None
    host_text = str(address).rsplit(":", 1)[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host_text)
    except ValueError:
        raise InventoryError(f"cluster.service_address: {address!r} is not IP:PORT") from None
    if mode is None:
        hosts = raw_hosts if isinstance(raw_hosts, list) else []
        if ip.version == 4 and ip in ipaddress.ip_network("127.0.0.0/8"):
            mode = "loopback"
        elif cluster["interface"] or (hosts and all(isinstance(h, dict) and h.get("interface") for h in hosts)):
            mode = "ip"
        else:
            raise InventoryError(f"cluster.service_mode: required for the service address {address} (outside "
                                 "127.0.0.0/8): \"ip\" with cluster.interface, or \"none\"")
    if mode != "ip" and cluster["service_prefix"] is not None:
        raise InventoryError(f"cluster.service_prefix: only meaningful with service_mode = \"ip\" (mode is {mode!r})")
    return str(mode)


def _hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def generate(inventory: Path, outdir: Path) -> list[dict[str, Any]]:
    """Write the files; return the hosts with their admin URLs. Raises InventoryError or ConfigError."""
    cluster, settings, hosts = load_inventory(inventory)
    outdir.mkdir(parents=True, exist_ok=True)
    _credential(outdir / "secret", 32)
    _credential(outdir / "token", 24)
    for host in hosts:
        host["raft"] = _hostport(host["address"], cluster["raft_port"])
        host["admin_listen"] = _hostport(host["address"], cluster["admin_port"])
        host["admin_url"] = f"http://{host['admin_listen']}"
        host["sip"] = _hostport(host["address"], cluster["sip_port"])
    plan: list[str] = []
    pending: list[tuple[Path, Path]] = []  # every file is validated before any is replaced
    try:
        _render_all(cluster, settings, hosts, outdir, plan, pending)
    except ConfigError:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, final in pending:
        os.replace(tmp, final)
    (outdir / "hosts.tsv").write_text("\n".join(plan) + "\n", encoding="utf-8")
    token = (outdir / "token").read_text(encoding="utf-8").strip()
    nodes = [{"id": h["id"], "sip": h["sip"], "raft": h["raft"], "admin_url": h["admin_url"]} for h in hosts]
    _write_private(outdir / "cluster.json", json.dumps({
        "nodes": nodes, "service_address": cluster["service_address"], "service_mode": cluster["service_mode"],
        "domain": cluster["domain"],
        "admin_token": token}, indent=2) + "\n")
    return hosts


def _render_all(cluster: dict[str, Any], settings: dict[str, Any], hosts: list[dict[str, Any]], outdir: Path,
                plan: list[str], pending: list[tuple[Path, Path]]) -> None:
    for host in hosts:
        values: dict[str, Any] = {
            "node.id": host["id"],
            "node.data_dir": host["data_dir"],
            "cluster.domain": cluster["domain"],
            "cluster.secret_file": f"{host['config_dir']}/secret",
            "raft.address": host["raft"],
            "admin.listen": host["admin_listen"],
            "admin.token_file": f"{host['config_dir']}/token",
            "sip.listen": host["sip"],
        }
        if cluster["service_address"]:
            values["service.address"] = cluster["service_address"]
            values["service.mode"] = cluster["service_mode"]
            if cluster["service_mode"] == "ip":
                values["service.interface"] = host["interface"]
                if cluster["service_prefix"] is not None:
                    values["service.prefix"] = cluster["service_prefix"]
                values["service.hook"] = host["service_hook"]
        values.update(settings)
        peers = {p["id"]: {"raft": p["raft"], "admin_url": p["admin_url"]} for p in hosts if p is not host}
        text = render_toml(values, peers)
        staged = outdir / f".{host['id']}.toml.new"
        staged.write_text(text, encoding="utf-8")
        pending.append((staged, outdir / f"{host['id']}.toml"))
        # Validate against the real schema, with the credentials where this machine has them.
        load_config(staged, overrides={"cluster.secret_file": str(outdir / "secret"),
                                       "admin.token_file": str(outdir / "token")})
        plan.append("\t".join([*(str(host[k]) for k in ("id", "ssh", "ssh_port", "prefix", "config_dir",
                                                         "data_dir", "run_dir", "python", "systemd",
                                                         "admin_url")), cluster["service_mode"] or "none"]))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] in ("-h", "--help"):
        print("usage: gen_configs.py INVENTORY.toml OUTDIR", file=sys.stderr)
        return 2
    try:
        hosts = generate(Path(args[0]), Path(args[1]))
    except InventoryError as exc:
        print(f"inventory error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    for host in hosts:
        print(f"{args[1]}/{host['id']}.toml  ({host['ssh']}, {host['admin_url']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
