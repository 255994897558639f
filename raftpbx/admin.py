"""Admin client: JSON-RPC calls to a node, safe retries, and human tables.

Theory of operation: `AdminClient` posts JSON-RPC 2.0 requests with the bearer token to one of a list
of admin URLs (one `--url`, or every node of a `cluster.json`). Writes carry an `op_id` made here, once per
user action, so that a retry after an unknown outcome (`PROPOSAL_TIMEOUT`, a dropped connection, a node
that died mid-call) resends the same `op_id` and the replicated state applies it at most once; a retry moves
on to the next URL. Retries are bounded in count and time. Errors the server reports definitively
(invalid params, not found, no quorum, unauthorized) are not retried.

The client is synchronous (stdlib `urllib`): it runs once per CLI invocation.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from .rpc import NOT_LEADER, PROPOSAL_TIMEOUT, UNAUTHORIZED

__all__ = ["AdminClient", "AdminError", "ConnectionFailed", "load_cluster_file", "new_op_id", "render_table"]

RETRYABLE_CODES = (PROPOSAL_TIMEOUT, NOT_LEADER)


class AdminError(Exception):
    """An error object returned by the server (`code`, `message`, optional `data`)."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


class ConnectionFailed(Exception):
    """No node could be reached (after the bounded retries)."""


def new_op_id() -> str:
    return uuid.uuid4().hex


def load_cluster_file(path: str | Path) -> dict[str, Any]:
    """Read a `cluster.json` written by `raftpbx demo`; raises ValueError with a clear message."""
    try:
        doc = orjson.loads(Path(path).read_bytes())
    except OSError as exc:
        raise ValueError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list):
        raise ValueError(f"{path}: expected an object with a 'nodes' list")
    return doc


class AdminClient:
    """Calls JSON-RPC methods on the first reachable of `urls`."""

    def __init__(self, urls: Sequence[str], token: str, *, timeout: float = 5.0,
                 attempts: int = 4, retry_deadline: float = 15.0) -> None:
        if not urls:
            raise ValueError("no admin URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.token = token
        self.timeout = timeout
        self.attempts = attempts
        self.retry_deadline = retry_deadline
        self._next_id = 0
        self._preferred = 0

    def _post(self, url: str, body: bytes) -> Any:
        request = urllib.request.Request(
            url + "/rpc", data=body, method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                raise AdminError(UNAUTHORIZED, "unauthorized: missing or wrong admin token") from None
            raw = exc.read()
            if not raw:
                raise AdminError(exc.code, f"HTTP {exc.code} from {url}") from None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise AdminError(-32700, f"invalid JSON reply from {url}") from None

    def call(self, method: str, params: Mapping[str, Any] | None = None, *, retry: bool = True) -> Any:
        """Call `method`; return its result or raise `AdminError` / `ConnectionFailed`.

        With `retry`, connection failures and unknown outcomes are retried (same params, hence same
        op_id) on the next URL, at most `attempts` times within `retry_deadline` seconds.
        """
        self._next_id += 1
        body = orjson.dumps({"jsonrpc": "2.0", "id": self._next_id, "method": method, "params": dict(params or {})})
        deadline = time.monotonic() + self.retry_deadline
        last: Exception | None = None
        attempts = self.attempts if retry else 1
        for attempt in range(attempts):
            url = self.urls[(self._preferred + attempt) % len(self.urls)]
            try:
                reply = self._post(url, body)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
                last = ConnectionFailed(f"{url}: {getattr(exc, 'reason', exc)}")
            else:
                if not isinstance(reply, dict):
                    raise AdminError(-32600, f"malformed reply from {url}")
                error = reply.get("error")
                if error is None:
                    self._preferred = (self._preferred + attempt) % len(self.urls)
                    return reply.get("result")
                exc_admin = AdminError(int(error.get("code", -32603)), str(error.get("message", "error")),
                                       error.get("data"))
                if exc_admin.code not in RETRYABLE_CODES:
                    raise exc_admin
                last = exc_admin
            if attempt + 1 >= attempts or time.monotonic() >= deadline:
                break
            # Bounded backoff before the next attempt (a client retry, not a test wait).
            time.sleep(min(0.2 * (attempt + 1), max(0.0, deadline - time.monotonic())))
        assert last is not None
        raise last


def render_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Render rows as a plain-text table; `columns` is (key, header) pairs."""
    cells = [[header for _, header in columns]]
    for row in rows:
        cells.append([_cell(row.get(key)) for key, _ in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(text.ljust(widths[i]) for i, text in enumerate(line)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


# --- the `raftpbx admin` commands ---------------------------------------------------------------------


class UsageError(Exception):
    """Bad command-line usage (exit status 2)."""


def _time(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(value)) + "Z"


def read_password(ns: Any, *, required: bool, stdin: Any, prompt: Any) -> str | None:
    """The password from --password, --password-stdin or an interactive prompt (typed twice)."""
    if getattr(ns, "password", None) is not None and getattr(ns, "password_stdin", False):
        raise UsageError("use either --password or --password-stdin")
    if getattr(ns, "password", None) is not None:
        return str(ns.password)
    if getattr(ns, "password_stdin", False):
        line = stdin.readline()
        return str(line.rstrip("\r\n"))
    if not required and not getattr(ns, "prompt_password", False):
        return None
    if not stdin.isatty():
        raise UsageError("no password given: use --password, --password-stdin, or run interactively")
    first = prompt("Password: ")
    if prompt("Repeat password: ") != first:
        raise UsageError("the two passwords differ")
    return str(first)


def _write_call(client: AdminClient, method: str, params: dict[str, Any], ns: Any) -> Any:
    params["op_id"] = getattr(ns, "op_id", None) or new_op_id()
    return client.call(method, params)


def run_command(client: AdminClient, ns: Any, out: Any, *, stdin: Any, prompt: Any) -> int:
    """Run one parsed `raftpbx admin` command, printing to `out`; return 0 (errors raise)."""
    group, command = ns.group, ns.command
    as_json = bool(ns.json)
    result: Any
    human: str
    if group == "cluster" and command == "status":
        result = client.call("cluster.status")
        human = (f"leader: {result.get('leader') or '-'}   term: {result.get('term')}   "
                 f"commit index: {result.get('commit_index')}\n")
        human += render_table(result.get("nodes", []), [("id", "NODE"), ("role", "ROLE"), ("healthy", "HEALTHY"),
                                                        ("applied_index", "APPLIED"), ("term", "TERM"),
                                                        ("admin_url", "ADMIN URL")])
    elif group == "node" and command == "info":
        result = client.call("node.info")
        human = "\n".join(f"{key}: {_cell(value)}" for key, value in result.items())
    elif group == "state" and command == "digest":
        result = client.call("state.digest")
        human = f"digest: {result['digest']}\napplied index: {result['applied_index']}"
    elif group == "ext" and command == "list":
        result = client.call("extension.list")
        rows = [{**r, "updated_at": _time(r.get("updated_at"))} for r in result.get("extensions", [])]
        human = render_table(rows, [("extension", "EXTENSION"), ("display_name", "DISPLAY NAME"),
                                    ("realm", "REALM"), ("updated_at", "UPDATED")])
        human += f"\n({len(rows)} extensions, applied index {result.get('applied_index')})"
    elif group == "ext" and command == "get":
        result = client.call("extension.get", {"extension": ns.extension})
        human = "\n".join(f"{key}: {_time(value) if key.endswith('_at') else _cell(value)}"
                          for key, value in result.items())
    elif group == "ext" and command == "create":
        params: dict[str, Any] = {"extension": ns.extension}
        params["password"] = read_password(ns, required=True, stdin=stdin, prompt=prompt)
        if ns.display_name is not None:
            params["display_name"] = ns.display_name
        result = _write_call(client, "extension.create", params, ns)
        human = _write_summary("created", ns.extension, result)
    elif group == "ext" and command == "update":
        params = {"extension": ns.extension}
        password = read_password(ns, required=False, stdin=stdin, prompt=prompt)
        if password is not None:
            params["password"] = password
        if ns.display_name is not None:
            params["display_name"] = ns.display_name
        if len(params) == 1:
            raise UsageError("nothing to update: give --display-name and/or a password option")
        result = _write_call(client, "extension.update", params, ns)
        human = _write_summary("updated", ns.extension, result)
    elif group == "ext" and command == "delete":
        result = _write_call(client, "extension.delete", {"extension": ns.extension}, ns)
        human = _write_summary("deleted", ns.extension, result)
    else:
        raise UsageError(f"unknown command: {group} {command}")
    if as_json:
        out.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        out.write(human + "\n")
    return 0


def _write_summary(verb: str, extension: str, result: Mapping[str, Any]) -> str:
    if result.get("status") == "duplicate":
        return (f"extension {extension}: this operation (op_id {result.get('op_id')}) was already applied; "
                "nothing changed")
    return f"{verb} extension {extension} (op_id {result.get('op_id')}, index {result.get('applied_index')})"
