"""Key layout: our fast packer is byte-identical to fdb.tuple.pack."""

from __future__ import annotations

import fdb.tuple
from hypothesis import given
from hypothesis import strategies as st

from storage import keys

elements = st.one_of(
    st.text(), st.binary(), st.integers(min_value=-(2**70), max_value=2**70), st.none(), st.booleans()
)


@given(st.lists(elements, max_size=6))
def test_pack_matches_fdb_tuple(items: list[object]) -> None:
    t = tuple(items)
    assert keys.pack(t) == fdb.tuple.pack(t)
    assert fdb.tuple.unpack(keys.pack(t)) == t


def test_versionstamp_key_matches_layout() -> None:
    key = keys.versionstamp_key(("q", "due"))
    head = fdb.tuple.pack(("q", "due"))
    assert key.startswith(head + b"\x33" + b"\xff" * 10)
    assert int.from_bytes(key[-4:], "little") == len(head) + 1
