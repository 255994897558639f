"""Shared helpers for the lab tests (tests/deploy): the Lab class, the root check, probes and waits.

No conftest.py here on purpose (as in tests/integration): `from conftest import ...` elsewhere in tests/
must never resolve to this folder. Test modules `import labkit`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

_spec = importlib.util.spec_from_file_location("rpbx_netns_lab", DEPLOY / "netns" / "lab.py")
assert _spec is not None and _spec.loader is not None
lab_module = importlib.util.module_from_spec(_spec)
sys.modules["rpbx_netns_lab"] = lab_module
_spec.loader.exec_module(lab_module)
Lab = lab_module.Lab
LabError = lab_module.LabError


def require_lab_tools(*tools: str) -> None:
    """Fail (never skip) with a clear message when the lab cannot be built on this machine."""
    if os.geteuid() != 0:
        pytest.fail("the network-namespace lab needs root (CI runs these tests as root); run pytest as root",
                    pytrace=False)
    missing = [t for t in ("ip", "nft", *tools) if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools for the lab: {', '.join(missing)} (run scripts/bootstrap.sh --test)",
                    pytrace=False)
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail(f"network namespaces are unavailable here: {probe.stderr.strip()}", pytrace=False)


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `condition` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = condition()
        except Exception as exc:  # the condition may fail while things settle
            value, last_exc = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last_exc!r})")
        time.sleep(interval)
