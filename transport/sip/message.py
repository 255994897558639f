"""SIP messages: the data model, the datagram parser and the serialiser (RFC 3261 §7, §8.2.6, §18, §20).

Theory of operation
-------------------
`parse_message(data)` splits the header section into lines once, unfolds continuation lines
(§7.3.1) and keeps each field as a `HeaderField` (lookup key, name, value, raw): the name and value
as text plus `raw`, the field's line(s) exactly as received. On the fast path (below) the field
tuples are built only when first needed (`Headers._fields`): until then `Headers` holds the lines,
each line's partition at its first ':' and the lookup keys, and reads values from those; every
line has still been checked (a colon, a known plain-token name) before the message is returned. Bytes are decoded as UTF-8 with
`surrogateescape`, so any byte sequence maps to text and back to the very same bytes. The fields
every element needs (Via, From, To, Call-ID, CSeq, Max-Forwards, Content-Length) are parsed and
validated by `parse_message`; other typed values (Contact, Route, Record-Route, Path, Expires) are
parsed on first access. All are cached in the `Headers` object; any change to the headers drops
that cache.

`to_bytes()` writes the start line, then every field: an untouched field is written from `raw`,
byte for byte; a field set or added locally is written as `Canonical-Name: value`. The
Content-Length field is always made to match the body (§20.14): kept verbatim if it already does,
rewritten in place if not, appended if missing. Lines end with CRLF.

Choices (documented deviations and tolerances)
- Line endings: CRLF per §7; bare LF is also accepted as a line end (some phones and test tools send
  it); serialisation always writes CRLF, so a field's `raw` text excludes its line end.
- Leading CRLFs before the start line are skipped (§7.5).
- Request-Line and Status-Line: exactly one SP between elements (§7.1, RFC 4475 §3.1.2.8 "lwsstart"
  must be rejected); the version is compared case-insensitively (§7.1); any version other than
  SIP/2.0 gives 505. A Request-URI scheme other than sip, sips or tel gives 416 (§8.2.2.1); a
  malformed Request-URI, or a SIP Request-URI with headers (§19.1.1 table 1), gives 400.
- Header names: case-insensitive, compact forms (§7.3.3) are mapped to full names for lookup;
  whitespace before the colon is allowed (HCOLON, §25.1).
- Mandatory fields (§8.1.1): requests and responses must carry Via, From, To, Call-ID and CSeq, each
  well formed, and From, To, Call-ID, CSeq, Max-Forwards, Content-Length at most once (400 otherwise).
  The CSeq method must equal the request method (§8.1.1.5). Max-Forwards is optional (§16.3 step 3
  lets a proxy accept a request without it) but must be an integer when present. These fields are
  therefore guaranteed to be valid on a parsed message and their properties never raise.
- Content-Length (§18.3, §20.14): a body longer than Content-Length is truncated (datagrams); a
  shorter body gives 400; without Content-Length the body is the rest of the datagram.
- Limits: a message longer than `max_message` gives 513 Message Too Large (§21.5.14: SIP's code for
  this; 413 is for an oversized body and is used by the stream parser when Content-Length announces
  more than the limit); more than `max_headers` fields or a physical header line longer than
  `max_header_line` give 400.

Invariants: `parse_message` raises nothing but `SipParseError`; for every message `m` it returns,
`parse_message(m.to_bytes()) == m` (message equality compares start line, body and the fields in
order by name and value, except Content-Length which `to_bytes` owns), and fields that were not
modified are reproduced byte for byte.

Performance: the typed values of the fields a registrar reads are parsed by one regular expression
each in the common case (see headers.py, uri.py); the fast expressions are possessive (no
backtracking state). bench/sip_codec.py measures it. Fast paths, each giving what the general path
gives (tests/transport/test_sip_fast_paths.py, test_sip_fast_grammar.py): a datagram that ends with
CRLF CRLF is taken as a head without a body, without searching it, unless its lines hold an empty
one (then the search below decides); otherwise its head ends at its first CRLF CRLF unless the head
holds a bare CR or LF (then `find_head_end` decides, LF LF included); the head is decoded as strict
UTF-8 first (surrogateescape only when that fails, same text); when every header line is `name:value` with a name already seen as a plain token
(`_FAST_KEYS`, bounded), the lines are partitioned at ':' by one `map` and their keys looked up by
another, and the field tuples wait (see above; `make_response` builds only the fields it copies and
writes To as received plus `;tag=...`); anything else (folding, whitespace before the colon, a new
name, a line without a colon) goes through the line-by-line parser; a To that is From without
parameters takes From's display name and URI; the usual Via parameters (`;rport;branch=...`,
`;branch=...`) and a lone `;tag=...` have their own alternatives in the fast expressions, which
capture the values (headers.py); Content-Length, Max-Forwards and a Contact's expires are read
from a constant table of small decimal texts (`headers._UINTS`) before the digit checks. Bounded
process-wide tables hold values that are immutable and few in real traffic: header names, accepted
Request-Lines (`_REQUEST_LINES`) and Request-URIs (`_REQUEST_URIS`), URI parameter texts (uri.py);
nothing unique to a request or a phone is memoised. The lookup keys of the parsed fields stay in
the header cache, so `Headers.get` and `contacts` search them in C until the headers change. In
CPython 3.11 every bytecode counts (a list comprehension is a function call; a class with
`__getattr__` loses the specialised slot access): what is left is about 140,600 machine
instructions per REGISTER "full parse" over bench/sip_codec.py's pool of distinct REGISTERs
(callgrind, Debian's 3.11.2), spread thinly over the per-line and per-parameter work (splitting the
head at CRLF alone is about 5,000), the regular expressions, and object allocation.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter
from typing import Final, cast

from mypy_extensions import mypyc_attr

from .errors import SipParseError, SipValueError
from .headers import (
    _UINTS,
    CSeq,
    NameAddr,
    Via,
    parse_contact_list,
    parse_cseq,
    parse_name_addr,
    parse_uint,
    parse_via,
    split_list,
)
from .uri import EMPTY_PARAMS, SipUri, Uri, parse_uri

__all__ = [
    "DEFAULT_LIMITS",
    "REASON_PHRASES",
    "HeaderField",
    "Headers",
    "Limits",
    "Message",
    "Request",
    "Response",
    "canonical_name",
    "default_reason",
    "find_head_end",
    "make_response",
    "parse_datagram",
    "parse_head",
    "parse_message",
]


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits applied to received messages."""

    max_message: int = 65535
    max_headers: int = 128
    max_header_line: int = 8192


DEFAULT_LIMITS: Final = Limits()

# §7.3.3 compact forms and the registered ones since (IANA SIP parameters registry).
_COMPACT: Final[dict[str, str]] = {
    "a": "accept-contact",
    "b": "referred-by",
    "c": "content-type",
    "d": "request-disposition",
    "e": "content-encoding",
    "f": "from",
    "i": "call-id",
    "j": "reject-contact",
    "k": "supported",
    "l": "content-length",
    "m": "contact",
    "n": "identity-info",
    "o": "event",
    "r": "refer-to",
    "s": "subject",
    "t": "to",
    "u": "allow-events",
    "v": "via",
    "x": "session-expires",
    "y": "identity",
}

_SPECIAL_CASE: Final[dict[str, str]] = {
    "call-id": "Call-ID",
    "cseq": "CSeq",
    "www-authenticate": "WWW-Authenticate",
    "mime-version": "MIME-Version",
    "rack": "RAck",
    "rseq": "RSeq",
    "sip-etag": "SIP-ETag",
    "sip-if-match": "SIP-If-Match",
    "p-asserted-identity": "P-Asserted-Identity",
    "p-preferred-identity": "P-Preferred-Identity",
}

# Headers whose grammar is a comma-separated list (§7.3.1): `get_all` splits these. Never split:
# the authentication headers, Date, and anything not listed.
_LIST_HEADERS: Final = frozenset(
    {
        "accept",
        "accept-contact",
        "accept-encoding",
        "accept-language",
        "alert-info",
        "allow",
        "allow-events",
        "call-info",
        "contact",
        "content-encoding",
        "content-language",
        "error-info",
        "history-info",
        "in-reply-to",
        "p-associated-uri",
        "path",
        "proxy-require",
        "reason",
        "record-route",
        "reject-contact",
        "request-disposition",
        "require",
        "route",
        "security-client",
        "security-server",
        "security-verify",
        "service-route",
        "supported",
        "unsupported",
        "via",
        "warning",
    }
)

_TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_VERSION_RE = re.compile(r"SIP/([0-9]{1,9})\.([0-9]{1,9})", re.IGNORECASE)
_CTL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_CALL_ID_BAD_RE = re.compile(r"[\x00-\x20\x7f]")
_STATUS_RE = re.compile(r"[1-6][0-9][0-9]")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*")
_KNOWN_METHODS: Final = frozenset(
    {
        "INVITE",
        "ACK",
        "BYE",
        "CANCEL",
        "REGISTER",
        "OPTIONS",
        "INFO",
        "PRACK",
        "UPDATE",
        "SUBSCRIBE",
        "NOTIFY",
        "REFER",
        "MESSAGE",
        "PUBLISH",
    }
)
_KEY_CACHE: dict[str, str] = {}
_KEY_CACHE_MAX = 512
# Lookup keys of header names already seen in received messages that are plain tokens (no
# whitespace): the fast path of parse_head looks names up here only.
_FAST_KEYS: dict[str, str] = {}


def _key(name: str) -> str:
    """Lookup key of a header name: lower-case full name (compact forms expanded)."""
    key = _KEY_CACHE.get(name)
    if key is None:
        key = name.lower()
        if len(key) == 1:
            key = _COMPACT.get(key, key)
        if len(_KEY_CACHE) < _KEY_CACHE_MAX:
            _KEY_CACHE[name] = key
    return key


def canonical_name(name: str) -> str:
    """The conventional spelling of a header name (`call-id` -> `Call-ID`, `v` -> `Via`)."""
    key = _key(name)
    special = _SPECIAL_CASE.get(key)
    if special is not None:
        return special
    return "-".join(part[:1].upper() + part[1:] for part in key.split("-"))


@mypyc_attr(native_class=False)  # see setup.py: compiled with mypyc, kept a Python class
class HeaderField(tuple[str, str, str, str | None]):
    """One header field: `HeaderField(name, value)` for a field created locally.

    `key` is the lookup key (lower-case full name, compact forms expanded), `name` the name as
    received or given, `value` the value unfolded and stripped (§7.3.1), `raw` the received line(s)
    (folding kept, line ends excluded) or None for a field created locally. It is a tuple
    `(key, name, value, raw)`, which is also how `Headers` stores fields internally.
    """

    __slots__ = ()

    def __new__(cls, name: str, value: str, raw: str | None = None, key: str | None = None) -> HeaderField:
        return tuple.__new__(cls, (key if key is not None else _key(name), name, value, raw))

    @property
    def key(self) -> str:
        return self[0]

    @property
    def name(self) -> str:
        return self[1]

    @property
    def value(self) -> str:
        return self[2]

    @property
    def raw(self) -> str | None:
        return self[3]

    def line(self) -> str:
        """The field as it will be written (without line end)."""
        return self[3] if self[3] is not None else f"{self[1]}: {self[2]}"

    def __repr__(self) -> str:
        return f"HeaderField({self[1]!r}, {self[2]!r})"


# Internally a field is a plain tuple in HeaderField order (building tuple subclasses costs more).
_Field = tuple[str, str, str, str | None]
_new = tuple.__new__


def _check_local(name: str, value: str) -> None:
    if not _TOKEN_RE.fullmatch(name):
        raise SipValueError(f"invalid header name {name!r}")
    if "\r" in value or "\n" in value or "\x00" in value:
        raise SipValueError(f"CR, LF or NUL in the value of {name}")
    try:
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise SipValueError(f"value of {name} cannot be encoded as UTF-8") from None


class Headers:
    """The ordered header fields of a message, looked up case-insensitively (compact forms too)."""

    __slots__ = ("_cache", "_f", "_lines", "_parts")

    _cache: dict[str, object]
    # The fields, or None while they are not built: then `_lines` holds the received header lines
    # (index 0: the start line) and `_parts` `line.partition(":")` of each header line (index 0:
    # the first header line), and `_fields` builds the tuples on first use. The parser's fast path
    # leaves them unbuilt: a tuple and a stripped value per line were a third of the line work, and
    # most fields of a received message are never read one by one. (A property, not __getattr__:
    # a class with __getattr__ loses the interpreter's fast attribute access for every slot.)
    _f: list[_Field] | None
    _lines: list[str] | None
    _parts: list[tuple[str, str, str]] | None

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._f = []
        self._lines = self._parts = None
        self._cache = {}
        for name, value in items:
            self.add(name, value)

    @classmethod
    def from_fields(cls, fields: Iterable[_Field]) -> Headers:
        """Headers made of existing fields (their raw text is kept)."""
        self = cls()
        self._f = list(fields)
        self._lines = self._parts = None
        self._cache = {}
        return self

    @property
    def _fields(self) -> list[_Field]:
        f = self._f
        return f if f is not None else self._build_fields()

    @_fields.setter
    def _fields(self, fields: list[_Field]) -> None:
        self._f = fields
        self._lines = self._parts = None

    def _build_fields(self) -> list[_Field]:
        lines = self._lines
        parts = self._parts
        assert lines is not None and parts is not None
        keys: list[str] | None = self._cache.get(_KEYS)  # type: ignore[assignment]
        if keys is None or len(keys) != len(parts):
            keys = [_key(p[0]) for p in parts]
        # Every line is `token:value` (what the fast path accepts): no folding, no whitespace before
        # the colon; the value is stripped as `_parse_fields` does.
        fields: list[_Field] = [
            (k, p[0], p[2].strip(" \t"), line) for k, p, line in zip(keys, parts, lines[1:], strict=True)
        ]
        self._f = fields
        self._lines = self._parts = None
        return fields

    @property
    def fields(self) -> tuple[HeaderField, ...]:
        return tuple(f if isinstance(f, HeaderField) else _new(HeaderField, f) for f in self._fields)

    def get(self, name: str, default: str | None = None) -> str | None:
        """Value of the first field called `name` (whole field value, not split)."""
        key = _key(name)
        keys: list[str] | None = self._cache.get(_KEYS)  # type: ignore[assignment]
        if keys is not None:
            if key not in keys:
                return default
            parts = self._parts
            if parts is not None:  # fields not built: the value from the received line
                return parts[keys.index(key)][2].strip(" \t")
            return self._fields[keys.index(key)][2]
        for f in self._fields:
            if f[0] == key:
                return f[2]
        return default

    def values(self, name: str) -> list[str]:
        """Value of every field called `name`, one per field, never split."""
        key = _key(name)
        return [f[2] for f in self._fields if f[0] == key]

    def get_all(self, name: str) -> list[str]:
        """All values of `name`; list headers (Via, Contact, Route, Supported...) are split at
        top-level commas (§7.3.1), others (WWW-Authenticate, Authorization, Date...) are not."""
        key = _key(name)
        if key not in _LIST_HEADERS:
            return [f[2] for f in self._fields if f[0] == key]
        out: list[str] = []
        for f in self._fields:
            if f[0] == key:
                out.extend(split_list(f[2]))
        return out

    def count(self, name: str) -> int:
        """Number of fields called `name` (not of comma-separated values)."""
        key = _key(name)
        return sum(1 for f in self._fields if f[0] == key)

    def set(self, name: str, value: str) -> None:
        """Replace the first field called `name` in place (removing the others), or append one."""
        _check_local(name, value)
        key = _key(name)
        new: _Field = (key, canonical_name(name), value, None)
        out: list[_Field] = []
        placed = False
        for f in self._fields:
            if f[0] == key:
                if not placed:
                    out.append(new)
                    placed = True
            else:
                out.append(f)
        if not placed:
            out.append(new)
        self._fields = out
        self._cache.clear()

    def add(self, name: str, value: str, *, first: bool = False) -> None:
        """Append a field; with `first`, insert it before the first field of the same name (at the
        top for Via), as a proxy pushes a Via or Record-Route (§16.6)."""
        _check_local(name, value)
        key = _key(name)
        new: _Field = (key, canonical_name(name), value, None)
        if first:
            for i, f in enumerate(self._fields):
                if f[0] == key:
                    self._fields.insert(i, new)
                    break
            else:
                if key == "via":
                    self._fields.insert(0, new)
                else:
                    self._fields.append(new)
        else:
            self._fields.append(new)
        self._cache.clear()

    def remove(self, name: str) -> int:
        """Remove every field called `name`; return how many were removed."""
        key = _key(name)
        before = len(self._fields)
        self._fields = [f for f in self._fields if f[0] != key]
        self._cache.clear()
        return before - len(self._fields)

    def remove_first_value(self, name: str) -> str | None:
        """Remove the first value of list header `name` (e.g. the top Via, §16.7 step 3; the first
        Route, §16.4) and return it; a field holding several values keeps the others."""
        key = _key(name)
        for i, f in enumerate(self._fields):
            if f[0] == key:
                items = split_list(f[2])
                if len(items) <= 1:
                    del self._fields[i]
                else:
                    self._fields[i] = (key, f[1], ", ".join(items[1:]), None)
                self._cache.clear()
                return items[0] if items else None
        return None

    def replace_top_via(self, old: Via, new: Via) -> bool:
        """Rewrite the top Via (parsed as `old`) to `new` in place, keeping what was parsed of the other
        fields (`add` and `remove_*` clear all of it: From, To, CSeq, Contact would be parsed again). Only
        when the top Via is alone in its field and the parsed Via list starts with `old`; otherwise False and
        nothing changes (then `remove_first_value` + `add`). The §18.2.1 fix-up of every request uses it."""
        vias = self._cache.get("via")
        if not isinstance(vias, tuple) or not vias or vias[0] is not old:
            return False
        for i, f in enumerate(self._fields):
            if f[0] == "via":
                if "," in f[2]:
                    return False
                self._fields[i] = ("via", f[1], str(new), None)
                self._cache["via"] = (new, *vias[1:])
                return True
        return False

    def copy(self) -> Headers:
        return Headers.from_fields(self._fields)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = _key(name)
        return any(f[0] == key for f in self._fields)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        """(name, value) of every field in order, names as received or set."""
        return ((f[1], f[2]) for f in self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Headers):
            return NotImplemented
        return [(f[0], f[2]) for f in self._fields] == [(f[0], f[2]) for f in other._fields]

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Headers({[(f[1], f[2]) for f in self._fields]!r})"


def _missing(name: str) -> SipParseError:
    return SipParseError(400, f"Missing {name} header")


def _bad(name: str) -> SipParseError:
    return SipParseError(400, f"Malformed {name} header")


_NOT_SET: Final = object()
# Slot of Headers._cache holding the lookup keys of the fields, in order, as parse_message found them
# (a list: `keys.index` and `in` search it in C). Not a header key (those are tokens, no space); like
# every cached value it is dropped by any change to the headers.
_KEYS: Final = " keys"


@mypyc_attr(native_class=False)  # see setup.py: compiled with mypyc, kept a Python class
class Message:
    """Fields and typed accessors shared by `Request` and `Response`.

    Typed properties parse on first access and cache the result until the headers change. On a
    message returned by `parse_message`, `vias`, `top_via`, `branch`, `from_`, `to`, `call_id`,
    `cseq` and `max_forwards` never raise; the others raise `SipParseError(400)` when malformed.
    """

    __slots__ = ("body", "headers", "version")

    headers: Headers
    body: bytes
    version: str

    def __init__(
        self, headers: Headers | Iterable[tuple[str, str]] = (), body: bytes = b"", version: str = "SIP/2.0"
    ) -> None:
        self.headers = headers if isinstance(headers, Headers) else Headers(headers)
        self.body = body
        self.version = version

    # --- typed accessors -------------------------------------------------------------------------

    def _single(self, name: str) -> str:
        value = self.headers.get(name)
        if value is None:
            raise _missing(name)
        return value

    @property
    def call_id(self) -> str:
        value = self.headers._cache.get("call-id")
        if value is None:
            value = self.headers._cache["call-id"] = self._compute_call_id()
        return value  # type: ignore[return-value]

    def _compute_call_id(self) -> str:
        # §25.1 callid = word ["@" word]; accepted leniently: any non-empty text without whitespace
        # or control characters (real phones use characters outside `word`).
        value = self._single("Call-ID")
        if not value or _CALL_ID_BAD_RE.search(value):
            raise _bad("Call-ID")
        return value

    @property
    def cseq(self) -> CSeq:
        value = self.headers._cache.get("cseq")
        if value is None:
            try:
                value = self.headers._cache["cseq"] = parse_cseq(self._single("CSeq"))
            except SipParseError as exc:
                if exc.reason.startswith("Missing"):
                    raise
                raise _bad("CSeq") from None
        return value  # type: ignore[return-value]

    @property
    def vias(self) -> tuple[Via, ...]:
        """Every Via value, top first (fields in order, comma lists split, §7.3.1)."""
        value = self.headers._cache.get("via")
        if value is None:
            try:
                value = self.headers._cache["via"] = tuple(parse_via(v) for v in self.headers.get_all("Via"))
            except SipParseError:
                raise _bad("Via") from None
        return value  # type: ignore[return-value]

    @property
    def top_via(self) -> Via:
        vias = self.vias
        if not vias:
            raise _missing("Via")
        return vias[0]

    @property
    def branch(self) -> str | None:
        """The branch parameter of the top Via; None when absent (RFC 2543 peers) or without Via."""
        vias: tuple[Via, ...] = self.headers._cache.get("via") or self.vias  # type: ignore[assignment]
        if not vias:
            return None
        # Params.lookup("branch") of the top Via, inlined (two calls less).
        for n, v in vias[0][3]:
            if n == "branch" or (len(n) == 6 and n.lower() == "branch"):
                return v
        return None

    def _name_addr(self, name: str, slot: str) -> NameAddr:
        value = self.headers._cache.get(slot)
        if value is None:
            try:
                value = self.headers._cache[slot] = parse_name_addr(self._single(name))
            except SipParseError as exc:
                if exc.reason.startswith("Missing"):
                    raise
                raise _bad(name) from None
        return value  # type: ignore[return-value]

    @property
    def from_(self) -> NameAddr:
        value = self.headers._cache.get("from")
        return self._name_addr("From", "from") if value is None else value  # type: ignore[return-value]

    @property
    def to(self) -> NameAddr:
        value = self.headers._cache.get("to")
        return self._name_addr("To", "to") if value is None else value  # type: ignore[return-value]

    @property
    def from_tag(self) -> str | None:
        return self.from_.tag

    @property
    def to_tag(self) -> str | None:
        return self.to.tag

    def _uint(self, name: str, slot: str, maximum: int = 2**32 - 1) -> int | None:
        value = self.headers._cache.get(slot, _NOT_SET)
        if value is _NOT_SET:
            text = self.headers.get(name)
            value = self.headers._cache[slot] = (
                None if text is None else parse_uint(text, f"{name} header", maximum)
            )
        return value  # type: ignore[return-value]

    @property
    def max_forwards(self) -> int | None:
        """Max-Forwards (§20.22, 0-255), None when absent."""
        return self._uint("Max-Forwards", "max-forwards", 255)

    @property
    def expires(self) -> int | None:
        """The Expires header (§20.19), None when absent."""
        return self._uint("Expires", "expires")

    @property
    def content_length(self) -> int | None:
        """The Content-Length header as received or set (None when absent); `to_bytes` writes the
        body's real length whatever this says."""
        return self._uint("Content-Length", "content-length")

    @property
    def content_type(self) -> str | None:
        return self.headers.get("Content-Type")

    @property
    def contacts(self) -> tuple[NameAddr, ...]:
        """The Contact values in order; empty without Contact and for `Contact: *` (`contact_star`)."""
        cache = self.headers._cache
        value = cache.get("contact")
        if value is None:
            keys: list[str] | None = cache.get(_KEYS)  # type: ignore[assignment]
            parts = self.headers._parts
            if (
                keys is not None
                and parts is not None
                and keys.count("contact") == 1
                and "," not in (text := parts[keys.index("contact")][2].strip(" \t"))
                and text[:1] == "<"
            ):
                # One name-addr in one field (the usual REGISTER), as _compute_contacts does it,
                # without the call.
                try:
                    value = (parse_name_addr(text),)
                except SipParseError:
                    raise _bad("Contact") from None
            else:
                value = self._compute_contacts()
            cache["contact"] = value
        return value  # type: ignore[return-value]

    def _compute_contacts(self) -> tuple[NameAddr, ...]:
        keys: list[str] | None = self.headers._cache.get(_KEYS)  # type: ignore[assignment]
        if keys is not None and keys.count("contact") == 1:
            values = [self.headers._fields[keys.index("contact")][2]]
        else:
            values = [f[2] for f in self.headers._fields if f[0] == "contact"]
        if len(values) == 1 and "," not in (value := values[0]) and value[:1] == "<":
            # One name-addr (the usual REGISTER): what parse_contact_list would do, without the list.
            try:
                return (parse_name_addr(value),)
            except SipParseError:
                raise _bad("Contact") from None
        out: list[NameAddr] = []
        try:
            for value in values:
                items = parse_contact_list(value)
                if items is None:
                    if len(values) > 1:
                        raise _bad("Contact")
                    return ()
                out.extend(items)
        except SipParseError:
            raise _bad("Contact") from None
        return tuple(out)

    @property
    def contact_star(self) -> bool:
        """True for `Contact: *` (§10.2.2: remove all bindings)."""
        return any(v.strip() == "*" for v in self.headers.values("Contact"))

    def _name_addr_list(self, name: str, slot: str) -> tuple[NameAddr, ...]:
        value = self.headers._cache.get(slot)
        if value is None:
            try:
                value = self.headers._cache[slot] = tuple(
                    parse_name_addr(v) for v in self.headers.get_all(name)
                )
            except SipParseError:
                raise _bad(name) from None
        return value  # type: ignore[return-value]

    @property
    def routes(self) -> tuple[NameAddr, ...]:
        return self._name_addr_list("Route", "route")

    @property
    def record_routes(self) -> tuple[NameAddr, ...]:
        return self._name_addr_list("Record-Route", "record-route")

    @property
    def paths(self) -> tuple[NameAddr, ...]:
        """Path values (RFC 3327)."""
        return self._name_addr_list("Path", "path")

    # --- serialisation ---------------------------------------------------------------------------

    def start_line(self) -> str:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        """The message on the wire: CRLF line ends, untouched fields byte for byte, Content-Length
        matching the body (§20.14)."""
        body = self.body
        length = len(body)
        start = self.start_line()
        if "\r" in start or "\n" in start:
            raise SipValueError("CR or LF in the start line")
        lines = [start]
        have_length = False
        for key, name, value, raw in self.headers._fields:
            if key == "content-length":
                if have_length:
                    continue
                have_length = True
                if raw is not None and (value.lstrip("0") or "0") == str(length):
                    lines.append(raw)
                else:
                    lines.append(f"{name if len(name) > 1 else 'Content-Length'}: {length}")
                continue
            lines.append(raw if raw is not None else f"{name}: {value}")
        if not have_length:
            lines.append(f"Content-Length: {length}")
        lines.append("\r\n")
        try:
            return "\r\n".join(lines).encode("utf-8", "surrogateescape") + body
        except UnicodeEncodeError:
            raise SipValueError("start line or header cannot be encoded as UTF-8") from None

    def _same_fields(self, other: Message) -> bool:
        # Content-Length is framing, owned by to_bytes (always the body's length): not compared.
        if self.version.upper() != other.version.upper() or self.body != other.body:
            return False
        mine = [(f[0], f[2]) for f in self.headers._fields if f[0] != "content-length"]
        theirs = [(f[0], f[2]) for f in other.headers._fields if f[0] != "content-length"]
        return mine == theirs


@mypyc_attr(native_class=False)  # see setup.py: compiled with mypyc, kept a Python class
class Request(Message):
    """A SIP request. `uri` is the Request-URI as text; `request_uri` is its parsed form."""

    __slots__ = ("_uri_parsed", "method", "uri")

    method: str
    uri: str

    def __init__(
        self,
        method: str,
        uri: str,
        headers: Headers | Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        version: str = "SIP/2.0",
    ) -> None:
        super().__init__(headers, body, version)
        self.method = method
        self.uri = uri
        self._uri_parsed: tuple[str, Uri] | None = None

    @property
    def request_uri(self) -> Uri:
        """The Request-URI parsed (cached for the current value of `uri`); SipParseError(400)."""
        cached = self._uri_parsed
        if cached is not None and cached[0] == self.uri:
            return cached[1]
        parsed = parse_uri(self.uri)
        self._uri_parsed = (self.uri, parsed)
        return parsed

    def start_line(self) -> str:
        return f"{self.method} {self.uri} {self.version}"

    def copy(self) -> Request:
        """A copy whose headers can be changed without touching this request's."""
        return Request(self.method, self.uri, self.headers.copy(), self.body, self.version)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Request):
            return NotImplemented
        return self.method == other.method and self.uri == other.uri and self._same_fields(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri} headers={len(self.headers)} body={len(self.body)}B>"


@mypyc_attr(native_class=False)  # see setup.py: compiled with mypyc, kept a Python class
class Response(Message):
    """A SIP response; `reason` defaults to the phrase of `status` (§21)."""

    __slots__ = ("reason", "status")

    status: int
    reason: str

    def __init__(
        self,
        status: int,
        reason: str | None = None,
        headers: Headers | Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        version: str = "SIP/2.0",
    ) -> None:
        super().__init__(headers, body, version)
        self.status = status
        self.reason = reason if reason is not None else default_reason(status)

    def start_line(self) -> str:
        return f"{self.version} {self.status} {self.reason}"

    def copy(self) -> Response:
        """A copy whose headers can be changed without touching this response's."""
        return Response(self.status, self.reason, self.headers.copy(), self.body, self.version)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Response):
            return NotImplemented
        return self.status == other.status and self.reason == other.reason and self._same_fields(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason} headers={len(self.headers)} body={len(self.body)}B>"


# §21 and later RFCs (IANA "Response Codes").
REASON_PHRASES: Final[dict[int, str]] = {
    100: "Trying",
    180: "Ringing",
    181: "Call Is Being Forwarded",
    182: "Queued",
    183: "Session Progress",
    199: "Early Dialog Terminated",
    200: "OK",
    202: "Accepted",
    204: "No Notification",
    300: "Multiple Choices",
    301: "Moved Permanently",
    302: "Moved Temporarily",
    305: "Use Proxy",
    380: "Alternative Service",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    410: "Gone",
    412: "Conditional Request Failed",
    413: "Request Entity Too Large",
    414: "Request-URI Too Long",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    417: "Unknown Resource-Priority",
    420: "Bad Extension",
    421: "Extension Required",
    422: "Session Interval Too Small",
    423: "Interval Too Brief",
    428: "Use Identity Header",
    429: "Provide Referrer Identity",
    433: "Anonymity Disallowed",
    436: "Bad Identity-Info",
    437: "Unsupported Certificate",
    438: "Invalid Identity Header",
    439: "First Hop Lacks Outbound Support",
    440: "Max-Breadth Exceeded",
    469: "Bad Info Package",
    470: "Consent Needed",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    484: "Address Incomplete",
    485: "Ambiguous",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    489: "Bad Event",
    491: "Request Pending",
    493: "Undecipherable",
    494: "Security Agreement Required",
    500: "Server Internal Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Server Time-out",
    505: "Version Not Supported",
    513: "Message Too Large",
    555: "Push Notification Service Not Supported",
    580: "Precondition Failure",
    600: "Busy Everywhere",
    603: "Decline",
    604: "Does Not Exist Anywhere",
    606: "Not Acceptable",
    607: "Unwanted",
    608: "Rejected",
}

_CLASS_REASON: Final = {
    1: "Trying",
    2: "OK",
    3: "Redirect",
    4: "Client Error",
    5: "Server Error",
    6: "Global Failure",
}


def default_reason(status: int) -> str:
    """The reason phrase for `status` (§21), or a generic one for its class."""
    return REASON_PHRASES.get(status) or _CLASS_REASON.get(status // 100, "Unknown")


_COPIED_TO_RESPONSE: Final = frozenset({"via", "from", "to", "call-id", "cseq"})


def make_response(
    request: Request,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
) -> Response:
    """A response to `request` per §8.2.6.2: Via fields copied in order, From, Call-ID and CSeq
    copied, To copied with `to_tag` added when it has no tag yet (not for 100 Trying, §8.2.6.2),
    Timestamp copied into 100 Trying (§8.2.6.1); then `headers` appended. Copied fields keep their
    raw text."""
    if not 100 <= status <= 699:
        raise SipValueError(f"status {status} out of range")
    fields: list[_Field] = []
    rh = request.headers
    parts = rh._parts
    keys: list[str] | None = rh._cache.get(_KEYS)  # type: ignore[assignment]
    if parts is not None and keys is not None and rh._lines is not None:
        # Fields not built (a received request): build the copied ones only, from the lines.
        copied: list[_Field] = [
            (key, p[0], p[2].strip(" \t"), line)
            for key, p, line in zip(keys, parts, rh._lines[1:], strict=True)
            if key in _COPIED_TO_RESPONSE or (status == 100 and key == "timestamp")
        ]
    else:
        copied = [
            f for f in rh._fields if f[0] in _COPIED_TO_RESPONSE or (status == 100 and f[0] == "timestamp")
        ]
    for f in copied:
        if f[0] == "to" and to_tag is not None and status != 100:
            to = request.to
            if to.tag is None:
                if not to.params.has("tag"):
                    # §8.2.6.2: To as received plus the tag. A parsed To value ends with '>' or a
                    # header parameter (or the addr-spec), so ";tag=" appends a header parameter:
                    # it parses to to.with_tag(to_tag) (tests: test_sip_fast_grammar.py).
                    fields.append(("to", "To", f"{f[2]};tag={to_tag}", None))
                else:  # a `tag` flag without a value: replaced in place
                    fields.append(("to", "To", str(to.with_tag(to_tag)), None))
                continue
        fields.append(f)
    response = Response(status, reason, Headers.from_fields(fields), body)
    for name, value in headers:
        response.headers.add(name, value)
    return response


# --- parsing --------------------------------------------------------------------------------------

_SINGLETONS: Final = ("from", "to", "call-id", "cseq", "max-forwards")
_MANDATORY: Final = ("via", "from", "to", "call-id", "cseq")
_MANDATORY_SET: Final = frozenset(_MANDATORY)
_URI_SCHEMES: Final = frozenset({"sip", "sips", "tel"})


def parse_message(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Request | Response:
    """Parse one SIP message from a datagram.

    Raises only `SipParseError`; see the module docstring for what is accepted.
    """
    try:
        # Common case inlined (one call less per message): no CRLFs before the start line, the head
        # ends at the first CRLF CRLF and holds no bare CR or LF; anything else, _parse_datagram.
        if len(data) <= limits.max_message and data[:2] != b"\r\n":
            if data.endswith(b"\r\n\r\n"):
                # No body (most requests and many responses): the head is all but the final CRLF CRLF,
                # unless it holds an empty line (an earlier CRLF CRLF ends it): then _parse_head
                # declines and the search below decides. Saves searching the whole datagram.
                parsed = _parse_head(data[:-4], limits, _NO_BODY)
                if parsed is not None:
                    message, length = parsed
                    if length:
                        raise SipParseError(400, "Body shorter than Content-Length")
                    return message  # body: b"" from the start line
            crlf = data.find(b"\r\n\r\n")
            if crlf > 0:
                parsed = _parse_head(data[:crlf], limits, _CRLF_ONLY)
                if parsed is not None:
                    message, length = parsed
                    if length is None:
                        message.body = data[crlf + 4 :]
                    elif crlf + 4 + length <= len(data):
                        # §18.3: the octets of a datagram beyond Content-Length are discarded.
                        message.body = data[crlf + 4 : crlf + 4 + length]
                    else:
                        raise SipParseError(400, "Body shorter than Content-Length")
                    return message
        return _parse_datagram(data, limits)
    except SipParseError:
        raise
    except Exception as exc:  # pragma: no cover - a bug; the invariant says never another exception
        raise SipParseError(400, "Unparseable message") from exc


parse_datagram = parse_message  # the name the house style (shared/STYLE.md) uses


def find_head_end(data: bytes | bytearray, start: int = 0) -> tuple[int, int]:
    """(end of the header section, start of the body) searching from `start`; (-1, -1) when there
    is no empty line yet. CRLF CRLF ends the header section (§7); LF LF is tolerated too."""
    crlf = data.find(b"\r\n\r\n", start)
    lf = data.find(b"\n\n", start, crlf + 2 if crlf >= 0 else len(data))
    if lf >= 0 and (crlf < 0 or lf < crlf):
        # LF LF (or CRLF LF): the header section ends at the first of the two newlines.
        return (lf - 1 if lf > 0 and data[lf - 1] == 13 else lf), lf + 2
    if crlf >= 0:
        return crlf, crlf + 4
    return -1, -1


def _parse_datagram(data: bytes, limits: Limits) -> Request | Response:
    if len(data) > limits.max_message:
        raise SipParseError(513, "Message Too Large")
    start = 0
    while data.startswith(b"\r\n", start):  # §7.5: CRLFs before the start line are ignored
        start += 2
    crlf = data.find(b"\r\n\r\n", start)
    if crlf >= 0:
        # Common case: the head ends at the first CRLF CRLF. An LF LF could only come earlier if the
        # head had a bare LF, and then _parse_head declines and find_head_end decides.
        parsed = _parse_head(data[start:crlf], limits, _CRLF_ONLY)
        if parsed is not None:
            return _with_body(parsed, data, crlf + 4)
    head_end, body_start = find_head_end(data, start)
    if head_end < 0:
        if len(data) > start and data.endswith(b"\n"):
            # No empty line after the last header: tolerated for datagrams, the body is empty.
            body_start = len(data)
            head_end = body_start - (2 if data.endswith(b"\r\n") else 1)
        else:
            raise SipParseError(400, "Missing empty line after the headers")
    if head_end <= start:
        raise SipParseError(400, "Empty message")
    return _with_body(
        parse_head(data[start:head_end] if start or head_end < len(data) else data, limits), data, body_start
    )


def _with_body(
    parsed: tuple[Request | Response, int | None], data: bytes, body_start: int
) -> Request | Response:
    message, length = parsed
    if length is None:
        message.body = data[body_start:]
    else:
        if body_start + length > len(data):
            raise SipParseError(400, "Body shorter than Content-Length")
        # §18.3: the octets of a datagram beyond Content-Length are discarded.
        message.body = data[body_start : body_start + length]
    return message


def parse_head(head: bytes, limits: Limits = DEFAULT_LIMITS) -> tuple[Request | Response, int | None]:
    """Parse a start line and header fields (no empty line, no body) and validate them; return
    the message (empty body) and its Content-Length (None when absent)."""
    return cast(tuple[Request | Response, int | None], _parse_head(head, limits, _ANY_HEAD))


# `_parse_head` modes: the head may hold bare CR or LF (parse_head, the stream framer); it ends at the
# datagram's first CRLF CRLF (decline a bare CR or LF); it is all but the datagram's final CRLF CRLF
# (also decline an empty line, which would end it earlier).
_ANY_HEAD: Final = 0
_CRLF_ONLY: Final = 1
_NO_BODY: Final = 2


def _parse_head(head: bytes, limits: Limits, crlf_only: int) -> tuple[Request | Response, int | None] | None:
    """parse_head; with `crlf_only` (_CRLF_ONLY or _NO_BODY), None (instead of a result) when the head
    has a bare CR or LF; with _NO_BODY, also when it has an empty line."""
    try:
        text = head.decode()  # the common case: valid UTF-8 (no error handler to look up)
    except UnicodeDecodeError:
        text = head.decode("utf-8", "surrogateescape")
    lines = text.split("\r\n")
    joined = "".join(lines)  # what remains of CR and LF once CRLF pairs are gone (copying is cheap)
    if "\n" in joined or "\r" in joined:
        if crlf_only:
            return None
        # Bare LF line ends (tolerated) or a bare CR (rejected).
        text = text.replace("\r\n", "\n")
        if "\r" in text:
            raise SipParseError(400, "Bare CR in the header section")
        lines = text.split("\n")
    if len(text) > limits.max_header_line and max(map(len, lines)) > limits.max_header_line:
        if crlf_only == _NO_BODY and "" in lines:
            return None
        raise SipParseError(400, "Header line too long")
    message = _parse_start_line(lines[0])
    if len(lines) <= limits.max_headers + 1:
        # Common case: every line is `token:value` with a name seen before (in _FAST_KEYS, which
        # holds only plain token names). A folded line starts with whitespace and a name followed
        # by whitespace before the colon is not a plain token, so neither is found there: both,
        # like unknown names and lines without a colon, take the general path.
        # Only the lookup keys are computed here; the field tuples are built when first needed
        # (Headers._fields), and _validate reads the values it checks from the lines.
        parts = [*map(_partition, lines[1:], _COLONS)]
        if all(map(_second, parts)):  # every line has a colon
            try:
                keys = [*map(_FAST_KEYS.__getitem__, map(_first, parts))]
            except KeyError:
                pass
            else:
                headers = Headers()
                headers._f = None
                headers._lines = lines
                headers._parts = parts
                message.headers = headers
                return message, _validate(message, headers, keys, parts)  # sets headers._cache
        if crlf_only == _NO_BODY and "" in lines:
            return None
        fields, keys = _parse_fields_general(text, lines)
    elif crlf_only == _NO_BODY and "" in lines:
        return None
    elif len(_unfold(lines)) > limits.max_headers + 1:
        raise SipParseError(400, "Too many header fields")
    else:
        fields, keys = _parse_fields_general(text, lines)
    headers = Headers()
    headers._f = fields
    headers._lines = headers._parts = None
    message.headers = headers
    length = _validate(message, headers, keys, [(f[1], ":", f[2]) for f in fields])
    return message, length


def _parse_fields_general(text: str, lines: list[str]) -> tuple[list[_Field], list[str]]:
    """Fields and their keys from any header lines (folding, whitespace before the colon, names
    not seen before); raises for malformed lines."""
    folded = "\n " in text or "\n\t" in text
    if folded:
        lines = _unfold(lines)
    fields = _parse_fields(lines, folded or " :" in text or "\t:" in text)
    return fields, [f[0] for f in fields]


def _parse_start_line(line: str) -> Request | Response:
    known = _REQUEST_LINES.get(line)
    if known is not None:  # a Request-Line accepted before: its parts and parsed Request-URI
        request = _new_request(Request)
        request.method, request.uri, request.version, request._uri_parsed = known
        request.body = b""
        return request
    if line[3:4] == "/" and line[:3].upper() == "SIP":  # a method (a token) holds no "/"
        parts = line.split(" ", 2)
        if len(parts) < 3:
            if len(parts) == 2:
                parts.append("")
            else:
                raise SipParseError(400, "Malformed Status-Line")
        version, code, reason = parts
        if version != "SIP/2.0":
            _check_version(version)
        if not _STATUS_RE.fullmatch(code):
            raise SipParseError(400, "Malformed status code")
        if _CTL_RE.search(reason):  # §25.1 Reason-Phrase: text, SP and HTAB, no controls
            raise SipParseError(400, "Malformed reason phrase")
        response = _new_response(Response)
        response.status = int(code)
        response.reason = reason
        response.version = version
        response.body = b""
        return response
    parts = line.split(" ")
    if len(parts) != 3:
        raise SipParseError(400, "Malformed Request-Line")
    method, uri, version = parts
    if method not in _KNOWN_METHODS and not _TOKEN_RE.fullmatch(method):
        raise SipParseError(400, "Malformed method")
    if version != "SIP/2.0":
        _check_version(version)
    entry = _REQUEST_URIS.get(uri)
    if entry is None:
        entry = (uri, _parse_request_uri(uri))
    if len(_REQUEST_LINES) < _REQUEST_URIS_MAX:
        _REQUEST_LINES[line] = (method, uri, version, entry)
    request = _new_request(Request)
    request.method = method
    request.uri = uri
    request.version = version
    request.body = b""
    request._uri_parsed = entry
    return request


# Request-URIs accepted before and their parsed form (immutable, so shared): a registrar sees few
# distinct ones (its domains), a proxy one per callee. Bounded: once full, new ones are parsed each
# time and not added.
_REQUEST_URIS: dict[str, tuple[str, Uri]] = {}  # uri -> (uri, parsed): Request._uri_parsed itself
_REQUEST_URIS_MAX: Final = 1024
# Request-Lines accepted before (same bound and reasoning: a registrar's REGISTERs share one per
# domain): line -> (method, uri, version, Request._uri_parsed).
_REQUEST_LINES: dict[str, tuple[str, str, str, tuple[str, Uri]]] = {}


def _parse_request_uri(uri: str) -> Uri:
    if not uri.startswith("sip:"):
        scheme, colon, _ = uri.partition(":")
        if not colon or not _SCHEME_RE.fullmatch(scheme):
            raise SipParseError(400, "Malformed Request-URI")
        if scheme.lower() not in _URI_SCHEMES:
            raise SipParseError(416, "Unsupported URI Scheme")
    try:
        parsed = parse_uri(uri)
    except SipParseError:
        raise SipParseError(400, "Malformed Request-URI") from None
    if isinstance(parsed, SipUri) and parsed.headers:
        # §19.1.1 table 1: headers are not allowed in a Request-URI (RFC 4475 §3.1.2.11 "escruri").
        raise SipParseError(400, "Headers in Request-URI")
    if len(_REQUEST_URIS) < _REQUEST_URIS_MAX:
        _REQUEST_URIS[uri] = (uri, parsed)
    return parsed


_first = itemgetter(0)
_partition = str.partition
_COLONS: Final = repeat(":")  # an endless iterator of ":" (map stops with the lines)
_second = itemgetter(1)
_new_name_addr = tuple.__new__
_new_request = object.__new__
_new_response = object.__new__


def _check_version(version: str) -> None:
    m = _VERSION_RE.fullmatch(version)
    if m is None:
        raise SipParseError(400, "Malformed SIP version")
    if int(m.group(1)) != 2 or int(m.group(2)) != 0:
        raise SipParseError(505, "Version Not Supported")


def _unfold(lines: list[str]) -> list[str]:
    """Join continuation lines (starting with SP or HT) to the line before (§7.3.1), keeping the
    line break in the text so that the raw field can be rebuilt; `_parse_fields` splits it again."""
    groups: list[list[str]] = [[lines[0]]]
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            if len(groups) == 1:
                raise SipParseError(400, "Continuation line before the first header")
            groups[-1].append(line)
        else:
            groups.append([line])
    return ["\r\n".join(group) for group in groups]


def _parse_fields(lines: list[str], irregular: bool) -> list[_Field]:
    """Fields from header lines (lines[0] is the start line). `irregular` says that some line may
    be folded or have whitespace before its colon and needs the slower normalisation."""
    kget = _FAST_KEYS.get
    fields: list[_Field] = []
    append = fields.append
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise SipParseError(400, "Malformed header line")
        append((kget(name) or _new_key(name), name, value.strip(" \t"), line))
    if irregular:
        for i, (key, name, value, raw) in enumerate(fields):
            if name[-1:] in (" ", "\t") or "\r\n" in value:
                # Whitespace before the colon (HCOLON), or a folded field: each line break with the
                # whitespace around it becomes one SP (§7.3.1).
                value = " ".join(part for part in (p.strip(" \t") for p in value.split("\r\n")) if part)
                fields[i] = (key, name.rstrip(" \t"), value, raw)
    return fields


def _new_key(name: str) -> str:
    stripped = name.rstrip(" \t")
    if not _TOKEN_RE.fullmatch(stripped):
        raise SipParseError(400, "Malformed header name")
    if stripped != name:
        return _key_stripped(name, stripped)
    key = _key(name)
    if len(_FAST_KEYS) < _KEY_CACHE_MAX:
        _FAST_KEYS[name] = key
    return key


def _key_stripped(name: str, stripped: str) -> str:
    key = _key(stripped)
    if len(_KEY_CACHE) < _KEY_CACHE_MAX:
        _KEY_CACHE[name] = key
    return key


def _validate(
    message: Request | Response, headers: Headers, keys: list[str], parts: list[tuple[str, str, str]]
) -> int | None:
    """Mandatory fields of §8.1.1 (400 when missing, duplicated or malformed); parses and caches
    them; returns the Content-Length (None when absent; several fields must agree). `keys` are
    the lookup keys of the fields, in order; `parts[i][2]` is the value of the field whose key is
    `keys[i]`, stripped of SP and HTAB (`line.partition(":")` of the received lines, fast path)."""
    present = set(keys)
    unique = len(present) == len(keys)
    if not unique:
        for key in _SINGLETONS:
            if keys.count(key) > 1:
                raise SipParseError(400, f"Multiple {canonical_name(key)} headers")
    if not present >= _MANDATORY_SET:
        for key in _MANDATORY:
            if key not in present:
                raise _missing(canonical_name(key))
    index = keys.index
    length: int | None = None
    if "content-length" in present:
        try:
            if unique:
                text = parts[index("content-length")][2].strip(" \t")
                length = _UINTS.get(text)  # the usual small value, written plainly
                if length is None:
                    length = parse_uint(text, "Content-Length header")
            else:
                for key, part in zip(keys, parts, strict=True):
                    if key == "content-length":
                        value = parse_uint(part[2].strip(" \t"), "Content-Length header")
                        if length is not None and value != length:
                            raise SipParseError(400, "Conflicting Content-Length headers")
                        length = value
        except SipParseError as exc:
            if exc.reason.startswith("Conflicting"):
                raise
            raise _bad("Content-Length") from None
    call_id = parts[index("call-id")][2].strip(" \t")
    # §25.1 callid, read leniently (see Message.call_id); the str tests are the cheap common case.
    if not (call_id and call_id.isascii() and call_id.isprintable() and " " not in call_id) and (
        not call_id or _CALL_ID_BAD_RE.search(call_id)
    ):
        raise _bad("Call-ID")
    try:
        if (unique or keys.count("via") == 1) and "," not in (via := parts[index("via")][2].strip(" \t")):
            vias: tuple[Via, ...] = (parse_via(via),)
        else:
            vias = tuple(
                parse_via(v)
                for key, part in zip(keys, parts, strict=True)
                if key == "via"
                for v in split_list(part[2].strip(" \t"))
            )
            if not vias:
                raise _missing("Via")
    except SipParseError:
        raise _bad("Via") from None
    from_text = parts[index("from")][2].strip(" \t")
    try:
        from_ = parse_name_addr(from_text)
    except SipParseError:
        raise _bad("From") from None
    to_text = parts[index("to")][2].strip(" \t")
    if (
        from_text.startswith(to_text + ";")
        and to_text.endswith(">")
        and "\\" not in to_text
        and to_text.count('"') % 2 == 0
    ):
        # To is From without its parameters (a REGISTER, §10.2: both name the AoR). Quotes in To
        # are balanced and hold no quoted-pair, so its final '>' is outside any quoted string: it
        # closes From's <URI>, and To's display name and URI are From's; To has no parameters.
        to = _new_name_addr(NameAddr, (from_.uri, from_.display_name, EMPTY_PARAMS))
    else:
        try:
            to = parse_name_addr(to_text)
        except SipParseError:
            raise _bad("To") from None
    try:
        cseq = parse_cseq(parts[index("cseq")][2].strip(" \t"))
    except SipParseError:
        raise _bad("CSeq") from None
    cache: dict[str, object] = {
        _KEYS: keys,
        "content-length": length,
        "call-id": call_id,
        "via": vias,
        "from": from_,
        "to": to,
        "cseq": cseq,
    }
    headers._cache = cache
    if isinstance(message, Request):
        if cseq.method != message.method:
            raise SipParseError(400, "CSeq method does not match the request method")
        if "max-forwards" in present:
            text = parts[index("max-forwards")][2].strip(" \t")
            hops = _UINTS.get(text)
            if hops is not None and hops <= 255:
                cache["max-forwards"] = hops
            else:
                cache["max-forwards"] = parse_uint(text, "Max-Forwards header", 255)
        else:
            cache["max-forwards"] = None
    return length
