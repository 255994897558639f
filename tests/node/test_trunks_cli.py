"""`raftpbx admin trunk ...` / `route ...` (raftpbx/cli.py) against a node's real admin HTTP server (fake
replicator applying to the real state): human tables, --json, errors naming the field, exit statuses."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from test_trunks import TOKEN, FakeReplicator

from raftpbx import cli
from raftpbx.config import load_config
from raftpbx.rpc import RpcServer
from raftpbx.service import AdminService, StateMachine
from raftpbx.trunks import attach

PASSWORD = "peer-Given-secret-1"


@pytest.fixture
async def admin_url(tmp_path: Path) -> AsyncIterator[tuple[str, StateMachine]]:
    config = load_config(None, env={}, overrides={
        "node.id": "n1", "node.data_dir": str(tmp_path), "cluster.secret": "s" * 32, "admin.token": TOKEN,
        "cluster.domain": "pbx.test"})
    machine = StateMachine()
    service = AdminService(config, machine, FakeReplicator(machine))
    server = RpcServer(TOKEN, metrics=service.metrics)
    service.register(server)
    trunks = attach(config, machine, server, service, interval=1.0)
    client = TestClient(TestServer(server.app(), host="127.0.0.1"))
    await client.start_server()
    try:
        yield str(client.make_url("")).rstrip("/"), machine
    finally:
        await client.close()
        await trunks.aclose()
        await service.close()


async def _admin(url: str, *args: str, stdin: str = "") -> tuple[int, str, str]:
    """Run `raftpbx admin --url URL ARGS` in a thread (the CLI is synchronous); (status, stdout, stderr)."""

    def run() -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                _stdin(stdin):
            status = cli.main(["admin", "--url", url, "--token", TOKEN, *args])
        return status, out.getvalue(), err.getvalue()

    return await asyncio.to_thread(run)


@contextlib.contextmanager
def _stdin(text: str) -> Any:
    import sys

    saved = sys.stdin
    sys.stdin = io.StringIO(text)
    try:
        yield
    finally:
        sys.stdin = saved


async def test_trunk_and_route_commands_round_trip(admin_url: tuple[str, StateMachine]) -> None:
    url, machine = admin_url
    status, out, err = await _admin(url, "trunk", "add", "office-b", "--peer", "127.0.0.21",
                                    "--peer", "127.0.0.22:5070;transport=tcp", "--username", "office-a",
                                    "--realm", "b.test", "--password-stdin", "--allow", "127.0.0.20/30",
                                    stdin=PASSWORD + "\n")
    assert (status, out, err) == (0, "trunk office-b created\n", "")
    with machine.lock:
        trunk = machine.state.trunks["office-b"]
    assert trunk.username == "office-a" and trunk.peers == ("127.0.0.21:5060", "127.0.0.22:5070;transport=tcp")
    status, out, _ = await _admin(url, "trunk", "list")
    assert status == 0
    header, rule, row = out.splitlines()
    assert header.split()[:2] == ["TRUNK", "PEERS"] and set(rule) <= {"-", " "}
    assert row.startswith("office-b") and "127.0.0.21:5060/udp unknown" in row and "office-a@b.test" in row
    assert PASSWORD not in out
    status, out, _ = await _admin(url, "--json", "trunk", "list")
    listed = orjson.loads(out)
    assert status == 0 and listed["trunks"][0]["allow"] == ["127.0.0.20/30"]

    assert (await _admin(url, "route", "add", "to-b", "--pattern", "2xxx", "--trunk", "office-b",
                         "--order", "5"))[:2] == (0, "route to-b created\n")
    status, out, _ = await _admin(url, "route", "list")
    assert status == 0 and out.splitlines()[2].split() == ["5", "to-b", "2XXX", "office-b", "0", "-"]
    status, out, _ = await _admin(url, "route", "test", "2001")
    assert status == 0 and out.startswith("2001: route to-b -> trunk office-b as 2001; peers in order: "
                                          "127.0.0.21:5060;transport=udp")
    status, out, _ = await _admin(url, "route", "test", "555")
    assert out == "555: no route (the caller gets 404)\n"
    status, out, _ = await _admin(url, "trunk", "get", "office-b")
    assert status == 0 and out.strip().endswith("routes: to-b")

    # Refusals name the field and change nothing; exit status 1.
    status, out, err = await _admin(url, "trunk", "add", "office-c", "--peer", "127.0.0.31",
                                    "--allow", "127.0.0.16/28")
    assert status == 1 and out == "" and "allow" in err and "office-b" in err
    status, _, err = await _admin(url, "trunk", "delete", "office-b")
    assert status == 1 and "to-b" in err
    status, _, err = await _admin(url, "route", "add", "x", "--pattern", "3XXX", "--trunk", "nope")
    assert status == 1 and "trunk: no such trunk" in err
    status, _, err = await _admin(url, "trunk", "add", "office-c")
    assert status == 2 and "--peer" in err
    status, _, err = await _admin(url, "trunk", "update", "office-b", "--username", "x")  # no tty: no prompt
    assert status == 2 and "password" in err

    assert (await _admin(url, "route", "update", "to-b", "--strip", "1", "--prepend", "9"))[0] == 0
    assert (await _admin(url, "trunk", "update", "office-b", "--no-allow"))[0] == 0
    with machine.lock:
        assert machine.state.routes["to-b"].prepend == "9" and machine.state.trunks["office-b"].allow == ()
    assert (await _admin(url, "route", "delete", "to-b"))[:2] == (0, "route to-b deleted\n")
    assert (await _admin(url, "trunk", "delete", "office-b"))[:2] == (0, "trunk office-b deleted\n")
    status, out, _ = await _admin(url, "trunk", "list")
    assert (status, out) == (0, "no trunks\n")
