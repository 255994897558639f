"""The parser's fast expressions and fast paths accept what the general parsers accept, with the same
result (shared/STYLE.md: fast code agrees with a naive version), on strings built from fragments
chosen to sit on the grammar's edges (hosts ending in '-', '..', ports above 65535, quoted values
holding ';' or '<', escapes, IPv6 references, flags, LWS).

- the possessive fast expressions (`*+`, `++`, `?+`, atomic groups) match exactly what the same
  expressions with greedy repetitions match, with the same groups;
- parse_name_addr, parse_via and parse_uri give what their general paths give: the same value, or a
  SipParseError with the same reason.

The strings come from seeded generators (a fixed seed per test): a failure is reproducible, never
flaky; each test checks a few thousand distinct strings in well under a second of CPU.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

import pytest
from raftpbx.transport.sip import headers, uri
from raftpbx.transport.sip.errors import SipParseError
from raftpbx.transport.sip.headers import (
    _parse_name_addr_general,
    _parse_via_general,
    parse_name_addr,
    parse_via,
)
from raftpbx.transport.sip.message import Request, make_response, parse_message
from raftpbx.transport.sip.uri import _parse_sip_general, parse_uri

CASES = 20000  # per generator and seed; duplicates dropped

NAME_ADDR_FRAGMENTS = [
    '"',
    '"Alice" ',
    "Alice ",
    "A B ",
    " ",
    "\t",
    "<",
    ">",
    "sip:",
    "sips:",
    "tel:+1",
    "1001",
    "@",
    "127.0.0.1",
    "host-",
    "..",
    ":",
    "5062",
    "99999",
    ";",
    "ob",
    "lr",
    "tag",
    "=",
    "x",
    '"<urn:uuid:1>"',
    '"a;b"',
    '"q\\"r"',
    '""',
    "\\",
    "[::1]",
    "[2001:db8::1]",
    ",",
    "%41",
    "?",
    "h=v",
    "&",
    "-",
    "+sip.instance",
]
VIA_FRAGMENTS = [
    "SIP/2.0/",
    "SIP/2.0/UDP ",
    "UDP",
    "udp",
    "TLS",
    " ",
    "\t",
    "127.0.0.1",
    "host",
    "a-",
    "-",
    ".",
    "..",
    ":",
    "5060",
    "99999",
    ";",
    "branch",
    "=",
    "z9hG4bK1",
    "rport",
    "RPORT",
    "ttl",
    "TTL",
    "1",
    "300",
    "received",
    "[::1]",
    '"x"',
    ",",
    "x",
]
URI_FRAGMENTS = [
    "user",
    ":",
    "pw",
    "@",
    "host",
    "h-",
    "1.2.3.4",
    "-",
    ".",
    "..",
    "5060",
    "99999",
    ";",
    "lr",
    "=",
    "x",
    "?",
    "&",
    "%20",
    "[::1]",
    "transport",
    "tcp",
    " ",
    "<",
]


_HOSTS = ["127.0.0.1", "host", "h-", "-h", "a..b", "a.b.", "[::1]", "[2001:db8:::1]", "1", "h_x", ""]
_PORTS = ["", ":5062", ":65535", ":65536", ":99999", ":", ":0x1"]
_USERS = ["", "1001@", "u:pw@", "u:@", "a;b@", "@", "%41@", "u:p:q@", "u@v@"]
_URI_PARAMS = ["", ";ob", ";lr", ";transport=tcp", ";a=b;c", ";=x", ";a=", ";maddr=[::1]", ";%41", ";a=b=c"]
_URI_HEADERS = ["", "", "?h=v", "?h", "?a=b&c=d"]
_HEADER_PARAMS = [
    "",
    ";tag=ab12",
    ";expires=600",
    ';+sip.instance="<urn:uuid:1>";reg-id=1',
    ';p="a;b"',
    ';p="q\\"r"',
    ";p=",
    ";;x",
    ";received=[::1]",
    ";received=2001:db8::1",
    ";lr",
    " ;tag=1",
    ";tag = 1",
    ";a=b=c",
    # the one-tag shortcut of parse_name_addr (`;tag=` and nothing after)
    ";tag=ab12;x",
    ';tag="a=b"',
    ";tag=",
    ";tag=a;tag=b",
    ";TAG=1",
    ";tag=[::1]",
    ";tag=a:b",
]
_DISPLAYS = ["", "", '"Alice" ', '"Alice"', '"" ', "Alice ", "A  B ", "A B ", '"a\\"b" ', '"x', " ", '"a<b" ']
_SCHEMES = ["<sip:", "<sip:", "<sips:", "<SIP:", "<tel:", "sip:", "sips:"]
_VIA_PROTOCOLS = ["SIP/2.0/", "SIP/2.0/", "sip/2.0/", "SIP/2.1/", "SIP / 2.0 / "]
_VIA_TRANSPORTS = ["UDP", "UDP", "udp", "TcP", "", "U2"]
_VIA_GAPS = [" ", " ", "  ", "\t", ""]
_VIA_PARAMS = [
    "",
    ";rport",
    ";branch=z9hG4bK1",
    ";branch",
    ";rport=5062",
    ";RPORT=x",
    ";ttl=1",
    ";TTL",
    # parse_via builds these two layouts directly
    ";rport;branch=z9hG4bK1",
    ";rport;branch=z9hG4bK1",
    ";rport;branch=",
    ";rport;branch",
    ";rport;Branch=x",
    ";rport;branch=a=b",
]
_VIA_MORE = [
    "",
    ";received=127.0.0.2",
    ";maddr=[::1]",
    ';x="y"',
    ";ttl=300",
    " ;lr",
    ";branch=",
    ";a=b=c",
    ";rport",
    ";branch=x",
    "",
    "",
]


def _soup(rng: random.Random, fragments: list[str]) -> str:
    return "".join(rng.choice(fragments) for _ in range(rng.randrange(15)))


def _name_addr(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return _soup(rng, NAME_ADDR_FRAGMENTS)
    scheme = rng.choice(_SCHEMES)
    uri = scheme + rng.choice(_USERS) + rng.choice(_HOSTS) + rng.choice(_PORTS) + rng.choice(_URI_PARAMS)
    if scheme.startswith("<"):
        return rng.choice(_DISPLAYS) + uri + rng.choice([">", ">", "", "> "]) + rng.choice(_HEADER_PARAMS)
    return uri + rng.choice(_HEADER_PARAMS)


def _via(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return _soup(rng, VIA_FRAGMENTS)
    return "".join(
        rng.choice(part)
        for part in (_VIA_PROTOCOLS, _VIA_TRANSPORTS, _VIA_GAPS, _HOSTS, _PORTS, _VIA_PARAMS, _VIA_MORE)
    )


def _uri(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return _soup(rng, URI_FRAGMENTS)
    return "".join(rng.choice(part) for part in (_USERS, _HOSTS, _PORTS, _URI_PARAMS, _URI_HEADERS))


def _cases(make: Callable[[random.Random], str], seed: int, count: int = CASES) -> list[str]:
    rng = random.Random(seed)
    return sorted({make(rng) for _ in range(count)})


def _outcome(parse: Callable[[str], object], text: str) -> object:
    try:
        return ("value", parse(text))
    except SipParseError as exc:
        return ("error", exc.status, exc.reason)


def _greedy(pattern: re.Pattern[str]) -> re.Pattern[str]:
    """The same expression with every possessive repetition made greedy and atomic groups plain."""
    text = pattern.pattern.replace("(?>", "(?:")
    text = re.sub(r"(?<!\\)([*+?}])\+", r"\1", text)
    assert "++" not in text.replace("\\+", "")
    return re.compile(text, pattern.flags)


FAST_EXPRESSIONS = {
    "name-addr sip": headers._NAME_ADDR_SIP_FAST_RE,
    "name-addr": headers._NAME_ADDR_FAST_RE,
    "addr-spec": headers._ADDR_SPEC_FAST_RE,
    "via": headers._VIA_FAST_RE,
    "uri user@host": uri._FAST_USER_HOST_RE,
    "uri host": uri._FAST_HOST_RE,
}


@pytest.mark.parametrize("name", sorted(FAST_EXPRESSIONS))
def test_possessive_expressions_match_what_greedy_ones_match(name: str) -> None:
    fast = FAST_EXPRESSIONS[name]
    greedy = _greedy(fast)
    assert greedy.pattern != fast.pattern
    texts = _cases(_name_addr, 1) + _cases(_via, 2) + _cases(_uri, 3)
    texts += [t[1:] for t in texts if t[:1] == "<"] + ["sip:" + t for t in _cases(_uri, 4)]
    for text in texts:
        a, b = fast.fullmatch(text), greedy.fullmatch(text)
        assert (a is None) == (b is None), text
        if a is not None and b is not None:
            assert a.groups() == b.groups(), text


def test_name_addr_fast_path_agrees_with_the_general_parser() -> None:
    for text in _cases(_name_addr, 5):
        assert _outcome(parse_name_addr, text) == _outcome(_parse_name_addr_general, text), text


def test_via_fast_path_agrees_with_the_general_parser() -> None:
    for text in _cases(_via, 6):
        assert _outcome(parse_via, text) == _outcome(_parse_via_general, text), text


def test_sip_uri_fast_path_agrees_with_the_general_parser() -> None:
    for text in _cases(_uri, 7):
        assert _outcome(parse_uri, "sip:" + text) == _outcome(lambda t: _parse_sip_general("sip", t), text), (
            text
        )


def _message_with(from_text: str, to_text: str) -> bytes:
    return (
        "REGISTER sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK1\r\n"
        f"From: {from_text}\r\nTo: {to_text}\r\nCall-ID: c1\r\nCSeq: 1 REGISTER\r\n\r\n"
    ).encode()


@pytest.mark.parametrize(
    ("from_text", "to_text"),
    [
        ('"Alice" <sip:1001@127.0.0.1>;tag=1', '"Alice" <sip:1001@127.0.0.1>'),
        ("<sip:1001@127.0.0.1>;tag=1", "<sip:1001@127.0.0.1>"),
        ('"a>;b" <sip:x@127.0.0.1>;tag=1', '"a>'),  # To ends inside From's quoted display name
        ('"a\\">;b" <sip:x@127.0.0.1>;tag=1', '"a\\">'),  # ... after a quoted-pair
        ('<sip:a@127.0.0.1>;p="x>;y";tag=1', '<sip:a@127.0.0.1>;p="x>'),  # ... inside a quoted value
        ("<sip:a@127.0.0.1>;tag=1", "<sip:a@127.0.0.1>;tag=1"),
        ("A B <sip:a@127.0.0.1>;tag=1", "A B <sip:a@127.0.0.1>"),
    ],
)
def test_to_read_from_from_is_what_parsing_to_gives(from_text: str, to_text: str) -> None:
    """When To is From without parameters, parse_message takes To's display name and URI from From;
    the result (or the error) must be what parsing To itself gives."""
    try:
        expected: object = parse_name_addr(to_text)
    except SipParseError:
        expected = "Malformed To header"
    try:
        got: object = parse_message(_message_with(from_text, to_text)).to
    except SipParseError as exc:
        got = exc.reason
    assert got == expected


def test_to_read_from_from_agrees_over_generated_name_addrs() -> None:
    for text in _cases(_name_addr, 8, 5000):
        try:
            expected: object = ("to", parse_name_addr(text))
        except SipParseError:
            expected = ("error",)
        for params in (";tag=1", ';tag=1;p="a>;b"'):
            data = _message_with(text + params, text)
            try:
                m = parse_message(data)
            except SipParseError as exc:
                if exc.reason == "Malformed From header":
                    continue  # From itself is refused before To is read
                got: object = ("error",) if exc.reason == "Malformed To header" else ("other", exc.reason)
            else:
                got = ("to", m.to)
            assert got == expected, text


def test_response_to_with_tag_appended_to_the_received_value_parses_as_with_tag() -> None:
    """make_response writes To as received plus `;tag=...` (§8.2.6.2) instead of re-serialising it:
    over generated To values that parse, the response's To is the request's To with the tag, and
    the response round-trips."""
    checked = 0
    fixed = [
        "sip:b@127.0.0.1",
        "sip:b@127.0.0.1;user=phone",
        "<sip:b@127.0.0.1;user=phone>",
        '"B \\"x\\"" <sip:b@127.0.0.1>;p="a;tag=b"',
        "<sip:b@127.0.0.1>;tag",
        "<sip:b@127.0.0.1>;TAG",
        "<sip:b@127.0.0.1> ;p = 1",
        "B  C <sips:b@127.0.0.1:5061>",
        "<tel:+1234;phone-context=x>",
        "<sip:b%41@127.0.0.1>",
    ]
    for text in fixed + _cases(_name_addr, 9, 5000):
        data = _message_with('"A" <sip:a@127.0.0.1>;tag=1', text)
        try:
            request = parse_message(data)
            to = request.to
        except SipParseError:
            continue
        assert isinstance(request, Request)
        response = make_response(request, 200, to_tag="t9x")
        expected = to.with_tag("t9x") if to.tag is None else to
        assert response.to == expected, text
        assert parse_message(response.to_bytes()) == response, text
        checked += 1
    assert checked > 150
