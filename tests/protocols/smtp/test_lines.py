"""The DATA line-length check (RFC 5321 §4.5.3.1.6) against a regular expression."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from protocols.smtp.server import has_long_line


def reference(data: bytes, limit: int) -> bool:
    """A line (up to its LF) with ``limit + 2`` octets or more before the LF:
    over ``limit`` octets before a CRLF."""
    return bool(re.search(rb"^[^\n]{%d}" % (limit + 2), data, re.M))


@given(st.lists(st.tuples(st.integers(0, 40), st.sampled_from([b"\r\n", b"\n", b""]))), st.integers(1, 30))
def test_agrees_with_a_line_by_line_reading(lines: list[tuple[int, bytes]], limit: int) -> None:
    data = b"".join(b"x" * n + end for n, end in lines)
    assert has_long_line(data, limit) == reference(data, limit)


def test_the_limit_is_998_octets_before_the_crlf() -> None:
    assert not has_long_line(b"a" * 998 + b"\r\n", 998)
    assert has_long_line(b"a" * 999 + b"\r\n", 998)
    assert has_long_line(b"ok\r\n" + b"a" * 2000, 998)
    assert not has_long_line(b"", 998)
