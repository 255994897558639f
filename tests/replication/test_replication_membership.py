"""Dynamic membership (Raft §6, one server at a time) on in-process replicators: add with a join token and
catch up, remove, one change at a time, membership across restart and compaction, and the refusal of a
wiped node that tries to rejoin under its old identity (hazard 6)."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import SECRET, Cluster, free_port, fresh_hosts, make_configs, wait_for
from replica import KV, encode

from raftpbx.replication import (
    DataDirError,
    MembershipError,
    NoQuorum,
    ProposalTimeout,
    ReplicationConfig,
    Replicator,
    seed_data_dir,
)


def _new_node(c: Cluster, root: Path, node_id: str, token: str | None) -> tuple[ReplicationConfig, KV, Replicator]:
    host = fresh_hosts(1)[0]
    addr = f"{host}:{free_port(host)}"
    peers = {cfg.self_id: cfg.self_addr for cfg in c.configs}
    cfg = ReplicationConfig(self_id=node_id, self_addr=addr, peers=peers, data_dir=root / node_id,
                            secret=SECRET, join=True, join_token=token)
    kv = KV()
    return cfg, kv, Replicator(cfg, apply=kv.apply, snapshot=kv.snapshot, restore=kv.restore)


async def test_add_catch_up_remove_and_one_change_at_a_time(cluster_factory: Any, tmp_path: Path) -> None:
    c: Cluster = await cluster_factory(log_compaction_min_entries=20)
    lead = await c.leader()
    for i in range(60):  # enough for a compaction: the new node catches up by snapshot install
        await c.reps[i % 3].propose(encode(f"w{i}", f"k{i}", str(i)), 5)
    cfg4, kv4, rep4 = _new_node(c, tmp_path, "n4", None)
    token = await c.reps[(lead + 1) % 3].add_node("n4", cfg4.self_addr, "http://127.0.0.1:1/", timeout=5)
    await wait_for(lambda: [m.node_id for m in c.reps[lead].members()] == ["n1", "n2", "n3", "n4"], 2,
                   "the leader's view")
    with pytest.raises(MembershipError, match="already a member"):
        await c.reps[lead].add_node("n4", "127.0.0.1:9", timeout=2)
    with pytest.raises(MembershipError, match="not a member"):
        await c.reps[lead].remove_node("n9", timeout=2)
    with pytest.raises(MembershipError, match="is the leader"):
        await c.reps[lead].remove_node(c.configs[lead].self_id, timeout=2)
    cfg4 = replace(cfg4, join_token=token)
    rep4 = Replicator(cfg4, apply=kv4.apply, snapshot=kv4.snapshot, restore=kv4.restore)
    await rep4.start()
    try:
        await rep4.propose(encode("w-n4", "k-n4", "x"), 5)
        await wait_for(lambda: kv4.data == c.kvs[lead].data and len(kv4.data) == 61, 10, "n4 caught up")
        await wait_for(lambda: all(m.bound for m in c.reps[lead].members() if m.node_id == "n4"), 5,
                       "n4's incarnation bound")
        # One change at a time: with n3 and n4 down, adding n5 cannot commit (3 of 5 needed, 2 alive),
        # so a second change is refused with a clear error until the first one commits.
        others = [i for i in range(3) if i != lead]
        await c.reps[others[1]].stop()
        await rep4.stop()
        pending = asyncio.ensure_future(c.reps[lead].add_node("n5", "127.0.0.1:9", timeout=3))
        await wait_for(lambda: len(c.reps[lead].members()) == 5, 3, "n5 appended")
        with pytest.raises(MembershipError, match="one at a time"):
            await c.reps[lead].remove_node("n4", timeout=2)
        with pytest.raises((ProposalTimeout, NoQuorum)):
            await pending
    finally:
        await rep4.stop()


async def test_membership_survives_restart_and_compaction(cluster_factory: Any, tmp_path: Path) -> None:
    c: Cluster = await cluster_factory(log_compaction_min_entries=10)
    lead = await c.leader()
    victim = (lead + 1) % 3
    await c.reps[lead].remove_node(c.configs[victim].self_id, timeout=5)
    for i in range(40):
        await c.reps[lead].propose(encode(f"w{i}", f"k{i}", str(i)), 5)
    survivor = 3 - lead - victim
    await c.reps[survivor].stop()
    kv = KV()
    again = Replicator(c.configs[survivor], apply=kv.apply, snapshot=kv.snapshot, restore=kv.restore)
    await again.start()
    try:
        await wait_for(lambda: [m.node_id for m in again.members()] ==
                       sorted(c.configs[i].self_id for i in (lead, survivor)), 5, "restarted node's members")
        await again.propose(encode("after", "a", "1"), 5)  # 2 of 2 members: a quorum without the victim
        assert c.configs[victim].data_dir.exists()
    finally:
        await again.stop()


@pytest.mark.parametrize("flag", ["join", "bootstrap"])
async def test_wiped_node_with_old_identity_is_refused(cluster_factory: Any, flag: str) -> None:
    """Hazard 6: a bootstrap member whose data dir is gone comes back, with --join or even --bootstrap;
    the cluster refuses it (its votes and acks never count) and keeps working."""
    c: Cluster = await cluster_factory()
    lead = await c.leader()
    await c.reps[lead].propose(encode("before", "b", "1"), 5)
    victim = (lead + 1) % 3
    await c.reps[victim].stop()
    shutil.rmtree(c.configs[victim].data_dir)
    kv = KV()
    wiped = Replicator(replace(c.configs[victim], bootstrap=flag == "bootstrap", join=flag == "join"), apply=kv.apply,
                       snapshot=kv.snapshot, restore=kv.restore)
    await wiped.start()
    try:
        await wait_for(lambda: wiped._fatal is not None, 5, "the wiped node to be refused")
        assert isinstance(wiped._fatal, DataDirError)
        assert "never simply rejoin" in str(wiped._fatal) or "not the incarnation" in str(wiped._fatal)
        await c.reps[lead].propose(encode("after", "a", "1"), 5)  # the cluster is unaffected
    finally:
        await wiped.stop()


async def test_joined_node_wiped_and_started_with_the_same_token_is_refused(cluster_factory: Any,
                                                                          tmp_path: Path) -> None:
    """The join token is single-use: the cluster binds the first data dir that presents it."""
    c: Cluster = await cluster_factory()
    lead = await c.leader()
    cfg4, kv4, _ = _new_node(c, tmp_path, "n4", None)
    token = await c.reps[lead].add_node("n4", cfg4.self_addr, None, timeout=5)
    cfg4 = replace(cfg4, join_token=token)
    rep4 = Replicator(cfg4, apply=kv4.apply, snapshot=kv4.snapshot, restore=kv4.restore)
    await rep4.start()
    await c.reps[lead].propose(encode("w", "k", "v"), 5)
    await wait_for(lambda: kv4.data.get("k") == "v", 5, "n4 caught up")
    await wait_for(lambda: all(m.bound for m in c.reps[lead].members(committed=True)
                               if m.node_id == "n4"), 5, "n4's incarnation bound")
    await rep4.stop()
    shutil.rmtree(cfg4.data_dir)
    kv = KV()
    again = Replicator(cfg4, apply=kv.apply, snapshot=kv.snapshot, restore=kv.restore)
    await again.start()
    try:
        await wait_for(lambda: again._fatal is not None, 5, "the wiped n4 to be refused")
        assert "not the incarnation" in str(again._fatal)
        await c.reps[lead].propose(encode("after", "a", "1"), 5)
    finally:
        await again.stop()


async def test_seeded_data_dirs_start_a_new_cluster_from_a_snapshot(tmp_path: Path) -> None:
    """Restore: every node of a new cluster is seeded with the same snapshot at index 57; they elect a
    leader without --bootstrap, hold the snapshot's data, and the log goes on after 57. A data dir that
    already holds node state is refused."""
    old = KV()
    for i in range(57):
        old.apply(encode(f"o{i}", f"k{i}", str(i)), i + 1)
    configs = [replace(c, bootstrap=False) for c in make_configs(tmp_path / "restored", 3)]
    for cfg in configs:
        cfg.data_dir.mkdir(parents=True)
        (cfg.data_dir / "node.toml").write_text("# a config file kept in the data dir is not node state\n")
        seed_data_dir(cfg, old.snapshot(), 57)
    with pytest.raises(DataDirError, match="already holds node state"):
        seed_data_dir(configs[0], old.snapshot(), 57)
    c = Cluster(configs)
    await c.start()
    try:
        lead = await c.leader()
        assert all(kv.data == old.data and kv.restores == 1 for kv in c.kvs)
        result = await c.reps[lead].propose(encode("new", "n", "1"), 5)
        assert result["index"] > 57  # type: ignore[index]
        await wait_for(lambda: all(kv.data.get("n") == "1" for kv in c.kvs), 5, "the write everywhere")
    finally:
        await c.stop()


async def test_leadership_transfers_to_a_member_added_at_run_time(cluster_factory: Any, tmp_path: Path) -> None:
    """A member added by a membership change is in the log's table only, never in the bootstrap nodes'
    node.toml peers; naming it as the target of a transfer must still work (drain picks such nodes too)."""
    c: Cluster = await cluster_factory()
    lead = await c.leader()
    cfg4, kv4, _ = _new_node(c, tmp_path, "n4", None)
    token = await c.reps[lead].add_node("n4", cfg4.self_addr, "http://127.0.0.1:1/", timeout=5)
    rep4 = Replicator(replace(cfg4, join_token=token), apply=kv4.apply, snapshot=kv4.snapshot, restore=kv4.restore)
    await rep4.start()
    try:
        await c.reps[lead].propose(encode("t1", "t1", "x"), 5)
        await wait_for(lambda: kv4.data == c.kvs[lead].data, 10, "n4 caught up")
        with pytest.raises(ValueError, match="this node"):
            await c.reps[lead].transfer_leadership(c.configs[lead].self_id)
        assert await c.reps[lead].transfer_leadership("n4", timeout=5) == "n4"
        await wait_for(lambda: rep4.status().role == "leader", 5, "n4 leads")
    finally:
        await rep4.stop()


def test_join_tokens_never_look_like_command_line_flags() -> None:
    from raftpbx.replication import new_join_token

    tokens = {new_join_token() for _ in range(2000)}
    assert len(tokens) == 2000
    assert not [t for t in tokens if t.startswith("-")]  # plain token_urlsafe: about 31 of 2000 do
