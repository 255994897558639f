"""Cold restart time (issue 8: < 10 s): what a restart replays after the dump is bounded. A clean stop writes
a dump when the journal holds many entries, and compaction also starts by bytes of journal, not only by
pysyncobj's entry count (5000 entries of 64 commands replayed for 12 s)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from conftest import Cluster, make_configs, wait_for
from pysyncobj.journal import FileJournal
from replica import encode


def _journal_length(path: Path) -> int:
    journal = FileJournal(str(path))
    try:
        return len(journal)
    finally:
        journal._destroy()


async def test_a_clean_stop_writes_a_dump_so_the_restart_replays_almost_nothing(tmp_path: Path) -> None:
    configs = make_configs(tmp_path, 3, stop_dump_min_entries=20)
    first = Cluster(configs)
    await first.start()
    try:
        lead = await first.leader()
        await asyncio.gather(*(first.reps[lead].propose(encode(f"op{i}", f"k{i}", "v"), 10) for i in range(60)))
        # Every node has applied all 60 (the leader has: propose returned). Not "applied >= the leader's
        # commit_index": the status is published once per tick, so right after the proposals it may still
        # show an older commit index, and followers stopped before applying kept their entries unapplied.
        expected = dict(first.kvs[lead].data)
        assert len(expected) == 60

        def applied_everywhere() -> bool:
            for rep, kv in zip(first.reps, first.kvs, strict=True):
                with rep.lock:  # apply runs on the Raft thread under this lock
                    if kv.data != expected:
                        return False
            return True

        await wait_for(applied_everywhere, 10, "applied everywhere")
    finally:
        await first.stop()
    for cfg in configs:
        assert cfg.dump_file.exists()
        assert _journal_length(cfg.journal_file) <= 4  # the dump's two entries (and any unapplied one)
    second = Cluster(configs)
    await second.start()
    try:
        await second.leader()
        await wait_for(lambda: all(kv.data == expected for kv in second.kvs), 10, "state restored everywhere")
        assert all(kv.restores >= 1 for kv in second.kvs)
        assert all(sum(kv.deliveries.values()) <= 2 for kv in second.kvs)  # not the 60 entries again
    finally:
        await second.stop()


async def test_a_journal_holding_many_bytes_is_compacted_before_the_entry_count(tmp_path: Path) -> None:
    configs = make_configs(tmp_path, 3, log_compaction_min_entries=5000, log_compaction_max_bytes=64 * 1024)
    c = Cluster(configs)
    await c.start()
    try:
        lead = await c.leader()
        for batch in range(4):
            await asyncio.gather(*(c.reps[lead].propose(encode(f"op{batch}-{i}", f"k{i}", "x" * 2000), 10)
                                   for i in range(25)))
        # 200 KB of commands in 100 entries, far below 5000 entries: every node dumps and compacts.
        await wait_for(lambda: all(cfg.dump_file.exists() for cfg in configs), 10, "a dump on every node")
        await wait_for(lambda: all(r._journal is not None and r._journal.tail_bytes < 64 * 1024 for r in c.reps), 10,
                       "journals compacted below the byte bound")
    finally:
        await c.stop()
