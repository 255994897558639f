"""One client socket towards trunk peers: send a request in a client transaction, await its outcome.

The trunk pinger (OPTIONS, `trunks.py`) and the trunk registrar (REGISTER, `trunk_register.py`) each own
one `PeerClient`: a `SipEndpoint` on an ephemeral port of the node's SIP host (UDP and TCP) whose client
transactions (RFC 3261 §17.1.2) retransmit within `timeout`. `transact(request, branch, peer)` gives the
final response, or a string saying why there is none ("no answer within 2 s", "transport error: ...").

Invariants:
* At most one pending future per branch; every future is resolved, cancelled or dropped by `transact`'s
  own `finally`, and `aclose` cancels what is left.
* Requests reaching this socket are refused with 403 at once: it is no service, and an unanswered
  non-INVITE server transaction would linger (it has no timer in Trying).
* The event callback never raises into the loop (logged as `<name>_event_failed`).
"""

from __future__ import annotations

import asyncio
import socket

from .logs import get_logger
from .state.trunks import PeerAddress
from .transport.endpoint import SipEndpoint
from .transport.errors import TransportError
from .transport.flow import Flow
from .transport.sip.message import Request, Response, make_response
from .transport.sip.transaction import Event as SipEvent
from .transport.sip.transaction import RequestReceived, ResponseReceived, TimedOut, TimerConfig
from .transport.sip.transaction import TransportError as SipTransportError

log = get_logger("raftpbx.trunks")


async def resolve_peer(peer: PeerAddress) -> tuple[str, int]:
    """The peer's (IP, port): an address literal as is, a DNS name by getaddrinfo off the loop (A/AAAA only,
    the first answer; no RFC 3263 NAPTR/SRV). Raises OSError when the name does not resolve."""
    host, port = peer.address
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return (host, port)
    except OSError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"{host} does not resolve")
    address = infos[0][4]
    return (str(address[0]), int(address[1]))


class PeerClient:
    """A client-only SIP socket (see the module doc). `name` labels logs ("trunk.ping", "trunk.register");
    `to_tag` is the tag of the 403 it answers requests with."""

    def __init__(self, *, bind_host: str, timeout: float, name: str, to_tag: str) -> None:
        self.bind_host = bind_host
        self.timeout = float(timeout)
        self.name = name
        self.to_tag = to_tag
        self._pending: dict[str, asyncio.Future[Response | str]] = {}
        self._endpoint: SipEndpoint | None = None

    async def start(self) -> None:
        """Bind an ephemeral port on `bind_host` (UDP and TCP)."""
        t1 = max(0.01, min(0.5, self.timeout / 8))
        endpoint = SipEndpoint(self._on_event, timers=TimerConfig(t1=t1, t2=max(t1, min(4.0, self.timeout)),
                                                                  timer_d=0.0))
        await endpoint.start(self.bind_host, 0, udp=True, tcp=True)
        self._endpoint = endpoint

    async def aclose(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.cancel()
        self._pending.clear()
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            await endpoint.aclose()

    @property
    def running(self) -> bool:
        return self._endpoint is not None

    @property
    def address(self) -> tuple[str, int] | None:
        """Where the requests come from (UDP); None unless started."""
        return None if self._endpoint is None else self._endpoint.udp_address

    @property
    def local(self) -> tuple[str, int]:
        """The address to name in Via, From and Contact."""
        return self.address or (self.bind_host, 0)

    async def transact(self, request: Request, branch: str, peer: PeerAddress) -> Response | str:
        """Send `request` (whose top Via carries `branch`) to `peer` in a client transaction; its final
        response, or why there is none."""
        endpoint = self._endpoint
        if endpoint is None:
            return f"{self.name} closed"
        future: asyncio.Future[Response | str] = asyncio.get_running_loop().create_future()
        self._pending[branch] = future
        try:
            async with asyncio.timeout(self.timeout):
                destination = await resolve_peer(peer)
                endpoint.send_request(request, destination, transport="tcp" if peer.transport == "tcp" else "udp")
                return await future
        except TimeoutError:
            return f"no answer within {self.timeout:g} s"
        except (OSError, TransportError) as exc:
            return f"transport error: {exc}"
        finally:
            self._pending.pop(branch, None)

    def _on_event(self, endpoint: SipEndpoint, event: SipEvent, flow: Flow | None) -> None:
        del flow
        try:
            outcome: Response | str
            if isinstance(event, ResponseReceived):
                if event.transaction is None or event.response.status < 200:
                    return
                branch = event.transaction.request.branch
                outcome = event.response
            elif isinstance(event, TimedOut | SipTransportError):
                branch = event.transaction.request.branch
                outcome = "no answer" if isinstance(event, TimedOut) else f"transport error: {event.reason}"
            elif isinstance(event, RequestReceived):
                if event.transaction is not None and event.request.method != "ACK":
                    endpoint.respond(event.transaction, make_response(event.request, 403, "Not a SIP service",
                                                                      to_tag=self.to_tag))
                return
            else:
                return
            future = self._pending.get(branch or "")
            if future is not None and not future.done():
                future.set_result(outcome)
        except Exception:
            log.exception(f"{self.name}_event_failed")
