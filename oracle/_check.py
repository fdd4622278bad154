"""Checking an image against its flat model: content, size and mappings.

:func:`check_image` is what a session runs after every operation; :class:`OracleFailure`
is how every check (and the session) says the implementation disagreed with the model.
"""

from __future__ import annotations

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

__all__ = ["OracleFailure", "check_image", "content_failure"]

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


def _shallow_kind(mapping: Any, offset: int) -> Alloc:
    if isinstance(mapping, (RawMapping, SpecialMapping)):
        return Alloc.DATA
    if isinstance(mapping, ZeroMapping):
        return Alloc.ZERO if mapping.explicit else Alloc.BACKING
    if isinstance(mapping, IndirectMapping):
        return Alloc.BACKING
    raise OracleFailure(f"get_shallow_mapping(0x{offset:x}) returned {mapping!r}", offset=offset)


def _shallow_units(access: Access, model: FlatModel) -> list[set[Alloc]]:
    """What the layer maps each allocation unit to, walking ``get_shallow_mapping``."""
    size = model.size
    g = model.granularity
    units: list[set[Alloc]] = [set() for _ in range(len(model.alloc))]
    pos = 0
    while pos < size:
        mapping, length = access.get_shallow_mapping(pos, size - pos)
        if isinstance(mapping, EofMapping):
            raise OracleFailure(
                f"get_shallow_mapping(0x{pos:x}) reports EOF before the disk end 0x{size:x}",
                offset=pos,
                clauses=("access.mapping.eof-top-only",),
            )
        if length <= 0 or pos + length > size:
            raise OracleFailure(
                f"get_shallow_mapping(0x{pos:x}, 0x{size - pos:x}) returned {mapping} with "
                f"length 0x{length:x}",
                offset=pos,
                clauses=("access.mapping.tiling",),
            )
        kind = _shallow_kind(mapping, pos)
        for unit in range(pos // g, (pos + length - 1) // g + 1):
            units[unit].add(kind)
        pos += length
    mapping, length = access.get_shallow_mapping(size, g)
    if not isinstance(mapping, EofMapping) or length != 0:
        raise OracleFailure(
            f"get_shallow_mapping at the disk end 0x{size:x} returned ({mapping}, {length}), "
            "not EOF",
            offset=size,
            clauses=("access.mapping.eof-top-only",),
        )
    return units


def check_image(access: Access, model: FlatModel, *, what: str = "image") -> int:
    """Check one image against its model; return how many bytes were compared.

    Size; content on every known byte; ``get_shallow_mapping`` against the model's
    allocation sets; ``get_mapping`` consistency: the lengths tile the disk, EOF only at the
    end, a zero mapping reads zeroes, explicit zeroes only where this layer has them, a raw
    mapping's storage holds what the guest reads.
    """
    size = model.size
    if access.size != size:
        raise OracleFailure(f"{what}: size is 0x{access.size:x}, the model says 0x{size:x}")
    actual = access.read(0, size)
    if len(actual) != size:
        raise OracleFailure(f"{what}: read of 0x{size:x} bytes returned 0x{len(actual):x}")
    expected, known = model.read(0, size)
    bad = first_mismatch(actual, expected, known)
    if bad is not None:
        raise OracleFailure(
            content_failure(f"{what}: content", 0, bad, actual, expected), offset=bad
        )

    units = _shallow_units(access, model)
    g = model.granularity
    for unit, kinds in enumerate(units):
        start = unit * g
        if len(kinds) != 1:
            names = ", ".join(sorted(k.value for k in kinds))
            raise OracleFailure(
                f"{what}: unit 0x{start:x} (of 0x{g:x} bytes) maps as several kinds: {names}",
                offset=start,
            )
        (kind,) = kinds
        allowed = model.allowed(unit)
        if kind not in allowed:
            names = ", ".join(sorted(k.value for k in allowed))
            raise OracleFailure(
                f"{what}: unit 0x{start:x} (of 0x{g:x} bytes) maps as {kind.value}; the model "
                f"allows only {names}",
                offset=start,
            )

    pos = 0
    while pos < size:
        mapping, length = access.get_mapping(pos, size - pos + g)
        if isinstance(mapping, EofMapping):
            raise OracleFailure(
                f"{what}: get_mapping(0x{pos:x}) reports EOF before the disk end 0x{size:x}",
                offset=pos,
                clauses=("access.mapping.eof-top-only",),
            )
        if length <= 0 or pos + length > size:
            raise OracleFailure(
                f"{what}: get_mapping(0x{pos:x}) returned {mapping} with length 0x{length:x}, "
                f"which does not tile the disk (end 0x{size:x})",
                offset=pos,
                clauses=("access.mapping.tiling",),
            )
        chunk = actual[pos : pos + length]
        if isinstance(mapping, ZeroMapping):
            nonzero = len(chunk) - len(chunk.lstrip(b"\x00"))
            if nonzero != len(chunk):
                raise OracleFailure(
                    f"{what}: get_mapping(0x{pos:x}) says zero for 0x{length:x} bytes but byte "
                    f"0x{pos + nonzero:x} reads 0x{chunk[nonzero]:02x}",
                    offset=pos + nonzero,
                )
            if mapping.explicit:
                for unit in range(pos // g, (pos + length - 1) // g + 1):
                    if units[unit] != {Alloc.ZERO}:
                        raise OracleFailure(
                            f"{what}: get_mapping(0x{pos:x}) reports an explicit zero, but "
                            f"this layer maps unit 0x{unit * g:x} as "
                            f"{'/'.join(k.value for k in units[unit])}: explicit zeroes "
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
                    f"{what}: get_mapping(0x{pos:x}) maps to {mapping}, whose bytes differ from "
                    f"what the guest reads at 0x{pos + bad:x}",
                    offset=pos + bad,
                    clauses=("access.mapping.tiling",),
                )
            if mapping.writable:
                for unit in range(pos // g, (pos + length - 1) // g + 1):
                    if units[unit] != {Alloc.DATA}:
                        raise OracleFailure(
                            f"{what}: get_mapping(0x{pos:x}) reports {mapping} writable, but "
                            f"this layer does not hold unit 0x{unit * g:x}: data reached "
                            "through a read-only backing must not be writable",
                            offset=max(pos, unit * g),
                            clauses=("access.mapping.writable-gate",),
                        )
        elif not isinstance(mapping, SpecialMapping):
            raise OracleFailure(f"{what}: get_mapping(0x{pos:x}) returned {mapping!r}", offset=pos)
        pos += length
    mapping, length = access.get_mapping(size, g)
    if not isinstance(mapping, EofMapping) or length != 0:
        raise OracleFailure(
            f"{what}: get_mapping at the disk end 0x{size:x} returned ({mapping}, {length}), "
            "not EOF",
            offset=size,
            clauses=("access.mapping.eof-top-only",),
        )
    return size


# create_image's preallocation names, as the grow from 0 they amount to.
