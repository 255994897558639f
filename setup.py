"""Build hook: compile the per-request path (SIP stack, the state's per-command code, the node's SIP
path) to C extensions with mypyc.

The project is configured in pyproject.toml; this file only adds the compiled modules. The Python
source stays the one definition of the code: mypyc translates the same (mypy --strict clean) modules
to C, and the installed package holds both, the extension taking precedence at import. Measured on
Debian's CPython 3.11 (interleaved runs): the full parse about 1.16 times the interpreted rate; per
authenticated REGISTER the SIP thread runs 28% fewer instructions (bench/README.md).

RAFTPBX_MYPYC chooses:
- unset or "auto": compile a normal (wheel) install, not an editable one (`pip install -e .`, the
  dev and test venv), whose extensions would sit beside the sources and hide every later edit;
  compile only when mypyc and a C compiler with Python's headers are there, else install the pure
  Python source and say so;
- "1": always compile (an error without mypyc or a compiler), also for an editable install;
- "0": never compile.

mypyc names a compiled module after its path, so the modules are compiled from a staged copy laid
out as they are installed (raftpbx/transport/..., raftpbx/state/...), not from the source folders
(installed under raftpbx through package-dir).
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

# Source folder -> installed package, as pyproject.toml's package-dir maps them.
PACKAGES = {"raftpbx": "raftpbx", "transport": "raftpbx/transport", "state": "raftpbx/state"}
# The compiled modules (paths in the source tree). Each is mypy --strict clean; what mypyc cannot
# compile as a native class (a tuple subclass, a class built with object.__new__, a property setter
# on a Python class) is marked @mypyc_attr(native_class=False) in the source.
COMPILED = [
    # a full parse (issue 3): message, headers, URIs, errors
    "transport/sip/errors.py",
    "transport/sip/uri.py",
    "transport/sip/headers.py",
    "transport/sip/message.py",
    # the rest of the SIP thread's per-request path: digest, transactions, the TCP framer
    "transport/sip/digest.py",
    "transport/sip/transaction.py",
    "transport/sip/stream.py",
    # the asyncio glue every datagram goes through: counters, flows, the UDP socket, the endpoint
    "transport/errors.py",
    "transport/counters.py",
    "transport/flow.py",
    "transport/udp.py",
    "transport/endpoint.py",
    # the node's SIP path: dispatch and digest checks, the registrar, the proxy and its call records
    "raftpbx/sipnode.py",
    "raftpbx/registrar.py",
    "raftpbx/proxy.py",
    "raftpbx/calls.py",
    # the replicated state's per-command path (issue 8): decide_register and encode on the proposing node,
    # decode and apply on every node. The event and record classes stay interpreted (state/events.py,
    # state/binding_types.py, state/records.py): mypyc replaces class annotations with erased types, which
    # the codec and the snapshot read.
    "state/model.py",
    "state/codec.py",
    "state/apply.py",
    "state/bindings.py",
]

ROOT = Path(__file__).resolve().parent
STAGE = ROOT / "build" / "mypyc-src"


def _say(text: str) -> None:
    print(f"setup.py: {text}", file=sys.stderr)


def _mode() -> str:
    mode = os.environ.get("RAFTPBX_MYPYC", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"setup.py: RAFTPBX_MYPYC must be auto, 0 or 1, not {mode!r}")
    return mode


def _choice(mode: str) -> bool:
    if mode != "auto":
        return mode == "1"
    if "editable_wheel" in sys.argv:  # setuptools' PEP 660 build of `pip install -e .`
        return False
    try:
        import mypyc.build  # noqa: F401  (a build requirement; absent from a --no-build-isolation build)
    except ImportError:
        _say("mypyc is not installed: installing the cores as pure Python (RAFTPBX_MYPYC=1 makes this an error)")
        return False
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if shutil.which(compiler) is None or not header.exists():
        _say(
            f"no C compiler ({compiler}) or no {header}: installing the cores as pure Python, which parses "
            "spends more CPU per request (the SIP thread about 40% more instructions; RAFTPBX_MYPYC=1 makes this an error)"
        )
        return False
    return True


def _clean_build_products() -> None:
    """setuptools reuses build/lib.* between builds of this tree (pip builds in place), so an extension
    compiled before would go into the next wheel: a module taken off COMPILED, or everything in a
    RAFTPBX_MYPYC=0 build, would still be installed compiled. Start every build from none."""
    for pattern in ("lib.*", "temp.*", "bdist.*"):
        for path in (ROOT / "build").glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


class ParallelBuildExt(build_ext):
    """build_ext compiling an extension's C files in parallel: mypyc puts every module's C file (one per
    module, multi_file) into one extension, which setuptools would compile one file after the other."""

    def build_extensions(self) -> None:
        serial = self.compiler.compile

        def compile(sources: list[str], *args: object, **kwargs: object) -> list[str]:
            if len(sources) < 2:
                return serial(sources, *args, **kwargs)
            with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                parts = list(pool.map(lambda source: serial([source], *args, **kwargs), sources))
            return [obj for part in parts for obj in part]

        self.compiler.compile = compile
        super().build_extensions()


# Commands that build; pip also runs setup.py only for metadata (egg_info, dist_info), which needs no
# compilation (the mypy pass alone takes about 10 s).
_BUILDING = ("bdist_wheel", "build_ext", "build", "install", "editable_wheel", "develop")


def _ext_modules() -> list[object]:
    mode = _mode()
    if not any(command in sys.argv for command in _BUILDING):
        return []
    _clean_build_products()
    if not _choice(mode):
        return []
    from mypyc.build import mypycify

    if STAGE.exists():
        shutil.rmtree(STAGE)
    for folder, installed in PACKAGES.items():
        shutil.copytree(
            ROOT / folder, STAGE / installed, ignore=shutil.ignore_patterns("__pycache__", "*.so"), dirs_exist_ok=True
        )
    # mypy's settings for the build (else it would read pyproject.toml's, made for the source folders). The
    # node's modules import third-party packages that the isolated build environment does not install
    # (msgpack, pysyncobj, aiohttp...): their types are Any there, as in the project's own mypy run.
    # Only the compiled modules must be clean; the others are read for their types only.
    staged = []
    for path in COMPILED:
        folder, _, rest = path.partition("/")
        staged.append(f"{PACKAGES[folder]}/{rest}")
    config = "[mypy]\npython_version = 3.11\nstrict = True\nignore_missing_imports = True\nignore_errors = True\n"
    for module in staged:
        config += f"[mypy-{module.removesuffix('.py').replace('/', '.')}]\nignore_errors = False\n"
    (STAGE / "mypy.ini").write_text(config)
    here = os.getcwd()
    os.chdir(STAGE)  # module names come from the paths relative to here
    try:
        return list(
            mypycify(
                ["--config-file", "mypy.ini", *staged],
                opt_level="3",
                multi_file=True,  # one C file per module, compiled in parallel (build_ext's parallel below)
                target_dir=str(STAGE / "c"),
            )
        )
    finally:
        os.chdir(here)


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": ParallelBuildExt})
