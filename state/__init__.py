"""Pure, replicated state: events, apply, decisions, snapshots, digests. No I/O, no clock.

The replication layer calls `apply_entry(state, entry, index)` for each committed log entry and
`snapshot` / `restore` for compaction; proposers build entries with `decide_*` and `encode_batch`.
"""

from .apply import APPLIERS, applies, apply, apply_entry
from .codec import BATCH_FORMAT, Command, decode_batch, decode_command, encode_batch, encode_command
from .credentials import ha1_md5, ha1_sha256
from .decisions import decide_create_extension, decide_delete_extension, decide_update_extension
from .errors import CodecError, StateError, ValidationError
from .events import (
    EVENT_TYPES,
    CredentialChanged,
    Event,
    ExtensionCreated,
    ExtensionDeleted,
    ExtensionUpdated,
    register_event,
    upcaster,
)
from .model import DEFAULT_DEDUPE_LIMIT, Extension, State, digest_hex
from .outcomes import Applied, Duplicate, Outcome, Rejected
from .snapshot import SNAPSHOT_FORMAT, restore, snapshot

__all__ = [
    "APPLIERS",
    "BATCH_FORMAT",
    "DEFAULT_DEDUPE_LIMIT",
    "EVENT_TYPES",
    "SNAPSHOT_FORMAT",
    "Applied",
    "CodecError",
    "Command",
    "CredentialChanged",
    "Duplicate",
    "Event",
    "Extension",
    "ExtensionCreated",
    "ExtensionDeleted",
    "ExtensionUpdated",
    "Outcome",
    "Rejected",
    "State",
    "StateError",
    "ValidationError",
    "applies",
    "apply",
    "apply_entry",
    "decide_create_extension",
    "decide_delete_extension",
    "decide_update_extension",
    "decode_batch",
    "decode_command",
    "digest_hex",
    "encode_batch",
    "encode_command",
    "ha1_md5",
    "ha1_sha256",
    "register_event",
    "restore",
    "snapshot",
    "upcaster",
]
