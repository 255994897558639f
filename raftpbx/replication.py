"""Replication: the Raft log, through pysyncobj 0.3.17, with its measured hazards closed.

Theory of operation
-------------------
This is the only module that imports pysyncobj. A `Replicator` owns one `SyncObj` subclass
(`_RaftNode`) and drives it from its own thread (`autoTick=False`; our loop calls `doTick`). The
replicated payload is opaque bytes: a proposal is appended to the Raft log as
`REGULAR-type byte + payload` and, once committed, handed to `apply(payload, raft_index)` on the Raft
thread, under `Replicator.lock`. Nothing of ours is pickled: log entries are our bytes, and the full
dump (log compaction) is written by our own serializer hook (magic + sha256 + msgpack) holding the
bytes returned by `snapshot()`; a restart or an installed snapshot goes through `restore(bytes)`.

How each measured hazard is closed (numbers refer to the hazards in the design brief):
1. *No fsync.* The journal is a `_DurableJournal` (FileJournal whose writes we track). The poller of the
   SyncObj is wrapped so that every poll round is: flush own new entries (msync) -> hold outgoing
   messages -> poll (receive append_entries, append to the journal) -> flush -> release held messages.
   Hence a follower's `next_node_idx` ack (Raft §5.3 AppendEntries response) leaves only after the
   entries it acknowledges are on disk (one msync per poll round = group commit), and the leader only
   counts itself for entries appended before the pre-poll flush: the commit index is computed at the
   top of the next tick, after that flush. currentTerm/votedFor (Raft §5.2 persistent state) are
   written with fsync + rename + directory fsync before the vote leaves (the vote is held too).
2. *Journal without full dump.* Both paths derive from `data_dir`; there is no way to configure one.
   A dump that fails to load is fatal (pysyncobj would log and carry on with an empty state). A
   restart between the dump's rename and the journal's compaction (one tick apart) made pysyncobj
   clear the journal, dropping committed entries after the dump; `_align_journal` finishes the
   compaction first. Compaction itself writes a new journal file and renames it (no in-place rewrite).
3. *Pickle on the wire.* `secret` is mandatory and becomes pysyncobj's `password` (Fernet,
   authenticated before unpickling); the server binds `self_addr` exactly (wildcards refused). Once the
   peer's hello says it reads them, frames are sealed with AES-256-GCM under a per-process key derived
   from the secret (`_FrameCipher`, `_SealedConnection`): authenticated before unpickling as well, with
   per-connection replay and reordering refused, at a fraction of zlib + Fernet's CPU per message.
4. *Isolated leader.* `leaderFallbackTimeout` defaults to 1 s; proposals always carry a timeout and
   fail with `NoQuorum` when no leader with a quorum is seen at the deadline.
5. *Unknown outcomes.* `propose` re-submits the *same bytes* after leader changes, drops and
   discarded entries until its deadline; `apply` must dedupe by op_id. At the deadline the outcome is
   unknown: `ProposalTimeout` (or `NoQuorum`), and the caller may retry with the same bytes.
6. *Wiped node rejoining.* `data_dir` holds an identity marker. A data dir without one is accepted only
   with an explicit `bootstrap=True` (creating the cluster) or `join=True` (the cluster added this node
   through a membership change; see the note on `ReplicationConfig`); a marker without a journal, or a
   journal without a marker, is refused. The marker also holds a random *incarnation* id, the join token
   and how the dir was created. Every connection starts with a hello carrying them (first message on
   the pair's single TCP connection); votes asked or given and acknowledgements (`request_vote`,
   `response_vote`, `next_node_idx`) from a peer count only once its hello matched the membership table:
   an added member must present the token of its add entry, and the leader binds the first incarnation
   that did so with a `bind` entry (the token is single-use); a bootstrap member must present a dir
   created by bootstrap; and each node remembers (fsync'ed file) the first incarnation it saw per
   (id, token). On a mismatch the leader sends the reason and the refused node stops (`DataDirError`).

Membership (Raft §6, single-server changes). pysyncobj's dynamic membership is on, with our entries:
`MEMBERSHIP` byte + msgpack {"op": "add"|"rem"|"bind", "id", "raft", "admin_url", "token", "instance"}
(never pickle). A change takes effect on append (the leader in `_SyncObj__changeCluster`, followers in
append_entries) and is undone when its entry is truncated (pysyncobj's rollback, which our §5.3 rewrite
keeps to genuinely conflicting entries); the *committed* table (as of lastApplied) goes into every dump,
and a restart replays the journal's membership entries after the dump. The leader appends a change only
after committing an entry of its term and while no other add/rem is uncommitted (pysyncobj's own check
of that is dead code). A removed member stays a replication target until its removal commits, so it
receives the entry and stops itself (safe: with single-server changes any majority of the old
configuration meets any majority of the new).
7. *Followers truncating acknowledged entries.* pysyncobj's follower deletes every entry after
   `prevLogIdx` whenever it holds more, even when they match (a stale reset makes the leader resend
   from an older index, in batches). Raft §5.3 says delete only from the first *conflict*. `_RaftNode`
   rewrites such append_entries: matching entries are skipped, a message carrying nothing new is
   acknowledged without touching the log, and the commit index it carries is clamped to the last entry
   it verified (Figure 2, AppendEntries rule 5).
8. *Log compaction stalls the Raft thread.* pysyncobj writes a custom dump synchronously on its own thread
   (its fork mode is disabled as soon as a serializer hook is given), so a dump of 100k bindings stalled
   every commit for 1.1-1.5 s. `_ForkingSerializer` takes its place: under `lock` (no apply can be half
   done), it forks; the child closes every inherited descriptor (sockets included: a child must never keep
   the SIP or service address bound), dies with its parent (PR_SET_PDEATHSIG), snapshots the state it was
   forked with, writes, fsyncs and renames the dump, and exits; the Raft thread polls it with `waitpid` and
   compacts the journal only once the child reported success, exactly as pysyncobj's own fork mode. Where
   fork is unavailable or fails, the dump is written in line, as before.

Invariants
----------
- `apply`, `snapshot` and `restore` run on the Raft thread only, one at a time, under `lock`.
- Membership tables are mutated on the Raft thread only; the loop reads `Member` tuples published after
  each tick.
- No acknowledgement (follower ack, leader self-count) covers an index that is not msync'ed.
- Futures are resolved on the event loop (`call_soon_threadsafe`); the loop never reads SyncObj
  internals: it reads `ReplicationStatus` snapshots published by the Raft thread after each tick.
- The secret is never logged, stored or put in a repr.

Throughput: the leader appends every queued command before sending one append_entries per follower,
and the messages produced in one step for one peer travel as one encrypted frame. A failed msync is
fatal (`DiskError`): the held acknowledgements are dropped and the node leaves the cluster.

Read barrier (`read_barrier`, `apply_leader_commits`): a node's state may miss an entry that the leader and
a quorum already committed (and a client was already answered for) while this node has not heard the new
commit index; its own view says it is up to date. A decision that would refuse on that state (the proxy's
404/480, an admin refusal) first proposes a no-op entry (pysyncobj's own NO_OP type, as a new leader's first
entry: our `apply` never sees it) and waits until it is applied here: any leader appends it after every entry committed before the call began (Raft §5.4,
leader completeness), so once it is applied so are they (the log-based read of Raft thesis §6.4).
Concurrent callers share one entry; a caller joins only a barrier not yet submitted.

Known limits: the leader cannot remove itself (transfer leadership first). A bootstrap member wiped and
restarted with `bootstrap=True` is recognised only by nodes that saw its earlier incarnation. A removed
member stops 2 s after appending its removal, even if that entry were later truncated (it is then just a
stopped member). In a single-node cluster the leader's own no-op entry can be counted before its msync
(no user entry ever is).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import os
import pickle
import secrets
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgpack
import pysyncobj.dns_resolver
import pysyncobj.syncobj
import pysyncobj.tcp_connection
import pysyncobj.transport
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from pysyncobj import SyncObj, SyncObjConf
from pysyncobj.config import FAIL_REASON
from pysyncobj.journal import FileJournal, ResizableFile
from pysyncobj.pipe_notifier import PipeNotifier
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.serializer import SERIALIZER_STATE, Serializer
from pysyncobj.syncobj import _COMMAND_TYPE, _RAFT_STATE
from pysyncobj.tcp_connection import TcpConnection
from pysyncobj.transport import TCPTransport

__all__ = [
    "ConfigError",
    "DataDirError",
    "DiskError",
    "Member",
    "MembershipError",
    "NoQuorum",
    "NotLeader",
    "PeerStatus",
    "ProposalTimeout",
    "ReplicationConfig",
    "ReplicationError",
    "ReplicationStatus",
    "Replicator",
    "apply_leader_commits",
    "seed_data_dir",
]

logger = logging.getLogger("raftpbx.replication")

# One clock. pysyncobj reads CLOCK_MONOTONIC_RAW (through a Python lambda, on every timestamp); this module
# reads CLOCK_MONOTONIC (time.monotonic), and the two kinds of timestamps meet in the same comparisons: the
# pre-vote's election deadline and a connection's last read time are written here and compared by pysyncobj,
# the peers' last response times are written there and compared in `_publish`. NTP slews only
# CLOCK_MONOTONIC, so the clocks drift apart (98 ms after 11.5 h of uptime on the development machine, a few
# ppm: seconds after weeks), and every such deadline is off by that much. pysyncobj's timestamps are all
# taken through these module globals, which are read at each call.
for _module in (pysyncobj.syncobj, pysyncobj.tcp_connection, pysyncobj.transport, pysyncobj.dns_resolver):
    _module.monotonicTime = time.monotonic

_NEVER: Final = float("inf")  # an election deadline that never passes (pre-vote gate, `_onTick`)
JOURNAL_NAME: Final = "raft.journal"
DUMP_NAME: Final = "raft.dump"
MARKER_NAME: Final = "raftpbx-node.json"
SEEN_NAME: Final = "raftpbx-peers-seen.json"
_DUMP_MAGIC: Final = b"RAFTPBX-DUMP\x01\n"
TRANSFER_HOLD: Final = 1.5  # s at most that new commands wait while leadership is handed over
_REGULAR: Final = bytes([_COMMAND_TYPE.REGULAR])
_MEMBERSHIP: Final = bytes([_COMMAND_TYPE.MEMBERSHIP])
_HELLO: Final = "raftpbx_hello"
_REFUSED: Final = "raftpbx_refused"
# What a peer says that changes what this node decides: votes asked and given, acknowledgements. A node
# cannot lead without votes, so its append_entries need no gate.
_PREVOTE: Final = "raftpbx_prevote"
_PREVOTE_ANSWER: Final = "raftpbx_prevote_answer"
_GATED: Final = frozenset({"request_vote", "response_vote", "next_node_idx", _PREVOTE, _PREVOTE_ANSWER})


class ReplicationError(Exception):
    """Root of every replication failure."""


class ConfigError(ReplicationError, ValueError):
    """An invalid `ReplicationConfig` field; the message names the field."""


class DiskError(ReplicationError):
    """The journal could not be flushed: fatal (after a failed fsync the disk state is unknown)."""


class DataDirError(ReplicationError):
    """The data directory is not safe to start from (wiped, foreign or damaged)."""


class MembershipError(ReplicationError):
    """A membership change was refused (one change at a time, unknown or duplicate node, the leader)."""


class NotLeader(ReplicationError):
    """This node cannot forward the proposal; `leader` is the last known leader id (or None).

    pysyncobj forwards proposals from followers, so `propose` does not raise this today; it is part of
    the contract for callers that want to redirect.
    """

    def __init__(self, leader: str | None) -> None:
        super().__init__(f"not leader (leader: {leader})")
        self.leader = leader


class NoQuorum(ReplicationError):
    """No leader with a quorum was seen before the deadline.

    `submitted` tells whether the bytes ever reached a leader's log: if so, the outcome is unknown
    (the entry may still commit later) and a retry must reuse the same bytes.
    """

    def __init__(self, message: str, *, submitted: bool) -> None:
        super().__init__(message)
        self.submitted = submitted


class ProposalTimeout(ReplicationError):
    """The deadline passed with a leader in place: the outcome is unknown; retry with the same bytes."""


class _ApplyFailure:
    """What `apply` raised for an entry (every node raises the same way: apply is deterministic)."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_RESUBMIT: Final = object()
_NO_OP: Final = _COMMAND_TYPE.NO_OP
# The read barrier's entry is a pysyncobj NO_OP entry, the same bytes as the one a new leader appends: applied
# by pysyncobj itself (nodes of every release skip it), never handed to `apply`. An empty batch of ours
# (`encode_batch([])`) would change nothing in the state but its `applied_index`, which the admin API
# reports (a refused write would no longer "change nothing"), and it costs a decode on every node.
_BATCH: Final = "raftpbx_batch"  # several pysyncobj messages in one (encrypted) frame


def _check_addr(name: str, value: str) -> tuple[str, int]:
    host, sep, port_s = value.rpartition(":")
    if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ConfigError(f"{name}: expected host:port, got {value!r}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{name}: host must be an IP address, got {host!r}") from None
    if ip.is_unspecified:
        raise ConfigError(f"{name}: wildcard address {host} refused; bind the node's own address")
    return host, int(port_s)


@dataclass(frozen=True)
class ReplicationConfig:
    """Settings of one Raft member. Journal and full dump always live together in `data_dir`.

    `bootstrap` / `join` matter only when `data_dir` holds no identity marker yet: `bootstrap=True` when
    creating the cluster, `join=True` when the node was added by a membership change (remove-then-add
    for a wiped node). Without either, an empty data dir is refused, so a wiped node cannot silently
    come back as a voter with an empty log.
    """

    self_id: str
    self_addr: str
    peers: Mapping[str, str]
    data_dir: Path
    secret: str = field(repr=False)
    bootstrap: bool = False
    join: bool = False
    join_token: str | None = field(default=None, repr=False)
    peer_admin_urls: Mapping[str, str] = field(default_factory=dict)
    self_admin_url: str | None = None
    raft_min_timeout: float = 0.15
    raft_max_timeout: float = 0.3
    append_entries_period: float = 0.04
    leader_fallback_timeout: float = 1.0
    connection_timeout: float = 1.0
    connection_retry_time: float = 0.25
    keepalive_period: float = 0.2
    tick_period: float = 0.02
    log_compaction_min_entries: int = 5000
    log_compaction_min_time: float = 300.0
    # Compaction also once the journal holds this many bytes of commands (entries of 64 commands made 5000
    # entries, pysyncobj's count, 12 s of replay on restart), and a clean stop writes a dump when the
    # journal holds more than `stop_dump_min_entries` entries: the next start replays (almost) nothing.
    log_compaction_max_bytes: int = 16 << 20
    stop_dump_min_entries: int = 200
    commands_queue_size: int = 100_000
    resubmit_after: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "peers", dict(self.peers))
        object.__setattr__(self, "peer_admin_urls", dict(self.peer_admin_urls))
        if not self.self_id:
            raise ConfigError("self_id: must not be empty")
        if not isinstance(self.secret, str) or not self.secret:
            raise ConfigError("secret: the cluster secret is mandatory (Raft traffic is pickled)")
        _check_addr("self_addr", self.self_addr)
        seen = {self.self_addr}
        for node_id, addr in self.peers.items():
            if node_id == self.self_id:
                raise ConfigError(f"peers: contains self_id {node_id!r}")
            _check_addr(f"peers.{node_id}", addr)
            if addr in seen:
                raise ConfigError(f"peers.{node_id}: address {addr} used twice")
            seen.add(addr)
        if self.bootstrap and self.join:
            raise ConfigError("bootstrap/join: choose one")
        if self.join_token is not None and not self.join:
            raise ConfigError("join_token: only meaningful with join=True")
        if not 0 < self.append_entries_period * 3 < self.raft_min_timeout < self.raft_max_timeout:
            raise ConfigError("raft_min_timeout: need 3*append_entries_period < min < raft_max_timeout")
        if self.leader_fallback_timeout <= self.append_entries_period:
            raise ConfigError("leader_fallback_timeout: must exceed append_entries_period")
        if self.connection_timeout < self.raft_max_timeout:
            raise ConfigError("connection_timeout: must be >= raft_max_timeout")
        if not 0 < self.keepalive_period < self.connection_timeout:
            raise ConfigError("keepalive_period: must be in (0, connection_timeout)")
        if self.tick_period <= 0 or self.connection_retry_time < 0 or self.resubmit_after <= 0:
            raise ConfigError("tick_period/connection_retry_time/resubmit_after: must be positive")
        if self.log_compaction_min_entries < 2 or self.log_compaction_min_time <= 0:
            raise ConfigError("log_compaction_min_entries/log_compaction_min_time: too small")
        if self.log_compaction_max_bytes < 4096 or self.stop_dump_min_entries < 0:
            raise ConfigError("log_compaction_max_bytes/stop_dump_min_entries: too small")

    @property
    def journal_file(self) -> Path:
        return self.data_dir / JOURNAL_NAME

    @property
    def dump_file(self) -> Path:
        return self.data_dir / DUMP_NAME

    @property
    def marker_file(self) -> Path:
        return self.data_dir / MARKER_NAME


@dataclass(frozen=True)
class PeerStatus:
    node_id: str
    address: str
    connected: bool
    match_index: int | None  # known on the leader only


@dataclass(frozen=True)
class ReplicationStatus:
    self_id: str
    role: str  # "leader" | "follower" | "candidate"
    leader: str | None
    term: int
    commit_index: int
    applied_index: int
    peers: tuple[PeerStatus, ...]
    has_quorum: bool
    # Read barrier: this node has applied an entry of a term it saw as current (the leader's no-op or
    # later), hence every entry committed before that term (Raft §5.4.2, §8). Until then, right after a
    # restart, its state can miss writes acknowledged before the restart. Latched once true.
    caught_up: bool = False
    # The commit index this node last heard from its leader (its own on the leader): a follower whose
    # applied_index is below it has yet to apply entries that are already acknowledged.
    leader_commit_index: int = 0


@dataclass(frozen=True)
class Member:
    """One voting member as the log says (latest membership entry wins, Raft §6 single-server changes).

    `admin_url` is None for members of the bootstrap configuration (their URL is in node.toml);
    `bound` tells whether the cluster has recorded which data-dir incarnation answers for this id.
    """

    node_id: str
    raft: str
    admin_url: str | None
    bound: bool


# A membership table maps node id -> {"raft", "admin_url", "token", "instance"}. It lives in the log:
# MEMBERSHIP-type entries carry msgpack maps {"op": "add"|"rem"|"bind", "id", ...} (never pickle).
MemberTable = dict[str, dict[str, Any]]


def _encode_change(req: Mapping[str, Any]) -> bytes:
    return _MEMBERSHIP + msgpack.packb(dict(req), use_bin_type=True)


def _decode_change(command: Any) -> dict[str, Any] | None:
    if not isinstance(command, bytes | bytearray) or command[:1] != _MEMBERSHIP:
        return None
    try:
        req = msgpack.unpackb(bytes(command[1:]), raw=False)
    except Exception:
        return None  # e.g. a pickled pysyncobj request: we never write those
    if not isinstance(req, dict) or req.get("op") not in ("add", "rem", "bind") or not req.get("id"):
        return None
    return req


def _record(req: Mapping[str, Any]) -> dict[str, Any]:
    return {"raft": req.get("raft"), "admin_url": req.get("admin_url"), "token": req.get("token"),
            "instance": req.get("instance")}


def _change_table(table: MemberTable, req: Mapping[str, Any], reverse: bool = False) -> None:
    """Apply (or undo, for a truncated entry) one membership entry to `table`. Idempotent."""
    nid = req["id"]
    if req["op"] == "bind":
        rec = table.get(nid)
        if rec is not None:
            rec["instance"] = None if reverse else req.get("instance")
        return
    if (req["op"] == "add") != reverse:
        table[nid] = _record(req)
    else:
        table.pop(nid, None)


async def apply_leader_commits(replicator: Any, timeout: float) -> bool:  # noqa: ASYNC109
    """Read barrier: return once this node has applied every entry committed anywhere in the cluster before
    the call began (at most `timeout`). True when the state moved on, so a decision taken on it (a refusal,
    a 404/480) is worth taking again; False when nothing could be confirmed in time (no quorum, timeout,
    stopped): the caller answers from the state it has, as before.

    This is `replicator.read_barrier(timeout)`: a no-op entry goes through the log and is applied here;
    concurrent callers share one. A stand-in without `read_barrier` (a test's) confirms nothing: False."""
    barrier = getattr(replicator, "read_barrier", None)
    return barrier is not None and bool(await barrier(timeout))


def new_join_token() -> str:
    """A single-use join token: 144 random bits, URL-safe, never starting with '-' (a command line would
    take `--join-token -x...` for a flag; 1 token in 64 did)."""
    return "j" + secrets.token_urlsafe(18)


def _copy_table(table: MemberTable) -> MemberTable:
    return {nid: dict(rec) for nid, rec in table.items()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_node_state(name: str) -> bool:
    """Files a node writes in its data dir (config files and logs kept there are not node state)."""
    return name.startswith(("raft.", "raftpbx-", "cdr."))


def seed_data_dir(config: ReplicationConfig, snapshot: bytes, applied_index: int) -> None:
    """Write an empty node's data dir so that it starts from `snapshot` (restore of a backup).

    Every node of the new cluster gets the same dump and journal: two no-op entries of term 0 ending at
    the snapshot's applied index (the state ignores entries at or below it, so the log must go on from
    there), the bootstrap membership of `config`, and an identity marker (created "bootstrap": the nodes
    form a new cluster). Refuses a data dir that holds anything.
    """
    data_dir = config.data_dir
    held = [p.name for p in data_dir.iterdir() if _is_node_state(p.name)] if data_dir.exists() else []
    if held:
        raise DataDirError(f"{data_dir} already holds node state ({', '.join(sorted(held))}): restore seeds "
                           "the data dirs of a NEW cluster only")
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    last_idx = max(int(applied_index), 2)
    noop = bytes([_COMMAND_TYPE.NO_OP])
    prev, last = (noop, last_idx - 1, 0), (noop, last_idx, 0)
    members: MemberTable = {config.self_id: _record({"raft": config.self_addr, "admin_url": config.self_admin_url})}
    for nid, addr in config.peers.items():
        members[nid] = _record({"raft": addr, "admin_url": config.peer_admin_urls.get(nid)})
    body = msgpack.packb({"v": 1, "snapshot": bytes(snapshot), "last": list(last), "prev": list(prev),
                          "cluster": sorted(rec["raft"] for rec in members.values()), "members": members},
                         use_bin_type=True)
    with open(config.dump_file, "wb") as f:
        f.write(_DUMP_MAGIC + hashlib.sha256(body).digest() + body)
        f.flush()
        os.fsync(f.fileno())
    journal = FileJournal(str(config.journal_file))
    journal.add(*prev)
    journal.add(*last)
    journal._destroy()  # msync + close
    marker = {"format": 1, "node_id": config.self_id, "raft_addr": config.self_addr, "created": "bootstrap",
              "created_at": time.time(), "instance": uuid.uuid4().hex, "join_token": None, "restored": True}
    tmp = config.marker_file.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(marker))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, config.marker_file)
    _fsync_dir(data_dir)


class _DurableMetaStorer:
    """currentTerm/votedFor (Raft §5.2, Figure 2 'persistent state'): fsync file, rename, fsync dir,
    before the vote or the term change leaves the node."""

    def __init__(self, path: str) -> None:
        self._path = path

    def getMeta(self) -> dict[str, Any]:
        from pysyncobj.pickle import loads  # pysyncobj's own local metadata, never network input

        try:
            with open(self._path, "rb") as f:
                meta = loads(f.read())
        except FileNotFoundError:
            return {}
        except Exception as exc:
            logger.warning("unreadable Raft metadata %s: %r (term falls back to the log's)", self._path, exc)
            return {}
        return meta if isinstance(meta, dict) else {}

    def storeMeta(self, meta: dict[str, Any]) -> None:
        from pysyncobj.pickle import dumps

        tmp = self._path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(dumps(meta))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path)
        _fsync_dir(Path(self._path).parent)

    def getPath(self) -> str:
        return self._path


def _die_with_parent() -> None:
    """In a forked child: ask Linux to SIGKILL us when the parent dies (a killed node leaves no writer)."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


class _ForkingSerializer(Serializer):  # type: ignore[misc]
    """pysyncobj's dump writer, forked (hazard 8). Only `serialize` and `checkSerializing` change; loading a
    dump and sending it to a lagging follower are pysyncobj's own code over the same file."""

    def __init__(self, owner: Replicator, file_name: str, batch_size: int) -> None:
        super().__init__(file_name, batch_size, False, owner._write_dump, owner._read_dump, None)
        self._owner = owner
        self._file = file_name
        self._pid = 0
        self._id: Any = None
        self._started = 0.0
        self.forks = 0  # dumps written by a child (tests)
        self._incoming: Any = None  # the snapshot file being received from the leader
        self.rejected_transfers = 0  # received snapshots discarded as damaged (tests)
        self.aborted_transfers = 0  # received snapshots dropped when their connection broke (tests)
        self.sender: Any = None  # Raft address of the peer whose snapshot chunks arrive
        self._received = 0  # bytes of the incoming snapshot written so far
        self._offsets: dict[Any, int] = {}  # node -> bytes of its outgoing snapshot sent so far

    def serialize(self, data: Any, id: Any) -> None:  # pysyncobj names it `id`
        if self._pid:
            return  # one dump at a time (pysyncobj asks again once this one is done)
        owner, tmp = self._owner, self._file + ".tmp"
        self._id, self._started = id, time.monotonic()
        parent = os.getpid()
        if owner.fork_locks is None:
            super().serialize(data, id)  # the owner did not say which locks its snapshot takes
            return
        try:
            with contextlib.ExitStack() as held:
                held.enter_context(owner.lock)  # no apply is half done in the image the child gets
                for lock in owner.fork_locks:  # nor can a reader on the loop hold what snapshot() takes
                    held.enter_context(lock)
                pid = os.fork()
        except OSError as exc:
            logger.warning("cannot fork the dump writer (%r): writing the dump in line", exc)
            pid = -1
        if pid == 0:  # the child: never returns
            status = 1
            try:
                _die_with_parent()
                os.closerange(3, _max_fd())
                owner._write_dump(tmp, data[1:], locked=True)
                if os.getppid() == parent:  # an orphan must not replace a newer node's dump
                    os.replace(tmp, self._file)
                    _fsync_dir(Path(self._file).parent)
                    status = 0
            except BaseException:  # whatever it was, the parent sees the exit status
                status = 1
            finally:
                os._exit(status)
        if pid > 0:
            self._pid = pid
            return
        super().serialize(data, id)  # fork failed: the old synchronous path

    def checkSerializing(self) -> tuple[Any, Any]:
        pid = self._pid
        if not pid:
            state: tuple[Any, Any] = super().checkSerializing()
            return state
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done, status = pid, 1
        if done == 0:
            return SERIALIZER_STATE.SERIALIZING, self._id
        self._pid = 0
        took = time.monotonic() - self._started
        if status == 0:
            self.forks += 1
            self.cancel_all()  # a transfer restarts on the new file
            logger.info("full dump written by pid %d up to index %s in %.3f s", pid, self._id, took)
            return SERIALIZER_STATE.SUCCESS, self._id
        logger.warning("dump writer pid %d failed (status %d) after %.3f s", pid, status, took)
        return SERIALIZER_STATE.FAILED, self._id

    # Snapshot transfer to a lagging or new node. pysyncobj's chunks carry no offset: the leader keeps a file
    # position per node and the receiver appends every chunk after the first, so any disagreement (chunks
    # queued on a connection that broke, the leader resuming mid-file after a reconnect it did not notice, a
    # transfer left over from an earlier term) left a hole; with a 41 MB dump the member never joined.
    # Peers that read sealed frames (this version) get (offset, chunk) and refuse a chunk that is not the
    # next byte; a broken connection cancels the transfer on both sides; a leader keeps at most
    # _TRANSFER_WINDOW unsent bytes per node (no flood, no starved receiver, bounded memory).
    def getTransmissionData(self, transmissionID: Any) -> Any:
        transport = self._owner._transport
        conn = transport._connections.get(transmissionID) if transport is not None else None
        # Unsent bytes: the connection's buffer and the chunks held back until this poll round's flush (the
        # leader's append_entries rounds run while sends are held; pysyncobj asks for chunk after chunk for
        # up to append_entries_period in one round).
        held = transport.held_bytes.get(transmissionID, 0) if transport is not None else 0
        if conn is not None and conn.getSendBufferSize() + held > _TRANSFER_WINDOW:
            return None  # pysyncobj sends a plain heartbeat this round and asks again next time
        data = super().getTransmissionData(transmissionID)
        if not isinstance(data, tuple):
            return None  # None (dump being written) or False (read error): nothing to send this round
        chunk, is_first, is_last = data
        if transport is not None and transport._held is not None:
            transport.held_bytes[transmissionID] = held + len(chunk)
        offset = 0 if is_first else self._offsets.get(transmissionID, 0)
        self._offsets[transmissionID] = offset + len(chunk)
        if is_last:
            self._offsets.pop(transmissionID, None)
        if isinstance(conn, _SealedConnection) and conn.sealed:
            return (offset, chunk), is_first, is_last
        return data  # an older peer reads plain chunks

    def cancelTransmisstion(self, id: Any) -> None:  # pysyncobj's name (and spelling)
        """Forget the transfer to `id` (pysyncobj leaves its file open)."""
        self._offsets.pop(id, None)
        transmission = self._Serializer__transmissions.pop(id, None)
        if isinstance(transmission, dict) and transmission.get("file") is not None:
            with contextlib.suppress(OSError):
                transmission["file"].close()

    def cancel_all(self) -> None:
        for peer in list(self._Serializer__transmissions):
            self.cancelTransmisstion(peer)

    def abort_incoming(self, sender: Any = None) -> None:
        """Drop the snapshot being received (from `sender`, if given): its remaining chunks will never
        come, and a transfer restarted on a new connection begins with a first chunk again."""
        if self._incoming is not None and (sender is None or sender == self.sender):
            self._incoming.close()
            self._incoming = None
            self.aborted_transfers += 1
            with contextlib.suppress(OSError):
                os.unlink(self._file + ".1.tmp")

    def setTransmissionData(self, data: Any) -> bool:
        """A snapshot arriving from the leader, chunk by chunk. pysyncobj renames the received file over our
        own dump before anything checks it, so a damaged transfer destroyed a good dump and stopped the node
        (measured: 15 of 41 MB arrived). A chunk whose offset is not the next byte drops the transfer (the
        leader restarts it once it finds us still behind), and the last chunk completes a file that must
        carry our magic and checksum before it replaces the dump; a damaged one is discarded."""
        if not isinstance(data, tuple) or len(data) != 3:
            return False
        chunk, is_first, is_last = data
        offset = None
        if isinstance(chunk, tuple):  # (offset, bytes) from a leader of this version
            offset, chunk = chunk
        if not isinstance(chunk, bytes | bytearray):
            return False
        tmp = self._file + ".1.tmp"
        incoming = self._incoming
        if is_first:
            if incoming is not None:
                incoming.close()
            try:
                incoming = self._incoming = open(tmp, "wb")  # noqa: SIM115 - kept open across chunks
            except OSError as exc:
                logger.warning("cannot receive a snapshot: %r", exc)
                self._incoming = None
                return False
            self._received = 0
        elif incoming is None:
            return False  # a middle chunk of a transfer whose start we never saw: wait for a new one
        if offset is not None and offset != self._received:
            logger.warning("snapshot chunk at offset %d, expected %d: transfer dropped, the leader restarts it",
                           offset, self._received)
            self.abort_incoming()
            return False
        try:
            incoming.write(chunk)
        except OSError as exc:
            logger.warning("cannot receive a snapshot: %r", exc)
            incoming.close()
            self._incoming = None
            return False
        self._received += len(chunk)
        if not is_last:
            return False
        incoming.close()
        self._incoming = None
        problem = _dump_problem(tmp)
        if problem is not None:
            self.rejected_transfers += 1
            logger.warning("discarded a damaged snapshot from the leader (%s); it will be sent again", problem)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return False
        os.replace(tmp, self._file)
        return True

    def reap(self, timeout: float) -> None:
        """At shutdown: let a running child finish (bounded), then kill it."""
        pid, self._pid = self._pid, 0
        if not pid:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] != 0:
                    return
            time.sleep(0.01)
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, 9)
            os.waitpid(pid, 0)


def _dump_problem(path: str) -> str | None:
    """Why the file at `path` is not a complete dump of ours (magic, then sha256 of the rest), or None."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        return f"unreadable: {exc!r}"
    head = len(_DUMP_MAGIC)
    if raw[:head] != _DUMP_MAGIC:
        return f"not a raftpbx dump ({len(raw)} bytes)"
    if hashlib.sha256(raw[head + 32:]).digest() != raw[head:head + 32]:
        return f"checksum mismatch ({len(raw)} bytes)"
    return None


def _max_fd() -> int:
    try:
        return int(os.sysconf("SC_OPEN_MAX"))
    except (ValueError, OSError):
        return 65536


class _DurableJournal(FileJournal):  # type: ignore[misc]
    """A FileJournal that knows what is written but not yet on disk, and msyncs on demand."""

    def __init__(self, path: str, trace: Callable[[str, int], None] | None) -> None:
        super().__init__(path)
        self._FileJournal__metaStorer = _DurableMetaStorer(path + ".meta")
        self._path = path
        self._dir = Path(path).parent
        self._dirty = False
        self._trace = trace
        self.durable_index = self[-1][1] if len(self) else 0
        self.tail_bytes = self._count_bytes()  # command bytes held (what a restart would replay)

    def _count_bytes(self) -> int:
        return sum(len(entry[0]) for entry in self._FileJournal__journal)

    def add(self, command: bytes, idx: int, term: int) -> None:
        super().add(command, idx, term)
        self.tail_bytes += len(command)
        self._dirty = True

    def clear(self) -> None:
        super().clear()
        self.tail_bytes = 0
        self._dirty = True

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        super().deleteEntriesFrom(entryFrom)
        self.tail_bytes = self._count_bytes()
        self._dirty = True

    def deleteEntriesTo(self, entryTo: int) -> None:
        """Log compaction, called right after a full dump was renamed into place.

        pysyncobj rewrites the journal in place (a torn rewrite on power loss would lose the tail);
        we write the kept entries to a new file, msync it, rename it over the journal and fsync the
        directory, so the journal on disk is always either the old one or the new one.
        """
        _fsync_dir(self._dir)  # the dump's rename is durable before the journal forgets anything
        self.sync()
        inner: Any = self  # pysyncobj's private fields, typed loosely
        keep = list(inner._FileJournal__journal[entryTo:])
        tmp = self._path + ".compact"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fresh = FileJournal(tmp)
        for entry in keep:
            fresh.add(*entry)
        offset = fresh._FileJournal__currentOffset
        fresh._destroy()  # msync + close
        inner._FileJournal__journalFile._destroy()
        os.replace(tmp, self._path)
        _fsync_dir(self._dir)
        inner._FileJournal__journalFile = ResizableFile(self._path)
        inner._FileJournal__journal = keep
        inner._FileJournal__currentOffset = offset
        self.tail_bytes = self._count_bytes()
        self._dirty = False
        if self._trace is not None and keep:
            self._trace("flush", keep[-1][1])

    def onOneSecondTimer(self) -> None:
        # pysyncobj rewrites the metadata every second to remember the commit index. A lower commit
        # index after a restart is always safe (the leader's next message raises it), and an fsync
        # a second on the Raft thread shows in the tail latency: the commit index is only written
        # along with term/vote changes.
        return

    @property
    def dirty(self) -> bool:
        return self._dirty

    def sync(self) -> None:
        if not self._dirty:
            return
        last = self[-1][1] if len(self) else 0
        # Entries are written through a MAP_SHARED mmap of the journal file, i.e. into its page cache.
        # fdatasync(2) of the file writes those dirty pages (and the size, if the file grew) exactly as
        # msync(MS_SYNC) does (Linux implements msync as an fsync of the mapped range), but CPython 3.11's
        # mmap.flush() holds the GIL for the whole disk flush while os.fdatasync releases it: the SIP
        # thread keeps running during the 2-15 ms of each group commit. The descriptor is looked up on
        # every call: ResizableFile reopens the file when it has to grow it by appending.
        journal_file = self._FileJournal__journalFile
        os.fdatasync(journal_file._ResizableFile__f.fileno())
        self._dirty = False
        self.durable_index = last
        if self._trace is not None:
            self._trace("flush", last)


_FRAME_V1: Final = b"\x01"  # first byte of a sealed frame (a Fernet token starts with b"g")
_FRAME_KDF_SALT: Final = b"raftpbx raft frames v1"
_FRAME_SALT_LEN: Final = 16
_FRAME_NONCE_LEN: Final = 12
_FRAME_HEAD: Final = 1 + _FRAME_SALT_LEN + _FRAME_NONCE_LEN
_FRAME_ZLIB_ABOVE: Final = 64 * 1024  # bytes of pickle; smaller frames travel uncompressed
_FRAME_MAX_SENDERS: Final = 64  # receive keys cached (one per sending process seen)
_READ_BUDGET: Final = 1 << 20  # bytes read from one Raft connection per readiness event
_TRANSFER_WINDOW: Final = 1 << 20  # unsent snapshot bytes the leader queues per node at most
_ACK_REPEAT: Final = 0.02  # s: an unchanged acknowledgement is repeated to the leader at most this often


@functools.lru_cache(maxsize=8)
def _frame_master_key(secret: str) -> bytes:
    """PBKDF2 of the cluster secret (once per process and secret; 100,000 rounds like pysyncobj's)."""
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=_FRAME_KDF_SALT, iterations=100_000)
    return kdf.derive(secret.encode())


class _FrameCipher:
    """Authenticated encryption of Raft frames (hazard 3), cheaper than pysyncobj's Fernet per message.

    pysyncobj compresses every message with zlib, then Fernet-encrypts it (AES-CBC, HMAC-SHA256, base64,
    a timestamp): measured ~100 us of CPU per small message sent and received, ten messages per commit.
    A sealed frame is `0x01 | salt(16) | nonce(12) | AES-256-GCM(key_salt, nonce, 0x00|0x01 + pickle,
    aad=0x01|salt)`: the key is HMAC-SHA256(PBKDF2(secret), salt) for a salt drawn once per sending
    process, and the nonce is that process's message counter, so no (key, nonce) pair ever repeats
    (GCM's one hard rule) however many nodes share the secret. The receiver authenticates before it
    unpickles (a stranger without the secret gets nothing parsed), and per connection accepts one salt
    and strictly increasing counters only (a frame replayed or reordered inside a connection is refused;
    across connections pysyncobj's per-connection random key, inside the plaintext, still refuses it).
    """

    def __init__(self, secret: str) -> None:
        self._master = _frame_master_key(secret)
        self.salt = os.urandom(_FRAME_SALT_LEN)
        self._aad = _FRAME_V1 + self.salt
        self._seal = AESGCM(self._key(self.salt))
        self._counter = itertools.count(1)
        self._keys: dict[bytes, AESGCM] = {}

    def _key(self, salt: bytes) -> bytes:
        return hmac.digest(self._master, b"raftpbx raft frame key" + salt, "sha256")

    def seal(self, plain: bytes) -> bytes:
        nonce = next(self._counter).to_bytes(_FRAME_NONCE_LEN, "big")
        return self._aad + nonce + self._seal.encrypt(nonce, plain, self._aad)

    def open(self, frame: bytes) -> tuple[bytes, int, bytes]:
        """(salt, counter, plaintext) of an authentic frame; raises ValueError otherwise."""
        if len(frame) < _FRAME_HEAD + 16 or frame[:1] != _FRAME_V1:
            raise ValueError("not a sealed frame")
        salt = frame[1:1 + _FRAME_SALT_LEN]
        nonce = frame[1 + _FRAME_SALT_LEN:_FRAME_HEAD]
        aead = self._keys.get(salt)
        if aead is None:
            if len(self._keys) >= _FRAME_MAX_SENDERS:
                self._keys.clear()
            aead = AESGCM(self._key(salt))
        try:
            plain = aead.decrypt(nonce, frame[_FRAME_HEAD:], _FRAME_V1 + salt)
        except InvalidTag:
            raise ValueError("frame failed authentication") from None
        self._keys[salt] = aead  # only senders that hold the secret are remembered
        return salt, int.from_bytes(nonce, "big"), plain


class _SealedConnection(TcpConnection):  # type: ignore[misc]
    """pysyncobj's TcpConnection (pysyncobj builds them; `_HeldTransport` switches their class) whose frames
    are sealed by `_FrameCipher` instead of zlib + Fernet, once the peer's hello said it reads them
    (`sealed`). Until then, and for peers of an older version, it speaks Fernet; it reads both, but no
    Fernet frame once the peer has sent a sealed one. Anything that fails to authenticate, a counter that
    does not increase, or a change of sending key closes the connection, as pysyncobj does."""

    cipher: _FrameCipher
    sealed: bool
    _peer_salt: bytes | None
    _peer_counter: int

    def adopt(self, cipher: _FrameCipher) -> None:
        self.cipher = cipher
        self.sealed = False
        self._peer_salt = None
        self._peer_counter = 0

    def disconnect(self) -> None:
        self.sealed = False
        self._peer_salt = None
        self._peer_counter = 0
        super().disconnect()

    def connect(self, host: str, port: int) -> bool:
        self.sealed = False
        self._peer_salt = None
        self._peer_counter = 0
        return bool(super().connect(host, port))

    # pysyncobj keeps both buffers as bytes, appends with += and drops what was sent or parsed by slicing:
    # every step copies the whole buffer. With tens of MB in flight (a snapshot sent to a lagging node in
    # 64 KB chunks) that is quadratic: the receiver stalled long enough for the connection timeout to cut
    # the transfer, over and over. Here both are bytearrays (amortised appends, O(1) removal at the front).
    def _rbuf(self) -> bytearray:
        buf = getattr(self, "_TcpConnection__readBuffer")  # noqa: B009 (pysyncobj's mangled field)
        if not isinstance(buf, bytearray):  # pysyncobj resets it to bytes() on (dis)connect
            buf = bytearray(buf)
            self._TcpConnection__readBuffer = buf
        return buf

    def _wbuf(self) -> bytearray:
        buf = getattr(self, "_TcpConnection__writeBuffer")  # noqa: B009
        if not isinstance(buf, bytearray):
            buf = bytearray(buf)
            self._TcpConnection__writeBuffer = buf
        return buf

    def send(self, message: Any) -> None:
        self._wbuf()
        if not self.sealed:
            super().send(message)  # zlib + Fernet; appends to the bytearray in place
            return
        if self.sendRandKey:
            message = (self.sendRandKey, message)
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        data = b"\x01" + zlib.compress(data, 1) if len(data) > _FRAME_ZLIB_ABOVE else b"\x00" + data
        frame = self.cipher.seal(data)
        buf = self._wbuf()
        buf += struct.pack("i", len(frame))
        buf += frame
        self._TcpConnection__trySendBuffer()

    def _TcpConnection__processSend(self) -> bool:
        buf = self._wbuf()
        if not buf:
            return False
        sock = getattr(self, "_TcpConnection__socket")  # noqa: B009
        try:
            sent = sock.send(buf)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                self.disconnect()
            return False
        if sent <= 0:
            if sent < 0:
                self.disconnect()
            return False
        del buf[:sent]
        return True

    def _TcpConnection__tryReadBuffer(self) -> None:
        # pysyncobj reads until EAGAIN before it parses anything. A peer streaming a snapshot can keep the
        # socket readable for seconds: nothing parsed, no tick, no keepalive, and the sender's connection
        # timeout cut the transfer. Read at most _READ_BUDGET per readiness event (poll is level-triggered:
        # the rest raises the next event after this round is parsed).
        # A short read means the socket is drained: pysyncobj reads again until EAGAIN, one more recv syscall
        # and a raised exception per readiness event, for nothing (poll is level-triggered: data arriving
        # after the short read raises the next event).
        budget = _READ_BUDGET
        size = getattr(self, "_TcpConnection__recvBufferSize")  # noqa: B009
        while budget > 0:
            got = self._read_once()
            if got < size:
                break
            budget -= got
        self._TcpConnection__lastReadTime = time.monotonic()

    def _read_once(self) -> int:
        sock = getattr(self, "_TcpConnection__socket")  # noqa: B009
        if sock is None:
            return 0
        try:
            incoming = sock.recv(getattr(self, "_TcpConnection__recvBufferSize"))  # noqa: B009
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                self.disconnect()
            return 0
        if not incoming:  # SO_ERROR was checked once for this readiness event (pysyncobj's __processConnection)
            self.disconnect()
            return 0
        self._rbuf().extend(incoming)
        return len(incoming)

    def _TcpConnection__processParseMessage(self) -> Any:
        buf = self._rbuf()
        if len(buf) < 4 or buf[4:5] != _FRAME_V1:
            if len(buf) >= 5 and self._peer_salt is not None:
                self.disconnect()  # Fernet after sealed frames on this connection: refused
                return None
            if len(buf) < 4 or len(buf) - 4 < struct.unpack("i", buf[:4])[0]:
                return None
            # A Fernet frame (handshake, or an older peer): pysyncobj's parser works on bytes.
            setattr(self, "_TcpConnection__readBuffer", bytes(buf))  # noqa: B010
            return TcpConnection._TcpConnection__processParseMessage(self)
        size = struct.unpack("i", buf[:4])[0]
        if len(buf) - 4 < size:
            return None
        try:
            salt, counter, plain = self.cipher.open(bytes(buf[4:4 + size]))
            if (self._peer_salt is not None and salt != self._peer_salt) or counter <= self._peer_counter:
                raise ValueError("replayed or reordered frame")
            self._peer_salt, self._peer_counter = salt, counter
            body = zlib.decompress(plain[1:]) if plain[:1] == b"\x01" else plain[1:]
            message = pickle.loads(body)  # authenticated: sent by a holder of the cluster secret
            if self.recvRandKey:
                rand_key, message = message
                if rand_key != self.recvRandKey:
                    raise ValueError("frame of another connection")
        except Exception:
            self.disconnect()
            return None
        del buf[:4 + size]
        return message


class _HeldTransport(TCPTransport):  # type: ignore[misc]
    """TCP transport whose sends can be held back until the journal is flushed (group commit)."""

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:
        self.cipher = _FrameCipher(syncObj._owner.config.secret)  # before super() adds the nodes
        super().__init__(syncObj, selfNode, otherNodes)
        self._held: list[tuple[Any, Any]] | None = None
        self.held_bytes: dict[Any, int] = {}  # snapshot chunk bytes held per node (transfer flow control)
        self._last_ack: tuple[Any, float] = (None, 0.0)
        self.acks_skipped = 0
        self.trace: Callable[[str, int], None] | None = None
        self.hello: Callable[[], dict[str, Any]] | None = None
        self.on_disconnect: Callable[[Any], None] | None = None

    def addNode(self, node: Any) -> None:
        super().addNode(node)
        conn = self._connections.get(node)
        if conn is not None and not isinstance(conn, _SealedConnection):
            conn.__class__ = _SealedConnection  # pysyncobj builds plain TcpConnections
            conn.adopt(self.cipher)

    def _onNewIncomingConnection(self, conn: Any) -> None:
        conn.__class__ = _SealedConnection
        conn.adopt(self.cipher)
        super()._onNewIncomingConnection(conn)

    def seal(self, node: Any) -> None:
        """The peer's hello says it reads sealed frames: send it nothing else on this connection."""
        conn = self._connections.get(node)
        if isinstance(conn, _SealedConnection):
            conn.sealed = True

    def _onNodeConnected(self, node: Any) -> None:
        # The hello is the first message on every connection (one TCP connection per pair keeps order).
        if self.hello is not None:
            self.send(node, self.hello())
        super()._onNodeConnected(node)

    def _onNodeDisconnected(self, node: Any) -> None:
        if self.on_disconnect is not None:
            self.on_disconnect(node)
        super()._onNodeDisconnected(node)

    def send(self, node: Any, message: Any) -> bool:
        if (
            isinstance(message, dict)
            and message.get("type") == "next_node_idx"
            and message.get("success")
            and not message.get("reset")
        ):
            # A follower acknowledges every append_entries, also the one that only carries the new commit
            # index right after each commit (pysyncobj sends it at once): two more frames and a leader
            # wake-up per commit, telling the leader nothing new. An acknowledgement identical to the one
            # sent to the same leader in the same term less than _ACK_REPEAT ago is not sent again (the
            # leader's view of us is unchanged; it still hears from us at least every _ACK_REPEAT).
            now = time.monotonic()
            key = (node, self._syncObj.raftCurrentTerm, message.get("next_node_idx"))
            if key == self._last_ack[0] and now - self._last_ack[1] < _ACK_REPEAT:
                self.acks_skipped += 1
                return True
            self._last_ack = (key, now)
        if self._held is not None:
            self._held.append((node, message))
            return True
        return self._send_now(node, message)

    def _send_now(self, node: Any, message: Any) -> bool:
        if self.trace is not None:
            self._trace_ack(message)
        return bool(super().send(node, message))

    def _trace_ack(self, message: Any) -> None:
        trace = self.trace
        if (
            trace is not None
            and isinstance(message, dict)
            and message.get("type") == "next_node_idx"
            and message.get("success")
        ):
            trace("ack", int(message["next_node_idx"]) - 1)

    def discard(self) -> None:
        self._held = None
        self.held_bytes.clear()

    def hold(self) -> None:
        if self._held is None:
            self._held = []

    def release(self) -> None:
        """Send what was held, coalescing the messages for one node into one frame (in order)."""
        held, self._held = self._held, None
        if self.held_bytes:
            self.held_bytes.clear()
        if not held:
            return
        tracing = self.trace is not None
        if len(held) == 1:
            node, message = held[0]
            if tracing:
                self._trace_ack(message)
            super().send(node, message)
            return
        by_node: dict[Any, list[Any]] = {}
        for node, message in held:
            by_node.setdefault(node, []).append(message)
        for node, messages in by_node.items():
            if tracing:
                for message in messages:
                    self._trace_ack(message)
            frame = messages[0] if len(messages) == 1 else {"type": _BATCH, "messages": messages}
            super().send(node, frame)


class _WakePipe:
    """pysyncobj's wake-up pipe (its `PipeNotifier`: a proposal, a forwarded call or a stop writes to it so
    that the Raft thread's poll returns at once), at one write per wake-up instead of one per notification,
    and one read instead of reading until EAGAIN.

    pysyncobj's `notify` writes a byte every time: `propose` made two (pysyncobj's own and ours, needed
    while the batch flag is set), and every proposal queued before the thread woke made more. Its reader
    loops on `os.read` until it raises EAGAIN: an exception raised and caught per wake-up. Here a
    notification writes only if none is pending since the last drain. The reader clears `pending` after its
    read: a notification skipped in between is not lost, because the reader runs inside the poll, and the
    tick that follows every poll takes whatever was queued (commands, calls, the stop flag). Clearing before
    the read would be wrong: a notification written during the read is consumed by it and leaves `pending`
    set over an empty pipe, and every later notification would be skipped. One read of up to 4 KiB drains
    what the pipe can hold here (a byte or two); were more left, the level-triggered poll reports it
    again."""

    __slots__ = ("_r", "_w", "pending")

    def __init__(self, notifier: PipeNotifier) -> None:
        self._r: int = notifier._PipeNotifier__pipeR
        self._w: int = notifier._PipeNotifier__pipeW
        self.pending = False

    def install(self, notifier: PipeNotifier, poller: Any) -> None:
        notifier.notify = self.notify
        poller.subscribe(self._r, self.on_readable, POLL_EVENT_TYPE.READ)  # replaces pysyncobj's reader

    def notify(self) -> None:
        if self.pending:
            return
        self.pending = True
        with contextlib.suppress(BlockingIOError):  # pipe full: the thread is awake anyway
            os.write(self._w, b"o")

    def on_readable(self, _descr: int, _mask: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._r, 4096)
        self.pending = False  # after the read (see the class doc); the next tick takes what was queued


class _RaftNode(SyncObj):  # type: ignore[misc]
    """SyncObj with our entry point, our dump format and the Raft §5.3 conflict rule."""

    def __init__(self, owner: Replicator, conf: SyncObjConf) -> None:
        self._owner = owner
        cfg = owner.config
        self._leader_contact = 0.0  # monotonic time of the last append_entries from a current leader
        self._prevote_term = 0  # the term of the pre-vote round under way (0: none)
        self._prevote_granted: set[str] = set()
        self._prevote_passed = False
        self._defer_append = False  # in a tick, before _checkCommandsToApply (Raft thread)
        self._deferred_append = False  # an append_entries round was left to _checkCommandsToApply
        self.prevote_rounds = 0  # counters (tests, status)
        self.prevote_answers = 0
        self.prevote_denials = 0
        super().__init__(cfg.self_addr, list(cfg.peers.values()), conf, transportClass=_HeldTransport)

    # Pre-vote (Raft thesis §9.6). pysyncobj starts an election, i.e. increments its term, as soon as its
    # election timer fires; the higher term then deposes a healthy leader. Under heavy load a follower that
    # fell behind (busy parsing a backlog) did exactly that again and again: term 662 in 5 minutes, the
    # lagging node a candidate forever (it ignores the leader's lower-term messages). Here the timer first
    # starts a pre-vote: "would you vote for me at term T+1?" Peers answer without changing any state,
    # and say yes only if they have not heard from a leader within the minimum election timeout (leader
    # stickiness) and the asker's log is at least as up to date as theirs (§5.4.1). Only with a majority
    # of yeses does pysyncobj's real election (term increment, RequestVote) start. A leadership transfer
    # (TimeoutNow) skips the pre-vote, as the thesis says (§3.10).
    # The gate decides for the whole tick: pysyncobj checks its election deadline again later in the tick,
    # against a later clock reading. Under load the Raft thread can lose the GIL for milliseconds between the
    # two, and a deadline the gate saw in the future had passed by then: a real election without a pre-vote
    # (seen in `make chaos`: a node cut off by a partition reached a higher term, and for 33 s after the heal
    # it ignored the leader's lower-term messages). So, unless the gate lets the election run, pysyncobj's
    # deadline reads as never during its tick; the value is put back unless the tick set a new one (a message
    # from a leader, a vote granted, a TimeoutNow).
    def _onTick(self, timeToWait: float = 0.0) -> None:
        held: float | None = None if self._prevote_gate() else getattr(self, "_SyncObj__raftElectionDeadline")  # noqa: B009
        if held is not None:
            self._SyncObj__raftElectionDeadline = _NEVER
        self._defer_append = True  # until _checkCommandsToApply: see _SyncObj__sendAppendEntries
        try:
            super()._onTick(timeToWait)
        finally:
            if held is not None and self._SyncObj__raftElectionDeadline == _NEVER:
                self._SyncObj__raftElectionDeadline = held
            self._defer_append = False
            if self._deferred_append:  # pysyncobj's tick ended early (transport not ready)
                self._deferred_append = False
                SyncObj._SyncObj__sendAppendEntries(self)

    # One append_entries per follower per tick. After a commit (and on each heartbeat) pysyncobj sends every
    # follower an append_entries carrying the new commit index, then `_checkCommandsToApply` appends the
    # queued commands and sends another one carrying them (and the same commit index): two frames per
    # follower, each opened, unpickled, handled and acknowledged there. When commands are queued, the first
    # is left to the second, later in the same tick.
    def _SyncObj__sendAppendEntries(self) -> None:
        if self._defer_append and self._SyncObj__commandsQueue._FastQueue__queue and self._isLeader():
            self._deferred_append = True
            return
        SyncObj._SyncObj__sendAppendEntries(self)

    def _majority(self, votes: int) -> bool:
        return votes > (len(self._SyncObj__otherNodes) + 1) / 2

    def _prevote_gate(self) -> bool:
        """Whether pysyncobj may start an election in this tick (see `_onTick`)."""
        if self._SyncObj__raftState == _RAFT_STATE.LEADER or self._SyncObj__selfNode is None:
            self._prevote_term = 0
            return True  # pysyncobj does not check its election deadline then
        now = time.monotonic()
        deadline: float = getattr(self, "_SyncObj__raftElectionDeadline")  # noqa: B009 (pysyncobj's)
        if self._SyncObj__transferInProgress:
            return True
        if deadline >= now:
            return False
        if not self._SyncObj__otherNodes or not self._SyncObj__connectedToAnyone():
            return True  # a single-node cluster elects itself; pysyncobj waits for a connection anyway
        term = self.raftCurrentTerm + 1
        if self._prevote_passed and self._prevote_term == term:
            self._prevote_passed = False  # pysyncobj's election runs in this very tick
            self._prevote_term = 0
            return True
        # Start (or restart, if the last round found no majority) a round; pysyncobj's timer waits.
        self._prevote_term, self._prevote_granted, self._prevote_passed = term, set(), False
        self.prevote_rounds += 1
        self._SyncObj__raftElectionDeadline = now + self._SyncObj__generateRaftTimeout()
        log = self._SyncObj__raftLog
        request = {"type": _PREVOTE, "term": term, "last_log_index": log[-1][1], "last_log_term": log[-1][2]}
        for peer in self._SyncObj__otherNodes:
            self._SyncObj__transport.send(peer, request)
        return False

    def _on_prevote(self, node: Any, message: Mapping[str, Any]) -> None:
        log = self._SyncObj__raftLog
        ours = (log[-1][2], log[-1][1])
        try:
            theirs = (int(message["last_log_term"]), int(message["last_log_index"]))
            term = int(message["term"])
        except (KeyError, TypeError, ValueError):
            return
        grant = (
            self._SyncObj__raftState != _RAFT_STATE.LEADER
            and time.monotonic() - self._leader_contact >= self.conf.raftMinTimeout
            and term >= self.raftCurrentTerm
            and theirs >= ours
        )
        if grant:
            # Give the asker time to run its election before ours (fewer split votes): like a real vote
            # (pysyncobj restarts its timer when it grants one), and our own round yields to it.
            self._prevote_term, self._prevote_passed = 0, False
            self._SyncObj__raftElectionDeadline = time.monotonic() + self._SyncObj__generateRaftTimeout()
        self._SyncObj__transport.send(node, {"type": _PREVOTE_ANSWER, "term": term, "granted": grant})

    def _on_prevote_answer(self, node: Any, message: Mapping[str, Any]) -> None:
        if message.get("term") != self._prevote_term or not self._prevote_term or self._prevote_passed:
            return
        self.prevote_answers += 1
        if not message.get("granted"):
            self.prevote_denials += 1
            return
        self._prevote_granted.add(str(getattr(node, "id", node)))
        if self._majority(1 + len(self._prevote_granted)):
            self._prevote_passed = True
            self._SyncObj__raftElectionDeadline = 0  # the next tick starts the real election

    # Membership: our msgpack entries instead of pysyncobj's pickled ones; see Replicator._change_members.
    def addNodeToCluster(self, node: Any, callback: Any = None) -> None:
        raise MembershipError("use Replicator.add_node")

    def removeNodeFromCluster(self, node: Any, callback: Any = None) -> None:
        raise MembershipError("use Replicator.remove_node")

    def _SyncObj__parseChangeClusterRequest(self, command: Any) -> dict[str, Any] | None:
        return _decode_change(command)

    def _SyncObj__changeCluster(self, request: dict[str, Any]) -> bool:
        """Leader, before appending a membership entry: refuse unless it is safe (Raft §6, single-server
        changes: the leader has committed an entry of its term, and no other change is uncommitted)."""
        noop = self._SyncObj__noopIDx
        if noop is None or self.raftLastApplied < noop:
            return False
        if request["op"] != "bind" and self._change_pending():
            return False
        if not self._owner._valid_change(request):
            return False
        return bool(self._SyncObj__doChangeCluster(request))

    def _change_pending(self) -> bool:
        log = self._SyncObj__raftLog
        first = log[0][1]
        for i in range(max(self.raftCommitIndex + 1 - first, 0), len(log)):
            req = _decode_change(log[i][0])
            if req is not None and req["op"] != "bind":
                return True
        return False

    def _SyncObj__doChangeCluster(self, request: dict[str, Any], reverse: bool = False) -> bool:
        self._owner._change_members(self, request, reverse)
        return True

    def _SyncObj__loadDumpFile(self, clearJournal: bool) -> None:
        self._owner._installing = clearJournal
        try:
            SyncObj._SyncObj__loadDumpFile(self, clearJournal)
        finally:
            self._owner._installing = False

    # Hazard 5 / "never pickle our data": the only REGULAR entries are our bytes.
    def _SyncObj__doApplyCommand(self, command: bytes) -> Any:
        if command[:1] == _MEMBERSHIP:
            req = _decode_change(command)
            if req is not None:
                self._owner._apply_membership(req, self.raftLastApplied + 1)
            return None
        if command[:1] != _REGULAR:
            return SyncObj._SyncObj__doApplyCommand(self, command)
        index = self.raftLastApplied + 1
        return self._owner._apply_entry(bytes(command[1:]), index)

    def _checkCommandsToApply(self) -> None:
        # Batch: append every queued command, then send one append_entries per follower (pysyncobj
        # sends one message per command when appendEntriesUseBatch is off, and waits for the heartbeat
        # when it is on). Each follower then msyncs once per message and acks once.
        # Forwards (follower) and forward answers (leader) produced here leave as one frame per node.
        self._defer_append = False
        deferred, self._deferred_append = self._deferred_append, False
        if not self._SyncObj__commandsQueue._FastQueue__queue or (
            self._isLeader() and time.monotonic() < self._owner._transfer_hold_until
        ):
            # Nothing queued (most ticks: pysyncobj would poll the queue and catch its Empty exception), or a
            # leadership transfer is under way: new commands wait in the queue (Raft thesis §3.10).
            if deferred:
                SyncObj._SyncObj__sendAppendEntries(self)
            return
        conf, transport = self.conf, self._SyncObj__transport
        before = self._SyncObj__raftLog[-1][1]
        conf.appendEntriesUseBatch = True
        transport.hold()
        try:
            super()._checkCommandsToApply()
            if self._isLeader() and (deferred or self._SyncObj__raftLog[-1][1] != before):
                SyncObj._SyncObj__sendAppendEntries(self)
        finally:
            conf.appendEntriesUseBatch = False
            transport.release()

    # Hazard 7: Raft §5.3 - truncate only from the first conflicting entry.
    def _SyncObj__onMessageReceived(self, node: Any, message: Any) -> None:
        if isinstance(message, dict) and message.get("type") == _BATCH:
            for inner in message.get("messages") or ():
                self._SyncObj__onMessageReceived(node, inner)
            return
        if isinstance(message, dict) and message.get("type") == _HELLO:
            self._owner._on_hello(self, node, message)
            return
        if isinstance(message, dict) and message.get("type") == _REFUSED:
            self._owner._on_refused(node, message)
            return
        if (
            isinstance(message, dict)
            and message.get("type") in _GATED
            and getattr(node, "id", None) not in self._owner._verified
        ):
            return  # hazard 6: no vote or acknowledgement counts until the peer's incarnation is verified
        if isinstance(message, dict):
            kind = message.get("type")
            if kind == _PREVOTE:
                self._on_prevote(node, message)
                return
            if kind == _PREVOTE_ANSWER:
                self._on_prevote_answer(node, message)
                return
            if kind == "append_entries" and message.get("term", -1) >= self.raftCurrentTerm:
                self._leader_contact = time.monotonic()
        if (
            isinstance(message, dict)
            and message.get("type") == "append_entries"
            and "prevLogIdx" in message
            and "transmission" not in message
            and message.get("term", -1) >= self.raftCurrentTerm
        ):
            message = self._trim_append_entries(node, message)
            if message is None:
                return
        if isinstance(message, dict) and message.get("serialized") is not None:
            serializer = self._owner._serializer
            if serializer is not None:
                serializer.sender = getattr(node, "id", None)  # whose chunks the incoming file holds
        SyncObj._SyncObj__onMessageReceived(self, node, message)

    def _entry_at(self, index: int) -> tuple[bytes, int, int] | None:
        log = self._SyncObj__raftLog
        first = log[0][1]
        if index < first or index > log[-1][1]:
            return None
        entry: tuple[bytes, int, int] = log[index - first]
        return entry

    def _trim_append_entries(self, node: Any, message: dict[str, Any]) -> dict[str, Any] | None:
        entries = list(message.get("entries") or [])
        prev_idx, prev_term = message["prevLogIdx"], message["prevLogTerm"]
        last_index = self._SyncObj__raftLog[-1][1]
        if prev_idx is None or last_index <= prev_idx:
            return message  # no overlap with our log: pysyncobj appends (or asks for a reset)
        matched = 0
        for entry in entries:
            ours = self._entry_at(entry[1])
            if ours is None or ours[2] != entry[2]:
                break
            matched += 1
        if matched == 0:
            ours = self._entry_at(prev_idx)
            if entries or ours is None or ours[2] != prev_term:
                return message  # a real conflict (or unknown prefix): let pysyncobj truncate from it
        last_new = entries[-1][1] if entries else prev_idx
        clamped = dict(message)
        clamped["commit_index"] = min(message["commit_index"], last_new)
        if matched < len(entries):
            # Skip the entries we already hold; pysyncobj truncates from the first conflict only.
            clamped["prevLogIdx"] = entries[matched - 1][1]
            clamped["prevLogTerm"] = entries[matched - 1][2]
            clamped["entries"] = entries[matched:]
            return clamped
        if last_index == last_new:
            # Everything is already here: an empty append after our last entry truncates nothing.
            clamped["prevLogIdx"], clamped["prevLogTerm"] = last_new, self._SyncObj__raftLog[-1][2]
            clamped["entries"] = []
            return clamped
        # All of the message is in our log and more follows it: keep the log, take the leader/term/
        # commit parts of the message, acknowledge up to the last verified entry only.
        del clamped["prevLogIdx"]
        clamped.pop("entries", None)
        SyncObj._SyncObj__onMessageReceived(self, node, clamped)
        self._SyncObj__transport.send(
            node, {"type": "next_node_idx", "next_node_idx": last_new + 1, "reset": False, "success": True}
        )
        return None


@dataclass(eq=False)
class _Barrier:
    """One read barrier entry and the callers waiting for it (event loop only)."""

    done: asyncio.Future[bool]
    deadline: float  # loop time: the latest deadline of the callers that joined it


class Replicator:
    """A Raft member replicating opaque byte entries; see the module docstring.

    `fork_locks`: full dumps are written by a forked child (hazard 8) only when the owner lists every lock
    that `snapshot` takes (possibly none); they are held across the fork so that the child, the only thread
    of its process, can take them again. None (the default) keeps dumps on the Raft thread.
    """

    def __init__(
        self,
        config: ReplicationConfig,
        *,
        apply: Callable[[bytes, int], object],
        snapshot: Callable[[], bytes],
        restore: Callable[[bytes], None],
        fork_locks: Sequence[contextlib.AbstractContextManager[Any]] | None = None,
    ) -> None:
        self.config = config
        self.lock = threading.RLock()
        self.fork_locks = fork_locks
        self._apply = apply
        self._snapshot = snapshot
        self._restore = restore
        self._addr_to_id = {addr: nid for nid, addr in config.peers.items()}
        self._addr_to_id[config.self_addr] = config.self_id
        self._node: _RaftNode | None = None
        self._journal: _DurableJournal | None = None
        self._serializer: _ForkingSerializer | None = None
        self._caught_up = False
        self._caught_up_event: asyncio.Event | None = None
        self._transfer_hold_until = 0.0  # monotonic; the Raft thread appends no new command before it
        self._transport: _HeldTransport | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._first_tick = threading.Event()
        self._fatal: BaseException | None = None
        self._destroyed = False
        self._calls: list[Callable[[], None]] = []
        self._calls_lock = threading.Lock()
        self._status = ReplicationStatus(config.self_id, "follower", None, 0, 0, 0, (), False)
        self._published_leadership: tuple[bool, str | None] = (False, None)
        self._leader_callbacks: list[Callable[[bool, str | None], None]] = []
        self._leader_event: asyncio.Event | None = None
        self._failed: asyncio.Event | None = None
        self._pending: dict[asyncio.Future[Any], str | None] = {}
        self._last_commit_traced = 0
        self._next_keepalive = 0.0
        # Test hook: called on the Raft thread with ("flush"|"ack"|"commit", index); set it before start.
        self._durability_trace: Callable[[str, int], None] | None = None
        # Membership (Raft thread): effective = as of the last log entry; committed = as of lastApplied.
        self._members: MemberTable = self._initial_table()
        self._committed: MemberTable = _copy_table(self._members)
        self._members_view: tuple[Member, ...] = ()
        self._committed_view: tuple[Member, ...] = ()
        self._view_key: Any = None
        self._members_version = 0  # bumped on every change of _members or _committed (Raft thread)
        self._status_key: Any = None
        self._loop_calls: list[tuple[Callable[..., None], tuple[Any, ...]]] = []  # Raft thread -> loop, batched
        self._raft_ident: int | None = None
        self._verified: set[str] = set()  # raft addresses whose hello matched the table
        self._hellos: dict[str, dict[str, Any]] = {}  # raft address -> hello of the current connection
        self._lingering: dict[str, tuple[int, float]] = {}  # removed raft address -> (removal index, until)
        self._seen_instance: dict[str, tuple[str, str]] = {}  # raft address -> (node id, instance)
        self._refusal_logged: set[tuple[str, str]] = set()
        self._installing = False
        self._instance = ""
        self._created = "bootstrap"
        self._seen_local: dict[str, str] = {}  # "id/token" -> first incarnation seen (SEEN_NAME)
        self._token: str | None = None
        self._membership_busy = False
        self._next_bind = 0.0
        self._removed_since: float | None = None
        self._last_regular = 0  # index of the last REGULAR entry applied
        # Read barriers (event loop): the one not yet submitted, which new callers join, and the task that
        # submits them one after the other (see read_barrier).
        self._barrier_next: _Barrier | None = None
        self._barrier_task: asyncio.Task[None] | None = None
        self.read_barriers = 0  # barrier entries proposed
        self._members_view = self._committed_view = self._view(self._members)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Check the data dir, bind `self_addr`, load the dump and start the Raft thread."""
        if self._node is not None:
            raise ReplicationError("already started")
        self._loop = asyncio.get_running_loop()
        self._leader_event = asyncio.Event()
        self._failed = asyncio.Event()
        await asyncio.to_thread(self._prepare_data_dir)
        await asyncio.to_thread(self._build)
        self._thread = threading.Thread(target=self._run, name=f"raft-{self.config.self_id}", daemon=True)
        self._thread.start()
        await asyncio.to_thread(self._first_tick.wait)
        if self._fatal is not None:
            await self.stop()
            raise ReplicationError(f"replicator failed to start: {self._fatal}") from self._fatal
        logger.info("replicator %s started on %s", self.config.self_id, self.config.self_addr)

    async def stop(self) -> None:
        """Stop the Raft thread, flush and close the journal and sockets. Idempotent."""
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.join)
        node, self._node = self._node, None
        if node is not None:
            await asyncio.to_thread(self._destroy_node, node)
        for fut in list(self._pending):
            if not fut.done():
                fut.set_exception(ReplicationError("replicator stopped"))
        self._pending.clear()

    def _destroy_node(self, node: _RaftNode, *, flush: bool = True) -> None:
        if self._destroyed:
            return
        self._destroyed = True
        if self._serializer is not None:
            self._serializer.reap(timeout=5.0)
        if flush and self._journal is not None:
            with contextlib.suppress(Exception):
                self._journal.sync()
            if self._fatal is None:
                try:
                    self._dump_on_stop(node)
                except Exception:
                    logger.exception("could not write a full dump at stop (the next start replays the journal)")
        with contextlib.suppress(Exception):
            node.destroy()  # autoTick=False: closes the transport and the journal right here
        notifier = getattr(node, "_SyncObj__pipeNotifier", None)
        for fd_name in ("_PipeNotifier__pipeR", "_PipeNotifier__pipeW"):
            fd = getattr(notifier, fd_name, None)
            if isinstance(fd, int):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _dump_on_stop(self, node: _RaftNode) -> None:
        """Clean stop (the Raft thread has exited): if the journal holds many entries after the last dump, write
        a dump of the applied state and compact, exactly as log compaction does, so that the next start
        loads the dump and replays almost nothing (a restart replayed thousands of entries: 12 s)."""
        journal = self._journal
        assert journal is not None
        if len(journal) <= max(self.config.stop_dump_min_entries, 2):
            return
        applied = node.raftLastApplied
        first = journal[0][1]
        if not first < applied <= journal[-1][1]:
            return
        prev, last = journal[applied - 1 - first], journal[applied - first]
        tmp = str(self.config.dump_file) + ".tmp"
        started = time.monotonic()
        self._write_dump(tmp, (tuple(last), tuple(prev), None))
        os.replace(tmp, self.config.dump_file)
        _fsync_dir(self.config.data_dir)
        journal.deleteEntriesTo(applied - 1 - first)  # keeps the dump's two entries and what follows
        logger.info("full dump written at stop up to index %d in %.3f s (journal: %d entries left)", applied,
                    time.monotonic() - started, len(journal))

    def _prepare_data_dir(self) -> None:
        """Hazard 6: only an explicitly bootstrapped or joined node may start from an empty dir."""
        cfg = self.config
        marker, journal, dump = cfg.marker_file, cfg.journal_file, cfg.dump_file
        if marker.exists():
            try:
                data = json.loads(marker.read_text())
            except (OSError, ValueError) as exc:
                raise DataDirError(f"{marker}: unreadable identity marker: {exc}") from exc
            if data.get("node_id") != cfg.self_id:
                raise DataDirError(
                    f"{cfg.data_dir} belongs to node {data.get('node_id')!r}, not {cfg.self_id!r}"
                )
            self._created = str(data.get("created") or "bootstrap")
            self._instance = str(data.get("instance") or "")
            self._token = data.get("join_token")
            if not self._instance:  # a marker written before incarnations existed
                self._instance = uuid.uuid4().hex
                data["instance"] = self._instance
                self._write_marker(data)
            if not journal.exists():
                raise DataDirError(
                    f"{journal} is missing although {marker.name} exists: the data dir was damaged or "
                    "partly wiped. Remove the node from the cluster, wipe the dir, start it with join=True "
                    "after adding it back."
                )
            return
        if journal.exists() or dump.exists():
            raise DataDirError(f"{cfg.data_dir} holds Raft files but no identity marker; refusing to guess")
        if not (cfg.bootstrap or cfg.join):
            raise DataDirError(
                f"{cfg.data_dir} has no Raft state. A node with an empty data dir must not rejoin as a "
                "voter: pass bootstrap=True when creating a new cluster, or join=True once the cluster "
                "has added this node (remove-then-add for a wiped node)."
            )
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self._instance = uuid.uuid4().hex
        self._token = cfg.join_token if cfg.join else None
        self._created = "bootstrap" if cfg.bootstrap else "join"
        body = {"format": 1, "node_id": cfg.self_id, "raft_addr": cfg.self_addr,
                "created": "bootstrap" if cfg.bootstrap else "join", "created_at": time.time(),
                "instance": self._instance, "join_token": self._token}
        self._write_marker(body)
        logger.info("node %s: new data dir %s (%s)", cfg.self_id, cfg.data_dir, body["created"])

    def _write_marker(self, body: Mapping[str, Any]) -> None:
        marker = self.config.marker_file
        tmp = marker.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(dict(body)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, marker)
        _fsync_dir(self.config.data_dir)

    def _build(self) -> None:
        cfg = self.config
        try:
            seen = json.loads((cfg.data_dir / SEEN_NAME).read_text())
            self._seen_local = {str(k): str(v) for k, v in seen.items()} if isinstance(seen, dict) else {}
        except FileNotFoundError:
            self._seen_local = {}
        except (OSError, ValueError) as exc:
            raise DataDirError(f"{cfg.data_dir / SEEN_NAME}: unreadable: {exc}") from exc
        conf = SyncObjConf(
            password=cfg.secret,
            bindAddress=cfg.self_addr,
            autoTick=False,
            appendEntriesUseBatch=False,
            commandsWaitLeader=False,
            raftMinTimeout=cfg.raft_min_timeout,
            raftMaxTimeout=cfg.raft_max_timeout,
            appendEntriesPeriod=cfg.append_entries_period,
            leaderFallbackTimeout=cfg.leader_fallback_timeout,
            connectionTimeout=cfg.connection_timeout,
            connectionRetryTime=cfg.connection_retry_time,
            journalFile=str(cfg.journal_file),
            fullDumpFile=str(cfg.dump_file),
            serializer=self._write_dump,
            deserializer=self._read_dump,
            logCompactionMinEntries=cfg.log_compaction_min_entries,
            logCompactionMinTime=cfg.log_compaction_min_time,
            commandsQueueSize=cfg.commands_queue_size,
            dynamicMembershipChange=True,
            bindRetryTime=0.1,
            maxBindRetries=20,
            useFork=False,
        )
        try:
            node = _RaftNode(self, conf)
        except Exception as exc:
            raise ReplicationError(f"cannot start Raft on {cfg.self_addr}: {exc!r}") from exc
        # Swap pysyncobj's journal for the durable one (same file; nothing has ticked yet).
        plain = node._SyncObj__raftLog
        plain._destroy()
        # The durability trace (a test hook, set before start) costs a call per flush and per message sent:
        # wired only when set.
        tracing = self._durability_trace is not None
        self._journal = _DurableJournal(str(cfg.journal_file), self._trace if tracing else None)
        node._SyncObj__raftLog = self._journal
        plain_serializer = node._SyncObj__serializer
        self._serializer = _ForkingSerializer(
            self, str(cfg.dump_file), plain_serializer._Serializer__transmissionBatchSize)
        node._SyncObj__serializer = self._serializer
        self._transport = node._SyncObj__transport
        self._transport.trace = self._trace if tracing else None
        self._transport.hello = self._hello
        self._transport.on_disconnect = self._peer_disconnected
        # Membership without a dump: the bootstrap configuration, then every membership entry of the
        # journal (a dump, loaded on the first tick, replaces this; see _read_dump).
        table = self._initial_table()
        for entry in self._journal_entries(after=0):
            req = _decode_change(entry[0])
            if req is not None:
                _change_table(table, req)
        self._members = table
        self._committed = self._initial_table()
        self._members_version += 1
        self._sync_nodes(node)
        poller = node._poller
        notifier = node._SyncObj__pipeNotifier
        _WakePipe(notifier).install(notifier, poller)
        real_poll = poller.poll

        def durable_poll(timeout: float) -> None:
            transport, journal = self._transport, self._journal
            assert transport is not None and journal is not None
            self._before_poll()
            transport.hold()
            handler_error: Exception | None = None
            try:
                real_poll(timeout)
            except Exception as exc:  # a handler failed: still flush and send what it produced
                handler_error = exc
            try:
                journal.sync()
            except BaseException as exc:
                transport.discard()  # never acknowledge entries that may not be on disk
                raise DiskError(f"journal msync failed: {exc!r}") from exc
            transport.release()
            if handler_error is not None:
                raise handler_error

        poller.poll = durable_poll
        self._node = node

    def _trace(self, kind: str, index: int) -> None:
        trace = self._durability_trace
        if trace is not None:
            trace(kind, index)

    def _before_poll(self) -> None:
        node, journal = self._node, self._journal
        assert node is not None and journal is not None
        self._flush_loop_calls()  # results of the entries applied in this tick: before the poll waits
        if self._durability_trace is not None and node._isLeader():
            commit = node.raftCommitIndex  # computed at the top of this tick
            if commit > self._last_commit_traced:
                self._last_commit_traced = commit
                self._trace("commit", commit)
        try:
            journal.sync()  # the leader's own new entries, in parallel with the followers' msyncs
        except Exception as exc:
            raise DiskError(f"journal msync failed: {exc!r}") from exc

    # ------------------------------------------------------------------ Raft thread
    def _run(self) -> None:
        node = self._node
        assert node is not None
        self._raft_ident = threading.get_ident()
        first_tick = self._first_tick
        try:
            while not self._stopping.is_set():
                try:
                    node.doTick(self.config.tick_period)
                except ReplicationError:
                    raise
                except Exception:
                    logger.exception("raft tick failed")
                    time.sleep(self.config.tick_period)
                if not first_tick.is_set():
                    first_tick.set()  # Event.set takes a lock and notifies: once, not on every tick
                self._after_tick(node)
        except BaseException as exc:
            self._fatal = exc
        finally:
            if self._fatal is not None:
                # Leave the cluster visibly: close the sockets, report no leadership.
                logger.critical("replicator %s stopped: %s", self.config.self_id, self._fatal)
                self._destroy_node(node, flush=False)
                old = self._status
                self._status = ReplicationStatus(old.self_id, "follower", None, old.term, old.commit_index,
                                                 old.applied_index, (), False, old.caught_up)
                if self._published_leadership != (False, None):
                    self._published_leadership = (False, None)
                    self._to_loop(self._leadership_changed, False, None)
                if self._failed is not None:
                    self._to_loop(self._failed.set)
            else:
                self._publish(node)
            self._flush_loop_calls()
            self._first_tick.set()

    def _after_tick(self, node: _RaftNode) -> None:
        calls: list[Callable[[], None]] = []
        if self._calls:  # appended under the lock, then the thread is woken: a miss waits one tick at most
            with self._calls_lock:
                calls, self._calls = self._calls, []
        for call in calls:
            try:
                call()
            except Exception:
                logger.exception("raft-thread call failed")
        self._membership_tick(node)
        serializer = self._serializer
        if serializer is not None and serializer._Serializer__transmissions and not node._isLeader():
            serializer.cancel_all()  # a leader again later must not resume an old transfer mid-file
        journal = self._journal
        if journal is not None and journal.tail_bytes > self.config.log_compaction_max_bytes:
            node._SyncObj__forceLogCompaction = True  # pysyncobj's next tick starts a dump (if none runs)
        now = time.monotonic()
        if now >= self._next_keepalive:
            # Idle follower<->follower connections would otherwise hit connection_timeout on the
            # first vote request after a leader dies (pysyncobj checks the timeout on send).
            self._next_keepalive = now + self.config.keepalive_period
            for peer in node.otherNodes:
                if node.isNodeConnected(peer):
                    node._SyncObj__transport.send(peer, {"type": "raftpbx_keepalive"})
        self._publish(node)
        self._flush_loop_calls()

    def _publish(self, node: _RaftNode) -> None:
        """Publish a `ReplicationStatus` for the loop. Runs after every tick (thousands a second under load):
        the status objects are rebuilt only when one of their inputs changed."""
        state = node._SyncObj__raftState
        is_leader = state == _RAFT_STATE.LEADER
        leader_node = node._SyncObj__raftLeader
        connected = node._SyncObj__connectedNodes
        others = node._SyncObj__otherNodes
        if leader_node is not None and not is_leader and leader_node not in connected:
            # pysyncobj keeps believing in a leader it cannot reach (no election starts while it is
            # connected to nobody); report what we can use: no leader.
            leader_node = None
        if is_leader:
            match = node._SyncObj__raftMatchIndex
            deadline = time.monotonic() - self.config.leader_fallback_timeout
            times = node._SyncObj__lastResponseTime
            alive = 1 + sum(1 for p in others if times.get(p, 0) > deadline)
            quorum = alive > (len(others) + 1) / 2
            peer_key: tuple[Any, ...] = tuple((p.id, p in connected, match.get(p)) for p in others)
            leader_commit = int(node.raftCommitIndex)
        else:
            quorum = leader_node is not None and bool(node.hasQuorum)
            peer_key = tuple((p.id, p in connected) for p in others)
            leader_commit = int(node._SyncObj__leaderCommitIndex or 0)
        if not self._caught_up and self._applied_current_term(node):
            self._caught_up = True
            logger.info("node %s: caught up (applied index %d of term %d)", self.config.self_id,
                        node.raftLastApplied, node.raftCurrentTerm)
            if self._caught_up_event is not None:
                self._to_loop(self._caught_up_event.set)
        key = (state, leader_node, node.raftCurrentTerm, node.raftCommitIndex, node.raftLastApplied, peer_key,
               quorum, leader_commit, self._caught_up, self._members_version)
        if key == self._status_key:
            return
        self._status_key = key
        if self._members_version != self._view_key:
            self._view_key = self._members_version
            self._members_view, self._committed_view = self._view(self._members), self._view(self._committed)
        role = {_RAFT_STATE.LEADER: "leader", _RAFT_STATE.CANDIDATE: "candidate"}.get(state, "follower")
        leader = self._addr_to_id.get(leader_node.id) if leader_node is not None else None
        peers = [PeerStatus(self._addr_to_id.get(pk[0], pk[0]), pk[0], pk[1], pk[2] if is_leader else None)
                 for pk in peer_key]
        self._status = ReplicationStatus(
            self.config.self_id, role, leader, node.raftCurrentTerm, node.raftCommitIndex,
            node.raftLastApplied, tuple(sorted(peers, key=lambda p: p.node_id)), quorum, self._caught_up,
            leader_commit,
        )
        leadership = (is_leader, leader)
        if leadership != self._published_leadership:
            self._published_leadership = leadership
            logger.info("node %s: leader is %s (term %d)", self.config.self_id, leader, node.raftCurrentTerm)
            self._to_loop(self._leadership_changed, is_leader, leader)

    def _applied_current_term(self, node: _RaftNode) -> bool:
        journal, applied = self._journal, node.raftLastApplied
        if journal is None or applied <= 0 or len(journal) == 0:
            return False
        first = journal[0][1]
        if not first <= applied <= journal[-1][1]:
            return False
        return bool(journal[applied - first][2] == node.raftCurrentTerm)

    async def wait_caught_up(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until `status().caught_up` (the read barrier); False at the deadline."""
        if self._status.caught_up:
            return True
        if self._caught_up_event is None:
            self._caught_up_event = asyncio.Event()
            if self._caught_up:  # latched by the Raft thread before it looks for the event
                return True
        try:
            await asyncio.wait_for(self._caught_up_event.wait(), timeout)
        except TimeoutError:
            return self._status.caught_up
        return True

    def _to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run `fn(*args)` on the event loop. From the Raft thread, calls are collected and handed over
        together (before each poll and after each tick): one wake-up of the loop for a whole group commit
        instead of one per proposal."""
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._raft_ident:
            self._loop_calls.append((fn, args))
            return
        with contextlib.suppress(RuntimeError):  # loop closed while stopping
            loop.call_soon_threadsafe(fn, *args)

    def _flush_loop_calls(self) -> None:
        calls = self._loop_calls
        if not calls:
            return
        self._loop_calls = []
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop closed while stopping
            loop.call_soon_threadsafe(self._run_loop_calls, calls)

    @staticmethod
    def _run_loop_calls(calls: list[tuple[Callable[..., None], tuple[Any, ...]]]) -> None:
        for fn, args in calls:
            try:
                fn(*args)
            except Exception:
                logger.exception("replication callback failed on the event loop")

    def _apply_entry(self, payload: bytes, index: int) -> object:
        if self._fatal is not None:  # e.g. the dump failed to load: never apply on top of a wrong state
            raise ReplicationError(f"replicator failed: {self._fatal}")
        self._last_regular = index
        with self.lock:
            try:
                return self._apply(payload, index)
            except Exception as exc:
                logger.exception("apply failed at index %d", index)
                return _ApplyFailure(exc)

    def _write_dump(self, path: str, data: tuple[Any, ...], *, locked: bool = False) -> None:
        """Write our dump to `path`. `locked`: in the forked writer (hazard 8), whose image holds `lock`
        already and whose log descriptors are closed (the parent logs the result)."""
        last, prev, _cluster = data
        if locked:
            snap = self._snapshot()
        else:
            with self.lock:
                snap = self._snapshot()
        # The membership as of the dump's index (pysyncobj's `cluster` may include uncommitted changes).
        members = _copy_table(self._committed)
        body = msgpack.packb(
            {"v": 1, "snapshot": snap, "last": list(last), "prev": list(prev),
             "cluster": sorted(rec["raft"] for rec in members.values()), "members": members},
            use_bin_type=True,
        )
        with open(path, "wb") as f:
            f.write(_DUMP_MAGIC + hashlib.sha256(body).digest() + body)
            f.flush()
            os.fsync(f.fileno())
        if not locked:
            logger.info("full dump written up to index %d (%d bytes)", last[1], len(body))

    def _read_dump(self, path: str) -> tuple[Any, ...]:
        try:
            with open(path, "rb") as f:
                os.fsync(f.fileno())  # an installed snapshot must be on disk before it is acked
                raw = f.read()
            _fsync_dir(Path(path).parent)
            head = len(_DUMP_MAGIC)
            if raw[:head] != _DUMP_MAGIC:
                raise ReplicationError(f"{path}: not a raftpbx dump")
            digest, body = raw[head:head + 32], raw[head + 32:]
            if hashlib.sha256(body).digest() != digest:
                raise ReplicationError(f"{path}: checksum mismatch")
            doc = msgpack.unpackb(body, raw=False)
            last, prev = tuple(doc["last"]), tuple(doc["prev"])
            self._align_journal(prev, last)
            with self.lock:
                self._restore(doc["snapshot"])
            logger.info("state restored from full dump at index %d", last[1])
            members = doc.get("members")
            if not isinstance(members, dict):  # a dump written before membership was recorded
                by_addr = {rec["raft"]: nid for nid, rec in self._initial_table().items()}
                members = {by_addr.get(a, a): _record({"raft": a}) for a in doc["cluster"]}
            self._committed = _copy_table(members)
            table = _copy_table(members)
            if not self._installing:  # restart: membership entries after the dump still count
                for entry in self._journal_entries(after=int(last[1])):
                    req = _decode_change(entry[0])
                    if req is not None:
                        _change_table(table, req)
            self._members = table
            self._members_version += 1
            self._note_addresses()
            self._reverify()
            return last, prev, sorted({rec["raft"] for nid, rec in [*self._committed.items(), *table.items()]
                                       if nid != self.config.self_id})
        except BaseException as exc:
            # pysyncobj would log this and continue with an empty state: make it fatal instead.
            self._fatal = exc
            self._stopping.set()
            raise

    def _align_journal(self, prev: tuple[Any, ...], last: tuple[Any, ...]) -> None:
        """Finish a compaction that a crash interrupted, before pysyncobj compares journal and dump.

        The dump is renamed into place one tick before the journal drops the entries it covers. A
        restart in between finds a journal that starts before the dump; pysyncobj then *clears the
        journal* and keeps only the dump's two entries, dropping committed, acknowledged entries that
        follow the dump. If the journal holds the dump's two entries, drop only what precedes them.
        """
        journal = self._journal
        if journal is None or len(journal) < 2:
            return
        k = int(prev[1]) - journal[0][1]
        if 0 < k < len(journal) - 1 and tuple(journal[k]) == prev and tuple(journal[k + 1]) == last:
            logger.info("completing interrupted log compaction at index %d", prev[1])
            journal.deleteEntriesTo(k)

    # ------------------------------------------------------------------ membership (Raft thread)
    def _initial_table(self) -> MemberTable:
        cfg = self.config
        table: MemberTable = {cfg.self_id: _record({"raft": cfg.self_addr, "admin_url": cfg.self_admin_url})}
        for nid, addr in cfg.peers.items():
            table[nid] = _record({"raft": addr, "admin_url": cfg.peer_admin_urls.get(nid)})
        return table

    def _journal_entries(self, after: int) -> list[tuple[Any, int, int]]:
        journal = self._journal
        if journal is None:
            return []
        return [journal[i] for i in range(len(journal)) if journal[i][1] > after]

    def _note_addresses(self) -> None:
        for nid, rec in self._members.items():
            self._addr_to_id[rec["raft"]] = nid

    def _sync_nodes(self, node: _RaftNode) -> None:
        """Make pysyncobj's peer set (and its transport's) match the members, effective or committed.

        A removed member stays a replication target until its removal commits, so it receives the entry
        that removes it and stops by itself (`_membership_tick`); counting it meanwhile is safe, since
        with single-server changes any majority of the old configuration meets any of the new (Raft §6).
        """
        want = {rec["raft"] for nid, rec in [*self._committed.items(), *self._members.items()]
                if nid != self.config.self_id} | set(self._lingering)
        have = {n.id for n in node._SyncObj__otherNodes}
        for addr in sorted(have - want):
            SyncObj._SyncObj__doChangeCluster(node, ["rem", addr])
            self._verified.discard(addr)
        for addr in sorted(want - have):
            SyncObj._SyncObj__doChangeCluster(node, ["add", addr])
        self._note_addresses()

    def _valid_change(self, req: Mapping[str, Any]) -> bool:
        table, nid = self._members, req["id"]
        if req["op"] == "add":
            return nid not in table and all(rec["raft"] != req.get("raft") for rec in table.values())
        if req["op"] == "rem":
            return nid in table and nid != self.config.self_id and len(table) > 1
        rec = table.get(nid)
        return rec is not None and rec["instance"] is None and bool(req.get("instance"))

    def _change_members(self, node: _RaftNode, req: Mapping[str, Any], reverse: bool) -> None:
        """A membership entry was appended (or, reverse, truncated): it takes effect at once (Raft §6)."""
        _change_table(self._members, req, reverse)
        self._members_version += 1
        self._sync_nodes(node)
        self._reverify()
        if self.config.self_id in self._members:
            self._removed_since = None
        elif self._removed_since is None:
            self._removed_since = time.monotonic()

    def _apply_membership(self, req: Mapping[str, Any], index: int) -> None:
        if req["op"] == "rem" and req["id"] != self.config.self_id:
            old = self._committed.get(req["id"])
            if old is not None:
                # Keep replicating to the removed member until it acknowledged its removal (or 3 s
                # passed): dropping it at once could close the connection before the entry left.
                self._lingering[old["raft"]] = (index, time.monotonic() + 3.0)
        _change_table(self._committed, req)
        self._members_version += 1
        if self._node is not None and req["op"] != "bind":
            self._sync_nodes(self._node)

    def _hello(self) -> dict[str, Any]:
        return {"type": _HELLO, "id": self.config.self_id, "instance": self._instance, "token": self._token,
                "created": self._created, "frames": 1}

    def _peer_disconnected(self, peer: Any) -> None:
        peer_id = getattr(peer, "id", None)
        if peer_id is None:
            return
        serializer = self._serializer
        if serializer is not None:
            # A snapshot transfer never resumes on a new connection (pysyncobj's chunks carry no offset):
            # the leader starts again from the first chunk, the receiver drops what it got from this peer.
            serializer.cancelTransmisstion(peer)
            serializer.abort_incoming(peer_id)
        self._verified.discard(peer_id)
        self._hellos.pop(peer_id, None)

    def _incarnation_problem(self, addr: str, msg: Mapping[str, Any]) -> str | None:
        nid = msg.get("id")
        rec = self._members.get(nid) if isinstance(nid, str) else None
        if rec is None or rec["raft"] != addr:
            return f"{addr} is not the Raft address of a member named {nid!r}"
        if rec["token"] is None and msg.get("created") != "bootstrap":
            return (f"node {nid} is a bootstrap member but its data dir was created by --join: a wiped "
                    f"node must never simply rejoin. Remove it (`raftpbx admin cluster remove-node {nid}`), "
                    "add it back (`add-node`), and start it with --join --join-token NEW_TOKEN")
        if rec["token"] != msg.get("token"):
            return (f"node {nid} did not present the join token of its current membership: a node is "
                    "admitted only with the token printed by `raftpbx admin cluster add-node`")
        seen = self._seen_local.get(f"{nid}/{rec['token']}")
        if (rec["instance"] is not None and rec["instance"] != msg.get("instance")) or \
                (seen is not None and seen != msg.get("instance")):
            return (f"node {nid}'s data dir is not the incarnation the cluster admitted (wiped or replaced "
                    f"disk?). A wiped node must never simply rejoin: remove it (`raftpbx admin cluster "
                    f"remove-node {nid}`), add it back (`add-node`), and start it with --join --join-token "
                    "NEW_TOKEN on an empty data dir")
        return None

    def _reverify(self) -> None:
        """The table changed (a joiner learns the real records from the log): judge the hellos again."""
        for addr, msg in self._hellos.items():
            if self._incarnation_problem(addr, msg) is None:
                self._verified.add(addr)
            else:
                self._verified.discard(addr)

    def _on_hello(self, node: _RaftNode, peer: Any, msg: Mapping[str, Any]) -> None:
        addr = peer.id
        if msg.get("frames") == 1:  # reads sealed frames (a node of an older version says nothing)
            node._SyncObj__transport.seal(peer)
        self._hellos[addr] = dict(msg)
        problem = self._incarnation_problem(addr, msg)
        if problem is None:
            self._verified.add(addr)
            if isinstance(msg.get("instance"), str):
                self._seen_instance[addr] = (str(msg["id"]), msg["instance"])
                self._remember_instance(str(msg["id"]), msg.get("token"), msg["instance"])
            return
        self._verified.discard(addr)
        if (addr, problem) not in self._refusal_logged:
            self._refusal_logged.add((addr, problem))
            logger.warning("refusing Raft traffic from %s: %s", addr, problem)
        if node._isLeader():
            node._SyncObj__transport.send(peer, {"type": _REFUSED, "reason": problem})

    def _remember_instance(self, nid: str, token: Any, instance: str) -> None:
        """Local trust on first use: the first incarnation seen for (id, token) is written to the data dir
        (fsync) and any other one is refused from then on, with no log entry. This covers the bootstrap
        members (no token to bind in the log); a node wiped and started again, even with --bootstrap,
        presents a new incarnation to peers that remember the old one."""
        key = f"{nid}/{token}"
        if key in self._seen_local:
            return
        self._seen_local[key] = instance
        path = self.config.data_dir / SEEN_NAME
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "w") as f:
                f.write(json.dumps(self._seen_local, sort_keys=True))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(self.config.data_dir)
        except OSError as exc:
            logger.warning("cannot record the incarnation of %s: %r", nid, exc)

    def _on_refused(self, peer: Any, msg: Mapping[str, Any]) -> None:
        if getattr(peer, "id", None) not in self._verified:
            return
        reason = str(msg.get("reason"))[:500]
        self._fatal = DataDirError(f"the cluster refused this node: {reason}")
        self._stopping.set()

    def _membership_tick(self, node: _RaftNode) -> None:
        """Leader: record the incarnation of each member not yet bound (first hello after its admission)."""
        now = time.monotonic()
        if self._lingering:
            match = {n.id: i for n, i in node._SyncObj__raftMatchIndex.items()} if node._isLeader() else {}
            done = [a for a, (index, until) in self._lingering.items() if now > until or match.get(a, 0) >= index]
            if done:
                for addr in done:
                    del self._lingering[addr]
                self._sync_nodes(node)
        if self._removed_since is not None and now - self._removed_since > 2.0:
            self._fatal = ReplicationError(f"node {self.config.self_id} was removed from the cluster")
            self._stopping.set()
            return
        if not node._isLeader() or now < self._next_bind:
            return
        self._next_bind = now + 0.3
        seen = dict(self._seen_instance.values())
        seen[self.config.self_id] = self._instance
        for nid, rec in self._members.items():
            inst = seen.get(nid)
            # Bootstrap members (no token) are checked by how their data dir was created, not bound.
            if rec["token"] is not None and rec["instance"] is None and inst and \
                    (nid == self.config.self_id or rec["raft"] in self._verified):
                node._applyCommand(_encode_change({"op": "bind", "id": nid, "instance": inst})[1:], None,
                                   _COMMAND_TYPE.MEMBERSHIP)

    @staticmethod
    def _view(table: MemberTable) -> tuple[Member, ...]:
        return tuple(Member(nid, rec["raft"], rec["admin_url"], rec["instance"] is not None)
                     for nid, rec in sorted(table.items()))

    # ------------------------------------------------------------------ asyncio side
    def status(self) -> ReplicationStatus:
        """The latest status published by the Raft thread."""
        return self._status

    def on_leader_change(self, callback: Callable[[bool, str | None], None]) -> None:
        """Call `callback(is_leader, leader_id)` on the event loop whenever leadership changes."""
        self._leader_callbacks.append(callback)

    def _leadership_changed(self, is_leader: bool, leader: str | None) -> None:
        if self._leader_event is not None:
            self._leader_event.set()
            self._leader_event = asyncio.Event()
        for fut, submitted_to in list(self._pending.items()):
            if leader is not None and submitted_to != leader and not fut.done():
                fut.set_result((None, _RESUBMIT))
        for cb in list(self._leader_callbacks):
            try:
                cb(is_leader, leader)
            except Exception:
                logger.exception("leader-change callback failed")

    def _check_running(self) -> _RaftNode:
        node = self._node
        if node is None or self._fatal is not None or self._stopping.is_set():
            raise ReplicationError(f"replicator not running ({self._fatal or 'stopped'})")
        return node

    async def propose(self, payload: bytes, timeout: float) -> object:  # noqa: ASYNC109
        """Replicate `payload`; return what `apply` returned for it once committed on a durable quorum.

        Re-submits the same bytes after leader changes, discarded entries and lost forwards (apply
        dedupes). Raises `NoQuorum` or `ProposalTimeout` at the deadline (outcome unknown if the
        bytes ever reached a leader), `ReplicationError` if apply raised or the replicator stopped.
        """
        if not isinstance(payload, bytes | bytearray) or not payload:
            raise ValueError("payload: non-empty bytes required")
        return await self._propose(bytes(payload), timeout, _COMMAND_TYPE.REGULAR)

    async def _propose(self, payload: bytes, timeout: float, command_type: int) -> object:  # noqa: ASYNC109
        if timeout <= 0:
            raise ValueError("timeout: must be positive")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        submitted = False
        while True:
            node = self._check_running()
            if loop.time() >= deadline:
                raise self._deadline_error(submitted)
            leader = self._status.leader
            if leader is None:
                await self._wait_leader(deadline)
                continue
            fut: asyncio.Future[Any] = loop.create_future()
            self._pending[fut] = leader
            node._applyCommand(payload, self._callback_for(fut), command_type)
            # pysyncobj skips its own wake-up while _RaftNode._checkCommandsToApply has the batch flag
            # set; wake the Raft thread ourselves so the command never waits for the next tick.
            self._wake_raft_thread()
            submitted = True
            try:
                async with asyncio.timeout_at(min(deadline, loop.time() + self.config.resubmit_after)):
                    result, err = await fut
            except TimeoutError:
                continue  # no answer yet: lost forward or slow commit; same bytes again (deduped)
            finally:
                self._pending.pop(fut, None)
            if err == FAIL_REASON.SUCCESS:
                if isinstance(result, _ApplyFailure):
                    raise ReplicationError(f"apply failed: {result.exc!r}") from result.exc
                return result
            if err == FAIL_REASON.REQUEST_DENIED:
                raise ReplicationError("proposal denied by the leader")
            if err == FAIL_REASON.QUEUE_FULL:
                await asyncio.sleep(0.005)
            elif err in (FAIL_REASON.MISSING_LEADER, FAIL_REASON.NOT_LEADER, FAIL_REASON.LEADER_CHANGED):
                await self._wait_leader(deadline)
            # DISCARDED, UNKNOWN_OUTCOME, _RESUBMIT: retry at once with the same bytes

    async def read_barrier(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait (at most `timeout`) until this node has applied every entry committed in the cluster before
        this call began; True when it has, False otherwise (no quorum, timeout, replicator stopped: the
        caller answers from the state it has). Never raises a `ReplicationError`.

        How: a no-op entry (pysyncobj's NO_OP type: `apply` never sees it) is proposed and awaited until
        applied here (`propose` returns after the local apply, on a follower too: pysyncobj resolves a
        forwarded command when this node applies its index, with the term checked). Whatever was committed
        before the call is in the log of any leader that appends the no-op after the call began (Raft §5.4,
        leader completeness), before it: applying the no-op here applies it too. A follower's commit index
        alone is not enough: it may not have heard its leader's latest one yet.

        Coalescing: callers share one barrier entry, but a caller joins only a barrier not yet submitted,
        never one already on its way (that one may have been appended before the caller's call began).
        While one barrier is in flight, the callers that arrive meanwhile all wait for the next one, which
        is submitted as soon as the current one finishes: at most one in flight and one waiting."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        barrier = self._barrier_next
        if barrier is None:
            barrier = self._barrier_next = _Barrier(loop.create_future(), deadline)
            if self._barrier_task is None:
                self._barrier_task = loop.create_task(self._submit_barriers())
        else:
            barrier.deadline = max(barrier.deadline, deadline)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(barrier.done)
        return False

    async def _submit_barriers(self) -> None:
        loop = asyncio.get_running_loop()
        barrier: _Barrier | None = None
        try:
            while (barrier := self._barrier_next) is not None:
                self._barrier_next = None  # on its way: callers from now on wait for the next one
                done = False
                remaining = barrier.deadline - loop.time()
                if remaining > 0:
                    self.read_barriers += 1
                    try:
                        await self._propose(b"", remaining, _NO_OP)
                        done = True
                    except ReplicationError:
                        pass  # no quorum, timeout, stopped: each caller answers from the state it has
                barrier.done.set_result(done)
        finally:
            self._barrier_task = None
            for left in (barrier, self._barrier_next):  # cancelled (loop closing): nobody waits forever
                if left is not None and not left.done.done():
                    left.done.set_result(False)
            self._barrier_next = None

    def _callback_for(self, fut: asyncio.Future[Any]) -> Callable[[Any, int], None]:
        def on_result(result: Any, err: int) -> None:  # Raft thread
            self._to_loop(self._resolve, fut, result, err)

        return on_result

    @staticmethod
    def _resolve(fut: asyncio.Future[Any], result: Any, err: int) -> None:
        if not fut.done():
            fut.set_result((result, err))

    async def _wait_leader(self, deadline: float) -> None:
        """Wait (at most until `deadline`) for a leader change, or a short moment if one exists."""
        event = self._leader_event
        assert event is not None
        loop = asyncio.get_running_loop()
        wake = min(deadline, loop.time() + (0.05 if self._status.leader is not None else 1.0))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(wake):
                await event.wait()

    def _deadline_error(self, submitted: bool) -> ReplicationError:
        status = self._status
        if status.leader is None or not status.has_quorum:
            return NoQuorum(
                f"no leader with a quorum before the deadline (leader: {status.leader})", submitted=submitted
            )
        return ProposalTimeout(f"no outcome before the deadline (leader: {status.leader}); outcome unknown")

    async def transfer_leadership(self, to: str | None = None, timeout: float = 2.0) -> str:  # noqa: ASYNC109
        """Hand leadership to `to` (or the most caught-up peer) via Raft TimeoutNow; return the new leader."""
        node = self._check_running()
        target = None
        if to is not None:  # a member added at run time is in the log's table, not in node.toml
            target = next((m.raft for m in self._members_view if m.node_id == to), self.config.peers.get(to))
        if to == self.config.self_id:
            raise ValueError(f"to: {to!r} is this node")
        if to is not None and target is None:
            raise ValueError(f"to: unknown node {to!r}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Raft thesis §3.10: the leader stops appending new commands while it hands over, so the target can
        # catch up (pysyncobj wants its match index equal to our last index) and then win the election with
        # a log no voter finds behind. Under a steady write load the transfer otherwise kept missing both.
        self._transfer_hold_until = time.monotonic() + min(timeout, TRANSFER_HOLD)
        try:
            return await self._transfer(node, to, target, loop, deadline)
        finally:
            self._transfer_hold_until = 0.0

    async def _transfer(self, node: _RaftNode, to: str | None, target: str | None,
                        loop: asyncio.AbstractEventLoop, deadline: float) -> str:
        while True:
            done: asyncio.Future[int] = loop.create_future()

            def on_result(_res: Any, err: int, done: asyncio.Future[int] = done) -> None:
                self._to_loop(self._resolve_err, done, err)

            def request(on_result: Callable[[Any, int], None] = on_result) -> None:
                node.transferLeadership(target, on_result)

            self._call_in_raft_thread(request)
            async with asyncio.timeout_at(deadline):
                err = await done
            if err == FAIL_REASON.NOT_LEADER:
                raise NotLeader(self._status.leader)
            if err == FAIL_REASON.SUCCESS:
                break
            # pysyncobj refuses unless the target's match index equals our last index. Right after a
            # write that committed through the *other* follower the target lags by one AppendEntries
            # round, so a refusal is retried until the deadline instead of failing a drain at once.
            if loop.time() + self.config.append_entries_period >= deadline:
                raise ReplicationError("transfer refused (target unknown, disconnected or not caught up)")
            await asyncio.sleep(self.config.append_entries_period)
        while True:
            leader = self._status.leader
            if leader is not None and leader != self.config.self_id and (to is None or leader == to):
                return leader
            if loop.time() >= deadline:
                raise ProposalTimeout("leadership transfer did not complete in time")
            await self._wait_leader(deadline)

    async def wait_failed(self) -> BaseException:
        """Return once the Raft thread has stopped on a fatal error (refused, removed, disk); the error."""
        event = self._failed
        if event is None:
            raise ReplicationError("not started")
        await event.wait()
        assert self._fatal is not None
        return self._fatal

    def members(self, *, committed: bool = False) -> tuple[Member, ...]:
        """The voting members as of this node's last log entry (or, `committed`, its last applied one)."""
        return self._committed_view if committed else self._members_view

    async def add_node(self, node_id: str, raft_addr: str, admin_url: str | None = None,
                       timeout: float = 10.0) -> str:  # noqa: ASYNC109
        """Add a voting member (Raft §6, one server at a time); return its single-use join token.

        The new node must then start on an empty data dir with join=True and this token; the cluster
        binds the first data-dir incarnation that presents it (see the module docstring, hazard 6).
        """
        if not node_id or not isinstance(node_id, str):
            raise MembershipError("id: a non-empty node id is required")
        try:
            _check_addr("raft", raft_addr)
        except ConfigError as exc:
            raise MembershipError(str(exc)) from None
        view = {m.node_id: m for m in self._members_view}
        if node_id in view:
            raise MembershipError(f"node {node_id!r} is already a member (remove it first to replace it)")
        for m in view.values():
            if m.raft == raft_addr:
                raise MembershipError(f"raft: {raft_addr} is already the address of node {m.node_id!r}")
        token = new_join_token()
        req = {"op": "add", "id": node_id, "raft": raft_addr, "admin_url": admin_url, "token": token,
               "instance": None}

        def done() -> bool:
            return any(m.node_id == node_id for m in self._committed_view) and \
                self._committed.get(node_id, {}).get("token") == token

        await self._change(req, timeout, done)
        return token

    async def remove_node(self, node_id: str, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Remove a voting member (Raft §6). The leader cannot remove itself: transfer leadership first."""
        view = {m.node_id: m for m in self._members_view}
        if node_id not in view:
            raise MembershipError(f"node {node_id!r} is not a member")
        if len(view) <= 1:
            raise MembershipError("cannot remove the last member")
        leader = self._status.leader
        if node_id == leader:
            raise MembershipError(
                f"node {node_id!r} is the leader: move leadership first (`raftpbx admin cluster "
                f"transfer-leader` on it), then remove it")
        rec = dict(self._members.get(node_id) or _record({"raft": view[node_id].raft}))
        req = {"op": "rem", "id": node_id, **rec}

        def done() -> bool:
            return all(m.node_id != node_id for m in self._committed_view)

        await self._change(req, timeout, done)

    async def _change(self, req: Mapping[str, Any], timeout: float, done: Callable[[], bool]) -> None:  # noqa: ASYNC109
        if timeout <= 0:
            raise ValueError("timeout: must be positive")
        if self._membership_busy:
            raise MembershipError("another membership change is in progress on this node (one at a time)")
        def config(view: tuple[Member, ...]) -> list[tuple[str, str]]:
            return [(m.node_id, m.raft) for m in view]  # a pending `bind` is no configuration change

        if config(self._members_view) != config(self._committed_view):
            raise MembershipError("a membership change is still uncommitted (one at a time): wait for it, "
                                  "or bring enough members up to commit it")
        self._membership_busy = True
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            command = _encode_change(req)[1:]  # _applyCommand prepends the type byte
            while True:
                node = self._check_running()
                if self._status.leader is None:
                    if loop.time() >= deadline:
                        raise NoQuorum("no leader: membership change not submitted", submitted=False)
                    await self._wait_leader(deadline)
                    continue
                fut: asyncio.Future[Any] = loop.create_future()
                node._applyCommand(command, self._callback_for(fut), _COMMAND_TYPE.MEMBERSHIP)
                self._wake_raft_thread()
                try:
                    async with asyncio.timeout_at(deadline):
                        _result, err = await fut
                except TimeoutError:
                    err = None
                if err == FAIL_REASON.SUCCESS or done():
                    break
                if err == FAIL_REASON.REQUEST_DENIED:
                    raise MembershipError(
                        "the leader refused the change: another membership change is still uncommitted "
                        "(one at a time), the leader was elected a moment ago, or the id/address conflicts "
                        "with its view")
                if err in (FAIL_REASON.MISSING_LEADER, FAIL_REASON.NOT_LEADER) and loop.time() < deadline:
                    await self._wait_leader(deadline)
                    continue  # never reached a leader's log: safe to submit again
                # Submitted, outcome unknown (leader change, timeout): it may still commit.
                while loop.time() < deadline and not done():  # noqa: ASYNC110 (polls a Raft-thread view)
                    await asyncio.sleep(0.05)
                if done():
                    break
                raise ProposalTimeout("membership change: no outcome before the deadline (it may still "
                                      "commit: check `raftpbx admin cluster status` before retrying)")
            # Committed: wait until this node has applied it too, so its views agree with the caller.
            while not done() and loop.time() < deadline + 2.0:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        finally:
            self._membership_busy = False

    @staticmethod
    def _resolve_err(fut: asyncio.Future[int], err: int) -> None:
        if not fut.done():
            fut.set_result(err)

    def _call_in_raft_thread(self, fn: Callable[[], None]) -> None:
        with self._calls_lock:
            self._calls.append(fn)
        self._wake_raft_thread()

    def _wake_raft_thread(self) -> None:
        notifier = getattr(self._node, "_SyncObj__pipeNotifier", None)
        if notifier is not None:
            with contextlib.suppress(OSError):  # pipe full: the thread is awake anyway
                notifier.notify()
