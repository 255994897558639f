"""SIP, SIPS and tel URIs (RFC 3261 §19.1, §25.1; RFC 3966; RFC 5118 for IPv6 references).

Theory of operation: `parse_uri(text)` returns an immutable value object: `SipUri` for sip:/sips:,
`TelUri` for tel:, `AbsoluteUri` for any other scheme (kept opaque). Escapes (%HH, §19.1.2) are
decoded once at parse time in the user, password, parameter values and header values, and applied again
by `str(uri)` for every character the grammar does not allow unescaped there, so
`parse_uri(str(u)) == u` for every value object `u`. Host names are kept as written (case included);
IPv6 references keep their brackets (`[2001:db8::1]`) and are validated as IPv6 addresses (RFC 5118).

Invariants:
- parsing raises only `SipParseError` (status 400), never another exception;
- parameter names are compared case-insensitively and keep their written order (`Params`);
- `SipUri.equivalent` implements the comparison rules of RFC 3261 §19.1.4.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .errors import SipParseError

__all__ = [
    "AbsoluteUri",
    "Params",
    "SipUri",
    "TelUri",
    "Uri",
    "escape",
    "parse_uri",
    "unescape",
]

ParamItem = tuple[str, str | None]


class Params:
    """An immutable, ordered list of `name[=value]` parameters with case-insensitive names.

    A flag parameter (`;lr`) has the value None. Values are stored as the owner defines them: decoded
    for URI parameters, as written (quoted strings keep their quotes) for header parameters.
    """

    __slots__ = ("_items", "_keys")

    _items: tuple[ParamItem, ...]
    _keys: tuple[str, ...]

    def __init__(self, items: Iterable[ParamItem] = ()) -> None:
        self._items = tuple(items)
        self._keys = tuple(name.lower() for name, _ in self._items)

    @property
    def items(self) -> tuple[ParamItem, ...]:
        return self._items

    def get(self, name: str, default: str | None = None) -> str | None:
        """Value of the first parameter called `name`; `default` if absent or a flag."""
        try:
            value = self._items[self._keys.index(name.lower())][1]
        except ValueError:
            return default
        return default if value is None else value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._keys

    def set(self, name: str, value: str | None = None) -> Params:
        """A copy with the first `name` replaced (or appended when absent)."""
        key = name.lower()
        if key in self._keys:
            i = self._keys.index(key)
            return Params((*self._items[:i], (name, value), *self._items[i + 1 :]))
        return Params((*self._items, (name, value)))

    def remove(self, name: str) -> Params:
        """A copy without any parameter called `name`."""
        key = name.lower()
        return Params(item for item, k in zip(self._items, self._keys, strict=True) if k != key)

    def __iter__(self) -> Iterator[ParamItem]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Params):
            return NotImplemented
        return self._keys == other._keys and [v for _, v in self._items] == [v for _, v in other._items]

    def __hash__(self) -> int:
        return hash((self._keys, tuple(v for _, v in self._items)))

    def __repr__(self) -> str:
        return f"Params({list(self._items)!r})"


EMPTY_PARAMS = Params()

# RFC 3261 §25.1 character classes.
_UNRESERVED = "-_.!~*'()"
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_USER_SAFE = frozenset(_ALNUM + _UNRESERVED + "&=+$,;?/")
_PASSWORD_SAFE = frozenset(_ALNUM + _UNRESERVED + "&=+$,")
_PARAM_SAFE = frozenset(_ALNUM + _UNRESERVED + "[]/:&+$")
_HEADER_SAFE = frozenset(_ALNUM + _UNRESERVED + "[]/?:+$")

_ESCAPE_BYTES_RE = re.compile(rb"%([0-9A-Fa-f]{2})")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9\-.]*[A-Za-z0-9.])?")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_USER_RE = re.compile(r"(?:[A-Za-z0-9\-_.!~*'()&=+$,;?/]|%[0-9A-Fa-f]{2})+")
_PASSWORD_RE = re.compile(r"(?:[A-Za-z0-9\-_.!~*'()&=+$,]|%[0-9A-Fa-f]{2})*")
_PARAMCHARS_RE = re.compile(r"(?:[A-Za-z0-9\-_.!~*'()\[\]/:&+$]|%[0-9A-Fa-f]{2})+")
_HNV_RE = re.compile(r"(?:[A-Za-z0-9\-_.!~*'()\[\]/?:+$]|%[0-9A-Fa-f]{2})*")
_TEL_NUMBER_RE = re.compile(r"\+?[0-9A-Fa-f*#.\-()]+")


def unescape(text: str) -> str:
    """Decode %HH escapes (§19.1.2); the bytes are read as UTF-8, invalid bytes kept by surrogateescape."""
    if "%" not in text:
        return text
    data = _ESCAPE_BYTES_RE.sub(_unescape_one, text.encode("utf-8", "surrogateescape"))
    return data.decode("utf-8", "surrogateescape")


def _unescape_one(match: re.Match[bytes]) -> bytes:
    return bytes((int(match.group(1), 16),))


def escape(text: str, safe: frozenset[str]) -> str:
    """Escape as %HH every character of `text` not in `safe` (UTF-8 for non-ASCII)."""
    if all(ch in safe for ch in text):
        return text
    out: list[str] = []
    for ch in text:
        if ch in safe:
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogateescape"))
    return "".join(out)


def _fail(what: str) -> SipParseError:
    return SipParseError(400, f"Malformed URI ({what})")


def _check_host(host: str) -> str:
    if host.startswith("["):
        if not host.endswith("]"):
            raise _fail("IPv6 reference")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise _fail("IPv6 reference") from None
        return host
    if not _HOSTNAME_RE.fullmatch(host) or ".." in host:
        raise _fail("host")
    return host


def _parse_uri_params(text: str) -> Params:
    """`;name[=value]...` (leading ';' already stripped by the caller splitting on ';')."""
    items: list[ParamItem] = []
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if not _PARAMCHARS_RE.fullmatch(name):
            raise _fail("parameter")
        if eq:
            if not _PARAMCHARS_RE.fullmatch(value):
                raise _fail("parameter value")
            items.append((unescape(name), unescape(value)))
        else:
            items.append((unescape(name), None))
    return Params(items)


def _format_params(params: Params) -> str:
    out: list[str] = []
    for name, value in params:
        out.append(";" + escape(name, _PARAM_SAFE))
        if value is not None:
            out.append("=" + escape(value, _PARAM_SAFE))
    return "".join(out)


@dataclass(frozen=True, slots=True)
class SipUri:
    """A sip: or sips: URI (RFC 3261 §19.1). Text fields hold decoded (unescaped) values."""

    host: str
    scheme: str = "sip"
    user: str | None = None
    password: str | None = None
    port: int | None = None
    params: Params = field(default=EMPTY_PARAMS)
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def transport(self) -> str | None:
        value = self.params.get("transport")
        return value.lower() if value is not None else None

    @property
    def lr(self) -> bool:
        return "lr" in self.params

    @property
    def maddr(self) -> str | None:
        return self.params.get("maddr")

    @property
    def host_port(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        out = [self.scheme, ":"]
        if self.user is not None:
            out.append(escape(self.user, _USER_SAFE))
            if self.password is not None:
                out.append(":" + escape(self.password, _PASSWORD_SAFE))
            out.append("@")
        out.append(self.host)
        if self.port is not None:
            out.append(f":{self.port}")
        out.append(_format_params(self.params))
        if self.headers:
            out.append(
                "?"
                + "&".join(f"{escape(n, _HEADER_SAFE)}={escape(v, _HEADER_SAFE)}" for n, v in self.headers)
            )
        return "".join(out)

    def equivalent(self, other: object) -> bool:
        """URI comparison of RFC 3261 §19.1.4.

        Scheme and host are case-insensitive, user and password case-sensitive; a parameter present
        in both must match (case-insensitively); user, ttl, method and maddr (and transport, per the
        same rule) present in only one make the URIs differ; other parameters present in only one are
        ignored; headers must match exactly as sets (names case-insensitive).
        """
        if not isinstance(other, SipUri):
            return False
        if self.scheme != other.scheme or self.user != other.user or self.password != other.password:
            return False
        if self.host.lower() != other.host.lower() or self.port != other.port:
            return False
        mine = {n.lower(): (v or "").lower() for n, v in self.params}
        theirs = {n.lower(): (v or "").lower() for n, v in other.params}
        for name in ("user", "ttl", "method", "maddr", "transport"):
            if (name in mine) != (name in theirs):
                return False
        for name in mine.keys() & theirs.keys():
            if mine[name] != theirs[name]:
                return False
        return {(n.lower(), v) for n, v in self.headers} == {(n.lower(), v) for n, v in other.headers}


@dataclass(frozen=True, slots=True)
class TelUri:
    """A tel: URI (RFC 3966), minimal: the number as written and its parameters."""

    number: str
    params: Params = field(default=EMPTY_PARAMS)

    @property
    def is_global(self) -> bool:
        return self.number.startswith("+")

    def __str__(self) -> str:
        return "tel:" + self.number + _format_params(self.params)


@dataclass(frozen=True, slots=True)
class AbsoluteUri:
    """A URI of any other scheme (RFC 3261 absoluteURI), kept opaque."""

    scheme: str
    rest: str

    def __str__(self) -> str:
        return f"{self.scheme}:{self.rest}"


Uri = SipUri | TelUri | AbsoluteUri


def parse_sip_uri(text: str) -> SipUri:
    """Parse a sip:/sips: URI; raise SipParseError(400) for anything else."""
    uri = parse_uri(text)
    if not isinstance(uri, SipUri):
        raise _fail("not a SIP URI")
    return uri


def parse_uri(text: str) -> Uri:
    """Parse a URI as found in a Request-URI or inside <> of a name-addr."""
    scheme, colon, rest = text.partition(":")
    if not colon or not _SCHEME_RE.fullmatch(scheme):
        raise _fail("scheme")
    lscheme = scheme.lower()
    if lscheme in ("sip", "sips"):
        return _parse_sip(lscheme, rest)
    if lscheme == "tel":
        return _parse_tel(rest)
    if not rest or any(ch <= " " or ch in '<>"' or ch == "\x7f" for ch in rest):
        raise _fail("absolute URI")
    return AbsoluteUri(lscheme, rest)


def _parse_tel(rest: str) -> TelUri:
    number, _, params = rest.partition(";")
    if not _TEL_NUMBER_RE.fullmatch(number):
        raise _fail("telephone number")
    return TelUri(number, _parse_uri_params(params) if params else EMPTY_PARAMS)


def _parse_sip(scheme: str, rest: str) -> SipUri:
    user: str | None = None
    password: str | None = None
    at = rest.find("@")
    if at >= 0:
        userinfo, rest = rest[:at], rest[at + 1 :]
        # The password cannot contain ':' unescaped while a user can't either (§25.1): split at the first.
        u, colon, p = userinfo.partition(":")
        if not _USER_RE.fullmatch(u):
            raise _fail("user")
        user = unescape(u)
        if colon:
            if not _PASSWORD_RE.fullmatch(p):
                raise _fail("password")
            password = unescape(p)
    headers: tuple[tuple[str, str], ...] = ()
    q = rest.find("?")
    if q >= 0:
        rest, hpart = rest[:q], rest[q + 1 :]
        hlist: list[tuple[str, str]] = []
        for item in hpart.split("&"):
            hname, eq, hvalue = item.partition("=")
            if not eq or not hname or not _HNV_RE.fullmatch(hname) or not _HNV_RE.fullmatch(hvalue):
                raise _fail("headers")
            hlist.append((unescape(hname), unescape(hvalue)))
        headers = tuple(hlist)
    hostport, semi, ptext = rest.partition(";")
    params = _parse_uri_params(ptext) if semi else EMPTY_PARAMS
    port: int | None = None
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise _fail("IPv6 reference")
        host, after = hostport[: end + 1], hostport[end + 1 :]
        if after:
            if not after.startswith(":"):
                raise _fail("port")
            port = _parse_port(after[1:])
    else:
        host, colon, ptxt = hostport.partition(":")
        if colon:
            port = _parse_port(ptxt)
    return SipUri(_check_host(host), scheme, user, password, port, params, headers)


def _parse_port(text: str) -> int:
    if not _PORT_RE.fullmatch(text):
        raise _fail("port")
    port = int(text)
    if port > 65535:
        raise _fail("port")
    return port
