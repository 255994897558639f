"""Stream framing (RFC 3261 §18.3) and CRLF keep-alives (RFC 5626 §3.5.1, §4.4.1)."""

from __future__ import annotations

import pytest
from raftpbx.transport.sip.errors import SipParseError
from raftpbx.transport.sip.message import Limits, Request, Response
from raftpbx.transport.sip.stream import PONG, KeepAlive, StreamParser, is_keepalive

OPTIONS = (
    b"OPTIONS sip:127.0.0.1 SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP 127.0.0.1:5070;branch=z9hG4bK1\r\n"
    b"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:b@127.0.0.1>\r\n"
    b"Call-ID: c1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 4\r\n\r\nbody"
)
RESPONSE = (
    b"SIP/2.0 200 OK\r\nVia: SIP/2.0/TCP 127.0.0.1:5070;branch=z9hG4bK1\r\n"
    b"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:b@127.0.0.1>;tag=2\r\nCall-ID: c1\r\nCSeq: 1 OPTIONS\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def drain(parser: StreamParser) -> list[Request | Response | KeepAlive]:
    out: list[Request | Response | KeepAlive] = []
    for _ in range(1000):
        item = parser.next_message()
        if item is None:
            return out
        out.append(item)
    raise AssertionError("parser did not stop")


def test_messages_framed_by_content_length() -> None:
    parser = StreamParser()
    parser.feed(OPTIONS + RESPONSE + OPTIONS[:30])
    first, second = drain(parser)
    assert isinstance(first, Request) and first.body == b"body"
    assert isinstance(second, Response) and second.status == 200
    assert parser.buffered == 30
    parser.feed(OPTIONS[30:])
    (third,) = drain(parser)
    assert isinstance(third, Request) and third.to_bytes() == OPTIONS


def test_ping_and_pong() -> None:
    """RFC 5626 §4.4.1: a double CRLF is a ping, answered with one CRLF (§3.5.1)."""
    parser = StreamParser()
    parser.feed(b"\r\n\r\n" + OPTIONS + b"\r\n\r\n\r\n\r\n")
    items = drain(parser)
    assert items[0] == KeepAlive(ping=True)
    assert isinstance(items[1], Request)
    assert items[2:] == [KeepAlive(ping=True), KeepAlive(ping=True)]
    assert PONG == b"\r\n"


def test_a_lone_crlf_waits_until_it_cannot_be_a_ping() -> None:
    parser = StreamParser()
    parser.feed(b"\r\n")
    assert parser.next_message() is None
    parser.feed(b"\r")
    assert parser.next_message() is None
    parser.feed(b"\n")
    assert parser.next_message() == KeepAlive(ping=True)
    parser.feed(b"\r\n")
    assert parser.take_pong() is True and parser.buffered == 0
    parser.feed(b"\r\n" + RESPONSE)
    assert drain(parser)[0] == KeepAlive(ping=False)


def test_one_byte_at_a_time_gives_the_same_messages() -> None:
    data = b"\r\n\r\n" + OPTIONS + RESPONSE + b"\r\n\r\n" + OPTIONS
    whole = StreamParser()
    whole.feed(data)
    expected = drain(whole)
    parser = StreamParser()
    got: list[Request | Response | KeepAlive] = []
    for i in range(len(data)):
        parser.feed(data[i : i + 1])
        got.extend(drain(parser))
    assert got == expected and len(got) == 5


def test_missing_content_length_is_a_framing_error_and_poisons_the_stream() -> None:
    parser = StreamParser()
    parser.feed(OPTIONS.replace(b"Content-Length: 4\r\n", b""))
    with pytest.raises(SipParseError) as info:
        parser.next_message()
    assert info.value.status == 400
    with pytest.raises(SipParseError):
        parser.next_message()
    with pytest.raises(SipParseError):
        parser.feed(OPTIONS)


def test_size_limits_bound_memory() -> None:
    limits = Limits(max_message=2000)
    parser = StreamParser(limits)
    parser.feed(OPTIONS.replace(b"Content-Length: 4", b"Content-Length: 5000"))
    with pytest.raises(SipParseError) as info:
        parser.next_message()
    assert info.value.status == 413
    parser = StreamParser(limits)
    parser.feed(b"OPTIONS sip:127.0.0.1 SIP/2.0\r\nX: " + b"a" * 3000)
    with pytest.raises(SipParseError) as info:
        parser.next_message()
    assert info.value.status == 513


def test_garbage_between_messages() -> None:
    parser = StreamParser()
    parser.feed(b"\rX" + OPTIONS)
    with pytest.raises(SipParseError):
        parser.next_message()


def test_udp_keepalive_datagrams() -> None:
    assert is_keepalive(b"\r\n\r\n") and is_keepalive(b"\r\n") and is_keepalive(b"")
    assert not is_keepalive(OPTIONS)
