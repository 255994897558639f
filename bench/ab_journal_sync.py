"""A/B: the Raft journal flushed with mmap.flush (msync, GIL held) or os.fdatasync (GIL released).

    .venv/bin/python bench/ab_journal_sync.py [--rounds 2] [--rates 100,150] [--step 8]

Alternates fresh 3-node clusters (bench/footprint_node.py, i.e. `raftpbx node`; variant B sets
RAFTPBX_BENCH_FDATASYNC=1, which swaps pysyncobj's ResizableFile.flush for os.fdatasync in the node process)
and runs the same SIPp REGISTER steps (bench/suite.py register_step) on each; prints p50/p99, achieved rate
and server CPU per REGISTER side by side. An experiment for the recommendation in bench/README.md; it
changes nothing in raftpbx. Loopback only; every node is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import footprint  # noqa: E402
import pbx  # noqa: E402
import suite  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rates", default="100,150")
    parser.add_argument("--step", type=float, default=8.0)
    parser.add_argument("--users", type=int, default=1500)
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    work = Path(tempfile.mkdtemp(prefix="raftpbx-ab-"))
    rows: list[tuple[str, suite.Step]] = []
    try:
        users = suite.make_users(work / "data", args.users, 3)
        csvs = users.split(3, work)
        for rnd in range(args.rounds):
            for variant in ("msync", "fdatasync"):
                os.environ["RAFTPBX_BENCH_FDATASYNC"] = "1" if variant == "fdatasync" else "0"
                cluster = footprint.Cluster(Path(tempfile.mkdtemp(prefix=f"{variant}-", dir=work)))
                try:
                    for i in range(3):
                        cluster.start(i, loader=True)
                    cluster.leader()
                    pbx.create_extensions(cluster, users.users)  # type: ignore[arg-type]
                    for rate in rates:
                        step = suite.register_step(f"{variant}", cluster, csvs, rate, args.step, work)
                        print(f"round {rnd + 1} " + step.line().strip(), flush=True)
                        rows.append((variant, step))
                finally:
                    cluster.stop_all()
    finally:
        os.environ.pop("RAFTPBX_BENCH_FDATASYNC", None)
        shutil.rmtree(work, ignore_errors=True)
    print("\n| variant | rate | achieved | p50 / p99 (ms) | server us/REGISTER net | load |")
    print("|---|---|---|---|---|---|")
    for variant, s in rows:
        print(f"| {variant} | {s.rate:.0f} | {s.achieved:.0f} | {s.p50} / {s.p99} | {s.server_us_per_op_net:.0f} | "
              f"{s.load1:.1f} |")
    return 0


if __name__ == "__main__":
    started = time.time()
    status = main()
    print(f"({time.time() - started:.0f} s)")
    sys.exit(status)
