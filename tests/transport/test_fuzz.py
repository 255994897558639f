"""Property and fuzz tests of the SIP codec (h11-style invariants).

- parse(serialise(m)) == m for generated messages, and serialising a parsed message is stable;
- any bytes give a message or SipParseError, never another exception (random bytes, and a seeded,
  bounded mutation fuzzer over the RFC 4475/5118 corpus);
- the whole buffer and any split of it through StreamParser give the same results;
- untouched header lines come back byte for byte, modified ones are written cleanly.

Hypothesis runs derandomized (fixed seed per test) so that a failure is reproducible, never flaky.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from raftpbx.transport.sip.errors import SipParseError
from raftpbx.transport.sip.headers import CSeq, NameAddr, Via, quote
from raftpbx.transport.sip.message import Message, Request, Response, parse_message
from raftpbx.transport.sip.stream import KeepAlive, StreamParser
from raftpbx.transport.sip.uri import Params, SipUri, parse_uri

SETTINGS = settings(
    max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
CORPUS = sorted((Path(__file__).resolve().parents[1] / "data" / "sip").glob("*/*/*.*"))
CORPUS = [p for p in CORPUS if p.suffix in (".dat", ".sip")]

TOKEN_CHARS = string.ascii_letters + string.digits + "-.!%*_+`'~"
tokens = st.text(TOKEN_CHARS, min_size=1, max_size=10)
# Loopback only: these messages name only addresses this machine may use.
hosts = st.sampled_from(["127.0.0.1", "127.0.0.53", "localhost", "[::1]", "LocalHost"])
ports = st.none() | st.integers(0, 65535)
no_crlf_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"), max_size=12
)


@st.composite
def sip_uris(draw: st.DrawFn, with_headers: bool = True) -> SipUri:
    params = draw(
        st.lists(
            st.tuples(st.text(min_size=1, max_size=6), st.none() | st.text(min_size=1, max_size=6)),
            max_size=3,
        )
    )
    headers = (
        draw(st.lists(st.tuples(st.text(min_size=1, max_size=6), st.text(max_size=6)), max_size=2))
        if with_headers
        else []
    )
    user = draw(st.none() | st.text(min_size=1, max_size=8))
    password = draw(st.none() | st.text(max_size=6)) if user is not None else None
    return SipUri(
        draw(hosts),
        draw(st.sampled_from(["sip", "sips"])),
        user,
        password,
        draw(ports),
        Params(params),
        tuple(headers),
    )


header_params = st.lists(st.tuples(tokens, st.none() | tokens | no_crlf_text.map(quote)), max_size=3).map(
    Params
)


@st.composite
def name_addrs(draw: st.DrawFn, tag: bool = False) -> NameAddr:
    params = draw(header_params)
    if tag:
        params = params.set("tag", draw(tokens))
    return NameAddr(draw(sip_uris()), draw(st.none() | no_crlf_text), params)


@st.composite
def vias(draw: st.DrawFn) -> Via:
    params = Params([("branch", "z9hG4bK" + draw(tokens))])
    if draw(st.booleans()):
        params = params.set("rport", draw(st.none() | st.integers(1, 65535).map(str)))
    if draw(st.booleans()):
        params = params.set("received", "127.0.0.1")
    params = Params(
        list(params)
        + list(draw(st.lists(st.tuples(tokens.map(lambda t: "x" + t), st.none() | tokens), max_size=2)))
    )
    transport = draw(st.sampled_from(["UDP", "TCP", "TLS", "SCTP", "WS", "WSS"]))
    return Via(transport, draw(hosts), draw(ports), params)


extra_value = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"), max_size=20
).map(lambda s: s.strip(" \t"))


@st.composite
def messages(draw: st.DrawFn) -> Request | Response:
    method = draw(st.sampled_from(["INVITE", "REGISTER", "OPTIONS", "BYE", "ACK"]) | tokens)
    via_list = draw(st.lists(vias(), min_size=1, max_size=3))
    fields: list[tuple[str, str]] = []
    if len(via_list) > 1 and draw(st.booleans()):
        fields.append(("Via", ", ".join(map(str, via_list))))
    else:
        fields.extend(("Via", str(v)) for v in via_list)
    fields.append((draw(st.sampled_from(["From", "f"])), str(draw(name_addrs(tag=True)))))
    fields.append((draw(st.sampled_from(["To", "t"])), str(draw(name_addrs()))))
    fields.append(("Call-ID", draw(tokens) + draw(st.sampled_from(["", "@127.0.0.1"]))))
    fields.append(("CSeq", str(CSeq(draw(st.integers(0, 2**31 - 1)), method))))
    if draw(st.booleans()):
        fields.append(("Max-Forwards", str(draw(st.integers(0, 255)))))
    for contact in draw(st.lists(name_addrs(), max_size=2)):
        fields.append(("Contact", str(contact)))
    for _ in range(draw(st.integers(0, 3))):
        fields.append(("X-" + draw(tokens), draw(extra_value)))
    order = draw(st.permutations(range(len(fields))))
    headers = [fields[i] for i in order]
    body = draw(st.binary(max_size=64))
    if draw(st.booleans()):
        uri = str(draw(sip_uris(with_headers=False)))
        return Request(method, uri, headers, body)
    reason = draw(st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=15))
    return Response(draw(st.integers(100, 699)), reason, headers, body)


def _read_everything(m: Message) -> None:
    """Every typed accessor either works or raises SipParseError."""
    for name in (
        "call_id",
        "cseq",
        "vias",
        "from_",
        "to",
        "max_forwards",
        "expires",
        "content_length",
        "contacts",
        "routes",
        "record_routes",
        "paths",
        "branch",
        "top_via",
        "contact_star",
    ):
        try:
            getattr(m, name)
        except SipParseError:
            pass
    if isinstance(m, Request):
        try:
            m.request_uri  # noqa: B018
        except SipParseError:
            pass


@SETTINGS
@given(messages())
def test_parse_of_serialised_message_is_equal(m: Request | Response) -> None:
    wire = m.to_bytes()
    parsed = parse_message(wire)
    assert parsed == m
    assert parsed.vias == m.vias
    assert parsed.from_ == m.from_ and parsed.to == m.to
    assert parsed.cseq == m.cseq and parsed.call_id == m.call_id
    assert parsed.contacts == m.contacts
    assert parsed.to_bytes() == wire
    if isinstance(m, Request):
        assert isinstance(parsed, Request) and parsed.request_uri == parse_uri(m.uri)


@SETTINGS
@given(sip_uris())
def test_uri_format_parse_round_trip(uri: SipUri) -> None:
    assert parse_uri(str(uri)) == uri


@SETTINGS
@given(st.binary(max_size=300))
def test_any_bytes_give_a_message_or_a_parse_error(data: bytes) -> None:
    try:
        m = parse_message(data)
    except SipParseError as exc:
        assert 400 <= exc.status <= 599
        return
    _read_everything(m)


@SETTINGS
@given(messages(), st.data())
def test_mutated_generated_messages_never_raise_anything_else(
    m: Request | Response, data: st.DataObject
) -> None:
    wire = bytearray(m.to_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(wire)))
        wire[pos:pos] = data.draw(
            st.sampled_from(
                [b"\r\n", b"\n", b" ", b":", b";", b",", b"<", b'"', b"\\", b"%", b"\x00", b"\xff", b"9" * 12]
            )
        )
    _parse_and_check(bytes(wire))


INTERESTING = [
    b"\r",
    b"\n",
    b"\r\n",
    b" ",
    b"\t",
    b":",
    b";",
    b",",
    b"<",
    b">",
    b'"',
    b"\\",
    b"%",
    b"%0",
    b"=",
    b"@",
    b"[",
    b"]",
    b"\x00",
    b"\x7f",
    b"\xc3",
    b"\xff",
    b"0",
    b"9" * 20,
    b"-",
]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op == 1:
            buf[pos:pos] = rng.choice(INTERESTING)
        elif op == 2:
            del buf[pos : pos + rng.randint(1, 16)]
        elif op == 3:
            end = min(len(buf), pos + rng.randint(1, 40))
            buf[pos:pos] = buf[pos:end]
        elif op == 4:
            del buf[pos:]
        else:
            line_start = buf.rfind(b"\n", 0, pos) + 1
            buf[line_start:line_start] = rng.choice(
                [b" ", b"\t", b"X-Dup: a, b\r\n", b"l: 7\r\n", b"v: SIP/2.0/UDP 127.0.0.1\r\n"]
            )
    return bytes(buf)


def _parse_and_check(data: bytes) -> bool:
    try:
        m = parse_message(data)
    except SipParseError as exc:
        assert 400 <= exc.status <= 599 and exc.reason
        return False
    _read_everything(m)
    wire = m.to_bytes()
    again = parse_message(wire)
    assert again == m
    assert again.to_bytes() == wire
    return True


def test_mutation_fuzzer_over_the_corpus() -> None:
    """Seeded and bounded: 3000 mutants of the torture corpus."""
    rng = random.Random(4475)
    seeds = [p.read_bytes() for p in CORPUS]
    parsed = 0
    for _ in range(3000):
        parsed += _parse_and_check(_mutate(rng, rng.choice(seeds)))
    assert parsed > 150  # the fuzzer also exercises the success path


def _stream_results(chunks: list[bytes]) -> list[object]:
    parser = StreamParser()
    out: list[object] = []
    try:
        for chunk in chunks:
            parser.feed(chunk)
            while (item := parser.next_message()) is not None:
                out.append(item.to_bytes() if isinstance(item, Request | Response) else item)
    except SipParseError as exc:
        out.append(("error", exc.status))
    return out


@SETTINGS
@given(st.lists(messages().map(lambda m: m.to_bytes()) | st.just(b"\r\n\r\n"), max_size=4), st.data())
def test_stream_split_anywhere_gives_the_same_results(items: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(items)
    whole = _stream_results([stream])
    assert len(whole) == len(items)
    assert [x for x in whole if x != KeepAlive(ping=True)] == [i for i in items if i != b"\r\n\r\n"]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert _stream_results(pieces) == whole


def test_stream_one_byte_at_a_time_over_mutated_corpus() -> None:
    """Seeded: byte-at-a-time and whole-buffer framing agree, errors included."""
    rng = random.Random(5626)
    seeds = [p.read_bytes() for p in CORPUS]
    for _ in range(60):
        stream = b"".join(
            _mutate(rng, rng.choice(seeds)) if rng.random() < 0.5 else rng.choice(seeds) for _ in range(3)
        )
        whole = _stream_results([stream])
        assert _stream_results([stream[i : i + 1] for i in range(len(stream))]) == whole


@st.composite
def spelled_fields(draw: st.DrawFn) -> tuple[bytes, str, str]:
    """A header line as a phone might spell it: any case, compact form, SP before the colon,
    extra LWS, folding."""
    name, value = draw(
        st.sampled_from(
            [
                ("Subject", "hello there"),
                ("User-Agent", "Phone/1.0 (x)"),
                ("Allow", "INVITE, ACK ,BYE"),
                ("Supported", "path,outbound"),
                ("X-Custom", ";;,,;"),
            ]
        )
    )
    spelled = draw(st.sampled_from([name, name.lower(), name.upper()]))
    before = draw(st.sampled_from(["", " ", "\t "]))
    after = draw(st.sampled_from(["", " ", "   "]))
    folded = value.replace(" ", draw(st.sampled_from([" ", "\r\n ", "\r\n\t  "])), 1)
    return f"{spelled}{before}:{after}{folded}".encode(), name, value


BASE = (
    b"OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKx\r\n"
    b"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:b@127.0.0.1>\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\n"
)


@SETTINGS
@given(st.lists(spelled_fields(), min_size=1, max_size=4), st.data())
def test_untouched_lines_byte_for_byte_modified_lines_clean(
    lines: list[tuple[bytes, str, str]], data: st.DataObject
) -> None:
    wire = BASE + b"".join(line + b"\r\n" for line, _, _ in lines) + b"Content-Length: 0\r\n\r\n"
    m = parse_message(wire)
    assert m.to_bytes() == wire
    for _, name, value in lines:
        assert value in [v for n, v in m.headers if n.lower() == name.lower()]
    index = data.draw(st.integers(0, len(lines) - 1))
    _, name, _ = lines[index]
    m.headers.set(name, "changed  value")
    out = m.to_bytes()
    assert f"\r\n{name}: changed  value\r\n".encode() in out
    for i, (line, other, _) in enumerate(lines):
        if other.lower() != name.lower():
            assert b"\r\n" + line + b"\r\n" in out, i
    assert out.startswith(BASE)
    assert parse_message(out).headers.get(name) == "changed  value"
