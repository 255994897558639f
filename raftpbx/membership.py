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

Membership RPCs are not retried by the CLI (an unknown outcome is reported as such: check
`cluster status` before retrying).
"""

from __future__ import annotations

import asyncio
import base64
import re
from typing import Any

from .backup import encode_backup, take_backup
from .config import ConfigError, NodeConfig, parse_raft_address
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

__all__ = ["CHANGE_TIMEOUT", "ClusterOps", "attach"]

CHANGE_TIMEOUT = 10.0
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
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


class ClusterOps:
    """The cluster.* operation methods of one node."""

    def __init__(self, config: NodeConfig, machine: Any, replicator: Any) -> None:
        self.config = config
        self.machine = machine
        self.replicator = replicator

    def register(self, server: RpcServer) -> None:
        server.register("cluster.add_node", self.add_node, audit=True)
        server.register("cluster.remove_node", self.remove_node, audit=True)
        server.register("cluster.transfer_leader", self.transfer_leader, audit=True)
        server.register("cluster.members", self.members)
        server.register("cluster.backup", self.backup, audit=True)

    def _members(self) -> list[dict[str, Any]]:
        urls = {p.id: p.admin_url for p in self.config.peers}
        urls[self.config.node_id] = self.config.admin_url
        return [{"id": m.node_id, "raft": m.raft, "admin_url": m.admin_url or urls.get(m.node_id),
                 "bound": m.bound} for m in self.replicator.members()]

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
            leader = await self.replicator.transfer_leadership(to, timeout=5.0)
        except ValueError as exc:
            raise _invalid("to", str(exc)) from None
        except (ReplicationError, TimeoutError) as exc:
            raise _rpc_error(exc if isinstance(exc, ReplicationError) else ProposalTimeout(str(exc))) from None
        return {"leader": leader}

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
