"""Decisions: turn an operator's request into events, or refuse it with a `ValidationError`.

Theory of operation: a decision reads the current state (as seen by the proposing node) and its inputs,
validates them, and returns the events to propose. It never mutates the state; `apply` re-checks what
depends on the state (the extension may have been created or deleted concurrently), so a decision is a
fast, friendly pre-check and `apply` is the authority.

Passwords: a decision turns the password into HA1 digests (RFC 7616 §3.4.2, MD5 and SHA-256) and forgets
it. No event, error message or repr contains the password; error messages are fixed strings.

Password policy (a PBX extension password is guessed online by SIP scanners all day long):
non-empty, 8 to 128 printable characters, not containing the extension number, not one repeated
character, not in a short list of the most common passwords (case-insensitive).
"""

from __future__ import annotations

import math

from .credentials import ha1_md5, ha1_sha256
from .errors import ValidationError
from .events import CredentialChanged, Event, ExtensionCreated, ExtensionDeleted, ExtensionUpdated
from .model import State
from .validation import check_display_name, check_extension, check_realm

MIN_PASSWORD = 8
MAX_PASSWORD = 128

_COMMON_PASSWORDS_TEXT = """
    password password1 password12 password123 passw0rd p@ssw0rd p@ssword 12345678 123456789 1234567890
    0123456789 87654321 12341234 11223344 qwertyui qwertyuiop qwerty12 qwerty123 1q2w3e4r 1qaz2wsx
    zaq12wsx asdfghjk asdfghjkl zxcvbnm1 abcd1234 abc12345 abcdefgh iloveyou letmein1 welcome1
    welcome123 changeme trustno1 sunshine princess football baseball superman starwars dragon12
    monkey12 master12 admin123 administrator secret12 voip1234 sip12345 phone123 default1
"""
COMMON_PASSWORDS = frozenset(_COMMON_PASSWORDS_TEXT.split())


def _validate_extension(extension: str) -> None:
    if type(extension) is not str:
        raise ValidationError("extension", "must be a string")
    if (message := check_extension(extension)) is not None:
        raise ValidationError("extension", message)


def _validate_realm(realm: str) -> None:
    if type(realm) is not str:
        raise ValidationError("realm", "must be a string")
    if (message := check_realm(realm)) is not None:
        raise ValidationError("realm", message)


def _validate_display_name(display_name: str) -> str:
    if type(display_name) is not str:
        raise ValidationError("display_name", "must be a string")
    display_name = display_name.strip(" ")
    if (message := check_display_name(display_name)) is not None:
        raise ValidationError("display_name", message)
    return display_name


def _validate_password(extension: str, password: str) -> None:
    # Messages are constants: never interpolate the password.
    if type(password) is not str or not password:
        raise ValidationError("password", "required")
    if len(password) < MIN_PASSWORD:
        raise ValidationError("password", f"weak password: use at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise ValidationError("password", f"too long: at most {MAX_PASSWORD} characters")
    if not password.isprintable():
        raise ValidationError("password", "must not contain control characters")
    if extension in password:
        raise ValidationError("password", "weak password: must not contain the extension number")
    if len(set(password)) == 1:
        raise ValidationError("password", "weak password: must not be one repeated character")
    if password.lower() in COMMON_PASSWORDS:
        raise ValidationError("password", "weak password: too common")


def _validate_now(now: float) -> float:
    if type(now) not in (int, float) or not math.isfinite(now):
        raise ValidationError("now", "must be a finite number of epoch seconds")
    return float(now)


def decide_create_extension(
    state: State, extension: str, password: str, display_name: str | None, realm: str, now: float
) -> list[Event]:
    """Events creating `extension` with digest credentials for `realm`; ValidationError if refused."""
    _validate_extension(extension)
    if extension in state.extensions:
        raise ValidationError("extension", "already exists")
    name = "" if display_name is None else _validate_display_name(display_name)
    _validate_realm(realm)
    _validate_password(extension, password)
    at = _validate_now(now)
    return [
        ExtensionCreated(
            extension=extension,
            display_name=name,
            realm=realm,
            ha1_md5=ha1_md5(extension, realm, password),
            ha1_sha256=ha1_sha256(extension, realm, password),
            at=at,
        )
    ]


def decide_update_extension(
    state: State,
    extension: str,
    *,
    display_name: str | None = None,
    password: str | None = None,
    realm: str,
    now: float,
) -> list[Event]:
    """`ExtensionUpdated` if the display name changes, `CredentialChanged` if a password is given.

    A password always yields `CredentialChanged` (for `realm`), even if it happens to be the current one.
    Raises ValidationError if the extension is unknown, an input is invalid, or nothing would change.
    """
    _validate_extension(extension)
    current = state.extensions.get(extension)
    if current is None:
        raise ValidationError("extension", "no such extension")
    at = _validate_now(now)
    events: list[Event] = []
    if display_name is not None:
        name = _validate_display_name(display_name)
        if name != current.display_name:
            events.append(ExtensionUpdated(extension=extension, display_name=name, at=at))
    if password is not None:
        _validate_realm(realm)
        _validate_password(extension, password)
        events.append(
            CredentialChanged(
                extension=extension,
                realm=realm,
                ha1_md5=ha1_md5(extension, realm, password),
                ha1_sha256=ha1_sha256(extension, realm, password),
                at=at,
            )
        )
    if not events:
        field = "display_name" if display_name is not None else "extension"
        raise ValidationError(field, "nothing to change: give a new display name or a password")
    return events


def decide_delete_extension(state: State, extension: str, now: float) -> list[Event]:
    """`ExtensionDeleted` for an existing extension; ValidationError otherwise."""
    _validate_extension(extension)
    if extension not in state.extensions:
        raise ValidationError("extension", "no such extension")
    return [ExtensionDeleted(extension=extension, at=_validate_now(now))]
