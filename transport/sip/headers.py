"""Typed values of SIP header fields (RFC 3261 §20, §25.1; RFC 3581 rport; RFC 5118 IPv6; RFC 5626).

Theory of operation: `message.Headers` keeps every field as text; the functions here turn one field
value (already unfolded, §7.3.1) into an immutable value object when someone asks for it, and
`str(obj)` turns it back into text that these functions parse to an equal object.

- `split_list(value)` splits a comma-separated list value (§7.3.1: `Via: a, b` is two Via values)
  at commas outside quoted strings and outside `<...>`.
- `parse_via` -> `Via` (sent-protocol, sent-by, parameters: branch, received, rport, maddr, ttl).
- `parse_name_addr` -> `NameAddr` for From, To, Contact, Route, Record-Route, Path, Refer-To...
  (name-addr or addr-spec form; §20.10: in the addr-spec form the parameters belong to the header,
  and a URI with `,`, `;` or `?` must be inside `<>`).
- `parse_contact_list` also accepts the `*` form of Contact (§10.2.2) and returns None for it.
- `parse_cseq` -> `CSeq`; `parse_uint` for Max-Forwards, Expires, Content-Length...

Each parser first tries one regular expression for the shape real phones send, then falls back to a
general path; both give the same result. Header parameter values are stored as written (a quoted
string keeps its quotes; `unquote` removes them).

Invariants: every parse function raises only `SipParseError` (status 400) on bad input; value
objects are immutable NamedTuples.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

from .errors import SipParseError, SipValueError
from .uri import _PARAMS_CACHE as _URI_PARAMS_CACHE
from .uri import EMPTY_PARAMS, FAST_SIP_PARTS, Params, SipUri, Uri, check_host, fast_sip_uri, parse_uri

__all__ = [
    "CSeq",
    "NameAddr",
    "Params",
    "Via",
    "format_params",
    "parse_contact_list",
    "parse_cseq",
    "parse_name_addr",
    "parse_params",
    "parse_uint",
    "parse_via",
    "parse_vias",
    "quote",
    "split_list",
    "unquote",
]

_new = tuple.__new__
TOKEN = r"[A-Za-z0-9\-.!%*_+`'~]+"
_QUOTED = r'"[^"\\\r\n]*(?:\\[^\r\n][^"\\\r\n]*)*"'
_QUOTED_RE = re.compile(_QUOTED)
_QUOTE_RE = re.compile(r'["\\\x00-\x08\x0b\x0c\x0e-\x1f\x7f]')
# gen-value = token / host / quoted-string (§25.1); host includes IPv6 references; `:` is accepted
# in values for unbracketed IPv6 `received` values (RFC 5118 §4.5).
_GEN_VALUE = rf"{_QUOTED}|\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-.!%*_+`'~:]+"
_PARAM = rf"[ \t]*;[ \t]*({TOKEN})(?:[ \t]*=[ \t]*({_GEN_VALUE}))?"
_PARAM_RE = re.compile(_PARAM)
_PARAMS_RE = re.compile(rf"(?:[ \t]*;[ \t]*{TOKEN}(?:[ \t]*=[ \t]*(?:{_GEN_VALUE}))?)*[ \t]*")
_SIMPLE_PARAMS = rf"(?:;{TOKEN}(?:=[A-Za-z0-9\-.!%*_+`'~]+)?)*"
# The fast expressions below use possessive repetitions (`*+`, `++`, `?+`) and an atomic group:
# every class excludes the character that has to follow it (a token stops at ';', '=', ' ', '<';
# the three gen-value forms start with different characters), so a match never needs to give
# characters back, and without backtracking state the engine does about half the work. They accept
# exactly what the greedy forms accept (tests/transport/test_sip_fast_paths.py compares them).
_TOKEN_P = r"[A-Za-z0-9\-.!%*_+`'~]++"
_QUOTED_P = r'"[^"\\\r\n]*+(?:\\[^\r\n][^"\\\r\n]*+)*+"'
_GEN_VALUE_P = rf"(?>{_QUOTED_P}|\[[0-9A-Fa-f:.]++\]|[A-Za-z0-9\-.!%*_+`'~:]++)"
_SIMPLE_PARAMS_P = rf"(?:;{_TOKEN_P}(?:={_TOKEN_P})?+)*+"
_HEADER_PARAMS_P = rf"(?:;{_TOKEN_P}(?:={_GEN_VALUE_P})?+)*+"
# The same for the one-expression path, with quoted values that hold no ';' and no quoted-pair, so
# that the parameters can be split at each ';' (anything else takes the next expression).
_HEADER_PARAMS_SPLIT_P = (
    rf"(?:;{_TOKEN_P}(?:=(?>\"[^\"\\\r\n;]*+\"|\[[0-9A-Fa-f:.]++\]|[A-Za-z0-9\-.!%*_+`'~:]++))?+)*+"
)
_DISPLAY_P = rf'(?:"([^"\\\r\n]*+)" ?+|({_TOKEN_P}(?: {_TOKEN_P})*+) )?'
# What most phones send, `;rport;branch=token` or `;branch=token`, has its own alternative (groups:
# an empty string when rport is there, the branch), so that parse_via builds its Params without
# looking at the text again; anything else is the general `(;token[=token])*` alternative.
_VIA_FAST_RE = re.compile(
    rf"SIP/2\.0/([A-Z]++) ([A-Za-z0-9][A-Za-z0-9\-.]*+)(?::([0-9]{{1,5}}+))?+"
    rf"(?:(?:;rport())?+;branch=({_TOKEN_P})|({_SIMPLE_PARAMS_P}))"
)
_VIA_RE = re.compile(
    rf"[ \t]*({TOKEN})[ \t]*/[ \t]*({TOKEN})[ \t]*/[ \t]*({TOKEN})[ \t]+"
    r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-.]+)(?:[ \t]*:[ \t]*([0-9]{1,5}))?"
)
_NAME_ADDR_FAST_RE = re.compile(rf'{_DISPLAY_P}<(sips?:[^<>"\s]++)>({_HEADER_PARAMS_P})')
# name-addr with a plain SIP URI, in one expression: display (quoted or tokens), the URI's parts,
# header parameters.
# A lone tag parameter (From, To) has its own alternative (group: its value), as in _VIA_FAST_RE.
_NAME_ADDR_SIP_FAST_RE = re.compile(
    rf"{_DISPLAY_P}<{FAST_SIP_PARTS}>(?:;tag=([A-Za-z0-9\-.!%*_+`'~:]++)|({_HEADER_PARAMS_SPLIT_P}))"
)
_ADDR_SPEC_FAST_RE = re.compile(rf"(sips?:[^<>\"\s;,?]++)({_SIMPLE_PARAMS_P})")
_CSEQ_RE = re.compile(rf"[ \t]*([0-9]{{1,10}})[ \t]+({TOKEN})[ \t]*")
_UINT_RE = re.compile(r"[ \t]*([0-9]{1,10})[ \t]*")
# Possessive: with `(?:token[ \t]*)*` a long run of token characters followed by a character that
# is not one (`aaaa...a"`) made the engine try every way to cut the run into tokens, 2**n of them
# (one From header could hold the event loop for hours). Each token now keeps all it matched.
_DISPLAY_TOKENS_RE = re.compile(r"(?:[A-Za-z0-9\-.!%*_+`'~]++[ \t]*+)*+")
_QVALUE_RE = re.compile(r"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")


def _fail(what: str) -> SipParseError:
    return SipParseError(400, f"Malformed {what}")


# Decimal texts of the small integers (0-999, and the usual registration intervals) and their
# values: a constant table of the grammar, not of traffic (Content-Length, Max-Forwards, expires,
# rport...). One lookup replaces the digit checks and int(), which costs more than the lookup on
# CPython 3.11; a text that is not here (leading zeros, spaces, large values) takes the checks.
_UINTS: Final[dict[str, int]] = {str(i): i for i in (*range(1000), 1800, 3600, 7200)}


def _small_int(value: str | None) -> int | None:
    """A parameter value as int when it is 1-10 ASCII digits, else None."""
    if value is not None and value.isdigit() and len(value) <= 10 and value.isascii():
        return int(value)
    return None


def split_list(value: str) -> list[str]:
    """Split a list header value at top-level commas (not inside "..." or <...>); drop empty items."""
    if "," not in value:
        v = value.strip()
        return [v] if v else []
    if '"' not in value and "<" not in value:
        return [v for v in (item.strip() for item in value.split(",")) if v]
    items: list[str] = []
    start = 0
    i = 0
    n = len(value)
    in_angle = False
    while i < n:
        ch = value[i]
        if ch == '"' and not in_angle:
            m = _QUOTED_RE.match(value, i)
            if m is None:
                raise _fail("quoted string")
            i = m.end()
            continue
        if ch == "<":
            in_angle = True
        elif ch == ">":
            in_angle = False
        elif ch == "," and not in_angle:
            item = value[start:i].strip()
            if item:
                items.append(item)
            start = i + 1
        i += 1
    item = value[start:].strip()
    if item:
        items.append(item)
    return items


def quote(text: str) -> str:
    """`text` as a quoted-string (§25.1): `"`, backslash and control characters become quoted-pairs.
    CR and LF cannot be quoted (SipValueError)."""
    if "\r" in text or "\n" in text:
        raise SipValueError("CR or LF in a quoted string")
    return '"' + _QUOTE_RE.sub(r"\\\g<0>", text) + '"'


def unquote(text: str) -> str:
    """The content of a quoted-string with quoted-pairs resolved; other text is returned unchanged."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        inner = text[1:-1]
        if "\\" not in inner:
            return inner
        out: list[str] = []
        it = iter(inner)
        for ch in it:
            out.append(next(it, "") if ch == "\\" else ch)
        return "".join(out)
    return text


def parse_params(text: str, pos: int = 0, what: str = "parameters") -> Params:
    """Parse `;name[=value]` header parameters from `text[pos:]` to the end (SWS allowed, §25.1)."""
    if pos >= len(text):
        return EMPTY_PARAMS
    if _PARAMS_RE.fullmatch(text, pos) is None:
        raise _fail(what)
    items = [(name, value or None) for name, value in _PARAM_RE.findall(text, pos)]
    return Params(items) if items else EMPTY_PARAMS


def _simple_params(text: str) -> Params:
    """Params from text already validated as `(;token[=token])*` (no quotes, no spaces)."""
    if not text:
        return EMPTY_PARAMS
    items: list[tuple[str, str | None]] = []
    for part in text[1:].split(";"):
        name, eq, value = part.partition("=")
        items.append((name, value if eq else None))
    return Params(items)


def _header_params(ptext: str) -> Params:
    """Params from text already validated as `(;token[=gen-value])*` with no whitespace."""
    if not ptext:
        return EMPTY_PARAMS
    if '"' in ptext and ("\\" in ptext or ";" in "".join(ptext.split('"')[1::2])):
        # A quoted value holds a `;` or a quoted-pair: split by the expression instead.
        return Params([(n, v or None) for n, v in _PARAM_RE.findall(ptext)])
    # Each `;` separates parameters and each name (a token) ends at the first `=`.
    items: list[tuple[str, str | None]] = []
    for part in ptext[1:].split(";"):
        name, eq, value = part.partition("=")
        items.append((name, value if eq else None))
    return Params(items)


def format_params(params: Params) -> str:
    """`;name=value` text of header parameters (values as stored)."""
    return "".join(f";{n}" if v is None else f";{n}={v}" for n, v in params)


class Via(NamedTuple):
    """One Via value (§20.42): `SIP/2.0/UDP host:port;branch=...`; transport is upper-cased."""

    transport: str
    host: str
    port: int | None = None
    params: Params = EMPTY_PARAMS
    protocol: str = "SIP/2.0"

    @property
    def branch(self) -> str | None:
        return self.params.lookup("branch")

    @property
    def received(self) -> str | None:
        return self.params.get("received")

    @property
    def rport(self) -> int | None:
        """The rport value filled in by a server (RFC 3581 §4); None when absent or a bare flag."""
        return _small_int(self.params.get("rport"))

    @property
    def rport_requested(self) -> bool:
        """True when the rport parameter is present, as a flag or with a value (RFC 3581 §3)."""
        return self.params.has("rport")

    @property
    def maddr(self) -> str | None:
        return self.params.get("maddr")

    @property
    def ttl(self) -> int | None:
        return _small_int(self.params.get("ttl"))

    @property
    def sent_by(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    def with_param(self, name: str, value: str | None = None) -> Via:
        """A copy with parameter `name` set (replaced in place, or appended)."""
        return self._replace(params=self.params.set(name, value))

    def __str__(self) -> str:
        return f"{self.protocol}/{self.transport} {self.sent_by}{format_params(self.params)}"


def _check_via_params(params: Params) -> None:
    for n, v in params:
        key = n.lower()
        if key in ("ttl", "rport"):
            if v is not None and _small_int(v) is None:
                raise _fail(f"Via {key}")
            if key == "ttl" and v is None:
                raise _fail("Via ttl")
        elif key == "branch" and not v:
            raise _fail("Via branch")


_RPORT_FLAG: tuple[str, str | None] = ("rport", None)  # immutable, shared by every Via that has it


def parse_via(text: str) -> Via:
    """Parse a single Via value (no commas)."""
    m = _VIA_FAST_RE.fullmatch(text)
    if m is not None:
        transport, host, port_text, rport, branch, ptext = m.groups()
        if ".." not in host and host[-1] != "-":
            port = None
            if port_text is not None:
                port = int(port_text)
                if port > 65535:
                    raise _fail("Via port")
            params = EMPTY_PARAMS
            # `;rport;branch=token` or `;branch=token` (what most phones send) needs no further
            # check (rport a flag, branch with a value); otherwise `(;token[=token])*` already
            # validated (a value is a non-empty token: no ';', no '=').
            if branch is not None:
                if rport is None:
                    params = _new(Params, (("branch", branch),))
                else:
                    params = _new(Params, (_RPORT_FLAG, ("branch", branch)))
            elif ptext:
                # Split, as _simple_params does (inlined).
                items: list[tuple[str, str | None]] = []
                for part in ptext[1:].split(";"):
                    name, eq, value = part.partition("=")
                    items.append((name, value if eq else None))
                params = _new(Params, items)
                # The expression guarantees non-empty values; only these can still be wrong (a
                # `branch` flag makes the counts differ, also beside a `branch=` with a value).
                low = ptext.lower()
                if "ttl" in low or "rport=" in low or low.count("branch") != low.count("branch="):
                    _check_via_params(params)
            return _new(Via, (transport, host, port, params, "SIP/2.0"))
    return _parse_via_general(text)


def _parse_via_general(text: str) -> Via:
    m = _VIA_RE.match(text)
    if m is None:
        raise _fail("Via")
    name, version, transport, host, port = m.groups()
    if host.startswith("["):
        try:
            check_host(host)
        except SipParseError:
            raise _fail("Via sent-by") from None
    elif ".." in host or host.startswith(("-", ".")) or host.endswith("-"):
        raise _fail("Via sent-by")
    port_num: int | None = None
    if port is not None:
        port_num = int(port)
        if port_num > 65535:
            raise _fail("Via port")
    params = parse_params(text, m.end(), "Via parameters")
    _check_via_params(params)
    return Via(transport.upper(), host, port_num, params, f"{name.upper()}/{version}")


def parse_vias(value: str) -> list[Via]:
    """Parse a Via field value that may hold several comma-separated Via values."""
    return [parse_via(item) for item in split_list(value)]


class NameAddr(NamedTuple):
    """`"Display" <uri>;params` (§20.10 name-addr or addr-spec) with its header parameters."""

    uri: Uri
    display_name: str | None = None
    params: Params = EMPTY_PARAMS

    @property
    def tag(self) -> str | None:
        for n, v in self[2]:  # Params.lookup("tag"), inlined (one call less)
            if n == "tag" or (len(n) == 3 and n.lower() == "tag"):
                return v
        return None

    @property
    def expires(self) -> int | None:
        """The Contact expires parameter (§20.10); None when absent or not a number."""
        for n, v in self[2]:  # Params.lookup("expires") and _small_int, inlined
            if n == "expires" or (len(n) == 7 and n.lower() == "expires"):
                if v is None:
                    return None
                value = _UINTS.get(v)
                if value is None and v.isdigit() and len(v) <= 10 and v.isascii():
                    value = int(v)
                return value
        return None

    @property
    def q(self) -> float | None:
        """The Contact q parameter (§20.10) in [0, 1]; None when absent or malformed."""
        value = self.params.get("q")
        return float(value) if value is not None and _QVALUE_RE.fullmatch(value) else None

    @property
    def instance(self) -> str | None:
        """The +sip.instance value without its quotes (RFC 5626 §4.1), e.g. `<urn:uuid:...>`."""
        value = self.params.get("+sip.instance")
        return unquote(value) if value is not None else None

    @property
    def reg_id(self) -> int | None:
        """The reg-id parameter (RFC 5626 §4.2)."""
        return _small_int(self.params.get("reg-id"))

    @property
    def sip_uri(self) -> SipUri | None:
        return self.uri if isinstance(self.uri, SipUri) else None

    def with_param(self, name: str, value: str | None = None) -> NameAddr:
        """A copy with header parameter `name` set (replaced in place, or appended)."""
        return self._replace(params=self.params.set(name, value))

    def with_tag(self, tag: str) -> NameAddr:
        return self.with_param("tag", tag)

    def __str__(self) -> str:
        display = "" if self.display_name is None else quote(self.display_name) + " "
        return f"{display}<{self.uri}>{format_params(self.params)}"


def parse_name_addr(text: str) -> NameAddr:
    """Parse one name-addr or addr-spec with its header parameters."""
    if "%" not in text:
        m = _NAME_ADDR_SIP_FAST_RE.fullmatch(text)
        if m is not None:
            quoted, tokens, scheme, user, password, host, port_text, uparams, tag, ptext = m.groups()
            uri: SipUri | None = None
            if ".." not in host and host[-1] != "-":
                # fast_sip_uri inlined for the usual cases: no URI parameters, or known ones.
                uparsed = _URI_PARAMS_CACHE.get(uparams) if uparams else EMPTY_PARAMS
                if uparsed is not None:
                    if port_text is None:
                        uri = _new(SipUri, (host, scheme, user, password, None, uparsed, ()))
                    elif (port := int(port_text)) <= 65535:
                        uri = _new(SipUri, (host, scheme, user, password, port, uparsed, ()))
            if uri is None:
                uri = fast_sip_uri(scheme, user, password, host, port_text, uparams)
            if uri is not None:
                params = EMPTY_PARAMS
                if tag is not None:  # one parameter, a tag (From, To)
                    params = _new(Params, (("tag", tag),))
                elif ptext:
                    # `(;token[=value])*` already validated, no ';' inside quotes: split at each ';'
                    # (a name, a token, ends at the first '=').
                    items: list[tuple[str, str | None]] = []
                    for part in ptext[1:].split(";"):
                        name, eq, value = part.partition("=")
                        items.append((name, value if eq else None))
                    params = _new(Params, items)
                return _new(NameAddr, (uri, quoted if quoted is not None else tokens, params))
    m = _NAME_ADDR_FAST_RE.fullmatch(text)
    if m is not None:
        quoted, tokens, uri_text, ptext = m.groups()
        display = quoted if quoted is not None else tokens
        return _new(NameAddr, (parse_uri(uri_text), display, _header_params(ptext)))
    m = _ADDR_SPEC_FAST_RE.fullmatch(text)
    if m is not None:
        return _new(NameAddr, (parse_uri(m.group(1)), None, _simple_params(m.group(2))))
    return _parse_name_addr_general(text)


def _parse_name_addr_general(text: str) -> NameAddr:
    s = text.strip()
    display: str | None = None
    if s.startswith('"'):
        m = _QUOTED_RE.match(s)
        if m is None:
            raise _fail("display name")
        display = unquote(m.group(0))
        rest = s[m.end() :].lstrip(" \t")
        if not rest.startswith("<"):
            raise _fail("name-addr")
        lt = 0
        s = rest
    else:
        lt = s.find("<")
    if lt >= 0:
        if lt > 0:
            tokens = s[:lt].strip()
            if not _DISPLAY_TOKENS_RE.fullmatch(tokens):
                raise _fail("display name")
            display = " ".join(tokens.split()) if tokens else None
        gt = s.find(">", lt)
        if gt < 0:
            raise _fail("name-addr")
        uri_text = s[lt + 1 : gt]
        pos = gt + 1
    else:
        # addr-spec: the URI ends at the first ';' (its parameters are header parameters) or space.
        end = len(s)
        for i, ch in enumerate(s):
            if ch in "; \t":
                end = i
                break
        uri_text = s[:end]
        pos = end
        if "?" in uri_text or "," in uri_text:
            raise _fail("addr-spec (needs <>)")
    uri = parse_uri(uri_text)
    params = parse_params(s, pos, "header parameters")
    return NameAddr(uri, display, params)


def parse_contact_list(value: str) -> list[NameAddr] | None:
    """Parse a Contact value: a list of name-addrs, or None for the `*` form (§10.2.2)."""
    if value.strip() == "*":
        return None
    if "," not in value:
        return [parse_name_addr(value)]
    return [parse_name_addr(item) for item in split_list(value)]


class CSeq(NamedTuple):
    """CSeq (§20.16): a sequence number below 2**31 (§8.1.1.5) and the request method."""

    seq: int
    method: str

    def __str__(self) -> str:
        return f"{self.seq} {self.method}"


_CSEQ_METHODS = frozenset(
    [
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
    ]
)


def parse_cseq(text: str) -> CSeq:
    number, _, method = text.partition(" ")
    # Fast case, what the expression accepts without whitespace around: `digits SP known-method`
    # (the known methods are tokens; 1-10 ASCII digits).
    if method in _CSEQ_METHODS and number.isdigit() and len(number) <= 10 and number.isascii():
        seq = int(number)
        if seq >= 2**31:
            raise _fail("CSeq (number too large)")
        return _new(CSeq, (seq, method))
    m = _CSEQ_RE.fullmatch(text)
    if m is None:
        raise _fail("CSeq")
    number, method = m.groups()
    seq = int(number)
    if seq >= 2**31:
        raise _fail("CSeq (number too large)")
    return _new(CSeq, (seq, method))


def parse_uint(text: str, what: str, maximum: int = 2**32 - 1) -> int:
    """A decimal integer field (Max-Forwards, Expires, Content-Length, Min-Expires...)."""
    if text.isdigit() and len(text) <= 10 and text.isascii():
        value = int(text)
    else:
        m = _UINT_RE.fullmatch(text)
        if m is None:
            raise _fail(what)
        value = int(m.group(1))
    if value > maximum:
        raise _fail(what)
    return value
