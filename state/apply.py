"""Deterministic application of log entries to `State`.

Theory of operation (hashicorp/raft's FSM contract): `apply_entry(state, entry, index)` is called by the
replication layer for each committed entry, in log order, on every node. It decodes the batch and applies
each command in order, mutating `state` in place. It reads nothing but its arguments: no clock, no
randomness, no I/O, no iteration over unordered containers, so equal logs give equal states and digests.

Per command:
1. if its op_id is in the dedupe window, the outcome is `Duplicate(first outcome)` and nothing changes
   (not even the digest): a retried proposal after an unknown outcome must not apply twice;
2. otherwise the event goes through the `apply` function registered for its type, which either mutates the
   state and returns `Applied(result)`, or changes nothing and returns `Rejected(field, message)` because
   the event is invalid against the current state (creating an extension that exists, updating one that
   does not, a malformed value). Concurrent conflicting proposals thus resolve the same way everywhere;
3. the outcome is recorded in the window under the op_id (the oldest entry is evicted past
   `state.dedupe_limit`), and `digest = sha256(digest || command bytes)`, rejected commands included:
   they are in the log too.

Malformed entries (bytes that do not decode, including events from a newer schema version than this
node knows) must not crash the node: the whole entry is refused with a single
`Rejected("entry", reason)`, none of its op_ids is recorded, and the digest is chained over the raw entry
bytes, `digest = sha256(digest || entry)`, so it still covers every log position.

`applied_index` is set to `index` after every entry, malformed or not. An entry whose index is not above
`applied_index` was already applied (a replay after restore) and is ignored: it returns `[]` and changes
nothing, which makes replays idempotent.

Appliers validate first and mutate last (never mutating before a check that can fail). An exception
escaping one would be a bug; it is caught and turned into `Rejected("event", ...)` so that a poison entry
rejects the same way on every node instead of crash-looping the whole cluster on replay.

Performance: no copies of the state per apply; an update builds one new frozen `Extension`. Every command
of every entry is applied on every node, on the Raft thread, where it is most of that thread's CPU at the
REGISTER bench's rates (`bench/replication.py --register`): the loop reads and writes the dedupe window in its
stored form (`DedupeWindow`'s packed outcomes; a hit is unpacked as `get` would), calls the applier from the
table and chains the digest inline, and the decode takes the common case in one frame (`codec._fast_command`).
`tests/state/test_state_hot_path_costs.py` counts the Python calls per REGISTER command. A normal install
compiles this module, `codec`, `model` and `bindings` with mypyc (setup.py); `tests/state/test_state_golden_bytes.py`
pins the bytes both builds write.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, TypeVar, cast

from .codec import decode_batch_raw
from .errors import CodecError
from .events import CredentialChanged, Event, ExtensionCreated, ExtensionDeleted, ExtensionUpdated
from .model import _ODICT, DedupeWindow, Extension, State, _pack_outcome, unpack_outcome
from .outcomes import Applied, Duplicate, Outcome, Rejected
from .validation import check_display_name, check_extension, check_ha1_md5, check_ha1_sha256, check_realm

Applier = Callable[[State, Any], Applied | Rejected]

APPLIERS: dict[type[Event], Applier] = {}
"""The dispatch table: one function per event type."""

_E = TypeVar("_E", bound=Event)


def applies(
    event_type: type[_E],
) -> Callable[[Callable[[State, _E], Applied | Rejected]], Callable[[State, _E], Applied | Rejected]]:
    """Decorator registering the function that applies `event_type`."""

    def register(
        function: Callable[[State, _E], Applied | Rejected],
    ) -> Callable[[State, _E], Applied | Rejected]:
        if event_type in APPLIERS:
            raise TypeError(f"{event_type.__name__} already has an applier")
        APPLIERS[event_type] = cast(Applier, function)
        return function

    return register


def apply(state: State, event: Event) -> Applied | Rejected:
    """Apply one event to `state` in place (no dedupe, digest or index bookkeeping)."""
    applier = APPLIERS.get(type(event))
    if applier is None:
        return Rejected("event", f"no applier for {type(event).__name__}")
    return applier(state, event)


def _chain(digest: bytes, data: bytes) -> bytes:
    return hashlib.sha256(digest + data).digest()


def apply_entry(state: State, entry: bytes | bytearray | memoryview, index: int) -> list[Outcome]:
    """Apply one committed log entry (a batch of commands) at log position `index`; see module doc."""
    # The annotation names every buffer taken (compiled, a parameter's type is checked at the call).
    if index <= state.applied_index:
        return []
    if isinstance(entry, bytearray | memoryview):
        entry = bytes(entry)
    try:
        commands = decode_batch_raw(entry)
    except CodecError as exc:
        state.digest = _chain(state.digest, entry if type(entry) is bytes else b"")
        state.applied_index = index
        return [Rejected("entry", f"malformed entry: {exc}")]
    window = state.dedupe
    limit = state.dedupe_limit
    # The window's stored form is read and written directly (one Python frame less each way per command):
    # a miss (almost always) decodes nothing; a hit is unpacked as `DedupeWindow.get` would.
    packed = type(window) is DedupeWindow
    appliers = APPLIERS
    sha256 = hashlib.sha256
    outcomes: list[Outcome] = []
    for raw, command in commands:
        op_id = command.op_id
        first = (_ODICT.get(window, op_id) if packed else window.get(op_id))
        if first is not None:
            outcomes.append(Duplicate(unpack_outcome(first)))
            continue
        event = command.event
        applier = appliers.get(type(event))
        try:
            outcome = apply(state, event) if applier is None else applier(state, event)
        except Exception as exc:  # a bug in an applier: reject deterministically rather than crash-loop
            outcome = Rejected("event", f"internal error applying {type(event).__name__}: {type(exc).__name__}")
        if packed:
            _ODICT.__setitem__(window, op_id, _pack_outcome(outcome))
        else:
            window[op_id] = outcome
        if len(window) > limit:
            window.popitem(last=False)
        state.digest = sha256(state.digest + raw).digest()  # _chain, inlined
        outcomes.append(outcome)
    state.applied_index = index
    return outcomes


# --- extensions ------------------------------------------------------------------------------------------


def _check_credentials(realm: str, ha1_md5: str, ha1_sha256: str) -> Rejected | None:
    for field, message in (
        ("realm", check_realm(realm)),
        ("ha1_md5", check_ha1_md5(ha1_md5)),
        ("ha1_sha256", check_ha1_sha256(ha1_sha256)),
    ):
        if message is not None:
            return Rejected(field, message)
    return None


@applies(ExtensionCreated)
def _extension_created(state: State, event: ExtensionCreated) -> Applied | Rejected:
    if (message := check_extension(event.extension)) is not None:
        return Rejected("extension", message)
    if (message := check_display_name(event.display_name)) is not None:
        return Rejected("display_name", message)
    if (rejected := _check_credentials(event.realm, event.ha1_md5, event.ha1_sha256)) is not None:
        return rejected
    if event.extension in state.extensions:
        return Rejected("extension", "already exists")
    state.extensions[event.extension] = Extension(
        extension=event.extension,
        display_name=event.display_name,
        realm=event.realm,
        ha1_md5=event.ha1_md5,
        ha1_sha256=event.ha1_sha256,
        created_at=event.at,
        updated_at=event.at,
    )
    return Applied({"extension": event.extension})


@applies(ExtensionUpdated)
def _extension_updated(state: State, event: ExtensionUpdated) -> Applied | Rejected:
    current = state.extensions.get(event.extension)
    if current is None:
        return Rejected("extension", "no such extension")
    if (message := check_display_name(event.display_name)) is not None:
        return Rejected("display_name", message)
    state.extensions[event.extension] = Extension(
        extension=current.extension,
        display_name=event.display_name,
        realm=current.realm,
        ha1_md5=current.ha1_md5,
        ha1_sha256=current.ha1_sha256,
        created_at=current.created_at,
        updated_at=event.at,
    )
    return Applied({"extension": event.extension})


@applies(ExtensionDeleted)
def _extension_deleted(state: State, event: ExtensionDeleted) -> Applied | Rejected:
    if event.extension not in state.extensions:
        return Rejected("extension", "no such extension")
    del state.extensions[event.extension]
    state.drop_bindings_of(event.extension)  # its AoR is gone: so are its bindings (bindings.py)
    return Applied({"extension": event.extension})


@applies(CredentialChanged)
def _credential_changed(state: State, event: CredentialChanged) -> Applied | Rejected:
    current = state.extensions.get(event.extension)
    if current is None:
        return Rejected("extension", "no such extension")
    if (rejected := _check_credentials(event.realm, event.ha1_md5, event.ha1_sha256)) is not None:
        return rejected
    state.extensions[event.extension] = Extension(
        extension=current.extension,
        display_name=current.display_name,
        realm=event.realm,
        ha1_md5=event.ha1_md5,
        ha1_sha256=event.ha1_sha256,
        created_at=current.created_at,
        updated_at=event.at,
    )
    return Applied({"extension": event.extension})
