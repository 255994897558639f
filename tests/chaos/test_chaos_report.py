"""The chaos report: summary with the replay command on failure, self-contained HTML timeline."""

from __future__ import annotations

from chaos.checkers import CheckResult
from chaos.report import summary_text, timeline_html

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
