"""Structured logging for the node: one line per event, `key=value` (default) or JSON lines.

Theory of operation: code logs an event name plus fields, `log.info("rpc.call", method=m, ms=3.1)`, via
`get_logger(name)`. The stdlib `logging` machinery carries the fields in `record.fields`; `configure`
installs one handler (stderr or a file) with the chosen formatter. Records from libraries (aiohttp,
pysyncobj) are rendered the same way with their message in `msg`.

Invariant: secrets never reach a log line. Fields whose name suggests a secret (password, secret, token,
ha1, authorization) are replaced by `***` whatever their value; callers still must not pass them.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import orjson

__all__ = ["StructuredLogger", "configure", "get_logger"]

_REDACT = ("password", "secret", "token", "ha1", "authorization")
_RESERVED = ("ts", "level", "logger", "event")


def _redacted(name: str, value: Any) -> Any:
    lowered = name.lower()
    if any(word in lowered for word in _REDACT):
        return "***"
    return value


class StructuredLogger:
    """A thin wrapper: `logger.info(event, **fields)`."""

    __slots__ = ("_logger",)

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def _log(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={"fields": fields}, stacklevel=3)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        if self._logger.isEnabledFor(logging.ERROR):
            self._logger.error(event, extra={"fields": fields}, exc_info=True, stacklevel=2)


def get_logger(name: str) -> StructuredLogger:
    return StructuredLogger(logging.getLogger(name))


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "logger": record.name,
    }
    fields = getattr(record, "fields", None)
    if isinstance(fields, dict):
        out["event"] = record.msg
        for name, value in fields.items():
            key = f"f_{name}" if name in _RESERVED else name
            out[key] = _redacted(name, value)
    else:
        out["event"] = "log"
        out["msg"] = record.getMessage()
    if record.exc_info:
        out["exc"] = logging.Formatter().formatException(record.exc_info)
    return out


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = []
        for name, value in _record_fields(record).items():
            text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
            if text == "" or any(c in text for c in ' "=\n\t'):
                text = orjson.dumps(text).decode()
            parts.append(f"{name}={text}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return orjson.dumps(_record_fields(record), default=str).decode()


def configure(level: str = "info", fmt: str = "kv", file: Path | None = None) -> None:
    """Install the one handler of the process (replaces any previous configuration)."""
    handler: logging.Handler
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # aiohttp's access log would repeat every RPC; our own rpc.call line carries what matters.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
