"""Call timers on a real 3-node cluster with real pjsua2 phones: Timer C (RFC 3261 §16.6 step 11) and the
leader's maximum call duration, with short values (`calls.timer_c` = 2 s, `calls.max_duration` = 3 s).

Timer C: the callee rings and never answers; the proxy CANCELs it, the caller gets 408 and the record says
cause "timeout" (disposition no-answer). Maximum duration: an answered call is ended by the leader's job
(cause "timeout", hangup_by "system") and both phones receive its BYE (best effort, here they are alive).
Every wait polls a condition against a deadline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nodecluster import Cluster, phone_group, running_pbx
from test_calls import (
    DOMAIN,
    disconnected,
    new_extension,
    record_everywhere,
    register,
    rtp_both_ways,
)

from chaos.phone import PhoneProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TIMER_C = 2.0
MAX_DURATION = 3.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("calltimers")
    settings = {"raft.proposal_timeout": 3.0, "calls.timer_c": TIMER_C, "calls.max_duration": MAX_DURATION,
                "calls.timeout_interval": 0.2}
    with running_pbx(root, settings, DOMAIN, service_on_first_node=False) as c:
        yield c


@pytest.fixture
def phones(cluster: Cluster, tmp_path: Path) -> Iterator[Callable[[int], list[PhoneProcess]]]:
    with phone_group(cluster, tmp_path) as make:
        yield make


def test_timer_c_cancels_the_ringing_callee_and_the_caller_gets_408(
    cluster: Cluster, phones: Callable[[int], list[PhoneProcess]]
) -> None:
    node2, node3 = cluster.nodes[1], cluster.nodes[2]
    caller_ext, callee_ext = new_extension(cluster), new_extension(cluster)
    a, b = phones(2)
    register(a, "a", caller_ext, node2)
    register(b, "b", callee_ext, node3)
    b.auto_answer("b", 180)  # rings forever
    call_a = a.call("a", f"sip:{callee_ext}@{node2.ip}:5060")
    call_b = b.wait_incoming("b", timeout=8)["call"]
    sip_call_id = a.call_info(call_a)["sip_call_id"]
    state = disconnected(a, call_a, timeout=TIMER_C + 8)
    assert state["code"] == 408, state
    assert disconnected(b, call_b)["code"] == 487  # the proxy CANCELled the ringing branch
    record = record_everywhere(cluster, sip_call_id, lambda r: r["ended_at"] is not None)
    assert record["cause"] == "timeout" and record["disposition"] == "no-answer", record
    assert record["ended_at"] - record["started_at"] >= TIMER_C - 0.1


def test_the_leader_ends_an_overlong_call_with_a_bye_to_both_phones(
    cluster: Cluster, phones: Callable[[int], list[PhoneProcess]]
) -> None:
    node2, node3 = cluster.nodes[1], cluster.nodes[2]
    caller_ext, callee_ext = new_extension(cluster), new_extension(cluster)
    a, b = phones(2)
    register(a, "a", caller_ext, node2)
    register(b, "b", callee_ext, node3)
    b.auto_answer("b", 200)
    call_a = a.call("a", f"sip:{callee_ext}@{node2.ip}:5060")
    call_b = b.wait_incoming("b", timeout=8)["call"]
    a.wait_call_state(call_a, "confirmed", timeout=8)
    rtp_both_ways(a, call_a, b, call_b)
    sip_call_id = a.call_info(call_a)["sip_call_id"]
    disconnected(a, call_a, timeout=MAX_DURATION + 8)  # the leader's BYE reached both phones
    disconnected(b, call_b, timeout=8)
    record = record_everywhere(cluster, sip_call_id, lambda r: r["ended_at"] is not None)
    assert record["cause"] == "timeout" and record["hangup_by"] == "system", record
    assert record["disposition"] == "answered"
    assert MAX_DURATION - 0.1 <= record["ended_at"] - record["answered_at"] <= MAX_DURATION + 3.0, record
