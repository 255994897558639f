"""The glue between the admin RPC, the pure state and the replicator.

Theory of operation:
- `StateMachine` owns the node's `State` and gives the replicator its three callbacks: `apply` (runs on the
  Raft thread, under `replicator.lock`, one committed entry at a time), `snapshot` and `restore`. The event
  loop reads the state only under the same lock (`read`), so it never sees a half-applied entry.
- Read models (the SQLite call records) follow the state through listeners: `add_apply_listener(cb)` calls
  `cb(index, applied)` on the Raft thread, under the lock, right after each entry that applied at least one
  command, where `applied` is an `AppliedCommands` sequence of `(Command, Applied)` pairs. The entry is
  decoded again only if a listener reads the commands (`applied.outcomes` costs nothing), so a listener
  that filters on outcomes adds no decode to entries it ignores. `add_restore_listener(cb)` calls `cb(state)`
  after a restore (dump at startup, snapshot installed from the leader): the entries folded into the dump
  are never replayed, so a read model reconciles from the restored state there. Listeners must be quick
  (enqueue, never do I/O) and never raise; an exception is logged and counted, and apply carries on.
- `AdminService` implements the RPC methods. A write is: validate the params, run the `decide_*` function
  on the local state (bad input -> invalid params naming the field, nothing proposed), wrap the events in
  `Command`s carrying the op_id, `encode_batch`, `await replicator.propose(...)` (followers forward to the
  leader), and turn the apply `Outcome`s into a result or an error naming the field.
- op_ids: a write's op_id is the client's (`op_id` param) or a fresh uuid4 hex. A decision that yields
  several events gives the first command the op_id itself and the next ones `op_id.1`, `op_id.2`...; they
  travel in one log entry, so they are applied or deduplicated together. If the op_id is already in the local
  dedupe window the first outcome is reported without proposing (a retry of a write that did apply must not
  be refused by today's validation, e.g. "already exists"); otherwise `apply` dedupes on every node.

Invariants: reads never return HA1s or passwords; passwords live only in the request being decided; every
replication failure maps to one JSON-RPC error code (not leader, no quorum, timeout = outcome unknown).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, overload

import aiohttp
import orjson

from .config import HostPort, NodeConfig, PeerConfig
from .logs import get_logger
from .replication import NoQuorum, NotLeader, ProposalTimeout, ReplicationError, apply_leader_commits
from .rpc import (
    NO_QUORUM,
    NOT_FOUND,
    NOT_LEADER,
    PROPOSAL_TIMEOUT,
    REJECTED,
    REPLICATION_ERROR,
    Params,
    RpcError,
    RpcServer,
    invalid_params,
)
from .state import (
    Applied,
    Command,
    Duplicate,
    Event,
    Outcome,
    Rejected,
    State,
    ValidationError,
    apply_entry,
    decide_create_extension,
    decide_delete_extension,
    decide_update_extension,
    decode_batch,
    digest_hex,
    encode_batch,
    restore,
    snapshot,
)

__all__ = ["AdminService", "AppliedCommands", "ApplyListener", "RestoreListener", "StateMachine",
           "extension_param"]

log = get_logger("raftpbx.service")

_OP_ID = re.compile(r"^[A-Za-z0-9_:-]{1,100}$")
PEER_INFO_TIMEOUT = 0.5


class AppliedCommands(Sequence[tuple[Command, Applied]]):
    """The `(command, outcome)` pairs of one entry whose outcome is `Applied`, in log order.

    `outcomes` (the Applied outcomes) is free; indexing or iterating decodes the entry once (cached).
    """

    __slots__ = ("_entry", "_pairs", "_positions", "outcomes")

    def __init__(self, entry: bytes, outcomes: list[Outcome]) -> None:
        self._entry = entry if type(entry) is bytes else bytes(entry)
        self._positions: list[int] = []
        self.outcomes: list[Applied] = []
        for position, outcome in enumerate(outcomes):
            if isinstance(outcome, Applied):
                self._positions.append(position)
                self.outcomes.append(outcome)
        self._pairs: list[tuple[Command, Applied]] | None = None

    def _decoded(self) -> list[tuple[Command, Applied]]:
        if self._pairs is None:
            commands = decode_batch(self._entry)  # it applied, so it decodes
            self._pairs = [(commands[i], o) for i, o in zip(self._positions, self.outcomes, strict=True)]
        return self._pairs

    def __len__(self) -> int:
        return len(self.outcomes)

    @overload
    def __getitem__(self, item: int) -> tuple[Command, Applied]: ...

    @overload
    def __getitem__(self, item: slice) -> list[tuple[Command, Applied]]: ...

    def __getitem__(self, item: int | slice) -> tuple[Command, Applied] | list[tuple[Command, Applied]]:
        return self._decoded()[item]

    def __iter__(self) -> Iterator[tuple[Command, Applied]]:
        return iter(self._decoded())


ApplyListener = Callable[[int, AppliedCommands], None]
RestoreListener = Callable[[State], None]


class StateMachine:
    """The node's replicated state and the callbacks the replicator drives."""

    def __init__(self) -> None:
        self.state = State()
        self.lock: threading.RLock = threading.RLock()
        self._apply_listeners: list[ApplyListener] = []
        self._restore_listeners: list[RestoreListener] = []
        self.listener_errors = 0

    def add_apply_listener(self, listener: ApplyListener) -> None:
        """Call `listener(index, applied)` after each entry that applied a command (see module doc)."""
        self._apply_listeners.append(listener)

    def add_restore_listener(self, listener: RestoreListener) -> None:
        """Call `listener(state)` after each restore, under the lock (see module doc)."""
        self._restore_listeners.append(listener)

    def apply(self, entry: bytes, index: int) -> list[Outcome]:
        with self.lock:
            outcomes: list[Outcome] = apply_entry(self.state, entry, index)
            if self._apply_listeners and outcomes:
                applied = AppliedCommands(entry, outcomes)
                if applied.outcomes:
                    for listener in self._apply_listeners:
                        try:
                            listener(index, applied)
                        except Exception:
                            self.listener_errors += 1
                            log.exception("state.apply_listener_failed", index=index)
        return outcomes

    def snapshot(self) -> bytes:
        with self.lock:
            data: bytes = snapshot(self.state)
        return data

    def restore(self, data: bytes) -> None:
        restored = restore(data)
        with self.lock:
            self.state = restored
            for listener in self._restore_listeners:
                try:
                    listener(restored)
                except Exception:
                    self.listener_errors += 1
                    log.exception("state.restore_listener_failed", applied_index=restored.applied_index)


def extension_param(params: Params, name: str = "extension", *, required: bool = True) -> str | None:
    """The extension number in param `name` (2 to 15 digits); invalid params naming the field otherwise."""
    extension = params.text(name, required=required, max_len=32)
    if extension is None:
        return None
    if not re.fullmatch(r"[0-9]{2,15}", extension):
        raise invalid_params(name, "malformed number: use 2 to 15 digits")
    return str(extension)


def _host_port(addr: str) -> HostPort:
    host, _, port = addr.rpartition(":")
    return HostPort(host, int(port))


class AdminService:
    """The admin RPC methods of one node."""

    def __init__(self, config: NodeConfig, machine: StateMachine, replicator: Any,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.machine = machine
        self.replicator = replicator
        self.clock = clock
        self.proposals_ok = 0
        self.proposals_failed = 0
        self._session: aiohttp.ClientSession | None = None
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._metric_sources: list[Callable[[], list[str]]] = []
        # raftpbx.service_address.ServiceAddress once the node built it (node.py); None in tests and
        # before SIP starts. Read for node.info, cluster.status and metrics.
        self.service_address: Any = None

    def add_closer(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Await `closer()` in `close()` (companion services that share the admin server's lifetime)."""
        self._closers.append(closer)

    def add_metrics(self, source: Callable[[], list[str]]) -> None:
        """Append `source()`'s lines (Prometheus text, HELP/TYPE included) to `metrics()`."""
        self._metric_sources.append(source)

    def register(self, server: RpcServer) -> None:
        for name, handler in (
            ("node.info", self.node_info),
            ("cluster.status", self.cluster_status),
            ("state.digest", self.state_digest),
            ("extension.create", self.extension_create),
            ("extension.get", self.extension_get),
            ("extension.list", self.extension_list),
            ("extension.update", self.extension_update),
            ("extension.delete", self.extension_delete),
        ):
            server.register(name, handler, audit=name in ("extension.create", "extension.update", "extension.delete"))

    async def close(self) -> None:
        closers, self._closers = self._closers, []
        for closer in reversed(closers):
            try:
                await closer()
            except Exception:
                log.exception("admin.close_failed")
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- reads ---------------------------------------------------------------------------------------

    def _status(self) -> dict[str, Any]:
        st = self.replicator.status()
        return {
            "role": str(st.role),
            "leader": st.leader,
            "term": int(st.term),
            "commit_index": int(st.commit_index),
            "caught_up": bool(st.caught_up),  # read barrier: reads here include every acknowledged write
        }

    def info(self) -> dict[str, Any]:
        """This node's own view (also served as `node.info`)."""
        with self.machine.lock:
            applied_index = self.machine.state.applied_index
            digest = digest_hex(self.machine.state)
            extensions = len(self.machine.state.extensions)
        cfg = self.config
        return {
            "id": cfg.node_id,
            **self._status(),
            "applied_index": applied_index,
            "digest": digest,
            "extensions": extensions,
            "raft": str(cfg.raft_address),
            "sip": str(cfg.sip_listen),
            "admin_url": cfg.admin_url,
            "service_address": None if cfg.service_address is None else str(cfg.service_address),
            "service": self._service_status(),
            "proposals_ok": self.proposals_ok,
            "proposals_failed": self.proposals_failed,
        }

    def _service_status(self) -> dict[str, Any]:
        """The service address as this node sees it: mode, address, held, since, last_error."""
        if self.service_address is not None:
            status: dict[str, Any] = self.service_address.status()
            return status
        cfg = self.config
        return {"mode": cfg.service.mode, "address": None if cfg.service.address is None else str(cfg.service.address),
                "held": False, "since": None, "last_error": None}

    async def node_info(self, params: Params) -> dict[str, Any]:
        params.check_allowed()
        return self.info()

    async def state_digest(self, params: Params) -> dict[str, Any]:
        params.check_allowed()
        with self.machine.lock:
            return {"digest": digest_hex(self.machine.state), "applied_index": self.machine.state.applied_index}

    async def _peer_info(self, peer_id: str, url: str) -> dict[str, Any] | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(json_serialize=lambda o: orjson.dumps(o).decode())
        body = {"jsonrpc": "2.0", "id": 1, "method": "node.info", "params": {}}
        try:
            async with self._session.post(
                url + "/rpc", json=body, headers={"Authorization": f"Bearer {self.config.admin_token}"},
                timeout=aiohttp.ClientTimeout(total=PEER_INFO_TIMEOUT),
            ) as response:
                reply = orjson.loads(await response.read())
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, OSError) as exc:
            log.debug("peer.unreachable", peer=peer_id, error=type(exc).__name__)
            return None
        result = reply.get("result") if isinstance(reply, dict) else None
        return result if isinstance(result, dict) else None

    def _peers(self) -> list[PeerConfig]:
        """The other members as the log says (membership changes), admin URLs from the log or node.toml."""
        members = getattr(self.replicator, "members", None)
        if members is None:
            return list(self.config.peers)
        configured = {p.id: p for p in self.config.peers}
        out = []
        for m in members():
            if m.node_id == self.config.node_id:
                continue
            known = configured.get(m.node_id)
            url = m.admin_url or (known.admin_url if known is not None else None)
            if url is not None:
                out.append(PeerConfig(m.node_id, known.raft if known is not None else _host_port(m.raft), url))
        return out

    async def cluster_status(self, params: Params) -> dict[str, Any]:
        params.check_allowed()
        own = self.info()
        peers = self._peers()
        infos = await asyncio.gather(*(self._peer_info(p.id, p.admin_url) for p in peers))
        nodes = [{"id": own["id"], "role": own["role"], "healthy": True, "applied_index": own["applied_index"],
                  "term": own["term"], "leader": own["leader"], "admin_url": own["admin_url"],
                  "service_held": bool(own["service"].get("held"))}]
        for peer, peer_info in zip(peers, infos, strict=True):
            if peer_info is None:
                nodes.append({"id": peer.id, "role": "unknown", "healthy": False, "applied_index": None,
                              "term": None, "leader": None, "admin_url": peer.admin_url, "service_held": None})
            else:
                peer_service = peer_info.get("service")
                held = bool(peer_service.get("held")) if isinstance(peer_service, dict) else None
                nodes.append({"id": peer.id, "role": peer_info.get("role"), "healthy": True,
                              "applied_index": peer_info.get("applied_index"), "term": peer_info.get("term"),
                              "leader": peer_info.get("leader"), "admin_url": peer.admin_url,
                              "service_held": held})
        leader = own["leader"]
        if leader is None:
            leaders = [n["id"] for n in nodes if n["healthy"] and n["role"] == "leader"]
            leader = leaders[0] if len(leaders) == 1 else None
        # Who serves the service address, as each reachable node says (more than one: a transition, or the
        # ip-mode overlap bounded by the leader fallback timeout; see docs/service-address.md).
        holders = [n["id"] for n in nodes if n["service_held"]]
        service = {"address": own["service"].get("address"), "mode": own["service"].get("mode"),
                   "holder": holders[0] if len(holders) == 1 else None, "holders": holders}
        return {"leader": leader, "term": own["term"], "commit_index": own["commit_index"], "nodes": nodes,
                "service_address": service}

    def _extension_param(self, params: Params) -> str:
        extension = extension_param(params)
        assert extension is not None  # required
        return extension

    async def extension_get(self, params: Params) -> dict[str, Any]:
        params.check_allowed("extension")
        extension = self._extension_param(params)
        with self.machine.lock:
            record = self.machine.state.extensions.get(extension)
        if record is None:
            raise RpcError(NOT_FOUND, f"not found: extension {extension} does not exist",
                           {"field": "extension", "message": "no such extension"})
        view: dict[str, Any] = record.to_dict()
        return view

    async def extension_list(self, params: Params) -> dict[str, Any]:
        params.check_allowed()
        with self.machine.lock:
            records = [r.to_dict() for _, r in sorted(self.machine.state.extensions.items())]
            applied_index = self.machine.state.applied_index
        return {"extensions": records, "applied_index": applied_index}

    # --- writes --------------------------------------------------------------------------------------

    def _op_id(self, params: Params) -> str:
        op_id = params.text("op_id", required=False, max_len=100)
        if op_id is None:
            return uuid.uuid4().hex
        if not _OP_ID.match(op_id):
            raise invalid_params("op_id", "expected 1 to 100 characters among letters, digits, '_', ':', '-'")
        return str(op_id)

    async def _write(self, op_id: str, decide: Callable[[State, float], list[Event]]) -> dict[str, Any]:
        # Decisions read the local state, so it must hold every acknowledged write: after a restart, wait for
        # the read barrier; a refusal is decided again once this node has applied everything committed
        # before it (`apply_leader_commits`: a no-op entry through the log, shared with concurrent callers),
        # else a retried op_id whose first attempt committed elsewhere was refused with "no such extension"
        # (the chaos suite saw it).
        if not await self._read_barrier():
            raise RpcError(REPLICATION_ERROR, "this node is catching up after a restart: nothing was written; "
                           "retry", {"op_id": op_id, "outcome_unknown": False})
        for attempt in range(2):
            refusal: ValidationError | None = None
            with self.machine.lock:
                first = self.machine.state.dedupe.get(op_id)
                if first is None:
                    try:
                        events = decide(self.machine.state, self.clock())
                    except ValidationError as exc:
                        refusal = exc
            if first is not None:
                return self._report(op_id, [Duplicate(first)])
            if refusal is None:
                break
            if attempt == 1 or not await apply_leader_commits(self.replicator, self.config.proposal_timeout):
                raise invalid_params(refusal.field, refusal.message) from None
        commands = [Command(op_id if i == 0 else f"{op_id}.{i}", event) for i, event in enumerate(events)]
        payload = encode_batch(commands)
        try:
            result = await self.replicator.propose(payload, timeout=self.config.proposal_timeout)
        except NotLeader as exc:
            self.proposals_failed += 1
            raise RpcError(NOT_LEADER, "not leader: no leader is known to forward the write to; retry",
                           {"leader": getattr(exc, "leader", None), "op_id": op_id}) from None
        except NoQuorum as exc:
            self.proposals_failed += 1
            if getattr(exc, "submitted", False):  # the entry reached a leader's log: it may still commit
                raise RpcError(NO_QUORUM, "no quorum: a majority of the cluster is unreachable; the outcome is "
                               "unknown, retry with the same op_id", {"op_id": op_id, "outcome_unknown": True}) from None
            raise RpcError(NO_QUORUM, "no quorum: a majority of the cluster is unreachable; nothing was written",
                           {"op_id": op_id, "outcome_unknown": False}) from None
        except ProposalTimeout:
            self.proposals_failed += 1
            raise RpcError(PROPOSAL_TIMEOUT, "timeout: the outcome is unknown; retry with the same op_id",
                           {"op_id": op_id}) from None
        except ReplicationError as exc:
            self.proposals_failed += 1
            raise RpcError(REPLICATION_ERROR, f"replication error: {exc}", {"op_id": op_id}) from None
        self.proposals_ok += 1
        outcomes = list(result) if isinstance(result, list) else []
        report = self._report(op_id, outcomes)
        log.info("admin.write", op_id=op_id, events=[type(e).__name__ for e in events], status=report["status"],
                 applied_index=report["applied_index"], **report["result"])
        return report

    async def _read_barrier(self) -> bool:
        """True once replication says reads are complete (`caught_up`); waits up to the proposal timeout."""
        if getattr(self.replicator.status(), "caught_up", True):
            return True
        wait = getattr(self.replicator, "wait_caught_up", None)
        return bool(wait is not None and await wait(self.config.proposal_timeout))

    def _report(self, op_id: str, outcomes: list[Outcome]) -> dict[str, Any]:
        if not outcomes:
            raise RpcError(REPLICATION_ERROR, "replication error: the entry produced no outcome", {"op_id": op_id})
        duplicate = isinstance(outcomes[0], Duplicate)
        for outcome in outcomes:
            base = outcome.first if isinstance(outcome, Duplicate) else outcome
            if isinstance(base, Rejected):
                raise RpcError(REJECTED, f"rejected: {base.field}: {base.message}",
                               {"field": base.field, "message": base.message, "op_id": op_id,
                                "duplicate": duplicate})
        first = outcomes[0].first if isinstance(outcomes[0], Duplicate) else outcomes[0]
        result: dict[str, Any] = dict(first.result) if isinstance(first, Applied) else {}
        with self.machine.lock:
            applied_index = self.machine.state.applied_index
        return {"status": "duplicate" if duplicate else "applied", "op_id": op_id, "result": result,
                "applied_index": applied_index}

    async def extension_create(self, params: Params) -> dict[str, Any]:
        params.check_allowed("extension", "password", "display_name", "op_id")
        extension = self._extension_param(params)
        password = params.text("password", required=False, max_len=1024)
        if password is None or password == "":
            raise invalid_params("password", "required")
        display_name = params.text("display_name", required=False, max_len=1024)
        op_id = self._op_id(params)
        realm = self.config.domain
        return await self._write(op_id, lambda state, now: decide_create_extension(
            state, extension, password, display_name, realm, now))

    async def extension_update(self, params: Params) -> dict[str, Any]:
        params.check_allowed("extension", "password", "display_name", "op_id")
        extension = self._extension_param(params)
        password = params.text("password", required=False, max_len=1024)
        display_name = params.text("display_name", required=False, max_len=1024)
        if password is None and display_name is None:
            raise invalid_params("display_name", "nothing to change: give display_name or password")
        op_id = self._op_id(params)
        realm = self.config.domain
        return await self._write(op_id, lambda state, now: decide_update_extension(
            state, extension, display_name=display_name, password=password, realm=realm, now=now))

    async def extension_delete(self, params: Params) -> dict[str, Any]:
        params.check_allowed("extension", "op_id")
        extension = self._extension_param(params)
        op_id = self._op_id(params)
        return await self._write(op_id, lambda state, now: decide_delete_extension(state, extension, now))

    # --- metrics -------------------------------------------------------------------------------------

    def _service_metrics(self, node: str) -> list[tuple[str, str, str, list[tuple[str, Any]]]]:
        status = self._service_status()
        if status.get("mode") in (None, "none"):
            return []
        labels = f'{{node="{node}",address="{status.get("address")}",mode="{status.get("mode")}"}}'
        return [
            ("raftpbx_service_address_held", "gauge", "1 while this node serves the cluster's service address",
             [(labels, 1 if status.get("held") else 0)]),
            ("raftpbx_service_address_acquisitions_total", "counter", "times this node acquired the service address",
             [(labels, int(status.get("acquisitions", 0)))]),
            ("raftpbx_service_address_failures_total", "counter",
             "failed attempts to acquire or release the service address (bind in use, hook errors)",
             [(labels, int(status.get("failures", 0)))]),
        ]

    def metrics(self) -> str:
        """Prometheus text exposition format 0.0.4."""
        try:
            st = self._status()
        except Exception:
            st = {"role": "unknown", "term": 0, "commit_index": 0}
        with self.machine.lock:
            applied_index = self.machine.state.applied_index
            extensions = len(self.machine.state.extensions)
        node = self.config.node_id
        lines = []
        for name, kind, help_text, samples in (
            ("raftpbx_raft_role", "gauge", "1 for the node's current Raft role",
             [(f'{{node="{node}",role="{role}"}}', 1 if st["role"] == role else 0)
              for role in ("leader", "follower", "candidate")]),
            ("raftpbx_raft_term", "gauge", "current Raft term", [(f'{{node="{node}"}}', st["term"])]),
            ("raftpbx_raft_commit_index", "gauge", "Raft commit index", [(f'{{node="{node}"}}', st["commit_index"])]),
            ("raftpbx_state_applied_index", "gauge", "last log index applied to the state",
             [(f'{{node="{node}"}}', applied_index)]),
            ("raftpbx_extensions", "gauge", "extensions in the state", [(f'{{node="{node}"}}', extensions)]),
            ("raftpbx_proposals_total", "counter", "admin proposals by result",
             [(f'{{node="{node}",result="ok"}}', self.proposals_ok),
              (f'{{node="{node}",result="failed"}}', self.proposals_failed)]),
            *self._service_metrics(node),
        ):
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {value}" for labels, value in samples)
        for source in self._metric_sources:
            try:
                lines.extend(source())
            except Exception:
                log.exception("admin.metrics_source_failed")
        return "\n".join(lines) + "\n"
