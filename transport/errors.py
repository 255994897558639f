"""Exceptions of the asyncio transports.

Theory: every failure of the socket layer that reaches a caller is a `TransportError`. OS errors
(`OSError` and its subclasses raised by bind, connect, send) are mapped once, by `map_os_error`, so that
callers above the transport catch one tree and never a bare `OSError`. Protocol callbacks
(`datagram_received`, `data_received`, ...) never raise at all: they catch, count and log, because an
exception there would reach the event loop (STYLE.md "Errors").

Invariant: `TransportError` never carries credentials or message bodies, only addresses and reasons.
"""

from __future__ import annotations

__all__ = [
    "BindError",
    "ConnectError",
    "ConnectionClosedError",
    "ConnectionLimitError",
    "SendError",
    "TransportClosedError",
    "TransportError",
    "map_os_error",
]


class TransportError(Exception):
    """Root of every exception raised by raftpbx.transport outside the SIP core."""


class BindError(TransportError):
    """A listener could not bind its address (in use, not available, permission denied)."""


class ConnectError(TransportError):
    """An outgoing TCP connection could not be established (refused, unreachable, timed out)."""


class ConnectionLimitError(TransportError):
    """The configured maximum number of TCP connections is reached; no new connection is made."""


class ConnectionClosedError(TransportError):
    """The connection a message was meant for is closed or closing."""


class SendError(TransportError):
    """A message could not be handed to the socket (write buffer full, message too large, OS error)."""


class TransportClosedError(TransportError):
    """The transport (listener/endpoint) is closed; nothing more can be sent through it."""


def map_os_error(exc: BaseException, operation: str, address: object = None) -> TransportError:
    """Translate an OS-level exception raised during `operation` into the `TransportError` tree.

    `operation` is "bind", "connect" or "send" (any other string maps to the root class). The result's
    message names the operation, the address and the OS reason; an existing `TransportError` is returned
    unchanged.
    """
    if isinstance(exc, TransportError):
        return exc
    where = f" {address!r}" if address is not None else ""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc) or type(exc).__name__)
    text = f"{operation}{where}: {reason}"
    if operation == "bind":
        return BindError(text)
    if operation == "connect":
        return ConnectError(text)
    if operation == "send":
        if isinstance(exc, ConnectionError):
            return ConnectionClosedError(text)
        return SendError(text)
    return TransportError(text)
