"""The node fixes glibc's mmap threshold before it restores its state (raftpbx/node.py `_tune_malloc`).

The harm it prevents, reproduced in a fresh interpreter: one large buffer freed (a snapshot written or
restored) raises glibc's dynamic mmap threshold, after which 1 MB buffers come from the heap and stay
resident once freed. The probe measures resident memory (/proc/self/statm) after freeing 100 such buffers,
with and without the node's tuning; the untuned run shows the harm exists here, so the tuned one can fail.
"""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, os, sys

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

tuned = None
if sys.argv[1] == "tuned":
    from raftpbx import node
    tuned = node._tune_malloc()
big = b"s" * (24 * 2**20)  # a snapshot-sized buffer, freed: raises the dynamic threshold
del big
base = rss_mb()
kept = [b"c" * (2**20 + i) for i in range(100)]  # 100 MB of 1 MB buffers (touched, not calloc'd)
peak = rss_mb()
last = kept[-1]  # the newest buffer stays alive, as live objects do
del kept
print(json.dumps({"tuned": tuned, "base": base, "peak": peak, "after_free": rss_mb()}))
"""


def _probe(mode: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_freed_large_buffers_go_back_to_the_kernel_once_malloc_is_tuned() -> None:
    untuned = _probe("untuned")
    assert untuned["peak"] - untuned["base"] > 90
    assert untuned["after_free"] - untuned["base"] > 90  # the harm: 100 MB freed, still resident
    tuned = _probe("tuned")
    assert tuned["tuned"] is True
    assert tuned["peak"] - tuned["base"] > 90
    assert tuned["after_free"] - tuned["base"] < 10  # only the one live buffer remains

