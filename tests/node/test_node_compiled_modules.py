"""The node logs which of its modules are compiled (raftpbx/node.py `compiled_modules`, in `node.starting`).

This file runs twice in `make test`: in the editable dev venv, where every module is interpreted, and in
`make test-compiled` (RAFTPBX_EXPECT_COMPILED=1), where setup.py's list is compiled.
"""

from __future__ import annotations

import os

from compiled_build import compiled_modules as setup_py_modules

from raftpbx import node


def test_compiled_modules_are_setup_pys_list_in_a_compiled_install_and_none_in_the_dev_venv() -> None:
    for name in setup_py_modules():
        __import__(name)
    compiled = node.compiled_modules()
    if os.environ.get("RAFTPBX_EXPECT_COMPILED") == "1":
        assert compiled == sorted(name.removeprefix("raftpbx.") for name in setup_py_modules())
    else:
        assert compiled == []
