"""The chaos workload: admin writes, SIPp REGISTER load with digest, pjsua2 calls held across faults.

Theory of operation
-------------------
Three independent clients load the cluster while faults come and go; each records every operation and
its outcome in the history (chaos/history.py) as it happens.

- `AdminWriter` (a thread) creates, updates (display name, sometimes the password) and deletes extensions
  of its own range, one operation at a time, through a node picked by the seeded generator (a dead node is
  a real client's bad luck). Each operation has its own op_id; an unknown outcome (timeout, proposal
  timeout, no quorum after submission, connection lost after sending) is retried *with the same op_id* on
  other nodes until a definite answer or a deadline, so the dedupe window makes the retries safe. Outcomes:
  `ok` (applied or duplicate-of-applied), `fail` (rejected, or refused before anything was proposed),
  `unknown`. Display names are unique per operation (`w<op>`), which is what lets the checker tell a lost
  write from a write applied twice.
- `RegisterLoad` runs SIPp (bench/sipp/reg_auth.xml: REGISTER, 401, REGISTER with MD5 digest, 200) at a
  fixed rate against the service address (or one SIPp per node when no node serves it) for the whole run,
  and turns SIPp's per-second statistics and per-registration response times into `register` records at
  the end. Failures count in the second SIPp gave up (after its 2 s receive timeout); `t0` of a failed
  attempt is shifted back by that timeout so it lands near the second the attempt was made.
- `CallWorkload` runs pairs of pjsua2 phone processes (chaos/phone.py; caller and callee in different
  processes, so RTP crosses processes). Each round, `start_round()` re-registers every phone and places one
  call per pair (auto-answered), waiting until RTP flows both ways; the fault happens while the calls are
  held; `end_round()` reads both sides' `rtp_gaps` and ends each call with a BYE whose final status is
  recorded. A call that dropped on its own is recorded as ended without a BYE.

Users' passwords are generated here, handed to SIPp in a CSV (mode 0600) that is deleted as soon as SIPp
has started (it reads the file at start), and to the phones over their stdin; they are never written to the
history or the logs.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import os
import random
import secrets
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos.cluster import DOMAIN, LoopbackCluster, RpcFailure, Unreachable, wait_until
from chaos.history import History
from chaos.phone import PhoneError, PhoneProcess, poll_until

ROOT = Path(__file__).resolve().parents[1]
SIPP_SCENARIO = ROOT / "bench" / "sipp" / "reg_auth.xml"
SIPP_RECV_TIMEOUT_MS = 2000

# JSON-RPC codes (raftpbx/rpc.py)
NOT_LEADER = -32000
NO_QUORUM = -32001
PROPOSAL_TIMEOUT = -32002
REPLICATION_ERROR = -32003
REJECTED = -32005
INVALID_PARAMS = -32602


def _password() -> str:
    return secrets.token_urlsafe(12)


# --------------------------------------------------------------------------------------------- admin
class AdminWriter:
    """Sequential admin writes on extensions `first..first+keys-1`; see the module docstring."""

    def __init__(self, cluster: LoopbackCluster, history: History, seed: int, *, first: int = 9000,
                 keys: int = 8, pause: float = 0.05, op_deadline: float = 8.0) -> None:
        self.cluster = cluster
        self.history = history
        self.rng = random.Random(seed * 1_000_003 + 17)
        self.seed = seed
        self.keys = [str(first + i) for i in range(keys)]
        self.pause = pause
        self.op_deadline = op_deadline
        self.present: dict[str, bool | None] = dict.fromkeys(self.keys, False)
        self.op = 0
        self.counts = {"ok": 0, "fail": 0, "unknown": 0}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="chaos-admin", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.op_deadline + 10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.one()
            self._stop.wait(self.pause)

    def _choose(self, key: str) -> str:
        present = self.present[key]
        if present is None:
            return self.rng.choice(["create", "update", "delete"])
        if not present:
            return "create"
        return self.rng.choices(["update", "delete"], weights=[4, 1])[0]

    def one(self) -> str:
        self.op += 1
        op = self.op
        key = self.rng.choice(self.keys)
        f = self._choose(key)
        value = None if f == "delete" else f"w{op}"
        change_password = f == "create" or (f == "update" and self.rng.random() < 0.4)
        op_id = f"chaos-{self.seed}-{op}"
        params: dict[str, Any] = {"extension": key, "op_id": op_id}
        if f != "delete":
            params["display_name"] = value
        if change_password:
            params["password"] = _password()
        self.history.record("write", phase="invoke", op=op, f=f, key=key, value=value, password=change_password,
                            op_id=op_id)
        outcome, error, node_id = self._execute(f"extension.{f}", params)
        self.counts[outcome] += 1
        self.history.record("write", phase=outcome, op=op, f=f, key=key, value=value, op_id=op_id,
                            node=node_id, error=error)
        if outcome == "ok":
            self.present[key] = f != "delete"
        elif outcome == "unknown":
            self.present[key] = None
        return outcome

    def _execute(self, method: str, params: dict[str, Any]) -> tuple[str, str | None, str | None]:
        """Send until a definite answer; (outcome, last error, node). `unknown` once anything may have
        been proposed and no definite answer came before the deadline."""
        deadline = time.monotonic() + self.op_deadline
        maybe_proposed = False
        error: str | None = None
        node_id: str | None = None
        while True:
            voters = self.cluster.voters()
            node = self.rng.choice(voters)
            node_id = node.id
            try:
                node.call(method, timeout=3.0, **params)
                return "ok", None, node_id
            except Unreachable as exc:
                error = str(exc)
                if "refused" not in error.lower():  # a timeout: the request may have been handled
                    maybe_proposed = True
            except RpcFailure as exc:
                error = f"{exc.code}: {exc.message}"
                data = exc.data if isinstance(exc.data, dict) else {}
                if exc.code in (REJECTED, INVALID_PARAMS):
                    # Refused at the decision or at apply. A retry after an unknown attempt answers with the
                    # first attempt's outcome (dedupe), so this is definite either way.
                    return "fail", error, node_id
                if exc.code == PROPOSAL_TIMEOUT or exc.code == REPLICATION_ERROR or (
                        exc.code == NO_QUORUM and data.get("outcome_unknown")):
                    maybe_proposed = True
            if time.monotonic() >= deadline or (self._stop.is_set() and time.monotonic() >= deadline - 4):
                return ("unknown" if maybe_proposed else "fail"), error, node_id
            time.sleep(0.1)  # client backoff between retries


# --------------------------------------------------------------------------------------------- SIPp
@dataclass
class _Sipp:
    target: tuple[str, int]
    folder: Path
    proc: subprocess.Popen[bytes]
    csv_path: Path
    started: float


@dataclass
class RegisterLoad:
    """SIPp REGISTER load with digest for the whole run (see the module docstring)."""

    cluster: LoopbackCluster
    history: History
    folder: Path
    rate: float = 10.0
    users: int = 8
    first_user: int = 7000
    local_ip: str = ""
    instances: list[_Sipp] = field(default_factory=list)
    targets: list[tuple[str, int]] = field(default_factory=list)

    def prepare(self) -> None:
        """Create the SIPp users (extensions) through the cluster."""
        self.passwords = {str(self.first_user + i): _password() for i in range(self.users)}
        for ext, password in self.passwords.items():
            _create_extension(self.cluster, ext, password, f"sipp {ext}")

    def start(self, use_service: bool) -> None:
        sipp = shutil.which("sipp")
        if sipp is None:
            raise RuntimeError("sipp not found (Debian package sip-tester; scripts/bootstrap.sh --test)")
        self.folder.mkdir(parents=True, exist_ok=True)
        if use_service:
            self.targets = [self.cluster.service_address]
        else:
            self.targets = [n.sip for n in self.cluster.voters()]
        per_rate = self.rate / len(self.targets)
        for i, target in enumerate(self.targets):
            local_ip = self.cluster.sipp_address(i)
            folder = self.folder / f"sipp{i}"
            folder.mkdir(exist_ok=True)
            csv_path = folder / "users.csv"
            fd = os.open(csv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", newline="") as fh:
                fh.write("SEQUENTIAL\n")
                writer = csv.writer(fh, delimiter=";", lineterminator="\n")
                for ext, password in self.passwords.items():
                    writer.writerow([ext, password])
            ports = self.cluster.sipp_ports(i)
            argv = [
                *self.cluster.sipp_argv_prefix(), sipp, f"{target[0]}:{target[1]}", "-sf", str(SIPP_SCENARIO), "-inf", str(csv_path), "-t", "u1",
                "-i", local_ip, "-bind_local", "-p", str(ports[0]), "-mp", str(ports[1]), "-ci", local_ip,
                "-cp", str(ports[2]), "-r", f"{per_rate:g}", "-rp", "1000", "-l", str(max(50, int(per_rate * 4))),
                "-recv_timeout", str(SIPP_RECV_TIMEOUT_MS), "-nostdin", "-trace_rtt", "-rtt_freq", "1",
                "-trace_stat", "-stf", str(folder / "stat.csv"), "-fd", "1",
                "-trace_err", "-error_file", str(folder / "errors.log"),
            ]
            out = open(folder / "stdout.log", "wb")  # noqa: SIM115 - handed to the child
            err = open(folder / "stderr.log", "wb")  # noqa: SIM115
            try:
                proc = subprocess.Popen(argv, cwd=folder, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
            finally:
                out.close()
                err.close()
            self.instances.append(_Sipp(target, folder, proc, csv_path, time.time()))
        for inst in self.instances:  # SIPp reads the users file at start: remove the passwords at once
            wait_until(functools.partial(_sipp_started, inst), 10.0)
            with contextlib.suppress(FileNotFoundError):
                inst.csv_path.unlink()
        self.history.record("note", text=f"SIPp REGISTER load {self.rate:g}/s on {self.targets}")

    def stop(self) -> None:
        for inst in self.instances:
            if inst.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    inst.proc.send_signal(signal.SIGUSR1)  # SIPp: stop now, write the final statistics
        for inst in self.instances:
            try:
                inst.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                inst.proc.kill()
                inst.proc.wait(timeout=5)
            with contextlib.suppress(FileNotFoundError):
                inst.csv_path.unlink()  # it holds passwords
        for i, inst in enumerate(self.instances):
            for entry in parse_sipp(inst.folder):
                self.history.record("register", sipp=i, target=f"{inst.target[0]}:{inst.target[1]}", **entry)

    def alive(self) -> bool:
        return all(inst.proc.poll() is None for inst in self.instances)


def _sipp_started(inst: _Sipp) -> bool:
    return inst.proc.poll() is not None or (inst.folder / "stat.csv").exists()


def parse_sipp(folder: Path) -> list[dict[str, Any]]:
    """Per-second REGISTER outcomes from SIPp's stat file (periodic counters) and rtt file (latencies)."""
    per_sec: dict[int, dict[str, Any]] = {}

    def bucket(sec: int) -> dict[str, Any]:
        return per_sec.setdefault(sec, {"t0": sec, "ok": 0, "failed": 0, "lat_ms": []})

    stat = folder / "stat.csv"
    rows: list[list[str]] = []
    if stat.exists():
        with open(stat, newline="") as fh:
            rows = list(csv.reader(fh, delimiter=";"))
    start: float | None = None
    if len(rows) > 1:
        header = rows[0]
        with contextlib.suppress(ValueError, IndexError):
            start = float(rows[1][header.index("StartTime")].split()[-1])
        try:
            i_time = header.index("CurrentTime")
            i_failed = header.index("FailedCall(P)")
        except ValueError:
            i_time = i_failed = -1
        if i_time >= 0:
            for row in rows[1:]:
                with contextlib.suppress(ValueError, IndexError):
                    at = float(row[i_time].split()[-1])
                    failed = int(row[i_failed])
                    if failed:
                        bucket(int(at - SIPP_RECV_TIMEOUT_MS / 1000.0))["failed"] += failed
    if start is not None:  # the rtt file's Date_ms counts from SIPp's start
        for path in folder.glob("*_rtt.csv"):
            with open(path, newline="") as fh:
                for row in csv.reader(fh, delimiter=";"):
                    if len(row) < 3 or not row[0].replace(".", "").isdigit():
                        continue
                    at_ms, rt, rtd = float(row[0]), float(row[1]), row[2].strip()
                    if rtd in ("1", "register"):
                        b = bucket(int(start + at_ms / 1000.0))
                        b["ok"] += 1
                        b["lat_ms"].append(round(rt, 1))
    return [per_sec[s] for s in sorted(per_sec)]


def _create_extension(cluster: LoopbackCluster, ext: str, password: str, name: str) -> None:
    op_id = f"chaos-setup-{ext}-{secrets.token_hex(4)}"
    deadline = time.monotonic() + 20
    while True:
        leader = cluster.wait_leader(10.0)
        try:
            if leader is not None:
                leader.call("extension.create", timeout=5.0, extension=ext, password=password, display_name=name,
                            op_id=op_id)
                return
        except RpcFailure as exc:
            if exc.code == REJECTED and "exists" in exc.message:
                leader.call("extension.update", timeout=5.0, extension=ext, password=password,  # type: ignore[union-attr]
                            display_name=name, op_id=op_id + "u")
                return
            if time.monotonic() > deadline:
                raise
        except Unreachable:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise RuntimeError(f"could not create extension {ext}")
        time.sleep(0.1)  # client backoff


# --------------------------------------------------------------------------------------------- calls
PHONE_NICE = -10
PHONE_RT_PRIORITY = 5


def _raise_priority(pid: int | None) -> None:
    """Give every thread of a phone process real-time round-robin scheduling (priority 5), or failing that
    (no privilege) nice -10; as a plain user, nothing.

    The phones are the measuring instrument: RTP goes phone to phone, so a phone starved of CPU by the
    nodes and everything else on the machine shows gaps that the cluster did not cause (its sampling
    interval is reported beside each gap). The phones mostly sleep (50 packets/s per leg, the pump polls
    every 10 ms), so this costs the others nothing measurable. Scheduling is per thread, hence every task
    of the process."""
    if pid is None or os.geteuid() != 0:
        return
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            os.sched_setscheduler(int(task.name), os.SCHED_RR, os.sched_param(PHONE_RT_PRIORITY))
        except (OSError, ValueError):
            with contextlib.suppress(OSError, ValueError):
                os.setpriority(os.PRIO_PROCESS, int(task.name), PHONE_NICE)


@dataclass
class _Pair:
    index: int
    caller: PhoneProcess
    callee: PhoneProcess
    caller_ext: str
    callee_ext: str
    call: str | None = None  # caller-side call id of the call in progress
    callee_call: str | None = None
    workload_id: str | None = None
    sip_call_id: str = ""


class CallWorkload:
    """Pairs of pjsua2 phone processes placing calls held across faults (see the module docstring)."""

    def __init__(self, cluster: LoopbackCluster, history: History, folder: Path, pairs: int = 2,
                 first: int = 8100) -> None:
        self.cluster = cluster
        self.history = history
        self.folder = folder
        self.npairs = pairs
        self.first = first
        self.pairs: list[_Pair] = []
        self.phones: list[PhoneProcess] = []
        self.seq = 0
        self.use_service = True

    def registrar_for(self, pair: _Pair) -> tuple[str, int]:
        if self.use_service:
            return self.cluster.service_address
        voters = self.cluster.voters()
        return voters[pair.index % len(voters)].sip

    def start(self, use_service: bool) -> None:
        self.use_service = use_service
        self.folder.mkdir(parents=True, exist_ok=True)
        phones = []
        for i in range(self.npairs * 2):
            phones.append(PhoneProcess(self.cluster.phone_address(i), log=self.folder / f"phone{i}.log",
                                       python=self.cluster.phone_python()))
        PhoneProcess.start_all(phones)
        self.phones = phones
        for phone in phones:
            _raise_priority(phone.proc.pid if phone.proc is not None else None)
        for i in range(self.npairs):
            caller, callee = phones[2 * i], phones[2 * i + 1]
            caller_ext, callee_ext = str(self.first + 2 * i), str(self.first + 2 * i + 1)
            pair = _Pair(i, caller, callee, caller_ext, callee_ext)
            self.pairs.append(pair)
            for phone, ext, account in ((caller, caller_ext, "a"), (callee, callee_ext, "b")):
                password = _password()
                _create_extension(self.cluster, ext, password, f"phone {ext}")
                phone.transports(udp=True)
                host, port = self.registrar_for(pair)
                phone.account_add(account, f"sip:{ext}@{DOMAIN}", registrar=f"sip:{host}:{port}", register=False,
                                  user=ext, password=password, expires=300)
            callee.auto_answer("b", 200, delay=0.1)
        # An extension that exists but never registers: calls to it must be recorded as not answered (480).
        self.unregistered = str(self.first + 2 * self.npairs)
        _create_extension(self.cluster, self.unregistered, _password(), "never registered")

    def _register(self, phone: PhoneProcess, account: str, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            mark = phone.mark()
            try:
                phone.register(account)
                event = phone.wait_event(lambda e: e["event"] == "reg_state" and e.get("account") == account,
                                         min(5.0, max(0.5, deadline - time.monotonic())), since=mark)
            except PhoneError:
                continue
            if event.get("code") == 200 and event.get("active"):
                return True
            time.sleep(0.2)  # client backoff before registering again
        return False

    def start_round(self, round_no: int) -> None:
        """Register every phone, place one call per pair, wait until RTP flows both ways."""
        for pair in self.pairs:
            for phone, account in ((pair.caller, "a"), (pair.callee, "b")):
                if not self._register(phone, account):
                    self.history.record("note", text=f"round {round_no}: {phone.bind} could not register")
        for pair in self.pairs:
            self.seq += 1
            wid = f"call{self.seq}"
            host, port = self.registrar_for(pair)
            mark_callee = pair.callee.mark()
            mark_caller = pair.caller.mark()
            try:
                call = pair.caller.call("a", f"sip:{pair.callee_ext}@{host}:{port}")
            except PhoneError as exc:
                self.history.record("call", phase="failed", call=wid, caller=pair.caller_ext,
                                    callee=pair.callee_ext, error=str(exc), round=round_no)
                continue
            sip_call_id = ""
            with contextlib.suppress(PhoneError):
                sip_call_id = str(pair.caller.call_info(call).get("sip_call_id", ""))
            self.history.record("call", phase="placed", call=wid, caller=pair.caller_ext, callee=pair.callee_ext,
                                sip_call_id=sip_call_id, round=round_no)
            def settled(e: dict[str, Any], c: str = call) -> bool:
                return bool(e["event"] == "call_state" and e.get("call") == c
                            and e.get("state") in ("confirmed", "disconnected"))

            try:
                state = pair.caller.wait_event(settled, 10.0, since=mark_caller)
            except PhoneError as exc:
                state = {"state": "timeout", "code": None, "error": str(exc)}
            if state.get("state") != "confirmed":
                with contextlib.suppress(PhoneError):
                    pair.caller.hangup(call)
                self.history.record("call", phase="failed", call=wid, caller=pair.caller_ext,
                                    callee=pair.callee_ext, sip_call_id=sip_call_id, code=state.get("code"),
                                    error=state.get("error") or state.get("reason"), round=round_no)
                continue
            try:
                incoming = pair.callee.wait_incoming("b", timeout=5.0, since=mark_callee)
                pair.callee_call = str(incoming["call"])
            except PhoneError:
                pair.callee_call = None
            pair.call, pair.workload_id, pair.sip_call_id = call, wid, sip_call_id
            self.history.record("call", phase="confirmed", call=wid, caller=pair.caller_ext,
                                callee=pair.callee_ext, sip_call_id=sip_call_id, round=round_no)
            with contextlib.suppress(PhoneError):
                poll_until(functools.partial(self._flowing, pair), timeout=5.0, what="RTP both ways")

        self._unanswered_call(round_no)

    def _unanswered_call(self, round_no: int) -> None:
        """Pair 0's caller calls the extension that never registers; the final code is the true outcome."""
        pair = self.pairs[0]
        self.seq += 1
        wid = f"call{self.seq}"
        host, port = self.registrar_for(pair)
        mark = pair.caller.mark()
        try:
            call = pair.caller.call("a", f"sip:{self.unregistered}@{host}:{port}")
        except PhoneError as exc:
            self.history.record("note", text=f"round {round_no}: unanswered call not placed: {exc}")
            return
        sip_call_id = ""
        with contextlib.suppress(PhoneError):
            sip_call_id = str(pair.caller.call_info(call).get("sip_call_id", ""))
        self.history.record("call", phase="placed", call=wid, caller=pair.caller_ext, callee=self.unregistered,
                            sip_call_id=sip_call_id, round=round_no, expect="unanswered")
        try:
            state = pair.caller.wait_call_state(call, "disconnected", timeout=10.0, since=mark)
            code = state.get("code")
        except PhoneError as exc:
            code = None
            with contextlib.suppress(PhoneError):
                pair.caller.hangup(call)
            self.history.record("note", text=f"round {round_no}: unanswered call did not end: {exc}")
        self.history.record("call", phase="failed", call=wid, caller=pair.caller_ext, callee=self.unregistered,
                            sip_call_id=sip_call_id, code=code, round=round_no)

    @staticmethod
    def _flowing(pair: _Pair) -> bool:
        assert pair.call is not None
        a = pair.caller.call_info(pair.call)
        if pair.callee_call is None:
            return bool(a["rx"] >= 10 and a["tx"] >= 10)
        b = pair.callee.call_info(pair.callee_call)
        return bool(min(a["rx"], a["tx"], b["rx"], b["tx"]) >= 10)

    def end_round(self, round_no: int) -> None:
        """Read both sides' RTP gaps, then end each call with a BYE and record its final status."""
        for pair in self.pairs:
            if pair.call is None:
                continue
            call, wid = pair.call, pair.workload_id
            rtp: dict[str, Any] = {}
            error = None
            with contextlib.suppress(PhoneError):
                rtp["caller"] = pair.caller.rtp_gaps(call)
            if pair.callee_call is not None:
                with contextlib.suppress(PhoneError):
                    rtp["callee"] = pair.callee.rtp_gaps(pair.callee_call)
            bye_code = None
            mark = pair.caller.mark()
            try:
                pair.caller.bye(call)
                def bye_result(e: dict[str, Any], c: str = call) -> bool:
                    return bool(e["event"] == "bye_result" and e.get("call") == c)

                result = pair.caller.wait_event(bye_result, 12.0, since=mark)
                bye_code = result.get("code")
            except PhoneError as exc:
                error = str(exc)
                with contextlib.suppress(PhoneError):
                    pair.caller.hangup(call)
            if pair.callee_call is not None:
                with contextlib.suppress(PhoneError):
                    pair.callee.wait_call_state(pair.callee_call, "disconnected", timeout=5.0)
            self.history.record("call", phase="ended", call=wid, caller=pair.caller_ext, callee=pair.callee_ext,
                                sip_call_id=pair.sip_call_id, bye_code=bye_code, rtp=rtp, error=error, round=round_no)
            pair.call = pair.callee_call = pair.workload_id = None

    def errors(self) -> list[dict[str, Any]]:
        return [e for phone in self.phones for e in phone.errors()]

    def close(self) -> None:
        for phone in self.phones:
            with contextlib.suppress(Exception):
                phone.close(graceful=False)
