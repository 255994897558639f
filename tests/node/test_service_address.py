"""ServiceAddress (raftpbx/service_address.py): acquire while leading, retry the bind every 50 ms while the old
holder has not released it, release on step-down, quorum loss, a missed callback and shutdown; ip mode runs
the hook around the bind. With a fake replicator and endpoint for the logic, and with two real endpoints in
one process for bind exclusivity (loopback mode cannot overlap)."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from raftpbx.transport.endpoint import SipEndpoint
from raftpbx.transport.errors import BindError
from raftpbx.transport.sip.transaction import Event

from raftpbx.config import NodeConfig, load_config
from raftpbx.service_address import HookError, ServiceAddress

SERVICE_HOST = f"127.{20 + os.getpid() % 200}.{os.getpid() // 200 % 250 + 1}.10"


def config(mode: str = "loopback", port: int = 5060) -> NodeConfig:
    overrides = {"node.id": "n1", "node.data_dir": "data", "cluster.secret": "s" * 32, "admin.token": "t" * 24,
                 "service.address": f"{SERVICE_HOST}:{port}"}
    if mode == "ip":
        overrides.update({"service.address": f"198.51.100.10:{port}", "service.mode": "ip",
                          "service.interface": "eth9", "service.hook": "/nonexistent/hook"})
    elif mode == "none":
        overrides["service.mode"] = "none"
    return load_config(None, env={}, overrides=overrides)


@dataclass
class Status:
    role: str


class FakeReplicator:
    def __init__(self, role: str = "follower") -> None:
        self.role = role
        self.callbacks: list[Any] = []

    def status(self) -> Status:
        return Status(self.role)

    def on_leader_change(self, callback: Any) -> None:
        self.callbacks.append(callback)

    def lead(self) -> None:
        self.role = "leader"
        for cb in self.callbacks:
            cb(True, "n1")

    def step_down(self, leader: str | None) -> None:
        self.role = "follower"
        for cb in self.callbacks:
            cb(False, leader)


class FakeEndpoint:
    """Records add/remove calls; `busy` makes the bind fail the way a held address does (EADDRINUSE)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, float]] = []
        self.bound: set[tuple[str, int]] = set()
        self.busy = False

    async def add_listener(self, host: str, port: int) -> tuple[str, int]:
        self.log.append(("add", time.monotonic()))
        if self.busy:
            raise BindError(f"bind {(host, port)!r}: Address already in use")
        self.bound.add((host, port))
        return (host, port)

    async def remove_listener(self, host: str, port: int) -> None:
        self.log.append(("remove", time.monotonic()))
        self.bound.discard((host, port))


async def until(condition: Any, deadline_s: float = 3.0, what: str = "condition") -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def test_mode_none_never_binds() -> None:
    endpoint, replicator = FakeEndpoint(), FakeReplicator("leader")
    sa = ServiceAddress(config("none"), endpoint, replicator)  # type: ignore[arg-type]
    sa.start()
    assert replicator.callbacks == [] and sa.mode == "none" and not sa.held
    await sa.aclose()
    assert endpoint.log == []


async def test_acquire_on_leadership_release_on_step_down_and_on_quorum_loss() -> None:
    endpoint, replicator = FakeEndpoint(), FakeReplicator()
    sa = ServiceAddress(config(), endpoint, replicator)  # type: ignore[arg-type]
    changes: list[bool] = []
    sa.on_change(changes.append)
    sa.start()
    try:
        assert sa.address == (SERVICE_HOST, 5060) and sa.mode == "loopback" and not sa.held
        replicator.lead()
        await until(lambda: sa.held, what="acquired")
        assert endpoint.bound == {(SERVICE_HOST, 5060)} and changes == [True]
        status = sa.status()
        assert status["held"] and status["address"] == f"{SERVICE_HOST}:5060" and status["since"] is not None
        replicator.step_down("n2")
        await until(lambda: not sa.held and not endpoint.bound, what="released on step-down")
        assert changes == [True, False]
        replicator.lead()
        await until(lambda: sa.held, what="acquired again")
        replicator.step_down(None)  # pysyncobj's leaderFallbackTimeout: no leader known any more
        await until(lambda: not sa.held and not endpoint.bound, what="released on quorum loss")
        assert changes == [True, False, True, False] and sa.acquisitions == 2 and sa.releases == 2
    finally:
        await sa.aclose()


async def test_retries_every_50_ms_until_the_old_holder_releases() -> None:
    endpoint, replicator = FakeEndpoint(), FakeReplicator()
    endpoint.busy = True
    sa = ServiceAddress(config(), endpoint, replicator)  # type: ignore[arg-type]
    sa.start()
    try:
        replicator.lead()
        await until(lambda: len(endpoint.log) >= 5, what="five attempts")
        assert not sa.held and "in use" in (sa.status()["last_error"] or "")
        times = [at for op, at in endpoint.log if op == "add"]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(gap >= 0.045 for gap in gaps), gaps  # no hammering
        assert min(gaps) < 0.5, gaps  # and no giving up: the next attempt comes soon
        endpoint.busy = False
        freed = time.monotonic()
        await until(lambda: sa.held, what="acquired once free")
        assert time.monotonic() - freed < 0.5
        assert sa.status()["last_error"] is None
    finally:
        await sa.aclose()


async def test_stops_retrying_when_leadership_goes() -> None:
    endpoint, replicator = FakeEndpoint(), FakeReplicator()
    endpoint.busy = True
    sa = ServiceAddress(config(), endpoint, replicator)  # type: ignore[arg-type]
    sa.start()
    try:
        replicator.lead()
        await until(lambda: len(endpoint.log) >= 2, what="attempts")
        replicator.step_down("n2")
        count = len(endpoint.log)
        endpoint.busy = False
        await asyncio.sleep(0.3)  # an observation window (6 retry intervals) in which a wrong retry would bind
        assert not sa.held and not endpoint.bound
        assert [op for op, _ in endpoint.log[count:]] in ([], ["add"], ["remove"]), endpoint.log[count:]
    finally:
        await sa.aclose()


async def test_a_missed_callback_still_releases_within_the_watch_interval() -> None:
    endpoint, replicator = FakeEndpoint(), FakeReplicator()
    sa = ServiceAddress(config(), endpoint, replicator)  # type: ignore[arg-type]
    sa.start()
    try:
        replicator.lead()
        await until(lambda: sa.held, what="acquired")
        replicator.role = "follower"  # no callback
        started = time.monotonic()
        await until(lambda: not sa.held, what="released by the watch")
        assert time.monotonic() - started < 0.5
    finally:
        await sa.aclose()


async def test_leader_at_start_acquires_and_shutdown_releases() -> None:
    endpoint, replicator = FakeEndpoint(), FakeReplicator("leader")
    sa = ServiceAddress(config(), endpoint, replicator)  # type: ignore[arg-type]
    sa.start()
    await until(lambda: sa.held, what="acquired at start")
    await sa.aclose()
    assert not sa.held and not endpoint.bound and [op for op, _ in endpoint.log] == ["add", "remove"]


async def test_ip_mode_runs_the_hook_around_the_bind_and_retries_a_failing_hook() -> None:
    endpoint, replicator = FakeEndpoint(), FakeReplicator()
    calls: list[tuple[str, str, str]] = []
    failures = [2]

    async def hook(path: Path, action: str, address: str, interface: str) -> None:
        calls.append((action, address, interface))
        endpoint.log.append((f"hook {action}", time.monotonic()))
        if action == "up" and failures[0] > 0:
            failures[0] -= 1
            raise HookError("hook up exited 4: needs root")

    sa = ServiceAddress(config("ip"), endpoint, replicator, hook_runner=hook,  # type: ignore[arg-type]
                        hook_retry_interval=0.05)
    sa.start()
    try:
        replicator.lead()
        await until(lambda: sa.held, what="acquired after the hook worked")
        assert calls[-1] == ("up", "198.51.100.10/32", "eth9") and len(calls) == 3
        assert sa.failures == 2
        replicator.step_down("n2")
        await until(lambda: not sa.held and calls[-1][0] == "down", what="released")
        assert [op for op, _ in endpoint.log] == ["hook up", "hook up", "hook up", "add", "remove", "hook down"]
    finally:
        await sa.aclose()


def _noop(endpoint: SipEndpoint, event: Event, flow: object) -> None:
    del endpoint, event, flow


async def test_two_real_endpoints_never_hold_a_loopback_address_together() -> None:
    """Bind exclusivity on real sockets: the second node keeps retrying until the first releases."""
    first_ep, second_ep = SipEndpoint(_noop), SipEndpoint(_noop)
    await first_ep.start("127.0.0.1", 0)
    await second_ep.start("127.0.0.1", 0)
    probe = SipEndpoint(_noop)
    await probe.start("127.0.0.1", 0)
    port = (await probe.add_listener(SERVICE_HOST, 0))[1]  # a port free on both UDP and TCP
    await probe.aclose()
    first_repl, second_repl = FakeReplicator(), FakeReplicator()
    first = ServiceAddress(config(port=port), first_ep, first_repl)
    second = ServiceAddress(config(port=port), second_ep, second_repl)
    first.start()
    second.start()
    try:
        first_repl.lead()
        await until(lambda: first.held, what="first holds")
        second_repl.lead()  # two leaders in a row (an old one that has not noticed yet)
        await until(lambda: second.failures >= 3, what="second retrying")
        assert not second.held and first_ep.listeners == [(SERVICE_HOST, port)] and second_ep.listeners == []
        first_repl.step_down("n2")
        await until(lambda: second.held, what="second takes over")
        assert not first.held and second_ep.listeners == [(SERVICE_HOST, port)] and first_ep.listeners == []
    finally:
        await first.aclose()
        await second.aclose()
        await first_ep.aclose()
        await second_ep.aclose()


@pytest.mark.parametrize("mode", ["loopback", "ip"])
async def test_status_shape(mode: str) -> None:
    sa = ServiceAddress(config(mode), FakeEndpoint(), FakeReplicator())  # type: ignore[arg-type]
    assert set(sa.status()) >= {"mode", "address", "held", "since", "last_error"}
    assert sa.status()["mode"] == mode
