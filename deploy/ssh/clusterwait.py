"""Waits used by deploy.sh on a cluster host (standard library only: runs with the host's python3).

    clusterwait.py healthy --url URL --token-file F [--expect N] [--timeout S]
        until cluster.status names a leader and every node (N of them, if given) is healthy
    clusterwait.py leader --url URL --token-file F [--timeout S]
        prints the leader's id once there is one
    clusterwait.py caught-up --node ID --url URL --token-file F [--timeout S]
        until node ID is healthy and, read between two reads of the leader, its applied index equals the
        leader's with an equal state digest. Equal indexes with different digests mean the node diverged:
        exit 3 at once.

Exit 0 when the condition holds, 1 on timeout (with the last status seen), 3 on divergence.
Polling a condition with a deadline; every HTTP call has its own short timeout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any


class RpcError(Exception):
    pass


def rpc(url: str, token: str, method: str, timeout: float = 2.0) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": {}}).encode()
    req = urllib.request.Request(url.rstrip("/") + "/rpc", data=body, method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            doc = json.loads(resp.read())
    except (OSError, ValueError, urllib.error.URLError) as exc:
        raise RpcError(f"{url}: {exc}") from None
    if "error" in doc:
        raise RpcError(f"{url}: {method}: {doc['error'].get('message')}")
    return doc["result"]


def healthy(url: str, token: str, expect: int | None, deadline: float) -> int:
    last: object = None
    while True:
        try:
            status = rpc(url, token, "cluster.status")
            last = status
            nodes = status.get("nodes", [])
            if status.get("leader") and nodes and all(n.get("healthy") for n in nodes) and \
                    (expect is None or len(nodes) == expect):
                print(f"healthy: leader {status['leader']}, {len(nodes)} nodes, term {status.get('term')}")
                return 0
        except RpcError as exc:
            last = str(exc)
        if time.monotonic() > deadline:
            print(f"clusterwait: no healthy cluster in time; last status: {last}", file=sys.stderr)
            return 1
        time.sleep(0.2)


def leader(url: str, token: str, deadline: float) -> int:
    last: object = None
    while True:
        try:
            status = rpc(url, token, "cluster.status")
            last = status
            if status.get("leader"):
                print(status["leader"])
                return 0
        except RpcError as exc:
            last = str(exc)
        if time.monotonic() > deadline:
            print(f"clusterwait: no leader in time; last status: {last}", file=sys.stderr)
            return 1
        time.sleep(0.2)


def caught_up(node: str, url: str, token: str, deadline: float) -> int:
    last: object = None
    while True:
        try:
            status = rpc(url, token, "cluster.status")
            by_id = {n["id"]: n for n in status.get("nodes", [])}
            me, leader = by_id.get(node), by_id.get(status.get("leader") or "")
            last = status
            if me and leader and me.get("healthy") and leader.get("healthy"):
                if me is leader:
                    print(f"{node} caught up: it is the leader (applied index {me.get('applied_index')})")
                    return 0
                before = rpc(leader["admin_url"], token, "state.digest")
                mine = rpc(me["admin_url"], token, "state.digest")
                after = rpc(leader["admin_url"], token, "state.digest")
                last = {"leader": [before, after], node: mine}
                if before["applied_index"] == mine["applied_index"] == after["applied_index"]:
                    if before["digest"] != mine["digest"]:
                        print(f"clusterwait: {node} DIVERGED: digest {mine['digest']} != leader's "
                              f"{before['digest']} at index {mine['applied_index']}", file=sys.stderr)
                        return 3
                    print(f"{node} caught up: applied index {mine['applied_index']}, digest equal to the leader's")
                    return 0
        except (RpcError, KeyError, TypeError) as exc:
            last = str(exc)
        if time.monotonic() > deadline:
            print(f"clusterwait: {node} did not catch up in time; last seen: {last}", file=sys.stderr)
            return 1
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["healthy", "leader", "caught-up"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--node")
    parser.add_argument("--expect", type=int)
    parser.add_argument("--timeout", type=float, default=90.0)
    ns = parser.parse_args(argv)
    with open(ns.token_file, encoding="utf-8") as fh:
        token = fh.read().strip()
    deadline = time.monotonic() + ns.timeout
    if ns.what == "healthy":
        return healthy(ns.url, token, ns.expect, deadline)
    if ns.what == "leader":
        return leader(ns.url, token, deadline)
    if not ns.node:
        parser.error("caught-up needs --node")
    return caught_up(ns.node, ns.url, token, deadline)


if __name__ == "__main__":
    sys.exit(main())
