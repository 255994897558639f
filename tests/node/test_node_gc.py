"""The node tunes the cyclic garbage collector once it has started (raftpbx/node.py `_tune_gc`).

Run in a fresh interpreter so that the test process's own collector settings are neither relied on nor
changed.
"""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import gc, json
from raftpbx import node
before = {"thresholds": gc.get_threshold(), "frozen": gc.get_freeze_count()}
kept = [{"state": i} for i in range(1000)]  # stands for the restored state: must be frozen
node._tune_gc()
print(json.dumps({"before": before, "thresholds": gc.get_threshold(), "frozen": gc.get_freeze_count(),
                  "young": gc.get_count()[0]}))
"""


def test_tune_gc_freezes_what_exists_at_start_and_raises_the_thresholds() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["before"]["frozen"] == 0
    assert tuple(seen["before"]["thresholds"]) != (20_000, 50, 50)
    assert tuple(seen["thresholds"]) == (20_000, 50, 50)
    assert seen["frozen"] >= 1000  # the start-up objects (and the 1,000 dicts) left the collector's walks
    assert seen["young"] < 100  # collected just before freezing
