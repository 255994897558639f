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
Say which build a figure comes from. The parser needs only the standard library, so any 3.11 runs it:
put a directory holding `raftpbx/__init__.py` and a `raftpbx/transport` link to transport/ on PYTHONPATH.

The parser keeps a few bounded, process-wide tables of values that are immutable and few in real
traffic (header names, Request-URIs, URI parameter texts such as `;ob`, `;lr`); repeating one message
exercises them as a registrar's steady REGISTER traffic does. Nothing that is unique per request or
per phone (Via branch, tags, Call-ID, CSeq, Contact) is memoised.

Usage: python bench/sip_codec.py [--runs N] [--seconds S]

Instruction counts (stable under load, unlike times): `--loop CASE MESSAGE N` only runs N calls
of one case (after 200 warm-up calls) and prints nothing; run it under callgrind with two values of
N and divide the difference of the totals by the difference of N, e.g.
    valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/sip_codec.py \
        --loop "full parse" REGISTER 1200     (and again with 200; "Collected" lines)
`--loop calibration x N` does the same for the calibration expression.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import timeit
from collections.abc import Callable

from raftpbx.transport.sip.message import parse_message

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
    ap.add_argument("--loop", nargs=3, metavar=("CASE", "MESSAGE", "N"), help="run N calls only (callgrind)")
    args = ap.parse_args()
    if args.loop:
        case, message, count = args.loop
        fn: Callable[[], object] = (
            (lambda: sum(range(1000))) if case == "calibration" else CASES[case](MESSAGES[message])
        )
        for _ in range(200):
            fn()
        for _ in range(int(count)):
            fn()
        return 0
    calib = (
        min(timeit.repeat("sum(range(1000))", number=2000, repeat=5, timer=time.process_time)) / 2000 * 1e6
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"Python {platform.python_version()} ({platform.python_implementation()}), one core")
    print(
        f"calibration: sum(range(1000)) = {calib:.1f} us   load average: {load:.2f}   runs: {args.runs} (median)"
    )
    print()
    names = list(MESSAGES)
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
    target = results[("full parse", "REGISTER")]
    print(f"REGISTER full parse: {target:,.0f}/s ({1e6 / target:.1f} us each); target 50,000/s")
    print(
        f"scaled to a core where the calibration takes {REFERENCE_CALIBRATION_US:.0f} us: "
        f"~{target * calib / REFERENCE_CALIBRATION_US:,.0f}/s (an estimate, not a measurement)"
    )
    return 0


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"(bench took {time.perf_counter() - start:.1f} s)", file=sys.stderr)
    raise SystemExit(code)
