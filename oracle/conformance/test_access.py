"""FormatAccess operations (specs/access.toml), through the public API only."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any

import pytest
from pyimago.oracle.conformance._impl import Impl
from pyimago.oracle.conformance._support import (
    ImageKit,
    KiB,
    MiB,
    expect_error,
    file_bytes,
    fsync_counter,
    not_applicable,
    pattern,
)
from pyimago.reference import (
    DriverError,
    EofMapping,
    IndirectMapping,
    InvalidRequestError,
    MemoryStorage,
    PreallocateMode,
    RawMapping,
    ReadOnlyError,
    UnsupportedError,
    ZeroMapping,
)

Access = Any

# -- reads ---------------------------------------------------------------------------------------


@pytest.mark.clause("access.read.no-short")
def test_reads_fill_the_whole_buffer(img: ImageKit) -> None:
    with img.new(256 * KiB) as disk:
        disk.write(pattern(1, 10 * KiB), 3 * KiB)
        for offset, length in [(0, 1), (100, 7 * KiB + 3), (250 * KiB, 6 * KiB), (0, 256 * KiB),
                               (255 * KiB, 4 * KiB)]:
            got = disk.read(offset, length)
            assert len(got) == length, f"read({offset}, {length}) returned {len(got)} bytes"
            buf = bytearray(b"\xee" * length)
            disk.readinto(buf, offset)
            assert bytes(buf) == got, f"readinto at {offset} differs from read"
            parts = [bytearray(length // 3), bytearray(length - length // 3)]
            disk.readv(parts, offset)
            assert b"".join(parts) == got, f"readv at {offset} differs from read"


@pytest.mark.clause("access.read.past-end-zero")
def test_reads_past_the_end_read_zeroes(img: ImageKit) -> None:
    size = 64 * KiB
    with img.new(size) as disk:
        disk.write(pattern(2, size), 0)
        across = disk.read(size - 100, 300)
        assert across[:100] == pattern(2, size)[-100:], "the part before the end changed"
        assert across[100:] == bytes(200), "the part past the disk end must read zero"
        assert disk.read(size, 512) == bytes(512), "a read at the end must read zeroes"
        assert disk.read(10 * size, 4096) == bytes(4096), "a read far past the end must read 0"


@pytest.mark.clause("access.vectored.equivalent")
def test_vectored_io_equals_concatenated_io(img: ImageKit) -> None:
    data = pattern(3, 20 * KiB + 5)
    cuts = [0, 1, 4097, 9000, 20 * KiB + 5]
    bufs = [data[a:b] for a, b in itertools.pairwise(cuts)]
    with img.new(128 * KiB) as a, img.new(128 * KiB) as b:
        a.writev(bufs, 1234)
        b.write(data, 1234)
        assert a.read(0, 128 * KiB) == b.read(0, 128 * KiB), "writev != write of the concatenation"
        out = [bytearray(len(x)) for x in bufs]
        a.readv(out, 1234)
        assert b"".join(out) == data, "readv != read of the concatenation"


# -- writes --------------------------------------------------------------------------------------


@pytest.mark.clause("access.write.no-short")
def test_writes_write_every_byte(img: ImageKit) -> None:
    with img.new(256 * KiB) as disk:
        for seed, (offset, length) in enumerate([(0, 1), (511, 2), (4095, 70 * KiB + 1),
                                                 (200 * KiB, 56 * KiB)]):
            data = pattern(seed, length)
            disk.write(data, offset)
            assert disk.read(offset, length) == data, f"write of {length} at {offset} incomplete"
        disk.writev([b"ab", bytearray(b"cd"), memoryview(b"ef")], 10)
        assert disk.read(10, 6) == b"abcdef", "writev of three buffers incomplete"


def _modifiers(disk: Access) -> dict[str, Callable[[], object]]:
    return {
        "write": lambda: disk.write(b"x", 0),
        "writev": lambda: disk.writev([b"x", b"y"], 0),
        "write_zeroes": lambda: disk.write_zeroes(0, 512),
        "discard_to_zero": lambda: disk.discard_to_zero(0, 512),
        "discard_to_any": lambda: disk.discard_to_any(0, 512),
        "discard_to_backing": lambda: disk.discard_to_backing(0, 512),
        "ensure_data_mapping": lambda: disk.ensure_data_mapping(0, 512, False),
        "resize": lambda: disk.resize(disk.size + 64 * KiB),
    }


@pytest.mark.clause("access.write.read-only", "errors.hierarchy")
def test_read_only_images_refuse_every_modification(img: ImageKit) -> None:
    store = img.mem(128 * KiB, "primary")
    with img.open(store) as disk:
        disk.write(pattern(4, 128 * KiB), 0)
    before = store.snapshot()
    with img.open(store, writable=False) as disk:
        for name, call in _modifiers(disk).items():
            error = expect_error(ReadOnlyError, f"{name} on a read-only image", call)
            assert isinstance(error, PermissionError), f"{name}: not a PermissionError"
        assert disk.size == 128 * KiB, "the size changed"
        assert disk.read(0, 128 * KiB) == pattern(4, 128 * KiB), "the content changed"
    assert store.snapshot() == before, "a read-only image's storage was modified"


@pytest.mark.clause("access.write.past-end")
def test_requests_past_the_end_are_rejected_before_writing(img: ImageKit) -> None:
    size = 64 * KiB
    store = img.mem(size, "primary")
    with img.open(store) as disk:
        disk.write(pattern(5, size), 0)
        disk.flush()
        before = store.snapshot()
        calls: dict[str, Callable[[], object]] = {
            "write": lambda: disk.write(b"y" * 1024, size - 512),
            "writev": lambda: disk.writev([b"y" * 512, b"z" * 512], size - 512),
            "write_zeroes": lambda: disk.write_zeroes(size - 512, 1024),
            "discard_to_zero": lambda: disk.discard_to_zero(0, size + 512),
            "discard_to_any": lambda: disk.discard_to_any(size - 4096, 8192),
            "discard_to_backing": lambda: disk.discard_to_backing(size, 512),
        }
        for name, call in calls.items():
            expect_error(InvalidRequestError, f"{name} past the disk end", call)
            disk.flush()
            assert store.snapshot() == before, f"{name} past the end modified the image"
        assert disk.read(0, size) == pattern(5, size), "content changed"
        # A range that ends exactly at the disk end is valid.
        disk.write(b"e" * 512, size - 512)
        disk.write_zeroes(size - 1024, 512)
        assert disk.read(size - 1024, 1024) == bytes(512) + b"e" * 512


@pytest.mark.clause("access.range.overflow", "errors.bad-input-clear")
def test_bad_offsets_and_lengths_are_invalid_requests(img: ImageKit) -> None:
    with img.new(64 * KiB) as disk:
        bad: list[tuple[str, Callable[[], object]]] = [
            ("read negative offset", lambda: disk.read(-1, 10)),
            ("read negative length", lambda: disk.read(0, -1)),
            ("read bool offset", lambda: disk.read(True, 10)),
            ("read float length", lambda: disk.read(0, 1.0)),
            ("read overflow", lambda: disk.read((1 << 64) - 10, 11)),
            ("write negative", lambda: disk.write(b"x", -512)),
            ("write str offset", lambda: disk.write(b"x", "0")),
            ("write_zeroes overflow", lambda: disk.write_zeroes(1 << 63, 1 << 63)),
            ("discard_to_zero negative", lambda: disk.discard_to_zero(-4096, 4096)),
            ("get_mapping negative", lambda: disk.get_mapping(-1, 512)),
        ]
        for what, call in bad:
            error = expect_error(InvalidRequestError, what, call)
            assert isinstance(error, ValueError), f"{what}: not a ValueError"
            assert str(error), f"{what}: the error has no message"
        error = expect_error(InvalidRequestError, "read(-7, 10)", lambda: disk.read(-7, 10))
        assert "-7" in str(error), f"the message does not name the value: {error}"
        assert disk.read(0, 64 * KiB) == bytes(64 * KiB), "a rejected request changed the disk"


# -- copy-on-write and mappings -------------------------------------------------------------------


@pytest.mark.needs("qcow2", "backing")
@pytest.mark.clause("access.cow.partial-cluster", "qcow2.l2.unallocated-backing")
def test_partial_cluster_write_copies_the_backing(img: ImageKit) -> None:
    base_data = pattern(6, 64 * KiB)
    top, base, _ = img.chain([(0, base_data)], cluster_size=4 * KiB)
    with top, base:
        top.write(b"\xab" * 100, 4 * KiB + 1000)
        expected = bytearray(base_data)
        expected[4 * KiB + 1000 : 4 * KiB + 1100] = b"\xab" * 100
        assert top.read(0, 64 * KiB) == bytes(expected), "the rest of the cluster lost its data"
        mapping, _ = top.get_shallow_mapping(4 * KiB, 4 * KiB)
        assert isinstance(mapping, RawMapping), f"the written cluster maps to {mapping}"
        top.write(b"\xcd" * 10, 60 * KiB + 5)  # and in the last cluster
        assert top.read(60 * KiB, 4 * KiB) == (
            base_data[60 * KiB : 60 * KiB + 5] + b"\xcd" * 10 + base_data[60 * KiB + 15 : 64 * KiB]
        )


@pytest.mark.needs("qcow2")
@pytest.mark.clause("access.cow.partial-cluster", "qcow2.zero.flag")
def test_partial_cluster_write_into_zero_cluster_keeps_zeroes(img: ImageKit) -> None:
    with img.new(64 * KiB, "qcow2", cluster_size=4 * KiB) as disk:
        disk.write(pattern(7, 8 * KiB), 0)
        disk.write_zeroes(0, 4 * KiB)
        disk.discard_to_zero(4 * KiB, 4 * KiB)
        disk.write(b"\x11" * 10, 100)
        disk.write(b"\x22" * 10, 4 * KiB + 100)
        assert disk.read(0, 4 * KiB) == bytes(100) + b"\x11" * 10 + bytes(4 * KiB - 110)
        assert disk.read(4 * KiB, 4 * KiB) == bytes(100) + b"\x22" * 10 + bytes(4 * KiB - 110)


@pytest.mark.clause("access.ensure-data-mapping")
def test_ensure_data_mapping_returns_a_writable_raw_range(img: ImageKit) -> None:
    with img.new(256 * KiB) as disk:
        data = pattern(8, 256 * KiB)
        disk.write(data, 0)
        storage, host, length = disk.ensure_data_mapping(70 * KiB + 3, 20 * KiB, False)
        assert 0 < length <= 20 * KiB, f"ensure_data_mapping returned length {length}"
        assert storage.read(host, length) == data[70 * KiB + 3 : 70 * KiB + 3 + length], (
            "overwrite=False changed what the range reads"
        )
        mapping, mlen = disk.get_mapping(70 * KiB + 3, length)
        assert isinstance(mapping, RawMapping) and mapping.writable, (
            f"the range maps to {mapping}, not a writable RawMapping"
        )
        assert mapping.storage.read(mapping.offset, min(mlen, length)) == storage.read(
            host, min(mlen, length)
        )
        storage.write(b"\x99" * 16, host)
        assert disk.read(70 * KiB + 3, 16) == b"\x99" * 16, "a write to the mapped range is lost"
        storage2, host2, length2 = disk.ensure_data_mapping(200 * KiB, 4 * KiB, True)
        assert 0 < length2 <= 4 * KiB
        storage2.write(b"\x77" * length2, host2)
        assert disk.read(200 * KiB, length2) == b"\x77" * length2


@pytest.mark.clause("access.parallel.same-result")
def test_parallelization_changes_nothing_but_scheduling(img: ImageKit) -> None:
    results = []
    for n in (1, 4):
        store = img.mem(2 * MiB, "primary")
        with img.open(store) as disk:
            disk.set_read_parallelization(n)
            disk.set_write_parallelization(n)
            disk.write(pattern(9, 700 * KiB), 5000)
            disk.writev([pattern(10, 300 * KiB), pattern(11, 333)], 1 * MiB + 17)
            disk.write_zeroes(100 * KiB, 200 * KiB)
            disk.discard_to_zero(400 * KiB, 64 * KiB)
            content = disk.read(0, 2 * MiB)
            parts = [bytearray(300 * KiB) for _ in range(3)]
            disk.readv(parts, 3)
            assert b"".join(parts) == content[3 : 3 + 900 * KiB], f"readv with n={n}"
        results.append((content, store.snapshot()))
    assert results[0][0] == results[1][0], "parallel requests read different data"
    assert results[0][1] == results[1][1], "parallel requests left different image bytes"


class _AlignedStorage(MemoryStorage):
    """A MemoryStorage that asks for 4 KiB request and 512 B memory alignment."""

    @property
    def req_align(self) -> int:
        return 4096

    @property
    def mem_align(self) -> int:
        return 512


@pytest.mark.needs("qcow2", "backing")
@pytest.mark.clause("access.alignment.chain-max")
def test_alignments_are_the_maximum_over_the_chain(img: ImageKit) -> None:
    plain = img.new(64 * KiB)
    with plain:
        assert plain.req_align >= 1 and plain.mem_align >= 1
    base_store = _AlignedStorage(name="aligned-base")
    img.create(base_store, 64 * KiB, "raw")
    base = img.open(base_store, writable=False)
    top = img.open(img.mem(64 * KiB, "qcow2", backing_file="b", backing_fmt="raw"), backing=base)
    with top, base:
        assert top.req_align >= 4096, f"req_align {top.req_align} ignores the backing's 4096"
        assert top.mem_align >= 512, f"mem_align {top.mem_align} ignores the backing's 512"
        top.write(b"q" * 3, 4097)  # unaligned requests still work
        assert top.read(4096, 5) == b"\0qqq\0"


def _walk(disk: Access, shallow: bool) -> list[tuple[object, int, int]]:
    out: list[tuple[object, int, int]] = []
    pos = 0
    get = disk.get_shallow_mapping if shallow else disk.get_mapping
    while True:
        mapping, length = get(pos, disk.size - pos + 4096)
        if isinstance(mapping, EofMapping):
            assert length == 0, f"EOF with length {length}"
            assert pos >= disk.size, f"EOF at {pos:#x} before the disk end {disk.size:#x}"
            return out
        assert length > 0, f"{mapping} at {pos:#x} with length {length}: not EOF, no progress"
        out.append((mapping, pos, length))
        pos += length


@pytest.mark.clause("access.mapping.tiling")
def test_mappings_tile_the_disk(img: ImageKit) -> None:
    with img.new(512 * KiB) as disk:
        disk.write(pattern(12, 100 * KiB), 10 * KiB)
        disk.write_zeroes(200 * KiB, 64 * KiB)
        disk.write(pattern(13, 3), 400 * KiB - 1)
        content = disk.read(0, disk.size)
        for shallow in (False, True):
            pieces = _walk(disk, shallow)
            assert sum(length for _, _, length in pieces) == disk.size, "the lengths do not tile"
            for mapping, pos, length in pieces:
                if isinstance(mapping, RawMapping):
                    assert mapping.storage.read(mapping.offset, length) == content[
                        pos : pos + length
                    ], f"{mapping} at {pos:#x} holds different data than read()"
                elif isinstance(mapping, ZeroMapping):
                    assert content[pos : pos + length] == bytes(length), (
                        f"zero mapping at {pos:#x} reads non-zero"
                    )
        mapping, length = disk.get_mapping(5, 10)
        assert 0 < length <= 10, f"get_mapping(5, 10) returned length {length}"


class _EmptyMappingDriver:
    """A driver that breaks the protocol: a zero-length mapping that is not EOF."""

    size = 1 * MiB
    writable = True
    zero_granularity = None

    def storage_dependencies(self) -> list[object]:
        return []

    def get_mapping(self, offset: int, max_length: int) -> tuple[object, int]:
        return ZeroMapping(explicit=False), 0

    def ensure_data_mapping(self, offset: int, length: int, overwrite: bool) -> tuple[
        object, int, int
    ]:
        return MemoryStorage(), 0, 0

    def __getattr__(self, name: str) -> Any:
        raise UnsupportedError(f"fake driver has no {name}")


@pytest.mark.needs("format_access")
@pytest.mark.clause("access.driver.protocol")
def test_protocol_breaking_driver_raises_driver_error(impl: Impl) -> None:
    assert impl.format_access is not None
    try:
        disk = impl.format_access(_EmptyMappingDriver())
    except (TypeError, ValueError) as exc:
        not_applicable(f"{impl.name}'s FormatAccess does not wrap foreign drivers ({exc})")
    expect_error(DriverError, "read over an empty non-EOF mapping", lambda: disk.read(0, 512))
    expect_error(DriverError, "get_mapping over an empty non-EOF mapping",
                 lambda: disk.get_mapping(0, 512))
    expect_error(DriverError, "write with a zero-length data mapping",
                 lambda: disk.write(b"x" * 512, 0))


@pytest.mark.needs("qcow2", "backing")
@pytest.mark.clause("access.mapping.shallow-indirect", "access.mapping.writable-gate")
def test_shallow_mappings_stop_at_the_top_layer(img: ImageKit) -> None:
    top, base, _ = img.chain([(0, pattern(14, 64 * KiB))], base_fmt="raw")
    with top, base:
        top.write(b"t" * 4096, 8 * KiB)
        mapping, length = top.get_shallow_mapping(0, 8 * KiB)
        assert isinstance(mapping, IndirectMapping), f"backing data maps shallowly as {mapping}"
        assert 0 < length <= 8 * KiB
        resolved, _ = top.get_mapping(0, 8 * KiB)
        assert isinstance(resolved, RawMapping), f"get_mapping resolves to {resolved}"
        assert not resolved.writable, "backing data reached through the chain is writable"
        own, _ = top.get_mapping(8 * KiB, 4 * KiB)
        assert isinstance(own, RawMapping) and own.writable, f"top data maps as {own}"
    ro = img.open(img.mem(64 * KiB, "primary"), writable=False)
    with ro:
        m, _ = ro.get_mapping(0, 4096)
        assert not (isinstance(m, RawMapping) and m.writable), "read-only image maps writable"


@pytest.mark.needs("qcow2", "backing")
@pytest.mark.clause("access.mapping.explicit-top-only", "qcow2.zero.flag")
def test_explicit_zeroes_come_only_from_the_top_layer(img: ImageKit) -> None:
    base_store = img.mem(64 * KiB, "qcow2", cluster_size=4 * KiB)
    with img.open(base_store) as b:
        b.write(pattern(15, 64 * KiB), 0)
        b.write_zeroes(0, 16 * KiB)  # v3: zero clusters in the backing
        m, _ = b.get_mapping(0, 4 * KiB)
        assert isinstance(m, ZeroMapping) and m.explicit, f"own zero cluster maps as {m}"
    base = img.open(base_store, writable=False)
    top = img.open(img.mem(64 * KiB, "qcow2", cluster_size=4 * KiB, backing_file="b",
                           backing_fmt="qcow2"), backing=base)
    with top, base:
        top.write_zeroes(32 * KiB, 8 * KiB)
        m, _ = top.get_mapping(0, 16 * KiB)
        assert isinstance(m, ZeroMapping), f"the backing's zero cluster maps as {m}"
        assert not m.explicit, "a backing layer's zero is reported as explicit"
        m2, _ = top.get_mapping(32 * KiB, 8 * KiB)
        assert isinstance(m2, ZeroMapping) and m2.explicit, f"top zero cluster maps as {m2}"
        assert top.read(0, 16 * KiB) == bytes(16 * KiB)


@pytest.mark.needs("qcow2", "backing")
@pytest.mark.clause("access.mapping.eof-top-only", "backing.shorter")
def test_eof_only_at_the_top_layers_end(img: ImageKit) -> None:
    top, base, _ = img.chain([(0, pattern(16, 16 * KiB))], base_size=16 * KiB, size=64 * KiB,
                             base_fmt="raw")
    with top, base:
        m, length = top.get_mapping(16 * KiB, 32 * KiB)
        assert isinstance(m, ZeroMapping) and not m.explicit, (
            f"past the backing's end get_mapping returns {m}, not ZeroMapping(explicit=False)"
        )
        assert length > 0
        assert top.read(16 * KiB, 48 * KiB) == bytes(48 * KiB), "past the backing end reads data"
        eof, n = top.get_mapping(64 * KiB, 4096)
        assert isinstance(eof, EofMapping) and n == 0, f"at the top's end: {eof}, {n}"


@pytest.mark.needs("qcow2")
@pytest.mark.clause("access.write-zeroes.no-free", "qcow2.zero.preallocated")
def test_write_zeroes_keeps_host_clusters(img: ImageKit) -> None:
    store = img.mem(64 * KiB, "qcow2", cluster_size=4 * KiB)
    with img.open(store) as disk:
        disk.write(pattern(17, 64 * KiB), 0)
    before = img.bytes_of(store)
    hosts = [before.host_offset(g) for g in range(0, 64 * KiB, 4 * KiB)]
    with img.open(store) as disk:
        disk.write_zeroes(8 * KiB, 16 * KiB)
        assert disk.read(8 * KiB, 16 * KiB) == bytes(16 * KiB)
    after = img.bytes_of(store)
    for g in range(8 * KiB, 24 * KiB, 4 * KiB):
        entry = after.l2_entry(g)
        host = hosts[g // (4 * KiB)]
        assert entry & 1, f"v3 write_zeroes: L2 entry {entry:#x} of {g:#x} lacks the zero flag"
        assert after.host_offset(g) == host, (
            f"write_zeroes freed or moved the host cluster of {g:#x} ({host:#x} -> "
            f"{after.host_offset(g):#x})"
        )
        assert after.refcount(host // 4096) == 1, f"host cluster {host:#x} lost its refcount"
    assert not after.errors(), after.errors()


@pytest.mark.needs("qcow2", "backing")
@pytest.mark.clause("access.write-zeroes.soft", "qcow2.zero.v2-none")
@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_write_zeroes_falls_back_to_writing_zeroes(img: ImageKit, compat: str) -> None:
    base_data = pattern(18, 64 * KiB)
    top, base, store = img.chain([(0, base_data)], cluster_size=4 * KiB, compat=compat)
    with top, base:
        top.write_zeroes(1000, 10 * KiB)  # unaligned head and tail over backing data
        top.discard_to_zero(30 * KiB + 1, 5 * KiB)
        expected = bytearray(base_data)
        expected[1000 : 1000 + 10 * KiB] = bytes(10 * KiB)
        expected[30 * KiB + 1 : 35 * KiB + 1] = bytes(5 * KiB)
        assert top.read(0, 64 * KiB) == bytes(expected), "zeroing left backing data visible"
    if compat == "0.10":
        image = img.bytes_of(store)
        for g in range(0, 64 * KiB, 4 * KiB):
            assert not image.l2_entry(g) & 1, f"v2 image: zero flag set for {g:#x}"


@pytest.mark.needs("qcow2", "backing")
@pytest.mark.clause("access.discard-to-zero.reads-zero")
def test_discard_to_zero_reads_zero_never_backing(img: ImageKit) -> None:
    base_data = pattern(19, 64 * KiB)
    top, base, _ = img.chain([(0, base_data)], cluster_size=4 * KiB)
    with top, base:
        top.write(pattern(20, 64 * KiB), 0)
        top.discard_to_zero(4 * KiB, 20 * KiB + 7)
        got = top.read(0, 64 * KiB)
        assert got[4 * KiB : 24 * KiB + 7] == bytes(20 * KiB + 7), "discarded range not zero"
        assert got[: 4 * KiB] == pattern(20, 64 * KiB)[: 4 * KiB], "data before the range lost"
        assert got[24 * KiB + 7 :] == pattern(20, 64 * KiB)[24 * KiB + 7 :], "data after lost"


@pytest.mark.needs("qcow2")
@pytest.mark.clause("access.discard-to-zero.frees")
@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_discard_to_zero_frees_whole_clusters(img: ImageKit, compat: str) -> None:
    store = img.mem(64 * KiB, "qcow2", cluster_size=4 * KiB, compat=compat)
    with img.open(store) as disk:
        disk.write(pattern(21, 64 * KiB), 0)
    hosts = {g: img.bytes_of(store).host_offset(g) for g in range(0, 64 * KiB, 4 * KiB)}
    with img.open(store) as disk:
        disk.discard_to_zero(8 * KiB - 100, 16 * KiB + 200)
        assert disk.read(8 * KiB - 100, 16 * KiB + 200) == bytes(16 * KiB + 200)
    after = img.bytes_of(store)
    for g in range(8 * KiB, 24 * KiB, 4 * KiB):
        assert after.host_offset(g) == 0, f"whole cluster {g:#x} still holds a host cluster"
        assert after.refcount(hosts[g] // 4096) == 0, f"host cluster {hosts[g]:#x} not freed"
        if compat == "0.10":
            assert after.l2_entry(g) == 0, f"v2: cluster {g:#x} not unallocated"
    assert after.host_offset(4 * KiB) == hosts[4 * KiB], "the partial head cluster was freed"
    assert not after.problems(), after.problems()


@pytest.mark.needs("discard")
@pytest.mark.clause("access.discard-to-any.unspecified")
def test_discard_to_any_keeps_the_rest(img: ImageKit) -> None:
    store = img.mem(256 * KiB, "primary")
    data = pattern(22, 256 * KiB)
    with img.open(store) as disk:
        disk.write(data, 0)
        disk.discard_to_any(10 * KiB + 5, 100 * KiB)
        assert disk.size == 256 * KiB, "discard_to_any changed the size"
        got = disk.read(0, 256 * KiB)
        assert got[: 10 * KiB + 5] == data[: 10 * KiB + 5], "data before the range changed"
        assert got[110 * KiB + 5 :] == data[110 * KiB + 5 :], "data after the range changed"
    if img.impl.capabilities.qcow2 and img.primary == "qcow2":
        assert not img.bytes_of(store).errors(), img.bytes_of(store).errors()


@pytest.mark.needs("qcow2", "backing")
@pytest.mark.clause("access.discard-to-backing.visible", "access.discard-to-backing.partial-kept",
                    "qcow2.l2.unallocated-backing")
def test_discard_to_backing_shows_the_backing(img: ImageKit) -> None:
    base_data = pattern(23, 64 * KiB)
    top, base, _ = img.chain([(0, base_data)], cluster_size=4 * KiB)
    own = pattern(24, 64 * KiB)
    with top, base:
        top.write(own, 0)
        top.discard_to_backing(4 * KiB + 100, 12 * KiB)  # whole clusters 2 and 3 only
        got = top.read(0, 64 * KiB)
        assert got[8 * KiB : 16 * KiB] == base_data[8 * KiB : 16 * KiB], (
            "whole clusters inside the range do not read the backing"
        )
        assert got[4 * KiB : 8 * KiB] == own[4 * KiB : 8 * KiB], "the partial head was changed"
        assert got[16 * KiB : 20 * KiB] == own[16 * KiB : 20 * KiB], "the partial tail changed"
        m, _ = top.get_shallow_mapping(8 * KiB, 8 * KiB)
        assert isinstance(m, IndirectMapping), f"discarded clusters map shallowly as {m}"


@pytest.mark.needs("qcow2")
@pytest.mark.clause("access.discard-to-backing.visible")
def test_discard_to_backing_without_backing_reads_zero(img: ImageKit) -> None:
    with img.new(64 * KiB, "qcow2", cluster_size=4 * KiB) as disk:
        disk.write(pattern(25, 64 * KiB), 0)
        disk.discard_to_backing(16 * KiB, 16 * KiB)
        assert disk.read(16 * KiB, 16 * KiB) == bytes(16 * KiB)
        m, _ = disk.get_shallow_mapping(16 * KiB, 16 * KiB)
        assert isinstance(m, ZeroMapping) and not m.explicit, f"unallocated without backing: {m}"


@pytest.mark.needs("qcow2")
@pytest.mark.clause("access.unsupported")
def test_unsupported_options_raise_unsupported_error(img: ImageKit) -> None:
    for option, value in [("encryption", True)]:
        store = MemoryStorage()
        options = {option: value}
        error = expect_error(UnsupportedError, f"create with {option}={value}",
                             functools.partial(img.create, store, 64 * KiB, "qcow2", **options))
        assert isinstance(error, OSError), "UnsupportedError is not io.UnsupportedOperation"
        assert store.size() == 0, f"{option}: the refused create wrote {store.size()} bytes"


# -- flush, sync, caches, close ------------------------------------------------------------------


@pytest.mark.clause("access.flush.no-sync")
def test_flush_writes_back_without_fsync(img: ImageKit, monkeypatch: pytest.MonkeyPatch) -> None:
    path = img.file("flush.img", 1 * MiB, "primary")
    disk = img.open(path)
    try:
        disk.write(pattern(26, 300 * KiB), 100 * KiB)
        calls = fsync_counter(monkeypatch)
        disk.flush()
        assert not calls, f"flush called {calls}"
        monkeypatch.undo()
        # A second open while the first holds the image writable must share (qemu-img -U).
        with img.open(path, writable=False, force_share=True) as other:
            assert other.read(100 * KiB, 300 * KiB) == pattern(26, 300 * KiB), (
                "a fresh open after flush does not see the data"
            )
    finally:
        disk.close()


@pytest.mark.clause("access.sync.no-flush")
def test_sync_fsyncs(img: ImageKit, monkeypatch: pytest.MonkeyPatch) -> None:
    path = img.file("sync.img", 1 * MiB, "primary")
    with img.open(path) as disk:
        disk.write(pattern(27, 64 * KiB), 0)
        disk.flush()
        calls = fsync_counter(monkeypatch)
        disk.sync()
        assert calls, "sync of a file-backed image called neither fsync nor fdatasync"
        monkeypatch.undo()
        assert disk.read(0, 64 * KiB) == pattern(27, 64 * KiB)


@pytest.mark.needs("qcow2")
@pytest.mark.clause("access.invalidate-cache")
def test_invalidate_cache_reloads_from_storage(img: ImageKit) -> None:
    store = img.mem(1 * MiB, "qcow2", cluster_size=4 * KiB)
    with img.open(store) as disk:
        disk.write(pattern(28, 4 * KiB), 0)
        disk.flush()
        assert disk.read(512 * KiB, 4 * KiB) == bytes(4 * KiB)
        # Another writer changes the image behind this one's back.
        with img.open(store) as other:
            other.write(pattern(29, 8 * KiB), 512 * KiB)
        disk.invalidate_cache()
        assert disk.read(512 * KiB, 8 * KiB) == pattern(29, 8 * KiB), (
            "after invalidate_cache the image still shows its cached (stale) tables"
        )


@pytest.mark.clause("access.close.flushes", "storage.memory.survives-reopen")
def test_close_flushes(img: ImageKit) -> None:
    store = img.mem(1 * MiB, "primary")
    disk = img.open(store)
    disk.write(pattern(30, 200 * KiB), 300 * KiB)
    disk.close()
    with img.open(store) as again:
        assert again.read(300 * KiB, 200 * KiB) == pattern(30, 200 * KiB), "close lost data"
        again.write(b"w" * 1000, 0)
    with img.open(store, writable=False) as third:
        assert third.read(0, 1000) == b"w" * 1000, "leaving the with block lost data"
    path = img.file("close.img", 1 * MiB, "primary")
    with img.open(path) as f:
        f.write(b"f" * 5000, 12345)
    with img.open(path, writable=False) as f:
        assert f.read(12345, 5000) == b"f" * 5000, "close of a file image lost data"


# -- resize --------------------------------------------------------------------------------------


@pytest.mark.needs("resize")
@pytest.mark.clause("access.resize.no-op")
def test_resize_to_the_same_size_does_nothing(img: ImageKit) -> None:
    store = img.mem(256 * KiB, "primary")
    with img.open(store) as disk:
        disk.write(pattern(31, 256 * KiB), 0)
        disk.flush()
        before = store.snapshot()
        disk.resize(256 * KiB)
        disk.resize_grow(128 * KiB, PreallocateMode.NONE)
        disk.resize_shrink(512 * KiB)
        disk.flush()
        assert disk.size == 256 * KiB, f"size became {disk.size}"
        assert store.snapshot() == before, "a no-op resize changed the image"


@pytest.mark.needs("resize")
@pytest.mark.clause("access.resize.shrink-discards")
def test_shrink_discards_the_tail(img: ImageKit) -> None:
    store = img.mem(256 * KiB, "primary")
    with img.open(store) as disk:
        disk.write(pattern(32, 256 * KiB), 0)
        disk.resize(64 * KiB, PreallocateMode.WRITE_DATA)  # shrinking ignores the mode
        assert disk.size == 64 * KiB
        assert disk.read(0, 64 * KiB) == pattern(32, 64 * KiB), "the kept part changed"
        assert disk.read(64 * KiB, 4096) == bytes(4096), "past the new end reads data"
        disk.resize(256 * KiB, PreallocateMode.ZERO)
        assert disk.read(64 * KiB, 192 * KiB) == bytes(192 * KiB), (
            "the old tail reappeared after shrinking and growing again"
        )
    if img.primary == "qcow2":
        assert not img.bytes_of(store).problems(), img.bytes_of(store).problems()


@pytest.mark.needs("resize")
@pytest.mark.clause("access.resize.grow-none")
def test_grow_none_keeps_the_old_range(img: ImageKit) -> None:
    with img.new(64 * KiB) as disk:
        disk.write(pattern(33, 64 * KiB), 0)
        disk.resize_grow(192 * KiB, PreallocateMode.NONE)
        assert disk.size == 192 * KiB, f"size is {disk.size}"
        assert disk.read(0, 64 * KiB) == pattern(33, 64 * KiB), "the old range changed"
        assert len(disk.read(64 * KiB, 128 * KiB)) == 128 * KiB


_ZEROING = [PreallocateMode.ZERO, PreallocateMode.FORMAT_ALLOCATE, PreallocateMode.FULL_ALLOCATE,
            PreallocateMode.WRITE_DATA]
_GROW_CLAUSE = {
    PreallocateMode.ZERO: "access.resize.grow-zero",
    PreallocateMode.FORMAT_ALLOCATE: "access.resize.grow-format-allocate",
    PreallocateMode.FULL_ALLOCATE: "access.resize.grow-full-allocate",
    PreallocateMode.WRITE_DATA: "access.resize.grow-write-data",
}


@pytest.mark.needs("qcow2", "backing", "resize")
@pytest.mark.parametrize(
    "mode",
    [pytest.param(m, id=m.name.lower(), marks=pytest.mark.clause(_GROW_CLAUSE[m]))
     for m in _ZEROING],
)
def test_zeroing_grow_hides_a_longer_backing(img: ImageKit, mode: PreallocateMode) -> None:
    base_data = pattern(34, 256 * KiB)
    top, base, store = img.chain([(0, base_data)], base_size=256 * KiB, size=64 * KiB)
    with top, base:
        top.resize_grow(192 * KiB, mode)
        assert top.size == 192 * KiB
        assert top.read(0, 64 * KiB) == base_data[: 64 * KiB], "the old range changed"
        assert top.read(64 * KiB, 128 * KiB) == bytes(128 * KiB), (
            f"after a {mode.name} grow the new range shows the longer backing's data"
        )
        if mode is not PreallocateMode.ZERO:
            for g in range(64 * KiB, 192 * KiB, 4 * KiB):
                m, _ = top.get_shallow_mapping(g, 4 * KiB)
                assert isinstance(m, RawMapping), (
                    f"{mode.name}: new cluster {g:#x} maps as {m}, not as data in this layer"
                )
    image = img.bytes_of(store)
    assert not image.errors(), image.errors()
    if mode is not PreallocateMode.ZERO:
        assert all(image.host_offset(g) for g in range(64 * KiB, 192 * KiB, 4 * KiB)), (
            "a new cluster has no host cluster"
        )


@pytest.mark.needs("qcow2", "resize")
@pytest.mark.clause("access.resize.grow-full-allocate", "access.resize.grow-write-data")
@pytest.mark.parametrize("mode", [PreallocateMode.FULL_ALLOCATE, PreallocateMode.WRITE_DATA],
                         ids=["full_allocate", "write_data"])
def test_allocating_grow_allocates_file_space(img: ImageKit, mode: PreallocateMode) -> None:
    path = img.file("grow.qcow2", 64 * KiB, "qcow2", cluster_size=4 * KiB)
    with img.open(path) as disk:
        disk.resize_grow(1 * MiB, mode)
        assert disk.read(0, 1 * MiB) == bytes(1 * MiB)
    image = file_bytes(path)
    last = max(image.host_offset(g) for g in range(0, 1 * MiB, 4 * KiB))
    assert path.stat().st_size >= last + 4 * KiB, (
        f"{mode.name}: the file ({path.stat().st_size} bytes) ends before the last new "
        f"cluster at {last:#x}"
    )
    assert path.stat().st_blocks * 512 >= 1 * MiB - 64 * KiB, (
        f"{mode.name}: only {path.stat().st_blocks * 512} bytes of storage are allocated"
    )


@pytest.mark.clause("access.display")
def test_str_describes_the_image(img: ImageKit) -> None:
    path = img.file("named-image.img", 64 * KiB, "primary")
    with img.open(path) as disk:
        text = str(disk)
        assert text and "object at 0x" not in text, f"str() is {text!r}"
        assert "named-image" in text or (img.primary or "") in text, (
            f"str() names neither the storage nor the format: {text!r}"
        )
