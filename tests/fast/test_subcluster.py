"""fast/_subcluster.py: QEMU's copy-on-write span (calculate_l2_meta) as a pure function."""

from __future__ import annotations

import pytest
from pyimago.fast._subcluster import (
    ALL_ALLOC,
    SubType,
    alloc_range,
    cow_span,
    sc_type,
    zero_range,
)

pytestmark = pytest.mark.clause("qcow2.extended-l2.write")

CB = 16  # 64 KiB clusters
SB = CB - 5  # 2 KiB subclusters
N = SubType.NORMAL
UP = SubType.UNALLOCATED_PLAIN
UA = SubType.UNALLOCATED_ALLOC
ZP = SubType.ZERO_PLAIN
ZA = SubType.ZERO_ALLOC
C = SubType.COMPRESSED


def test_ranges() -> None:
    assert alloc_range(0, 32) == ALL_ALLOC
    assert alloc_range(3, 5) == 0b11000
    assert zero_range(3, 5) == 0b11000 << 32


@pytest.mark.parametrize(
    ("bitmap", "has_host", "comp", "sc", "want"),
    [(0, False, False, 0, UP), (0, True, False, 7, UA), (1 << 7, True, False, 7, N),
     (1 << 39, True, False, 7, ZA), (1 << 39, False, False, 7, ZP), (0, False, True, 3, C)],
)
def test_sc_type(bitmap: int, has_host: bool, comp: bool, sc: int, want: SubType) -> None:
    assert sc_type(has_host, comp, bitmap, sc) is want


@pytest.mark.parametrize(
    ("lo", "hi", "first", "last", "alloc", "keep", "want"),
    [
        # A new cluster over nothing: only the touched subclusters.
        (3000, 4000, UP, UP, 0, False, (2048, 4096)),
        (2048, 6144, UP, UP, 0, False, (2048, 6144)),
        # A shared cluster: from the first to the last allocated subcluster.
        (3000, 4000, UA, UA, alloc_range(5, 9), False, (2048, 9 * 2048)),
        (30000, 31000, N, N, alloc_range(0, 32), False, (0, 65536)),
        # Compressed: the whole cluster.
        (100, 200, C, C, 0, False, (0, 65536)),
        # In place: normal subclusters need no copy, others from their start/to their end.
        (3000, 4000, N, N, alloc_range(1, 2), True, (3000, 4000)),
        (3000, 4000, UA, ZA, 0, True, (2048, 4096)),
        (3000, 9000, N, UA, alloc_range(1, 2), True, (3000, 5 * 2048)),
    ],
)
def test_cow_span(
    lo: int, hi: int, first: SubType, last: SubType, alloc: int, keep: bool,
    want: tuple[int, int],
) -> None:
    assert cow_span(lo, hi, first, last, alloc, keep, SB, CB, 32) == want


def test_cow_span_without_subclusters_is_the_whole_cluster() -> None:
    assert cow_span(100, 200, UP, UP, 0, False, CB, CB, 1) == (0, 65536)
    assert cow_span(100, 200, ZA, ZA, 0, True, CB, CB, 1) == (0, 65536)
