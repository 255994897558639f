"""setup.py's mypyc build: what it compiles exists, and RAFTPBX_MYPYC is checked.

The compiled modules themselves are tested by `make test-compiled` (tests/transport and tests/node
against a compiled install; tests/conftest.py refuses a run that imports the source instead).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
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


def test_raftpbx_mypyc_0_builds_a_pure_python_wheel(tmp_path: Path) -> None:
    """Built from a copy of the tree (setup.py writes build/ beside itself), as pip builds a wheel."""
    tree = tmp_path / "tree"
    for name in ("setup.py", "pyproject.toml", "README.md"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tree / name)
    for folder in ("raftpbx", "state", "transport", "chaos"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "RAFTPBX_MYPYC": "0"}
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"),
                           str(tree)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    [wheel] = (tmp_path / "dist").glob("*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert "raftpbx/transport/sip/message.py" in names
    assert not [n for n in names if n.endswith(".so")]
