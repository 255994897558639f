"""Digest credentials: HA1 values computed from a password that is then forgotten.

RFC 7616 §3.4.2: A1 = unq(username) ":" unq(realm) ":" passwd, and HA1 = H(A1) as lowercase hex, for
H = MD5 and H = SHA-256. Strings are encoded as UTF-8 (RFC 7616 §4, charset=UTF-8). The registrar can
check a digest response from HA1 alone, so the cluster never stores or replicates the password.
"""

from __future__ import annotations

import hashlib


def _a1(username: str, realm: str, password: str) -> bytes:
    return f"{username}:{realm}:{password}".encode()


def ha1_md5(username: str, realm: str, password: str) -> str:
    """MD5(username:realm:password) as 32 lowercase hex digits (RFC 7616 §3.4.2)."""
    return hashlib.md5(_a1(username, realm, password), usedforsecurity=False).hexdigest()


def ha1_sha256(username: str, realm: str, password: str) -> str:
    """SHA-256(username:realm:password) as 64 lowercase hex digits (RFC 7616 §3.4.2)."""
    return hashlib.sha256(_a1(username, realm, password)).hexdigest()
