"""What one REGISTER command costs in Python calls on the replicated hot paths (issue 8).

Every REGISTER is encoded once (the proposing node's SIP thread: `encode_batch`) and applied on every node
(the Raft thread, under the state lock: `apply_entry`). These tests count the Python-level function calls
(a profiler hook: `sys.setprofile`, "call" events only, C functions not counted) per command of a realistic
16-command REGISTER entry, so a change that puts a Python call per field or per command back on either
path fails here, whatever the machine's speed:

- encode: the compiled per-class encoder (`codec._compile_encoder`) instead of one schema converter call per
  field and per nested record (27 calls per REGISTER before, 10 now);
- apply: the command's decode in one frame (`codec._fast_command`), the dedupe window read and written in its
  stored form, the applier called from the table, the digest chained inline, the applier's checks without
  generators, the expiry heap settled inline in `State.put_binding`, a fast constructor in one frame (43 calls
  before, 17 now).

`decide_register` (once per REGISTER, on the proposing node's SIP thread) builds its records with
`model.fast_constructor`: no per-field `object.__setattr__`.

The behaviour of each fast path against the general code is checked in `test_state_fast_paths.py`.

Compiled (a normal install: setup.py compiles `model`, `codec`, `apply`, `bindings` with mypyc; `make test-compiled`
runs this file against it), a compiled function runs no Python frame and the hook does not see it: what is
counted then is the interpreted code the compiled path still runs per command (the codec's generated
per-class encoders and decoders, the fast constructors' generated code, the dataclass-generated `__init__`
of the outcome), and the bounds are those counts. The interpreted bounds stay what they are for the source.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest
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
from raftpbx.state.bindings import BindingsUpdated, ContactUpdate

# The compiled build's modules are extensions (`make test-compiled` also fails if they are not: tests/conftest.py).
COMPILED = str(sys.modules[apply_entry.__module__].__file__).endswith(".so")

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
    # Compiled: the two generated class encoders (BindingsUpdated, ContactUpdate) are what remains interpreted.
    assert per_command <= (2 if COMPILED else 11), per_command


def test_applying_a_register_costs_a_few_python_calls() -> None:
    state = _state()
    index = 2
    for first in range(0, 2 * USERS, PER_ENTRY):  # every user registered, then refreshes (the steady state)
        apply_entry(state, encode_batch(_registers(state, first, PER_ENTRY)), index)
        index += 1
    entry = encode_batch(_registers(state, 2 * USERS, PER_ENTRY))
    outcomes: list[Any] = []
    per_command = _python_calls(lambda: outcomes.extend(apply_entry(state, entry, index))) / PER_ENTRY
    assert [type(o).__name__ for o in outcomes] == ["Applied"] * PER_ENTRY
    # _fast_command, the compiled decoders (event, ContactUpdate) and the contacts and path converters, four
    # fast constructors (Command, BindingsUpdated, ContactUpdate, Binding: one call each since the twin's
    # __init__ went), the applier, its keys (and binding_key per contact), _update_ok, _out_of_order,
    # put_binding, _pack_outcome, Applied: 17 (21 with the twin's __init__; 43 before: decode_command, event_from_wire, _fast_event, DedupeWindow.get/__setitem__, apply, _chain,
    # _check_update, generators, ContactUpdate.key, intern_text, _settle_expiry and _live, a
    # ContactUpdate.__eq__).
    # Compiled: the generated decoders (event, ContactUpdate), the four fast constructors and Applied's
    # dataclass __init__: 7.
    assert per_command <= (7 if COMPILED else 18), per_command


def test_deciding_a_register_runs_no_frozen_dataclass_init() -> None:
    # decide_register runs once per REGISTER on the proposing node's SIP thread; a frozen dataclass's
    # __init__ sets every field through object.__setattr__ (about 1,200 instructions each on 3.11): 19 per
    # single-contact REGISTER (ContactUpdate, BindingsUpdated, RegisterAccepted) before fast constructors.
    state = _state()
    contacts = [ContactSpec("sip:1001@127.0.0.1:5060", "sip:1001@127.0.0.1:5060", 300)]
    frozen_inits = 0

    def hook(frame: FrameType, event: str, _arg: Any) -> None:
        nonlocal frozen_inits
        if event == "call" and "__dataclass_builtins_object__" in frame.f_code.co_freevars:
            frozen_inits += 1

    sys.setprofile(hook)
    try:
        decision = decide_register(
            state, aor="1001", contacts=contacts, star=False, expires_header=None, call_id="c-1", cseq=1,
            received="127.0.0.1:5060", transport="udp", node_id="n1", now=1000.0, min_expires=60,
            max_expires=3600, default_expires=300, max_contacts=10, branch="z9hG4bK1",
        )
    finally:
        sys.setprofile(None)
    assert frozen_inits == 0
    assert isinstance(decision, RegisterAccepted) and type(decision) is RegisterAccepted
    assert decision == RegisterAccepted(decision.events, decision.op_id)
    event = decision.events[0]
    assert isinstance(event, BindingsUpdated) and type(event) is BindingsUpdated
    rebuilt = BindingsUpdated(**{f.name: getattr(event, f.name) for f in dataclasses.fields(event)})
    assert event == rebuilt and hash(event) == hash(rebuilt)
    contact = event.contacts[0]
    assert type(contact) is ContactUpdate
    assert contact == ContactUpdate(**{f.name: getattr(contact, f.name) for f in dataclasses.fields(contact)})
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.aor = "x"  # type: ignore[misc]
