# ruff: noqa: F811 (the fixtures make_node and client come from test_sipnode)
"""The cheaper REGISTER path (issue 8), over real UDP on loopback through SipNode and Registrar:
- a challenge leaves no server transaction behind (stateless 401, RFC 3261 §8.2.7), and a retransmitted
  REGISTER is simply challenged again with the same answer;
- the commit continues in a callback of the proposal's future (no task per REGISTER), still only after
  the commit; a failure of anything but the replicator still becomes the dispatcher's 500, a replicator
  error the registrar's 500/503; `aclose` waits for a proposal in flight and its 200."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from raftpbx.state import current_bindings
from raftpbx.transport.sip.message import Response, parse_message
from test_sipnode import HOST, Client, add_extension, client, make_node  # noqa: F401 (fixtures)

from raftpbx.replication import NoQuorum

pytestmark = pytest.mark.timeout(30)


async def _all_responses(client: Client, data: bytes, target: tuple[str, int], count: int) -> list[Response]:
    loop = asyncio.get_running_loop()
    await loop.sock_sendto(client.sock, data, target)
    out: list[Response] = []
    async with asyncio.timeout(3):
        while len(out) < count:
            message = parse_message(await loop.sock_recv(client.sock, 65535))
            assert isinstance(message, Response)
            out.append(message)
    return out


async def test_a_challenge_keeps_no_transaction_and_a_retransmission_is_challenged_again(
    make_node: Any, client: Client
) -> None:
    node = await make_node()
    add_extension(node.machine, "2001")
    core = node.sip.endpoint.core
    data = client.text("REGISTER", node.address, user="2001", call_id="stateless-1")
    (first,) = await _all_responses(client, data, node.address, 1)
    assert first.status == 401
    assert len(core.server_transactions) == 0 and core.next_timer() is None  # no timer J, nothing held
    (again,) = await _all_responses(client, data, node.address, 1)  # the same bytes: a retransmission
    assert again.status == 401
    assert again.to_bytes() == first.to_bytes()  # same nonce within the second, same derived To tag
    assert node.sip.requests["REGISTER"] == 2  # it reached the TU again (nothing absorbed it)
    assert node.registrar.counters["challenged"] == 2 and node.replicator.proposals == []


async def test_a_200_still_lingers_to_absorb_retransmissions(make_node: Any, client: Client) -> None:
    node = await make_node()
    add_extension(node.machine, "2001")
    _, ok = await client.register(node, contacts=[f"<sip:2001@{HOST}:5999>"])
    assert ok is not None and ok.status == 200
    assert len(node.sip.endpoint.core.server_transactions) == 1  # Completed, timer J (§17.2.2)
    assert len(node.replicator.proposals) == 1


async def test_the_commit_callback_answers_after_commit_without_a_task(
    make_node: Any, client: Client
) -> None:
    node = await make_node()
    add_extension(node.machine, "2001")
    gate, proposing = asyncio.Event(), asyncio.Event()
    seen_tasks: list[int] = []
    original = node.replicator.propose

    async def held(payload: bytes, timeout: float) -> object:  # noqa: ASYNC109
        seen_tasks.append(len(node.sip._tasks))
        proposing.set()
        await gate.wait()
        return await original(payload, timeout)

    node.replicator.propose = held  # type: ignore[method-assign]
    registering = asyncio.ensure_future(client.register(node, contacts=[f"<sip:2001@{HOST}:5999>"]))
    async with asyncio.timeout(5):
        await proposing.wait()
    assert seen_tasks == [0] and len(node.sip._pending) == 1  # a pending future, no handler task
    assert current_bindings(node.machine.state, "2001", node.clock.now) == []
    assert not registering.done()  # no 200 before the commit
    gate.set()
    _, ok = await registering
    assert ok is not None and ok.status == 200
    assert len(current_bindings(node.machine.state, "2001", node.clock.now)) == 1
    assert node.sip._pending == set() and node.sip.proposals_ok == 1


async def test_a_non_replication_error_in_the_commit_becomes_the_dispatchers_500(
    make_node: Any, client: Client
) -> None:
    node = await make_node()
    add_extension(node.machine, "2001")
    node.replicator.fail = RuntimeError("not the replicator's typed error")
    _, response = await client.register(node, contacts=[f"<sip:2001@{HOST}:5999>"])
    assert response is not None and response.status == 500 and response.headers.get("Retry-After") is None
    assert node.sip.handler_errors == 1 and node.sip.proposals_failed == 1
    node.replicator.fail = NoQuorum("x", submitted=False)
    _, refused = await client.register(node, contacts=[f"<sip:2001@{HOST}:5999>"])
    assert refused is not None and (refused.status, refused.headers.get("Retry-After")) == (503, "5")
    assert node.sip.handler_errors == 1 and node.registrar.counters["failed"] == 1


async def test_aclose_waits_for_a_proposal_in_flight_and_its_200(make_node: Any, client: Client) -> None:
    node = await make_node()
    add_extension(node.machine, "2001")
    original = node.replicator.propose
    started, gate = asyncio.Event(), asyncio.Event()

    async def slow(payload: bytes, timeout: float) -> object:  # noqa: ASYNC109
        started.set()
        await gate.wait()  # the commit is held until aclose is under way
        return await original(payload, timeout)

    node.replicator.propose = slow  # type: ignore[method-assign]
    registering = asyncio.ensure_future(client.register(node, contacts=[f"<sip:2001@{HOST}:5999>"]))
    async with asyncio.timeout(5):
        await started.wait()
    closing = asyncio.ensure_future(node.sip.aclose())
    await asyncio.sleep(0)  # aclose runs up to its wait for the proposal in flight
    assert not closing.done()
    gate.set()
    _, ok = await registering
    assert ok is not None and ok.status == 200  # answered before the socket closed
    await closing
    assert node.sip._pending == set()


def test_an_accepted_auth_outcome_is_an_ordinary_frozen_one() -> None:
    import dataclasses

    from raftpbx import sipnode

    got = sipnode._accepted("2001")
    want = sipnode.AuthOutcome(True, extension="2001")
    assert (
        type(got) is sipnode.AuthOutcome
        and got == want
        and hash(got) == hash(want)
        and repr(got) == repr(want)
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.ok = False  # type: ignore[misc]


def test_the_registrars_contact_spec_constructor_matches_the_dataclass() -> None:
    """The registrar builds ContactSpec positionally through state's fast constructor: the field order it
    assumes is the dataclass's, and the result is an ordinary ContactSpec."""
    import dataclasses

    from raftpbx.state import ContactSpec

    from raftpbx import registrar

    names = [f.name for f in dataclasses.fields(ContactSpec)]
    assert names == ["uri", "contact_key", "expires", "q", "instance_id", "reg_id", "flow"]
    args = ("sip:a@127.0.0.1", "sip:a@127.0.0.1", 60, 0.5, "<urn:x>", 1, "tok")
    got = registrar._contact_spec(*args)
    assert type(got) is ContactSpec and got == ContactSpec(*args) and hash(got) == hash(ContactSpec(*args))


def test_the_registrars_command_constructor_matches_the_dataclass() -> None:
    import dataclasses

    from raftpbx.state import Command

    from raftpbx import registrar

    assert [f.name for f in dataclasses.fields(Command)] == ["op_id", "event"]
    got = registrar._command("reg-1", None)
    assert type(got) is Command and got == Command("reg-1", None)  # type: ignore[arg-type]
