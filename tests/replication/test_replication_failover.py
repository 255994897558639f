"""Hazards 4 (isolated leader) and 5 (unknown outcomes, duplicates), with real processes where signals matter."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from conftest import Cluster, wait_for
from replica import encode

from raftpbx.replication import NoQuorum, ProposalTimeout


@pytest.mark.parametrize("fallback", [1.0, 30.0])
def test_isolated_leader_steps_down_and_proposals_fail_with_no_quorum(proc_cluster: Any, fallback: float) -> None:
    """Hazard 4. Both followers are SIGSTOPped (separate processes). With leader_fallback_timeout=1 s
    the leader steps down within 2 s and a proposal fails with NoQuorum. The 30 s variant is
    pysyncobj's default: the same leader is still leader after 2.5 s, which is the failure the fix
    removes."""
    c = proc_cluster(leader_fallback_timeout=fallback)
    lead = c.leader(timeout=10)
    assert c.request(lead, cmd="propose", op_id="before", key="k", value="1", timeout=5)["ok"]
    followers = [i for i in range(3) if i != lead]
    for i in followers:
        c.signal(i, signal.SIGSTOP)
    t0 = time.monotonic()
    if fallback == 30.0:
        while time.monotonic() - t0 < 2.5:
            assert c.request(lead, cmd="status")["role"] == "leader"
            time.sleep(0.1)
        return
    while c.request(lead, cmd="status")["role"] == "leader":
        assert time.monotonic() - t0 < 2.0, "isolated leader did not step down within 2 s"
        time.sleep(0.02)
    reply = c.request(lead, cmd="propose", op_id="isolated", key="k", value="2", timeout=1.0)
    assert reply == {"ok": False, "error": "NoQuorum", "message": reply["message"]}
    for i in followers:
        c.signal(i, signal.SIGCONT)
    # Healed: the cluster elects a leader again and accepts writes.
    lead = c.leader(timeout=10)
    assert c.request(lead, cmd="propose", op_id="after", key="k", value="3", timeout=5)["ok"]


async def test_unknown_outcome_then_retry_with_same_bytes_is_deduplicated(cluster_factory: Any) -> None:
    """Hazard 5. The proposing follower's apply is held back, so the entry commits but the outcome
    does not reach the caller before its deadline: ProposalTimeout (outcome unknown). The entry does
    commit; the caller's retry with the same bytes is applied a second time and the op_id dedupe
    makes it a no-op that reports the first index."""
    gate = threading.Event()
    c: Cluster = await cluster_factory()
    lead = await c.leader()
    f = (lead + 1) % 3
    kv = c.kvs[f]
    real_apply = kv.apply

    def slow_apply(entry: bytes, index: int) -> object:
        if b"slow" in entry and kv.deliveries["slow"] == 0:
            gate.wait(5)
        return real_apply(entry, index)

    kv.apply = slow_apply  # type: ignore[method-assign]
    c.reps[f]._apply = slow_apply
    payload = encode("slow", "k", "v1")
    with pytest.raises(ProposalTimeout):
        await c.reps[f].propose(payload, timeout=0.05)
    gate.set()
    await wait_for(lambda: all(k.deliveries["slow"] == 1 for k in c.kvs), 5, "the timed-out entry committed")
    first = c.kvs[lead].results["slow"]
    again = await c.reps[f].propose(payload, timeout=5)
    assert again == {"dup": True, "index": first}
    await wait_for(lambda: all(k.deliveries["slow"] == 2 for k in c.kvs), 5, "the retry applied")
    assert all(k.data == {"k": "v1"} and k.results == {"slow": first} for k in c.kvs)


async def test_dropped_forward_is_resubmitted_with_the_same_bytes(cluster_factory: Any) -> None:
    """Hazard 5, lost request: the follower's forwards to the leader are dropped (as on a broken
    connection; pysyncobj then never answers). propose re-submits the same bytes and succeeds.
    Without the resubmission the call would only end with ProposalTimeout."""
    c: Cluster = await cluster_factory(resubmit_after=0.3)
    lead = await c.leader()
    f = (lead + 1) % 3
    rep = c.reps[f]
    transport, node = rep._transport, rep._node
    assert transport is not None and node is not None
    real_send, real_apply_command = transport.send, node._applyCommand
    dropped: list[bytes] = []
    submitted: list[bytes] = []

    def lossy_send(peer: Any, message: Any) -> bool:
        if isinstance(message, dict) and message.get("type") == "apply_command" and len(dropped) < 2:
            dropped.append(message["command"])
            return False
        return bool(real_send(peer, message))

    def recording_apply_command(command: bytes, callback: Any, kind: Any = None) -> None:
        submitted.append(command)
        real_apply_command(command, callback, kind)

    transport.send = lossy_send  # type: ignore[method-assign]
    node._applyCommand = recording_apply_command
    payload = encode("lost", "k", "v")
    result = await rep.propose(payload, timeout=5)
    assert len(dropped) == 2 and len(submitted) == 3
    assert set(submitted) == {payload}
    assert result == {"dup": False, "index": result["index"]}  # type: ignore[index]
    assert c.kvs[lead].deliveries["lost"] == 1


def test_kill_leader_under_load_loses_nothing_and_applies_each_op_once(proc_cluster: Any) -> None:
    """Hazard 5 under a real crash: writers keep proposing through the followers while the leader
    is killed with SIGKILL. Every proposal succeeds (retries reuse the bytes), and on the survivors
    each op_id has exactly one effect; duplicated deliveries, if any, were deduplicated."""
    c = proc_cluster()
    lead = c.leader(timeout=10)
    followers = [i for i in range(3) if i != lead]
    stop = threading.Event()
    done: list[str] = []
    failed: list[dict[str, Any]] = []

    def writer(w: int) -> None:
        n = 0
        while not stop.is_set():
            op = f"w{w}-{n}"
            reply = c.request(followers[w % 2], cmd="propose", op_id=op, key=op, value=str(n), timeout=4.0)
            (done.append(op) if reply["ok"] else failed.append(reply))
            n += 1

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(writer, w) for w in range(4)]
        deadline = time.monotonic() + 10
        while len(done) < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        c.kill(lead)
        before = len(done)
        deadline = time.monotonic() + 10
        while len(done) < before + 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        for fut in futures:
            fut.result(timeout=30)
    assert failed == []
    assert len(done) >= before + 40
    states = [c.request(i, cmd="state") for i in followers]
    new_lead = c.leader(among=followers, timeout=5)
    commit = c.request(new_lead, cmd="status")["commit_index"]
    deadline = time.monotonic() + 5
    while any(c.request(i, cmd="status")["applied_index"] < commit for i in followers):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    states = [c.request(i, cmd="state") for i in followers]
    for st in states:
        assert set(done) <= set(st["data"])
        assert all(st["data"][op] == op.split("-")[1] for op in done)
    dups = sum(v - 1 for v in states[0]["deliveries"].values())
    print(f"duplicate deliveries deduplicated: {dups}")


async def test_no_leader_at_all_gives_no_quorum(cluster_factory: Any) -> None:
    """A node whose peers never come up: no leader for the whole timeout -> NoQuorum (not submitted)."""
    c: Cluster = await cluster_factory()
    await c.leader()
    await asyncio.gather(*(r.stop() for r in c.reps[1:]))
    await wait_for(lambda: c.reps[0].status().leader is None, 3, "the survivor to lose its leader")
    with pytest.raises(NoQuorum) as info:
        await c.reps[0].propose(encode("x", "k", "v"), timeout=0.5)
    assert info.value.submitted is False
