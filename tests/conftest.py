"""Suite-wide check for `make test-compiled`: with RAFTPBX_EXPECT_COMPILED=1 the run must import the
mypyc-compiled modules of an installed package (setup.py), not the interpreted source, else it would
pass without testing what it says it tests."""

from __future__ import annotations

import importlib
import os

import pytest
from compiled_build import compiled_modules


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
