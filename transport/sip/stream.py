"""Framing SIP messages on stream transports (TCP, TLS): RFC 3261 §18.3, RFC 5626 §3.5.1/§4.4.1.

Theory of operation: the transport `feed()`s whatever bytes arrive and calls `StreamFramer.next_frame()`
(the server's TCP transport) or `StreamParser.next_message()` (clients, tests) until it returns None. At a
message boundary the framer looks at what comes first:

- `\\r\\n\\r\\n` is a keep-alive ping (RFC 5626 §4.4.1): a `KeepAlive` with `ping=True`; the transport
  answers it with `PONG` (a single CRLF, RFC 5626 §3.5.1).
- a lone `\\r\\n` followed by something else is a pong (or a stray CRLF, which §7.5 says to ignore):
  it is returned as `KeepAlive(ping=False)`. A CRLF at the very end of the buffer is held until the
  next bytes show whether it starts a ping; a client waiting for a pong calls `take_pong()`.
- anything else is the start of a message: its header section ends at the first empty line, and the raw
  Content-Length of that section (exactly one `Content-Length`/`l` field, a plain decimal number, not
  folded; mandatory on streams, §18.3, §20.14) fixes the frame; the whole frame (head and body) is then
  parsed by `message.parse_message`.

Invariants:
- the same bytes give the same sequence of results however they are split across `feed()` calls
  (searching resumes where it stopped, so feeding one byte at a time stays linear);
- a frame that does not parse raises `StreamError(framing_lost=False)`: it is already skipped and the
  next message follows (the server answers it statelessly and keeps the connection). A missing,
  repeated or non-numeric Content-Length, or bytes that cannot start a message, raise
  `StreamError(framing_lost=True)` and poison the framer: the byte stream can no longer be framed and the
  connection must close. `StreamParser` turns any error into `SipParseError` and poisons itself;
- memory is bounded: a header section or message larger than `limits.max_message` loses framing with 513,
  a Content-Length announcing a body that would exceed it with 413, before the body is buffered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .errors import SipParseError
from .message import DEFAULT_LIMITS, Limits, Request, Response, find_head_end, parse_message

__all__ = ["PONG", "KeepAlive", "StreamError", "StreamFramer", "StreamParser", "is_keepalive"]

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
    return datagram[:1] in b"\r\n" and not datagram.strip(b"\r\n")  # the first byte decides most: no copy


class StreamError(Exception):
    """What `StreamFramer.next_frame` raises: `error` (status and reason for the stateless answer), the bytes
    of the bad message (`data`), and whether the stream is still framed (`framing_lost` False: the bad
    message was skipped whole, the next one follows) or not (the connection must close)."""

    def __init__(self, error: SipParseError, data: bytes | None, *, framing_lost: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.data = data
        self.framing_lost = framing_lost


def _raw_content_length(head: bytes) -> int | None:
    """The Content-Length of a header section read from the raw lines, without parsing anything else:
    the value of the one `Content-Length` (or compact `l`) field if it is a plain decimal number; None if
    there is none, more than one, a folded one, or a value that is not a number (framing is then lost)."""
    found: int | None = None
    lines = head.split(b"\n")
    for i, line in enumerate(lines):
        if i == 0:
            continue  # the start line
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        if name.strip().lower() not in (b"content-length", b"l") or name[:1] in (b" ", b"\t"):
            continue
        text = value.strip(b" \t\r")
        if found is not None or not text.isdigit() or len(text) > 12:
            return None
        nxt = lines[i + 1] if i + 1 < len(lines) else b""
        if nxt[:1] in (b" ", b"\t"):
            return None  # folded onto the next line: not a plain number
        found = int(text)
    return found


class StreamFramer:
    """Splits a byte stream into SIP messages and keep-alives (RFC 3261 §18.3, RFC 5626 §4.4.1) and, unlike
    `StreamParser`, survives a bad message whose length is known: framing reads only
    the raw Content-Length of the header section, then the whole frame (head and body) is parsed by
    `parse_message`. A frame that fails to parse raises `StreamError(framing_lost=False)` and is already
    skipped; a missing, repeated or non-numeric Content-Length, a header section or body beyond
    `limits.max_message`, or bytes that cannot start a message raise `StreamError(framing_lost=True)` and
    poison the framer (the connection must close). Keep-alives as in `StreamParser`: CRLF CRLF is a ping,
    a lone CRLF a pong; a CR at the end of the buffer waits for what follows."""

    __slots__ = ("_buf", "_error", "_frame", "_limits", "_scan")

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._buf = bytearray()
        self._scan = 0
        self._frame: int | None = None  # length of the message at the front, once its head is read
        self._error: StreamError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a message."""
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        """Append received bytes (raises the stored error if framing was lost)."""
        if self._error is not None:
            raise self._error
        self._buf += data

    def take_pong(self) -> bool:
        """Consume a lone CRLF waiting at a message boundary (a pong, RFC 5626 §4.4.1); True if any."""
        if self._error is None and self._frame is None and self._buf == PONG:
            self._buf.clear()
            self._scan = 0
            return True
        return False

    def _lost(self, status: int, reason: str, data: bytes | None) -> StreamError:
        self._error = StreamError(SipParseError(status, reason), data, framing_lost=True)
        return self._error

    def next_frame(self) -> Request | Response | KeepAlive | None:
        """The next message or keep-alive; None when more bytes are needed. Raises only `StreamError`."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except StreamError:
            raise
        except Exception as exc:  # pragma: no cover - a bug; never raise anything but StreamError
            raise self._lost(400, "Unparseable message", None) from exc

    def _next(self) -> Request | Response | KeepAlive | None:
        buf = self._buf
        limits = self._limits
        if self._frame is None:
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
                raise self._lost(400, "Bare CR before the start line", None)
            head_end, body_start = find_head_end(buf, max(0, self._scan - 3))
            if head_end < 0:
                if len(buf) > limits.max_message:
                    raise self._lost(513, "Message Too Large", bytes(buf[: limits.max_message]))
                self._scan = len(buf)
                return None
            head = bytes(buf[:head_end])
            if body_start > limits.max_message:
                raise self._lost(513, "Message Too Large", head)
            if head_end == 0:
                raise self._lost(400, "Empty message", None)
            length = _raw_content_length(head)
            if length is None:
                raise self._lost(400, "Missing or invalid Content-Length on a stream transport", head)
            if body_start + length > limits.max_message:
                raise self._lost(413, "Request Entity Too Large", head)
            self._frame = body_start + length
        end = self._frame
        if len(buf) < end:
            return None
        frame = bytes(buf[:end])
        del buf[:end]
        self._frame = None
        self._scan = 0
        try:
            return parse_message(frame, limits)
        except SipParseError as exc:
            raise StreamError(exc, frame, framing_lost=False) from None


class StreamParser:
    """Splits a byte stream into SIP messages and keep-alives, for a peer that cannot skip a bad message (a
    client, a test): `StreamFramer` underneath, but any error raises `SipParseError` and poisons the parser."""

    __slots__ = ("_error", "_framer")

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._framer = StreamFramer(limits)
        self._error: SipParseError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a message."""
        return self._framer.buffered

    def feed(self, data: bytes) -> None:
        """Append received bytes (raises the stored error if the stream already failed)."""
        if self._error is not None:
            raise self._error
        self._framer.feed(data)

    def next_message(self) -> Request | Response | KeepAlive | None:
        """The next complete message or keep-alive, or None when more bytes are needed."""
        if self._error is not None:
            raise self._error
        try:
            return self._framer.next_frame()
        except StreamError as exc:
            self._error = exc.error
            raise self._error from None

    def take_pong(self) -> bool:
        """Consume a lone CRLF waiting at a message boundary (a pong, RFC 5626 §4.4.1); True if any."""
        return self._error is None and self._framer.take_pong()
