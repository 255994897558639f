"""Cluster maintenance state: which nodes are drained (planned maintenance, the classic offline/online).

Theory of operation. An operator drains a node before upgrading or rebooting it: the node stops taking new
calls and gives up leadership, while the calls it already carries finish normally; undraining brings it
back. The fact "node X is drained since T" is replicated like any other so that every node agrees on it,
it survives restarts, snapshots and leader changes, and a node that restarts while drained stays drained.
What a drained node does about it (refuse new INVITEs, hand leadership away) lives in `raftpbx/`; this
module only records the fact.

Events (schema v1; `at` stamped by the proposer, `by` names who asked, for the audit trail only):

* `NodeDrained(node_id, at, by)`: `node_id` is drained from `at` on;
* `NodeUndrained(node_id, at)`: `node_id` takes new work again.

Apply rules:

* a node id must look like a node id (`check_node_id`: letters, digits, '_', '.', '-', at most 63,
  starting with a letter or digit) -> otherwise `Rejected("node_id", ...)`; `by` is at most
  `MAX_BY` printable characters -> otherwise `Rejected("by", ...)`;
* both events are idempotent: draining a drained node keeps its original `at` and undraining a node that
  is not drained changes nothing; both still answer `Applied` with `changed` False, so a retried or
  concurrent request is not an error;
* whether `node_id` is a member of the Raft configuration is not checked here (membership lives in the
  replication layer, not in `State`): the RPC layer checks it before proposing. A node removed from the
  cluster while drained stays listed until it is undrained.

Invariants: `State.drained` maps node id -> the `at` of the `NodeDrained` that drained it, in the order
the nodes were drained; every key passes `check_node_id`.

Performance: every applier is O(1).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .apply import applies
from .errors import ValidationError
from .events import Event, register_event
from .model import State
from .outcomes import Applied, Rejected

MAX_NODE_ID = 63
MAX_BY = 128

_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def check_node_id(node_id: str) -> str | None:
    """None if `node_id` is a well-formed node id (the form `raftpbx` accepts for `node.id`), else why not."""
    if _NODE_ID.fullmatch(node_id) is None:
        return f"malformed node id: use letters, digits, '_', '.', '-' (at most {MAX_NODE_ID})"
    return None


def check_by(by: str) -> str | None:
    """None if `by` (who asked) is at most `MAX_BY` printable characters ("" = unknown)."""
    if len(by) > MAX_BY:
        return f"too long: at most {MAX_BY} characters"
    if not by.isprintable():
        return "must not contain control characters"
    return None


# --- events ----------------------------------------------------------------------------------------------


@register_event
@dataclass(frozen=True, slots=True)
class NodeDrained(Event):
    """`node_id` takes no new calls and no leadership from `at` on; `by` says who asked (audit only)."""

    node_id: str
    at: float
    by: str


@register_event
@dataclass(frozen=True, slots=True)
class NodeUndrained(Event):
    """`node_id` takes new calls (and may lead) again from `at` on."""

    node_id: str
    at: float


# --- apply -----------------------------------------------------------------------------------------------


@applies(NodeDrained)
def _node_drained(state: State, event: NodeDrained) -> Applied | Rejected:
    if (message := check_node_id(event.node_id)) is not None:
        return Rejected("node_id", message)
    if (message := check_by(event.by)) is not None:
        return Rejected("by", message)
    if event.node_id in state.drained:
        return Applied({"node_id": event.node_id, "drained": True, "changed": False})
    state.drained[event.node_id] = event.at
    return Applied({"node_id": event.node_id, "drained": True, "changed": True})


@applies(NodeUndrained)
def _node_undrained(state: State, event: NodeUndrained) -> Applied | Rejected:
    if (message := check_node_id(event.node_id)) is not None:
        return Rejected("node_id", message)
    if event.node_id not in state.drained:
        return Applied({"node_id": event.node_id, "drained": False, "changed": False})
    del state.drained[event.node_id]
    return Applied({"node_id": event.node_id, "drained": False, "changed": True})


# --- decisions and reads ---------------------------------------------------------------------------------


def _validate_node_id(node_id: str) -> None:
    if type(node_id) is not str:
        raise ValidationError("node_id", "must be a string")
    if (message := check_node_id(node_id)) is not None:
        raise ValidationError("node_id", message)


def _validate_now(now: float) -> float:
    if type(now) not in (int, float) or not math.isfinite(now):
        raise ValidationError("now", "must be a finite number of epoch seconds")
    return float(now)


def decide_drain(state: State, node_id: str, by: str, now: float) -> list[Event]:
    """`NodeDrained` for a well-formed node id (already drained is fine: apply keeps the first `at`).

    Membership of `node_id` is the caller's check (see the module doc).
    """
    _validate_node_id(node_id)
    if type(by) is not str:
        raise ValidationError("by", "must be a string")
    if (message := check_by(by)) is not None:
        raise ValidationError("by", message)
    return [NodeDrained(node_id=node_id, at=_validate_now(now), by=by)]


def decide_undrain(state: State, node_id: str, now: float) -> list[Event]:
    """`NodeUndrained` for a well-formed node id (a node that is not drained is fine: nothing changes)."""
    _validate_node_id(node_id)
    return [NodeUndrained(node_id=node_id, at=_validate_now(now))]


def is_drained(state: State, node_id: str) -> bool:
    """True while `node_id` is drained."""
    return node_id in state.drained


def drained_nodes(state: State) -> list[tuple[str, float]]:
    """The drained nodes as `(node_id, drained_at)`, sorted by node id."""
    return sorted(state.drained.items())
