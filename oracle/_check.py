"""Checking an image against its flat model: content, size and mappings.

:func:`check_image` is what a session runs after every operation; :class:`OracleFailure`
is how every check (and the session) says the implementation disagreed with the model.
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass
from typing import Any

from pyimago.reference import (
    EofMapping,
    IndirectMapping,
    RawMapping,
    SpecialMapping,
    ZeroMapping,
)

from .model import Alloc, FlatModel, first_mismatch
from .ops import decode_word

__all__ = ["OracleFailure", "check_image", "check_small_mapping", "content_failure"]

Access = Any
"""A FormatAccess-like object (the reference's, or any implementation's)."""


class OracleFailure(AssertionError):
    """The implementation disagreed with the model (or broke a mapping invariant).

    ``offset`` is the guest offset that went wrong, when there is one; ``clauses`` the spec
    clause IDs the failure most likely breaks (the check's own, then the operation's).
    """

    def __init__(
        self, message: str, *, offset: int | None = None, clauses: tuple[str, ...] = ()
    ) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.clauses = clauses

#: Zeroes to compare with: ``startswith`` is a memcmp with no copy (``lstrip`` walks the
#: bytes one by one: milliseconds for a 2 MiB cluster).
_ZEROES = bytes(4 << 20)


def _all_zero(data: bytes) -> bool:
    if len(data) <= len(_ZEROES):
        return _ZEROES.startswith(data)
    return data == bytes(len(data))


def _hex(data: bytes) -> str:
    return " ".join(f"{b:02x}" for b in data)


def _word_story(data: bytes) -> str:
    origin = decode_word(data)
    if origin is None:
        return "not written by any step"
    step, offset = origin
    return f"data of step {step} (mod 255) for offset 0x{offset:x}"


def content_failure(what: str, base: int, index: int, actual: bytes, expected: bytes) -> str:
    word = index - index % 4
    got = actual[word : word + 4]
    want = expected[word : word + 4]
    return (
        f"{what}: byte 0x{base + index:x} reads 0x{actual[index]:02x}, the model expects "
        f"0x{expected[index]:02x}; the word at 0x{base + word:x} reads [{_hex(got)}] "
        f"({_word_story(got)}), expected [{_hex(want)}] ({_word_story(want)})"
    )


@dataclass(frozen=True, slots=True)
class _UnitKinds:
    """The one kind each unit from ``first`` on maps as (see ``_shallow_units``)."""

    first: int
    kinds: list[Alloc]

    def kind(self, unit: int) -> Alloc:
        return self.kinds[unit - self.first]

    def first_other(self, lo: int, hi: int, kind: Alloc) -> int | None:
        """The first unit of ``[lo, hi)`` mapped as something else than ``kind``."""
        run = self.kinds[lo - self.first : hi - self.first]
        if run.count(kind) == len(run):
            return None
        return lo + next(i for i, k in enumerate(run) if k is not kind)


def _shallow_kind(mapping: Any, offset: int) -> Alloc:
    if isinstance(mapping, (RawMapping, SpecialMapping)):
        return Alloc.DATA
    if isinstance(mapping, ZeroMapping):
        return Alloc.ZERO if mapping.explicit else Alloc.BACKING
    if isinstance(mapping, IndirectMapping):
        return Alloc.BACKING
    raise OracleFailure(f"get_shallow_mapping(0x{offset:x}) returned {mapping!r}", offset=offset)


def _step_failure(
    prefix: str, call: str, mapping: Any, pos: int, length: int, end: int, size: int,
    asked: str,
) -> OracleFailure | None:
    """Whether one step of a mapping walk over ``[pos, end)`` broke the protocol: EOF before
    the disk end, or a length that is not positive or runs past ``end`` (the lengths must
    tile the disk)."""
    if isinstance(mapping, EofMapping):
        return OracleFailure(
            f"{prefix}{call}(0x{pos:x}) reports EOF before the disk end 0x{size:x}",
            offset=pos,
            clauses=("access.mapping.eof-top-only",),
        )
    if length <= 0 or pos + length > end:
        return OracleFailure(
            f"{prefix}{call}({asked}) returned {mapping} with length 0x{length:x}, "
            f"which does not tile the disk (end 0x{size:x})",
            offset=pos,
            clauses=("access.mapping.tiling",),
        )
    return None


def _require_eof(prefix: str, call: str, size: int, result: tuple[Any, int]) -> None:
    """At the disk end, ``call`` must answer EOF with length 0."""
    mapping, length = result
    if not isinstance(mapping, EofMapping) or length != 0:
        raise OracleFailure(
            f"{prefix}{call} at the disk end 0x{size:x} returned ({mapping}, {length}), not EOF",
            offset=size,
            clauses=("access.mapping.eof-top-only",),
        )


def _shallow_units(
    access: Access, model: FlatModel, start: int, end: int, what: str = "image"
) -> list[Alloc]:
    """What the layer maps each allocation unit of ``[start, end)`` (unit-aligned, ``end``
    at most the disk end) to, walking ``get_shallow_mapping``: one kind per unit, from
    ``start``'s unit on.  A unit mapped as several kinds, or as a kind the model does not
    allow there, is a failure."""
    size = model.size
    g = model.granularity
    first = start // g
    kinds: list[Alloc] = []
    allowed = model.alloc
    pos = start
    while pos < end:
        mapping, length = access.get_shallow_mapping(pos, end - pos)
        failure = _step_failure("", "get_shallow_mapping", mapping, pos, length, end, size,
                                f"0x{pos:x}, 0x{end - pos:x}")
        if failure is not None:
            raise failure
        kind = _shallow_kind(mapping, pos)
        lo, hi = pos // g, (pos + length - 1) // g + 1
        if pos % g and lo - first < len(kinds):
            # The unit this mapping starts in began with another mapping.
            if kinds[-1] is not kind:
                at = lo * g
                names = ", ".join(sorted({kinds[-1].value, kind.value}))
                raise OracleFailure(
                    f"{what}: unit 0x{at:x} (of 0x{g:x} bytes) maps as several kinds: {names}",
                    offset=at,
                )
            lo += 1
        if lo < hi:
            if not all(map(operator.contains, allowed[lo:hi], itertools.repeat(kind))):
                unit = next(u for u in range(lo, hi) if kind not in allowed[u])
                names = ", ".join(sorted(k.value for k in allowed[unit]))
                raise OracleFailure(
                    f"{what}: unit 0x{unit * g:x} (of 0x{g:x} bytes) maps as {kind.value}; "
                    f"the model allows only {names}",
                    offset=unit * g,
                )
            kinds.extend(itertools.repeat(kind, hi - lo))
        pos += length
    if end == size:
        _require_eof("", "get_shallow_mapping", size, access.get_shallow_mapping(size, g))
    return kinds


def check_image(
    access: Access,
    model: FlatModel,
    *,
    what: str = "image",
    start: int = 0,
    end: int | None = None,
) -> int:
    """Check one image against its model; return how many bytes were compared.

    Size; content on every known byte; ``get_shallow_mapping`` against the model's
    allocation sets; ``get_mapping`` consistency: the lengths tile the disk, EOF only at the
    end, a zero mapping reads zeroes, explicit zeroes only where this layer has them, a raw
    mapping's storage holds what the guest reads.

    With ``start``/``end`` only the allocation units covering ``[start, end)`` are checked
    (the incremental check after an operation); the default is the whole disk.
    """
    size = model.size
    if access.size != size:
        raise OracleFailure(f"{what}: size is 0x{access.size:x}, the model says 0x{size:x}")
    g = model.granularity
    end = size if end is None else min(end, size)
    start = min(start - start % g, size)
    if end < size:
        end = min(-(-end // g) * g, size)
    if start >= end and end < size:
        return 0
    actual = access.read(start, end - start)
    if len(actual) != end - start:
        raise OracleFailure(
            f"{what}: read of 0x{end - start:x} bytes returned 0x{len(actual):x}"
        )
    expected, known = model.read(start, end - start)
    bad = first_mismatch(actual, expected, known)
    if bad is not None:
        raise OracleFailure(
            content_failure(f"{what}: content", start, bad, actual, expected),
            offset=start + bad,
        )

    units = _UnitKinds(start // model.granularity,
                       _shallow_units(access, model, start, end, what))

    pos = start
    while pos < end:
        # At the disk end, ask for more than is left: the length must stop at the end.
        mapping, length = access.get_mapping(pos, end - pos + (g if end == size else 0))
        failure = _step_failure(f"{what}: ", "get_mapping", mapping, pos, length, end, size,
                                f"0x{pos:x}")
        if failure is not None:
            raise failure
        _check_mapping(what, "get_mapping", mapping, pos, length,
                       actual[pos - start : pos - start + length], units, g)
        pos += length
    if end == size:
        _require_eof(f"{what}: ", "get_mapping", size, access.get_mapping(size, g))
    return end - start


def _check_mapping(
    what: str,
    call: str,
    mapping: Any,
    pos: int,
    length: int,
    chunk: bytes,
    units: _UnitKinds | None,
    g: int,
) -> None:
    """One resolved mapping against what the guest reads there (``chunk``) and, when
    ``units`` is given, against what this layer maps each unit to."""
    if isinstance(mapping, ZeroMapping):
        if not _all_zero(chunk):
            nonzero = len(chunk) - len(chunk.lstrip(b"\x00"))
            raise OracleFailure(
                f"{what}: {call}(0x{pos:x}) says zero for 0x{length:x} bytes but byte "
                f"0x{pos + nonzero:x} reads 0x{chunk[nonzero]:02x}",
                offset=pos + nonzero,
            )
        if mapping.explicit and units is not None:
            unit = units.first_other(pos // g, (pos + length - 1) // g + 1, Alloc.ZERO)
            if unit is not None:
                raise OracleFailure(
                    f"{what}: {call}(0x{pos:x}) reports an explicit zero, but "
                    f"this layer maps unit 0x{unit * g:x} as "
                    f"{units.kind(unit).value}: explicit zeroes "
                    "may only come from the top layer",
                    offset=max(pos, unit * g),
                    clauses=("access.mapping.explicit-top-only",),
                )
    elif isinstance(mapping, RawMapping):
        stored = mapping.storage.read(mapping.offset, length)
        if stored != chunk:
            bad = first_mismatch(stored, chunk, b"\x01" * length)
            assert bad is not None
            raise OracleFailure(
                f"{what}: {call}(0x{pos:x}) maps to {mapping}, whose bytes differ from "
                f"what the guest reads at 0x{pos + bad:x}",
                offset=pos + bad,
                clauses=("access.mapping.tiling",),
            )
        if mapping.writable and units is not None:
            unit = units.first_other(pos // g, (pos + length - 1) // g + 1, Alloc.DATA)
            if unit is not None:
                raise OracleFailure(
                    f"{what}: {call}(0x{pos:x}) reports {mapping} writable, but "
                    f"this layer does not hold unit 0x{unit * g:x}: data reached "
                    "through a read-only backing must not be writable",
                    offset=max(pos, unit * g),
                    clauses=("access.mapping.writable-gate",),
                )
    elif not isinstance(mapping, SpecialMapping):
        raise OracleFailure(f"{what}: {call}(0x{pos:x}) returned {mapping!r}", offset=pos)


def _check_special_readv(mapping: SpecialMapping, offset: int, chunk: bytes) -> None:
    """access.vectored.equivalent for the driver call a SpecialMapping stands for: its
    layer's driver's ``readv_special`` fills two buffers of odd sizes as one read fills one
    (FormatAccess itself passes one buffer, so nothing else calls it with several)."""
    read = getattr(getattr(mapping.layer, "driver", None), "readv_special", None)
    if read is None or len(chunk) < 2:
        return
    head = min(max(len(chunk) // 3, 1) | 1, len(chunk) - 1)
    buffers = [bytearray(head), bytearray(len(chunk) - head)]
    read(buffers, mapping.offset)
    got = b"".join(buffers)
    if got != chunk:
        bad = next(i for i, (a, b) in enumerate(zip(got, chunk, strict=True)) if a != b)
        raise OracleFailure(
            f"readv_special at 0x{mapping.offset:x} into buffers of "
            f"{', '.join(str(len(b)) for b in buffers)} bytes: byte 0x{offset + bad:x} reads "
            f"0x{got[bad]:02x}, a read gives 0x{chunk[bad]:02x}",
            offset=offset + bad,
            clauses=("access.mapping.special-compressed", "access.vectored.equivalent"),
        )


def check_small_mapping(access: Access, model: FlatModel, offset: int, max_length: int) -> None:
    """``get_mapping`` and ``get_shallow_mapping`` asked for at most ``max_length`` bytes:
    ``0 < length <= max_length`` inside the disk (EOF with length 0 at or past its end), and
    what they map agrees with what the guest reads and with the model."""
    size = model.size
    g = model.granularity
    for call in ("get_mapping", "get_shallow_mapping"):
        mapping, length = getattr(access, call)(offset, max_length)
        if offset >= size:
            if not isinstance(mapping, EofMapping) or length != 0:
                raise OracleFailure(
                    f"{call}(0x{offset:x}, 0x{max_length:x}) at or past the disk end 0x{size:x} "
                    f"returned ({mapping}, {length}), not EOF",
                    offset=offset,
                    clauses=("access.mapping.eof-top-only",),
                )
            continue
        if isinstance(mapping, EofMapping) or not 0 < length <= max_length:
            raise OracleFailure(
                f"{call}(0x{offset:x}, 0x{max_length:x}) returned {mapping} with length "
                f"0x{length:x}: a mapping inside the disk covers 1..max_length bytes",
                offset=offset,
                clauses=("access.mapping.tiling",),
            )
        if offset + length > size:
            raise OracleFailure(
                f"{call}(0x{offset:x}, 0x{max_length:x}) runs past the disk end 0x{size:x} "
                f"(length 0x{length:x})",
                offset=offset,
                clauses=("access.mapping.tiling",),
            )
        if call == "get_mapping":
            chunk = bytes(access.read(offset, length))
            _check_mapping("image", call, mapping, offset, length, chunk, None, g)
            if isinstance(mapping, SpecialMapping):
                _check_special_readv(mapping, offset, chunk)
        else:
            kind = _shallow_kind(mapping, offset)
            for unit in range(offset // g, (offset + length - 1) // g + 1):
                if kind not in model.allowed(unit):
                    raise OracleFailure(
                        f"{call}(0x{offset:x}, 0x{max_length:x}) maps unit 0x{unit * g:x} as "
                        f"{kind.value}; the model allows only "
                        f"{', '.join(sorted(k.value for k in model.allowed(unit)))}",
                        offset=max(offset, unit * g),
                    )
