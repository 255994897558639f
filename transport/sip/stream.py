"""Framing SIP messages on stream transports (TCP, TLS): RFC 3261 §18.3, RFC 5626 §3.5.1/§4.4.1.

Theory of operation: the transport `feed()`s whatever bytes arrive and calls `next_message()` until
it returns None. At a message boundary the parser looks at what comes first:

- `\\r\\n\\r\\n` is a keep-alive ping (RFC 5626 §4.4.1): `next_message()` returns a `KeepAlive` with
  `ping=True`; the transport answers it with `PONG` (a single CRLF, RFC 5626 §3.5.1).
- a lone `\\r\\n` followed by something else is a pong (or a stray CRLF, which §7.5 says to ignore):
  it is returned as `KeepAlive(ping=False)`. A CRLF at the very end of the buffer is held until the
  next bytes show whether it starts a ping; a client waiting for a pong calls `take_pong()`.
- anything else is the start of a message: its header section ends at the first empty line; the
  head is parsed and validated as soon as it is complete (`message.parse_head`), then the body is
  exactly Content-Length octets. Content-Length is mandatory on streams (§18.3, §20.14).

Invariants:
- the same bytes give the same sequence of results however they are split across `feed()` calls
  (searching resumes where it stopped, so feeding one byte at a time stays linear);
- a framing or parse error raises `SipParseError` and poisons the parser: every later call raises
  the same error, because the byte stream can no longer be framed and the connection must close;
- memory is bounded: a header section or message larger than `limits.max_message` raises 513, a
  Content-Length announcing a body that would exceed it raises 413 before the body is buffered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .errors import SipParseError
from .message import DEFAULT_LIMITS, Limits, Request, Response, find_head_end, parse_head

__all__ = ["PONG", "KeepAlive", "StreamParser", "is_keepalive"]

PONG: Final = b"\r\n"
PING: Final = b"\r\n\r\n"


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """A keep-alive seen between messages: `ping` (double CRLF, answer with `PONG`) or a pong."""

    ping: bool


_PING_EVENT: Final = KeepAlive(ping=True)
_PONG_EVENT: Final = KeepAlive(ping=False)


def is_keepalive(datagram: bytes) -> bool:
    """True for a datagram made only of CR/LF (UDP keep-alives some phones send): drop it silently."""
    return not datagram.strip(b"\r\n")


class StreamParser:
    """Splits a byte stream into SIP messages and keep-alives."""

    __slots__ = ("_buf", "_error", "_limits", "_pending", "_scan")

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._buf = bytearray()
        self._scan = 0
        self._pending: tuple[Request | Response, int, int] | None = None
        self._error: SipParseError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a message."""
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        """Append received bytes (raises the stored error if the stream already failed)."""
        if self._error is not None:
            raise self._error
        self._buf += data

    def next_message(self) -> Request | Response | KeepAlive | None:
        """The next complete message or keep-alive, or None when more bytes are needed."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except SipParseError as exc:
            self._error = exc
            raise
        except Exception as exc:  # pragma: no cover - a bug; never raise anything but SipParseError
            self._error = SipParseError(400, "Unparseable message")
            raise self._error from exc

    def take_pong(self) -> bool:
        """Consume a lone CRLF waiting at a message boundary (a pong, RFC 5626 §4.4.1); True if any."""
        if self._error is None and self._pending is None and self._buf == PONG:
            self._buf.clear()
            self._scan = 0
            return True
        return False

    def _next(self) -> Request | Response | KeepAlive | None:
        buf = self._buf
        if self._pending is None:
            if buf[:1] == b"\r":
                if buf[:4] == PING:
                    del buf[:4]
                    self._scan = 0
                    return _PING_EVENT
                if PING.startswith(buf[:4]):
                    return None  # could still become a ping
                if buf[:2] == PONG:
                    del buf[:2]
                    self._scan = 0
                    return _PONG_EVENT
                raise SipParseError(400, "Bare CR before the start line")
            head_end, body_start = find_head_end(buf, max(0, self._scan - 3))
            limits = self._limits
            if head_end < 0:
                if len(buf) > limits.max_message:
                    raise SipParseError(513, "Message Too Large")
                self._scan = len(buf)
                return None
            if body_start > limits.max_message:
                raise SipParseError(513, "Message Too Large")
            if head_end == 0:
                raise SipParseError(400, "Empty message")
            message, length = parse_head(bytes(buf[:head_end]), limits)
            if length is None:
                raise SipParseError(400, "Missing Content-Length on a stream transport")
            if body_start + length > limits.max_message:
                raise SipParseError(413, "Request Entity Too Large")
            self._pending = (message, body_start, length)
        message, body_start, length = self._pending
        end = body_start + length
        if len(buf) < end:
            return None
        message.body = bytes(buf[body_start:end])
        del buf[:end]
        self._pending = None
        self._scan = 0
        return message
