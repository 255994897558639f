"""The verified-nonce cache of `check_nonce` and the HA2 memo of `compute_response`: bounded, keyed by
everything the result depends on, only authentic nonces enter, and freshness is judged against `now` on
every call (a cached nonce still turns stale). Same answers as without the caches."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
from raftpbx.transport.sip import digest
from raftpbx.transport.sip.digest import (
    AuthStatus,
    NonceStatus,
    check_nonce,
    compute_ha1,
    compute_response,
    make_nonce,
    parse_authorization,
    verify,
)

SECRET = b"nonce-cache-secret-0123456789abc"
REALM = "cache.test"
T0 = 1_800_000_100.5
LIFETIME = 30.0


@pytest.fixture(autouse=True)
def _empty_cache() -> Iterator[None]:
    digest._verified_nonces.clear()
    yield
    digest._verified_nonces.clear()


def _cached(nonce: str, secret: bytes = SECRET, realm: str = REALM) -> bool:
    return (secret, realm, nonce) in digest._verified_nonces


def test_an_authentic_nonce_enters_and_answers_the_same_from_the_cache() -> None:
    nonce = make_nonce(SECRET, REALM, T0)
    assert check_nonce(SECRET, REALM, nonce, T0, LIFETIME) is NonceStatus.VALID
    assert _cached(nonce)
    assert digest._verified_nonces[(SECRET, REALM, nonce)] == int(T0)
    assert check_nonce(SECRET, REALM, nonce, T0 + 1, LIFETIME) is NonceStatus.VALID


def test_a_cached_nonce_still_turns_stale_against_now() -> None:
    nonce = make_nonce(SECRET, REALM, T0)
    assert check_nonce(SECRET, REALM, nonce, T0, LIFETIME) is NonceStatus.VALID
    assert _cached(nonce)
    assert check_nonce(SECRET, REALM, nonce, T0 + LIFETIME + 1, LIFETIME) is NonceStatus.STALE
    assert (
        check_nonce(SECRET, REALM, nonce, T0 - LIFETIME - 1, LIFETIME) is NonceStatus.STALE
    )  # from the future
    assert check_nonce(SECRET, REALM, nonce, T0 + 2, LIFETIME) is NonceStatus.VALID
    # A shorter lifetime given later is honoured too: nothing about freshness is remembered.
    assert check_nonce(SECRET, REALM, nonce, T0 + 10, 5.0) is NonceStatus.STALE


def test_a_stale_nonce_is_stale_on_first_sight_and_from_the_cache() -> None:
    nonce = make_nonce(SECRET, REALM, T0 - 3600)
    assert check_nonce(SECRET, REALM, nonce, T0, LIFETIME) is NonceStatus.STALE
    assert _cached(nonce)  # authentic: its timestamp is remembered, freshness is not
    assert check_nonce(SECRET, REALM, nonce, T0, LIFETIME) is NonceStatus.STALE


def test_forged_tampered_and_malformed_nonces_never_enter() -> None:
    good = make_nonce(SECRET, REALM, T0)
    ts_hex, mac = good.split(".")
    flipped = mac[:-1] + ("A" if mac[-1] != "A" else "B")
    other_key = make_nonce(SECRET + b"!", REALM, T0)
    later = format(int(T0) + 5, "x") + "." + mac  # someone else's MAC on a new timestamp
    raw = base64.urlsafe_b64encode(bytes(32)).rstrip(b"=").decode()
    for forged in (f"{ts_hex}.{flipped}", other_key, later, f"{ts_hex}.{raw}", "x" * 200, "", f"{ts_hex}."):
        for _ in range(2):  # a second look must refuse it again, not find it cached
            assert check_nonce(SECRET, REALM, forged, T0, LIFETIME) is NonceStatus.INVALID
        assert not _cached(forged)
    assert digest._verified_nonces == {}


def test_the_key_includes_secret_and_realm() -> None:
    nonce = make_nonce(SECRET, REALM, T0)
    assert check_nonce(SECRET, REALM, nonce, T0, LIFETIME) is NonceStatus.VALID
    assert check_nonce(SECRET + b"x", REALM, nonce, T0, LIFETIME) is NonceStatus.INVALID
    assert check_nonce(SECRET, REALM + ".other", nonce, T0, LIFETIME) is NonceStatus.INVALID
    assert not _cached(nonce, secret=SECRET + b"x") and not _cached(nonce, realm=REALM + ".other")


def test_the_cache_is_bounded_and_the_oldest_leaves_first() -> None:
    cap = digest.VERIFIED_NONCE_CACHE
    nonces = [make_nonce(SECRET, REALM, T0 - i) for i in range(cap + 10)]
    for nonce in nonces:
        assert check_nonce(SECRET, REALM, nonce, T0, 1e9) is NonceStatus.VALID
        assert len(digest._verified_nonces) <= cap
    assert len(digest._verified_nonces) == cap
    assert not any(_cached(n) for n in nonces[:10])  # evicted, oldest first
    assert all(_cached(n) for n in nonces[10:])
    # An evicted nonce is simply verified again (and re-enters).
    assert check_nonce(SECRET, REALM, nonces[0], T0, 1e9) is NonceStatus.VALID
    assert _cached(nonces[0]) and len(digest._verified_nonces) == cap


def test_verify_answers_the_same_with_a_cached_nonce() -> None:
    """OK, wrong password, stale: the same results on first sight of the nonce and from the cache."""
    nonce = make_nonce(SECRET, REALM, T0)
    uri = "sip:127.0.0.1"
    ha1 = compute_ha1("3001", REALM, "pw-3001", "MD5")
    wrong_ha1 = compute_ha1("3001", REALM, "not-it", "MD5")
    response = compute_response(
        ha1, method="REGISTER", uri=uri, nonce=nonce, algorithm="MD5", qop="auth", nc="00000001", cnonce="c1"
    )
    creds = parse_authorization(
        f'Digest username="3001", realm="{REALM}", nonce="{nonce}", uri="{uri}", response="{response}", '
        'algorithm=MD5, qop=auth, nc=00000001, cnonce="c1"'
    )
    common = dict(method="REGISTER", expected_realm=REALM, secret=SECRET, lifetime=LIFETIME)
    for _ in range(2):
        assert verify(creds, ha1=ha1, now=T0, **common).status is AuthStatus.OK  # type: ignore[arg-type]
        assert verify(creds, ha1=wrong_ha1, now=T0, **common).status is AuthStatus.FAILED  # type: ignore[arg-type]
        assert verify(creds, ha1=ha1, now=T0 + 60, **common).status is AuthStatus.STALE  # type: ignore[arg-type]
        assert verify(creds, ha1=wrong_ha1, now=T0 + 60, **common).status is AuthStatus.FAILED  # type: ignore[arg-type]
        assert _cached(nonce)


def test_the_ha2_memo_is_bounded_and_keyed_by_algorithm_method_and_uri() -> None:
    info = digest._ha2.cache_info()
    assert info.maxsize is not None and 0 < info.maxsize <= 4096
    import hashlib

    for algorithm, h in (("MD5", hashlib.md5), ("SHA-256", hashlib.sha256)):
        for method, uri in (("REGISTER", "sip:a"), ("INVITE", "sip:a"), ("REGISTER", "sip:b")):
            assert digest._ha2(algorithm, method, uri) == h(f"{method}:{uri}".encode()).hexdigest()
    digest._ha2.cache_clear()
    for k in range(info.maxsize + 50):
        digest._ha2("MD5", "REGISTER", f"sip:{k}@x")
    assert digest._ha2.cache_info().currsize == info.maxsize


def test_parsed_credentials_are_ordinary_frozen_credentials() -> None:
    """parse_authorization builds Credentials without the frozen __init__: the same object in every way."""
    import dataclasses

    value = (
        f'Digest username="3001", realm="{REALM}", nonce="n", uri="sip:x", response="r", algorithm=MD5, '
        'qop=auth, nc=00000001, cnonce="c1", opaque="o", foo=bar'
    )
    got = parse_authorization(value)
    want = digest.Credentials(
        username="3001", realm=REALM, nonce="n", uri="sip:x", response="r", algorithm="MD5", cnonce="c1",
        nc="00000001", qop="auth", opaque="o", extra=(("foo", "bar"),),
    )  # fmt: skip
    assert type(got) is digest.Credentials and got == want and hash(got) == hash(want)
    assert repr(got) == repr(want) and dataclasses.astuple(got) == dataclasses.astuple(want)
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.username = "other"  # type: ignore[misc]
    short = parse_authorization(f'Digest username="u", realm="{REALM}", nonce="n", uri="sip:x", response="r"')
    assert short == digest.Credentials(username="u", realm=REALM, nonce="n", uri="sip:x", response="r")
