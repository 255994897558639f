"""Snapshots: the whole `State` as msgpack bytes, and back.

Theory of operation: Raft compacts its log by asking for a snapshot; a node that restarts or lags
restores one and then applies the entries after it. Restoring must therefore rebuild *exactly* the
state that produced the snapshot, including what decides future outcomes and digests: `applied_index`,
`digest`, the dedupe window with its order and its limit, and the insertion order of every map.

Format 5 (a msgpack map; keys are section names so later issues can add sections). The three big sections
are columns (a map from field name to the list of that field's values, in record order), the others rows:

    {"format": 5, "applied_index": int, "digest": bin(32), "dedupe_limit": int,
     "dedupe": {"op_id": [...], "outcome": [bin, ...]},             (oldest first; each outcome the msgpack
                                                                    bytes of [0, result] / [1, field, msg])
     "extensions": {"extension": [...], "display_name": [...], "realm": [...],
                    "ha1": [bin(48), ...], "created_at": [...], "updated_at": [...]},
                                                                    (ha1 = MD5 digest then SHA-256 digest)
     "bindings": {"aor": [...], "key": [...], ..., "updated_at": [...]}
                                                                    (every field of `model.Binding`,
                                                                    grouped by AoR, each AoR contiguous),
     "calls": [[call_id, ..., nodes, trunk, direction], ...],       (fields of `model.Call`, start order)
     "finished_calls": [[...], ...],                                (same rows, oldest first)
     "call_tail_limit": int,
     "drained": [[node_id, drained_at], ...],                       (drain order; see `cluster.py`)
     "trunks": [[name, peers, ..., updated_at], ...],               (fields of `model.Trunk`, creation order)
     "routes": [[name, pattern, ..., updated_at], ...]}             (fields of `model.Route`, creation order)

Why columns (issue 8, cold restart): restoring 100,000 extensions and bindings from rows cost one converter
call per field per record (5.4 s of a 20 s restart measured); columns are checked with one C-level pass each
(`map`, `set`, `min`/`max`), text with few distinct values (realms, display names) is validated once per
value, and repeated strings are shared on the way in (a binding's AoR is its extension's key object;
transports, node ids and realms are interned), so a restored node also uses less memory. HA1s are stored as
the 48 bytes the `Extension` record holds (a third of the hex text).

Older formats are still restored: format 4 had the same sections with rows everywhere:
"dedupe": [[op_id, outcome], ...], "extensions": [[extension, display_name, realm, ha1_md5, ha1_sha256,
created_at, updated_at], ...] (HA1s as lowercase hex), "bindings": [[aor, key, ..., updated_at], ...];
format 3 (before trunks existed) had every section but "trunks" and "routes", and call rows without the
last two fields (`trunk`, `direction`), and restores with no trunk, no route and calls that crossed no
trunk; format 2 (same call rows) (before drain existed) had every section but "drained" and restores with no
drained node; format 1 (before bindings and calls existed) had only the first six sections and restores
with no bindings, no calls, the default tail limit and no drained node. `snapshot` always writes format 5.
The binding expiry index is not stored: `State.__post_init__` rebuilds it.

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
from dataclasses import dataclass
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
    DedupeWindow,
    Extension,
    Route,
    State,
    Trunk,
    binding_key,
    intern_text,
    unpack_outcome,
)
from .outcomes import Applied, Rejected, outcome_from_wire, outcome_to_wire
from .schema import FieldSpec, field_specs
from .trunks import allow_overlap, check_route_record, check_trunk_record
from .validation import check_display_name, check_extension, check_ha1_md5, check_ha1_sha256, check_realm

SNAPSHOT_FORMAT = 5

_SECTIONS_V1 = frozenset({"format", "applied_index", "digest", "dedupe_limit", "dedupe", "extensions"})
_SECTIONS_V2 = _SECTIONS_V1 | {"bindings", "calls", "finished_calls", "call_tail_limit"}
_SECTIONS_V3 = _SECTIONS_V2 | {"drained"}
_SECTIONS = _SECTIONS_V3 | {"trunks", "routes"}
_SECTIONS_OF = {1: _SECTIONS_V1, 2: _SECTIONS_V2, 3: _SECTIONS_V3, 4: _SECTIONS, SNAPSHOT_FORMAT: _SECTIONS}


@dataclass(frozen=True, slots=True)
class _ExtensionRow:
    """An extension record as formats 1-4 wrote it (HA1s as hex text)."""

    extension: str
    display_name: str
    realm: str
    ha1_md5: str
    ha1_sha256: str
    created_at: float
    updated_at: float


_EXTENSION_SPECS = field_specs(_ExtensionRow)
_BINDING_SPECS = field_specs(Binding)
_CALL_SPECS = field_specs(Call)
_TRUNK_SPECS = field_specs(Trunk)
_ROUTE_SPECS = field_specs(Route)
_MAX_INT = 2**63 - 1


def snapshot(state: State) -> bytes:
    """Serialise `state` in format 5 (deterministic: equal states with equal orders give equal bytes)."""
    try:
        return msgpack.packb(
            {
                "format": SNAPSHOT_FORMAT,
                "applied_index": state.applied_index,
                "digest": state.digest,
                "dedupe_limit": state.dedupe_limit,
                "dedupe": _dedupe_columns(state.dedupe),
                "extensions": _extension_columns(list(state.extensions.values())),
                "bindings": _binding_columns(
                    [binding for table in state.bindings.values() for binding in table.values()]
                ),
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


def _dedupe_columns(window: OrderedDict[str, Applied | Rejected]) -> dict[str, list[Any]]:
    pairs = window.packed_items() if isinstance(window, DedupeWindow) else list(window.items())
    return {
        "op_id": [op_id for op_id, _ in pairs],
        "outcome": [raw if type(raw) is bytes else _packed(raw) for _, raw in pairs],
    }


def _packed(outcome: Any) -> bytes:
    packed: bytes = msgpack.packb(outcome_to_wire(outcome), use_bin_type=True)
    return packed


def _floats(values: list[Any]) -> list[float]:
    return [_FLOAT_TO_WIRE(value) for value in values]


def _extension_columns(records: list[Extension]) -> dict[str, list[Any]]:
    for record in records:
        if type(record.ha1) is not bytes:  # only a record built around apply's checks can hold these
            raise CodecError("cannot snapshot state: an extension with malformed HA1s")
    return {
        "extension": [record.extension for record in records],
        "display_name": [record.display_name for record in records],
        "realm": [record.realm for record in records],
        "ha1": [record.ha1 for record in records],
        "created_at": _floats([record.created_at for record in records]),
        "updated_at": _floats([record.updated_at for record in records]),
    }


def _binding_columns(records: list[Binding]) -> dict[str, list[Any]]:
    columns: dict[str, list[Any]] = {}
    for spec in _BINDING_SPECS:
        name = spec.name
        values = [getattr(record, name) for record in records]
        if name in _BINDING_FLOATS:
            values = _floats(values)
        elif name == "q":
            values = [None if value is None else _FLOAT_TO_WIRE(value) for value in values]
        elif name == "path":
            values = [spec.to_wire(value) for value in values]
        columns[name] = values
    return columns


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
_BINDING_FLOATS = frozenset({"expires_at", "registered_at", "updated_at"})
_BINDING_TEXTS = ("aor", "key", "contact", "contact_key", "call_id", "received", "transport", "instance_id",
                  "flow", "node_id")
_BINDING_INTS = ("cseq", "reg_id")
_FLOAT_TO_WIRE = next(spec for spec in _BINDING_SPECS if spec.name == "expires_at").to_wire
_EXTENSION_COLUMNS = ("extension", "display_name", "realm", "ha1", "created_at", "updated_at")
_HA1_SIZE = 16 + 32  # MD5 then SHA-256 digest


# --- format 5: columns -----------------------------------------------------------------------------------
#
# Extensions, bindings and the dedupe window (the big sections) are stored as columns: a map from field name
# to the list of that field's values, in record order. Restoring checks each column in one pass with C-level
# helpers (`map`, `set`, `min`/`max`) instead of one converter call per field per record, validates
# low-cardinality text (realms, display names) once per distinct value, shares repeated strings (a binding's
# AoR is the extension's own key object; transports, node ids and realms are interned) and keeps the HA1s as
# the 48 bytes the `Extension` record holds. Small sections (calls, trunks, routes, drained) keep rows.


def _columns(data: Any, names: tuple[str, ...], what: str) -> list[list[Any]]:
    if type(data) is not dict or len(data) != len(names) or any(name not in data for name in names):
        raise CodecError(f"snapshot: {what} must be a map of the columns {', '.join(names)}")
    columns = [data[name] for name in names]
    if any(type(column) is not list for column in columns):
        raise CodecError(f"snapshot: {what} columns must be arrays")
    if len({len(column) for column in columns}) > 1:
        raise CodecError(f"snapshot: {what} columns of different lengths")
    return columns


def _only(column: list[Any], kind: type, what: str) -> None:
    if not set(map(type, column)) <= {kind}:
        raise CodecError(f"snapshot: {what}: expected only {kind.__name__} values")


def _finite_floats(column: list[Any], what: str) -> None:
    _only(column, float, what)
    if not all(map(math.isfinite, column)):
        raise CodecError(f"snapshot: {what}: float is not finite")


def _int64(column: list[Any], what: str) -> None:
    _only(column, int, what)
    if column and not (min(column) >= -(2**63) and max(column) <= _MAX_INT):
        raise CodecError(f"snapshot: {what}: integer out of 64-bit range")


def _check_distinct(column: list[str], check: Any, what: str) -> None:
    for value in set(column):
        if (message := check(value)) is not None:
            raise CodecError(f"snapshot: extension {what}: {message}")


def _extensions_v5(data: Any) -> dict[str, Extension]:
    number, display, realm, ha1, created, updated = _columns(data, _EXTENSION_COLUMNS, "extensions")
    for column, name in ((number, "extension"), (display, "display_name"), (realm, "realm")):
        _only(column, str, f"extension {name}")
    _only(ha1, bytes, "extension ha1")
    _finite_floats(created, "extension created_at")
    _finite_floats(updated, "extension updated_at")
    if any(map(check_extension, number)):
        bad = next(message for message in map(check_extension, number) if message is not None)
        raise CodecError(f"snapshot: extension extension: {bad}")
    _check_distinct(display, check_display_name, "display_name")
    _check_distinct(realm, check_realm, "realm")
    if not set(map(len, ha1)) <= {_HA1_SIZE}:
        raise CodecError(f"snapshot: extension ha1: expected {_HA1_SIZE} bytes")
    extensions = dict(zip(number, map(Extension.from_packed, number, display, realm, ha1, created, updated),
                          strict=True))
    if len(extensions) != len(number):
        raise CodecError("snapshot: duplicate extension")
    return extensions


def _bindings_v5(data: Any, extensions: dict[str, Extension]) -> dict[str, dict[str, Binding]]:
    names = tuple(spec.name for spec in _BINDING_SPECS)
    columns = dict(zip(names, _columns(data, names, "bindings"), strict=True))
    for name in _BINDING_TEXTS:
        _only(columns[name], str, f"binding {name}")
    for name in _BINDING_FLOATS:
        _finite_floats(columns[name], f"binding {name}")
    for name in _BINDING_INTS:
        _int64(columns[name], f"binding {name}")
    q = columns["q"]
    if not all(value is None or (type(value) is float and 0.0 <= value <= 1.0) for value in q):
        raise CodecError("snapshot: binding q out of range")
    path = columns["path"]
    _only(path, list, "binding path")
    if not all(set(map(type, hops)) <= {str} for hops in path if hops):
        raise CodecError("snapshot: binding path: expected arrays of strings")
    columns["path"] = [tuple(hops) if hops else () for hops in path]
    own = {number: number for number in extensions}  # a binding's AoR shares the extension's key object
    aor = columns["aor"]
    if not all(map(own.__contains__, aor)):
        raise CodecError("snapshot: binding of an unknown extension")
    columns["aor"] = list(map(own.__getitem__, aor))
    for name in ("transport", "node_id", "instance_id", "flow"):
        columns[name] = list(map(intern_text, columns[name]))
    if any(map(_key_mismatch, columns["key"], columns["contact_key"], columns["instance_id"], columns["reg_id"])):
        raise CodecError("snapshot: binding key does not match its contact")
    bindings: dict[str, dict[str, Binding]] = {}
    previous_aor: str | None = None
    table: dict[str, Binding] = {}
    for binding in map(Binding, *(columns[name] for name in names)):
        if binding.aor != previous_aor:
            if binding.aor in bindings:
                raise CodecError("snapshot: bindings of one extension must be contiguous")
            table = bindings[binding.aor] = {}
            previous_aor = binding.aor
        if binding.key in table:
            raise CodecError("snapshot: duplicate binding")
        table[binding.key] = binding
    return bindings


def _key_mismatch(key: str, contact_key: str, instance_id: str, reg_id: int) -> bool:
    return key != binding_key(contact_key, instance_id, reg_id)


def _dedupe_v5(data: Any, limit: int) -> OrderedDict[str, Applied | Rejected]:
    op_ids, outcomes = _columns(data, ("op_id", "outcome"), "dedupe")
    if len(op_ids) > limit:
        raise CodecError("snapshot: dedupe window larger than its limit")
    _only(op_ids, str, "dedupe op_id")
    if op_ids and not (min(map(len, op_ids)) >= 1 and max(map(len, op_ids)) <= MAX_OP_ID_LENGTH):
        raise CodecError("snapshot: malformed op_id")
    _only(outcomes, bytes, "dedupe outcome")
    for raw in outcomes:  # each must be a valid outcome that packs back to the same bytes
        try:
            outcome = unpack_outcome(raw)
        except CodecError:
            raise CodecError("snapshot: malformed dedupe outcome") from None
        except Exception:
            raise CodecError("snapshot: dedupe outcome is not valid msgpack") from None
        if _packed(outcome) != raw:
            raise CodecError("snapshot: dedupe outcome not in its canonical form")
    window = DedupeWindow()
    for op_id, raw in zip(op_ids, outcomes, strict=True):
        window.set_packed(op_id, raw)
    if len(window) != len(op_ids):
        raise CodecError("snapshot: duplicate op_id in dedupe window")
    return window


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
    extensions = _extensions_v5(obj["extensions"]) if version >= 5 else _extensions(obj["extensions"])
    bindings: dict[str, dict[str, Binding]] = {}
    calls: OrderedDict[str, Call] = OrderedDict()
    finished: OrderedDict[str, Call] = OrderedDict()
    tail_limit = DEFAULT_CALL_TAIL_LIMIT
    drained: dict[str, float] = {}
    if version >= 2:
        bindings = (_bindings_v5 if version >= 5 else _bindings)(obj["bindings"], extensions)
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
        dedupe=(_dedupe_v5 if version >= 5 else _dedupe)(obj["dedupe"], limit),
        dedupe_limit=limit,
        bindings=bindings,
        calls=dict(calls),
        finished_calls=finished,
        call_tail_limit=tail_limit,
        drained=drained,
        trunks=trunks,
        routes=routes,
    )
