"""The parser's fast paths give what its general paths give (shared/STYLE.md: fast code agrees with a
naive version): header lines of known names vs. the line-by-line parser, the datagram's single
CRLF CRLF search vs. find_head_end, quoted header parameters split by `;` vs. the expression."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from raftpbx.transport.sip.errors import SipParseError
from raftpbx.transport.sip.headers import NameAddr, _parse_name_addr_general, parse_name_addr
from raftpbx.transport.sip.message import (
    DEFAULT_LIMITS,
    Request,
    Response,
    _parse_datagram,
    _parse_fields_general,
    parse_message,
)

HEAD = (
    b"REGISTER sip:127.0.0.1 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5062;rport;branch=z9hG4bK776asdhds\r\n"
    b"Max-Forwards: 70\r\n"
    b'From: "Bob" <sip:bob@127.0.0.1>;tag=456248\r\n'
    b"To: <sip:bob@127.0.0.1>\r\n"
    b"Call-ID: 843817637684230@998sdasdh09\r\n"
    b"CSeq: 1826 REGISTER\r\n"
    b'Contact: <sip:bob@127.0.0.1:5062;ob>;expires=3600;+sip.instance="<urn:uuid:1>"\r\n'
    b"X-Odd:   spaced value \t\r\n"
    b"Content-Length: 0\r\n"
)


_spellings = itertools.count(1)


def _fresh_case(name: bytes) -> bytes:
    """`name` in a letter case not used before in this process (so not a known spelling)."""
    n = next(_spellings)
    return bytes(c ^ 0x20 if chr(c).isalpha() and (n >> i) & 1 else c for i, c in enumerate(name))


def _outcome(data: bytes) -> tuple[object, ...]:
    try:
        m = parse_message(data)
    except SipParseError as exc:
        return ("error", exc.status, exc.reason)
    fields = m.headers.fields
    return ("message", m.start_line(), [(f.key, f.value) for f in fields], [f.raw for f in fields], m.body)


def test_known_names_give_the_fields_of_the_general_parser() -> None:
    parse_message(HEAD + b"\r\n")  # every name is now known: the second parse takes the fast path
    m = parse_message(HEAD + b"\r\n")
    text = HEAD[:-2].decode()
    fields, keys = _parse_fields_general(text, text.split("\r\n"))
    assert m.headers._fields == fields and [f[0] for f in fields] == keys
    assert m.headers.get("X-Odd") == "spaced value"


def test_fields_built_on_demand_are_the_general_parsers_and_reads_before_agree() -> None:
    """The fast path keeps the received lines and builds the field tuples on first use: values
    read before that (get, the Contact list) are the ones read after, and the fields built are
    the line-by-line parser's."""
    parse_message(HEAD + b"\r\n")
    m = parse_message(HEAD + b"\r\n")
    assert m.headers._lines is not None  # fast path: no field tuples yet
    names = ["Via", "max-forwards", "f", "To", "i", "CSeq", "m", "x-odd", "Content-Length", "Absent"]
    before = [m.headers.get(n) for n in names]
    contacts = m.contacts
    assert m.headers._lines is not None and before[7] == "spaced value"
    text = HEAD[:-2].decode()
    fields, _ = _parse_fields_general(text, text.split("\r\n"))
    assert m.headers._fields == fields and m.headers._lines is None and m.headers._parts is None
    del m.headers._cache["contact"]
    assert [m.headers.get(n) for n in names] == before and m.contacts == contacts
    assert m.to_bytes() == HEAD + b"\r\n"


def test_a_change_to_headers_whose_fields_are_not_built_yet_builds_them_first() -> None:
    parse_message(HEAD + b"\r\n")
    for change in (
        lambda m: m.headers.add("Via", "SIP/2.0/UDP 127.0.0.2;branch=z9hG4bKx", first=True),
        lambda m: m.headers.set("Max-Forwards", "69"),
        lambda m: m.headers.remove("X-Odd"),
        lambda m: m.headers.remove_first_value("Via"),
        lambda m: m.headers.replace_top_via(m.top_via, m.top_via.with_param("received", "127.0.0.9")),
    ):
        lazy = parse_message(HEAD + b"\r\n")
        built = parse_message(HEAD + b"\r\n")
        assert lazy.headers._lines is not None
        _ = built.headers._fields  # built before the change
        change(lazy)
        change(built)
        assert lazy.headers._fields == built.headers._fields and lazy.to_bytes() == built.to_bytes()
        assert lazy.headers.get("Via") == built.headers.get("Via") and lazy.vias == built.vias


@pytest.mark.parametrize(
    "variant",
    [
        HEAD + b"\r\n",
        HEAD.replace(b"Max-Forwards: 70", b"Max-Forwards : 70") + b"\r\n",  # SP before the colon
        HEAD.replace(b"X-Odd:   spaced", b"X-Odd:\r\n  spaced") + b"\r\n",  # folded
        HEAD.replace(b"X-Odd:", b"X-Odd") + b"\r\n",  # no colon
        HEAD.replace(b"Max-Forwards:", b"Max-Forwards") + b"\r\n",  # no colon, known name
        HEAD.replace(b"CSeq: 1826 REGISTER\r\n", b"CSeq: 1826 REGISTER\n") + b"\r\n",  # bare LF
        HEAD.replace(b"CSeq: 1826 REGISTER\r\n", b"CSeq: 1826 REGISTER\n\n") + b"body\r\n\r\n",  # LF LF first
        HEAD.replace(b"CSeq: 1826 REGISTER\r\n", b"CSeq: 1826 REGISTER\r") + b"\r\n",  # bare CR
        b"\r\n\r\n" + HEAD + b"\r\n",  # leading CRLFs (§7.5)
        HEAD,  # no empty line
    ],
)
def test_datagram_fast_path_agrees_with_the_general_path(variant: bytes) -> None:
    """A variant parsed with every name known (fast path) gives the same outcome as with X-Odd
    spelled in a case never seen, which sends the whole head through the line-by-line parser;
    header values, raw lines aside, are the same."""
    parse_message(HEAD + b"\r\n")
    spelling = _fresh_case(b"X-Odd")
    fast = _outcome(variant)
    general = _outcome(variant.replace(b"X-Odd", spelling))
    assert fast[:3] == general[:3]
    if fast[0] == "message":
        assert all(raw.encode() in variant for raw in fast[3])  # type: ignore[attr-defined]
        assert fast[4].replace(b"X-Odd", spelling) == general[4]  # type: ignore[attr-defined]


_CL4 = HEAD.replace(b"Content-Length: 0", b"Content-Length: 4")


@pytest.mark.parametrize(
    "data",
    [
        HEAD + b"\r\n",
        HEAD + b"\r\n\r\n",  # the head ends one CRLF before the final CRLF CRLF
        HEAD + b"\r\n\r\n\r\n",
        HEAD + b"\r\n" + b"\r\n\r\n",
        _CL4 + b"\r\nbody\r\n\r\n",  # an empty line earlier: the rest is the body
        _CL4 + b"\r\n\r\n\r\n",
        _CL4 + b"\r\n",  # Content-Length 4, no body
        HEAD + b"\r\n" + b"x" * 9000 + b"\r\n\r\n",  # a long line in the body, not in the head
        HEAD + b"\r\n" + b"Via: x\r\n" * 200 + b"\r\n",  # many lines in the body
        HEAD + b"\r\nno colon here\r\n\r\n",
        HEAD.replace(b"CSeq", b"CSeq:\r\n") + b"\r\n",  # an empty line inside the head
        HEAD.replace(b"CSeq: 1826 REGISTER\r\n", b"CSeq: 1826 REGISTER\n") + b"\r\n",  # bare LF
        HEAD.replace(b"CSeq: 1826 REGISTER\r\n", b"CSeq: 1826 REGISTER\r") + b"\r\n",  # bare CR
        HEAD.replace(b"Max-Forwards:", b"Max-Forwards") + b"\r\n",
        HEAD + b"x" * 9000 + b"\r\n\r\n",  # a long line in the head
        HEAD + b"Via: x\r\n" * 200 + b"\r\n",  # too many header lines
        b"X\r\n\r\n",
        b"X\r\r\n\r\n",
        b"X\n\r\n\r\n",
    ],
)
def test_a_datagram_ending_in_crlf_crlf_parses_as_the_search_for_its_first_crlf_crlf_does(
    data: bytes,
) -> None:
    """parse_message takes a datagram that ends with CRLF CRLF as a head without a body, unless an
    empty line comes earlier: same outcome as searching for the first CRLF CRLF (_parse_datagram)."""
    parse_message(HEAD + b"\r\n")  # every name known

    def outcome(parse: Callable[[bytes], object]) -> object:
        try:
            m = parse(data)
        except SipParseError as exc:
            return ("error", exc.status, exc.reason)
        assert isinstance(m, Request | Response)
        return ("message", m.start_line(), [(f.key, f.value, f.raw) for f in m.headers.fields], m.body)

    assert outcome(parse_message) == outcome(lambda d: _parse_datagram(d, DEFAULT_LIMITS))


@pytest.mark.parametrize(
    "text",
    [
        '<sip:a@h>;p="x;y";q=0.5',
        '<sip:a@h>;p="x\\"y";r',
        '<sip:a@h>;p="a=b";x=1',
        '<sip:a@h>;p="";x',
        '"Bob" <sip:a@h:5060;lr>;tag=1;p="<u>"',
        '<sip:a@h>;received=[2001:db8::1];p="v"',
        '<tel:+123>;p="a;b"',
        '<tel:+123>;p="ab";x',
        '<sip:a@h>;p="x\\\\";y=2',
        'A B <sip:a@h>;p="q r";z',
        "<sip:a@h..x>;tag=1",
    ],
)
def test_quoted_header_parameters_split_like_the_general_parser(text: str) -> None:
    def outcome(parse: Callable[[str], NameAddr]) -> object:
        try:
            return parse(text)
        except SipParseError as exc:
            return exc.reason

    assert outcome(parse_name_addr) == outcome(_parse_name_addr_general)


def test_bad_port_in_name_addr_still_raises() -> None:
    with pytest.raises(SipParseError):
        parse_name_addr("<sip:h:70000>;tag=1")


def test_a_request_line_accepted_before_gives_what_parsing_it_gives() -> None:
    """Request-Lines accepted before are kept (bounded) with their parts: a second parse of the same
    line gives what the first gave, and a refused line is never kept."""
    from raftpbx.transport.sip import message

    data = HEAD.replace(b"sip:127.0.0.1 ", b"sip:line-test.invalid ", 1) + b"\r\n"
    line = data.split(b"\r\n", 1)[0].decode()
    assert line not in message._REQUEST_LINES
    first = parse_message(data)
    assert line in message._REQUEST_LINES
    second = parse_message(data)
    for m in (first, second):
        assert (m.method, m.uri, m.version, m.request_uri) == (
            "REGISTER",
            "sip:line-test.invalid",
            "SIP/2.0",
            first.request_uri,
        )  # type: ignore[union-attr]
    assert second == first and second.to_bytes() == data
    for bad, status in ((b" SIP/3.0\r\n", 505), (b" SIP/2.0 \r\n", 400)):
        bad_data = data.replace(b" SIP/2.0\r\n", bad, 1)
        for _ in range(2):
            with pytest.raises(SipParseError) as err:
                parse_message(bad_data)
            assert err.value.status == status
        assert bad_data.split(b"\r\n", 1)[0].decode() not in message._REQUEST_LINES
