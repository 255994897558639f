"""Digest fast paths: the one-pass parameter reader agrees with the general loop, and the memoised
nonce MACs and HA2s never let one secret, realm, method or URI stand for another."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from raftpbx.transport.sip import digest
from raftpbx.transport.sip.digest import (
    AuthStatus,
    Challenge,
    NonceStatus,
    check_nonce,
    compute_ha1,
    make_authorization,
    make_nonce,
    parse_authorization,
    verify,
)
from raftpbx.transport.sip.errors import SipParseError

SECRET = b"cluster-secret-0123456789abcdef"
REALM = "pbx.test"
T0 = 1_800_000_000.25

# Authorization values as real user agents send them (SIPp 3.6, pjsip, Linphone style spacing and order).
REAL_VALUES = [
    'Digest username="100001",realm="pbx.test",uri="sip:127.0.0.11:5060",'
    'nonce="6b086629.Vze8ugPP0D_x1v95OD0C6IjRHhhz05gLMw4ido94gik",response="cf1f58e82f74ea4df8ccc1453b7f9466",'
    'algorithm=MD5,cnonce="6b8b4567",qop=auth,nc=00000001',
    'Digest username="2001", realm="pbx.test", nonce="6b086629.abc", uri="sip:pbx.test", '
    'response="0123456789abcdef0123456789abcdef", algorithm=MD5, cnonce="Ab-12.x", qop=auth, nc=0000000a',
    'Digest realm="pbx.test", nonce="n", algorithm=SHA-256, cnonce="c", username="u", uri="sip:x", '
    'response="r", opaque="", qop=auth, nc=00000001',
]


def _general(value: str) -> dict[str, str] | None:
    """The general loop only (the one-pass reader disabled by a pattern that never matches)."""
    saved = digest._PARAMS_RE
    digest._PARAMS_RE = re.compile(r"(?!)")
    try:
        return digest._parse_params(value, "test")
    except SipParseError:
        return None
    finally:
        digest._PARAMS_RE = saved


def _fast(value: str) -> dict[str, str] | None:
    try:
        return digest._parse_params(value, "test")
    except SipParseError:
        return None


@pytest.mark.parametrize("value", REAL_VALUES)
def test_real_user_agent_values_read_the_same_on_both_paths(value: str) -> None:
    assert digest._PARAMS_RE.fullmatch(value, len("Digest")) is not None  # they take the one-pass reader
    fast = _fast(value)
    assert fast is not None and fast == _general(value)


_printable_pieces = st.sampled_from(
    ["Digest", "digest", " ", "  ", ",", ", ", "=", " = ", '"', "a", "Z9", "nc", "qop", "realm", "x=y",
     '"q r,s=t"', "-._!%*+`'~", "@", ":", ";", "/", "(", "?", "{", "\t", "\r\n", "\\", '\\"', "é", "\x00",
     "\x7f"]
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(_printable_pieces, max_size=30).map("".join))
def test_one_pass_reader_agrees_with_the_loop_on_digest_like_text(value: str) -> None:
    assert _fast(value) == _general(value)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=120))
def test_one_pass_reader_agrees_with_the_loop_on_any_printable_ascii_text(value: str) -> None:
    assert _fast("Digest " + value) == _general("Digest " + value)


def test_memoised_nonce_mac_is_keyed_by_secret_and_realm() -> None:
    nonce = make_nonce(SECRET, REALM, T0)
    assert check_nonce(SECRET, REALM, nonce, T0, 30) is NonceStatus.VALID  # now memoised
    assert check_nonce(SECRET + b"x", REALM, nonce, T0, 30) is NonceStatus.INVALID
    assert check_nonce(SECRET, REALM + ".other", nonce, T0, 30) is NonceStatus.INVALID
    assert check_nonce(SECRET, REALM, nonce, T0 + 31, 30) is NonceStatus.STALE  # freshness checked every time
    info = digest._nonce_mac.cache_info()
    assert info.maxsize is not None and info.maxsize <= 1024 and info.hits >= 1


def _credentials(method: str, uri: str, password: str = "right-Password-1") -> digest.Credentials:
    ha1 = compute_ha1("2001", REALM, password, "MD5")
    challenge = Challenge(realm=REALM, nonce=make_nonce(SECRET, REALM, T0), algorithm="MD5", qop=("auth",))
    value = make_authorization(username="2001", ha1=ha1, challenge=challenge, method=method, uri=uri,
                               cnonce="c0ffee")
    return parse_authorization(value)


def test_memoised_ha2_is_keyed_by_method_and_uri() -> None:
    ha1 = compute_ha1("2001", REALM, "right-Password-1", "MD5")
    good = _credentials("REGISTER", "sip:pbx.test")
    check = dict(ha1=ha1, expected_realm=REALM, secret=SECRET, now=T0, lifetime=30)
    assert verify(good, method="REGISTER", **check).status is AuthStatus.OK  # HA2 now memoised
    assert verify(good, method="INVITE", **check).status is AuthStatus.FAILED
    other_uri = _credentials("REGISTER", "sip:pbx.test;x")
    forged = dataclasses.replace(other_uri, uri="sip:pbx.test")
    assert verify(forged, method="REGISTER", **check).status is AuthStatus.FAILED
    wrong = _credentials("REGISTER", "sip:pbx.test", password="wrong-Password-2")
    assert verify(wrong, method="REGISTER", **check).status is AuthStatus.FAILED


def test_one_pass_reader_does_not_backtrack_on_hostile_input() -> None:
    import time

    for value in ["Digest " + "a=b, " * 1500 + "x", "Digest a=" + "b" * 8000 + " c", 'Digest a="' + "\\x" * 4000]:
        started = time.process_time()
        with pytest.raises(SipParseError):
            parse_authorization(value)
        assert time.process_time() - started < 0.5  # linear: a few ms even on a loaded machine
