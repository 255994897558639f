"""`raftpbx-chaos` (also `python -m chaos`): run a chaos scenario, or list the scenarios and faults.

    raftpbx-chaos run --scenario NAME --rounds N --seed S [--lab loopback|netns] [--nodes 3|5] [--workdir DIR]
    raftpbx-chaos list

Exit status: 0 when every checker passed, 1 when one failed (the run's folder is kept and the replay command
printed), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from chaos.runner import SCENARIOS, Options, describe, main_run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raftpbx-chaos", description="Chaos suite for raftpbx (issue 7).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the scenarios and faults")
    run = sub.add_parser("run", help="run a scenario")
    run.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    run.add_argument("--rounds", type=int, help="rounds (one fault each); default: the scenario's")
    run.add_argument("--seed", type=int, default=1, help="seed of the fault schedule and the workload")
    run.add_argument("--lab", choices=["loopback", "netns"], help="default: the scenario's")
    run.add_argument("--nodes", type=int, choices=[3, 5], help="default: the scenario's")
    run.add_argument("--workdir", type=Path, help="default: workdir/chaos/SCENARIO-sSEED-TIME")
    run.add_argument("--keep", action="store_true", help="keep the node data dirs even when the run passes")
    run.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "list":
        print(describe())
        return 0
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds: at least 1")
    return main_run(Options(args.scenario, args.rounds, args.seed, args.lab, args.nodes, args.workdir, args.keep,
                            args.quiet))


if __name__ == "__main__":
    sys.exit(main())
