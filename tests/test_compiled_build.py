"""setup.py's mypyc build: what it compiles exists, and RAFTPBX_MYPYC is checked.

The compiled modules themselves are tested by `make test-compiled` (tests/transport and tests/node
against a compiled install; tests/conftest.py refuses a run that imports the source instead).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from compiled_build import ROOT, compiled_modules, compiled_paths


def _setup_py(*args: str, mode: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAFTPBX_MYPYC": mode}
    return subprocess.run([sys.executable, "setup.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_every_compiled_path_is_a_core_module() -> None:
    paths = compiled_paths()
    assert paths, "setup.py compiles nothing"
    assert len(set(paths)) == len(paths)
    for path in paths:
        assert (ROOT / path).is_file(), path
        assert Path(path).parts[0] in ("transport", "state", "raftpbx"), path
    assert "raftpbx.transport.sip.message" in compiled_modules()  # the parser of issue 3


def test_an_unknown_raftpbx_mypyc_value_is_refused_and_named() -> None:
    proc = _setup_py("--version", mode="yes")
    assert proc.returncode != 0
    assert "RAFTPBX_MYPYC must be auto, 0 or 1, not 'yes'" in proc.stderr


def test_raftpbx_mypyc_0_builds_nothing() -> None:
    proc = _setup_py("--version", mode="0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "0.1.0"
    assert "mypyc" not in proc.stdout + proc.stderr
