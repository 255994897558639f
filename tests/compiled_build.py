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
    """The installed names of the modules setup.py compiles (transport/ is raftpbx.transport...)."""
    return ["raftpbx." + p.removesuffix(".py").replace("/", ".") for p in compiled_paths()]
