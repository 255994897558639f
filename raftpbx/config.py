"""Node configuration: one frozen, validated `NodeConfig`, loaded once and passed down.

Theory of operation: a node's settings come from three layers, each overriding the one before:
the TOML file (`raftpbx node --config node.toml`), environment variables named
`RAFTPBX_<SECTION>_<KEY>` (for example `RAFTPBX_RAFT_ADDRESS`), and command-line `--set section.key=value`
flags. Every layer is flattened to dotted keys (`raft.address`), merged, then validated in one place into
`NodeConfig`. Nothing else in the node reads files or the environment for settings.

Invariants:
- every error is a `ConfigError` whose message names the dotted key, e.g.
  `raft.address: expected host:port, got 'x'`; unknown keys are errors, not silently ignored;
- the cluster secret is mandatory (pysyncobj without a password executes pickles from the network);
- every listening address defaults to loopback (127.0.0.1); nothing listens elsewhere unless configured;
- secrets and tokens never appear in `repr()` (the fields are declared `repr=False`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CallSettings",
    "ConfigError",
    "HostPort",
    "NodeConfig",
    "PeerConfig",
    "ServiceSettings",
    "SipSettings",
    "load_config",
    "parse_host_port",
]

ENV_PREFIX = "RAFTPBX_"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("kv", "json")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
MIN_SECRET_LEN = 16
MIN_TOKEN_LEN = 16


class ConfigError(Exception):
    """A bad or missing setting; `key` is the dotted name of the setting."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True, slots=True)
class HostPort:
    """A host (IP literal or name) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """Another member of the cluster: its Raft address and its admin URL."""

    id: str
    raft: HostPort
    admin_url: str


SIP_TRANSPORTS = ("udp", "tcp")
DIGEST_ALGORITHMS = ("SHA-256", "MD5")


@dataclass(frozen=True, slots=True)
class SipSettings:
    """The `[sip]` section: where the node answers SIP and the registrar's rules (RFC 3261 §10.3).

    `digest_algorithms` are offered in 401/407 challenges in this order (RFC 8760 §2.4); SIPp 3.6 only
    answers the first challenge and only knows MD5, so its benchmark sets ["MD5"]. Expiry bounds are in
    seconds: a REGISTER asking for less than `min_expires` (and not 0) gets 423 with Min-Expires, more
    than `max_expires` is cut down, none at all gets `default_expires`.
    """

    listen: HostPort = HostPort("127.0.0.1", 5060)
    transports: tuple[str, ...] = SIP_TRANSPORTS
    digest_algorithms: tuple[str, ...] = DIGEST_ALGORITHMS
    nonce_lifetime: float = 300.0
    min_expires: int = 60
    max_expires: int = 3600
    default_expires: int = 600
    max_contacts: int = 10


@dataclass(frozen=True, slots=True)
class CallSettings:
    """The `[calls]` section (seconds): Timer C of the proxy (RFC 3261 §16.6 step 11), the maximum call
    duration and the ring timeout the leader enforces on calls whose node vanished, and the period of the
    leader's call timeout job."""

    timer_c: float = 180.0
    max_duration: float = 14400.0
    ring_timeout: float = 300.0
    timeout_interval: float = 1.0


SERVICE_MODES = ("loopback", "ip", "none")
_IFACE_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")


def default_hook() -> Path:
    """The `ip` mode hook when `service.hook` is not set: `deploy/hooks/service-address` of the source tree
    this package runs from (a checkout or an editable install), else the one `deploy.sh` installs."""
    here = Path(__file__).resolve().parent.parent / "deploy" / "hooks" / "service-address"
    return here if here.exists() else Path("/opt/raftpbx/hooks/service-address")


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    """The `[service]` section: the cluster's floating SIP address, held by the Raft leader.

    `mode` "loopback": the leader binds `address` (a 127.0.0.0/8 address; tests and `raftpbx demo`);
    "ip": the leader runs `hook up ADDR/PREFIX IFACE` (ip addr add + gratuitous ARP) and binds it;
    "none": nobody holds it (clients use the node addresses or DNS SRV). See docs/service-address.md.
    """

    address: HostPort | None = None
    mode: str = "none"
    interface: str | None = None
    prefix: int = 32
    hook: Path | None = None


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Every setting of one node, validated. Build it with `load_config`."""

    node_id: str
    data_dir: Path
    domain: str
    raft_address: HostPort
    peers: tuple[PeerConfig, ...]
    admin_listen: HostPort
    sip_listen: HostPort
    service_address: HostPort | None
    compaction_min_entries: int
    compaction_min_time: float
    proposal_timeout: float
    election_timeout_min: float
    election_timeout_max: float
    heartbeat_period: float
    leader_fallback_timeout: float
    bootstrap: bool
    join: bool
    log_level: str
    log_format: str
    log_file: Path | None
    cluster_secret: str = field(repr=False)
    admin_token: str = field(repr=False)
    sip: SipSettings = SipSettings()
    calls: CallSettings = CallSettings()
    service: ServiceSettings = ServiceSettings()
    trunk_ping_interval: float = 5.0  # seconds between OPTIONS pings of each trunk peer ([trunks] ping_interval)
    # seconds an outbound trunk call waits for any response from a peer before trying the next one
    # ([trunks] attempt_timeout; docs/trunks.md, RFC 3263 §4.3)
    trunk_attempt_timeout: float = 2.0
    join_token: str | None = field(default=None, repr=False)  # single-use, from `cluster add-node`

    @property
    def admin_url(self) -> str:
        """The URL other nodes and clients use to reach this node's admin RPC."""
        return http_url(self.admin_listen)


def http_url(hp: HostPort) -> str:
    return f"http://{hp}"


# The schema: dotted key -> (type, default). `None` as default means "required or optional as the
# validator decides". Peers are a table of tables (`[peers.<id>]`) and are handled separately.
_STR = "str"
_LIST = "list"
_INT = "int"
_FLOAT = "float"
_BOOL = "bool"
_SCHEMA: dict[str, tuple[str, Any]] = {
    "node.id": (_STR, None),
    "node.data_dir": (_STR, None),
    "cluster.domain": (_STR, "raftpbx.local"),
    "cluster.secret": (_STR, None),
    "cluster.secret_file": (_STR, None),
    "raft.address": (_STR, "127.0.0.1:7001"),
    "raft.compaction_min_entries": (_INT, 5000),
    "raft.compaction_min_time": (_FLOAT, 300.0),
    "raft.proposal_timeout": (_FLOAT, 3.0),
    "raft.election_timeout_min": (_FLOAT, 0.15),
    "raft.election_timeout_max": (_FLOAT, 0.3),
    "raft.heartbeat_period": (_FLOAT, 0.04),
    "raft.leader_fallback_timeout": (_FLOAT, 1.0),
    "raft.bootstrap": (_BOOL, False),
    "raft.join": (_BOOL, False),
    "raft.join_token": (_STR, None),
    "admin.listen": (_STR, "127.0.0.1:7002"),
    "admin.token": (_STR, None),
    "admin.token_file": (_STR, None),
    "sip.listen": (_STR, "127.0.0.1:5060"),
    "sip.transports": (_LIST, list(SIP_TRANSPORTS)),
    "sip.digest_algorithms": (_LIST, list(DIGEST_ALGORITHMS)),
    "sip.nonce_lifetime": (_FLOAT, 300.0),
    "sip.min_expires": (_INT, 60),
    "sip.max_expires": (_INT, 3600),
    "sip.default_expires": (_INT, 600),
    "sip.max_contacts": (_INT, 10),
    "calls.timer_c": (_FLOAT, 180.0),
    "calls.max_duration": (_FLOAT, 14400.0),
    "calls.ring_timeout": (_FLOAT, 300.0),
    "calls.timeout_interval": (_FLOAT, 1.0),
    "trunks.ping_interval": (_FLOAT, 5.0),
    "trunks.attempt_timeout": (_FLOAT, 2.0),
    "service.address": (_STR, None),
    "service.mode": (_STR, None),
    "service.interface": (_STR, None),
    "service.prefix": (_INT, None),
    "service.hook": (_STR, None),
    "log.level": (_STR, "info"),
    "log.format": (_STR, "kv"),
    "log.file": (_STR, None),
}
_PEER_KEYS = ("raft", "admin_url")


def env_name(key: str) -> str:
    """The environment variable that sets dotted `key`: `raft.address` -> `RAFTPBX_RAFT_ADDRESS`."""
    return ENV_PREFIX + key.upper().replace(".", "_")


def parse_host_port(key: str, value: object, *, allow_zero: bool = False) -> HostPort:
    """Parse `host:port` or `[v6]:port`; raise `ConfigError(key, ...)` naming the key."""
    if not isinstance(value, str):
        raise ConfigError(key, f"expected host:port, got {value!r}")
    bad = ConfigError(key, f"expected host:port, got {value!r}")
    text = value.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise bad
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise bad
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if not _HOSTNAME_RE.match(host) or host.replace(".", "").isdigit():
                raise bad from None
    if not port_text.isdigit():
        raise bad
    port = int(port_text)
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ConfigError(key, f"port out of range in {value!r}")
    return HostPort(host, port)


def parse_raft_address(key: str, value: object) -> HostPort:
    """A Raft address: an IP literal (not a wildcard) and a port; pysyncobj binds it exactly."""
    hp = parse_host_port(key, value)
    try:
        ip = ipaddress.ip_address(hp.host)
    except ValueError:
        raise ConfigError(key, f"expected an IP address, got host {hp.host!r}") from None
    if ip.is_unspecified:
        raise ConfigError(key, f"wildcard address {hp.host} refused: bind the node's own address")
    return hp


def _parse_admin_url(key: str, value: object) -> str:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise ConfigError(key, f"expected http://host:port, got {value!r}")
    rest = value.split("://", 1)[1].rstrip("/")
    if "/" in rest:
        raise ConfigError(key, f"expected http://host:port without a path, got {value!r}")
    parse_host_port(key, rest)
    return value.rstrip("/")


def _flatten_toml(doc: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    flat: dict[str, Any] = {}
    peers: dict[str, dict[str, Any]] = {}
    for section, body in doc.items():
        if section == "peers":
            if not isinstance(body, dict):
                raise ConfigError("peers", "expected a table of [peers.<id>] tables")
            for peer_id, peer in body.items():
                if not isinstance(peer, dict):
                    raise ConfigError(f"peers.{peer_id}", "expected a table with raft and admin_url")
                peers[str(peer_id)] = dict(peer)
            continue
        if not isinstance(body, dict):
            known = any(k.startswith(section + ".") for k in _SCHEMA)
            raise ConfigError(section, "expected a table" if known else "unknown key")
        for name, value in body.items():
            key = f"{section}.{name}"
            if key not in _SCHEMA:
                raise ConfigError(key, "unknown key")
            flat[key] = value
    return flat, peers


def _typed(key: str, value: object) -> Any:
    kind = _SCHEMA[key][0]
    if kind == _BOOL:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.strip().lower() in ("true", "1", "yes")
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if kind == _INT:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if kind == _LIST:
        # TOML arrays of strings; from the environment or --set: comma-separated text.
        if isinstance(value, str):
            items: list[object] = [part.strip() for part in value.split(",") if part.strip()]
        elif isinstance(value, list):
            items = list(value)
        else:
            raise ConfigError(key, f"expected a list of strings, got {value!r}")
        if not all(isinstance(item, str) for item in items):
            raise ConfigError(key, f"expected a list of strings, got {value!r}")
        return items
    if kind == _FLOAT:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, f"expected a number, got {value!r}")
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {value!r}")
    return value


def _read_secret_file(key: str, path_text: str, base: Path) -> str:
    path = Path(path_text)
    if not path.is_absolute():
        path = base / path
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {str(path)!r}: {exc.strerror}") from None
    return text


def _secret(values: Mapping[str, Any], key: str, base: Path, min_len: int) -> str:
    """`key` (e.g. `cluster.secret`) given inline or as `<key>_file`; mandatory."""
    inline, from_file = values.get(key), values.get(f"{key}_file")
    if inline is not None and from_file is not None:
        raise ConfigError(key, f"set either {key} or {key}_file, not both")
    if from_file is not None:
        text = _read_secret_file(f"{key}_file", from_file, base)
        used = f"{key}_file"
    elif inline is not None:
        text, used = str(inline), key
    else:
        raise ConfigError(key, f"missing (set {key} or {key}_file; it is mandatory)")
    if len(text) < min_len:
        raise ConfigError(used, f"too short: at least {min_len} characters are required")
    return text


def load_config(
    path: str | os.PathLike[str] | None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> NodeConfig:
    """Load TOML `path` (optional), then `env` (RAFTPBX_*), then `overrides` (dotted keys); validate.

    Relative paths in the file (data_dir, *_file, log.file) are resolved against the file's folder.
    """
    values: dict[str, Any] = {}
    peers_raw: dict[str, dict[str, Any]] = {}
    base = Path.cwd()
    if path is not None:
        file = Path(path)
        base = file.resolve().parent
        try:
            with file.open("rb") as fh:
                doc = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError("config", f"cannot read {str(file)!r}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", f"{file}: invalid TOML: {exc}") from None
        values, peers_raw = _flatten_toml(doc)
    for key in _SCHEMA:
        if env is not None and env_name(key) in env:
            values[key] = env[env_name(key)]
    for key, value in (overrides or {}).items():
        if key not in _SCHEMA:
            raise ConfigError(key, "unknown key")
        values[key] = value
    typed = {key: _typed(key, value) for key, value in values.items()}
    for key, (_, default) in _SCHEMA.items():
        typed.setdefault(key, default)
    return _validate(typed, peers_raw, base)


def _validate(v: dict[str, Any], peers_raw: dict[str, dict[str, Any]], base: Path) -> NodeConfig:
    node_id = v["node.id"]
    if node_id is None:
        raise ConfigError("node.id", "missing")
    if not _ID_RE.match(node_id):
        raise ConfigError("node.id", f"expected letters, digits, '-', '_' or '.', got {node_id!r}")
    if v["node.data_dir"] is None or not v["node.data_dir"].strip():
        raise ConfigError("node.data_dir", "missing")
    data_dir = Path(v["node.data_dir"])
    if not data_dir.is_absolute():
        data_dir = base / data_dir
    domain = v["cluster.domain"].strip().lower()
    if not domain or not _HOSTNAME_RE.match(domain):
        raise ConfigError("cluster.domain", f"expected a domain name, got {v['cluster.domain']!r}")
    secret = _secret(v, "cluster.secret", base, MIN_SECRET_LEN)
    token = _secret(v, "admin.token", base, MIN_TOKEN_LEN)
    raft = parse_raft_address("raft.address", v["raft.address"])
    admin = parse_host_port("admin.listen", v["admin.listen"])
    sip = parse_host_port("sip.listen", v["sip.listen"])
    sip_settings = _sip_settings(v, sip)
    service_settings = _service_settings(v, sip, base)
    service = service_settings.address
    if v["raft.compaction_min_entries"] < 2:
        raise ConfigError("raft.compaction_min_entries", "must be at least 2")
    if v["raft.compaction_min_time"] < 0.1:
        raise ConfigError("raft.compaction_min_time", "must be at least 0.1 seconds")
    if not 0.1 <= v["raft.proposal_timeout"] <= 60:
        raise ConfigError("raft.proposal_timeout", "must be between 0.1 and 60 seconds")
    period, low, high = v["raft.heartbeat_period"], v["raft.election_timeout_min"], v["raft.election_timeout_max"]
    if not 0.005 <= period <= 1.0:
        raise ConfigError("raft.heartbeat_period", "must be between 0.005 and 1 seconds")
    if not 3 * period < low:
        raise ConfigError("raft.election_timeout_min", "must exceed 3 * raft.heartbeat_period")
    if not low < high <= 10:
        raise ConfigError("raft.election_timeout_max", "must exceed raft.election_timeout_min (and be <= 10 s)")
    if not period < v["raft.leader_fallback_timeout"] <= 60:
        raise ConfigError("raft.leader_fallback_timeout", "must exceed raft.heartbeat_period (and be <= 60 s)")
    if v["raft.bootstrap"] and v["raft.join"]:
        raise ConfigError("raft.join", "raft.bootstrap and raft.join exclude each other")
    join_token = (v["raft.join_token"] or "").strip() or None
    if join_token is not None and not v["raft.join"]:
        raise ConfigError("raft.join_token", "only meaningful with raft.join (a node added by add-node)")
    level = v["log.level"].lower()
    if level not in LOG_LEVELS:
        raise ConfigError("log.level", f"expected one of {', '.join(LOG_LEVELS)}, got {v['log.level']!r}")
    fmt = v["log.format"].lower()
    if fmt not in LOG_FORMATS:
        raise ConfigError("log.format", f"expected one of {', '.join(LOG_FORMATS)}, got {v['log.format']!r}")
    log_file = None
    if v["log.file"]:
        log_file = Path(v["log.file"])
        if not log_file.is_absolute():
            log_file = base / log_file
    peers: list[PeerConfig] = []
    seen_raft = {str(raft): "node.id"}
    for peer_id, body in sorted(peers_raw.items()):
        prefix = f"peers.{peer_id}"
        if not _ID_RE.match(peer_id):
            raise ConfigError(prefix, "invalid node id")
        if peer_id == node_id:
            raise ConfigError(prefix, "names this node; list only the other members")
        for name in body:
            if name not in _PEER_KEYS:
                raise ConfigError(f"{prefix}.{name}", "unknown key")
        for name in _PEER_KEYS:
            if name not in body:
                raise ConfigError(f"{prefix}.{name}", "missing")
        peer_raft = parse_raft_address(f"{prefix}.raft", body["raft"])
        if str(peer_raft) in seen_raft:
            raise ConfigError(f"{prefix}.raft", f"address {peer_raft} is used twice")
        seen_raft[str(peer_raft)] = prefix
        peers.append(PeerConfig(peer_id, peer_raft, _parse_admin_url(f"{prefix}.admin_url", body["admin_url"])))
    return NodeConfig(
        node_id=node_id,
        data_dir=data_dir,
        domain=domain,
        raft_address=raft,
        peers=tuple(peers),
        admin_listen=admin,
        sip_listen=sip,
        service_address=service,
        compaction_min_entries=v["raft.compaction_min_entries"],
        compaction_min_time=v["raft.compaction_min_time"],
        proposal_timeout=v["raft.proposal_timeout"],
        election_timeout_min=low,
        election_timeout_max=high,
        heartbeat_period=period,
        leader_fallback_timeout=v["raft.leader_fallback_timeout"],
        bootstrap=v["raft.bootstrap"],
        join=v["raft.join"],
        join_token=join_token,
        log_level=level,
        log_format=fmt,
        log_file=log_file,
        cluster_secret=secret,
        admin_token=token,
        sip=sip_settings,
        calls=_call_settings(v),
        trunk_ping_interval=_trunk_ping_interval(v),
        trunk_attempt_timeout=_trunk_attempt_timeout(v),
        service=service_settings,
    )


def _service_settings(v: Mapping[str, Any], sip: HostPort, base: Path) -> ServiceSettings:
    """`[service]`: address, mode (default loopback for 127.0.0.0/8, else required), and for ip mode the
    interface (required), prefix (default 32 / 128) and hook (default `default_hook()`)."""
    raw_mode = v["service.mode"]
    mode = raw_mode.strip().lower() if raw_mode is not None else None
    if mode is not None and mode not in SERVICE_MODES:
        raise ConfigError("service.mode", f"expected one of {', '.join(SERVICE_MODES)}, got {raw_mode!r}")
    address = None if v["service.address"] is None else parse_host_port("service.address", v["service.address"])
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    if address is not None:
        try:
            ip = ipaddress.ip_address(address.host)
        except ValueError:
            if mode != "none":
                raise ConfigError("service.address", f"expected an IP address, got host {address.host!r}") from None
        if ip is not None and ip.is_unspecified:
            raise ConfigError("service.address", f"wildcard address {address.host} refused")
        if address == sip:
            raise ConfigError("service.address", "must differ from sip.listen (the node's own address)")
    if mode is None:
        if address is None:
            mode = "none"
        elif ip is not None and ip.version == 4 and ip in ipaddress.ip_network("127.0.0.0/8"):
            mode = "loopback"
        else:
            raise ConfigError("service.mode", f"required for a service address outside 127.0.0.0/8 "
                                              f"({address}): set \"ip\" (with service.interface) or \"none\"")
    if mode != "none" and address is None:
        raise ConfigError("service.address", f"required with service.mode = {mode!r}")
    if mode == "loopback" and (ip is None or not ip.is_loopback):
        raise ConfigError("service.address", f"loopback mode needs a loopback address, got {address}")
    if mode == "ip" and ip is not None and ip.is_loopback:
        raise ConfigError("service.address", f"ip mode needs a routable address, got {address} (use loopback mode)")
    for key in ("service.interface", "service.prefix", "service.hook"):
        if v[key] is not None and mode != "ip":
            raise ConfigError(key, f"only meaningful with service.mode = \"ip\" (mode is {mode!r})")
    interface = v["service.interface"]
    prefix = 32
    hook: Path | None = None
    if mode == "ip":
        if interface is None or not interface.strip():
            raise ConfigError("service.interface", "required with service.mode = \"ip\" (e.g. \"eth0\")")
        interface = interface.strip()
        if not _IFACE_RE.match(interface):
            raise ConfigError("service.interface", f"not an interface name: {interface!r}")
        width = 32 if ip is None or ip.version == 4 else 128
        prefix = width if v["service.prefix"] is None else v["service.prefix"]
        if not 1 <= prefix <= width:
            raise ConfigError("service.prefix", f"must be between 1 and {width}")
        if v["service.hook"] is None:
            hook = default_hook()
        else:
            hook = Path(v["service.hook"])
            if not hook.is_absolute():
                hook = base / hook
    return ServiceSettings(address=address, mode=mode, interface=interface, prefix=prefix, hook=hook)


def _call_settings(v: Mapping[str, Any]) -> CallSettings:
    for key, low, high in (("calls.timer_c", 1.0, 3600.0), ("calls.max_duration", 1.0, 604800.0),
                           ("calls.ring_timeout", 1.0, 3600.0), ("calls.timeout_interval", 0.05, 60.0)):
        if not low <= v[key] <= high:
            raise ConfigError(key, f"must be between {low:g} and {high:g} seconds")
    return CallSettings(
        timer_c=v["calls.timer_c"],
        max_duration=v["calls.max_duration"],
        ring_timeout=v["calls.ring_timeout"],
        timeout_interval=v["calls.timeout_interval"],
    )


def _trunk_ping_interval(v: Mapping[str, Any]) -> float:
    interval = float(v["trunks.ping_interval"])
    if not 0.05 <= interval <= 3600.0:
        raise ConfigError("trunks.ping_interval", "must be between 0.05 and 3600 seconds")
    return interval


def _trunk_attempt_timeout(v: Mapping[str, Any]) -> float:
    timeout = float(v["trunks.attempt_timeout"])
    if not 0.05 <= timeout <= 30.0:  # below Timer B (64*T1 = 32 s), which would end the attempt anyway
        raise ConfigError("trunks.attempt_timeout", "must be between 0.05 and 30 seconds")
    return timeout


def _sip_settings(v: Mapping[str, Any], listen: HostPort) -> SipSettings:
    transports = tuple(t.lower() for t in v["sip.transports"])
    if not transports:
        raise ConfigError("sip.transports", "must name at least one of udp, tcp")
    for name in transports:
        if name not in SIP_TRANSPORTS:
            raise ConfigError("sip.transports", f"unknown transport {name!r} (known: udp, tcp)")
    if len(set(transports)) != len(transports):
        raise ConfigError("sip.transports", "a transport is listed twice")
    algorithms = tuple(a.upper() for a in v["sip.digest_algorithms"])
    if not algorithms:
        raise ConfigError("sip.digest_algorithms", "must name at least one of SHA-256, MD5")
    for name in algorithms:
        if name not in DIGEST_ALGORITHMS:
            raise ConfigError("sip.digest_algorithms", f"unknown algorithm {name!r} (known: SHA-256, MD5)")
    if len(set(algorithms)) != len(algorithms):
        raise ConfigError("sip.digest_algorithms", "an algorithm is listed twice")
    if not 1.0 <= v["sip.nonce_lifetime"] <= 86400:
        raise ConfigError("sip.nonce_lifetime", "must be between 1 and 86400 seconds")
    low, high, default = v["sip.min_expires"], v["sip.max_expires"], v["sip.default_expires"]
    if not 1 <= low <= 86400:
        raise ConfigError("sip.min_expires", "must be between 1 and 86400 seconds")
    if not low <= high <= 2**31 - 1:
        raise ConfigError("sip.max_expires", "must be at least sip.min_expires")
    if not low <= default <= high:
        raise ConfigError("sip.default_expires", "must lie between sip.min_expires and sip.max_expires")
    if not 1 <= v["sip.max_contacts"] <= 1000:
        raise ConfigError("sip.max_contacts", "must be between 1 and 1000")
    return SipSettings(
        listen=listen,
        transports=transports,
        digest_algorithms=algorithms,
        nonce_lifetime=v["sip.nonce_lifetime"],
        min_expires=low,
        max_expires=high,
        default_expires=default,
        max_contacts=v["sip.max_contacts"],
    )


def render_toml(values: Mapping[str, Any], peers: Mapping[str, Mapping[str, str]]) -> str:
    """Write dotted `values` and `peers` as a node.toml (used by `raftpbx demo` and tests)."""
    sections: dict[str, list[str]] = {}
    for key, value in values.items():
        if key not in _SCHEMA:
            raise ConfigError(key, "unknown key")
        section, name = key.split(".", 1)
        sections.setdefault(section, []).append(f"{name} = {_toml_value(value)}")
    out: list[str] = []
    for section, lines in sections.items():
        out.append(f"[{section}]")
        out.extend(lines)
        out.append("")
    for peer_id, body in peers.items():
        out.append(f"[peers.{_toml_value(peer_id)}]")
        out.extend(f"{name} = {_toml_value(value)}" for name, value in body.items())
        out.append("")
    return "\n".join(out)


def _toml_value(value: object) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
