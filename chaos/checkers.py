"""Checkers: pure functions over a run's history and the states collected from the nodes.

Theory of operation
-------------------
Each checker takes the history (list of records, see chaos/history.py) and/or `states` (what
`LoopbackCluster.snapshot_state()` returned after healing: per node `reachable`, `applied_index`,
`digest`, `extensions` {ext: record}, `cdr` [records], `active_calls`) and returns a `CheckResult`: a name,
pass/fail, a one-line summary, measured figures, and the list of violations (each a dict naming what is
wrong). Nothing here touches a process, a socket or a clock, so each can be unit-tested with hand-made
histories that must fail (tests/chaos/test_checkers.py).

The write checker is a single-register model per extension (one writer per extension, operations
sequential): walking the operations in order it keeps the set of states the extension may be in
(`ABSENT` or the display name, unique per operation). An acknowledged operation must be possible from that
set (a create needs the extension absent, an update or delete needs it present) and then fixes the state;
a definite failure changes nothing; an unknown outcome adds its effect as a possibility. Each node's final
state must be in the final set; otherwise the violation is classified: the node shows the effect of an
operation the cluster had definitely refused (failed write applied: the client was told a lie), the
acknowledged state is missing (lost write), the node shows a state an earlier operation set and a later
acknowledged one replaced (applied twice or out of order), or something nobody wrote.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

Json = dict[str, Any]
ABSENT = "<absent>"

RTP_GAP_LIMIT_MS = 200.0
SERVICE_OVERLAP_BOUND_S = 1.5  # issue 5: a failover completes within 1.5 s; two holders never longer
AVAILABILITY_OK_RATIO = 0.9  # a second counts as available when at least this share of REGISTERs succeeds
RECOVERY_BOUND_S = 15.0
RECORDED_FAILURES = (480, 486)  # final codes decided after the call was committed (routing to the callee)  # after the heal, REGISTER availability must be back within this


@dataclass
class CheckResult:
    name: str
    ok: bool
    summary: str
    figures: Json = field(default_factory=dict)
    violations: list[Json] = field(default_factory=list)

    def to_json(self) -> Json:
        return {"name": self.name, "ok": self.ok, "summary": self.summary, "figures": self.figures,
                "violations": self.violations[:200], "violation_count": len(self.violations)}


def _reachable(states: Json) -> dict[str, Json]:
    return {nid: s for nid, s in states.get("nodes", {}).items() if s.get("reachable")}


def _faults(history: Iterable[Json], phase: str = "inject") -> list[Json]:
    return [e for e in history if e.get("kind") == "fault" and e.get("phase") == phase]


def injected_at(event: Json) -> float:
    """When a fault's injection began: `started` (the runner records the inject event once the injection is
    complete, which takes seconds for netem on several lab hosts), else the event's own time."""
    return float(event.get("started") or event["t"])


# --------------------------------------------------------------------------------------------- writes
def _completed_writes(history: Iterable[Json]) -> dict[str, list[Json]]:
    """Per key, the writes in invocation order, each with its completion phase (`unknown` if none came)."""
    invokes: dict[int, Json] = {}
    done: dict[int, str] = {}
    for e in history:
        if e.get("kind") != "write":
            continue
        if e.get("phase") == "invoke":
            invokes[int(e["op"])] = e
        else:
            done[int(e["op"])] = str(e.get("phase"))
    per_key: dict[str, list[Json]] = defaultdict(list)
    for op in sorted(invokes):
        inv = invokes[op]
        per_key[str(inv["key"])].append({**inv, "outcome": done.get(op, "unknown")})
    return per_key


def _effect(op: Json, state: str) -> str | None:
    """The state after applying `op` to `state`, or None if the op is refused from there."""
    f = op["f"]
    if f == "create":
        return str(op["value"]) if state == ABSENT else None
    if f == "update":
        return str(op["value"]) if state != ABSENT else None
    if f == "delete":
        return ABSENT if state != ABSENT else None
    raise ValueError(f"unknown write kind {f!r}")


def check_writes(history: list[Json], states: Json) -> CheckResult:
    """No acknowledged write lost, none applied twice, on every node (single-register model per key)."""
    per_key = _completed_writes(history)
    nodes = _reachable(states)
    violations: list[Json] = []
    counts = {"ok": 0, "fail": 0, "unknown": 0}
    for key, ops in sorted(per_key.items()):
        possible = {ABSENT}
        superseded: dict[str, int] = {}  # state -> op that set it, once a later acknowledged op replaced it
        setter: dict[str, int] = {}
        refused: dict[str, int] = {}  # state a definitely failed op would have produced -> that op
        for op in ops:
            counts[op["outcome"]] = counts.get(op["outcome"], 0) + 1
            if op["outcome"] == "fail":
                for s in possible:
                    after = _effect(op, s)
                    if after is not None and after not in possible:
                        refused.setdefault(after, int(op["op"]))  # the first refused op since the last ack
            if op["outcome"] == "ok":
                refused = {}
                allowed = {s for s in possible if _effect(op, s) is not None}
                if not allowed:
                    violations.append({"key": key, "op": op["op"], "kind": "impossible-ack",
                                       "detail": f"{op['f']} acknowledged while the extension could only be "
                                                 f"{sorted(possible)}"})
                new = str(op["value"]) if op["f"] != "delete" else ABSENT
                for s in possible:
                    if s != new and s in setter:
                        superseded[s] = setter[s]
                possible = {new}
                setter[new] = int(op["op"])
            elif op["outcome"] == "unknown":
                extra: set[str] = set()
                for s in possible:
                    after = _effect(op, s)
                    if after is not None:
                        extra.add(after)
                for s in extra:
                    setter.setdefault(s, int(op["op"]))
                possible |= extra
        for node_id, node in sorted(nodes.items()):
            record = node.get("extensions", {}).get(key)
            actual = ABSENT if record is None else str(record.get("display_name"))
            if actual in possible:
                continue
            failed_op = refused.get(actual)
            if failed_op is not None:
                kind = "failed-write-applied"  # the cluster answered a definite failure, yet the op took effect
            elif actual == ABSENT:
                kind = "lost"
            elif actual in superseded or actual in setter:
                kind = "applied-twice-or-reordered"
            else:
                kind = "unexplained"
            violation: Json = {"key": key, "node": node_id, "kind": kind, "actual": actual,
                         "expected_one_of": sorted(possible)}
            if failed_op is not None:
                violation["op"] = failed_op
            violations.append(violation)
    # Keys the workload never wrote must not appear as written by it (workload keys are reserved).
    ok = not violations and bool(nodes)
    summary = (f"{sum(counts.values())} writes ({counts['ok']} ok, {counts['fail']} failed, "
               f"{counts['unknown']} unknown) on {len(per_key)} extensions, checked on {len(nodes)} nodes: "
               + ("no lost or duplicated write" if ok else f"{len(violations)} violations"))
    if not nodes:
        summary = "no node reachable after healing: nothing to check against"
    lost = sum(1 for v in violations if v["kind"] == "lost")
    twice = sum(1 for v in violations if v["kind"] == "applied-twice-or-reordered")
    failed_applied = sum(1 for v in violations if v["kind"] == "failed-write-applied")
    return CheckResult("writes", ok, summary,
                       {"writes": sum(counts.values()), **counts, "keys": len(per_key), "lost": lost,
                        "duplicated": twice, "failed_but_applied": failed_applied}, violations)


# --------------------------------------------------------------------------------------------- digests
def check_digests(states: Json) -> CheckResult:
    """After healing, every voter answers with the same applied index and state digest."""
    nodes = states.get("nodes", {})
    unreachable = sorted(n for n, s in nodes.items() if not s.get("reachable"))
    views = {n: (s.get("applied_index"), s.get("digest")) for n, s in nodes.items() if s.get("reachable")}
    distinct = set(views.values())
    ok = not unreachable and len(distinct) == 1
    violations = [{"node": n, "kind": "unreachable"} for n in unreachable]
    if len(distinct) > 1:
        violations += [{"node": n, "kind": "digest", "applied_index": v[0], "digest": v[1]} for n, v in views.items()]
    summary = (f"{len(views)} nodes at applied index {next(iter(distinct))[0]} with one digest" if ok
               else f"{len(distinct)} distinct (index, digest) pairs, unreachable: {unreachable or 'none'}")
    return CheckResult("digests", ok, summary, {"nodes": len(nodes), "distinct": len(distinct)}, violations)


# --------------------------------------------------------------------------------------------- service
def check_service_address(history: list[Json], bound: float = SERVICE_OVERLAP_BOUND_S) -> CheckResult:
    """Never two nodes holding the service address for longer than `bound` seconds.

    From the periodic samples: a stretch of consecutive samples with two or more holders lasts from its
    first sample to the first later sample with at most one holder (or its own last sample). Also
    measured: the longest stretch with no holder (the failover gap as the sampler saw it)."""
    samples = [e for e in history if e.get("kind") == "sample"]
    known = any(e.get("known") for e in samples)
    violations: list[Json] = []
    longest_overlap = 0.0
    longest_gap = 0.0
    start_overlap: float | None = None
    start_gap: float | None = None
    holders_seen: list[str] = []
    for e in samples:
        n = len(e.get("holders") or [])
        t = float(e["t"])
        if n >= 2:
            if start_overlap is None:
                start_overlap, holders_seen = t, list(e["holders"])
        elif start_overlap is not None:
            duration = t - start_overlap
            longest_overlap = max(longest_overlap, duration)
            if duration > bound:
                violations.append({"kind": "overlap", "from": start_overlap, "seconds": round(duration, 3),
                                   "holders": holders_seen})
            start_overlap = None
        if known and n == 0:
            if start_gap is None:
                start_gap = t
        elif start_gap is not None:
            longest_gap = max(longest_gap, t - start_gap)
            start_gap = None
    if start_overlap is not None:
        duration = float(samples[-1]["t"]) - start_overlap
        longest_overlap = max(longest_overlap, duration)
        if duration > bound or duration == 0.0:  # still two holders when the run ended
            violations.append({"kind": "overlap-at-end", "from": start_overlap, "seconds": round(duration, 3),
                               "holders": holders_seen})
    if start_gap is not None:
        longest_gap = max(longest_gap, float(samples[-1]["t"]) - start_gap)
    ok = known and not violations
    if not samples:
        summary = "no samples"
        ok = False
    elif not known:
        summary = "no node reports whether it holds the service address (status field missing)"
    else:
        summary = (f"{len(samples)} samples; longest overlap {longest_overlap:.2f} s (bound {bound:.1f} s), "
                   f"longest time without a holder {longest_gap:.2f} s")
    return CheckResult("service-address", ok, summary,
                       {"samples": len(samples), "longest_overlap_s": round(longest_overlap, 3),
                        "longest_without_holder_s": round(longest_gap, 3), "bound_s": bound}, violations)


# --------------------------------------------------------------------------------------------- calls
def _calls(history: Iterable[Json]) -> dict[str, Json]:
    calls: dict[str, Json] = {}
    for e in history:
        if e.get("kind") != "call":
            continue
        c = calls.setdefault(str(e["call"]), {"call": e["call"]})
        phase = str(e.get("phase"))
        c[phase] = e
        for key in ("caller", "callee", "sip_call_id"):
            if e.get(key):
                c[key] = e[key]
    return calls


def check_call_records(history: list[Json], states: Json) -> CheckResult:
    """Every answered call has exactly one call record, on every node, with the true outcome.

    True outcome: an answered call (the caller saw it confirmed) is `answered` with the right caller and
    callee, and once the caller's BYE got a 200, `hangup_by` caller with an end time. A call that failed
    is never recorded `answered`; if it has a record, the record carries its code and the disposition the
    code implies (480 -> no-answer, 486 -> busy, ...); a 480 or 486 (decided after the call was committed)
    must have one. Records on a node
    that the workload never placed (phantoms) and calls still active after the run are violations too."""
    calls = _calls(history)
    nodes = _reachable(states)
    by_sip_id = {c["sip_call_id"]: c for c in calls.values() if c.get("sip_call_id")}
    violations: list[Json] = []
    answered = sum(1 for c in calls.values() if "confirmed" in c)
    for node_id, node in sorted(nodes.items()):
        records: dict[str, list[Json]] = defaultdict(list)
        for r in node.get("cdr", []):
            records[str(r.get("call_id"))].append(r)
        for sip_id, rs in records.items():
            if sip_id not in by_sip_id:
                violations.append({"node": node_id, "call_id": sip_id, "kind": "phantom-record"})
            if len(rs) > 1:
                violations.append({"node": node_id, "call_id": sip_id, "kind": "several-records", "count": len(rs)})
        for c in calls.values():
            sip_id = str(c.get("sip_call_id") or "")
            if not sip_id:
                continue
            rs = records.get(sip_id, [])
            if "confirmed" in c:
                if len(rs) != 1:
                    violations.append({"node": node_id, "call": c["call"], "call_id": sip_id,
                                       "kind": "missing-record" if not rs else "several-records"})
                    continue
                r = rs[0]
                problems = []
                if r.get("disposition") != "answered":
                    problems.append(f"disposition {r.get('disposition')}")
                if r.get("caller") != c.get("caller") or r.get("callee") != c.get("callee"):
                    problems.append(f"parties {r.get('caller')}->{r.get('callee')}")
                if r.get("answered_at") is None:
                    problems.append("no answered_at")
                ended = c.get("ended")
                if ended is not None and ended.get("bye_code") == 200:
                    if r.get("ended_at") is None:
                        problems.append("no ended_at after a BYE answered 200")
                    elif r.get("hangup_by") != "caller":
                        problems.append(f"hangup_by {r.get('hangup_by')}")
                if problems:
                    violations.append({"node": node_id, "call": c["call"], "call_id": sip_id,
                                       "kind": "wrong-record", "problems": problems, "record": r})
            elif "failed" in c and rs:
                r = rs[0]
                code = c["failed"].get("code")
                if r.get("disposition") == "answered":
                    violations.append({"node": node_id, "call": c["call"], "call_id": sip_id,
                                       "kind": "failed-call-recorded-answered", "record": r})
                elif isinstance(code, int) and code >= 300 and (
                        r.get("status_code") != code or r.get("disposition") != expected_disposition(code)):
                    violations.append({"node": node_id, "call": c["call"], "call_id": sip_id,
                                       "kind": "wrong-failure-record", "code": code, "record": r})
            elif "failed" in c and c["failed"].get("code") in RECORDED_FAILURES:
                # The callee side's answer (not registered, busy): the call was started in the log before it
                # was routed, so it must be recorded. Other failures (a 503 without quorum, the phone's own
                # 408) may come before anything was committed: no record is then the truth.
                violations.append({"node": node_id, "call": c["call"], "call_id": sip_id,
                                   "kind": "missing-failure-record", "code": c["failed"]["code"]})
        for active in node.get("active_calls", []):
            violations.append({"node": node_id, "call_id": active.get("call_id"), "kind": "still-active"})
    ok = bool(nodes) and not violations
    summary = (f"{len(calls)} calls ({answered} answered) against {len(nodes)} nodes' records: "
               + ("every answered call has exactly one correct record" if ok else f"{len(violations)} violations"))
    return CheckResult("call-records", ok, summary, {"calls": len(calls), "answered": answered}, violations)


def expected_disposition(code: int) -> str:
    """The disposition a call that failed with final `code` must carry (state/calls.py's table)."""
    if code in (486, 600, 603):
        return "busy"
    if code in (408, 480, 487):
        return "no-answer"
    return "failed"


def check_calls_survive(history: list[Json], gap_limit_ms: float = RTP_GAP_LIMIT_MS) -> CheckResult:
    """Calls established before a fault keep two-way RTP (no gap over the limit) and end with a BYE
    answered 200. Every established call is held to it; those that spanned a fault are counted apart."""
    calls = _calls(history)
    injects = [injected_at(e) for e in _faults(history)]
    violations: list[Json] = []
    spanned = 0
    worst = 0.0
    established = [c for c in calls.values() if "confirmed" in c]
    for c in established:
        t_conf = float(c["confirmed"]["t"])
        ended = c.get("ended")
        t_end = float(ended["t"]) if ended else float("inf")
        if any(t_conf < t < t_end for t in injects):
            spanned += 1
        if ended is None:
            violations.append({"call": c["call"], "kind": "dropped", "detail": c.get("failed", {}).get("error")
                               or "established call never ended with our BYE"})
            continue
        if ended.get("bye_code") != 200:
            violations.append({"call": c["call"], "kind": "bye", "bye_code": ended.get("bye_code"),
                               "detail": ended.get("error")})
        rtp = ended.get("rtp") or {}
        for side in ("caller", "callee"):
            gaps = rtp.get(side)
            if not gaps:
                violations.append({"call": c["call"], "kind": "no-rtp-report", "side": side})
                continue
            gap = float(gaps.get("max_gap_ms", 0.0))
            worst = max(worst, gap)
            if gap > gap_limit_ms or gaps.get("ended"):
                violations.append({"call": c["call"], "kind": "rtp-gap", "side": side, "max_gap_ms": gap,
                                   "ended_early": bool(gaps.get("ended")),
                                   # the phone's own longest pause between two samples (a CPU-starved phone)
                                   "phone_sample_interval_ms": gaps.get("max_sample_interval_ms")})
            if int(gaps.get("rx", 0)) == 0 or int(gaps.get("tx", 0)) == 0:
                violations.append({"call": c["call"], "kind": "one-way-rtp", "side": side,
                                   "rx": gaps.get("rx"), "tx": gaps.get("tx")})
    ok = bool(established) and not violations
    summary = (f"{len(established)} established calls ({spanned} across a fault), worst RTP gap "
               f"{worst:.0f} ms (limit {gap_limit_ms:.0f}): "
               + ("all kept two-way RTP and ended with BYE/200" if ok
                  else ("no established call" if not established else f"{len(violations)} violations")))
    return CheckResult("calls-survive", ok, summary,
                       {"established": len(established), "across_fault": spanned, "worst_gap_ms": worst},
                       violations)


# --------------------------------------------------------------------------------------------- availability
def availability_series(history: list[Json]) -> list[Json]:
    """Per whole second: REGISTER attempts, successes, ratio, and median / max latency of the successes."""
    buckets: dict[int, Json] = {}
    for e in history:
        if e.get("kind") != "register":
            continue
        sec = int(float(e["t0"]))
        b = buckets.setdefault(sec, {"t": sec, "ok": 0, "failed": 0, "lat": []})
        b["ok"] += int(e.get("ok", 0))
        b["failed"] += int(e.get("failed", 0))
        b["lat"].extend(float(x) for x in e.get("lat_ms", []))
    out = []
    for sec in sorted(buckets):
        b = buckets[sec]
        total = b["ok"] + b["failed"]
        lat = b.pop("lat")
        out.append({**b, "attempts": total, "ratio": (b["ok"] / total) if total else None,
                    "p50_ms": statistics.median(lat) if lat else None, "max_ms": max(lat) if lat else None})
    return out


def check_availability(history: list[Json], ok_ratio: float = AVAILABILITY_OK_RATIO,
                       bound: float = RECOVERY_BOUND_S) -> CheckResult:
    """Availability per second (share of REGISTER attempts that succeed) and time to recover per fault.

    Time to recover after a fault: from its injection to the end of the last second before the next fault
    (or the end of the load) in which fewer than `ok_ratio` of the attempts succeeded; 0 when none. A fault
    whose availability is not back `bound` seconds after its heal, or never, is a violation."""
    series = availability_series(history)
    injects = _faults(history)
    heals = {int(e["round"]): float(e["t"]) for e in _faults(history, "heal")}
    violations: list[Json] = []
    recoveries: list[Json] = []
    if not series:
        return CheckResult("availability", False, "no REGISTER load was recorded", {}, [])
    end_of_load = series[-1]["t"] + 1
    for i, f in enumerate(injects):
        t_inj = injected_at(f)
        t_next = injected_at(injects[i + 1]) if i + 1 < len(injects) else float(end_of_load)
        # Whole seconds from the one holding the injection up to, not including, the one holding the next
        # injection (its failures belong to the next fault).
        window = [s for s in series if t_inj - 1 < s["t"] and s["t"] + 1 <= max(t_next, t_inj + 1)]
        bad = [s for s in window if s["attempts"] and s["ratio"] is not None and s["ratio"] < ok_ratio]
        good_after = [s for s in window if bad and s["t"] > bad[-1]["t"] and s["ratio"] is not None
                      and s["ratio"] >= ok_ratio]
        recovery = max(0.0, bad[-1]["t"] + 1 - t_inj) if bad else 0.0
        heal = heals.get(int(f["round"]), t_inj)
        entry = {"round": f["round"], "fault": f["name"], "recovery_s": round(recovery, 2),
                 "worst_ratio": round(min((s["ratio"] for s in window if s["ratio"] is not None), default=1.0), 3),
                 "max_latency_ms": max((s["max_ms"] for s in window if s.get("max_ms") is not None), default=None)}
        recoveries.append(entry)
        if bad and not good_after:
            violations.append({**entry, "kind": "not-recovered"})
        elif bad and bad[-1]["t"] + 1 - heal > bound:
            violations.append({**entry, "kind": "slow-recovery", "after_heal_s": round(bad[-1]["t"] + 1 - heal, 2)})
    attempts = sum(s["attempts"] for s in series)
    oks = sum(s["ok"] for s in series)
    overall = oks / attempts if attempts else 0.0
    ok = not violations and attempts > 0
    worst = max((r["recovery_s"] for r in recoveries), default=0.0)
    slowest = max((r["max_latency_ms"] for r in recoveries if r["max_latency_ms"] is not None), default=None)
    summary = (f"{attempts} REGISTERs over {len(series)} s, {overall:.1%} succeeded; "
               f"worst time to recover {worst:.1f} s"
               + ("" if slowest is None else f", slowest REGISTER during a fault {slowest:.0f} ms")
               + ("" if ok else f"; {len(violations)} violations"))
    return CheckResult("availability", ok, summary,
                       {"attempts": attempts, "ok": oks, "overall_ratio": round(overall, 4),
                        "worst_recovery_s": worst, "recoveries": recoveries}, violations)


def check_fault_injection(history: list[Json]) -> CheckResult:
    """Every scheduled fault could be injected: the cluster carried out the operations asked of it (a drain
    that cannot move leadership, a transfer that times out, a replacement refused are reported here)."""
    injected = _faults(history)
    failed = _faults(history, "inject-failed")
    violations = [{"round": e["round"], "fault": e["name"], "error": e.get("error")} for e in failed]
    summary = (f"{len(injected)} faults injected" + (f", {len(failed)} could not be" if failed else ""))
    return CheckResult("fault-injection", not failed, summary, {"injected": len(injected), "failed": len(failed)},
                       violations)


def run_all(history: list[Json], states: Json, *, service_bound: float = SERVICE_OVERLAP_BOUND_S,
            require_service: bool = True) -> list[CheckResult]:
    """Every checker, each reported separately."""
    results = [
        check_writes(history, states),
        check_digests(states),
        check_service_address(history, service_bound),
        check_call_records(history, states),
        check_calls_survive(history),
        check_availability(history),
        check_fault_injection(history),
    ]
    if not require_service:
        svc = results[2]
        if not svc.ok and not svc.violations:
            svc.ok = True
            svc.summary += " (not required in this run)"
    return results
