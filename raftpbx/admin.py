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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from .cdr import records_to_csv, records_to_json
from .rpc import NOT_LEADER, PROPOSAL_TIMEOUT, UNAUTHORIZED

__all__ = ["AdminClient", "AdminError", "ConnectionFailed", "load_cluster_file", "new_op_id", "render_table"]

RETRYABLE_CODES = (PROPOSAL_TIMEOUT, NOT_LEADER)
CDR_PAGE = 1000


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
        service = result.get("service_address") or {}
        if service.get("address"):
            human += (f"service address: {service['address']} ({service.get('mode')}), "
                      f"held by {service.get('holder') or '-'}\n")
        human += render_table(result.get("nodes", []), [("id", "NODE"), ("role", "ROLE"), ("healthy", "HEALTHY"),
                                                        ("applied_index", "APPLIED"), ("term", "TERM"),
                                                        ("service_held", "SERVICE"), ("drained", "DRAINED"),
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
    elif group == "reg" and command == "list":
        result = _binding_list(client, getattr(ns, "extension", None))
        rows = [{**b, "registered_at": _time(b.get("registered_at"))} for b in result["bindings"]]
        human = render_table(rows, [("extension", "EXTENSION"), ("contact", "CONTACT"), ("expires_in", "EXPIRES IN"),
                                    ("q", "Q"), ("received", "RECEIVED"), ("transport", "TRANSPORT"),
                                    ("node_id", "NODE"), ("registered_at", "REGISTERED")])
        human += f"\n({len(rows)} bindings, applied index {result.get('applied_index')})"
    elif group == "calls":
        result = client.call("call.active")
        rows = [{**c, "started_at": _time(c.get("started_at")), "nodes": ",".join(c.get("nodes") or ())}
                for c in result.get("calls", [])]
        human = render_table(rows, [("call_id", "CALL ID"), ("caller", "CALLER"), ("callee", "CALLEE"),
                                    ("progress", "PROGRESS"), ("started_at", "STARTED"), ("age", "AGE (S)"),
                                    ("nodes", "NODES")])
        human += f"\n({len(rows)} active calls, applied index {result.get('applied_index')})"
    elif group == "cdr":
        return _cdr_command(client, ns, out)
    elif group in ("cluster", "backup"):
        result, human = _cluster_ops(client, ns)
    else:
        raise UsageError(f"unknown command: {group} {command}")
    if as_json:
        out.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        out.write(human + "\n")
    return 0


def _members_table(members: Sequence[Mapping[str, Any]]) -> str:
    rows = [{**m, "bound": "yes" if m.get("bound") else "-"} for m in members]
    return render_table(rows, [("id", "NODE"), ("raft", "RAFT"), ("admin_url", "ADMIN URL"),
                               ("bound", "INCARNATION RECORDED")])


def _cluster_ops(client: AdminClient, ns: Any) -> tuple[Any, str]:
    """Membership, leadership transfer and backup. Never retried: an unknown outcome is reported."""
    command = getattr(ns, "command", None)
    if ns.group == "backup":
        import base64

        from .backup import BackupError, read_backup, write_backup_file

        result = client.call("cluster.backup", retry=False)
        data = base64.b64decode(result["data"])
        try:
            manifest = read_backup(data).manifest  # never write a file that does not verify
            write_backup_file(ns.file, data)
        except (BackupError, OSError) as exc:
            raise AdminError(-32603, f"backup not written: {exc}") from None
        parts = manifest["parts"]
        summary = {"file": ns.file, "bytes": len(data), **{k: manifest[k] for k in (
            "domain", "node", "applied_index", "digest", "extensions", "created_at")},
            "call_history": "cdr" in parts}
        human = (f"backup written to {ns.file} (mode 0600, {len(data)} bytes): applied index "
                 f"{manifest['applied_index']}, {manifest['extensions']} extensions, digest {manifest['digest']}, "
                 f"call history {'included' if 'cdr' in parts else 'absent'}")
        return summary, human
    if command == "members":
        result = client.call("cluster.members")
        return result, _members_table(result["members"])
    if command == "add-node":
        result = client.call("cluster.add_node", {"id": ns.id, "raft": ns.raft, "admin_url": ns.admin_url},
                             retry=False)
        human = (f"node {ns.id} added. Start it on an empty data dir with:\n"
                 f"  raftpbx node --config NODE.toml --join --join-token {result['token']}\n"
                 "(the token is single-use: the first data dir that presents it is bound to this node id)\n"
                 + _members_table(result["members"]))
        return result, human
    if command == "remove-node":
        result = client.call("cluster.remove_node", {"id": ns.id}, retry=False)
        return result, f"node {ns.id} removed\n" + _members_table(result["members"])
    if command == "transfer-leader":
        params = {"to": ns.to} if ns.to else {}
        result = client.call("cluster.transfer_leader", params, retry=False)
        return result, f"leader is now {result['leader']}"
    raise UsageError(f"unknown command: cluster {command}")


def _binding_list(client: AdminClient, extension: str | None) -> dict[str, Any]:
    """Every live binding (all pages) as one `binding.list` result."""
    params: dict[str, Any] = {} if extension is None else {"extension": extension}
    bindings: list[Any] = []
    result: dict[str, Any] = {}
    for _ in range(10_000):
        result = client.call("binding.list", {**params, "offset": len(bindings)})
        bindings += result.get("bindings", [])
        if result.get("next_offset") is None:
            break
    return {**result, "bindings": bindings, "next_offset": None}


_AGE = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, *, option: str, now: float | None = None) -> float:
    """Epoch seconds from epoch seconds, ISO 8601 (UTC unless an offset is given) or an age (`30m`, `2h`)."""
    value = text.strip()
    try:
        return float(value)
    except ValueError:
        pass
    if len(value) >= 2 and value[-1] in _AGE and value[:-1].isdigit():
        return (time.time() if now is None else now) - int(value[:-1]) * _AGE[value[-1]]
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise UsageError(f"{option}: expected epoch seconds, ISO 8601 or an age like 30m, got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _cdr_command(client: AdminClient, ns: Any, out: Any) -> int:
    params: dict[str, Any] = {}
    if ns.since is not None:
        params["since"] = parse_time(ns.since, option="--since")
    if ns.until is not None:
        params["until"] = parse_time(ns.until, option="--until")
    if ns.extension is not None:
        params["extension"] = ns.extension
    if ns.disposition is not None:
        params["disposition"] = ns.disposition
    if getattr(ns, "trunk", None) is not None:
        params["trunk"] = ns.trunk
    export = ns.csv or ns.export_json or ns.json
    if ns.limit is not None and ns.limit < 1:
        raise UsageError("--limit: expected a positive number")
    wanted = ns.limit if ns.limit is not None else (None if export else 100)
    records: list[dict[str, Any]] = []
    cursor = None
    total = 0
    while wanted is None or len(records) < wanted:
        page_size = CDR_PAGE if wanted is None else min(CDR_PAGE, wanted - len(records))
        page = client.call("cdr.list", {**params, "limit": page_size, **({"cursor": cursor} if cursor else {})})
        records += page.get("records", [])
        total = int(page.get("total", len(records)))
        cursor = page.get("next_cursor")
        if cursor is None:
            break
    if ns.csv:
        out.write(records_to_csv(records))
    elif export:
        out.write(records_to_json(records))
    else:
        rows = [{**r, "started_at": _time(r.get("started_at")), "nodes": ",".join(r.get("nodes") or ()),
                 "trunk": _trunk_cell(r),
                 "duration": None if r.get("duration") is None else f"{r['duration']:.1f}"} for r in records]
        out.write(render_table(rows, [("started_at", "STARTED"), ("caller", "CALLER"), ("callee", "CALLEE"),
                                      ("disposition", "DISPOSITION"), ("duration", "DURATION"),
                                      ("billable_seconds", "BILLABLE"), ("hangup_by", "HANGUP BY"),
                                      ("status_code", "STATUS"), ("trunk", "TRUNK"), ("nodes", "NODES"),
                                      ("call_id", "CALL ID")]))
        more = f"; {total - len(records)} more: use --limit or --since" if total > len(records) else ""
        out.write(f"\n({len(records)} of {total} call records{more})\n")
    return 0


def _trunk_cell(record: Mapping[str, Any]) -> str | None:
    """The TRUNK cell of a call record: "office-b (out)" / "office-b (in)", or "-" for a local call."""
    trunk = record.get("trunk") or ""
    if not trunk:
        return None
    short = {"inbound": "in", "outbound": "out"}.get(str(record.get("direction") or ""), "")
    return f"{trunk} ({short})" if short else str(trunk)


def _write_summary(verb: str, extension: str, result: Mapping[str, Any]) -> str:
    if result.get("status") == "duplicate":
        return (f"extension {extension}: this operation (op_id {result.get('op_id')}) was already applied; "
                "nothing changed")
    return f"{verb} extension {extension} (op_id {result.get('op_id')}, index {result.get('applied_index')})"
