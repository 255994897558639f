"""What setup.py compiles with mypyc, read from its COMPILED list (for tests/conftest.py and the tests of
the compiled build)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def compiled_paths() -> list[str]:
    """setup.py's COMPILED list (source paths), read with ast: importing setup.py would run setup()."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["COMPILED"]:
            return list(ast.literal_eval(node.value))
    raise LookupError("setup.py has no COMPILED list")


def compiled_modules() -> list[str]:
    """The installed names of the modules setup.py compiles: transport/ and state/ install under raftpbx
    (pyproject.toml's package-dir), raftpbx/ is the package itself."""
    names = [p.removesuffix(".py").replace("/", ".") for p in compiled_paths()]
    return [n if n.startswith("raftpbx.") else "raftpbx." + n for n in names]
