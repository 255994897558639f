"""SIP transactions (RFC 3261 §17, amended by RFC 6026) as sans-I/O state machines.

Theory of operation
-------------------
Four state machines, one per transaction kind, and a `TransactionLayer` that owns them:

- `InviteClientTransaction` (§17.1.1, RFC 6026 §8.4): Calling -> Proceeding -> Completed | Accepted
  -> Terminated; timers A (request retransmission), B (timeout), D (absorb response
  retransmissions), M (Accepted: keep matching 2xx retransmissions and forked 2xx).
- `NonInviteClientTransaction` (§17.1.2): Trying -> Proceeding -> Completed -> Terminated; timers E
  (retransmission, capped at T2), F (timeout), K (absorb response retransmissions).
- `InviteServerTransaction` (§17.2.1, RFC 6026 §8.5-§8.7): Proceeding -> Completed -> Confirmed, or
  Proceeding -> Accepted, then Terminated; timers G (final response retransmission), H (wait for
  ACK), I (absorb ACK retransmissions), L (Accepted: absorb INVITE retransmissions), plus the
  200 ms "Trying" timer of §17.2.1 (send 100 Trying if the TU has not answered).
- `NonInviteServerTransaction` (§17.2.2): Trying -> Proceeding -> Completed -> Terminated; timer J.

Nothing here reads a clock or touches a socket. Every entry point takes `now` (seconds, any
monotonic origin); a machine's only outputs are queued: messages to transmit (`messages_to_send()`
gives `Transmit` records, `datagrams_to_send()` the same drained as bytes; use one or the other),
events for the transaction user (`next_event()`), and the time it next wants to be woken
(`next_timer()`, then `handle_timer(now)`). This is the aioquic shape: the asyncio shell calls
`receive`, drains, transmits, and re-arms one `call_at` for `next_timer()`.

The layer matches incoming messages to transactions (§17.1.3 for responses: top Via branch plus
CSeq method; §17.2.3 for requests: branch plus sent-by plus method, ACK matching its INVITE, CANCEL
a transaction of its own; without the magic cookie, the RFC 2543 rules of §17.2.3's second part),
creates server transactions for new requests, and keeps all timers behind one `next_timer()` (a heap
with lazy deletion, so the cost does not grow with the number of idle transactions).

Invariants
----------
- A request retransmission that matches a server transaction never reaches the TU as a new
  request: it is absorbed or answered with the last response (§17.2.1, §17.2.2).
- A Terminated transaction has no timers and emits exactly one `Terminated` event, after which the
  layer forgets it.
- `TransactionLayer.receive` never raises for a message `parse_message` returned (bad network input
  never raises into the event loop); a message it cannot key is dropped and counted in `dropped`.
- Retransmission times are exact: each timer is re-armed at `now + interval` where `now` is the time
  passed to `handle_timer` (a late wake-up shifts the schedule rather than bursting).

Deliberate choices
------------------
- Reliable transports (`reliable=True`, TCP/TLS): timers A, E, G are not started; D, I, J, K are
  zero, so the machine moves to Terminated at once rather than arming a 0 s timer (§17.1.1.2,
  §17.1.2.2, §17.2.1, §17.2.2).
- Responses of a server transaction are sent to the `source` given with the request; the shell passes
  the §18.2.2 address there if it differs from the packet source (e.g. no rport).
- `send` on a server transaction ignores (returns False) a response that its state does not allow,
  e.g. a 180 after the final response, since a proxy may relay such responses from the network.
- In Accepted, a client transaction passes every 2xx to the TU (RFC 6026 §8.4) marking repeats of a
  To tag already seen as `retransmission=True`; it never ACKs a 2xx itself.
- A retransmitted INVITE that arrives before the TU or the Trying timer produced any response is
  answered with 100 Trying at once (it is what the Trying timer exists for).
- A non-INVITE server transaction that enters Completed over an unreliable transport swaps its
  `request` for an equal copy (`Request.copy()`: the same fields, none of the objects parsed from them):
  for 64*T1 it only answers retransmissions, and under load those parsed objects were most of what the
  garbage collector walked (about 26 tracked objects per transaction before, 9 after).
"""

from __future__ import annotations

import enum
import hashlib
import heapq
from collections import deque
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from .errors import SipParseError, SipValueError
from .message import HeaderField, Headers, Request, Response, make_response

__all__ = [
    "DEFAULT_TIMERS",
    "MAGIC_COOKIE",
    "Address",
    "ClientTransaction",
    "Event",
    "InviteClientTransaction",
    "InviteServerTransaction",
    "NonInviteClientTransaction",
    "NonInviteServerTransaction",
    "RequestReceived",
    "ResponseReceived",
    "ServerTransaction",
    "State",
    "Terminated",
    "TimedOut",
    "TimerConfig",
    "Transaction",
    "TransactionKey",
    "TransactionLayer",
    "Transmit",
    "TransportError",
    "build_ack",
    "build_cancel",
    "client_key",
    "derive_branch",
    "server_key",
]

MAGIC_COOKIE = "z9hG4bK"  # §8.1.1.7

Address: TypeAlias = tuple[str, int]
TransactionKey: TypeAlias = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class TimerConfig:
    """T1, T2, T4 (§17.1.1.1, table 4) and the values derived from them."""

    t1: float = 0.5  # RTT estimate
    t2: float = 4.0  # cap on non-INVITE request and INVITE response retransmission intervals
    t4: float = 5.0  # maximum time a message stays in the network
    timer_d: float = 32.0  # §17.1.1.2: at least 32 s over unreliable transports
    trying_delay: float = 0.2  # §17.2.1: send 100 Trying unless the TU answers within 200 ms

    def __post_init__(self) -> None:
        if not (
            self.t1 > 0
            and self.t2 >= self.t1
            and self.t4 > 0
            and self.timer_d >= 0
            and self.trying_delay >= 0
        ):
            raise SipValueError("timers need T1 > 0, T2 >= T1, T4 > 0, D >= 0, trying delay >= 0")

    @property
    def timeout(self) -> float:
        """64*T1: timers B, F, H, J (unreliable), L and M."""
        return 64 * self.t1


DEFAULT_TIMERS = TimerConfig()


class State(enum.Enum):
    CALLING = "Calling"
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"
    ACCEPTED = "Accepted"
    TERMINATED = "Terminated"


# --------------------------------------------------------------------------------------------------
# Outputs
#
# Plain slotted records, not frozen: a frozen dataclass's __init__ sets each field through
# object.__setattr__ (about 1,200 instructions a field on CPython 3.11; a Transmit cost 7,000), and one or
# two of these are made per message. Nothing mutates them once made; equality is identity (eq=False).


@dataclass(eq=False, slots=True)
class Transmit:
    """A message for the transport: where, over which kind of transport, on whose behalf, and why
    (`timer` names the retransmission timer that fired; `retransmission` is True for any resend)."""

    message: Request | Response
    destination: Address
    reliable: bool
    transaction: Transaction | None
    retransmission: bool = False
    timer: str | None = None


@dataclass(eq=False, slots=True)
class RequestReceived:
    """A new request for the TU. `transaction` is its server transaction, or None for an ACK that
    matches none (the ACK of a 2xx, §17.2.3 / RFC 6026 §8.7), which the TU handles itself. An ACK
    matching an INVITE server transaction in Accepted state comes with that transaction."""

    request: Request
    transaction: ServerTransaction | None
    source: Address


@dataclass(eq=False, slots=True)
class ResponseReceived:
    """A response for the TU. `transaction` is None for a response matching no client transaction
    (a proxy forwards those statelessly, §16.7 / RFC 6026 §8.3)."""

    response: Response
    transaction: ClientTransaction | None
    retransmission: bool = False


@dataclass(eq=False, slots=True)
class TimedOut:
    """Timer B, F or H fired: no final response (B, F), no ACK (H)."""

    transaction: Transaction
    timer: str


@dataclass(eq=False, slots=True)
class TransportError:
    """The transport could not send for this transaction (§17.1.4, §17.2.4)."""

    transaction: Transaction
    reason: str


@dataclass(eq=False, slots=True)
class Terminated:
    """The transaction reached Terminated and is forgotten by the layer. `cause` says why
    ("timer D", "timer K = 0 (reliable)", "transport error"...), for logs and transcripts."""

    transaction: Transaction
    cause: str


Event: TypeAlias = RequestReceived | ResponseReceived | TimedOut | TransportError | Terminated


# --------------------------------------------------------------------------------------------------
# Keys (§17.1.3, §17.2.3)


def _sent_by(request: Request | Response) -> str:
    via = request.top_via
    host = via.host.lower()
    return host if via.port is None else f"{host}:{via.port}"


def server_key(request: Request, *, method: str | None = None) -> TransactionKey:
    """The key matching `request` to a server transaction (§17.2.3).

    With the magic cookie: (branch, sent-by, method), ACK counting as INVITE. Without it (RFC 2543
    peers): (Request-URI, From tag, Call-ID, CSeq number, top Via, method); the To tag is checked
    apart (`InviteServerTransaction.to_tag_matches`) because an ACK carries the tag of the response.
    `method` overrides the method (CANCEL matching uses "INVITE", §9.2).
    Raises SipParseError if the request lacks what the key needs.
    """
    m = method if method is not None else request.method
    if m == "ACK":
        m = "INVITE"
    branch = request.branch
    if branch is not None and branch.startswith(MAGIC_COOKIE):
        return ("3261", branch, _sent_by(request), m)
    return (
        "2543",
        request.uri,
        request.from_tag or "",
        request.call_id,
        request.cseq.seq,
        str(request.top_via),
        m,
    )


def client_key(message: Request | Response) -> TransactionKey | None:
    """The key of a client transaction (§17.1.3): top Via branch plus CSeq method; None without branch."""
    branch = message.branch
    if branch is None:
        return None
    method = message.method if isinstance(message, Request) else message.cseq.method
    return (branch, method)


def derive_branch(*parts: str) -> str:
    """A branch with the magic cookie derived only from `parts` (DESIGN decision 5: a proxy derives
    the branch of a forwarded request from the incoming one, so a retransmission of it that lands
    on another node continues the same downstream transaction)."""
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogateescape")).hexdigest()
    return MAGIC_COOKIE + digest[:32]


# --------------------------------------------------------------------------------------------------
# ACK for non-2xx (§17.1.1.3)


def build_ack(invite: Request, response: Response) -> Request:
    """The ACK a client transaction sends for a 300-699 response (§17.1.1.3).

    Request-URI, Call-ID, From and CSeq number of the INVITE, CSeq method ACK, To of the response
    (with its tag), one Via equal to the INVITE's top Via, the INVITE's Route fields, no body.
    """
    original = invite.headers.fields
    fields: list[HeaderField] = [HeaderField("Via", str(invite.top_via))]
    fields.extend(f for f in original if f.key == "route")
    fields.append(HeaderField("Max-Forwards", "70"))
    fields.extend(f for f in original if f.key == "from")
    to = response.headers.get("To")
    if to is not None:
        fields.append(HeaderField("To", to))
    fields.append(HeaderField("Call-ID", invite.call_id))
    fields.append(HeaderField("CSeq", f"{invite.cseq.seq} ACK"))
    return Request("ACK", invite.uri, Headers.from_fields(fields))


def build_cancel(invite: Request) -> Request:
    """A CANCEL for `invite` (§9.1): its Request-URI, Call-ID, From, To and CSeq number, CSeq method
    CANCEL, one Via equal to its top Via (same branch, so the next hop matches it to the INVITE,
    §9.2), its Route fields, no body. Send it as a client transaction of its own, and only once a
    provisional response has arrived (§9.1)."""
    original = invite.headers.fields
    fields: list[HeaderField] = [HeaderField("Via", str(invite.top_via))]
    fields.extend(f for f in original if f.key == "route")
    fields.append(HeaderField("Max-Forwards", "70"))
    fields.extend(f for f in original if f.key == "from")
    fields.extend(f for f in original if f.key == "to")
    fields.append(HeaderField("Call-ID", invite.call_id))
    fields.append(HeaderField("CSeq", f"{invite.cseq.seq} CANCEL"))
    return Request("CANCEL", invite.uri, Headers.from_fields(fields))


# --------------------------------------------------------------------------------------------------
# The machines


class Transaction:
    """What every transaction kind shares: state, timers, and the output queues."""

    kind: ClassVar[str] = "transaction"

    request: Request
    peer: Address
    reliable: bool
    timers: TimerConfig
    state: State
    key: TransactionKey

    def __init__(self, request: Request, peer: Address, *, reliable: bool, timers: TimerConfig) -> None:
        self.request = request
        self.peer = peer
        self.reliable = reliable
        self.timers = timers
        self._deadlines: dict[str, float] = {}
        self._outbox: list[Transmit] = []
        self._events: list[Event] = []  # a few at most: a list is cheaper to make than a deque

    # --- outputs ------------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        """When `handle_timer` must next be called, or None if no timer is armed."""
        return min(self._deadlines.values()) if self._deadlines else None

    def handle_timer(self, now: float) -> None:
        """Fire every timer due at `now`, earliest first (ties by timer name)."""
        for _ in range(len(_TIMER_NAMES) + 1):
            due = [(deadline, name) for name, deadline in self._deadlines.items() if deadline <= now]
            if not due:
                return
            _, name = min(due)
            del self._deadlines[name]
            self._on_timer(name, now)

    def next_event(self) -> Event | None:
        """The next event for the TU, or None."""
        return self._events.pop(0) if self._events else None

    def messages_to_send(self) -> list[Transmit]:
        """Drain the queued transmissions."""
        out, self._outbox = self._outbox, []
        return out

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """Drain the queued transmissions as (bytes, destination)."""
        return [(t.message.to_bytes(), t.destination) for t in self.messages_to_send()]

    @property
    def terminated(self) -> bool:
        return self.state is State.TERMINATED

    def transport_error(self, now: float, reason: str = "transport error") -> None:
        """The transport failed to send for this transaction: inform the TU and terminate
        (§17.1.4, §17.2.4)."""
        del now
        if self.terminated:
            return
        self._events.append(TransportError(self, reason))
        self._terminate("transport error")

    # --- helpers for the kinds ----------------------------------------------------------------

    def _on_timer(self, name: str, now: float) -> None:
        raise NotImplementedError

    def _start_timer(self, name: str, interval: float, now: float) -> None:
        self._deadlines[name] = now + interval

    def _stop_timers(self, *names: str) -> None:
        for name in names:
            self._deadlines.pop(name, None)

    def _transmit(
        self, message: Request | Response, *, retransmission: bool = False, timer: str | None = None
    ) -> None:
        self._outbox.append(Transmit(message, self.peer, self.reliable, self, retransmission, timer))

    def _terminate(self, cause: str) -> None:
        if self.state is State.TERMINATED:
            return
        self.state = State.TERMINATED
        self._deadlines.clear()
        self._events.append(Terminated(self, cause))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.state.value} {self.request.method} key={self.key!r}>"


_MAX_FORKS = 64  # distinct 2xx To tags remembered per INVITE client transaction

_TIMER_NAMES = ("A", "B", "D", "E", "F", "G", "H", "I", "J", "K", "L", "M", "Trying")


class ClientTransaction(Transaction):
    """A client transaction: created by sending a request; fed the responses that match it."""

    def __init__(
        self, request: Request, destination: Address, *, reliable: bool, timers: TimerConfig
    ) -> None:
        super().__init__(request, destination, reliable=reliable, timers=timers)
        key = client_key(request)
        if key is None or not str(key[0]).startswith(MAGIC_COOKIE):
            raise SipValueError("a client transaction needs a top Via branch with the magic cookie")
        self.key = key

    def receive(self, response: Response, now: float) -> None:
        """A response matching this transaction arrived from the network."""
        raise NotImplementedError


class InviteClientTransaction(ClientTransaction):
    """§17.1.1 with RFC 6026 §8.4 (Accepted state, timer M)."""

    kind = "ict"

    def __init__(
        self,
        request: Request,
        destination: Address,
        now: float,
        *,
        reliable: bool = False,
        timers: TimerConfig = DEFAULT_TIMERS,
    ) -> None:
        if request.method != "INVITE":
            raise SipValueError("an INVITE client transaction needs an INVITE")
        super().__init__(request, destination, reliable=reliable, timers=timers)
        self.state = State.CALLING
        self.ack: Request | None = None
        self._a_interval = timers.t1
        self._tags_2xx: set[str] = set()
        # §17.1.1.2: send; timer A = T1 over unreliable transports only; timer B = 64*T1 always.
        self._transmit(request)
        if not reliable:
            self._start_timer("A", timers.t1, now)
        self._start_timer("B", timers.timeout, now)

    def receive(self, response: Response, now: float) -> None:
        status = response.status
        if self.state in (State.CALLING, State.PROCEEDING):
            self._stop_timers("A", "B")
            if status < 200:
                self.state = State.PROCEEDING  # §17.1.1.2: no more retransmissions
                self._events.append(ResponseReceived(response, self))
            elif status < 300:
                # RFC 6026 §8.4: Accepted, timer M = 64*T1; the TU ACKs 2xx itself.
                self.state = State.ACCEPTED
                self._tags_2xx.add(response.to_tag or "")
                self._start_timer("M", self.timers.timeout, now)
                self._events.append(ResponseReceived(response, self))
            else:
                # §17.1.1.2: Completed; ACK (§17.1.1.3); timer D (0 over reliable transports).
                self.state = State.COMPLETED
                self.ack = build_ack(self.request, response)
                self._transmit(self.ack)
                self._events.append(ResponseReceived(response, self))
                if self.reliable:
                    self._terminate("timer D = 0 (reliable)")
                else:
                    self._start_timer("D", self.timers.timer_d, now)
        elif self.state is State.COMPLETED:
            # §17.1.1.2: a retransmitted final response makes us resend the ACK; not for the TU.
            if status >= 300 and self.ack is not None:
                self._transmit(self.ack, retransmission=True)
        elif self.state is State.ACCEPTED and 200 <= status < 300:
            # RFC 6026 §8.4: every 2xx goes to the TU, which (re)sends the ACK.
            tag = response.to_tag or ""
            repeat = tag in self._tags_2xx
            if len(self._tags_2xx) < _MAX_FORKS:  # bounded: To tags come from the network
                self._tags_2xx.add(tag)
            self._events.append(ResponseReceived(response, self, retransmission=repeat))

    def _on_timer(self, name: str, now: float) -> None:
        if name == "A" and self.state is State.CALLING:
            # §17.1.1.2: retransmit, then double the interval (no T2 cap for INVITE requests).
            self._transmit(self.request, retransmission=True, timer="A")
            self._a_interval *= 2
            self._start_timer("A", self._a_interval, now)
        elif name == "B" and self.state is State.CALLING:
            self._events.append(TimedOut(self, "B"))
            self._terminate("timer B")
        elif (name == "D" and self.state is State.COMPLETED) or (
            name == "M" and self.state is State.ACCEPTED
        ):
            self._terminate(f"timer {name}")


class NonInviteClientTransaction(ClientTransaction):
    """§17.1.2."""

    kind = "nict"

    def __init__(
        self,
        request: Request,
        destination: Address,
        now: float,
        *,
        reliable: bool = False,
        timers: TimerConfig = DEFAULT_TIMERS,
    ) -> None:
        if request.method in ("INVITE", "ACK"):
            raise SipValueError(f"a non-INVITE client transaction cannot send {request.method}")
        super().__init__(request, destination, reliable=reliable, timers=timers)
        self.state = State.TRYING
        self._e_interval = timers.t1
        # §17.1.2.2: send; timer F = 64*T1; timer E = T1 over unreliable transports only.
        self._transmit(request)
        if not reliable:
            self._start_timer("E", timers.t1, now)
        self._start_timer("F", timers.timeout, now)

    def receive(self, response: Response, now: float) -> None:
        if self.state not in (State.TRYING, State.PROCEEDING):
            return  # Completed absorbs retransmitted responses (§17.1.2.2)
        if response.status < 200:
            self.state = State.PROCEEDING
            self._events.append(ResponseReceived(response, self))
            return
        self.state = State.COMPLETED
        self._stop_timers("E", "F")
        self._events.append(ResponseReceived(response, self))
        if self.reliable:
            self._terminate("timer K = 0 (reliable)")
        else:
            self._start_timer("K", self.timers.t4, now)

    def _on_timer(self, name: str, now: float) -> None:
        if name == "E" and self.state in (State.TRYING, State.PROCEEDING):
            # §17.1.2.2: in Trying the interval doubles up to T2; in Proceeding it is T2.
            self._transmit(self.request, retransmission=True, timer="E")
            if self.state is State.TRYING:
                self._e_interval = min(2 * self._e_interval, self.timers.t2)
            else:
                self._e_interval = self.timers.t2
            self._start_timer("E", self._e_interval, now)
        elif name == "F" and self.state in (State.TRYING, State.PROCEEDING):
            self._events.append(TimedOut(self, "F"))
            self._terminate("timer F")
        elif name == "K" and self.state is State.COMPLETED:
            self._terminate("timer K")


class ServerTransaction(Transaction):
    """A server transaction: created by a request from the network; the TU answers with `send`."""

    last_response: Response | None
    # The transport's note of the local address (a listener) the request arrived on, so that the answers
    # leave from it (RFC 3261 §18.2.2); None: the primary socket. This layer never reads it. (An attribute,
    # not a weak-keyed map in the transport: compiled with mypyc, a transaction takes no weak reference.)
    local: Address | None

    def __init__(
        self,
        request: Request,
        source: Address,
        *,
        reliable: bool,
        timers: TimerConfig,
        key: TransactionKey | None,
    ) -> None:
        super().__init__(request, source, reliable=reliable, timers=timers)
        self.key = key if key is not None else server_key(request)
        self.last_response = None
        self.local = None
        self._events.append(RequestReceived(request, self, source))

    def receive(self, request: Request, now: float) -> None:
        """A request matching this transaction (a retransmission, or the ACK) arrived."""
        raise NotImplementedError

    def send(self, response: Response, now: float) -> bool:
        """The TU answers. Returns False (and sends nothing) if the state does not allow it."""
        raise NotImplementedError


class InviteServerTransaction(ServerTransaction):
    """§17.2.1 with RFC 6026 §8.5-§8.7 (Accepted state, timer L)."""

    kind = "ist"

    def __init__(
        self,
        request: Request,
        source: Address,
        now: float,
        *,
        reliable: bool = False,
        timers: TimerConfig = DEFAULT_TIMERS,
        key: TransactionKey | None = None,
    ) -> None:
        if request.method != "INVITE":
            raise SipValueError("an INVITE server transaction needs an INVITE")
        super().__init__(request, source, reliable=reliable, timers=timers, key=key)
        self.state = State.PROCEEDING
        self.response_to_tag: str | None = None  # To tag of our final response (RFC 2543 ACK match)
        self._g_interval = timers.t1
        # §17.2.1: 100 Trying unless the TU answers within 200 ms.
        if timers.trying_delay <= 0:
            self._send_trying()
        else:
            self._start_timer("Trying", timers.trying_delay, now)

    def to_tag_matches(self, request: Request) -> bool:
        """RFC 2543 matching (§17.2.3): the To tag of an ACK equals the tag of our response, that of
        any other request (INVITE retransmission, CANCEL) equals the INVITE's."""
        tag = request.to_tag
        if request.method == "ACK":
            return tag == self.response_to_tag or (tag == self.request.to_tag and tag is not None)
        return tag == self.request.to_tag

    def _send_trying(self, timer: str | None = None) -> None:
        trying = make_response(self.request, 100)
        self.last_response = trying
        self._transmit(trying, timer=timer)

    def receive(self, request: Request, now: float) -> None:
        if request.method == "ACK":
            if self.state is State.COMPLETED:
                # §17.2.1: Confirmed; stop G and H; timer I = T4 (0 over reliable transports).
                self.state = State.CONFIRMED
                self._stop_timers("G", "H")
                if self.reliable:
                    self._terminate("timer I = 0 (reliable)")
                else:
                    self._start_timer("I", self.timers.t4, now)
            elif self.state is State.ACCEPTED:
                # RFC 6026 §8.7: an ACK in Accepted goes to the TU, not absorbed.
                self._events.append(RequestReceived(request, self, self.peer))
            return  # Confirmed absorbs ACK retransmissions; an ACK before any final is ignored
        # A retransmission of the INVITE.
        if self.state is State.PROCEEDING:
            if self.last_response is None:
                self._stop_timers("Trying")
                self._send_trying()
            else:
                self._transmit(self.last_response, retransmission=True)
        elif self.state is State.COMPLETED and self.last_response is not None:
            self._transmit(self.last_response, retransmission=True)
        # Confirmed and Accepted (RFC 6026 §8.7) absorb INVITE retransmissions.

    def send(self, response: Response, now: float) -> bool:
        status = response.status
        if self.state is State.PROCEEDING:
            self._stop_timers("Trying")
            self._transmit(response)
            self.last_response = response
            if status < 200:
                return True
            self.response_to_tag = response.to_tag
            if status < 300:
                # RFC 6026 §8.5: Accepted, timer L = 64*T1; the TU retransmits the 2xx itself.
                self.state = State.ACCEPTED
                self._start_timer("L", self.timers.timeout, now)
            else:
                # §17.2.1: Completed; timer G = T1 (unreliable only), timer H = 64*T1.
                self.state = State.COMPLETED
                if not self.reliable:
                    self._start_timer("G", self._g_interval, now)
                self._start_timer("H", self.timers.timeout, now)
            return True
        if self.state is State.ACCEPTED and 200 <= status < 300:
            # RFC 6026 §8.6: a 2xx retransmission from the TU is passed to the transport.
            self._transmit(response, retransmission=True)
            return True
        return False

    def _on_timer(self, name: str, now: float) -> None:
        if name == "Trying" and self.state is State.PROCEEDING and self.last_response is None:
            self._send_trying(timer="Trying")
        elif name == "G" and self.state is State.COMPLETED and self.last_response is not None:
            # §17.2.1: retransmit; the interval doubles up to T2.
            self._transmit(self.last_response, retransmission=True, timer="G")
            self._g_interval = min(2 * self._g_interval, self.timers.t2)
            self._start_timer("G", self._g_interval, now)
        elif name == "H" and self.state is State.COMPLETED:
            self._events.append(TimedOut(self, "H"))
            self._terminate("timer H")
        elif (name == "I" and self.state is State.CONFIRMED) or (
            name == "L" and self.state is State.ACCEPTED
        ):
            self._terminate(f"timer {name}")


class NonInviteServerTransaction(ServerTransaction):
    """§17.2.2."""

    kind = "nist"

    def __init__(
        self,
        request: Request,
        source: Address,
        now: float,
        *,
        reliable: bool = False,
        timers: TimerConfig = DEFAULT_TIMERS,
        key: TransactionKey | None = None,
    ) -> None:
        if request.method in ("INVITE", "ACK"):
            raise SipValueError(f"a non-INVITE server transaction cannot serve {request.method}")
        super().__init__(request, source, reliable=reliable, timers=timers, key=key)
        del now
        self.state = State.TRYING

    def receive(self, request: Request, now: float) -> None:
        # §17.2.2: Trying discards retransmissions; Proceeding and Completed resend the last response.
        if self.state in (State.PROCEEDING, State.COMPLETED) and self.last_response is not None:
            self._transmit(self.last_response, retransmission=True)

    def send(self, response: Response, now: float, *, linger: bool = True) -> bool:
        """`linger=False` (a final response the TU would give again to a retransmission, e.g. a digest
        challenge): terminate at once, as over a reliable transport, instead of holding the request for
        64*T1 in Completed; a retransmission then makes a new transaction and the TU answers it again
        (a stateless UAS, §8.2.7)."""
        if self.state not in (State.TRYING, State.PROCEEDING):
            return False  # Completed: further final responses are discarded (§17.2.2)
        self._transmit(response)
        self.last_response = response
        if response.status < 200:
            self.state = State.PROCEEDING
            return True
        self.state = State.COMPLETED
        if self.reliable:
            self._terminate("timer J = 0 (reliable)")
        elif not linger:
            self._terminate("stateless answer (no timer J)")
        else:
            # Completed only answers retransmissions with `last_response` for 64*T1: keep the request's
            # fields, not the objects parsed from them (From, To, Via, Contact, URIs...), which the garbage
            # collector would otherwise walk for 32 s per request. Same message, re-parsed on demand.
            self.request = self.request.copy()
            self._start_timer("J", self.timers.timeout, now)
        return True

    def _on_timer(self, name: str, now: float) -> None:
        if name == "J" and self.state is State.COMPLETED:
            self._terminate("timer J")


# --------------------------------------------------------------------------------------------------
# The layer


class TransactionLayer:
    """Matches messages to transactions, creates server transactions, and merges every
    transaction's timers, transmissions and events into one set of outputs."""

    def __init__(self, *, timers: TimerConfig = DEFAULT_TIMERS) -> None:
        self.timers = timers
        self.client_transactions: dict[TransactionKey, ClientTransaction] = {}
        self.server_transactions: dict[TransactionKey, ServerTransaction] = {}
        self.dropped = 0  # messages that could not be keyed (counted, never raised)
        self._outbox: list[Transmit] = []
        self._events: deque[Event] = deque()
        self._heap: list[tuple[float, int, Transaction]] = []
        self._armed: dict[Transaction, float] = {}
        self._seq = 0

    # --- TU side ------------------------------------------------------------------------------

    def send_request(
        self, request: Request, now: float, destination: Address, *, reliable: bool = False
    ) -> ClientTransaction:
        """Start a client transaction for `request` (INVITE or non-INVITE, never ACK) towards
        `destination`. The top Via must carry a branch with the magic cookie, unique per request."""
        tx: ClientTransaction
        if request.method == "INVITE":
            tx = InviteClientTransaction(request, destination, now, reliable=reliable, timers=self.timers)
        else:
            tx = NonInviteClientTransaction(request, destination, now, reliable=reliable, timers=self.timers)
        if tx.key in self.client_transactions:
            raise SipValueError("a client transaction with this branch and method already exists")
        self.client_transactions[tx.key] = tx
        self._collect(tx)
        return tx

    def send_response(
        self, transaction: ServerTransaction, response: Response, now: float, *, linger: bool = True
    ) -> bool:
        """The TU answers the request of `transaction`; False if its state does not allow it.
        `linger=False`: a non-INVITE transaction terminates once its final response is sent (see
        `NonInviteServerTransaction.send`); an INVITE transaction ignores it (its ACK must match)."""
        if not linger and isinstance(transaction, NonInviteServerTransaction):
            sent = transaction.send(response, now, linger=False)
        else:
            sent = transaction.send(response, now)
        self._collect(transaction)
        return sent

    def send_stateless(
        self, message: Request | Response, destination: Address, *, reliable: bool = False
    ) -> None:
        """Queue a message outside any transaction (the ACK of a 2xx, a 2xx forwarded by a proxy)."""
        self._outbox.append(Transmit(message, destination, reliable, None))

    def transport_error(self, transaction: Transaction, now: float, reason: str = "transport error") -> None:
        """The shell could not send a `Transmit` of `transaction`."""
        transaction.transport_error(now, reason)
        self._collect(transaction)

    def find_cancel_target(self, cancel: Request) -> InviteServerTransaction | None:
        """The INVITE server transaction a CANCEL refers to (§9.2): the same key computed as for
        an INVITE (same branch and sent-by, or the RFC 2543 fields plus the To tag)."""
        try:
            key = server_key(cancel, method="INVITE")
        except SipParseError:
            return None
        tx = self.server_transactions.get(key)
        if not isinstance(tx, InviteServerTransaction):
            return None
        if key[0] == "2543" and not tx.to_tag_matches(cancel):
            return None
        return tx

    # --- network side -------------------------------------------------------------------------

    def receive(
        self, message: Request | Response, now: float, source: Address, *, reliable: bool = False
    ) -> None:
        """A message arrived from `source` (responses of a new server transaction go there)."""
        try:
            if isinstance(message, Response):
                self._receive_response(message, now)
            else:
                self._receive_request(message, now, source, reliable)
        except SipParseError:
            self.dropped += 1

    def _receive_response(self, response: Response, now: float) -> None:
        key = client_key(response)
        tx = self.client_transactions.get(key) if key is not None else None
        if tx is None:
            self._events.append(ResponseReceived(response, None))
            return
        tx.receive(response, now)
        self._collect(tx)

    def _receive_request(self, request: Request, now: float, source: Address, reliable: bool) -> None:
        key = server_key(request)
        tx = self.server_transactions.get(key)
        if (
            tx is not None
            and key[0] == "2543"
            and isinstance(tx, InviteServerTransaction)
            and not tx.to_tag_matches(request)
        ):
            tx = None
        if tx is not None:
            tx.receive(request, now)
            self._collect(tx)
            return
        if request.method == "ACK":
            # No INVITE server transaction: the ACK of a 2xx (its own branch, §17.1.1.3/§13.2.2.4).
            self._events.append(RequestReceived(request, None, source))
            return
        new: ServerTransaction
        if request.method == "INVITE":
            new = InviteServerTransaction(
                request, source, now, reliable=reliable, timers=self.timers, key=key
            )
        else:
            new = NonInviteServerTransaction(
                request, source, now, reliable=reliable, timers=self.timers, key=key
            )
        # (An RFC 2543 key whose To tag did not match is a distinct request: the newest wins the key.)
        self.server_transactions[key] = new
        self._collect(new)

    # --- timers and outputs -------------------------------------------------------------------

    def next_timer(self) -> float | None:
        """The earliest deadline over all transactions, or None."""
        heap = self._heap
        while heap:
            deadline, _, tx = heap[0]
            if self._armed.get(tx) == deadline:
                return deadline
            heapq.heappop(heap)
        return None

    def handle_timer(self, now: float) -> None:
        """Fire every transaction timer due at `now`."""
        heap = self._heap
        for _ in range(len(heap) + 1):
            if not heap or heap[0][0] > now:
                return
            deadline, _, tx = heapq.heappop(heap)
            if self._armed.get(tx) != deadline:
                continue
            del self._armed[tx]
            tx.handle_timer(now)
            self._collect(tx)

    def next_event(self) -> Event | None:
        """The next event for the TU, or None."""
        return self._events.popleft() if self._events else None

    def messages_to_send(self) -> list[Transmit]:
        """Drain the queued transmissions, in the order they were produced."""
        out = self._outbox
        if not out:
            return []  # the endpoint asks after every step; most have sent nothing: no swap
        self._outbox = []
        return out

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """Drain the queued transmissions as (bytes, destination)."""
        return [(t.message.to_bytes(), t.destination) for t in self.messages_to_send()]

    def __len__(self) -> int:
        """Live transactions."""
        return len(self.client_transactions) + len(self.server_transactions)

    def _collect(self, tx: Transaction) -> None:
        # tx.messages_to_send() and tx.next_event() inlined (twice per request: no new list, no calls).
        out = tx._outbox
        if out:
            self._outbox.extend(out)
            out.clear()
        events = tx._events
        if events:
            self._events.extend(events)
            events.clear()
        if tx.state is State.TERMINATED:
            self._armed.pop(tx, None)
            table: dict[TransactionKey, ClientTransaction] | dict[TransactionKey, ServerTransaction]
            table = (
                self.client_transactions if isinstance(tx, ClientTransaction) else self.server_transactions
            )
            if table.get(tx.key) is tx:
                del table[tx.key]
            return
        deadlines = tx._deadlines
        if not deadlines:
            if self._armed:
                self._armed.pop(tx, None)
            return
        deadline = min(deadlines.values())
        if self._armed.get(tx) != deadline:
            self._armed[tx] = deadline
            self._seq += 1
            heapq.heappush(self._heap, (deadline, self._seq, tx))
