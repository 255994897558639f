"""apply / apply_entry: semantics, dedupe by op_id, chained digest, determinism, malformed entries."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import msgpack
import pytest
from hypothesis import given, settings
from raftpbx.state import (
    APPLIERS,
    DEFAULT_DEDUPE_LIMIT,
    EVENT_TYPES,
    Applied,
    Command,
    CredentialChanged,
    Duplicate,
    Event,
    Extension,
    ExtensionCreated,
    ExtensionDeleted,
    ExtensionUpdated,
    Outcome,
    Rejected,
    State,
    StateError,
    apply,
    apply_entry,
    digest_hex,
    encode_batch,
    encode_command,
    snapshot,
)
from state_strategies import workload_batches

MD5 = hashlib.md5(b"100:pbx.test:correct horse").hexdigest()
SHA = hashlib.sha256(b"100:pbx.test:correct horse").hexdigest()
MD5_2 = hashlib.md5(b"100:pbx.test:battery staple").hexdigest()
SHA_2 = hashlib.sha256(b"100:pbx.test:battery staple").hexdigest()


def created(number: str = "100", at: float = 10.0, name: str = "Alice") -> ExtensionCreated:
    return ExtensionCreated(number, name, "pbx.test", MD5, SHA, at)


def entry(*commands: tuple[str, Event]) -> bytes:
    return encode_batch([Command(op_id, event) for op_id, event in commands])


def test_every_registered_event_has_an_applier() -> None:
    assert set(APPLIERS) == set(EVENT_TYPES.values())


def test_initial_state() -> None:
    state = State()
    assert state.applied_index == 0
    assert state.digest == bytes(32)
    assert digest_hex(state) == "0" * 64
    assert state.dedupe_limit == DEFAULT_DEDUPE_LIMIT == 100_000
    assert not state.extensions and not state.dedupe


def test_state_refuses_a_bad_limit_or_digest() -> None:
    with pytest.raises(StateError):
        State(dedupe_limit=0)
    with pytest.raises(StateError):
        State(digest=b"short")


def test_extension_lifecycle() -> None:
    state = State()
    assert apply(state, created(at=10.0)) == Applied({"extension": "100"})
    assert state.extensions["100"] == Extension("100", "Alice", "pbx.test", MD5, SHA, 10.0, 10.0)

    assert apply(state, ExtensionUpdated("100", "Alice Liddell", 11.0)) == Applied({"extension": "100"})
    assert state.extensions["100"] == Extension("100", "Alice Liddell", "pbx.test", MD5, SHA, 10.0, 11.0)

    assert apply(state, CredentialChanged("100", "pbx.test", MD5_2, SHA_2, 12.0)).ok
    assert state.extensions["100"] == Extension("100", "Alice Liddell", "pbx.test", MD5_2, SHA_2, 10.0, 12.0)

    assert apply(state, ExtensionDeleted("100", 13.0)).ok
    assert "100" not in state.extensions
    assert apply(state, created(at=14.0)).ok  # a deleted number can be reused


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (created(), Rejected("extension", "already exists")),
        (ExtensionUpdated("200", "Bob", 1.0), Rejected("extension", "no such extension")),
        (ExtensionDeleted("200", 1.0), Rejected("extension", "no such extension")),
        (CredentialChanged("200", "pbx.test", MD5, SHA, 1.0), Rejected("extension", "no such extension")),
    ],
    ids=["create-existing", "update-unknown", "delete-unknown", "credential-unknown"],
)
def test_events_invalid_against_the_state_are_rejected_and_change_nothing(
    event: Event, expected: Rejected
) -> None:
    state = State()
    apply(state, created())
    before = snapshot(state)
    assert apply(state, event) == expected
    assert snapshot(state) == before


@pytest.mark.parametrize(
    ("event", "field_name"),
    [
        (ExtensionCreated("1", "", "pbx.test", MD5, SHA, 1.0), "extension"),
        (ExtensionCreated("1x0", "", "pbx.test", MD5, SHA, 1.0), "extension"),
        (ExtensionCreated("300", 'a"b', "pbx.test", MD5, SHA, 1.0), "display_name"),
        (ExtensionCreated("300", "", "", MD5, SHA, 1.0), "realm"),
        (ExtensionCreated("300", "", "pbx.test", MD5.upper(), SHA, 1.0), "ha1_md5"),
        (ExtensionCreated("300", "", "pbx.test", MD5, SHA[:-1], 1.0), "ha1_sha256"),
        (ExtensionUpdated("100", "x" * 65, 1.0), "display_name"),
        (CredentialChanged("100", "pbx.test", "", SHA, 1.0), "ha1_md5"),
    ],
)
def test_malformed_values_are_rejected_at_apply_time(event: Event, field_name: str) -> None:
    state = State()
    apply(state, created())
    before = snapshot(state)
    outcome = apply(state, event)
    assert isinstance(outcome, Rejected) and outcome.field == field_name
    assert snapshot(state) == before


def test_outcomes_to_dict() -> None:
    assert Applied({"extension": "100"}).to_dict() == {"status": "applied", "result": {"extension": "100"}}
    assert Rejected("extension", "no such extension").to_dict() == {
        "status": "rejected",
        "field": "extension",
        "message": "no such extension",
    }
    assert Duplicate(Applied({"extension": "1"})).to_dict() == {
        "status": "duplicate",
        "first": {"status": "applied", "result": {"extension": "1"}},
    }
    assert Duplicate(Rejected("a", "b")).ok is False and Duplicate(Applied()).ok is True


def test_apply_entry_chains_the_digest_over_command_bytes_and_sets_the_index() -> None:
    state = State()
    commands = [Command("a", created()), Command("b", created()), Command("c", ExtensionDeleted("100", 2.0))]
    outcomes = apply_entry(state, encode_batch(commands), 7)
    assert outcomes == [
        Applied({"extension": "100"}),
        Rejected("extension", "already exists"),  # rejected commands are in the log: chained too
        Applied({"extension": "100"}),
    ]
    expected = bytes(32)
    for command in commands:
        expected = hashlib.sha256(expected + encode_command(command)).digest()
    assert state.digest == expected
    assert state.applied_index == 7


def test_duplicate_op_id_returns_the_first_outcome_and_changes_nothing() -> None:
    state = State()
    first = apply_entry(state, entry(("op-1", created())), 1)
    assert first == [Applied({"extension": "100"})]
    before = snapshot(state)
    # A retry of the same op_id with the same bytes (the usual case after an unknown outcome) ...
    assert apply_entry(state, entry(("op-1", created())), 2) == [Duplicate(Applied({"extension": "100"}))]
    # ... or even with another event under that op_id: the op_id decides.
    assert apply_entry(state, entry(("op-1", ExtensionDeleted("100", 3.0))), 3) == [
        Duplicate(Applied({"extension": "100"}))
    ]
    assert "100" in state.extensions
    after = snapshot(state)
    assert state.applied_index == 3
    state.applied_index = 1
    assert snapshot(state) == before  # nothing but the index moved, not even the digest
    state.applied_index = 3
    assert snapshot(state) == after


def test_duplicate_within_one_batch() -> None:
    state = State()
    outcomes = apply_entry(state, entry(("x", created()), ("x", created())), 1)
    assert outcomes == [Applied({"extension": "100"}), Duplicate(Applied({"extension": "100"}))]


def test_rejected_outcomes_are_remembered_too() -> None:
    state = State()
    apply_entry(state, entry(("d", ExtensionDeleted("100", 1.0))), 1)
    apply_entry(state, entry(("c", created())), 2)
    # The retried delete must not now succeed: its first outcome was a rejection.
    assert apply_entry(state, entry(("d", ExtensionDeleted("100", 1.0))), 3) == [
        Duplicate(Rejected("extension", "no such extension"))
    ]
    assert "100" in state.extensions


def test_dedupe_window_is_bounded_and_evicts_oldest_first() -> None:
    state = State(dedupe_limit=3)
    for i, number in enumerate(["10", "11", "12", "13", "14"], start=1):
        apply_entry(state, entry((f"op-{number}", created(number))), i)
    assert list(state.dedupe) == ["op-12", "op-13", "op-14"]
    # op-14 is still remembered ...
    assert apply_entry(state, entry(("op-14", ExtensionDeleted("14", 9.0))), 6) == [
        Duplicate(Applied({"extension": "14"}))
    ]
    # ... op-10 was evicted, so the same op_id is now a new command.
    assert apply_entry(state, entry(("op-10", ExtensionDeleted("10", 9.0))), 7) == [
        Applied({"extension": "10"})
    ]
    assert list(state.dedupe) == ["op-13", "op-14", "op-10"]
    assert "10" not in state.extensions


def test_duplicates_do_not_refresh_their_place_in_the_window() -> None:
    state = State(dedupe_limit=2)
    apply_entry(state, entry(("a", created("10")), ("b", created("11")), ("a", created("10"))), 1)
    apply_entry(state, entry(("c", created("12"))), 2)
    assert list(state.dedupe) == ["b", "c"]


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\x00", b"\x92\x01", msgpack.packb([1, [b"\x93"]], use_bin_type=True), b"\xff" * 40],
)
def test_malformed_entry_is_rejected_whole_and_advances_the_index(garbage: bytes) -> None:
    state = State()
    apply_entry(state, entry(("a", created())), 1)
    digest, window = state.digest, list(state.dedupe)
    outcomes = apply_entry(state, garbage, 2)
    assert len(outcomes) == 1
    assert isinstance(outcomes[0], Rejected) and outcomes[0].field == "entry"
    assert state.applied_index == 2
    assert state.digest == hashlib.sha256(digest + garbage).digest()
    assert list(state.dedupe) == window
    assert list(state.extensions) == ["100"]


def test_entry_with_one_too_new_event_is_rejected_whole() -> None:
    good = encode_command(Command("good", created("500")))
    too_new = msgpack.packb(["new", ["ExtensionDeleted", 99, {"extension": "100", "at": 1.0}]])
    state = State()
    (outcome,) = apply_entry(state, msgpack.packb([1, [good, too_new]], use_bin_type=True), 1)
    assert isinstance(outcome, Rejected) and re.search("newer", outcome.message)
    assert not state.extensions and not state.dedupe


def test_bytearray_entries_are_accepted() -> None:
    state = State()
    assert apply_entry(state, bytearray(entry(("a", created()))), 1) == [Applied({"extension": "100"})]  # type: ignore[arg-type]


def test_replayed_index_is_ignored() -> None:
    state = State()
    data = entry(("a", created()))
    apply_entry(state, data, 5)
    before = snapshot(state)
    assert apply_entry(state, entry(("b", ExtensionDeleted("100", 1.0))), 5) == []
    assert apply_entry(state, data, 3) == []
    assert snapshot(state) == before


def test_a_crashing_applier_is_a_deterministic_rejection(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(state: State, event: ExtensionDeleted) -> Applied:
        raise KeyError(event.extension)

    monkeypatch.setitem(APPLIERS, ExtensionDeleted, broken)
    state = State()
    (outcome,) = apply_entry(state, entry(("x", ExtensionDeleted("100", 1.0))), 1)
    assert outcome == Rejected("event", "internal error applying ExtensionDeleted: KeyError")
    assert state.applied_index == 1 and state.digest != bytes(32)
    assert state.dedupe["x"] == outcome


# --- properties ------------------------------------------------------------------------------------------


@dataclass
class NaiveModel:
    """A deliberately simple re-statement of the rules: a plain dict and a list for the window."""

    limit: int
    extensions: dict[str, tuple[str, str, str, str, float, float]] = field(default_factory=dict)
    seen: list[tuple[str, Outcome]] = field(default_factory=list)

    def run(self, op_id: str, event: Event) -> Outcome:
        for seen_id, outcome in self.seen:
            if seen_id == op_id:
                return Duplicate(outcome)  # type: ignore[arg-type]
        outcome = self._apply(event)
        self.seen.append((op_id, outcome))
        self.seen = self.seen[-self.limit :]
        return outcome

    def _apply(self, event: Event) -> Outcome:
        number = getattr(event, "extension")  # noqa: B009
        ok = Applied({"extension": number})
        valid_number = re.fullmatch(r"[0-9]{2,15}", number) is not None
        name_ok = True
        if hasattr(event, "display_name"):
            name = event.display_name
            name_ok = len(name) <= 64 and name.isprintable() and '"' not in name and name == name.strip()
        cred_ok = True
        if hasattr(event, "ha1_md5"):
            cred_ok = (
                bool(event.realm)
                and '"' not in event.realm
                and re.fullmatch("[0-9a-f]{32}", event.ha1_md5) is not None
                and re.fullmatch("[0-9a-f]{64}", event.ha1_sha256) is not None
            )
        current = self.extensions.get(number)
        if isinstance(event, ExtensionCreated):
            if not (valid_number and name_ok and cred_ok) or current is not None:
                return Rejected("?", "?")
            self.extensions[number] = (
                event.display_name,
                event.realm,
                event.ha1_md5,
                event.ha1_sha256,
                event.at,
                event.at,
            )
            return ok
        if current is None:
            return Rejected("?", "?")
        if isinstance(event, ExtensionUpdated):
            if not name_ok:
                return Rejected("?", "?")
            self.extensions[number] = (event.display_name, *current[1:5], event.at)
        elif isinstance(event, CredentialChanged):
            if not cred_ok:
                return Rejected("?", "?")
            self.extensions[number] = (
                current[0],
                event.realm,
                event.ha1_md5,
                event.ha1_sha256,
                current[4],
                event.at,
            )
        elif isinstance(event, ExtensionDeleted):
            del self.extensions[number]
        return ok


def _kind(outcome: Outcome) -> str:
    if isinstance(outcome, Duplicate):
        return "duplicate-" + _kind(outcome.first)
    return "applied" if isinstance(outcome, Applied) else "rejected"


@settings(max_examples=100, deadline=None)
@given(workload_batches)
def test_replay_on_two_nodes_gives_equal_states_and_agrees_with_a_naive_model(
    batches: list[list[Command]],
) -> None:
    node_a, node_b = State(dedupe_limit=8), State(dedupe_limit=8)
    model = NaiveModel(limit=8)
    chained = bytes(32)
    for index, commands in enumerate(batches, start=1):
        data = encode_batch(commands)
        outcomes_a = apply_entry(node_a, data, index)
        outcomes_b = apply_entry(node_b, data, index)
        assert outcomes_a == outcomes_b
        expected = [model.run(c.op_id, c.event) for c in commands]
        assert [_kind(o) for o in outcomes_a] == [_kind(o) for o in expected]
        for command, outcome in zip(commands, expected, strict=True):
            if not isinstance(outcome, Duplicate):
                chained = hashlib.sha256(chained + encode_command(command)).digest()
        assert node_a.digest == chained
    assert node_a == node_b
    assert node_a.digest == node_b.digest and node_a.applied_index == node_b.applied_index == len(batches)
    assert snapshot(node_a) == snapshot(node_b)
    assert [op for op, _ in model.seen] == list(node_a.dedupe)
    assert {
        n: (e.display_name, e.realm, e.ha1_md5, e.ha1_sha256, e.created_at, e.updated_at)
        for n, e in node_a.extensions.items()
    } == model.extensions
