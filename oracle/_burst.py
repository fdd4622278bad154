"""Bursts: many basic operations per Hypothesis step, drawn cheaply.

A machine step costs Hypothesis about a millisecond (choosing the rule, its arguments, the
bookkeeping around them) whatever the step does; a basic operation on a memory chain costs
a fraction of that.  A burst draws a batch of basic operations (reads, ``readinto``,
``readv``, writes, ``writev``, ``write_zeroes``, the three discards, ``ensure_data_mapping``,
``get_mapping`` with a small ``max_length``) in one go, as plain integers: four per
operation, each mapped into a valid value (a modulo, never a filter), so a draw never
fails and every choice shrinks towards the simplest operation (a one-byte read at offset 0).
The four fields are packed into one integer per operation (one draw: per operation
Hypothesis's bookkeeping costs more than the draw itself), the least telling (the place)
in the high bits, which the integer shrinker clears first, the kind in the lowest.
Lists of lists shrink well: a failing burst shrinks to fewer, smaller operations, and the
session logs each operation as it would a step's, so a shrunk failure replays (and is
committed as a regression) exactly like one found by single-operation rules.

The size does not change inside a burst (no resizes), so the whole batch is decoded up
front against the geometry of the step (:class:`~pyimago.oracle.strategies.Geometry`):
offsets at cluster, L2-table and sector boundaries, at the disk end, near what the burst
wrote before, or anywhere, with deltas of a byte, a sector or a cluster either side;
lengths tiny, in sectors, in clusters or just off them.  Ranges end at those places as often
as ``Geometry.sharp`` asks for.
"""

from __future__ import annotations

import itertools

from hypothesis import strategies as st

from .ops import Op, OpKind
from .strategies import Geometry

__all__ = ["BURST_KINDS", "BURST_MIXES", "Choice", "burst_choices", "decode_burst"]

#: What a burst draws from (a target's unclaimed discards are left out by the machine).
BURST_KINDS: tuple[OpKind, ...] = (
    OpKind.READ,
    OpKind.WRITE,
    OpKind.READINTO,
    OpKind.READV,
    OpKind.WRITEV,
    OpKind.WRITE_ZEROES,
    OpKind.DISCARD_TO_ZERO,
    OpKind.DISCARD_TO_ANY,
    OpKind.DISCARD_TO_BACKING,
    OpKind.GET_MAPPING,
    OpKind.ENSURE_DATA_MAPPING,
    OpKind.WRITE,
)

#: The machines' burst rules, by name: the kinds each draws from, and whether its ranges
#: stay near what the burst wrote (``near``: operations meet on the same clusters).  A
#: step is one rule drawn evenly among all of them, so several burst rules are also how
#: bursts make up a good share of the steps.
BURST_MIXES: dict[str, tuple[tuple[OpKind, ...], bool]] = {
    "burst": (BURST_KINDS, False),
    "burst_near": (BURST_KINDS, True),
    "burst_modify": ((OpKind.WRITE, OpKind.WRITEV, OpKind.WRITE_ZEROES, OpKind.DISCARD_TO_ZERO,
                      OpKind.DISCARD_TO_ANY, OpKind.DISCARD_TO_BACKING,
                      OpKind.ENSURE_DATA_MAPPING, OpKind.WRITE), False),
    "burst_modify_near": ((OpKind.WRITE, OpKind.WRITE_ZEROES, OpKind.DISCARD_TO_ZERO,
                           OpKind.DISCARD_TO_ANY, OpKind.DISCARD_TO_BACKING, OpKind.WRITE),
                          True),
    "burst_read": ((OpKind.READ, OpKind.READINTO, OpKind.READV, OpKind.GET_MAPPING,
                    OpKind.WRITE), False),
    "burst_vectored": ((OpKind.READV, OpKind.WRITEV, OpKind.READINTO, OpKind.WRITE,
                        OpKind.DISCARD_TO_BACKING), True),
    "burst_mapping": ((OpKind.GET_MAPPING, OpKind.ENSURE_DATA_MAPPING, OpKind.WRITE,
                       OpKind.WRITE_ZEROES, OpKind.DISCARD_TO_ZERO, OpKind.DISCARD_TO_ANY),
                      True),
}

#: One operation as drawn: ``kind + kinds * (aux + 2^10 * (length + 2^16 * place))`` (see
#: :func:`decode_burst`).
Choice = int

_SECTOR = 512
_PLACE_BITS = 16
_AUX = 1 << 10
_LENGTH = 1 << 16
_PLACE = 1 << (_PLACE_BITS + 3)
_PLACES = 6
_HOT = 8
_READS = frozenset({OpKind.READ, OpKind.READINTO, OpKind.READV, OpKind.GET_MAPPING})
_WRITES = frozenset({OpKind.WRITE, OpKind.WRITEV, OpKind.ENSURE_DATA_MAPPING})
_SPLIT = frozenset({OpKind.READV, OpKind.WRITEV})


def burst_choices(kinds: int) -> st.SearchStrategy[list[list[Choice]]]:
    """The raw draws of one burst: groups of operations (about 50 in all, 1 to 288).

    Nested lists: a flat list averages 6 elements whatever its bound; the groups give
    longer bursts and keep what lists shrink best at (dropping elements).
    """
    one = st.integers(0, kinds * _AUX * _LENGTH * _PLACE - 1)
    group = st.lists(st.lists(one, min_size=1, max_size=12), min_size=1, max_size=6)
    return st.lists(group, min_size=1, max_size=4).map(lambda parts: [g for p in parts for g in p])


def _deltas(g: int) -> tuple[int, ...]:
    return (0, 0, 0, 0, 1, -1, _SECTOR, -_SECTOR, g, -g, g - 1, 1 - g, 3, -3, 8, -8)


def _anchor(place: int, geo: Geometry, hot: list[int]) -> int:
    size, g = geo.size, geo.granularity
    where, r = place % _PLACES, place // _PLACES
    if where == 5 and hot:
        return hot[r % len(hot)]
    if where == 0:
        return (r * size) >> _PLACE_BITS
    if where in (1, 5):
        return r % (size // g + 1) * g
    if where == 2:
        return r % (size // geo.l2_span + 1) * geo.l2_span
    if where == 3:
        return size
    return r % (size // _SECTOR + 1) * _SECTOR


def _length(raw: int, g: int) -> int:
    shape, r = raw % 4, raw // 4
    if shape == 0:
        return 1 + r % 16
    if shape == 1:
        return (1 + r % 8) * _SECTOR
    if shape == 2:
        return (1 + r % 3) * g + (0, 0, -1, 1)[r // 3 % 4]
    return 1 + r % (2 * g)


def _max_length(raw: int, g: int) -> int:
    return (1, 2, _SECTOR - 1, _SECTOR, g - 1, g, g + 1, 1 + raw // 8 % (3 * g))[raw % 8]


def _split(length: int, aux: int) -> str:
    """2 to 4 buffers of odd sizes summing to ``length`` (as ``Op.mode`` lists them)."""
    parts = 2 + (aux >> 6) % 3
    if length < 2:
        return str(length)
    cuts = sorted({1 + (aux * 7919 + i * 104_729) % (length - 1) for i in range(parts - 1)})
    bounds = [0, *cuts, length]
    return ",".join(str(b - a) for a, b in itertools.pairwise(bounds))


def decode_burst(raw: list[list[Choice]], geo: Geometry,
                 kinds: tuple[OpKind, ...] = BURST_KINDS, *, near: bool = False) -> list[Op]:
    """The operations a burst's draws stand for, on a disk of ``geo`` (size > 0).

    ``near``: once something was written (or ``geo.hot`` names places), every range is
    anchored at the first or last byte of a recent write.

    ``aux`` holds the delta added to the anchor (low 4 bits), whether the range ends at the
    anchor rather than starting there (bit 4), whether a read may run past the disk end
    (bit 5), the number of ``readv``/``writev`` buffers (bits 6-7) and whether
    ``ensure_data_mapping`` keeps the old data (bit 8).
    """
    size, g = geo.size, geo.granularity
    deltas = _deltas(g)
    hot = list(geo.hot[-_HOT:])
    ops: list[Op] = []
    for choice in (c for group in raw for c in group):
        rest, kind_index = divmod(choice, len(kinds))
        rest, aux = divmod(rest, _AUX)
        place, length_raw = divmod(rest, _LENGTH)
        kind = kinds[kind_index]
        if near and hot:
            place -= place % _PLACES - 5
        anchor = _anchor(place, geo, hot) + deltas[aux % 16]
        reads = kind in _READS
        if kind is OpKind.GET_MAPPING:
            offset = min(max(anchor, 0), size + g)
            ops.append(Op(kind, offset, _max_length(length_raw, g)))
            continue
        length = _length(length_raw, g)
        offset = anchor - length if aux & 0x10 else anchor
        if reads and aux & 0x20:
            # Reads may run past the end (they read zeroes there) or start past it.
            offset = min(max(offset, 0), size + g)
        else:
            offset = min(max(offset, 0), size - 1)
            length = max(1, min(length, size - offset))
        mode = None
        if kind in _SPLIT:
            mode = _split(length, aux)
        elif kind is OpKind.ENSURE_DATA_MAPPING:
            mode = "keep" if aux & 0x100 else "overwrite"
        ops.append(Op(kind, offset, length, mode=mode))
        if kind in _WRITES:
            # Its first and last byte: later operations of the burst may meet it there.
            hot = [*hot[-(_HOT - 2):], offset, offset + length - 1]
    return ops
