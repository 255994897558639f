"""The registrar's check of Contact parameters (400 names the first malformed one: expires, q, reg-id)."""

from __future__ import annotations

import pytest
from raftpbx.transport.sip.message import Request, parse_message

from raftpbx.registrar import _bad_param


def _contact(params: str) -> object:
    text = (
        "REGISTER sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\n"
        "From: <sip:2001@127.0.0.1>;tag=a\r\nTo: <sip:2001@127.0.0.1>\r\nCall-ID: c1\r\nCSeq: 1 REGISTER\r\n"
        f"Contact: <sip:2001@127.0.0.1:5070>{params}\r\nContent-Length: 0\r\n\r\n"
    )
    request = parse_message(text.encode())
    assert isinstance(request, Request)
    return request.contacts[0]


@pytest.mark.parametrize(
    ("params", "bad"),
    [
        ("", None),
        (";expires=60;q=0.5", None),
        (';+sip.instance="<urn:uuid:1>";reg-id=1', None),
        (";expires=soon", "expires"),
        (";EXPIRES=soon", "expires"),
        (";q=2x", "q"),
        (";reg-id=x", "reg-id"),
        (";q=x;expires=y", "expires"),  # expires is checked first, whatever the order in the header
        (";reg-id=x;q=x", "q"),
    ],
)
def test_first_malformed_contact_parameter_is_named(params: str, bad: str | None) -> None:
    assert _bad_param(_contact(params)) == bad  # type: ignore[arg-type]
