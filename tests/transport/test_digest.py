"""Digest authentication: RFC vectors, stateless nonces across nodes, verification, parser robustness."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from raftpbx.transport.sip.digest import (
    AuthStatus,
    Challenge,
    Credentials,
    NonceStatus,
    check_nonce,
    compute_ha1,
    compute_response,
    make_authorization,
    make_challenge,
    make_nonce,
    parse_authorization,
    parse_challenge,
    verify,
)
from raftpbx.transport.sip.errors import SipParseError, SipValueError

# RFC 7616 §3.9.1 "Example with SHA-256 and MD5": user "Mufasa", password "Circle of Life" (lowercase
# "of", erratum 4495), realm "http-auth@example.org", GET /dir/index.html, nc=00000001, qop=auth.
RFC7616_NONCE = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v"
RFC7616_CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"
RFC7616_OPAQUE = "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"
RFC7616_RESPONSES = {
    "MD5": "8ca523f5e9506fed4657c9700eebdbec",
    "SHA-256": "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
}

# RFC 2617 §3.5: "Mufasa" / "Circle Of Life" (capital O), realm "testrealm@host.com".
RFC2617_NONCE = "dcd98b7102dd2f0e8b11d0f600bfb0c093"
RFC2617_CNONCE = "0a4f113b"
RFC2617_RESPONSE = "6629fae49393a05397450978507c4ef1"

SECRET = b"cluster-secret-0123456789abcdef"
REALM = "pbx.test"
T0 = 1_800_000_000.25


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
def test_rfc7616_3_9_1_response_vectors(algorithm: str) -> None:
    ha1 = compute_ha1("Mufasa", "http-auth@example.org", "Circle of Life", algorithm)
    response = compute_response(
        ha1,
        method="GET",
        uri="/dir/index.html",
        nonce=RFC7616_NONCE,
        algorithm=algorithm,
        qop="auth",
        nc="00000001",
        cnonce=RFC7616_CNONCE,
    )
    assert response == RFC7616_RESPONSES[algorithm]


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
def test_rfc7616_3_9_1_authorization_header_parses_and_matches(algorithm: str) -> None:
    # The Authorization header of RFC 7616 §3.9.1, laid out as in the RFC (folded over lines).
    value = (
        'Digest username="Mufasa",\r\n    realm="http-auth@example.org",\r\n    uri="/dir/index.html",\r\n'
        f'    algorithm={algorithm},\r\n    nonce="{RFC7616_NONCE}",\r\n    nc=00000001,\r\n'
        f'    cnonce="{RFC7616_CNONCE}",\r\n    qop=auth,\r\n'
        f'    response="{RFC7616_RESPONSES[algorithm]}",\r\n    opaque="{RFC7616_OPAQUE}"'
    )
    creds = parse_authorization(value)
    assert creds == Credentials(
        username="Mufasa",
        realm="http-auth@example.org",
        nonce=RFC7616_NONCE,
        uri="/dir/index.html",
        response=RFC7616_RESPONSES[algorithm],
        algorithm=algorithm,
        cnonce=RFC7616_CNONCE,
        nc="00000001",
        qop="auth",
        opaque=RFC7616_OPAQUE,
    )
    ha1 = compute_ha1("Mufasa", "http-auth@example.org", "Circle of Life", algorithm)
    assert (
        compute_response(
            ha1,
            method="GET",
            uri=creds.uri,
            nonce=creds.nonce,
            algorithm=creds.algorithm,
            qop=creds.qop,
            nc=creds.nc,
            cnonce=creds.cnonce,
        )
        == creds.response
    )


def test_rfc2617_3_5_qop_auth_vector() -> None:
    ha1 = compute_ha1("Mufasa", "testrealm@host.com", "Circle Of Life", "MD5")
    assert ha1 == hashlib.md5(b"Mufasa:testrealm@host.com:Circle Of Life").hexdigest()
    response = compute_response(
        ha1,
        method="GET",
        uri="/dir/index.html",
        nonce=RFC2617_NONCE,
        algorithm="MD5",
        qop="auth",
        nc="00000001",
        cnonce=RFC2617_CNONCE,
    )
    assert response == RFC2617_RESPONSE


def test_rfc2617_3_5_inputs_without_qop_use_rfc2069_form() -> None:
    # No published vector exists for the no-qop form with these inputs; this is H(HA1:nonce:HA2)
    # written out with hashlib, independently of the module (RFC 2617 §3.2.2.1).
    ha1 = hashlib.md5(b"Mufasa:testrealm@host.com:Circle Of Life").hexdigest()
    ha2 = hashlib.md5(b"GET:/dir/index.html").hexdigest()
    expected = hashlib.md5(f"{ha1}:{RFC2617_NONCE}:{ha2}".encode()).hexdigest()
    assert expected == "670fd8c2df070c60b045671b8b24ff02"
    got = compute_response(ha1, method="GET", uri="/dir/index.html", nonce=RFC2617_NONCE, algorithm="MD5")
    assert got == expected


def test_compute_ha1_sha256_and_unknown_algorithm() -> None:
    assert compute_ha1("u", "r", "p", "SHA-256") == hashlib.sha256(b"u:r:p").hexdigest()
    assert compute_ha1("u", "r", "p", "sha-256") == hashlib.sha256(b"u:r:p").hexdigest()
    with pytest.raises(SipValueError):
        compute_ha1("u", "r", "p", "SHA-512-256")


# ---------------------------------------------------------------------------------------- nonces


def test_nonce_from_one_node_is_valid_on_another_with_same_secret() -> None:
    node_a_nonce = make_nonce(SECRET, REALM, T0)
    # "Node B" is just another call with its own copy of the secret and a slightly later clock.
    assert check_nonce(bytes(SECRET), REALM, node_a_nonce, T0 + 2.0, lifetime=300) is NonceStatus.VALID


def test_nonce_with_different_secret_is_invalid() -> None:
    nonce = make_nonce(SECRET, REALM, T0)
    assert check_nonce(b"another-cluster-secret", REALM, nonce, T0, lifetime=300) is NonceStatus.INVALID


def test_nonce_for_another_realm_is_invalid() -> None:
    nonce = make_nonce(SECRET, REALM, T0)
    assert check_nonce(SECRET, "other.test", nonce, T0, lifetime=300) is NonceStatus.INVALID


def test_nonce_is_stale_after_lifetime() -> None:
    nonce = make_nonce(SECRET, REALM, T0)
    t_made = int(T0)
    assert check_nonce(SECRET, REALM, nonce, t_made + 300, lifetime=300) is NonceStatus.VALID
    assert check_nonce(SECRET, REALM, nonce, t_made + 300.5, lifetime=300) is NonceStatus.STALE
    assert check_nonce(SECRET, REALM, nonce, t_made + 86400, lifetime=300) is NonceStatus.STALE


def test_nonce_from_far_future_is_stale_not_valid() -> None:
    nonce = make_nonce(SECRET, REALM, T0 + 1000)
    assert check_nonce(SECRET, REALM, nonce, T0, lifetime=300) is NonceStatus.STALE
    assert check_nonce(SECRET, REALM, nonce, T0 + 800, lifetime=300) is NonceStatus.VALID


def test_tampered_timestamp_is_invalid() -> None:
    nonce = make_nonce(SECRET, REALM, T0)
    ts_hex, mac = nonce.split(".")
    newer = format(int(ts_hex, 16) + 3600, "x")
    forged = f"{newer}.{mac}"
    assert check_nonce(SECRET, REALM, forged, T0 + 3600, lifetime=300) is NonceStatus.INVALID


@pytest.mark.parametrize(
    "nonce",
    [
        "",
        ".",
        "abc",
        "6b49d200.",
        "6B49D200.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "6b49d200.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "6b_49d200.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        " 6b49d200.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "x" * 10_000,
        "6b49d200.ÄAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        RFC7616_NONCE,
    ],
)
def test_forged_or_malformed_nonce_is_invalid(nonce: str) -> None:
    assert check_nonce(SECRET, REALM, nonce, T0, lifetime=300) is NonceStatus.INVALID


def test_flipping_any_mac_character_invalidates() -> None:
    nonce = make_nonce(SECRET, REALM, T0)
    head, mac = nonce.split(".")
    for i in range(len(mac)):
        flipped = mac[:i] + ("A" if mac[i] != "A" else "B") + mac[i + 1 :]
        assert check_nonce(SECRET, REALM, f"{head}.{flipped}", T0, lifetime=300) is NonceStatus.INVALID


@settings(deadline=None)
@given(st.floats(min_value=0, max_value=2**40), st.binary(min_size=1, max_size=64), st.text(max_size=40))
def test_make_then_check_nonce_round_trips(now: float, secret: bytes, realm: str) -> None:
    nonce = make_nonce(secret, realm, now)
    assert check_nonce(secret, realm, nonce, now, lifetime=1) is NonceStatus.VALID


# ------------------------------------------------------------------------------------- challenges


def test_make_challenge_offers_sha256_then_md5_with_qop_auth() -> None:
    values = make_challenge(REALM, "n0nce", opaque="op")
    assert values == [
        'Digest realm="pbx.test", nonce="n0nce", opaque="op", algorithm=SHA-256, qop="auth"',
        'Digest realm="pbx.test", nonce="n0nce", opaque="op", algorithm=MD5, qop="auth"',
    ]
    stale = make_challenge(REALM, "n0nce", stale=True)
    assert all("stale=true" in v for v in stale)
    parsed = [parse_challenge(v) for v in stale]
    assert [c.algorithm for c in parsed] == ["SHA-256", "MD5"]
    assert all(c.stale and c.qop == ("auth",) and c.realm == REALM for c in parsed)


def test_challenge_quotes_realm() -> None:
    [value, _] = make_challenge('we"ird\\realm', "n")
    assert parse_challenge(value).realm == 'we"ird\\realm'
    with pytest.raises(SipValueError):
        make_challenge("bad\r\nX-Injected: 1", "n")


# ------------------------------------------------------------------------------------- parsing


def test_parse_authorization_is_tolerant_of_case_spacing_and_quoting() -> None:
    value = (
        'digest  USERNAME = "alice" ,Realm="pbx.test",,nonce="n",uri="sip:pbx.test",'
        ' response="ABCDEF0123456789abcdef0123456789", algorithm="sha-256", qop="auth", NC=00000001,'
        ' cnonce="c\\"n", foo=bar'
    )
    creds = parse_authorization(value)
    assert creds.username == "alice"
    assert creds.realm == "pbx.test"
    assert creds.algorithm == "sha-256"
    assert creds.qop == "auth"
    assert creds.nc == "00000001"
    assert creds.cnonce == 'c"n'
    assert creds.extra == (("foo", "bar"),)


def test_parse_authorization_defaults_algorithm_to_md5() -> None:
    creds = parse_authorization('Digest username="a", realm="r", nonce="n", uri="sip:r", response="x"')
    assert creds.algorithm == "MD5"
    assert creds.qop is None and creds.nc is None and creds.cnonce is None


@pytest.mark.parametrize(
    "value",
    [
        "",
        "Digest",
        "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==",
        'Digest username="a"',
        'Digest username="a", realm="r", nonce="n", uri="u"',  # no response
        'Digest username="a, realm="r", nonce="n", uri="u", response="x"',  # unterminated
        'Digest username="a", username="b", realm="r", nonce="n", uri="u", response="x"',  # duplicate
        'Digest username="a" realm="r", nonce="n", uri="u", response="x"',  # missing comma
        'Digest username=, realm="r", nonce="n", uri="u", response="x"',
        'Digest username="a\\',
        'Digest username="a\x00", realm="r", nonce="n", uri="u", response="x"',
        'Digest username="a\\\n", realm="r", nonce="n", uri="u", response="x"',
        'Digest ="a", realm="r", nonce="n", uri="u", response="x"',
        'Digest username="a", realm="r", nonce="n", uri="u", response="x"' + ", x=y" * 2000,
    ],
)
def test_parse_authorization_rejects_malformed_with_400(value: str) -> None:
    with pytest.raises(SipParseError) as info:
        parse_authorization(value)
    assert info.value.status == 400


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_parse_authorization_any_string_gives_credentials_or_parse_error(value: str) -> None:
    try:
        creds = parse_authorization(value)
    except SipParseError as exc:
        assert exc.status == 400
    else:
        assert isinstance(creds, Credentials)


_param_names = st.sampled_from(
    ["username", "realm", "nonce", "uri", "response", "algorithm", "qop", "nc", "cnonce"]
)
_param_values = st.text(alphabet=st.characters(codec="utf-8"), max_size=20)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_param_names, _param_values, st.booleans()), max_size=10))
def test_parse_authorization_structured_fuzz(params: list[tuple[str, str, bool]]) -> None:
    body = ", ".join(
        f'{name}="{value.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        if quoted
        else f"{name}={value}"
        for name, value, quoted in params
    )
    try:
        creds = parse_authorization("Digest " + body)
    except SipParseError:
        return
    # Whatever parsed must also verify without raising.
    verify(creds, method="REGISTER", ha1="0" * 32, expected_realm=REALM, secret=SECRET, now=T0, lifetime=300)


@settings(deadline=None)
@given(st.text(max_size=200))
def test_parse_challenge_any_string_gives_challenge_or_parse_error(value: str) -> None:
    try:
        assert isinstance(parse_challenge(value), Challenge)
    except SipParseError as exc:
        assert exc.status == 400


# ------------------------------------------------------------------------------------ verification


def _answer(
    *,
    algorithm: str = "SHA-256",
    password: str = "s3cret",
    now: float = T0,
    method: str = "REGISTER",
    uri: str = "sip:pbx.test",
    qop: bool = True,
    secret: bytes = SECRET,
) -> Credentials:
    nonce = make_nonce(secret, REALM, now)
    challenge = next(
        c for c in map(parse_challenge, make_challenge(REALM, nonce)) if c.algorithm == algorithm
    )
    if not qop:
        challenge = Challenge(realm=challenge.realm, nonce=challenge.nonce, algorithm=algorithm)
    ha1 = compute_ha1("alice", REALM, password, algorithm)
    value = make_authorization(
        username="alice", ha1=ha1, challenge=challenge, method=method, uri=uri, cnonce="0a4f113b", nc=1
    )
    return parse_authorization(value)


def _check(
    creds: Credentials, *, method: str = "REGISTER", now: float = T0, password: str = "s3cret"
) -> AuthStatus:
    ha1 = compute_ha1("alice", REALM, password, creds.algorithm)
    return verify(
        creds, method=method, ha1=ha1, expected_realm=REALM, secret=SECRET, now=now, lifetime=300
    ).status


@pytest.mark.parametrize("algorithm", ["SHA-256", "MD5"])
def test_verify_ok_with_qop_auth(algorithm: str) -> None:
    assert _check(_answer(algorithm=algorithm)) is AuthStatus.OK


@pytest.mark.parametrize("algorithm", ["SHA-256", "MD5"])
def test_verify_ok_without_qop_rfc2069_form(algorithm: str) -> None:
    creds = _answer(algorithm=algorithm, qop=False)
    assert creds.qop is None and creds.nc is None and creds.cnonce is None
    assert _check(creds) is AuthStatus.OK


def test_verify_rejects_wrong_password_and_wrong_method() -> None:
    assert _check(_answer(password="guess")) is AuthStatus.FAILED
    assert _check(_answer(method="INVITE"), method="REGISTER") is AuthStatus.FAILED


def test_verify_stale_only_when_digest_is_right() -> None:
    creds = _answer(now=T0)
    assert _check(creds, now=T0 + 301) is AuthStatus.STALE
    wrong = _answer(now=T0, password="guess")
    assert _check(wrong, now=T0 + 301) is AuthStatus.FAILED


def test_verify_across_nodes_sharing_the_secret() -> None:
    creds = _answer(now=T0)  # challenged by node A
    assert _check(creds, now=T0 + 1) is AuthStatus.OK  # answered to node B, same SECRET
    foreign = _answer(now=T0, secret=b"other cluster")
    assert _check(foreign) is AuthStatus.FAILED


def test_verify_rejects_realm_algorithm_qop_inconsistencies() -> None:
    base = _answer()
    ha1 = compute_ha1("alice", REALM, "s3cret", "SHA-256")

    def result(creds: Credentials) -> tuple[AuthStatus, str]:
        r = verify(
            creds, method="REGISTER", ha1=ha1, expected_realm=REALM, secret=SECRET, now=T0, lifetime=300
        )
        return r.status, r.reason

    def variant(**changes: object) -> Credentials:
        fields = {f: getattr(base, f) for f in Credentials.__dataclass_fields__}
        fields.update(changes)
        return Credentials(**fields)  # type: ignore[arg-type]

    assert result(variant(realm="other"))[0] is AuthStatus.FAILED
    assert result(variant(algorithm="SHA-256-sess")) == (AuthStatus.FAILED, "unsupported algorithm")
    assert result(variant(algorithm="MD5-sess")) == (AuthStatus.FAILED, "unsupported algorithm")
    assert result(variant(qop="auth-int"))[0] is AuthStatus.FAILED
    assert result(variant(nc=None))[0] is AuthStatus.FAILED
    assert result(variant(nc="1"))[0] is AuthStatus.FAILED
    assert result(variant(cnonce=None))[0] is AuthStatus.FAILED
    assert result(variant(qop=None)) == (AuthStatus.FAILED, "nc or cnonce without qop")
    assert result(variant(nonce="1.forged"))[0] is AuthStatus.FAILED
    assert result(variant(response=base.response.upper()))[0] is AuthStatus.OK  # hex case-insensitive
    assert result(variant(response="é" * 64))[0] is AuthStatus.FAILED
    assert result(variant(algorithm="sha-256"))[0] is AuthStatus.OK


def test_verify_checks_request_uri_when_given() -> None:
    creds = _answer(uri="sip:pbx.test")
    ha1 = compute_ha1("alice", REALM, "s3cret", "SHA-256")
    common = dict(method="REGISTER", ha1=ha1, expected_realm=REALM, secret=SECRET, now=T0, lifetime=300)
    assert verify(creds, request_uri="sip:pbx.test", **common).ok  # type: ignore[arg-type]
    assert not verify(creds, request_uri="sip:other.test", **common).ok  # type: ignore[arg-type]


# ------------------------------------------------------------------------- parser vs a naive one


def _naive_params(value: str) -> dict[str, str] | None:
    """A character-by-character reading of RFC 3261 §25.1 digest parameters (None: malformed)."""
    token_chars = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.!%*_+`'~-")
    lws = " \t\r\n"
    n, i = len(value), 0

    def token(j: int) -> tuple[str, int] | None:
        k = j
        while k < n and value[k] in token_chars:
            k += 1
        return (value[j:k], k) if k > j else None

    def skip(j: int, chars: str = lws) -> int:
        while j < n and value[j] in chars:
            j += 1
        return j

    got = token(skip(0))
    if got is None or got[0].lower() != "digest":
        return None
    i = got[1]
    if i >= n or value[i] not in lws:
        return None
    params: dict[str, str] = {}
    while True:
        i = skip(i, lws + ",")
        if i >= n:
            return params
        got = token(i)
        if got is None:
            return None
        name, i = got
        i = skip(i)
        if i >= n or value[i] != "=":
            return None
        i = skip(i + 1)
        if i < n and value[i] == '"':
            i += 1
            chars = []
            while True:
                if i >= n:
                    return None
                c = value[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\":
                    if i + 1 >= n or value[i + 1] in "\r\n" or ord(value[i + 1]) > 0x7F:
                        return None
                    chars.append(value[i + 1])
                    i += 2
                    continue
                if (ord(c) < 0x20 and c != "\t") or c == "\x7f":
                    return None
                chars.append(c)
                i += 1
            text = "".join(chars)
        else:
            got = token(i)
            if got is None:
                return None
            text, i = got
        if name.lower() in params:
            return None
        params[name.lower()] = text
        i = skip(i)
        if i < n and value[i] != ",":
            return None


_digest_alphabet = st.sampled_from(
    [
        "Digest",
        "digest ",
        " ",
        "\t",
        "\r\n",
        ",",
        "=",
        '"',
        "\\",
        "a",
        "B",
        "nc",
        "qop",
        "realm",
        "x=y",
        "é",
        "\x00",
        "\x7f",
        "-",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_digest_alphabet, max_size=30).map("".join))
def test_parse_params_agrees_with_naive_reading(value: str) -> None:
    from raftpbx.transport.sip.digest import _parse_params

    try:
        fast: dict[str, str] | None = _parse_params(value, "test")
    except SipParseError:
        fast = None
    assert fast == _naive_params(value)
