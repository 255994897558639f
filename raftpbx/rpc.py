"""Admin RPC server: JSON-RPC 2.0 over HTTP (aiohttp, orjson), bearer token, dotted method names.

Theory of operation: `RpcServer` owns an aiohttp application with three routes:
- `POST /rpc`: a JSON-RPC 2.0 request or batch. The bearer token is compared in constant time
  (`hmac.compare_digest`) before the body is even parsed; a missing or wrong token is HTTP 401.
  Methods are registered by dotted name (`extension.create`) and take named params only (an object).
- `GET /metrics`: Prometheus text exposition from a callback (unauthenticated; bind admin to loopback
  or a management network).
- `GET /health`: `ok` while the process serves (unauthenticated, no data).

Invariants:
- every request gets a well-formed JSON-RPC response; a handler never crashes the server: `RpcError`
  becomes its error object, any other exception becomes -32603 (logged, details not leaked);
- invalid params errors carry `data.field` naming the offending field;
- request bodies are bounded (`MAX_BODY`), params must be an object.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from aiohttp import web

from .logs import get_logger

__all__ = [
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "NOT_FOUND",
    "NOT_LEADER",
    "NO_QUORUM",
    "PARSE_ERROR",
    "PROPOSAL_TIMEOUT",
    "REJECTED",
    "REPLICATION_ERROR",
    "UNAUTHORIZED",
    "Params",
    "RpcError",
    "RpcServer",
    "invalid_params",
]

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Server-defined errors (-32000..-32099).
NOT_LEADER = -32000
NO_QUORUM = -32001
PROPOSAL_TIMEOUT = -32002  # outcome unknown: retry with the same op_id
REPLICATION_ERROR = -32003
NOT_FOUND = -32004
REJECTED = -32005  # refused when applied (e.g. a concurrent write won); changed nothing
UNAUTHORIZED = -32040

MAX_BODY = 256 * 1024

log = get_logger("raftpbx.rpc")

Handler = Callable[["Params"], Awaitable[Any]]


class RpcError(Exception):
    """An error to return as a JSON-RPC error object."""

    def __init__(self, code: int, message: str, data: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = dict(data) if data is not None else None

    def to_json(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err


def invalid_params(field: str, message: str) -> RpcError:
    return RpcError(INVALID_PARAMS, f"invalid params: {field}: {message}", {"field": field, "message": message})


class Params:
    """Named params of one call, with typed accessors that raise errors naming the field."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.raw = raw

    def check_allowed(self, *names: str) -> None:
        for name in self.raw:
            if name not in names:
                raise invalid_params(name, "unknown parameter")

    def text(self, name: str, *, required: bool = True, max_len: int = 256) -> Any:
        value = self.raw.get(name)
        if value is None:
            if required:
                raise invalid_params(name, "missing")
            return None
        if not isinstance(value, str):
            raise invalid_params(name, f"expected a string, got {type(value).__name__}")
        if len(value) > max_len:
            raise invalid_params(name, f"longer than {max_len} characters")
        return value

    def integer(self, name: str, *, default: int, minimum: int = 0, maximum: int = 1 << 31) -> int:
        value = self.raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid_params(name, "expected an integer")
        if not minimum <= value <= maximum:
            raise invalid_params(name, f"expected {minimum}..{maximum}")
        return value


class RpcServer:
    """JSON-RPC 2.0 dispatcher plus its aiohttp application."""

    def __init__(self, token: str, *, metrics: Callable[[], str] | None = None) -> None:
        self._token = ("Bearer " + token).encode()
        self._methods: dict[str, Handler] = {}
        self._audited: set[str] = set()
        self._metrics = metrics
        self._runner: web.AppRunner | None = None

    def register(self, name: str, handler: Handler, *, audit: bool = False) -> None:
        """Serve `handler` as method `name`; successful calls of audited methods (writes) log at info."""
        self._methods[name] = handler
        if audit:
            self._audited.add(name)

    @property
    def methods(self) -> list[str]:
        return sorted(self._methods)

    def handler(self, name: str) -> Handler | None:
        """The handler registered as `name` (to wrap it: register again under the same name)."""
        return self._methods.get(name)

    def authorized(self, header: str | None) -> bool:
        supplied = (header or "").encode("utf-8", "replace")
        return hmac.compare_digest(supplied, self._token)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/rpc", self._handle_http)
        app.router.add_get("/metrics", self._handle_metrics)
        app.router.add_get("/health", self._handle_health)
        return app

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True, shutdown_timeout=1.0)
        await site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle_health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _handle_metrics(self, request: web.Request) -> web.Response:
        body = self._metrics() if self._metrics is not None else ""
        return web.Response(text=body, content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def _handle_http(self, request: web.Request) -> web.Response:
        if not self.authorized(request.headers.get("Authorization")):
            log.warning("rpc.unauthorized", peer=request.remote)
            body = {"jsonrpc": "2.0", "id": None,
                    "error": {"code": UNAUTHORIZED, "message": "unauthorized: missing or wrong bearer token"}}
            return web.Response(status=401, body=orjson.dumps(body), content_type="application/json",
                                headers={"WWW-Authenticate": 'Bearer realm="raftpbx"'})
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._json(_error_response(None, RpcError(INVALID_REQUEST, "request too large")), 413)
        try:
            message = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return self._json(_error_response(None, RpcError(PARSE_ERROR, "parse error: invalid JSON")))
        if isinstance(message, list):
            if not message:
                return self._json(_error_response(None, RpcError(INVALID_REQUEST, "empty batch")))
            replies = [r for r in [await self.dispatch(m) for m in message[:100]] if r is not None]
            return self._json(replies) if replies else web.Response(status=204)
        reply = await self.dispatch(message)
        return self._json(reply) if reply is not None else web.Response(status=204)

    @staticmethod
    def _json(body: Any, status: int = 200) -> web.Response:
        return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")

    async def dispatch(self, message: Any) -> dict[str, Any] | None:
        """Run one JSON-RPC request object; returns the response object (None for notifications)."""
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
            return _error_response(None, RpcError(INVALID_REQUEST, "invalid request: expected a JSON-RPC 2.0 object"))
        has_id = "id" in message
        req_id = message.get("id")
        if (has_id and not (req_id is None or isinstance(req_id, str | int))) or isinstance(req_id, bool):
            return _error_response(None, RpcError(INVALID_REQUEST, "invalid request: bad id"))
        method = message.get("method")
        if not isinstance(method, str):
            return _error_response(req_id, RpcError(INVALID_REQUEST, "invalid request: method must be a string"))
        params = message.get("params", {})
        started = time.monotonic()
        try:
            handler = self._methods.get(method)
            if handler is None:
                raise RpcError(METHOD_NOT_FOUND, f"method not found: {method}")
            if not isinstance(params, dict):
                raise RpcError(INVALID_PARAMS, "invalid params: params must be an object (named params)",
                               {"field": "params", "message": "must be an object"})
            result = await handler(Params(params))
        except RpcError as exc:
            log.info("rpc.call", method=method, ok=False, code=exc.code, error=exc.message,
                     ms=round((time.monotonic() - started) * 1000, 2))
            return _error_response(req_id, exc) if has_id else None
        except Exception as exc:
            log.exception("rpc.crash", method=method, error=type(exc).__name__)
            return _error_response(req_id, RpcError(INTERNAL_ERROR, "internal error")) if has_id else None
        if method in self._audited:
            log.info("rpc.call", method=method, ok=True, ms=round((time.monotonic() - started) * 1000, 2))
        else:
            log.debug("rpc.call", method=method, ok=True, ms=round((time.monotonic() - started) * 1000, 2))
        if not has_id:
            return None
        return {"jsonrpc": "2.0", "id": req_id, "result": result}


def _error_response(req_id: Any, exc: RpcError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": req_id, "error": exc.to_json()}
