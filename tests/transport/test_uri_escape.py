"""`uri.escape`'s all-safe shortcut (str.strip over the safe set's characters) against the plain definition."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from raftpbx.transport.sip import uri

SAFE_SETS = [uri._USER_SAFE, uri._PASSWORD_SAFE, uri._PARAM_SAFE, uri._HEADER_SAFE, frozenset("ab"), frozenset()]


def reference(text: str, safe: frozenset[str]) -> str:
    return "".join(ch if ch in safe else "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogateescape"))
                   for ch in text)


@given(st.text(alphabet=st.sampled_from("ab019-_.!~*'()&=+$,;?/[]:% @\"<>#é\x00\udcff")), st.sampled_from(SAFE_SETS))
def test_escape_is_the_plain_definition(text: str, safe: frozenset[str]) -> None:
    assert uri.escape(text, safe) == reference(text, safe)


def test_all_safe_text_is_returned_as_is_and_one_unsafe_character_in_the_middle_is_escaped() -> None:
    assert uri.escape("alice.smith-1", uri._USER_SAFE) == "alice.smith-1"
    assert uri.escape("alice smith", uri._USER_SAFE) == "alice%20smith"
    assert uri.escape("a@b", uri._PARAM_SAFE) == "a%40b"
