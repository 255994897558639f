"""`send_response(..., linger=False)`: a non-INVITE server transaction that ends with its final response
(a stateless answer, RFC 3261 §8.2.7, used for digest challenges) instead of waiting 64*T1 in Completed;
an INVITE server transaction ignores the flag (its ACK must still match, §17.2.1)."""

from __future__ import annotations

from raftpbx.transport.sip.message import Request, make_response, parse_message
from raftpbx.transport.sip.transaction import (
    InviteServerTransaction,
    NonInviteServerTransaction,
    RequestReceived,
    State,
    Terminated,
    TransactionLayer,
)

SOURCE = ("127.0.0.1", 5070)


def request(method: str = "REGISTER", branch: str = "z9hG4bK-linger-1") -> Request:
    text = (
        f"{method} sip:127.0.0.1:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5070;branch={branch}\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:alice@127.0.0.1>;tag=a1\r\n"
        "To: <sip:alice@127.0.0.1>\r\n"
        "Call-ID: linger-1@127.0.0.1\r\n"
        f"CSeq: 1 {method}\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    msg = parse_message(text.encode())
    assert isinstance(msg, Request)
    return msg


def _new_transaction(layer: TransactionLayer, req: Request, now: float) -> RequestReceived:
    layer.receive(req, now, SOURCE)
    event = layer.next_event()
    assert isinstance(event, RequestReceived) and event.transaction is not None
    return event


def test_a_final_response_without_linger_ends_the_transaction_at_once() -> None:
    layer = TransactionLayer()
    req = request()
    event = _new_transaction(layer, req, 0.0)
    tx = event.transaction
    assert isinstance(tx, NonInviteServerTransaction)
    assert layer.send_response(tx, make_response(req, 401, to_tag="t1"), 0.0, linger=False)
    sent = layer.messages_to_send()
    assert [t.message.status for t in sent] == [401]  # type: ignore[union-attr]
    assert tx.state is State.TERMINATED and tx.request is req  # no copy kept for 32 s
    ended = layer.next_event()
    assert isinstance(ended, Terminated) and ended.transaction is tx
    assert layer.next_event() is None
    assert len(layer) == 0 and layer.next_timer() is None  # no timer J
    # A retransmission is a new request for the TU (which answers it again), not absorbed.
    again = _new_transaction(layer, request(), 0.5)
    assert again.transaction is not tx


def test_with_linger_the_transaction_absorbs_retransmissions_for_64_t1() -> None:
    layer = TransactionLayer()
    req = request()
    tx = _new_transaction(layer, req, 0.0).transaction
    assert tx is not None
    assert layer.send_response(tx, make_response(req, 401, to_tag="t1"), 0.0)
    layer.messages_to_send()
    assert tx.state is State.COMPLETED and layer.next_timer() == 32.0
    layer.receive(request(), 0.5, SOURCE)
    assert [t.message.status for t in layer.messages_to_send()] == [401]  # type: ignore[union-attr]
    assert layer.next_event() is None  # absorbed


def test_a_provisional_response_without_linger_keeps_the_transaction() -> None:
    layer = TransactionLayer()
    req = request()
    tx = _new_transaction(layer, req, 0.0).transaction
    assert tx is not None
    assert layer.send_response(tx, make_response(req, 100), 0.0, linger=False)
    assert tx.state is State.PROCEEDING and len(layer) == 1
    assert layer.send_response(tx, make_response(req, 200, to_tag="t"), 0.1, linger=False)
    assert tx.state is State.TERMINATED and len(layer) == 0


def test_an_invite_transaction_ignores_linger() -> None:
    layer = TransactionLayer()
    req = request("INVITE", "z9hG4bK-linger-inv")
    tx = _new_transaction(layer, req, 0.0).transaction
    assert isinstance(tx, InviteServerTransaction)
    assert layer.send_response(tx, make_response(req, 407, to_tag="t1"), 0.0, linger=False)
    assert tx.state is State.COMPLETED and len(layer) == 1  # waits for the ACK (timers G, H)
