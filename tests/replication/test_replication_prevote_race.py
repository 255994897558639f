"""The pre-vote gate decides for the whole tick (replication.py, `_RaftNode._onTick`).

pysyncobj checks its election deadline again after the gate, against a later clock reading. When the Raft
thread loses the GIL between the two (a loaded machine), a deadline the gate judged in the future has passed
by pysyncobj's check, and pysyncobj ran a real election without a pre-vote: seen in `make chaos`, a node cut
off by a partition reached a higher term and, after the heal, ignored the leader for 33 s. Here the window is
made certain: right after the gate returns, the follower's deadline is moved into the past, as the lost
milliseconds would have done. The terms must not move.
"""

from __future__ import annotations

import time
from typing import Any

from conftest import wait_for
from replica import encode


async def test_a_deadline_passing_after_the_gate_starts_no_election_without_a_pre_vote(
        cluster_factory: Any) -> None:
    # Timeouts of 1-2 s so that a late heartbeat on a loaded machine starts no legitimate election.
    c = await cluster_factory(raft_min_timeout=1.0, raft_max_timeout=2.0, connection_timeout=2.0,
                              leader_fallback_timeout=2.0)
    lead = await c.leader()
    follower = (lead + 1) % 3
    assert await c.reps[lead].propose(encode("a", "k", "v"), timeout=5)
    term = c.reps[lead].status().term
    node = c.reps[follower]._node
    assert node is not None
    gate = node._prevote_gate
    window = {"armed": 0, "hit": 0}

    def gate_then_time_passes() -> bool:
        allowed: bool = gate()
        if window["armed"] and not allowed:
            window["armed"] -= 1
            window["hit"] += 1
            node._SyncObj__raftElectionDeadline = time.monotonic() - 0.001
        return allowed

    node._prevote_gate = gate_then_time_passes  # the Raft thread's next ticks call it
    answers = node.prevote_answers
    window["armed"] = 3
    await wait_for(lambda: window["hit"] == 3 or any(r.status().term != term for r in c.reps), 10,
                   "three ticks with the deadline passing after the gate")
    # The deadline that passed is the gate's again at the next tick: a pre-vote round, denied by both peers.
    await wait_for(lambda: node.prevote_answers >= answers + 2 or any(r.status().term != term for r in c.reps),
                   5, "the pre-vote round that follows")
    assert [r.status().term for r in c.reps] == [term] * 3
    assert all(r.status().leader == c.configs[lead].self_id for r in c.reps)
    assert await c.reps[follower].propose(encode("b", "k", "v"), timeout=5)
