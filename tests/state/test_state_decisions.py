"""Decisions: validation naming the field, HA1 credentials (RFC 7616 §3.4.2), passwords never leaked."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from raftpbx.state import (
    Command,
    CredentialChanged,
    ExtensionCreated,
    ExtensionDeleted,
    ExtensionUpdated,
    State,
    StateError,
    ValidationError,
    apply,
    decide_create_extension,
    decide_delete_extension,
    decide_update_extension,
    encode_batch,
    ha1_md5,
    ha1_sha256,
    snapshot,
)

REALM = "pbx.test"
PASSWORD = "Tr0mbone-Sunrise"
NOW = 1_700_000_000.5


def test_rfc7616_section_3_9_1_example_ha1_gives_the_published_responses() -> None:
    """RFC 7616 §3.9.1: Mufasa / http-auth@example.org / "Circle of Life", GET /dir/index.html, qop=auth.

    Our HA1 (§3.4.2) is fed into the response formula of §3.4.1, computed here with hashlib only, and must
    give the response values printed in the RFC for MD5 and SHA-256.
    """
    nonce = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v"
    cnonce = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"
    for algorithm, ha1, published in [
        (
            "md5",
            ha1_md5("Mufasa", "http-auth@example.org", "Circle of Life"),
            "8ca523f5e9506fed4657c9700eebdbec",
        ),
        (
            "sha256",
            ha1_sha256("Mufasa", "http-auth@example.org", "Circle of Life"),
            "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
        ),
    ]:

        def h(text: str, algorithm: str = algorithm) -> str:
            return hashlib.new(algorithm, text.encode()).hexdigest()

        assert ha1 == h("Mufasa:http-auth@example.org:Circle of Life")
        ha2 = h("GET:/dir/index.html")
        assert h(f"{ha1}:{nonce}:00000001:{cnonce}:auth:{ha2}") == published


def test_create_emits_ha1_of_extension_realm_password() -> None:
    (event,) = decide_create_extension(State(), "1001", PASSWORD, "Alice", REALM, NOW)
    assert event == ExtensionCreated(
        extension="1001",
        display_name="Alice",
        realm=REALM,
        ha1_md5=hashlib.md5(f"1001:{REALM}:{PASSWORD}".encode()).hexdigest(),
        ha1_sha256=hashlib.sha256(f"1001:{REALM}:{PASSWORD}".encode()).hexdigest(),
        at=NOW,
    )
    assert decide_create_extension(State(), "1001", PASSWORD, None, REALM, NOW)[0].display_name == ""  # type: ignore[attr-defined]


def test_utf8_password_is_hashed_as_utf8() -> None:
    (event,) = decide_create_extension(State(), "1001", "pässwörd-ünïcode", None, REALM, NOW)
    assert event.ha1_sha256 == hashlib.sha256(f"1001:{REALM}:pässwörd-ünïcode".encode()).hexdigest()  # type: ignore[attr-defined]


def _state_with(*numbers: str) -> State:
    state = State()
    for number in numbers:
        for event in decide_create_extension(state, number, PASSWORD, f"Ext {number}", REALM, NOW):
            assert apply(state, event).ok
    return state


def _refused(call: object, field: str, fragment: str) -> ValidationError:
    assert callable(call)
    with pytest.raises(ValidationError) as info:
        call()
    assert info.value.field == field
    assert fragment in info.value.message
    assert isinstance(info.value, StateError)
    return info.value


@pytest.mark.parametrize(
    "number", ["", "1", "x100", "10 0", "1234567890123456", "\u0661\u0660\u0660", "+100", " 100"]
)
def test_create_refuses_malformed_numbers(number: str) -> None:
    _refused(
        lambda: decide_create_extension(State(), number, PASSWORD, None, REALM, NOW), "extension", "malformed"
    )


def test_create_refuses_an_existing_extension() -> None:
    state = _state_with("100")
    _refused(
        lambda: decide_create_extension(state, "100", PASSWORD, None, REALM, NOW),
        "extension",
        "already exists",
    )


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("x" * 65, "too long"),
        ('Say "hi"', "quotes"),
        ("back\\slash", "quotes"),
        ("tab\there", "control"),
        ("nl\n", "control"),
        ("\x00", "control"),
    ],
)
def test_create_refuses_bad_display_names(name: str, fragment: str) -> None:
    _refused(
        lambda: decide_create_extension(State(), "100", PASSWORD, name, REALM, NOW), "display_name", fragment
    )


def test_display_name_limits() -> None:
    (event,) = decide_create_extension(State(), "100", PASSWORD, "  Réception 2  ", REALM, NOW)
    assert event.display_name == "Réception 2"  # type: ignore[attr-defined]
    assert decide_create_extension(State(), "100", PASSWORD, "y" * 64, REALM, NOW)


@pytest.mark.parametrize(
    ("password", "fragment"),
    [
        ("", "required"),
        ("short1!", "at least 8"),
        ("xx100yyzz", "extension number"),
        ("aaaaaaaaaaaa", "repeated"),
        ("passw0rd", "too common"),
        ("PASSWORD1", "too common"),
        ("12345678", "too common"),
        ("qwertyuiop", "too common"),
        ("a\x07bcdefghij", "control"),
        ("z" * 120 + "abcdefghi", "too long"),
    ],
)
def test_weak_passwords_are_refused_without_quoting_them(password: str, fragment: str) -> None:
    error = _refused(
        lambda: decide_create_extension(State(), "100", password, None, REALM, NOW), "password", fragment
    )
    if password:
        # ("password" itself is also the field name, so look at the message; str() is field + message.)
        assert password not in error.message
        assert str(error) == f"password: {error.message}"
        assert repr(error) == f"ValidationError(field='password', message={error.message!r})"


def test_realm_is_validated() -> None:
    _refused(lambda: decide_create_extension(State(), "100", PASSWORD, None, "", NOW), "realm", "empty")
    _refused(lambda: decide_create_extension(State(), "100", PASSWORD, None, 'a"b', NOW), "realm", "quotes")


def test_now_must_be_finite() -> None:
    _refused(
        lambda: decide_create_extension(State(), "100", PASSWORD, None, REALM, float("nan")), "now", "finite"
    )


@given(st.text(min_size=8, max_size=30))
def test_no_event_or_error_ever_contains_the_password(password: str) -> None:
    marker = "\u2603" + password  # a password no field could contain by coincidence
    try:
        events = decide_create_extension(State(), "100", marker, "Alice", REALM, NOW)
    except ValidationError as error:
        assert marker not in str(error) and marker not in repr(error)
        return
    blob = encode_batch([Command("op", e) for e in events])
    assert marker.encode() not in blob and marker not in repr(events)
    state = State()
    apply(state, events[0])
    assert marker.encode() not in snapshot(state) and marker not in repr(state)


def test_update_display_name_only() -> None:
    state = _state_with("100")
    assert decide_update_extension(state, "100", display_name="Bob", realm=REALM, now=NOW) == [
        ExtensionUpdated("100", "Bob", NOW)
    ]


def test_update_password_only() -> None:
    state = _state_with("100")
    new = "Violin-Moonset-7"
    assert decide_update_extension(state, "100", password=new, realm="other.test", now=NOW) == [
        CredentialChanged(
            "100",
            "other.test",
            hashlib.md5(f"100:other.test:{new}".encode()).hexdigest(),
            hashlib.sha256(f"100:other.test:{new}".encode()).hexdigest(),
            NOW,
        )
    ]


def test_update_both_and_apply() -> None:
    state = _state_with("100")
    events = decide_update_extension(
        state, "100", display_name="Bob", password="Violin-Moonset-7", realm=REALM, now=NOW
    )
    assert [type(e) for e in events] == [ExtensionUpdated, CredentialChanged]
    for event in events:
        assert apply(state, event).ok
    assert state.extensions["100"].display_name == "Bob"
    assert state.extensions["100"].ha1_md5 == ha1_md5("100", REALM, "Violin-Moonset-7")


def test_update_with_nothing_to_change_is_refused() -> None:
    state = _state_with("100")
    _refused(
        lambda: decide_update_extension(state, "100", realm=REALM, now=NOW), "extension", "nothing to change"
    )
    _refused(
        lambda: decide_update_extension(state, "100", display_name="Ext 100", realm=REALM, now=NOW),
        "display_name",
        "nothing to change",
    )


def test_update_refusals_name_the_field() -> None:
    state = _state_with("100")
    _refused(
        lambda: decide_update_extension(state, "200", display_name="B", realm=REALM, now=NOW),
        "extension",
        "no such",
    )
    _refused(
        lambda: decide_update_extension(state, "1", display_name="B", realm=REALM, now=NOW),
        "extension",
        "malformed",
    )
    _refused(
        lambda: decide_update_extension(state, "100", display_name='"', realm=REALM, now=NOW),
        "display_name",
        "quotes",
    )
    _refused(
        lambda: decide_update_extension(state, "100", password="short", realm=REALM, now=NOW),
        "password",
        "weak",
    )
    _refused(
        lambda: decide_update_extension(state, "100", password="", realm=REALM, now=NOW),
        "password",
        "required",
    )


def test_delete() -> None:
    state = _state_with("100", "101")
    assert decide_delete_extension(state, "100", NOW) == [ExtensionDeleted("100", NOW)]
    _refused(lambda: decide_delete_extension(state, "102", NOW), "extension", "no such")
    _refused(lambda: decide_delete_extension(state, "abc", NOW), "extension", "malformed")


def test_decisions_do_not_mutate_the_state() -> None:
    state = _state_with("100")
    before = snapshot(state)
    decide_create_extension(state, "101", PASSWORD, None, REALM, NOW)
    decide_update_extension(state, "100", display_name="Z", password="Violin-Moonset-7", realm=REALM, now=NOW)
    decide_delete_extension(state, "100", NOW)
    assert snapshot(state) == before


def test_validation_error_shape() -> None:
    error = ValidationError("extension", "no such extension")
    assert (error.field, error.message) == ("extension", "no such extension")
    assert str(error) == "extension: no such extension"
    assert error.to_dict() == {"field": "extension", "message": "no such extension"}
