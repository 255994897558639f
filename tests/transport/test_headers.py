"""Typed header values: Via (§20.42, RFC 3581), name-addr (§20.10), CSeq (§20.16), lists (§7.3.1)."""

from __future__ import annotations

import time

import pytest
from raftpbx.transport.sip.errors import SipParseError, SipValueError
from raftpbx.transport.sip.headers import (
    CSeq,
    NameAddr,
    Via,
    _parse_name_addr_general,
    _parse_via_general,
    parse_contact_list,
    parse_cseq,
    parse_name_addr,
    parse_params,
    parse_uint,
    parse_via,
    parse_vias,
    quote,
    split_list,
    unquote,
)
from raftpbx.transport.sip.message import parse_message
from raftpbx.transport.sip.uri import Params, SipUri, TelUri


def test_via_fields_and_params() -> None:
    via = parse_via(
        "SIP/2.0/udp 127.0.0.1:5062;branch=z9hG4bKabc;rport;received=127.0.0.2;maddr=127.0.0.9;ttl=1"
    )
    assert (via.protocol, via.transport, via.host, via.port) == ("SIP/2.0", "UDP", "127.0.0.1", 5062)
    assert via.branch == "z9hG4bKabc"
    assert via.rport_requested and via.rport is None  # RFC 3581 §3: a bare flag
    assert via.received == "127.0.0.2" and via.maddr == "127.0.0.9" and via.ttl == 1
    filled = via.with_param("rport", "5062")
    assert filled.rport == 5062 and filled.rport_requested
    assert (
        str(filled)
        == "SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bKabc;rport=5062;received=127.0.0.2;maddr=127.0.0.9;ttl=1"
    )
    assert parse_via(str(filled)) == filled


def test_via_with_lws_ipv6_and_several_values() -> None:
    via = parse_via("SIP  /  2.0 / TCP   [2001:db8::9:1] : 6050 ; branch = z9hG4bK1 ; received=[2001:db8::2]")
    assert via == Via(
        "TCP", "[2001:db8::9:1]", 6050, Params([("branch", "z9hG4bK1"), ("received", "[2001:db8::2]")])
    )
    assert [
        v.host for v in parse_vias("SIP/2.0/UDP a.example.com, SIP/2.0/TCP b.example.com;branch=z9hG4bK2")
    ] == [
        "a.example.com",
        "b.example.com",
    ]


@pytest.mark.parametrize(
    "text",
    [
        "SIP/2.0/UDP",
        "SIP/2.0 UDP host",
        "SIP/2.0/UDP host:70000",
        "SIP/2.0/UDP host;branch=",
        "SIP/2.0/UDP host;;",
        "SIP/2.0/UDP host;rport=abc",
        "SIP/2.0/UDP host;ttl",
        "SIP/2.0/UDP [2001:db8:::1]",
        "SIP/2.0/UDP 2001:db8::1",
        "SIP/2.0/UDP host..example.com",
        "SIP/2.0/UDP host trailing",
    ],
)
def test_malformed_via_raises(text: str) -> None:
    with pytest.raises(SipParseError):
        parse_via(text)


def test_via_fast_path_matches_general_path() -> None:
    for text in [
        "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1;rport",
        "SIP/2.0/TLS host.example.com;branch=z9hG4bK-x.y;received=1.2.3.4",
        "SIP/2.0/WSS h",
    ]:
        assert parse_via(text) == _parse_via_general(text)


def test_name_addr_forms() -> None:
    """§20.10: display name quoted or tokens, or none; addr-spec parameters belong to the header."""
    a = parse_name_addr('"Alice \\"A\\" Smith" <sip:alice@127.0.0.1;transport=tcp>;tag=1928301774')
    assert a.display_name == 'Alice "A" Smith'
    assert a.uri == SipUri("127.0.0.1", user="alice", params=Params([("transport", "tcp")]))
    assert a.tag == "1928301774"
    b = parse_name_addr("Bob  Smith <sip:bob@127.0.0.1>")
    assert b.display_name == "Bob Smith" and b.tag is None
    c = parse_name_addr("sip:carol@127.0.0.1;tag=x;expires=60")
    assert c.uri == SipUri("127.0.0.1", user="carol") and c.tag == "x" and c.expires == 60
    d = parse_name_addr("<tel:+15551234>")
    assert d.uri == TelUri("+15551234") and d.display_name is None
    assert parse_name_addr('"" <sip:h>').display_name == ""


def test_name_addr_fast_path_matches_general_path() -> None:
    for text in [
        '"Bob" <sip:bob@127.0.0.1>;tag=456248',
        '<sip:bob@127.0.0.1:5062;transport=udp>;expires=3600;+sip.instance="<urn:uuid:1>";reg-id=1',
        "Bob <sip:bob@h>",
        "sip:carol@h;tag=1",
    ]:
        assert parse_name_addr(text) == _parse_name_addr_general(text)


def test_contact_parameters_rfc5626() -> None:
    (c,) = (
        parse_contact_list(
            '<sip:bob@127.0.0.1:5062;ob>;expires=3600;q=0.7;+sip.instance="<urn:uuid:00000000-0000-1000-8000-AABBCCDDEEFF>";reg-id=1'
        )
        or []
    )
    assert c.expires == 3600 and c.q == 0.7 and c.reg_id == 1
    assert c.instance == "<urn:uuid:00000000-0000-1000-8000-AABBCCDDEEFF>"
    assert isinstance(c.uri, SipUri) and c.uri.params.has("ob")
    assert parse_name_addr(str(c)) == c
    assert parse_name_addr("<sip:h>;q=2").q is None
    assert parse_name_addr("<sip:h>;expires=99999999999999999999").expires is None


def test_contact_star_and_lists() -> None:
    """§10.2.2: `Contact: *`; §7.3.1: commas inside quotes and <> do not split."""
    assert parse_contact_list(" * ") is None
    contacts = parse_contact_list('"Doe, John" <sip:j,k@h>, <sip:k@h>;q=0.5') or []
    assert [c.display_name for c in contacts] == ["Doe, John", None]
    assert split_list('a, "b,c" , <d,e>,, f') == ["a", '"b,c"', "<d,e>", "f"]
    assert split_list("") == []


@pytest.mark.parametrize(
    "text",
    [
        '"unterminated <sip:h>',
        "Bell, Alexander <sip:h>",
        "< sip:h >",
        "<sip:h",
        "sip:h?x=y",
        "<sip:h>;;",
        "<sip:h>;tag",
        "<sip:h> junk",
    ],
)
def test_malformed_name_addr(text: str) -> None:
    if text == "<sip:h>;tag":  # a flag parameter is legal
        assert parse_name_addr(text).params.has("tag")
        return
    with pytest.raises(SipParseError):
        parse_name_addr(text)


def test_quote_round_trip_and_controls() -> None:
    for text in ['a "b" c\\', "BEL:\x07 NUL:\x00 DEL:\x7f", "ünï", ""]:
        assert unquote(quote(text)) == text
        assert parse_name_addr(f"{quote(text)} <sip:h>").display_name == text
    with pytest.raises(SipValueError):
        quote("a\r\nb")
    assert str(NameAddr(SipUri("h"), "x\x00y")) == '"x\\\x00y" <sip:h>'


def test_cseq_and_integers() -> None:
    assert parse_cseq("0009 INVITE") == CSeq(9, "INVITE")
    assert parse_cseq(" 2147483647  REGISTER ") == CSeq(2**31 - 1, "REGISTER")
    for bad in ["2147483648 INVITE", "1", "x INVITE", "1 IN VITE", "-1 ACK", "36893488147419103232 REGISTER"]:
        with pytest.raises(SipParseError):
            parse_cseq(bad)
    assert parse_uint("0068", "Max-Forwards") == 68
    assert parse_uint(" 70 ", "Max-Forwards", 255) == 70
    for bad in ["256", "-1", "", "1e3", "²", "9" * 5000]:
        with pytest.raises(SipParseError):
            parse_uint(bad, "Max-Forwards", 255)


def test_header_params_with_sws_and_quotes() -> None:
    params = parse_params(' ; a = 1 ;b; c="x;y,z" ')
    assert params == Params([("a", "1"), ("b", None), ("c", '"x;y,z"')])
    with pytest.raises(SipParseError):
        parse_params(";a=1 b")


def test_display_name_tokens_are_read_in_linear_time() -> None:
    """A long run of token characters ending in a non-token character before '<' (here '"') made
    the display-name expression try every way of cutting the run into tokens (2**n): one From
    header held the parser for hours. It must now fail at once, as the general path says."""
    text = "a" * 64 + '"<sip:a@127.0.0.1>'
    data = (
        b"OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK1\r\n"
        b"From: " + text.encode() + b"\r\nTo: <sip:b@127.0.0.1>\r\nCall-ID: 1\r\nCSeq: 1 OPTIONS\r\n\r\n"
    )
    started = time.process_time()
    with pytest.raises(SipParseError):
        parse_name_addr(text)
    with pytest.raises(SipParseError) as info:
        parse_message(data)
    assert info.value.reason == "Malformed From header"
    assert time.process_time() - started < 1.0  # CPU time; the exponential form needs ~2**64 steps
