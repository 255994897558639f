"""A scriptable SIP test phone: pjsua2 in a child process, driven by JSON lines.

Theory of operation
-------------------
`python -m chaos.phone --bind 127.0.0.x [--log FILE]` starts one *phone group*: one pjsua2 endpoint bound
to one loopback address, holding up to 8 accounts and 4 call legs (pjsua's compiled-in limits; see
/work/shared/PJSUA2-NOTES.md, whose numbered pitfalls are cited below as "note N"). Run several processes for
more. The process reads one JSON command per line on stdin and writes one JSON reply per line on stdout,
carrying the command's `id`:

    -> {"id": 1, "cmd": "call", "args": {"account": "a", "to": "sip:b@127.0.0.22:5062"}}
    <- {"id": 1, "ok": true, "result": {"call": "c1"}}
    <- {"id": 2, "ok": false, "error": "account: no such account 'x'"}

Commands (arguments in "args"; the result of each is in brackets):
    ping                                                          [bind, pid]
    transports {udp=true, tcp=false, tcp_nodelay=true}            [{"udp": port, "tcp": port}]
    account_add {id, uri, transport="udp"|"tcp", registrar?, register=false, user?, password?,
                 expires=300, proxy?: [uri], outbound?: {instance_id, reg_id, retry_interval=1,
                 first_retry_interval=0}}  (max 8 per process; outbound: RFC 5626 with re-registration
                 as soon as the flow's connection drops, then every retry_interval s while it fails)
    register {account} / unregister {account}
    auto_answer {account, code|null, delay=0, ring=true}          (180 at once, then code after delay)
    call {account, to}                                            [call]  (max 4 legs per process)
    answer {call, code=200}   hangup {call, code?}   cancel {call}   bye {call}
    call_info {call}    [state, code, reason, role, rx, tx, bye_code, remote_contact, sip_call_id, ...]
    rtp_gaps {call}     [max_gap_ms, current_gap_ms, confirmed_ms, ended, rx, tx, samples, max_sample_interval_ms]
    calls               [calls: [call_info...]]
    quit {graceful=true, timeout=1.0}                             (hang up, un-REGISTER, reply, exit)
An account bound to TCP gets `;transport=tcp` added to registrar, proxy and call URIs that name no
transport (see `_with_transport` for why). Call states are pjsip's INVITE session states in lower case: calling, incoming, early,
connecting, confirmed, disconnected.

Asynchronous happenings are lines with an `"event"` key, a wall-clock stamp `"t"` and a CLOCK_MONOTONIC
stamp `"mono"` (comparable across processes on one host): `ready`, `reg_state` {account, code, reason,
expiration, active}, `incoming_call` {account, call, remote_uri, remote_contact, local_uri, sip_call_id}, `call_state`
{call, account, role, state, code, reason}, `media_state` {call, active}, `bye_result` {call, code: the
final status of our BYE, or null if the call ended otherwise}, `error` {where, error, traceback}: an
exception caught in a pjsua2 callback or in the pump (note 12).

One thread owns pjsua2 (note 5): the *pump* calls `ep.libHandleEvents(10)` in a loop and, between polls,
runs the commands that a stdin reader thread (which never touches pjsua2) puts on a queue, runs scheduled
actions (delayed auto-answers), and samples RTP counters every ~20 ms. Answers, including auto-answers,
are always sent from the pump, never inside `onIncomingCall` (note 7).

Invariants
----------
- Every pjsua2 `Call` object created here stays referenced until the process exits (note 3); the process
  leaves with `os._exit` after writing its last reply, never through interpreter teardown (note 4).
- Once a call is DISCONNECTED its final state is cached and its `Call` object is never used again: pjsua
  reuses call slots, so the stale object would report, or act on, whichever new call owns the slot.
- Protocol lines are written only by the pump thread, straight to a private duplicate of the original
  stdout; file descriptor 1 is pointed at the log (or /dev/null) before pjsua2 starts, so nothing pjlib
  prints (note 11) can corrupt the protocol.
- Call ids (`c1`, `c2`, ...) are never reused within a process, unlike pjsua's call slots.
- Deterministic settings (note 14): no SIP outbound unless asked, no contact/via rewrite, no keep-alives,
  no ICE, no registration retry (except for outbound accounts, which must re-register when their flow dies); SIP and RTP ports are 0 on the bound address (note 13); TCP sockets get
  TCP_NODELAY (note 8); a null audio device clocks the bridge and VAD is off (note 9).

The controller side is `PhoneProcess`: it starts the child, matches replies to requests, records every
event, and offers `wait_event(predicate, timeout)`; closing it asks the child to quit and kills it if it
does not. Passwords are passed to the child on stdin and never logged by this module.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import json
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pjsua2 as pj

MAX_ACCOUNTS = 8  # note 2: the 9th account aborts the interpreter, so refuse it
MAX_CALLS = 4  # note 1
RTP_SAMPLE_INTERVAL = 0.020
PUMP_POLL_MS = 10

_INV_STATES = {
    pj.PJSIP_INV_STATE_NULL: "null",
    pj.PJSIP_INV_STATE_CALLING: "calling",
    pj.PJSIP_INV_STATE_INCOMING: "incoming",
    pj.PJSIP_INV_STATE_EARLY: "early",
    pj.PJSIP_INV_STATE_CONNECTING: "connecting",
    pj.PJSIP_INV_STATE_CONFIRMED: "confirmed",
    pj.PJSIP_INV_STATE_DISCONNECTED: "disconnected",
}

Json = dict[str, Any]


class CommandError(Exception):
    """A command was refused; the message names the offending field where there is one."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, pj.Error):
        return f"pjsua2: {exc.title}: {exc.reason} (status {exc.status})"
    return f"{type(exc).__name__}: {exc}"


def _arg(args: Json, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if name not in args or args[name] is None:
        if default is ...:
            raise CommandError(f"{name}: missing")
        return default
    value = args[name]
    if isinstance(value, bool) and kind is int:
        raise CommandError(f"{name}: expected int, got bool")
    if not isinstance(value, kind):
        raise CommandError(f"{name}: expected {kind}, got {type(value).__name__}")
    return value


def _with_transport(uri: str, transport: str) -> str:
    """Add `;transport=tcp` to a SIP URI that names no transport.

    Measured: an account bound to the TCP transport does send over TCP to a bare URI, but pjsua builds its
    Contact from the *target URI's* transport, so the Contact then names no transport (a registrar or
    proxy would reach it over UDP, where nothing listens on that port) and RFC 5626 parameters are
    left out as if on UDP."""
    if transport != "tcp" or "transport=" in uri.lower():
        return uri
    if uri.endswith(">"):
        return uri[:-1] + ";transport=tcp>"
    head, sep, headers = uri.partition("?")
    return f"{head};transport=tcp{sep}{headers}"


# ---------------------------------------------------------------------------------------------------------
# The phone process (child side)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _RtpTrack:
    """Longest stretch without new received RTP packets, sampled by the pump from confirmation to the end.

    Resolution is the sampling interval (~20 ms); a stalled pump also looks like a gap, which is why the
    longest interval between two samples is reported beside it.
    """

    confirmed_at: float
    last_rx: int = 0
    last_tx: int = 0
    last_change: float = 0.0
    max_gap: float = 0.0
    last_sample: float = 0.0
    max_sample_interval: float = 0.0
    samples: int = 0
    ended_at: float | None = None

    def sample(self, now: float, rx: int, tx: int) -> None:
        if self.samples:
            self.max_sample_interval = max(self.max_sample_interval, now - self.last_sample)
        self.samples += 1
        self.last_sample = now
        if rx != self.last_rx:  # a smaller count means the stream was re-created: also activity
            self.max_gap = max(self.max_gap, now - self.last_change)
            self.last_change = now
            self.last_rx = rx
        self.last_tx = tx

    def end(self, now: float) -> None:
        """The call is over: the silence up to now counts (a peer that died mid-call shows here)."""
        if self.ended_at is None:
            self.max_gap = max(self.max_gap, now - self.last_change)
            self.ended_at = now

    def report(self, now: float) -> Json:
        end = self.ended_at if self.ended_at is not None else now
        current = 0.0 if self.ended_at is not None else max(0.0, now - self.last_change)
        return {
            "max_gap_ms": round(max(self.max_gap, current) * 1000.0, 1),
            "current_gap_ms": round(current * 1000.0, 1),
            "confirmed_ms": round((end - self.confirmed_at) * 1000.0, 1),
            "ended": self.ended_at is not None,
            "rx": self.last_rx,
            "tx": self.last_tx,
            "samples": self.samples,
            "max_sample_interval_ms": round(self.max_sample_interval * 1000.0, 1),
        }


@dataclass
class _CallRecord:
    id: str
    account: str
    role: str  # "caller" | "callee"
    call: Any  # the pj.Call, kept alive until exit (note 3)
    state: str = "null"
    code: int = 0
    reason: str = ""
    remote_uri: str = ""
    remote_contact: str = ""
    sip_call_id: str = ""
    disconnected: bool = False
    media_active: bool = False
    rtp: _RtpTrack | None = None
    bye_pending: bool = False
    bye_code: int | None = None
    final_rx: int = 0
    final_tx: int = 0


@dataclass
class _AccountRecord:
    id: str
    transport: str
    account: Any  # the pj.Account, kept alive until exit
    registering: bool = False
    auto_code: int | None = None
    auto_delay: float = 0.0
    auto_ring: bool = True


class _Call(pj.Call):  # type: ignore[misc]
    def __init__(self, server: PhoneServer, account: Any, call_id: int = pj.PJSUA_INVALID_ID) -> None:
        super().__init__(account, call_id)
        self.server = server
        self.record: _CallRecord | None = None

    def onCallState(self, prm: Any) -> None:
        self.server.guard("onCallState", self.server.on_call_state, self, prm)

    def onCallTsxState(self, prm: Any) -> None:
        self.server.guard("onCallTsxState", self.server.on_call_tsx_state, self, prm)

    def onCallMediaState(self, prm: Any) -> None:
        self.server.guard("onCallMediaState", self.server.on_call_media_state, self, prm)


class _Account(pj.Account):  # type: ignore[misc]
    def __init__(self, server: PhoneServer, account_id: str) -> None:
        super().__init__()
        self.server = server
        self.account_id = account_id

    def onRegState(self, prm: Any) -> None:
        self.server.guard("onRegState", self.server.on_reg_state, self, prm)

    def onIncomingCall(self, prm: Any) -> None:
        self.server.guard("onIncomingCall", self.server.on_incoming_call, self, prm)


class _LogWriter(pj.LogWriter):  # type: ignore[misc]
    """pjsip log lines to a file, unbuffered. Called from any pjsip thread (SWIG takes the GIL)."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def write(self, entry: Any) -> None:
        with contextlib.suppress(BaseException):
            os.write(self.fd, str(entry.msg).encode("utf-8", "replace"))


class PhoneServer:
    """The child process: owns the pjsua2 endpoint and runs the pump. Use through `main()`."""

    def __init__(self, bind: str, out_fd: int, log_path: str | None, log_level: int) -> None:
        self.bind = bind
        self.out_fd = out_fd
        self.log_path = log_path
        self.log_level = log_level
        self.ep: Any = None
        self.log_writer: _LogWriter | None = None
        self.inbox: queue.Queue[str | None] = queue.Queue()
        self.accounts: dict[str, _AccountRecord] = {}
        self.calls: dict[str, _CallRecord] = {}
        self.transports: dict[str, tuple[int, int]] = {}  # "udp"/"tcp" -> (transport id, port)
        self.call_seq = itertools.count(1)
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self.timer_seq = itertools.count()
        self.quitting: Json | None = None
        self.next_rtp_sample = 0.0

    # -- output ------------------------------------------------------------------------------------------

    def write(self, obj: Json) -> None:
        data = (json.dumps(obj, separators=(",", ":"), default=str) + "\n").encode()
        view = memoryview(data)
        while view:
            written = os.write(self.out_fd, view)
            view = view[written:]

    def emit(self, event: str, **fields: Any) -> None:
        self.write({"event": event, "t": time.time(), "mono": time.monotonic(), **fields})

    def guard(self, where: str, fn: Callable[..., None], *args: Any) -> None:
        """Run a callback body; report any exception as an `error` event instead of losing it (note 12)."""
        try:
            fn(*args)
        except BaseException as exc:
            with contextlib.suppress(BaseException):
                self.emit("error", where=where, error=_describe(exc), traceback=traceback.format_exc())

    # -- startup -----------------------------------------------------------------------------------------

    def start(self) -> None:
        ep = pj.Endpoint()
        ep.libCreate()
        cfg = pj.EpConfig()
        cfg.uaConfig.threadCnt = 0  # note 5: only the pump calls into pjsua2
        cfg.uaConfig.mainThreadOnly = True
        cfg.uaConfig.maxCalls = MAX_CALLS
        cfg.uaConfig.userAgent = "raftpbx-test-phone"
        cfg.logConfig.consoleLevel = 0  # note 11: nothing on stdout
        cfg.logConfig.level = 0
        if self.log_path:
            # Not logConfig.filename: pjlib writes that file through stdio buffers, which os._exit (and a
            # kill) discard, so the log was found empty. A LogWriter replaces the *console* output (it is
            # filtered by consoleLevel, not level) and appends each line with one write().
            fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self.log_writer = _LogWriter(fd)
            cfg.logConfig.writer = self.log_writer
            cfg.logConfig.level = self.log_level
            cfg.logConfig.consoleLevel = self.log_level
        cfg.medConfig.noVad = True  # note 9: a steady 50 packets/s
        ep.libInit(cfg)
        ep.audDevManager().setNullDev()  # note 9: clocks the bridge; setNoDev() gives no RTP
        ep.libStart()
        self.ep = ep

    # -- pump --------------------------------------------------------------------------------------------

    def run(self) -> Json:
        """Pump until `quit` (or stdin EOF); return the quit request."""
        while self.quitting is None:
            self.ep.libHandleEvents(PUMP_POLL_MS)
            self._drain_inbox()
            self._run_timers()
            now = time.monotonic()
            if now >= self.next_rtp_sample:
                self.next_rtp_sample = now + RTP_SAMPLE_INTERVAL
                self.guard("rtp_sample", self._sample_rtp, now)
        return self.quitting

    def _drain_inbox(self) -> None:
        while self.quitting is None:
            try:
                line = self.inbox.get_nowait()
            except queue.Empty:
                return
            if line is None:  # stdin closed: our controller is gone
                self.quitting = {"id": None, "graceful": True}
                return
            self._handle_line(line)

    def _handle_line(self, line: str) -> None:
        req_id: Any = None
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise CommandError("request: expected a JSON object")
            req_id = req.get("id")
            cmd = req.get("cmd")
            args = req.get("args", {})
            if not isinstance(args, dict):
                raise CommandError("args: expected a JSON object")
            handler = getattr(self, f"cmd_{cmd}", None) if isinstance(cmd, str) else None
            if handler is None:
                raise CommandError(f"cmd: unknown command {cmd!r}")
            if cmd == "quit":
                self.quitting = {"id": req_id, **args}
                return
            result = handler(args)
            self.write({"id": req_id, "ok": True, "result": result})
        except Exception as exc:
            error = str(exc) if isinstance(exc, CommandError) else _describe(exc)
            self.write({"id": req_id, "ok": False, "error": error})

    def schedule(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (time.monotonic() + delay, next(self.timer_seq), fn))

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, fn = heapq.heappop(self.timers)
            self.guard("timer", fn)

    def _sample_rtp(self, now: float) -> None:
        for rec in self.calls.values():
            if rec.disconnected or rec.rtp is None or not rec.media_active:
                continue
            try:
                stat = rec.call.getStreamStat(0)
            except pj.Error:
                continue  # no stream yet (or any more)
            rec.rtp.sample(now, int(stat.rtcp.rxStat.pkt), int(stat.rtcp.txStat.pkt))

    # -- shutdown ----------------------------------------------------------------------------------------

    def shutdown(self, req: Json) -> None:
        """Optionally hang up and unregister (bounded), reply, and leave without interpreter teardown."""
        if req.get("graceful", True) and self.ep is not None:
            try:
                self.ep.hangupAllCalls()
                for acc in self.accounts.values():
                    if acc.registering:
                        with contextlib.suppress(pj.Error):
                            acc.account.setRegistration(False)
                deadline = time.monotonic() + float(req.get("timeout", 1.0))
                while time.monotonic() < deadline and any(not c.disconnected for c in self.calls.values()):
                    self.ep.libHandleEvents(PUMP_POLL_MS)
                # Give the un-REGISTERs and BYEs a moment on the wire (bounded, no waiting for answers).
                end = time.monotonic() + 0.05
                while time.monotonic() < end:
                    self.ep.libHandleEvents(PUMP_POLL_MS)
            except BaseException as exc:
                with contextlib.suppress(BaseException):
                    self.emit("error", where="shutdown", error=_describe(exc))
        if req.get("id") is not None:
            self.write({"id": req["id"], "ok": True, "result": {}})
        os._exit(0)  # note 4

    # -- callbacks (run on the pump thread; mainThreadOnly) -----------------------------------------------

    def on_reg_state(self, acc: _Account, prm: Any) -> None:
        info = acc.getInfo()
        self.emit(
            "reg_state",
            account=acc.account_id,
            code=int(prm.code),
            reason=str(prm.reason),
            expiration=int(prm.expiration),
            active=bool(info.regIsActive),
        )

    def on_incoming_call(self, acc: _Account, prm: Any) -> None:
        call = _Call(self, acc, prm.callId)
        rec = _CallRecord(id=f"c{next(self.call_seq)}", account=acc.account_id, role="callee", call=call)
        call.record = rec
        self.calls[rec.id] = rec  # keep the Call alive before anything else (note 3)
        info = call.getInfo()
        rec.remote_uri = str(info.remoteUri)
        rec.remote_contact = str(info.remoteContact)
        rec.sip_call_id = str(info.callIdString)
        rec.state = _INV_STATES.get(info.state, str(info.state))
        self.emit(
            "incoming_call",
            account=acc.account_id,
            call=rec.id,
            remote_uri=rec.remote_uri,
            remote_contact=rec.remote_contact,
            local_uri=str(info.localUri),
            sip_call_id=rec.sip_call_id,
        )
        auto = self.accounts[acc.account_id]
        if auto.auto_code is not None:
            code = auto.auto_code
            if auto.auto_ring and code != 180:
                self.schedule(0.0, lambda: self._auto_answer(rec, 180))
            self.schedule(auto.auto_delay, lambda: self._auto_answer(rec, code))

    def _auto_answer(self, rec: _CallRecord, code: int) -> None:
        if rec.disconnected or rec.state in ("confirmed", "connecting"):
            return
        self._answer(rec, code)

    def on_call_state(self, call: _Call, prm: Any) -> None:
        rec = call.record
        if rec is None or rec.disconnected:
            return
        info = call.getInfo()
        rec.state = _INV_STATES.get(info.state, str(info.state))
        rec.code = int(info.lastStatusCode)
        rec.reason = str(info.lastReason)
        if not rec.remote_uri:
            rec.remote_uri = str(info.remoteUri)
            rec.sip_call_id = str(info.callIdString)
        if info.remoteContact:
            rec.remote_contact = str(info.remoteContact)
        now = time.monotonic()
        if info.state == pj.PJSIP_INV_STATE_CONFIRMED and rec.rtp is None:
            rec.rtp = _RtpTrack(confirmed_at=now, last_change=now, last_sample=now)
        if info.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            self._capture_final_rtp(rec, now)
            rec.disconnected = True
            rec.media_active = False
            if rec.bye_pending:
                self._bye_from_event(rec, prm.e)
        self.emit(
            "call_state",
            call=rec.id,
            account=rec.account,
            role=rec.role,
            state=rec.state,
            code=rec.code,
            reason=rec.reason,
        )
        if rec.disconnected and rec.bye_pending:  # disconnected without a BYE response (e.g. a timeout)
            rec.bye_pending = False
            self.emit("bye_result", call=rec.id, code=rec.bye_code)

    def on_call_tsx_state(self, call: _Call, prm: Any) -> None:
        rec = call.record
        if rec is None or not rec.bye_pending:
            return
        self._bye_from_event(rec, prm.e)
        if rec.bye_code is not None:
            rec.bye_pending = False
            self.emit("bye_result", call=rec.id, code=rec.bye_code)

    def _bye_from_event(self, rec: _CallRecord, event: Any) -> None:
        """Note 6: the BYE's final status code is in the transaction event of our own BYE."""
        if rec.bye_code is not None or event.type != pj.PJSIP_EVENT_TSX_STATE:
            return
        tsx = event.body.tsxState.tsx
        if tsx.method == "BYE" and tsx.role == pj.PJSIP_ROLE_UAC and int(tsx.statusCode) >= 200:
            rec.bye_code = int(tsx.statusCode)

    def on_call_media_state(self, call: _Call, prm: Any) -> None:
        rec = call.record
        if rec is None or rec.disconnected:
            return
        info = call.getInfo()
        active = False
        for i, media in enumerate(info.media):
            if media.type == pj.PJMEDIA_TYPE_AUDIO and media.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
                audio = call.getAudioMedia(i)
                adm = self.ep.audDevManager()
                adm.getCaptureDevMedia().startTransmit(audio)
                audio.startTransmit(adm.getPlaybackDevMedia())
                active = True
        rec.media_active = active
        self.emit("media_state", call=rec.id, active=active)

    def _capture_final_rtp(self, rec: _CallRecord, now: float) -> None:
        counts: tuple[int, int] | None = None
        if rec.media_active:
            try:
                stat = rec.call.getStreamStat(0)
                counts = int(stat.rtcp.rxStat.pkt), int(stat.rtcp.txStat.pkt)
            except pj.Error:
                pass  # the stream may already be gone: keep the last sample
        if rec.rtp is not None:
            if counts is not None:
                rec.rtp.sample(now, *counts)
            rec.rtp.end(now)
            counts = rec.rtp.last_rx, rec.rtp.last_tx
        if counts is not None:
            rec.final_rx, rec.final_tx = counts

    # -- commands ----------------------------------------------------------------------------------------

    def _account(self, args: Json) -> _AccountRecord:
        name = _arg(args, "account", str)
        if name not in self.accounts:
            raise CommandError(f"account: no such account {name!r}")
        return self.accounts[name]

    def _call(self, args: Json) -> _CallRecord:
        name = _arg(args, "call", str)
        if name not in self.calls:
            raise CommandError(f"call: no such call {name!r}")
        return self.calls[name]

    def _live_call(self, args: Json) -> _CallRecord:
        rec = self._call(args)
        if rec.disconnected:
            raise CommandError(f"call: {rec.id} is disconnected")
        return rec

    def cmd_ping(self, args: Json) -> Json:
        return {"bind": self.bind, "pid": os.getpid()}

    def cmd_transports(self, args: Json) -> Json:
        want = {"udp": bool(_arg(args, "udp", bool, True)), "tcp": bool(_arg(args, "tcp", bool, False))}
        nodelay = bool(_arg(args, "tcp_nodelay", bool, True))  # False only to reproduce note 8
        for name, kind in (("udp", pj.PJSIP_TRANSPORT_UDP), ("tcp", pj.PJSIP_TRANSPORT_TCP)):
            if not want[name] or name in self.transports:
                continue
            tc = pj.TransportConfig()
            tc.port = 0  # note 13
            tc.boundAddress = self.bind
            if name == "tcp" and nodelay:
                tc.sockOptParams.sockOpts.append(pj.SockOpt(6, 1, 1))  # IPPROTO_TCP, TCP_NODELAY (note 8)
            tid = self.ep.transportCreate(kind, tc)
            local = str(self.ep.transportGetInfo(tid).localName)
            self.transports[name] = (tid, int(local.rsplit(":", 1)[1]))
        return {name: port for name, (_, port) in self.transports.items()}

    def cmd_account_add(self, args: Json) -> Json:
        name = _arg(args, "id", str)
        if name in self.accounts:
            raise CommandError(f"id: account {name!r} exists")
        if len(self.accounts) >= MAX_ACCOUNTS:
            raise CommandError(f"id: at most {MAX_ACCOUNTS} accounts per phone process (pjsua limit)")
        transport = _arg(args, "transport", str, "udp")
        if transport not in self.transports:
            raise CommandError(f"transport: {transport!r} not created (use the transports command)")
        uri = _arg(args, "uri", str)
        registrar = _arg(args, "registrar", str, "")
        register = bool(_arg(args, "register", bool, False))
        if register and not registrar:
            raise CommandError("registrar: needed when register is true")
        user = _arg(args, "user", str, "")
        password = _arg(args, "password", str, "")
        expires = _arg(args, "expires", int, 300)
        proxies = _arg(args, "proxy", list, [])
        outbound = _arg(args, "outbound", dict, None)

        cfg = pj.AccountConfig()
        cfg.idUri = uri
        cfg.regConfig.registrarUri = _with_transport(registrar, transport) if registrar else ""
        cfg.regConfig.registerOnAdd = register
        cfg.regConfig.retryIntervalSec = 0  # note 14
        cfg.regConfig.timeoutSec = expires
        cfg.sipConfig.transportId = self.transports[transport][0]
        for proxy in proxies:
            if not isinstance(proxy, str):
                raise CommandError("proxy: expected a list of SIP URIs")
            cfg.sipConfig.proxies.append(_with_transport(proxy, transport))
        if user:
            cfg.sipConfig.authCreds.append(pj.AuthCredInfo("digest", "*", user, 0, password))
        nat = cfg.natConfig
        nat.sipOutboundUse = 0
        if outbound is not None:
            nat.sipOutboundUse = 1
            nat.sipOutboundInstanceId = str(_arg(outbound, "instance_id", str))
            nat.sipOutboundRegId = str(_arg(outbound, "reg_id", (str, int)))
            # RFC 5626 §4.4/§4.5: a phone whose flow fails registers again at once. pjsua re-registers on a
            # transport disconnect only when retryIntervalSec != 0: first after firstRetryIntervalSec, then
            # every retryIntervalSec (whole seconds) while it fails; randomRetryIntervalSec (default 10 s)
            # would add up to that much jitter, so it is 0 here.
            retry = _arg(outbound, "retry_interval", int, 1)
            first = _arg(outbound, "first_retry_interval", int, 0)
            if retry < 1 or first < 0:
                raise CommandError("outbound: retry_interval must be >= 1 and first_retry_interval >= 0")
            cfg.regConfig.retryIntervalSec = retry
            cfg.regConfig.firstRetryIntervalSec = first
            cfg.regConfig.randomRetryIntervalSec = 0
        nat.contactRewriteUse = 0
        nat.viaRewriteUse = 0
        nat.sdpNatRewriteUse = 0
        nat.udpKaIntervalSec = 0
        nat.iceEnabled = False
        nat.turnEnabled = False
        nat.sipStunUse = pj.PJSUA_STUN_USE_DISABLED
        nat.mediaStunUse = pj.PJSUA_STUN_USE_DISABLED
        cfg.mediaConfig.transportConfig.port = 0  # note 13
        cfg.mediaConfig.transportConfig.boundAddress = self.bind

        acc = _Account(self, name)
        rec = _AccountRecord(id=name, transport=transport, account=acc, registering=register)
        self.accounts[name] = rec  # before create(): registerOnAdd may call back at once
        try:
            acc.create(cfg, False)
        except Exception:
            del self.accounts[name]
            raise
        return {"account": name}

    def cmd_register(self, args: Json) -> Json:
        rec = self._account(args)
        rec.registering = True
        rec.account.setRegistration(True)
        return {}

    def cmd_unregister(self, args: Json) -> Json:
        rec = self._account(args)
        rec.account.setRegistration(False)
        rec.registering = False
        return {}

    def cmd_auto_answer(self, args: Json) -> Json:
        rec = self._account(args)
        code = _arg(args, "code", int, None)
        if code is not None and not 100 < code < 700:
            raise CommandError("code: expected a SIP status code (101..699) or null to stop")
        delay = _arg(args, "delay", (int, float), 0.0)
        if delay < 0:
            raise CommandError("delay: must be >= 0")
        rec.auto_code = code
        rec.auto_delay = float(delay)
        rec.auto_ring = bool(_arg(args, "ring", bool, True))
        return {}

    def cmd_call(self, args: Json) -> Json:
        acc = self._account(args)
        to = _with_transport(_arg(args, "to", str), acc.transport)
        call = _Call(self, acc.account)
        rec = _CallRecord(id=f"c{next(self.call_seq)}", account=acc.id, role="caller", call=call)
        call.record = rec
        self.calls[rec.id] = rec  # kept alive even if makeCall fails (note 3)
        prm = pj.CallOpParam(True)
        prm.opt.audioCount = 1
        prm.opt.videoCount = 0
        try:
            call.makeCall(to, prm)
        except Exception:
            rec.disconnected = True
            rec.state = "disconnected"
            raise
        return {"call": rec.id}

    def _answer(self, rec: _CallRecord, code: int) -> None:
        prm = pj.CallOpParam()
        prm.statusCode = code
        rec.call.answer(prm)

    def cmd_answer(self, args: Json) -> Json:
        rec = self._live_call(args)
        if rec.role != "callee":
            raise CommandError(f"call: {rec.id} is not an incoming call")
        code = _arg(args, "code", int, 200)
        if not 100 < code < 700:
            raise CommandError("code: expected a SIP status code (101..699)")
        self._answer(rec, code)
        return {}

    def cmd_hangup(self, args: Json) -> Json:
        rec = self._live_call(args)
        prm = pj.CallOpParam()
        code = _arg(args, "code", int, 0)
        if code:
            prm.statusCode = code
        rec.call.hangup(prm)
        return {}

    def cmd_cancel(self, args: Json) -> Json:
        rec = self._live_call(args)
        if rec.role != "caller" or rec.state not in ("calling", "early", "null"):
            raise CommandError(f"call: {rec.id} is not an outgoing call still ringing (state {rec.state})")
        rec.call.hangup(pj.CallOpParam())  # an early UAC session ends with CANCEL (RFC 3261 §9.1)
        return {}

    def cmd_bye(self, args: Json) -> Json:
        rec = self._live_call(args)
        if rec.state != "confirmed":
            raise CommandError(f"call: {rec.id} is not confirmed (state {rec.state})")
        prm = pj.CallSendRequestParam()
        prm.method = "BYE"
        rec.bye_pending = True
        try:
            rec.call.sendRequest(prm)  # note 6: hangup() would hide the BYE's response
        except Exception:
            rec.bye_pending = False
            raise
        return {}

    def cmd_call_info(self, args: Json) -> Json:
        rec = self._call(args)
        rx, tx = rec.final_rx, rec.final_tx
        if not rec.disconnected and rec.media_active:
            try:
                stat = rec.call.getStreamStat(0)
                rx, tx = int(stat.rtcp.rxStat.pkt), int(stat.rtcp.txStat.pkt)
            except pj.Error:
                pass
        return {
            "call": rec.id,
            "account": rec.account,
            "role": rec.role,
            "state": rec.state,
            "code": rec.code,
            "reason": rec.reason,
            "remote_uri": rec.remote_uri,
            "remote_contact": rec.remote_contact,
            "sip_call_id": rec.sip_call_id,
            "media_active": rec.media_active,
            "rx": rx,
            "tx": tx,
            "bye_code": rec.bye_code,
        }

    def cmd_rtp_gaps(self, args: Json) -> Json:
        rec = self._call(args)
        track = rec.rtp
        if track is None:
            raise CommandError(f"call: {rec.id} was never confirmed")
        return {"call": rec.id, **track.report(time.monotonic())}

    def cmd_calls(self, args: Json) -> Json:
        return {"calls": [self.cmd_call_info({"call": name}) for name in self.calls]}

    def cmd_quit(self, args: Json) -> Json:  # handled in _handle_line; listed so the name is known
        return {}


def _stdin_reader(inbox: queue.Queue[str | None]) -> None:
    """Feed stdin lines to the pump. Never touches pjsua2 (note 5)."""
    try:
        for raw in sys.stdin.buffer:
            line = raw.decode("utf-8", "replace").strip()
            if line:
                inbox.put(line)
    finally:
        inbox.put(None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m chaos.phone", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--bind", required=True, help="loopback address to bind SIP and RTP to")
    parser.add_argument("--log", default=None, help="pjsip log file (SIP messages at level >= 4)")
    parser.add_argument("--log-level", type=int, default=4)
    opts = parser.parse_args(argv)

    # Protocol output goes to a private copy of stdout. fd 1, where pjlib prints before its log settings
    # apply (note 11), goes to the log file or to /dev/null; Python's own prints go to stderr.
    out_fd = os.dup(1)
    sink = os.open(opts.log or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(sink, 1)
    os.close(sink)
    sys.stdout = sys.stderr

    server = PhoneServer(opts.bind, out_fd, opts.log, opts.log_level)
    try:
        server.start()
    except BaseException as exc:
        server.emit("error", where="start", error=_describe(exc), traceback=traceback.format_exc())
        os._exit(2)
    threading.Thread(target=_stdin_reader, args=(server.inbox,), name="stdin", daemon=True).start()
    server.emit("ready", bind=opts.bind, pid=os.getpid())
    try:
        req = server.run()
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            server.emit("error", where="pump", error=_describe(exc), traceback=traceback.format_exc())
        os._exit(3)
    server.shutdown(req)
    return 0  # not reached: shutdown() leaves with os._exit


# ---------------------------------------------------------------------------------------------------------
# The controller (parent side)
# ---------------------------------------------------------------------------------------------------------


class PhoneError(Exception):
    """Root of the controller's errors."""


class PhoneCommandFailed(PhoneError):
    """The phone refused or failed a command (its reply had ok=false)."""


class PhoneTimeout(PhoneError):
    """No reply or matching event before the deadline."""


class PhoneExited(PhoneError):
    """The phone process is gone."""


def poll_until(
    condition: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Call `condition` until it returns a truthy value (returned) or `timeout` passes (PhoneTimeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise PhoneTimeout(f"{what} not met within {timeout:.1f}s")
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


@dataclass
class _Pending:
    reply: Json | None = None
    done: threading.Event = field(default_factory=threading.Event)


class PhoneProcess:
    """Controller of one phone process (`python -m chaos.phone`); a context manager.

    Thread-safe: requests may be sent from several threads. Every event the phone emits is kept, in
    order, in `events`; `wait_event` looks at all of them from index `since` on, including those that
    arrived before the call.
    """

    def __init__(
        self,
        bind: str,
        *,
        log: str | os.PathLike[str] | None = None,
        log_level: int = 4,
        python: str | None = None,
        start_timeout: float = 15.0,
    ) -> None:
        self.bind = bind
        self.log = Path(log) if log is not None else None
        self.log_level = log_level
        self.python = python or sys.executable
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._cond = threading.Condition()
        self._events: list[Json] = []
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._exited = False
        self._reader: threading.Thread | None = None
        self._write_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> Self:
        """Start the phone and wait for its `ready` event."""
        self.spawn()
        self.wait_ready()
        return self

    def spawn(self) -> None:
        """Start the child process without waiting for it (see `start_all`)."""
        if self.proc is not None:
            raise PhoneError(f"phone {self.bind} already started")
        cmd = [self.python, "-m", "chaos.phone", "--bind", self.bind]
        if self.log is not None:
            cmd += ["--log", str(self.log), "--log-level", str(self.log_level)]
        # With a log, the child's stderr (Python tracebacks) goes beside it.
        stderr = open(f"{self.log}.stderr", "ab") if self.log is not None else None  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, close_fds=True
            )
        finally:
            if stderr is not None:
                stderr.close()
        self._reader = threading.Thread(target=self._read_loop, name=f"phone-{self.bind}", daemon=True)
        self._reader.start()

    def wait_ready(self) -> None:
        """Wait for the `ready` event of a spawned phone; on failure close it and raise."""
        try:
            self.wait_event(lambda e: e["event"] == "ready", self.start_timeout)
        except PhoneError:
            self.close()
            raise

    @staticmethod
    def start_all(phones: list[PhoneProcess]) -> None:
        """Start several phones in parallel; if any fails to come up, close them all and raise."""
        try:
            for phone in phones:
                phone.spawn()
            for phone in phones:
                phone.wait_ready()
        except BaseException:
            for phone in phones:
                phone.close(graceful=False)
            raise

    def close(self, timeout: float = 3.0, graceful: bool = True) -> int | None:
        """Ask the phone to quit (hanging up its calls if `graceful`); kill it if it does not exit."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None and not self._exited:
            with contextlib.suppress(PhoneError, OSError, ValueError):
                self.request("quit", timeout=timeout, graceful=graceful)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        if self._reader is not None:
            self._reader.join(timeout=timeout)
        with contextlib.suppress(OSError):
            if proc.stdout is not None:
                proc.stdout.close()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL the phone (a phone that vanishes without a word)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5.0)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------------------

    def _read_loop(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            for raw in self.proc.stdout:
                try:
                    msg = json.loads(raw)
                except ValueError:
                    msg = {"event": "garbage", "line": raw.decode("utf-8", "replace")}
                if not isinstance(msg, dict):
                    msg = {"event": "garbage", "line": raw.decode("utf-8", "replace")}
                with self._cond:
                    if "event" in msg:
                        self._events.append(msg)
                    else:
                        pending = self._pending.get(msg.get("id"))  # type: ignore[arg-type]
                        if pending is not None:
                            pending.reply = msg
                            pending.done.set()
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                self._exited = True
                for pending in self._pending.values():
                    pending.done.set()
                self._cond.notify_all()

    def request(self, cmd: str, timeout: float = 5.0, **args: Any) -> Json:
        """Send one command and return its result; PhoneCommandFailed if the phone refused it."""
        proc = self.proc
        if proc is None or proc.stdin is None:
            raise PhoneExited("phone not started")
        req_id = next(self._ids)
        pending = _Pending()
        with self._cond:
            if self._exited:
                raise PhoneExited(f"phone {self.bind} has exited (rc={proc.poll()})")
            self._pending[req_id] = pending
        line = json.dumps({"id": req_id, "cmd": cmd, "args": args}) + "\n"
        try:
            with self._write_lock:
                proc.stdin.write(line.encode())
                proc.stdin.flush()
            if not pending.done.wait(timeout):
                raise PhoneTimeout(f"phone {self.bind}: no reply to {cmd} within {timeout:.1f}s")
        except (BrokenPipeError, ValueError) as exc:
            raise PhoneExited(f"phone {self.bind} has exited (rc={proc.poll()})") from exc
        finally:
            with self._cond:
                self._pending.pop(req_id, None)
        reply = pending.reply
        if reply is None:
            raise PhoneExited(f"phone {self.bind} exited before replying to {cmd} (rc={proc.poll()})")
        if not reply.get("ok"):
            raise PhoneCommandFailed(f"{cmd}: {reply.get('error')}")
        result = reply.get("result")
        return result if isinstance(result, dict) else {}

    @property
    def events(self) -> list[Json]:
        with self._cond:
            return list(self._events)

    def mark(self) -> int:
        """Index of the next event: pass as `since` to wait only for events that arrive from now on."""
        with self._cond:
            return len(self._events)

    def errors(self) -> list[Json]:
        """`error` events (exceptions caught inside the phone)."""
        return [e for e in self.events if e.get("event") == "error"]

    def wait_event(self, predicate: Callable[[Json], bool], timeout: float, *, since: int = 0) -> Json:
        """Return the first event at index >= `since` that satisfies `predicate`, waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        index = since
        with self._cond:
            while True:
                while index < len(self._events):
                    event = self._events[index]
                    index += 1
                    if predicate(event):
                        return event
                if self._exited:
                    raise PhoneExited(f"phone {self.bind} exited while waiting; last events: {self._tail()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PhoneTimeout(
                        f"phone {self.bind}: no matching event in {timeout:.1f}s; last events: {self._tail()}"
                    )
                self._cond.wait(remaining)

    def _tail(self, n: int = 8) -> str:
        return json.dumps(self._events[-n:])

    def iter_events(self, since: int = 0) -> Iterator[Json]:
        """Events received so far from index `since`."""
        yield from self.events[since:]

    # -- commands ----------------------------------------------------------------------------------------

    def transports(self, udp: bool = True, tcp: bool = False, tcp_nodelay: bool = True) -> dict[str, int]:
        """Create the UDP and/or TCP transports (once each); return their listening ports."""
        result = self.request("transports", udp=udp, tcp=tcp, tcp_nodelay=tcp_nodelay)
        return {k: int(v) for k, v in result.items()}

    def account_add(
        self,
        id: str,
        uri: str,
        *,
        transport: str = "udp",
        registrar: str | None = None,
        register: bool = False,
        user: str | None = None,
        password: str | None = None,
        expires: int | None = None,
        proxy: list[str] | None = None,
        outbound: dict[str, Any] | None = None,
    ) -> None:
        args: Json = {"id": id, "uri": uri, "transport": transport, "register": register}
        for key, value in (
            ("registrar", registrar),
            ("user", user),
            ("password", password),
            ("expires", expires),
            ("proxy", proxy),
            ("outbound", outbound),
        ):
            if value is not None:
                args[key] = value
        self.request("account_add", **args)

    def register(self, account: str) -> None:
        self.request("register", account=account)

    def unregister(self, account: str) -> None:
        self.request("unregister", account=account)

    def auto_answer(self, account: str, code: int | None, delay: float = 0.0, ring: bool = True) -> None:
        """Answer incoming calls on `account` with `code` after `delay` s (180 first if `ring`); None stops."""
        self.request("auto_answer", account=account, code=code, delay=delay, ring=ring)

    def call(self, account: str, to: str) -> str:
        """Place a call; return its call id."""
        return str(self.request("call", account=account, to=to)["call"])

    def answer(self, call: str, code: int = 200) -> None:
        self.request("answer", call=call, code=code)

    def hangup(self, call: str, code: int | None = None) -> None:
        self.request("hangup", call=call, **({"code": code} if code else {}))

    def bye(self, call: str) -> None:
        """Send a BYE whose final status arrives as a `bye_result` event."""
        self.request("bye", call=call)

    def cancel(self, call: str) -> None:
        self.request("cancel", call=call)

    def call_info(self, call: str) -> Json:
        return self.request("call_info", call=call)

    def rtp_gaps(self, call: str) -> Json:
        return self.request("rtp_gaps", call=call)

    # -- event helpers -------------------------------------------------------------------------------------

    def wait_call_state(self, call: str, state: str, timeout: float = 5.0, since: int = 0) -> Json:
        return self.wait_event(
            lambda e: e["event"] == "call_state" and e.get("call") == call and e.get("state") == state,
            timeout,
            since=since,
        )

    def wait_incoming(self, account: str | None = None, timeout: float = 5.0, since: int = 0) -> Json:
        return self.wait_event(
            lambda e: e["event"] == "incoming_call" and (account is None or e.get("account") == account),
            timeout,
            since=since,
        )


if __name__ == "__main__":
    sys.exit(main())
