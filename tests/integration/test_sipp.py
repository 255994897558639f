"""A real peer against the real responder process: SIPp (Debian `sip-tester`) sends OPTIONS and a digest
REGISTER over UDP and TCP to `python -m raftpbx.transport.responder`, and the answers must satisfy its
scenario checks (tests/integration/sipp/*.xml). Retransmissions: the responder loses its first final
responses on purpose (test hook), SIPp retransmits over UDP (RFC 3261 §17.1.2.2, T1 = 500 ms), and the
server transactions must answer the retransmissions from their state (§17.2.2) without the TU seeing the
request twice. A duplicate request sent with raw sockets must get a byte-identical answer.

Everything binds 127.0.0.1 and ephemeral ports; every process is bounded (-m, -timeout) and killed in teardown.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from raftpbx.transport.sip.digest import compute_ha1, make_authorization, parse_challenge
from raftpbx.transport.sip.message import Response, parse_message
from raftpbx.transport.sip.stream import StreamParser

pytestmark = pytest.mark.integration

SCENARIOS = Path(__file__).parent / "sipp"
SIPP = shutil.which("sipp")
PYTHON = sys.executable
HOST = "127.0.0.1"


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((HOST, port))
                except OSError:
                    continue
                return int(port)
    raise RuntimeError("no free port")


@dataclass
class ResponderProcess:
    proc: subprocess.Popen[str]
    port: int
    stats_file: Path
    stderr_file: Path
    stats: dict[str, object] = field(default_factory=dict)

    def stop(self) -> dict[str, object]:
        """SIGTERM, wait (bounded), and return the stats it wrote on exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
                raise AssertionError("responder did not stop on SIGTERM") from None
        assert self.proc.returncode == 0, self.stderr_file.read_text()
        self.stats = json.loads(self.stats_file.read_text())
        return self.stats


@contextlib.contextmanager
def responder(tmp_path: Path, password: str, *extra: str) -> Iterator[ResponderProcess]:
    """Run the responder on a free port until the block ends (always killed)."""
    port = free_port()
    stats_file = tmp_path / f"responder-{port}.json"
    stderr_file = tmp_path / f"responder-{port}.err"
    env = dict(os.environ, RAFTPBX_RESPONDER_PASSWORD=password)
    argv = [
        PYTHON, "-m", "raftpbx.transport.responder",
        "--listen", f"{HOST}:{port}", "--udp", "--tcp",
        "--user", "alice", "--algorithms", "MD5",
        "--stats-file", str(stats_file),
        *extra,
    ]  # fmt: skip
    with open(stderr_file, "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    rp = ResponderProcess(proc, port, stats_file, stderr_file)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 15
        line = ""
        while time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                line = proc.stdout.readline()
                break
        assert line.startswith("READY"), f"responder not ready: {line!r} {stderr_file.read_text()}"
        assert f"udp={HOST}:{port}" in line and f"tcp={HOST}:{port}" in line
        yield rp
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()


@dataclass
class SippRun:
    returncode: int
    successful: int
    failed: int
    errors: str
    screen: str


def write_users_csv(path: Path, user: str, password: str) -> Path:
    # SIPp's injection file: field0 the user, field1 the whole [authentication] keyword (SIPp 3.6 does not
    # expand [fieldN] inside it). Written per test with a random password; nothing committed holds one.
    with open(path, "w", newline="") as fh:
        fh.write("SEQUENTIAL\n")
        csv.writer(fh, delimiter=";", lineterminator="\n").writerow(
            [user, f"[authentication username={user} password={password}]", ""]
        )
    return path


def run_sipp(
    tmp_path: Path, scenario: str, transport: str, port: int, calls: int, users_csv: Path
) -> SippRun:
    """Run one bounded SIPp client and read its statistics file."""
    assert SIPP is not None
    tag = f"{scenario}-{transport}-{secrets.token_hex(3)}"
    stat_file = tmp_path / f"{tag}.stat.csv"
    error_file = tmp_path / f"{tag}.errors.log"
    argv = [
        SIPP, f"{HOST}:{port}",
        "-sf", str(SCENARIOS / f"{scenario}.xml"),
        "-inf", str(users_csv),
        "-t", transport,
        "-i", HOST, "-p", str(free_port()), "-mp", str(free_port()),
        "-m", str(calls), "-r", "50", "-l", "10",
        "-timeout", "30s", "-timeout_error",
        "-recv_timeout", "10000",
        "-max_recv_loops", "1000",
        "-nostdin",
        "-trace_err", "-error_file", str(error_file),
        "-trace_stat", "-stf", str(stat_file), "-fd", "1",
        "-trace_msg", "-message_file", str(tmp_path / f"{tag}.messages.log"),
        "-trace_logs", "-log_file", str(tmp_path / f"{tag}.actions.log"),
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    with open(stat_file, newline="") as fh:
        rows = list(csv.reader(fh, delimiter=";"))
    header, last = rows[0], rows[-1]
    # The first columns hold dates with embedded tabs; counters are looked up by name.
    stats = dict(zip(header, last, strict=False))
    errors = error_file.read_text(errors="replace") if error_file.exists() else ""
    return SippRun(
        proc.returncode,
        int(stats["SuccessfulCall(C)"]),
        int(stats["FailedCall(C)"]),
        errors,
        proc.stdout[-2000:],
    )


@pytest.fixture(autouse=True)
def _require_sipp() -> None:
    # House rule: no skipping because a dependency is missing. `make test` installs SIPp first.
    assert SIPP is not None, "sipp not found: run scripts/bootstrap.sh --test (Debian package sip-tester)"


@pytest.mark.parametrize("transport", ["u1", "t1"])
def test_sipp_options_and_digest_register(tmp_path: Path, transport: str) -> None:
    password = secrets.token_urlsafe(12)
    users = write_users_csv(tmp_path / "users.csv", "alice", password)
    calls = 5
    with responder(tmp_path, password) as rp:
        options = run_sipp(tmp_path, "options", transport, rp.port, calls, users)
        assert (options.returncode, options.successful, options.failed) == (0, calls, 0), options.errors
        register = run_sipp(tmp_path, "register", transport, rp.port, calls, users)
        assert (register.returncode, register.successful, register.failed) == (0, calls, 0), register.errors
        stats = rp.stop()
    assert stats["requests"] == {"OPTIONS": calls, "REGISTER": 2 * calls}
    assert stats["responses"] == {"200": 2 * calls, "401": calls}
    assert stats["bindings"] == 1  # every call registered the same contact
    counters = stats["transport"]
    assert isinstance(counters, dict)
    assert counters["callback_errors"] == 0 and counters["timer_errors"] == 0
    assert counters["bad_requests_answered"] == 0 and counters["bad_requests_dropped"] == 0
    if transport == "t1":
        # One connection per SIPp run (-t t1), every response on the connection its request came on.
        assert counters["tcp_accepted"] == 2 and counters["tcp_connected"] == 0
        assert counters["stream_messages_sent"] == 3 * calls
    else:
        assert counters["datagrams_sent"] == 3 * calls


def test_sipp_wrong_password_is_refused(tmp_path: Path) -> None:
    users = write_users_csv(tmp_path / "users.csv", "alice", "not-the-password")
    with responder(tmp_path, secrets.token_urlsafe(12)) as rp:
        run = run_sipp(tmp_path, "register", "u1", rp.port, 2, users)
        stats = rp.stop()
    assert run.returncode != 0 and run.successful == 0 and run.failed == 2
    assert "403" in run.errors
    # SIPp ends a call that got an unexpected answer with a BYE (its default behaviour): 405 here.
    assert stats["responses"] == {"401": 2, "403": 2, "405": 2}
    assert stats["requests"] == {"REGISTER": 4, "BYE": 2}
    assert stats["bindings"] == 0


def test_sipp_retransmissions_answered_from_server_transactions(tmp_path: Path) -> None:
    """The responder loses its first 3 final responses (the 401 and 200 of the first REGISTER, the 200
    of the first OPTIONS); SIPp retransmits after T1 and gets them from the server transactions."""
    password = secrets.token_urlsafe(12)
    users = write_users_csv(tmp_path / "users.csv", "alice", password)
    with responder(tmp_path, password, "--drop-first-final", "3") as rp:
        register = run_sipp(tmp_path, "register", "u1", rp.port, 2, users)
        options = run_sipp(tmp_path, "options", "u1", rp.port, 2, users)
        stats = rp.stop()
    assert (register.returncode, register.successful, register.failed) == (0, 2, 0), register.errors
    assert (options.returncode, options.successful, options.failed) == (0, 2, 0), options.errors
    assert stats["dropped_by_test_hook"] == 3
    counters = stats["transport"]
    assert isinstance(counters, dict)
    # Each lost response cost one retransmission, absorbed by its transaction (the TU saw it once).
    assert counters["requests_absorbed"] == 3
    assert stats["requests"] == {"REGISTER": 4, "OPTIONS": 2}
    assert counters["requests_received"] == 4 + 2 + 3


def _options(port: int, local_port: int, transport: str, branch: str) -> bytes:
    return (
        f"OPTIONS sip:service@{HOST}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} {HOST}:{local_port};branch={branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:probe@{HOST}>;tag=dup1\r\n"
        f"To: <sip:service@{HOST}>\r\n"
        f"Call-ID: {branch}@{HOST}\r\n"
        "CSeq: 7 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def test_duplicate_request_gets_identical_response_udp_and_tcp(tmp_path: Path) -> None:
    with responder(tmp_path, secrets.token_urlsafe(12)) as rp:
        # UDP: the second copy (same branch) is a retransmission absorbed by the server transaction.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, 0))
            udp.settimeout(5)
            udp_port = udp.getsockname()[1]
            request = _options(rp.port, udp_port, "UDP", "z9hG4bK-dup-udp")
            answers = []
            for _ in range(2):
                udp.sendto(request, (HOST, rp.port))
                answers.append(udp.recvfrom(65535)[0])
        assert answers[0] == answers[1]
        first = parse_message(answers[0])
        assert isinstance(first, Response) and first.status == 200
        assert first.top_via.received == HOST and first.top_via.rport == udp_port
        # TCP: both copies on one connection; the answers are identical too (the To tag is derived from
        # the request, and timer J is zero on reliable transports, RFC 3261 §17.2.2).
        with socket.create_connection((HOST, rp.port), timeout=5) as tcp:
            request = _options(rp.port, tcp.getsockname()[1], "TCP", "z9hG4bK-dup-tcp")
            tcp.sendall(request + request)
            parser = StreamParser()
            got: list[bytes] = []
            deadline = time.monotonic() + 5
            while len(got) < 2 and time.monotonic() < deadline:
                parser.feed(tcp.recv(65535))
                while (item := parser.next_message()) is not None:
                    assert isinstance(item, Response)
                    got.append(item.to_bytes())
        assert len(got) == 2 and got[0] == got[1]
        # Garbage over UDP: a request-looking datagram with a broken header gets a stateless 400;
        # garbage that is not a request is dropped and counted; the responder keeps answering.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, 0))
            udp.settimeout(5)
            bad = _options(rp.port, udp.getsockname()[1], "UDP", "z9hG4bK-bad").replace(
                b"Max-Forwards: 70", b"Max-Forwards: seventy"
            )
            udp.sendto(bad, (HOST, rp.port))
            reply = parse_message(udp.recvfrom(65535)[0])
            assert isinstance(reply, Response) and reply.status == 400
            udp.sendto(b"\x00\xff\xfe garbage", (HOST, rp.port))
            udp.sendto(b"SIP/2.0 200 OK\r\nbroken\r\n\r\n", (HOST, rp.port))
            udp.sendto(_options(rp.port, udp.getsockname()[1], "UDP", "z9hG4bK-after"), (HOST, rp.port))
            after = parse_message(udp.recvfrom(65535)[0])
            assert isinstance(after, Response) and after.status == 200 and after.branch == "z9hG4bK-after"
        stats = rp.stop()
    counters = stats["transport"]
    assert isinstance(counters, dict)
    assert counters["requests_absorbed"] == 1  # the UDP duplicate
    assert counters["bad_requests_answered"] == 1
    assert counters["bad_requests_dropped"] == 1 and counters["bad_responses_dropped"] == 1
    assert stats["requests"] == {"OPTIONS": 4}  # UDP once, TCP twice, the one after the garbage
    assert counters["callback_errors"] == 0


def test_digest_challenge_offers_sha256_first_then_md5_by_default(tmp_path: Path) -> None:
    """Without --algorithms the 401 carries one challenge per algorithm, SHA-256 first (RFC 8760 §2.4),
    and a SHA-256 answer computed by our own client code is accepted."""
    password = secrets.token_urlsafe(12)
    port = free_port()
    stats_file = tmp_path / "r.json"
    env = dict(os.environ, RAFTPBX_RESPONDER_PASSWORD=password)
    argv = [PYTHON, "-m", "raftpbx.transport.responder", "--listen", f"{HOST}:{port}", "--udp", "--user", "alice",
            "--stats-file", str(stats_file)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        assert ready and proc.stdout.readline().startswith("READY")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, 0))
            udp.settimeout(5)
            local = udp.getsockname()[1]

            def register(branch: str, cseq: int, authorization: str | None) -> Response:
                head = (
                    f"REGISTER sip:{HOST}:{port} SIP/2.0\r\n"
                    f"Via: SIP/2.0/UDP {HOST}:{local};branch={branch};rport\r\n"
                    "Max-Forwards: 70\r\n"
                    f"From: <sip:alice@{HOST}>;tag=r1\r\nTo: <sip:alice@{HOST}>\r\n"
                    f"Call-ID: reg-sha@{HOST}\r\nCSeq: {cseq} REGISTER\r\n"
                    f"Contact: <sip:alice@{HOST}:{local}>\r\nExpires: 60\r\n"
                )
                if authorization is not None:
                    head += f"Authorization: {authorization}\r\n"
                udp.sendto((head + "Content-Length: 0\r\n\r\n").encode(), (HOST, port))
                message = parse_message(udp.recvfrom(65535)[0])
                assert isinstance(message, Response)
                return message

            challenge_response = register("z9hG4bK-sha-1", 1, None)
            assert challenge_response.status == 401
            challenges = [parse_challenge(v) for v in challenge_response.headers.values("WWW-Authenticate")]
            assert [c.algorithm.upper() for c in challenges] == ["SHA-256", "MD5"]
            authorization = make_authorization(
                username="alice",
                ha1=compute_ha1("alice", challenges[0].realm, password, "SHA-256"),
                challenge=challenges[0],
                method="REGISTER",
                uri=f"sip:{HOST}:{port}",
                cnonce=secrets.token_hex(8),
            )
            ok = register("z9hG4bK-sha-2", 2, authorization)
            assert ok.status == 200 and ok.contacts and ok.contacts[0].expires == 60
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == 0
    assert password not in stats_file.read_text()
