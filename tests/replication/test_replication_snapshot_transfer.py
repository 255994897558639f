"""A lagging node catches up through a snapshot of tens of MB (issue 8: a new member could not join a
cluster whose dump was 41 MB). pysyncobj sends the dump in 64 KB chunks without offsets and kept its TCP
buffers as bytes copied whole on every append and every parsed message: with MB in flight that was
quadratic, the receiver stalled past the connection timeout, the connection was cut, the leader resumed the
file mid-way on the next connection and the receiver got a file with a hole (refused by its checksum), then
again. Now the buffers are linear, and a transfer whose connection breaks starts again from its first chunk
on both sides."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Cluster, make_configs, wait_for
from replica import KV, encode

from raftpbx.replication import Replicator

BIG_MB = 48


def _bloat(c: Cluster, nodes: list[int]) -> None:
    """Put the same BIG_MB of state into the KVs of `nodes` (the test double's state is what the dumps
    carry; every running node gets it, since any of them may lead when the lagging node comes back)."""
    big = {f"big{i}": os.urandom(512 * 1024).hex() for i in range(BIG_MB)}  # 1 MB of random hex each
    for i in nodes:
        with c.reps[i].lock:
            c.kvs[i].data.update(big)


async def _lag_and_compact(c: Cluster, configs: list[Any], lead: int, lag: int) -> None:
    await c.reps[lead].propose(encode("before", "before", "1"), 10)
    await c.reps[lag].stop()
    _bloat(c, [i for i in range(3) if i != lag])
    for batch in range(3):
        await asyncio.gather(*(c.reps[lead].propose(encode(f"d{batch}-{i}", f"d{batch}-{i}", "x"), 10)
                               for i in range(25)))
    journal = c.reps[lead]._journal
    assert journal is not None
    # The leader may compact before a follower has written its first dump (a forked child writes it, then
    # renames it into place): a dump not there yet is "not yet", not an error. Once there it is only ever
    # replaced by a rename.
    await wait_for(lambda: journal[0][1] > 40 and all(_dump_size(configs[i]) > BIG_MB << 20
                                                      for i in range(3) if i != lag), 30,
                   "the running nodes to write big dumps and compact their logs")


def _dump_size(config: Any) -> int:
    try:
        return int(config.dump_file.stat().st_size)
    except FileNotFoundError:
        return 0


async def test_a_lagging_node_installs_a_snapshot_of_tens_of_mb(tmp_path: Path) -> None:
    configs = make_configs(tmp_path, 3, log_compaction_min_entries=20)
    c = Cluster(configs)
    await c.start()
    try:
        lead = await c.leader()
        lag = (lead + 1) % 3
        await _lag_and_compact(c, configs, lead, lag)
        c.kvs[lag] = kv = KV()
        c.reps[lag] = Replicator(configs[lag], apply=kv.apply, snapshot=kv.snapshot, restore=kv.restore)
        started = time.monotonic()
        await c.reps[lag].start()
        peak = [0]

        def installed() -> bool:  # and, for the record, the most any sender queued for the lagging node
            for i in range(3):
                transport = c.reps[i]._transport
                if i != lag and transport is not None:
                    for node, conn in list(transport._connections.items()):
                        if node.id == configs[lag].self_addr:
                            peak[0] = max(peak[0], conn.getSendBufferSize())
            return "big0" in kv.data

        await wait_for(installed, 40, "the lagging node to install the big snapshot", interval=0.002)
        took = time.monotonic() - started
        await wait_for(lambda: kv.data == c.kvs[lead].data, 10, "the lagging node to apply what follows")
        serializer = c.reps[lag]._serializer
        assert serializer is not None and serializer.rejected_transfers == 0
        print(f"{BIG_MB} MB snapshot installed in {took:.1f} s; peak unsent bytes {peak[0]}")
    finally:
        await c.stop()


@pytest.mark.parametrize("fault", ["cut", "lost_chunk"])
async def test_a_broken_transfer_starts_again_from_its_first_chunk(tmp_path: Path, fault: str) -> None:
    """`cut`: the receiver breaks the connection after a few chunks; `lost_chunk`: one chunk never reaches
    the file (what a leader resuming mid-file after a reconnect it did not notice looks like to the
    receiver). Either way the transfer must start again from its first chunk and complete, never producing
    a file with a hole. `lost_chunk` checked to fail without the offsets (the file with the hole is written
    out and refused by its checksum: rejected_transfers 1); pysyncobj itself usually restarts a `cut`
    transfer (it cancels it when it finds the node disconnected), the cancel/abort on disconnect makes that
    independent of timing."""
    configs = make_configs(tmp_path, 3, log_compaction_min_entries=20)
    c = Cluster(configs)
    await c.start()
    try:
        lead = await c.leader()
        lag = (lead + 1) % 3
        await _lag_and_compact(c, configs, lead, lag)
        c.kvs[lag] = kv = KV()
        rep = c.reps[lag] = Replicator(configs[lag], apply=kv.apply, snapshot=kv.snapshot, restore=kv.restore)
        chunks = [0]

        def break_once() -> None:
            serializer, transport = rep._serializer, rep._transport
            assert serializer is not None and transport is not None
            receive = serializer.setTransmissionData

            def faulty(data: Any) -> bool:
                chunks[0] += 1
                if chunks[0] == 5 and fault == "lost_chunk":
                    return False  # this chunk is lost on the way
                result = receive(data)
                if chunks[0] == 5 and fault == "cut" and serializer.sender is not None:
                    for node, conn in transport._connections.items():
                        if node.id == serializer.sender:
                            conn.disconnect()
                return result

            serializer.setTransmissionData = faulty  # type: ignore[method-assign]

        build = rep._build

        def build_and_break() -> None:
            build()
            break_once()

        rep._build = build_and_break  # type: ignore[method-assign]
        await rep.start()
        await wait_for(lambda: "big0" in kv.data, 60, "the lagging node to install the big snapshot")
        serializer = rep._serializer
        assert serializer is not None
        assert (serializer.rejected_transfers, chunks[0] > 5) == (0, True)
        assert serializer.aborted_transfers >= 1
        await wait_for(lambda: kv.data == c.kvs[lead].data, 10, "the lagging node to apply what follows")
    finally:
        await c.stop()
