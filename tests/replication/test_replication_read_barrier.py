"""Read barrier (`apply_leader_commits` / `Replicator.read_barrier`) on a real 3-node cluster.

The race it closes: a binding committed by the leader and a quorum (its 200 already sent by another node)
is missing on a follower whose Raft thread has not heard the new commit index yet. The follower's own
view (`leader_commit_index`) says it is up to date, so waiting for it is not enough: the barrier sends a
no-op entry through the log and waits until it is applied here. The leader's messages to one follower are
held back (a slow link) to make the race certain instead of rare.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import make_configs, wait_for
from raftpbx.state import decide_create_extension, encode_batch
from raftpbx.state.codec import Command

from raftpbx.replication import Replicator, apply_leader_commits
from raftpbx.service import StateMachine


class Node:
    """A replicator around the node's real `StateMachine`, recording every entry it applies."""

    def __init__(self, rep: Replicator, machine: StateMachine, applied: list[tuple[int, bytes]]) -> None:
        self.rep, self.machine, self.applied = rep, machine, applied

    def barriers(self, after: int) -> int:
        """No-op entries in this node's log after index `after` (the barriers: the cluster is otherwise quiet,
        and the leader's own no-op of its term comes before `after`)."""
        node = self.rep._node
        assert node is not None
        log = node._SyncObj__raftLog
        first = log[0][1]
        return sum(1 for i in range(max(after + 1, first), log[-1][1] + 1) if log[i - first][0] == b"\x01")

    def has(self, extension: str) -> bool:
        with self.machine.lock:
            return extension in self.machine.state.extensions

    def applied_index(self) -> int:
        """What the Raft thread has applied (the barrier's no-op entries never reach the state machine)."""
        node = self.rep._node
        assert node is not None
        return int(node.raftLastApplied)


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[list[Node]]:
    made: list[Node] = []
    for config in make_configs(tmp_path, 3):
        machine = StateMachine()
        applied: list[tuple[int, bytes]] = []

        def apply(entry: bytes, index: int, machine: StateMachine = machine,
                  applied: list[tuple[int, bytes]] = applied) -> object:
            applied.append((index, bytes(entry)))
            return machine.apply(entry, index)

        rep = Replicator(config, apply=apply, snapshot=machine.snapshot, restore=machine.restore,
                         fork_locks=(machine.lock,))
        made.append(Node(rep, machine, applied))
    await asyncio.gather(*(n.rep.start() for n in made))
    try:
        yield made
    finally:
        await asyncio.gather(*(n.rep.stop() for n in made))


async def roles(nodes: list[Node]) -> tuple[Node, Node, Node]:
    """(leader, the follower under test, the other follower) once every node knows the leader and all have
    applied a first entry of its term, with nothing else in flight."""

    def one_leader() -> bool:
        sts = [n.rep.status() for n in nodes]
        return sum(st.role == "leader" for st in sts) == 1 and len({st.leader for st in sts}) == 1

    await wait_for(one_leader, 10.0, "a leader known to every node")
    leader = next(n for n in nodes if n.rep.status().role == "leader")
    with leader.machine.lock:
        payload = create("1000", leader.machine.state)
    await leader.rep.propose(payload, 5.0)
    index = leader.applied[-1][0]

    def settled() -> bool:
        return all(st.applied_index == st.commit_index == st.leader_commit_index == index
                   for st in (n.rep.status() for n in nodes))

    await wait_for(settled, 5.0, "every node applied the first entry and heard its commit")
    follower, other = (n for n in nodes if n is not leader)
    return leader, follower, other


def create(extension: str, state: Any) -> bytes:
    events = decide_create_extension(state, extension, "correct-Horse-battery", None, "pbx.test", 1.0)
    return encode_batch([Command(f"op-{extension}", event) for event in events])


def _commit_index(message: Any) -> int:
    if isinstance(message, tuple):  # (rand key, message) on the wire
        message = message[-1]
    if not isinstance(message, dict):
        return -1
    if message.get("type") == "raftpbx_batch":
        return max((_commit_index(m) for m in message.get("messages") or ()), default=-1)
    if message.get("type") == "append_entries":
        return int(message.get("commit_index") or 0)
    return -1


class SlowLink:
    """Holds back what `sender`'s Raft thread sends to `to` from the first message `starts(message)` on,
    then delivers it all in order (from the Raft thread, as a slow network would)."""

    def __init__(self, sender: Node, to: Node, starts: Callable[[Any], bool]) -> None:
        self.sender, self.to, self.starts = sender, to, starts
        self.holding = False
        self.held: list[Any] = []
        self.conn: Any = None

    async def install(self) -> None:
        installed = threading.Event()

        def patch() -> None:  # Raft thread
            node = self.sender.rep._node
            assert node is not None
            transport = node._SyncObj__transport
            addr = self.to.rep.config.self_addr
            (conn,) = [c for peer, c in transport._connections.items() if peer.id == addr]
            real = conn.send

            def send(message: Any) -> None:
                if not self.holding and self.starts(message):
                    self.holding = True
                if self.holding:
                    self.held.append(message)
                else:
                    real(message)

            conn.send = send
            self.conn, self.real = conn, real
            installed.set()

        self.sender.rep._call_in_raft_thread(patch)
        await wait_for(installed.is_set, 5.0, "the slow link installed")

    async def release(self) -> None:
        released = threading.Event()

        def flush() -> None:  # Raft thread
            del self.conn.send  # the class's send again
            for message in self.held:
                self.real(message)
            released.set()

        self.sender.rep._call_in_raft_thread(flush)
        await wait_for(released.is_set, 5.0, "the held messages delivered")


@pytest.mark.parametrize("held", ["commit-index-news", "everything"])
async def test_a_follower_that_has_not_heard_the_commit_sees_it_after_the_barrier(
    nodes: list[Node], held: str
) -> None:
    """The follower holds the new entry (or not even that) but not the commit index that covers it: its own
    view says it is up to date. Committed elsewhere before the call began, so the barrier must see it."""
    leader, follower, other = await roles(nodes)
    x_index = leader.rep.status().commit_index + 1
    starts = (lambda m: _commit_index(m) >= x_index) if held == "commit-index-news" else (lambda m: True)
    link = SlowLink(leader, follower, starts)
    await link.install()
    with leader.machine.lock:
        payload = create("1002", leader.machine.state)
    await leader.rep.propose(payload, 5.0)  # committed by the leader and the other follower
    await wait_for(lambda: other.has("1002"), 5.0, "the other follower applied it")
    st = follower.rep.status()
    assert not follower.has("1002")
    assert st.applied_index >= st.leader_commit_index  # its own view: nothing left to apply
    if held == "commit-index-news":
        await wait_for(lambda: follower.rep._node._SyncObj__raftLog[-1][1] >= x_index, 5.0,
                       "the entry reached the follower's log")
    try:
        call = asyncio.create_task(apply_leader_commits(follower.rep, 3.0))
        # The barrier entry is committed by the leader and the other follower; the held follower cannot
        # finish the call before it hears of it.
        await wait_for(lambda: call.done() or leader.rep.status().commit_index > x_index, 5.0,
                       "the barrier entry committed (or the call answered)")
    finally:
        await link.release()
    assert await call is True
    assert follower.has("1002")
    assert follower.barriers(after=x_index) == 1


async def test_concurrent_callers_share_one_barrier_entry(nodes: list[Node]) -> None:
    leader, follower, _ = await roles(nodes)
    base = leader.rep.status().commit_index
    digest, applied = follower.machine.state.digest, follower.machine.state.applied_index
    results = await asyncio.gather(*(apply_leader_commits(follower.rep, 3.0) for _ in range(20)))
    assert results == [True] * 20
    assert follower.rep.read_barriers == 1
    assert follower.barriers(after=base) == 1
    await wait_for(lambda: leader.barriers(after=base) == 1, 5.0, "the leader holds the barrier")
    # On the leader too (its state can be stale if it was deposed without knowing: same barrier).
    results = await asyncio.gather(*(apply_leader_commits(leader.rep, 3.0) for _ in range(5)))
    assert results == [True] * 5 and leader.rep.read_barriers == 1
    await wait_for(lambda: follower.barriers(after=base) == 2, 5.0, "the follower holds the second barrier")
    # The barrier entries never reach the state machine: the state (digest and applied index) is unchanged.
    assert (follower.machine.state.digest, follower.machine.state.applied_index) == (digest, applied)


async def test_a_caller_never_rides_a_barrier_already_in_flight(nodes: list[Node]) -> None:
    """A barrier submitted before a call began may sit before entries committed after it in the log; a
    caller arriving while one is in flight waits for the next one, which is submitted after it began."""
    leader, follower, _ = await roles(nodes)
    link = SlowLink(leader, follower, lambda m: True)
    await link.install()
    base = leader.rep.status().commit_index

    async def call() -> tuple[bool, int, int]:
        began = leader.rep.status().commit_index  # the leader's log as the call begins
        moved = await apply_leader_commits(follower.rep, 5.0)
        return moved, began, follower.applied_index()

    try:
        first = asyncio.create_task(call())
        await wait_for(lambda: leader.rep.status().commit_index > base, 5.0, "the first barrier committed")
        second = asyncio.create_task(call())
        await asyncio.sleep(0.05)  # the second caller has begun (and has nothing to ride)
        assert not first.done() and not second.done()
    finally:
        await link.release()
    moved1, began1, applied1 = await first
    moved2, began2, applied2 = await second
    assert moved1 and moved2
    assert applied1 > began1
    assert began2 > base
    assert applied2 > began2  # its own barrier, appended after it began
    assert follower.rep.read_barriers == 2
    assert follower.barriers(after=base) == 2


async def test_without_a_quorum_the_barrier_gives_up_at_its_timeout(nodes: list[Node]) -> None:
    leader, follower, other = await roles(nodes)
    await asyncio.gather(leader.rep.stop(), other.rep.stop())
    started = time.monotonic()
    assert await apply_leader_commits(follower.rep, 0.5) is False
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 1.5, elapsed
    # The next call is not stuck behind the failed one.
    started = time.monotonic()
    assert await apply_leader_commits(follower.rep, 0.3) is False
    assert time.monotonic() - started < 1.0


async def test_a_stopped_replicator_answers_false_at_once(nodes: list[Node]) -> None:
    _, follower, _ = await roles(nodes)
    await follower.rep.stop()
    started = time.monotonic()
    assert await apply_leader_commits(follower.rep, 2.0) is False
    assert time.monotonic() - started < 0.5
