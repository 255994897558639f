"""Trunks and the dial plan: SIP trunks to other PBXs and the routes that send dialled numbers to them.

Theory of operation. Two offices each run a PBX; a trunk joins them so that a phone of one office dials
an extension of the other as if there were one PBX. A trunk is replicated configuration, like an
extension: every node routes calls, so every node must agree on the trunks and the dial plan, and they
survive restarts, snapshots and leader changes. This module holds the facts and the pure functions the
proxy needs; the health of the peers (OPTIONS pings) and the choice of a peer address are per-node,
unreplicated, and live in `raftpbx/trunks.py`.

Events (schema v1; `at` stamped by the proposer; updates carry the whole new record, so apply never
merges):

* `TrunkCreated` / `TrunkUpdated(name, peers, transport, realm, username, ha1_md5, ha1_sha256, allow,
  register_expires, at)` and `TrunkDeleted(name, at)`;
* `RouteCreated` / `RouteUpdated(name, pattern, trunk, strip, prepend, order, at)` and
  `RouteDeleted(name, at)`.

Field rules (each `check_*` returns None or a fixed message; decisions raise `ValidationError(field)`,
appliers return `Rejected(field)`):

* names (trunk and route): letters, digits, '_', '.', '-', at most 63, starting with a letter or digit;
* `peers`: 1 to `MAX_PEERS` distinct addresses "HOST[:PORT][;transport=udp|tcp]" (RFC 3261 §19.1.1
  hostport), HOST an IPv4 address, a bracketed IPv6 address or a DNS name, PORT 1-65535 (default 5060,
  §19.1.2); stored normalised ("host:port", the transport parameter only if given). Unspecified and
  multicast addresses are refused;
* `transport`: "udp" or "tcp" (the default of peers that name none);
* credentials: either none (`username`, `realm`, `ha1_md5`, `ha1_sha256` all "") or all four (HA1s of
  `username:realm:password`, RFC 7616 §3.4.2). The password itself never enters an event: the decision
  hashes it and forgets it. `realm` must be the realm the peer challenges with (a digest HA1 is bound to
  its realm);
* `allow`: at most `MAX_ALLOW` distinct CIDRs, normalised (host bits cleared), no prefix shorter than /8
  (IPv4) or /16 (IPv6): a broader list would let most of the Internet call without a challenge. The
  allow-lists of two trunks must not overlap: an inbound request's source address names one trunk;
* `register_expires`: 0 (no registration) or `MIN_REGISTER_EXPIRES`..`MAX_REGISTER_EXPIRES` seconds,
  and then the trunk needs credentials (the AoR is `username@realm`... of the peer, RFC 3261 §10.2);
* `pattern`: 1 to 32 characters of digits, '+', '*', '#', and the wildcards 'X' (any digit), 'N' (2-9),
  'Z' (1-9), optionally ended by '.' (one or more further characters) or '!' (zero or more); without one
  of those the pattern matches numbers of exactly its length (so "2XXX" is four digits starting with 2,
  "9." is any number after a 9). Lowercase x/n/z are accepted and stored uppercase;
* `strip`: 0-32 leading characters removed from the dialled number; `prepend`: 0 to 32 characters of
  digits, '+', '*', '#' put in front; the number sent must not be empty (else the route does not match);
* `order`: an integer in `-10**6..10**6`; routes are tried by `(order, name)`, the first match wins;
* a route's `trunk` must exist; a trunk that routes use cannot be deleted (`Rejected("name", ...)`
  listing them), so no route ever points at a missing trunk.

Dialling (`route_for`): the proxy looks the Request-URI user up among the local extensions FIRST; only a
number that is not a local extension goes through `route_for`; no route means 404 (issue 9). Inbound
(`trunk_for_source`): a request from an address inside a trunk's allow-list comes from that trunk and is
accepted without a challenge.

Invariants (besides the field rules): `State.trunks[n].name == n`, `State.routes[n].name == n`; every
route's trunk exists; no two trunks' allow-lists overlap. Appliers re-check everything, because two
proposals decided against the same state may race (e.g. a route added while its trunk is deleted):
whichever is applied second is rejected, identically on every node.

Performance: appliers are O(trunks x allow) at worst (the overlap check); `route_for` is O(routes) with
cached compiled patterns; `trunk_for_source` is O(total allow entries) with cached parsed networks.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import NamedTuple

from .apply import applies
from .credentials import ha1_md5, ha1_sha256
from .errors import ValidationError
from .events import Event, register_event
from .model import Route, State, Trunk
from .outcomes import Applied, Rejected
from .validation import check_ha1_md5, check_ha1_sha256, check_realm

TRANSPORTS = ("udp", "tcp")
DEFAULT_PORT = 5060
MAX_NAME = 63
MAX_PEERS = 16
MAX_ALLOW = 64
MAX_USERNAME = 64
MAX_PASSWORD = 128
MIN_REGISTER_EXPIRES = 60
MAX_REGISTER_EXPIRES = 86_400
MAX_PATTERN = 32
MAX_STRIP = 32
MAX_PREPEND = 32
MAX_ORDER = 10**6
MIN_PREFIX_V4 = 8
MIN_PREFIX_V6 = 16

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_PEER = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\[\];]+)(?::(?P<port>[0-9]{1,5}))?(?:;transport=(?P<t>[A-Za-z]+))?")
_PATTERN = re.compile(r"[0-9+*#XNZ]{1,32}[.!]?")
_DIAL = re.compile(r"[0-9+*#]{1,64}")
_PREPEND = re.compile(r"[0-9+*#]{0,32}")
_USERNAME = re.compile(r"[A-Za-z0-9_.!~*'()&=+$,;?/%-]{1,64}")  # RFC 3261 §25.1 user (unreserved + escapes)


# --- field rules -----------------------------------------------------------------------------------------


def check_name(name: str) -> str | None:
    """None if `name` is a well-formed trunk or route name, else why not."""
    if type(name) is not str or _NAME.fullmatch(name) is None:
        return f"malformed name: use letters, digits, '_', '.', '-' (at most {MAX_NAME}), starting with a letter or digit"
    return None


class PeerAddress(NamedTuple):
    """One peer address of a trunk: where to send, and over which transport."""

    host: str
    port: int
    transport: str

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) as the transport layer's `Address` (IPv6 without brackets)."""
        return (self.host.strip("[]"), self.port)

    def __str__(self) -> str:
        return f"{self.host}:{self.port};transport={self.transport}"


def normalise_peer(text: str) -> str:
    """The stored form of a peer address "HOST[:PORT][;transport=udp|tcp]"; ValueError(message) if bad."""
    if type(text) is not str or not text or len(text) > 300 or text != text.strip():
        raise ValueError("expected HOST[:PORT][;transport=udp|tcp]")
    match = _PEER.fullmatch(text)
    if match is None:
        raise ValueError("expected HOST[:PORT][;transport=udp|tcp] (IPv6 addresses in brackets)")
    host = match["host"]
    if host.startswith("["):
        try:
            v6 = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError("malformed IPv6 address") from None
        if v6.is_unspecified or v6.is_multicast:
            raise ValueError("unspecified or multicast address")
        host = f"[{v6.compressed}]"
    else:
        try:
            v4 = ipaddress.IPv4Address(host)
        except ValueError:
            if ":" in host or len(host) > 253 or _HOSTNAME.fullmatch(host) is None:
                raise ValueError("malformed host: an IPv4 address, [IPv6] or a DNS name") from None
            if re.fullmatch(r"[0-9.]+", host):
                raise ValueError("malformed IPv4 address") from None
            host = host.rstrip(".").lower()
        else:
            if v4.is_unspecified or v4.is_multicast or v4 == ipaddress.IPv4Address("255.255.255.255"):
                raise ValueError("unspecified, broadcast or multicast address")
            host = str(v4)
    port = DEFAULT_PORT if match["port"] is None else int(match["port"])
    if not 1 <= port <= 65535:
        raise ValueError("port out of range 1-65535")
    out = f"{host}:{port}"
    if match["t"] is not None:
        transport = match["t"].lower()
        if transport not in TRANSPORTS:
            raise ValueError("transport must be udp or tcp")
        out += f";transport={transport}"
    return out


def parse_peer(stored: str, default_transport: str) -> PeerAddress:
    """A stored (normalised) peer as a `PeerAddress` (the trunk's transport unless the peer names one)."""
    hostport, _, param = stored.partition(";transport=")
    host, _, port = hostport.rpartition(":")
    return PeerAddress(host, int(port), param or default_transport)


def peer_addresses(trunk: Trunk) -> list[PeerAddress]:
    """The trunk's peers in preference order."""
    return [parse_peer(peer, trunk.transport) for peer in trunk.peers]


def check_peers(peers: tuple[str, ...], transport: str = "udp") -> str | None:
    """None if `peers` is a tuple of 1..MAX_PEERS distinct normalised peer addresses.

    Distinct means distinct (host, port, transport) once `transport` fills in the peers that name none:
    one host may be listed over UDP and over TCP.
    """
    if type(peers) is not tuple or not peers:
        return "at least one peer address is required"
    if len(peers) > MAX_PEERS:
        return f"at most {MAX_PEERS} peer addresses"
    seen: set[PeerAddress] = set()
    for peer in peers:
        try:
            if type(peer) is not str or normalise_peer(peer) != peer:
                return "malformed peer address"
        except ValueError as exc:
            return f"invalid address: {exc}"
        parsed = parse_peer(peer, transport)
        if parsed in seen:
            return f"{parsed.host}:{parsed.port} over {parsed.transport} is listed twice"
        seen.add(parsed)
    return None


def check_transport(transport: str) -> str | None:
    """None for "udp" or "tcp"."""
    return None if transport in TRANSPORTS else "must be udp or tcp"


def normalise_cidr(text: str) -> str:
    """The stored form of an allow-list entry (an address or CIDR); ValueError(message) if bad."""
    if type(text) is not str or not text or len(text) > 64 or text != text.strip():
        raise ValueError("expected an address or ADDRESS/PREFIX")
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError("expected an address or ADDRESS/PREFIX") from None
    minimum = MIN_PREFIX_V4 if network.version == 4 else MIN_PREFIX_V6
    if network.prefixlen < minimum:
        raise ValueError(f"too broad: the prefix must be at least /{minimum}")
    return network.with_prefixlen


@lru_cache(maxsize=4096)
def _network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(cidr)


def check_allow(allow: tuple[str, ...]) -> str | None:
    """None if `allow` is a tuple of at most MAX_ALLOW distinct normalised CIDRs."""
    if type(allow) is not tuple:
        return "expected a list of CIDRs"
    if len(allow) > MAX_ALLOW:
        return f"at most {MAX_ALLOW} entries"
    for entry in allow:
        try:
            if type(entry) is not str or normalise_cidr(entry) != entry:
                return "malformed CIDR"
        except ValueError as exc:
            return f"invalid CIDR: {exc}"
    if len(set(allow)) != len(allow):
        return "an entry is listed twice"
    return None


def allow_overlap(state: State, name: str, allow: tuple[str, ...]) -> str | None:
    """None if no entry of `allow` overlaps the allow-list of a trunk other than `name`, else which."""
    for other in state.trunks.values():
        if other.name == name:
            continue
        for mine in allow:
            net = _network(mine)
            for theirs in other.allow:
                their_net = _network(theirs)
                if net.version == their_net.version and net.overlaps(their_net):
                    return f"{mine} overlaps {theirs} of trunk {other.name}"
    return None


def check_credentials(username: str, realm: str, md5: str, sha256: str) -> tuple[str, str] | None:
    """None if the four credential fields are all "" or all well-formed; else (field, message)."""
    if not (username or realm or md5 or sha256):
        return None
    if type(username) is not str or _USERNAME.fullmatch(username) is None:
        return ("username", f"malformed: 1 to {MAX_USERNAME} characters allowed in a SIP user part")
    for field, message in (
        ("realm", check_realm(realm)),
        ("ha1_md5", check_ha1_md5(md5)),
        ("ha1_sha256", check_ha1_sha256(sha256)),
    ):
        if message is not None:
            return (field, message)
    return None


def check_register_expires(expires: int, has_credentials: bool) -> str | None:
    """None if `expires` is 0, or in range with credentials to register with."""
    if type(expires) is not int:
        return "expected an integer"
    if expires == 0:
        return None
    if not MIN_REGISTER_EXPIRES <= expires <= MAX_REGISTER_EXPIRES:
        return f"expected 0 (no registration) or {MIN_REGISTER_EXPIRES}..{MAX_REGISTER_EXPIRES} seconds"
    if not has_credentials:
        return "registering to the peer needs credentials (username, realm, password)"
    return None


def normalise_pattern(text: str) -> str:
    """The stored form of a route pattern (wildcards uppercase); ValueError(message) if bad."""
    if type(text) is not str:
        raise ValueError("expected a string")
    pattern = text.translate(_UPPER_WILDCARDS)
    if len(pattern) > MAX_PATTERN + 1 or _PATTERN.fullmatch(pattern) is None:
        raise ValueError(
            "expected 1 to 32 of digits + * # and wildcards X (any digit), N (2-9), Z (1-9), "
            "optionally ended by . (one or more more) or ! (zero or more more)"
        )
    return pattern


_UPPER_WILDCARDS = str.maketrans("xnz", "XNZ")
_WILDCARDS = {"X": "[0-9]", "N": "[2-9]", "Z": "[1-9]", ".": "[0-9+*#]+", "!": "[0-9+*#]*"}


@lru_cache(maxsize=4096)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile("".join(_WILDCARDS.get(char, re.escape(char)) for char in pattern))


def check_route_fields(pattern: str, strip: int, prepend: str, order: int) -> tuple[str, str] | None:
    """None if the route's own fields are well-formed; else (field, message)."""
    try:
        if type(pattern) is not str or normalise_pattern(pattern) != pattern:
            return ("pattern", "malformed pattern")
    except ValueError as exc:
        return ("pattern", str(exc))
    if type(strip) is not int or not 0 <= strip <= MAX_STRIP:
        return ("strip", f"expected 0..{MAX_STRIP}")
    if type(prepend) is not str or _PREPEND.fullmatch(prepend) is None:
        return ("prepend", f"expected 0 to {MAX_PREPEND} of digits + * #")
    if type(order) is not int or not -MAX_ORDER <= order <= MAX_ORDER:
        return ("order", f"expected an integer in -{MAX_ORDER}..{MAX_ORDER}")
    return None


def _check_trunk_fields(
    peers: tuple[str, ...], transport: str, realm: str, username: str, md5: str, sha256: str,
    allow: tuple[str, ...], register_expires: int,
) -> tuple[str, str] | None:
    if (message := check_transport(transport)) is not None:
        return ("transport", message)
    if (message := check_peers(peers, transport)) is not None:
        return ("peers", message)
    if (bad := check_credentials(username, realm, md5, sha256)) is not None:
        return bad
    if (message := check_allow(allow)) is not None:
        return ("allow", message)
    if (message := check_register_expires(register_expires, bool(username))) is not None:
        return ("register_expires", message)
    return None


def check_trunk_record(trunk: Trunk) -> tuple[str, str] | None:
    """None if `trunk` obeys every field rule on its own (not the cross-trunk overlap rule)."""
    if (message := check_name(trunk.name)) is not None:
        return ("name", message)
    return _check_trunk_fields(trunk.peers, trunk.transport, trunk.realm, trunk.username, trunk.ha1_md5,
                               trunk.ha1_sha256, trunk.allow, trunk.register_expires)


def check_route_record(route: Route) -> tuple[str, str] | None:
    """None if `route` obeys every field rule on its own (not whether its trunk exists)."""
    if (message := check_name(route.name)) is not None:
        return ("name", message)
    if (message := check_name(route.trunk)) is not None:
        return ("trunk", message)
    return check_route_fields(route.pattern, route.strip, route.prepend, route.order)


# --- events ----------------------------------------------------------------------------------------------


@register_event
@dataclass(frozen=True, slots=True)
class TrunkCreated(Event):
    """A new trunk (credentials as HA1 digests for `realm`, RFC 7616 §3.4.2; "" when none)."""

    name: str
    peers: tuple[str, ...]
    transport: str
    realm: str
    username: str
    ha1_md5: str
    ha1_sha256: str
    allow: tuple[str, ...]
    register_expires: int
    at: float


@register_event
@dataclass(frozen=True, slots=True)
class TrunkUpdated(Event):
    """The whole new configuration of an existing trunk (its creation time is kept)."""

    name: str
    peers: tuple[str, ...]
    transport: str
    realm: str
    username: str
    ha1_md5: str
    ha1_sha256: str
    allow: tuple[str, ...]
    register_expires: int
    at: float


@register_event
@dataclass(frozen=True, slots=True)
class TrunkDeleted(Event):
    """The trunk is gone (refused while routes use it)."""

    name: str
    at: float


@register_event
@dataclass(frozen=True, slots=True)
class RouteCreated(Event):
    """A new dial-plan route."""

    name: str
    pattern: str
    trunk: str
    strip: int
    prepend: str
    order: int
    at: float


@register_event
@dataclass(frozen=True, slots=True)
class RouteUpdated(Event):
    """The whole new configuration of an existing route (its creation time is kept)."""

    name: str
    pattern: str
    trunk: str
    strip: int
    prepend: str
    order: int
    at: float


@register_event
@dataclass(frozen=True, slots=True)
class RouteDeleted(Event):
    """The route is gone."""

    name: str
    at: float


# --- apply -----------------------------------------------------------------------------------------------


def _trunk_from(event: TrunkCreated | TrunkUpdated, created_at: float) -> Trunk:
    return Trunk(
        name=event.name, peers=event.peers, transport=event.transport, realm=event.realm,
        username=event.username, ha1_md5=event.ha1_md5, ha1_sha256=event.ha1_sha256, allow=event.allow,
        register_expires=event.register_expires, created_at=created_at, updated_at=event.at,
    )


def _apply_trunk(state: State, event: TrunkCreated | TrunkUpdated, *, create: bool) -> Applied | Rejected:
    current = state.trunks.get(event.name)
    if create and current is not None:
        return Rejected("name", "a trunk with this name already exists")
    if not create and current is None:
        return Rejected("name", "no such trunk")
    trunk = _trunk_from(event, event.at if current is None else current.created_at)
    if (bad := check_trunk_record(trunk)) is not None:
        return Rejected(*bad)
    if (message := allow_overlap(state, trunk.name, trunk.allow)) is not None:
        return Rejected("allow", message)
    state.trunks[trunk.name] = trunk
    return Applied({"name": trunk.name})


@applies(TrunkCreated)
def _trunk_created(state: State, event: TrunkCreated) -> Applied | Rejected:
    return _apply_trunk(state, event, create=True)


@applies(TrunkUpdated)
def _trunk_updated(state: State, event: TrunkUpdated) -> Applied | Rejected:
    return _apply_trunk(state, event, create=False)


@applies(TrunkDeleted)
def _trunk_deleted(state: State, event: TrunkDeleted) -> Applied | Rejected:
    if event.name not in state.trunks:
        return Rejected("name", "no such trunk")
    if users := routes_using(state, event.name):
        return Rejected("name", f"routes use this trunk: {', '.join(users)} (delete or move them first)")
    del state.trunks[event.name]
    return Applied({"name": event.name})


def _apply_route(state: State, event: RouteCreated | RouteUpdated, *, create: bool) -> Applied | Rejected:
    current = state.routes.get(event.name)
    if create and current is not None:
        return Rejected("name", "a route with this name already exists")
    if not create and current is None:
        return Rejected("name", "no such route")
    route = Route(
        name=event.name, pattern=event.pattern, trunk=event.trunk, strip=event.strip, prepend=event.prepend,
        order=event.order, created_at=event.at if current is None else current.created_at, updated_at=event.at,
    )
    if (bad := check_route_record(route)) is not None:
        return Rejected(*bad)
    if route.trunk not in state.trunks:
        return Rejected("trunk", "no such trunk")
    state.routes[route.name] = route
    return Applied({"name": route.name})


@applies(RouteCreated)
def _route_created(state: State, event: RouteCreated) -> Applied | Rejected:
    return _apply_route(state, event, create=True)


@applies(RouteUpdated)
def _route_updated(state: State, event: RouteUpdated) -> Applied | Rejected:
    return _apply_route(state, event, create=False)


@applies(RouteDeleted)
def _route_deleted(state: State, event: RouteDeleted) -> Applied | Rejected:
    if event.name not in state.routes:
        return Rejected("name", "no such route")
    del state.routes[event.name]
    return Applied({"name": event.name})


# --- decisions -------------------------------------------------------------------------------------------


def _validate_now(now: float) -> float:
    if type(now) not in (int, float) or not math.isfinite(now):
        raise ValidationError("now", "must be a finite number of epoch seconds")
    return float(now)


def _validate_name(name: str, field: str = "name") -> str:
    if (message := check_name(name)) is not None:
        raise ValidationError(field, message)
    return name


def _validate_peers(peers: list[str] | tuple[str, ...], transport: str) -> tuple[str, ...]:
    if type(peers) not in (list, tuple):
        raise ValidationError("peers", "expected a list of HOST[:PORT][;transport=udp|tcp]")
    out = []
    for peer in peers:
        try:
            out.append(normalise_peer(peer))
        except ValueError as exc:
            raise ValidationError("peers", f"invalid address: {exc}") from None
    normalised = tuple(out)
    if (message := check_peers(normalised, transport)) is not None:
        raise ValidationError("peers", message)
    return normalised


def _validate_allow(allow: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    if type(allow) not in (list, tuple):
        raise ValidationError("allow", "expected a list of CIDRs")
    out = []
    for entry in allow:
        try:
            out.append(normalise_cidr(entry))
        except ValueError as exc:
            raise ValidationError("allow", f"invalid CIDR: {exc}") from None
    normalised = tuple(out)
    if (message := check_allow(normalised)) is not None:
        raise ValidationError("allow", message)
    return normalised


def _credentials(username: str, realm: str, password: str) -> tuple[str, str, str, str]:
    # Messages are constants: never interpolate the password.
    if type(username) is not str or _USERNAME.fullmatch(username) is None:
        raise ValidationError("username", f"malformed: 1 to {MAX_USERNAME} characters allowed in a SIP user part")
    if type(realm) is not str or (message := check_realm(realm)) is not None:
        raise ValidationError("realm", "required with a username" if not realm else str(message))
    if type(password) is not str or not password:
        raise ValidationError("password", "required with a username")
    if len(password) > MAX_PASSWORD:
        raise ValidationError("password", f"too long: at most {MAX_PASSWORD} characters")
    if not password.isprintable():
        raise ValidationError("password", "must not contain control characters")
    return username, realm, ha1_md5(username, realm, password), ha1_sha256(username, realm, password)


def _refuse(bad: tuple[str, str] | None) -> None:
    if bad is not None:
        raise ValidationError(*bad)


def decide_create_trunk(
    state: State,
    name: str,
    *,
    peers: list[str] | tuple[str, ...],
    transport: str = "udp",
    username: str | None = None,
    realm: str | None = None,
    password: str | None = None,
    allow: list[str] | tuple[str, ...] = (),
    register_expires: int = 0,
    now: float,
) -> list[Event]:
    """`TrunkCreated`, or ValidationError naming the field (the password is hashed and forgotten)."""
    _validate_name(name)
    if name in state.trunks:
        raise ValidationError("name", "a trunk with this name already exists")
    if (message := check_transport(transport)) is not None:
        raise ValidationError("transport", message)
    normalised_peers = _validate_peers(peers, transport)
    credentials = ("", "", "", "")
    if username is not None or password is not None or realm is not None:
        credentials = _credentials(username or "", realm or "", password or "")
    normalised_allow = _validate_allow(allow)
    if (message := allow_overlap(state, name, normalised_allow)) is not None:
        raise ValidationError("allow", message)
    if (message := check_register_expires(register_expires, bool(credentials[0]))) is not None:
        raise ValidationError("register_expires", message)
    user, cred_realm, md5, sha256 = credentials
    return [TrunkCreated(name=name, peers=normalised_peers, transport=transport, realm=cred_realm, username=user,
                         ha1_md5=md5, ha1_sha256=sha256, allow=normalised_allow,
                         register_expires=register_expires, at=_validate_now(now))]


def decide_update_trunk(
    state: State,
    name: str,
    *,
    peers: list[str] | tuple[str, ...] | None = None,
    transport: str | None = None,
    username: str | None = None,
    realm: str | None = None,
    password: str | None = None,
    clear_credentials: bool = False,
    allow: list[str] | tuple[str, ...] | None = None,
    register_expires: int | None = None,
    now: float,
) -> list[Event]:
    """`TrunkUpdated` carrying the merged configuration; ValidationError naming the field.

    Fields left None keep their value. New credentials need the password again (an HA1 is bound to the
    username and the realm); `username` and `realm` default to the current ones then. `clear_credentials`
    removes them (and cannot be combined with new ones). Refused when nothing would change.
    """
    _validate_name(name)
    current = state.trunks.get(name)
    if current is None:
        raise ValidationError("name", "no such trunk")
    at = _validate_now(now)
    new_transport = current.transport if transport is None else transport
    if (message := check_transport(new_transport)) is not None:
        raise ValidationError("transport", message)
    new_peers = current.peers if peers is None else _validate_peers(peers, new_transport)
    if (message := check_peers(new_peers, new_transport)) is not None:  # a new transport may make two equal
        raise ValidationError("peers", message)
    credentials = (current.username, current.realm, current.ha1_md5, current.ha1_sha256)
    if clear_credentials:
        if username is not None or realm is not None or password is not None:
            raise ValidationError("password", "give new credentials or clear them, not both")
        credentials = ("", "", "", "")
    elif password is not None:
        credentials = _credentials(current.username if username is None else username,
                                   current.realm if realm is None else realm, password)
    elif username is not None or realm is not None:
        raise ValidationError("password", "required when the username or realm changes (HA1 is bound to both)")
    new_allow = current.allow if allow is None else _validate_allow(allow)
    if (message := allow_overlap(state, name, new_allow)) is not None:
        raise ValidationError("allow", message)
    expires = current.register_expires if register_expires is None else register_expires
    if (message := check_register_expires(expires, bool(credentials[0]))) is not None:
        raise ValidationError("register_expires", message)
    user, cred_realm, md5, sha256 = credentials
    event = TrunkUpdated(name=name, peers=new_peers, transport=new_transport, realm=cred_realm, username=user,
                         ha1_md5=md5, ha1_sha256=sha256, allow=new_allow, register_expires=expires, at=at)
    if _trunk_from(event, current.created_at) == replace(current, updated_at=at):
        raise ValidationError("name", "nothing to change")
    return [event]


def decide_delete_trunk(state: State, name: str, now: float) -> list[Event]:
    """`TrunkDeleted` for an existing trunk that no route uses; ValidationError otherwise."""
    _validate_name(name)
    if name not in state.trunks:
        raise ValidationError("name", "no such trunk")
    if users := routes_using(state, name):
        raise ValidationError("name", f"routes use this trunk: {', '.join(users)} (delete or move them first)")
    return [TrunkDeleted(name=name, at=_validate_now(now))]


def _route_inputs(pattern: str, strip: int, prepend: str, order: int) -> str:
    try:
        normalised = normalise_pattern(pattern)
    except ValueError as exc:
        raise ValidationError("pattern", str(exc)) from None
    _refuse(check_route_fields(normalised, strip, prepend, order))
    return normalised


def decide_create_route(
    state: State, name: str, *, pattern: str, trunk: str, strip: int = 0, prepend: str = "", order: int = 0,
    now: float,
) -> list[Event]:
    """`RouteCreated`, or ValidationError naming the field (unknown trunk: field "trunk")."""
    _validate_name(name)
    if name in state.routes:
        raise ValidationError("name", "a route with this name already exists")
    normalised = _route_inputs(pattern, strip, prepend, order)
    _validate_name(trunk, "trunk")
    if trunk not in state.trunks:
        raise ValidationError("trunk", "no such trunk")
    return [RouteCreated(name=name, pattern=normalised, trunk=trunk, strip=strip, prepend=prepend, order=order,
                         at=_validate_now(now))]


def decide_update_route(
    state: State, name: str, *, pattern: str | None = None, trunk: str | None = None, strip: int | None = None,
    prepend: str | None = None, order: int | None = None, now: float,
) -> list[Event]:
    """`RouteUpdated` with the merged configuration (None keeps a field); refused when nothing changes."""
    _validate_name(name)
    current = state.routes.get(name)
    if current is None:
        raise ValidationError("name", "no such route")
    at = _validate_now(now)
    new = Route(
        name=name,
        pattern=current.pattern if pattern is None else pattern,
        trunk=current.trunk if trunk is None else trunk,
        strip=current.strip if strip is None else strip,
        prepend=current.prepend if prepend is None else prepend,
        order=current.order if order is None else order,
        created_at=current.created_at, updated_at=current.updated_at,
    )
    normalised = _route_inputs(new.pattern, new.strip, new.prepend, new.order)
    _validate_name(new.trunk, "trunk")
    if new.trunk not in state.trunks:
        raise ValidationError("trunk", "no such trunk")
    if (normalised, new.trunk, new.strip, new.prepend, new.order) == (
        current.pattern, current.trunk, current.strip, current.prepend, current.order
    ):
        raise ValidationError("name", "nothing to change")
    return [RouteUpdated(name=name, pattern=normalised, trunk=new.trunk, strip=new.strip, prepend=new.prepend,
                         order=new.order, at=at)]


def decide_delete_route(state: State, name: str, now: float) -> list[Event]:
    """`RouteDeleted` for an existing route; ValidationError otherwise."""
    _validate_name(name)
    if name not in state.routes:
        raise ValidationError("name", "no such route")
    return [RouteDeleted(name=name, at=_validate_now(now))]


# --- reads -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """The route a dialled number takes: the route, its trunk, and the number to send (after strip and
    prepend) as the Request-URI user part towards the trunk's peer."""

    route: Route
    trunk: Trunk
    number: str


def routes_using(state: State, trunk: str) -> list[str]:
    """Names of the routes that send calls to `trunk`, sorted."""
    return sorted(route.name for route in state.routes.values() if route.trunk == trunk)


def ordered_routes(state: State) -> list[Route]:
    """The dial plan in the order it is tried: by `(order, name)`."""
    return sorted(state.routes.values(), key=lambda route: (route.order, route.name))


def pattern_matches(pattern: str, dialled: str) -> bool:
    """True if the (normalised) `pattern` matches the whole `dialled` number."""
    return _compiled(pattern).fullmatch(dialled) is not None


def route_for(state: State, dialled: str) -> RouteMatch | None:
    """The first route of the dial plan matching `dialled` (digits, '+', '*', '#'), or None.

    Local extensions win over routes: the proxy looks `dialled` up among the extensions first and calls
    this only for a number that is not one (documented in docs/trunks.md). A route whose transformed
    number would be empty does not match; the next one is tried.
    """
    if type(dialled) is not str or _DIAL.fullmatch(dialled) is None:
        return None
    for route in ordered_routes(state):
        if not pattern_matches(route.pattern, dialled):
            continue
        number = route.prepend + dialled[route.strip:]
        if not number:
            continue
        return RouteMatch(route=route, trunk=state.trunks[route.trunk], number=number)
    return None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def trunk_for_source(state: State, ip: str) -> Trunk | None:
    """The trunk whose allow-list contains the source address `ip` (at most one: lists never overlap)."""
    if type(ip) is not str:
        return None
    address = _ip(ip)
    if address is None:
        return None
    for trunk in state.trunks.values():
        for cidr in trunk.allow:
            if address in _network(cidr):
                return trunk
    return None
