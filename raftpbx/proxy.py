"""The PBX's stateful proxy (RFC 3261 §16): calls between extensions, forked to every registered contact.

Theory of operation
-------------------
`Proxy` plugs into `SipNode` (the node's transaction user): INVITE and CANCEL handlers, a pre-router that
claims in-dialog requests (those with a To tag), the stray-response hook, and a watcher on every client
transaction it starts. Per new INVITE (§16.3-§16.7):

1. Validation (§16.3): a Request-URI that is not sip:/sips: -> 416; Max-Forwards 0 -> 483; any
   Proxy-Require -> 420 with Unsupported (we support no option tags); loop detection -> 482: our Via branches end in a hash of the
   fields that identify the request as we received it (Request-URI, From/To tags, Call-ID, CSeq number,
   Proxy-Require); a received request carrying a Via of ours with the same hash came back to us unchanged.
   A spiral (the request comes back with another Request-URI) has another hash and is served.
2. Route pre-processing (§16.4): Route values naming us (the service address or this node's SIP address) are
   removed from the top; a Request-URI naming us (a strict router upstream) is replaced by the last Route.
3. Authentication (§22.3): `ctx.authenticate(proxy=True)`; anything but a right digest gets a fresh 407
   challenge (an unknown caller and a wrong password look the same; the sipnode helper guarantees it).
4. Target (§16.5): the Request-URI user is the called extension. Unknown extension -> 404, no live binding
   (`current_bindings(state, aor, now)`) -> 480; both are recorded (CallStarted + CallEnded in ONE entry)
   before the reply.
5. Fork and `CallStarted` in parallel (DESIGN decision 3 holds for every answer to the caller): one
   client transaction per binding (parallel forking, §16.6) with Request-URI = the contact, Max-Forwards
   decremented, our Record-Route (`<sip:SERVICE;lr>`, two values with transport params when the inbound and
   outbound transports differ, RFC 5658), the binding's Path as Route (RFC 3327), and our Via whose branch
   is `derive_branch(server transaction key, binding key)` + "." + loop hash: deterministic, so a
   retransmission of the INVITE that reaches another node continues the same downstream transaction
   (DESIGN decision 5). The destination is the binding's `received` address (NAT, RFC 3581) over the
   binding's transport; over TCP the endpoint reuses the registered connection while it is open.
   A new local call (a call id this node does not know, on a node caught up with its leader) is forked at
   once while its `CallStarted` commits (`_fork_while_starting`: the callee rings one commit earlier).
   What waits for that commit: the 100 Trying (§16.2) and every provisional response for the caller (held
   in order, at most MAX_HELD; at the commit they go up at once, and the 100 only when none was held), so a caller keeps retransmitting its INVITE until the call is on a quorum
   and a node that dies before the commit leaves the call to the next leader, which forks it again on the
   same branches (the callee sees a retransmission); `CallAnswered` (proposed only once `CallStarted` is
   committed: two entries, never reordered); `CallEnded` and the final response. The caller's
   retransmissions are absorbed by the server transaction (§17.2.1), so an INVITE never forks twice. If
   the commit fails: every branch is CANCELled (at once after a provisional response, else when one
   arrives, §9.1), a 2xx is not forwarded, the caller gets 503 + Retry-After, and a best-effort
   `CallEnded(failure, 503)` under the deterministic op_id covers a timed-out proposal that committed after
   all (else it is refused: no such call). A stray 2xx for a call with no record here is dropped, never
   forwarded: the callee retransmits it and the caller's INVITE retransmission gets it recorded first.
   A retransmission whose call the state already holds (a dead leader started it) and an outbound trunk
   call keep the older order: `CallStarted` committed (it comes back `Duplicate` for the former), then
   the fork (or the trunk's first attempt), then 100 Trying.
6. Responses (§16.7; commit-before-reply on the 2xx measured with bench/pbx_calls.py on 3 loopback nodes:
   the 180 is relayed in 0.4-1.3 ms p50, the 200 in 5-8 ms p50, i.e. the CallAnswered commit adds ~5 ms):
   100 absorbed; 101-199 forwarded upstream and reset Timer C; the first 18x proposes
   `CallRinging` in the background RINGING_LINGER (50 ms) later, unless the answer or the end comes first
   and carries it in its own log entry (measured with an auto-answering UAS: a CallRinging entry still in
   flight made the 2xx wait for two commits, 19 ms p50 instead of 6). The first 2xx: `CallAnswered` is committed, THEN the 2xx is forwarded
   (2xx retransmissions from the callee that arrive meanwhile are dropped; it retransmits), and every other
   branch is CANCELled (§16.7 step 10; a branch that has had no provisional response yet is cancelled when
   one arrives, §9.1). Later 2xx (retransmissions, other forks) are forwarded through the server
   transaction (RFC 6026 Accepted) or, once it is gone, statelessly by the next Via. A 6xx cancels the other
   branches. When every branch has a final response and none was 2xx, the best one (§16.7 step 6: a 6xx if
   any, else the lowest class, 401/407/415/420/484 preferred within 4xx, 503 sent as 500) is forwarded
   after `CallEnded(failure, code)` is committed. Timer B expiry counts as 408, a transport error as 480.
7. Timer C (§16.6 step 11, configurable, `calls.timer_c`, default 180 s): reset by provisional responses; on expiry the
   branches with a provisional response are CANCELled and the rest given up; the caller gets 408 and the
   call ends with cause "timeout". A branch that ignores our CANCEL is given up after 64*T1.
8. CANCEL (§16.10): 481 if it matches no INVITE server transaction (but see the dead leader's calls below),
   else 200 at once; the pending branches are CANCELled, branches without a provisional response given up;
   once all are final the caller gets 487 and the call ends with cause "cancel" (committed before the 487).

Trunks (issue 9; the trunk-specific logic is raftpbx/trunk_calls.py, the design docs/trunks.md): before step 3,
`trunk_for_source(state, packet source)` names the trunk whose allow-list holds the flow's remote address
(never a header); such a request skips authentication, is recorded with the trunk and direction "inbound"
(caller: the From URI user) and reaches local extensions only (no trunk-to-trunk transit: anything else
404). In step 4, a Request-URI user that is not a local extension is looked up with `route_for` (local
extensions win); a match is recorded with the trunk and direction "outbound" (callee: the dialled number)
and, instead of the parallel fork, `TrunkCalls.fork` tries the trunk's peer addresses one at a time
(RFC 3263 §4.3): next peer on silence for `trunks.attempt_timeout`, a transport error or a 503, reported to
the pinger; no failover after a provisional response; every peer failed -> 503 + Retry-After. A peer's
401/407 is answered once per peer with the trunk's credentials (CSeq + 1, translated back on responses;
in-dialog requests from the caller carry the offset in our Record-Route's `tcs`/`ftag` parameters, which
`_route_cseq_shift` and `_stray_upstream` read on any node).

In-dialog requests (§16.4, §16.6, §16.7): a request with a To tag whose top Route names us has our Route
values removed and is forwarded to the next Route, or to the Request-URI, with our Via and Max-Forwards
decremented; ACK (for a 2xx) statelessly, everything else (BYE, re-INVITE, UPDATE, INFO, REFER, PRACK,
NOTIFY...) through a client transaction whose responses are relayed upstream. A BYE proposes `CallEnded`
(cause bye-caller when its From tag is the caller's tag, else bye-callee) while it travels; its final
response is relayed only once that commit is done. A 2xx to a re-INVITE/UPDATE carrying Session-Expires
proposes `CallRefreshed` (RFC 4028 §10). An in-dialog request that does not Route through us gets 481 (we
never relay for dialogs we did not record-route: no open relay); an ACK is then dropped.

Service address and failover (issue 5, Contract C): the cluster's service address follows the Raft leader
(raftpbx/service_address.py binds it as an endpoint listener). Record-Route always names it when one is
configured and its mode is not none (no probing: whoever leads when an in-dialog request is sent receives
it and routes it from the replicated dialog state); in mode none, this node's own address. A request that
arrived ON the service address (`ctx.flow.local`) is forwarded with the service address as our Via sent-by,
and the endpoint sends it from that listener: the callee's responses and retransmissions then follow the
address to the next leader, and since the fork's branch is derived from the incoming transaction, a
retransmission of the caller's INVITE reaching the next leader (CallStarted comes back Duplicate) continues
the SAME downstream transaction (same branch, same sent-by; the callee resends its last response). A
request that arrived on the node's own address keeps the node's Via. A Route naming the service address or
this node is ours on every node. Exception: a dialog with a phone reached over a TCP connection to THIS node
(the caller's connection arrived on the node's own address, or the callee's binding is a TCP connection
without a Path, i.e. not an RFC 5626 flow) is record-routed with this node's own address (`_pinned`): only
this node can reach that phone, so the dialog stays here and dies with the node and its connection.
What a dead leader leaves behind reaches the next one as stray responses (no client transaction): a 2xx to
an INVITE whose call is in the replicated state and not answered commits `CallAnswered`, then is forwarded
statelessly (retransmissions meanwhile dropped); a final non-2xx is ACKed by us hop by hop (statelessly,
the response's own top Via, so the same branch, §17.1.1.3), commits `CallEnded(failure, code)` (a 487:
cancel by the caller) and is then forwarded; once the call is answered, another fork's failure is only
ACKed, a re-INVITE's failure is ACKed and forwarded. A retransmitted INVITE for a call already answered
elsewhere waits (Timer C bound) for the callee's 2xx retransmission and sends it through its transaction;
for one already ended it gets the recorded final status. A CANCEL for a call a dead leader forked (ringing
in the replicated state, same INVITE branch and From tag; not an outbound trunk call) gets 200 and is sent on
each current binding of the callee with the dead leader's derived branch (`_cancel_orphan`); the 487 comes
back as a stray final response. A node that stays up but lost the address while a
call rang (drain, transfer-leader) sees no more responses on its branches: when its Timer C fires and the
replicated state says the call was answered or ended (by the next leader), it CANCELs nothing and records
nothing, drops its branch transactions and closes its server transaction (`_abandon`). Limits: the other
branches of a forked call are not CANCELled by the next leader (it has no branch state), a stray final
failure ends the call even if other forks still ring, and a TCP flow dies with its node.

Deliberate deviations: 401/407 challenges of several branches are not aggregated (the first one is sent);
only UDP and TCP targets (a binding over another transport is skipped); a request that reached a node on its
own address has that node's Via, so its responses come back to that node only.

Invariants: every INVITE this proxy accepts for routing gets exactly one final response from us (the chosen
one, or the forwarded 2xx); a 2xx is never forwarded before its `CallAnswered` commit, which follows the
`CallStarted` commit; no provisional response reaches the caller before `CallStarted` is committed (apart from
the transaction layer's own 100 Trying after 200 ms, §17.2.1); no CANCEL is sent on
a branch before a provisional response on it (§9.1); nothing raises into the event loop (handlers are
wrapped by `SipNode`; callbacks here catch and log).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .calls import CallRecorder, CallSettings
from .logs import get_logger
from .replication import apply_leader_commits
from .sipnode import RequestContext, SipNode
from .state import Call, Duplicate, Rejected, current_bindings, route_for
from .state.model import Binding
from .state.trunks import PeerAddress
from .transport.errors import TransportError as SendFailure
from .transport.flow import Address, Flow, TransportName, strip_brackets, via_destination
from .transport.sip.digest import parse_authorization
from .transport.sip.errors import SipError, SipParseError
from .transport.sip.headers import Via, parse_name_addr
from .transport.sip.message import Request, Response
from .transport.sip.transaction import (
    ClientTransaction,
    Event,
    ResponseReceived,
    ServerTransaction,
    Terminated,
    TimedOut,
    TransportError,
    build_cancel,
    derive_branch,
    server_key,
)
from .transport.sip.uri import SipUri, parse_uri
from .trunk_calls import (
    DEFAULT_ATTEMPT_TIMEOUT,
    SHIFT_PARAM,
    TrunkCall,
    TrunkCalls,
    caller_of,
    cseq_shift_of_route,
    shift_cseq,
    shift_request,
)

__all__ = ["Proxy", "best_response", "loop_hash", "service_mode", "session_expires"]

log = get_logger("raftpbx.proxy")
_SHIFT_MARKER = f";{SHIFT_PARAM}="  # the text a Route value with the trunk CSeq offset carries

DEFAULT_PORT = 5060
DEFAULT_MAX_FORWARDS = 70  # §16.6 step 3
PREFERRED_4XX = (401, 407, 415, 420, 484)  # §16.7 step 6
TRANSPORTS: dict[str, TransportName] = {"udp": "udp", "tcp": "tcp"}
RINGING_LINGER = 0.05  # CallRinging waits this long for an answer to share its log entry (one commit less)
LOOKUP_CATCH_UP = 1.0  # s: at most this long a 404/480 waits for the read barrier (apply_leader_commits)
MAX_HELD = 8  # provisional responses kept for the caller while CallStarted commits (a callee may send many)


# -- pure helpers (tested on their own) ---------------------------------------------------------------------


def loop_hash(request: Request) -> str:
    """A hash of the fields that identify `request` as received (§16.6 step 8, §16.3 step 4)."""
    parts = [
        request.uri,
        request.from_tag or "",
        request.to_tag or "",
        request.call_id,
        str(request.cseq.seq),
        *request.headers.values("Proxy-Require"),
    ]
    return hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def best_response(statuses: Iterable[int]) -> int | None:
    """The status to forward when no branch answered 2xx (§16.7 step 6), or None for no responses.

    A 6xx wins; else the lowest class; within 4xx, 401, 407, 415, 420 and 484 first; else the first
    received of that class (the order of `statuses`). 503 is returned as is (the caller sends 500).
    """
    seen = list(statuses)
    if not seen:
        return None
    six = [s for s in seen if s >= 600]
    if six:
        return six[0]
    lowest = min(s // 100 for s in seen)
    same = [s for s in seen if s // 100 == lowest]
    if lowest == 4:
        for status in same:
            if status in PREFERRED_4XX:
                return status
    return same[0]


def session_expires(message: Request | Response) -> int | None:
    """The Session-Expires delta-seconds (RFC 4028 §4; compact form "x"), or None."""
    value = message.headers.get("Session-Expires")
    if value is None:
        return None
    text = value.split(";", 1)[0].strip()
    if not text.isdigit() or len(text) > 10:
        return None
    seconds = int(text)
    return seconds if seconds > 0 else None


def service_mode(cfg: Any) -> str:
    """The service address mode of a node config: "loopback", "ip" or "none" (Contract B).

    Read from `cfg.service_mode` or `cfg.service.mode` when the config carries one; otherwise derived from
    `cfg.service_address` the way the config defaults it: no address -> "none", a 127.0.0.0/8 address ->
    "loopback", any other -> "ip".
    """
    address = getattr(cfg, "service_address", None)
    mode = getattr(cfg, "service_mode", None)
    if mode is None:
        mode = getattr(getattr(cfg, "service", None), "mode", None)
    if isinstance(mode, str) and mode in ("loopback", "ip", "none"):
        return mode if address is not None else "none"
    if address is None:
        return "none"
    try:
        return "loopback" if ipaddress.ip_address(strip_brackets(str(address.host))).is_loopback else "ip"
    except ValueError:
        return "ip"


def _same_address(a: Address, b: Address) -> bool:
    host_a: str = strip_brackets(a[0])
    host_b: str = strip_brackets(b[0])
    return a[1] == b[1] and host_a == host_b


def _parse_contact_uri(text: str) -> SipUri | None:
    try:
        uri = parse_name_addr(text).uri if "<" in text else parse_uri(text.strip())
    except SipError:
        return None
    return uri if isinstance(uri, SipUri) else None


def _uri_target(uri: SipUri) -> tuple[Address, TransportName] | None:
    """Where a SIP URI is reached (RFC 3263 reduced to IP literals/loopback names: no DNS lookups here)."""
    transport = TRANSPORTS.get(uri.transport or "udp")
    if transport is None:
        return None
    host = strip_brackets(uri.maddr or uri.host)
    port = uri.port if uri.port is not None else (5061 if uri.scheme == "sips" else DEFAULT_PORT)
    return (host, port), transport


def _parse_host_port(text: str) -> Address | None:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return strip_brackets(host), int(port)


async def _outcome(start: asyncio.Future[bool]) -> bool:
    """The CallStarted decision of a parallel fork; shielded, so a cancelled waiter never cancels it."""
    return start.result() if start.done() else await asyncio.shield(start)


def _logged(function: Callable[..., object], *args: object) -> None:
    """Run a continuation from a future's done-callback; an exception is logged, never raised into the loop."""
    try:
        function(*args)
    except Exception:
        log.exception("proxy.continuation_failed", function=getattr(function, "__name__", "?"))


def _strip_top_via(response: Response) -> Response:
    out = response.copy()
    out.headers.remove_first_value("Via")
    return out


def _pop_top_via(response: Response) -> Response:
    """`response` itself with our Via removed: for a response that a client transaction of ours handed over
    (the transaction keeps no reference to it once its event is out; nothing else reads it), so the copy of
    every header field that `_strip_top_via` makes is not needed."""
    response.headers.remove_first_value("Via")
    return response


# -- per-request state ----------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Branch:
    """One forked client transaction (§16.6)."""

    key: str
    request: Request
    destination: Address
    transport: TransportName
    contact: str
    tx: ClientTransaction | None = None
    provisional: bool = False
    final: int | None = None
    response: Response | None = None  # the final response, our Via stripped (None if synthetic)
    cancel_wanted: bool = False
    cancel_sent: bool = False
    peer: PeerAddress | None = None  # a trunk attempt's peer address (trunk_calls.py)
    cseq_shift: int = 0  # added to the caller's CSeq on this branch (a resend with credentials)
    responded: bool = False  # any response arrived, even 100
    abandoned: bool = False  # a trunk attempt given up for silence (it may be revived: trunk_calls.py)


@dataclass(eq=False)
class _InviteContext:
    """The response context of one INVITE server transaction (§16.7)."""

    ctx: RequestContext
    call_id: str
    caller: str
    callee: str
    from_tag: str
    recorded: bool = False  # our CallStarted applied: later call events are proposed
    # The parallel path (a new local call): the fork left while CallStarted commits. `start` resolves once
    # that commit is decided (True: recorded; False: failed, or settled by another node); until then the
    # provisional responses for the caller wait in `held` (at most MAX_HELD) and a 2xx or a final response
    # waits for it before its own commit.
    start: asyncio.Future[bool] | None = None
    held: list[Response] = field(default_factory=list)
    start_failed: bool = False  # CallStarted not committed: nothing is forwarded upstream but the 503
    branches: list[_Branch] = field(default_factory=list)
    forked: bool = False
    answered: bool = False  # a 2xx was forwarded
    answer_pending: bool = False  # CallAnswered in flight
    final_pending: bool = False  # CallEnded in flight before the final response
    finished: bool = False  # a final response went upstream
    cancelled: bool = False
    timed_out: bool = False
    ringing_at: float | None = None  # first 18x seen (wall clock)
    ringing_proposed: bool = False
    ringing_timer: asyncio.TimerHandle | None = None
    timer_c: asyncio.TimerHandle | None = None
    timer_c_at: float = 0.0  # loop time when Timer C expires; a reset moves only this (`_arm_timer_c`)
    guard: asyncio.TimerHandle | None = None
    trunk: TrunkCall | None = None  # an outbound call through a trunk: its peer attempts

    @property
    def ist(self) -> ServerTransaction | None:
        return self.ctx.transaction


@dataclass(eq=False)
class _Relay:
    """One in-dialog request forwarded statefully to a single next hop."""

    ctx: RequestContext
    request: Request
    destination: Address
    transport: TransportName
    tx: ClientTransaction | None = None
    provisional: bool = False
    cancel_wanted: bool = False
    cancel_sent: bool = False
    finished: bool = False
    hold: asyncio.Future[Any] | None = None  # the BYE's CallEnded decided: relay the final after it
    cseq_shift: int = 0  # CSeq offset towards a trunk peer that challenged the INVITE (trunk_calls.py)


class Proxy:
    """The node's stateful proxy; see the module docstring. Build after `SipNode`, `start()` after it."""

    def __init__(
        self, node: SipNode, replicator: Any = None, *, settings: CallSettings | None = None,
        trunks: Any = None, attempt_timeout: float | None = None,
    ) -> None:
        """`trunks`: the node's `TrunkPinger` (peer health for the choice of a trunk peer, and the proxy's
        reports of failed attempts), or None; `attempt_timeout`: seconds without any response before the
        next trunk peer (default `cfg.trunk_attempt_timeout`, else 2 s)."""
        self.node = node
        self.replicator = replicator
        self.recorder = CallRecorder(node, settings)
        self.settings = self.recorder.settings
        self.recorder.on_timeout = self._send_timeout_byes
        if attempt_timeout is None:
            attempt_timeout = float(getattr(node.cfg, "trunk_attempt_timeout", DEFAULT_ATTEMPT_TIMEOUT))
        self.trunk_calls = TrunkCalls(self, trunks, attempt_timeout)
        self.forwarded = 0
        self.stray_forwarded = 0
        self.loops = 0
        self._contexts: dict[int, _InviteContext | _Relay] = {}  # id(server transaction) -> context
        self._own: set[Address] = set()
        listen = node.cfg.sip.listen
        self.local: Address = (listen.host, listen.port)
        service = node.cfg.service_address
        self.service_mode = service_mode(node.cfg)
        # The cluster's address (Contract C): named in Record-Route, and the sent-by of what we forward for
        # requests that arrived on it. None in mode none (clients use node addresses or DNS SRV).
        self.service: Address | None = (
            (service.host, service.port) if service is not None and self.service_mode != "none" else None
        )
        self._own.add(self.local)
        if service is not None:
            self._own.add((service.host, service.port))  # a Route naming it is ours whatever the mode
        self._awaiting: dict[str, _InviteContext] = {}  # call id -> retransmitted INVITE waiting for a 2xx
        self._stray_pending: set[tuple[str, int]] = set()  # (call id, status class) being committed
        node.register("INVITE", self._on_invite)
        node.register("CANCEL", self._on_cancel)
        node.add_prerouter(self._preroute)
        node.on_stray_response(self._on_stray_response)

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Learn the addresses the endpoint bound; start following leadership for the timeout job."""
        for address in (self.node.endpoint.udp_address, self.node.endpoint.tcp_address):
            if address is not None:
                self._own.add((address[0], address[1]))
                if self.local[1] == 0:  # listening on an ephemeral port (tests)
                    self.local = (address[0], address[1])
        if self.replicator is not None:
            self.recorder.start(self.replicator)

    async def aclose(self) -> None:
        for context in list(self._contexts.values()):
            if isinstance(context, _InviteContext):
                self._stop_timers(context)
                if context.trunk is not None and context.trunk.resolving is not None:
                    context.trunk.resolving.cancel()
                if context.ringing_timer is not None:
                    context.ringing_timer.cancel()
        self._contexts.clear()
        await self.recorder.aclose()

    # -- addresses ------------------------------------------------------------------------------------
    def is_ours(self, uri: object) -> bool:
        """True for a SIP URI naming this node or the service address."""
        if not isinstance(uri, SipUri):
            return False
        port = uri.port if uri.port is not None else DEFAULT_PORT
        return (strip_brackets(uri.host), port) in self._own

    def _via_is_ours(self, via: Via) -> bool:
        port = via.port if via.port is not None else DEFAULT_PORT
        return (strip_brackets(via.host), port) in self._own

    def record_route_address(self) -> Address:
        """The address our Record-Route names: the service address unless the mode is none (Contract C).

        No probing: the service address follows the leader (raftpbx/service_address.py), so an in-dialog
        request sent to it reaches whichever node leads when it is sent, and every node routes it from the
        replicated dialog state. In mode none, this node's own SIP address.
        """
        return self.service if self.service is not None else self.local

    def sent_by(self, flow: Flow | None) -> Address:
        """The sent-by of our Via on what we forward for a request (or response) that came in on `flow`.

        A request that arrived on the service address is forwarded with the service address as sent-by,
        so that the responses and retransmissions from downstream follow the address to the next leader,
        and a retransmission of the request at that leader continues the same downstream transaction
        (same branch, same sent-by; RFC 3261 §17.2.3 matching). The endpoint sends such a request from the
        service listener (Contract A). Anything else keeps this node's own address.
        """
        if self.service is not None and flow is not None and _same_address(flow.local, self.service):
            return self.service
        return self.local

    def _pinned(self, inbound: Flow | None, outbound: TransportName, path: tuple[str, ...]) -> bool:
        """True when a dialog must stay on this node: the caller's TCP connection reached this node's own
        address, or the callee is reached over a TCP connection with no Path (not an RFC 5626 flow). Such a
        phone is reachable only over its connection to this node, so no other node (the service address's
        holder) could relay its in-dialog requests; the dialog lives and dies with this node."""
        if inbound is not None and inbound.transport != "udp" and self.sent_by(inbound) != self.service:
            return True
        return outbound != "udp" and not path

    def _record_route(self, transport: TransportName, address: Address | None = None, params: str = "") -> str:
        host, port = address if address is not None else self.record_route_address()
        host = f"[{host}]" if ":" in host else host
        param = ";transport=tcp" if transport == "tcp" else ""
        return f"<sip:{host}:{port}{param};lr{params}>"

    def _via(self, transport: TransportName, branch: str, sent_by: Address | None = None) -> str:
        host, port = sent_by if sent_by is not None else self.local
        host = f"[{host}]" if ":" in host else host
        return f"SIP/2.0/{transport.upper()} {host}:{port};branch={branch};rport"

    # -- §16.4 route pre-processing ------------------------------------------------------------------
    def _strip_own_routes(self, request: Request) -> bool:
        """Remove Route values naming us from the top (two with RFC 5658 double record-routing) and undo a
        strict router's rewrite; True if any Route named us."""
        routed = False
        routes = request.routes
        if routes and self.is_ours(request.request_uri) and not getattr(request.request_uri, "user", None):
            # §16.4: a strict router put our Record-Route in the Request-URI: the last Route is the target.
            request.uri = str(routes[-1].uri)
            values = request.headers.get_all("Route")
            request.headers.remove("Route")
            for value in values[:-1]:
                request.headers.add("Route", value)
            routed = True
        for _ in range(4):
            routes = request.routes
            if not routes or not self.is_ours(routes[0].uri):
                break
            request.headers.remove_first_value("Route")
            routed = True
        return routed

    def _next_hop(self, request: Request) -> tuple[Address, TransportName] | None:
        routes = request.routes
        uri = routes[0].uri if routes else request.request_uri
        if not isinstance(uri, SipUri):
            return None
        return _uri_target(uri)

    # -- INVITE (§16.3-§16.6) --------------------------------------------------------------------------
    async def _on_invite(self, ctx: RequestContext) -> None:
        request = ctx.request
        if request.to_tag is not None:  # in-dialog re-INVITE not routed through us (pre-router passed it)
            ctx.reply(481)
            return
        if not isinstance(request.request_uri, SipUri):
            ctx.reply(416)  # §16.3 step 2: Unsupported URI Scheme
            return
        max_forwards = request.max_forwards
        if max_forwards == 0:
            ctx.reply(483)  # §16.3 step 3
            return
        if self._unsupported_proxy_require(ctx):
            return
        looped = loop_hash(request)
        for via in request.vias:
            if self._via_is_ours(via) and (via.branch or "").endswith("." + looped):
                self.loops += 1
                ctx.reply(482)  # §16.3 step 4
                return
        # Issue 9: a request from a trunk peer's allow-listed source address (the packet's, never a header)
        # is accepted without a challenge, and may only reach local extensions.
        inbound = self.trunk_calls.inbound(ctx)
        if inbound is None:
            auth = ctx.authenticate(proxy=True)
            if not auth.ok or auth.extension is None:
                ctx.challenge(proxy=True, stale=auth.stale)  # §22.3
                return
            caller = auth.extension
        else:
            caller = caller_of(request)
        forwarded = request.copy()
        self._strip_own_routes(forwarded)
        self._consume_credentials(forwarded, verified=inbound is None)
        target = forwarded.request_uri
        callee = target.user if isinstance(target, SipUri) else None
        call_id, from_tag = request.call_id, request.from_tag or ""
        contacts = request.contacts
        caller_contact = str(contacts[0].uri) if contacts else ""
        branch = request.branch or ""
        now = ctx.now
        known, bindings, match = self._lookup(callee, inbound is None, now)
        # Read barrier of the negative lookup: a phone that registered through another node a moment ago has
        # its binding committed there (its 200 went out) but maybe not yet applied here.
        if match is None and (not known or not bindings) and await apply_leader_commits(
            self.replicator, min(self.node.cfg.proposal_timeout, LOOKUP_CATCH_UP)
        ):
            known, bindings, match = self._lookup(callee, inbound is None, now)
        trunk_name, direction = (inbound.name, "inbound") if inbound is not None else ("", "")
        if match is not None:
            trunk_name, direction = match.trunk.name, "outbound"
        elif not known or not bindings:
            status = 404 if not known else 480
            recorded = await self.recorder.unrouted(
                call_id=call_id, caller=caller, callee=(callee or request.uri)[:256], from_tag=from_tag,
                caller_contact=caller_contact, branch=branch, status_code=status, at=now,
                trunk=trunk_name, direction=direction,
            )
            if not recorded:
                ctx.reply(503, headers=[("Retry-After", "2")])
                return
            ctx.reply(status)
            return
        ist = ctx.transaction
        if ist is None:
            return
        context = _InviteContext(ctx, call_id, caller, callee or "", from_tag)
        if match is not None:
            context.trunk = TrunkCall(match.trunk, match.number)
        self._contexts[id(ist)] = context
        self.node.watch(ist, lambda event: self._on_server_event(ist, event))
        started = self.recorder.started(
            call_id=call_id, caller=caller, callee=callee or "", from_tag=from_tag,
            caller_contact=caller_contact, branch=branch, at=now, trunk=trunk_name, direction=direction,
        )
        if context.trunk is None and self.recorder.record(call_id) is None and self._caught_up():
            await self._fork_while_starting(context, started, forwarded, bindings, max_forwards, looped)
            return
        outcome = await started
        if outcome is None:
            self._finish(context, 503, None, headers=[("Retry-After", "2")], record=False)
            return
        first = outcome.first if isinstance(outcome, Duplicate) else outcome
        context.recorded = not isinstance(first, Rejected)
        if isinstance(outcome, Duplicate) and self._settled_elsewhere(context):
            return
        if context.cancelled:
            self._finish(context, 487, None)
            return
        if context.trunk is not None:
            self.trunk_calls.fork(context, forwarded, max_forwards, looped)
        else:
            self._fork(context, forwarded, bindings, max_forwards, looped)
        if not (context.finished or context.final_pending):
            # §16.2 100 Trying, only now that the INVITE went downstream: a caller that got no provisional
            # response keeps retransmitting its INVITE (§17.1.1.2), so if this node dies between the commit
            # and the fork, the retransmission reaches the next leader, which forks it (Contract C).
            ctx.reply(100)

    async def _fork_while_starting(
        self, context: _InviteContext, started: Any, forwarded: Request, bindings: list[Binding],
        max_forwards: int | None, looped: str,
    ) -> None:
        """A new local call: fork at once while CallStarted commits (one commit less on the setup path).

        Taken only for a call id this node does not know (a retransmission whose call another node started
        takes the path that commits first and then decides), on a node that has caught up with its
        leader's log. What waits for the commit: the 100 Trying and every provisional response for the
        caller (held, then sent in order), so the caller keeps retransmitting its INVITE until the call is
        on a quorum (a node that dies before that leaves the call to the next leader, which forks it again
        with the same derived branches); the 2xx (CallAnswered is proposed only once CallStarted is
        committed, then the 2xx goes up after that second commit); and any final response (CallEnded after
        CallStarted). A retransmission of the INVITE is absorbed by the server transaction (§17.2.1), so
        it never forks twice. If the commit fails: every branch is CANCELled (§9.1: at once when it had a
        provisional response, else when one arrives), a 2xx from the callee is not forwarded (the callee
        ends its unacknowledged dialog, §13.3.1.4), the caller gets 503 with Retry-After, and a best-effort
        `CallEnded(failure, 503)` follows under the call's deterministic op_id (a timed-out proposal may
        have committed after all; otherwise it is refused as unknown; either way one record at most).
        """
        loop = asyncio.get_running_loop()
        start: asyncio.Future[bool] = loop.create_future()
        context.start = start
        try:
            self._fork(context, forwarded, bindings, max_forwards, looped)
            outcome = await started  # proposed now, while the branches' INVITEs are on their way
        except BaseException:
            started.close()  # the fork raised before the proposal started (no-op once it ran)
            context.start_failed = True  # cancelled (shutdown) or the fork raised: nothing waits forever
            start.set_result(False)
            raise
        if outcome is None:
            start.set_result(False)
            self._start_failed(context)
            return
        first = outcome.first if isinstance(outcome, Duplicate) else outcome
        if isinstance(outcome, Duplicate) and self._settled(context.call_id):
            # Another node started this call meanwhile, and it was answered or ended there.
            context.recorded = False
            context.held.clear()
            self._drop_branches(context, "settled elsewhere")
            start.set_result(False)
            if not (context.finished or context.final_pending):
                self._settled_elsewhere(context)
            return
        context.recorded = not isinstance(first, Rejected)
        start.set_result(True)
        if context.finished or context.final_pending:
            context.held.clear()
            return  # a final response (CANCEL, all branches failed) was waiting for the commit
        held, context.held = context.held, []
        if not held:
            context.ctx.reply(100)  # §16.2
        # else the held provisional responses go up at once, and the first of them stops the caller's INVITE
        # retransmissions as a 100 would (§17.1.1.2): a 100 right before it would be one more message to
        # build and send on every call with a ringing (or already answering) callee, saying nothing more
        # (§17.2.1: no 100 is needed when the TU sends a provisional response itself).
        for response in held:
            context.ctx.send(response)
        if (context.ringing_at is not None and not context.ringing_proposed and context.ringing_timer is None
                and not context.answer_pending):
            context.ringing_timer = loop.call_later(RINGING_LINGER, self._propose_ringing, context)

    def _start_failed(self, context: _InviteContext) -> None:
        """CallStarted was not committed while the fork ran: CANCEL downstream, 503 upstream."""
        log.warning("proxy.start_failed", call_id=context.call_id)
        context.start_failed = True
        context.held.clear()
        if context.ringing_timer is not None:
            context.ringing_timer.cancel()
            context.ringing_timer = None
        for branch in context.branches:
            self._cancel_branch(context, branch)
        self._finish(context, 503, None, headers=[("Retry-After", "2")], record=False)
        self.recorder.spawn(self.recorder.ended(
            context.call_id, cause="failure", hangup_by="system", status_code=503, at=self.node.now()))

    def _drop_branches(self, context: _InviteContext, reason: str) -> None:
        """Forget our branch transactions without CANCELling them (another node owns the call now)."""
        now = asyncio.get_running_loop().time()
        for branch in context.branches:
            if branch.final is None:
                branch.final = 408
            if branch.tx is not None and not branch.tx.terminated:
                self.node.endpoint.core.transport_error(branch.tx, now, reason)
        self._stop_timers(context)

    def _settled_elsewhere(self, context: _InviteContext) -> bool:
        """A retransmitted INVITE whose call another node (a dead leader) already started (Contract C).

        Still ringing: False, and the caller forks again with the same derived branches and sent-by, so
        every callee sees a retransmission of the INVITE it is ringing for (RFC 3261 §17.2.3) and resends
        its last response to us. Already answered: no fork (the callee's INVITE transaction is over); the
        context waits for the callee's 2xx retransmission (`_awaiting`), which reaches us as a stray
        response and goes upstream through this transaction. Already ended: the recorded final status.
        """
        call = self.recorder.record(context.call_id)
        if call is None or (call.answered_at is None and call.ended_at is None):
            return False
        context.recorded = False  # nothing left to record from this transaction
        context.forked = True
        if call.answered_at is not None:
            context.ctx.reply(100)
            self._awaiting[context.call_id] = context
            self._arm_timer_c(context)  # bounded: Timer C ends the wait (408 upstream, nothing recorded)
            return True
        status = call.status_code if call.status_code >= 300 else 500
        self._finish(context, status, None, record=False)
        return True

    def _unsupported_proxy_require(self, ctx: RequestContext) -> bool:
        """§16.3 step 5: we support no option tags, so any Proxy-Require gets 420 listing them."""
        required = ctx.request.headers.get_all("Proxy-Require")
        if not required:
            return False
        ctx.reply(420, headers=[("Unsupported", ", ".join(required))])
        return True

    def _consume_credentials(self, request: Request, *, verified: bool = False) -> None:
        """Remove the Proxy-Authorization values for our realm (we consumed them, §22.3). `verified`: the
        request passed our digest check, so a lone value is the one that named our realm (no parse)."""
        values = request.headers.values("Proxy-Authorization")
        if not values:
            return
        if verified and len(values) == 1:
            request.headers.remove("Proxy-Authorization")
            return
        keep = []
        for value in values:
            try:
                ours = parse_authorization(value).realm == self.node.realm
            except SipParseError:
                ours = False
            if not ours:
                keep.append(value)
        request.headers.remove("Proxy-Authorization")
        for value in keep:
            request.headers.add("Proxy-Authorization", value)

    def _fork(
        self, context: _InviteContext, base: Request, bindings: list[Binding], max_forwards: int | None,
        looped: str,
    ) -> None:
        ist = context.ist
        assert ist is not None
        inbound: TransportName = context.ctx.transport
        sent_by = self.sent_by(context.ctx.flow)
        key_parts = [str(part) for part in ist.key]
        last = len(bindings) - 1
        for i, binding in enumerate(bindings):
            target = self._binding_target(binding)
            if target is None:
                log.info("proxy.binding_skipped", aor=binding.aor, key=binding.key, transport=binding.transport)
                continue
            uri, destination, transport, path = target
            request = base if i == last else base.copy()  # `base` is ours (a copy) and not used after
            request.uri = uri
            headers = request.headers
            headers.set("Max-Forwards", str((max_forwards if max_forwards is not None else DEFAULT_MAX_FORWARDS + 1) - 1))
            # Record-Route (§16.6 step 4; RFC 5658 double record-routing when the transports differ):
            # the callee's route set starts with the value facing it, the caller's with the one facing it.
            rr = self.local if self._pinned(context.ctx.flow, transport, path) else None
            if inbound != transport:
                headers.add("Record-Route", self._record_route(inbound, rr), first=True)
            headers.add("Record-Route", self._record_route(transport, rr), first=True)
            for value in reversed(path):  # RFC 3327: the Path is the route to the contact
                headers.add("Route", value, first=True)
            branch_id = derive_branch("fork", *key_parts, binding.key) + "." + looped
            headers.add("Via", self._via(transport, branch_id, sent_by), first=True)
            context.branches.append(_Branch(binding.key, request, destination, transport, binding.contact))
        context.forked = True
        if not context.branches:
            self._finish(context, 480, None)
            return
        for branch in list(context.branches):
            self._start_branch(context, branch)
        self._arm_timer_c(context)

    def _binding_target(
        self, binding: Binding
    ) -> tuple[str, Address, TransportName, tuple[str, ...]] | None:
        uri = _parse_contact_uri(binding.contact)
        if uri is None:
            return None
        reached = _uri_target(uri)
        if reached is None:
            return None
        destination, transport = reached
        if binding.transport:
            flow_transport = TRANSPORTS.get(binding.transport.lower())
            if flow_transport is None:
                return None
            transport = flow_transport
        path = tuple(binding.path)
        if path:
            first = _parse_contact_uri(path[0])
            hop = _uri_target(first) if first is not None else None
            if hop is None:
                return None
            destination, transport = hop
        elif binding.received:
            received = _parse_host_port(binding.received)
            if received is not None:
                destination = received  # RFC 3581: where the REGISTER came from (NAT, TCP flow)
        return str(uri), destination, transport, path

    @staticmethod
    def _new_branch(key: str, request: Request, destination: Address, transport: TransportName,
                    peer: PeerAddress, cseq_shift: int) -> _Branch:
        """A trunk attempt's branch (trunk_calls.py builds the request)."""
        return _Branch(key, request, destination, transport, request.uri, peer=peer, cseq_shift=cseq_shift)

    def _start_branch(self, context: _InviteContext, branch: _Branch) -> None:
        try:
            branch.tx = self.node.send_request(
                branch.request, branch.destination, transport=branch.transport,
                on_event=lambda event: self._on_branch_event(context, branch, event),
            )
            self.forwarded += 1
        except (SipError, SendFailure) as exc:
            log.warning("proxy.fork_failed", call_id=context.call_id, error=str(exc))
            self._branch_final(context, branch, 480, None)

    # -- responses on a branch (§16.7) ------------------------------------------------------------------
    def _on_branch_event(self, context: _InviteContext, branch: _Branch, event: Event) -> None:
        if isinstance(event, ResponseReceived):
            if not branch.responded:
                branch.responded = True
                self.trunk_calls.responded(context, branch)
            self._on_branch_response(context, branch, event.response, event.retransmission)
        elif isinstance(event, TimedOut):
            self._branch_final(context, branch, 408, None)  # timer B
        elif isinstance(event, TransportError):
            self._branch_final(context, branch, 480, None)  # unreachable contact (deviation: not 503)

    def _on_branch_response(
        self, context: _InviteContext, branch: _Branch, response: Response, retransmission: bool
    ) -> None:
        status = response.status
        if status == 100:
            return  # §16.7 step 3: 100 is not forwarded
        upstream = _pop_top_via(response)
        shift_cseq(upstream, -branch.cseq_shift)  # a trunk INVITE resent with credentials (trunk_calls.py)
        if status < 200:
            if branch.cancel_wanted and not branch.cancel_sent and not self.trunk_calls.revive(context, branch):
                branch.provisional = True
                self._send_cancel(context, branch)
                return
            branch.provisional = True
            if context.finished or context.cancelled or context.timed_out:
                return
            self._arm_timer_c(context)  # §16.7 step 2: a provisional response resets Timer C
            if 180 <= status <= 183 and context.ringing_at is None:
                # CallRinging lingers: an answer (or end) arriving meanwhile carries it in the same entry. While
                # CallStarted is in flight no timer is armed: CallRinging is proposed only after it, and the
                # commit's continuation (`_fork_while_starting`) arms the linger unless an answer came first.
                context.ringing_at = self.node.now()
                if context.recorded:
                    context.ringing_timer = asyncio.get_running_loop().call_later(
                        RINGING_LINGER, self._propose_ringing, context)
            if context.start is not None and not context.start.done():
                if len(context.held) < MAX_HELD:
                    context.held.append(upstream)  # goes up once CallStarted is committed
                return
            context.ctx.send(upstream)
            return
        if status < 300:
            branch.final = branch.final or status
            if context.start_failed:
                log.info("proxy.answer_unrecorded", call_id=context.call_id)
                return  # no record of the call: its 2xx is not forwarded (the callee ends the dialog)
            if context.answered:
                self._forward_2xx(context, upstream)  # RFC 6026: every 2xx goes upstream
                return
            if context.answer_pending:
                return  # the callee retransmits; we forward once CallAnswered is committed
            context.answer_pending = True
            start = context.start
            if start is not None and not start.done():  # CallAnswered only after CallStarted is committed
                start.add_done_callback(lambda _: _logged(self._answer, context, branch, upstream))
            else:
                self._answer(context, branch, upstream)
            return
        self._branch_final(context, branch, status, upstream)

    def _propose_ringing(self, context: _InviteContext) -> None:
        context.ringing_timer = None
        if context.ringing_proposed or context.ringing_at is None or context.answer_pending or context.final_pending:
            return
        if not context.recorded:
            return  # CallStarted still in flight (proposed after it), failed, or not ours
        context.ringing_proposed = True
        self.recorder.spawn(self.recorder.ringing(context.call_id, context.ringing_at))

    def _unproposed_ringing(self, context: _InviteContext) -> float | None:
        """The ringing time to carry with the next call event, if CallRinging was not proposed yet."""
        if context.ringing_timer is not None:
            context.ringing_timer.cancel()
            context.ringing_timer = None
        if context.ringing_proposed or context.ringing_at is None:
            return None
        context.ringing_proposed = True
        return context.ringing_at

    def _answer(self, context: _InviteContext, branch: _Branch, response: Response) -> None:
        """The first 2xx, once CallStarted is decided: commit CallAnswered (with CallRinging if not proposed
        yet), then forward (`_answered`). Continued in callbacks, not a task: the call's commit-before-reply
        order is the same (the 2xx goes up only from the commit's callback)."""
        if context.start_failed:
            context.answer_pending = False
            log.info("proxy.answer_unrecorded", call_id=context.call_id)
            return  # CallStarted failed: never forward a 2xx without its record (503 went upstream)
        if not context.recorded:
            self._answered(context, branch, response)
            return
        now = self.node.now()
        expires = session_expires(response)
        contacts = response.contacts if "Contact" in response.headers else ()
        ringing_at = self._unproposed_ringing(context)
        expires_at = now + expires if expires is not None else None

        def committed(outcome: object) -> None:
            if outcome is None:  # not committed: the next retransmission tries again
                if ringing_at is not None:
                    context.ringing_proposed = False  # the retry carries it again
                context.answer_pending = False
                return
            self.recorder.poke(self.recorder.answer_due(now, expires_at))
            self._answered(context, branch, response)

        self.recorder.answered_then(
            context.ctx, context.call_id, to_tag=response.to_tag or "",
            callee_contact=str(contacts[0].uri) if contacts else "",
            session_expires_at=expires_at, at=now, ringing_at=ringing_at, then=committed,
        )

    def _answered(self, context: _InviteContext, branch: _Branch, response: Response) -> None:
        """CallAnswered committed (or nothing to record): the 2xx goes up, the other branches are CANCELled."""
        context.answer_pending = False
        context.answered = True
        context.finished = True
        self._stop_timers(context)
        self._forward_2xx(context, response)
        for other in context.branches:  # §16.7 step 10
            if other is not branch and other.final is None:
                self._cancel_branch(context, other)

    def _forward_2xx(self, context: _InviteContext, response: Response) -> None:
        if context.ctx.send(response):
            return
        self._send_stateless_response(response)  # the server transaction is gone (timer L)

    def _branch_final(self, context: _InviteContext, branch: _Branch, status: int, response: Response | None) -> None:
        if branch.final is not None:
            return
        branch.final = status
        branch.response = response
        if context.finished:
            return
        if self.trunk_calls.branch_final(context, branch, status, response):
            return  # the next trunk peer, or the same one with credentials
        if status >= 600:  # §16.7 step 5: a 6xx ends the search
            for other in context.branches:
                if other is not branch and other.final is None:
                    self._cancel_branch(context, other)
        self._maybe_finish(context)

    def _maybe_finish(self, context: _InviteContext) -> None:
        if context.finished or context.final_pending or context.answer_pending or context.answered:
            return
        if not context.forked or any(b.final is None for b in context.branches):
            return
        if context.cancelled:
            response = next((b.response for b in context.branches if b.final == 487 and b.response), None)
            self._finish(context, 487, response)
            return
        if context.timed_out:
            self._finish(context, 408, None)
            return
        if context.trunk is not None:
            status, response, headers = self.trunk_calls.final_choice(context)
            self._finish(context, status, response, headers=headers)
            return
        six = [b for b in context.branches if b.final is not None and b.final >= 600]
        ordered = six or context.branches
        chosen = best_response(b.final for b in ordered if b.final is not None)
        status = chosen if chosen is not None else 408
        response = next((b.response for b in ordered if b.final == status), None)
        if status == 503:
            status, response = 500, None  # §16.7 step 6
        self._finish(context, status, response)

    def _finish(
        self, context: _InviteContext, status: int, response: Response | None, *,
        headers: Iterable[tuple[str, str]] = (), record: bool = True,
    ) -> None:
        """Commit CallEnded, then send the final response upstream (exactly once)."""
        if context.finished or context.final_pending:
            return
        context.final_pending = True
        self._stop_timers(context)
        cause = "cancel" if context.cancelled else "timeout" if context.timed_out else "failure"
        hangup_by = "caller" if context.cancelled else "system"

        ringing_at = self._unproposed_ringing(context)

        async def run() -> None:
            if context.start is not None:
                await _outcome(context.start)  # CallStarted first (parallel fork), then CallEnded
            if record and context.recorded and not (context.timed_out and self._settled(context.call_id)):
                await self.recorder.ended(
                    context.call_id, cause=cause, hangup_by=hangup_by, status_code=status, at=self.node.now(),
                    ringing_at=ringing_at,
                )  # failures are logged; the caller still gets its answer (the leader's job ends the call)
            context.finished = True
            context.final_pending = False
            if response is not None:
                context.ctx.send(response)
            else:
                context.ctx.reply(status, headers=headers)

        self.recorder.spawn(run())

    # -- CANCEL, Timer C -------------------------------------------------------------------------------
    def _send_cancel(self, context: _InviteContext | None, branch: _Branch | _Relay) -> None:
        branch.cancel_sent = True
        try:
            self.node.send_request(build_cancel(branch.request), branch.destination, transport=branch.transport,
                                   on_event=lambda event: None)
        except (SipError, SendFailure) as exc:
            log.info("proxy.cancel_failed", error=str(exc))

    def _cancel_branch(self, context: _InviteContext, branch: _Branch) -> None:
        """§9.1 / §16.10: CANCEL a pending branch; one without a provisional response is cancelled when its
        first provisional arrives, and given up (for the response choice) at once."""
        if branch.final is not None or branch.cancel_sent:
            return
        branch.cancel_wanted = True
        if branch.provisional:
            self._send_cancel(context, branch)
            self._arm_guard(context)
        else:
            branch.final = 408  # given up: never answered anything
            branch.response = None

    def _on_cancel(self, ctx: RequestContext) -> None:
        target = self.node.endpoint.core.find_cancel_target(ctx.request)
        if target is None:
            if not self._cancel_orphan(ctx):
                ctx.reply(481)  # §9.2
            return
        ctx.reply(200)  # §16.10
        context = self._contexts.get(id(target))
        if isinstance(context, _Relay):
            if context.ctx.transaction is target and not context.finished:
                context.cancel_wanted = True
                if context.provisional and not context.cancel_sent:
                    self._send_cancel(None, context)
            return
        if context is None or context.ist is not target or context.finished or context.answered:
            return
        if context.answer_pending:
            return  # a 2xx is being committed: the CANCEL has no effect (§9.2)
        context.cancelled = True
        for branch in context.branches:
            self._cancel_branch(context, branch)
        self._maybe_finish(context)

    def _cancel_orphan(self, ctx: RequestContext) -> bool:
        """§16.10: a CANCEL with no response context here, for a call a dead leader forked (the service address
        moved while the callee rang). The replicated state has the call, not answered nor ended, with the
        caller's INVITE branch and From tag; the dead leader's fork branches derive from the INVITE's server
        transaction key (the CANCEL's with method INVITE, §9.2) and loop hash (the CANCEL's: same Request-URI,
        tags, Call-ID and CSeq number, §9.1), and its Via sent-by is the service address the CANCEL came to.
        So we answer 200 and CANCEL each current binding of the callee on the branch the dead leader used;
        the callee's 487 comes back as a stray final response (recorded: cancelled by the caller, forwarded).
        Local forks only (an outbound trunk call's branch depends on which peer attempt rang): False, and
        the caller gets 481 as before."""
        request = ctx.request
        call = self.recorder.record(request.call_id)
        if call is None or call.answered_at is not None or call.ended_at is not None or call.direction == "outbound":
            return False
        if not call.branch or call.branch != request.branch or call.from_tag != (request.from_tag or ""):
            return False
        try:
            key_parts = [str(part) for part in server_key(request, method="INVITE")]
        except SipParseError:
            return False
        looped = loop_hash(request)
        machine = self.node.machine
        with machine.lock:
            bindings = current_bindings(machine.state, call.callee, ctx.now)
        ctx.reply(200)  # §16.10
        base = request.copy()
        self._strip_own_routes(base)
        sent_by = self.sent_by(ctx.flow)
        sent = 0
        for binding in bindings:
            target = self._binding_target(binding)
            if target is None:
                continue
            uri, destination, transport, path = target
            fork = base.copy()  # the INVITE as the dead leader forked it, as far as build_cancel needs it
            fork.uri = uri
            for value in reversed(path):
                fork.headers.add("Route", value, first=True)
            branch_id = derive_branch("fork", *key_parts, binding.key) + "." + looped
            fork.headers.add("Via", self._via(transport, branch_id, sent_by), first=True)
            try:
                self.node.send_request(build_cancel(fork), destination, transport=transport,
                                       on_event=lambda event: None)
                sent += 1
            except (SipError, SendFailure) as exc:
                log.info("proxy.cancel_failed", error=str(exc))
        log.info("proxy.orphan_cancel", call_id=call.call_id, branches=sent)
        return True

    def _arm_timer_c(self, context: _InviteContext) -> None:
        """Start or reset Timer C (§16.6 step 11, §16.7 step 2). A reset only moves the deadline: the armed
        handle, when it fires early, arms itself again for the rest (one timer per call instead of a cancel
        and a new timer on every provisional response)."""
        loop = asyncio.get_running_loop()
        context.timer_c_at = loop.time() + self.settings.timer_c
        if context.timer_c is None:
            context.timer_c = loop.call_at(context.timer_c_at, self._timer_c_fired, context)

    def _timer_c_fired(self, context: _InviteContext) -> None:
        context.timer_c = None
        loop = asyncio.get_running_loop()
        if loop.time() < context.timer_c_at:  # reset meanwhile: wait for the rest
            context.timer_c = loop.call_at(context.timer_c_at, self._timer_c_fired, context)
            return
        if context.finished or context.answered or context.answer_pending:
            return
        if context.recorded and self._settled(context.call_id):
            self._abandon(context)
            return
        log.info("proxy.timer_c", call_id=context.call_id)
        context.timed_out = True
        for branch in context.branches:
            self._cancel_branch(context, branch)
        self._maybe_finish(context)

    def _settled(self, call_id: str) -> bool:
        """The replicated state says the call was answered or ended (by this node or another)."""
        call = self.recorder.record(call_id)
        return call is not None and (call.answered_at is not None or call.ended_at is not None)

    def _abandon(self, context: _InviteContext) -> None:
        """Timer C on a node whose call was settled by another one: the leadership (and the service address,
        hence the callee's responses) moved while it rang, and the next leader committed the answer or the
        end (stray responses). Nothing is cancelled or recorded; our branches' transactions are dropped
        and our server transaction is closed with a 408 that the caller, holding its real final response
        by now, absorbs (§17.1.1.2)."""
        log.info("proxy.settled_elsewhere", call_id=context.call_id)
        self._drop_branches(context, "settled elsewhere")
        self._finish(context, 408, None, record=False)

    def _arm_guard(self, context: _InviteContext) -> None:
        if context.guard is not None:
            return
        timeout = self.node.endpoint.core.timers.timeout
        context.guard = asyncio.get_running_loop().call_later(timeout, self._guard_fired, context)

    def _guard_fired(self, context: _InviteContext) -> None:
        """A cancelled branch never answered its CANCEL within 64*T1: give it up."""
        context.guard = None
        for branch in context.branches:
            if branch.final is None:
                branch.final = 408
        self._maybe_finish(context)

    def _stop_timers(self, context: _InviteContext) -> None:
        for handle in (context.timer_c, context.guard):
            if handle is not None:
                handle.cancel()
        context.timer_c = context.guard = None
        self.trunk_calls.stop(context)

    def _on_server_event(self, ist: ServerTransaction, event: Event) -> None:
        if isinstance(event, Terminated) and self._contexts.get(id(ist)) is not None:
            context = self._contexts[id(ist)]
            if context.ctx.transaction is ist:
                del self._contexts[id(ist)]
                if isinstance(context, _InviteContext) and self._awaiting.get(context.call_id) is context:
                    del self._awaiting[context.call_id]

    # -- in-dialog requests (§16.4) --------------------------------------------------------------------
    def _preroute(self, ctx: RequestContext) -> bool:
        request = ctx.request
        method = request.method
        if method in ("CANCEL", "REGISTER") or request.to_tag is None:
            return False
        request = request.copy()  # the server transaction keeps the request as received
        shift = self._route_cseq_shift(request)
        routed = self._strip_own_routes(request)
        if method == "ACK":
            if routed:
                shift_request(request, shift)
                self._forward_ack(request, ctx.flow)
            return True
        if not routed:
            ctx.reply(481)  # not a dialog we record-routed: never an open relay
            return True
        if request.max_forwards == 0:
            ctx.reply(483)
            return True
        if self._unsupported_proxy_require(ctx):
            return True
        hop = self._next_hop(request)
        if hop is None or hop[0] in self._own:
            ctx.reply(481 if hop is not None else 416)
            return True
        self._relay(ctx, request, hop[0], hop[1], cseq_shift=shift)
        return True

    def _route_cseq_shift(self, request: Request) -> int:
        """The CSeq offset our Route values carry for this request (a trunk peer that challenged the INVITE
        counts the caller's CSeq one higher: trunk_calls.py); 0 for every other request. Only a Route with
        the parameter's text is parsed for it (every in-dialog request passes here; 1.7% of the cluster's GIL
        samples at 100 calls/s went to the lookup of a parameter that local calls never carry)."""
        if not any(_SHIFT_MARKER in value.lower() for value in request.headers.values("Route")):
            return 0
        try:
            routes = request.routes
        except SipError:
            return 0
        for route in routes[:4]:
            if not self.is_ours(route.uri):
                break
            shift = cseq_shift_of_route(route.uri, request.from_tag)
            if shift:
                return shift
        return 0

    def _prepare_forward(
        self, request: Request, transport: TransportName, branch: str, flow: Flow | None
    ) -> Request:
        """`request` (the pre-router's copy; the server transaction keeps the one received) with
        Max-Forwards decremented and our Via on top (§16.6 steps 3 and 8), changed in place."""
        headers = request.headers
        max_forwards = request.max_forwards
        headers.set("Max-Forwards", str((max_forwards if max_forwards is not None else DEFAULT_MAX_FORWARDS + 1) - 1))
        headers.add("Via", self._via(transport, branch, self.sent_by(flow)), first=True)
        return request

    def _forward_ack(self, request: Request, flow: Flow | None) -> None:
        hop = self._next_hop(request)
        if hop is None or hop[0] in self._own or request.max_forwards == 0:
            return
        destination, transport = hop
        branch = derive_branch(
            "ack", request.call_id, request.from_tag or "", request.to_tag or "", str(request.cseq.seq),
            request.branch or "",
        )
        forwarded = self._prepare_forward(request, transport, branch, flow)
        self.node.endpoint.send_stateless(forwarded, destination, transport=transport)
        self.forwarded += 1

    def _relay(self, ctx: RequestContext, request: Request, destination: Address, transport: TransportName,
               *, cseq_shift: int = 0) -> None:
        server = ctx.transaction
        if server is None:
            return
        branch = derive_branch("dialog", *[str(part) for part in server.key]) + "." + loop_hash(request)
        forwarded = self._prepare_forward(request, transport, branch, ctx.flow)
        shift_request(forwarded, cseq_shift)
        relay = _Relay(ctx, forwarded, destination, transport, cseq_shift=cseq_shift)
        if request.method == "INVITE":
            self._contexts[id(server)] = relay
            self.node.watch(server, lambda event: self._on_server_event(server, event))
        if request.method == "BYE":
            relay.hold = self._bye_ended(ctx, request)
        try:
            relay.tx = self.node.send_request(
                forwarded, destination, transport=transport,
                on_event=lambda event: self._on_relay_event(relay, event),
            )
            self.forwarded += 1
        except (SipError, SendFailure) as exc:
            log.info("proxy.relay_failed", method=request.method, error=str(exc))
            self._relay_final(relay, ctx.response(480))

    def _lookup(self, callee: str | None, may_route: bool, now: float) -> tuple[bool, list[Any], Any]:
        """(callee is a local extension, its current bindings, the trunk route when it is not one)."""
        machine = self.node.machine
        match = None
        with machine.lock:
            known = callee is not None and callee in machine.state.extensions
            bindings = current_bindings(machine.state, callee, now) if known and callee is not None else []
            if not known and may_route and callee is not None:
                match = route_for(machine.state, callee)  # local extensions win (docs/trunks.md)
        return known, bindings, match

    def _bye_ended(self, ctx: RequestContext, request: Request) -> asyncio.Future[Any] | None:
        """Propose the BYE's CallEnded; a future done once its commit is decided (the BYE's final response
        waits for it), or None when the call is not ours."""
        call = self.recorder.call(request.call_id)
        if call is None:
            if self._caught_up():
                return None  # not a call of ours (or already ended)
            # Right after a restart the state can lack the call (read barrier, replication.py): wait for it
            # rather than relay a BYE that never ends the record (seen by the chaos suite after a kill-all).
            return self.recorder.spawn(self._bye_ended_after_barrier(ctx, request))
        return self._record_bye(ctx, call, request)

    def _caught_up(self) -> bool:
        status = getattr(self.replicator, "status", None)
        return status is None or bool(getattr(status(), "caught_up", True))

    async def _bye_ended_after_barrier(self, ctx: RequestContext, request: Request) -> None:
        wait = getattr(self.replicator, "wait_caught_up", None)
        if wait is None or not await wait(self.node.cfg.proposal_timeout):
            log.warning("proxy.bye_unrecorded", call_id=request.call_id, reason="state not caught up")
            return
        call = self.recorder.call(request.call_id)
        if call is not None:
            await self._record_bye(ctx, call, request)

    def _record_bye(self, ctx: RequestContext, call: Call, request: Request) -> asyncio.Future[None]:
        """CallEnded for a BYE, continued in a callback (no task per BYE): the future is done once the commit
        is decided (committed, refused or failed: failures are logged and the leader's job ends the call)."""
        by_caller = (request.from_tag or "") == call.from_tag
        cause, hangup_by = ("bye-caller", "caller") if by_caller else ("bye-callee", "callee")
        status = 200 if call.answered_at is not None else 487
        decided: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def then(outcome: object) -> None:
            del outcome
            if not decided.done():
                decided.set_result(None)

        self.recorder.ended_then(ctx, call.call_id, cause=cause, hangup_by=hangup_by, status_code=status,
                                 at=ctx.now, then=then)
        return decided

    def _on_relay_event(self, relay: _Relay, event: Event) -> None:
        if isinstance(event, ResponseReceived):
            response = event.response
            if response.status == 100:
                return
            upstream = _pop_top_via(response)
            shift_cseq(upstream, -relay.cseq_shift)
            if response.status < 200:
                relay.provisional = True
                if relay.cancel_wanted and not relay.cancel_sent:
                    self._send_cancel(None, relay)
                relay.ctx.send(upstream)
                return
            if 200 <= response.status < 300 and relay.request.method in ("INVITE", "UPDATE"):
                self._maybe_refresh(relay.request, response)
            if 200 <= response.status < 300 and relay.finished:
                if not relay.ctx.send(upstream):
                    self._send_stateless_response(upstream)  # a re-INVITE's 2xx retransmission
                return
            self._relay_final(relay, upstream)
        elif isinstance(event, TimedOut):
            self._relay_final(relay, relay.ctx.response(408))
        elif isinstance(event, TransportError):
            self._relay_final(relay, relay.ctx.response(480))

    def _relay_final(self, relay: _Relay, response: Response) -> None:
        if relay.finished:
            return
        relay.finished = True
        hold = relay.hold
        if hold is None or hold.done():
            relay.ctx.send(response)
            return
        hold.add_done_callback(lambda _: _logged(relay.ctx.send, response))  # after the commit (no task)

    def _maybe_refresh(self, request: Request, response: Response) -> None:
        expires = session_expires(response)
        if expires is None:
            return
        call = self.recorder.call(request.call_id)
        if call is None or call.answered_at is None:
            return
        now = self.node.now()
        self.recorder.spawn(self.recorder.refreshed(call.call_id, now + expires, now))

    # -- stateless forwarding of responses (§16.7 / RFC 6026 §8.3) ------------------------------------
    def _on_stray_response(self, response: Response, flow: Flow | None) -> None:
        """A response that matches no client transaction (RFC 3261 §16.7 / RFC 6026 §8.3): normally
        forwarded statelessly by the next Via. After a failover, the callee's final response to an INVITE
        forked by a dead leader lands here (our Via names the service address, which moved): see
        `_stray_final`. A first 18x for a call not marked ringing proposes CallRinging."""
        try:
            if not self._via_is_ours(response.top_via):
                return
            if response.cseq.method == "INVITE" and response.status >= 200:
                if self._stray_final(response, flow):
                    return
            elif response.cseq.method == "INVITE" and 180 <= response.status <= 183:
                self._stray_ringing(response.call_id)
            self._send_stateless_response(self._stray_upstream(response), flow)
        except SipError as exc:
            log.debug("proxy.stray_dropped", error=str(exc))

    def _stray_upstream(self, response: Response) -> Response:
        """A stray response as it goes upstream: our Via off, and for a 2xx/18x of a trunk INVITE resent
        with credentials, the CSeq offset its Record-Route carries taken off (trunk_calls.py)."""
        upstream = _strip_top_via(response)
        try:
            record_routes = response.record_routes if response.cseq.method == "INVITE" else ()
        except SipError:
            return upstream
        for value in record_routes:
            if self.is_ours(value.uri):
                shift = cseq_shift_of_route(value.uri, response.from_tag)
                if shift:
                    shift_cseq(upstream, -shift)
                    break
        return upstream

    def _stray_ringing(self, call_id: str) -> None:
        call = self.recorder.call(call_id)
        key = (call_id, 1)
        if call is None or call.ringing_at is not None or call.answered_at is not None or key in self._stray_pending:
            return
        self._stray_pending.add(key)

        async def run() -> None:
            try:
                await self.recorder.ringing(call_id, self.node.now())
            finally:
                self._stray_pending.discard(key)

        self.recorder.spawn(run())

    def _stray_final(self, response: Response, flow: Flow | None) -> bool:
        """A final response to an INVITE with our Via and no client transaction; True if handled here.

        A 2xx for a call in the replicated state that is not answered yet: `CallAnswered` is committed,
        THEN the 2xx is forwarded (commit before reply, as for a 2xx on a live branch); retransmissions
        arriving meanwhile are dropped (the callee retransmits until the ACK, §13.3.1.4). A non-2xx: ACKed
        by us hop by hop, as our lost client transaction would have (§17.1.1.3: statelessly, same branch),
        every retransmission of it; for an unanswered call, `CallEnded(failure, status)` (a 487: cancel by
        the caller) is committed before it is forwarded; for an answered call, another fork's answer is
        dropped (the caller has its 2xx, §16.7) and a re-INVITE's failure is forwarded.
        False: forward it statelessly as any stray response.
        """
        call_id, status = response.call_id, response.status
        call = self.recorder.record(call_id)
        if call is None and status < 300:
            # No record of this call here: forwarding it would set up a call nobody recorded. A node that
            # forked while CallStarted committed and died before the commit leaves exactly this; the callee
            # retransmits its 2xx (§13.3.1.4) and the caller its INVITE, which this node then forks on the
            # same branch (recorded first), so a later 2xx retransmission is answered on the record.
            log.info("proxy.stray_answer_unrecorded", call_id=call_id)
            return True
        if call is not None and response.from_tag != call.from_tag and response.to_tag != call.from_tag:
            call = None  # not this call's dialog (or its forks): an ordinary stray response
        if status >= 300:
            self._ack_stray(response, flow, call)
            if call is not None and call.answered_at is not None:
                # Another fork's answer to the initial INVITE (§16.7: not forwarded after a 2xx); a failure
                # of an in-dialog re-INVITE, though, goes to its sender.
                return {response.from_tag, response.to_tag} != {call.from_tag, call.to_tag}
        elif call is not None and call.answered_at is not None:
            waiting = self._awaiting.pop(call_id, None)
            if waiting is not None and not waiting.finished:
                self._answer_waiting(waiting, self._stray_upstream(response))
                return True
            return False
        if call is None or call.ended_at is not None:
            return False
        key = (call_id, 2 if status < 300 else 3)
        if key in self._stray_pending:
            return True  # being committed; the callee retransmits
        self._stray_pending.add(key)
        self.recorder.spawn(self._commit_stray(key, response, flow))
        return True

    async def _commit_stray(self, key: tuple[str, int], response: Response, flow: Flow | None) -> None:
        call_id, status = response.call_id, response.status
        try:
            now = self.node.now()
            if status < 300:
                expires = session_expires(response)
                contacts = response.contacts if "Contact" in response.headers else ()
                outcome = await self.recorder.answered(
                    call_id, to_tag=response.to_tag or "", callee_contact=str(contacts[0].uri) if contacts else "",
                    session_expires_at=now + expires if expires is not None else None, at=now,
                )
                if outcome is None:
                    return  # not committed: the next retransmission tries again (never forward before it)
                self.recorder.poke()
                log.info("proxy.stray_answer", call_id=call_id, status=status)
                upstream = self._stray_upstream(response)
                waiting = self._awaiting.pop(call_id, None)
                if waiting is not None and not waiting.finished:
                    self._answer_waiting(waiting, upstream)
                else:
                    self._send_stateless_response(upstream, flow)
                return
            # 487 answers a CANCEL only (§9.2): the caller cancelled through the dead leader.
            cause, hangup_by = ("cancel", "caller") if status == 487 else ("failure", "system")
            outcome = await self.recorder.ended(call_id, cause=cause, hangup_by=hangup_by, status_code=status, at=now)
            if outcome is None:
                return  # the callee retransmits its final response until our ACK reaches it; next one retries
            log.info("proxy.stray_failure", call_id=call_id, status=status)
            self._send_stateless_response(self._stray_upstream(response), flow)
        finally:
            self._stray_pending.discard(key)

    def _answer_waiting(self, context: _InviteContext, response: Response) -> None:
        """The 2xx of a call answered elsewhere, through the retransmitted INVITE's own transaction."""
        context.answered = True
        context.finished = True
        self._stop_timers(context)
        self._forward_2xx(context, response)

    def _ack_stray(self, response: Response, flow: Flow | None, call: Call | None) -> None:
        """§17.1.1.3: ACK a non-2xx final response to a forked INVITE whose client transaction is gone.

        Same Call-ID, From, To (with the response's tag), CSeq number and top Via (hence the same branch and
        sent-by) as the response; the Request-URI is that of the INVITE: the contact of the callee's binding
        that the response came from, else the response's To URI (transaction matching uses the branch).
        Sent statelessly back where the response came from.
        """
        if flow is None:
            return
        top_via = response.headers.get_all("Via")[0]
        uri = self._stray_target(response, flow, call)
        ack = Request("ACK", uri)
        headers = ack.headers
        headers.add("Via", top_via)
        headers.add("Max-Forwards", str(DEFAULT_MAX_FORWARDS))
        headers.add("From", response.headers.get("From") or "")
        headers.add("To", response.headers.get("To") or "")
        headers.add("Call-ID", response.call_id)
        headers.add("CSeq", f"{response.cseq.seq} ACK")
        headers.add("Content-Length", "0")
        try:
            self.node.endpoint.send_stateless(ack, flow.remote, transport=flow.transport)
        except (SipError, SendFailure) as exc:
            log.info("proxy.stray_ack_failed", call_id=response.call_id, error=str(exc))

    def _stray_target(self, response: Response, flow: Flow, call: Call | None) -> str:
        if call is not None:
            machine = self.node.machine
            with machine.lock:
                bindings = current_bindings(machine.state, call.callee, self.node.now())
            for binding in bindings:
                received = _parse_host_port(binding.received) if binding.received else None
                uri = _parse_contact_uri(binding.contact)
                if uri is not None and received is not None and _same_address(received, flow.remote):
                    return str(uri)
        contacts = response.contacts if "Contact" in response.headers else ()
        if contacts:
            return str(contacts[0].uri)
        return str(response.to.uri)

    def _send_stateless_response(self, response: Response, flow: Flow | None = None) -> None:
        """Forward `response` by its (new) top Via; from the service address if it arrived on it."""
        try:
            via = response.top_via
        except SipError:
            return
        destination, transport = via_destination(via)
        source = self.service if self.sent_by(flow) == self.service else None
        self.node.endpoint.send_stateless(response, destination, transport=transport, source=source)
        self.stray_forwarded += 1

    # -- the leader's timeouts: BYE to both ends, best effort -------------------------------------------
    def _send_timeout_byes(self, call: Call) -> None:
        if call.answered_at is None:
            return  # no dialog yet: the serving node's Timer C (or the caller) ends the transaction
        domain = self.node.realm
        ends = (
            ("caller", call.caller_contact, call.callee, call.to_tag, call.caller, call.from_tag),
            ("callee", call.callee_contact, call.caller, call.from_tag, call.callee, call.to_tag),
        )
        for side, contact, local_user, local_tag, remote_user, remote_tag in ends:
            uri = _parse_contact_uri(contact) if contact else None
            target = _uri_target(uri) if uri is not None else None
            if uri is None or target is None:
                continue
            destination, transport = target
            branch = derive_branch("timeout-bye", call.call_id, side)
            bye = Request("BYE", str(uri))
            headers = bye.headers
            headers.add("Via", self._via(transport, branch))
            headers.add("Max-Forwards", str(DEFAULT_MAX_FORWARDS))
            headers.add("From", f"<sip:{local_user}@{domain}>;tag={local_tag}")
            headers.add("To", f"<sip:{remote_user}@{domain}>;tag={remote_tag}")
            headers.add("Call-ID", call.call_id)
            headers.add("CSeq", f"{2**31 - 1} BYE")  # above any CSeq of the dialog (§12.2.2)
            headers.add("Reason", 'SIP;cause=408;text="call timed out"')
            try:
                self.node.send_request(bye, destination, transport=transport, on_event=lambda event: None)
            except (SipError, SendFailure) as exc:
                log.info("proxy.timeout_bye_failed", call_id=call.call_id, side=side, error=str(exc))

