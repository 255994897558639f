"""Hazards 6 (wiped node rejoining) and 7 (followers truncating entries they acknowledged)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import make_configs
from pysyncobj import SyncObj
from replica import KV

from raftpbx.replication import DataDirError, ReplicationConfig, Replicator


def _replicator(cfg: ReplicationConfig) -> Replicator:
    kv = KV()
    return Replicator(cfg, apply=kv.apply, snapshot=kv.snapshot, restore=kv.restore)


async def test_empty_data_dir_needs_bootstrap_or_join(tmp_path: Path) -> None:
    """Hazard 6. pysyncobj as shipped starts from an empty dir as a voter with term 0 (the hazard);
    the start-up rule refuses unless the operator says bootstrap or join, and refuses damaged dirs."""
    cfg = make_configs(tmp_path, 2)[0]
    plain = ReplicationConfig(**{**cfg.__dict__, "bootstrap": False})
    with pytest.raises(DataDirError, match="bootstrap=True"):
        await _replicator(plain).start()
    assert not cfg.journal_file.exists()

    rep = _replicator(cfg)  # bootstrap=True
    await rep.start()
    await rep.stop()
    assert cfg.marker_file.exists() and cfg.journal_file.exists()

    rep = _replicator(plain)  # a node with its own state restarts without any flag
    await rep.start()
    await rep.stop()

    cfg.journal_file.unlink()  # partly wiped
    with pytest.raises(DataDirError, match="missing"):
        await _replicator(plain).start()

    shutil.rmtree(cfg.data_dir)  # wiped: an empty dir again, flags required again
    with pytest.raises(DataDirError, match="bootstrap=True"):
        await _replicator(plain).start()

    rep = _replicator(cfg)
    await rep.start()
    await rep.stop()
    with pytest.raises(DataDirError, match="belongs to node"):  # another node's data dir
        await _replicator(ReplicationConfig(**{**cfg.__dict__, "self_id": "n9"})).start()


def _entries(rep: Replicator) -> list[tuple[int, int]]:
    journal = rep._journal
    assert journal is not None
    return [(e[1], e[2]) for e in (journal[i] for i in range(len(journal)))]


def _follower(tmp_path: Path, name: str) -> tuple[Replicator, Any, list[int]]:
    cfg = make_configs(tmp_path / name, 2)[0]
    rep = _replicator(cfg)
    rep._prepare_data_dir()
    acks: list[int] = []
    rep._durability_trace = lambda kind, index: acks.append(index) if kind == "ack" else None
    rep._build()  # a real _RaftNode; we feed it messages directly instead of ticking it
    node = rep._node
    assert node is not None
    leader = next(iter(node.otherNodes))
    return rep, leader, acks


def _append(term: int, prev: tuple[int, int], entries: list[tuple[bytes, int, int]], commit: int) -> dict[str, Any]:
    return {"type": "append_entries", "term": term, "commit_index": commit, "entries": entries,
            "prevLogIdx": prev[0], "prevLogTerm": prev[1]}


E = [(b"\x00" + bytes([i]), i, 1) for i in range(2, 6)]  # entries 2..5 of term 1 (index 1 is the no-op)


@pytest.mark.parametrize("handler", ["raftpbx", "pysyncobj"])
def test_stale_resend_does_not_truncate_acknowledged_entries(tmp_path: Path, handler: str) -> None:
    """Hazard 7. A leader whose nextIndex went back (a stale reset answer, pipelined batches) resends
    entries 2..3 to a follower that already holds and acknowledged 2..5. pysyncobj's handler deletes
    everything after prevLogIdx before appending, so 4..5 vanish although the leader counts them as
    replicated (its matchIndex never goes down): a committed entry can lose its majority. Raft §5.3
    deletes only from the first conflicting entry. The `pysyncobj` variant runs the unpatched handler
    on the same input and shows the truncation (that is the test failing without the fix)."""
    rep, leader, acks = _follower(tmp_path, handler)
    node = rep._node
    receive = (node._SyncObj__onMessageReceived if handler == "raftpbx"
               else lambda n, m: SyncObj._SyncObj__onMessageReceived(node, n, m))
    try:
        receive(leader, _append(1, (1, 0), E, commit=1))
        assert _entries(rep)[-1] == (5, 1) and acks[-1] == 5
        receive(leader, _append(1, (1, 0), E[:2], commit=5))  # stale resend of 2..3
        if handler == "pysyncobj":
            assert _entries(rep)[-1] == (3, 1)  # acknowledged entries 4 and 5 are gone
            return
        assert _entries(rep)[-1] == (5, 1)
        assert acks[-1] == 3  # acknowledges what this message verified, nothing more
        assert node.raftCommitIndex <= 3  # Figure 2, AppendEntries rule 5: min(leaderCommit, last new)
        # A message that carries something new after a matching prefix appends without rewriting.
        receive(leader, _append(1, (3, 1), [*E[2:], (b"\x00\x06", 6, 1)], commit=5))
        assert _entries(rep)[-1] == (6, 1) and acks[-1] == 6
        # A real conflict (new leader, term 2, different entry at 5) still truncates from there.
        receive(leader, _append(2, (4, 1), [(b"\x00x", 5, 2)], commit=4))
        assert _entries(rep)[-2:] == [(4, 1), (5, 2)] and acks[-1] == 5
    finally:
        rep._destroy_node(node)
