"""Calls through a real 3-node cluster with real pjsua2 phones (chaos/phone.py), loopback only.

One cluster serves the module. Every node's `service.address` is node 1's SIP address, so Record-Route
names node 1 (this issue binds no floating address; see raftpbx/proxy.py): a call set up through node 2
has its ACK and BYE routed through node 1, which exercises "any node serves" for in-dialog requests. Call
records are read with `cdr.get` from every node and must be identical. Every wait polls a condition
against a deadline; nothing sleeps for a fixed time.

TCP calls use one node for registration, INVITE and in-dialog requests (node 1, the service address): a
pjsua TCP phone is reachable only over the connection it opened (its Contact names the ephemeral port), so
another node cannot reach it until flows are routed between nodes (RFC 5626), which is a later issue.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nodecluster import Cluster, Node, create_extension, phone_group, running_pbx, wait_for

from chaos.phone import PhoneProcess, poll_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

DOMAIN = "test.raftpbx.local"
PASSWORD = "call-Secret-42"
_ext = itertools.count(4100)


# --- fixtures --------------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("calls")
    with running_pbx(root, {"raft.proposal_timeout": 3.0}, DOMAIN) as c:  # service: node 1 (module doc)
        yield c


def new_extension(cluster: Cluster) -> str:
    return create_extension(cluster, str(next(_ext)), PASSWORD)


@pytest.fixture
def phones(cluster: Cluster, tmp_path: Path) -> Iterator[Callable[[int], list[PhoneProcess]]]:
    with phone_group(cluster, tmp_path) as make:
        yield make


def register(phone: PhoneProcess, account: str, ext: str, node: Node, transport: str = "udp") -> None:
    phone.transports(udp=transport == "udp", tcp=transport == "tcp")
    mark = phone.mark()
    phone.account_add(account, f"sip:{ext}@{DOMAIN}", transport=transport, registrar=f"sip:{node.ip}:5060",
                      register=True, user=ext, password=PASSWORD, expires=300)
    state = phone.wait_event(lambda e: e["event"] == "reg_state" and e.get("account") == account, 8.0, since=mark)
    assert state["code"] == 200 and state["active"], state


def disconnected(phone: PhoneProcess, call: str, timeout: float = 8.0) -> dict[str, Any]:
    return phone.wait_call_state(call, "disconnected", timeout=timeout)


def record_everywhere(cluster: Cluster, call_id: str, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The call record of `call_id`, identical on every node once `predicate` holds on each."""
    records: dict[str, dict[str, Any]] = {}
    for node in cluster.nodes:
        def ready(n: Node = node) -> bool:
            records[n.id] = n.call("cdr.get", call_id=call_id)
            return predicate(records[n.id])

        wait_for(ready, 8.0, f"the record of {call_id} on {node.id}")
    first = records[cluster.nodes[0].id]
    assert all(r == first for r in records.values()), records
    for node in cluster.nodes:
        assert all(c["call_id"] != call_id for c in node.call("call.active")["calls"])
    return first


def rtp_both_ways(a: PhoneProcess, call_a: str, b: PhoneProcess, call_b: str) -> None:
    def flowing() -> bool:
        ia, ib = a.call_info(call_a), b.call_info(call_b)
        return bool(min(ia["rx"], ia["tx"], ib["rx"], ib["tx"]) >= 25)

    poll_until(flowing, timeout=8, what="RTP flowing both ways")


# --- tests -----------------------------------------------------------------------------------------------


def basic_call(cluster: Cluster, phones: Callable[[int], list[PhoneProcess]], transport: str,
               caller_node: Node, callee_node: Node) -> None:
    caller_ext, callee_ext = new_extension(cluster), new_extension(cluster)
    a, b = phones(2)
    register(a, "a", caller_ext, caller_node, transport)
    register(b, "b", callee_ext, callee_node, transport)
    b.auto_answer("b", 200, delay=0.2)

    t0 = time.time()
    start = time.monotonic()
    call_a = a.call("a", f"sip:{callee_ext}@{caller_node.ip}:5060")
    incoming = b.wait_incoming("b", timeout=8)
    call_b = incoming["call"]
    confirmed = a.wait_call_state(call_a, "confirmed", timeout=8)
    b.wait_call_state(call_b, "confirmed", timeout=8)
    setup_ms = (confirmed["mono"] - start) * 1000 if "mono" in confirmed else None
    rtp_both_ways(a, call_a, b, call_b)

    sip_call_id = a.call_info(call_a)["sip_call_id"]
    active = caller_node.call("call.active")["calls"]
    assert any(c["call_id"] == sip_call_id and c["caller"] == caller_ext and c["callee"] == callee_ext
               for c in active), active

    a.bye(call_a)
    result = a.wait_event(lambda e: e["event"] == "bye_result" and e.get("call") == call_a, 8)
    assert result["code"] == 200
    disconnected(b, call_b)
    t1 = time.time()
    record = record_everywhere(cluster, sip_call_id, lambda r: r["ended_at"] is not None)
    assert record["caller"] == caller_ext and record["callee"] == callee_ext
    assert record["disposition"] == "answered" and record["hangup_by"] == "caller"
    assert t0 - 0.5 <= record["started_at"] <= record["answered_at"] <= record["ended_at"] <= t1 + 0.5, record
    assert record["billable_seconds"] >= 1
    print(f"{transport} call {caller_node.id}->{callee_node.id}: setup {setup_ms} ms (INVITE to confirmed incl. "
          f"407 round trip and 0.2 s auto-answer delay); record {record}")


def test_udp_call_node2_to_node3_rtp_both_ways_bye_200_identical_records(
    cluster: Cluster, phones: Callable[[int], list[PhoneProcess]]
) -> None:
    basic_call(cluster, phones, "udp", cluster.nodes[1], cluster.nodes[2])


def test_tcp_call_rtp_both_ways_bye_200_identical_records(
    cluster: Cluster, phones: Callable[[int], list[PhoneProcess]]
) -> None:
    basic_call(cluster, phones, "tcp", cluster.nodes[0], cluster.nodes[0])


def test_unknown_404_unregistered_480_busy_486_passed_through(
    cluster: Cluster, phones: Callable[[int], list[PhoneProcess]]
) -> None:
    node2, node3 = cluster.nodes[1], cluster.nodes[2]
    caller_ext, idle_ext, busy_ext = new_extension(cluster), new_extension(cluster), new_extension(cluster)
    a, b = phones(2)
    register(a, "a", caller_ext, node2)
    register(b, "b", busy_ext, node3)
    b.auto_answer("b", 486, ring=False)
    outcomes = {}
    for label, target, code, disposition in (
        ("unknown", "4099", 404, "failed"),
        ("not registered", idle_ext, 480, "no-answer"),
        ("busy", busy_ext, 486, "busy"),
    ):
        call = a.call("a", f"sip:{target}@{node2.ip}:5060")
        state = disconnected(a, call)
        assert state["code"] == code, (label, state)
        sip_call_id = a.call_info(call)["sip_call_id"]
        record = record_everywhere(cluster, sip_call_id, lambda r: r["ended_at"] is not None)
        assert record["disposition"] == disposition and record["status_code"] == code, (label, record)
        outcomes[label] = code
    assert outcomes == {"unknown": 404, "not registered": 480, "busy": 486}


def test_caller_cancels_while_ringing_487_and_cancelled_record(
    cluster: Cluster, phones: Callable[[int], list[PhoneProcess]]
) -> None:
    node2, node3 = cluster.nodes[1], cluster.nodes[2]
    caller_ext, callee_ext = new_extension(cluster), new_extension(cluster)
    a, b = phones(2)
    register(a, "a", caller_ext, node2)
    register(b, "b", callee_ext, node3)
    b.auto_answer("b", 180)
    call_a = a.call("a", f"sip:{callee_ext}@{node2.ip}:5060")
    call_b = b.wait_incoming("b", timeout=8)["call"]
    a.wait_event(lambda e: e["event"] == "call_state" and e.get("call") == call_a and e.get("state") == "early", 8)
    sip_call_id = a.call_info(call_a)["sip_call_id"]
    a.cancel(call_a)
    assert disconnected(a, call_a)["code"] == 487
    disconnected(b, call_b)
    record = record_everywhere(cluster, sip_call_id, lambda r: r["ended_at"] is not None)
    assert record["disposition"] == "cancelled" and record["hangup_by"] == "caller", record
    assert record["answered_at"] is None


def test_two_devices_ring_both_and_the_second_is_cancelled_when_the_first_answers(
    cluster: Cluster, phones: Callable[[int], list[PhoneProcess]]
) -> None:
    node2, node3 = cluster.nodes[1], cluster.nodes[2]
    caller_ext, callee_ext = new_extension(cluster), new_extension(cluster)
    a, b1, b2 = phones(3)
    register(a, "a", caller_ext, node2)
    register(b1, "b", callee_ext, node3)
    register(b2, "b", callee_ext, node3)
    b1.auto_answer("b", 180)
    b2.auto_answer("b", 180)
    call_a = a.call("a", f"sip:{callee_ext}@{node2.ip}:5060")
    call_b1 = b1.wait_incoming("b", timeout=8)["call"]
    call_b2 = b2.wait_incoming("b", timeout=8)["call"]  # both devices ring
    b1.wait_event(lambda e: e["event"] == "call_state" and e.get("call") == call_b1 and e.get("state") == "early", 8)
    b1.answer(call_b1, 200)
    a.wait_call_state(call_a, "confirmed", timeout=8)
    assert disconnected(b2, call_b2)["code"] == 487  # CANCELled by the proxy (RFC 3261 §16.7 step 10)
    rtp_both_ways(a, call_a, b1, call_b1)
    a.bye(call_a)
    result = a.wait_event(lambda e: e["event"] == "bye_result" and e.get("call") == call_a, 8)
    assert result["code"] == 200
    sip_call_id = a.call_info(call_a)["sip_call_id"]
    record = record_everywhere(cluster, sip_call_id, lambda r: r["ended_at"] is not None)
    assert record["disposition"] == "answered", record
