"""parse_cseq's fast case (`digits SP known-method`, no expression) gives what the expression-based
path gives (shared/STYLE.md: fast code agrees with a naive version), RFC 3261 §20.16, §8.1.1.5."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from raftpbx.transport.sip.errors import SipParseError
from raftpbx.transport.sip.headers import _CSEQ_RE, CSeq, parse_cseq


def _reference(text: str) -> CSeq | str:
    """The expression-only reading (what parse_cseq did before the fast case)."""
    m = _CSEQ_RE.fullmatch(text)
    if m is None:
        return "error"
    seq = int(m.group(1))
    return "error" if seq >= 2**31 else CSeq(seq, m.group(2))


def _outcome(text: str) -> CSeq | str:
    try:
        return parse_cseq(text)
    except SipParseError as exc:
        assert exc.status == 400
        return "error"


@pytest.mark.parametrize(
    "text",
    [
        "1 INVITE",
        "4711 REGISTER",
        "0 ACK",
        "0001 BYE",
        "2147483647 OPTIONS",
        "2147483648 INVITE",  # §8.1.1.5: below 2**31
        "9999999999 INVITE",
        "12345678901 INVITE",  # more than 10 digits
        "1 invite",  # unknown spelling: the expression decides (a token, accepted)
        "1 FOO",
        " 1 INVITE",
        "1  INVITE",
        "1\tINVITE",
        "1 INVITE ",
        "1 INVITE X",
        "\uff11 INVITE",  # fullwidth digit: str.isdigit is true, the grammar says no
        "\u00b2 INVITE",  # superscript two, the same
        "-1 INVITE",
        " INVITE",
        "1 ",
        "",
    ],
)
def test_fast_case_agrees_with_the_expression(text: str) -> None:
    assert _outcome(text) == _reference(text)


@given(
    st.text(alphabet="0123456789 \t\u00b2\uff11", max_size=12),
    st.sampled_from(["INVITE", "REGISTER", "ACK", "invite", "X", "", "INVITE "]),
)
def test_any_number_and_method_agree(number: str, method: str) -> None:
    text = f"{number} {method}"
    assert _outcome(text) == _reference(text)
