"""What one REGISTER command costs in Python calls on the replicated hot paths (issue 8).

Every REGISTER is encoded once (the proposing node's SIP thread: `encode_batch`) and applied on every node
(the Raft thread, under the state lock: `apply_entry`). These tests count the Python-level function calls
(a profiler hook: `sys.setprofile`, "call" events only, C functions not counted) per command of a realistic
16-command REGISTER entry, so a change that puts a Python call per field or per command back on either
path fails here, whatever the machine's speed:

- encode: the compiled per-class encoder (`codec._compile_encoder`) instead of one schema converter call per
  field and per nested record (27 calls per REGISTER before, 10 now);

The behaviour of each fast path against the general code is checked in `test_state_fast_paths.py`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from raftpbx.state import (
    Command,
    ContactSpec,
    ExtensionCreated,
    RegisterAccepted,
    State,
    apply_entry,
    decide_register,
    encode_batch,
)

USERS = 200
PER_ENTRY = 16


def _state() -> State:
    state = State()
    commands = [Command(f"create-{u}", ExtensionCreated(str(1000 + u), "", "r", "0" * 32, "0" * 64, 1.0))
                for u in range(USERS)]
    assert all(o.__class__.__name__ == "Applied" for o in apply_entry(state, encode_batch(commands), 1))
    return state


def _registers(state: State, first: int, count: int) -> list[Command]:
    out: list[Command] = []
    for j in range(first, first + count):
        user = str(1000 + j % USERS)
        contact = f"sip:{user}@127.0.0.1:{5060 + j % 1000}"
        decision = decide_register(
            state, aor=user, contacts=[ContactSpec(contact, contact, 300)], star=False, expires_header=None,
            call_id=f"c-{user}", cseq=1 + j, received="127.0.0.1:5060", transport="udp", node_id="n1",
            now=1000.0 + j * 0.001, min_expires=60, max_expires=3600, default_expires=300, max_contacts=10,
            branch=f"z{j}",
        )
        assert isinstance(decision, RegisterAccepted)
        out.extend(Command(decision.op_id, event) for event in decision.events)
    return out


def _python_calls(fn: Callable[[], Any]) -> int:
    calls = 0

    def hook(_frame: FrameType, event: str, _arg: Any) -> None:
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(hook)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls - 1  # fn itself


def test_encoding_a_register_costs_a_few_python_calls() -> None:
    state = _state()
    commands = _registers(state, 0, PER_ENTRY)
    encode_batch(commands)  # compiled encoders built on first use
    per_command = _python_calls(lambda: encode_batch(commands)) / PER_ENTRY
    # encode_command, _check_op_id, event_to_wire, the class encoders (event and ContactUpdate), the converters
    # of contacts, of one contact and of path, _pack: 10 (27 with a schema converter call per field).
    assert per_command <= 11, per_command
