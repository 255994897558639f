"""The chaos checkers on hand-made histories: each must pass a clean history and fail a broken one
(a lost write, a write applied twice, two service address holders past the bound, an RTP gap, a dropped
call, a missing or wrong call record, a fault availability never recovers from)."""

from __future__ import annotations

from typing import Any

from chaos import checkers
from chaos.checkers import (
    check_availability,
    check_call_records,
    check_calls_survive,
    check_digests,
    check_service_address,
    check_writes,
)

Json = dict[str, Any]


def write(op: int, f: str, key: str, outcome: str, t: float = 0.0) -> list[Json]:
    value = None if f == "delete" else f"w{op}"
    out = [{"kind": "write", "phase": "invoke", "op": op, "f": f, "key": key, "value": value, "t": t}]
    if outcome != "none":
        out.append({"kind": "write", "phase": outcome, "op": op, "f": f, "key": key, "value": value, "t": t + 0.01})
    return out


def states(*per_node: dict[str, str | None], digest: str = "d") -> Json:
    nodes = {}
    for i, exts in enumerate(per_node, start=1):
        nodes[f"node{i}"] = {
            "reachable": True, "applied_index": 10, "digest": digest,
            "extensions": {k: {"extension": k, "display_name": v} for k, v in exts.items() if v is not None},
            "cdr": [], "active_calls": [],
        }
    return {"nodes": nodes}


# --- writes ------------------------------------------------------------------------------------------------
def test_writes_clean_history_passes() -> None:
    h = write(1, "create", "9000", "ok") + write(2, "update", "9000", "ok") + write(3, "create", "9001", "ok") \
        + write(4, "delete", "9001", "ok") + write(5, "update", "9000", "fail")
    r = check_writes(h, states({"9000": "w2"}, {"9000": "w2"}, {"9000": "w2"}))
    assert r.ok, r
    assert r.figures["ok"] == 4 and r.figures["fail"] == 1


def test_lost_acknowledged_write_fails() -> None:
    h = write(1, "create", "9000", "ok") + write(2, "update", "9000", "ok")
    r = check_writes(h, states({"9000": "w2"}, {"9000": "w1"}, {"9000": "w2"}))
    assert not r.ok
    assert [v["node"] for v in r.violations] == ["node2"]
    assert r.violations[0]["kind"] == "applied-twice-or-reordered"  # w1 was superseded by an acked w2
    r = check_writes(h, states({"9000": "w2"}, {}, {"9000": "w2"}))
    assert not r.ok and r.violations[0]["kind"] == "lost" and r.figures["lost"] == 1


def test_create_applied_twice_resurrects_a_deleted_extension_and_fails() -> None:
    h = write(1, "create", "9000", "ok") + write(2, "delete", "9000", "ok")
    r = check_writes(h, states({"9000": "w1"}, {}, {}))
    assert not r.ok and r.violations[0]["kind"] == "applied-twice-or-reordered" and r.figures["duplicated"] == 1


def test_unknown_outcome_may_or_may_not_have_applied() -> None:
    h = write(1, "create", "9000", "ok") + write(2, "update", "9000", "unknown")
    assert check_writes(h, states({"9000": "w1"})).ok
    assert check_writes(h, states({"9000": "w2"})).ok
    # a completion never recorded (the run died) counts as unknown
    h2 = write(1, "create", "9000", "ok") + write(2, "delete", "9000", "none")
    assert check_writes(h2, states({})).ok and check_writes(h2, states({"9000": "w1"})).ok


def test_failed_write_must_not_appear() -> None:
    h = write(1, "create", "9000", "ok") + write(2, "update", "9000", "fail")
    r = check_writes(h, states({"9000": "w2"}))
    assert not r.ok and r.violations[0]["kind"] == "failed-write-applied" and r.violations[0]["op"] == 2
    # seen in a real run: a delete refused with "no such extension" by a node deciding on a stale state
    h = write(1, "create", "9000", "ok") + write(2, "delete", "9000", "fail")
    r = check_writes(h, states({}))
    assert not r.ok and r.violations[0]["kind"] == "failed-write-applied" and r.figures["failed_but_applied"] == 1


def test_acknowledged_create_on_an_extension_that_exists_is_impossible() -> None:
    h = write(1, "create", "9000", "ok") + write(2, "create", "9000", "ok")
    r = check_writes(h, states({"9000": "w2"}))
    assert not r.ok and r.violations[0]["kind"] == "impossible-ack"


def test_unexplained_value_fails() -> None:
    h = write(1, "create", "9000", "ok")
    r = check_writes(h, states({"9000": "nobody-wrote-this"}))
    assert not r.ok and r.violations[0]["kind"] == "unexplained"


# --- digests -----------------------------------------------------------------------------------------------
def test_digests_equal_passes_and_different_fails() -> None:
    s = states({}, {}, {})
    assert check_digests(s).ok
    s["nodes"]["node3"]["digest"] = "other"
    assert not check_digests(s).ok
    s = states({}, {}, {})
    s["nodes"]["node2"] = {"reachable": False}
    r = check_digests(s)
    assert not r.ok and r.violations == [{"node": "node2", "kind": "unreachable"}]


# --- service address ---------------------------------------------------------------------------------------
def samples(pattern: list[list[str]], step: float = 0.25) -> list[Json]:
    return [{"kind": "sample", "t": 100 + i * step, "holders": h, "known": True, "leader": None}
            for i, h in enumerate(pattern)]


def test_service_address_short_overlap_passes_long_overlap_fails() -> None:
    ok = samples([["node1"], ["node1", "node2"], ["node2"], ["node2"]])
    r = check_service_address(ok, bound=1.5)
    assert r.ok and r.figures["longest_overlap_s"] == 0.25
    bad = samples([["node1"]] + [["node1", "node2"]] * 8 + [["node2"]])  # 2 s of two holders
    r = check_service_address(bad, bound=1.5)
    assert not r.ok and r.violations[0]["kind"] == "overlap" and r.violations[0]["seconds"] == 2.0


def test_service_address_unknown_is_not_a_pass() -> None:
    h = [{"kind": "sample", "t": 1.0, "holders": [], "known": False}]
    assert not check_service_address(h).ok


def test_service_address_gap_is_measured() -> None:
    r = check_service_address(samples([["node1"], [], [], [], ["node2"]]))
    assert r.ok and r.figures["longest_without_holder_s"] == 0.75  # from the first empty sample to the next holder


# --- calls -------------------------------------------------------------------------------------------------
def call_history(*, bye_code: int | None = 200, gap: float = 40.0, ended: bool = True, fault_mid: bool = True
                 ) -> list[Json]:
    h: list[Json] = [
        {"kind": "call", "phase": "placed", "call": "call1", "caller": "8100", "callee": "8101",
         "sip_call_id": "abc", "t": 10.0},
        {"kind": "call", "phase": "confirmed", "call": "call1", "caller": "8100", "callee": "8101",
         "sip_call_id": "abc", "t": 10.5},
    ]
    if fault_mid:
        h.append({"kind": "fault", "phase": "inject", "round": 1, "name": "kill-leader", "t": 12.0})
        h.append({"kind": "fault", "phase": "heal", "round": 1, "name": "kill-leader", "t": 14.0})
    if ended:
        gaps = {"max_gap_ms": gap, "ended": False, "rx": 500, "tx": 500}
        h.append({"kind": "call", "phase": "ended", "call": "call1", "caller": "8100", "callee": "8101",
                  "sip_call_id": "abc", "bye_code": bye_code, "rtp": {"caller": gaps, "callee": dict(gaps)},
                  "t": 20.0})
    return h


def test_call_kept_through_a_fault_passes() -> None:
    r = check_calls_survive(call_history())
    assert r.ok and r.figures["across_fault"] == 1


def test_rtp_gap_over_200_ms_fails() -> None:
    r = check_calls_survive(call_history(gap=350.0))
    assert not r.ok and {v["kind"] for v in r.violations} == {"rtp-gap"}


def test_bye_without_200_and_dropped_call_fail() -> None:
    r = check_calls_survive(call_history(bye_code=408))
    assert not r.ok and r.violations[0]["kind"] == "bye"
    r = check_calls_survive(call_history(ended=False))
    assert not r.ok and r.violations[0]["kind"] == "dropped"


def cdr(**over: Any) -> Json:
    record = {"call_id": "abc", "caller": "8100", "callee": "8101", "started_at": 10.0, "answered_at": 10.4,
              "ended_at": 20.0, "disposition": "answered", "hangup_by": "caller", "status_code": 200}
    record.update(over)
    return record


def with_records(*records: list[Json]) -> Json:
    s = states(*([{}] * len(records)))
    for i, rs in enumerate(records, start=1):
        s["nodes"][f"node{i}"]["cdr"] = rs
    return s


def test_call_records_one_true_record_per_node_passes() -> None:
    assert check_call_records(call_history(), with_records([cdr()], [cdr()], [cdr()])).ok


def test_missing_wrong_duplicate_and_phantom_records_fail() -> None:
    h = call_history()
    r = check_call_records(h, with_records([cdr()], [], [cdr()]))
    assert not r.ok and r.violations == [{"node": "node2", "call": "call1", "call_id": "abc",
                                          "kind": "missing-record"}]
    r = check_call_records(h, with_records([cdr(disposition="failed")]))
    assert not r.ok and r.violations[0]["kind"] == "wrong-record"
    r = check_call_records(h, with_records([cdr(ended_at=None)]))
    assert not r.ok and "no ended_at" in r.violations[0]["problems"][0]
    r = check_call_records(h, with_records([cdr(), cdr()]))
    assert not r.ok and any(v["kind"] == "several-records" for v in r.violations)
    r = check_call_records(h, with_records([cdr(), cdr(call_id="zzz")]))
    assert not r.ok and any(v["kind"] == "phantom-record" for v in r.violations)
    s = with_records([cdr()])
    s["nodes"]["node1"]["active_calls"] = [{"call_id": "abc"}]
    assert not check_call_records(h, s).ok


def test_failed_call_record_must_carry_the_true_code() -> None:
    h: list[Json] = [
        {"kind": "call", "phase": "placed", "call": "call2", "caller": "8100", "callee": "8199", "sip_call_id": "f",
         "t": 1.0},
        {"kind": "call", "phase": "failed", "call": "call2", "caller": "8100", "callee": "8199", "sip_call_id": "f",
         "code": 480, "t": 2.0},
    ]
    good = cdr(call_id="f", callee="8199", answered_at=None, disposition="no-answer", status_code=480,
               hangup_by=None)
    assert check_call_records(h, with_records([good])).ok
    r = check_call_records(h, with_records([{**good, "disposition": "busy"}]))
    assert not r.ok and r.violations[0]["kind"] == "wrong-failure-record"
    r = check_call_records(h, with_records([{**good, "disposition": "answered", "answered_at": 1.5}]))
    assert not r.ok and r.violations[0]["kind"] == "failed-call-recorded-answered"
    r = check_call_records(h, with_records([]))
    assert not r.ok and r.violations[0]["kind"] == "missing-failure-record"


# --- availability ------------------------------------------------------------------------------------------
def reg_history(pattern: list[tuple[int, int]], inject_at: int = 3, heal_at: int = 5) -> list[Json]:
    h: list[Json] = [{"kind": "register", "t0": 1000 + i, "ok": ok, "failed": failed, "lat_ms": [5.0] * ok}
                     for i, (ok, failed) in enumerate(pattern)]
    h.append({"kind": "fault", "phase": "inject", "round": 1, "name": "kill-leader", "t": 1000 + inject_at + 0.2})
    h.append({"kind": "fault", "phase": "heal", "round": 1, "name": "kill-leader", "t": 1000 + heal_at + 0.2})
    return h


def test_availability_recovery_time() -> None:
    r = check_availability(reg_history([(10, 0)] * 3 + [(2, 8), (0, 10), (10, 0), (10, 0)]))
    assert r.ok, r
    assert r.figures["recoveries"][0]["recovery_s"] == 1.8  # end of second 1004 minus the injection at 1003.2


def test_failures_in_the_second_of_the_next_fault_belong_to_it() -> None:
    h = reg_history([(10, 0)] * 3 + [(2, 8), (10, 0), (1, 9), (0, 10), (10, 0)])
    h.append({"kind": "fault", "phase": "inject", "round": 2, "name": "kill-all", "t": 1005.3})
    h.append({"kind": "fault", "phase": "heal", "round": 2, "name": "kill-all", "t": 1006.0})
    r = check_availability(h)
    assert r.ok, r.violations
    assert [x["recovery_s"] for x in r.figures["recoveries"]] == [0.8, 1.7]


def test_failures_while_a_slow_injection_runs_belong_to_that_fault() -> None:
    # Round 2's netem took 1.2 s to apply on every lab host: its inject event (t=1006.2) comes after the
    # failures it caused (second 1005). They are round 2's, counted from when its injection started (1005.0);
    # round 1 had recovered (second 1004). The same history without `started` blames round 1, as the checker did before.
    h = reg_history([(10, 0)] * 3 + [(2, 8), (10, 0), (3, 7), (10, 0), (10, 0)])
    inject = {"kind": "fault", "phase": "inject", "round": 2, "name": "loss", "t": 1006.2, "started": 1005.0}
    h += [inject, {"kind": "fault", "phase": "heal", "round": 2, "name": "loss", "t": 1007.0}]
    r = check_availability(h)
    assert r.ok, r.violations
    assert [x["recovery_s"] for x in r.figures["recoveries"]] == [0.8, 1.0]
    del inject["started"]
    r = check_availability(h)
    assert not r.ok and r.violations[0]["round"] == 1 and r.violations[0]["kind"] == "not-recovered"
    assert r.figures["recoveries"][0]["worst_ratio"] == 0.2


def test_availability_that_never_recovers_fails() -> None:
    r = check_availability(reg_history([(10, 0)] * 3 + [(0, 10)] * 4))
    assert not r.ok and r.violations[0]["kind"] == "not-recovered"
    assert not check_availability([]).ok


def test_run_all_reports_each_checker_separately() -> None:
    names = [r.name for r in checkers.run_all([], states({}))]
    assert names == ["writes", "digests", "service-address", "call-records", "calls-survive", "availability",
                     "fault-injection"]


def test_a_fault_the_cluster_refused_is_reported() -> None:
    h = [{"kind": "fault", "phase": "inject", "round": 1, "name": "kill-leader", "t": 1.0},
         {"kind": "fault", "phase": "inject-failed", "round": 2, "name": "drain-leader", "t": 2.0,
          "error": "RpcFailure: -32003: leadership did not move"}]
    r = checkers.check_fault_injection(h)
    assert not r.ok and r.violations == [{"round": 2, "fault": "drain-leader",
                                          "error": "RpcFailure: -32003: leadership did not move"}]
    assert checkers.check_fault_injection(h[:1]).ok
