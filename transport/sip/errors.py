"""Exceptions of the SIP layer.

Theory: every failure that the SIP core reports derives from `SipError`. Bad network input is reported
only as `SipParseError`, which carries the status code a UAS or proxy should use for a stateless error
reply (400 Bad Request, 413 Message Too Large, 416 Unsupported URI Scheme, 505 Version Not Supported)
and a short reason. The reason is safe to place in a status line: it never contains CR, LF or control
characters (the constructor strips them), and it never echoes long attacker-supplied text.
"""

from __future__ import annotations

__all__ = ["SipError", "SipParseError", "SipValueError"]

_MAX_REASON = 120


class SipError(Exception):
    """Root of every exception raised by raftpbx.transport.sip."""


class SipParseError(SipError):
    """Malformed or unacceptable SIP input.

    `status` is the response code a server should answer with (when the input was a request and
    enough of it was understood to answer); `reason` is a short explanation usable as reason phrase.
    """

    status: int
    reason: str

    def __init__(self, status: int = 400, reason: str = "Bad Request") -> None:
        clean = "".join(ch if " " <= ch < "\x7f" else " " for ch in reason).strip()
        if len(clean) > _MAX_REASON:
            clean = clean[: _MAX_REASON - 3] + "..."
        self.status = status
        self.reason = clean or "Bad Request"
        super().__init__(status, self.reason)

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


class SipValueError(SipError, ValueError):
    """A value given by local code cannot be put in a SIP message (e.g. CR/LF in a header value)."""
