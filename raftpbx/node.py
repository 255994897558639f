"""One raftpbx node process: state + replication + admin RPC, with a graceful shutdown.

Theory of operation: `run(config)` builds the `StateMachine`, a `Replicator` over the node's data dir
(journal and full dump together), the `AdminService` and its `RpcServer`, the `SipNode` (SIP on
`cfg.sip.listen`, UDP and/or TCP) with its `Registrar` and `Proxy`, then waits for SIGTERM or SIGINT. Start order:
replicator (restores the dump, replays the journal, binds the Raft address), the admin server, then SIP
(so that no REGISTER is answered before the state is restored), then the `ServiceAddress`, which binds the
cluster's service address while this node leads (service_address.py). Stop order: the service address first
(released at once, so the next leader can take it over without waiting for us), the registrar's expiry job,
the proxy (timers, the leader's call timeout job), SIP (running handlers finish or are cancelled, sockets close), the admin server, then the replicator stops
its thread and syncs the journal, logs are flushed.

Invariants: nothing listens on an address the config did not name (all defaults are loopback); a start
failure (data dir refused, address in use) is logged and gives exit status 1; the secret and token are
never logged.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import gc
import importlib.machinery
import logging
import signal
import sys

from .config import NodeConfig
from .logs import get_logger
from .proxy import Proxy
from .registrar import Registrar
from .replication import ReplicationConfig, ReplicationError, Replicator
from .rpc import RpcServer
from .service import AdminService, StateMachine
from .service_address import ServiceAddress
from .sipnode import SipNode
from .transport.counters import TransportCounters
from .transport.errors import TransportError

__all__ = ["replication_config", "run", "serve"]

log = get_logger("raftpbx.node")


def replication_config(config: NodeConfig) -> ReplicationConfig:
    """The replicator's settings, derived from the node's (raises replication.ConfigError)."""
    return ReplicationConfig(
        self_id=config.node_id,
        self_addr=str(config.raft_address),
        peers={peer.id: str(peer.raft) for peer in config.peers},
        data_dir=config.data_dir,
        secret=config.cluster_secret,
        bootstrap=config.bootstrap,
        join=config.join,
        join_token=config.join_token,
        peer_admin_urls={peer.id: peer.admin_url for peer in config.peers},
        self_admin_url=config.admin_url,
        raft_min_timeout=config.election_timeout_min,
        raft_max_timeout=config.election_timeout_max,
        append_entries_period=config.heartbeat_period,
        leader_fallback_timeout=config.leader_fallback_timeout,
        connection_timeout=max(1.0, config.election_timeout_max),
        log_compaction_min_entries=config.compaction_min_entries,
        log_compaction_min_time=config.compaction_min_time,
    )


def sip_metrics_lines(node: str, counters: TransportCounters) -> list[str]:
    """The SIP transport's counters (transport/counters.py: what the shell swallowed instead of raising, such
    as malformed requests answered or dropped) as Prometheus counters `raftpbx_sip_<name>_total{node}`."""
    lines = []
    for name, value in counters.snapshot().items():
        metric = f"raftpbx_sip_{name}_total"
        lines += [f"# HELP {metric} SIP transport: {name.replace('_', ' ')}", f"# TYPE {metric} counter",
                  f'{metric}{{node="{node}"}} {value}']
    return lines


def _check_data_dir(config: NodeConfig) -> None:
    """The data dir holds HA1 digests (password-equivalent): create it 0700, warn if others can read it."""
    try:
        config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = config.data_dir.stat().st_mode & 0o777
    except OSError as exc:
        log.warning("node.data_dir", path=str(config.data_dir), error=str(exc))
        return
    if mode & 0o077:
        log.warning("node.data_dir_permissions", path=str(config.data_dir), mode=oct(mode),
                    advice="the journal holds password-equivalent digests: chmod 700")


def compiled_modules() -> list[str]:
    """The loaded raftpbx modules that are C extensions: a normal install compiles the hot cores with
    mypyc (setup.py); an editable install (the dev venv) or a host without a compiler runs them
    interpreted (the SIP thread then runs about 40% more instructions per REGISTER). Logged at start."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return sorted(
        name.removeprefix("raftpbx.")
        for name, module in list(sys.modules.items())
        if name.startswith("raftpbx.") and str(getattr(module, "__file__", None)).endswith(suffixes)
    )


# The cyclic garbage collector, tuned once the node has started (state restored, listeners up). At 1,000
# REGISTER/s a node holds ~64,000 completed server transactions (32 s each) besides the replicated state,
# and with the default thresholds (700, 10, 10) young collections run every few hundred allocations and
# full ones walk that whole heap: p99 spikes of 0.8-2.1 s at 900-1,000 REGISTER/s in bench/suite.py, and
# ~6% of the SIP path's instructions (bench/sip_path.py). Freezing moves what exists at start (modules,
# config, the restored state) out of every later walk; objects freed by reference counting are still freed,
# only cycles among frozen objects would stay (none are expected). Young garbage waits for 20,000 allocations
# (a few MB) instead of 700.
GC_THRESHOLDS = (20_000, 50, 50)


def _tune_gc() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    log.info("node.gc_tuned", frozen=gc.get_freeze_count(), thresholds=list(GC_THRESHOLDS))


# glibc's malloc, tuned before the state is restored. Its mmap threshold is dynamic: freeing one large
# mmapped block (a snapshot being written or restored, a compaction, a big Raft frame: tens of MB) raises the
# threshold to that size, after which every allocation below it comes from the heap and, once freed, stays
# resident behind live objects. A node at 100,000 bindings + 1,000,000 call records measured 266-297 MB
# (bench/footprint.py) where the state after a restart needs 219 MB. A fixed threshold keeps large buffers
# mmapped, so they go back to the kernel when freed; at most two malloc arenas (instead of 8 per core) stop
# the SIP, Raft and call-record threads from each keeping a fragmented heap of their own. Objects below
# 512 bytes are Python's own allocator's and are not affected.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MALLOC_SETTINGS = ((M_MMAP_THRESHOLD, 256 * 1024), (M_TRIM_THRESHOLD, 1024 * 1024), (M_ARENA_MAX, 2))


def _tune_malloc() -> bool:
    """Apply `MALLOC_SETTINGS` when the C library is glibc; False (and a log line) elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.info("node.malloc_not_tuned", libc=name, reason="no mallopt (not glibc)")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    refused = [param for param, value in MALLOC_SETTINGS if mallopt(param, value) != 1]
    if refused:
        log.warning("node.malloc_not_tuned", libc=name, refused=refused)
        return False
    log.info("node.malloc_tuned", mmap_threshold=MALLOC_SETTINGS[0][1], trim_threshold=MALLOC_SETTINGS[1][1],
             arena_max=MALLOC_SETTINGS[2][1])
    return True


async def serve(config: NodeConfig, stop: asyncio.Event) -> int:
    """Run the node until `stop` is set; return the process exit status."""
    _tune_malloc()
    machine = StateMachine()
    try:
        repl_config = replication_config(config)
    except ReplicationError as exc:
        log.error("node.config_refused", error=str(exc))
        return 2
    # Full dumps are written by a forked child; machine.snapshot takes machine.lock (replication hazard 8).
    replicator = Replicator(repl_config, apply=machine.apply, snapshot=machine.snapshot, restore=machine.restore,
                            fork_locks=(machine.lock,))
    service = AdminService(config, machine, replicator)
    server = RpcServer(config.admin_token, metrics=service.metrics)
    service.register(server)
    # Call records (SQLite read model of the applied call events, hooked before the replicator restores)
    # and the PBX admin reads: binding.list, call.active, cdr.list, cdr.get. Closed with `service`.
    from .pbx_admin import attach as attach_pbx_admin

    attach_pbx_admin(config, machine, server, service)
    # Cluster operations: add/remove node, transfer leadership, backup (membership.py).
    from .membership import attach as attach_cluster_ops

    cluster_ops = attach_cluster_ops(config, machine, replicator, server)
    # Trunks and dial-plan routes (replicated configuration, trunk.* / route.* RPCs) and the OPTIONS pinger.
    from .trunks import attach as attach_trunks

    trunks = attach_trunks(config, machine, server, service)

    def leader_changed(is_leader: bool, leader: str | None) -> None:
        log.info("raft.leader_changed", node=config.node_id, is_leader=is_leader, leader=leader)

    replicator.on_leader_change(leader_changed)
    sip = SipNode(config, machine, replicator)
    service_address = ServiceAddress(config, sip.endpoint, replicator)
    service.service_address = service_address
    registrar = Registrar(sip)
    # INVITE/CANCEL handlers, in-dialog prerouter, stray responses; calls to and from trunks use the pinger's
    # view of the peers and report failed attempts to it (trunk_calls.py).
    proxy = Proxy(sip, replicator, trunks=trunks.pinger)
    service.add_metrics(proxy.trunk_calls.metrics_lines)  # trunk call attempts, failovers, 503s
    service.add_metrics(functools.partial(sip_metrics_lines, config.node_id, sip.endpoint.counters))
    _check_data_dir(config)
    log.info("node.starting", node=config.node_id, raft=str(config.raft_address),
             admin=config.admin_url, data_dir=str(config.data_dir), peers=[p.id for p in config.peers],
             compiled=compiled_modules())
    try:
        await replicator.start()
    except (ReplicationError, OSError) as exc:
        log.error("node.start_failed", node=config.node_id, stage="replication", error=str(exc))
        return 1
    try:
        try:
            await server.start(config.admin_listen.host, config.admin_listen.port)
        except OSError as exc:
            log.error("node.start_failed", node=config.node_id, stage="admin", error=str(exc),
                      admin=str(config.admin_listen))
            return 1
        try:
            await sip.start()
        except (TransportError, OSError) as exc:
            log.error("node.start_failed", node=config.node_id, stage="sip", error=str(exc),
                      sip=str(config.sip.listen))
            return 1
        proxy.start()
        _tune_gc()
        try:
            await trunks.start()  # the pinger's socket: an ephemeral port on the SIP host
        except (TransportError, OSError) as exc:
            log.error("node.start_failed", node=config.node_id, stage="trunks", error=str(exc))
            return 1
        service_address.start()  # acquires at once if this node already leads
        with machine.lock:
            applied = machine.state.applied_index
        log.info("node.started", node=config.node_id, applied_index=applied, admin=config.admin_url)
        status = 0
        # Stop on request, or when replication stops for good (refused by the cluster, removed, disk).
        stopped = asyncio.ensure_future(stop.wait())
        failed = asyncio.ensure_future(replicator.wait_failed())
        await asyncio.wait((stopped, failed), return_when=asyncio.FIRST_COMPLETED)
        for task in (stopped, failed):
            task.cancel()
        if failed.done() and not failed.cancelled():
            log.error("node.replication_stopped", node=config.node_id, error=str(failed.result()))
            status = 1
        log.info("node.stopping", node=config.node_id)
    finally:
        await cluster_ops.guard.aclose()  # a leadership hand-over of a drained node still in flight
        await service_address.aclose()
        await registrar.aclose()
        await proxy.aclose()
        await trunks.aclose()
        await sip.aclose()
        await server.stop()
        await service.close()
        await replicator.stop()
    log.info("node.stopped", node=config.node_id)
    return status


async def _main(config: NodeConfig) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await serve(config, stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def run(config: NodeConfig) -> int:
    """Run a node in this process (blocking) with uvloop; returns the exit status."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio works too
        status = asyncio.run(_main(config))
    else:
        status = uvloop.run(_main(config))
    logging.shutdown()
    return status
