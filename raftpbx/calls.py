"""Call lifecycle through Raft: the proxy's proposals of call events, and the leader's timeout job.

Theory of operation
-------------------
`CallRecorder` turns what the proxy sees into `raftpbx.state.calls` events and replicates them through
`SipNode.propose` (commit on a durable quorum before the proxy answers, DESIGN decision 3):

    authenticated INVITE forwarded          -> CallStarted   op_id call_op_id(call_id, "started")
    404 / 480 before any fork               -> CallStarted + CallEnded(failure) in ONE log entry
    first 18x (proposed RINGING_LINGER later, or with the answer/end if that comes first)
                                            -> CallRinging   op_id call_op_id(call_id, "ringing")
    first 2xx (forwarded after the commit)  -> CallAnswered  op_id call_op_id(call_id, "answered")
    2xx to a re-INVITE/UPDATE with Session-Expires (RFC 4028 §10) -> CallRefreshed (extra: the expiry)
    BYE (cause by From tag), CANCEL, final failure, Timer C, leader timeout
                                            -> CallEnded     op_id call_op_id(call_id, "ended")

Every step has a deterministic op_id, so a retransmission that lands on another node, or two nodes that
both see the BYE, dedupe in the Raft log (and `apply` refuses a second end anyway). Apply-time refusals
(`Rejected`, e.g. an answer that lost the race with a CANCEL) are logged and never stop the SIP side.

The timeout job (RFC 4028 awareness and a maximum call duration, issue 4 item 3) runs on the leader only:
`start()` subscribes to `replicator.on_leader_change`; while this node leads, a task wakes every
`interval` seconds (sooner when `next_call_timeout` says a call is due, or when `poke(due)` reports an
answered call due before the next look), runs `decide_call_timeouts` on the
local state and proposes the `CallEnded(cause="timeout", hangup_by="system")` events, each under
`call_op_id(call_id, "ended")`. For every call that this job ended (outcome `Applied`), `on_timeout(call)`
is called; the proxy uses it to send a BYE to both ends of an answered call, best effort: to the contacts
recorded in CallStarted/CallAnswered, CSeq 2**31-1, no retry beyond the transaction's own, answers ignored
(the endpoints may be gone, which is usually why the call timed out). An unanswered call gets no BYE (there
is no dialog; the caller's own INVITE transaction, or the serving node's Timer C, ends it). A TCP endpoint
is reachable only over its own connection, so the leader reaches it only if that connection is its own.

`ring_timeout` here is a backstop for unanswered calls whose node vanished mid-setup (their Timer C died with
the node); it should exceed the proxy's Timer C, which ends the calls that the node is still serving.

Invariants: proposals always carry a timeout (the node's proposal timeout); the job never runs on a node
that is not the leader (it stops as soon as a leadership change says so); every task is kept and awaited
on `aclose()`; nothing here raises into the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .logs import get_logger
from .state import (
    Applied,
    Call,
    CallAnswered,
    CallEnded,
    CallRefreshed,
    CallRinging,
    CallStarted,
    Command,
    Duplicate,
    Event,
    Outcome,
    Rejected,
    call_op_id,
    decide_call_timeouts,
    next_call_timeout,
)
from .state.model import fast_constructor

__all__ = ["CallRecorder", "CallSettings", "call_settings"]

log = get_logger("raftpbx.calls")

# The events of every call, built positionally without the frozen __init__'s per-field object.__setattr__
# (state.model.fast_constructor: equal values, still frozen); every argument is given, defaults included.
_started = fast_constructor(CallStarted)
_ringing = fast_constructor(CallRinging)
_answered = fast_constructor(CallAnswered)
_ended = fast_constructor(CallEnded)


@dataclass(frozen=True, slots=True)
class CallSettings:
    """Call timers, seconds. `timer_c`: RFC 3261 §16.6 step 11 (more than 3 minutes by the RFC; tests use
    less); `max_duration`: an answered call is ended by the leader after this long; `ring_timeout`: the
    leader's backstop for unanswered calls; `interval`: how often the leader's job looks at the calls."""

    timer_c: float = 181.0
    max_duration: float = 4 * 3600.0
    ring_timeout: float = 300.0
    interval: float = 1.0


def call_settings(cfg: Any) -> CallSettings:
    """The `[calls]` settings of a node config, or the defaults where the config has none."""
    section = getattr(cfg, "calls", None)
    defaults = CallSettings()
    if section is None:
        return defaults
    return CallSettings(
        timer_c=float(getattr(section, "timer_c", defaults.timer_c)),
        max_duration=float(getattr(section, "max_duration", defaults.max_duration)),
        ring_timeout=float(getattr(section, "ring_timeout", defaults.ring_timeout)),
        interval=float(getattr(section, "timeout_interval", getattr(section, "interval", defaults.interval))),
    )


def _ok(outcome: Outcome | None) -> bool:
    return outcome is not None and outcome.ok


def _first(outcome: Outcome) -> Applied | Rejected:
    if isinstance(outcome, Duplicate):
        return outcome.first
    assert isinstance(outcome, Applied | Rejected)  # the only other outcomes (state/outcomes.py)
    return outcome


class CallRecorder:
    """Proposes the call events of the calls this node routes, and runs the leader's timeout job.

    `node` is the `SipNode` (its `propose`, `machine`, `node_id` and `clock` are used).
    """

    def __init__(self, node: Any, settings: CallSettings | None = None) -> None:
        self.node = node
        self.settings = settings if settings is not None else call_settings(node.cfg)
        self.on_timeout: Callable[[Call], None] | None = None
        self.proposed = 0
        self.rejected = 0
        self.failed = 0
        self.timeouts = 0
        self._job: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._wake_at: float | None = None  # when the job looks next (clock time), while it waits
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    @property
    def node_id(self) -> str:
        return str(self.node.node_id)

    # -- reads -----------------------------------------------------------------------------------------
    def call(self, call_id: str) -> Call | None:
        """The active call `call_id` in the local state, or None."""
        machine = self.node.machine
        with machine.lock:
            call: Call | None = machine.state.calls.get(call_id)
        return call

    def record(self, call_id: str) -> Call | None:
        """The call `call_id`, active or recently finished (the bounded tail), from the local state."""
        machine = self.node.machine
        with machine.lock:
            state = machine.state
            call: Call | None = state.calls.get(call_id) or state.finished_calls.get(call_id)
        return call

    # -- proposals -------------------------------------------------------------------------------------
    async def propose(self, commands: Sequence[Command]) -> list[Outcome] | None:
        """Replicate `commands` in one entry; their outcomes, or None if replication failed (logged)."""
        self.proposed += len(commands)
        try:
            outcomes: list[Outcome] = await self.node.propose(commands)
        except Exception as exc:  # NoQuorum, ProposalTimeout (unknown outcome), ReplicationError
            self._failed(commands, exc)
            return None
        return self._decided(commands, outcomes)

    def _failed(self, commands: Sequence[Command], exc: BaseException) -> None:
        self.failed += 1
        log.warning("calls.propose_failed", ops=[c.op_id for c in commands], error=repr(exc))

    def _decided(self, commands: Sequence[Command], outcomes: list[Outcome]) -> list[Outcome]:
        for command, outcome in zip(commands, outcomes, strict=False):
            first = _first(outcome)
            if isinstance(first, Rejected):
                self.rejected += 1
                log.info("calls.rejected", kind=type(command.event).__name__,
                         call_id=getattr(command.event, "call_id", None), field=first.field, message=first.message)
        return outcomes

    def propose_then(self, ctx: Any, commands: list[Command], then: Callable[[Outcome | None], None]) -> None:
        """`propose` continued in a callback instead of a task (`SipNode.propose_then`, on the request `ctx`
        that prompted it): `then(outcome of the last command, or None if replication failed)`, from the loop.
        `then` must not raise (an exception is logged, never answered on `ctx`)."""
        self.proposed += len(commands)

        def done(_ctx: Any, result: list[Outcome] | BaseException) -> None:
            if isinstance(result, BaseException):
                self._failed(commands, result)
                outcome = None
            else:
                outcomes = self._decided(commands, result)
                outcome = outcomes[-1] if outcomes else None
            try:
                then(outcome)
            except Exception:
                log.exception("calls.then_failed", ops=[c.op_id for c in commands])

        self.node.propose_then(ctx, commands, done)

    async def _one(self, op_id: str, event: Event) -> Outcome | None:
        outcomes = await self.propose([Command(op_id, event)])
        return outcomes[0] if outcomes else None

    async def started(
        self, *, call_id: str, caller: str, callee: str, from_tag: str, caller_contact: str, branch: str,
        at: float, trunk: str = "", direction: str = "",
    ) -> Outcome | None:
        """CallStarted; None if replication failed (the proxy then refuses the call with 503).
        `trunk`/`direction` ("inbound"/"outbound") mark a call through a trunk; both "" for a local call."""
        event = _started(call_id, caller, callee, from_tag, caller_contact, branch, self.node_id, at, trunk, direction)
        return await self._one(call_op_id(call_id, "started"), event)

    async def unrouted(
        self, *, call_id: str, caller: str, callee: str, from_tag: str, caller_contact: str, branch: str,
        status_code: int, at: float, trunk: str = "", direction: str = "",
    ) -> bool:
        """A call refused before any fork (404, 480): its start and end in one log entry."""
        outcomes = await self.propose([
            Command(call_op_id(call_id, "started"),
                    CallStarted(call_id, caller, callee, from_tag, caller_contact, branch, self.node_id, at,
                                trunk=trunk, direction=direction)),
            Command(call_op_id(call_id, "ended"),
                    CallEnded(call_id, "failure", "system", status_code, self.node_id, at)),
        ])
        return outcomes is not None

    async def ringing(self, call_id: str, at: float) -> Outcome | None:
        return await self._one(call_op_id(call_id, "ringing"), CallRinging(call_id, self.node_id, at))

    def _ringing_command(self, call_id: str, ringing_at: float | None) -> list[Command]:
        if ringing_at is None:
            return []
        return [Command(call_op_id(call_id, "ringing"), _ringing(call_id, self.node_id, ringing_at))]

    async def _last(self, commands: list[Command]) -> Outcome | None:
        outcomes = await self.propose(commands)
        return outcomes[-1] if outcomes else None

    async def answered(
        self, call_id: str, *, to_tag: str, callee_contact: str, session_expires_at: float | None, at: float,
        ringing_at: float | None = None,
    ) -> Outcome | None:
        """CallAnswered, preceded in the same entry by CallRinging at `ringing_at` if that was not proposed
        yet (one commit instead of two on the answer's path). Returns the answer's outcome."""
        return await self._last(self._answer_commands(call_id, to_tag, callee_contact, session_expires_at, at,
                                                      ringing_at))

    async def refreshed(self, call_id: str, session_expires_at: float, at: float) -> Outcome | None:
        event = CallRefreshed(call_id, session_expires_at, self.node_id, at)
        return await self._one(call_op_id(call_id, "refreshed", repr(session_expires_at)), event)

    async def ended(
        self, call_id: str, *, cause: str, hangup_by: str, status_code: int, at: float,
        ringing_at: float | None = None,
    ) -> Outcome | None:
        """CallEnded (preceded by a CallRinging not proposed yet, as for `answered`)."""
        return await self._last(self._end_commands(call_id, cause, hangup_by, status_code, at, ringing_at))

    def answered_then(
        self, ctx: Any, call_id: str, *, to_tag: str, callee_contact: str, session_expires_at: float | None,
        at: float, ringing_at: float | None, then: Callable[[Outcome | None], None],
    ) -> None:
        """`answered` continued in a callback (`propose_then`): `then(the answer's outcome or None)`."""
        self.propose_then(
            ctx, self._answer_commands(call_id, to_tag, callee_contact, session_expires_at, at, ringing_at), then
        )

    def ended_then(
        self, ctx: Any, call_id: str, *, cause: str, hangup_by: str, status_code: int, at: float,
        then: Callable[[Outcome | None], None],
    ) -> None:
        """`ended` continued in a callback (`propose_then`): `then(outcome or None)` once decided."""
        self.propose_then(ctx, self._end_commands(call_id, cause, hangup_by, status_code, at, None), then)

    def _answer_commands(
        self, call_id: str, to_tag: str, callee_contact: str, session_expires_at: float | None, at: float,
        ringing_at: float | None,
    ) -> list[Command]:
        """CallAnswered, after a CallRinging at `ringing_at` if that was not proposed yet (one entry)."""
        event = _answered(call_id, to_tag, callee_contact, session_expires_at, self.node_id, at)
        return [*self._ringing_command(call_id, ringing_at), Command(call_op_id(call_id, "answered"), event)]

    def _end_commands(
        self, call_id: str, cause: str, hangup_by: str, status_code: int, at: float, ringing_at: float | None
    ) -> list[Command]:
        """CallEnded, after a CallRinging at `ringing_at` if that was not proposed yet (one entry)."""
        event = _ended(call_id, cause, hangup_by, status_code, self.node_id, at)
        return [*self._ringing_command(call_id, ringing_at), Command(call_op_id(call_id, "ended"), event)]

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run a proposal in the background (kept until done; failures are logged, never raised)."""
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("calls.task_failed", error=repr(task.exception()))

    # -- the leader's timeout job ----------------------------------------------------------------------
    def start(self, replicator: Any) -> None:
        """Follow leadership: run the timeout job while this node is the leader."""
        replicator.on_leader_change(self._leader_changed)
        with contextlib.suppress(Exception):
            status = replicator.status()
            if str(status.role) == "leader":
                self._leader_changed(True, self.node_id)

    def _leader_changed(self, is_leader: bool, leader: str | None) -> None:
        del leader
        if self._closed:
            return
        if is_leader and self._job is None:
            self._wake = asyncio.Event()
            self._job = asyncio.get_running_loop().create_task(self._run_job())
            log.info("calls.timeout_job_started", node=self.node_id)
        elif not is_leader and self._job is not None:
            self._job.cancel()
            self._job = None
            log.info("calls.timeout_job_stopped", node=self.node_id)

    async def _run_job(self) -> None:
        settings = self.settings
        while True:
            now = self.node.clock()
            try:
                await self.sweep(now)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("calls.sweep_failed")
            machine = self.node.machine
            with machine.lock:
                due = next_call_timeout(machine.state, settings.max_duration, settings.ring_timeout)
            delay = settings.interval
            if due is not None:
                delay = min(delay, max(0.01, due - self.node.clock()))
            wake = self._wake
            if wake is None:
                return
            self._wake_at = self.node.clock() + delay
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=delay)
            self._wake_at = None
            wake.clear()

    def poke(self, due: float | None = None) -> None:
        """Make the timeout job look at the calls now (a new answer may have an early session expiry).

        `due`: when the call that prompted it is overdue at the earliest (clock time); a call due no earlier
        than the job's next look changes nothing, so the job is not woken (each look scans every active
        call twice: an answer without session timers, due `max_duration` later, woke it for nothing)."""
        if self._wake is None:
            return
        wake_at = self._wake_at
        if due is not None and wake_at is not None and due >= wake_at:
            return
        self._wake.set()

    def answer_due(self, answered_at: float, session_expires_at: float | None) -> float:
        """When a call answered at `answered_at` is overdue at the earliest (`decide_call_timeouts`)."""
        due = answered_at + self.settings.max_duration
        return due if session_expires_at is None else min(due, session_expires_at)

    async def sweep(self, now: float) -> list[Call]:
        """Propose `CallEnded(timeout)` for every overdue call; return the calls this sweep ended."""
        settings = self.settings
        machine = self.node.machine
        with machine.lock:
            events = decide_call_timeouts(machine.state, now, settings.max_duration, settings.ring_timeout,
                                          node_id=self.node_id)
            calls = {e.call_id: machine.state.calls.get(e.call_id) for e in events if isinstance(e, CallEnded)}
        if not events:
            return []
        commands = [Command(call_op_id(e.call_id, "ended"), e) for e in events if isinstance(e, CallEnded)]
        outcomes = await self.propose(commands)
        if outcomes is None:
            return []
        ended: list[Call] = []
        for command, outcome in zip(commands, outcomes, strict=False):
            event = command.event
            call = calls.get(event.call_id) if isinstance(event, CallEnded) else None
            if isinstance(outcome, Applied) and call is not None:
                ended.append(call)
        self.timeouts += len(ended)
        for call in ended:
            log.info("calls.timed_out", call_id=call.call_id, answered=call.answered_at is not None)
            if self.on_timeout is not None:
                try:
                    self.on_timeout(call)
                except Exception:
                    log.exception("calls.on_timeout_failed", call_id=call.call_id)
        return ended

    async def aclose(self) -> None:
        """Stop the job and wait for background proposals (bounded by their own timeouts)."""
        self._closed = True
        job, self._job = self._job, None
        if job is not None:
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await job
        tasks = list(self._tasks)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
