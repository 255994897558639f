"""Registration to the peer: the leader REGISTERs trunks that ask for it (`register_expires > 0`).

Theory of operation
-------------------
Some peers (a carrier, another vendor's PBX) only send calls to a PBX that registers with them, the way a
phone registers with us (RFC 3261 §10). A trunk with `register_expires > 0` and credentials asks for that.
One registration per cluster: only the Raft leader registers (`is_leader()`, re-read before every send),
with Contact = the cluster's service address (the node's own SIP address when the cluster has none), so
the binding at the peer names an address that always reaches the current leader.

`TrunkRegistrar` runs a supervisor task that reconciles, every `check_interval` seconds and at once on a
leadership change (`leadership_changed`, wired to `Replicator.on_leader_change`), the trunks that want a
registration with the per-trunk tasks running:

* leader: one task per wanted trunk; a trunk whose record changed (update) gets a fresh task; a trunk no
  longer wanted (deleted, `register_expires` set to 0, credentials cleared) while registered gets one
  best-effort un-REGISTER (Expires: 0, §10.2.2) with the credentials it had;
* not leader: no task (nothing is un-registered: the next leader refreshes the same binding).

A trunk's task registers, then refreshes at half the granted expiry; after a failure it retries after
`retry_interval`, doubling up to `MAX_RETRY_INTERVAL`. One registration attempt:

1. Peers in `choose_peer` order (the OPTIONS pinger's health, down peers last resort). REGISTER
   `sip:{domain}` with To/From = AoR `sip:{username}@{domain}` (domain = the trunk's realm when it is a
   valid host, else the peer's host), Contact `<sip:{username}@{contact}>` (`;transport=tcp` over TCP),
   `Expires: register_expires`.
2. 401/407 with a Digest challenge for the trunk's realm: answer once with `make_authorization` (RFC 3261
   §22.2, RFC 7616 §3.4; HA1 for the challenge's algorithm, fresh cnonce) in Authorization or
   Proxy-Authorization. A second challenge is a refusal (wrong credentials) unless it says stale=true
   (RFC 7616 §3.3: only the nonce was old). Another realm, no usable challenge: refused.
3. 423 Interval Too Brief: ask again with the Min-Expires the peer named (§10.2.8), once per value.
4. 2xx: registered. Granted expiry = the `expires` parameter of our Contact in the 2xx, else its Expires
   header, else what we asked (§10.2.4 / §10.3 step 8).
5. No final response within `timeout`, a transport error, or 503 (§21.5.4): try the next peer (RFC 3263
   §4.3 style). Any other final response: the attempt failed (the next peer has the same configuration).

Call-ID and CSeq (§10.2, §8.1.1.5): the Call-ID is derived from the trunk name and the AoR, so every leader
uses the same one and the peer sees one registration that moves between nodes. The CSeq must then keep
growing across leaders without shared state: it is `max(last + 1, ticks)` with `ticks` = quarter-seconds
of the wall clock since 2023-11-14 (below 2^31 until 2040), and a node that just became leader waits
`takeover_delay` (1 s) before its first REGISTER, so its ticks are past every CSeq the previous leader used
(an attempt uses at most `MAX_ROUNDS` CSeqs; clocks are assumed synchronised to well under a second).

Status (`status_of(trunk)` for `trunk.get`/`trunk.list`, `metrics_lines()` for /metrics): per trunk, state
"standby" (not the leader: the leader registers), "waiting" (took over leadership: registering after the
delay), "registering", "registered", "failed", plus the peer, granted expiry, wall-clock times, last status
and error, counts.

Invariants: nothing raises into the event loop (tasks catch and log everything; bad responses are just
failures); REGISTERs go only to configured peer addresses; no password is ever held (HA1s from the
replicated trunk only) and no Authorization value is logged; `aclose` cancels every task and closes the
socket; at most one request per trunk is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .logs import get_logger
from .peer_client import PeerClient
from .state import Trunk, peer_addresses
from .state.trunks import PeerAddress
from .transport.sip.digest import Challenge, challenges_for, make_authorization
from .transport.sip.errors import SipParseError
from .transport.sip.message import Request, Response
from .transport.sip.uri import check_host

__all__ = [
    "CSEQ_EPOCH",
    "CSEQ_TICKS_PER_SECOND",
    "RegistrationStatus",
    "TrunkRegistrar",
    "call_id_for",
    "wants_registration",
]

log = get_logger("raftpbx.trunk_register")

CSEQ_EPOCH = 1_700_000_000  # 2023-11-14T22:13:20Z
CSEQ_TICKS_PER_SECOND = 4
CSEQ_MAX = 2**31 - 1  # RFC 3261 §8.1.1.5: less than 2**31
MAX_ROUNDS = 4  # requests of one attempt at one peer: plain, answered challenge, stale re-answer, 423 retry
MAX_RETRY_INTERVAL = 300.0
MIN_REFRESH = 1.0
DEFAULT_TIMEOUT = 4.0
DEFAULT_RETRY_INTERVAL = 10.0
DEFAULT_TAKEOVER_DELAY = 1.0
DEFAULT_CHECK_INTERVAL = 1.0
MAX_EXPIRES = 86_400 * 7


def wants_registration(trunk: Trunk) -> bool:
    """True if the trunk asks for a registration to its peer (and can answer a challenge)."""
    return bool(trunk.register_expires > 0 and trunk.has_credentials)


def _domain(trunk: Trunk, peer: PeerAddress) -> str:
    """The registrar domain: the realm when it is a valid host (the usual case), else the peer's host."""
    try:
        return str(check_host(trunk.realm))
    except SipParseError:
        return str(peer.host)


def call_id_for(trunk: Trunk) -> str:
    """The Call-ID every leader uses for this trunk's registration (trunk name and AoR)."""
    digest = hashlib.sha256(f"raftpbx trunk registration\x00{trunk.name}\x00{trunk.username}\x00{trunk.realm}"
                            .encode("utf-8", "surrogateescape")).hexdigest()
    return f"reg-{digest[:24]}@raftpbx"


def _tag_for(trunk: Trunk) -> str:
    return hashlib.sha256(f"raftpbx trunk tag\x00{trunk.name}".encode("utf-8", "surrogateescape")).hexdigest()[:12]


@dataclass(slots=True)
class RegistrationStatus:
    """One trunk's registration as this node sees it (wall-clock times, epoch seconds)."""

    state: str = "standby"  # standby | waiting | registering | registered | failed
    peer: str | None = None
    expires: int | None = None  # granted by the peer
    registered_at: float | None = None
    expires_at: float | None = None
    next_attempt_at: float | None = None
    last_status: int | None = None
    last_error: str | None = None
    ok: int = 0
    failed: int = 0
    cseq: int = 0

    def to_dict(self, now: float, call_id: str) -> dict[str, Any]:
        return {
            "state": self.state,
            "peer": self.peer,
            "expires": self.expires,
            "registered_at": self.registered_at,
            "expires_at": self.expires_at,
            "expires_in": None if self.expires_at is None else round(max(0.0, self.expires_at - now), 3),
            "next_attempt_at": self.next_attempt_at,
            "last_status": self.last_status,
            "last_error": self.last_error,
            "registrations_ok": self.ok,
            "registrations_failed": self.failed,
            "call_id": call_id,
            "cseq": self.cseq,
        }


class _Outcome:
    """How one attempt at one peer ended."""

    __slots__ = ("error", "granted", "next_peer", "status")

    def __init__(self, *, granted: int | None = None, error: str | None = None, status: int | None = None,
                 next_peer: bool = False) -> None:
        self.granted = granted
        self.error = error
        self.status = status
        self.next_peer = next_peer


class TrunkRegistrar:
    """Registers the trunks that ask for it, from the leader only (see the module doc)."""

    def __init__(self, machine: Any, *, is_leader: Callable[[], bool], contact: tuple[str, int],
                 bind_host: str = "127.0.0.1", node_id: str = "",
                 peers: Callable[[Trunk], list[PeerAddress]] = peer_addresses,
                 timeout: float = DEFAULT_TIMEOUT, retry_interval: float = DEFAULT_RETRY_INTERVAL,
                 takeover_delay: float = DEFAULT_TAKEOVER_DELAY, check_interval: float = DEFAULT_CHECK_INTERVAL,
                 wall_clock: Callable[[], float] = time.time) -> None:
        for name, value in (("timeout", timeout), ("retry_interval", retry_interval),
                            ("check_interval", check_interval)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be positive")
        if not (math.isfinite(takeover_delay) and takeover_delay >= 0):
            raise ValueError("takeover_delay must not be negative")
        self.machine = machine
        self.is_leader = is_leader
        self.contact = contact
        self.bind_host = bind_host
        self.node_id = node_id
        self.peers = peers
        self.timeout = float(timeout)
        self.retry_interval = float(retry_interval)
        self.takeover_delay = float(takeover_delay)
        self.check_interval = float(check_interval)
        self.wall_clock = wall_clock
        self.status: dict[str, RegistrationStatus] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._configs: dict[str, Trunk] = {}  # the trunk record each task runs with
        self._cseq: dict[str, int] = {}  # last CSeq per Call-ID (monotonic on this node)
        self._client = PeerClient(bind_host=bind_host, timeout=self.timeout, name="trunk.register",
                                  to_tag="trunk-registrar")
        self._supervisor: asyncio.Task[None] | None = None
        self._others: set[asyncio.Task[None]] = set()  # un-REGISTERs in flight
        self._wake = asyncio.Event()
        self._leading = False
        self._leading_since = 0.0

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind the registrar's socket (an ephemeral port on the node's SIP host) and start supervising."""
        await self._client.start()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def aclose(self) -> None:
        """Stop every task (no un-REGISTER: the next leader keeps the binding alive) and close the socket."""
        tasks = [t for t in (self._supervisor, *self._tasks.values(), *self._others) if t is not None]
        self._supervisor = None
        self._tasks.clear()
        self._others.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._client.aclose()

    @property
    def address(self) -> tuple[str, int] | None:
        """Where the REGISTERs come from (UDP)."""
        return self._client.address

    def leadership_changed(self, is_leader: bool = False, leader: str | None = None) -> None:
        """Replicator callback (on the event loop): reconcile now rather than at the next check."""
        self._wake.set()

    # -- supervision -------------------------------------------------------------------------------------
    async def _supervise(self) -> None:
        while True:
            try:
                self.reconcile()
            except Exception:  # never let supervision die
                log.exception("trunk.register_reconcile_failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.check_interval):
                    await self._wake.wait()
            self._wake.clear()

    def _wanted(self) -> dict[str, Trunk]:
        with self.machine.lock:
            trunks = list(self.machine.state.trunks.values())
        return {t.name: t for t in trunks if wants_registration(t)}

    def reconcile(self) -> None:
        """Start, restart and stop the per-trunk tasks to match leadership and the configuration."""
        loop = asyncio.get_running_loop()
        leading = bool(self.is_leader())
        if leading and not self._leading:
            self._leading_since = loop.time()
            log.info("trunk.register_leading", node=self.node_id)
        self._leading = leading
        wanted = self._wanted()
        for name in list(self._tasks):
            current = wanted.get(name) if leading else None
            if current is not None and current == self._configs.get(name):
                continue
            task = self._tasks.pop(name)
            task.cancel()
            old = self._configs.pop(name)
            status = self.status.get(name)
            if leading and status is not None and status.state == "registered" and status.peer and (
                    current is None or call_id_for(current) != call_id_for(old)
                    or status.peer not in {f"{p.host}:{p.port}" for p in peer_addresses(current)}):
                self._spawn_unregister(old, status.peer)  # the new record no longer refreshes that binding
        for name in [n for n in self.status if n not in wanted]:
            del self.status[name]
        for name, trunk in wanted.items():
            status = self.status.setdefault(name, RegistrationStatus())
            if not leading:
                status.state = "standby"
                status.next_attempt_at = None
                continue
            if name not in self._tasks:
                delay = max(0.0, self._leading_since + self.takeover_delay - loop.time())
                self._configs[name] = trunk
                self._tasks[name] = loop.create_task(self._keep_registered(trunk, status, delay))

    async def _keep_registered(self, trunk: Trunk, status: RegistrationStatus, delay: float) -> None:
        failures = 0
        if delay > 0:
            status.state = "waiting"
            status.next_attempt_at = self.wall_clock() + delay
            await asyncio.sleep(delay)
        while True:
            try:
                granted = await self._register(trunk, status, trunk.register_expires)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not end the registration for good
                log.exception("trunk.register_failed_unexpectedly", trunk=trunk.name)
                status.last_error = f"internal error: {type(exc).__name__}"
                granted = None
            if granted is not None:
                failures = 0
                wait = max(MIN_REFRESH, granted / 2)
            else:
                failures += 1
                wait = min(MAX_RETRY_INTERVAL, self.retry_interval * 2 ** min(failures - 1, 16))
            status.next_attempt_at = self.wall_clock() + wait
            await asyncio.sleep(wait)

    # -- one registration ----------------------------------------------------------------------------------
    async def _register(self, trunk: Trunk, status: RegistrationStatus, expires: int) -> int | None:
        """Register `trunk` at its first peer that answers; the granted expiry, or None if it failed."""
        status.state = "registering" if status.state != "registered" else status.state
        outcome = _Outcome(error="no peer")
        for peer in self.peers(trunk):
            if not self.is_leader():
                outcome = _Outcome(error="not the leader any more")
                break
            outcome = await self._attempt(trunk, peer, expires, status)
            if not outcome.next_peer:
                break
        now = self.wall_clock()
        status.last_status = outcome.status
        if outcome.granted is not None:
            status.state = "registered"
            status.last_error = None
            status.expires = outcome.granted
            status.registered_at = now
            status.expires_at = now + outcome.granted
            status.ok += 1
            log.info("trunk.registered", trunk=trunk.name, peer=status.peer, expires=outcome.granted)
            return outcome.granted
        status.failed += 1
        status.last_error = outcome.error
        if status.expires_at is None or status.expires_at <= now:
            status.state = "failed"
        log.warning("trunk.register_failed", trunk=trunk.name, error=outcome.error, status=outcome.status)
        return None

    def _next_cseq(self, call_id: str) -> int:
        ticks = int((self.wall_clock() - CSEQ_EPOCH) * CSEQ_TICKS_PER_SECOND)
        cseq = min(CSEQ_MAX, max(self._cseq.get(call_id, 0) + 1, ticks, 1))
        self._cseq[call_id] = cseq
        return cseq

    def _request(self, trunk: Trunk, peer: PeerAddress, cseq: int, expires: int,
                 authorization: tuple[str, str] | None) -> tuple[Request, str]:
        local = self._client.local
        tcp = peer.transport == "tcp"
        domain = _domain(trunk, peer)
        uri = f"sip:{domain}" + (";transport=tcp" if tcp else "")
        aor = f"sip:{trunk.username}@{domain}"
        host, port = self.contact
        contact_host = f"[{host}]" if ":" in host else host
        contact = f"<sip:{trunk.username}@{contact_host}:{port}" + (";transport=tcp" if tcp else "") + ">"
        branch = "z9hG4bK-tr-" + secrets.token_hex(8)
        headers = [
            ("Via", f"SIP/2.0/{'TCP' if tcp else 'UDP'} {local[0]}:{local[1]};branch={branch};rport"),
            ("Max-Forwards", "70"),
            ("From", f"<{aor}>;tag={_tag_for(trunk)}"),
            ("To", f"<{aor}>"),
            ("Call-ID", call_id_for(trunk)),
            ("CSeq", f"{cseq} REGISTER"),
            ("Contact", contact),
            ("Expires", str(expires)),
            ("User-Agent", "raftpbx trunk registration"),
        ]
        if authorization is not None:
            headers.append(authorization)
        headers.append(("Content-Length", "0"))
        return Request("REGISTER", uri, headers), branch

    async def _attempt(self, trunk: Trunk, peer: PeerAddress, expires: int,
                       status: RegistrationStatus) -> _Outcome:
        """Register at one peer: challenge answered, 423 honoured (see the module doc)."""
        authorization: tuple[str, str] | None = None
        answered: str | None = None  # the nonce we answered
        status.peer = f"{peer.host}:{peer.port}"
        asked = expires
        last_status: int | None = None
        for _ in range(MAX_ROUNDS):
            if not self.is_leader():
                return _Outcome(error="not the leader any more", status=last_status)
            call_id = call_id_for(trunk)
            cseq = self._next_cseq(call_id)
            status.cseq = cseq
            request, branch = self._request(trunk, peer, cseq, asked, authorization)
            result = await self._transact(request, branch, peer)
            if isinstance(result, str):
                return _Outcome(error=f"{status.peer}: {result}", status=last_status, next_peer=True)
            code = last_status = result.status
            if 200 <= code < 300:
                return _Outcome(granted=self._granted(result, asked), status=code)
            if code in (401, 407):
                header = "WWW-Authenticate" if code == 401 else "Proxy-Authenticate"
                challenge = self._challenge(trunk, result.headers.get_all(header))
                if challenge is None:
                    return _Outcome(error=f"{status.peer}: {code} without a usable Digest challenge for realm "
                                          f"{trunk.realm!r}", status=code)
                if answered is not None and not (challenge.stale and challenge.nonce != answered):
                    return _Outcome(error=f"{status.peer}: credentials refused ({code} again)", status=code)
                ha1 = trunk.ha1_sha256 if challenge.algorithm.upper() == "SHA-256" else trunk.ha1_md5
                value = make_authorization(username=trunk.username, ha1=ha1, challenge=challenge,
                                           method="REGISTER", uri=request.uri, cnonce=secrets.token_hex(8))
                authorization = ("Authorization" if code == 401 else "Proxy-Authorization", value)
                answered = challenge.nonce
                continue
            if code == 423:
                minimum = _small_int(result.headers.get("Min-Expires"))
                if minimum is None or minimum <= asked or minimum > MAX_EXPIRES:
                    return _Outcome(error=f"{status.peer}: 423 without a usable Min-Expires", status=code)
                asked = minimum
                continue
            if code == 503:
                return _Outcome(error=f"{status.peer}: 503 {result.reason[:64]}", status=code, next_peer=True)
            return _Outcome(error=f"{status.peer}: {code} {result.reason[:64]}", status=code)
        return _Outcome(error=f"{status.peer}: gave up after {MAX_ROUNDS} requests", status=last_status)

    @staticmethod
    def _challenge(trunk: Trunk, values: list[str]) -> Challenge | None:
        """The first Digest challenge for the trunk's realm with an algorithm we hold an HA1 for."""
        for challenge in challenges_for(values):
            if challenge.realm == trunk.realm and challenge.algorithm.upper() in ("MD5", "SHA-256") and (
                    not challenge.qop or "auth" in challenge.qop):
                return challenge
        return None

    def _granted(self, response: Response, asked: int) -> int:
        """Our Contact's expires in the 2xx, else its Expires header, else what we asked (§10.2.4)."""
        host, port = self.contact
        try:
            contacts = response.contacts
        except SipParseError:
            contacts = ()
        for contact in contacts:
            uri = contact.uri
            ours = getattr(uri, "host", "").strip("[]") == host and (getattr(uri, "port", None) or 5060) == port
            if ours and contact.expires is not None:
                return min(int(contact.expires), MAX_EXPIRES)
        try:
            header = response.expires
        except SipParseError:
            header = None
        return min(header, MAX_EXPIRES) if header is not None else asked

    # -- un-REGISTER ---------------------------------------------------------------------------------------
    def _spawn_unregister(self, trunk: Trunk, peer_text: str) -> None:
        task = asyncio.get_running_loop().create_task(self._unregister(trunk, peer_text))
        self._others.add(task)
        task.add_done_callback(self._others.discard)

    async def _unregister(self, trunk: Trunk, peer_text: str) -> None:
        """Best effort: remove our binding at the peer we were registered with (Expires: 0, §10.2.2)."""
        try:
            peers = [p for p in peer_addresses(trunk) if f"{p.host}:{p.port}" == peer_text]
            if not peers:
                return
            outcome = await self._attempt(trunk, peers[0], 0, RegistrationStatus())
            log.info("trunk.unregistered", trunk=trunk.name, peer=peer_text,
                     status=outcome.status, error=outcome.error)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("trunk.unregister_failed", trunk=trunk.name)

    # -- transactions --------------------------------------------------------------------------------------
    async def _transact(self, request: Request, branch: str, peer: PeerAddress) -> Response | str:
        """Send `request` in a client transaction; its final response, or why there is none."""
        return await self._client.transact(request, branch, peer)

    # -- views ---------------------------------------------------------------------------------------------
    def status_of(self, trunk: Trunk) -> dict[str, Any] | None:
        """The registration of `trunk` as this node sees it; None if the trunk does not register."""
        if not wants_registration(trunk):
            return None
        status = self.status.get(trunk.name) or RegistrationStatus(state="waiting" if self._leading else "standby")
        return status.to_dict(self.wall_clock(), call_id_for(trunk))

    def metrics_lines(self) -> list[str]:
        """Prometheus lines: registered (gauge), seconds until the binding expires, registrations by result."""
        with self.machine.lock:
            trunks = [t for t in self.machine.state.trunks.values() if wants_registration(t)]
        now = self.wall_clock()
        registered, remaining, totals = [], [], []
        for trunk in trunks:
            status = self.status.get(trunk.name) or RegistrationStatus()
            labels = f'node="{self.node_id}",trunk="{trunk.name}"'
            live = status.state == "registered" and status.expires_at is not None and status.expires_at > now
            registered.append(f"raftpbx_trunk_registered{{{labels}}} {1 if live else 0}")
            if live and status.expires_at is not None:
                remaining.append(f"raftpbx_trunk_registration_expires_seconds{{{labels}}} "
                                 f"{max(0.0, status.expires_at - now):.3f}")
            totals.append(f'raftpbx_trunk_registrations_total{{{labels},result="ok"}} {status.ok}')
            totals.append(f'raftpbx_trunk_registrations_total{{{labels},result="failed"}} {status.failed}')
        return [
            "# HELP raftpbx_trunk_registered 1 while this node holds a live registration of the trunk at its peer",
            "# TYPE raftpbx_trunk_registered gauge", *registered,
            "# HELP raftpbx_trunk_registration_expires_seconds seconds until the trunk's registration expires",
            "# TYPE raftpbx_trunk_registration_expires_seconds gauge", *remaining,
            "# HELP raftpbx_trunk_registrations_total registration attempts of the trunk by result",
            "# TYPE raftpbx_trunk_registrations_total counter", *totals,
        ]


def _small_int(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit() or len(value) > 10:
        return None
    return int(value)
