"""The registrar (RFC 3261 §10.3) of a node, on top of `SipNode`, with bindings in the replicated state.

Theory of operation, for each new REGISTER server transaction (any node, any transport):

1. §10.3 step 2: a Require naming an extension we do not support -> 420 with Unsupported (we support
   `path`, RFC 3327, and `outbound`, RFC 5626).
2. §10.3 step 3 / §22: digest authentication against the replicated HA1s (`SipNode.authenticate`, stateless
   nonces under the cluster key, so a challenge from one node is answered to another). No or bad
   credentials -> 401 with a fresh challenge; a right digest over an expired nonce -> 401 stale=true.
   **No user enumeration:** an unknown extension and a wrong password both get the same fresh 401
   challenge (not 403), with the same headers and the same digest work; pjsip then reports the 401 as a
   failure, which is what "wrong password gets 401" expects.
3. §10.3 steps 4-5: the AoR is the To URI's user part, which must be the authenticated user (403
   otherwise: no third-party registration in this issue). The From header is not checked (§10.3 step 4
   allows a third party to register on behalf of the AoR; here only the owner can, through the To rule).
   The Request-URI's host is not checked against the domain: phones register to a node's address or the
   service address as often as to the domain, and the cluster serves one domain only (deliberate).
4. Contacts are extracted into `ContactSpec`s (expires, q, +sip.instance, reg-id; malformed expires or
   q parameters -> 400); the source address and port of the packet (`received`/`rport`, RFC 3581), the
   transport and the Path values (RFC 3327) go with them. `decide_register` (raftpbx.state) decides.
5. Refusals map to SIP codes in ONE table, `refusal_response` (423 carries Min-Expires, §10.3 step 7).
6. Accepted with events -> one log entry proposed under the deterministic `register_op_id` (a REGISTER
   retransmitted to another node dedupes to the first outcome), continued in a callback of the proposal
   (`SipNode.propose_then`, `_committed`), not a task. ONLY after commit on a durable quorum:
   200 listing the AoR's current bindings `Contact: <uri>;expires=N` (N = remaining seconds) and Date
   (§10.3 step 8). An accepted query (no Contact) is answered from this node's applied state without a
   proposal (nothing to commit; a follower's view may trail the leader by the replication lag).
7. Proposal failures: `NoQuorum` before the entry reached a leader -> 503 with Retry-After: 5 (nothing
   was written); `ProposalTimeout` or a submitted `NoQuorum` (outcome unknown) -> 500 with Retry-After: 2
   (a retry with a new CSeq simply refreshes; with the same CSeq it dedupes); any other replication
   error -> 500 with Retry-After: 2.

RFC 5626 outbound (`raftpbx.outbound`): a REGISTER whose Contact carries `+sip.instance` and `reg-id`, with
`Supported: outbound`, is a flow registration (§6). More than one such Contact -> 400. Through a proxy (more
than one Via) whose Path does not start with an `ob` URI -> 439 First Hop Lacks Outbound Support. When this
node is the first hop (one Via) it is the edge proxy: the binding stores a flow token naming this node and
the connection (`binding.flow`) and a Path to this node carrying the token, so that the proxy on any node
reaches the phone through this node and this connection. Bindings of the same instance and reg-id replace
each other (`binding_key`). The 200 carries `Require: outbound` and, for a flow we hold, `Flow-Timer`
(seconds within which the phone should send a keep-alive, §4.4.1: CRLF CRLF over TCP, answered CRLF by the
transport).

Expiry (DESIGN decision 1): only the leader removes expired bindings, by proposing `decide_expire` events
(`BindingsExpired(now)` under `expiry_op_id(now)`) when `next_expiry(state)` is due. `on_leader_change`
starts the job on the leader and stops it on followers; lookups meanwhile filter by `now`
(`current_bindings`), so an expired binding is never offered even before the sweep lands.

Invariants: no 200 before commit; every REGISTER gets exactly one final response from this module (or 400
/ 500 from the dispatcher if a header it needs is malformed); the expiry task runs only while this node
believes it leads and is always awaited on close.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import math
from collections.abc import Awaitable, Sequence
from typing import Any

from .logs import get_logger
from .outbound import Outbound
from .replication import NoQuorum, ProposalTimeout, ReplicationError
from .sipnode import RequestContext, SipNode
from .state import (
    Applied,
    BadRegister,
    Binding,
    Command,
    ContactSpec,
    Duplicate,
    IntervalTooBrief,
    NoSuchAor,
    Outcome,
    OutOfOrder,
    RegisterAccepted,
    RegisterDecision,
    Rejected,
    TooManyContacts,
    current_bindings,
    decide_expire,
    decide_register,
    expiry_op_id,
    next_expiry,
    refusal_for,
)
from .state.model import fast_constructor
from .transport.sip.headers import NameAddr
from .transport.sip.message import Headers
from .transport.sip.uri import SipUri, Uri

__all__ = ["SUPPORTED_EXTENSIONS", "Registrar", "contact_key", "refusal_response"]

log = get_logger("raftpbx.registrar")

SUPPORTED_EXTENSIONS = frozenset({"path", "outbound"})
EXPIRY_POLL = 1.0  # seconds: the leader re-reads next_expiry at least this often (new bindings)
EXPIRY_RETRY = 1.0  # seconds after a failed expiry proposal
RETRY_AFTER_NO_QUORUM = 5
RETRY_AFTER_UNKNOWN = 2
_URI_KEY_PARAMS = ("user", "ttl", "method", "maddr", "transport")
# ContactSpec(uri, contact_key, expires, q, instance_id, reg_id, flow), positional, without the frozen
# dataclass's per-field object.__setattr__ (one per Contact of every REGISTER).
_contact_spec = fast_constructor(ContactSpec)
_command = fast_constructor(Command)  # Command(op_id, event), the same way


def contact_key(uri: Uri) -> str:
    """A comparison key for a contact URI, after RFC 3261 §19.1.4: scheme and host lower-cased, user and
    password kept, port as written, the parameters that must match when present in one URI only (user,
    ttl, method, maddr, transport) lower-cased and sorted, headers sorted; other parameters ignored.

    Deviation: §19.1.4 also requires that a parameter present in BOTH URIs match; a key cannot express that
    (two contacts differing only in such a parameter are the same binding here), which is what phones that
    change a cosmetic parameter between refreshes need anyway.
    """
    if not isinstance(uri, SipUri):
        return str(uri)
    out = [uri.scheme.lower(), ":"]
    if uri.user is not None:
        out.append(uri.user)
        if uri.password is not None:
            out.append(":" + uri.password)
        out.append("@")
    out.append(uri.host.lower())
    if uri.port is not None:
        out.append(f":{uri.port}")
    params = {n.lower(): (v or "").lower() for n, v in uri.params}
    for name in _URI_KEY_PARAMS:
        if name in params:
            out.append(f";{name}={params[name]}")
    if uri.headers:
        out.append("?" + "&".join(f"{n.lower()}={v}" for n, v in sorted(uri.headers)))
    return "".join(out)


def refusal_response(
    ctx: RequestContext, refusal: RegisterDecision
) -> tuple[int, str | None, list[tuple[str, str]]]:
    """THE table: a `decide_register` refusal -> (status, reason, extra headers)."""
    if isinstance(refusal, IntervalTooBrief):
        return 423, "Interval Too Brief", [("Min-Expires", str(refusal.min_expires))]  # §10.3 step 7
    if isinstance(refusal, BadRegister):
        return 400, f"Bad Request ({refusal.field})", []  # §10.3 step 6 (Contact: * rules), bad values
    if isinstance(refusal, OutOfOrder):
        return 500, "Out Of Order Request", []  # §10.3 step 7: lower CSeq for the same Call-ID
    if isinstance(refusal, TooManyContacts):
        return 403, "Too Many Contacts", []  # max_contacts per AoR (local policy)
    if isinstance(refusal, NoSuchAor):
        return 404, "Not Found", []  # only after authentication: the extension was deleted meanwhile
    return 500, None, []


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bad_param(contact: NameAddr) -> str | None:
    """The first of expires, q, reg-id present but not well formed (its typed accessor gave None)."""
    names = {n.lower() for n, _ in contact.params}  # once per Contact, not once per parameter checked
    if "expires" in names and contact.expires is None:
        return "expires"
    if "q" in names and contact.q is None:
        return "q"
    if "reg-id" in names and contact.reg_id is None:
        return "reg-id"
    return None


class Registrar:
    """RFC 3261 §10.3 registrar for one node: REGISTER handler plus the leader's expiry job."""

    def __init__(self, sip: SipNode) -> None:
        self.sip = sip
        self.settings = sip.cfg.sip
        self.counters: dict[str, int] = {
            "registered": 0,
            "challenged": 0,
            "refused": 0,
            "failed": 0,
            "expiry_proposals": 0,
        }
        self._expiry_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self._date_cache: tuple[int, str] = (-1, "")
        # RFC 5626 edge duties; its pre-router must come before the proxy's (node.py builds us first).
        self.outbound = Outbound(sip)
        sip.register("REGISTER", self.handle)
        sip.replicator.on_leader_change(self._leader_changed)

    # -- lifecycle -------------------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Stop the expiry job (if running) and wait for it."""
        self._closed = True
        await self._stop_expiry()

    def _leader_changed(self, is_leader: bool, leader: str | None) -> None:
        if self._closed:
            return
        if is_leader and (self._expiry_task is None or self._expiry_task.done()):
            self._expiry_task = asyncio.get_running_loop().create_task(self._expiry_loop())
            log.info("registrar.expiry_started", node=self.sip.node_id)
        elif not is_leader and self._expiry_task is not None:
            task, self._expiry_task = self._expiry_task, None
            task.cancel()
            log.info("registrar.expiry_stopped", node=self.sip.node_id, leader=leader)

    async def _stop_expiry(self) -> None:
        task, self._expiry_task = self._expiry_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- expiry (leader only) --------------------------------------------------------------------------
    async def _expiry_loop(self) -> None:
        machine = self.sip.machine
        while not self._closed:
            now = self.sip.now()
            with machine.lock:
                due = next_expiry(machine.state)
                events = decide_expire(machine.state, now) if due is not None and due <= now else []
            if events:
                commands = [
                    Command(expiry_op_id(now) if i == 0 else f"{expiry_op_id(now)}.{i}", event)
                    for i, event in enumerate(events)
                ]
                try:
                    outcomes = await self.sip.propose(commands)
                except ReplicationError as exc:
                    log.warning("registrar.expiry_failed", error=type(exc).__name__)
                    await self._sleep(EXPIRY_RETRY)
                    continue
                self.counters["expiry_proposals"] += 1
                removed = [o.result.get("removed") for o in outcomes if isinstance(o, Applied)]
                log.info("registrar.expired", at=now, removed=removed)
                continue
            wait = EXPIRY_POLL if due is None else min(EXPIRY_POLL, max(0.0, due - now) + 0.01)
            await self._sleep(wait)

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)

    # -- REGISTER ----------------------------------------------------------------------------------------
    def handle(self, ctx: RequestContext) -> Awaitable[None] | None:
        """The REGISTER handler (registered on the SipNode): everything up to the decision runs at once;
        only a request that needs a proposal continues in a task (`_commit`)."""
        request = ctx.request
        headers = request.headers
        # `get` first: it answers "absent" from the parser's key list without building every field.
        if headers.get("Require") is not None:
            unsupported = self._unsupported(headers.values("Require"))
            if unsupported:
                ctx.reply(420, headers=[("Unsupported", ", ".join(unsupported))])  # §10.3 step 2, §8.2.2.3
                return None
        auth = ctx.authenticate(proxy=False)
        if not auth.ok:
            self.counters["challenged"] += 1
            if auth.reason not in ("no credentials for our realm", "nonce expired"):
                log.info("registrar.auth_failed", source=_address(*ctx.source))  # never the user or why
            ctx.challenge(proxy=False, stale=auth.stale)
            return None
        to_uri = request.to.uri
        aor = to_uri.user if isinstance(to_uri, SipUri) else None
        if aor is None or aor != auth.extension:
            self.counters["refused"] += 1
            ctx.reply(403, "Forbidden (To is not the authenticated user)")  # §10.3 step 4
            return None
        contacts = request.contacts  # SipParseError -> 400 by the dispatcher
        plain = True  # no Contact has header parameters (expires, q, +sip.instance, reg-id...): the usual
        for contact in contacts:
            if contact.params:
                plain = False
                bad = _bad_param(contact)
                if bad is not None:
                    ctx.reply(400, f"Bad Request (Contact {bad})")
                    return None
        path = tuple(str(p) for p in request.paths) if headers.get("Path") is not None else ()
        flow = ctx.flow
        outbound = not plain and _flow_registration(headers, contacts)
        token = ""
        if outbound:
            if sum(1 for c in contacts if c.instance and c.reg_id is not None) > 1:
                ctx.reply(400, "Bad Request (more than one reg-id)")  # RFC 5626 §6
                return None
            if len(request.vias) > 1:
                if not path or not _has_ob(request.paths[0].uri):
                    ctx.reply(439, "First Hop Lacks Outbound Support")  # RFC 5626 §6, §11.6
                    return None
            elif flow is not None:
                token, own_path = self.outbound.flow_route(flow)  # we are the edge proxy (§5.2)
                path = own_path + path
        specs = [
            _contact_spec(
                str(contact.uri),
                contact_key(contact.uri),
                contact.expires,
                contact.q,
                contact.instance or "",
                contact.reg_id or 0,
                token if token and contact.instance and contact.reg_id is not None else "",
            )
            for contact in contacts
        ]
        source = flow.remote if flow is not None else ctx.source
        cfg = self.settings
        with self.sip.machine.lock:
            decision = decide_register(
                self.sip.machine.state,
                aor=aor,
                contacts=specs,
                star=False if contacts else request.contact_star,  # Contact values and `*` never mix
                expires_header=request.expires,
                call_id=request.call_id,
                cseq=request.cseq.seq,
                received=_address(*source),
                transport=ctx.transport,
                path=path,
                node_id=self.sip.node_id,
                now=ctx.now,
                min_expires=cfg.min_expires,
                max_expires=cfg.max_expires,
                default_expires=cfg.default_expires,
                max_contacts=cfg.max_contacts,
                branch=request.branch or "",
            )
        if not isinstance(decision, RegisterAccepted):
            self._refuse(ctx, decision)
            return None
        extra: list[tuple[str, str]] = []
        if outbound:
            extra.append(("Require", "outbound"))  # RFC 5626 §6
            if token and flow is not None:
                extra.append(("Flow-Timer", str(self.outbound.flow_timer_for(flow.transport))))  # §4.4.1
        if not decision.events:
            self._ok(ctx, aor, extra)  # a query (§10.3 step 6, no Contact): nothing to commit
            return None
        self._commit(ctx, aor, decision, extra)
        return None

    def _commit(
        self, ctx: RequestContext, aor: str, decision: RegisterAccepted, extra: list[tuple[str, str]]
    ) -> None:
        """Propose the decision's events; `_committed` answers once the entry is committed (a callback of
        the proposal's future, not a task per REGISTER: `SipNode.propose_then`)."""
        commands = [
            _command(decision.op_id if i == 0 else f"{decision.op_id}.{i}", event)
            for i, event in enumerate(decision.events)
        ]

        def then(ctx: RequestContext, result: list[Outcome] | BaseException) -> None:
            self._committed(ctx, aor, decision, extra, result)

        self.sip.propose_then(ctx, commands, then)

    def _committed(
        self,
        ctx: RequestContext,
        aor: str,
        decision: RegisterAccepted,
        extra: list[tuple[str, str]],
        result: list[Outcome] | BaseException,
    ) -> None:
        cfg = self.settings
        if isinstance(result, BaseException):
            if not isinstance(result, ReplicationError):
                raise result  # not the replicator's: the dispatcher's 500 (SipNode._failed), as from a task
            self.counters["failed"] += 1
            if isinstance(result, NoQuorum) and not getattr(result, "submitted", False):
                ctx.reply(503, "No Quorum", headers=[("Retry-After", str(RETRY_AFTER_NO_QUORUM))])
            elif isinstance(result, NoQuorum | ProposalTimeout):  # submitted: the outcome is unknown
                ctx.reply(500, "Outcome Unknown", headers=[("Retry-After", str(RETRY_AFTER_UNKNOWN))])
            else:
                ctx.reply(500, headers=[("Retry-After", str(RETRY_AFTER_UNKNOWN))])
            log.warning("registrar.propose_failed", aor=aor, error=type(result).__name__)
            return
        outcomes = result
        rejected = _first_rejected(outcomes)
        if rejected is not None:
            self._refuse(ctx, refusal_for(rejected, max_contacts=cfg.max_contacts))
            return
        if not outcomes:
            self.counters["failed"] += 1
            log.error("registrar.no_outcome", aor=aor, op_id=decision.op_id)
            ctx.reply(500, headers=[("Retry-After", str(RETRY_AFTER_UNKNOWN))])
            return
        self._wake.set()  # a new binding may expire before the leader's next poll
        self._ok(ctx, aor, extra)

    def _date(self, now: float) -> str:
        second = int(now)
        if self._date_cache[0] != second:
            self._date_cache = (second, _http_date(second))
        return self._date_cache[1]

    def _unsupported(self, values: Sequence[str]) -> list[str]:
        out = []
        for value in values:
            for tag in value.split(","):
                tag = tag.strip().lower()
                if tag and tag not in SUPPORTED_EXTENSIONS and tag not in out:
                    out.append(tag)
        return out

    def _refuse(self, ctx: RequestContext, refusal: RegisterDecision) -> None:
        self.counters["refused"] += 1
        status, reason, headers = refusal_response(ctx, refusal)
        ctx.reply(status, reason, headers=headers)

    def _ok(self, ctx: RequestContext, aor: str, extra: Sequence[tuple[str, str]] = ()) -> None:
        now = self.sip.now()
        with self.sip.machine.lock:
            bindings = current_bindings(self.sip.machine.state, aor, now)
        headers = [("Contact", _contact_value(b, now)) for b in bindings]
        request_headers = ctx.request.headers
        if request_headers.get("Supported") is not None and request_headers.get("Path") is not None:
            supported = {t.strip().lower() for v in request_headers.values("Supported") for t in v.split(",")}
            if "path" in supported:
                headers.extend(("Path", p) for p in request_headers.values("Path"))  # RFC 3327 §5.3
        headers.extend(extra)
        headers.append(("Date", self._date(now)))  # §10.3 step 8, §20.17
        self.counters["registered"] += 1
        ctx.reply(200, headers=headers)


def _flow_registration(headers: Headers, contacts: Sequence[NameAddr]) -> bool:
    """RFC 5626 §6: a Contact with +sip.instance and reg-id, and `outbound` in Supported (§4.2)."""
    if not any(contact.instance and contact.reg_id is not None for contact in contacts):
        return False
    supported = headers.values("Supported")
    return any(tag.strip().lower() == "outbound" for value in supported for tag in value.split(","))


def _has_ob(uri: Uri) -> bool:
    """The URI carries the `ob` parameter (RFC 5626 §5.1: the edge proxy supports outbound)."""
    return isinstance(uri, SipUri) and any(name.lower() == "ob" for name, _ in uri.params)


def _http_date(second: int) -> str:
    return email.utils.formatdate(second, usegmt=True)


def _contact_value(binding: Binding, now: float) -> str:
    remaining = max(0, math.ceil(binding.expires_at - now - 1e-6))
    parts = [f"<{binding.contact}>", f"expires={remaining}"]
    if binding.q is not None:
        parts.append(f"q={binding.q:g}")
    if binding.instance_id:
        parts.append(f'+sip.instance="{binding.instance_id}"')
        if binding.reg_id:
            parts.append(f"reg-id={binding.reg_id}")
    return ";".join(parts)


def _first_rejected(outcomes: Sequence[Outcome]) -> Rejected | None:
    for outcome in outcomes:
        base: Any = outcome.first if isinstance(outcome, Duplicate) else outcome
        if isinstance(base, Rejected):
            return base
    return None
