"""Calls to and from trunks (issue 9): the proxy's outbound peer attempts and its inbound allow-list.

Theory of operation
-------------------
`raftpbx/proxy.py` routes every new INVITE; this module holds what is specific to a call crossing a trunk
(docs/trunks.md, "Proxy integration"), so that the proxy keeps small hooks:

* **Inbound** (`inbound_trunk`): the trunk whose allow-list holds the packet's source address (the flow's
  remote address, never Via/From/Contact, which anyone can forge). Such a request is accepted without a
  challenge; the proxy then routes it to local extensions only (no trunk-to-trunk transit) and records it
  with `direction="inbound"`. Any other caller is authenticated as before (407 unless a right digest).
* **Outbound** (`TrunkCalls.fork`): a number that is not a local extension and matches a route goes to the
  route's trunk. The peer addresses (`choose_peer`: configured order, down ones last resort) are tried one
  at a time (RFC 3263 §4.3 serial failover): attempt i sends a copy of the INVITE with Request-URI
  `sip:{number}@{host}:{port}` (`;transport=tcp` for TCP), Max-Forwards decremented, our Record-Route and
  our Via with the deterministic branch `derive_branch("trunk", *server transaction key, trunk, i)` + "."
  + loop hash (so a retransmitted INVITE reaching the next leader continues the same transaction). The
  next peer is tried, and the failed one reported to the pinger (`report(peer, ok=False)`, so the next
  calls skip it at once), when the attempt got no response at all within `attempt_timeout` (the branch
  is abandoned: no CANCEL before a provisional response, §9.1; it is CANCELled if one arrives later),
  when it met a transport error, or when it was answered 503 (§21.5.4). An abandoned attempt that answers
  provisionally after all, before any later attempt did, is taken back (`revive`: the later attempts are
  given up and CANCELled once they ring; a raftpbx peer sends its 100 only after its commit, so a slow
  commit must not reach the callee twice through two of the peer's nodes). Once a peer sent a provisional
  response (101-199), there is no more failover: Timer C, CANCEL and the final response work as for a
  local branch. Any other final response of a peer ends the call with that response. When every peer
  failed, the caller gets 503 with Retry-After (our own answer: the trunk is unavailable now) and the call
  ends as a failure with 503.
* **Credentials towards the peer** (RFC 3261 §22.2, §8.1.3.5): a 401/407 from a peer, for a trunk with
  credentials whose realm is the challenge's, is answered once per peer: the INVITE is sent again to that
  peer with Authorization / Proxy-Authorization (`make_authorization`, the HA1 of the challenge's
  algorithm), a new branch, and CSeq + 1. The caller's INVITE keeps its CSeq, so the proxy translates:
  responses of that branch go upstream with CSeq - 1, CANCEL is built from the sent request. The offset
  outlives the transaction in our Record-Route of that INVITE (`;tcs=1;ftag=<caller's From tag>`, echoed
  in the dialog's route set, RFC 3261 §16.6 step 4): every node that routes a later request of the dialog
  (ACK, BYE, re-INVITE; after a failover too) adds it to the CSeq of requests from the caller (From tag =
  ftag) and takes it off their responses; a stray 2xx retransmission carries the same Record-Route.
  No credentials, another realm, an unsupported algorithm, or a second challenge from the same peer: the
  401/407 is the call's final response (never a loop).

Invariants: at most one attempt of a call is pending at a time (serial); attempts are bounded by the
number of peer addresses (each at most twice, with credentials); only configured peer addresses are ever
sent to; an inbound trunk call never reaches `route_for`; nothing here raises into the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import socket
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .logs import get_logger
from .state import Trunk, trunk_for_source
from .state.trunks import PeerAddress
from .transport.flow import Address, TransportName
from .transport.sip.digest import Challenge, challenges_for, make_authorization
from .transport.sip.errors import SipError
from .transport.sip.message import Message, Request, Response
from .transport.sip.transaction import derive_branch
from .transport.sip.uri import SipUri
from .trunks import PeerHealth, choose_peer

if TYPE_CHECKING:
    from .proxy import Proxy, _Branch, _InviteContext
    from .sipnode import RequestContext

__all__ = [
    "DEFAULT_ATTEMPT_TIMEOUT",
    "TrunkCall",
    "TrunkCalls",
    "authorization_for",
    "caller_of",
    "cseq_shift_of_route",
    "inbound_trunk",
    "shift_cseq",
    "shift_request",
    "tag_hash",
    "trunk_uri",
]

log = get_logger("raftpbx.trunk_calls")

DEFAULT_ATTEMPT_TIMEOUT = 2.0  # seconds without any response before the next peer (config trunks.attempt_timeout)
RETRY_AFTER = "5"  # seconds, on the 503 sent when every peer failed
MAX_CALLER = 256
SHIFT_PARAM = "tcs"  # Record-Route parameter: the CSeq offset of requests from the caller (ftag)
TAG_PARAM = "ftag"


# -- pure helpers -----------------------------------------------------------------------------------------


def inbound_trunk(state: Any, source: Address | None) -> Trunk | None:
    """The trunk whose allow-list holds the packet source `source` (host, port), or None."""
    if source is None or not state.trunks:
        return None  # no trunk: no address parse on a PBX without trunks (every INVITE passes here)
    return trunk_for_source(state, str(source[0]))


def caller_of(request: Request) -> str:
    """The caller recorded for an inbound trunk call: the From URI's user as given (else the whole URI),
    at most 256 characters."""
    try:
        uri = request.from_.uri
    except SipError:
        return "unknown"
    user = uri.user if isinstance(uri, SipUri) else None
    text = user if user else str(uri)
    return (text or "unknown")[:MAX_CALLER]


def trunk_uri(number: str, peer: PeerAddress) -> str:
    """The Request-URI of an attempt: `sip:{number}@{host}:{port}` (+ `;transport=tcp`); a '#' of the number
    is escaped (RFC 3261 §25.1: not allowed as such in a user part)."""
    suffix = ";transport=tcp" if peer.transport == "tcp" else ""
    return f"sip:{number.replace('#', '%23')}@{peer.host}:{peer.port}{suffix}"


def tag_hash(tag: str) -> str:
    """The `ftag` Record-Route parameter naming the caller's From tag (hashed: a tag may hold characters
    a URI parameter may not)."""
    return hashlib.sha256(tag.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def shift_cseq(message: Message, offset: int) -> None:
    """Add `offset` to the CSeq number of `message` (in place); the method is kept."""
    if not offset:
        return
    cseq = message.cseq
    message.headers.set("CSeq", f"{cseq.seq + offset} {cseq.method}")


def shift_request(request: Request, offset: int) -> None:
    """`shift_cseq` for a request from the caller towards the peer, RAck included (a PRACK names the
    INVITE's CSeq number, RFC 3262 §7.2)."""
    if not offset:
        return
    shift_cseq(request, offset)
    rack = request.headers.get("RAck")
    if rack is not None:
        parts = rack.split()
        if len(parts) == 3 and parts[1].isdigit() and len(parts[1]) <= 10:
            request.headers.set("RAck", f"{parts[0]} {int(parts[1]) + offset} {parts[2]}")


def cseq_shift_of_route(uri: object, from_tag: str | None) -> int:
    """The CSeq offset a request whose From tag is `from_tag` needs, from one of our Route (or Record-Route)
    URIs: `tcs` when its `ftag` is that tag (the request comes from the caller, towards the peer), else 0."""
    if not isinstance(uri, SipUri):
        return 0
    shift = uri.params.get(SHIFT_PARAM)
    if shift is None or not shift.isdigit() or len(shift) > 3:
        return 0
    if from_tag is None or uri.params.get(TAG_PARAM) != tag_hash(from_tag):
        return 0
    return int(shift)


def _pick_challenge(trunk: Trunk, challenges: list[Challenge]) -> tuple[Challenge, str] | None:
    """The challenge to answer and the HA1 for it: our realm only; SHA-256 preferred over MD5."""
    best: tuple[Challenge, str] | None = None
    for challenge in challenges:
        if challenge.realm != trunk.realm:
            continue
        algorithm = challenge.algorithm.upper()
        if algorithm == "SHA-256" and trunk.ha1_sha256:
            return challenge, trunk.ha1_sha256
        if algorithm == "MD5" and trunk.ha1_md5 and best is None:
            best = (challenge, trunk.ha1_md5)
    return best


def authorization_for(trunk: Trunk, status: int, challenge_values: list[str], *, method: str, uri: str,
                      cnonce: str) -> tuple[str, str] | None:
    """The (header name, value) answering a peer's 401 (WWW-Authenticate) or 407 (Proxy-Authenticate) with
    the trunk's credentials (RFC 3261 §22.2, RFC 7616 §3.4), or None when the trunk has no credentials,
    no challenge names its realm, or the algorithm is not one we hold an HA1 for."""
    if not trunk.has_credentials:
        return None
    chosen = _pick_challenge(trunk, challenges_for(challenge_values))
    if chosen is None:
        return None
    challenge, ha1 = chosen
    try:
        value = make_authorization(username=trunk.username, ha1=ha1, challenge=challenge, method=method,
                                   uri=uri, cnonce=cnonce)
    except SipError:
        return None
    return ("Authorization" if status == 401 else "Proxy-Authorization"), value


def _peer_label(peer: PeerAddress) -> str:
    return f"{peer.host}:{peer.port}" + (";transport=tcp" if peer.transport == "tcp" else "")


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


# -- per-call state -----------------------------------------------------------------------------------------


@dataclass(eq=False)
class TrunkCall:
    """One outbound trunk call's attempts (kept in the proxy's `_InviteContext.trunk`)."""

    trunk: Trunk
    number: str
    base: Request | None = None  # the INVITE as forwarded (our Routes and credentials removed)
    max_forwards: int = 70  # Max-Forwards of the copies we send
    looped: str = ""
    peers: list[PeerAddress] = field(default_factory=list)
    next: int = 0  # index of the next peer to try
    attempts: int = 0  # INVITEs started (with credential resends)
    timer: asyncio.TimerHandle | None = None  # the current attempt's no-response timer
    failures: list[str] = field(default_factory=list)  # "host:port: reason", in order
    authenticated: set[PeerAddress] = field(default_factory=set)  # peers we already answered a challenge of
    resolving: asyncio.Task[Any] | None = None


# -- the proxy's trunk logic ---------------------------------------------------------------------------------


class TrunkCalls:
    """The outbound attempt logic of one `Proxy` (see the module doc). `pinger` is the node's
    `TrunkPinger` (its `health` map and `report`), or None: then every peer counts as usable and nothing
    is reported."""

    def __init__(self, proxy: Proxy, pinger: Any = None, attempt_timeout: float = DEFAULT_ATTEMPT_TIMEOUT) -> None:
        self.proxy = proxy
        self.pinger = pinger
        self.attempt_timeout = float(attempt_timeout)
        self.failovers = 0  # attempts abandoned for the next peer
        self.authenticated = 0  # INVITEs resent with credentials
        # /metrics: INVITEs sent per (trunk, peer); failed attempts per (trunk, peer, kind); calls refused
        # with 503 because every peer failed, per trunk.
        self.attempt_counts: Counter[tuple[str, str]] = Counter()
        self.failure_counts: Counter[tuple[str, str, str]] = Counter()
        self.unavailable_counts: Counter[str] = Counter()

    @property
    def health(self) -> Mapping[str, PeerHealth]:
        health = getattr(self.pinger, "health", None)
        return health if health is not None else {}

    def inbound(self, ctx: RequestContext) -> Trunk | None:
        """The trunk an INVITE comes from, by its packet source (flow remote, else the Via-fixed source)."""
        source = ctx.flow.remote if ctx.flow is not None else ctx.source
        machine = self.proxy.node.machine
        with machine.lock:
            return inbound_trunk(machine.state, source)

    def _report(self, peer: PeerAddress, reason: str, call_id: str = "") -> None:
        log.info("trunk.attempt_failed", call_id=call_id, peer=f"{peer.host}:{peer.port}", transport=peer.transport,
                 reason=reason)
        report = getattr(self.pinger, "report", None)
        if report is None:
            return
        try:
            report(peer, ok=False, reason=reason)
        except Exception:
            log.exception("trunk.report_failed")

    # -- attempts ----------------------------------------------------------------------------------------
    def fork(self, context: _InviteContext, base: Request, max_forwards: int | None, looped: str) -> None:
        """Start the first attempt of an outbound trunk call (the call is recorded)."""
        call = context.trunk
        assert call is not None
        call.base = base
        call.max_forwards = (max_forwards if max_forwards is not None else 71) - 1
        call.looped = looped
        call.peers = choose_peer(call.trunk, self.health)
        context.forked = True
        self.proxy._arm_timer_c(context)
        self._next_attempt(context)

    def _over(self, context: _InviteContext) -> bool:
        return context.finished or context.final_pending or context.cancelled or context.timed_out or \
            context.answered or context.answer_pending

    def _next_attempt(self, context: _InviteContext) -> None:
        call = context.trunk
        assert call is not None
        if self._over(context) or call.next >= len(call.peers):
            self.proxy._maybe_finish(context)
            return
        peer = call.peers[call.next]
        call.next += 1
        self._attempt(context, peer, authorization=None)

    def _attempt(self, context: _InviteContext, peer: PeerAddress, authorization: tuple[str, str] | None,
                 *, cseq_shift: int = 0) -> None:
        call = context.trunk
        assert call is not None and call.base is not None
        proxy = self.proxy
        ist = context.ist
        assert ist is not None
        index = call.attempts
        call.attempts += 1
        transport: TransportName = "tcp" if peer.transport == "tcp" else "udp"
        request = call.base.copy()
        request.uri = trunk_uri(call.number, peer)
        headers = request.headers
        headers.set("Max-Forwards", str(call.max_forwards))
        flow = context.ctx.flow
        inbound: TransportName = context.ctx.transport
        # A dialog stays on this node only if the caller's TCP connection reached this node's own address;
        # a trunk peer is reachable from every node (we open the connection), never a reason to pin.
        rr = proxy.local if proxy._pinned(flow, "udp", ()) else None
        params = f";{SHIFT_PARAM}={cseq_shift};{TAG_PARAM}={tag_hash(context.from_tag)}" if cseq_shift else ""
        if inbound != transport:
            headers.add("Record-Route", proxy._record_route(inbound, rr, params), first=True)
        headers.add("Record-Route", proxy._record_route(transport, rr, params), first=True)
        branch_id = derive_branch("trunk", *[str(part) for part in ist.key], call.trunk.name, str(index))
        headers.add("Via", proxy._via(transport, branch_id + "." + call.looped, proxy.sent_by(flow)), first=True)
        if authorization is not None:
            headers.add(*authorization)
        shift_cseq(request, cseq_shift)
        branch = proxy._new_branch(f"trunk:{index}", request, peer.address, transport, peer, cseq_shift)
        context.branches.append(branch)
        if _is_ip(peer.address[0]):
            self._start(context, branch)
            return
        call.resolving = proxy.recorder.spawn(self._resolve_and_start(context, branch))

    async def _resolve_and_start(self, context: _InviteContext, branch: _Branch) -> None:
        """RFC 3263 reduced to A/AAAA (no NAPTR/SRV): the first address of the peer's name, resolved off the
        event loop; a name that does not resolve fails the attempt like a transport error."""
        host, port = branch.destination
        # The family our own SIP address has: an IPv4 node cannot send to the name's AAAA (and back).
        family = socket.AF_INET6 if ":" in self.proxy.local[0] else socket.AF_INET
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
        except OSError as exc:
            infos, error = [], str(exc)
        else:
            error = f"{host} does not resolve"
        if context.trunk is not None:
            context.trunk.resolving = None
        if not infos:
            branch.final = 480
            self._failed(context, branch, f"DNS: {error}", "transport")
            return
        address = infos[0][4]
        branch.destination = (str(address[0]), int(address[1]))
        if branch.final is not None:
            return  # given up meanwhile (an earlier attempt was revived)
        if self._over(context):
            branch.final = 408
            self.proxy._maybe_finish(context)
            return
        self._start(context, branch)

    def _start(self, context: _InviteContext, branch: _Branch) -> None:
        call = context.trunk
        assert call is not None
        if branch.peer is not None:
            self.attempt_counts[(call.trunk.name, _peer_label(branch.peer))] += 1
        self.proxy._start_branch(context, branch)
        if branch.final is None and branch.tx is not None:
            if call.timer is not None:
                call.timer.cancel()
            call.timer = asyncio.get_running_loop().call_later(
                self.attempt_timeout, self._attempt_timed_out, context, branch)

    def stop(self, context: _InviteContext) -> None:
        """Cancel the attempt timer (the call is over, or the proxy closes)."""
        call = context.trunk
        if call is None:
            return
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None

    def responded(self, context: _InviteContext, branch: _Branch) -> None:
        """The first response (even 100) on an attempt: the peer is alive, its attempt timer stops; an
        attempt abandoned for silence is taken back if it can be (`revive`)."""
        call = context.trunk
        if call is None:
            return
        if call.timer is not None and branch is context.branches[-1]:
            call.timer.cancel()
            call.timer = None
        elif branch.abandoned and not branch.cancel_sent:
            self.revive(context, branch)

    def _attempt_timed_out(self, context: _InviteContext, branch: _Branch) -> None:
        try:
            call = context.trunk
            if call is not None:
                call.timer = None
            if branch.final is not None or branch.responded or self._over(context):
                return
            branch.final = 408  # abandoned: CANCELled if a provisional response ever comes (§9.1)
            branch.cancel_wanted = True
            branch.abandoned = True
            self._failed(context, branch, f"no response within {self.attempt_timeout:g} s", "timeout")
        except Exception:
            log.exception("trunk.attempt_timer_failed", call_id=context.call_id)

    def _failed(self, context: _InviteContext, branch: _Branch, reason: str, kind: str) -> None:
        call = context.trunk
        assert call is not None
        if branch.peer is not None:
            call.failures.append(f"{branch.peer.host}:{branch.peer.port}: {reason}")
            self.failure_counts[(call.trunk.name, _peer_label(branch.peer), kind)] += 1
            self._report(branch.peer, reason, context.call_id)
        self.failovers += 1
        self._next_attempt(context)

    def branch_final(self, context: _InviteContext, branch: _Branch, status: int,
                     response: Response | None) -> bool:
        """A final status on an attempt (its `final` is set); True when handled here (next attempt or a
        resend with credentials), False to let the proxy decide the call's final response."""
        call = context.trunk
        if call is None or branch.peer is None:
            return False
        if branch is context.branches[-1] and call.timer is not None:
            call.timer.cancel()
            call.timer = None
        if branch.provisional or self._over(context):
            return False  # a peer that rang owns the call (no more failover)
        if status == 503:
            self._failed(context, branch, "503 Service Unavailable", "503")
            return True
        if response is None and status == 480:
            self._failed(context, branch, "transport error", "transport")
            return True
        if response is None and status == 408 and not branch.responded:
            self._failed(context, branch, "no response (timer B)", "timeout")
            return True
        if status in (401, 407) and response is not None:
            return self._answer_challenge(context, branch, status, response)
        return False

    def _answer_challenge(self, context: _InviteContext, branch: _Branch, status: int, response: Response) -> bool:
        call = context.trunk
        assert call is not None and branch.peer is not None
        if branch.peer in call.authenticated:
            log.info("trunk.challenged_again", call_id=context.call_id, trunk=call.trunk.name, status=status)
            return False  # a second challenge: it is the call's final response (never loop)
        header = "WWW-Authenticate" if status == 401 else "Proxy-Authenticate"
        answer = authorization_for(call.trunk, status, response.headers.values(header), method="INVITE",
                                   uri=branch.request.uri, cnonce=secrets.token_hex(8))
        if answer is None:
            log.info("trunk.challenge_unanswered", call_id=context.call_id, trunk=call.trunk.name, status=status,
                     reason="no credentials for this realm or algorithm")
            return False
        call.authenticated.add(branch.peer)
        self.authenticated += 1
        self._attempt(context, branch.peer, answer, cseq_shift=branch.cseq_shift + 1)
        return True

    def revive(self, context: _InviteContext, branch: _Branch) -> bool:
        """A response (100 or provisional) on an attempt abandoned for silence: it was only slow (a raftpbx
        peer sends its 100 after its commit). If no later attempt has sent a provisional response yet, the slow
        attempt becomes the call's again and the later ones are given up (CANCELled once they answer
        provisionally, §9.1; a callee reached twice would otherwise see a merged request, §8.2.2.2).
        True: revived (the caller relays the response); False: CANCEL it as any abandoned branch."""
        call = context.trunk
        peer = branch.peer
        if call is None or peer is None or not branch.abandoned or branch.final != 408 or branch.response is not None:
            return False
        if context.finished or context.final_pending or context.cancelled or context.timed_out \
                or context.answered or context.answer_pending:
            return False
        if any(other.provisional for other in context.branches if other is not branch):
            return False
        branch.final = None
        branch.cancel_wanted = False
        branch.abandoned = False
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        call.next = len(call.peers)  # a peer that rang owns the call: no more failover
        for other in context.branches:
            if other is not branch and other.final is None:
                self.proxy._cancel_branch(context, other)
        report = getattr(self.pinger, "report", None)
        if report is not None:
            report(peer, ok=True)
        log.info("trunk.attempt_revived", call_id=context.call_id, peer=f"{peer.host}:{peer.port}")
        return True

    def metrics_lines(self) -> list[str]:
        """Prometheus lines (HELP/TYPE included): trunk call attempts, failed attempts by kind (timeout,
        transport, 503), and calls refused because every peer failed."""
        node = str(getattr(self.proxy.node, "node_id", ""))
        attempts = [f'raftpbx_trunk_call_attempts_total{{node="{node}",trunk="{trunk}",peer="{peer}"}} {n}'
                    for (trunk, peer), n in sorted(self.attempt_counts.items())]
        failures = [f'raftpbx_trunk_call_attempts_failed_total{{node="{node}",trunk="{trunk}",peer="{peer}",'
                    f'reason="{kind}"}} {n}' for (trunk, peer, kind), n in sorted(self.failure_counts.items())]
        unavailable = [f'raftpbx_trunk_calls_unavailable_total{{node="{node}",trunk="{trunk}"}} {n}'
                       for trunk, n in sorted(self.unavailable_counts.items())]
        return [
            "# HELP raftpbx_trunk_call_attempts_total INVITEs this node sent to a trunk peer (credential resends included)",
            "# TYPE raftpbx_trunk_call_attempts_total counter", *attempts,
            "# HELP raftpbx_trunk_call_attempts_failed_total trunk call attempts that moved on to the next peer",
            "# TYPE raftpbx_trunk_call_attempts_failed_total counter", *failures,
            "# HELP raftpbx_trunk_calls_unavailable_total outbound calls refused with 503: every peer failed",
            "# TYPE raftpbx_trunk_calls_unavailable_total counter", *unavailable,
        ]

    def final_choice(self, context: _InviteContext) -> tuple[int, Response | None, list[tuple[str, str]]]:
        """The final response of an outbound trunk call whose attempts are all over: the last attempt's
        own failure when a peer decided (486, 404, a 401/407 we could not answer...; a 503 after a
        provisional response becomes 500, §16.7 step 6), else 503 with Retry-After (every peer failed)."""
        call = context.trunk
        last = context.branches[-1] if context.branches else None
        if last is not None and last.final is not None and last.response is not None:
            if last.final != 503:
                return last.final, last.response, []
            if last.provisional:
                return 500, None, []  # §16.7 step 6: a peer that rang, then answered 503 (no failover then)
        failures = call.failures if call is not None else []
        if call is not None:
            self.unavailable_counts[call.trunk.name] += 1
        log.info("trunk.all_peers_failed", call_id=context.call_id,
                 trunk=call.trunk.name if call is not None else "", failures=failures)
        return 503, None, [("Retry-After", RETRY_AFTER)]
