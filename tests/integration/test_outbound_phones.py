"""RFC 5626 outbound across a real 3-node cluster with real pjsua2 phones (chaos/phone.py), loopback only.

A pjsua TCP phone is reachable only over the connection it opened (its Contact names an ephemeral port
nobody can dial). With outbound, the node that holds that connection stores a flow token and a Path to
itself in the binding, so a call entering any other node is routed through it and over the connection
(raftpbx/outbound.py). Tests:

- `test_tcp_outbound_phone_on_node2_called_from_node3`: phone B registers over TCP with outbound directly
  to node 2; phone A (UDP) on node 3 calls B: answered, RTP both ways, BYE 200 from either side, the record
  identical on every node.
- `test_e_outbound_phone_reregisters_after_its_node_is_killed` (issue 5, test e): B registers over TCP with
  outbound through the service address (held by the leader); kill -9 the leader; B notices its
  connection drop, re-registers through the service address (now held by the new leader) and a call to it
  from a phone on a surviving node is answered. Prints kill -> re-REGISTER 200 and kill -> call answered.

Every wait polls a condition against a deadline; nothing sleeps for a fixed time.
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
PASSWORD = "outbound-Secret-42"
_ext = itertools.count(5100)
_instance = itertools.count(1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("outbound")
    with running_pbx(root, {"raft.proposal_timeout": 3.0}, DOMAIN) as c:
        yield c


@pytest.fixture
def phones(cluster: Cluster, tmp_path: Path) -> Iterator[Callable[[int], list[PhoneProcess]]]:
    with phone_group(cluster, tmp_path) as make:
        yield make


def new_extension(cluster: Cluster) -> str:
    return create_extension(cluster, str(next(_ext)), PASSWORD)


def instance_id() -> str:
    return f"<urn:uuid:00000000-0000-4000-8000-{next(_instance):012d}>"


def register(phone: PhoneProcess, account: str, ext: str, registrar: str, transport: str,
             outbound: dict[str, Any] | None = None) -> dict[str, Any]:
    phone.transports(udp=transport == "udp", tcp=transport == "tcp")
    mark = phone.mark()
    phone.account_add(account, f"sip:{ext}@{DOMAIN}", transport=transport, registrar=f"sip:{registrar}",
                      register=True, user=ext, password=PASSWORD, expires=300, outbound=outbound)
    state = phone.wait_event(lambda e: e["event"] == "reg_state" and e.get("account") == account, 8.0, since=mark)
    assert state["code"] == 200 and state["active"], state
    return state


def bindings(node: Node, ext: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = node.call("binding.list", extension=ext)["bindings"]
    return result


def flow_binding(node: Node, ext: str, via: Node) -> dict[str, Any] | None:
    """The extension's single binding as `node` sees it, if it is a flow through `via` (RFC 5626)."""
    found = bindings(node, ext)
    if len(found) != 1:
        return None
    binding = found[0]
    path = binding.get("path") or []
    if binding.get("reg_id") != 1 or not path or f"@{via.ip}:5060;transport=tcp;lr;ob>" not in path[0]:
        return None
    return binding


def rtp_both_ways(a: PhoneProcess, call_a: str, b: PhoneProcess, call_b: str) -> None:
    def flowing() -> bool:
        ia, ib = a.call_info(call_a), b.call_info(call_b)
        return bool(min(ia["rx"], ia["tx"], ib["rx"], ib["tx"]) >= 25)

    poll_until(flowing, timeout=8, what="RTP flowing both ways")


def call_and_hang_up(cluster: Cluster, a: PhoneProcess, via: Node, b: PhoneProcess, callee: str,
                     hangup_by: str) -> dict[str, Any]:
    """A calls `callee` through `via`; B answers; RTP both ways; one side sends BYE and gets 200."""
    mark = b.mark()
    call_a = a.call("a", f"sip:{callee}@{via.ip}:5060")
    call_b = b.wait_incoming("b", timeout=8, since=mark)["call"]
    a.wait_call_state(call_a, "confirmed", timeout=8)
    b.wait_call_state(call_b, "confirmed", timeout=8)
    rtp_both_ways(a, call_a, b, call_b)
    sip_call_id = a.call_info(call_a)["sip_call_id"]
    hanging, call, other, other_call = (a, call_a, b, call_b) if hangup_by == "caller" else (b, call_b, a, call_a)
    hanging.bye(call)
    result = hanging.wait_event(lambda e: e["event"] == "bye_result" and e.get("call") == call, 8)
    assert result["code"] == 200, result
    other.wait_call_state(other_call, "disconnected", timeout=8)
    records: dict[str, dict[str, Any]] = {}
    for node in cluster.live():
        def ended(n: Node = node) -> bool:
            records[n.id] = n.call("cdr.get", call_id=sip_call_id)
            return records[n.id]["ended_at"] is not None

        wait_for(ended, 8.0, f"the record of {sip_call_id} on {node.id}")
    first = next(iter(records.values()))
    assert all(r == first for r in records.values()), records
    assert first["disposition"] == "answered" and first["hangup_by"] == hangup_by, first
    return first


def test_tcp_outbound_phone_on_node2_called_from_node3(
    cluster: Cluster, phones: Callable[[int], list[PhoneProcess]]
) -> None:
    node2, node3 = cluster.nodes[1], cluster.nodes[2]
    caller, callee = new_extension(cluster), new_extension(cluster)
    a, b = phones(2)
    register(b, "b", callee, f"{node2.ip}:5060", "tcp", outbound={"instance_id": instance_id(), "reg_id": 1})
    register(a, "a", caller, f"{node3.ip}:5060", "udp")
    # Every node routes B through node 2's flow (the binding is replicated with its Path).
    binding = wait_for(lambda: flow_binding(node3, callee, node2), 5.0,
                       f"the flow binding on node 3 (last seen: {bindings(node3, callee)})")
    assert binding["transport"] == "tcp" and binding["node_id"] == node2.id, binding
    b.auto_answer("b", 200, delay=0.1)
    first = call_and_hang_up(cluster, a, node3, b, callee, "caller")
    second = call_and_hang_up(cluster, a, node3, b, callee, "callee")
    print(f"outbound TCP callee on {node2.id} called through {node3.id}: records {first} / {second}")


@pytest.fixture
def failover_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("outbound-failover")
    with running_pbx(root, {"raft.proposal_timeout": 3.0}, DOMAIN) as c:  # its own cluster: we kill a node
        yield c


def test_e_outbound_phone_reregisters_after_its_node_is_killed(
    failover_cluster: Cluster, tmp_path: Path
) -> None:
    cluster = failover_cluster
    assert cluster.service_address is not None
    leader = cluster.service_holder()
    survivor = cluster.followers(leader)[0]
    caller, callee = new_extension(cluster), new_extension(cluster)
    with phone_group(cluster, tmp_path) as make:
        a, b = make(2)
        # B: TCP with outbound through the service address, so its flow is held by the leader.
        register(b, "b", callee, cluster.service_address, "tcp",
                 outbound={"instance_id": instance_id(), "reg_id": 1, "retry_interval": 1,
                           "first_retry_interval": 0})
        register(a, "a", caller, f"{survivor.ip}:5060", "udp")
        wait_for(lambda: flow_binding(survivor, callee, leader), 5.0, "the flow binding through the leader")
        b.auto_answer("b", 200)
        call_and_hang_up(cluster, a, survivor, b, callee, "caller")  # reachable before the kill

        mark = b.mark()
        killed_at = leader.kill()
        reregistered = b.wait_event(lambda e: e["event"] == "reg_state" and e.get("account") == "b"
                                    and e.get("code") == 200, 15.0, since=mark)
        reregister_s = reregistered["mono"] - killed_at
        new_leader = cluster.service_holder(among=cluster.live())
        binding = wait_for(lambda: flow_binding(survivor, callee, new_leader), 5.0,
                           f"the flow binding through {new_leader.id} (last seen: {bindings(survivor, callee)})")
        assert binding["node_id"] == new_leader.id, binding
        failures = [e for e in b.events[mark:] if e["event"] == "reg_state" and e.get("code") != 200]

        # A call to B from a phone on a surviving node: retried until answered (a node that has not yet
        # applied the new binding may still route to the dead one and fail the attempt).
        attempts = 0
        answered_s: float | None = None
        deadline = time.monotonic() + 10.0
        while answered_s is None and time.monotonic() < deadline:
            attempts += 1
            mark_a = a.mark()
            call_a = a.call("a", f"sip:{callee}@{survivor.ip}:5060")
            state = a.wait_event(lambda e, c=call_a: e["event"] == "call_state" and e.get("call") == c
                                 and e.get("state") in ("confirmed", "disconnected"), 10.0, since=mark_a)
            if state["state"] == "confirmed":
                answered_s = state["mono"] - killed_at
                a.hangup(call_a)
                a.wait_call_state(call_a, "disconnected", timeout=8)
        assert answered_s is not None, f"no call to {callee} answered within 10 s after re-registering"
        print(f"\noutbound failover ({leader.id} killed, service address now on {new_leader.id}): "
              f"kill -> re-REGISTER 200 {reregister_s:.3f} s (failed attempts before: "
              f"{[(e.get('code'), e.get('reason')) for e in failures]}); kill -> call answered "
              f"{answered_s:.3f} s after {attempts} attempt(s)")
        # And a full call after the failover: RTP both ways, BYE 200 from the phone behind the new flow.
        call_and_hang_up(cluster, a, survivor, b, callee, "callee")
