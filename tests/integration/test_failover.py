"""Calls survive the death of any node (issue 5, tests (a)-(d)): real node processes, kill -9, pjsua2 phones.

Each test gets a fresh 3-node cluster (nodecluster.running_pbx) on its own loopback addresses whose
`[service] address` is a dedicated 127.x.y.10:5060 in loopback mode: the Raft leader binds it
(raftpbx/service_address.py) and the next leader takes it over. Phones (chaos/phone.py, one pjsua2 process each) register THROUGH the service
address and call `sip:EXT@SERVICE`, so every request reaches whichever node holds it. The proxy's
Record-Route names the service address (raftpbx/proxy.py, Contract C), so in-dialog requests follow it too.

What each test proves, and how it can fail:
(a) leader killed during an established call: RTP keeps flowing both ways with no gap over 200 ms (the
    phones' own sampling, chaos/phone.py `rtp_gaps`, measured over at least 1 s after the kill), the
    caller's BYE after the failover gets 200 from the callee, and both survivors' call records say answered
    and ended, with a duration within 1 s of what the caller saw (confirmed -> BYE).
(b) the same with a follower killed.
(c) leader killed while the callee rings, then the callee answers 200 or declines 486: the caller ends up
    in the call (the callee's 2xx reaches the next leader as a stray response: CallAnswered committed, then
    forwarded), or gets the callee's 486 (ACKed by the next leader, CallEnded(failure, 486) committed, then
    forwarded), and the record says exactly that on both survivors.
(d) leader killed; a new call between already registered phones is established within 1.5 s of the kill.
    The caller (a well-behaved phone retrying) sends its INVITE as soon as an OPTIONS to the service
    address is answered again; the bound is from the kill to the caller's "confirmed".
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

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DOMAIN = "test.raftpbx.local"
PASSWORD = "failover-Secret-5"
SETTINGS = {"raft.proposal_timeout": 3.0}
MAX_RTP_GAP_MS = 200.0
NEW_CALL_BOUND = 1.5
_ext = itertools.count(5100)

Address = tuple[str, int]


# --- harness -----------------------------------------------------------------------------------------------


def service_of(cluster: Cluster) -> Address:
    assert cluster.service_ip is not None
    return cluster.service_ip, 5060


def wait_service(cluster: Cluster, timeout: float, among: list[Node] | None = None) -> tuple[float, Node]:
    """Wait until the service address answers OPTIONS again (polled every few ms, as a retrying phone
    would); return the monotonic time it first did, and the node that holds it by then."""
    wait_for(lambda: cluster.service_up(timeout=0.05), timeout, "the service address answering", interval=0.005)
    back = time.monotonic()
    return back, cluster.service_holder(timeout=timeout, among=among)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    root = tmp_path / "pbx"
    root.mkdir()
    with running_pbx(root, SETTINGS, DOMAIN) as c:  # service address in loopback mode, held by the leader
        yield c


@pytest.fixture
def phones(cluster: Cluster, tmp_path: Path) -> Iterator[Callable[[int], list[PhoneProcess]]]:
    with phone_group(cluster, tmp_path) as make:
        yield make


def register(phone: PhoneProcess, account: str, ext: str, service: Address) -> None:
    """Register `ext` on `phone` through the service address."""
    phone.transports(udp=True, tcp=False)
    mark = phone.mark()
    phone.account_add(account, f"sip:{ext}@{DOMAIN}", transport="udp", registrar=f"sip:{service[0]}:{service[1]}",
                      register=True, user=ext, password=PASSWORD, expires=300)
    state = phone.wait_event(lambda e: e["event"] == "reg_state" and e.get("account") == account, 8.0, since=mark)
    assert state["code"] == 200 and state["active"], state


def two_phones(cluster: Cluster, phones: Callable[[int], list[PhoneProcess]]) -> tuple[PhoneProcess, str,
                                                                                           PhoneProcess, str]:
    caller_ext = create_extension(cluster, str(next(_ext)), PASSWORD)
    callee_ext = create_extension(cluster, str(next(_ext)), PASSWORD)
    a, b = phones(2)
    service = service_of(cluster)
    register(a, "a", caller_ext, service)
    register(b, "b", callee_ext, service)
    return a, caller_ext, b, callee_ext


def establish(cluster: Cluster, a: PhoneProcess, b: PhoneProcess, callee_ext: str) -> tuple[str, str, float]:
    """a calls b through the service address, b auto-answers; returns (call a, call b, a's confirmed time,
    wall clock)."""
    host, port = service_of(cluster)
    b.auto_answer("b", 200, delay=0.1)
    mark_a, mark_b = a.mark(), b.mark()
    call_a = a.call("a", f"sip:{callee_ext}@{host}:{port}")
    call_b = b.wait_incoming("b", timeout=8, since=mark_b)["call"]
    confirmed = a.wait_call_state(call_a, "confirmed", timeout=8, since=mark_a)
    b.wait_call_state(call_b, "confirmed", timeout=8, since=mark_b)
    rtp_both_ways(a, call_a, b, call_b, 25)
    return call_a, call_b, float(confirmed["t"])


def rtp_both_ways(a: PhoneProcess, call_a: str, b: PhoneProcess, call_b: str, packets: int,
                  since: dict[str, int] | None = None) -> dict[str, int]:
    """Wait until each side has received and sent `packets` more RTP packets than in `since`."""
    base = since or {"arx": 0, "atx": 0, "brx": 0, "btx": 0}
    now: dict[str, int] = {}

    def flowing() -> bool:
        ia, ib = a.rtp_gaps(call_a), b.rtp_gaps(call_b)
        now.update(arx=ia["rx"], atx=ia["tx"], brx=ib["rx"], btx=ib["tx"])
        return all(now[k] - base[k] >= packets for k in base)

    poll_until(flowing, timeout=10, what=f"{packets} more RTP packets each way")
    return dict(now)


def rtp_counters(a: PhoneProcess, call_a: str, b: PhoneProcess, call_b: str) -> dict[str, int]:
    ia, ib = a.rtp_gaps(call_a), b.rtp_gaps(call_b)
    return {"arx": ia["rx"], "atx": ia["tx"], "brx": ib["rx"], "btx": ib["tx"]}


def record_on(nodes: list[Node], call_id: str, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The call record of `call_id` (`cdr.get`), identical on every given node once `predicate` holds on
    each, and the same row in `cdr.list` there once it ended."""
    records: dict[str, dict[str, Any]] = {}
    for node in nodes:
        def ready(n: Node = node) -> bool:
            records[n.id] = n.call("cdr.get", call_id=call_id)
            return predicate(records[n.id])

        wait_for(ready, 8.0, f"the record of {call_id} on {node.id}")
        if records[node.id]["ended_at"] is not None:  # cdr.list lists it too (finished calls)
            rows = node.call("cdr.list", extension=records[node.id]["caller"], limit=100)["records"]
            assert [r for r in rows if r["call_id"] == call_id] == [records[node.id]], (node.id, rows)
    first = records[nodes[0].id]
    assert all(r == first for r in records.values()), records
    return first


def hang_up_after_failover(cluster: Cluster, survivors: list[Node], a: PhoneProcess, call_a: str,
                           b: PhoneProcess, call_b: str, confirmed_at: float) -> dict[str, Any]:
    """The caller's BYE gets 200 from the callee; the survivors' records agree with what the caller saw."""
    sip_call_id = a.call_info(call_a)["sip_call_id"]
    mark = a.mark()
    a.bye(call_a)
    result = a.wait_event(lambda e: e["event"] == "bye_result" and e.get("call") == call_a, 10, since=mark)
    assert result["code"] == 200, result
    bye_at = float(result["t"])
    b.wait_call_state(call_b, "disconnected", timeout=8)
    record = record_on(survivors, sip_call_id, lambda r: r["ended_at"] is not None)
    assert record["disposition"] == "answered" and record["hangup_by"] == "caller", record
    seen = bye_at - confirmed_at  # the caller's view: confirmed -> 200 to its BYE
    recorded = record["ended_at"] - record["answered_at"]
    assert abs(recorded - seen) <= 1.0, (recorded, seen, record)
    return record


def during_call_kill(cluster: Cluster, phones: Callable[[int], list[PhoneProcess]], kill_leader: bool) -> None:
    a, _, b, callee_ext = two_phones(cluster, phones)
    call_a, call_b, confirmed_at = establish(cluster, a, b, callee_ext)
    leader = cluster.wait_leader()
    victim = leader if kill_leader else cluster.followers(leader)[0]
    before = rtp_counters(a, call_a, b, call_b)
    killed_at = victim.kill()
    survivors = cluster.live()
    new_leader = cluster.wait_leader(timeout=10.0, among=survivors)
    back, holder = wait_service(cluster, 10.0, survivors)
    assert holder is new_leader
    # At least one more second of audio each way (50 packets of 20 ms) after the kill, then the gaps.
    rtp_both_ways(a, call_a, b, call_b, 50, since=before)
    gaps = {"caller": a.rtp_gaps(call_a), "callee": b.rtp_gaps(call_b)}
    print(f"killed {victim.id} ({'leader' if kill_leader else 'follower'}); new leader {new_leader.id}; "
          f"service answering {back - killed_at:.3f} s after the kill; RTP {gaps}")
    for side, gap in gaps.items():
        assert not gap["ended"], (side, gap)
        assert gap["max_gap_ms"] <= MAX_RTP_GAP_MS, (side, gap)
    record = hang_up_after_failover(cluster, survivors, a, call_a, b, call_b, confirmed_at)
    print(f"record on {[n.id for n in survivors]}: {record}")


# --- tests -----------------------------------------------------------------------------------------------


def test_a_leader_killed_during_an_established_call(
    cluster: Cluster, phones: Callable[[int], list[PhoneProcess]]
) -> None:
    during_call_kill(cluster, phones, kill_leader=True)


def test_b_follower_killed_during_an_established_call(
    cluster: Cluster, phones: Callable[[int], list[PhoneProcess]]
) -> None:
    during_call_kill(cluster, phones, kill_leader=False)


@pytest.mark.parametrize("code", [200, 486], ids=["answers", "declines"])
def test_c_leader_killed_while_ringing_then_the_callee_answers(
    cluster: Cluster, phones: Callable[[int], list[PhoneProcess]], code: int
) -> None:
    a, _, b, callee_ext = two_phones(cluster, phones)
    host, port = service_of(cluster)
    mark_a, mark_b = a.mark(), b.mark()
    call_a = a.call("a", f"sip:{callee_ext}@{host}:{port}")
    call_b = b.wait_incoming("b", timeout=8, since=mark_b)["call"]

    b.answer(call_b, 180)
    a.wait_call_state(call_a, "early", timeout=8, since=mark_a)  # the caller hears the ringing
    sip_call_id = a.call_info(call_a)["sip_call_id"]
    leader = cluster.wait_leader()
    wait_for(lambda: leader.call("call.active")["calls"], 5.0, "the call in the leader's state")
    killed_at = leader.kill()
    survivors = cluster.live()
    cluster.wait_leader(timeout=10.0, among=survivors)
    back, _ = wait_service(cluster, 10.0, survivors)
    answered = time.time()
    b.answer(call_b, code)

    def outcome() -> dict[str, Any] | None:
        for event in a.iter_events(mark_a):
            if event["event"] == "call_state" and event.get("call") == call_a and event["state"] in (
                    "confirmed", "disconnected"):
                return event
        return None

    final = poll_until(outcome, timeout=10, what="the caller established or given a final response")
    print(f"killed {leader.id} while ringing; service back after {back - killed_at:.3f} s; caller: {final}")
    if code == 200:
        assert final["state"] == "confirmed", final  # nothing else could end this call: the 2xx got through
    if final["state"] == "confirmed":
        b.wait_call_state(call_b, "confirmed", timeout=8, since=mark_b)
        rtp_both_ways(a, call_a, b, call_b, 25)
        record = record_on(survivors, sip_call_id, lambda r: r["answered_at"] is not None)
        assert record["answered_at"] >= answered - 0.5 and record["ended_at"] is None, record
        record = hang_up_after_failover(cluster, survivors, a, call_a, b, call_b, float(final["t"]))
    else:
        assert final.get("code") == code, final  # the callee's own final response reached the caller
        record = record_on(survivors, sip_call_id, lambda r: r["ended_at"] is not None)
        assert record["disposition"] != "answered" and record["cause"] == "failure", record
        assert record["status_code"] == code and record["ended_at"] >= answered - 0.5, record
    print(f"record: {record}")


def test_d_new_call_within_1_5_s_of_a_leader_kill(
    cluster: Cluster, phones: Callable[[int], list[PhoneProcess]]
) -> None:
    a, _, b, callee_ext = two_phones(cluster, phones)
    host, port = service_of(cluster)
    b.auto_answer("b", 200, delay=0.0)
    leader = cluster.wait_leader()
    killed_at = leader.kill()
    back, _ = wait_service(cluster, 10.0, cluster.live())
    mark_a, mark_b = a.mark(), b.mark()
    call_a = a.call("a", f"sip:{callee_ext}@{host}:{port}")
    confirmed = a.wait_call_state(call_a, "confirmed", timeout=8, since=mark_a)
    call_b = b.wait_incoming("b", timeout=8, since=mark_b)["call"]
    took = float(confirmed["mono"]) - killed_at
    print(f"killed {leader.id}; service answering after {back - killed_at:.3f} s; new call confirmed "
          f"{took:.3f} s after the kill")
    assert took <= NEW_CALL_BOUND, took
    b.wait_call_state(call_b, "confirmed", timeout=8, since=mark_b)
    rtp_both_ways(a, call_a, b, call_b, 10)
    hang_up_after_failover(cluster, cluster.live(), a, call_a, b, call_b, float(confirmed["t"]))
