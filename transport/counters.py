"""Counters of the asyncio transports, exposed for metrics and asserted on by tests.

Theory: the shell never raises into the event loop, so everything it swallows (bad input, OS errors,
callbacks that failed, peers dropped) is counted here instead. One `TransportCounters` object is shared by
the UDP and TCP transports and the endpoint of a node; `snapshot()` gives a plain dict for Prometheus.

Invariant: counters only grow; they are plain ints touched from the event loop thread only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["TransportCounters"]


@dataclass(slots=True)
class TransportCounters:
    """Monotonic counters of the transport layer (names are the metric names without prefix)."""

    datagrams_received: int = 0
    datagrams_sent: int = 0
    stream_messages_received: int = 0
    stream_messages_sent: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    requests_received: int = 0
    responses_received: int = 0
    requests_absorbed: int = 0
    bad_requests_answered: int = 0
    bad_requests_dropped: int = 0
    bad_responses_dropped: int = 0
    oversized_dropped: int = 0
    tcp_accepted: int = 0
    tcp_connected: int = 0
    tcp_connect_failures: int = 0
    tcp_refused_limit: int = 0
    tcp_closed: int = 0
    tcp_framing_errors: int = 0
    tcp_idle_closed: int = 0
    tcp_slow_peers_dropped: int = 0
    tcp_alias_reused: int = 0
    keepalive_pings: int = 0
    keepalive_pongs: int = 0
    send_errors: int = 0
    socket_errors: int = 0
    callback_errors: int = 0
    timer_errors: int = 0

    def snapshot(self) -> dict[str, int]:
        """A copy of every counter, by name."""
        return asdict(self)
