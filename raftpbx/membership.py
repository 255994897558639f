"""Cluster operations over admin RPC: membership changes, leadership transfer and backups.

Theory of operation
-------------------
The methods are thin: validation of the params (errors name the field and change nothing), then one
call into the `Replicator` (membership, Raft §6 single-server changes) or `backup.take_backup`.

- `cluster.add_node {"id", "raft", "admin_url"}` appends a membership entry carrying the new node's Raft
  address, its admin URL (replicated, so every node's `cluster.status` reaches it) and a fresh single-use
  join token, and answers once the entry is committed: {"id", "raft", "admin_url", "token", "members"}.
  The new node then starts on an empty data dir with `--join --join-token TOKEN`.
- `cluster.remove_node {"id"}` removes a member; the leader refuses to remove itself (move leadership
  with `cluster.transfer_leader` first). One change at a time: a second change while one is uncommitted
  is refused (`REJECTED`, code -32005) with a message that says so.
- `cluster.members` lists the members as this node's log says (and whether each one's data-dir
  incarnation is recorded).
- `cluster.transfer_leader {"to"?}` hands leadership to `to` (or the most caught-up peer); it must reach
  the leader (`NOT_LEADER` names it otherwise).
- `cluster.backup` answers {"manifest", "data"} where data is the base64 of a backup file (see
  `backup.py`): the state snapshot is taken under the state lock, off the event loop.

Planned maintenance (drain; the replicated fact lives in `state/cluster.py`):

- `cluster.drain {"node", "op_id"?}` commits `NodeDrained` for a member, then, if that member leads,
  waits (at most `DRAIN_TRANSFER_TIMEOUT`) until leadership has moved to an undrained member and answers
  {"node", "drained": true, "changed", "since", "leader"}. Draining an already drained node is fine
  (`changed` false, its original `since` kept). Refusals change nothing: `node` not a member (invalid
  params naming `node`), or draining it would leave no undrained member to lead (`REJECTED`): a drain
  must leave leadership a home, so 2 of 3 nodes may be drained but not 3. If leadership cannot move in
  time (no undrained member is caught up or reachable) the node stays drained and the error says so;
  the leader keeps trying (below).
- `cluster.undrain {"node", "op_id"?}` commits `NodeUndrained` (a member, or a drained node that has
  since been removed): {"node", "drained": false, "changed"}.
- Leadership follows the drain (`DrainGuard`): the leader, whenever it finds itself drained (the drain
  entry applied while it leads, or a drained node won an election, e.g. after the leader died), hands
  leadership to the most caught-up undrained member (Raft's TimeoutNow through
  `Replicator.transfer_leadership`), retrying every `DRAIN_RETRY` seconds for at most
  `DRAIN_TRANSFER_TIMEOUT` per trigger. A drained node with no undrained member to hand over to keeps
  leading (the cluster stays available) and logs `drain.no_home`.
- `cluster.transfer_leader {"to"?}` never picks or accepts a drained node: without `to` the target is
  the most caught-up undrained member.
- `cluster.status` (served by `service.py`) is extended here with "drained": [{"node", "since"}] (who asked is in the log, `drain.node_drained by=`)
  and a "drained" flag on each node row.

Membership RPCs are not retried by the CLI (an unknown outcome is reported as such: check
`cluster status` before retrying).
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from .backup import encode_backup, take_backup
from .config import ConfigError, NodeConfig, parse_raft_address
from .logs import get_logger
from .replication import MembershipError, NoQuorum, NotLeader, ProposalTimeout, ReplicationError
from .rpc import (
    NO_QUORUM,
    NOT_LEADER,
    PROPOSAL_TIMEOUT,
    REJECTED,
    REPLICATION_ERROR,
    Params,
    RpcError,
    RpcServer,
)
from .rpc import invalid_params as _invalid
from .state import (
    Applied,
    Command,
    Duplicate,
    Rejected,
    ValidationError,
    check_node_id,
    decide_drain,
    decide_undrain,
    encode_batch,
)

__all__ = ["CHANGE_TIMEOUT", "DRAIN_RETRY", "DRAIN_TRANSFER_TIMEOUT", "ClusterOps", "DrainGuard", "attach"]

log = get_logger("raftpbx.membership")

CHANGE_TIMEOUT = 10.0
DRAIN_TRANSFER_TIMEOUT = 5.0
DRAIN_RETRY = 0.25
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_OP_ID = re.compile(r"^[A-Za-z0-9_:-]{1,100}$")
_URL_RE = re.compile(r"^https?://[^\s/]+(/\S*)?$")


def _rpc_error(exc: ReplicationError) -> RpcError:
    if isinstance(exc, MembershipError):
        return RpcError(REJECTED, str(exc))
    if isinstance(exc, NotLeader):
        return RpcError(NOT_LEADER, str(exc), {"leader": exc.leader})
    if isinstance(exc, NoQuorum):
        return RpcError(NO_QUORUM, str(exc))
    if isinstance(exc, ProposalTimeout):
        return RpcError(PROPOSAL_TIMEOUT, str(exc))
    return RpcError(REPLICATION_ERROR, str(exc))


class DrainGuard:
    """Hands leadership away while this node leads and is drained (see the module doc).

    Triggers: this node becomes leader (`on_leader_change`), or a drain entry is applied here (any
    `NodeDrained` / `NodeUndrained`: a drain of this node, or an undrain that gives leadership a home).
    The apply listener reads only the outcomes (no decode) and hands over to the event loop.
    """

    def __init__(self, config: NodeConfig, machine: Any, replicator: Any) -> None:
        self.node_id = config.node_id
        self.machine = machine
        self.replicator = replicator
        self.loop = asyncio.get_running_loop()
        self.last_error: str | None = None
        self.transfers = 0
        self._task: asyncio.Task[None] | None = None
        self._leader_changed = asyncio.Event()
        replicator.on_leader_change(self._on_leader_change)
        add_listener = getattr(machine, "add_apply_listener", None)
        if add_listener is not None:
            add_listener(self._on_apply)

    # -- reads ---------------------------------------------------------------------------------------
    def drained(self) -> dict[str, float]:
        """The drained nodes (id -> since) as this node's state says."""
        with self.machine.lock:
            return dict(self.machine.state.drained)

    def leads(self) -> bool:
        return str(self.replicator.status().role) == "leader"

    def targets(self) -> list[str]:
        """Undrained members other than this node, best first: connected, most caught up, then by id."""
        drained = self.drained()
        candidates = sorted(m.node_id for m in self.replicator.members()
                            if m.node_id != self.node_id and m.node_id not in drained)
        peers = {p.node_id: p for p in self.replicator.status().peers}

        def rank(node_id: str) -> tuple[bool, int]:
            peer = peers.get(node_id)
            if peer is None:
                return (False, -1)
            return (bool(peer.connected), peer.match_index if peer.match_index is not None else -1)

        return sorted(candidates, key=rank, reverse=True)  # stable: equal ranks stay in id order

    # -- triggers ------------------------------------------------------------------------------------
    def _on_leader_change(self, is_leader: bool, leader: str | None) -> None:  # event loop
        event, self._leader_changed = self._leader_changed, asyncio.Event()
        event.set()
        if is_leader:
            self.check()

    def _on_apply(self, index: int, applied: Any) -> None:  # Raft thread, under the state lock
        if any("drained" in outcome.result and "changed" in outcome.result for outcome in applied.outcomes):
            try:
                self.loop.call_soon_threadsafe(self.check)
            except RuntimeError:  # the loop is closed: the node is stopping
                pass

    def check(self) -> None:
        """Start moving leadership away if this node leads and is drained (no-op if already moving)."""
        if self._task is not None and not self._task.done():
            return
        if not self.leads() or self.node_id not in self.drained():
            return
        self._task = self.loop.create_task(self._move())

    async def hand_over(self, timeout: float) -> str:  # noqa: ASYNC109
        """Transfer leadership to the best undrained member (`targets`); return the new leader.

        With no other member drained, the replicator picks the most caught-up peer itself (it knows members
        added at run time too); otherwise each target is tried by name, best first. Raises the last
        `ReplicationError` / `TimeoutError`, or `ReplicationError` if there is no target at all.
        """
        drained = self.drained()
        others = [m.node_id for m in self.replicator.members() if m.node_id != self.node_id]
        if others and not any(node_id in drained for node_id in others):
            return str(await self.replicator.transfer_leadership(None, timeout=timeout))
        targets = self.targets()
        if not targets:
            raise ReplicationError("no undrained member to hand leadership to")
        deadline = self.loop.time() + timeout
        error: Exception = ReplicationError("no undrained member could take leadership in time")
        for target in targets:
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                break
            try:
                return str(await self.replicator.transfer_leadership(target, timeout=remaining))
            except (ReplicationError, TimeoutError, ValueError) as exc:
                error = exc if not isinstance(exc, ValueError) else ReplicationError(str(exc))
                log.info("drain.transfer_failed", node=self.node_id, to=target, error=str(exc) or type(exc).__name__)
        raise error

    async def _move(self) -> None:
        deadline = self.loop.time() + DRAIN_TRANSFER_TIMEOUT
        while self.leads() and self.node_id in self.drained():
            if not self.targets():
                self.last_error = "no undrained member to hand leadership to"
                log.warning("drain.no_home", node=self.node_id)
                return
            try:
                leader = await self.hand_over(min(2.0, max(0.1, deadline - self.loop.time())))
            except (ReplicationError, TimeoutError) as exc:
                self.last_error = f"transfer failed: {exc or type(exc).__name__}"
            else:
                self.transfers += 1
                self.last_error = None
                log.info("drain.leadership_moved", node=self.node_id, to=leader)
                return
            if self.loop.time() + DRAIN_RETRY >= deadline:
                log.warning("drain.transfer_gave_up", node=self.node_id, error=self.last_error,
                            advice="repeat `raftpbx admin cluster drain` to try again")
                return
            await asyncio.sleep(DRAIN_RETRY)

    async def wait_leader_not(self, node_id: str, timeout: float) -> str | None:  # noqa: ASYNC109
        """Wait until a leader other than `node_id` is known; return it (None after `timeout`)."""
        deadline = self.loop.time() + timeout
        while True:
            leader = self.replicator.status().leader
            if leader is not None and leader != node_id:
                return str(leader)
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                return None
            event = self._leader_changed
            try:
                async with asyncio.timeout(remaining):
                    await event.wait()
            except TimeoutError:
                pass

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class ClusterOps:
    """The cluster.* operation methods of one node."""

    def __init__(self, config: NodeConfig, machine: Any, replicator: Any, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.machine = machine
        self.replicator = replicator
        self.clock = clock
        self.guard = DrainGuard(config, machine, replicator)

    def register(self, server: RpcServer) -> None:
        server.register("cluster.add_node", self.add_node, audit=True)
        server.register("cluster.remove_node", self.remove_node, audit=True)
        server.register("cluster.transfer_leader", self.transfer_leader, audit=True)
        server.register("cluster.drain", self.drain, audit=True)
        server.register("cluster.undrain", self.undrain, audit=True)
        server.register("cluster.members", self.members)
        server.register("cluster.backup", self.backup, audit=True)
        # cluster.status is `service.py`'s; add the drained nodes to its answer. RpcServer has no public
        # accessor for a registered handler, hence the private read (one place, here).
        status = server.handler("cluster.status")
        if status is not None:
            server.register("cluster.status", self._status_with_drain(status))

    def _status_with_drain(self, status: Callable[[Params], Any]) -> Callable[[Params], Any]:
        async def cluster_status(params: Params) -> Any:
            result = await status(params)
            if isinstance(result, dict):
                drained = self.guard.drained()
                result["drained"] = [{"node": n, "since": drained[n]} for n in sorted(drained)]
                for row in result.get("nodes") or ():
                    if isinstance(row, dict):
                        row["drained"] = row.get("id") in drained
            return result

        return cluster_status

    def _members(self) -> list[dict[str, Any]]:
        urls = {p.id: p.admin_url for p in self.config.peers}
        urls[self.config.node_id] = self.config.admin_url
        drained = self.guard.drained()
        return [{"id": m.node_id, "raft": m.raft, "admin_url": m.admin_url or urls.get(m.node_id),
                 "bound": m.bound, "drained": m.node_id in drained} for m in self.replicator.members()]

    async def members(self, params: Params) -> dict[str, Any]:
        params.check_allowed()
        return {"members": self._members()}

    async def add_node(self, params: Params) -> dict[str, Any]:
        params.check_allowed("id", "raft", "admin_url")
        node_id = params.text("id", max_len=63)
        if not _ID_RE.match(node_id):
            raise _invalid("id", "expected letters, digits, '_', '.', '-' (at most 63)")
        try:
            raft = str(parse_raft_address("raft", params.text("raft", max_len=64)))
        except ConfigError as exc:
            raise _invalid("raft", exc.message) from None
        admin_url = params.text("admin_url", max_len=200).rstrip("/")
        if not _URL_RE.match(admin_url):
            raise _invalid("admin_url", "expected http://HOST:PORT")
        try:
            token = await self.replicator.add_node(node_id, raft, admin_url, timeout=CHANGE_TIMEOUT)
        except ReplicationError as exc:
            raise _rpc_error(exc) from None
        return {"id": node_id, "raft": raft, "admin_url": admin_url, "token": token, "members": self._members()}

    async def remove_node(self, params: Params) -> dict[str, Any]:
        params.check_allowed("id")
        node_id = params.text("id", max_len=63)
        try:
            await self.replicator.remove_node(node_id, timeout=CHANGE_TIMEOUT)
        except ReplicationError as exc:
            raise _rpc_error(exc) from None
        return {"id": node_id, "members": self._members()}

    async def transfer_leader(self, params: Params) -> dict[str, Any]:
        params.check_allowed("to")
        to = params.text("to", required=False, max_len=63)
        if self.replicator.status().role != "leader":
            raise _rpc_error(NotLeader(self.replicator.status().leader))
        try:
            if to is None:
                if not self.guard.targets():
                    raise RpcError(REJECTED, "rejected: to: no undrained member to hand leadership to",
                                   {"field": "to", "message": "no undrained member to hand leadership to"})
                leader = await self.guard.hand_over(5.0)
            else:
                if to == self.config.node_id:
                    raise _invalid("to", f"node {to} already leads")
                if to not in {m.node_id for m in self.replicator.members()}:
                    raise _invalid("to", f"no such node: {to} is not a member of the cluster")
                if to in self.guard.drained():
                    raise _invalid("to", f"node {to} is drained: undrain it first, or pick another node")
                leader = await self.replicator.transfer_leadership(to, timeout=5.0)
        except ValueError as exc:
            raise _invalid("to", str(exc).removeprefix("to: ")) from None
        except (ReplicationError, TimeoutError) as exc:
            raise _rpc_error(exc if isinstance(exc, ReplicationError) else ProposalTimeout(str(exc))) from None
        return {"leader": leader}

    # -- drain ----------------------------------------------------------------------------------------

    def _node_param(self, params: Params) -> str:
        node_id = params.text("node", max_len=63)
        if (message := check_node_id(node_id)) is not None:
            raise _invalid("node", message)
        return str(node_id)

    def _op_id(self, params: Params) -> str:
        op_id = params.text("op_id", required=False, max_len=100)
        if op_id is None:
            return uuid.uuid4().hex
        if not _OP_ID.match(op_id):
            raise _invalid("op_id", "expected 1 to 100 characters among letters, digits, '_', ':', '-'")
        return str(op_id)

    async def _commit(self, op_id: str, decide: Callable[[Any, float], list[Any]]) -> Applied:
        """Decide under the state lock, propose one entry, and return its `Applied` (RpcError otherwise)."""
        with self.machine.lock:
            first = self.machine.state.dedupe.get(op_id)
            if first is None:
                try:
                    events = decide(self.machine.state, self.clock())
                except ValidationError as exc:
                    raise _invalid("node" if exc.field == "node_id" else exc.field, exc.message) from None
        outcome: Any = first
        if outcome is None:
            payload = encode_batch([Command(op_id if i == 0 else f"{op_id}.{i}", e) for i, e in enumerate(events)])
            try:
                result = await self.replicator.propose(payload, timeout=self.config.proposal_timeout)
            except ReplicationError as exc:
                error = _rpc_error(exc)
                error.data = {**(error.data or {}), "op_id": op_id}
                raise error from None
            outcomes = list(result) if isinstance(result, list) else []
            if not outcomes:
                raise RpcError(REPLICATION_ERROR, "replication error: the entry produced no outcome", {"op_id": op_id})
            outcome = outcomes[0]
        if isinstance(outcome, Duplicate):
            outcome = outcome.first
        if isinstance(outcome, Rejected):
            field = "node" if outcome.field == "node_id" else outcome.field
            raise RpcError(REJECTED, f"rejected: {field}: {outcome.message}",
                           {"field": field, "message": outcome.message, "op_id": op_id})
        if not isinstance(outcome, Applied):
            raise RpcError(REPLICATION_ERROR, "replication error: unexpected outcome", {"op_id": op_id})
        return outcome

    async def drain(self, params: Params) -> dict[str, Any]:
        params.check_allowed("node", "op_id")
        node_id = self._node_param(params)
        op_id = self._op_id(params)
        members = {m.node_id for m in self.replicator.members()}
        if node_id not in members:
            raise _invalid("node", f"no such node: {node_id} is not a member of the cluster")
        drained = self.guard.drained()
        if not any(m != node_id and m not in drained for m in members):
            message = (f"draining {node_id} would leave no undrained member to lead the cluster: "
                       "undrain another node first")
            raise RpcError(REJECTED, f"rejected: node: {message}", {"field": "node", "message": message})
        by = f"admin via {self.config.node_id}"
        applied = await self._commit(op_id, lambda state, now: decide_drain(state, node_id, by, now))
        leader = self.replicator.status().leader
        if leader is None or leader == node_id:
            self.guard.check()  # this node may be the drained leader (the apply listener does it too)
            moved = await self.guard.wait_leader_not(node_id, DRAIN_TRANSFER_TIMEOUT)
            if moved is None:
                reason = self.guard.last_error or "no undrained member took it"
                raise RpcError(REPLICATION_ERROR,
                               f"node {node_id} is drained, but leadership did not move away from it within "
                               f"{DRAIN_TRANSFER_TIMEOUT:g} s ({reason}); it keeps trying when leadership "
                               "changes: check `raftpbx admin cluster status`, repeat the drain to try again",
                               {"node": node_id, "drained": True, "op_id": op_id})
            leader = moved
        since = self.guard.drained().get(node_id)
        log.info("drain.node_drained", node=node_id, by=by, changed=applied.result.get("changed"), leader=leader)
        return {"node": node_id, "drained": True, "changed": bool(applied.result.get("changed")),
                "since": since, "leader": leader, "op_id": op_id}

    async def undrain(self, params: Params) -> dict[str, Any]:
        params.check_allowed("node", "op_id")
        node_id = self._node_param(params)
        op_id = self._op_id(params)
        members = {m.node_id for m in self.replicator.members()}
        if node_id not in members and node_id not in self.guard.drained():
            raise _invalid("node", f"no such node: {node_id} is not a member of the cluster")
        applied = await self._commit(op_id, lambda state, now: decide_undrain(state, node_id, now))
        log.info("drain.node_undrained", node=node_id, changed=applied.result.get("changed"))
        return {"node": node_id, "drained": False, "changed": bool(applied.result.get("changed")),
                "leader": self.replicator.status().leader, "op_id": op_id}

    async def backup(self, params: Params) -> dict[str, Any]:
        params.check_allowed()

        def build() -> tuple[dict[str, Any], bytes]:
            snapshot = self.machine.snapshot()  # under the state lock: exactly the state at its applied_index
            backup = take_backup(self.config, snapshot, node_id=self.config.node_id)
            return backup.manifest, encode_backup(backup)

        manifest, data = await asyncio.to_thread(build)
        return {"manifest": manifest, "data": base64.b64encode(data).decode("ascii")}


def attach(config: NodeConfig, machine: Any, replicator: Any, server: RpcServer) -> ClusterOps:
    """Register the cluster.* operation methods on `server`."""
    ops = ClusterOps(config, machine, replicator)
    ops.register(server)
    return ops
