"""convert's zero-run search against its plain definition (no qemu needed)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyimago.tools._convert import _zero_runs

pytestmark = pytest.mark.clause("tools.convert.content")

#: The definition: maximal zero runs of a sector or more, and a shorter one ending the data.
_DEFINITION = re.compile(b"\\x00{512,}|\\x00+\\Z")

_pieces = st.one_of(
    st.sampled_from([1, 100, 511, 512, 513, 1024, 65535, 65536, 65537, 140000]).map(bytes),
    st.integers(1, 3000).map(bytes),
    st.binary(min_size=1, max_size=700).map(lambda b: bytes(x or 1 for x in b)),
)


@given(st.lists(_pieces, max_size=10))
def test_zero_runs_are_the_definitions(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    assert list(_zero_runs(data)) == [(m.start(), m.end()) for m in _DEFINITION.finditer(data)]
