"""Python face of lab.sh for tests: a network-namespace lab that is always destroyed on exit.

    with Lab(3) as lab:                       # hosts h1..h3 at 198.51.100.11..13
        lab.run("h1", "ping", "-c1", lab.address("h2"))
        proc = lab.popen("h2", ["python3", "-m", "http.server", "--bind", lab.address("h2")])
        lab.partition(["h1"])                 # h1 cut from everyone, both directions
        lab.partition(["h1"], others=["h2"], oneway=True)
        lab.netem("h1", "delay", "50ms")
        lab.heal()

Every lab gets its own name (rpbx-tPID-N by default) so that labs of concurrent test runs never meet.
`__exit__` destroys the lab whatever happened, killing every process left in its namespaces.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

LAB_SH = Path(__file__).resolve().with_name("lab.sh")
SUBNET_PREFIX = "198.51.100"
_counter = itertools.count(1)


class LabError(Exception):
    """lab.sh failed; the message carries its stderr."""


class Lab:
    """A lab of `hosts` namespaces; use as a context manager (destroyed on exit, even on failure)."""

    def __init__(self, hosts: int = 3, name: str | None = None) -> None:
        if hosts < 1:
            raise ValueError("a lab needs at least one host")
        self.size = hosts
        self.name = name or f"rpbx-t{os.getpid()}-{next(_counter)}"
        self._env = {**os.environ, "RPBX_LAB": self.name}

    # -- lifecycle -----------------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.destroy()

    def create(self) -> None:
        self._lab("create", str(self.size))

    def destroy(self) -> None:
        self._lab("destroy")

    # -- hosts ---------------------------------------------------------------------------------------
    @property
    def hosts(self) -> list[str]:
        return [f"h{i}" for i in range(1, self.size + 1)]

    def index(self, host: str) -> int:
        text = host.removeprefix(f"{self.name}-").removeprefix("h")
        if not text.isdigit() or not 1 <= int(text) <= self.size:
            raise ValueError(f"no host {host!r} in a lab of {self.size}")
        return int(text)

    def address(self, host: str) -> str:
        return f"{SUBNET_PREFIX}.{10 + self.index(host)}"

    def namespace(self, host: str) -> str:
        return f"{self.name}-h{self.index(host)}"

    @property
    def switch_namespace(self) -> str:
        return f"{self.name}-br0"

    def command(self, host: str, args: Sequence[str]) -> list[str]:
        """The argv that runs `args` inside `host`."""
        return ["ip", "netns", "exec", self.namespace(host), *args]

    def run(self, host: str, *args: str, check: bool = True, timeout: float = 30.0,
            input: str | None = None, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(host, args), capture_output=True, text=True, check=check,
                              timeout=timeout, input=input, env=None if env is None else dict(env))

    def popen(self, host: str, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `args` inside `host` in its own session; destroy() kills it if the caller does not."""
        kwargs.setdefault("start_new_session", True)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self.command(host, args), **kwargs)

    # -- faults --------------------------------------------------------------------------------------
    def partition(self, hosts: Sequence[str], others: Sequence[str] | None = None, oneway: bool = False) -> None:
        """Cut the links between `hosts` and `others` (default: every other host); oneway: hosts -> others only."""
        args = ["partition", ",".join(hosts)]
        if others:
            args += ["--from", ",".join(others)]
        if oneway:
            args.append("--oneway")
        self._lab(*args)

    def netem(self, host: str, *spec: str) -> None:
        """netem on `host`'s egress, e.g. netem("h1", "delay", "50ms", "loss", "5%")."""
        self._lab("netem", host, *spec)

    def heal(self) -> None:
        self._lab("heal")

    def listing(self) -> str:
        return self._lab("list")

    def _lab(self, *args: str) -> str:
        proc = subprocess.run(["bash", str(LAB_SH), *args], capture_output=True, text=True, env=self._env,
                              timeout=120)
        if proc.returncode != 0:
            raise LabError(f"lab.sh {' '.join(args)} failed (status {proc.returncode}): "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout
