"""Two offices joined by trunks in the RECOMMENDED configuration (docs/trunks.md, "Which peer addresses to
list for another raftpbx cluster"): each office's trunk lists the other's SERVICE ADDRESS FIRST, then its
three node addresses. Real processes, real pjsua2 phones (tests/integration/offices.py, helpers of
tests/integration/test_trunk_offices.py).

The layout is offices.py's (each cluster's leader, node 1, holds its service address; allow-lists are the
other office's /28, which holds its service address) with both trunks switched by `trunk.update` to
`peers = [other service address, other node 1, node 2, node 3]`, so A's INVITE for 2001 leaves A from A's
service address and enters B on B's service address (B's leader). B forwards it to 2001 with its service
address as Via sent-by and Record-Route.

What each test proves, and how it can fail:
0. The layout: every node of both offices has the four peers in that order and sees each of them up; the
   first peer A's service-address holder would try is B's service address.
1. B's leader (holder of B's service address, where A's INVITE entered: the call is in its state, stamped by
   it) is killed with kill -9 while 2001 is RINGING (the 180 has crossed both PBXs: 1001 is "early").
   B's next leader takes the service address; then 2001 answers. Its 200 goes to the Via it got (B's
   service address), reaches B's next leader as a stray 2xx (issue 5 (c)), which records the answer and
   relays it to A, which relays it to 1001: the call connects (RTP both ways), the caller's BYE (A's then
   B's service address) gets 200, and both offices' records say answered, hung up by the caller, with
   trunk/direction office-b/outbound in A and office-a/inbound in B, identical on A's three nodes and B's
   two survivors; B's answer is stamped after the kill (by the next leader, not the dead one).
   With peers listing only node addresses (test_trunk_offices.py) this call dies: B's Via would name the
   dead node.
2. Right after that kill, a new call succeeds: A's holder still tries B's service address first (now held
   by B's next leader) unless its pinger caught the address during the hand-over, then the next peer; B's
   record of the call is stamped only by survivors. The killed node is restarted from its data dir,
   catches up, and holds both calls' records identically to the survivors.
3. As 1, but 2001 answers right after the kill, before B has elected a leader: its 200 to B's service
   address finds nobody there and is retransmitted (RFC 3261 §13.3.1.4) until B's next leader holds the
   address and relays it; same checks; the killed node is restarted and holds the same record.
4. As 1, but 1001 cancels instead (after B's next leader holds the address): 487 to 1001, 2001 stops ringing
   (B's next leader CANCELs the INVITE the dead leader forked, RFC 3261 §16.10, raftpbx/proxy.py
   `_cancel_orphan`), both offices record it cancelled by the caller; the killed node restarted agrees.
Tests run in file order on one pair of offices. Every wait polls a condition against a deadline.
"""

from __future__ import annotations

import ipaddress
import re
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from nodecluster import Node, wait_for
from offices import Office, Offices, peer_states, start_offices
from test_trunk_offices import (
    Leg,
    Phones,
    active_call,
    check_active,
    check_records,
    establish,
    hang_up,
    logs_for,
    office_phones,
    record_in,
    rtp_both_ways,
)

from chaos.phone import poll_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def service_first(office: Office) -> list[str]:
    """The recommended peer list for a trunk to `office`: its service address, then its nodes."""
    host, port = office.service
    return [f"{host}:{port}", *office.peers]


def use_service_first(src: Office, dst: Office, timeout: float = 20.0) -> None:
    """Switch `src`'s trunk to `dst` to the recommended peers; wait until every node of `src` has them and sees
    each of them up (its own pinger)."""
    peers = service_first(dst)
    src.write_node().call("trunk.update", name=dst.name, peers=peers)
    for node in src.cluster.live():
        def ready(n: Node = node) -> bool:
            trunk = n.call("trunk.get", name=dst.name)
            return bool(trunk["peers"] == peers and peer_states(n, dst.name) == dict.fromkeys(peers, "up"))

        wait_for(ready, timeout, f"{src.name}/{node.id}: trunk {dst.name} with {peers}, all up", interval=0.1)


@pytest.fixture(scope="module")
def offices(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Offices]:
    with start_offices(tmp_path_factory.mktemp("offices-service")) as o:
        use_service_first(o.a, o.b)
        use_service_first(o.b, o.a)
        yield o


@pytest.fixture(scope="module")
def phones(offices: Offices, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Phones]:
    with office_phones(offices, tmp_path_factory) as pair:
        yield pair


@pytest.fixture(scope="module")
def times() -> dict[str, float]:
    """Wall-clock marks a test leaves for a later one ("kill": when test 1 killed B's leader)."""
    return {}


def first_peer(o: Offices) -> str:
    """The peer A's service-address holder (where 1001's INVITE arrives) tries first for office-b."""
    holder = o.a.cluster.service_holder()
    return str(holder.call("trunk.get", name=o.b.name)["next_peers"][0])


def attempts(node: Node, trunk: str) -> dict[str, int]:
    """INVITEs `node` has sent to each peer of `trunk` (its /metrics: raftpbx_trunk_call_attempts_total)."""
    with urllib.request.urlopen(node.url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    pattern = re.compile(r'^raftpbx_trunk_call_attempts_total\{node="[^"]*",trunk="' + re.escape(trunk)
                         + r'",peer="([^"]*)"\} (\d+)$', re.MULTILINE)
    return {peer: int(n) for peer, n in pattern.findall(text)}


def sent_since(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {peer: n - before.get(peer, 0) for peer, n in after.items() if n != before.get(peer, 0)}


def caller_outcome(o: Offices, phones: Phones, call_a: str, mark: int) -> dict[str, Any]:
    def outcome() -> dict[str, Any] | None:
        for event in phones.a.iter_events(mark):
            if event["event"] == "call_state" and event.get("call") == call_a and event["state"] in (
                    "confirmed", "disconnected"):
                return event
        return None

    result: dict[str, Any] = poll_until(outcome, timeout=15, what="the caller established or refused")
    return result


# --- tests -----------------------------------------------------------------------------------------------


def test_0_layout_service_address_first(offices: Offices, phones: Phones) -> None:
    for office, other in ((offices.a, offices.b), (offices.b, offices.a)):
        for node in office.cluster.nodes:
            trunk = node.call("trunk.get", name=other.name)
            assert trunk["peers"] == service_first(other) and trunk["allow"] == [other.net], trunk
            # The allow-list covers the other office's service address, where its requests now come from.
            assert ipaddress.ip_address(other.service[0]) in ipaddress.ip_network(other.net)
    assert first_peer(offices) == f"{offices.b.service[0]}:{offices.b.service[1]}"
    assert offices.b.cluster.service_holder() is offices.b.cluster.wait_leader()


def ring_kill_answer(o: Offices, phones: Phones, wait_for_holder: bool,
                     times: dict[str, float]) -> tuple[Node, Node, Leg, float]:
    """1001 calls 2001, which rings; kill -9 B's leader (where A's INVITE entered B); 2001 answers, once B's
    next leader holds the service address (`wait_for_holder`) or at once (its 200 is retransmitted, RFC 3261
    §13.3.1.4, until the address has a holder again). Checks the call connects, B's answer is recorded by
    that holder after the kill, RTP flows both ways. Returns (victim, holder, leg, wall time of the answer)."""
    b = o.b.cluster
    service_b = service_first(o.b)[0]
    assert first_peer(o) == service_b  # A's INVITE enters B on B's service address
    a_holder = o.a.cluster.service_holder()
    before = attempts(a_holder, o.b.name)
    phones.b.auto_answer("b", 180)  # ring only; answered below
    mark_a, mark_b = phones.a.mark(), phones.b.mark()
    call_a = phones.a.call("a", f"sip:2001@{o.a.service[0]}:{o.a.service[1]}")
    call_b = phones.b.wait_incoming("b", timeout=10, since=mark_b)["call"]
    phones.a.wait_call_state(call_a, "early", timeout=10, since=mark_a)  # the 180 crossed B, then A
    sip_call_id = phones.a.call_info(call_a)["sip_call_id"]
    assert sent_since(before, attempts(a_holder, o.b.name)) == {service_b: 1}  # one INVITE, to B's service
    victim = b.service_holder()
    assert victim is b.wait_leader()
    ringing = wait_for(lambda: active_call(victim, sip_call_id), 5.0, "the ringing call in B's leader's state")
    assert victim.id in ringing["nodes"] and ringing["answered_at"] is None, ringing
    killed_at = times["kill"] = time.time()
    victim.kill()
    o.killed.append(victim)
    survivors = b.live()
    if wait_for_holder:
        b.wait_leader(timeout=10.0, among=survivors)
        b.service_holder(timeout=10.0, among=survivors)
    answered = time.time()
    phones.b.answer(call_b, 200)
    final = caller_outcome(o, phones, call_a, mark_a)
    assert final["state"] == "confirmed", (final, logs_for(o, sip_call_id))
    phones.b.wait_call_state(call_b, "confirmed", timeout=8, since=mark_b)
    b.wait_leader(timeout=10.0, among=survivors)
    holder = b.service_holder(timeout=10.0, among=survivors)
    leg = Leg(phones.a, call_a, phones.b, call_b, sip_call_id, float(final["t"]))
    rtp_both_ways(leg, 25)
    seen = check_active(o, leg, "1001", "2001")  # A's three nodes, B's two survivors
    assert seen[o.b.name]["answered_at"] >= max(answered, killed_at) - 0.5, seen  # after the kill
    assert holder.id in seen[o.b.name]["nodes"], seen  # stamped by B's next leader
    # The 200 came to B's service address (2001's top Via), i.e. to B's next leader, with no transaction there.
    stray = wait_for(lambda: [line for line in o.b.log_lines(sip_call_id) if "proxy.stray_answer" in line],
                     5.0, "B's stray 2xx log line")
    assert all(line.startswith(f"{o.b.name}/{holder.id}: ") for line in stray), stray
    return victim, holder, leg, answered


def test_1_b_leader_killed_while_2001_rings_then_2001_answers(offices: Offices, phones: Phones,
                                                              times: dict[str, float]) -> None:
    assert not offices.killed, "this test needs all of B's nodes"
    victim, holder, leg, answered = ring_kill_answer(offices, phones, wait_for_holder=True, times=times)
    bye_at = hang_up(leg, by_caller=True)
    a_rec, b_rec = check_records(offices, leg, "1001", "2001", "caller", bye_at)  # B: its two survivors
    offices.calls["rang-through-the-kill"] = leg.sip_call_id
    print(f"killed B/{victim.id} while 2001 rang; B's service address now on {holder.id}; "
          f"1001 confirmed {leg.confirmed_at - answered:.2f} s after 2001's answer\nA: {a_rec}\nB: {b_rec}")


def test_2_new_call_right_after_the_kill(offices: Offices, phones: Phones, times: dict[str, float]) -> None:
    assert offices.killed, "test 1 kills B's leader"
    victim = offices.killed[-1]
    since_kill = time.time() - times["kill"]
    peer = first_peer(offices)
    a_holder = offices.a.cluster.service_holder()
    before = attempts(a_holder, offices.b.name)
    started = time.monotonic()
    leg = establish(offices, phones.a, "a", offices.a, phones.b, "b", "2001")
    took = time.monotonic() - started
    sent = sent_since(before, attempts(a_holder, offices.b.name))
    assert sent and set(sent) <= set(service_first(offices.b)), sent
    if peer == service_first(offices.b)[0]:  # B's service address, now on B's next leader, took the call
        assert sent == {peer: 1}, sent
    seen = check_active(offices, leg, "1001", "2001")
    assert victim.id not in seen[offices.b.name]["nodes"], seen
    bye_at = hang_up(leg, by_caller=True)
    check_records(offices, leg, "1001", "2001", "caller", bye_at)
    # The killed node comes back from its data dir, catches up, and holds the same records as the others.
    b_rec = restart_in_b(offices, victim, leg.sip_call_id, offices.calls["rang-through-the-kill"])
    print(f"new call {since_kill:.2f} s after the kill, first peer {peer}, INVITEs {sent}, set up in {took:.2f} s through "
          f"B/{seen[offices.b.name]['nodes']}; B/{victim.id} restarted and holds {b_rec}")


def restart_in_b(offices: Offices, victim: Node, call_id: str, *more: str) -> Any:
    """Restart B's killed node from its data dir; once B has converged, every B node (the restarted one
    included) holds the same record of `call_id` and of each of `more`. Returns `call_id`'s record."""
    b = offices.b.cluster
    victim.start()
    offices.killed.remove(victim)
    b.wait_leader(timeout=20.0)
    b.assert_converged(timeout=20.0)
    for other in more:
        record_in(offices.b, other, b.nodes)
    return record_in(offices.b, call_id, b.nodes)


def test_3_b_leader_killed_while_2001_rings_and_2001_answers_at_once(offices: Offices, phones: Phones,
                                                                    times: dict[str, float]) -> None:
    """As 1, but 2001 answers right after the kill, before B has a new leader: its 200 finds nobody on B's
    service address and is retransmitted until B's next leader holds it and relays it. B's killed leader is
    then restarted and holds the same record."""
    assert not offices.killed, "this test needs all of B's nodes"
    victim, holder, leg, answered = ring_kill_answer(offices, phones, wait_for_holder=False, times=times)
    bye_at = hang_up(leg, by_caller=True)
    check_records(offices, leg, "1001", "2001", "caller", bye_at)
    b_rec = restart_in_b(offices, victim, leg.sip_call_id)
    print(f"killed B/{victim.id}, 2001 answered at once; B's service address now on {holder.id}; 1001 confirmed "
          f"{leg.confirmed_at - answered:.2f} s after 2001's answer; B/{victim.id} restarted and holds {b_rec}")


def test_4_b_leader_killed_while_2001_rings_then_1001_cancels(offices: Offices, phones: Phones) -> None:
    """The caller gives up instead: 1001's CANCEL goes to A, whose CANCEL goes to B's service address, now on
    B's next leader, which has no transaction for the INVITE (it died with B's leader). RFC 3261 §16.10: it
    must not be refused (481 would leave 2001 ringing and B's call open forever while A and 1001 consider it
    cancelled); B's next leader CANCELs 2001's INVITE on the branch the dead leader used, 2001 stops ringing,
    its 487 reaches B's next leader (recorded, relayed). Both offices record the call cancelled by the caller,
    identically on A's nodes and B's survivors; the killed node is restarted and holds the same record."""
    assert not offices.killed, "this test needs all of B's nodes"
    b = offices.b.cluster
    assert first_peer(offices) == service_first(offices.b)[0]
    phones.b.auto_answer("b", 180)  # ring, never answer
    mark_a, mark_b = phones.a.mark(), phones.b.mark()
    call_a = phones.a.call("a", f"sip:2001@{offices.a.service[0]}:{offices.a.service[1]}")
    call_b = phones.b.wait_incoming("b", timeout=10, since=mark_b)["call"]
    phones.a.wait_call_state(call_a, "early", timeout=10, since=mark_a)
    sip_call_id = phones.a.call_info(call_a)["sip_call_id"]
    victim = b.service_holder()
    wait_for(lambda: active_call(victim, sip_call_id), 5.0, "the ringing call in B's leader's state")
    victim.kill()
    offices.killed.append(victim)
    survivors = b.live()
    b.wait_leader(timeout=10.0, among=survivors)
    holder = b.service_holder(timeout=10.0, among=survivors)
    phones.a.cancel(call_a)
    assert phones.a.wait_call_state(call_a, "disconnected", timeout=10, since=mark_a)["code"] == 487
    try:
        phones.b.wait_call_state(call_b, "disconnected", timeout=5, since=mark_b)  # CANCEL relayed by A, B
    except Exception as exc:
        raise AssertionError(f"2001 still rings after the caller's CANCEL\n{logs_for(offices, sip_call_id)}") from exc
    records = {}
    for office, trunk, direction in ((offices.a, "office-b", "outbound"), (offices.b, "office-a", "inbound")):
        rec = records[office.name] = record_in(office, sip_call_id)  # B: its two survivors
        assert rec["disposition"] == "cancelled" and rec["hangup_by"] == "caller", (office.name, rec)
        assert rec["answered_at"] is None and rec["status_code"] == 487, (office.name, rec)
        assert (rec["trunk"], rec["direction"]) == (trunk, direction), (office.name, rec)
    assert holder.id in records[offices.b.name]["nodes"], records  # ended by B's next leader
    victim.start()
    offices.killed.remove(victim)
    b.wait_leader(timeout=20.0)
    b.assert_converged(timeout=20.0)
    assert record_in(offices.b, sip_call_id, b.nodes) == records[offices.b.name]
    print(f"killed B/{victim.id} while 2001 rang, 1001 cancelled; B's next leader {holder.id}; {records}")
