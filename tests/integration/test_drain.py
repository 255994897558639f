"""Planned maintenance on a real 3-node cluster: drain, undrain and transfer-leader (issue 5, item 4, test f).

Real `raftpbx node` processes on loopback, real pjsua2 phones (chaos/phone.py), the real `raftpbx admin`
CLI in a subprocess. Test (f): with an established call, draining the leader moves leadership to another
node, a new INVITE sent to the drained node gets 503 with Retry-After (a phone's call fails with 503, a raw
INVITE shows the header), OPTIONS and REGISTER still work there, a new call through the service address
(which followed leadership) succeeds meanwhile, the established call ends normally with a
BYE that gets 200 and a right call record on every node, and undraining brings new calls back. Further
tests: the refusals (unknown node, no undrained node left to lead, transfer to a drained node) change
nothing, transfer-leader [NODE] works from any node, and a drained node that wins an election hands
leadership away by itself. Every wait polls a condition against a deadline.
"""

from __future__ import annotations

import itertools
import json
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nodecluster import (
    Cluster,
    Node,
    RpcFailure,
    create_extension,
    make_cluster_fixture,  # noqa: F401 (the make_cluster fixture)
    phone_group,
    running_pbx,
    sip_up,
    wait_for,
)
from raftpbx.transport.sip.message import Response, parse_message

from chaos.phone import PhoneProcess, poll_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

DOMAIN = "test.raftpbx.local"
PASSWORD = "drain-Secret-42"
_ext = itertools.count(5100)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_pbx(tmp_path_factory.mktemp("drain"), {"raft.proposal_timeout": 3.0}, DOMAIN) as c:
        yield c


@pytest.fixture
def phones(cluster: Cluster, tmp_path: Path) -> Iterator[Callable[[int], list[PhoneProcess]]]:
    with phone_group(cluster, tmp_path) as make:
        yield make


def cli(cluster: Cluster, url: str, *args: str, json_out: bool = True) -> tuple[int, Any, str]:
    """Run `raftpbx admin --url URL [--json] ARGS...`; (exit status, parsed JSON or stdout text, stderr)."""
    argv = [sys.executable, "-m", "raftpbx.cli", "admin", "--url", url, "--token-file",
            str(cluster.root / "token"), "--timeout", "10"]
    if json_out:
        argv.append("--json")
    done = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60, check=False)
    out: Any = done.stdout
    if json_out and done.returncode == 0:
        out = json.loads(done.stdout)
    return done.returncode, out, done.stderr


def drained_everywhere(cluster: Cluster, expected: list[str]) -> None:
    """Every live node's cluster.status lists exactly `expected` as drained, and flags their rows."""
    for node in cluster.live():
        def agrees(n: Node = node) -> bool:
            status = n.call("cluster.status")
            rows = {row["id"]: row["drained"] for row in status["nodes"]}
            return ([d["node"] for d in status["drained"]] == sorted(expected)
                    and all(rows[i] == (i in expected) for i in rows))

        wait_for(agrees, 10.0, f"{node.id} listing {expected} as drained")


def invite(node: Node, callee: str, *, to_tag: str = "") -> Response:
    """One INVITE over UDP from a fresh loopback port to `node`; its first final response."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((node.ip, 0))
        s.settimeout(0.5)
        host, port = s.getsockname()
        tag = f";tag={to_tag}" if to_tag else ""
        message = (f"INVITE sip:{callee}@{node.ip}:5060 SIP/2.0\r\n"
                   f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK{secrets.token_hex(8)};rport\r\n"
                   f"Max-Forwards: 70\r\nFrom: <sip:probe@{DOMAIN}>;tag={secrets.token_hex(4)}\r\n"
                   f"To: <sip:{callee}@{DOMAIN}>{tag}\r\nCall-ID: {secrets.token_hex(16)}@{host}\r\n"
                   f"CSeq: 1 INVITE\r\nContact: <sip:probe@{host}:{port}>\r\nContent-Length: 0\r\n\r\n").encode()
        deadline = time.monotonic() + 5.0
        s.sendto(message, (node.ip, 5060))
        while time.monotonic() < deadline:
            try:
                reply = parse_message(s.recv(65535))
            except TimeoutError:
                s.sendto(message, (node.ip, 5060))  # UDP: retransmit (RFC 3261 §17.1.1.2, simplified)
                continue
            if isinstance(reply, Response) and reply.status >= 200:
                if reply.status < 300 or to_tag:
                    return reply
                ack = message.replace(b"INVITE sip:", b"ACK sip:", 1).replace(b"CSeq: 1 INVITE", b"CSeq: 1 ACK")
                s.sendto(ack, (node.ip, 5060))  # a non-2xx final is ACKed hop by hop (§17.1.1.3)
                return reply
    raise AssertionError(f"no final response to an INVITE sent to {node.id}")


def register(phone: PhoneProcess, account: str, ext: str, node: Node) -> None:
    phone.transports(udp=True, tcp=False)
    mark = phone.mark()
    phone.account_add(account, f"sip:{ext}@{DOMAIN}", transport="udp", registrar=f"sip:{node.ip}:5060",
                      register=True, user=ext, password=PASSWORD, expires=300)
    state = phone.wait_event(lambda e: e["event"] == "reg_state" and e.get("account") == account, 8.0, since=mark)
    assert state["code"] == 200 and state["active"], state


def establish(a: PhoneProcess, b: PhoneProcess, callee: str, via: str) -> tuple[str, str]:
    """A call from a to b with its INVITE sent to `via` (HOST:PORT), confirmed, RTP both ways."""
    mark_b = b.mark()
    call_a = a.call("a", f"sip:{callee}@{via}")
    call_b = b.wait_incoming("b", timeout=8, since=mark_b)["call"]
    a.wait_call_state(call_a, "confirmed", timeout=8)
    b.wait_call_state(call_b, "confirmed", timeout=8)

    def flowing() -> bool:
        ia, ib = a.call_info(call_a), b.call_info(call_b)
        return bool(min(ia["rx"], ia["tx"], ib["rx"], ib["tx"]) >= 25)

    poll_until(flowing, timeout=8, what="RTP flowing both ways")
    return call_a, call_b


def hang_up(cluster: Cluster, a: PhoneProcess, call_a: str, b: PhoneProcess, call_b: str) -> dict[str, Any]:
    """The caller's BYE gets 200, the callee hears it, and every node has the same finished record."""
    sip_call_id = a.call_info(call_a)["sip_call_id"]
    a.bye(call_a)
    result = a.wait_event(lambda e: e["event"] == "bye_result" and e.get("call") == call_a, 8)
    assert result["code"] == 200, result
    b.wait_call_state(call_b, "disconnected", timeout=8)
    records: dict[str, dict[str, Any]] = {}
    for node in cluster.live():
        def ended(n: Node = node) -> bool:
            records[n.id] = n.call("cdr.get", call_id=sip_call_id)
            return records[n.id]["ended_at"] is not None

        wait_for(ended, 8.0, f"the record of {sip_call_id} on {node.id}")
    first = next(iter(records.values()))
    assert all(r == first for r in records.values()), records
    return first


# --- test (f) ---------------------------------------------------------------------------------------------


def test_f_drain_the_leader_during_a_call_moves_leadership_refuses_new_calls_and_lets_the_call_end(
    cluster: Cluster, phones: Callable[[int], list[PhoneProcess]]
) -> None:
    leader = cluster.wait_leader()
    follower = cluster.followers(leader)[0]
    caller, callee = (create_extension(cluster, str(next(_ext)), PASSWORD) for _ in range(2))
    a, b = phones(2)
    register(a, "a", caller, follower)
    register(b, "b", callee, follower)
    b.auto_answer("b", 200, delay=0.1)

    t0 = time.time()
    call_a, call_b = establish(a, b, callee, via=f"{leader.ip}:5060")  # to the node about to be drained

    # Drain the leader through the CLI, contacting another node.
    started = time.monotonic()
    status, result, err = cli(cluster, follower.url, "cluster", "drain", leader.id)
    drain_s = time.monotonic() - started
    assert status == 0, err
    assert result["node"] == leader.id and result["drained"] is True and result["changed"] is True, result
    assert result["leader"] not in (None, leader.id), result
    new_leader = cluster.wait_leader()
    assert new_leader.id != leader.id
    drained_everywhere(cluster, [leader.id])
    assert "sip.drain_started" in leader.log_path.read_text()

    # New calls to the drained node: 503 with Retry-After, before any authentication (a raw INVITE with no
    # credentials would otherwise get 407), and a phone's call fails with 503. OPTIONS still answer.
    refused = invite(leader, callee)
    assert refused.status == 503 and int(refused.headers.get("Retry-After") or 0) > 0, refused
    mark = a.mark()
    new_call = a.call("a", f"sip:{callee}@{leader.ip}:5060")
    gone = a.wait_call_state(new_call, "disconnected", timeout=8, since=mark)
    assert gone["code"] == 503, gone
    assert sip_up(leader, DOMAIN)
    assert b.call_info(call_b)["state"] == "confirmed"  # the refused call never reached the callee

    # New calls through the service address work: it followed leadership to an undrained node.
    if cluster.service_address is not None:
        assert cluster.service_holder().id == new_leader.id
        other_a, other_b = establish(a, b, callee, via=cluster.service_address)
        assert hang_up(cluster, a, other_a, b, other_b)["disposition"] == "answered"

    # REGISTER still works on the drained node (the phone refreshes there).
    mark = b.mark()
    b.register("b")
    state = b.wait_event(lambda e: e["event"] == "reg_state" and e.get("account") == "b", 8.0, since=mark)
    assert state["code"] == 200, state

    # The established call ends normally: BYE 200, the right record on every node.
    ia = a.call_info(call_a)
    assert ia["state"] == "confirmed" and ia["rx"] > 0
    record = hang_up(cluster, a, call_a, b, call_b)
    t1 = time.time()
    assert record["caller"] == caller and record["callee"] == callee, record
    assert record["disposition"] == "answered" and record["hangup_by"] == "caller", record
    assert t0 - 0.5 <= record["started_at"] <= record["answered_at"] <= record["ended_at"] <= t1 + 0.5, record

    # Undrain: the node takes new calls again.
    status, result, err = cli(cluster, leader.url, "cluster", "undrain", leader.id)
    assert status == 0, err
    assert result["drained"] is False and result["changed"] is True, result
    drained_everywhere(cluster, [])
    wait_for(lambda: "sip.drain_ended" in leader.log_path.read_text(), 5.0, "the drain_ended log line")
    call_a, call_b = establish(a, b, callee, via=f"{leader.ip}:5060")
    record = hang_up(cluster, a, call_a, b, call_b)
    assert record["disposition"] == "answered", record
    print(f"drain of leader {leader.id}: CLI returned in {drain_s:.2f} s with {new_leader.id} leading")


# --- refusals, transfer-leader and elections --------------------------------------------------------------


def test_drain_refusals_change_nothing_and_leadership_keeps_a_home(cluster: Cluster) -> None:
    leader = cluster.wait_leader()
    x, y = cluster.followers(leader)
    before = leader.call("state.digest")

    with pytest.raises(RpcFailure) as unknown:
        x.call("cluster.drain", node="node99")
    assert unknown.value.data["field"] == "node" and "not a member" in unknown.value.message
    with pytest.raises(RpcFailure) as malformed:
        x.call("cluster.drain", node="no such node")
    assert malformed.value.data["field"] == "node"
    status, _, err = cli(cluster, x.url, "cluster", "undrain", "node99")
    assert status == 1 and "node" in err and "not a member" in err, err
    assert leader.call("state.digest") == before  # nothing was proposed

    # Two of three may be drained: the third must lead, and leadership never goes to a drained node.
    assert x.call("cluster.drain", node=x.id)["leader"] == leader.id
    assert cluster.wait_leader().id == leader.id
    again = y.call("cluster.drain", node=x.id)
    assert again["changed"] is False  # idempotent, first `since` kept
    result = x.call("cluster.drain", node=leader.id)
    assert result["leader"] == y.id
    assert cluster.wait_leader().id == y.id
    drained_everywhere(cluster, [leader.id, x.id])
    digest = y.call("state.digest")
    with pytest.raises(RpcFailure) as homeless:
        leader.call("cluster.drain", node=y.id)
    assert homeless.value.data["field"] == "node" and "no undrained member" in homeless.value.message
    with pytest.raises(RpcFailure) as to_drained:
        y.call("cluster.transfer_leader", to=x.id)
    assert to_drained.value.data["field"] == "to" and "drained" in to_drained.value.message
    status, _, err = cli(cluster, y.url, "cluster", "transfer-leader")
    assert status == 1 and "no undrained member" in err, err
    assert y.call("state.digest") == digest and cluster.wait_leader().id == y.id

    status, out, err = cli(cluster, y.url, "cluster", "status", json_out=False)
    assert status == 0, err
    last = out.splitlines()[-1]
    assert last.startswith("drained: ") and f"{leader.id} (since " in last and f"{x.id} (since " in last, out

    for node in (leader, x):
        assert y.call("cluster.undrain", node=node.id)["changed"] is True
    drained_everywhere(cluster, [])


def test_transfer_leader_to_a_node_or_the_best_one_from_any_node(cluster: Cluster) -> None:
    leader = cluster.wait_leader()
    x, y = cluster.followers(leader)
    # NODE given, command sent to a follower: the CLI finds the leader and hands over to NODE.
    status, out, err = cli(cluster, y.url, "cluster", "transfer-leader", x.id, json_out=False)
    assert status == 0, err
    assert out.strip() == f"leader is now {x.id}"
    assert cluster.wait_leader().id == x.id
    # No NODE: the most caught-up undrained node.
    status, result, err = cli(cluster, leader.url, "cluster", "transfer-leader")
    assert status == 0, err
    assert result["leader"] in (leader.id, y.id)
    assert cluster.wait_leader().id == result["leader"]
    # Errors name the field.
    status, _, err = cli(cluster, leader.url, "cluster", "transfer-leader", "node99")
    assert status == 1 and "to" in err and "not a member" in err, err
    current = cluster.wait_leader()
    status, _, err = cli(cluster, leader.url, "cluster", "transfer-leader", current.id)
    assert status == 1 and "already leads" in err, err


def test_a_drained_node_that_wins_an_election_hands_leadership_away(make_cluster: Callable[..., Cluster]) -> None:
    """Node 3 is drained and has the shortest election timeout: when the leader dies it wins the election,
    then hands leadership to node 2, the only undrained survivor, by itself.

    Pre-vote (replication.py) decides who wins: node 2 grants node 3's pre-vote only once it has not heard
    from a leader for its own minimum election timeout (0.3 s), and node 3 asks every 50-60 ms, so node 3
    asks within 60 ms of that; node 2's own timer fires anywhere in 0.3-10 s (the most config allows). With 1.2-1.5 s both ways (before
    pre-vote) node 2's timer beat node 3's next pre-vote about one time in three."""
    c = make_cluster()
    fast, slow = c.nodes[2], c.nodes[1]
    for node, low, high, beat in ((fast, 0.05, 0.06, 0.015), (slow, 0.3, 10.0, 0.04), (c.nodes[0], 0.3, 10.0, 0.04)):
        text = node.config_path.read_text()
        node.config_path.write_text(text.replace("[raft]\n", f"[raft]\nelection_timeout_min = {low}\n"
                                                             f"election_timeout_max = {high}\n"
                                                             f"heartbeat_period = {beat}\n", 1))
    c.start()
    doomed = c.nodes[0]
    if c.wait_leader().id != doomed.id:
        c.wait_leader().call("cluster.transfer_leader", to=doomed.id)
    assert c.wait_leader().id == doomed.id
    assert doomed.call("cluster.drain", node=fast.id)["leader"] == doomed.id
    wait_for(lambda: [d["node"] for d in fast.call("cluster.status")["drained"]] == [fast.id], 5.0,
             "the drain applied on node 3")
    doomed.kill()

    def slow_leads() -> bool:
        return all(n.info().get("leader") == slow.id for n in (fast, slow))

    wait_for(slow_leads, 15.0, "node 2 leading, as both survivors see it")
    log = fast.log_path.read_text()
    assert "drain.leadership_moved" in log, log[-3000:]
    assert slow.call("cluster.undrain", node=fast.id)["changed"] is True
