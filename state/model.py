"""The hot replicated state.

Theory of operation: `State` is a plain mutable container that only `apply.py` mutates (and
`snapshot.restore` builds). Every node that applied the same log prefix holds an equal `State`: same
extensions, same `applied_index`, same chained `digest`, same dedupe window in the same order.

Invariants:
* `extensions[n].extension == n`; `Extension` records are frozen and replaced whole on change, so a
  reader holding one never sees it half-updated;
* `digest` is 32 bytes: all zero initially, then `sha256(digest || command bytes)` for every command
  of the log that was not a duplicate (see `apply.apply_entry`);
* `dedupe` maps op_id -> first outcome in insertion order and never holds more than `dedupe_limit`
  entries (oldest evicted first); the limit is part of the state and of snapshots because eviction
  decides future outcomes, so it must be the same on every node.

New kinds of hot state (bindings, calls, a call-record tail) are added as further fields here, one
`apply` function per event in `apply.py`, and one section in `snapshot.py`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .errors import StateError
from .outcomes import Applied, Rejected

DEFAULT_DEDUPE_LIMIT = 100_000
DIGEST_SIZE = 32


@dataclass(frozen=True, slots=True)
class Extension:
    """An extension and its digest credentials for `realm` (HA1s; the password is never kept)."""

    extension: str
    display_name: str
    realm: str
    ha1_md5: str
    ha1_sha256: str
    created_at: float
    updated_at: float

    def to_dict(self) -> dict[str, Any]:
        """Public view for the RPC layer (HA1 values are password-equivalent and left out)."""
        return {
            "extension": self.extension,
            "display_name": self.display_name,
            "realm": self.realm,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(slots=True)
class State:
    """Everything the cluster replicates, plus the bookkeeping that proves nodes agree."""

    extensions: dict[str, Extension] = field(default_factory=dict)
    applied_index: int = 0
    digest: bytes = bytes(DIGEST_SIZE)
    dedupe: OrderedDict[str, Applied | Rejected] = field(default_factory=OrderedDict)
    dedupe_limit: int = DEFAULT_DEDUPE_LIMIT

    def __post_init__(self) -> None:
        if type(self.dedupe_limit) is not int or self.dedupe_limit < 1:
            raise StateError("dedupe_limit must be a positive integer")
        if len(self.digest) != DIGEST_SIZE:
            raise StateError(f"digest must be {DIGEST_SIZE} bytes")


def digest_hex(state: State) -> str:
    """The chained state digest as 64 lowercase hex digits (compare across nodes at equal applied_index)."""
    return state.digest.hex()
