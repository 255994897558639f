"""Session 5 patches of pysyncobj 0.3.17 behind the seam (issue 8: the Raft thread's CPU per commit), and one
clock for pysyncobj and `raftpbx.replication`.

- One clock: pysyncobj timestamps everything with CLOCK_MONOTONIC_RAW through a Python lambda; this module
  with CLOCK_MONOTONIC; the pre-vote's election deadline, a connection's last read time and the peers' last
  response times are written by one and compared by the other. The clocks drift apart (NTP slews one), so
  those deadlines were off by the drift (98 ms after 11.5 h of uptime on the development machine).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pysyncobj.dns_resolver
import pysyncobj.syncobj
import pysyncobj.tcp_connection
import pysyncobj.transport
import pytest
from conftest import Cluster, make_configs, wait_for
from pysyncobj.pipe_notifier import PipeNotifier
from pysyncobj.poller import POLL_EVENT_TYPE, PollPoller
from replica import KV, encode

from raftpbx.replication import _TRANSFER_WINDOW, Replicator, _WakePipe


def test_pysyncobj_reads_the_clock_this_module_reads() -> None:
    for module in (pysyncobj.syncobj, pysyncobj.tcp_connection, pysyncobj.transport, pysyncobj.dns_resolver):
        assert module.monotonicTime is time.monotonic, module.__name__


async def test_commit_index_news_and_new_entries_leave_in_one_append_entries(cluster_factory: Any) -> None:
    """A leader tick that both advanced the commit index and has queued commands sends each follower one
    append_entries (new entries + commit index), not one for the commit and one for the entries."""
    c = await cluster_factory()
    lead = await c.leader()
    rep = c.reps[lead]
    node, transport = rep._node, rep._transport
    assert node is not None and transport is not None
    ticks = [0]
    sent: list[tuple[int, Any, int, int]] = []  # (tick, follower, commit index, entries) per append_entries
    real_tick, real_send = node._onTick, transport.send

    def tick(*args: Any) -> None:
        ticks[0] += 1
        real_tick(*args)

    def send(peer: Any, message: Any) -> bool:
        if isinstance(message, dict) and message.get("type") == "append_entries":
            sent.append((ticks[0], peer, message["commit_index"], len(message.get("entries") or ())))
        return bool(real_send(peer, message))

    node._onTick, transport.send = tick, send  # instance attributes: looked up on every call (Raft thread)
    for burst in range(20):  # commits of one burst land in ticks that also find the next burst queued
        await asyncio.gather(*(rep.propose(encode(f"op-{burst}-{i}", "k", "v"), timeout=5) for i in range(4)),
                             asyncio.sleep(0.002))
    per_tick = Counter((t, peer) for t, peer, _, _ in sent)
    assert max(per_tick.values()) == 1, [k for k, n in per_tick.items() if n > 1][:5]
    # And such ticks happened: an append_entries carrying entries and a commit index not sent before.
    last_commit: dict[Any, int] = {}
    merged = 0
    for _, peer, commit, entries in sent:
        if entries and commit > last_commit.get(peer, 0):
            merged += 1
        last_commit[peer] = max(last_commit.get(peer, 0), commit)
    assert merged > 0


async def test_a_held_append_entries_round_queues_at_most_the_transfer_window(tmp_path: Path) -> None:
    """Snapshot chunks produced while sends are held (the leader's append_entries rounds in
    `_checkCommandsToApply`, now also those of its commit news) count against the transfer window: pysyncobj
    asks for chunk after chunk for up to append_entries_period in one round, and the connection's buffer,
    the only thing counted before, does not grow while they are held."""
    configs = make_configs(tmp_path, 3, log_compaction_min_entries=20)
    c = Cluster(configs)
    await c.start()
    try:
        lead = await c.leader()
        lag = (lead + 1) % 3
        rep = c.reps[lead]
        await rep.propose(encode("before", "before", "1"), 10)
        await c.reps[lag].stop()
        big = {f"big{i}": os.urandom(256 * 1024).hex() for i in range(24)}  # 12 MB of state
        for i in range(3):
            if i != lag:
                with c.reps[i].lock:
                    c.kvs[i].data.update(big)
        for batch in range(3):
            await asyncio.gather(*(rep.propose(encode(f"d{batch}-{i}", f"d{batch}-{i}", "x"), 10)
                                   for i in range(25)))
        journal = rep._journal
        assert journal is not None
        await wait_for(lambda: journal[0][1] > 40 and configs[lead].dump_file.stat().st_size > 12 << 20, 30,
                       "the leader to write a big dump and compact its log")
        c.kvs[lag] = kv = KV()
        c.reps[lag] = Replicator(configs[lag], apply=kv.apply, snapshot=kv.snapshot, restore=kv.restore)
        await c.reps[lag].start()
        node, transport = rep._node, rep._transport
        assert node is not None and transport is not None
        lag_addr = configs[lag].self_addr
        most = [0]  # the most chunk bytes one held round queued for the lagging node
        rounds = [0]  # held rounds that queued chunks

        def held_round() -> None:  # Raft thread, between ticks
            transport.hold()
            try:
                node._SyncObj__sendAppendEntries()
                held = 0
                for peer, message in transport._held or ():
                    data = message.get("serialized") if isinstance(message, dict) else None
                    if peer.id == lag_addr and data:
                        held += len(data[0][1] if isinstance(data[0], tuple) else data[0])
                most[0] = max(most[0], held)
                rounds[0] += held > 0
            finally:
                transport.release()

        deadline = time.monotonic() + 60
        while "big0" not in kv.data and rounds[0] < 10 and time.monotonic() < deadline:
            rep._call_in_raft_thread(held_round)
            await asyncio.sleep(0.01)
        assert most[0] > 0  # rounds happened while the transfer ran
        assert most[0] <= _TRANSFER_WINDOW + 64 * 1024, most[0]
        await wait_for(lambda: "big0" in kv.data, 60, "the lagging node to install the snapshot")
    finally:
        await c.stop()


async def test_without_a_durability_trace_no_trace_call_is_made(cluster_factory: Any) -> None:
    """The durability trace is a test hook; unset, flushes and sends make no call for it (they made one per
    flush and one per message sent, in every poll round of every node)."""
    c = await cluster_factory()
    lead = await c.leader()
    rep = c.reps[lead]
    calls: list[tuple[str, int]] = []
    rep._trace = lambda kind, index: calls.append((kind, index))  # type: ignore[method-assign]
    assert await rep.propose(encode("op-1", "k", "v"), timeout=5)
    assert rep._journal is not None and rep._transport is not None
    assert rep._journal._trace is None and rep._transport.trace is None
    assert calls == []


def _pipe_reads(monkeypatch: pytest.MonkeyPatch, fd: int) -> list[int]:
    reads: list[int] = []
    real_read = os.read

    def counting_read(descr: int, size: int) -> bytes:
        if descr == fd:
            reads.append(size)
        return real_read(descr, size)

    monkeypatch.setattr(os, "read", counting_read)
    return reads


async def test_a_wake_up_writes_the_pipe_once_and_reads_it_once(
    cluster_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pysyncobj's wake-up pipe took a write per notification (two per proposal) and, per wake-up, reads until
    one raised EAGAIN. Notifications made before the Raft thread drains the pipe now write one byte."""
    c = await cluster_factory()
    lead = await c.leader()
    node = c.reps[lead]._node
    assert node is not None
    notifier = node._SyncObj__pipeNotifier
    write_fd = notifier._PipeNotifier__pipeW
    writes: list[int] = []
    real_write = os.write

    def counting_write(descr: int, data: bytes) -> int:
        if descr == write_fd:
            writes.append(len(data))
        return real_write(descr, data)

    monkeypatch.setattr(os, "write", counting_write)
    for _ in range(100):  # the Raft thread can drain between two of them only when it gets the GIL
        notifier.notify()
    assert 1 <= len(writes) <= 10, len(writes)
    monkeypatch.setattr(os, "write", real_write)
    # The reader: one read per wake-up. Driven by hand on a poller of our own (the Raft thread's is busy).
    poller = PollPoller()
    own = PipeNotifier(poller)
    _WakePipe(own).install(own, poller)
    reads = _pipe_reads(monkeypatch, own._PipeNotifier__pipeR)
    for _ in range(5):
        own.notify()
    poller.poll(0)
    assert len(reads) == 1
    poller.poll(0)  # drained: nothing left to report
    assert len(reads) == 1
    own.notify()
    poller.poll(0)
    assert len(reads) == 2
    for fd in (own._PipeNotifier__pipeR, own._PipeNotifier__pipeW):
        os.close(fd)


def test_a_notification_during_the_drain_never_leaves_the_pipe_silenced(monkeypatch: pytest.MonkeyPatch) -> None:
    """The interleaving that must not stick: a notification made while the reader is in its read (the read
    releases the GIL). Had the reader cleared `pending` before reading, that notification's byte would be
    consumed by the read and `pending` left set over an empty pipe: every later notification skipped, each
    command waiting for the next timed tick."""
    poller = PollPoller()
    own = PipeNotifier(poller)
    wake = _WakePipe(own)
    wake.install(own, poller)
    read_fd = own._PipeNotifier__pipeR
    real_read = os.read
    raced = []

    def read_with_a_racing_notification(descr: int, size: int) -> bytes:
        if descr == read_fd and not raced:
            raced.append(1)
            own.notify()  # another thread, in the middle of the drain
        return real_read(descr, size)

    own.notify()
    monkeypatch.setattr(os, "read", read_with_a_racing_notification)
    poller.poll(0)
    monkeypatch.setattr(os, "read", real_read)
    assert raced
    woken: list[int] = []
    real_handler = wake.on_readable
    poller.subscribe(read_fd, lambda d, m: (woken.append(1), real_handler(d, m)), POLL_EVENT_TYPE.READ)
    own.notify()  # a later notification must wake the poll
    poller.poll(0)
    assert woken == [1]
    for fd in (read_fd, own._PipeNotifier__pipeW):
        os.close(fd)
