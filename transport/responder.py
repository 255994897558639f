"""A minimal SIP responder (UAS) on the transaction layer: the real peer of the SIPp integration test.

Theory: `Responder` is a transaction user of `SipEndpoint`. Every new request arrives as `RequestReceived`
with its server transaction; the responder answers through that transaction, so retransmitted requests are
absorbed and answered with the same response by the transaction layer (RFC 3261 §17.2), never re-processed.

- OPTIONS -> 200 with Allow/Accept (§11.2).
- REGISTER -> digest authentication (RFC 3261 §22, RFC 7616/8760 via `transport.sip.digest`): no or
  foreign-realm credentials -> 401 with challenges; right digest -> 200 listing the request's contacts with
  their expiry (§10.3 step 8; bindings kept in memory, the real registrar is raftpbx/); right digest over an
  expired nonce -> 401 with stale=true; wrong digest or unknown user -> 403.
- CANCEL -> 200 if it matches an INVITE server transaction (§9.2), else 481.
- other methods -> 405 with Allow for methods SIP defines, 501 for the rest (§8.2.1); ACK is never answered.

The To tag of a response is derived from the request (Call-ID, From tag, CSeq), so a response regenerated for
a request the transaction layer no longer remembers (a duplicate over TCP, where timer J is zero) is still the
same answer.

Passwords: the configured password is turned into HA1s (MD5, SHA-256) at start and not kept; it is read
from an environment variable, never from the command line (where `ps` would show it), and never logged.

Run: `python -m raftpbx.transport.responder --listen 127.0.0.1:5070 --udp --tcp --user alice`
(password in RAFTPBX_RESPONDER_PASSWORD). It prints one `READY udp=HOST:PORT tcp=HOST:PORT` line on
stdout once bound, and on SIGTERM/SIGINT closes every socket, writes `--stats-file` (JSON) and exits 0.
Only loopback addresses are accepted for --listen: this is a test tool.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import ipaddress
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .endpoint import SipEndpoint
from .errors import TransportError
from .flow import Flow
from .sip.digest import (
    SUPPORTED_ALGORITHMS,
    AuthStatus,
    Credentials,
    compute_ha1,
    make_challenge,
    make_nonce,
    parse_authorization,
    verify,
)
from .sip.errors import SipError, SipParseError
from .sip.message import Request, Response, make_response
from .sip.transaction import Event, RequestReceived, ServerTransaction, Transmit
from .tcp import TcpConfig

__all__ = ["Responder", "ResponderConfig", "User", "main"]

log = logging.getLogger("raftpbx.transport.responder")

ALLOW = "OPTIONS, REGISTER, CANCEL, ACK"
# Methods SIP defines (RFC 3261 and extensions): answered 405; anything else 501 (§8.2.1, §21.5.6).
KNOWN_METHODS = frozenset(
    {
        "INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "SUBSCRIBE", "NOTIFY", "MESSAGE",
        "INFO", "PRACK", "UPDATE", "REFER", "PUBLISH",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class User:
    """A user the responder authenticates: HA1 per digest algorithm (the password is not kept)."""

    username: str
    ha1: dict[str, str]

    @classmethod
    def from_password(cls, username: str, realm: str, password: str) -> User:
        return cls(
            username, {alg: compute_ha1(username, realm, password, alg) for alg in SUPPORTED_ALGORITHMS}
        )


@dataclass(slots=True)
class ResponderConfig:
    """Realm, users and nonce parameters of the responder."""

    realm: str = "raftpbx.test"
    users: dict[str, User] = field(default_factory=dict)
    nonce_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    nonce_lifetime: float = 300.0
    default_expires: int = 3600
    max_expires: int = 7200
    # Digest algorithms offered in 401s, preferred first (RFC 8760 §2.4). SIPp 3.6 answers only the first
    # challenge and only knows MD5, so its test offers ("MD5",).
    algorithms: tuple[str, ...] = SUPPORTED_ALGORITHMS


class Responder:
    """The transaction user: answers each new request through its server transaction."""

    def __init__(self, config: ResponderConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock  # wall clock for nonces (epoch seconds, shared by every node of a cluster)
        self.bindings: dict[str, dict[str, float]] = {}
        self.requests: collections.Counter[str] = collections.Counter()
        self.responses: collections.Counter[int] = collections.Counter()

    # -- TransactionUser -------------------------------------------------------------------------------
    def on_event(self, endpoint: SipEndpoint, event: Event, flow: Flow | None) -> None:
        if not isinstance(event, RequestReceived) or event.transaction is None:
            return  # responses, timeouts, terminations, ACKs of 2xx: nothing to do for a UAS like this
        request = event.request
        self.requests[request.method] += 1
        if request.method == "ACK":
            return
        try:
            response = self.answer(endpoint, request)
        except SipError as exc:
            status = exc.status if isinstance(exc, SipParseError) else 400
            reason = exc.reason if isinstance(exc, SipParseError) else "Bad Request"
            response = self._response(request, status, reason)
        self._send(endpoint, event.transaction, response)

    def _send(self, endpoint: SipEndpoint, transaction: ServerTransaction, response: Response) -> None:
        if endpoint.respond(transaction, response):
            self.responses[response.status] += 1

    # -- decisions -------------------------------------------------------------------------------------
    def answer(self, endpoint: SipEndpoint, request: Request) -> Response:
        """The response to a new request (raises SipError for a malformed header the answer needs)."""
        method = request.method
        if method == "OPTIONS":
            return self._response(request, 200, headers=[("Allow", ALLOW), ("Accept", "application/sdp")])
        if method == "REGISTER":
            return self._register(request)
        if method == "CANCEL":
            target = endpoint.core.find_cancel_target(request)
            return self._response(request, 200 if target is not None else 481)
        if method in KNOWN_METHODS:
            return self._response(request, 405, headers=[("Allow", ALLOW)])
        return self._response(request, 501)

    def _response(
        self,
        request: Request,
        status: int,
        reason: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> Response:
        seed = f"{request.call_id}\x00{request.from_tag or ''}\x00{request.cseq}".encode(
            "utf-8", "surrogateescape"
        )
        to_tag = hashlib.sha256(seed).hexdigest()[:16]
        return make_response(
            request, status, reason, to_tag=to_tag, headers=[*headers, ("Server", "raftpbx-responder")]
        )

    def _challenge(self, request: Request, *, stale: bool = False) -> Response:
        nonce = make_nonce(self.config.nonce_secret, self.config.realm, self.clock())
        offered = {alg.upper() for alg in self.config.algorithms}
        values = [
            v
            for v in make_challenge(self.config.realm, nonce, stale=stale)
            if v.rpartition("algorithm=")[2].split(",")[0].strip().upper() in offered
        ]
        return self._response(request, 401, headers=[("WWW-Authenticate", v) for v in values])

    def _credentials(self, request: Request) -> Credentials | None:
        for value in request.headers.values("Authorization"):
            try:
                credentials = parse_authorization(value)
            except SipParseError:
                continue
            if credentials.realm == self.config.realm:
                return credentials
        return None

    def _register(self, request: Request) -> Response:
        credentials = self._credentials(request)
        if credentials is None:
            return self._challenge(request)
        user = self.config.users.get(credentials.username)
        ha1 = user.ha1.get(credentials.algorithm.upper()) if user is not None else None
        if user is None or ha1 is None:
            return self._response(request, 403)
        result = verify(
            credentials,
            method=request.method,
            ha1=ha1,
            expected_realm=self.config.realm,
            secret=self.config.nonce_secret,
            now=self.clock(),
            lifetime=self.config.nonce_lifetime,
            request_uri=request.uri,
        )
        if result.status is AuthStatus.STALE:
            return self._challenge(request, stale=True)
        if not result.ok:
            log.info("REGISTER for %s refused: %s", credentials.username, result.reason)
            return self._response(request, 403)
        return self._accept_register(request)

    def _accept_register(self, request: Request) -> Response:
        aor = str(request.to.uri)
        now = self.clock()
        bindings = self.bindings.setdefault(aor, {})
        header_expires = request.expires
        if request.contact_star:
            if header_expires != 0:
                return self._response(request, 400, "Contact * needs Expires: 0")  # §10.3 step 6
            bindings.clear()
        for contact in request.contacts:
            expires = contact.expires if contact.expires is not None else header_expires
            if expires is None:
                expires = self.config.default_expires
            expires = min(expires, self.config.max_expires)
            key = str(contact.uri)
            if expires == 0:
                bindings.pop(key, None)
            else:
                bindings[key] = now + expires
        for key in [k for k, until in bindings.items() if until <= now]:
            del bindings[key]
        contacts = [
            ("Contact", f"<{uri}>;expires={max(0, int(until - now))}") for uri, until in bindings.items()
        ]
        return self._response(
            request,
            200,
            headers=[*contacts, ("Date", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)))],
        )

    def stats(self, endpoint: SipEndpoint) -> dict[str, object]:
        """Counters for the test: requests by method, responses by status, transport counters."""
        return {
            "requests": dict(self.requests),
            "responses": {str(k): v for k, v in self.responses.items()},
            "bindings": sum(len(b) for b in self.bindings.values()),
            "transport": endpoint.counters.snapshot(),
        }


class _DropFirstFinals:
    """Test hook: lose the first transmission of the first `count` final responses over UDP, so the
    client retransmits and the server transaction answers the retransmission (§17.2.2)."""

    def __init__(self, count: int) -> None:
        self.remaining = count
        self.dropped = 0

    def __call__(self, transmit: Transmit) -> bool:
        message = transmit.message
        if (
            self.remaining > 0
            and isinstance(message, Response)
            and message.status >= 200
            and not transmit.retransmission
            and not transmit.reliable
        ):
            self.remaining -= 1
            self.dropped += 1
            return True
        return False


def _parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError("expected HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        if not ipaddress.ip_address(host).is_loopback:
            raise argparse.ArgumentTypeError("the responder is a test tool: listen on loopback only")
        number = int(port)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad listen address {text!r}") from exc
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError("port out of range")
    return host, number


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m raftpbx.transport.responder", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--listen", type=_parse_listen, default=("127.0.0.1", 5070), help="HOST:PORT (loopback)"
    )
    parser.add_argument("--udp", action="store_true", help="listen on UDP")
    parser.add_argument("--tcp", action="store_true", help="listen on TCP")
    parser.add_argument("--realm", default="raftpbx.test")
    parser.add_argument("--user", action="append", default=[], help="a user to authenticate (repeatable)")
    parser.add_argument(
        "--password-env",
        default="RAFTPBX_RESPONDER_PASSWORD",
        help="environment variable holding the users' password (default %(default)s)",
    )
    parser.add_argument("--nonce-lifetime", type=float, default=300.0)
    parser.add_argument(
        "--algorithms",
        default=",".join(SUPPORTED_ALGORITHMS),
        help="digest algorithms to offer, preferred first (default %(default)s)",
    )
    parser.add_argument("--idle-timeout", type=float, default=300.0, help="TCP idle timeout, seconds")
    parser.add_argument("--max-connections", type=int, default=1024)
    parser.add_argument("--stats-file", help="write JSON counters here on exit")
    parser.add_argument(
        "--drop-first-final", type=int, default=0, help="test hook: lose N first final responses (UDP)"
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if not args.udp and not args.tcp:
        args.udp = args.tcp = True
    return args


async def serve(args: argparse.Namespace, stats: dict[str, object]) -> int:
    """Run the responder until SIGTERM/SIGINT; fills `stats`, returns the exit status."""
    users: dict[str, User] = {}
    if args.user:
        password = os.environ.pop(args.password_env, None)
        if not password:
            log.error("users given but %s is empty", args.password_env)
            return 2
        for name in args.user:
            users[name] = User.from_password(name, args.realm, password)
        del password
    algorithms = tuple(a.strip().upper() for a in str(args.algorithms).split(",") if a.strip())
    unknown = [a for a in algorithms if a not in SUPPORTED_ALGORITHMS]
    if unknown or not algorithms:
        log.error("unsupported digest algorithms %s (known: %s)", unknown, ", ".join(SUPPORTED_ALGORITHMS))
        return 2
    config = ResponderConfig(
        realm=args.realm, users=users, nonce_lifetime=args.nonce_lifetime, algorithms=algorithms
    )
    responder = Responder(config)
    endpoint = SipEndpoint(
        responder, tcp_config=TcpConfig(idle_timeout=args.idle_timeout, max_connections=args.max_connections)
    )
    dropper = _DropFirstFinals(args.drop_first_final)
    if args.drop_first_final:
        endpoint.drop_filter = dropper
    host, port = args.listen
    try:
        await endpoint.start(host, port, udp=args.udp, tcp=args.tcp)
    except TransportError as exc:
        log.error("cannot listen: %s", exc)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parts = ["READY"]
    if endpoint.udp_address is not None:
        parts.append("udp={}:{}".format(*endpoint.udp_address))
    if endpoint.tcp_address is not None:
        parts.append("tcp={}:{}".format(*endpoint.tcp_address))
    print(" ".join(parts), flush=True)
    try:
        await stop.wait()
    finally:
        await endpoint.aclose()
        stats.update(responder.stats(endpoint))
        stats["dropped_by_test_hook"] = dropper.dropped
        log.info("stopped: %s", json.dumps(stats, sort_keys=True))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m raftpbx.transport.responder`."""
    args = _arguments(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stats: dict[str, object] = {}
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; the stdlib loop works too
        status = asyncio.run(serve(args, stats))
    else:
        status = uvloop.run(serve(args, stats))
    if args.stats_file:
        tmp = f"{args.stats_file}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(stats, fh, indent=1, sort_keys=True)
        os.replace(tmp, args.stats_file)
    return status


if __name__ == "__main__":
    sys.exit(main())
