"""The admin JSON-RPC server and service, in process, over real HTTP, with a fake replicator.

The fake replicator applies proposals to the real `StateMachine` (the real pure state), so these tests
cover the write path (decide -> encode -> propose -> outcome) and the JSON-RPC framing; replication
itself is exercised by tests/integration with real processes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from raftpbx.state import Command, ExtensionCreated, decide_create_extension, decode_batch, encode_batch

from raftpbx.config import load_config
from raftpbx.replication import NoQuorum, NotLeader, ProposalTimeout
from raftpbx.rpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    NO_QUORUM,
    NOT_FOUND,
    NOT_LEADER,
    PARSE_ERROR,
    PROPOSAL_TIMEOUT,
    REJECTED,
    REPLICATION_ERROR,
    RpcServer,
)
from raftpbx.service import AdminService, StateMachine

TOKEN = "test-token-0123456789"
PASSWORD = "correct-Horse-7"


@dataclass
class Status:
    role: str
    leader: str | None
    term: int
    commit_index: int
    caught_up: bool = True
    applied_index: int = 0
    leader_commit_index: int = 0


class FakeReplicator:
    def __init__(self, machine: StateMachine) -> None:
        self.machine = machine
        self.index = 0
        self.proposals: list[bytes] = []
        self.fail: Exception | None = None
        self.before_apply: list[bytes] = []  # entries that "win the race" and commit first
        self.lagging: list[bytes] = []  # committed by the leader, not applied here yet (until read_barrier)
        self.caught_up = True

    async def propose(self, payload: bytes, timeout: float) -> object:  # noqa: ASYNC109 (the contract)
        assert timeout > 0
        self.proposals.append(payload)
        if self.fail is not None:
            raise self.fail
        for entry in self.before_apply:
            self.index += 1
            self.machine.apply(entry, self.index)
        self.before_apply.clear()
        self.index += 1
        return self.machine.apply(payload, self.index)

    def status(self) -> Status:
        return Status("leader", "n1", 3, self.index, self.caught_up, self.index, self.index + len(self.lagging))

    async def wait_caught_up(self, timeout: float) -> bool:  # noqa: ASYNC109 (the contract)
        return self.caught_up

    async def read_barrier(self, timeout: float) -> bool:  # noqa: ASYNC109 (the contract)
        moved = bool(self.lagging)
        for entry in self.lagging:  # the Raft thread catches up with what the cluster committed
            self.index += 1
            self.machine.apply(entry, self.index)
        self.lagging.clear()
        return moved


@dataclass
class Harness:
    client: TestClient
    replicator: FakeReplicator
    machine: StateMachine

    async def call(self, method: str, params: Any = None, token: str | None = TOKEN) -> tuple[int, Any]:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        body = {"jsonrpc": "2.0", "id": 7, "method": method}
        if params is not None:
            body["params"] = params
        response = await self.client.post("/rpc", data=orjson.dumps(body), headers=headers)
        raw = await response.read()
        return response.status, orjson.loads(raw) if raw else None

    async def ok(self, method: str, **params: Any) -> Any:
        status, reply = await self.call(method, params)
        assert status == 200 and "result" in reply, reply
        return reply["result"]

    async def error(self, method: str, **params: Any) -> dict[str, Any]:
        status, reply = await self.call(method, params)
        assert status == 200 and "error" in reply, reply
        assert reply["id"] == 7
        err: dict[str, Any] = reply["error"]
        return err


@pytest.fixture
async def rpc(tmp_path: Path) -> AsyncIterator[Harness]:
    config = load_config(None, env={}, overrides={
        "node.id": "n1", "node.data_dir": str(tmp_path), "cluster.secret": "s" * 32, "admin.token": TOKEN,
        "cluster.domain": "pbx.test"})
    machine = StateMachine()
    replicator = FakeReplicator(machine)
    service = AdminService(config, machine, replicator, clock=lambda: 1_700_000_000.0)
    server = RpcServer(TOKEN, metrics=service.metrics)
    service.register(server)
    client = TestClient(TestServer(server.app()))
    await client.start_server()
    try:
        yield Harness(client, replicator, machine)
    finally:
        await client.close()
        await service.close()


async def test_bearer_token_is_required(rpc: Harness) -> None:
    for token in (None, "wrong", TOKEN + "x", TOKEN[:-1], ""):
        status, reply = await rpc.call("state.digest", {}, token=token)
        assert status == 401
        assert reply["error"]["code"] == -32040
    response = await rpc.client.post("/rpc", data=b"{}", headers={"Authorization": TOKEN})  # no "Bearer "
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_json_rpc_framing_errors(rpc: Harness) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    response = await rpc.client.post("/rpc", data=b"{not json", headers=headers)
    assert (await response.json())["error"]["code"] == PARSE_ERROR
    response = await rpc.client.post("/rpc", data=b'{"id": 1, "method": "node.info"}', headers=headers)
    assert (await response.json())["error"]["code"] == INVALID_REQUEST
    _, reply = await rpc.call("no.such")
    assert reply["error"]["code"] == METHOD_NOT_FOUND
    _, reply = await rpc.call("extension.get", ["1001"])
    assert reply["error"]["code"] == INVALID_PARAMS and reply["error"]["data"]["field"] == "params"
    batch = [{"jsonrpc": "2.0", "id": 1, "method": "state.digest"}, {"jsonrpc": "2.0", "method": "state.digest"},
             {"jsonrpc": "2.0", "id": 2, "method": "nope"}]
    response = await rpc.client.post("/rpc", data=orjson.dumps(batch), headers=headers)
    replies = await response.json()
    assert [r["id"] for r in replies] == [1, 2] and "result" in replies[0] and "error" in replies[1]
    response = await rpc.client.post("/rpc", data=b"x" * (300 * 1024), headers=headers)
    assert response.status == 413


async def test_create_get_list_never_show_credentials(rpc: Harness) -> None:
    result = await rpc.ok("extension.create", extension="1001", password=PASSWORD, display_name="Alice")
    assert result["status"] == "applied" and result["result"] == {"extension": "1001"}
    assert len(result["op_id"]) == 32  # a fresh uuid4 hex
    got = await rpc.ok("extension.get", extension="1001")
    assert got == {"extension": "1001", "display_name": "Alice", "realm": "pbx.test",
                   "created_at": 1_700_000_000.0, "updated_at": 1_700_000_000.0}
    listed = await rpc.ok("extension.list")
    assert listed["extensions"] == [got] and listed["applied_index"] == 1
    assert PASSWORD.encode() not in b"".join(rpc.replicator.proposals)  # HA1s only, never the password
    digest = await rpc.ok("state.digest")
    assert digest["applied_index"] == 1 and len(digest["digest"]) == 64


@pytest.mark.parametrize(
    ("method", "params", "code", "field"),
    [
        ("extension.create", {"extension": "1x", "password": PASSWORD}, INVALID_PARAMS, "extension"),
        ("extension.create", {"extension": "1002", "password": ""}, INVALID_PARAMS, "password"),
        ("extension.create", {"extension": "1002", "password": "1002abcdefgh"}, INVALID_PARAMS, "password"),
        ("extension.create", {"extension": "1001", "password": PASSWORD}, INVALID_PARAMS, "extension"),
        ("extension.create", {"extension": "1002", "password": PASSWORD, "op_id": "bad op id"}, INVALID_PARAMS,
         "op_id"),
        ("extension.create", {"extension": "1002", "password": PASSWORD, "x": 1}, INVALID_PARAMS, "x"),
        ("extension.update", {"extension": "1001"}, INVALID_PARAMS, "display_name"),
        ("extension.update", {"extension": "1002", "display_name": "B"}, INVALID_PARAMS, "extension"),
        ("extension.update", {"extension": "1001", "password": "short"}, INVALID_PARAMS, "password"),
        ("extension.delete", {"extension": "1002"}, INVALID_PARAMS, "extension"),
        ("extension.get", {"extension": "1002"}, NOT_FOUND, "extension"),
        ("extension.get", {}, INVALID_PARAMS, "extension"),
    ],
)
async def test_bad_input_names_the_field_and_proposes_nothing(
    rpc: Harness, method: str, params: dict[str, Any], code: int, field: str
) -> None:
    await rpc.ok("extension.create", extension="1001", password=PASSWORD)
    before = await rpc.ok("state.digest")
    proposals = len(rpc.replicator.proposals)
    err = await rpc.error(method, **params)
    assert err["code"] == code and err["data"]["field"] == field, err
    assert field in err["message"]
    assert len(rpc.replicator.proposals) == proposals
    assert await rpc.ok("state.digest") == before


async def test_same_op_id_applies_once(rpc: Harness) -> None:
    first = await rpc.ok("extension.create", extension="1001", password=PASSWORD, op_id="op-1")
    assert first["status"] == "applied"
    await rpc.ok("extension.delete", extension="1001")
    again = await rpc.ok("extension.create", extension="1001", password=PASSWORD, op_id="op-1")
    assert again == {**first, "status": "duplicate", "applied_index": 2}
    err = await rpc.error("extension.get", extension="1001")
    assert err["code"] == NOT_FOUND


async def test_duplicate_detected_at_apply_when_the_local_window_lags(rpc: Harness) -> None:
    """This node has not applied the first attempt yet (its window lacks the op_id), so it decides and
    proposes again; in the log the first attempt comes first and apply reports the retry as a duplicate."""
    events = decide_create_extension(rpc.machine.state, "1001", PASSWORD, None, "pbx.test", 1.0)
    first_attempt = encode_batch([Command("op-1", event) for event in events])
    rpc.replicator.before_apply.append(first_attempt)  # committed, not yet applied here
    result = await rpc.ok("extension.create", extension="1001", password=PASSWORD, op_id="op-1")
    assert result["status"] == "duplicate" and result["result"] == {"extension": "1001"}
    assert rpc.machine.state.applied_index == 2 and len(rpc.machine.state.extensions) == 1


async def test_a_refusal_on_a_lagging_node_is_decided_again_once_it_caught_up(rpc: Harness) -> None:
    """The client created 1001 through the leader (acknowledged), then updates it through this node, which has
    not applied the create yet: deciding on that state said "no such extension". The node now applies its
    leader's commit index first and decides again (found by the chaos suite after a whole-cluster restart)."""
    events = decide_create_extension(rpc.machine.state, "1001", PASSWORD, None, "pbx.test", 1.0)
    rpc.replicator.lagging.append(encode_batch([Command("op-1", event) for event in events]))
    result = await rpc.ok("extension.update", extension="1001", display_name="Bob", op_id="op-2")
    assert result["status"] == "applied"
    assert rpc.machine.state.extensions["1001"].display_name == "Bob"
    err = await rpc.error("extension.update", extension="1002", display_name="Eve")  # a real refusal stays one
    assert err["code"] == INVALID_PARAMS and err["data"]["field"] == "extension"


async def test_writes_wait_for_the_read_barrier(rpc: Harness) -> None:
    rpc.replicator.caught_up = False  # restarted, the new leader has not committed an entry of its term
    err = await rpc.error("extension.create", extension="1001", password=PASSWORD, op_id="op-1")
    assert err["code"] == REPLICATION_ERROR and "catching up" in err["message"]
    assert err["data"] == {"op_id": "op-1", "outcome_unknown": False}
    assert rpc.replicator.proposals == [] and not rpc.machine.state.extensions


async def test_apply_time_rejection_is_an_error_naming_the_field(rpc: Harness) -> None:
    winner = encode_batch([Command("other", ExtensionCreated(
        extension="1001", display_name="", realm="pbx.test", ha1_md5="0" * 32, ha1_sha256="0" * 64, at=1.0))])
    rpc.replicator.before_apply.append(winner)  # a concurrent create commits first
    err = await rpc.error("extension.create", extension="1001", password=PASSWORD, op_id="mine")
    assert err["code"] == REJECTED and err["data"]["field"] == "extension" and err["data"]["op_id"] == "mine"


async def test_update_with_name_and_password_is_one_entry_with_derived_op_ids(rpc: Harness) -> None:
    await rpc.ok("extension.create", extension="1001", password=PASSWORD)
    result = await rpc.ok("extension.update", extension="1001", display_name="Bob", password="n3w-Passw0rd!",
                          op_id="up-1")
    assert result["status"] == "applied"
    commands = decode_batch(rpc.replicator.proposals[-1])
    assert [c.op_id for c in commands] == ["up-1", "up-1.1"]
    assert (await rpc.ok("extension.get", extension="1001"))["display_name"] == "Bob"


@pytest.mark.parametrize(
    ("exc", "code", "words"),
    [
        (NoQuorum("no leader", submitted=False), NO_QUORUM, "nothing was written"),
        (NoQuorum("lost it", submitted=True), NO_QUORUM, "outcome is unknown"),
        (ProposalTimeout("late"), PROPOSAL_TIMEOUT, "outcome is unknown"),
        (NotLeader(None), NOT_LEADER, "not leader"),
    ],
)
async def test_replication_failures_map_to_clear_errors(rpc: Harness, exc: Exception, code: int, words: str) -> None:
    rpc.replicator.fail = exc
    err = await rpc.error("extension.create", extension="1001", password=PASSWORD, op_id="op-9")
    assert err["code"] == code and words in err["message"] and err["data"]["op_id"] == "op-9"
    metrics = await (await rpc.client.get("/metrics")).text()
    assert 'raftpbx_proposals_total{node="n1",result="failed"} 1' in metrics


async def test_node_info_cluster_status_and_metrics(rpc: Harness) -> None:
    info = await rpc.ok("node.info")
    assert info["id"] == "n1" and info["role"] == "leader" and info["leader"] == "n1"
    status = await rpc.ok("cluster.status")
    assert status == {"leader": "n1", "term": 3, "commit_index": 0, "nodes": [
        {"id": "n1", "role": "leader", "healthy": True, "applied_index": 0, "term": 3, "leader": "n1",
         "admin_url": "http://127.0.0.1:7002", "service_held": False}],
        "service_address": {"address": None, "mode": "none", "holder": None, "holders": []}}
    response = await rpc.client.get("/metrics")
    text = await response.text()
    assert response.headers["Content-Type"].startswith("text/plain")
    assert 'raftpbx_raft_role{node="n1",role="leader"} 1' in text
    assert "# TYPE raftpbx_raft_term gauge" in text
