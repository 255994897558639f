"""SIP codec throughput on one core: parse and serialise a REGISTER, an INVITE with SDP and a 200 OK.

Prints messages per second, the median of several timed runs, for:
- parse:       parse_message(bytes) (validates Via, From, To, Call-ID, CSeq, Max-Forwards);
- full parse:  parse_message plus reading what a registrar needs (top Via branch, From and To tags,
               Call-ID, CSeq, Contact list with its parameters); the target is >= 50,000/s for the
               REGISTER on CPython 3.11;
- serialise:   to_bytes() of a parsed, untouched message (raw lines written back);
- proxy edit:  parse, push a Via, decrement Max-Forwards, serialise.

Times are CPU time of this process. A calibration line (CPU time of `sum(range(1000))`, about 8-10 us
on a current desktop core) and the load average are printed too, so that figures from a loaded or
slow machine can be put in perspective.

The figure depends on the interpreter's build as well as on the machine: CPython 3.11 built with
profile-guided optimisation and LTO (distribution packages, e.g. Debian's /usr/bin/python3.11) runs
the calibration loop about twice as fast as a plain `./configure --enable-shared` build (pyenv's
default, the project venv), and this parser up to 1.6 times as fast (runs on a loaded machine, 2026-11).
The host drifts too: compare builds in interleaved runs, not in runs taken at different times.
Say which build a figure comes from. The parser needs only the standard library, so any 3.11 runs it
(`--python PATH`).

The parser keeps a few bounded, process-wide tables of values that are immutable and few in real
traffic (header names, Request-Lines, Request-URIs, URI parameter texts such as `;ob`, `;lr`); repeating one message
exercises them as a registrar's steady REGISTER traffic does. Nothing that is unique per request or
per phone (Via branch, tags, Call-ID, CSeq, Contact) is memoised.

Usage: python bench/sip_codec.py [--runs N] [--seconds S] [--python PATH] [--installed]

The product's parser is compiled with mypyc by a normal install (setup.py); `--installed` measures
that build (run it with the venv's python, e.g. `.venv-bench/bin/python bench/sip_codec.py
--installed`, the issue-3 figure). Without it, the repository's source is imported and interpreted
(what an editable dev install runs). The parser's form is printed with the figures.

The issue-3 figure is the first line: the REGISTER full parse over a pool of 4,096 REGISTERs that
differ where real ones from many phones differ (Call-ID, branch, tags, users, Contact host:port and
instance, CSeq, Authorization nonce/cnonce/response) and are equal where they are equal (Request-URI,
header names, Expires, User-Agent), parsed in turn. The table below it parses one message's same
bytes again and again, which flatters anything cached; it is kept for comparison with older figures.

`--python /usr/bin/python3.11` runs the bench under that interpreter (any CPython 3.11: the parser
needs only the standard library, and transport/ is imported from this file's repository); the build (PGO/LTO) is printed with the figures.

Instruction counts (stable under load, unlike times): `--loop CASE MESSAGE N` only runs N calls
of one case (after 200 warm-up calls) and prints nothing; run it under callgrind with two values of
N and divide the difference of the totals by the difference of N, e.g.
    valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/sip_codec.py \
        --loop "full parse" REGISTER 1200     (and again with 200; "Collected" lines)
`--loop calibration x N` does the same for the calibration expression.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import timeit
from collections.abc import Callable

# The parser is imported from the repository this file is in (transport/ uses relative imports
# only), so that any CPython 3.11 runs it and a checkout elsewhere (a git worktree of an older
# commit) measures its own code, not the venv's editable install.
# With --installed, the installed package's parser is measured instead: the one a normal install
# (`pip install .`, make bench's .venv-bench, deploy/ssh) compiles with mypyc (setup.py).
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if "--installed" in sys.argv[1:]:
    from raftpbx.transport.sip import message as _message
else:
    sys.path.insert(0, _REPO)
    from transport.sip import message as _message  # type: ignore[no-redef]
parse_message = _message.parse_message
PARSER_FORM = (
    f"compiled with mypyc ({_message.__file__})"
    if str(_message.__file__).endswith((".so", ".pyd"))
    else f"interpreted source ({_message.__file__})"
)

REGISTER = (
    b"REGISTER sip:127.0.0.1 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5062;rport;branch=z9hG4bKPj5f0a1e9b4c7d4e2f8a3b6c9d0e1f2a3b\r\n"
    b"Max-Forwards: 70\r\n"
    b'From: "Alice" <sip:1001@127.0.0.1>;tag=ab12cd34ef56\r\n'
    b'To: "Alice" <sip:1001@127.0.0.1>\r\n'
    b"Call-ID: 9f8e7d6c5b4a39281706f5e4d3c2b1a0\r\n"
    b"CSeq: 4711 REGISTER\r\n"
    b"User-Agent: ExamplePhone/2.14.1\r\n"
    b'Contact: <sip:1001@127.0.0.1:5062;ob>;expires=600;+sip.instance="<urn:uuid:6f1f2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d>";reg-id=1\r\n'
    b"Expires: 600\r\n"
    b"Allow: PRACK, INVITE, ACK, BYE, CANCEL, UPDATE, INFO, SUBSCRIBE, NOTIFY, REFER, MESSAGE, OPTIONS\r\n"
    b"Supported: outbound, path, replaces\r\n"
    b"Content-Length:  0\r\n\r\n"
)

SDP = (
    b"v=0\r\no=- 3912345678 3912345678 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 4000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=sendrecv\r\n"
)

INVITE = (
    b"INVITE sip:1002@127.0.0.1 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5062;rport;branch=z9hG4bKPj0d9c8b7a6f5e4d3c2b1a09f8e7d6c5b4\r\n"
    b"Max-Forwards: 70\r\n"
    b'From: "Alice" <sip:1001@127.0.0.1>;tag=4f3e2d1c0b9a\r\n'
    b"To: <sip:1002@127.0.0.1>\r\n"
    b"Contact: <sip:1001@127.0.0.1:5062;ob>\r\n"
    b"Call-ID: 0a1b2c3d4e5f60718293a4b5c6d7e8f9\r\n"
    b"CSeq: 21 INVITE\r\n"
    b"Route: <sip:127.0.0.10;lr>\r\n"
    b"Allow: PRACK, INVITE, ACK, BYE, CANCEL, UPDATE, INFO, SUBSCRIBE, NOTIFY, REFER, MESSAGE, OPTIONS\r\n"
    b"Supported: replaces, 100rel, timer, norefersub\r\n"
    b"Session-Expires: 1800\r\n"
    b"Min-SE: 90\r\n"
    b"User-Agent: ExamplePhone/2.14.1\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: " + str(len(SDP)).encode() + b"\r\n\r\n" + SDP
)

OK_200 = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.10;branch=z9hG4bK3c2d1e0f9a8b7c6d5e4f\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5062;rport=5062;received=127.0.0.1;branch=z9hG4bKPj0d9c8b7a6f5e4d3c2b1a09f8e7d6c5b4\r\n"
    b"Record-Route: <sip:127.0.0.10;lr>\r\n"
    b"Call-ID: 0a1b2c3d4e5f60718293a4b5c6d7e8f9\r\n"
    b'From: "Alice" <sip:1001@127.0.0.1>;tag=4f3e2d1c0b9a\r\n'
    b"To: <sip:1002@127.0.0.1>;tag=a9b8c7d6e5\r\n"
    b"CSeq: 21 INVITE\r\n"
    b"Contact: <sip:1002@127.0.0.1:5064>\r\n"
    b"Allow: PRACK, INVITE, ACK, BYE, CANCEL, UPDATE, INFO, SUBSCRIBE, NOTIFY, REFER, MESSAGE, OPTIONS\r\n"
    b"Supported: replaces, timer\r\n"
    b"Session-Expires: 1800;refresher=uac\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: " + str(len(SDP)).encode() + b"\r\n\r\n" + SDP
)

MESSAGES = {"REGISTER": REGISTER, "INVITE+SDP": INVITE, "200 OK+SDP": OK_200}

# The issue-3 figure: a pool of REGISTERs from many phones, parsed in turn, so that nothing a cache
# could keep from one message to the next is the same unless it is the same in real traffic. What
# differs per message: Call-ID, Via branch, From tag, the user in From/To/Contact, Contact
# host:port and +sip.instance, CSeq, the Authorization nonce, cnonce and response. What is the same
# (as for one registrar's phones): Request-URI sip:domain, header names, Expires, User-Agent.
POOL_SIZE = 4096


def register_pool(size: int = POOL_SIZE, seed: int = 3) -> list[bytes]:
    """`size` distinct REGISTERs (deterministic; loopback addresses only)."""
    rnd = random.Random(seed)

    def hexs(n: int) -> str:
        return f"{rnd.getrandbits(4 * n):0{n}x}"

    out: list[bytes] = []
    for _ in range(size):
        user = str(1000 + rnd.randrange(90000))
        host = f"127.{rnd.randrange(256)}.{rnd.randrange(256)}.{rnd.randrange(1, 255)}"
        port = rnd.randrange(1024, 65536)
        nonce = hexs(32)
        uuid = f"{hexs(8)}-{hexs(4)}-4{hexs(3)}-8{hexs(3)}-{hexs(12)}"
        out.append(
            (
                "REGISTER sip:127.0.0.1 SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {host}:{port};rport;branch=z9hG4bKPj{hexs(32)}\r\n"
                "Max-Forwards: 70\r\n"
                f'From: "User {user}" <sip:{user}@127.0.0.1>;tag={hexs(12)}\r\n'
                f'To: "User {user}" <sip:{user}@127.0.0.1>\r\n'
                f"Call-ID: {hexs(32)}\r\n"
                f"CSeq: {rnd.randrange(1, 2**31)} REGISTER\r\n"
                "User-Agent: ExamplePhone/2.14.1\r\n"
                f"Contact: <sip:{user}@{host}:{port};ob>;expires=600;"
                f'+sip.instance="<urn:uuid:{uuid}>";reg-id=1\r\n'
                "Expires: 600\r\n"
                f'Authorization: Digest username="{user}", realm="127.0.0.1", nonce="{nonce}", '
                f'uri="sip:127.0.0.1", response="{hexs(32)}", algorithm=MD5, cnonce="{hexs(16)}", '
                f"qop=auth, nc={rnd.randrange(1, 100):08x}\r\n"
                "Allow: PRACK, INVITE, ACK, BYE, CANCEL, UPDATE, INFO, SUBSCRIBE, NOTIFY, REFER, MESSAGE, OPTIONS\r\n"
                "Supported: outbound, path, replaces\r\n"
                "Content-Length:  0\r\n\r\n"
            ).encode()
        )
    assert len(set(out)) == size
    return out


def _full_parse_pool(pool: list[bytes]) -> Callable[[], object]:
    """The full parse of each pool message in turn (cycled)."""
    step = itertools.cycle(pool).__next__

    def run() -> object:
        m = parse_message(step())
        return (m.branch, m.from_.tag, m.to.tag, m.call_id, m.cseq, [(c.uri, c.expires) for c in m.contacts])

    return run


# CPU time of sum(range(1000)) on a current desktop core with CPython 3.11 (for the scaled estimate).
REFERENCE_CALIBRATION_US = 9.0


def _parse(data: bytes) -> Callable[[], object]:
    def run() -> object:
        return parse_message(data)

    return run


def _full_parse(data: bytes) -> Callable[[], object]:
    def run() -> object:
        m = parse_message(data)
        return (m.branch, m.from_.tag, m.to.tag, m.call_id, m.cseq, [(c.uri, c.expires) for c in m.contacts])

    return run


def _serialise(data: bytes) -> Callable[[], object]:
    m = parse_message(data)

    def run() -> object:
        return m.to_bytes()

    return run


def _proxy_edit(data: bytes) -> Callable[[], object]:
    def run() -> object:
        m = parse_message(data)
        m.headers.add("Via", "SIP/2.0/UDP 127.0.0.10;branch=z9hG4bKproxy1", first=True)
        if m.max_forwards is not None:
            m.headers.set("Max-Forwards", str(m.max_forwards - 1))
        return m.to_bytes()

    return run


CASES: dict[str, Callable[[bytes], Callable[[], object]]] = {
    "parse": _parse,
    "full parse": _full_parse,
    "serialise": _serialise,
    "proxy edit": _proxy_edit,
}


def rate(fn: Callable[[], object], runs: int, seconds: float) -> float:
    """Median messages/s over `runs` timed runs of about `seconds` of CPU time each.

    CPU time of this process (not wall time), so that other processes sharing the machine do not
    count against the codec; they still slow it through shared caches, hence the calibration line.
    """
    timer = timeit.Timer(fn, timer=time.process_time)
    number, _ = timer.autorange()
    per_run = max(1, int(number * seconds / max(timer.timeit(number), 1e-9)))
    rates = [per_run / timer.timeit(per_run) for _ in range(runs)]
    return statistics.median(rates)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=0.3)
    ap.add_argument(
        "--python", metavar="PATH", help="run this bench under another interpreter (e.g. /usr/bin/python3.11)"
    )
    ap.add_argument(
        "--loop",
        nargs=3,
        metavar=("CASE", "MESSAGE", "N"),
        help="run N calls only (callgrind); MESSAGE may be 'REGISTER pool' with CASE 'full parse'",
    )
    ap.add_argument(
        "--installed",
        action="store_true",
        help="measure the installed raftpbx package's parser (compiled by a normal install) instead of this "
        "repository's source",
    )
    args = ap.parse_args()
    if args.python:
        # The parser needs only the standard library: the other interpreter imports transport/ from
        # the repository (see the import at the top).
        argv = [
            "--runs",
            str(args.runs),
            "--seconds",
            str(args.seconds),
            *(["--loop", *args.loop] if args.loop else []),
            *(["--installed"] if args.installed else []),
        ]
        return subprocess.call([args.python, os.path.abspath(__file__), *argv])
    if args.loop:
        case, message, count = args.loop
        fn: Callable[[], object]
        if case == "calibration":
            fn = lambda: sum(range(1000))  # noqa: E731
        elif message == "REGISTER pool":
            fn = _full_parse_pool(register_pool())
        else:
            fn = CASES[case](MESSAGES[message])
        for _ in range(200):
            fn()
        for _ in range(int(count)):
            fn()
        return 0
    calib = (
        min(timeit.repeat("sum(range(1000))", number=2000, repeat=5, timer=time.process_time)) / 2000 * 1e6
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"Python {platform.python_version()} ({platform.python_implementation()}, {sys.executable}), one core"
    )
    # (PGO/LTO are not reliably recorded in sysconfig: Debian's PGO+LTO build does not say so there.)
    print(f"build: {' '.join(platform.python_build())}, {platform.python_compiler()}")
    print(f"parser: {PARSER_FORM}")
    print(
        f"calibration: sum(range(1000)) = {calib:.1f} us   load average: {load:.2f}   runs: {args.runs} (median)"
    )
    print()
    pool = register_pool()
    pool_rate = rate(_full_parse_pool(pool), args.runs, args.seconds)
    print(
        f"REGISTER full parse, pool of {len(pool):,} distinct REGISTERs (issue 3 figure): {pool_rate:,.0f}/s "
        f"({1e6 / pool_rate:.1f} us each); target 50,000/s",
        flush=True,
    )
    print()
    names = list(MESSAGES)
    print("same bytes parsed again and again (one message each; bounded tables always hit):")
    print(f"{'msgs/s':<12}" + "".join(f"{n:>14}" for n in names))
    results: dict[tuple[str, str], float] = {}
    for case, make in CASES.items():
        row = f"{case:<12}"
        for name in names:
            value = rate(make(MESSAGES[name]), args.runs, args.seconds)
            results[(case, name)] = value
            row += f"{value:>14,.0f}"
        print(row, flush=True)
    print()
    same = results[("full parse", "REGISTER")]
    print(f"REGISTER full parse, pool (issue 3): {pool_rate:,.0f}/s; same bytes: {same:,.0f}/s")
    print(
        f"scaled to a core where the calibration takes {REFERENCE_CALIBRATION_US:.0f} us: "
        f"~{pool_rate * calib / REFERENCE_CALIBRATION_US:,.0f}/s pool (an estimate, not a measurement)"
    )
    return 0


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"(bench took {time.perf_counter() - start:.1f} s)", file=sys.stderr)
    raise SystemExit(code)
