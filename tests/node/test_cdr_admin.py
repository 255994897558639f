"""PBX admin reads (binding.list, call.active, cdr.list, cdr.get) through the real JSON-RPC dispatcher, and
the `raftpbx admin reg list | calls | cdr` commands on top of them.

The state is the real pure state fed through `StateMachine.apply` (registrations decided by
`decide_register`, call events as the proxy proposes them); the records live in a real SQLite store fed by
the projector. Replication and real SIP are covered by tests/integration/test_pbx_admin.py.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from raftpbx.state import (
    CallAnswered,
    CallEnded,
    CallRinging,
    CallStarted,
    Command,
    ContactSpec,
    RegisterAccepted,
    call_op_id,
    decide_create_extension,
    decide_register,
    encode_batch,
)

from raftpbx.admin import AdminError, UsageError, parse_time, run_command
from raftpbx.cdr import CDR_FIELDS
from raftpbx.cli import build_parser
from raftpbx.config import load_config
from raftpbx.pbx_admin import attach
from raftpbx.rpc import INVALID_PARAMS, NOT_FOUND, Params, RpcServer
from raftpbx.service import AdminService, StateMachine

NOW = 1_764_000_000.0
TOKEN = "test-token-0123456789"


@dataclass
class Pbx:
    machine: StateMachine
    server: RpcServer
    service: AdminService
    clock: list[float]
    index: int = 0

    def apply(self, *commands: Command) -> None:
        self.index += 1
        self.machine.apply(encode_batch(list(commands)), self.index)

    def register(self, extension: str, contact: str, *, expires: int, q: float | None = None, at: float = NOW,
                 node: str = "n1") -> None:
        decision = decide_register(
            self.machine.state, aor=extension, contacts=[ContactSpec(contact, contact, q=q)], star=False,
            expires_header=expires, call_id=f"reg-{contact}", cseq=self.index + 1, received="127.0.0.1:5062",
            transport="udp", node_id=node, now=at, min_expires=60, max_expires=7200, default_expires=3600,
            max_contacts=10)
        assert isinstance(decision, RegisterAccepted)
        self.apply(*(Command(f"{decision.op_id}.{i}", e) for i, e in enumerate(decision.events)))

    def event(self, event: Any, step: str) -> None:
        self.apply(Command(call_op_id(event.call_id, step), event))

    async def rpc(self, method: str, **params: Any) -> Any:
        reply = await self.server.dispatch({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        assert reply is not None
        if "error" in reply:
            err = reply["error"]
            raise AdminError(err["code"], err["message"], err.get("data"))
        return reply["result"]


@pytest.fixture
async def pbx(tmp_path: Path) -> AsyncIterator[Pbx]:
    config = load_config(None, env={}, overrides={
        "node.id": "n1", "node.data_dir": str(tmp_path / "n1"), "cluster.secret": "s" * 32, "admin.token": TOKEN,
        "cluster.domain": "pbx.test"})
    machine = StateMachine()
    clock = [NOW]
    service = AdminService(config, machine, replicator=None, clock=lambda: clock[0])
    server = RpcServer(TOKEN, metrics=service.metrics)
    attach(config, machine, server, service, clock=lambda: clock[0])
    p = Pbx(machine, server, service, clock)
    for i, ext in enumerate(("1001", "1002", "1003")):
        for event in decide_create_extension(machine.state, ext, "correct-Horse-7", None, "pbx.test", NOW):
            p.apply(Command(f"ext-{i}", event))
    try:
        yield p
    finally:
        await service.close()
    assert (tmp_path / "n1" / "cdr.sqlite3").exists()


def calls(p: Pbx) -> None:
    """Three finished calls and one active one."""
    p.event(CallStarted("A", "1001", "1002", "f", "", "", "n2", NOW), "started")
    p.event(CallAnswered("A", "t", "", None, "n3", NOW + 2), "answered")
    p.event(CallEnded("A", "bye-callee", "callee", 200, "n3", NOW + 32), "ended")
    p.event(CallStarted("B", "1002", "1003", "f", "", "", "n1", NOW + 100), "started")
    p.event(CallEnded("B", "failure", "callee", 486, "n1", NOW + 101), "ended")
    p.event(CallStarted("C", "1003", "1001", "f", "", "", "n1", NOW + 200), "started")
    p.event(CallEnded("C", "cancel", "caller", 487, "n1", NOW + 204), "ended")
    p.event(CallStarted("D", "1001", "1003", "f", "", "", "n2", NOW + 300), "started")
    p.event(CallRinging("D", "n2", NOW + 301), "ringing")


async def test_binding_list_shows_live_bindings_only(pbx: Pbx) -> None:
    pbx.register("1001", "sip:1001@127.0.0.1:5062", expires=3600, q=0.5)
    pbx.register("1001", "sip:1001@127.0.0.1:5064", expires=120, q=1.0, node="n3")
    pbx.register("1002", "sip:1002@127.0.0.1:5066", expires=600)
    result = await pbx.rpc("binding.list")
    assert result["total"] == 3 and result["next_offset"] is None
    first = result["bindings"][0]
    assert [(b["extension"], b["contact"]) for b in result["bindings"]] == [
        ("1001", "sip:1001@127.0.0.1:5064"), ("1001", "sip:1001@127.0.0.1:5062"), ("1002", "sip:1002@127.0.0.1:5066")]
    assert first["expires_in"] == 120 and first["q"] == 1.0 and first["node_id"] == "n3"
    assert first["received"] == "127.0.0.1:5062" and first["transport"] == "udp"
    assert first["registered_at"] == NOW and first["instance_id"] == "" and first["reg_id"] == 0
    only = await pbx.rpc("binding.list", extension="1002")
    assert [b["contact"] for b in only["bindings"]] == ["sip:1002@127.0.0.1:5066"]
    assert (await pbx.rpc("binding.list", extension="1003"))["bindings"] == []
    pbx.clock[0] = NOW + 120  # the 120 s binding expired: hidden before BindingsExpired is even proposed
    later = await pbx.rpc("binding.list", extension="1001")
    assert [b["contact"] for b in later["bindings"]] == ["sip:1001@127.0.0.1:5062"]
    assert later["bindings"][0]["expires_in"] == 3480
    paged = await pbx.rpc("binding.list", limit=1, offset=1)
    assert paged["total"] == 2 and paged["next_offset"] is None and len(paged["bindings"]) == 1


async def test_call_active_and_records(pbx: Pbx) -> None:
    calls(pbx)
    pbx.clock[0] = NOW + 310
    active = await pbx.rpc("call.active")
    assert active["count"] == 1
    (d,) = active["calls"]
    assert d["call_id"] == "D" and d["progress"] == "ringing" and d["age"] == 10.0 and d["nodes"] == ["n2"]
    listed = await pbx.rpc("cdr.list")
    assert [r["call_id"] for r in listed["records"]] == ["A", "B", "C", "D"]
    assert listed["total"] == 4 and listed["projected_index"] == pbx.index
    a = listed["records"][0]
    assert {k: a[k] for k in ("caller", "callee", "started_at", "answered_at", "ended_at", "duration",
                              "billable_seconds", "disposition", "hangup_by", "status_code", "nodes")} == {
        "caller": "1001", "callee": "1002", "started_at": NOW, "answered_at": NOW + 2, "ended_at": NOW + 32,
        "duration": 32.0, "billable_seconds": 30, "disposition": "answered", "hangup_by": "callee",
        "status_code": 200, "nodes": ["n2", "n3"]}
    assert [r["disposition"] for r in listed["records"]] == ["answered", "busy", "cancelled", None]
    busy = await pbx.rpc("cdr.list", disposition="busy")
    assert [r["call_id"] for r in busy["records"]] == ["B"]
    window = await pbx.rpc("cdr.list", since=NOW + 100, until=NOW + 300, extension="1003")
    assert [r["call_id"] for r in window["records"]] == ["B", "C"]
    page = await pbx.rpc("cdr.list", limit=3)
    assert page["next_offset"] == 3 and page["next_cursor"] is not None
    rest = await pbx.rpc("cdr.list", limit=3, cursor=page["next_cursor"])
    assert [r["call_id"] for r in rest["records"]] == ["D"] and rest["next_cursor"] is None
    assert (await pbx.rpc("cdr.get", call_id="B"))["status_code"] == 486
    with pytest.raises(AdminError) as exc:
        await pbx.rpc("cdr.get", call_id="nope")
    assert exc.value.code == NOT_FOUND and exc.value.data["field"] == "call_id"


@pytest.mark.parametrize("method, params, field", [
    ("cdr.list", {"disposition": "rejected"}, "disposition"),
    ("cdr.list", {"disposition": 3}, "disposition"),
    ("cdr.list", {"limit": 1001}, "limit"),
    ("cdr.list", {"limit": 0}, "limit"),
    ("cdr.list", {"offset": -1}, "offset"),
    ("cdr.list", {"since": "yesterday"}, "since"),
    ("cdr.list", {"until": True}, "until"),
    ("cdr.list", {"since": NOW, "until": NOW - 1}, "until"),
    ("cdr.list", {"extension": "10a"}, "extension"),
    ("cdr.list", {"cursor": "x"}, "cursor"),
    ("cdr.list", {"cursor": "[1, \"a\"]", "offset": 2}, "cursor"),
    ("cdr.list", {"callee": "1001"}, "callee"),
    ("cdr.get", {}, "call_id"),
    ("cdr.get", {"call_id": ""}, "call_id"),
    ("binding.list", {"extension": "x"}, "extension"),
    ("binding.list", {"limit": 10_001}, "limit"),
    ("call.active", {"all": True}, "all"),
])
async def test_bad_params_name_the_field(pbx: Pbx, method: str, params: dict[str, Any], field: str) -> None:
    with pytest.raises(AdminError) as exc:
        await pbx.rpc(method, **params)
    assert exc.value.code == INVALID_PARAMS
    assert exc.value.data["field"] == field


async def test_metrics_include_the_store(pbx: Pbx) -> None:
    calls(pbx)
    await pbx.rpc("cdr.list")
    text = pbx.service.metrics()
    assert 'raftpbx_cdr_rows_written_total{node="n1"}' in text
    assert 'raftpbx_cdr_gaps_total{node="n1"} 0' in text


class LocalClient:
    """`AdminClient.call` served by the real dispatcher on the test's event loop (the CLI runs in a thread)."""

    def __init__(self, pbx: Pbx, loop: asyncio.AbstractEventLoop) -> None:
        self.pbx = pbx
        self.loop = loop
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def call(self, method: str, params: dict[str, Any] | None = None, *, retry: bool = True) -> Any:
        self.calls.append((method, dict(params or {})))
        return asyncio.run_coroutine_threadsafe(self.pbx.rpc(method, **(params or {})), self.loop).result(10)


async def cli(pbx: Pbx, *argv: str) -> tuple[str, LocalClient]:
    ns = build_parser().parse_args(["admin", "--url", "http://127.0.0.1:1", *argv])
    client = LocalClient(pbx, asyncio.get_running_loop())
    out = io.StringIO()
    status = await asyncio.to_thread(run_command, client, ns, out, stdin=io.StringIO(), prompt=lambda _: "")
    assert status == 0
    return out.getvalue(), client


async def test_cli_reg_list_and_calls(pbx: Pbx) -> None:
    pbx.register("1001", "sip:1001@127.0.0.1:5062", expires=3600)
    pbx.register("1002", "sip:1002@127.0.0.1:5066", expires=600)
    text, _ = await cli(pbx, "reg", "list")
    assert "EXTENSION" in text and "sip:1001@127.0.0.1:5062" in text and "(2 bindings" in text
    text, client = await cli(pbx, "reg", "list", "1002")
    assert "sip:1001" not in text and "sip:1002@127.0.0.1:5066" in text
    assert client.calls == [("binding.list", {"extension": "1002", "offset": 0})]
    text, _ = await cli(pbx, "--json", "reg", "list")
    assert [b["extension"] for b in orjson.loads(text)["bindings"]] == ["1001", "1002"]
    calls(pbx)
    text, _ = await cli(pbx, "calls")
    assert "PROGRESS" in text and "ringing" in text and "(1 active calls" in text


async def test_cli_cdr_table_and_exports(pbx: Pbx) -> None:
    calls(pbx)
    text, _ = await cli(pbx, "cdr")
    assert "DISPOSITION" in text and "cancelled" in text and "(4 of 4 call records)" in text
    text, client = await cli(pbx, "cdr", "--disposition", "busy", "--limit", "5")
    assert client.calls == [("cdr.list", {"disposition": "busy", "limit": 5})]
    text, _ = await cli(pbx, "cdr", "--limit", "2")
    assert "(2 of 4 call records; 2 more" in text
    text, client = await cli(pbx, "cdr", "--csv", "--since", str(NOW + 50), "--extension", "1003")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == list(CDR_FIELDS)
    assert [r["call_id"] for r in rows] == ["B", "C", "D"]
    assert client.calls[0][1]["since"] == NOW + 50 and client.calls[0][1]["extension"] == "1003"
    for flags in (("cdr", "--json"), ("--json", "cdr")):
        text, _ = await cli(pbx, *flags)
        records = orjson.loads(text)
        assert [r["call_id"] for r in records] == ["A", "B", "C", "D"]
        assert records[0]["answered_at"] == NOW + 2 and records[3]["ended_at"] is None


async def test_cli_cdr_export_pages_through_everything(pbx: Pbx) -> None:
    for i in range(1205):
        pbx.event(CallStarted(f"x{i:04d}", "1001", "1002", "f", "", "", "n1", NOW + i), "started")
    text, client = await cli(pbx, "cdr", "--json")
    assert len(orjson.loads(text)) == 1205
    assert [c[1].get("cursor") is None for c in client.calls] == [True, False]


def test_parse_time() -> None:
    assert parse_time("1764000000.5", option="--since") == 1764000000.5
    assert parse_time("2025-11-24T16:00:00Z", option="--since") == NOW
    assert parse_time("2025-11-24T16:00:00", option="--since") == NOW
    assert parse_time("2025-11-24T18:00:00+02:00", option="--since") == NOW
    assert parse_time("2025-11-24", option="--since") == NOW - 16 * 3600
    assert parse_time("30m", option="--since", now=NOW) == NOW - 1800
    assert parse_time("2d", option="--since", now=NOW) == NOW - 172800
    with pytest.raises(UsageError, match="--until"):
        parse_time("soon", option="--until")


def test_params_helper_is_shared() -> None:
    """pbx_admin validates extensions with service.extension_param (one rule for every method)."""
    from raftpbx.service import extension_param

    assert extension_param(Params({"extension": "1001"})) == "1001"
    assert extension_param(Params({}), required=False) is None


def trunk_calls(p: Pbx) -> None:
    """Issue 9: an outbound call through trunk office-b, an inbound one from it, and a local call."""
    p.event(CallStarted("T1", "1001", "2001", "f", "", "", "n1", NOW, "office-b", "outbound"), "started")
    p.event(CallAnswered("T1", "t", "", None, "n1", NOW + 1), "answered")
    p.event(CallEnded("T1", "bye-caller", "caller", 200, "n1", NOW + 11), "ended")
    p.event(CallStarted("T2", "2002", "1002", "f", "", "", "n2", NOW + 50, "office-b", "inbound"), "started")
    p.event(CallStarted("L1", "1002", "1003", "f", "", "", "n1", NOW + 90), "started")


async def test_cdr_list_trunk_filter_and_fields(pbx: Pbx) -> None:
    trunk_calls(pbx)
    page = await pbx.rpc("cdr.list", trunk="office-b")
    assert [(r["call_id"], r["trunk"], r["direction"]) for r in page["records"]] == [
        ("T1", "office-b", "outbound"), ("T2", "office-b", "inbound")]
    assert page["total"] == 2
    page = await pbx.rpc("cdr.list", trunk="")
    assert [(r["call_id"], r["trunk"], r["direction"]) for r in page["records"]] == [("L1", "", "")]
    assert (await pbx.rpc("cdr.list", trunk="office-c"))["records"] == []
    page = await pbx.rpc("cdr.list", trunk="office-b", extension="1002")
    assert [r["call_id"] for r in page["records"]] == ["T2"]
    with pytest.raises(AdminError) as err:
        await pbx.rpc("cdr.list", trunk=7)
    assert err.value.code == INVALID_PARAMS and err.value.data["field"] == "trunk"
    record = await pbx.rpc("cdr.get", call_id="T1")
    assert record["trunk"] == "office-b" and record["direction"] == "outbound"


async def test_cli_cdr_trunk_column_and_exports(pbx: Pbx) -> None:
    trunk_calls(pbx)
    text, _ = await cli(pbx, "cdr")
    header, _rule, *lines = text.splitlines()
    assert "TRUNK" in header.split()
    by_id = {line.split()[-1]: line for line in lines if line and not line.startswith("(")}
    assert "office-b (out)" in by_id["T1"] and "office-b (in)" in by_id["T2"]
    assert "office-b" not in by_id["L1"]
    text, client = await cli(pbx, "cdr", "--trunk", "office-b", "--csv")
    assert client.calls == [("cdr.list", {"trunk": "office-b", "limit": 1000})]
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == list(CDR_FIELDS) and {"trunk", "direction"} <= set(CDR_FIELDS)
    assert [(r["call_id"], r["trunk"], r["direction"]) for r in rows] == [
        ("T1", "office-b", "outbound"), ("T2", "office-b", "inbound")]
    text, _ = await cli(pbx, "cdr", "--json")
    records = {r["call_id"]: r for r in orjson.loads(text)}
    assert records["T2"]["trunk"] == "office-b" and records["T2"]["direction"] == "inbound"
    assert records["L1"]["trunk"] == "" and records["L1"]["direction"] == ""
