"""`raftpbx admin trunk list|get`: the state of our registration to the trunk's peer (issue 9, H3's
`registration` field of trunk.get / trunk.list) in the human output."""

from __future__ import annotations

from raftpbx.cli import _registration_line, _trunk_rows


def test_trunk_table_shows_the_registration_state() -> None:
    """H3's trunk registration (`registration` in trunk.get / trunk.list) in the human output of `trunk`."""
    base = {"name": "kam", "peers": ["127.0.0.40:5060"], "transport": "udp", "allow": [], "credentials": False}
    registration = {"state": "registered", "peer": "127.0.0.40:5060", "expires_in": 42, "last_status": 200,
                    "last_error": None}
    rows = _trunk_rows([{**base, "register_expires": 60, "registration": registration},
                        {**base, "register_expires": 60, "registration": None},
                        {**base, "register_expires": 0, "registration": None}])
    assert [r["register"] for r in rows] == ["60 s, registered", "60 s", "no"]
    assert _registration_line(registration) == (
        "registration: registered at 127.0.0.40:5060, expires in 42 s, last status 200, last error -")
    assert "expires in - s" in _registration_line({**registration, "expires_in": None, "state": "standby"})
