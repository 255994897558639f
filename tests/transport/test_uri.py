"""SIP/SIPS/tel URIs: RFC 3261 §19.1, RFC 3966, RFC 5118."""

from __future__ import annotations

import pytest
from raftpbx.transport.sip.errors import SipParseError
from raftpbx.transport.sip.uri import (
    AbsoluteUri,
    Params,
    SipUri,
    TelUri,
    escape,
    parse_sip_uri,
    parse_uri,
    unescape,
)


def test_full_sip_uri_components() -> None:
    uri = parse_uri(
        "sips:alice:secret@Atlanta.example.com:5061;transport=tls;lr;maddr=127.0.0.1?Subject=hi&Priority=urgent"
    )
    assert uri == SipUri(
        "Atlanta.example.com",
        "sips",
        "alice",
        "secret",
        5061,
        Params([("transport", "tls"), ("lr", None), ("maddr", "127.0.0.1")]),
        (("Subject", "hi"), ("Priority", "urgent")),
    )
    assert isinstance(uri, SipUri)
    assert uri.transport == "tls" and uri.lr and uri.maddr == "127.0.0.1"
    assert uri.host_port == "Atlanta.example.com:5061"


@pytest.mark.parametrize(
    "text",
    [
        "sip:127.0.0.1",
        "sip:bob@127.0.0.1:5062;transport=udp",
        "sip:+15551234;user=phone@gw.example.com",
        "sips:[2001:db8::1]:5061",
        "sip:user@[::ffff:192.0.2.2]",
        "sip:a%20b@example.com;x=%3B",
        "sip:host?Route=%3Csip:p.example.com%3Blr%3E",
        "tel:+1-201-555-0123;phone-context=example.com",
        "urn:service:sos",
        "mailto:alice@example.com",
    ],
)
def test_format_round_trips(text: str) -> None:
    uri = parse_uri(text)
    assert parse_uri(str(uri)) == uri


def test_escapes_decoded_once_and_reapplied_where_needed() -> None:
    """§19.1.2: %HH is decoded in the user, password and parameters, never twice (RFC 3986)."""
    uri = parse_sip_uri("sip:%61lice%20x@example.com;n%61me=v%61lue%2541")
    assert uri.user == "alice x"
    assert uri.params == Params([("name", "value%41")])
    assert str(uri) == "sip:alice%20x@example.com;name=value%2541"
    assert unescape("%E2%82%AC") == "€"
    assert escape("€ x", frozenset("x")) == "%E2%82%AC%20x"
    # Invalid UTF-8 after decoding is kept losslessly.
    assert escape(unescape("%FF"), frozenset()) == "%FF"


def test_fast_and_general_paths_agree() -> None:
    """The one-regex path must give what the general path gives."""
    from raftpbx.transport.sip.uri import _parse_sip_general

    for rest in ["alice@host.example.com:5060;transport=tcp;lr", "host", "u:p@h;a=b;c", "1.2.3.4:65535"]:
        assert parse_uri("sip:" + rest) == _parse_sip_general("sip", rest)


@pytest.mark.parametrize(
    "text",
    [
        "sip:",
        "sip:user@",
        "sip:host:99999",
        "sip:host:",
        "sip:ho st",
        "sip:host..example.com",
        "sip:2001:db8::10",  # RFC 5118 §4.2: IPv6 needs brackets
        "sip:[2001:db8:::192.0.2.1]",  # RFC 5118 §4.10
        "sip:[2001:db8::1",
        "sip:[::1]x",
        "sip:us er@host",
        "sip:host;=x",
        "sip:host;a=",
        "sip:host?noequals",
        "sip:a:b:c@host",
        "tel:xyz",
        "nocolon",
        "1sip:host",
        "x:<bad>",
    ],
)
def test_malformed_uris_raise_400(text: str) -> None:
    with pytest.raises(SipParseError) as info:
        parse_uri(text)
    assert info.value.status == 400


def test_scheme_is_case_insensitive_and_other_schemes_stay_opaque() -> None:
    assert parse_uri("SIP:Bob@Host") == SipUri("Host", "sip", "Bob")
    assert parse_uri("tel:+15551234") == TelUri("+15551234")
    assert parse_uri("tel:+15551234").is_global  # type: ignore[union-attr]
    assert parse_uri("HTTP://example.com/x") == AbsoluteUri("http", "//example.com/x")
    with pytest.raises(SipParseError):
        parse_sip_uri("tel:+1555")


EQUIVALENT = [
    ("sip:%61lice@atlanta.com;transport=TCP", "sip:alice@AtLanTa.CoM;Transport=tcp"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com;newparam=5"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com;security=on"),
    ("sip:carol@chicago.com;newparam=5", "sip:carol@chicago.com;security=on"),
    (
        "sip:biloxi.com;transport=tcp;method=REGISTER?to=sip:bob%40biloxi.com",
        "sip:biloxi.com;method=REGISTER;transport=tcp?to=sip:bob%40biloxi.com",
    ),
    (
        "sip:alice@atlanta.com?subject=project%20x&priority=urgent",
        "sip:alice@atlanta.com?priority=urgent&subject=project%20x",
    ),
]
NOT_EQUIVALENT = [
    ("SIP:ALICE@AtLanTa.CoM;Transport=udp", "sip:alice@AtLanTa.CoM;Transport=UDP"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com:5060"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com;transport=udp"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com:6000;transport=tcp"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com?Subject=next%20meeting"),
    ("sip:bob@phone21.boxesbybob.com", "sip:bob@192.0.2.4"),
    ("sip:carol@chicago.com;security=on", "sip:carol@chicago.com;security=off"),
    ("sip:alice@atlanta.com", "sips:alice@atlanta.com"),
]


@pytest.mark.parametrize(("a", "b"), EQUIVALENT)
def test_rfc3261_19_1_4_equivalent(a: str, b: str) -> None:
    ua, ub = parse_sip_uri(a), parse_sip_uri(b)
    assert ua.equivalent(ub) and ub.equivalent(ua)


@pytest.mark.parametrize(("a", "b"), NOT_EQUIVALENT)
def test_rfc3261_19_1_4_not_equivalent(a: str, b: str) -> None:
    ua, ub = parse_sip_uri(a), parse_sip_uri(b)
    assert not ua.equivalent(ub) and not ub.equivalent(ua)


def test_params_lookup_is_case_insensitive_and_copies_are_new() -> None:
    params = Params([("Transport", "TCP"), ("lr", None)])
    assert params.get("transport") == "TCP"
    assert params.has("LR") and params.get("lr") is None and params.get("lr", "x") == "x"
    changed = params.set("transport", "udp").set("ttl", "3").remove("LR")
    assert changed == Params([("transport", "udp"), ("ttl", "3")])
    assert params == Params([("Transport", "TCP"), ("lr", None)])
    uri = SipUri("h").with_param("lr")
    assert str(uri) == "sip:h;lr"


@pytest.mark.parametrize(
    "items",
    [
        [("rport", None), ("branch", "z9hG4bK1")],
        [("Branch", "a"), ("branch", "b")],
        [("TAG", "x")],
        [("\u212aey", "kelvin"), ("key", "plain")],  # KELVIN SIGN lower-cases to ASCII 'k'
        [("\u0130d", "dotted"), ("id", "plain")],  # I WITH DOT ABOVE lower-cases to two characters
        [("expires", None), ("expires", "60")],
        [],
    ],
)
def test_params_lookup_agrees_with_get(items: list[tuple[str, str | None]]) -> None:
    params = Params(items)
    for key in ("branch", "tag", "key", "id", "expires", "absent"):  # lookup takes ASCII keys only
        assert params.lookup(key) == params.get(key), key
