"""Flows: where a SIP message came from and where its answer goes.

Theory: the asyncio shell tags every received message with a `Flow` (transport name, remote and local
address, and for TCP the id of the connection it arrived on). The transaction layer carries the flow of the
request that created a server transaction and hands it back with each response, so a response is sent the
way RFC 3261 §18.2.2 says: over the same TCP connection while it is open, to the source address and port of
a UDP request that asked for `rport` (RFC 3581 §4).

Invariant: a `Flow` is an immutable value (hashable, comparable); it never holds a socket or a protocol
object, only the connection id, so stale flows are harmless: the TCP transport looks the id up and
falls back to the remote address (and its aliases) when that connection has gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .sip.headers import Via

__all__ = ["Address", "Flow", "TransportName", "strip_brackets", "via_destination"]

Address = tuple[str, int]
TransportName = Literal["udp", "tcp"]

DEFAULT_SIP_PORT = 5060  # RFC 3261 §18.2.2, §19.1.2


def strip_brackets(host: str) -> str:
    """An IPv6 reference "[::1]" as the bare address "::1" (RFC 5118); other hosts unchanged."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def via_destination(via: Via) -> tuple[Address, TransportName]:
    """Where a response goes by its top Via alone (RFC 3261 §18.2.2, RFC 3581 §4): `received` (else the
    sent-by host) and `rport` (else the sent-by port, else 5060), over the Via's transport."""
    host = strip_brackets(via.received or via.host)
    port = via.rport or via.port or DEFAULT_SIP_PORT
    return (host, port), ("tcp" if via.transport.lower() == "tcp" else "udp")


@dataclass(frozen=True, slots=True)
class Flow:
    """A message's path: transport, remote (peer) address, local address, TCP connection id (0 for UDP)."""

    transport: TransportName
    remote: Address
    local: Address
    connection_id: int = 0

    @property
    def reliable(self) -> bool:
        """True for stream transports (RFC 3261 §17: no retransmission timers A/E/G over TCP)."""
        return self.transport != "udp"

    @property
    def via_transport(self) -> str:
        """The transport token for a Via header (RFC 3261 §20.42): "UDP" or "TCP"."""
        return self.transport.upper()
