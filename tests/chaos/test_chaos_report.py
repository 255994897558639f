"""The chaos report: summary with the replay command on failure, self-contained HTML timeline."""

from __future__ import annotations

from pathlib import Path

from chaos.checkers import CheckResult
from chaos.report import summary_text, timeline_html
from chaos.workload import parse_sipp

META = {"scenario": "smoke", "seed": 7, "rounds": 2, "lab": "loopback", "nodes": 3, "duration_s": 12.0,
        "fault_counts": {"kill-leader": 2}, "workdir": "/tmp/x", "replay": "raftpbx-chaos run --scenario smoke "
        "--rounds 2 --seed 7 --lab loopback --nodes 3"}

HISTORY = [
    {"kind": "register", "t": 100.0, "t0": 100, "ok": 9, "failed": 1, "lat_ms": [3.0, 8.0]},
    {"kind": "register", "t": 101.0, "t0": 101, "ok": 10, "failed": 0, "lat_ms": [4.0]},
    {"kind": "fault", "t": 100.2, "round": 1, "name": "kill-leader", "phase": "inject", "targets": ["node1"]},
    {"kind": "fault", "t": 101.2, "round": 1, "name": "kill-leader", "phase": "heal", "targets": ["node1"]},
    {"kind": "fault", "t": 101.5, "round": 1, "name": "kill-leader", "phase": "recovered"},
    {"kind": "sample", "t": 100.0, "leader": "node1", "holders": ["node1"], "known": True},
    {"kind": "sample", "t": 100.5, "leader": None, "holders": [], "known": True},
    {"kind": "sample", "t": 101.0, "leader": "node2", "holders": ["node2"], "known": True},
]


def test_failing_summary_names_the_replay_command_and_the_kept_folder() -> None:
    text = summary_text(META, [CheckResult("writes", False, "1 violation", violations=[{"kind": "lost"}]),
                               CheckResult("digests", True, "same")])
    assert "[FAIL] writes" in text and "[PASS] digests" in text and "RESULT: FAILED" in text
    assert "replay: raftpbx-chaos run --scenario smoke --rounds 2 --seed 7" in text and "kept: /tmp/x" in text
    ok_text = summary_text(META, [CheckResult("digests", True, "same")])
    assert "replay" not in ok_text and "all checkers passed" in ok_text


def test_timeline_is_self_contained_html_with_faults_and_availability() -> None:
    html = timeline_html(META, [CheckResult("writes", True, "fine")], HISTORY)
    assert html.startswith("<!DOCTYPE html>") and "<svg" in html
    assert "kill-leader" in html and "9/10 ok" in html
    for external in ("<script", "<link", "src=", "url("):
        assert external not in html


def test_sipp_files_become_per_second_register_records(tmp_path: Path) -> None:
    """SIPp's rtt file counts milliseconds from its start (StartTime in the stat file); failures are counted
    per period and placed one receive timeout earlier, near the second the attempt was sent."""
    header = "StartTime;LastResetTime;CurrentTime;SuccessfulCall(P);FailedCall(P)"
    rows = [
        "2026-11-26\t16:30:00.000000\t1000.000000;x;2026-11-26\t16:30:01.000000\t1001.000000;3;0",
        "2026-11-26\t16:30:00.000000\t1000.000000;x;2026-11-26\t16:30:05.000000\t1005.000000;0;4",
    ]
    (tmp_path / "stat.csv").write_text("\n".join([header, *rows]) + "\n")
    (tmp_path / "reg_auth_1_rtt.csv").write_text(
        "Date_ms;response_time_ms;rtd_no\n250;12;auth_reg\n250;20;register\n1500;30;register\n1700;8;register\n")
    records = parse_sipp(tmp_path)
    by_second = {r["t0"]: r for r in records}
    assert by_second[1000]["ok"] == 1 and by_second[1000]["lat_ms"] == [20.0]
    assert by_second[1001]["ok"] == 2 and sorted(by_second[1001]["lat_ms"]) == [8.0, 30.0]
    assert by_second[1003]["failed"] == 4  # reported at 1005, receive timeout 2 s
