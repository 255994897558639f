"""The RFC 4475 and RFC 5118 torture messages (tests/data/sip/README.md has the verdict table)."""

from __future__ import annotations

from pathlib import Path

import pytest
from raftpbx.transport.sip.errors import SipParseError
from raftpbx.transport.sip.message import Request, Response, parse_message
from raftpbx.transport.sip.stream import KeepAlive, StreamParser
from raftpbx.transport.sip.uri import AbsoluteUri, SipUri

DATA = Path(__file__).resolve().parents[1] / "data" / "sip"
VALID = sorted((DATA / "rfc4475" / "valid").glob("*.dat")) + sorted(
    (DATA / "rfc5118" / "valid").glob("*.sip")
)
INVALID = sorted((DATA / "rfc4475" / "invalid").glob("*.dat")) + sorted(
    (DATA / "rfc5118" / "invalid").glob("*.sip")
)

# Expected status per invalid file; regbadct is well formed at the message level and fails when
# its Contact is read (RFC 4475 §3.1.2.13).
INVALID_STATUS = {
    "badinv01": 400,
    "clerr": 400,
    "ncl": 400,
    "scalar02": 400,
    "scalarlg": 400,
    "quotbal": 400,
    "ltgtruri": 400,
    "lwsruri": 400,
    "lwsstart": 400,
    "trws": 400,
    "escruri": 400,
    "badaspec": 400,
    "baddn": 400,
    "badvers": 505,
    "mismatch01": 400,
    "mismatch02": 400,
    "bigcode": 400,
    "insuf": 400,
    "unkscm": 416,
    "novelsc": 416,
    "multi01": 400,
    "mcl01": 400,
    "ipv6-bad": 400,
    "ipv6-bug-abnf-3-colons": 400,
}
ACCESSOR_INVALID = {"regbadct": "contacts"}


def _load(name: str) -> bytes:
    for path in VALID + INVALID:
        if path.stem == name:
            return path.read_bytes()
    raise KeyError(name)


def test_corpus_is_complete() -> None:
    """49 RFC 4475 messages (§3) and 12 RFC 5118 messages (§4), each classified exactly once."""
    rfc4475 = [p for p in VALID + INVALID if p.suffix == ".dat"]
    rfc5118 = [p for p in VALID + INVALID if p.suffix == ".sip"]
    assert len(rfc4475) == 49
    assert len(rfc5118) == 12
    invalid_names = {p.stem for p in INVALID}
    assert invalid_names == set(INVALID_STATUS) | set(ACCESSOR_INVALID)


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_messages_parse_and_round_trip(path: Path) -> None:
    data = path.read_bytes()
    message = parse_message(data)
    # The fields every element needs are valid on a parsed message and never raise.
    assert message.call_id
    assert message.vias
    assert message.from_.uri is not None
    assert message.to.uri is not None
    assert message.cseq.seq >= 0
    message.contacts  # noqa: B018 - must not raise on a valid message
    again = parse_message(message.to_bytes())
    assert again == message
    assert again.to_bytes() == message.to_bytes()


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_messages_are_rejected_with_the_right_status(path: Path) -> None:
    data = path.read_bytes()
    accessor = ACCESSOR_INVALID.get(path.stem)
    if accessor is not None:
        message = parse_message(data)
        with pytest.raises(SipParseError) as info:
            getattr(message, accessor)
        assert info.value.status == 400
        return
    with pytest.raises(SipParseError) as info:
        parse_message(data)
    assert info.value.status == INVALID_STATUS[path.stem]


def test_unmodified_messages_are_written_back_byte_for_byte() -> None:
    """Untouched fields keep their raw bytes: with CRLF line ends, a matching Content-Length and
    nothing after the body, the whole message comes back identical."""
    exact = 0
    for path in VALID:
        data = path.read_bytes()
        message = parse_message(data)
        head, _, rest = data.partition(b"\r\n\r\n")
        crlf_only = b"\n" not in head.replace(b"\r\n", b"")
        if message.content_length == len(message.body) and rest == message.body and crlf_only:
            assert message.to_bytes() == data, path.stem
            exact += 1
    assert exact >= 30


def test_wsinv_folding_compact_forms_and_lws() -> None:
    """RFC 4475 §3.1.1.1."""
    m = parse_message(_load("wsinv"))
    assert isinstance(m, Request)
    assert m.method == "INVITE"
    assert m.to.tag == "1918181833n"
    assert m.from_.display_name == 'J Rosenberg \\"'
    assert m.from_.tag == "98asjd8"
    assert m.max_forwards == 68
    assert m.cseq == (9, "INVITE")
    assert [(v.transport, v.host, v.branch) for v in m.vias] == [
        ("UDP", "192.0.2.2", "390skdjuw"),
        ("TCP", "spindle.example.com", "z9hG4bK9ikj8"),
        ("UDP", "192.168.255.111", "z9hG4bK30239"),
    ]
    assert m.headers.get("Subject") == ""
    assert m.headers.get("NewFangledHeader") == "newfangled value continued newfangled value"
    assert m.headers.get("UnknownHeaderWithUnusualValue") == ";;,,;;,;"
    (contact,) = m.contacts
    assert contact.display_name == 'Quoted string ""'
    assert contact.params.get("newparam") == "newvalue"
    assert contact.params.has("secondparam")
    assert contact.q == 0.33
    assert m.routes[0].uri == SipUri(
        "services.example.com",
        params=SipUri("x").params.set("lr").set("unknownwith", "value").set("unknown-no-value"),
    )
    assert len(m.body) == 150


def test_intmeth_unusual_characters() -> None:
    """RFC 4475 §3.1.1.2: quoted NUL/BEL/DEL, token characters, a UTF-8 parameter and header."""
    m = parse_message(_load("intmeth"))
    assert isinstance(m, Request)
    assert m.method == "!interesting-Method0123456789_*+`.%indeed'~"
    uri = m.request_uri
    assert isinstance(uri, SipUri)
    assert uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert uri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    assert m.to.display_name == "BEL:\x07 NUL:\x00 DEL:\x7f"
    assert m.from_.display_name == "token1~` token2'+_ token3*%!.-"
    assert m.from_.tag == "_token~1'+`*%!-."
    assert m.from_.params.get("fromParam''~+*_!.-%") == '"работающий"'
    assert m.call_id == "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"
    assert m.headers.get("extensionHeader-!.%*+_`'~") == "\ufeff大停電"
    assert m.vias[0].branch == "z9hG4bK-.!%66*_+`'~"


def test_escapes_are_decoded_in_uris_only() -> None:
    """RFC 4475 §3.1.1.3-5 (esc01, escnull, esc02)."""
    m = parse_message(_load("esc01"))
    uri = m.request_uri if isinstance(m, Request) else None
    assert isinstance(uri, SipUri) and uri.user == "sips:user@example.com"
    to_uri = m.to.uri
    assert isinstance(to_uri, SipUri) and to_uri.user == "user"
    from_uri = m.from_.uri
    assert isinstance(from_uri, SipUri) and from_uri.user == "I have spaces"
    contact_uri = m.contacts[0].uri
    assert isinstance(contact_uri, SipUri) and contact_uri.user == "caller"
    assert contact_uri.params.has("lr")
    assert contact_uri.params.get("name") == "value%41"  # not decoded twice (RFC 3986)

    m = parse_message(_load("escnull"))
    users = [c.uri.user for c in m.contacts if isinstance(c.uri, SipUri)]
    assert users == ["\x00", "\x00\x00"]
    to_uri = m.to.uri
    assert isinstance(to_uri, SipUri) and to_uri.user == "null-\x00-null"

    m = parse_message(_load("esc02"))
    assert isinstance(m, Request) and m.method == "RE%47IST%45R"
    assert m.to.display_name == "%Z%45"
    assert len(m.contacts) == 2
    assert m.headers.get("C%6Fntact") == "<sip:alias2@host2.example.com>"
    assert m.vias[0].branch == "z9hG4bK209%fzsnel234"


def test_dblreq_datagram_drops_trailing_octets_stream_sees_two_messages() -> None:
    """RFC 4475 §3.1.1.8: on UDP the octets after Content-Length are discarded (§18.3)."""
    data = _load("dblreq")
    m = parse_message(data)
    assert isinstance(m, Request) and m.method == "REGISTER" and m.body == b""
    parser = StreamParser()
    parser.feed(data)
    first = parser.next_message()
    stray = parser.next_message()  # the CRLF between the two requests (ignored, §7.5)
    second = parser.next_message()
    assert isinstance(first, Request) and first.method == "REGISTER"
    assert isinstance(stray, KeepAlive) and not stray.ping
    assert isinstance(second, Request) and second.method == "INVITE" and len(second.body) == 150


def test_responses_with_unusual_reason_phrases() -> None:
    """RFC 4475 §3.1.1.12-13."""
    m = parse_message(_load("unreason"))
    assert isinstance(m, Response) and m.status == 200
    assert m.reason == "= 2**3 * 5**2 но сто девяносто девять - простое"
    m = parse_message(_load("noreason"))
    assert isinstance(m, Response) and m.status == 100 and m.reason == ""
    assert m.to_bytes().startswith(b"SIP/2.0 100 \r\n")


def test_application_level_messages_are_well_formed() -> None:
    """RFC 4475 §3.3: the parser accepts them; the application decides."""
    m = parse_message(_load("unksm2"))
    assert m.to.uri == AbsoluteUri("isbn", "2983792873")
    assert m.from_.uri == AbsoluteUri("http", "//www.example.com")
    assert m.contacts[0].uri == AbsoluteUri("name", "John_Smith")
    assert parse_message(_load("zeromf")).max_forwards == 0
    assert parse_message(_load("bext01")).headers.get_all("Require") == [
        "nothingSupportsThis",
        "nothingSupportsThisEither",
    ]
    # cparam01: addr-spec, so ;unknownparam is a Contact parameter; cparam02: inside <>, a URI one.
    c1 = parse_message(_load("cparam01")).contacts[0]
    c2 = parse_message(_load("cparam02")).contacts[0]
    assert c1.params.has("unknownparam")
    assert isinstance(c2.uri, SipUri) and c2.uri.params.has("unknownparam") and not c2.params
    # regescrt: the escaped Route header in the Contact URI is decoded and escaped again.
    c = parse_message(_load("regescrt")).contacts[0]
    assert isinstance(c.uri, SipUri) and c.uri.headers == (("Route", "<sip:sip.example.com>"),)
    assert str(c.uri) == "sip:user@example.com?Route=%3Csip:sip.example.com%3E"
    # inv2543: RFC 2543 peers: no branch, no From tag, no Max-Forwards, body to the end.
    m = parse_message(_load("inv2543"))
    assert m.branch is None and m.from_.tag is None and m.max_forwards is None
    assert m.content_length is None and m.body.startswith(b"v=0")
    assert parse_message(_load("badbranch")).branch == "z9hG4bK"


def test_rfc5118_ipv6_references() -> None:
    m = parse_message(_load("ipv6-good"))
    assert isinstance(m, Request)
    uri = m.request_uri
    assert isinstance(uri, SipUri) and uri.host == "[2001:db8::10]" and uri.port is None
    assert m.vias[0].host == "[2001:db8::9:1]"
    ambiguous = parse_message(_load("port-ambiguous"))
    assert isinstance(ambiguous, Request)
    assert ambiguous.request_uri == SipUri("[2001:db8::10:5070]")
    unambiguous = parse_message(_load("port-unambiguous"))
    assert isinstance(unambiguous, Request)
    assert unambiguous.request_uri == SipUri("[2001:db8::10]", port=5070)
    assert parse_message(_load("via-received-param-with-delim")).vias[0].received == "[2001:db8::9:255]"
    assert parse_message(_load("via-received-param-no-delim")).vias[0].received == "2001:db8::9:255"
    vias = parse_message(_load("mult-ip-in-header")).vias
    assert [(v.host, v.port) for v in vias] == [
        ("[2001:db8::9:1]", 6050),
        ("192.0.2.1", None),
        ("[2001:db8::9:255]", None),
    ]
    assert vias[2].received == "192.0.2.200"
    contact = parse_message(_load("ipv4-mapped-ipv6")).contacts[0]
    assert contact.uri == SipUri("[::ffff:192.0.2.2]", user="ted")
    assert contact.display_name == "T. desk phone"
