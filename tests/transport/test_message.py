"""Messages: parsing rules of RFC 3261 §7 and §18.3, the Headers API, serialising, §8.2.6 responses."""

from __future__ import annotations

import pytest
from raftpbx.transport.sip.errors import SipParseError, SipValueError
from raftpbx.transport.sip.headers import CSeq
from raftpbx.transport.sip.message import (
    HeaderField,
    Headers,
    Limits,
    Request,
    Response,
    canonical_name,
    default_reason,
    make_response,
    parse_message,
)
from raftpbx.transport.sip.uri import SipUri

REGISTER = (
    b"REGISTER sip:127.0.0.1 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5062;rport;branch=z9hG4bK776asdhds\r\n"
    b"Max-Forwards: 70\r\n"
    b'From: "Bob" <sip:bob@127.0.0.1>;tag=456248\r\n'
    b'To: "Bob" <sip:bob@127.0.0.1>\r\n'
    b"Call-ID: 843817637684230@998sdasdh09\r\n"
    b"CSeq: 1826 REGISTER\r\n"
    b"Contact: <sip:bob@127.0.0.1:5062>;expires=3600\r\n"
    b"Allow: INVITE, ACK, CANCEL,BYE\r\n"
    b'WWW-Authenticate: Digest realm="a,b", nonce="1"\r\n'
    b"Content-Length: 0\r\n\r\n"
)


def _register() -> Request:
    m = parse_message(REGISTER)
    assert isinstance(m, Request)
    return m


def test_registrar_fields() -> None:
    m = _register()
    assert m.method == "REGISTER" and m.uri == "sip:127.0.0.1" and m.version == "SIP/2.0"
    assert m.request_uri == SipUri("127.0.0.1")
    assert m.branch == "z9hG4bK776asdhds" and m.top_via.rport_requested
    assert m.from_tag == "456248" and m.to_tag is None
    assert m.call_id == "843817637684230@998sdasdh09"
    assert m.cseq == CSeq(1826, "REGISTER")
    assert m.max_forwards == 70 and m.content_length == 0 and m.expires is None
    assert m.contacts[0].expires == 3600
    assert m.to_bytes() == REGISTER


def test_compact_forms_and_case_insensitive_names() -> None:
    """§7.3.3 compact forms; §7.3.1 header names are case-insensitive."""
    data = (
        b"OPTIONS sip:127.0.0.1 SIP/2.0\r\n"
        b"v: SIP/2.0/TCP 127.0.0.1;branch=z9hG4bK1\r\n"
        b"f: <sip:a@127.0.0.1>;tag=1\r\nt: <sip:b@127.0.0.1>\r\ni: cid\r\n"
        b"CSEQ: 1 OPTIONS\r\nm: <sip:a@127.0.0.1>\r\nk: path, outbound\r\nl: 0\r\n\r\n"
    )
    m = parse_message(data)
    assert m.headers.get("call-id") == m.headers.get("I") == "cid"
    assert "Supported" in m.headers and m.headers.get_all("supported") == ["path", "outbound"]
    assert m.cseq.seq == 1 and len(m.contacts) == 1
    assert m.to_bytes() == data
    assert canonical_name("i") == "Call-ID" and canonical_name("WWW-AUTHENTICATE") == "WWW-Authenticate"
    assert canonical_name("x-my-header") == "X-My-Header"


def test_get_all_splits_only_list_headers() -> None:
    m = _register()
    assert m.headers.get_all("Allow") == ["INVITE", "ACK", "CANCEL", "BYE"]
    assert m.headers.get_all("WWW-Authenticate") == ['Digest realm="a,b", nonce="1"']
    assert m.headers.values("Allow") == ["INVITE, ACK, CANCEL,BYE"]


def test_header_mutation_invalidates_typed_cache_and_serialises_cleanly() -> None:
    m = _register()
    assert m.cseq.seq == 1826
    m.headers.set("cseq", "1827 REGISTER")
    assert m.cseq.seq == 1827
    m.headers.add("Via", "SIP/2.0/UDP 127.0.0.9;branch=z9hG4bKtop", first=True)
    assert m.branch == "z9hG4bKtop" and len(m.vias) == 2
    assert m.headers.remove_first_value("Via") == "SIP/2.0/UDP 127.0.0.9;branch=z9hG4bKtop"
    assert m.branch == "z9hG4bK776asdhds"
    assert m.headers.remove("Allow") == 1 and "Allow" not in m.headers
    m.headers.add("X-Extra", "  v ")
    out = m.to_bytes()
    assert b"\r\nCSeq: 1827 REGISTER\r\n" in out
    assert b"\r\nX-Extra:   v \r\n" in out
    # Untouched fields keep their bytes.
    assert b'\r\nFrom: "Bob" <sip:bob@127.0.0.1>;tag=456248\r\n' in out
    again = parse_message(out)
    assert again.headers.get("X-Extra") == "v"
    assert again.cseq == CSeq(1827, "REGISTER")


def test_remove_first_value_of_a_comma_list() -> None:
    h = Headers([("Route", "<sip:a;lr>, <sip:b;lr>"), ("Route", "<sip:c;lr>")])
    assert h.remove_first_value("Route") == "<sip:a;lr>"
    assert h.get_all("Route") == ["<sip:b;lr>", "<sip:c;lr>"]


def test_local_values_cannot_inject_lines() -> None:
    h = Headers()
    for bad in ["a\r\nVia: x", "a\nb", "a\x00"]:
        with pytest.raises(SipValueError):
            h.add("Subject", bad)
    with pytest.raises(SipValueError):
        h.set("Bad Name", "x")
    with pytest.raises(SipValueError):
        h.add("Subject", "\ud800")
    with pytest.raises(SipValueError):
        Response(200, "OK\r\nX-Injected: 1").to_bytes()
    with pytest.raises(SipValueError):
        Request("OPTIONS", "sip:127.0.0.1\r\nX: y").to_bytes()


def test_content_length_follows_the_body() -> None:
    """§20.14: to_bytes writes the body's real length whatever the header said."""
    m = _register()
    m.body = b"hello"
    out = m.to_bytes()
    assert out.endswith(b"Content-Length: 5\r\n\r\nhello")
    local = Request("MESSAGE", "sip:127.0.0.1", [("Call-ID", "x")], b"abc")
    assert local.to_bytes() == b"MESSAGE sip:127.0.0.1 SIP/2.0\r\nCall-ID: x\r\nContent-Length: 3\r\n\r\nabc"


def test_datagram_body_rules() -> None:
    """§18.3: extra octets truncated, a short body is an error, no Content-Length means the rest."""
    head = REGISTER.replace(b"Content-Length: 0\r\n", b"")
    assert parse_message(head.replace(b"\r\n\r\n", b"\r\nContent-Length: 3\r\n\r\nabcdef")).body == b"abc"
    with pytest.raises(SipParseError) as info:
        parse_message(head.replace(b"\r\n\r\n", b"\r\nContent-Length: 9\r\n\r\nabc"))
    assert info.value.status == 400
    assert parse_message(head + b"rest of datagram").body == b"rest of datagram"


def test_tolerances() -> None:
    """Leading CRLFs (§7.5), LF-only line ends, folded lines (§7.3.1), SP before the colon."""
    assert parse_message(b"\r\n\r\n" + REGISTER).call_id == "843817637684230@998sdasdh09"
    lf = parse_message(REGISTER.replace(b"\r\n", b"\n"))
    assert lf.call_id == "843817637684230@998sdasdh09" and lf.body == b""
    folded = REGISTER.replace(b"Allow: INVITE, ACK,", b"Allow  : INVITE,\r\n  ACK,")
    m = parse_message(folded)
    assert m.headers.get("Allow") == "INVITE, ACK, CANCEL,BYE"
    assert m.to_bytes() == folded
    no_blank_line = REGISTER[: -len(b"\r\n")]
    assert parse_message(no_blank_line).body == b""


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (REGISTER.replace(b"SIP/2.0\r\n", b"SIP/3.0\r\n", 1), 505),
        (REGISTER.replace(b"sip:127.0.0.1 SIP", b"http://x SIP", 1), 416),
        (REGISTER.replace(b"REGISTER sip", b"REGISTER  sip", 1), 400),
        (REGISTER.replace(b"CSeq: 1826 REGISTER", b"CSeq: 1826 INVITE"), 400),
        (REGISTER.replace(b"Call-ID: 843817637684230@998sdasdh09\r\n", b""), 400),
        (REGISTER.replace(b"Max-Forwards: 70", b"Max-Forwards: 256"), 400),
        (REGISTER.replace(b"Max-Forwards: 70", b"Max-Forwards: 70\r\nMax-Forwards: 69"), 400),
        (REGISTER.replace(b"Call-ID: 8438", b"Call-ID: 84 38"), 400),
        (REGISTER.replace(b"Content-Length: 0", b"Content-Length: 0\r\nl: 1"), 400),
        (REGISTER.replace(b"Allow:", b"Allow"), 400),
        (REGISTER.replace(b"Allow:", b"Al low:"), 400),
        (REGISTER.replace(b"Allow:", b"Al@low:"), 400),
        (b"OPTIONS sip:h SIP/2.0\r\n Via: x\r\n\r\n", 400),
        (REGISTER.replace(b"70\r\n", b"70\rX\r\n"), 400),
        (b"SIP/2.0 2000 OK\r\n\r\n", 400),
        (b"SIP/2.0 200 O\x01K\r\n\r\n", 400),
        (b"", 400),
        (b"\r\n\r\n", 400),
        (b"garbage", 400),
    ],
)
def test_rejections_carry_a_status(data: bytes, status: int) -> None:
    with pytest.raises(SipParseError) as info:
        parse_message(data)
    assert info.value.status == status
    assert "\r" not in info.value.reason and "\n" not in info.value.reason


def test_limits() -> None:
    """513 for an oversized message (§21.5.14), 400 for too many fields or too long a line."""
    with pytest.raises(SipParseError) as info:
        parse_message(REGISTER + b"x" * 70000)
    assert info.value.status == 513
    many = REGISTER.replace(b"Allow:", b"X-A: 1\r\n" * 200 + b"Allow:")
    with pytest.raises(SipParseError) as info:
        parse_message(many)
    assert info.value.status == 400
    assert parse_message(many, Limits(max_headers=300)).headers.count("X-A") == 200
    long_line = REGISTER.replace(b"Allow:", b"X-Long: " + b"a" * 9000 + b"\r\nAllow:")
    with pytest.raises(SipParseError):
        parse_message(long_line)
    folded_many = REGISTER.replace(b"Allow:", b"X-F: a\r\n b\r\n" * 100 + b"Allow:")
    assert parse_message(folded_many).headers.count("X-F") == 100


def test_make_response_follows_8_2_6() -> None:
    req = parse_message(
        REGISTER.replace(
            b"Via: SIP/2.0/UDP 127.0.0.1:5062",
            b"Via: SIP/2.0/UDP 127.0.0.3;branch=z9hG4bKa\r\nVia: SIP/2.0/UDP 127.0.0.1:5062",
        ).replace(b"Allow:", b"Timestamp: 54\r\nRecord-Route: <sip:127.0.0.7;lr>\r\nAllow:")
    )
    assert isinstance(req, Request)
    ok = make_response(req, 200, to_tag="srv1", headers=[("Expires", "3600")])
    assert ok.status == 200 and ok.reason == "OK"
    assert [f.key for f in ok.headers.fields] == ["via", "via", "from", "to", "call-id", "cseq", "expires"]
    assert ok.vias == req.vias and ok.to_tag == "srv1" and ok.from_tag == "456248"
    assert ok.cseq == req.cseq and ok.call_id == req.call_id
    wire = ok.to_bytes()
    assert wire.startswith(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.3;branch=z9hG4bKa\r\n")
    assert wire.endswith(b"Expires: 3600\r\nContent-Length: 0\r\n\r\n")
    assert parse_message(wire) == ok
    trying = make_response(req, 100, to_tag="ignored")
    assert trying.reason == "Trying" and trying.to_tag is None
    assert trying.headers.get("Timestamp") == "54"
    tagged = make_response(make_response_target(), 486, "Busy", to_tag="new")
    assert tagged.to_tag == "old" and tagged.reason == "Busy"
    assert default_reason(299) == "OK" and default_reason(513) == "Message Too Large"
    with pytest.raises(SipValueError):
        make_response(req, 99)


def make_response_target() -> Request:
    m = parse_message(REGISTER.replace(b'To: "Bob" <sip:bob@127.0.0.1>', b"To: <sip:bob@127.0.0.1>;tag=old"))
    assert isinstance(m, Request)
    return m


def test_equality_ignores_content_length_and_raw_text() -> None:
    a = _register()
    b = parse_message(REGISTER.replace(b"Content-Length: 0\r\n", b""))
    assert a == b
    c = _register()
    c.headers.set("Max-Forwards", "69")
    assert a != c
    resp = Response(180)
    assert resp.reason == "Ringing" and resp != a


def test_headers_views() -> None:
    h = Headers([("Via", "SIP/2.0/UDP h"), ("X-A", "1")])
    assert list(h) == [("Via", "SIP/2.0/UDP h"), ("X-A", "1")]
    assert h.fields[0] == HeaderField("Via", "SIP/2.0/UDP h")
    assert h.fields[0].line() == "Via: SIP/2.0/UDP h"
    assert len(h) == 2 and h.count("via") == 1 and h.get("nope") is None
    copy = h.copy()
    copy.set("X-A", "2")
    assert h.get("X-A") == "1" and copy.get("X-A") == "2"
    assert Headers.from_fields([HeaderField("Call-ID", "x")]).get("i") == "x"


def test_lookups_after_a_change_see_the_changed_fields() -> None:
    """parse_message caches the fields' lookup keys for get() and contacts; every change drops them."""
    m = parse_message(
        b"REGISTER sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK1\r\n"
        b"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:a@127.0.0.1>\r\nCall-ID: c1\r\nCSeq: 1 REGISTER\r\n"
        b"Contact: <sip:a@127.0.0.1:5062>\r\nExpires: 60\r\n\r\n"
    )
    assert m.headers.get("Expires") == "60" and m.headers.get("Route") is None
    assert [c.uri.port for c in m.contacts] == [5062]  # type: ignore[union-attr]
    m.headers.remove("Expires")
    assert m.headers.get("Expires") is None
    m.headers.add("Contact", "<sip:a@127.0.0.1:5064>")
    assert m.headers.get("Contact") == "<sip:a@127.0.0.1:5062>"
    assert [c.uri.port for c in m.contacts] == [5062, 5064]  # type: ignore[union-attr]
    m.headers.set("Route", "<sip:127.0.0.1;lr>")
    assert m.headers.get("route") == "<sip:127.0.0.1;lr>"
