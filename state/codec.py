"""Log entry codec: a batch of commands as msgpack bytes.

Theory of operation. One Raft log entry is one batch:

    entry   = msgpack [BATCH_FORMAT, [command_bytes, ...]]      (an array of msgpack `bin` items)
    command = msgpack [op_id, [event_name, schema_version, {field: value, ...}]]

Each command is encoded separately and carried as opaque bytes inside the batch, so that `apply` can
chain the state digest over the exact bytes that are in the log (no re-encoding on any node, hence no
dependence on msgpack's output being canonical). Strings are UTF-8 `str`, binary is `bin`
(`use_bin_type`); nothing is ever pickled.

Decoding is total: any input yields commands or raises `CodecError`, never another exception (msgpack
errors, wrong shapes, unknown event names, unknown/missing fields, wrong field types, non-finite floats,
schema versions newer than this code, or older ones without an upcaster chain are all `CodecError`).
Older schema versions are upcast to the current one before the fields are checked (see `events.py`).

Performance: every node decodes every committed command (the Raft thread, under the state lock). The
field converters of `schema.py` cost one Python call per field and per nested record; a decoder compiled
per event class (`_fast_decoder`: straight-line exact-type checks, positional construction) takes the
common case instead. It accepts a strict subset of what the general path accepts and builds the same
values (built by `model.fast_constructor`); anything it does not accept (a wrong type, a missing field, an older schema version) goes
through the general path, which rebuilds the value or names the field in its `CodecError`. `_fast_command`
takes a whole command of the common case in one frame (unpack, envelope checks, compiled decoder), and
`decode_command` is called only for what it does not accept.

Encoding is done once per command, on the proposing node (for a REGISTER: the SIP thread). An encoder compiled
per event class (`_compile_encoder`: straight-line field reads, exact-type checks, one dict literal in field
order) writes the same map as the schema's converters, hence the same msgpack bytes; a value it does not take
as is (an int for a float field, a wrong type) goes through the general path, which converts it or names the
field. One module-level `msgpack.Packer` serves every pack (`packb` builds a Packer per call).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack
from mypy_extensions import mypyc_attr

from .errors import CodecError
from .events import EVENT_SPECS, EVENT_TYPES, UPCASTERS, Event
from .model import fast_constructor
from .schema import fields_from_wire

BATCH_FORMAT = 1
"""Version of the batch envelope; bumped only if the envelope itself changes."""

MAX_OP_ID_LENGTH = 128


@mypyc_attr(native_class=False)  # see setup.py: compiled with mypyc, kept a Python class
@dataclass(frozen=True, slots=True)
class Command:
    """One replicated command: an event and the op_id that makes retries idempotent."""

    op_id: str
    event: Event


def _unpack(data: Any, what: str) -> Any:
    if type(data) is not bytes:
        raise CodecError(f"{what}: expected bytes, got {type(data).__name__}")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, timestamp=0)
    except Exception as exc:  # msgpack raises a zoo of ValueError/TypeError/StackError subclasses.
        raise CodecError(f"{what}: not valid msgpack ({type(exc).__name__})") from None


_PACKER = msgpack.Packer(use_bin_type=True)  # = msgpack.packb without a Packer per call (pack holds the GIL)


def _pack(obj: Any) -> bytes:
    try:
        packed: bytes = _PACKER.pack(obj)
        return packed
    except Exception as exc:
        raise CodecError(f"cannot encode: {exc}") from None


def _check_op_id(op_id: Any) -> str:
    if type(op_id) is not str or not op_id:
        raise CodecError("op_id must be a non-empty string")
    if len(op_id) > MAX_OP_ID_LENGTH:
        raise CodecError(f"op_id longer than {MAX_OP_ID_LENGTH} characters")
    return op_id


# --- events ----------------------------------------------------------------------------------------------


def event_to_wire(event: Event) -> list[Any]:
    """`[name, schema_version, {field: value}]` for a registered event (CodecError otherwise)."""
    cls = type(event)
    encoder = _ENCODERS[cls] if cls in _ENCODERS else _compile_encoder(cls)
    if encoder is not None:
        compiled = encoder(event)
        if compiled is not _MISS:
            return [cls.__name__, cls.schema_version, compiled]
    specs = EVENT_SPECS.get(cls)
    if specs is None:
        raise CodecError(f"{cls.__name__} is not a registered event")
    fields: dict[str, Any] = {}
    for spec in specs:
        try:
            fields[spec.name] = spec.to_wire(getattr(event, spec.name))
        except CodecError as exc:
            raise CodecError(f"{cls.__name__}.{spec.name}: {exc}") from None
    return [cls.__name__, cls.schema_version, fields]


# --- compiled decoders (the fast path; see the module doc) -----------------------------------------------

_MISS: Any = object()
"""What a compiled decoder returns for anything it does not accept (the general path then decides)."""

_SCALAR_TESTS: dict[Any, str] = {
    str: "type({v}) is str",
    bytes: "type({v}) is bytes",
    bool: "type({v}) is bool",
    int: "type({v}) is int and -9223372036854775808 <= {v} <= 9223372036854775807",  # schema._check_int
    float: "type({v}) is float and _isfinite({v})",  # schema._float_from_wire: ints are refused on the wire
}


def _scalar_test(annotation: Any) -> str | None:
    """The exact-type test of a scalar (or optional scalar) annotation, as a template on `{v}`."""
    if annotation in _SCALAR_TESTS:
        return _SCALAR_TESTS[annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        others = [arg for arg in args if arg is not type(None)]
        if len(args) == 2 and len(others) == 1 and others[0] in _SCALAR_TESTS:
            return "({v} is None or " + _SCALAR_TESTS[others[0]] + ")"
    return None


def _shape_converter(
    annotation: Any,
    source: type[list[Any]] | type[tuple[Any, ...]],
    sink: Callable[[Any], Any],
    record: Callable[[Any], Callable[[Any], Any] | None],
) -> Callable[[Any], Any] | None:
    """value -> converted value or `_MISS`, for a non-scalar annotation (`tuple[X, ...]`, `X | None`, a record
    dataclass); None if unsupported. One shape walk for both directions: decoding reads msgpack lists into
    tuples (`_converter`), encoding writes tuples as lists (`_wire_converter`); `record` makes a record's
    converter for its direction."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        test = _scalar_test(args[0])
        if test is not None:
            item_ok = eval("lambda x: " + test.format(v="x"), {"_isfinite": math.isfinite})

            def scalars(value: Any) -> Any:
                if type(value) is not source:
                    return _MISS
                for item in value:
                    if not item_ok(item):
                        return _MISS
                return sink(value)

            return scalars
        inner = _shape_converter(args[0], source, sink, record)
        if inner is None:
            return None

        def records(value: Any, inner: Callable[[Any], Any] = inner) -> Any:
            # `_MISS in out` would compare each record with `==`: a dataclass __eq__ call per record.
            if type(value) is not source:
                return _MISS
            out = []
            for item in value:
                converted = inner(item)
                if converted is _MISS:
                    return _MISS
                out.append(converted)
            return sink(out)

        return records
    if origin in (typing.Union, types.UnionType):
        others = [arg for arg in args if arg is not type(None)]
        if len(args) == 2 and len(others) == 1:
            inner = _shape_converter(others[0], source, sink, record)
            if inner is None:
                return None

            def optional(value: Any, inner: Callable[[Any], Any] = inner) -> Any:
                return None if value is None else inner(value)

            return optional
        return None
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return record(annotation)
    return None


def _converter(annotation: Any) -> Callable[[Any], Any] | None:
    """value -> decoded value or `_MISS`, for a non-scalar annotation; None if unsupported."""
    return _shape_converter(annotation, list, tuple, _compile)


class _FieldCode(NamedTuple):
    fields: tuple[dataclasses.Field[Any], ...]
    names: list[str]  # the generated function's local for each field: v0, v1...
    env: dict[str, Any]  # its globals: _MISS, _isfinite and each field's converter as _c<i>
    checks: str  # its lines that return _MISS unless every scalar field has its exact type and every
    # other field converts (each local then holds the converted value)


def _field_code(cls: type[Any], converter: Callable[[Any], Callable[[Any], Any] | None]) -> _FieldCode | None:
    """What a compiled decoder and a compiled encoder of dataclass `cls` share: per field, an exact-type
    test (scalars) or a converter for this direction; None if `cls` has no fields or a field type is not
    handled. Built from the same annotations `schema.field_specs` reads."""
    try:
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
    except Exception:
        return None
    if not fields:
        return None
    env: dict[str, Any] = {"_MISS": _MISS, "_isfinite": math.isfinite}
    names = [f"v{i}" for i in range(len(fields))]
    tests: list[str] = []
    converts: list[str] = []
    for i, (name, f) in enumerate(zip(names, fields, strict=True)):
        test = _scalar_test(hints[f.name])
        if test is not None:
            tests.append(test.format(v=name))
            continue
        convert = converter(hints[f.name])
        if convert is None:
            return None
        env[f"_c{i}"] = convert
        converts.append(f"    {name} = _c{i}({name})\n    if {name} is _MISS:\n        return _MISS\n")
    checks = (f"    if not ({' and '.join(tests)}):\n        return _MISS\n" if tests else "") + "".join(converts)
    return _FieldCode(fields, names, env, checks)


_COMPILED: dict[type[Any], Callable[[Any], Any] | None] = {}


def _compile(cls: type[Any]) -> Callable[[Any], Any] | None:
    """A decoder for the field map of dataclass `cls` (see the module doc), or None if a field type is not
    one it handles. Built once per class, from the same annotations `schema.field_specs` reads."""
    if cls in _COMPILED:
        return _COMPILED[cls]
    _COMPILED[cls] = None  # a recursive record type stays on the general path
    code = _field_code(cls, _converter)
    if code is None or any(not f.init or f.kw_only for f in code.fields):
        return None
    fields, names = code.fields, code.names
    env = {**code.env, "_cls": fast_constructor(cls)}
    source = (
        "def decode(d):\n"
        f"    if type(d) is not dict or len(d) != {len(fields)}:\n        return _MISS\n"
        "    try:\n"
        + "".join(f"        {name} = d[{f.name!r}]\n" for name, f in zip(names, fields, strict=True))
        + "    except KeyError:\n        return _MISS\n"
        + code.checks
        + f"    return _cls({', '.join(names)})\n"
    )
    exec(source, env)  # generated from the class's own annotations, as dataclasses does
    decoder: Callable[[Any], Any] = env["decode"]
    _COMPILED[cls] = decoder
    return decoder


def _fast_event(cls: type[Event], fields: Any) -> Any:
    decoder = _COMPILED[cls] if cls in _COMPILED else _compile(cls)
    return _MISS if decoder is None else decoder(fields)


def event_from_wire(data: Any) -> Event:
    """Rebuild an event from `[name, version, fields]`, upcasting older versions (CodecError if bad)."""
    if type(data) is list and len(data) == 3:
        cls = EVENT_TYPES.get(data[0]) if type(data[0]) is str else None
        if cls is not None and data[1] == cls.schema_version and type(data[1]) is int:
            event = _fast_event(cls, data[2])
            if event is not _MISS:
                return event  # type: ignore[no-any-return]
    if type(data) is not list or len(data) != 3:
        raise CodecError("event must be an array [name, schema_version, fields]")
    name, version, fields = data
    if type(name) is not str:
        raise CodecError("event name must be a string")
    cls = EVENT_TYPES.get(name)
    if cls is None:
        raise CodecError(f"unknown event {name!r}")
    if type(version) is not int or version < 1:
        raise CodecError(f"{name}: schema_version must be a positive integer")
    if version > cls.schema_version:
        raise CodecError(f"{name}: schema_version {version} is newer than this node's {cls.schema_version}")
    if type(fields) is not dict:
        raise CodecError(f"{name}: fields must be a map")
    while version < cls.schema_version:
        step = UPCASTERS.get((name, version))
        if step is None:
            raise CodecError(f"{name}: no upcaster from schema_version {version}")
        try:
            fields = step(fields)
        except CodecError as exc:
            raise CodecError(f"{name} v{version}: {exc}") from None
        except Exception as exc:  # an upcaster fed garbage must not raise anything but CodecError
            raise CodecError(f"{name} v{version}: cannot upcast ({type(exc).__name__})") from None
        version += 1
    return cls(**fields_from_wire(EVENT_SPECS[cls], fields, name))


# --- compiled encoders (the proposer's fast path; see the module doc) --------------------------------------

_ENCODERS: dict[type[Any], Callable[[Any], Any] | None] = {}


def _wire_converter(annotation: Any) -> Callable[[Any], Any] | None:
    """value -> plain msgpack data or `_MISS`, for a non-scalar annotation; None if unsupported."""
    return _shape_converter(annotation, tuple, list, _wire_record)


def _wire_record(cls: type[Any]) -> Callable[[Any], Any] | None:
    encoder = _compile_encoder(cls)
    if encoder is None:
        return None

    def record(value: Any, cls: type[Any] = cls, encoder: Callable[[Any], Any] = encoder) -> Any:
        return encoder(value) if type(value) is cls else _MISS

    return record


def _compile_encoder(cls: type[Any]) -> Callable[[Any], Any] | None:
    """An encoder of dataclass `cls` to its field map (what `schema`'s `to_wire` converters build, in the
    same order: the same msgpack bytes), or None if a field type is not one it handles.

    Every command is encoded once, on the proposing node (the SIP thread, for a REGISTER): the schema's
    converters cost one Python call per field and per nested record. The compiled encoder reads the fields
    in straight-line code and checks exact types; it returns `_MISS` for anything it does not accept as is
    (an int for a float field, a value of a wrong type, a float that is not finite), and `event_to_wire`
    then takes the general path, which converts the value or raises `CodecError` naming the field."""
    if cls in _ENCODERS:
        return _ENCODERS[cls]
    _ENCODERS[cls] = None  # a recursive record type stays on the general path
    code = _field_code(cls, _wire_converter)
    if code is None:
        return None
    fields, names, env = code.fields, code.names, code.env
    source = (
        "def encode(e):\n"
        + "".join(f"    {name} = e.{f.name}\n" for name, f in zip(names, fields, strict=True))
        + code.checks
        + "    return {" + ", ".join(f"{f.name!r}: {name}" for name, f in zip(names, fields, strict=True)) + "}\n"
    )
    exec(source, env)  # generated from the class's own annotations, as dataclasses does
    encoder: Callable[[Any], Any] = env["encode"]
    _ENCODERS[cls] = encoder
    return encoder


# --- commands and batches --------------------------------------------------------------------------------


_make_command = fast_constructor(Command)


def encode_command(command: Command) -> bytes:
    """msgpack bytes of one command (CodecError if the op_id or event is not encodable)."""
    if type(command) is not Command:
        raise CodecError(f"expected a Command, got {type(command).__name__}")
    return _pack([_check_op_id(command.op_id), event_to_wire(command.event)])


def decode_command(data: bytes) -> Command:
    """Inverse of `encode_command`; CodecError on anything malformed."""
    obj = _unpack(data, "command")
    if type(obj) is not list or len(obj) != 2:
        raise CodecError("command must be an array [op_id, event]")
    return _make_command(_check_op_id(obj[0]), event_from_wire(obj[1]))


def encode_batch(commands: list[Command]) -> bytes:
    """One log entry holding `commands` in order."""
    return _pack([BATCH_FORMAT, [encode_command(command) for command in commands]])


def decode_batch_raw(entry: bytes) -> list[tuple[bytes, Command]]:
    """Each command of a log entry with its exact bytes (what the state digest is chained over)."""
    obj = _unpack(entry, "entry")
    if type(obj) is not list or len(obj) != 2:
        raise CodecError("entry must be an array [format, commands]")
    version, items = obj
    if type(version) is not int or version != BATCH_FORMAT:
        raise CodecError(f"unsupported batch format {version!r}")
    if type(items) is not list:
        raise CodecError("entry commands must be an array")
    decoded: list[tuple[bytes, Command]] = []
    for position, item in enumerate(items):
        if type(item) is not bytes:
            raise CodecError(f"command {position}: expected bytes")
        command = _fast_command(item)
        if command is _MISS:
            try:
                command = decode_command(item)
            except CodecError as exc:
                raise CodecError(f"command {position}: {exc}") from None
        decoded.append((item, command))
    return decoded


def _fast_command(data: bytes) -> Any:
    """`decode_command` of the common case in one frame (every command, on every node, under the state
    lock): an unpack, the envelope's exact-type checks and the compiled event decoder. `_MISS` for anything
    else, which `decode_command` then decodes or refuses with its message."""
    try:
        obj = msgpack.unpackb(data)  # the defaults are `_unpack`'s options (raw=False, strict_map_key...)
    except Exception:
        return _MISS
    if type(obj) is not list or len(obj) != 2:
        return _MISS
    op_id, wire = obj
    if type(op_id) is not str or not 0 < len(op_id) <= MAX_OP_ID_LENGTH or type(wire) is not list or len(wire) != 3:
        return _MISS
    name, version, fields = wire
    cls = EVENT_TYPES.get(name) if type(name) is str else None
    if cls is None or type(version) is not int or version != cls.schema_version:
        return _MISS
    decoder = _COMPILED[cls] if cls in _COMPILED else _compile(cls)
    if decoder is None:
        return _MISS
    event = decoder(fields)
    return _MISS if event is _MISS else _make_command(op_id, event)


def decode_batch(entry: bytes) -> list[Command]:
    """Commands of a log entry, in order; CodecError on anything malformed."""
    return [command for _, command in decode_batch_raw(entry)]
