"""Two offices joined by trunks, end to end (issue 9): two real 3-node clusters, real pjsua2 phones.

Office A (extensions 1xxx) and office B (2xxx) are two raftpbx clusters on loopback (tests/integration/
offices.py): each has a service address held by its leader (node 1 at the start), a trunk to the other
office whose peers are the other's three node SIP addresses (first peer: the other's node 1) and whose
allow-list is the other's /28 (its nodes and service address), and a route {digit}XXX to that trunk, all
written through the admin RPC. Phone 1001 (a pjsua2 process, chaos/phone.py) registers on A through A's
service address, phone 2001 on B through B's; each dials `sip:NUMBER@<its own service address>`, so an
inter-office call goes phone -> its PBX -> (trunk) -> the other PBX -> phone, with both PBXs'
Record-Routes (service addresses) in the dialog's route set. Media flows phone to phone.

What each test proves, and how it can fail:
1. 1001 calls 2001: answered, RTP both ways (both phones' rx and tx counters grow), the caller's BYE gets
   200 from the callee; during the call A's state has the call with trunk office-b/outbound and B's with
   office-a/inbound; once ended, the record is identical on the three nodes of each cluster, says
   answered / hung up by the caller in both, and its times are causally ordered across the offices (A
   commits CallStarted before forwarding, so A.started_at <= B.started_at; B commits the answer before
   relaying the 200, so B.answered_at <= A.answered_at). 1b: the same with the callee's BYE. 1c: the
   other way (2001 calls 1001), the symmetric trunk. 1d: 1001 dials 2999 (routed to B, no such
   extension there): B's 404 reaches the caller, both offices record a failed call with status 404.
   1e: 1001 cancels while 2001 rings: 487 to the caller, 2001's phone stops ringing (CANCEL relayed by
   both PBXs), both records say cancelled by the caller.
4. A stranger: raw INVITEs to B's service address from 127.x.y.20 (A's /24, outside A's /28: not
   allow-listed) without credentials get 407, with a digest made with a wrong password get 403/407; none
   reaches 2001's phone and none leaves a call record in B. Control: the same INVITE from an address
   inside A's /28 (allow-listed, no node there) is accepted without a challenge and rings 2001 (which
   declines 486, relayed and recorded as inbound office-a): the challenge is about the source address.
   The control's call is the FIRST incoming call the phone sees after the strangers', so a stranger's
   INVITE that had got through would show (no blind wait). No transit: the allow-listed source dialling
   1001 at B (a number B routes back out to office-a) is refused 403/404 and leaves no record in A.
2. Mid-call, kill -9 the B node that A's trunk is using (the first peer in A's `next_peers`, which must be
   among the B nodes that stamped the call's record; it is B's leader and service-address holder, by the
   layout): RTP keeps flowing both ways (>= 50 more packets each way, no gap over 200 ms), the caller's
   BYE (through A's service address, then B's, now held by another B node) gets 200, and the records end
   normally: identical on A's three nodes and on B's two survivors.
3. After that kill, a new inter-office call succeeds through another peer address: B's record of it is
   stamped only by survivors; A's pinger sees the dead peer "down". The killed node is then restarted and
   catches up: this call's record and test 2's are identical on all three B nodes.
5. A's leader (the service-address holder that routed the call out) is killed mid-call: RTP keeps flowing,
   the callee's BYE (B, then A's service address on A's next holder) gets 200; A's record is identical on
   its survivors and, once the node is restarted, on all three.
6. The trunk switched to TCP (`trunk.update`): A's pinger sees B's peers up over TCP, a call is carried
   over a real TCP connection from an A address to B's peer (/proc/net/tcp), both hang-ups, records.
7. The B node A's trunk uses is drained (`cluster.drain`): it still answers A's pings, so A still tries it
   first, gets 503 and moves to the next peer at once (A's log: `trunk.attempt_failed` naming that peer
   with the 503, and no other); the call is stamped only by other B nodes. Undrained at the end.
8. Issue 5 (c) across a trunk: A's leader dies while 2001 rings, then 2001 answers: its 200 reaches A's next
   holder (a stray 2xx there), 1001 ends up in the call, both records say answered; A's node restarted.
9. The other office down (all of B killed): the caller gets 503 once each of B's three addresses was tried
   (A's log) and A records the failure; B restarted from its data dirs: calls go through again.
Tests run in file order on one pair of offices; 2 leaves B with two nodes for 3, which restarts the third.
Trunk and direction are checked in the replicated state's call while it is up (`call.active`) and in the
call records (`cdr.get`, `cdr.list` by caller and by trunk) once it ended.
Every wait polls a condition against a deadline; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from nodecluster import Node, RpcFailure, phone_group, wait_for
from offices import Office, Offices, SipUdpClient, established_tcp, peer_states, start_offices
from raftpbx.transport.sip.digest import compute_ha1, make_authorization, parse_challenge

from chaos.phone import PhoneProcess, poll_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

PASSWORD_A = "office-A-Secret-19"
PASSWORD_B = "office-B-Secret-27"
MAX_RTP_GAP_MS = 200.0  # issue 5's bound, kept for a trunk peer's death


# --- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def offices(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Offices]:
    with start_offices(tmp_path_factory.mktemp("offices")) as o:
        yield o


@dataclass
class Phones:
    """1001 on A (account "a" of phone `a`) and 2001 on B (account "b" of phone `b`), registered."""

    a: PhoneProcess
    b: PhoneProcess


def register(phone: PhoneProcess, account: str, ext: str, office: Office, password: str) -> None:
    """Register `ext` on `phone` through the office's service address."""
    phone.transports(udp=True, tcp=False)
    host, port = office.service
    mark = phone.mark()
    phone.account_add(account, f"sip:{ext}@{office.domain}", transport="udp", registrar=f"sip:{host}:{port}",
                      register=True, user=ext, password=password, expires=600)
    state = phone.wait_event(lambda e: e["event"] == "reg_state" and e.get("account") == account, 10.0, since=mark)
    assert state["code"] == 200 and state["active"], state


@contextlib.contextmanager
def office_phones(offices: Offices, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Phones]:
    """Extensions 1001 (A) and 2001 (B), each with a pjsua2 phone registered through its office."""
    offices.a.extension("1001", PASSWORD_A)
    offices.b.extension("2001", PASSWORD_B)
    with phone_group(offices.a.cluster, tmp_path_factory.mktemp("phones-a")) as make_a, \
            phone_group(offices.b.cluster, tmp_path_factory.mktemp("phones-b")) as make_b:
        (a,), (b,) = make_a(1), make_b(1)
        register(a, "a", "1001", offices.a, PASSWORD_A)
        register(b, "b", "2001", offices.b, PASSWORD_B)
        yield Phones(a, b)


@pytest.fixture(scope="module")
def phones(offices: Offices, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Phones]:
    with office_phones(offices, tmp_path_factory) as pair:
        yield pair


# --- helpers ---------------------------------------------------------------------------------------------


@dataclass
class Leg:
    """An established call: the caller's and callee's phones, accounts and call ids."""

    caller: PhoneProcess
    call_a: str
    callee: PhoneProcess
    call_b: str
    sip_call_id: str
    confirmed_at: float  # the caller's "confirmed", wall clock


def logs_for(o: Offices, needle: str, limit: int = 30) -> str:
    return "\n".join(o.a.log_lines(needle, limit) + o.b.log_lines(needle, limit))


def establish(o: Offices, caller: PhoneProcess, caller_account: str, caller_office: Office, callee: PhoneProcess,
              callee_account: str, number: str) -> Leg:
    """`caller` dials `number` through its own office's service address; `callee` auto-answers 200."""
    callee.auto_answer(callee_account, 200, delay=0.1)
    host, port = caller_office.service
    mark_a, mark_b = caller.mark(), callee.mark()
    call_a = caller.call(caller_account, f"sip:{number}@{host}:{port}")

    def answered_or_failed() -> dict[str, Any] | None:
        for event in caller.iter_events(mark_a):
            if event["event"] == "call_state" and event.get("call") == call_a and event["state"] in (
                    "confirmed", "disconnected"):
                return event
        return None

    outcome = poll_until(answered_or_failed, timeout=15, what="the caller confirmed or refused")
    sip_call_id = caller.call_info(call_a)["sip_call_id"]
    if outcome["state"] != "confirmed":
        raise AssertionError(f"call {sip_call_id} to {number} failed: {outcome}\n{logs_for(o, sip_call_id)}")
    incoming = callee.wait_incoming(callee_account, timeout=5, since=mark_b)
    assert incoming["sip_call_id"] == sip_call_id, incoming  # the proxies keep the Call-ID end to end
    call_b = incoming["call"]
    callee.wait_call_state(call_b, "confirmed", timeout=5, since=mark_b)
    leg = Leg(caller, call_a, callee, call_b, sip_call_id, float(outcome["t"]))
    rtp_both_ways(leg, 25)
    return leg


def rtp_counters(leg: Leg) -> dict[str, int]:
    ia, ib = leg.caller.rtp_gaps(leg.call_a), leg.callee.rtp_gaps(leg.call_b)
    return {"arx": ia["rx"], "atx": ia["tx"], "brx": ib["rx"], "btx": ib["tx"]}


def rtp_both_ways(leg: Leg, packets: int, since: dict[str, int] | None = None) -> dict[str, int]:
    """Wait until each phone has received and sent `packets` more RTP packets than in `since`."""
    base = since or {"arx": 0, "atx": 0, "brx": 0, "btx": 0}
    now: dict[str, int] = {}

    def flowing() -> bool:
        now.update(rtp_counters(leg))
        return all(now[k] - base[k] >= packets for k in base)

    try:
        poll_until(flowing, timeout=10, what=f"{packets} more RTP packets each way")
    except Exception as exc:
        raise AssertionError(f"RTP not flowing both ways: {now} (from {base})") from exc
    return dict(now)


def active_call(node: Node, call_id: str) -> dict[str, Any] | None:
    return next((c for c in node.call("call.active")["calls"] if c["call_id"] == call_id), None)


def check_active(o: Offices, leg: Leg, caller: str, callee: str, a_to_b: bool = True) -> dict[str, dict[str, Any]]:
    """While the call is up, each office's state has it (on every live node) with its trunk and direction."""
    out_office, in_office = (o.a, o.b) if a_to_b else (o.b, o.a)
    expect = {out_office.name: (in_office.name, "outbound"), in_office.name: (out_office.name, "inbound")}
    seen: dict[str, dict[str, Any]] = {}
    for office in (out_office, in_office):
        trunk, direction = expect[office.name]
        for node in office.cluster.live():
            def answered(n: Node = node) -> dict[str, Any] | None:
                call = active_call(n, leg.sip_call_id)
                return call if call is not None and call["answered_at"] is not None else None

            call = wait_for(answered, 5.0, f"the answered call in {office.name}/{node.id}'s state")
            assert (call["caller"], call["callee"], call["trunk"], call["direction"]) == (
                caller, callee, trunk, direction), (office.name, node.id, call)
            seen[office.name] = call
    return seen


def record_in(office: Office, call_id: str, nodes: list[Node] | None = None) -> dict[str, Any]:
    """The ended record of `call_id`, identical (cdr.get) on every given node (default: the live ones), and
    the same row in `cdr.list` filtered by the caller."""
    nodes = nodes if nodes is not None else office.cluster.live()
    records: dict[str, dict[str, Any]] = {}
    for node in nodes:
        def ended(n: Node = node) -> bool:
            records[n.id] = n.call("cdr.get", call_id=call_id)
            return records[n.id]["ended_at"] is not None

        wait_for(ended, 10.0, f"the ended record of {call_id} in {office.name}/{node.id}")
        rows = node.call("cdr.list", extension=records[node.id]["caller"], limit=500)["records"]
        assert [r for r in rows if r["call_id"] == call_id] == [records[node.id]], (office.name, node.id, rows)
        trunk = records[node.id]["trunk"]
        if trunk:  # the `trunk` filter of cdr.list finds it, and only calls of that trunk
            rows = node.call("cdr.list", trunk=trunk, limit=500)["records"]
            assert [r for r in rows if r["call_id"] == call_id] == [records[node.id]], (office.name, node.id)
            assert {r["trunk"] for r in rows} == {trunk}, (office.name, node.id, rows)
        assert active_call(node, call_id) is None, (office.name, node.id)
    first = next(iter(records.values()))
    assert all(r == first for r in records.values()), (office.name, records)
    return first


def check_records(o: Offices, leg: Leg, caller: str, callee: str, hangup_by: str, bye_at: float,
                  a_to_b: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both offices' records of the call: identical within each cluster, answered, hung up by `hangup_by`,
    durations within 1 s of what the caller saw, and causally ordered across the offices."""
    out_office, in_office = (o.a, o.b) if a_to_b else (o.b, o.a)
    out_rec = record_in(out_office, leg.sip_call_id)  # on every live node (B's survivors after a kill)
    in_rec = record_in(in_office, leg.sip_call_id)
    for office, rec, trunk, direction in ((out_office, out_rec, in_office.name, "outbound"),
                                          (in_office, in_rec, out_office.name, "inbound")):
        assert (rec["caller"], rec["callee"]) == (caller, callee), (office.name, rec)
        assert rec["disposition"] == "answered" and rec["hangup_by"] == hangup_by, (office.name, rec)
        assert rec["status_code"] == 200, (office.name, rec)
        assert (rec["trunk"], rec["direction"]) == (trunk, direction), (office.name, rec)
        recorded = rec["ended_at"] - rec["answered_at"]
        seen = bye_at - leg.confirmed_at
        assert abs(recorded - seen) <= 1.0, (office.name, recorded, seen, rec)
    assert out_rec["started_at"] <= in_rec["started_at"], (out_rec, in_rec)
    assert in_rec["answered_at"] <= out_rec["answered_at"], (out_rec, in_rec)
    return out_rec, in_rec


def hang_up(leg: Leg, by_caller: bool) -> float:
    """The chosen side sends BYE; it must get 200 and the other side must be disconnected. Returns the wall
    time of the 200."""
    sender, call, other, other_call = ((leg.caller, leg.call_a, leg.callee, leg.call_b) if by_caller
                                       else (leg.callee, leg.call_b, leg.caller, leg.call_a))
    mark = sender.mark()
    sender.bye(call)
    result = sender.wait_event(lambda e: e["event"] == "bye_result" and e.get("call") == call, 10, since=mark)
    assert result["code"] == 200, result
    other.wait_call_state(other_call, "disconnected", timeout=8)
    return float(result["t"])


def trunk_peer_in_use(o: Offices) -> Node:
    """The B node that A's trunk sends new calls to: the first of `next_peers` on the A node that holds A's
    service address (the one the caller's INVITE reaches)."""
    holder = o.a.cluster.service_holder()
    next_peers = holder.call("trunk.get", name=o.b.name)["next_peers"]
    return o.b.node_by_peer(next_peers[0])


# --- tests -----------------------------------------------------------------------------------------------


def test_harness_offices_joined_and_phones_registered(offices: Offices, phones: Phones) -> None:
    """The layout the other tests rely on: trunks, routes and peers' health everywhere, phones bound."""
    for office, other in ((offices.a, offices.b), (offices.b, offices.a)):
        for node in office.cluster.nodes:
            trunk = node.call("trunk.get", name=other.name)
            assert trunk["peers"] == other.peers and trunk["allow"] == [other.net], trunk
            assert trunk["routes"] == [f"to-{other.name}"], trunk
            assert peer_states(node, other.name) == dict.fromkeys(other.peers, "up")
            test = node.call("route.test", number=f"{other.digit}001")
            assert (test["target"], test["send"]) == ("trunk", f"{other.digit}001"), test
            assert node.call("route.test", number=f"{office.digit}001")["target"] == "extension"
    for office, ext in ((offices.a, "1001"), (offices.b, "2001")):
        for node in office.cluster.nodes:
            wait_for(lambda n=node, e=ext: n.call("binding.list", extension=e)["bindings"], 5.0,
                     f"{ext}'s binding on {office.name}/{node.id}")


def test_1_a_calls_b_caller_hangs_up(offices: Offices, phones: Phones) -> None:
    leg = establish(offices, phones.a, "a", offices.a, phones.b, "b", "2001")
    check_active(offices, leg, "1001", "2001")
    bye_at = hang_up(leg, by_caller=True)
    a_rec, b_rec = check_records(offices, leg, "1001", "2001", "caller", bye_at)
    print(f"A: {a_rec}\nB: {b_rec}")


def test_1b_a_calls_b_callee_hangs_up(offices: Offices, phones: Phones) -> None:
    leg = establish(offices, phones.a, "a", offices.a, phones.b, "b", "2001")
    check_active(offices, leg, "1001", "2001")
    rtp_both_ways(leg, 25, since=rtp_counters(leg))
    bye_at = hang_up(leg, by_caller=False)
    check_records(offices, leg, "1001", "2001", "callee", bye_at)


def test_1c_b_calls_a_the_other_way(offices: Offices, phones: Phones) -> None:
    leg = establish(offices, phones.b, "b", offices.b, phones.a, "a", "1001")
    check_active(offices, leg, "2001", "1001", a_to_b=False)
    bye_at = hang_up(leg, by_caller=True)
    check_records(offices, leg, "2001", "1001", "caller", bye_at, a_to_b=False)


def _failed_call(o: Offices, phones: Phones, number: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """1001 dials `number`; waits for the caller's end; returns (Call-ID, A's record, B's record)."""
    mark = phones.a.mark()
    call = phones.a.call("a", f"sip:{number}@{o.a.service[0]}:{o.a.service[1]}")
    ended = phones.a.wait_call_state(call, "disconnected", timeout=15, since=mark)
    sip_call_id = phones.a.call_info(call)["sip_call_id"]
    return sip_call_id, ended, {"a": record_in(o.a, sip_call_id), "b": record_in(o.b, sip_call_id)}


def test_1d_unknown_number_in_the_other_office_404_recorded_on_both_sides(offices: Offices, phones: Phones) -> None:
    sip_call_id, ended, records = _failed_call(offices, phones, "2999")  # routed to office-b, no such extension
    assert ended["code"] == 404, (ended, logs_for(offices, sip_call_id))
    for side, trunk, direction in (("a", "office-b", "outbound"), ("b", "office-a", "inbound")):
        rec = records[side]
        assert rec["status_code"] == 404 and rec["disposition"] == "failed", (side, rec)
        assert rec["caller"] == "1001" and rec["answered_at"] is None, (side, rec)
        assert (rec["trunk"], rec["direction"]) == (trunk, direction), (side, rec)
    print(f"404 across the trunk: {records}")


def test_1e_caller_cancels_while_the_other_office_rings(offices: Offices, phones: Phones) -> None:
    phones.b.auto_answer("b", 180)  # ring, never answer
    mark_a, mark_b = phones.a.mark(), phones.b.mark()
    call_a = phones.a.call("a", f"sip:2001@{offices.a.service[0]}:{offices.a.service[1]}")
    call_b = phones.b.wait_incoming("b", timeout=10, since=mark_b)["call"]
    phones.a.wait_call_state(call_a, "early", timeout=10, since=mark_a)  # the 180 crossed both PBXs
    sip_call_id = phones.a.call_info(call_a)["sip_call_id"]
    phones.a.cancel(call_a)
    assert phones.a.wait_call_state(call_a, "disconnected", timeout=10, since=mark_a)["code"] == 487
    phones.b.wait_call_state(call_b, "disconnected", timeout=10, since=mark_b)  # CANCEL relayed by A, then B
    for office in (offices.a, offices.b):
        rec = record_in(office, sip_call_id)
        assert rec["disposition"] == "cancelled" and rec["hangup_by"] == "caller", (office.name, rec)
        assert rec["answered_at"] is None and rec["status_code"] == 487, (office.name, rec)


def _answer_challenge(final: Any, username: str, password: str, ruri: str) -> str:
    """A Proxy-Authorization/Authorization header line answering `final`'s challenge with `password`."""
    header = "Proxy-Authenticate" if final.status == 407 else "WWW-Authenticate"
    challenge = parse_challenge(final.headers.get(header))
    ha1 = compute_ha1(username, challenge.realm, password, challenge.algorithm)
    value = make_authorization(username=username, ha1=ha1, challenge=challenge, method="INVITE", uri=ruri,
                               cnonce=secrets.token_hex(8))
    return f"{'Proxy-Authorization' if final.status == 407 else 'Authorization'}: {value}"


def test_4_caller_not_on_the_allow_list_is_rejected(offices: Offices, phones: Phones) -> None:
    b = offices.b
    host, port = b.service
    ruri = f"sip:2001@{host}:{port}"
    stranger_ip = f"{offices.a.prefix}.20"  # A's /24 but outside A's /28: no trunk allows it
    insider_ip = f"{offices.a.prefix}.14"  # inside A's /28 (no node there): office-a's allow-list covers it
    phones.b.auto_answer("b", 486, ring=False)
    mark_b = phones.b.mark()
    refused: list[tuple[str, list[int]]] = []
    with SipUdpClient(stranger_ip, offices.a.domain) as stranger:
        tx, call_id, from_tag = stranger.call_attempt((host, port), ruri, from_user="1001")
        assert tx.final is not None and tx.final.status == 407, tx.statuses
        assert all(s == 100 or s >= 400 for s in tx.statuses), tx.statuses  # never 180/183 from the phone
        refused.append((call_id, tx.statuses))
        for username, password in (("1001", PASSWORD_A), ("2001", "not-" + PASSWORD_B)):
            # Credentials that B cannot verify: A's extension (B has no 1001) and a wrong password for 2001.
            auth = _answer_challenge(tx.final, username, password, ruri)
            tx2, _, _ = stranger.call_attempt((host, port), ruri, from_user=username, call_id=call_id, cseq=2,
                                              from_tag=from_tag, extra=[auth])
            assert tx2.final is not None and tx2.final.status in (403, 407), (username, tx2.statuses)
            assert all(s == 100 or s >= 400 for s in tx2.statuses), tx2.statuses
            refused.append((call_id, tx2.statuses))
    with SipUdpClient(insider_ip, offices.a.domain) as insider:  # control: same request, allow-listed source
        tx, control_id, _ = insider.call_attempt((host, port), ruri, from_user="1001")
        assert tx.final is not None and tx.final.status == 486, tx.statuses  # the phone's own answer
        assert 407 not in tx.statuses and 401 not in tx.statuses, tx.statuses
        # No transit: an allow-listed peer's call to a number B would route back out (1XXX -> office-a) is
        # refused (docs/trunks.md, inbound step 2: only local extensions), and never reaches A or 1001.
        mark_a = phones.a.mark()
        transit, transit_id, _ = insider.call_attempt((host, port), f"sip:1001@{host}:{port}", from_user="1001")
        assert transit.final is not None and transit.final.status in (403, 404), transit.statuses
        assert 407 not in transit.statuses, transit.statuses
        assert all(e["event"] != "incoming_call" for e in phones.a.iter_events(mark_a)), "transit reached 1001"
        for node in offices.a.cluster.live():
            with pytest.raises(RpcFailure):
                node.call("cdr.get", call_id=transit_id)
    first = phones.b.wait_incoming("b", timeout=5, since=mark_b)
    assert first["sip_call_id"] == control_id, ("a stranger's INVITE reached 2001", first, refused)
    for node in b.cluster.live():
        with pytest.raises(RpcFailure):  # not even a failed call: no CallStarted for a refused INVITE
            node.call("cdr.get", call_id=refused[0][0])
        control = wait_for(lambda n=node: n.call("cdr.get", call_id=control_id), 5.0, "the control's record")
        assert control["status_code"] == 486 and control["callee"] == "2001", control
        assert (control["trunk"], control["direction"]) == ("office-a", "inbound"), control
    print(f"refused: {refused}; control {control_id}: {control}")


def _kill_peer_in_use(o: Offices, leg: Leg | None) -> Node:
    """kill -9 the B node A's trunk uses; with a call up, it must be among the nodes that stamped B's record."""
    victim = trunk_peer_in_use(o)
    if leg is not None:
        b_call = wait_for(lambda: active_call(victim, leg.sip_call_id), 5.0, "the call in the victim's state")
        assert victim.id in b_call["nodes"], (victim.id, b_call)
    victim.kill()
    o.killed.append(victim)
    survivors = o.b.cluster.live()
    o.b.cluster.wait_leader(timeout=10.0, among=survivors)
    o.b.cluster.service_holder(timeout=10.0, among=survivors)
    return victim


def test_2_peer_in_use_killed_mid_call(offices: Offices, phones: Phones) -> None:
    assert not offices.killed, "this test needs all of B's nodes"
    leg = establish(offices, phones.a, "a", offices.a, phones.b, "b", "2001")
    check_active(offices, leg, "1001", "2001")
    leader = offices.b.cluster.wait_leader()
    before = rtp_counters(leg)
    victim = _kill_peer_in_use(offices, leg)
    rtp_both_ways(leg, 50, since=before)  # at least one more second of audio each way after the kill
    gaps = {"caller": leg.caller.rtp_gaps(leg.call_a), "callee": leg.callee.rtp_gaps(leg.call_b)}
    for side, gap in gaps.items():
        assert not gap["ended"] and gap["max_gap_ms"] <= MAX_RTP_GAP_MS, (side, gap)
    bye_at = hang_up(leg, by_caller=True)
    a_rec, b_rec = check_records(offices, leg, "1001", "2001", "caller", bye_at)  # B: its two survivors
    offices.calls["killed-mid-call"] = leg.sip_call_id  # test 3 checks it on the restarted node too
    print(f"killed B/{victim.id} (B leader before: {leader.id}); RTP {gaps}\nA: {a_rec}\nB: {b_rec}")


def test_3_new_call_after_the_kill_goes_through_another_peer(offices: Offices, phones: Phones) -> None:
    victim = offices.killed[-1] if offices.killed else _kill_peer_in_use(offices, None)
    dead_peer = f"{victim.ip}:5060"
    started = time.monotonic()
    leg = establish(offices, phones.a, "a", offices.a, phones.b, "b", "2001")
    took = time.monotonic() - started
    seen = check_active(offices, leg, "1001", "2001")
    assert victim.id not in seen[offices.b.name]["nodes"], seen
    bye_at = hang_up(leg, by_caller=True)
    check_records(offices, leg, "1001", "2001", "caller", bye_at)
    holder = offices.a.cluster.service_holder()
    wait_for(lambda: peer_states(holder, offices.b.name)[dead_peer] == "down", 10.0,
             f"A/{holder.id} sees the killed peer down")
    health = [h for h in holder.call("trunk.get", name=offices.b.name)["health"] if h["peer"] == dead_peer]
    print(f"A/{holder.id}'s view of the killed peer: {health}")  # last_error says who noticed: ping or call
    # The killed node comes back from its data dir, catches up, and holds the same records.
    victim.start()
    offices.killed.remove(victim)
    offices.b.cluster.wait_leader(timeout=20.0)
    offices.b.cluster.assert_converged(timeout=20.0)
    b_rec = record_in(offices.b, leg.sip_call_id, offices.b.cluster.nodes)
    if "killed-mid-call" in offices.calls:  # the call that was up when the node died: same record there too
        record_in(offices.b, offices.calls["killed-mid-call"], offices.b.cluster.nodes)
    print(f"new call set up {took:.2f} s after dialling, through B/{seen[offices.b.name]['nodes']}; "
          f"B/{victim.id} restarted and holds {b_rec}")


def test_5_caller_office_leader_killed_mid_call_callee_hangs_up(offices: Offices, phones: Phones) -> None:
    """The other side of 2: A's leader (the service-address holder that routed the call out) dies mid-call;
    the callee's BYE (B, then A's service address, now on another A node) reaches 1001 and gets 200."""
    a = offices.a.cluster
    leg = establish(offices, phones.a, "a", offices.a, phones.b, "b", "2001")
    check_active(offices, leg, "1001", "2001")
    victim = a.service_holder()
    before = rtp_counters(leg)
    victim.kill()
    survivors = a.live()
    a.wait_leader(timeout=10.0, among=survivors)
    a.service_holder(timeout=10.0, among=survivors)
    rtp_both_ways(leg, 50, since=before)
    for side, gap in (("caller", leg.caller.rtp_gaps(leg.call_a)), ("callee", leg.callee.rtp_gaps(leg.call_b))):
        assert not gap["ended"] and gap["max_gap_ms"] <= MAX_RTP_GAP_MS, (side, gap)
    bye_at = hang_up(leg, by_caller=False)
    a_rec, _ = check_records(offices, leg, "1001", "2001", "callee", bye_at)  # A: its two survivors
    victim.start()
    a.wait_leader(timeout=20.0)
    a.assert_converged(timeout=20.0)
    assert record_in(offices.a, leg.sip_call_id, a.nodes) == a_rec
    print(f"killed A/{victim.id} mid-call; A's record after its restart: {a_rec}")


def test_6_trunk_over_tcp(offices: Offices, phones: Phones) -> None:
    """The trunk's transport switched to TCP (trunk.update): the call, both hang-ups' routing and records."""
    node = offices.a.write_node()
    node.call("trunk.update", name=offices.b.name, transport="tcp")
    try:
        for n in offices.a.cluster.live():
            wait_for(lambda n=n: all(row["transport"] == "tcp" and row["state"] == "up" for row in
                                     n.call("trunk.get", name=offices.b.name)["health"]), 15.0,
                     f"A/{n.id} pings B over TCP")
        for by_caller in (True, False):
            leg = establish(offices, phones.a, "a", offices.a, phones.b, "b", "2001")
            check_active(offices, leg, "1001", "2001")
            peer = trunk_peer_in_use(offices)
            links = established_tcp((peer.ip, 5060))
            assert any(ip in offices.a.cluster_ips for ip, _ in links), (peer.id, links)  # A's node -> B's peer
            bye_at = hang_up(leg, by_caller=by_caller)
            check_records(offices, leg, "1001", "2001", "caller" if by_caller else "callee", bye_at)
    finally:
        offices.a.write_node().call("trunk.update", name=offices.b.name, transport="udp")


def test_7_drained_peer_answers_503_and_the_call_moves_on_at_once(offices: Offices, phones: Phones) -> None:
    """Maintenance in B: the node A's trunk uses is drained; it still answers A's pings (so A keeps trying
    it first) but refuses the INVITE with 503, and A moves to the next peer on that 503 (RFC 3263 §4.3),
    not after its attempt timeout."""
    assert not offices.killed
    b = offices.b.cluster
    for n in offices.a.cluster.live():  # every peer up again (test 3 restarted B's killed node)
        wait_for(lambda n=n: set(peer_states(n, offices.b.name).values()) == {"up"}, 15.0, f"A/{n.id}: B up")
    drained = trunk_peer_in_use(offices)
    b.wait_leader().call("cluster.drain", timeout=15.0, node=drained.id)
    try:
        b.wait_leader(timeout=15.0)
        b.service_holder(timeout=15.0)
        assert trunk_peer_in_use(offices) is drained  # OPTIONS still answered: A still tries it first
        leg = establish(offices, phones.a, "a", offices.a, phones.b, "b", "2001")
        seen = check_active(offices, leg, "1001", "2001")
        assert drained.id not in seen[offices.b.name]["nodes"], seen
        failed = [line for line in offices.a.log_lines(leg.sip_call_id) if "trunk.attempt_failed" in line]
        assert failed and all(f"{drained.ip}:5060" in line and "503" in line for line in failed), failed
        bye_at = hang_up(leg, by_caller=True)
        check_records(offices, leg, "1001", "2001", "caller", bye_at)
        print(f"drained B/{drained.id}; A's failover: {failed}")
    finally:
        b.wait_leader().call("cluster.undrain", node=drained.id)


def test_8_caller_office_leader_killed_while_the_other_office_rings(offices: Offices, phones: Phones) -> None:
    """Issue 5 (c) across a trunk: A's leader dies while 2001 rings; 2001 then answers. Its 200 comes back
    (B's Via names A's service address) to A's next holder as a stray 2xx, which records the answer and
    passes it on: 1001 ends up in the call, and both offices' records say answered."""
    a = offices.a.cluster
    phones.b.auto_answer("b", 180)  # ring only; answered below
    mark_a, mark_b = phones.a.mark(), phones.b.mark()
    call_a = phones.a.call("a", f"sip:2001@{offices.a.service[0]}:{offices.a.service[1]}")
    call_b = phones.b.wait_incoming("b", timeout=10, since=mark_b)["call"]
    phones.a.wait_call_state(call_a, "early", timeout=10, since=mark_a)
    sip_call_id = phones.a.call_info(call_a)["sip_call_id"]
    victim = a.service_holder()
    wait_for(lambda: active_call(victim, sip_call_id), 5.0, "the call in A's leader's state")
    victim.kill()
    survivors = a.live()
    a.wait_leader(timeout=10.0, among=survivors)
    a.service_holder(timeout=10.0, among=survivors)
    answered = time.time()
    phones.b.answer(call_b, 200)

    def outcome() -> dict[str, Any] | None:
        for event in phones.a.iter_events(mark_a):
            if event["event"] == "call_state" and event.get("call") == call_a and event["state"] in (
                    "confirmed", "disconnected"):
                return event
        return None

    final = poll_until(outcome, timeout=15, what="the caller established or refused")
    assert final["state"] == "confirmed", (final, logs_for(offices, sip_call_id))
    phones.b.wait_call_state(call_b, "confirmed", timeout=8, since=mark_b)
    leg = Leg(phones.a, call_a, phones.b, call_b, sip_call_id, float(final["t"]))
    rtp_both_ways(leg, 25)
    seen = check_active(offices, leg, "1001", "2001")
    assert seen[offices.a.name]["answered_at"] >= answered - 0.5, seen
    bye_at = hang_up(leg, by_caller=True)
    check_records(offices, leg, "1001", "2001", "caller", bye_at)
    victim.start()
    a.wait_leader(timeout=20.0)
    a.assert_converged(timeout=20.0)
    record_in(offices.a, sip_call_id, a.nodes)


def test_9_other_office_down_503_then_back(offices: Offices, phones: Phones) -> None:
    """Every B node killed: 1001's call to 2001 is tried on each of B's addresses in turn and ends with 503
    (RFC 3261 §16.7 step 6 / docs/trunks.md: no peer answered at all), recorded as a failure in A with the
    trunk in the state; once B is restarted from its data dirs, inter-office calls work again."""
    b = offices.b.cluster
    assert not offices.killed
    for node in b.nodes:
        node.kill()
    mark = phones.a.mark()
    started = time.monotonic()
    call = phones.a.call("a", f"sip:2001@{offices.a.service[0]}:{offices.a.service[1]}")
    sip_call_id = phones.a.call_info(call)["sip_call_id"]
    holder = offices.a.cluster.service_holder()
    state = wait_for(lambda: active_call(holder, sip_call_id), 5.0, "the call in A's state while it tries")
    assert (state["trunk"], state["direction"]) == (offices.b.name, "outbound"), state
    ended = phones.a.wait_call_state(call, "disconnected", timeout=20, since=mark)
    took = time.monotonic() - started
    assert ended["code"] == 503, (ended, logs_for(offices, sip_call_id))
    failed = [line for line in offices.a.log_lines(sip_call_id) if "trunk.attempt_failed" in line]
    tried = {p for p in offices.b.peers if any(p in line for line in failed)}
    assert tried == set(offices.b.peers), failed  # every address of B was tried before giving up
    rec = record_in(offices.a, sip_call_id)
    assert rec["status_code"] == 503 and rec["disposition"] == "failed" and rec["answered_at"] is None, rec
    assert (rec["trunk"], rec["direction"]) == (offices.b.name, "outbound"), rec
    print(f"B down: 503 after {took:.2f} s; A tried {failed}")
    for node in b.nodes:  # B comes back from its data dirs
        node.start()
    b.wait_leader(timeout=30.0)
    b.service_holder(timeout=15.0)
    for node in offices.a.cluster.live():
        wait_for(lambda n=node: set(peer_states(n, offices.b.name).values()) == {"up"}, 15.0,
                 f"A/{node.id} sees B up again")
    leg = establish(offices, phones.a, "a", offices.a, phones.b, "b", "2001")
    bye_at = hang_up(leg, by_caller=True)
    check_records(offices, leg, "1001", "2001", "caller", bye_at)
