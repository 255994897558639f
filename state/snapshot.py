"""Snapshots: the whole `State` as msgpack bytes, and back.

Theory of operation: Raft compacts its log by asking for a snapshot; a node that restarts or lags
restores one and then applies the entries after it. Restoring must therefore rebuild *exactly* the
state that produced the snapshot, including what decides future outcomes and digests: `applied_index`,
`digest`, the dedupe window with its order and its limit, and the insertion order of every map.

Format 4 (a msgpack map; keys are section names so later issues can add sections):

    {"format": 4, "applied_index": int, "digest": bin(32), "dedupe_limit": int,
     "dedupe": [[op_id, outcome], ...oldest first],
     "extensions": [[extension, display_name, realm, ha1_md5, ha1_sha256, created_at, updated_at], ...],
     "bindings": [[aor, key, contact, ..., updated_at], ...]        (fields of `model.Binding`, grouped
                                                                    by AoR, each AoR's rows contiguous),
     "calls": [[call_id, ..., nodes, trunk, direction], ...],       (fields of `model.Call`, start order)
     "finished_calls": [[...], ...],                                (same rows, oldest first)
     "call_tail_limit": int,
     "drained": [[node_id, drained_at], ...],                       (drain order; see `cluster.py`)
     "trunks": [[name, peers, ..., updated_at], ...],               (fields of `model.Trunk`, creation order)
     "routes": [[name, pattern, ..., updated_at], ...]}             (fields of `model.Route`, creation order)

Older formats are still restored: format 3 (before trunks existed) had every section but "trunks" and
"routes", and call rows without the last two fields (`trunk`, `direction`), and restores with no trunk,
no route and calls that crossed no trunk; format 2 (same call rows) (before drain existed) had every section but "drained" and
restores with no drained node; format 1 (before bindings and calls existed) had only the first six
sections and restores with no bindings, no calls, the default tail limit and no drained node. `snapshot`
always writes format 4. The binding expiry index is not stored: `State.__post_init__` rebuilds it.

Invariants: `snapshot(restore(b)) == b` for any `b` that `snapshot` produced and
`restore(snapshot(s)) == s` with the same iteration orders. `restore` is total: anything that is not a
valid snapshot of a known format raises `CodecError`, never another exception. Unknown sections are
refused rather than ignored (a snapshot from newer code must not be half understood). Restored records
satisfy the same rules `apply` enforces (bindings belong to extensions, a call is active or ended, trunks
and routes obey `trunks.py`'s field rules, allow-lists do not overlap, every route's trunk exists).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import msgpack

from .cluster import check_node_id
from .codec import MAX_OP_ID_LENGTH
from .errors import CodecError
from .model import (
    DEFAULT_CALL_TAIL_LIMIT,
    DIGEST_SIZE,
    Binding,
    Call,
    Extension,
    Route,
    State,
    Trunk,
    binding_key,
)
from .outcomes import Applied, Rejected, outcome_from_wire, outcome_to_wire
from .schema import FieldSpec, field_specs
from .trunks import allow_overlap, check_route_record, check_trunk_record
from .validation import check_display_name, check_extension, check_ha1_md5, check_ha1_sha256, check_realm

SNAPSHOT_FORMAT = 4

_SECTIONS_V1 = frozenset({"format", "applied_index", "digest", "dedupe_limit", "dedupe", "extensions"})
_SECTIONS_V2 = _SECTIONS_V1 | {"bindings", "calls", "finished_calls", "call_tail_limit"}
_SECTIONS_V3 = _SECTIONS_V2 | {"drained"}
_SECTIONS = _SECTIONS_V3 | {"trunks", "routes"}
_SECTIONS_OF = {1: _SECTIONS_V1, 2: _SECTIONS_V2, 3: _SECTIONS_V3, SNAPSHOT_FORMAT: _SECTIONS}
_EXTENSION_SPECS = field_specs(Extension)
_BINDING_SPECS = field_specs(Binding)
_CALL_SPECS = field_specs(Call)
_TRUNK_SPECS = field_specs(Trunk)
_ROUTE_SPECS = field_specs(Route)
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
                "bindings": [
                    _row(_BINDING_SPECS, binding)
                    for table in state.bindings.values()
                    for binding in table.values()
                ],
                "calls": [_row(_CALL_SPECS, call) for call in state.calls.values()],
                "finished_calls": [_row(_CALL_SPECS, call) for call in state.finished_calls.values()],
                "call_tail_limit": state.call_tail_limit,
                "drained": [[node_id, float(at)] for node_id, at in state.drained.items()],
                "trunks": [_row(_TRUNK_SPECS, trunk) for trunk in state.trunks.values()],
                "routes": [_row(_ROUTE_SPECS, route) for route in state.routes.values()],
            },
            use_bin_type=True,
        )
    except CodecError:
        raise
    except Exception as exc:
        raise CodecError(f"cannot snapshot state: {exc}") from None


def _row(specs: tuple[FieldSpec, ...], record: Any) -> list[Any]:
    return [spec.to_wire(getattr(record, spec.name)) for spec in specs]


def _record(specs: tuple[FieldSpec, ...], item: Any, what: str) -> dict[str, Any]:
    if type(item) is not list or len(item) != len(specs):
        raise CodecError(f"snapshot: malformed {what} record")
    try:
        return {spec.name: spec.from_wire(value) for spec, value in zip(specs, item, strict=True)}
    except CodecError as exc:
        raise CodecError(f"snapshot: {what} record: {exc}") from None


def _bindings(data: Any, extensions: dict[str, Extension]) -> dict[str, dict[str, Binding]]:
    if type(data) is not list:
        raise CodecError("snapshot: bindings must be an array")
    bindings: dict[str, dict[str, Binding]] = {}
    previous_aor: str | None = None
    for item in data:
        binding = Binding(**_record(_BINDING_SPECS, item, "binding"))
        if binding.aor not in extensions:
            raise CodecError("snapshot: binding of an unknown extension")
        if binding.key != binding_key(binding.contact_key, binding.instance_id, binding.reg_id):
            raise CodecError("snapshot: binding key does not match its contact")
        if binding.q is not None and not 0.0 <= binding.q <= 1.0:
            raise CodecError("snapshot: binding q out of range")
        if binding.aor != previous_aor and binding.aor in bindings:
            raise CodecError("snapshot: bindings of one extension must be contiguous")
        table = bindings.setdefault(binding.aor, {})
        if binding.key in table:
            raise CodecError("snapshot: duplicate binding")
        table[binding.key] = binding
        previous_aor = binding.aor
    return bindings


_CALL_DIRECTIONS = ("", "inbound", "outbound")


def _calls(data: Any, what: str, *, ended: bool, version: int) -> OrderedDict[str, Call]:
    if type(data) is not list:
        raise CodecError(f"snapshot: {what} must be an array")
    specs = _CALL_SPECS if version >= 4 else _CALL_SPECS[:-2]  # format <= 3: no trunk, no direction
    calls: OrderedDict[str, Call] = OrderedDict()
    for item in data:
        call = Call(**_record(specs, item, "call"))
        if call.direction not in _CALL_DIRECTIONS or (call.trunk == "") != (call.direction == ""):
            raise CodecError(f"snapshot: malformed call trunk or direction in {what}")
        if (call.ended_at is not None) != ended or not call.call_id:
            raise CodecError(f"snapshot: malformed call in {what}")
        if list(call.nodes) != sorted(set(call.nodes)):
            raise CodecError("snapshot: call nodes must be sorted and unique")
        if call.call_id in calls:
            raise CodecError("snapshot: duplicate call")
        calls[call.call_id] = call
    return calls


def _drained(data: Any) -> dict[str, float]:
    if type(data) is not list:
        raise CodecError("snapshot: drained must be an array")
    drained: dict[str, float] = {}
    for item in data:
        if type(item) is not list or len(item) != 2:
            raise CodecError("snapshot: malformed drained item")
        node_id, at = item
        if type(node_id) is not str or check_node_id(node_id) is not None:
            raise CodecError("snapshot: malformed drained node id")
        if type(at) is not float or not math.isfinite(at):
            raise CodecError("snapshot: drained time must be a finite float")
        if node_id in drained:
            raise CodecError("snapshot: duplicate drained node")
        drained[node_id] = at
    return drained


def _trunks(data: Any) -> dict[str, Trunk]:
    if type(data) is not list:
        raise CodecError("snapshot: trunks must be an array")
    trunks: dict[str, Trunk] = {}
    probe = State(trunks=trunks)
    for item in data:
        trunk = Trunk(**_record(_TRUNK_SPECS, item, "trunk"))
        if (bad := check_trunk_record(trunk)) is not None:
            raise CodecError(f"snapshot: trunk {bad[0]}: {bad[1]}")
        if trunk.name in trunks:
            raise CodecError("snapshot: duplicate trunk")
        if allow_overlap(probe, trunk.name, trunk.allow) is not None:
            raise CodecError("snapshot: overlapping trunk allow-lists")
        trunks[trunk.name] = trunk
    return trunks


def _routes(data: Any, trunks: dict[str, Trunk]) -> dict[str, Route]:
    if type(data) is not list:
        raise CodecError("snapshot: routes must be an array")
    routes: dict[str, Route] = {}
    for item in data:
        route = Route(**_record(_ROUTE_SPECS, item, "route"))
        if (bad := check_route_record(route)) is not None:
            raise CodecError(f"snapshot: route {bad[0]}: {bad[1]}")
        if route.trunk not in trunks:
            raise CodecError("snapshot: route to an unknown trunk")
        if route.name in routes:
            raise CodecError("snapshot: duplicate route")
        routes[route.name] = route
    return routes


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
    if type(version) is not int or version not in _SECTIONS_OF:
        raise CodecError(f"snapshot: unsupported format {version!r}")
    sections = _SECTIONS_OF[version]
    if set(obj) != sections:
        raise CodecError(f"snapshot: expected sections {sorted(sections)}, got {sorted(map(str, obj))}")
    digest = obj["digest"]
    if type(digest) is not bytes or len(digest) != DIGEST_SIZE:
        raise CodecError(f"snapshot: digest must be {DIGEST_SIZE} bytes")
    limit = _int(obj["dedupe_limit"], "dedupe_limit", 1)
    extensions = _extensions(obj["extensions"])
    bindings: dict[str, dict[str, Binding]] = {}
    calls: OrderedDict[str, Call] = OrderedDict()
    finished: OrderedDict[str, Call] = OrderedDict()
    tail_limit = DEFAULT_CALL_TAIL_LIMIT
    drained: dict[str, float] = {}
    if version >= 2:
        bindings = _bindings(obj["bindings"], extensions)
        calls = _calls(obj["calls"], "calls", ended=False, version=version)
        finished = _calls(obj["finished_calls"], "finished_calls", ended=True, version=version)
        tail_limit = _int(obj["call_tail_limit"], "call_tail_limit", 1)
        if len(finished) > tail_limit:
            raise CodecError("snapshot: finished calls exceed their limit")
        if not calls.keys().isdisjoint(finished.keys()):
            raise CodecError("snapshot: a call is both active and finished")
    if version >= 3:
        drained = _drained(obj["drained"])
    trunks: dict[str, Trunk] = {}
    routes: dict[str, Route] = {}
    if version >= 4:
        trunks = _trunks(obj["trunks"])
        routes = _routes(obj["routes"], trunks)
    return State(
        extensions=extensions,
        applied_index=_int(obj["applied_index"], "applied_index", 0),
        digest=digest,
        dedupe=_dedupe(obj["dedupe"], limit),
        dedupe_limit=limit,
        bindings=bindings,
        calls=dict(calls),
        finished_calls=finished,
        call_tail_limit=tail_limit,
        drained=drained,
        trunks=trunks,
        routes=routes,
    )
