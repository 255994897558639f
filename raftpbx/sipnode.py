"""The node's SIP transaction user: one `SipEndpoint` (UDP and TCP on `cfg.sip.listen`) and a dispatcher.

Theory of operation:
- `SipNode` is the TU of the endpoint. Every new request (`RequestReceived`) becomes a `RequestContext`
  handed to the handler registered for its method (`register(method, handler)`). A handler may be a plain
  function or a coroutine function; coroutines run as tasks that the node keeps and awaits on `aclose()`.
  Before the method table, optional pre-routers (`add_prerouter`) may claim a request (the proxy uses this
  for loose-routed in-dialog requests, RFC 3261 §16.4, that are not for the PBX itself).
- Built in: OPTIONS whose Request-URI has no user part is for the PBX and gets 200 with Allow (§11.2);
  ACK is never answered (§17); CANCEL with no handler gets 481 or 200 per §9.2 (no forking without a
  proxy); a method SIP defines with no handler gets 405 with Allow, any other 501 (§8.2.1, §21.5.6).
  Malformed requests were already answered 400 statelessly by the endpoint (§8.2.6.2); a handler that
  trips on a malformed header (`SipError`) makes the dispatcher answer 400, any other exception 500, so
  nothing raises into the event loop.
- Events of transactions the node started or wants to follow (`ResponseReceived`, `TimedOut`,
  `TransportError`, `Terminated`) go to the callback given to `send_request` / `watch`; responses matching
  no client transaction and ACKs matching none go to `on_stray_response` / the "ACK" handler.
- Digest (RFC 3261 §22, RFC 7616, RFC 8760): nonces are stateless HMACs (`transport.sip.digest`) under a key
  derived from the cluster secret with a label (HMAC-SHA256(secret, label)), so every node accepts every
  node's nonces (DESIGN decision 5); the key and the secret are never logged. Credentials are checked
  against the replicated HA1 of the credentials' algorithm. No user enumeration (RFC 3261 §22, RFC 7616 §5):
  an unknown user, a wrong password, a foreign realm, an unknown algorithm or a malformed credential all give
  the SAME answer, a fresh challenge (401 or 407), and an unknown user costs the same digest work as a
  known one (checked against a dummy HA1). A right digest over an expired nonce gets stale=true.
- Proposals: `SipNode.propose(commands)` encodes one batch and awaits the replicator (commit on a durable quorum
  before any reply: DESIGN decision 3); failures are the replicator's typed errors. A handler that needs
  no coroutine of its own uses `propose_then(ctx, commands, then)`: `then(ctx, outcomes | error)` runs as a
  done-callback of the proposal's future (no Task per request: the registrar's REGISTER path); what it
  raises is answered like a handler's exception, and `aclose` waits for it as for a task.
- Challenges to non-INVITE requests are stateless (RFC 3261 §8.2.7): the server transaction ends with the
  401/407 (`linger=False`) instead of holding the request 32 s; a retransmission is challenged again with
  the same nonce (within the second) and the same derived To tag. An INVITE's 407 stays stateful (its ACK).
- Drain (planned maintenance, `state/cluster.py`): while this node is drained, a new INVITE (no To tag,
  RFC 3261 §12.1: not in a dialog) gets 503 Service Unavailable with Retry-After (§21.5.4, §20.33) after
  the pre-routers and before the INVITE handler (the proxy) runs, so the node takes no new call; a phone
  or upstream proxy that knows other nodes tries them (RFC 3263 §4.3). Everything else is served as usual,
  so established calls finish normally: in-dialog requests (BYE, re-INVITE, ACK, which carry a To tag),
  CANCEL, REGISTER, OPTIONS; and so is an INVITE retransmitted for a call this cluster already started
  (after a failover it is not a new call). A pre-router's requests (a request forwarded over an RFC 5626
  flow that lives on this node) are not refused: that phone is reachable only through this node. Nor
  are new INVITEs while this node leads: a drained leader hands leadership away within a heartbeat or two
  (raftpbx/membership.py), and one that cannot (no undrained member is up) holds the service address, so
  refusing there would refuse every new call of the cluster. The flag follows the replicated state
  through the state machine's apply and restore listeners; the node logs `sip.drain_started` /
  `sip.drain_ended` once per change.

Invariants: every request that gets a server transaction is answered at most once by the dispatcher's
fallbacks (a handler that answered is never overridden); tasks are kept until done; counters only grow.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .config import NodeConfig
from .logs import get_logger
from .replication import ProposalTimeout
from .state import Command, Outcome, encode_batch
from .state.model import fast_constructor
from .transport.endpoint import SipEndpoint
from .transport.flow import Address, Flow, TransportName
from .transport.sip.digest import (
    AuthStatus,
    Credentials,
    make_challenge,
    make_nonce,
    parse_authorization,
    verify,
)
from .transport.sip.errors import SipError, SipParseError
from .transport.sip.message import Request, Response, make_response
from .transport.sip.transaction import (
    ClientTransaction,
    Event,
    RequestReceived,
    ResponseReceived,
    ServerTransaction,
    Terminated,
    Transaction,
)
from .transport.sip.uri import SipUri
from .transport.tcp import TcpConfig
from .transport.udp import RECEIVE_BUFFER

__all__ = [
    "DRAIN_RETRY_AFTER",
    "KNOWN_METHODS",
    "AuthOutcome",
    "Handler",
    "ProposalBatcher",
    "RequestContext",
    "SipNode",
    "derive_nonce_key",
    "pbx_to_tag",
]

log = get_logger("raftpbx.sipnode")

SERVER_HEADER = "raftpbx"
DRAIN_RETRY_AFTER = 30
"""Retry-After (seconds) of the 503 a drained node gives new INVITEs."""
_NONCE_KEY_LABEL = b"raftpbx sip digest nonce key v1"
# Methods SIP defines (RFC 3261 and extensions): answered 405 without a handler, anything else 501.
KNOWN_METHODS = frozenset(
    {
        "INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "SUBSCRIBE", "NOTIFY", "MESSAGE",
        "INFO", "PRACK", "UPDATE", "REFER", "PUBLISH",
    }
)  # fmt: skip

Handler = Callable[["RequestContext"], Awaitable[None] | None]
Prerouter = Callable[["RequestContext"], bool]
TransactionCallback = Callable[[Event], None]
StrayResponseHandler = Callable[[Response, "Flow | None"], None]


def derive_nonce_key(cluster_secret: str) -> bytes:
    """The digest nonce key: HMAC-SHA256(cluster secret, label). Same on every node, never logged."""
    return hmac.new(cluster_secret.encode("utf-8"), _NONCE_KEY_LABEL, hashlib.sha256).digest()


def pbx_to_tag(request: Request) -> str:
    """The PBX's To tag for responses to `request`: derived from Call-ID, From tag, CSeq number and top
    Via branch, so a regenerated answer (a retransmission reaching another node) carries the same tag."""
    seed = "\x00".join(
        (request.call_id, request.from_tag or "", str(request.cseq.seq), request.branch or "")
    ).encode("utf-8", "surrogateescape")
    return hashlib.sha256(seed).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    """What `RequestContext.authenticate` decided.

    `ok`: the request carries a right digest for `extension` over a live nonce. Otherwise `stale` tells
    whether the client should just retry with the fresh nonce (RFC 7616 §3.3); `reason` is for logs only
    (it never holds a secret and must not reach the client: every failure looks the same on the wire).
    """

    ok: bool
    extension: str | None = None
    stale: bool = False
    reason: str = ""


_NO_CREDENTIALS = AuthOutcome(False, reason="no credentials for our realm")  # immutable, shared
_NOT_OFFERED = AuthOutcome(False, reason="algorithm not offered")
_UNKNOWN_USER = AuthOutcome(False, reason="unknown user")
_STALE = AuthOutcome(False, extension=None, stale=True, reason="nonce expired")


_make_outcome: Callable[..., AuthOutcome] = fast_constructor(AuthOutcome)  # AuthOutcome(ok, extension, stale, reason), positional


def _accepted(extension: str) -> AuthOutcome:
    return _make_outcome(True, extension, False, "")


class RequestContext:
    """One new request and the means to answer it (built by `SipNode` for each handler call)."""

    __slots__ = ("_replied", "flow", "node", "now", "request", "source", "transaction")

    def __init__(
        self,
        node: SipNode,
        request: Request,
        transaction: ServerTransaction | None,
        flow: Flow | None,
        source: Address,
        now: float,
    ) -> None:
        self.node = node
        self.request = request
        self.transaction = transaction  # None for an ACK that matches no transaction
        self.flow = flow
        self.source = source  # the packet source (after the §18.2.1 Via fix-up: received/rport)
        self.now = now  # wall clock (epoch seconds) when the request was dispatched
        self._replied = False

    @property
    def method(self) -> str:
        return str(self.request.method)

    @property
    def transport(self) -> TransportName:
        return self.flow.transport if self.flow is not None else "udp"

    @property
    def replied_final(self) -> bool:
        """True once a final response went out through `reply`."""
        return self._replied

    @property
    def addressed_to_pbx(self) -> bool:
        """The Request-URI names no user: the request is for the PBX itself, not an extension."""
        uri = self.request.request_uri
        return isinstance(uri, SipUri) and not uri.user  # a tel: or other URI names a number, not the PBX

    @property
    def to_tag(self) -> str:
        return pbx_to_tag(self.request)

    def response(
        self,
        status: int,
        reason: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> Response:
        """A response to this request with the PBX's deterministic To tag and a Server header."""
        return make_response(
            self.request,
            status,
            reason,
            to_tag=self.to_tag,
            headers=[*headers, ("Server", SERVER_HEADER)],
            body=body,
        )

    def reply(
        self,
        status: int,
        reason: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> bool:
        """Answer through the server transaction; False if there is none or its state refuses it."""
        return self.send(self.response(status, reason, headers, body))

    def send(self, response: Response, *, linger: bool = True) -> bool:
        """Send a prepared response through the server transaction (`linger`: `SipEndpoint.respond`)."""
        if self.transaction is None:
            return False
        sent = bool(self.node.endpoint.respond(self.transaction, response, linger=linger))
        if sent:
            self.node.responses[response.status] += 1
            if response.status >= 200:
                self._replied = True
        return sent

    def challenge(self, *, proxy: bool = False, stale: bool = False) -> bool:
        """Send 401 with WWW-Authenticate (registrar, §22.2) or 407 with Proxy-Authenticate (proxy, §22.3).

        Statelessly for a non-INVITE (a stateless UAS, RFC 3261 §8.2.7: an unauthenticated request leaves
        no state behind): the transaction ends with the challenge instead of holding the request for 32 s,
        and a retransmission is challenged again (the same nonce within the second, the same To tag). A
        407 to an INVITE stays stateful: its ACK must match the transaction."""
        return self.send(self.challenge_response(proxy=proxy, stale=stale), linger=False)

    def challenge_response(self, *, proxy: bool = False, stale: bool = False) -> Response:
        header = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
        values = self.node.challenge_values(self.now, stale)
        return self.response(407 if proxy else 401, headers=[(header, v) for v in values])

    def authenticate(self, *, proxy: bool = False) -> AuthOutcome:
        """Check the request's Authorization (or Proxy-Authorization) against the replicated HA1s."""
        return self.node.authenticate(self.request, proxy=proxy, now=self.now)


class SipNode:
    """The node's SIP front: endpoint, dispatcher, digest authentication, proposals."""

    def __init__(
        self,
        cfg: NodeConfig,
        machine: Any,
        replicator: Any,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.machine = machine  # raftpbx.service.StateMachine: .state read under .lock
        self.replicator = replicator
        self.clock = clock  # wall clock, epoch seconds (shared meaning across nodes: nonces, expiry)
        self.node_id = cfg.node_id
        self.realm = cfg.domain
        self.nonce_key = derive_nonce_key(cfg.cluster_secret)
        self.endpoint = SipEndpoint(self, tcp_config=TcpConfig())
        self.requests: collections.Counter[str] = collections.Counter()
        self.responses: collections.Counter[int] = collections.Counter()
        self.handler_errors = 0
        self.proposals_ok = 0
        self.proposals_failed = 0
        self._handlers: dict[str, Handler] = {}
        self._prerouters: list[Prerouter] = []
        self._watchers: dict[int, tuple[Transaction, TransactionCallback]] = {}
        self._stray_response: StrayResponseHandler | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: set[asyncio.Future[list[Outcome]]] = set()  # propose_then's, until their callback
        self._batcher = ProposalBatcher(replicator)
        self._challenge_cache: tuple[tuple[int, bool], list[str]] | None = None
        self._dummy_ha1 = {
            "MD5": hmac.new(self.nonce_key, b"dummy md5", hashlib.md5).hexdigest(),
            "SHA-256": hmac.new(self.nonce_key, b"dummy sha-256", hashlib.sha256).hexdigest(),
        }
        self._closing = False
        self.drained = False  # this node is drained (state/cluster.py): new INVITEs get 503
        self.drain_refused = 0
        add_apply = getattr(machine, "add_apply_listener", None)
        add_restore = getattr(machine, "add_restore_listener", None)
        if add_apply is not None and add_restore is not None:
            add_apply(self._drain_applied)
            add_restore(self._drain_restored)
        with self.machine.lock:
            self._set_drained(self.node_id in self.machine.state.drained)

    # -- drain -----------------------------------------------------------------------------------------
    def _drain_applied(self, index: int, applied: Any) -> None:  # Raft thread, under the state lock
        for outcome in applied.outcomes:
            result = outcome.result
            if "drained" in result and result.get("node_id") == self.node_id:
                self._set_drained(self.node_id in self.machine.state.drained)

    def _drain_restored(self, state: Any) -> None:  # under the state lock
        self._set_drained(self.node_id in state.drained)

    def _set_drained(self, drained: bool) -> None:
        if drained == self.drained:
            return
        self.drained = drained
        if drained:
            log.warning(
                "sip.drain_started",
                node=self.node_id,
                effect=f"new INVITEs get 503 Retry-After {DRAIN_RETRY_AFTER}; calls in progress go on",
            )
        else:
            log.warning("sip.drain_ended", node=self.node_id, effect="new INVITEs are routed again")

    def _refuse_new_call(self, ctx: RequestContext) -> bool:
        """True (and 503 sent) if this node is drained and `ctx` is a new INVITE (see the module doc)."""
        request = ctx.request
        if not self.drained or request.method != "INVITE" or request.to_tag is not None:
            return False
        with self.machine.lock:
            if request.call_id in self.machine.state.calls:
                return False  # a retransmission of a call already started (e.g. across a failover)
        if self.is_leader:
            return False  # leadership is being handed away, or has no undrained home (module doc)
        self.drain_refused += 1
        ctx.reply(503, "Service Unavailable", headers=[("Retry-After", str(DRAIN_RETRY_AFTER))])
        return True

    # -- registration of handlers ----------------------------------------------------------------------
    def register(self, method: str, handler: Handler) -> None:
        """Call `handler(ctx)` for each new server transaction of `method` (and for ACKs, method "ACK")."""
        self._handlers[method.upper()] = handler

    def add_prerouter(self, prerouter: Prerouter) -> None:
        """`prerouter(ctx)` sees every request first; returning True means it took (and answers) it."""
        self._prerouters.append(prerouter)

    def on_stray_response(self, handler: StrayResponseHandler) -> None:
        """Responses matching no client transaction (a proxy forwards them statelessly, §16.7)."""
        self._stray_response = handler

    def watch(self, transaction: Transaction, callback: TransactionCallback) -> None:
        """Deliver every later event of `transaction` to `callback` until it terminates."""
        self._watchers[id(transaction)] = (transaction, callback)

    @property
    def allow(self) -> str:
        methods = {"OPTIONS", "ACK", *self._handlers}
        return ", ".join(sorted(methods))

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind UDP and/or TCP on cfg.sip.listen (raises transport BindError)."""
        listen = self.cfg.sip.listen
        transports = self.cfg.sip.transports
        await self.endpoint.start(listen.host, listen.port, udp="udp" in transports, tcp="tcp" in transports)
        log.info(
            "sip.listening",
            node=self.node_id,
            udp=_fmt(self.endpoint.udp_address),
            tcp=_fmt(self.endpoint.tcp_address),
            algorithms=list(self.cfg.sip.digest_algorithms),
        )
        udp = self.endpoint.udp
        if udp is not None and 0 < udp.receive_buffer < RECEIVE_BUFFER:
            # The kernel clamps SO_RCVBUF to net.core.rmem_max (208 KB on a stock Linux): ~100 datagrams,
            # which a short stall at a few thousand datagrams/s overflows (each drop: a 500 ms retransmission).
            log.warning(
                "sip.udp_receive_buffer_small",
                node=self.node_id,
                granted=udp.receive_buffer,
                wanted=RECEIVE_BUFFER,
                fix=f"sysctl -w net.core.rmem_max={RECEIVE_BUFFER} (and in /etc/sysctl.d/)",
            )

    async def aclose(self) -> None:
        """Stop dispatching, let running handlers finish (bounded), close every socket."""
        self._closing = True
        waits: list[asyncio.Future[Any]] = [*self._tasks, *self._pending]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=self.cfg.proposal_timeout + 1.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        await self._batcher.aclose()
        await self.endpoint.aclose()

    def now(self) -> float:
        return self.clock()

    @property
    def is_leader(self) -> bool:
        try:
            return str(self.replicator.status().role) == "leader"
        except Exception:
            return False

    # -- client side -----------------------------------------------------------------------------------
    def send_request(
        self,
        request: Request,
        destination: Address,
        *,
        transport: TransportName = "udp",
        on_event: TransactionCallback | None = None,
    ) -> ClientTransaction:
        """Start a client transaction; its responses, timeouts and termination go to `on_event`."""
        tx = self.endpoint.send_request(request, destination, transport=transport)
        if on_event is not None and not tx.terminated:
            self.watch(tx, on_event)
        return tx

    # -- replication -----------------------------------------------------------------------------------
    async def propose(self, commands: Sequence[Command], timeout: float | None = None) -> list[Outcome]:  # noqa: ASYNC109
        """Replicate `commands` and return their outcomes once committed on a durable quorum.

        Commands proposed while this node already has `MAX_INFLIGHT` proposals in flight are grouped into
        one log entry (see `ProposalBatcher`); each caller gets the outcomes of its own commands. Raises the
        replicator's `NoQuorum`, `ProposalTimeout` (outcome unknown: retry the same commands) or
        `ReplicationError`.
        """
        try:
            outcomes = await self._batcher.propose(
                list(commands), self.cfg.proposal_timeout if timeout is None else timeout
            )
        except Exception:
            self.proposals_failed += 1
            raise
        self.proposals_ok += 1
        return outcomes

    def propose_then(
        self,
        ctx: RequestContext,
        commands: Sequence[Command],
        then: Callable[[RequestContext, list[Outcome] | BaseException], None],
        timeout: float | None = None,
    ) -> None:
        """`propose` for a handler that continues in a callback instead of a task (one Task and a chain
        of coroutines less per request): `then(ctx, outcomes)` once committed, or `then(ctx, error)` with
        the replicator's typed error, from the loop. Nothing raises into the loop: an exception from
        `then` is answered like a handler's (`SipError` 400, anything else 500). `aclose` waits for it as
        for a handler's task; a proposal cancelled on close calls nothing."""
        future = self._batcher.submit(
            list(commands), self.cfg.proposal_timeout if timeout is None else timeout
        )
        self._pending.add(future)

        def done(fut: asyncio.Future[list[Outcome]]) -> None:
            self._pending.discard(fut)
            if fut.cancelled():
                return
            result: list[Outcome] | BaseException
            exc = fut.exception()
            if exc is not None:
                self.proposals_failed += 1
                result = exc
            else:
                self.proposals_ok += 1
                result = fut.result()
            try:
                then(ctx, result)
            except Exception as err:
                self._failed(ctx, err)

        future.add_done_callback(done)

    # -- authentication --------------------------------------------------------------------------------
    def challenge_values(self, now: float, stale: bool) -> list[str]:
        """The challenge header values at `now`, in the configured algorithm order. The nonce only changes
        with the whole second, so the values are cached for that second (a hot path under load)."""
        key = (int(now), stale)
        cached = self._challenge_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        nonce = make_nonce(self.nonce_key, self.realm, now)
        by_algorithm = {
            value.rpartition("algorithm=")[2].split(",")[0].strip().upper(): value
            for value in make_challenge(self.realm, nonce, stale=stale)
        }
        values = [by_algorithm[a] for a in self.cfg.sip.digest_algorithms if a in by_algorithm]
        self._challenge_cache = (key, values)
        return values

    def authenticate(self, request: Request, *, proxy: bool, now: float) -> AuthOutcome:
        """RFC 3261 §22 with stateless nonces; see the module docstring for the no-enumeration rule."""
        header = "Proxy-Authorization" if proxy else "Authorization"
        credentials = self._credentials(request, header)
        if credentials is None:
            return _NO_CREDENTIALS
        algorithm = credentials.algorithm.upper()
        if algorithm not in self.cfg.sip.digest_algorithms:
            return _NOT_OFFERED
        with self.machine.lock:
            record = self.machine.state.extensions.get(credentials.username)
        ha1: str | None = None
        if record is not None and record.realm == self.realm:
            ha1 = record.ha1_sha256 if algorithm == "SHA-256" else record.ha1_md5
        result = verify(
            credentials,
            method=request.method,
            ha1=ha1 if ha1 is not None else self._dummy_ha1[algorithm],
            expected_realm=self.realm,
            secret=self.nonce_key,
            now=now,
            lifetime=self.cfg.sip.nonce_lifetime,
        )
        if ha1 is None:
            return _UNKNOWN_USER
        if result.status is AuthStatus.STALE:
            return _STALE
        if not result.ok:
            return AuthOutcome(False, reason=result.reason)
        return _accepted(credentials.username)

    def _credentials(self, request: Request, header: str) -> Credentials | None:
        headers = request.headers
        if headers.get(header) is None:
            return None  # the first REGISTER of every registration: `get` answers without building fields
        for value in headers.values(header):
            try:
                credentials = parse_authorization(value)
            except SipParseError:
                continue
            if credentials.realm == self.realm:
                return credentials
        return None

    # -- TransactionUser -------------------------------------------------------------------------------
    def on_event(self, endpoint: SipEndpoint, event: Event, flow: Flow | None) -> None:
        if isinstance(event, RequestReceived):
            self._on_request(event, flow)
            return
        transaction = getattr(event, "transaction", None)
        if transaction is not None:
            watcher = self._watchers.get(id(transaction))
            if watcher is not None and watcher[0] is transaction:
                if isinstance(event, Terminated):
                    del self._watchers[id(transaction)]
                self._call_watcher(watcher[1], event)
            return
        if isinstance(event, ResponseReceived) and self._stray_response is not None:
            try:
                self._stray_response(event.response, flow)
            except Exception:
                self.handler_errors += 1
                log.exception("sip.stray_response_handler_failed")

    def _call_watcher(self, callback: TransactionCallback, event: Event) -> None:
        try:
            callback(event)
        except Exception:
            self.handler_errors += 1
            log.exception("sip.watcher_failed", kind=type(event).__name__)

    def _on_request(self, event: RequestReceived, flow: Flow | None) -> None:
        request = event.request
        method = request.method
        self.requests[method] += 1
        if self._closing:
            if event.transaction is not None and method != "ACK":
                ctx = RequestContext(self, request, event.transaction, flow, event.source, self.clock())
                ctx.reply(503, headers=[("Retry-After", "5")])
            return
        ctx = RequestContext(self, request, event.transaction, flow, event.source, self.clock())
        try:
            for prerouter in self._prerouters:
                if prerouter(ctx):
                    return
            if self.drained and self._refuse_new_call(ctx):
                return
            handler = self._handlers.get(method)
            if method == "OPTIONS" and (handler is None or ctx.addressed_to_pbx):
                ctx.reply(200, headers=[("Allow", self.allow), ("Accept", "application/sdp")])  # §11.2
                return
            if handler is None:
                self._no_handler(ctx)
                return
            result = handler(ctx)
        except Exception as exc:  # a SipError (400...) or a bug (500): _failed tells them apart
            self._failed(ctx, exc)
            return
        if result is not None and inspect.isawaitable(result):
            self._spawn(ctx, result)

    def _no_handler(self, ctx: RequestContext) -> None:
        method = ctx.method
        if method == "ACK":
            return  # never answered (§17.1.1.3)
        if method == "CANCEL":
            target = self.endpoint.core.find_cancel_target(ctx.request)
            ctx.reply(200 if target is not None else 481)  # §9.2
            return
        if method in KNOWN_METHODS:
            ctx.reply(405, headers=[("Allow", self.allow)])  # §8.2.1
        else:
            ctx.reply(501)  # §21.5.6

    def _failed(self, ctx: RequestContext, exc: BaseException) -> None:
        if isinstance(exc, SipError):
            status = exc.status if isinstance(exc, SipParseError) else 400
            reason = exc.reason if isinstance(exc, SipParseError) else "Bad Request"
            log.info("sip.bad_request", method=ctx.method, error=str(exc))
        else:
            self.handler_errors += 1
            status, reason = 500, "Server Internal Error"
            log.error("sip.handler_failed", method=ctx.method, error=repr(exc))
        if ctx.method != "ACK" and not ctx.replied_final:
            try:
                ctx.reply(status if 400 <= status <= 699 else 400, reason)
            except Exception as err:  # never raise into the loop, even if the request defeats make_response
                log.info("sip.error_reply_failed", error=repr(err))

    def _spawn(self, ctx: RequestContext, awaitable: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await awaitable
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(ctx, exc)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class ProposalBatcher:
    """Group commit for proposals: at most `max_inflight` log entries in flight per node; commands proposed
    meanwhile wait and go together in the next entry (one `encode_batch`), up to `max_commands` per entry.
    Two entries in flight keep commits pipelined (a cap of one entry of 8 commands limited a node's
    throughput to 8 per commit time, and collapsed under CPU contention); 64 commands bound an entry to
    tens of KB.

    At low load every proposal goes alone at once (no added latency); under load, Raft costs per entry
    (forwarding, journal write, fsync, apply callback) are shared by many commands. Each command keeps its
    own op_id, so apply dedupes each one as if it had been proposed alone, and outcomes come back in order
    (`apply_entry` returns one outcome per command). A failed entry fails every caller in it with the same
    typed error (outcome unknown for all of them if it was submitted).
    """

    def __init__(self, replicator: Any, *, max_inflight: int = 2, max_commands: int = 64) -> None:
        self.replicator = replicator
        self.max_inflight = max_inflight
        self.max_commands = max_commands
        self.entries = 0
        self.commands = 0
        self._inflight = 0
        self._queue: collections.deque[tuple[list[Command], asyncio.Future[list[Outcome]], float]] = (
            collections.deque()
        )
        self._tasks: set[asyncio.Task[None]] = set()

    async def propose(self, commands: list[Command], timeout: float) -> list[Outcome]:  # noqa: ASYNC109
        return await self.submit(commands, timeout)

    def submit(self, commands: list[Command], timeout: float) -> asyncio.Future[list[Outcome]]:
        """Queue `commands` and return the future of their outcomes (what `propose` awaits), for a caller
        that continues in a done-callback instead of a task. Cancelling the future withdraws the commands
        if their entry has not left yet."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Outcome]] = loop.create_future()
        self._queue.append((commands, future, loop.time() + timeout))
        self._launch()
        return future

    def _launch(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue and self._inflight < self.max_inflight:
            group: list[tuple[list[Command], asyncio.Future[list[Outcome]], float]] = []
            count = 0
            while self._queue and (not group or count + len(self._queue[0][0]) <= self.max_commands):
                item = self._queue.popleft()
                if item[1].done():  # the caller was cancelled while queued
                    continue
                group.append(item)
                count += len(item[0])
            if not group:
                continue
            self._inflight += 1
            task = loop.create_task(self._run(group))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._inflight -= 1
        if not task.cancelled() and task.exception() is not None:
            log.error("sip.batch_failed", error=repr(task.exception()))
        self._launch()

    async def _run(self, group: list[tuple[list[Command], asyncio.Future[list[Outcome]], float]]) -> None:
        loop = asyncio.get_running_loop()
        commands = [command for item in group for command in item[0]]
        remaining = min(item[2] for item in group) - loop.time()
        try:
            if remaining <= 0:
                raise ProposalTimeout("the proposal waited in the node's queue past its deadline")
            result = await self.replicator.propose(encode_batch(commands), timeout=remaining)
        except Exception as exc:
            for _, future, _ in group:
                if not future.done():
                    future.set_exception(exc)
            return
        self.entries += 1
        self.commands += len(commands)
        outcomes = list(result) if isinstance(result, list) else []
        start = 0
        for item_commands, future, _ in group:
            mine = outcomes[start : start + len(item_commands)]
            start += len(item_commands)
            if not future.done():
                future.set_result(mine)

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        while self._queue:
            _, future, _ = self._queue.popleft()
            if not future.done():
                future.cancel()


def _fmt(address: Address | None) -> str | None:
    return None if address is None else f"{address[0]}:{address[1]}"
