"""Admin reads of the PBX: registrations, active calls and call records, as JSON-RPC methods.

Theory of operation: `attach(config, machine, server, service)` opens the node's call-record store
(`DATA_DIR/cdr.sqlite3`, see `cdr.py`), hooks its projector on the `StateMachine` (before the replicator
starts, so that the dump's restore and the journal replay are projected too), and registers the methods on
the node's `RpcServer`; the store is closed (queued rows written) when the `AdminService` closes.

Methods (all reads, served by any node from its own copy; none proposes anything):
* `binding.list {"extension"?, "limit"?, "offset"?}`: live bindings at `now` (the registrar's view: expired
  ones are hidden even before the leader's `BindingsExpired` lands), by extension then contact order
  (q descending, RFC 3261 §10.3 step 8 / §16.6);
* `call.active {}`: the active calls in start order, with their progress ("trying", "ringing", "answered");
* `cdr.list {"since"?, "until"?, "extension"?, "disposition"?, "trunk"?, "limit"?, "offset"?, "cursor"?}`:
  call records ordered by (started_at, call_id), `since <= started_at < until` in epoch seconds, `trunk` the
  trunk the call crossed ("" for calls that crossed none); each record carries `trunk` and `direction`;
* `cdr.get {"call_id"}`: one record.
`cdr.*` first waits (bounded) for the writer to commit what the node has applied, so a record is visible
as soon as its event is applied on that node. Blocking SQLite work runs in a worker thread, never on the
event loop. Bad params get invalid params naming the field; reads of the state take the state lock briefly.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

from .cdr import DB_NAME, MAX_LIMIT, CdrProjector, CdrStore
from .config import NodeConfig
from .logs import get_logger
from .rpc import NOT_FOUND, Params, RpcError, RpcServer, invalid_params
from .service import AdminService, StateMachine, extension_param
from .state import DISPOSITIONS, Binding, Call, current_bindings

__all__ = ["MAX_BINDINGS_PAGE", "PbxAdmin", "attach"]

log = get_logger("raftpbx.pbx_admin")

MAX_BINDINGS_PAGE = 10_000
FLUSH_WAIT = 2.0


def _number(params: Params, name: str) -> float | None:
    value = params.raw.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise invalid_params(name, "expected a number of epoch seconds")
    return float(value)


def _binding_view(binding: Binding, now: float) -> dict[str, Any]:
    return {
        "extension": binding.aor,
        "contact": binding.contact,
        "expires_in": max(0, math.ceil(binding.expires_at - now)),
        "expires_at": binding.expires_at,
        "q": binding.q,
        "received": binding.received,
        "transport": binding.transport,
        "path": list(binding.path),
        "instance_id": binding.instance_id,
        "reg_id": binding.reg_id,
        "node_id": binding.node_id,
        "registered_at": binding.registered_at,
        "updated_at": binding.updated_at,
        "call_id": binding.call_id,
        "cseq": binding.cseq,
    }


def _call_view(call: Call, now: float) -> dict[str, Any]:
    view: dict[str, Any] = call.to_dict()
    view["progress"] = "answered" if call.answered_at is not None else (
        "ringing" if call.ringing_at is not None else "trying")
    view["age"] = max(0.0, round(now - call.started_at, 3))
    return view


class PbxAdmin:
    """The `binding.list`, `call.active`, `cdr.list` and `cdr.get` methods of one node."""

    def __init__(self, machine: StateMachine, store: CdrStore, *, clock: Callable[[], float] = time.time) -> None:
        self.machine = machine
        self.store = store
        self.clock = clock

    def register(self, server: RpcServer) -> None:
        for name, handler in (
            ("binding.list", self.binding_list),
            ("call.active", self.call_active),
            ("cdr.list", self.cdr_list),
            ("cdr.get", self.cdr_get),
        ):
            server.register(name, handler)

    async def binding_list(self, params: Params) -> dict[str, Any]:
        params.check_allowed("extension", "limit", "offset")
        extension = extension_param(params, required=False)
        limit = params.integer("limit", default=MAX_BINDINGS_PAGE, minimum=1, maximum=MAX_BINDINGS_PAGE)
        offset = params.integer("offset", default=0)
        now = self.clock()
        with self.machine.lock:
            state = self.machine.state
            aors = [extension] if extension is not None else sorted(state.bindings)
            live = [b for aor in aors for b in current_bindings(state, aor, now)]
            applied_index = state.applied_index
        page = live[offset:offset + limit]
        return {
            "bindings": [_binding_view(b, now) for b in page],
            "total": len(live),
            "next_offset": offset + limit if offset + limit < len(live) else None,
            "now": now,
            "applied_index": applied_index,
        }

    async def call_active(self, params: Params) -> dict[str, Any]:
        params.check_allowed()
        now = self.clock()
        with self.machine.lock:
            calls = list(self.machine.state.calls.values())
            applied_index = self.machine.state.applied_index
        return {"calls": [_call_view(c, now) for c in calls], "count": len(calls), "applied_index": applied_index}

    async def _settle(self) -> int:
        """Wait (bounded) until the writer committed what was queued; returns the projected index."""
        if not await asyncio.to_thread(self.store.flush, FLUSH_WAIT):
            log.warning("cdr.flush_slow", wait=FLUSH_WAIT, queued=self.store.queue_depth)
        return await asyncio.to_thread(self.store.last_index)

    async def cdr_list(self, params: Params) -> dict[str, Any]:
        params.check_allowed("since", "until", "extension", "disposition", "limit", "offset", "cursor", "trunk")
        since = _number(params, "since")
        until = _number(params, "until")
        if since is not None and until is not None and until < since:
            raise invalid_params("until", "must not be before since")
        extension = extension_param(params, required=False)
        disposition = params.text("disposition", required=False, max_len=32)
        if disposition is not None and disposition not in DISPOSITIONS:
            raise invalid_params("disposition", f"expected one of {', '.join(DISPOSITIONS)}")
        trunk = params.text("trunk", required=False, max_len=64)
        limit = params.integer("limit", default=100, minimum=1, maximum=MAX_LIMIT)
        offset = params.integer("offset", default=0)
        cursor = params.text("cursor", required=False, max_len=4096)
        if cursor is not None and "offset" in params.raw:
            raise invalid_params("cursor", "give either offset or cursor")
        projected = await self._settle()
        try:
            page = await asyncio.to_thread(
                self.store.list, since=since, until=until, extension=extension, disposition=disposition,
                limit=limit, offset=offset, cursor=cursor, trunk=trunk)
        except ValueError as exc:  # only the cursor can still be wrong here; the message names it
            field, _, message = str(exc).partition(": ")
            raise invalid_params(field, message) from None
        return {"records": page.records, "total": page.total, "next_offset": page.next_offset,
                "next_cursor": page.next_cursor, "projected_index": projected}

    async def cdr_get(self, params: Params) -> dict[str, Any]:
        params.check_allowed("call_id")
        call_id = params.text("call_id", max_len=2048)
        if call_id == "":
            raise invalid_params("call_id", "must not be empty")
        await self._settle()
        record = await asyncio.to_thread(self.store.get, call_id)
        if record is None:
            raise RpcError(NOT_FOUND, "not found: no call record with this call_id",
                           {"field": "call_id", "message": "no such call record"})
        return record


def attach(config: NodeConfig, machine: StateMachine, server: RpcServer, service: AdminService, *,
           clock: Callable[[], float] = time.time) -> PbxAdmin:
    """Open the node's call-record store, project the state into it and serve the PBX admin reads."""
    store = CdrStore(config.data_dir / DB_NAME)
    CdrProjector(store).attach(machine)
    admin = PbxAdmin(machine, store, clock=clock)
    admin.register(server)

    async def close() -> None:
        await asyncio.to_thread(store.close)

    service.add_closer(close)
    service.add_metrics(lambda: store.metrics(config.node_id))
    return admin
