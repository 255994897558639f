"""`make chaos-smoke` as a test: the smoke scenario against a real 3-node cluster on loopback, with real
pjsua2 phones holding calls, SIPp REGISTER load with digest and admin writes, one fault per round (leader
kill, leader isolated by a partition, leader paused past the election timeout, follower kill). Every checker
must pass; a failing run keeps its folder (printed) with the history, logs and data dirs, and the replay
command."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from chaos.runner import Options, run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def test_smoke_scenario_every_checker_passes() -> None:
    assert os.geteuid() == 0, "the smoke scenario's partition needs root (nft and per-node group ids)"
    workdir = Path(tempfile.mkdtemp(prefix="raftpbx-chaos-smoke-"))
    ok, folder, meta = run(Options("smoke", seed=1, workdir=workdir / "run"))
    assert (folder / "history.jsonl").exists()
    report = json.loads((folder / "report.json").read_text())
    print((folder / "summary.txt").read_text())
    failed = [c for c in report["checkers"] if not c["ok"]]
    assert ok and not failed, f"checkers failed (run kept in {folder}; replay: {meta['replay']}):\n" + "\n".join(
        f"{c['name']}: {c['summary']} {json.dumps(c['violations'][:3])}" for c in failed)
    names = {c["name"] for c in report["checkers"]}
    assert {"writes", "digests", "service-address", "call-records", "calls-survive", "availability"} <= names
    injected = {f["name"] for f in report["faults"] if f["phase"] == "inject"}
    assert {"kill-leader", "isolate-leader", "pause-leader"} <= injected, injected
    assert meta["service_address"], "the phones and SIPp must go through the service address"
    html = (folder / "timeline.html").read_text()
    assert "<svg" in html and "<script" not in html and "src=" not in html
    shutil.rmtree(workdir, ignore_errors=True)  # kept above on failure
