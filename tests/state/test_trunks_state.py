"""Trunks and dial plan (state/trunks.py): decisions, appliers, reads, snapshots, and a replay property."""

from __future__ import annotations

import ipaddress
import math
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from raftpbx.state import (
    SNAPSHOT_FORMAT,
    Applied,
    CodecError,
    Command,
    Event,
    Rejected,
    RouteCreated,
    RouteDeleted,
    RouteUpdated,
    State,
    TrunkCreated,
    TrunkDeleted,
    TrunkUpdated,
    ValidationError,
    apply,
    apply_entry,
    decide_create_route,
    decide_create_trunk,
    decide_delete_route,
    decide_delete_trunk,
    decide_update_route,
    decide_update_trunk,
    encode_batch,
    ha1_md5,
    ha1_sha256,
    ordered_routes,
    peer_addresses,
    restore,
    route_for,
    routes_using,
    snapshot,
    trunk_for_source,
)
from raftpbx.state.trunks import (
    PeerAddress,
    normalise_cidr,
    normalise_pattern,
    normalise_peer,
    pattern_matches,
)
from snapshot_formats import as_format_4

T0 = 1_700_000_000.0
SECRET = "s3cret-Trunk-pw"


def _state_with(*events: Event) -> State:
    state = State()
    for event in events:
        outcome = apply(state, event)
        assert isinstance(outcome, Applied), outcome
    return state


def _trunk(name: str = "office-b", peers: tuple[str, ...] = ("127.0.0.21:5060",), allow: tuple[str, ...] = (),
           **kw: Any) -> TrunkCreated:
    fields: dict[str, Any] = {"transport": "udp", "realm": "", "username": "", "ha1_md5": "", "ha1_sha256": "",
                              "register_expires": 0, "at": T0}
    fields.update(kw)
    return TrunkCreated(name=name, peers=peers, allow=allow, **fields)


def _route(name: str, pattern: str, trunk: str = "office-b", *, strip: int = 0, prepend: str = "",
           order: int = 0) -> RouteCreated:
    return RouteCreated(name, pattern, trunk, strip, prepend, order, T0)


def _field(call: Any) -> str:
    with pytest.raises(ValidationError) as caught:
        call()
    return str(caught.value.field)


# --- addresses, CIDRs, patterns ---------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "stored"), [
    ("127.0.0.21", "127.0.0.21:5060"),
    ("127.0.0.21:5070", "127.0.0.21:5070"),
    ("127.0.0.21:5070;transport=TCP", "127.0.0.21:5070;transport=tcp"),
    ("[::1]:5080", "[::1]:5080"),
    ("[0:0::1]", "[::1]:5060"),
    ("PBX.Example.test.", "pbx.example.test:5060"),
])
def test_peer_addresses_are_normalised(text: str, stored: str) -> None:
    assert normalise_peer(text) == stored


@pytest.mark.parametrize("text", ["", " 127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "::1", "[::1", "[zz::1]",
                                  "0.0.0.0", "224.0.0.1:5060", "255.255.255.255", "[::]:5060", "1.2.3",
                                  "a..b", "-x.test", "127.0.0.1;transport=tls", "127.0.0.1:5060;lr", "h_x.test"])
def test_invalid_peer_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        normalise_peer(text)


def test_peer_addresses_parse_with_the_trunk_transport_unless_they_name_one() -> None:
    state = _state_with(_trunk(peers=("127.0.0.21:5060", "127.0.0.22:5070;transport=tcp", "[::1]:5060"),
                               transport="udp"))
    assert peer_addresses(state.trunks["office-b"]) == [
        PeerAddress("127.0.0.21", 5060, "udp"), PeerAddress("127.0.0.22", 5070, "tcp"), PeerAddress("[::1]", 5060,
                                                                                                   "udp")]
    assert peer_addresses(state.trunks["office-b"])[2].address == ("::1", 5060)


def test_cidrs_are_normalised_and_broad_ones_refused() -> None:
    assert normalise_cidr("127.0.0.21") == "127.0.0.21/32"
    assert normalise_cidr("10.1.2.3/8") == "10.0.0.0/8"
    assert normalise_cidr("2001:db8::1/64") == "2001:db8::/64"
    for bad in ("0.0.0.0/0", "10.0.0.0/7", "::/0", "2001::/15", "10.0.0.0/33", "x", "", " 10.0.0.1"):
        with pytest.raises(ValueError):
            normalise_cidr(bad)


@pytest.mark.parametrize(("pattern", "number", "matches"), [
    ("2XXX", "2001", True), ("2XXX", "200", False), ("2XXX", "20011", False), ("2XXX", "3001", False),
    ("2xxx", "2999", True),  # lowercase wildcards are accepted (stored uppercase)
    ("9.", "9", False), ("9.", "90123", True), ("9!", "9", True), ("9!", "9*#+", True),
    ("NXX", "200", True), ("NXX", "100", False), ("ZX", "10", True), ("ZX", "00", False),
    ("+44.", "+4420", True), ("*7X", "*71", True), ("#", "#", True),
])
def test_pattern_semantics(pattern: str, number: str, matches: bool) -> None:
    assert pattern_matches(normalise_pattern(pattern), number) is matches


@pytest.mark.parametrize("pattern", ["", "2X.X", "..", "2?", "a", "1" * 33, "X!!", " 2XXX"])
def test_malformed_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError):
        normalise_pattern(pattern)


# --- decisions --------------------------------------------------------------------------------------------


def test_create_trunk_hashes_the_password_and_forgets_it() -> None:
    (event,) = decide_create_trunk(State(), "office-b", peers=["127.0.0.21", "127.0.0.22:5070;transport=tcp"],
                                   transport="udp", username="office-a", realm="b.test", password=SECRET,
                                   allow=["127.0.0.21", "127.0.0.22/31"], register_expires=600, now=T0)
    assert isinstance(event, TrunkCreated)
    assert event.peers == ("127.0.0.21:5060", "127.0.0.22:5070;transport=tcp")
    assert event.allow == ("127.0.0.21/32", "127.0.0.22/31")
    assert event.ha1_md5 == ha1_md5("office-a", "b.test", SECRET)
    assert event.ha1_sha256 == ha1_sha256("office-a", "b.test", SECRET)
    assert SECRET not in repr(event) and SECRET not in encode_batch([Command("op", event)]).decode("latin-1")
    state = _state_with(event)
    view = state.trunks["office-b"].to_dict()
    assert view["credentials"] is True and "ha1_md5" not in view and "ha1_sha256" not in view


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"name": "bad name"}, "name"),
    ({"peers": []}, "peers"),
    ({"peers": ["127.0.0.1:99999"]}, "peers"),
    ({"peers": ["127.0.0.1", "127.0.0.1:5060"]}, "peers"),
    ({"peers": [f"127.0.0.{i}" for i in range(1, 18)]}, "peers"),
    ({"peers": "127.0.0.1"}, "peers"),
    ({"transport": "tls"}, "transport"),
    ({"username": "a"}, "realm"),
    ({"username": "a", "realm": "b.test"}, "password"),
    ({"password": SECRET}, "username"),
    ({"username": "a b", "realm": "b.test", "password": SECRET}, "username"),
    ({"username": "a", "realm": 'b"', "password": SECRET}, "realm"),
    ({"username": "a", "realm": "b.test", "password": "x\x00y"}, "password"),
    ({"allow": ["0.0.0.0/0"]}, "allow"),
    ({"allow": ["127.0.0.1", "127.0.0.1/32"]}, "allow"),
    ({"register_expires": 600}, "register_expires"),
    ({"register_expires": 10, "username": "a", "realm": "b.test", "password": SECRET}, "register_expires"),
])
def test_create_trunk_refusals_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    args: dict[str, Any] = {"name": "office-b", "peers": ["127.0.0.21"], "now": T0}
    args.update(kwargs)
    name = args.pop("name")
    with pytest.raises(ValidationError) as caught:
        decide_create_trunk(State(), name, **args)
    assert caught.value.field == field
    assert SECRET not in str(caught.value)


def test_existing_name_overlapping_allow_lists_and_bad_now_are_refused() -> None:
    state = _state_with(_trunk(allow=("127.0.0.0/24",)))
    assert _field(lambda: decide_create_trunk(state, "office-b", peers=["127.0.0.9"], now=T0)) == "name"
    with pytest.raises(ValidationError) as caught:
        decide_create_trunk(state, "office-c", peers=["127.0.0.31"], allow=["127.0.0.128/25"], now=T0)
    assert caught.value.field == "allow" and "office-b" in caught.value.message
    decide_create_trunk(state, "office-c", peers=["127.0.0.31"], allow=["127.0.1.0/24", "::1"], now=T0)
    assert _field(lambda: decide_create_trunk(State(), "x", peers=["127.0.0.1"], now=math.nan)) == "now"


def test_update_trunk_merges_and_needs_the_password_for_new_credentials() -> None:
    state = _state_with(_trunk(allow=("127.0.0.21/32",)))
    (event,) = decide_update_trunk(state, "office-b", peers=["127.0.0.23"], now=T0 + 5)
    assert isinstance(event, TrunkUpdated) and event.peers == ("127.0.0.23:5060",) and event.allow == (
        "127.0.0.21/32",)
    apply(state, event)
    assert state.trunks["office-b"].created_at == T0 and state.trunks["office-b"].updated_at == T0 + 5
    assert _field(lambda: decide_update_trunk(state, "office-b", username="x", now=T0)) == "password"
    assert _field(lambda: decide_update_trunk(state, "office-b", peers=["127.0.0.23"], now=T0 + 9)) == "name"
    assert _field(lambda: decide_update_trunk(state, "nope", peers=["127.0.0.23"], now=T0)) == "name"
    (with_creds,) = decide_update_trunk(state, "office-b", username="a", realm="b.test", password=SECRET, now=T0)
    apply(state, with_creds)
    (new_pw,) = decide_update_trunk(state, "office-b", password=SECRET + "2", now=T0)  # keeps username/realm
    assert isinstance(new_pw, TrunkUpdated) and new_pw.username == "a" and new_pw.realm == "b.test"
    assert new_pw.ha1_md5 == ha1_md5("a", "b.test", SECRET + "2")
    assert _field(lambda: decide_update_trunk(state, "office-b", clear_credentials=True, password="x",
                                              now=T0)) == "password"
    (cleared,) = decide_update_trunk(state, "office-b", clear_credentials=True, now=T0)
    assert isinstance(cleared, TrunkUpdated) and (cleared.username, cleared.ha1_md5) == ("", "")


def test_routes_need_an_existing_trunk_and_a_used_trunk_cannot_be_deleted() -> None:
    state = _state_with(_trunk())
    assert _field(lambda: decide_create_route(state, "r", pattern="2XXX", trunk="nope", now=T0)) == "trunk"
    assert _field(lambda: decide_create_route(state, "r", pattern="2?", trunk="office-b", now=T0)) == "pattern"
    assert _field(lambda: decide_create_route(state, "r", pattern="2X", trunk="office-b", strip=33,
                                              now=T0)) == "strip"
    assert _field(lambda: decide_create_route(state, "r", pattern="2X", trunk="office-b", prepend="1a",
                                              now=T0)) == "prepend"
    assert _field(lambda: decide_create_route(state, "r", pattern="2X", trunk="office-b", order=10**7,
                                              now=T0)) == "order"
    (event,) = decide_create_route(state, "to-b", pattern="2xxx", trunk="office-b", now=T0)
    assert event == RouteCreated("to-b", "2XXX", "office-b", 0, "", 0, T0)
    apply(state, event)
    assert _field(lambda: decide_create_route(state, "to-b", pattern="3X", trunk="office-b", now=T0)) == "name"
    with pytest.raises(ValidationError) as caught:
        decide_delete_trunk(state, "office-b", T0)
    assert caught.value.field == "name" and "to-b" in caught.value.message
    assert routes_using(state, "office-b") == ["to-b"]
    assert _field(lambda: decide_update_route(state, "to-b", pattern="2XXX", now=T0)) == "name"  # no change
    (moved,) = decide_update_route(state, "to-b", strip=1, prepend="9", now=T0 + 1)
    assert moved == RouteUpdated("to-b", "2XXX", "office-b", 1, "9", 0, T0 + 1)
    apply(state, moved)
    assert state.routes["to-b"].created_at == T0
    (gone,) = decide_delete_route(state, "to-b", T0)
    apply(state, gone)
    assert decide_delete_trunk(state, "office-b", T0) == [TrunkDeleted("office-b", T0)]
    assert _field(lambda: decide_delete_route(state, "to-b", T0)) == "name"


# --- appliers (the authority: concurrent proposals race past the decisions) -------------------------------


def test_appliers_reject_what_the_state_refuses_and_change_nothing() -> None:
    state = _state_with(_trunk(allow=("127.0.0.0/24",)), _route("to-b", "2XXX"))
    before = snapshot(state)
    for event, field in (
        (_trunk(), "name"),  # exists
        (_trunk("office-c", allow=("127.0.0.7/32",)), "allow"),  # overlaps office-b
        (_trunk("office-c", peers=()), "peers"),
        (_trunk("office-c", peers=("127.0.0.1",)), "peers"),  # not normalised
        (_trunk("office-c", allow=("127.0.1.1",)), "allow"),  # not normalised
        (_trunk("office-c", transport="sctp"), "transport"),
        (_trunk("office-c", username="a"), "realm"),  # half credentials
        (_trunk("office-c", register_expires=300), "register_expires"),
        (TrunkUpdated("nope", ("127.0.0.1:5060",), "udp", "", "", "", "", (), 0, T0), "name"),
        (TrunkDeleted("office-b", T0), "name"),  # routes use it
        (TrunkDeleted("nope", T0), "name"),
        (_route("to-c", "3XXX", "office-c"), "trunk"),
        (_route("to-b", "3XXX"), "name"),
        (_route("to-c", "3?X"), "pattern"),
        (_route("to-c", "3XX", strip=-1), "strip"),
        (RouteUpdated("nope", "2X", "office-b", 0, "", 0, T0), "name"),
        (RouteUpdated("to-b", "2X", "office-z", 0, "", 0, T0), "trunk"),
        (RouteDeleted("nope", T0), "name"),
    ):
        outcome = apply(state, event)
        assert isinstance(outcome, Rejected) and outcome.field == field, (event, outcome)
    assert snapshot(state) == before


def test_an_update_may_keep_its_own_allow_list() -> None:
    state = _state_with(_trunk(allow=("127.0.0.0/24",)))
    outcome = apply(state, TrunkUpdated("office-b", ("127.0.0.22:5060",), "udp", "", "", "", "", ("127.0.0.0/24",),
                                        0, T0 + 1))
    assert outcome == Applied({"name": "office-b"})


# --- reads ------------------------------------------------------------------------------------------------


def test_route_for_tries_routes_by_order_then_name_and_applies_strip_and_prepend() -> None:
    state = _state_with(
        _trunk(), _trunk("office-c", peers=("127.0.0.31:5060",)),
        _route("b-wide", "2.", order=20), _route("a-exact", "2XXX", "office-c", order=10),
        _route("z-exact", "2XXX", order=10), _route("out", "9.", strip=1, prepend="+44"),
        _route("strip-all", "7", strip=1), _route("strip-all-2", "7", "office-c", strip=1, prepend="0", order=1),
    )
    assert [r.name for r in ordered_routes(state)] == ["out", "strip-all", "strip-all-2", "a-exact", "z-exact",
                                                       "b-wide"]
    match = route_for(state, "2001")
    assert match is not None and (match.route.name, match.trunk.name, match.number) == ("a-exact", "office-c",
                                                                                          "2001")
    match = route_for(state, "20011")
    assert match is not None and match.route.name == "b-wide"
    match = route_for(state, "90207946000")
    assert match is not None and (match.trunk.name, match.number) == ("office-b", "+440207946000")
    match = route_for(state, "7")  # the first route would send an empty number: the next one matches
    assert match is not None and (match.route.name, match.number) == ("strip-all-2", "0")
    for dialled in ("3001", "", "2001;x", "sip:2001", "x" * 70):
        assert route_for(state, dialled) is None
    assert route_for(State(), "2001") is None


def test_trunk_for_source_finds_the_one_allow_list_holding_the_address() -> None:
    state = _state_with(_trunk(allow=("127.0.0.16/28",)), _trunk("office-c", peers=("127.0.0.31:5060",),
                                                                   allow=("127.0.0.32/28", "::1/128")))
    found = trunk_for_source(state, "127.0.0.21")
    assert found is not None and found.name == "office-b"
    for ip, name in (("127.0.0.40", "office-c"), ("::1", "office-c"), ("[::1]", "office-c"),
                     ("::ffff:127.0.0.17", "office-b")):
        found = trunk_for_source(state, ip)
        assert found is not None and found.name == name, ip
    for ip in ("127.0.0.1", "127.0.0.48", "10.0.0.1", "", "not an ip", "::2"):
        assert trunk_for_source(state, ip) is None


# --- snapshots --------------------------------------------------------------------------------------------


def _map(state: State) -> dict[str, Any]:
    obj: dict[str, Any] = msgpack.unpackb(snapshot(state))
    return obj


def _full_state() -> State:
    state = State()
    events = [*decide_create_trunk(state, "office-b", peers=["127.0.0.21", "127.0.0.22;transport=tcp"],
                                   username="a", realm="b.test", password=SECRET, allow=["127.0.0.20/30"],
                                   register_expires=300, now=T0),
              _trunk("office-c", peers=("127.0.0.31:5060",)), _route("to-c", "3XXX", "office-c"),
              _route("to-b", "2XXX", strip=1, prepend="2", order=-4)]
    apply_entry(state, encode_batch([Command(f"op-{i}", e) for i, e in enumerate(events)]), 1)
    assert len(state.trunks) == 2 and len(state.routes) == 2
    return state


def test_snapshot_carries_trunks_and_routes_in_order() -> None:
    state = _full_state()
    blob = snapshot(state)
    obj = _map(state)
    assert obj["format"] == SNAPSHOT_FORMAT == 5
    assert [row[0] for row in obj["trunks"]] == ["office-b", "office-c"]
    assert [row[0] for row in obj["routes"]] == ["to-c", "to-b"]
    restored = restore(blob)
    assert restored == state and list(restored.routes) == ["to-c", "to-b"] and snapshot(restored) == blob
    assert SECRET.encode() not in blob


def test_format_3_snapshot_restores_with_no_trunks() -> None:
    state = State(drained={"n1": T0})
    obj = as_format_4(_map(state))
    del obj["trunks"], obj["routes"]
    obj["format"] = 3
    restored = restore(msgpack.packb(obj, use_bin_type=True))
    assert restored == state and restored.trunks == {} and restored.routes == {}
    assert _map(restored)["format"] == SNAPSHOT_FORMAT


def _mutations() -> list[Any]:
    def trunk_field(index: int, value: Any) -> Any:
        return lambda m: m["trunks"][0].__setitem__(index, value)

    return [
        lambda m: m.pop("trunks"),
        lambda m: m.update(format=3),  # format 3 with format 4 sections
        lambda m: m.update(trunks={}),
        lambda m: m.update(routes=None),
        lambda m: m["trunks"].append(list(m["trunks"][0])),  # duplicate trunk
        lambda m: m["routes"].append(list(m["routes"][0])),  # duplicate route
        lambda m: m["trunks"].pop(1),  # route to-c now points at a missing trunk
        trunk_field(0, "bad name"),
        trunk_field(1, []),  # no peers
        trunk_field(1, ["127.0.0.1"]),  # not normalised
        trunk_field(2, "tls"),
        trunk_field(5, "XYZ"),  # ha1_md5
        trunk_field(7, ["0.0.0.0/0"]),
        trunk_field(8, 5),  # register_expires out of range
        trunk_field(8, "300"),
        lambda m: m["trunks"][1].__setitem__(7, ["127.0.0.21/32"]),  # overlaps office-b
        lambda m: m["routes"][0].__setitem__(1, "3?"),
        lambda m: m["routes"][0].__setitem__(3, 99),
        lambda m: m["routes"][0].__setitem__(5, True),
        lambda m: m["routes"][0].pop(),
    ]


@pytest.mark.parametrize("mutate", _mutations())
def test_malformed_trunk_sections_are_refused(mutate: Any) -> None:
    obj = _map(_full_state())
    restore(msgpack.packb(obj, use_bin_type=True))
    mutate(obj)
    with pytest.raises(CodecError):
        restore(msgpack.packb(obj, use_bin_type=True))


# --- replay property -------------------------------------------------------------------------------------

_names = st.sampled_from(["office-b", "office-c", "bad name"])
_route_names = st.sampled_from(["r1", "r2", "r3"])
_peers = st.sampled_from([("127.0.0.21:5060",), ("127.0.0.22:5070;transport=tcp", "127.0.0.23:5060"), ()])
_allows = st.sampled_from([(), ("127.0.0.0/24",), ("127.0.0.128/25",), ("127.0.1.0/24", "::1/128")])
_times = st.floats(1.6e9, 2.0e9)
_trunk_events = st.builds(
    lambda kind, name, peers, allow, expires, at: kind(name, peers, "udp", "", "", "", "", allow, expires, at),
    st.sampled_from([TrunkCreated, TrunkUpdated]), _names, _peers, _allows, st.sampled_from([0, 0, 300]), _times)
_route_events = st.builds(
    lambda kind, name, pattern, trunk, strip, order, at: kind(name, pattern, trunk, strip, "", order, at),
    st.sampled_from([RouteCreated, RouteUpdated]), _route_names, st.sampled_from(["2XXX", "9.", "?"]), _names,
    st.integers(0, 2), st.integers(-2, 2), _times)
_events = st.one_of(_trunk_events, _route_events, st.builds(TrunkDeleted, _names, _times),
                    st.builds(RouteDeleted, _route_names, _times))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([f"op-{i}" for i in range(8)]) | st.uuids().map(str), _events),
                min_size=1, max_size=25), st.data())
def test_replay_is_deterministic_keeps_the_invariants_and_survives_a_snapshot_anywhere(
    ops: list[tuple[str, Event]], data: st.DataObject
) -> None:
    """Two nodes replaying the same entries agree; a node restored from a snapshot taken after any entry and
    replaying the rest agrees too; every route's trunk exists and no two allow-lists overlap, always."""
    entries = [encode_batch([Command(op_id, event)]) for op_id, event in ops]
    cut = data.draw(st.integers(0, len(entries)))
    node_a, node_b = State(), State()
    restored: State | None = restore(snapshot(node_a)) if cut == 0 else None
    for index, entry in enumerate(entries, start=1):
        outcomes = apply_entry(node_a, entry, index)
        assert apply_entry(node_b, entry, index) == outcomes
        if restored is not None:
            assert apply_entry(restored, entry, index) == outcomes
        if index == cut:
            restored = restore(snapshot(node_a))
        for route in node_a.routes.values():
            assert route.trunk in node_a.trunks
        nets = [(t.name, normalise_cidr(c)) for t in node_a.trunks.values() for c in t.allow]
        for name, cidr in nets:
            for other, other_cidr in nets:
                a, b = ipaddress.ip_network(cidr), ipaddress.ip_network(other_cidr)
                assert name == other or a.version != b.version or not a.overlaps(b)  # type: ignore[arg-type]
    assert node_a == node_b and restored == node_a
    assert snapshot(restored) == snapshot(node_a)


# --- call records that cross a trunk (model and snapshot; CallStarted fills them once it carries them) ----


def _state_with_calls() -> State:
    from dataclasses import replace

    from raftpbx.state import CallEnded, CallStarted

    state = State()
    entry = encode_batch([
        Command("s1", CallStarted("c1@127.0.0.1", "1001", "2001", "ft", "sip:1001@127.0.0.1", "z9hG4bK1", "n1", T0)),
        Command("s2", CallStarted("c2@127.0.0.1", "1001", "1002", "ft", "sip:1001@127.0.0.1", "z9hG4bK2", "n1", T0)),
        Command("e2", CallEnded("c2@127.0.0.1", "failure", "system", 480, "n1", T0 + 1)),
    ])
    apply_entry(state, entry, 1)
    state.calls["c1@127.0.0.1"] = replace(state.calls["c1@127.0.0.1"], trunk="office-b", direction="outbound")
    return state


def test_call_rows_carry_trunk_and_direction_and_format_3_rows_restore_without() -> None:
    state = _state_with_calls()
    blob = snapshot(state)
    restored = restore(blob)
    assert restored == state and restored.calls["c1@127.0.0.1"].direction == "outbound"
    assert restored.calls["c1@127.0.0.1"].to_dict()["trunk"] == "office-b"
    assert restored.finished_calls["c2@127.0.0.1"].trunk == ""
    obj = as_format_4(_map(state))
    del obj["trunks"], obj["routes"]
    obj["format"] = 3
    for section in ("calls", "finished_calls"):
        obj[section] = [row[:-2] for row in obj[section]]
    old = restore(msgpack.packb(obj, use_bin_type=True))
    assert (old.calls["c1@127.0.0.1"].trunk, old.calls["c1@127.0.0.1"].direction) == ("", "")
    assert old.finished_calls == state.finished_calls


@pytest.mark.parametrize(("trunk", "direction"), [("office-b", ""), ("", "inbound"), ("x", "sideways")])
def test_malformed_call_trunk_fields_are_refused(trunk: str, direction: str) -> None:
    obj = _map(_state_with_calls())
    obj["calls"][0][-2:] = [trunk, direction]
    with pytest.raises(CodecError):
        restore(msgpack.packb(obj, use_bin_type=True))
    obj = _map(_state_with_calls())
    obj["calls"][0] = obj["calls"][0][:-2]  # format 4 rows must have every field
    with pytest.raises(CodecError):
        restore(msgpack.packb(obj, use_bin_type=True))
