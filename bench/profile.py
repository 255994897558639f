"""Profile the REGISTER and INVITE paths of a 3-node raftpbx cluster under SIPp load (py-spy); not a test.

    .venv/bin/python bench/profile.py [register|calls] [--rate 100] [--seconds 20] [--top 25]

Starts a fresh demo cluster (bench/pbx.py), runs one SIPp step of the REGISTER (reg_auth.xml) or call
(uac_call_auth.xml + uas.xml) benchmark at `--rate`, and samples every node with `py-spy record` (100 Hz;
by default `--gil`: only the thread holding the GIL, i.e. where Python CPU goes; `--no-gil`: every thread not
idle, waits in msync/poll included) for the step. Prints, summed over the three nodes, the
functions with the most samples on top of the stack (self) and in the stack (inclusive), the share of
samples per thread, and writes the collapsed stacks (flamegraph.pl / speedscope input) next to the JSON.
py-spy must be in the venv (`pip install py-spy`; it is in the dev extra).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import suite  # noqa: E402

PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


def summarize(folded: list[Path], top: int) -> dict[str, Any]:
    """Self and inclusive sample counts per function from py-spy's collapsed ('raw') output."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for path in folded:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = stack.split(";")
            total += count
            threads[frames[0].split(" ")[0] if frames else "?"] += count
            names = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
                     if " (" in f else f for f in frames[1:]]
            if names:
                own[names[-1]] += count
            for name in set(names):
                incl[name] += count
    return {
        "samples": total,
        "self": [(name, round(100 * n / max(1, total), 1)) for name, n in own.most_common(top)],
        "inclusive": [(name, round(100 * n / max(1, total), 1)) for name, n in incl.most_common(top)],
        "threads": [(name, round(100 * n / max(1, total), 1)) for name, n in threads.most_common(8)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", nargs="?", default="register", choices=["register", "calls"])
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--gil", action=argparse.BooleanOptionalAction, default=True,
                        help="sample only the thread holding the GIL (Python CPU; --no-gil: wall time of busy threads)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if not Path(PY_SPY).exists():
        print("py-spy not found: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    suite.ensure_packages()
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    work = Path(tempfile.mkdtemp(prefix="raftpbx-profile-"))
    folded = [args.out / f"profile-{args.what}-{stamp}-node{i + 1}.folded" for i in range(3)]
    try:
        users = suite.make_users(work / "data", args.users, 3)
        with suite.raftpbx(work, users) as cluster:
            spies = [subprocess.Popen([PY_SPY, "record", "-p", str(node["pid"]), "-r", "100", "-d",
                                       str(int(args.seconds + 3)), "-f", "raw", "-o", str(folded[i]), "--nonblocking",
                                       *(["--gil"] if args.gil else [])],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for i, node in enumerate(cluster.nodes)]
            if args.what == "register":
                step = suite.register_step("raftpbx", cluster, users.split(3, work), args.rate, args.seconds, work)
            else:
                step = suite.call_step("raftpbx", cluster, users.split(3, work), users.callees, args.rate,
                                       args.seconds, 1000, work)
            print(step.line(), flush=True)
            for spy in spies:
                spy.wait(timeout=120)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(folded, args.top)
    summary.update({"what": args.what, "rate": args.rate, "step": step.__dict__, "load1": os.getloadavg()[0],
                    "folded": [str(p) for p in folded]})
    print(f"\n{args.what} at {args.rate:g}/s, {summary['samples']} samples over 3 nodes (100 Hz, {'GIL holder' if args.gil else 'busy threads'})")
    print("threads:", ", ".join(f"{n} {p}%" for n, p in summary["threads"]))
    print("self (top of stack):")
    for name, pct in summary["self"]:
        print(f"  {pct:5.1f}%  {name}")
    print("inclusive:")
    for name, pct in summary["inclusive"]:
        print(f"  {pct:5.1f}%  {name}")
    path = args.out / f"profile-{args.what}-{stamp}.json"
    path.write_text(json.dumps(summary, indent=1, default=str))
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
