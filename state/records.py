"""The records of the replicated state: extensions, bindings, calls, trunks and routes.

Theory of operation: each record is a frozen, slotted dataclass replaced whole on change (see `model.State`
for the invariants that tie them together). They are declared here rather than in `model.py` (which
re-exports them, where they have always been imported from) because `model.py` is compiled with mypyc in
a normal install (setup.py) and this module is not: in a compiled module a class's annotations become
erased run-time types (`tuple`, `type`), and `snapshot.py` builds each record's converters from its
annotations (`schema.field_specs`); `model.fast_constructor` also needs them to be plain Python classes
(it builds an instance through a same-layout twin class and `__class__` assignment). Declaring them in
another module changes no byte of a snapshot (same field names, same order, same converters).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _pack_ha1(ha1_md5: str, ha1_sha256: str) -> bytes | tuple[str, str]:
    """The two HA1s as one 48-byte value (MD5 digest then SHA-256 digest) when both are lowercase hex of the
    right length (always, for anything `apply` or `restore` accepts); anything else is kept as given."""
    if (
        type(ha1_md5) is str
        and type(ha1_sha256) is str
        and len(ha1_md5) == 32
        and len(ha1_sha256) == 64
        and (ha1_md5 + ha1_sha256).isascii()
    ):
        try:
            packed = bytes.fromhex(ha1_md5 + ha1_sha256)
        except ValueError:
            return (ha1_md5, ha1_sha256)
        if packed.hex() == ha1_md5 + ha1_sha256:  # lowercase only: the hex view must give the same text back
            return packed
    return (ha1_md5, ha1_sha256)


@dataclass(frozen=True, slots=True, init=False)
class Extension:
    """An extension and its digest credentials for `realm` (HA1s; the password is never kept).

    Built as `Extension(extension, display_name, realm, ha1_md5, ha1_sha256, created_at, updated_at)` and read
    through those names. Memory (issue 8): the two HA1s (RFC 7616 §3.4.2, lowercase hex) are held as one
    48-byte `ha1` value (81 bytes instead of 194 for two hex strings) and `ha1_md5` / `ha1_sha256` give the hex
    text back; `realm` is interned (one realm is shared by every extension). `ha1` is left out of the repr:
    HA1s are password-equivalent and must not reach a log.
    """

    extension: str
    display_name: str
    realm: str
    ha1: bytes | tuple[str, str] = field(repr=False)
    created_at: float
    updated_at: float

    def __init__(
        self,
        extension: str,
        display_name: str,
        realm: str,
        ha1_md5: str,
        ha1_sha256: str,
        created_at: float,
        updated_at: float,
    ) -> None:
        setter = object.__setattr__
        setter(self, "extension", extension)
        setter(self, "display_name", display_name)
        setter(self, "realm", intern_text(realm))
        setter(self, "ha1", _pack_ha1(ha1_md5, ha1_sha256))
        setter(self, "created_at", created_at)
        setter(self, "updated_at", updated_at)

    @classmethod
    def from_packed(
        cls, extension: str, display_name: str, realm: str, ha1: bytes, created_at: float, updated_at: float
    ) -> Extension:
        """Build from an already packed 48-byte `ha1` (snapshot restore; the caller checked its length)."""
        record = object.__new__(cls)
        setter = object.__setattr__
        setter(record, "extension", extension)
        setter(record, "display_name", display_name)
        setter(record, "realm", intern_text(realm))
        setter(record, "ha1", ha1)
        setter(record, "created_at", created_at)
        setter(record, "updated_at", updated_at)
        return record

    @property
    def ha1_md5(self) -> str:
        """MD5(username:realm:password) as 32 lowercase hex digits."""
        ha1 = self.ha1
        return ha1[:16].hex() if isinstance(ha1, bytes) else ha1[0]

    @property
    def ha1_sha256(self) -> str:
        """SHA-256(username:realm:password) as 64 lowercase hex digits."""
        ha1 = self.ha1
        return ha1[16:].hex() if isinstance(ha1, bytes) else ha1[1]

    def to_dict(self) -> dict[str, Any]:
        """Public view for the RPC layer (HA1 values are password-equivalent and left out)."""
        return {
            "extension": self.extension,
            "display_name": self.display_name,
            "realm": self.realm,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


_INTERNED: dict[str, str] = {}
_INTERN_LIMIT = 4096


def intern_text(text: str) -> str:
    """One shared copy of a short, often repeated string (a realm, a transport, a node id...).

    Memory (issue 8): every decoded event carries its own copy of such strings; records keep the shared one.
    Bounded: at most `_INTERN_LIMIT` distinct strings (of at most 64 characters) are remembered, others are
    returned as given (equal either way: interning changes identity, never a value)."""
    shared = _INTERNED.get(text)
    if shared is not None:
        return shared
    if len(text) <= 64 and len(_INTERNED) < _INTERN_LIMIT and type(text) is str:
        _INTERNED[text] = text
    return text


@dataclass(frozen=True, slots=True)
class Binding:
    """One registered contact of an AoR (RFC 3261 §10.3), with what the proxy needs to reach it.

    `received` is the source "host:port" and `transport` the transport ("udp", "tcp", "tls", "ws", ...)
    the REGISTER arrived on, as seen by `node_id` (for NAT traversal: rport, RFC 3581). `path` is the
    Path header (RFC 3327). `instance_id` / `reg_id` / `flow` are RFC 5626 outbound: `flow` is an opaque
    token naming the node and connection ("" if none). `registered_at` is when this key was first
    registered (kept across refreshes), `updated_at` the time of the last REGISTER that wrote it.
    """

    aor: str
    key: str
    contact: str
    contact_key: str
    expires_at: float
    q: float | None
    call_id: str
    cseq: int
    received: str
    transport: str
    path: tuple[str, ...]
    instance_id: str
    reg_id: int
    flow: str
    node_id: str
    registered_at: float
    updated_at: float

    def to_dict(self) -> dict[str, Any]:
        """Public view for the RPC layer."""
        return {
            "aor": self.aor,
            "key": self.key,
            "contact": self.contact,
            "expires_at": self.expires_at,
            "q": self.q,
            "call_id": self.call_id,
            "cseq": self.cseq,
            "received": self.received,
            "transport": self.transport,
            "path": list(self.path),
            "instance_id": self.instance_id,
            "reg_id": self.reg_id,
            "flow": self.flow,
            "node_id": self.node_id,
            "registered_at": self.registered_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True, slots=True)
class Call:
    """A call through the PBX: the caller's INVITE dialog as the proxy saw it (see `calls.py`).

    Times are epoch floats stamped by the proposers (None until the step happened). `status_code` is
    the final response to the INVITE (0 while none), `cause` / `hangup_by` are "" while active.
    `nodes` are the ids of the nodes that stamped an applied event of this call, sorted.
    `trunk` names the trunk the call crossed ("" for a call between local extensions) and `direction`
    says which way: "inbound" (from the trunk's peer to a local extension), "outbound" (to the trunk's
    peer through a route), "" for a local call (issue 9; filled by `CallStarted` once it carries them,
    see docs/trunks.md; snapshots of format <= 3 restore with "").
    """

    call_id: str
    caller: str
    callee: str
    from_tag: str
    caller_contact: str
    branch: str
    started_at: float
    ringing_at: float | None
    answered_at: float | None
    to_tag: str
    callee_contact: str
    session_expires_at: float | None
    ended_at: float | None
    cause: str
    hangup_by: str
    status_code: int
    nodes: tuple[str, ...]
    trunk: str = ""
    direction: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Public view for the RPC layer."""
        return {
            "call_id": self.call_id,
            "caller": self.caller,
            "callee": self.callee,
            "from_tag": self.from_tag,
            "caller_contact": self.caller_contact,
            "branch": self.branch,
            "started_at": self.started_at,
            "ringing_at": self.ringing_at,
            "answered_at": self.answered_at,
            "to_tag": self.to_tag,
            "callee_contact": self.callee_contact,
            "session_expires_at": self.session_expires_at,
            "ended_at": self.ended_at,
            "cause": self.cause,
            "hangup_by": self.hangup_by,
            "status_code": self.status_code,
            "nodes": list(self.nodes),
            "trunk": self.trunk,
            "direction": self.direction,
        }


@dataclass(frozen=True, slots=True)
class Trunk:
    """A SIP trunk to another PBX (see `trunks.py` for the rules every field obeys).

    `peers` are the peer addresses in preference order, each "host:port" with an optional
    ";transport=udp|tcp" overriding the trunk's `transport`. Outbound credentials (what we present when
    the peer challenges us) are `username` with HA1 digests for `realm` (RFC 7616 §3.4.2; the password is
    never kept); all four are "" when the trunk has none. `allow` are the CIDRs whose calls we accept
    without a challenge (normalised, e.g. "192.0.2.0/24"). `register_expires` > 0 asks for a registration
    to the peer with that expiry (RFC 3261 §10.2); 0 means none.
    """

    name: str
    peers: tuple[str, ...]
    transport: str
    realm: str
    username: str
    ha1_md5: str
    ha1_sha256: str
    allow: tuple[str, ...]
    register_expires: int
    created_at: float
    updated_at: float

    @property
    def has_credentials(self) -> bool:
        """True if we can answer the peer's digest challenges."""
        return bool(self.username)

    def to_dict(self) -> dict[str, Any]:
        """Public view for the RPC layer (HA1 values are password-equivalent and left out)."""
        return {
            "name": self.name,
            "peers": list(self.peers),
            "transport": self.transport,
            "realm": self.realm,
            "username": self.username,
            "credentials": self.has_credentials,
            "allow": list(self.allow),
            "register_expires": self.register_expires,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True, slots=True)
class Route:
    """One dial-plan route: numbers matching `pattern` go to trunk `trunk` (see `trunks.py`).

    The number sent is `prepend` + the dialled number without its first `strip` characters. Routes are
    tried by `(order, name)`, the first match wins.
    """

    name: str
    pattern: str
    trunk: str
    strip: int
    prepend: str
    order: int
    created_at: float
    updated_at: float

    def to_dict(self) -> dict[str, Any]:
        """Public view for the RPC layer."""
        return {
            "name": self.name,
            "pattern": self.pattern,
            "trunk": self.trunk,
            "strip": self.strip,
            "prepend": self.prepend,
            "order": self.order,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }
