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
  decides future outcomes, so it must be the same on every node. It is a `DedupeWindow`, which keeps each
  outcome in its compact wire form and gives it back as `Applied` / `Rejected`.
* `bindings[aor][key].aor == aor` and `.key == key`; every `aor` is an existing extension (deleting an
  extension drops its bindings) and no `bindings[aor]` is empty (the last removal drops the map);
* `binding_expiry` is a cache, not state: a min-heap of `(expires_at, aor, key)` with lazy deletion. An
  entry is live if `bindings[aor][key].expires_at == expires_at`; every binding has a live entry, and the
  top entry is always live (appliers pop dead tops), so its time is the next expiry. It is left out of
  equality and snapshots and rebuilt by `__post_init__` (so `restore` gets it for free). Only
  appliers may mutate `bindings` (those of `bindings.py`, and `ExtensionDeleted`), and only through
  `put_binding`, `drop_binding`, `drop_bindings_of` and `pop_expired_bindings`, which keep the index;
* `calls` holds active calls (not ended) in start order; `finished_calls` the last `call_tail_limit`
  ended calls in end order (oldest evicted first; the full history is projected into SQLite outside
  this layer). A call id is in at most one of them; records in `finished_calls` have `ended_at` set.
* `drained` maps the id of each drained node to the time it was drained, in drain order (`cluster.py`);
  every key is a well-formed node id.
* `trunks` maps a trunk name to its `Trunk` (creation order), `routes` a route name to its `Route`
  (creation order; the dial plan's order is `(route.order, route.name)`, see `trunks.py`). Every
  `routes[n].trunk` is a key of `trunks` (a trunk that routes use cannot be deleted); no two trunks'
  allow-lists overlap, so an allow-listed source address names at most one trunk.

Each kind of hot state has its fields here, its `apply` functions next to its events (`apply.py`,
`bindings.py`, `calls.py`, `cluster.py`, `trunks.py`), and a section in `snapshot.py`.
The record classes (`Extension`, `Binding`, `Call`, `Trunk`, `Route`) are declared in `records.py`, which
stays interpreted when this module is compiled with mypyc (setup.py), and are imported from here.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack
from mypy_extensions import mypyc_attr

from .errors import StateError
from .outcomes import Applied, Rejected, outcome_from_wire, outcome_to_wire

# re-exported: the records are declared in records.py (interpreted, see there) and imported from here
from .records import _INTERNED as _INTERNED
from .records import Binding as Binding
from .records import Call as Call
from .records import Extension as Extension
from .records import Route as Route
from .records import Trunk as Trunk
from .records import intern_text as intern_text

_T = TypeVar("_T")

DEFAULT_DEDUPE_LIMIT = 100_000
DEFAULT_CALL_TAIL_LIMIT = 1000
DIGEST_SIZE = 32


def fast_constructor(cls: type[_T]) -> Callable[..., _T]:
    """`cls(*args)` (positional, every field), built faster, for a frozen slotted dataclass on a hot path.

    A frozen dataclass's `__init__` sets each field through `object.__setattr__(self, name, value)` (about
    1,200 instructions a field on CPython 3.11: a Binding costs 20,000). Here a bare instance of an unfrozen
    twin class with the same slots and base (`object.__new__`: no `__init__` call, one Python frame in all)
    takes plain attribute stores, and then becomes a `cls` by `__class__` assignment (allowed between classes
    of identical layout): the same object as `cls(*args)`, equal and just as frozen, for about a third of the
    cost. Falls back to `cls` itself when the class is not a plain frozen slotted dataclass (a
    `__post_init__`, keyword-only or non-init fields).
    """
    params = getattr(cls, "__dataclass_params__", None)
    slots = cls.__dict__.get("__slots__")
    fields = dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()
    if (
        params is None
        or not params.frozen
        or slots is None
        or not fields
        or hasattr(cls, "__post_init__")
        or any(not f.init or f.kw_only for f in fields)
    ):
        return cls
    names = [f.name for f in fields]
    args = [f"a{i}" for i in range(len(names))]
    source = (
        f"def make({', '.join(args)}):\n"
        "    obj = _new(_Twin)\n"
        + "".join(f"    obj.{name} = {arg}\n" for name, arg in zip(names, args, strict=True))
        + "    obj.__class__ = _cls\n"
        "    return obj\n"
    )
    env: dict[str, Any] = {"_cls": cls, "_new": object.__new__}
    exec(source, env)  # generated from the dataclass's own field names, as dataclasses does
    base: type = cls.__base__ or object
    twin = type(f"_{cls.__name__}Twin", (base,), {
        "__slots__": slots, "__setattr__": object.__setattr__, "__module__": cls.__module__,
    })
    env["_Twin"] = twin
    make: Callable[..., _T] = env["make"]
    try:
        probe = make(*[None] * len(names))
    except TypeError:  # layouts differ after all (an unusual base): the plain constructor
        return cls
    if type(probe) is not cls:
        return cls
    return make


def binding_key(contact_key: str, instance_id: str, reg_id: int) -> str:
    """The key of a binding within its AoR.

    RFC 5626 §6: with a `+sip.instance`, the binding is identified by (instance-id, reg-id) (reg-id 0 =
    none); otherwise RFC 3261 §10.3 step 5 compares the contact URI, here the normalised `contact_key`
    that the registrar computed. The prefixes keep the two spaces apart; the reg-id is written first so
    that no instance-id can forge another key.
    """
    if instance_id:
        return f"i:{reg_id}:{instance_id}"
    return f"c:{contact_key}"


ExpiryEntry = tuple[float, str, str]


_PACKER = msgpack.Packer(use_bin_type=True)  # = msgpack.packb without a Packer per call; pack() holds the GIL


def _pack_outcome(outcome: Applied | Rejected) -> bytes | Applied | Rejected:
    # Runs for every applied command (the Raft thread): `outcome_to_wire` inlined for the two real types.
    kind = type(outcome)
    try:
        if kind is Applied:
            packed: bytes = _PACKER.pack([0, outcome.result])  # type: ignore[union-attr]
        elif kind is Rejected:
            packed = _PACKER.pack([1, outcome.field, outcome.message])  # type: ignore[union-attr]
        else:
            packed = _PACKER.pack(outcome_to_wire(outcome))
        return packed
    except Exception:  # not a wire-able outcome: kept as is (snapshot refuses it, as it always did)
        return outcome


def unpack_outcome(raw: Any) -> Applied | Rejected:
    """An outcome held by `DedupeWindow` (its msgpack wire form) as `Applied` / `Rejected`."""
    if type(raw) is not bytes:
        return raw  # type: ignore[no-any-return]
    return outcome_from_wire(msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True))


_ODICT: Any = OrderedDict  # the stored (packed) values, under the typed view below


@mypyc_attr(native_class=False)  # see setup.py: compiled with mypyc, kept a Python class
class DedupeWindow(OrderedDict[str, Applied | Rejected]):
    """`State.dedupe`: op_id -> first outcome, oldest first, read and written as `Applied` / `Rejected`.

    Memory (issue 8): the window holds up to `dedupe_limit` (100,000) entries on every node whatever the
    state's size, and an `Applied` with its result dict cost ~230 bytes; each outcome is kept as its msgpack
    wire form (`outcomes.outcome_to_wire`, ~60 bytes) and decoded only when read (a duplicate: rare). Equal
    outcomes built in the same key order (appliers are deterministic) give equal bytes, so equal windows
    compare equal. `items()` / `values()` decode (lists); `packed_items()` gives the stored form.
    """

    __slots__ = ()

    def __init__(self, items: Any = ()) -> None:
        super().__init__()
        for key, value in items.items() if hasattr(items, "items") else items:
            self[key] = value

    def __setitem__(self, key: str, value: Applied | Rejected) -> None:
        _ODICT.__setitem__(self, key, _pack_outcome(value))

    def set_packed(self, key: str, raw: bytes) -> None:
        """Store an outcome already in its packed form (snapshot restore, which checked it)."""
        _ODICT.__setitem__(self, key, raw)

    def __getitem__(self, key: str) -> Applied | Rejected:
        return unpack_outcome(_ODICT.__getitem__(self, key))

    def get(self, key: str, default: Any = None) -> Any:
        raw = _ODICT.get(self, key)
        return default if raw is None else unpack_outcome(raw)

    def values(self) -> list[Applied | Rejected]:  # type: ignore[override]
        return [unpack_outcome(raw) for raw in _ODICT.values(self)]

    def items(self) -> list[tuple[str, Applied | Rejected]]:  # type: ignore[override]
        return [(key, unpack_outcome(raw)) for key, raw in _ODICT.items(self)]

    def packed_items(self) -> list[tuple[str, bytes | Applied | Rejected]]:
        """(op_id, stored outcome) pairs, oldest first (the stored outcome is normally msgpack bytes)."""
        return list(_ODICT.items(self))

    def __repr__(self) -> str:
        return f"DedupeWindow({self.items()!r})"


@mypyc_attr(native_class=False)  # see setup.py: compiled with mypyc, kept a Python class
@dataclass(slots=True)
class State:
    """Everything the cluster replicates, plus the bookkeeping that proves nodes agree."""

    extensions: dict[str, Extension] = field(default_factory=dict)
    applied_index: int = 0
    digest: bytes = bytes(DIGEST_SIZE)
    dedupe: OrderedDict[str, Applied | Rejected] = field(default_factory=DedupeWindow)
    dedupe_limit: int = DEFAULT_DEDUPE_LIMIT
    bindings: dict[str, dict[str, Binding]] = field(default_factory=dict)
    calls: dict[str, Call] = field(default_factory=dict)
    finished_calls: OrderedDict[str, Call] = field(default_factory=OrderedDict)
    call_tail_limit: int = DEFAULT_CALL_TAIL_LIMIT
    drained: dict[str, float] = field(default_factory=dict)
    trunks: dict[str, Trunk] = field(default_factory=dict)
    routes: dict[str, Route] = field(default_factory=dict)
    binding_expiry: list[ExpiryEntry] = field(default_factory=list, compare=False, repr=False)
    binding_total: int = field(default=0, compare=False, repr=False)

    def __post_init__(self) -> None:
        if type(self.dedupe_limit) is not int or self.dedupe_limit < 1:
            raise StateError("dedupe_limit must be a positive integer")
        if type(self.call_tail_limit) is not int or self.call_tail_limit < 1:
            raise StateError("call_tail_limit must be a positive integer")
        if len(self.digest) != DIGEST_SIZE:
            raise StateError(f"digest must be {DIGEST_SIZE} bytes")
        if type(self.dedupe) is not DedupeWindow:
            self.dedupe = DedupeWindow(self.dedupe)
        self.rebuild_binding_expiry()

    # --- bindings and their expiry index (only binding appliers call these) ---------------------------

    def rebuild_binding_expiry(self) -> None:
        """Rebuild the expiry heap from `bindings` (O(n); at construction and to shed dead entries)."""
        self.binding_expiry = [
            (binding.expires_at, aor, key)
            for aor, table in self.bindings.items()
            for key, binding in table.items()
        ]
        heapq.heapify(self.binding_expiry)
        self.binding_total = len(self.binding_expiry)

    def _live(self, entry: ExpiryEntry) -> bool:
        table = self.bindings.get(entry[1])
        binding = None if table is None else table.get(entry[2])
        return binding is not None and binding.expires_at == entry[0]

    def _settle_expiry(self) -> None:
        heap = self.binding_expiry
        while heap and not self._live(heap[0]):
            heapq.heappop(heap)
        if len(heap) > 64 and len(heap) > 3 * self.binding_total:  # amortised O(1) per dead entry
            self.rebuild_binding_expiry()

    def binding_count(self) -> int:
        """Number of bindings held (expired ones included until `BindingsExpired` removes them)."""
        return self.binding_total

    def put_binding(self, binding: Binding) -> None:
        """Insert or replace `binding` (keeps its position in its AoR's map when replacing)."""
        bindings = self.bindings
        table = bindings.get(binding.aor)
        if table is None:
            table = bindings[binding.aor] = {}
        previous = table.get(binding.key)
        table[binding.key] = binding
        if previous is None:
            self.binding_total += 1
        heap = self.binding_expiry
        if previous is None or previous.expires_at != binding.expires_at:
            heapq.heappush(heap, (binding.expires_at, binding.aor, binding.key))
        # _settle_expiry, inlined (every REGISTER, every node): a refresh leaves its old heap entry dead, and
        # refreshes come roughly in expiry order, so the top is often that dead entry.
        while heap:
            top = heap[0]
            held = bindings.get(top[1])
            current = None if held is None else held.get(top[2])
            if current is not None and current.expires_at == top[0]:
                break
            heapq.heappop(heap)
        if len(heap) > 64 and len(heap) > 3 * self.binding_total:  # amortised O(1) per dead entry
            self.rebuild_binding_expiry()

    def drop_binding(self, aor: str, key: str) -> Binding | None:
        """Remove one binding; returns it (None if absent)."""
        table = self.bindings.get(aor)
        if table is None:
            return None
        binding = table.pop(key, None)
        if not table:
            del self.bindings[aor]
        if binding is not None:
            self.binding_total -= 1
            self._settle_expiry()
        return binding

    def drop_bindings_of(self, aor: str) -> int:
        """Remove every binding of `aor`; returns how many there were."""
        table = self.bindings.pop(aor, None)
        if table is None:
            return 0
        self.binding_total -= len(table)
        self._settle_expiry()
        return len(table)

    def next_binding_expiry(self) -> float | None:
        """The earliest `expires_at` of any binding held, or None (O(1))."""
        return self.binding_expiry[0][0] if self.binding_expiry else None

    def pop_expired_bindings(self, now: float) -> list[Binding]:
        """Remove and return every binding with `expires_at <= now`, in expiry order (O(k log n))."""
        heap = self.binding_expiry
        removed: list[Binding] = []
        while heap and heap[0][0] <= now:
            expires_at, aor, key = heapq.heappop(heap)
            table = self.bindings.get(aor)
            binding = None if table is None else table.get(key)
            if table is None or binding is None or binding.expires_at != expires_at:
                continue
            del table[key]
            if not table:
                del self.bindings[aor]
            removed.append(binding)
        self.binding_total -= len(removed)
        self._settle_expiry()
        return removed


def digest_hex(state: State) -> str:
    """The chained state digest as 64 lowercase hex digits (compare across nodes at equal applied_index)."""
    return state.digest.hex()
