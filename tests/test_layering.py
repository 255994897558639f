"""The import rules of ARCHITECTURE.md, enforced on the source (with `ast`, nothing is imported).

- `state/` imports only the standard library and msgpack, and nothing from raftpbx or transport
  (relative imports stay inside state/);
- `transport/` imports nothing from raftpbx or state; its sans-I/O core `transport/sip/` also imports
  no asyncio, socket, time or os (time is injected as `now`, I/O lives in the asyncio shell);
- only `raftpbx/replication.py` imports pysyncobj (in the product code: raftpbx/, state/, transport/, chaos/).

Both cores may also import `mypy_extensions`: its `mypyc_attr` marks the classes the mypyc build
(setup.py) keeps as Python classes, and does nothing at run time.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STDLIB = set(sys.stdlib_module_names) | {"__future__"}
COMPILER_MARKS = {"mypy_extensions"}  # setup.py's mypyc build reads them; no behaviour at run time


def python_files(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def imports_of_source(text: str, package: tuple[str, ...]) -> Iterator[tuple[int, str]]:
    """(line, absolute dotted module) for every import of `text`, a module inside folder `package`
    (e.g. ("transport", "sip")); relative imports are resolved, and `<outside>` marks one that escapes
    the top folder."""
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.lineno, str(node.module)
                continue
            up = node.level - 1
            base = package[: len(package) - up] if up <= len(package) - 1 else ("<outside>",)
            yield node.lineno, ".".join((*base, node.module) if node.module else base)


def imports(path: Path) -> Iterator[tuple[int, str]]:
    return imports_of_source(path.read_text(encoding="utf-8"), path.relative_to(ROOT).parent.parts)


def _bad(module: str, allowed: set[str], forbidden: tuple[str, ...], own: str) -> bool:
    if any(module == p or module.startswith(p + ".") for p in forbidden):
        return True
    top = module.split(".")[0]
    return top != own and top not in allowed


def _violations_in(text: str, package: tuple[str, ...], allowed: set[str], forbidden: tuple[str, ...],
                   own: str) -> list[str]:
    return [f"{line}: {module}" for line, module in imports_of_source(text, package)
            if _bad(module, allowed, forbidden, own)]


def _violations(folder: str, allowed: set[str], forbidden: tuple[str, ...], own: str) -> list[str]:
    bad = []
    for path in python_files(folder):
        package = path.relative_to(ROOT).parent.parts
        bad += [f"{path.relative_to(ROOT)}:{v}"
                for v in _violations_in(path.read_text(encoding="utf-8"), package, allowed, forbidden, own)]
    return bad


def test_the_folders_exist() -> None:
    assert python_files("state") and python_files("transport") and (ROOT / "raftpbx" / "replication.py").exists()


def test_state_imports_only_stdlib_and_msgpack() -> None:
    assert _violations("state", STDLIB | COMPILER_MARKS | {"msgpack"}, ("raftpbx", "transport", "<outside>"), "state") == []


def test_transport_imports_neither_raftpbx_nor_state() -> None:
    allowed = STDLIB | COMPILER_MARKS | {"uvloop"}
    assert _violations("transport", allowed, ("raftpbx", "state", "<outside>"), "transport") == []


@pytest.mark.parametrize("module", ["asyncio", "socket", "time", "os", "selectors", "threading"])
def test_sip_core_is_sans_io(module: str) -> None:
    forbidden = (module, "raftpbx", "state", "transport.udp", "transport.tcp", "<outside>")
    bad = _violations("transport/sip", STDLIB | COMPILER_MARKS, forbidden, "transport")
    assert bad == []


def test_only_replication_imports_pysyncobj() -> None:
    offenders = []
    for folder in ("raftpbx", "state", "transport", "chaos"):
        for path in python_files(folder):
            for line, module in imports(path):
                if module.split(".")[0] == "pysyncobj" and path != ROOT / "raftpbx" / "replication.py":
                    offenders.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert offenders == []


def test_the_checker_sees_violations() -> None:
    """The rules above can fail: absolute, relative and escaping imports are all resolved."""
    sample = "import asyncio\nfrom ..x import y\nfrom ...raftpbx import z\nfrom . import message\n"
    assert list(imports_of_source(sample, ("transport", "sip"))) == [
        (1, "asyncio"), (2, "transport.x"), (3, "<outside>.raftpbx"), (4, "transport.sip")]
    assert _violations_in(sample, ("transport", "sip"), STDLIB, ("asyncio", "<outside>"), "transport") == [
        "1: asyncio", "3: <outside>.raftpbx"]
