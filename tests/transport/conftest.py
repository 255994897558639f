"""Shared fixtures for the asyncio transport tests: run async tests on uvloop and on the stdlib loop.

The node runs on uvloop; the stdlib loop is the fallback. Both must behave the same, so every async test
under tests/transport runs once per loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pytest
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


WaitUntil = Callable[..., Awaitable[None]]


async def _wait_until(condition: Callable[[], Any], deadline_s: float = 5.0, what: str = "condition") -> None:
    """Poll `condition` every few ms until it is truthy; fail the test after `deadline_s` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {deadline_s}s waiting for {what}")
        await asyncio.sleep(0.005)


@pytest.fixture
def wait_until() -> WaitUntil:
    """`await wait_until(lambda: cond, deadline_s=..., what=...)`: poll a condition with a deadline."""
    return _wait_until
