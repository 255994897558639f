"""SIP digest authentication (RFC 3261 §22, RFC 7616, RFC 8760) as pure functions.

Theory of operation
-------------------
A server challenges a request with `make_challenge` (a 401 carries the values in WWW-Authenticate,
a 407 in Proxy-Authenticate, RFC 3261 §22.2/§22.3). The phone answers with an Authorization (or
Proxy-Authorization) header, which `parse_authorization` turns into `Credentials`; `verify` checks
them against the HA1 the cluster stores for that user (the password itself is never stored, only
`compute_ha1` of it, one per algorithm).

Nonces are stateless so that any node of the cluster accepts a nonce issued by any other: a nonce is
`<timestamp hex>.<base64url HMAC-SHA256(secret, label, realm, timestamp)>`. Nothing about a nonce's use
is remembered, so a nonce can be replayed within its lifetime (as with any stateless nonce; nc is not
tracked, RFC 7616 §5.2 makes that tracking optional). `check_nonce` keeps a bounded cache of the
timestamps of nonces whose MAC verified (only those), so a nonce seen again skips the MAC check; whether
it is still fresh is decided against `now` every time. Time always comes in as `now` (epoch seconds,
float); nothing here reads a clock. It must be wall-clock time (not a per-process monotonic clock),
because a nonce made on one node is checked against the clock of another.

Invariants
----------
- Every comparison of a secret-derived value uses `hmac.compare_digest` (on bytes, so non-ASCII
  input cannot raise).
- `parse_authorization` and `parse_challenge` return a value or raise `SipParseError(400, ...)`;
  no other exception escapes for any input string.
- `verify` never raises for any `Credentials`; it answers OK, STALE or FAILED (with a reason that
  never contains a secret).

Deliberate choices and deviations
---------------------------------
- Algorithms: "MD5" and "SHA-256" only (RFC 8760 §2.1 also allows SHA-512-256, which no phone we
  target sends). The "-sess" variants are rejected: we never offer them in a challenge, so a client
  that uses them answers a challenge we did not make (RFC 7616 §3.4.2).
- qop: only "auth" (there is no message body here for "auth-int"). Credentials without qop are
  accepted in the RFC 2069 form response = H(HA1:nonce:HA2) (RFC 2617 §3.2.2.1, RFC 3261 §22.4 keeps
  it for backward compatibility) because old phones still send it; such a request then carries
  neither cnonce nor nc (RFC 7616 §3.4: they MUST NOT be sent without qop).
- A nonce whose MAC is right but whose timestamp is older than `lifetime` is STALE; so is an authentic
  nonce dated more than `lifetime` in the future (a node with a skewed clock made it). The client
  then retries with a fresh nonce without asking its user (stale=true, RFC 7616 §3.3), and only if
  its digest was right for the stale nonce (RFC 7616 §3.3: stale only when the digest is valid).
"""

from __future__ import annotations

import base64
import enum
import functools
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .errors import SipParseError, SipValueError

__all__ = [
    "SUPPORTED_ALGORITHMS",
    "AuthResult",
    "AuthStatus",
    "Challenge",
    "Credentials",
    "NonceStatus",
    "challenges_for",
    "check_nonce",
    "compute_ha1",
    "compute_response",
    "make_authorization",
    "make_challenge",
    "make_nonce",
    "parse_authorization",
    "parse_challenge",
    "verify",
]

# RFC 8760 §2.4: a server that offers several algorithms lists the preferred one first.
SUPPORTED_ALGORITHMS: tuple[str, ...] = ("SHA-256", "MD5")

_NONCE_LABEL = b"raftpbx digest nonce v1\x00"
_MAX_NONCE_LEN = 96
_MAX_TS_HEX = 16
_NONCE_RE = re.compile(r"([0-9a-f]{1,16})\.([A-Za-z0-9_-]{43})", re.ASCII)
_NC_RE = re.compile(r"[0-9a-fA-F]{8}", re.ASCII)
_LWS = " \t\r\n"
# RFC 3261 §25.1: token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~")
_SCHEME_RE = re.compile(r"[ \t\r\n]*([A-Za-z0-9.!%*_+`'~-]+)")
_SEPARATORS_RE = re.compile(r"[ \t\r\n,]+")
# name LWS "=" LWS ( quoted-string / token ) LWS. qdtext: anything but '"', '\\' and control characters
# other than HTAB; quoted-pair = "\\" (%x00-09 / %x0B-0C / %x0E-7F) (RFC 3261 §25.1). The quoted-string
# is written as the "unrolled loop" qdtext* (quoted-pair qdtext*)*: the same language as (qdtext /
# quoted-pair)*, but a run of qdtext is one character-class scan instead of one alternation per character
# (a 50-character nonce took ~20 us the other way).
_QDTEXT = r'[^"\\\x00-\x08\x0a-\x1f\x7f]*'
_PARAM_RE = re.compile(
    r"([A-Za-z0-9.!%*_+`'~-]+)[ \t\r\n]*=[ \t\r\n]*"
    rf'(?:"({_QDTEXT}(?:\\[\x00-\x09\x0b\x0c\x0e-\x7f]{_QDTEXT})*)"|([A-Za-z0-9.!%*_+`\'~-]+))'
    r"[ \t\r\n]*"
)
# The whole parameter list at once (the common case): `_PARAMS_RE` accepts exactly what the loop in
# `_parse_params` accepts (a parameter must end at ',' or at the end; separators are LWS and empty list
# elements), with possessive quantifiers, so nothing backtracks; `_PARAM_RE.findall` then yields the
# (name, quoted, token) triples in one call. Anything it refuses goes through the loop, which names the
# error.
_TOKEN = r"[A-Za-z0-9.!%*_+`'~-]++"
_QDTEXT_P = r'[^"\\\x00-\x08\x0a-\x1f\x7f]*+'
_PARAM_P = (
    rf"{_TOKEN}[ \t\r\n]*+=[ \t\r\n]*+"
    rf'(?:"{_QDTEXT_P}(?:\\[\x00-\x09\x0b\x0c\x0e-\x7f]{_QDTEXT_P})*+"|{_TOKEN})'
    r"[ \t\r\n]*+"
)
_PARAMS_RE = re.compile(rf"(?:[ \t\r\n,]*+{_PARAM_P}(?=,|\Z))*+[ \t\r\n,]*+")
_QUOTED_PAIR_RE = re.compile(r"\\(.)", re.DOTALL)
_MAX_HEADER_LEN = 8192
_NONCE_MAC_CACHE = 256  # distinct (secret, realm, second) MACs remembered
VERIFIED_NONCE_CACHE = 4096  # distinct authentic nonces whose timestamp is remembered (check_nonce)
_HA2_CACHE = 1024  # distinct (algorithm, method, digest-uri) HA2s remembered


def _enc(text: str) -> bytes:
    """UTF-8 bytes of `text`; lone surrogates (bytes a lenient decoder kept) map back, never raise."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_HASHES: dict[str, Callable[[bytes], str]] = {"MD5": _md5, "SHA-256": _sha256}


def _hash_for(algorithm: str) -> Callable[[bytes], str]:
    try:
        return _HASHES[algorithm.upper()]
    except KeyError:
        raise SipValueError(f"unsupported digest algorithm {algorithm!r}") from None


def _canonical_algorithm(algorithm: str) -> str | None:
    upper = algorithm.upper()
    return upper if upper in _HASHES else None


# --------------------------------------------------------------------------------------------------
# Hashes (RFC 7616 §3.4.1-§3.4.3)


def compute_ha1(username: str, realm: str, password: str, algorithm: str) -> str:
    """HA1 = H(username:realm:password) in lowercase hex, for "MD5" or "SHA-256" (RFC 7616 §3.4.2).

    Raises SipValueError for another algorithm.
    """
    h = _hash_for(algorithm)
    return h(_enc(f"{username}:{realm}:{password}"))


@functools.lru_cache(maxsize=_HA2_CACHE)
def _ha2(algorithm: str, method: str, uri: str) -> str:
    """HA2 = H(method:digest-uri), memoised: phones send the same few (method, uri) pairs again and again."""
    return _HASHES[algorithm](_enc(f"{method}:{uri}"))


def compute_response(
    ha1: str,
    *,
    method: str,
    uri: str,
    nonce: str,
    algorithm: str,
    qop: str | None = None,
    nc: str | None = None,
    cnonce: str | None = None,
) -> str:
    """The request-digest for qop=auth (RFC 7616 §3.4.1) or, with qop None, the RFC 2069 form.

    HA2 = H(method:digest-uri) (RFC 3261 §22.4, RFC 7616 §3.4.3);
    with qop: KD(HA1, nonce:nc:cnonce:qop:HA2); without: KD(HA1, nonce:HA2), KD(s, d) = H(s:d).
    Raises SipValueError for an unsupported algorithm or qop, or qop without nc/cnonce.
    """
    h = _hash_for(algorithm)
    ha2 = _ha2(algorithm.upper(), method, uri)
    if qop is None:
        return h(_enc(f"{ha1}:{nonce}:{ha2}"))
    if qop != "auth":
        raise SipValueError(f"unsupported qop {qop!r}")
    if nc is None or cnonce is None:
        raise SipValueError("qop=auth needs nc and cnonce")
    return h(_enc(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}"))


# --------------------------------------------------------------------------------------------------
# Stateless nonces (DESIGN decision 5: any node accepts a nonce any node issued)


class NonceStatus(enum.Enum):
    """Outcome of `check_nonce`."""

    VALID = "valid"
    STALE = "stale"  # made under our secret, but outside its lifetime
    INVALID = "invalid"  # forged, tampered with or malformed


@functools.lru_cache(maxsize=_NONCE_MAC_CACHE)
def _nonce_mac(secret: bytes, realm: str, ts_hex: str) -> str:
    # Memoised: a pure function of its arguments, and a node issues one nonce per second (challenges are
    # cached for the second), so nearly every check under load is of a nonce seen a moment ago. The cache
    # holds MACs only (what any 401 publishes), bounded; a miss costs what the computation always did.
    msg = _NONCE_LABEL + _enc(realm) + b"\x00" + ts_hex.encode("ascii")
    mac = hmac.new(secret, msg, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


def make_nonce(secret: bytes, realm: str, now: float) -> str:
    """A nonce stamped with `now` (whole seconds) and authenticated by HMAC-SHA256 under `secret`.

    The result uses only [0-9a-f.A-Za-z_-], so it needs no escaping inside a quoted-string.
    """
    if now < 0:
        raise SipValueError("now must be a non-negative epoch time")
    ts_hex = format(int(now), "x")
    if len(ts_hex) > _MAX_TS_HEX:
        raise SipValueError("now is out of range")
    return f"{ts_hex}.{_nonce_mac(secret, realm, ts_hex)}"


# (secret, realm, nonce) -> the nonce's timestamp, for nonces whose MAC verified (only those enter), in
# insertion order; bounded by VERIFIED_NONCE_CACHE (the oldest entry leaves first). A node issues one nonce
# per second and phones answer with the nonce they were just given, so nearly every check under load is of
# a nonce already verified: it then costs one dict lookup instead of the pattern match, the MAC lookup and
# the timing-safe comparison. The age is still checked against `now` on every call. Holds nothing secret
# beyond what a 401 publishes (the nonce); the key includes the secret so that two keys never mix.
_verified_nonces: dict[tuple[bytes, str, str], int] = {}


def check_nonce(secret: bytes, realm: str, nonce: str, now: float, lifetime: float) -> NonceStatus:
    """Whether `nonce` was made by `make_nonce(secret, realm, t)` with |now - t| <= lifetime.

    INVALID if it was not made under this secret and realm (or is malformed), STALE if it was but is
    older than `lifetime` (or dated more than `lifetime` ahead), VALID otherwise. An authentic nonce's
    timestamp is remembered per nonce value (bounded, see `_verified_nonces`); a forged one never is.
    """
    key = (secret, realm, nonce)
    ts = _verified_nonces.get(key)
    if ts is None:
        if len(nonce) > _MAX_NONCE_LEN:
            return NonceStatus.INVALID
        match = _NONCE_RE.fullmatch(nonce)
        if match is None:
            return NonceStatus.INVALID
        ts_hex, mac = match.group(1), match.group(2)
        expected = _nonce_mac(secret, realm, ts_hex)
        if not hmac.compare_digest(expected.encode("ascii"), mac.encode("ascii")):
            return NonceStatus.INVALID
        ts = int(ts_hex, 16)
        if len(_verified_nonces) >= VERIFIED_NONCE_CACHE:  # the oldest leaves (event loop thread only)
            del _verified_nonces[next(iter(_verified_nonces))]
        _verified_nonces[key] = ts
    age = now - ts
    if not -lifetime <= age <= lifetime:
        return NonceStatus.STALE
    return NonceStatus.VALID


# --------------------------------------------------------------------------------------------------
# Header values


def _quote(value: str) -> str:
    """A quoted-string (RFC 3261 §25.1): backslash-escape '\\' and '"'; CR/LF are refused."""
    if "\r" in value or "\n" in value:
        raise SipValueError("CR/LF cannot appear in a quoted-string")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def make_challenge(realm: str, nonce: str, *, stale: bool = False, opaque: str | None = None) -> list[str]:
    """WWW-Authenticate / Proxy-Authenticate values: one challenge per algorithm, SHA-256 first.

    RFC 8760 §2.4: a server offering several algorithms sends one challenge for each, the preferred
    first; qop="auth" (RFC 7616 §3.3). stale=true tells a client whose digest was right that only the
    nonce was too old (RFC 7616 §3.3).
    """
    values = []
    for algorithm in SUPPORTED_ALGORITHMS:
        parts = [f"realm={_quote(realm)}", f"nonce={_quote(nonce)}"]
        if opaque is not None:
            parts.append(f"opaque={_quote(opaque)}")
        if stale:
            parts.append("stale=true")
        parts.append(f"algorithm={algorithm}")
        parts.append('qop="auth"')
        values.append("Digest " + ", ".join(parts))
    return values


@dataclass(frozen=True, slots=True)
class Credentials:
    """The Digest parameters of an Authorization / Proxy-Authorization value (RFC 3261 §25.1)."""

    username: str
    realm: str
    nonce: str
    uri: str
    response: str
    algorithm: str = "MD5"  # RFC 7616 §3.4: absent means MD5
    cnonce: str | None = None
    nc: str | None = None
    qop: str | None = None
    opaque: str | None = None
    scheme: str = "Digest"
    extra: tuple[tuple[str, str], ...] = ()  # other auth-params, names lowercased, in order


class _CredentialsBuilder:
    """`Credentials` built fast: the same slots, plain stores in `__init__`, then the instance becomes a
    `Credentials` by `__class__` assignment (allowed between identical layouts). A frozen dataclass's own
    `__init__` goes through object.__setattr__ per field (~1,200 instructions each on CPython 3.11, 13,000
    for these 11); the object is the same, equal and just as frozen (test_digest_nonce_cache.py)."""

    __slots__ = Credentials.__slots__

    def __init__(
        self,
        username: str,
        realm: str,
        nonce: str,
        uri: str,
        response: str,
        algorithm: str,
        cnonce: str | None,
        nc: str | None,
        qop: str | None,
        opaque: str | None,
        extra: tuple[tuple[str, str], ...],
    ) -> None:
        self.username = username
        self.realm = realm
        self.nonce = nonce
        self.uri = uri
        self.response = response
        self.algorithm = algorithm
        self.cnonce = cnonce
        self.nc = nc
        self.qop = qop
        self.opaque = opaque
        self.scheme = "Digest"
        self.extra = extra


def _class_swap_works() -> bool:
    """Whether a `_CredentialsBuilder` can become a `Credentials` here: yes on the interpreter; no when mypyc
    compiled this module (setup.py), both being native classes of different layouts. There the compiled
    `Credentials(...)` stores its fields directly and is the fast way anyway."""
    probe = _CredentialsBuilder("", "", "", "", "", "MD5", None, None, None, None, ())
    try:
        probe.__class__ = Credentials  # type: ignore[assignment]
    except TypeError:
        return False
    return True


_CLASS_SWAP = _class_swap_works()


@dataclass(frozen=True, slots=True)
class Challenge:
    """The Digest parameters of a WWW-Authenticate / Proxy-Authenticate value (client side)."""

    realm: str
    nonce: str
    algorithm: str = "MD5"
    qop: tuple[str, ...] = ()  # the qop-options offered, lowercased; empty = RFC 2069 server
    opaque: str | None = None
    stale: bool = False
    domain: str | None = None


def _bad(reason: str) -> SipParseError:
    return SipParseError(400, reason)


def _parse_params(value: str, what: str) -> dict[str, str]:
    """Parse `Digest name=value, name="quoted", ...` into lowercased names -> unquoted values.

    Tolerant of LWS around '=' and ',', of empty list elements and of the case of names and scheme;
    strict about everything else (duplicate names, unterminated quotes, bad tokens: 400).
    """
    if len(value) > _MAX_HEADER_LEN:
        raise _bad(f"{what} too long")
    m = _SCHEME_RE.match(value)
    if m is None:
        raise _bad(f"{what}: expected a scheme")
    if m.group(1).lower() != "digest":
        raise _bad(f"{what}: unsupported scheme {m.group(1)[:32]!r}")
    n = len(value)
    i = m.end()
    if i >= n or value[i] not in _LWS:
        raise _bad(f"{what}: no parameters")
    params: dict[str, str] = {}
    if _PARAMS_RE.fullmatch(value, i) is not None:
        for name, quoted, token in _PARAM_RE.findall(value, i):
            key = name.lower()
            if key in params:
                raise _bad(f"{what}: duplicate parameter {key[:32]!r}")
            params[key] = token or (_QUOTED_PAIR_RE.sub(r"\1", quoted) if "\\" in quoted else quoted)
        return params
    while True:
        sep = _SEPARATORS_RE.match(value, i)  # LWS and empty list elements (RFC 7230 §7 tolerance)
        i = sep.end() if sep is not None else i
        if i >= n:
            break
        m = _PARAM_RE.match(value, i)
        if m is None:
            raise _bad(f"{what}: malformed parameter at offset {i}")
        name, quoted, token = m.group(1), m.group(2), m.group(3)
        key = name.lower()
        if key in params:
            raise _bad(f"{what}: duplicate parameter {key[:32]!r}")
        if quoted is None:
            params[key] = token
        else:
            params[key] = _QUOTED_PAIR_RE.sub(r"\1", quoted) if "\\" in quoted else quoted
        i = m.end()
        if i < n and value[i] != ",":
            raise _bad(f"{what}: expected ',' at offset {i}")
    return params


_CREDENTIAL_FIELDS = frozenset(
    ("username", "realm", "nonce", "uri", "response", "algorithm", "cnonce", "nc", "qop", "opaque")
)


def parse_authorization(value: str) -> Credentials:
    """Parse an Authorization / Proxy-Authorization header value with the Digest scheme.

    Raises SipParseError(400, reason) if it is malformed, not Digest, or lacks username, realm,
    nonce, uri or response (RFC 3261 §25.1 digest-response; RFC 7616 §3.4).
    """
    params = _parse_params(value, "Authorization")
    for required in ("username", "realm", "nonce", "uri", "response"):
        if required not in params:
            raise _bad(f"Authorization: missing {required}")
    extra = (
        ()
        if len(params) <= 5 or params.keys() <= _CREDENTIAL_FIELDS  # (a set test in C, no generator)
        else tuple((k, v) for k, v in params.items() if k not in _CREDENTIAL_FIELDS)
    )
    get = params.get
    fields = (
        params["username"],
        params["realm"],
        params["nonce"],
        params["uri"],
        params["response"],
        get("algorithm", "MD5"),
        get("cnonce"),
        get("nc"),
        get("qop"),
        get("opaque"),
    )
    if not _CLASS_SWAP:
        return Credentials(*fields, "Digest", extra)
    credentials = _CredentialsBuilder(*fields, extra)
    credentials.__class__ = Credentials  # type: ignore[assignment]
    return credentials  # type: ignore[return-value]


def parse_challenge(value: str) -> Challenge:
    """Parse a WWW-Authenticate / Proxy-Authenticate value with the Digest scheme (client side).

    Raises SipParseError(400, reason) if it is malformed, not Digest, or lacks realm or nonce.
    """
    params = _parse_params(value, "challenge")
    for required in ("realm", "nonce"):
        if required not in params:
            raise _bad(f"challenge: missing {required}")
    qop = tuple(q.strip(_LWS).lower() for q in params["qop"].split(",")) if "qop" in params else ()
    return Challenge(
        realm=params["realm"],
        nonce=params["nonce"],
        algorithm=params.get("algorithm", "MD5"),
        qop=tuple(q for q in qop if q),
        opaque=params.get("opaque"),
        stale=params.get("stale", "").lower() == "true",
        domain=params.get("domain"),
    )


def make_authorization(
    *,
    username: str,
    ha1: str,
    challenge: Challenge,
    method: str,
    uri: str,
    cnonce: str,
    nc: int = 1,
) -> str:
    """An Authorization value answering `challenge` (client side, e.g. a trunk registering upstream).

    Uses qop=auth when offered, else the RFC 2069 form. `ha1` must be for `challenge.algorithm`.
    Raises SipValueError if the challenge's algorithm is not supported.
    """
    algorithm = _canonical_algorithm(challenge.algorithm)
    if algorithm is None:
        raise SipValueError(f"unsupported digest algorithm {challenge.algorithm!r}")
    parts = [
        f"username={_quote(username)}",
        f"realm={_quote(challenge.realm)}",
        f"nonce={_quote(challenge.nonce)}",
        f"uri={_quote(uri)}",
    ]
    if "auth" in challenge.qop:
        nc_hex = format(nc, "08x")
        response = compute_response(
            ha1,
            method=method,
            uri=uri,
            nonce=challenge.nonce,
            algorithm=algorithm,
            qop="auth",
            nc=nc_hex,
            cnonce=cnonce,
        )
        parts.append(f"response={_quote(response)}")
        parts += [f"algorithm={algorithm}", f"cnonce={_quote(cnonce)}", "qop=auth", f"nc={nc_hex}"]
    else:
        response = compute_response(ha1, method=method, uri=uri, nonce=challenge.nonce, algorithm=algorithm)
        parts.append(f"response={_quote(response)}")
        parts.append(f"algorithm={algorithm}")
    if challenge.opaque is not None:
        parts.append(f"opaque={_quote(challenge.opaque)}")
    return "Digest " + ", ".join(parts)


# --------------------------------------------------------------------------------------------------
# Verification (server side)


class AuthStatus(enum.Enum):
    """Outcome of `verify`."""

    OK = "ok"
    STALE = "stale"  # right digest over an authentic but expired nonce: re-challenge with stale=true
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class AuthResult:
    """What `verify` decided, and why (the reason is for logs; it never holds a secret)."""

    status: AuthStatus
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status is AuthStatus.OK


def _failed(reason: str) -> AuthResult:
    return AuthResult(AuthStatus.FAILED, reason)


_OK = AuthResult(AuthStatus.OK)  # immutable: one for every success
_STALE = AuthResult(AuthStatus.STALE, "nonce expired")


def verify(
    credentials: Credentials,
    *,
    method: str,
    ha1: str,
    expected_realm: str,
    secret: bytes,
    now: float,
    lifetime: float,
    request_uri: str | None = None,
) -> AuthResult:
    """Check a Digest answer against the stored `ha1` (which must be for `credentials.algorithm`).

    Checks, in order: realm (RFC 3261 §22.1), algorithm, qop/nc/cnonce consistency (RFC 7616 §3.4),
    that the nonce is ours (`check_nonce`), optionally that digest-uri equals the Request-URI
    (`request_uri`, RFC 7616 §3.4.6), then the response, timing-safe. STALE only when the nonce is
    authentic but expired and the response is right for it (RFC 7616 §3.3).
    """
    if credentials.scheme.lower() != "digest":
        return _failed("not a Digest credential")
    if credentials.realm != expected_realm:
        return _failed("realm mismatch")
    algorithm = _canonical_algorithm(credentials.algorithm)
    if algorithm is None:
        return _failed("unsupported algorithm")
    qop = credentials.qop
    if qop is not None:
        if qop.lower() != "auth":
            return _failed("unsupported qop")
        qop = "auth"
        if credentials.nc is None or _NC_RE.fullmatch(credentials.nc) is None:
            return _failed("qop=auth without a valid nc")
        if not credentials.cnonce:
            return _failed("qop=auth without cnonce")
    elif credentials.nc is not None or credentials.cnonce is not None:
        return _failed("nc or cnonce without qop")
    if request_uri is not None and credentials.uri != request_uri:
        return _failed("digest-uri does not match the Request-URI")
    nonce_status = check_nonce(secret, expected_realm, credentials.nonce, now, lifetime)
    if nonce_status is NonceStatus.INVALID:
        return _failed("nonce not issued by this cluster")
    expected = compute_response(
        ha1.lower(),
        method=method,
        uri=credentials.uri,
        nonce=credentials.nonce,
        algorithm=algorithm,
        qop=qop,
        nc=credentials.nc,
        cnonce=credentials.cnonce,
    )
    got = _enc(credentials.response.lower())
    if not hmac.compare_digest(expected.encode("ascii"), got):
        return _failed("wrong response")
    if nonce_status is NonceStatus.STALE:
        return _STALE
    return _OK


def challenges_for(values: Iterable[str]) -> list[Challenge]:
    """Parse every Digest challenge among `values`, skipping the malformed and the other schemes."""
    out = []
    for value in values:
        try:
            out.append(parse_challenge(value))
        except SipParseError:
            continue
    return out
