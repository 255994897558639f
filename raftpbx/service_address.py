"""The cluster's SIP service address: held by the Raft leader, released when it stops leading.

Theory of operation
-------------------
Phones and trunks know one address (`[service] address`). Whoever leads the Raft cluster serves it, next to
its own SIP address, as an extra listener of the node's `SipEndpoint` (transport/endpoint.py, Contract A):

- `loopback` mode: bind the 127.0.0.x address (every 127/8 address is local on Linux, nothing to configure);
- `ip` mode: `hook up ADDR/PREFIX IFACE` (deploy/hooks/service-address: `ip addr add` + gratuitous ARP so
  the neighbours' caches move to this host at once), then bind; release is the reverse (unbind, `hook down`);
- `none`: nothing is held (clients use the node addresses or DNS SRV).

One worker task reconciles what we hold with what we want. We *want* the address while the replicator says
this node leads (`Replicator.on_leader_change`, checked again every 50 ms while held). Acquiring is retried every
`RETRY_INTERVAL` (50 ms) while we still lead and the bind fails (the previous holder has not released it
yet: it is stopped, or its step-down is in flight); a failing hook is retried every `HOOK_RETRY_INTERVAL`.
We release at once when leadership goes: stepped down (another node won an election), lost the quorum
(pysyncobj's leaderFallbackTimeout makes an isolated leader step down: `on_leader_change(False, None)`),
or the node shuts down (`aclose()`, before the SIP endpoint closes).

Invariants and bounds
---------------------
- At most one holder per node: the worker is the only code that binds or unbinds, one step at a time.
- Loopback mode cannot overlap at all: two processes cannot bind the same address and port (no
  SO_REUSEPORT on these sockets), so the next leader's bind fails until the old holder's sockets are gone
  (released, or the process died: the kernel closes them). A stopped (SIGSTOP) old leader therefore keeps
  the address, answering nothing, until it resumes and steps down; the new leader keeps retrying.
- Ip mode can overlap between hosts, for at most the leader fallback timeout (+ one Raft tick and the hook's
  run time): an old leader cut off from its peers still holds the address until pysyncobj makes it step
  down `leader_fallback_timeout` after the last acknowledgement from a majority; the new leader cannot be
  elected before an election timeout anyway. The gratuitous ARP of the new holder moves the traffic.
- Nothing here raises into the event loop; every failure is logged, counted and kept in `last_error`.
- A hook run ends when the hook's process exits, never later: what it leaves in the background (arping)
  does not delay the bind (`run_hook`).
- Logs: `service_address.acquired` (reason, took_ms: from the leadership change to the bind, attempts)
  and `service_address.released` (reason, took_ms), `service_address.acquire_failed` (first failure of a
  series, then every 20th).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO

from .config import NodeConfig
from .logs import get_logger
from .transport.endpoint import SipEndpoint
from .transport.errors import BindError, TransportError

__all__ = ["RETRY_INTERVAL", "HookError", "ServiceAddress", "run_hook"]

log = get_logger("raftpbx.service_address")

RETRY_INTERVAL = 0.05  # s between bind attempts while we lead and the old holder has not released yet
HOOK_RETRY_INTERVAL = 1.0  # s between runs of a failing `hook up`
HOOK_TIMEOUT = 10.0  # s a hook may run
HOOK_OUTPUT_LIMIT = 64 * 1024  # bytes at the end of a failing hook's output read for its error message
WATCH_INTERVAL = 0.05  # s between checks of the replicator's role while we hold the address

HookRunner = Callable[[Path, str, str, str], Awaitable[None]]


class HookError(Exception):
    """The ip-mode hook failed (missing, not executable, non-zero exit, timeout); the message says why."""


async def run_hook(hook: Path, action: str, address: str, interface: str) -> None:
    """Run `hook ACTION ADDRESS INTERFACE` (action up|down, address ADDR/PREFIX); raise `HookError`.

    Done means the hook's own process exited: its output goes to an anonymous in-memory file, read after
    the exit, never to a pipe whose end-of-file we would wait for. A process the hook leaves running in the
    background (the stock hook's `arping -c 3`, three announcements one second apart) can hold a copy of
    the hook's stdout: uvloop, the node's event loop, hands the child's stdio socket to it again at spare
    descriptor numbers (libuv's spawn has no close_fds), and `>/dev/null 2>&1` only replaces 1 and 2. With
    a pipe, `communicate()` waited for arping to finish: every ip-mode acquisition took 3 s.
    """
    with _output_file() as out:
        try:
            proc = await asyncio.create_subprocess_exec(
                str(hook), action, address, interface,
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as exc:
            raise HookError(f"{hook}: {exc.strerror or exc}") from None
        try:
            async with asyncio.timeout(HOOK_TIMEOUT):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise HookError(f"{hook} {action}: no answer after {HOOK_TIMEOUT:g} s") from None
        if proc.returncode != 0:
            out.seek(max(0, os.fstat(out.fileno()).st_size - HOOK_OUTPUT_LIMIT))  # its last lines say why
            text = out.read(HOOK_OUTPUT_LIMIT).decode("utf-8", "replace").strip().splitlines()
            raise HookError(f"{hook} {action} exited {proc.returncode}: {' / '.join(text[-3:]) or 'no output'}")


def _output_file() -> BinaryIO:
    """An unnamed file for a hook's output: in memory (memfd) where the platform has it, else a temp file."""
    if hasattr(os, "memfd_create"):
        with contextlib.suppress(OSError):
            return open(os.memfd_create("raftpbx-hook", os.MFD_CLOEXEC), "w+b", buffering=0)
    return tempfile.TemporaryFile(buffering=0)


class ServiceAddress:
    """Acquire the service address while this node leads, release it otherwise (see the module doc)."""

    def __init__(
        self,
        cfg: NodeConfig,
        endpoint: SipEndpoint,
        replicator: Any,
        *,
        hook_runner: HookRunner = run_hook,
        retry_interval: float = RETRY_INTERVAL,
        hook_retry_interval: float = HOOK_RETRY_INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        settings = cfg.service
        self.cfg = cfg
        self.endpoint = endpoint
        self.replicator = replicator
        self._mode = settings.mode
        self._address: tuple[str, int] | None = (
            (settings.address.host, settings.address.port) if settings.address is not None else None
        )
        self._hook_runner = hook_runner
        self._retry_interval = retry_interval
        self._hook_retry_interval = hook_retry_interval
        self._clock = clock
        self._want = False
        self._want_reason = "not leader"
        self._want_since = time.monotonic()
        self._held = False
        self._hook_up = False  # ip mode: the address is on the interface (hook up ran, hook down not yet)
        self._since: float | None = None
        self._last_error: str | None = None
        self._attempts = 0
        self.acquisitions = 0
        self.releases = 0
        self.failures = 0
        self._callbacks: list[Callable[[bool], None]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # -- API -------------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """"loopback", "ip" or "none"."""
        return self._mode

    @property
    def address(self) -> tuple[str, int] | None:
        """The configured service address, or None."""
        return self._address

    @property
    def held(self) -> bool:
        """True while this node serves the address (bound, and in ip mode on the interface)."""
        return self._held

    def on_change(self, callback: Callable[[bool], None]) -> None:
        """Call `callback(held)` on the event loop after each acquisition and release."""
        self._callbacks.append(callback)

    def status(self) -> dict[str, Any]:
        """mode, address ("host:port" or None), held, since (wall time of the last change, or None),
        last_error, and counters."""
        return {
            "mode": self._mode,
            "address": None if self._address is None else _fmt(self._address),
            "held": self._held,
            "since": self._since,
            "last_error": self._last_error,
            "acquisitions": self.acquisitions,
            "releases": self.releases,
            "failures": self.failures,
        }

    def start(self) -> None:
        """Follow leadership from now on (mode none: do nothing)."""
        if self._mode == "none" or self._address is None or self._task is not None:
            return
        self.replicator.on_leader_change(self._leader_changed)
        status = self.replicator.status()
        if getattr(status, "role", None) == "leader":
            self._set_want(True, "leader at start")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="service-address")

    async def aclose(self) -> None:
        """Release the address (if held) and stop following leadership."""
        self._closing = True
        self._set_want(False, "shutdown")
        task, self._task = self._task, None
        if task is not None:
            try:
                async with asyncio.timeout(HOOK_TIMEOUT + 5):
                    await task
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._held or self._hook_up:  # the worker was cancelled in the middle: release what is left
            await self._release("shutdown")

    # -- leadership --------------------------------------------------------------------------------------
    def _leader_changed(self, is_leader: bool, leader: str | None) -> None:
        if self._closing:
            return
        if is_leader:
            self._set_want(True, "became leader")
        elif leader is None:
            self._set_want(False, "lost quorum or leader unknown")
        else:
            self._set_want(False, f"stepped down, {leader} leads")

    def _set_want(self, want: bool, reason: str) -> None:
        if want != self._want:
            self._want_since = time.monotonic()
            self._attempts = 0
        self._want = want
        self._want_reason = reason
        self._wake.set()

    def _still_leader(self) -> bool:
        try:
            return bool(getattr(self.replicator.status(), "role", None) == "leader")
        except Exception:
            return False

    # -- the worker ----------------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                if self._want and not self._held:
                    if not self._still_leader():
                        self._set_want(False, "not leader any more")
                        continue
                    wait = await self._acquire()
                elif not self._want and (self._held or self._hook_up):
                    await self._release(self._want_reason)
                    wait = self._hook_retry_interval if self._hook_up else None  # hook down failed: retry
                elif self._held:
                    wait = WATCH_INTERVAL  # watch the role: a missed callback must not keep the address
                    if not self._still_leader():
                        self._set_want(False, "not leader any more")
                        continue
                else:
                    wait = None
            except Exception as exc:  # never let the worker die: log, remember, retry
                self.failures += 1
                self._last_error = f"{type(exc).__name__}: {exc}"
                log.exception("service_address.worker_failed", error=self._last_error)
                wait = self._hook_retry_interval
            if self._closing and not self._want and not self._held and not self._hook_up:
                return
            if self._held and wait is None:
                wait = WATCH_INTERVAL
            if wait is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()

    async def _acquire(self) -> float | None:
        """One attempt; returns the delay before the next one (None when acquired)."""
        assert self._address is not None
        host, port = self._address
        self._attempts += 1
        if self._mode == "ip" and not self._hook_up:
            try:
                await self._hook("up")
            except HookError as exc:
                self._failed(str(exc))
                return self._hook_retry_interval
            self._hook_up = True
            if not self._want:  # lost leadership while the hook ran
                return 0.0
        try:
            await self.endpoint.add_listener(host, port)
        except BindError as exc:
            self._failed(str(exc))
            return self._retry_interval
        except TransportError as exc:  # endpoint closed: shutting down
            self._failed(str(exc))
            return self._hook_retry_interval
        if not self._want or not self._still_leader():
            # Leadership went while we were binding: give it back at once.
            await self._release("lost leadership while acquiring")
            return None
        took = time.monotonic() - self._want_since
        self._held = True
        self._since = self._clock()
        self._last_error = None
        self.acquisitions += 1
        log.info("service_address.acquired", address=_fmt(self._address), mode=self._mode,
                 reason=self._want_reason, took_ms=round(took * 1000, 1), attempts=self._attempts)
        self._notify(True)
        return None

    def _failed(self, error: str) -> None:
        self.failures += 1
        first = self._last_error != error
        self._last_error = error
        if first or self._attempts % 20 == 0:
            log.warning("service_address.acquire_failed", address=_fmt(self._address or ("", 0)), mode=self._mode,
                        attempt=self._attempts, error=error)

    async def _release(self, reason: str) -> None:
        assert self._address is not None
        started = time.monotonic()
        was_held = self._held
        self._held = False  # from now on nothing claims to serve it
        try:
            await self.endpoint.remove_listener(*self._address)
        except Exception as exc:
            self.failures += 1
            self._last_error = f"remove_listener: {exc}"
            log.exception("service_address.release_failed", error=self._last_error)
        if self._mode == "ip" and self._hook_up:
            try:
                await self._hook("down")
                self._hook_up = False
            except HookError as exc:
                # The address may still be on the interface: say so loudly; the worker retries while not
                # leading (hook down is idempotent).
                self.failures += 1
                self._last_error = str(exc)
                log.error("service_address.hook_down_failed", error=str(exc), advice="check `ip addr`; run the "
                          "hook's down action by hand if the address is still there")
        if was_held:
            self._since = self._clock()
            self.releases += 1
            log.info("service_address.released", address=_fmt(self._address), mode=self._mode, reason=reason,
                     took_ms=round((time.monotonic() - started) * 1000, 1),
                     since_change_ms=round((time.monotonic() - self._want_since) * 1000, 1))
            self._notify(False)

    async def _hook(self, action: str) -> None:
        settings = self.cfg.service
        assert self._address is not None and settings.hook is not None and settings.interface is not None
        await self._hook_runner(settings.hook, action, f"{self._address[0]}/{settings.prefix}", settings.interface)

    def _notify(self, held: bool) -> None:
        for callback in list(self._callbacks):
            try:
                callback(held)
            except Exception:
                log.exception("service_address.callback_failed")


def _fmt(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
