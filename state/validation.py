"""Field rules shared by decisions (which raise) and `apply` (which rejects).

Each `check_*` returns None when the value is acceptable, else a short fixed message. The messages never
quote the value (a value might be a password typed in the wrong field).
"""

from __future__ import annotations

import re

MAX_DISPLAY_NAME = 64
MAX_REALM = 255

_EXTENSION = re.compile(r"[0-9]{2,15}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def check_extension(extension: str) -> str | None:
    """Extensions are 2 to 15 ASCII digits (they are dialled, and are the digest username)."""
    if _EXTENSION.fullmatch(extension) is None:
        return "malformed number: use 2 to 15 digits"
    return None


def _printable_unquoted(value: str) -> bool:
    # A display name is written into a SIP quoted-string (RFC 3261 §25.1) and a realm into a digest
    # challenge's quoted-string (RFC 7616 §3.3): refusing DQUOTE and backslash avoids escaping.
    return value.isprintable() and '"' not in value and "\\" not in value


def check_display_name(display_name: str) -> str | None:
    """At most 64 printable characters, no quotes or backslashes, no surrounding spaces ("" = none)."""
    if len(display_name) > MAX_DISPLAY_NAME:
        return f"too long: at most {MAX_DISPLAY_NAME} characters"
    if not _printable_unquoted(display_name):
        return "must not contain control characters, quotes or backslashes"
    if display_name != display_name.strip():
        return "must not start or end with spaces"
    return None


def check_realm(realm: str) -> str | None:
    """A non-empty printable realm without quotes or backslashes."""
    if not realm:
        return "must not be empty"
    if len(realm) > MAX_REALM:
        return f"too long: at most {MAX_REALM} characters"
    if not _printable_unquoted(realm):
        return "must not contain control characters, quotes or backslashes"
    return None


def check_ha1_md5(value: str) -> str | None:
    """32 lowercase hex digits."""
    return None if _HEX32.fullmatch(value) else "malformed: expected 32 lowercase hex digits"


def check_ha1_sha256(value: str) -> str | None:
    """64 lowercase hex digits."""
    return None if _HEX64.fullmatch(value) else "malformed: expected 64 lowercase hex digits"
