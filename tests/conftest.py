"""Suite-wide check for `make test-compiled`: with RAFTPBX_EXPECT_COMPILED=1 the run must import the
mypyc-compiled modules of an installed package (setup.py), not the interpreted source, else it would
pass without testing what it says it tests."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def compiled_modules() -> list[str]:
    """The module names setup.py compiles (read from its COMPILED list, not imported)."""
    text = (ROOT / "setup.py").read_text(encoding="utf-8")
    block = text.split("COMPILED = [", 1)[1].split("]", 1)[0]
    paths = [line.strip().strip('",') for line in block.splitlines() if line.strip().startswith('"')]
    names = [p.removesuffix(".py").replace("/", ".") for p in paths]
    # transport/ and state/ install under raftpbx (pyproject.toml's package-dir); raftpbx/ is the package
    return [n if n.startswith("raftpbx.") else "raftpbx." + n for n in names]


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("RAFTPBX_EXPECT_COMPILED") != "1":
        return
    interpreted = [
        f"{name} ({module.__file__})"
        for name in compiled_modules()
        if not str((module := importlib.import_module(name)).__file__).endswith(".so")
    ]
    if interpreted:
        raise pytest.UsageError("RAFTPBX_EXPECT_COMPILED=1 but these modules are interpreted: " + ", ".join(interpreted))
