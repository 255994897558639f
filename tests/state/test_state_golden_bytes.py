"""Golden bytes of a registration workload: log entries, chained digest, snapshot (issue 8, session 7).

A normal install compiles the state's per-command path with mypyc (setup.py: model, codec, apply, bindings) while
the dev venv runs the source; both must write the same bytes, or nodes of one cluster running different
builds (a rolling upgrade, a node installed from a wheel) would chain different digests and snapshots. This
test pins, for a fixed workload through the real `decide_register` / `encode_batch` / `apply_entry` /
`snapshot` path (extensions, REGISTERs with one and several contacts, RFC 5626 instance ids, q-values,
Path, refreshes, a retransmission (a duplicate), rejected commands, removals, a `Contact: *`, the leader's
expiry sweep), the sha256 of every entry's bytes, the state digest and the sha256 of the snapshot. The
constants were computed with the interpreted source at the commit before the state was compiled (5988ae4);
`make test-compiled` runs this file against the compiled build, `make test` against the source.
"""

from __future__ import annotations

import hashlib

from raftpbx.state import (
    BindingsExpired,
    Command,
    ContactSpec,
    CredentialChanged,
    ExtensionCreated,
    ExtensionUpdated,
    RegisterAccepted,
    State,
    apply_entry,
    binding_admin_op_id,
    decide_clear_bindings,
    decide_register,
    decide_remove_binding,
    digest_hex,
    encode_batch,
    expiry_op_id,
    restore,
    snapshot,
)

MD5 = hashlib.md5(b"golden").hexdigest()
SHA = hashlib.sha256(b"golden").hexdigest()

ENTRIES_SHA256 = "49ed4608552d9b17be464d719cee4e59a2ed598cb18265f2ac9494be639119c0"
DIGEST = "4db4b70ff5c2d8560242875eb53cdcabd285ee63a052acfb4b8e26da2a729c21"
SNAPSHOT_SHA256 = "64384fc25939ed54e31e5dc78e6e9d2e66bbda40385db4065cb06579f1d0c538"


def _register(state: State, user: str, n: int, contacts: list[ContactSpec], **extra: object) -> Command:
    args: dict[str, object] = {
        "aor": user, "contacts": contacts, "star": False, "expires_header": None, "call_id": f"c-{user}",
        "cseq": n, "received": "127.0.0.1:5070", "transport": "udp", "node_id": "n1", "now": 1_700_000_000.0 + n,
        "min_expires": 60, "max_expires": 3600, "default_expires": 300, "max_contacts": 3, "branch": f"z9hG4bK{n}",
    }
    args.update(extra)
    decision = decide_register(state, **args)  # type: ignore[arg-type]
    assert type(decision) is RegisterAccepted, decision
    (event,) = decision.events
    return Command(decision.op_id, event)


def _workload() -> tuple[State, list[bytes]]:
    state = State(dedupe_limit=50)
    entries: list[bytes] = []
    index = 0

    def commit(commands: list[Command]) -> None:
        nonlocal index
        index += 1
        entry = encode_batch(commands)
        entries.append(entry)
        apply_entry(state, entry, index)

    at = 1_700_000_000.25
    commit([Command(f"create-{u}", ExtensionCreated(str(100 + u), f"User {u}", "pbx.test", MD5, SHA, at))
            for u in range(6)])
    commit([Command("rename", ExtensionUpdated("101", "Bob", at + 1)),
            Command("password", CredentialChanged("102", "pbx.test", MD5, SHA, at + 2)),
            Command("bad", ExtensionCreated("1", "", "pbx.test", MD5, SHA, at))])  # rejected: malformed number
    for n in range(1, 4):
        batch = []
        for u in range(6):
            user = str(100 + u)
            uri = f"sip:{user}@127.0.0.1:{5060 + u}"
            contacts = [ContactSpec(uri, uri, 120 * n, 0.5 if u % 2 else None)]
            if u == 3:
                contacts.append(ContactSpec(f"sip:{user}@127.0.0.2:5062;ob", "k-outbound", None, 1.0,
                                            "<urn:uuid:00000000-0000-0000-0000-000000000001>", 1, "n1/7"))
            batch.append(_register(state, user, 10 * n + u, contacts, path=("<sip:127.0.0.3;lr>",) if u == 4 else ()))
        if n == 2:
            batch.append(batch[0])  # a retransmission: the same op_id, a duplicate
        commit(batch)
    removal_key = next(iter(state.bindings["103"]))
    (removed,) = decide_remove_binding(state, "103", removal_key, 1_700_000_100.0)
    (cleared,) = decide_clear_bindings(state, "104", 1_700_000_101.0)
    star = decide_register(
        state, aor="105", contacts=[], star=True, expires_header=0, call_id="c-105", cseq=99,
        received="127.0.0.1:5070", transport="udp", node_id="n2", now=1_700_000_102.0, min_expires=60,
        max_expires=3600, default_expires=300, max_contacts=3,
    )
    assert type(star) is RegisterAccepted
    commit([
        Command(binding_admin_op_id("remove", "103", removal_key, 1_700_000_100.0), removed),
        Command(binding_admin_op_id("clear", "104", "", 1_700_000_101.0), cleared),
        Command(star.op_id, star.events[0]),
        Command("no-such-aor", cleared.__class__("999", "", 0, 1_700_000_103.0)),  # rejected: no such extension
    ])
    commit([Command(expiry_op_id(1_700_000_300.0), BindingsExpired(1_700_000_300.0))])
    return state, entries


def test_the_registration_workload_writes_the_golden_bytes() -> None:
    state, entries = _workload()
    assert hashlib.sha256(b"".join(entries)).hexdigest() == ENTRIES_SHA256
    assert digest_hex(state) == DIGEST
    data = snapshot(state)
    assert hashlib.sha256(data).hexdigest() == SNAPSHOT_SHA256
    assert restore(data) == state and snapshot(restore(data)) == data
