"""A one-node stand-in for `raftpbx.replication.Replicator`, shared by the in-process node tests
(test_proxy.py, test_outbound.py and the modules that import their harnesses).

A proposal is applied at once by the real `StateMachine` (commit = apply), at the next index after both
this stand-in's own counter and the machine's applied index, so entries that a test applies to the machine
directly and entries proposed through the node share one log. Tests can hold commits back (`hold()`:
proposals wait until `release()`, so a test sees what the node does while a commit is in flight) and make
the next proposals fail (`fail_next(exc)`: raised instead of committing, nothing applied). Every recorded
payload stays in `proposals`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from raftpbx.service import StateMachine


class LocalReplicator:
    """A one-node stand-in for `Replicator`: a proposal is applied at once (commit = apply)."""

    def __init__(self, machine: StateMachine) -> None:
        self.machine = machine
        self.index = 0
        self.proposals: list[bytes] = []
        self.callbacks: list[Callable[[bool, str | None], None]] = []
        self.held = 0  # proposals waiting on `hold()` right now
        self._gate: asyncio.Event | None = None
        self._failures: list[BaseException] = []

    async def propose(self, payload: bytes, timeout: float) -> object:  # noqa: ASYNC109
        gate = self._gate
        if gate is not None:
            self.held += 1
            try:
                await asyncio.wait_for(gate.wait(), timeout)
            finally:
                self.held -= 1
        if self._failures:
            raise self._failures.pop(0)
        with self.machine.lock:
            self.index = max(self.index, self.machine.state.applied_index) + 1
        self.proposals.append(payload)
        return self.machine.apply(payload, self.index)

    def hold(self) -> None:
        """Proposals from now on wait (bounded by their timeout) until `release()`."""
        if self._gate is None:
            self._gate = asyncio.Event()

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.set()

    def fail_next(self, exc: BaseException, count: int = 1) -> None:
        """The next `count` proposals raise `exc` instead of committing (nothing is applied)."""
        self._failures.extend([exc] * count)

    def status(self) -> Any:
        return SimpleNamespace(role="leader", leader="n1")

    def on_leader_change(self, callback: Callable[[bool, str | None], None]) -> None:
        self.callbacks.append(callback)
