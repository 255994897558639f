"""SIP, SIPS and tel URIs (RFC 3261 §19.1, §25.1; RFC 3966; RFC 5118 for IPv6 references).

Theory of operation: `parse_uri(text)` returns an immutable value object: `SipUri` for sip:/sips:,
`TelUri` for tel:, `AbsoluteUri` for any other scheme (kept opaque). Escapes (%HH, §19.1.2) are
decoded once at parse time in the user, password, parameter names and values and header values, and
applied again by `str(uri)` to every character the grammar does not allow unescaped there, so
`parse_uri(str(u)) == u` for every value `u`. Host names are kept as written (case included); IPv6
references keep their brackets (`[2001:db8::1]`) and must be valid IPv6 addresses (RFC 5118 §4.7:
`2001:db8:::192.0.2.1` is not).

The common URI (`sip:user@host:port;param=value`, no escapes, no IPv6, no headers) is recognised by
one regular expression; anything else takes the general path, which gives the same result.

Invariants:
- parsing raises only `SipParseError` (status 400), never another exception, and runs in time
  linear in the input (no nested backtracking: the user part is only looked for when `@` is present);
- value objects are NamedTuples: immutable, hashable, cheap to build; derive changed copies with
  `_replace` or `Params.set`;
- parameter names compare case-insensitively in lookups and keep their written order and case;
- `SipUri.equivalent` implements the comparison rules of RFC 3261 §19.1.4.
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple

from mypy_extensions import mypyc_attr

from .errors import SipParseError

__all__ = [
    "EMPTY_PARAMS",
    "AbsoluteUri",
    "Params",
    "SipUri",
    "TelUri",
    "Uri",
    "check_host",
    "escape",
    "fast_sip_uri",
    "parse_sip_uri",
    "parse_uri",
    "unescape",
]

ParamItem = tuple[str, str | None]


@mypyc_attr(native_class=False)  # see setup.py: compiled with mypyc, kept a Python class
class Params(tuple[ParamItem, ...]):
    """An immutable, ordered tuple of `(name, value)` parameters; a flag (`;lr`) has value None.

    Lookups (`get`, `has`) compare names case-insensitively. Values are stored as the owner defines
    them: decoded for URI parameters, as written (quoted strings keep their quotes) for header
    parameters. Equality is the tuple's: same names (same case), same values, same order.
    """

    __slots__ = ()

    def get(self, name: str, default: str | None = None) -> str | None:
        """Value of the first parameter called `name`; `default` if absent or a flag."""
        key = name.lower()
        for n, v in self:
            if n == key or n.lower() == key:
                return default if v is None else v
        return default

    def lookup(self, key: str) -> str | None:
        """`get(key)` for a `key` already lower-case ASCII (the accessors' literal names): no
        lower-casing of `key`, and names of another length are skipped without lower-casing them (a
        name whose lower-case form is ASCII has as many characters as that form)."""
        for n, v in self:
            if n == key or (len(n) == len(key) and n.lower() == key):
                return v
        return None

    def has(self, name: str) -> bool:
        """True when a parameter called `name` is present (flag or with a value)."""
        key = name.lower()
        return any(n == key or n.lower() == key for n, _ in self)

    def set(self, name: str, value: str | None = None) -> Params:
        """A copy with the first `name` replaced (or appended when absent)."""
        key = name.lower()
        items = list(self)
        for i, (n, _) in enumerate(items):
            if n.lower() == key:
                items[i] = (name, value)
                return Params(items)
        items.append((name, value))
        return Params(items)

    def remove(self, name: str) -> Params:
        """A copy without any parameter called `name`."""
        key = name.lower()
        return Params(item for item in self if item[0].lower() != key)

    def __repr__(self) -> str:
        return f"Params({list(self)!r})"


EMPTY_PARAMS = Params()
_new = tuple.__new__

# RFC 3261 §25.1 character classes.
_UNRESERVED = "-_.!~*'()"
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_USER_SAFE = frozenset(_ALNUM + _UNRESERVED + "&=+$,;?/")
_PASSWORD_SAFE = frozenset(_ALNUM + _UNRESERVED + "&=+$,")
_PARAM_SAFE = frozenset(_ALNUM + _UNRESERVED + "[]/:&+$")
_HEADER_SAFE = frozenset(_ALNUM + _UNRESERVED + "[]/?:+$")
_SAFE_CHARS = {safe: "".join(sorted(safe)) for safe in (_USER_SAFE, _PASSWORD_SAFE, _PARAM_SAFE, _HEADER_SAFE)}

_ESCAPE_BYTES_RE = re.compile(rb"%([0-9A-Fa-f]{2})")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9\-.]*[A-Za-z0-9.])?")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_USER_RE = re.compile(r"(?:[A-Za-z0-9\-_.!~*'()&=+$,;?/]|%[0-9A-Fa-f]{2})+")
_PASSWORD_RE = re.compile(r"(?:[A-Za-z0-9\-_.!~*'()&=+$,]|%[0-9A-Fa-f]{2})*")
_PARAMCHARS_RE = re.compile(r"(?:[A-Za-z0-9\-_.!~*'()\[\]/:&+$]|%[0-9A-Fa-f]{2})+")
_HNV_RE = re.compile(r"(?:[A-Za-z0-9\-_.!~*'()\[\]/?:+$]|%[0-9A-Fa-f]{2})*")
_TEL_NUMBER_RE = re.compile(r"\+?[0-9A-Fa-f*#.\-()]+")
_PCHAR = r"[A-Za-z0-9\-_.!~*'()\[\]/:&+$]"
# The common SIP URI after the scheme: [user[:password]@]host[:port][;params], no escapes. Every
# repetition is possessive (`*+`, `++`): each class excludes the character that must follow it (the
# user and password classes exclude ':' and '@', the host class ':' and ';', parameter classes ';'
# and '='), so giving characters back could never lead to a match, and the engine keeps no
# backtracking state (about half the cost of the greedy form). The host is `alnum [alnum.-]*`
# here; a host ending in '-' or holding '..' is left to the general path (`fast_sip_uri`).
_FAST_HOSTPORT = rf"([A-Za-z0-9][A-Za-z0-9\-.]*+)(?::([0-9]{{1,5}}+))?+((?:;{_PCHAR}++(?:={_PCHAR}++)?+)*+)"
_FAST_HOST_RE = re.compile(_FAST_HOSTPORT)
# The same, with the scheme, for embedding in other expressions (see headers.parse_name_addr): groups
# scheme, user, password, host, port, params.
FAST_SIP_PARTS = (
    r"(sips?):(?:([A-Za-z0-9\-_.!~*'()&=+$,;?/]++)(?::([A-Za-z0-9\-_.!~*'()&=+$,]*+))?+@)?" + _FAST_HOSTPORT
)
_FAST_USER_HOST_RE = re.compile(
    rf"([A-Za-z0-9\-_.!~*'()&=+$,;?/]++)(?::([A-Za-z0-9\-_.!~*'()&=+$,]*+))?+@{_FAST_HOSTPORT}"
)


def unescape(text: str) -> str:
    """Decode %HH escapes (§19.1.2); bytes are read as UTF-8, invalid sequences kept by surrogateescape."""
    if "%" not in text:
        return text
    data = _ESCAPE_BYTES_RE.sub(_unescape_one, text.encode("utf-8", "surrogateescape"))
    return data.decode("utf-8", "surrogateescape")


def _unescape_one(match: re.Match[bytes]) -> bytes:
    return bytes((int(match.group(1), 16),))


def escape(text: str, safe: frozenset[str]) -> str:
    """Escape as %HH every character of `text` not in `safe` (UTF-8 for non-ASCII)."""
    chars = _SAFE_CHARS.get(safe)
    # str.strip(chars) removes safe characters from both ends, in C: nothing left = every character is safe.
    if not text.strip("".join(safe) if chars is None else chars):
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


def check_host(host: str) -> str:
    """Validate a host (hostname, IPv4 address or bracketed IPv6 reference); return it unchanged."""
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
    """`name[=value];...` (the text after the first ';')."""
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


class SipUri(NamedTuple):
    """A sip: or sips: URI (RFC 3261 §19.1). Text fields hold decoded (unescaped) values."""

    host: str
    scheme: str = "sip"
    user: str | None = None
    password: str | None = None
    port: int | None = None
    params: Params = EMPTY_PARAMS
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def transport(self) -> str | None:
        value = self.params.get("transport")
        return value.lower() if value is not None else None

    @property
    def lr(self) -> bool:
        return self.params.has("lr")

    @property
    def maddr(self) -> str | None:
        return self.params.get("maddr")

    @property
    def host_port(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    def with_param(self, name: str, value: str | None = None) -> SipUri:
        """A copy with URI parameter `name` set (replaced in place, or appended)."""
        return self._replace(params=self.params.set(name, value))

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
        if self.params:
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
        in both must match (case-insensitively); user, ttl, method and maddr (and transport, by the
        same rule) present in only one make the URIs differ; other parameters present in only one
        are ignored; headers must match as sets (names case-insensitive).
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


class TelUri(NamedTuple):
    """A tel: URI (RFC 3966), minimal: the number as written and its parameters."""

    number: str
    params: Params = EMPTY_PARAMS

    @property
    def is_global(self) -> bool:
        return self.number.startswith("+")

    def __str__(self) -> str:
        return "tel:" + self.number + _format_params(self.params)


class AbsoluteUri(NamedTuple):
    """A URI of any other scheme (RFC 3261 absoluteURI), kept opaque; the scheme is lower-cased."""

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
    if text.startswith("sip:"):
        return _parse_sip("sip", text[4:])
    if text.startswith("sips:"):
        return _parse_sip("sips", text[5:])
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
    number, semi, params = rest.partition(";")
    if not _TEL_NUMBER_RE.fullmatch(number):
        raise _fail("telephone number")
    return TelUri(number, _parse_uri_params(params) if semi else EMPTY_PARAMS)


def _parse_sip(scheme: str, rest: str) -> SipUri:
    if "%" not in rest:
        if "@" in rest:
            m = _FAST_USER_HOST_RE.fullmatch(rest)
            if m is not None:
                user, password, host, port_text, ptext = m.groups()
                uri = fast_sip_uri(scheme, user, password, host, port_text, ptext)
                if uri is not None:
                    return uri
        else:
            m = _FAST_HOST_RE.fullmatch(rest)
            if m is not None:
                host, port_text, ptext = m.groups()
                uri = fast_sip_uri(scheme, None, None, host, port_text, ptext)
                if uri is not None:
                    return uri
    return _parse_sip_general(scheme, rest)


def fast_sip_uri(
    scheme: str, user: str | None, password: str | None, host: str, port_text: str | None, ptext: str
) -> SipUri | None:
    """A SipUri from the groups of `FAST_SIP_PARTS` (no escapes in them); None when the general
    parser must decide (it then raises or accepts)."""
    if ".." in host or host[-1] == "-":
        return None
    port = None
    if port_text is not None:
        port = int(port_text)
        if port > 65535:
            raise _fail("port")
    params = EMPTY_PARAMS
    if ptext:
        cached = _PARAMS_CACHE.get(ptext)
        if cached is None:
            items: list[ParamItem] = []
            for part in ptext[1:].split(";"):
                name, eq, value = part.partition("=")
                items.append((name, value if eq else None))
            cached = _new(Params, items)
            if len(_PARAMS_CACHE) < _PARAMS_CACHE_MAX:
                _PARAMS_CACHE[ptext] = cached
        params = cached
    return _new(SipUri, (host, scheme, user, password, port, params, ()))


# URI parameter texts seen by the fast path (`;lr`, `;ob`, `;transport=tcp`: few distinct ones in
# real traffic) and their Params, which are immutable and so can be shared. Bounded: once full, new
# texts are parsed each time and not added.
_PARAMS_CACHE: dict[str, Params] = {}
_PARAMS_CACHE_MAX = 512


def _parse_sip_general(scheme: str, rest: str) -> SipUri:
    user: str | None = None
    password: str | None = None
    at = rest.find("@")
    if at >= 0:
        userinfo, rest = rest[:at], rest[at + 1 :]
        # Neither user nor password may contain ':' unescaped (§25.1): split at the first.
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
    return SipUri(check_host(host), scheme, user, password, port, params, headers)


def _parse_port(text: str) -> int:
    if not _PORT_RE.fullmatch(text):
        raise _fail("port")
    port = int(text)
    if port > 65535:
        raise _fail("port")
    return port
