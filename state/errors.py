"""Exceptions of the replicated core.

`StateError` is the root of this layer: everything `state/` raises on purpose derives from it.
`CodecError` means bytes (a log entry, a command, a snapshot) could not be decoded or an event could not
be encoded; decoding never raises anything else. `ValidationError` is raised by the `decide_*`
functions when user input is unacceptable; it names the offending field and never quotes a password.
"""

from __future__ import annotations


class StateError(Exception):
    """Root of every exception raised on purpose by `raftpbx.state`."""


class CodecError(StateError):
    """Bytes that are not a valid entry, command, event or snapshot (or an event that cannot be encoded)."""


class ValidationError(StateError):
    """User input rejected by a decision; `field` names the input, `message` says what is wrong.

    Messages are fixed strings chosen by the decision functions: they never contain the password.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __repr__(self) -> str:
        return f"ValidationError(field={self.field!r}, message={self.message!r})"

    def to_dict(self) -> dict[str, str]:
        """The error as a JSON-ready mapping for the RPC layer."""
        return {"field": self.field, "message": self.message}
