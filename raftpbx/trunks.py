"""Trunks on a node: the `trunk.*` / `route.*` admin RPCs, the OPTIONS health pinger, and peer choice.

Theory of operation
-------------------
The trunks and the dial plan are replicated configuration (`state/trunks.py`): the RPC methods here are
thin, like `service.py`'s extension methods: check the params (an error names the field and changes
nothing), decide under the state lock, propose one entry and answer once it is committed (DESIGN
decision 3) with the outcome; `op_id` makes a retried write apply at most once.

* `trunk.add {"name", "peers": [..], "transport"?, "username"?, "realm"?, "password"?, "allow"?: [..],
  "register_expires"?, "op_id"?}`; `trunk.update {"name", any of those, "clear_credentials"?}`;
  `trunk.delete {"name", "op_id"?}` (refused while routes use the trunk); `trunk.get {"name"}`;
  `trunk.list {}`. Reads show the trunk without its HA1s, plus `health`: this node's view of each peer
  address (below). The password is hashed by the decision and never stored, logged or echoed.
* `route.add {"name", "pattern", "trunk", "strip"?, "prepend"?, "order"?, "op_id"?}`; `route.update
  {"name", any of those}`; `route.delete {"name"}`; `route.list {}` (in the order they are tried);
  `route.test {"number"}` answers what a call to `number` would do: `{"target": "extension"}` when it is
  a local extension (extensions win), `{"target": "trunk", "route", "trunk", "number", "peers"}` (the
  peer addresses in the order a call would try them now), or `{"target": "none"}` (the proxy answers 404).

Health (per node, not replicated: each node pings from where it stands). `TrunkPinger` sends an
OPTIONS (RFC 3261 §11) to every distinct peer address of every trunk each `interval` seconds from its own
UDP/TCP socket on the node's SIP host, through a client transaction (so UDP losses are retransmitted,
§17.1.2). A peer is "unknown" until its first answer or timeout, "up" after any final response except
503 (any answer proves a live SIP stack, RFC 3261 §11: even 404/405/401), "down" after a ping that got
no final response within `timeout`, a transport error, or a 503 (RFC 3261 §21.5.4: overloaded or in
maintenance). One good answer brings it back up. The proxy may also `report(peer, ok=False)` when a
call attempt timed out or got 503, which marks the peer down at once (until the next ping answers).

Peer choice (`choose_peer`, pure): the trunk's peers in configured (preference) order, down ones left
out; if every peer is down, all of them in configured order (a stale health view must not turn into a
hard outage). The proxy tries them in that order and moves to the next on a timeout (Timer B), a
transport error or a 503, RFC 3263 §4.3 style; see docs/trunks.md.

Metrics (`metrics_lines`): `raftpbx_trunk_peer_up{node,trunk,peer}` (1 up or unknown, 0 down),
`raftpbx_trunk_peer_rtt_seconds{node,trunk,peer}` (last answered ping) and
`raftpbx_trunk_pings_total{node,trunk,peer,result}` (ok / failed).

Registration to the peer (`raftpbx/trunk_register.py`, `TrunkRegistrar`): the leader REGISTERs every trunk
with `register_expires > 0` at its first usable peer (this pinger's `choose_peer` order), Contact = the
service address; `trunk.get`/`trunk.list` show it as `registration` (None for a trunk that does not
register; "standby" on followers) and /metrics as `raftpbx_trunk_registered{node,trunk}`,
`raftpbx_trunk_registration_expires_seconds{node,trunk}` and `raftpbx_trunk_registrations_total{node,trunk,
result}`.

Invariants: nothing raises into the event loop (the ping loop catches and logs every error; a ping
never lasts longer than `timeout`); the pinger only ever sends to configured peer addresses; `aclose`
cancels the loop and closes the socket.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .logs import get_logger
from .peer_client import PeerClient
from .rpc import NOT_FOUND, Params, RpcError, RpcServer, invalid_params
from .state import (
    Event,
    State,
    Trunk,
    decide_create_route,
    decide_create_trunk,
    decide_delete_route,
    decide_delete_trunk,
    decide_update_route,
    decide_update_trunk,
    ordered_routes,
    peer_addresses,
    route_for,
)
from .state.trunks import PeerAddress
from .transport.sip.message import Request
from .trunk_register import TrunkRegistrar

__all__ = [
    "DEFAULT_PING_INTERVAL",
    "PeerHealth",
    "TrunkAdmin",
    "TrunkPinger",
    "TrunkService",
    "attach",
    "choose_peer",
]

log = get_logger("raftpbx.trunks")

DEFAULT_PING_INTERVAL = 5.0
MIN_PING_INTERVAL = 0.05
MAX_LIST_LEN = 64

Write = Callable[[str, Callable[[State, float], list[Event]]], Awaitable[dict[str, Any]]]


# --- health and peer choice -------------------------------------------------------------------------------


@dataclass(slots=True)
class PeerHealth:
    """One node's view of one peer address (monotonic times for `since`/`last_ping_at`; `rtt` seconds)."""

    state: str = "unknown"  # "unknown" | "up" | "down"
    since: float | None = None
    last_ping_at: float | None = None
    rtt: float | None = None
    last_status: int | None = None
    last_error: str | None = None
    ok: int = 0
    failed: int = 0

    @property
    def usable(self) -> bool:
        """False only while the peer is known to be down."""
        return self.state != "down"

    def to_dict(self, now: float) -> dict[str, Any]:
        return {
            "state": self.state,
            "for": None if self.since is None else round(max(0.0, now - self.since), 3),
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
            "last_status": self.last_status,
            "last_error": self.last_error,
            "pings_ok": self.ok,
            "pings_failed": self.failed,
        }


def peer_key(peer: PeerAddress) -> str:
    """The key of a peer address in the health map ("host:port;transport=t")."""
    return str(peer)


def choose_peer(trunk: Trunk, health: Mapping[str, PeerHealth]) -> list[PeerAddress]:
    """The peer addresses a call over `trunk` tries, in order (see the module doc)."""
    peers = peer_addresses(trunk)
    usable = [peer for peer in peers if (h := health.get(peer_key(peer))) is None or h.usable]
    return usable or peers


# --- the pinger -------------------------------------------------------------------------------------------


class TrunkPinger:
    """Pings every configured peer address with OPTIONS every `interval` seconds (see the module doc)."""

    def __init__(self, machine: Any, *, interval: float = DEFAULT_PING_INTERVAL, timeout: float | None = None,
                 bind_host: str = "127.0.0.1", node_id: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        if not (math.isfinite(interval) and interval >= MIN_PING_INTERVAL):
            raise ValueError(f"trunk ping interval must be at least {MIN_PING_INTERVAL} s")
        self.machine = machine
        self.interval = float(interval)
        # A ping waits at most `timeout`; the transaction retransmits inside it (T1 = timeout / 8).
        self.timeout = float(timeout) if timeout is not None else min(2.0, max(0.2, self.interval))
        self.bind_host = bind_host
        self.node_id = node_id
        self.clock = clock
        self.health: dict[str, PeerHealth] = {}
        self.rounds = 0
        self._client = PeerClient(bind_host=bind_host, timeout=self.timeout, name="trunk.ping", to_tag="trunk-pinger")
        self._task: asyncio.Task[None] | None = None
        self._round_done = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind the pinger's socket (an ephemeral port on the node's SIP host) and start the ping loop."""
        await self._client.start()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._client.aclose()

    @property
    def address(self) -> tuple[str, int] | None:
        """Where the pings come from (UDP)."""
        return self._client.address

    # -- the loop ------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.ping_all()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the loop die: log, try again next round
                log.exception("trunk.ping_round_failed")
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - started)))

    async def wait_round(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until the next ping round completes (tests, `trunk.list` after a change); False on timeout."""
        event = self._round_done
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            return False
        return True

    def configured_peers(self) -> dict[str, PeerAddress]:
        """Every distinct peer address of every trunk, by key."""
        with self.machine.lock:
            trunks = list(self.machine.state.trunks.values())
        peers: dict[str, PeerAddress] = {}
        for trunk in trunks:
            for peer in peer_addresses(trunk):
                peers.setdefault(peer_key(peer), peer)
        return peers

    async def ping_all(self) -> None:
        """One round: ping every configured peer address at once, update the health map."""
        peers = self.configured_peers()
        for key in [key for key in self.health if key not in peers]:
            del self.health[key]  # removed from every trunk
        if peers:
            await asyncio.gather(*(self._ping(key, peer) for key, peer in peers.items()))
        self.rounds += 1
        event, self._round_done = self._round_done, asyncio.Event()
        event.set()

    def _options(self, peer: PeerAddress, branch: str) -> Request:
        local = self._client.local
        via_transport = "TCP" if peer.transport == "tcp" else "UDP"
        uri = f"sip:{peer.host}:{peer.port}" + (";transport=tcp" if peer.transport == "tcp" else "")
        tag = secrets.token_hex(6)
        return Request("OPTIONS", uri, [
            ("Via", f"SIP/2.0/{via_transport} {local[0]}:{local[1]};branch={branch};rport"),
            ("Max-Forwards", "70"),
            ("From", f"<sip:raftpbx@{local[0]}:{local[1]}>;tag={tag}"),
            ("To", f"<{uri}>"),
            ("Call-ID", f"{secrets.token_hex(12)}@{local[0]}"),
            ("CSeq", "1 OPTIONS"),
            ("Accept", "application/sdp"),
            ("User-Agent", "raftpbx trunk health"),
            ("Content-Length", "0"),
        ])

    async def _ping(self, key: str, peer: PeerAddress) -> None:
        if not self._client.running:
            return
        loop = asyncio.get_running_loop()
        branch = "z9hG4bK-tp-" + secrets.token_hex(8)
        started = loop.time()
        outcome = await self._client.transact(self._options(peer, branch), branch, peer)
        result: int | str = outcome if isinstance(outcome, str) else outcome.status
        self._record(key, result, loop.time() - started)

    def _record(self, key: str, result: int | str, rtt: float) -> None:
        health = self.health.setdefault(key, PeerHealth())
        now = self.clock()
        health.last_ping_at = now
        ok = isinstance(result, int) and result != 503
        if isinstance(result, int):
            health.last_status = result
            health.rtt = rtt
            health.last_error = None if ok else "503 Service Unavailable"
        else:
            health.last_error = result
        if ok:
            health.ok += 1
        else:
            health.failed += 1
        self._set_state(key, health, "up" if ok else "down", now)

    def _set_state(self, key: str, health: PeerHealth, state: str, now: float) -> None:
        if health.state != state:
            if state == "down" or health.state == "down":
                log.info("trunk.peer_" + state, peer=key, error=health.last_error, status=health.last_status)
            health.state = state
            health.since = now

    def report(self, peer: PeerAddress, *, ok: bool, reason: str = "") -> None:
        """The proxy's verdict on a call attempt: a timeout or 503 marks `peer` down until a ping answers."""
        key = peer_key(peer)
        health = self.health.setdefault(key, PeerHealth())
        if not ok:
            health.last_error = reason or "call attempt failed"
        self._set_state(key, health, "up" if ok else "down", self.clock())

    # -- views ---------------------------------------------------------------------------------------------
    def health_of(self, trunk: Trunk) -> list[dict[str, Any]]:
        """Each peer address of `trunk` with its health (configured order)."""
        now = self.clock()
        rows = []
        for peer in peer_addresses(trunk):
            health = self.health.get(peer_key(peer), PeerHealth())
            rows.append({"peer": f"{peer.host}:{peer.port}", "transport": peer.transport, **health.to_dict(now)})
        return rows

    def metrics_lines(self) -> list[str]:
        """Prometheus lines (HELP/TYPE included) for every peer address of every trunk."""
        with self.machine.lock:
            trunks = list(self.machine.state.trunks.values())
        up, rtt, pings = [], [], []
        for trunk in trunks:
            for peer in peer_addresses(trunk):
                health = self.health.get(peer_key(peer), PeerHealth())
                labels = f'node="{self.node_id}",trunk="{trunk.name}",peer="{peer.host}:{peer.port}"'
                up.append(f"raftpbx_trunk_peer_up{{{labels}}} {1 if health.usable else 0}")
                if health.rtt is not None:
                    rtt.append(f"raftpbx_trunk_peer_rtt_seconds{{{labels}}} {health.rtt:.6f}")
                pings.append(f'raftpbx_trunk_pings_total{{{labels},result="ok"}} {health.ok}')
                pings.append(f'raftpbx_trunk_pings_total{{{labels},result="failed"}} {health.failed}')
        return [
            "# HELP raftpbx_trunk_peer_up 1 while the trunk peer address answers OPTIONS (or is not pinged yet)",
            "# TYPE raftpbx_trunk_peer_up gauge", *up,
            "# HELP raftpbx_trunk_peer_rtt_seconds round trip of the last answered OPTIONS ping",
            "# TYPE raftpbx_trunk_peer_rtt_seconds gauge", *rtt,
            "# HELP raftpbx_trunk_pings_total OPTIONS pings to the trunk peer address by result",
            "# TYPE raftpbx_trunk_pings_total counter", *pings,
        ]


# --- the RPC methods --------------------------------------------------------------------------------------


def _name(params: Params, name: str = "name", *, required: bool = True) -> str | None:
    value = params.text(name, required=required, max_len=63)
    return None if value is None else str(value)


def _text_list(params: Params, name: str, *, required: bool = False) -> list[str] | None:
    value = params.raw.get(name)
    if value is None:
        if required:
            raise invalid_params(name, "missing")
        return None
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise invalid_params(name, "expected a list of strings")
    if len(value) > MAX_LIST_LEN:
        raise invalid_params(name, f"at most {MAX_LIST_LEN} entries")
    return list(value)


def _optional_int(params: Params, name: str, minimum: int, maximum: int) -> int | None:
    if params.raw.get(name) is None:
        return None
    return params.integer(name, default=0, minimum=minimum, maximum=maximum)


def _bool(params: Params, name: str) -> bool:
    value = params.raw.get(name, False)
    if not isinstance(value, bool):
        raise invalid_params(name, "expected true or false")
    return value


class TrunkAdmin:
    """The trunk.* and route.* methods of one node."""

    def __init__(self, machine: Any, write: Write, op_id: Callable[[Params], str],
                 pinger: TrunkPinger | None = None, registrar: TrunkRegistrar | None = None) -> None:
        self.machine = machine
        self.write = write
        self.op_id = op_id
        self.pinger = pinger
        self.registrar = registrar

    def register(self, server: RpcServer) -> None:
        for name, handler, audit in (
            ("trunk.add", self.trunk_add, True),
            ("trunk.update", self.trunk_update, True),
            ("trunk.delete", self.trunk_delete, True),
            ("trunk.get", self.trunk_get, False),
            ("trunk.list", self.trunk_list, False),
            ("route.add", self.route_add, True),
            ("route.update", self.route_update, True),
            ("route.delete", self.route_delete, True),
            ("route.list", self.route_list, False),
            ("route.test", self.route_test, False),
        ):
            server.register(name, handler, audit=audit)

    # -- trunks ----------------------------------------------------------------------------------------
    def _trunk_view(self, trunk: Trunk) -> dict[str, Any]:
        view: dict[str, Any] = trunk.to_dict()
        health = self.pinger.health_of(trunk) if self.pinger is not None else []
        view["health"] = health
        if self.pinger is not None:
            order = choose_peer(trunk, self.pinger.health)
            view["next_peers"] = [f"{p.host}:{p.port}" for p in order]
        view["registration"] = self.registrar.status_of(trunk) if self.registrar is not None else None
        return view

    async def trunk_add(self, params: Params) -> dict[str, Any]:
        params.check_allowed("name", "peers", "transport", "username", "realm", "password", "allow",
                             "register_expires", "op_id")
        name = _name(params)
        peers = _text_list(params, "peers", required=True)
        transport = params.text("transport", required=False, max_len=8) or "udp"
        username = params.text("username", required=False, max_len=64)
        realm = params.text("realm", required=False, max_len=255)
        password = params.text("password", required=False, max_len=128)
        allow = _text_list(params, "allow") or []
        expires = _optional_int(params, "register_expires", 0, 86_400) or 0
        op_id = self.op_id(params)
        return await self.write(op_id, lambda state, now: decide_create_trunk(
            state, str(name), peers=peers or [], transport=transport, username=username, realm=realm,
            password=password, allow=allow, register_expires=expires, now=now))

    async def trunk_update(self, params: Params) -> dict[str, Any]:
        params.check_allowed("name", "peers", "transport", "username", "realm", "password", "clear_credentials",
                             "allow", "register_expires", "op_id")
        name = _name(params)
        peers = _text_list(params, "peers")
        transport = params.text("transport", required=False, max_len=8)
        username = params.text("username", required=False, max_len=64)
        realm = params.text("realm", required=False, max_len=255)
        password = params.text("password", required=False, max_len=128)
        clear = _bool(params, "clear_credentials")
        allow = _text_list(params, "allow")
        expires = _optional_int(params, "register_expires", 0, 86_400)
        op_id = self.op_id(params)
        return await self.write(op_id, lambda state, now: decide_update_trunk(
            state, str(name), peers=peers, transport=transport, username=username, realm=realm, password=password,
            clear_credentials=clear, allow=allow, register_expires=expires, now=now))

    async def trunk_delete(self, params: Params) -> dict[str, Any]:
        params.check_allowed("name", "op_id")
        name = _name(params)
        op_id = self.op_id(params)
        return await self.write(op_id, lambda state, now: decide_delete_trunk(state, str(name), now))

    async def trunk_get(self, params: Params) -> dict[str, Any]:
        params.check_allowed("name")
        name = _name(params)
        with self.machine.lock:
            trunk = self.machine.state.trunks.get(name)
            routes = [r.name for r in ordered_routes(self.machine.state) if r.trunk == name]
        if trunk is None:
            raise RpcError(NOT_FOUND, f"not found: no trunk {name}", {"field": "name", "message": "no such trunk"})
        return {**self._trunk_view(trunk), "routes": routes}

    async def trunk_list(self, params: Params) -> dict[str, Any]:
        params.check_allowed()
        with self.machine.lock:
            trunks = list(self.machine.state.trunks.values())
            applied_index = self.machine.state.applied_index
        return {"trunks": [self._trunk_view(t) for t in trunks], "applied_index": applied_index}

    # -- routes ----------------------------------------------------------------------------------------
    async def route_add(self, params: Params) -> dict[str, Any]:
        params.check_allowed("name", "pattern", "trunk", "strip", "prepend", "order", "op_id")
        name = _name(params)
        pattern = params.text("pattern", max_len=64)
        trunk = _name(params, "trunk")
        strip = params.integer("strip", default=0, minimum=0, maximum=32)
        prepend = params.text("prepend", required=False, max_len=32) or ""
        order = params.integer("order", default=0, minimum=-10**6, maximum=10**6)
        op_id = self.op_id(params)
        return await self.write(op_id, lambda state, now: decide_create_route(
            state, str(name), pattern=pattern, trunk=str(trunk), strip=strip, prepend=prepend, order=order, now=now))

    async def route_update(self, params: Params) -> dict[str, Any]:
        params.check_allowed("name", "pattern", "trunk", "strip", "prepend", "order", "op_id")
        name = _name(params)
        pattern = params.text("pattern", required=False, max_len=64)
        trunk = _name(params, "trunk", required=False)
        strip = _optional_int(params, "strip", 0, 32)
        prepend = params.text("prepend", required=False, max_len=32)
        order = _optional_int(params, "order", -10**6, 10**6)
        op_id = self.op_id(params)
        return await self.write(op_id, lambda state, now: decide_update_route(
            state, str(name), pattern=pattern, trunk=trunk, strip=strip, prepend=prepend, order=order, now=now))

    async def route_delete(self, params: Params) -> dict[str, Any]:
        params.check_allowed("name", "op_id")
        name = _name(params)
        op_id = self.op_id(params)
        return await self.write(op_id, lambda state, now: decide_delete_route(state, str(name), now))

    async def route_list(self, params: Params) -> dict[str, Any]:
        params.check_allowed()
        with self.machine.lock:
            routes = ordered_routes(self.machine.state)
            applied_index = self.machine.state.applied_index
        return {"routes": [r.to_dict() for r in routes], "applied_index": applied_index}

    async def route_test(self, params: Params) -> dict[str, Any]:
        params.check_allowed("number")
        number = str(params.text("number", max_len=64))
        with self.machine.lock:
            state = self.machine.state
            if number in state.extensions:
                return {"number": number, "target": "extension"}
            match = route_for(state, number)
        if match is None:
            return {"number": number, "target": "none"}
        order = choose_peer(match.trunk, self.pinger.health if self.pinger is not None else {})
        return {"number": number, "target": "trunk", "route": match.route.name, "trunk": match.trunk.name,
                "send": match.number, "peers": [f"{p.host}:{p.port};transport={p.transport}" for p in order]}


# --- wiring -----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class TrunkService:
    """What `attach` built: the RPC methods, the pinger and the registrar (start them once SIP is up; close
    them on stop)."""

    admin: TrunkAdmin
    pinger: TrunkPinger
    started: bool = field(default=False)
    registrar: TrunkRegistrar | None = None

    async def start(self) -> None:
        """Start pinging and registering (each binds its own socket)."""
        await self.pinger.start()
        if self.registrar is not None:
            try:
                await self.registrar.start()
            except BaseException:
                await self.pinger.aclose()
                raise
        self.started = True

    async def aclose(self) -> None:
        if self.registrar is not None:
            await self.registrar.aclose()
        await self.pinger.aclose()


def attach(config: Any, machine: Any, server: RpcServer, service: Any, *,
           interval: float | None = None, register_options: Mapping[str, Any] | None = None) -> TrunkService:
    """Register trunk.* and route.* on `server` (writes through `service`'s commit path), add the trunk
    metrics to `service`, and return the `TrunkService` whose pinger and registrar the node starts after SIP.

    The ping interval is `interval`, else `config.trunk_ping_interval` when the config has it, else
    `DEFAULT_PING_INTERVAL`; the pinger binds an ephemeral port on the node's SIP host. The registrar
    (raftpbx/trunk_register.py) binds another, registers from the leader only (`service.replicator`'s
    role, woken by its `on_leader_change`), with Contact = the service address (else the node's SIP
    address) and tries peers in `choose_peer` order; `register_options` are `TrunkRegistrar` keyword
    arguments (timeout, retry_interval, takeover_delay, check_interval), for tests.
    """
    every = interval if interval is not None else float(getattr(config, "trunk_ping_interval",
                                                                DEFAULT_PING_INTERVAL))
    pinger = TrunkPinger(machine, interval=every, bind_host=config.sip_listen.host, node_id=config.node_id)
    replicator = getattr(service, "replicator", None)

    def is_leader() -> bool:
        status = replicator.status() if replicator is not None else None
        return getattr(status, "role", None) == "leader"

    contact = getattr(config, "service_address", None) or config.sip_listen
    registrar = TrunkRegistrar(machine, is_leader=is_leader, contact=(contact.host, contact.port),
                               bind_host=config.sip_listen.host, node_id=config.node_id,
                               peers=lambda trunk: choose_peer(trunk, pinger.health),
                               **dict(register_options or {}))
    on_leader_change = getattr(replicator, "on_leader_change", None)
    if callable(on_leader_change):
        on_leader_change(registrar.leadership_changed)
    admin = TrunkAdmin(machine, service._write, service._op_id, pinger, registrar)
    admin.register(server)
    service.add_metrics(pinger.metrics_lines)
    service.add_metrics(registrar.metrics_lines)
    return TrunkService(admin, pinger, registrar=registrar)
