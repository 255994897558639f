"""Shared helpers for the lab tests (tests/deploy): the Lab class, the root check, probes and waits.

No conftest.py here on purpose (as in tests/integration): `from conftest import ...` elsewhere in tests/
must never resolve to this folder. Test modules `import labkit`.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
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


# -- talking to lab hosts from the test process ----------------------------------------------------------
# The lab hosts are reachable only from inside the lab (nothing is routed from the root namespace). A test
# thread enters a host's network namespace for the duration of one request: setns(CLONE_NEWNET) changes
# the namespace of the calling thread only (Linux namespaces are per task), and a socket stays in the
# namespace it was created in. The thread always returns to its own namespace before the context exits.
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(namespace: str) -> Iterator[None]:
    """Run the body in network namespace `namespace` (this thread only)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


class RpcFailure(Exception):
    """A JSON-RPC error answer (code, message, data) or an HTTP failure."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{code}: {message} {data if data is not None else ''}".rstrip())
        self.code = code
        self.message = message
        self.data = data


def rpc(namespace: str, url: str, token: str, method: str, timeout: float = 5.0, **params: Any) -> Any:
    """One admin JSON-RPC call to `url`, made from inside `namespace`."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    request = urllib.request.Request(url.rstrip("/") + "/rpc", data=body, method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    with in_netns(namespace):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                doc = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            doc = json.loads(raw) if raw else {"error": {"code": exc.code, "message": f"HTTP {exc.code}"}}
    if "error" in doc:
        err = doc["error"]
        raise RpcFailure(int(err.get("code", 0)), str(err.get("message", "")), err.get("data"))
    return doc["result"]


def lab_phone(lab: Any, host: str, workdir: Path) -> Any:
    """A pjsua2 phone process (chaos/phone.py, not started) inside lab host `host`, bound to its lab address:
    PhoneProcess runs `PYTHON -m chaos.phone ...`, so PYTHON is a wrapper that enters the namespace first."""
    from chaos.phone import PhoneProcess

    wrapper = workdir / f"python-in-{host}.sh"
    wrapper.write_text(f"#!/bin/sh\nexec ip netns exec {lab.namespace(host)} {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    return PhoneProcess(lab.address(host), python=str(wrapper), log=workdir / f"phone-{host}.log")
