"""Snapshots: the whole `State` as msgpack bytes, and back.

Theory of operation: Raft compacts its log by asking for a snapshot; a node that restarts or lags
restores one and then applies the entries after it. Restoring must therefore rebuild *exactly* the
state that produced the snapshot, including what decides future outcomes and digests: `applied_index`,
`digest`, the dedupe window with its order and its limit, and the insertion order of every map.

Format (a msgpack map; keys are section names so later issues can add sections):

    {"format": 1, "applied_index": int, "digest": bin(32), "dedupe_limit": int,
     "dedupe": [[op_id, outcome], ...oldest first],
     "extensions": [[extension, display_name, realm, ha1_md5, ha1_sha256, created_at, updated_at], ...]}

Invariants: `snapshot(restore(b)) == b` for any `b` that `snapshot` produced and
`restore(snapshot(s)) == s` with the same iteration orders. `restore` is total: anything that is not a
valid snapshot of a known format raises `CodecError`, never another exception. Unknown sections are
refused rather than ignored (a snapshot from newer code must not be half understood). A future format
adds sections with a bumped `SNAPSHOT_FORMAT` and keeps restoring older formats by filling defaults.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import msgpack

from .codec import MAX_OP_ID_LENGTH
from .errors import CodecError
from .model import DIGEST_SIZE, Extension, State
from .outcomes import Applied, Rejected, outcome_from_wire, outcome_to_wire
from .schema import field_specs
from .validation import check_display_name, check_extension, check_ha1_md5, check_ha1_sha256, check_realm

SNAPSHOT_FORMAT = 1

_SECTIONS = frozenset({"format", "applied_index", "digest", "dedupe_limit", "dedupe", "extensions"})
_EXTENSION_SPECS = field_specs(Extension)
_MAX_INT = 2**63 - 1


def snapshot(state: State) -> bytes:
    """Serialise `state` (deterministic: equal states with equal orders give equal bytes)."""
    extensions = [
        [spec.to_wire(getattr(record, spec.name)) for spec in _EXTENSION_SPECS]
        for record in state.extensions.values()
    ]
    try:
        return msgpack.packb(
            {
                "format": SNAPSHOT_FORMAT,
                "applied_index": state.applied_index,
                "digest": state.digest,
                "dedupe_limit": state.dedupe_limit,
                "dedupe": [[op_id, outcome_to_wire(outcome)] for op_id, outcome in state.dedupe.items()],
                "extensions": extensions,
            },
            use_bin_type=True,
        )
    except CodecError:
        raise
    except Exception as exc:
        raise CodecError(f"cannot snapshot state: {exc}") from None


def _int(value: Any, name: str, minimum: int) -> int:
    if type(value) is not int or not minimum <= value <= _MAX_INT:
        raise CodecError(f"snapshot: {name} must be an integer >= {minimum}")
    return value


def _extensions(data: Any) -> dict[str, Extension]:
    if type(data) is not list:
        raise CodecError("snapshot: extensions must be an array")
    extensions: dict[str, Extension] = {}
    for item in data:
        if type(item) is not list or len(item) != len(_EXTENSION_SPECS):
            raise CodecError("snapshot: malformed extension record")
        try:
            values = {
                spec.name: spec.from_wire(value) for spec, value in zip(_EXTENSION_SPECS, item, strict=True)
            }
        except CodecError as exc:
            raise CodecError(f"snapshot: extension record: {exc}") from None
        record = Extension(**values)
        for field, message in (
            ("extension", check_extension(record.extension)),
            ("display_name", check_display_name(record.display_name)),
            ("realm", check_realm(record.realm)),
            ("ha1_md5", check_ha1_md5(record.ha1_md5)),
            ("ha1_sha256", check_ha1_sha256(record.ha1_sha256)),
        ):
            if message is not None:
                raise CodecError(f"snapshot: extension {field}: {message}")
        if record.extension in extensions:
            raise CodecError("snapshot: duplicate extension")
        extensions[record.extension] = record
    return extensions


def _dedupe(data: Any, limit: int) -> OrderedDict[str, Applied | Rejected]:
    if type(data) is not list:
        raise CodecError("snapshot: dedupe must be an array")
    if len(data) > limit:
        raise CodecError("snapshot: dedupe window larger than its limit")
    window: OrderedDict[str, Applied | Rejected] = OrderedDict()
    for item in data:
        if type(item) is not list or len(item) != 2:
            raise CodecError("snapshot: malformed dedupe item")
        op_id, outcome = item
        if type(op_id) is not str or not op_id or len(op_id) > MAX_OP_ID_LENGTH:
            raise CodecError("snapshot: malformed op_id")
        if op_id in window:
            raise CodecError("snapshot: duplicate op_id in dedupe window")
        window[op_id] = outcome_from_wire(outcome)
    return window


def restore(data: bytes) -> State:
    """Rebuild the `State` that `snapshot` serialised; CodecError on anything else."""
    if type(data) is not bytes:
        raise CodecError(f"snapshot: expected bytes, got {type(data).__name__}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, timestamp=0)
    except Exception as exc:
        raise CodecError(f"snapshot: not valid msgpack ({type(exc).__name__})") from None
    if type(obj) is not dict:
        raise CodecError("snapshot: expected a map")
    version = obj.get("format")
    if type(version) is not int or version != SNAPSHOT_FORMAT:
        raise CodecError(f"snapshot: unsupported format {version!r}")
    if set(obj) != _SECTIONS:
        raise CodecError(f"snapshot: expected sections {sorted(_SECTIONS)}, got {sorted(map(str, obj))}")
    digest = obj["digest"]
    if type(digest) is not bytes or len(digest) != DIGEST_SIZE:
        raise CodecError(f"snapshot: digest must be {DIGEST_SIZE} bytes")
    limit = _int(obj["dedupe_limit"], "dedupe_limit", 1)
    return State(
        extensions=_extensions(obj["extensions"]),
        applied_index=_int(obj["applied_index"], "applied_index", 0),
        digest=digest,
        dedupe=_dedupe(obj["dedupe"], limit),
        dedupe_limit=limit,
    )
