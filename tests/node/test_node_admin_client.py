"""The admin client's retries (same op_id, bounded, next URL), table rendering, and log redaction."""

from __future__ import annotations

import io
import logging
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest

from raftpbx.admin import AdminClient, AdminError, ConnectionFailed, render_table, run_command
from raftpbx.cli import build_parser
from raftpbx.logs import configure, get_logger
from raftpbx.rpc import INVALID_PARAMS, PROPOSAL_TIMEOUT, UNAUTHORIZED


class ScriptedServer:
    """A JSON-RPC endpoint answering from a script of replies; records every request body."""

    def __init__(self, replies: list[tuple[int, Any]]) -> None:
        self.replies = replies
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = orjson.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"auth": self.headers.get("Authorization"), **body})
                status, reply = outer.replies.pop(0)
                if isinstance(reply, dict) and "id" not in reply:
                    reply = {"jsonrpc": "2.0", "id": body["id"], **reply}
                data = orjson.dumps(reply)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server() -> Iterator[Any]:
    servers: list[ScriptedServer] = []

    def make(replies: list[tuple[int, Any]]) -> ScriptedServer:
        s = ScriptedServer(replies)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed


TIMEOUT_ERROR = {"error": {"code": PROPOSAL_TIMEOUT, "message": "timeout: outcome unknown", "data": {"op_id": "x"}}}
OK = {"result": {"status": "applied", "op_id": "x", "result": {"extension": "1001"}, "applied_index": 3}}


def test_unknown_outcome_is_retried_with_the_same_op_id(server: Any) -> None:
    s = server([(200, TIMEOUT_ERROR), (200, TIMEOUT_ERROR), (200, OK)])
    client = AdminClient([s.url], "tok", attempts=4)
    params = {"extension": "1001", "password": "pw-pw-pw-pw", "op_id": "fixed-op"}
    assert client.call("extension.create", params)["status"] == "applied"
    assert [r["params"]["op_id"] for r in s.requests] == ["fixed-op"] * 3
    assert {r["auth"] for r in s.requests} == {"Bearer tok"}


def test_retries_are_bounded(server: Any) -> None:
    s = server([(200, TIMEOUT_ERROR)] * 5)
    client = AdminClient([s.url], "tok", attempts=3)
    with pytest.raises(AdminError) as info:
        client.call("extension.delete", {"extension": "1001", "op_id": "o"})
    assert info.value.code == PROPOSAL_TIMEOUT and len(s.requests) == 3


def test_connection_failure_moves_to_the_next_node(server: Any) -> None:
    s = server([(200, OK)])
    client = AdminClient([closed_port_url(), s.url], "tok")
    assert client.call("extension.create", {"extension": "1001", "op_id": "o"})["status"] == "applied"
    with pytest.raises(ConnectionFailed):
        AdminClient([closed_port_url()], "tok", attempts=2).call("node.info")


def test_definitive_errors_are_not_retried(server: Any) -> None:
    bad = {"error": {"code": INVALID_PARAMS, "message": "invalid params: password: required",
                     "data": {"field": "password", "message": "required"}}}
    s = server([(200, bad), (401, {"error": {"code": UNAUTHORIZED, "message": "unauthorized"}})])
    client = AdminClient([s.url], "tok")
    with pytest.raises(AdminError) as info:
        client.call("extension.create", {"extension": "1001"})
    assert info.value.data["field"] == "password"
    with pytest.raises(AdminError) as info:
        client.call("state.digest")
    assert info.value.code == UNAUTHORIZED
    assert len(s.requests) == 2


def test_cli_create_sends_one_op_id_and_reads_the_password_from_stdin(server: Any) -> None:
    s = server([(200, TIMEOUT_ERROR), (200, OK)])
    ns = build_parser().parse_args(["admin", "--url", s.url, "--token", "t", "ext", "create", "1001",
                                    "--password-stdin", "--display-name", "Alice"])
    out = io.StringIO()
    assert run_command(AdminClient([s.url], "t"), ns, out, stdin=io.StringIO("s3cret-Pass\n"),
                       prompt=lambda _: "") == 0
    assert [r["params"] for r in s.requests] == [
        {"extension": "1001", "password": "s3cret-Pass", "display_name": "Alice",
         "op_id": s.requests[0]["params"]["op_id"]}] * 2
    assert "created extension 1001" in out.getvalue()


def test_render_table() -> None:
    text = render_table([{"id": "n1", "healthy": True, "applied_index": None}, {"id": "node22", "healthy": False}],
                        [("id", "NODE"), ("healthy", "HEALTHY"), ("applied_index", "APPLIED")])
    assert text.splitlines() == [
        "NODE    HEALTHY  APPLIED",
        "------  -------  -------",
        "n1      yes      -",
        "node22  no       -",
    ]


def test_logs_are_structured_and_redact_secrets(tmp_path: Path) -> None:
    path = tmp_path / "node.log"
    configure("info", "json", path)
    try:
        log = get_logger("raftpbx.test")
        log.info("extension.created", extension="1001", password="hunter2-hunter2", admin_token="tok-tok")
        logging.getLogger("pysyncobj.fake").warning("plain %s", "message")
        log.debug("hidden")
    finally:
        for handler in logging.getLogger().handlers:
            handler.flush()
        configure("warning", "kv", None)
    lines = [orjson.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["event"] == "extension.created" and lines[0]["extension"] == "1001"
    assert lines[0]["password"] == "***" and lines[0]["admin_token"] == "***"
    assert lines[1]["msg"] == "plain message" and lines[1]["level"] == "warning"
    assert len(lines) == 2
    assert "hunter2" not in path.read_text()
