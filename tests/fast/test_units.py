"""Unit tests of pyimago.fast's pure helpers, storage, caches and allocation."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyimago import fast
from pyimago.fast import (
    CorruptImageError,
    InvalidRequestError,
    MemoryStorage,
    PyimagoError,
    RawMapping,
    ReadOnlyError,
    UnsupportedFeatureError,
    ZeroMapping,
)
from pyimago.fast._codec import (
    clear_top_bit,
    decode_refblock,
    decode_u64_table,
    encode_refblock,
    encode_u64_table,
    refblock_typecode,
)
from pyimago.fast._header import (
    EXT_BACKING_FORMAT,
    Extension,
    check_features,
    decode_extensions,
    encode_extensions,
    parse_header,
)
from pyimago.fast._inflate import inflate_cluster
from pyimago.fast._storage import FastFileStorage

KiB = 1024
MiB = 1024 * KiB


def _image(size: int = 4 * MiB, **opts: object) -> MemoryStorage:
    store = MemoryStorage()
    fast.create_image(store, size, **opts)
    return store


# -- codecs ----------------------------------------------------------------------------------


@pytest.mark.clause("qcow2.header.refcount-order")
@settings(max_examples=60, deadline=None)
@given(order=st.integers(0, 6), raw=st.binary(min_size=512, max_size=512))
def test_refblock_codec_round_trips(order: int, raw: bytes) -> None:
    bits = 1 << order
    values = decode_refblock(raw, bits)
    assert len(values) == 512 * 8 // bits
    assert encode_refblock(values, bits) == raw
    # Entry i, the slow way: sub-byte entries LSB-first within a byte; wider ones big-endian.
    for i in (0, 1, len(values) // 3, len(values) - 1):
        if bits < 8:
            per = 8 // bits
            want = raw[i // per] >> (i % per * bits) & ((1 << bits) - 1)
        else:
            w = bits // 8
            want = int.from_bytes(raw[i * w : (i + 1) * w], "big")
        assert values[i] == want
    assert values.typecode == refblock_typecode(bits)


def test_u64_tables_are_big_endian() -> None:
    raw = struct.pack(">3Q", 1, 2**63, 0x0123456789ABCDEF)
    arr = decode_u64_table(raw)
    assert arr.tolist() == [1, 2**63, 0x0123456789ABCDEF]
    assert encode_u64_table(arr) == raw


@settings(max_examples=40, deadline=None)
@given(words=st.lists(st.integers(0, 2**64 - 1), max_size=40), step=st.sampled_from([1, 2]))
def test_clear_top_bit_clears_bit_63_of_every_step_th_entry(words: list[int], step: int) -> None:
    # COPIED (bit 63) of a whole L2 table at once; with extended L2 (step 2) only the
    # entry words, not the subcluster bitmaps between them.
    arr = decode_u64_table(struct.pack(f">{len(words)}Q", *words))
    want = [w & ~(1 << 63) if i % step == 0 else w for i, w in enumerate(words)]
    assert clear_top_bit(arr, step) is (want != words)
    assert arr.tolist() == want
    assert clear_top_bit(arr, step) is False


def test_extensions_round_trip_and_bounds() -> None:
    exts = [Extension(EXT_BACKING_FORMAT, b"raw"), Extension(0x12345678, b"x" * 9)]
    raw = encode_extensions(exts)
    assert decode_extensions(raw, 0, len(raw)) == exts
    bad = struct.pack(">II", 0x1234, 4000) + bytes(16)
    with pytest.raises(CorruptImageError, match="0x00001234"):
        decode_extensions(bad, 0, len(bad))


@pytest.mark.clause("qcow2.compressed.zlib")
def test_inflate_stops_at_a_cluster_and_refuses_short_streams() -> None:
    import zlib

    comp = zlib.compressobj(9, zlib.DEFLATED, -12)
    bomb = comp.compress(bytes(64 * MiB)) + comp.flush()
    # Decompression stops once a full cluster has been produced (QEMU does the same).
    assert inflate_cluster(bomb, 65536, 0) == bytes(65536)
    comp = zlib.compressobj(9, zlib.DEFLATED, -12)
    short = comp.compress(bytes(1000)) + comp.flush()
    with pytest.raises(CorruptImageError, match="holds 1000 bytes"):
        inflate_cluster(short, 65536, 0)
    with pytest.raises(CorruptImageError, match="damaged"):
        inflate_cluster(b"\xff" * 100, 65536, 0)


# -- headers ---------------------------------------------------------------------------------


def _header_bytes(**patch: tuple[int, str, int]) -> bytearray:
    head = bytearray(_image().snapshot()[:65536])
    for _name, (off, fmt, value) in patch.items():
        struct.pack_into(fmt, head, off, value)
    return head


@pytest.mark.clause(
    "qcow2.header.magic",
    "qcow2.header.version",
    "qcow2.header.cluster-bits",
    "qcow2.features.encryption",
    "qcow2.features.incompatible-unknown",
    "qcow2.features.extended-l2",
    "qcow2.features.external-data",
    "qcow2.header.l1-size",
)
@pytest.mark.parametrize(
    ("patch", "error", "match"),
    [
        ({"magic": (0, ">I", 0x12345678)}, CorruptImageError, "magic"),
        ({"version": (4, ">I", 4)}, UnsupportedFeatureError, "version 4"),
        ({"cluster_bits": (20, ">I", 30)}, CorruptImageError, "cluster_bits 30"),
        ({"crypt": (32, ">I", 1)}, UnsupportedFeatureError, "encryption"),
        ({"incompat": (72, ">Q", 1 << 40)}, UnsupportedFeatureError, "40"),
        ({"l1": (36, ">I", 0)}, CorruptImageError, "l1_size 0"),
        ({"rtc": (56, ">I", 1 << 30)}, CorruptImageError, "refcount_table_clusters"),
        ({"order": (96, ">I", 7)}, CorruptImageError, "refcount_order 7"),
        ({"hlen": (100, ">I", 99)}, CorruptImageError, "header_length 99"),
    ],
)
def test_bad_headers_name_the_value(
    patch: dict[str, tuple[int, str, int]], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        check_features(parse_header(bytes(_header_bytes(**patch))), {}, writable=False)


@pytest.mark.clause("qcow2.header.big-endian", "qcow2.header.additional-fields")
def test_header_pack_round_trips() -> None:
    hdr = parse_header(_image().snapshot()[:65536], 1 << 30)
    assert hdr.version == 3 and hdr.cluster_size == 65536 and hdr.header_length == 112
    assert parse_header(hdr.to_bytes().ljust(512, b"\0")) == hdr


@pytest.mark.clause("qcow2.features.dirty", "qcow2.features.corrupt")
def test_dirty_and_corrupt_images_open_read_only_only() -> None:
    for bit, name in ((1, "dirty"), (2, "corrupt")):
        store = _image()
        raw = bytearray(store.snapshot())
        struct.pack_into(">Q", raw, 72, bit)
        fast.open_image(MemoryStorage(raw), backing=None).close()
        if name == "corrupt":
            with pytest.raises(UnsupportedFeatureError, match=name):
                fast.open_image(MemoryStorage(raw), writable=True, backing=None)
        else:
            # A dirty image is repaired by a writable open (tests/fast/test_dirty_write.py).
            store = MemoryStorage(raw)
            fast.open_image(store, writable=True, backing=None).close()
            assert not struct.unpack_from(">Q", store.snapshot(), 72)[0] & 1


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    cluster_size=st.sampled_from([512, 4096]),
)
def test_hostile_metadata_only_raises_pyimago_errors(
    data: st.DataObject, cluster_size: int
) -> None:
    """Random corruption of the header, L1, refcount and L2 clusters: opening, reading,
    mapping and writing either work or raise PyimagoError: never struct.error, IndexError,
    a hang or a huge allocation."""
    store = _image(64 * cluster_size, cluster_size=cluster_size)
    with fast.open_image(store, writable=True) as img:
        img.write(b"\x5a" * (5 * cluster_size), cluster_size // 2)
    raw = bytearray(store.snapshot())
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, min(len(raw), 6 * cluster_size) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    try:
        img = fast.open_image(MemoryStorage(raw), writable=True, backing=None)
    except PyimagoError:
        return
    with img:
        for op in range(4):
            try:
                if op == 0:
                    img.read(0, img.size)
                elif op == 1:
                    img.get_mapping(0, img.size)
                elif op == 2:
                    img.write(b"\x11" * 3000, min(img.size - 3000, cluster_size * 3))
                else:
                    img.discard_to_zero(0, img.size)
            except PyimagoError:
                pass
            except ValueError as exc:  # InvalidRequestError is a ValueError too
                raise AssertionError(f"non-pyimago ValueError {exc!r}") from exc


# -- storage ---------------------------------------------------------------------------------


@pytest.mark.clause("storage.read.past-eof-zero", "storage.write.extends")
@pytest.mark.parametrize("use_mmap", [True, False])
def test_file_storage_map_and_pread_paths_agree(tmp_path: Path, use_mmap: bool) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"a" * 5000)
    st_ = FastFileStorage(path, writable=True, use_mmap=use_mmap)
    try:
        assert st_.read(4990, 20) == b"a" * 10 + bytes(10)
        st_.write(b"b" * 100, 6000)  # past the map: read back through pread
        assert st_.read(5990, 120) == bytes(10) + b"b" * 100 + bytes(10)
        st_.resize(100)  # the map is dropped before the file shrinks (no SIGBUS)
        assert st_.read(0, 200) == b"a" * 100 + bytes(100)
        st_.write_zeroes(50, 100)
        assert st_.size() == 150 and st_.read(40, 20) == b"a" * 10 + bytes(10)
    finally:
        st_.close()


# -- mappings, allocation, caches ------------------------------------------------------------


@pytest.mark.clause("access.mapping.tiling")
def test_runs_are_coalesced_and_allocation_is_contiguous() -> None:
    store = _image(64 * MiB)
    with fast.open_image(store, writable=True) as img:
        img.write(os.urandom(8 * MiB), 1 * MiB)
        m, n = img.get_mapping(1 * MiB, 64 * MiB)
        assert isinstance(m, RawMapping) and m.writable and n == 8 * MiB
        m, n = img.get_mapping(9 * MiB, 64 * MiB)
        assert m == ZeroMapping(False) and n == 55 * MiB
        m, n = img.get_mapping(0, 64 * MiB)
        assert m == ZeroMapping(False) and n == 1 * MiB


@pytest.mark.clause("access.write-zeroes.no-free", "access.discard-to-zero.frees")
def test_zeroing_keeps_and_discarding_frees_host_clusters() -> None:
    store = _image(4 * MiB)
    with fast.open_image(store, writable=True) as img:
        img.write(b"x" * MiB, 0)
        layer = img.driver
        host = img.get_mapping(0, 1)[0].offset  # type: ignore[union-attr]
        img.write_zeroes(0, MiB)
        assert img.get_mapping(0, MiB) == (ZeroMapping(True), MiB)
        assert layer.refs.count(host >> 16) == 1
        img.discard_to_zero(0, MiB)
        # crash.order.unref-after-entry: freed once the table no longer holds it on storage.
        assert layer.refs.count(host >> 16) == 1
        img.flush()
        assert layer.refs.count(host >> 16) == 0
        assert img.read(0, MiB) == bytes(MiB)


def test_refcount_block_offsets_are_kept_as_blocks_come() -> None:
    """block_offsets() is kept up to date as blocks are added and the table grows and
    moves (issue 16: it used to be derived from the whole table each time), and the
    overlap checks still see every block."""
    store = _image(8 * MiB, cluster_size=512, refcount_bits=64)
    with fast.open_image(store, writable=True) as img:
        layer = img.driver
        refs = layer.refs
        table_at = refs.span.at
        # 64-bit refcounts, 512-byte clusters: 64 clusters per block; the 4 MiB written
        # here needs ~130 blocks, which outgrow the one-cluster table and move it.
        for off in range(0, 4 * MiB, 64 * KiB):
            img.write(os.urandom(64 * KiB), off)
        derived = {e & 0x00FFFFFFFFFFFE00 for e in refs.table} - {0}
        assert refs.span.at != table_at and len(derived) > 100
        assert set(refs.block_offsets()) == derived
        meta = layer._metadata()
        assert all(meta.what(ofs >> 9) == "refcount block" for ofs in derived)
        img.flush()
        img.invalidate_cache()
        assert set(refs.block_offsets()) == derived
    result = fast.check(store)
    assert result.clean and not result.leaks, result


def test_metadata_cache_stays_within_its_budget() -> None:
    # 512-byte clusters: each L2 table covers 32 KiB, so 8 MiB of data touches 256 tables.
    store = _image(8 * MiB, cluster_size=512)
    with fast.open_image(store, writable=True) as img:
        for off in range(0, 8 * MiB, 32 * KiB):
            img.write(b"d" * 512, off)
    with fast.open_image(store, cache_bytes=16 * KiB) as img:
        layer = img.driver
        for off in range(0, 8 * MiB, 32 * KiB):
            assert img.read(off, 512) == b"d" * 512
        assert len(layer._l2) * 512 <= 16 * KiB
        assert len(layer.refs.blocks) <= 16


@pytest.mark.clause("access.parallel.same-result")
def test_parallel_requests_equal_serial_ones() -> None:
    store = _image(16 * MiB)
    data = os.urandom(16 * MiB)
    with fast.open_image(store, writable=True) as img:
        img.set_write_parallelization(4)
        img.write(data, 0)
        img.set_read_parallelization(3)
        assert img.read(0, 16 * MiB) == data
        img.set_read_parallelization(1)
        assert img.read(0, 16 * MiB) == data


@pytest.mark.clause(
    "access.range.overflow",
    "access.write.past-end",
    "access.write.read-only",
    "access.read.past-end-zero",
)
def test_request_validation() -> None:
    store = _image(1 * MiB)
    with fast.open_image(store, writable=True) as img:
        for bad in (-1, True, 1.0, "1"):
            with pytest.raises(InvalidRequestError):
                img.read(bad, 1)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError):
            img.read(2**64 - 1, 2)
        with pytest.raises(InvalidRequestError):
            img.write(b"x" * 2, MiB - 1)
        assert img.read(MiB - 1, 3) == bytes(3)
    with fast.open_image(store) as img, pytest.raises(ReadOnlyError):
        img.write(b"x", 0)


@pytest.mark.qemu
def test_a_crash_leaves_at_most_leaks(tmp_path: Path) -> None:
    """Write-back order: with a cache so small that it evicts all the time, a copy of the
    file taken at any moment (no flush: a crash) has no refcount *errors*, only leaks."""
    if shutil.which("qemu-img") is None:
        pytest.skip("QEMU INTEROP NOT TESTED: qemu-img missing")
    path = tmp_path / "c.qcow2"
    fast.create_image(path, 8 * MiB, cluster_size=512, refcount_bits=4)
    img = fast.open_image(path, writable=True, cache_bytes=4 * KiB)
    for i in range(40):
        off = (i * 7919 * 512) % (8 * MiB - 4096)
        img.write(os.urandom(3000), off)
        if i % 7 == 3:
            img.discard_to_zero(off, 2048)
        if i % 10 == 9:
            snap = tmp_path / f"snap{i}.qcow2"
            shutil.copyfile(path, snap)
            proc = subprocess.run(
                ["qemu-img", "check", str(snap)], capture_output=True, text=True, check=False
            )
            # Exit 0: clean; 3: leaks only.  Anything else is corruption.
            assert proc.returncode in (0, 3), proc.stdout + proc.stderr
    img.close()


@pytest.mark.clause("backing.resolve-relative", "backing.format-extension")
def test_file_chain_reads_alike_with_and_without_mmap(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(MiB + 512))
    top = tmp_path / "top.qcow2"
    fast.create_image(top, 2 * MiB, backing_file="base.raw", backing_fmt="raw")
    with fast.open_image(top, writable=True) as img:
        img.write(b"t" * 70000, 500_000)
    outs = []
    for use_mmap in (True, False):
        with fast.open_image(top, use_mmap=use_mmap) as img:
            outs.append(img.read(0, img.size))
    want = bytearray(base.read_bytes().ljust(2 * MiB, b"\0"))
    want[500_000:570_000] = b"t" * 70000
    assert outs[0] == outs[1] == bytes(want)


@pytest.mark.clause("access.mapping.special-compressed")
def test_inflate_backends_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """ISA-L (when installed) and zlib give the same clusters; zstd goes through zstandard."""
    import zlib

    import zstandard
    from pyimago.fast import _inflate

    cluster = bytes(range(256)) * 256
    comp = zlib.compressobj(6, zlib.DEFLATED, -12)
    raw = comp.compress(cluster) + comp.flush()
    got = inflate_cluster(raw + b"\0" * 300, len(cluster), 0)  # QEMU pads to 512-byte sectors
    monkeypatch.setattr(_inflate, "_whole", zlib.decompress)
    monkeypatch.setattr(_inflate, "_stream", zlib.decompressobj)
    assert inflate_cluster(raw, len(cluster), 0) == got == cluster
    frame = zstandard.ZstdCompressor().compress(cluster)
    assert inflate_cluster(frame + b"\0" * 100, len(cluster), 1) == cluster


@pytest.mark.clause("access.write-zeroes.soft", "access.discard-to-zero.frees")
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_partial_clusters_are_zeroed_as_the_reference_does(compat: str) -> None:
    """v2 without a backing image: whole unallocated clusters split the range into pieces,
    and a piece holding data is written whole (its unallocated partial clusters too); v3
    decides each partial cluster on its own."""
    from pyimago import reference

    def kinds(mod: object, ops: str) -> list[str]:
        store = MemoryStorage()
        mod.create_image(store, 8 * 4096, cluster_size=4096, compat=compat)  # type: ignore[attr-defined]
        with mod.open_image(store, writable=True, backing=None) as img:  # type: ignore[attr-defined]
            if ops == "head-unallocated":
                img.write(b"x" * 4096, 4096)
                img.write_zeroes(2048, 6144)
            elif ops == "tail-unallocated":
                img.write(b"x" * 100, 0)
                img.write_zeroes(2048, 4096)
            else:
                img.write(b"x" * 100, 0)
                img.discard_to_zero(2048, 4096)
            got = []
            for off in range(0, img.size, 4096):
                m, _ = img.get_mapping(off, 4096)
                got.append(type(m).__name__ + ("!" if getattr(m, "explicit", False) else ""))
            assert img.read(2048, 4096) == bytes(4096)
        return got

    for ops in ("head-unallocated", "tail-unallocated", "discard"):
        assert kinds(fast, ops) == kinds(reference, ops), ops


def _written(cluster_size: int = 512) -> bytearray:
    store = _image(64 * KiB, cluster_size=cluster_size)
    with fast.open_image(store, writable=True) as img:
        img.write(b"\x5a" * 1024, 0)
    return bytearray(store.snapshot())


def _l1_entry_pos(raw: bytearray) -> int:
    return int(struct.unpack_from(">Q", raw, 40)[0])


@pytest.mark.clause("qcow2.l2.reserved-bits", "qcow2.metadata.alignment")
@pytest.mark.parametrize(
    "patch",
    ["l2 bit 1", "l2 bit 57", "l2 unaligned", "l1 bit 60"],
)
def test_malformed_table_entries_are_corrupt_on_use(patch: str) -> None:
    raw = _written(cluster_size=4096)
    l1 = _l1_entry_pos(raw)
    (l2,) = struct.unpack_from(">Q", raw, l1)
    l2 &= 0x00FFFFFFFFFFFE00
    (entry,) = struct.unpack_from(">Q", raw, l2)
    if patch == "l1 bit 60":
        struct.pack_into(">Q", raw, l1, struct.unpack_from(">Q", raw, l1)[0] | 1 << 60)
    else:
        bad = {"l2 bit 1": entry | 2, "l2 bit 57": entry | 1 << 57, "l2 unaligned": entry + 512}
        struct.pack_into(">Q", raw, l2, bad[patch])
    with fast.open_image(MemoryStorage(raw), backing=None) as img:
        with pytest.raises(CorruptImageError):
            img.read(0, 512)
        with pytest.raises(CorruptImageError):
            img.get_mapping(0, 512)
        if patch != "l1 bit 60":
            # Only the malformed entry is refused, not the rest of its table.
            assert img.read(8192, 512) == bytes(512)


@pytest.mark.clause("qcow2.metadata.overlap", "qcow2.corrupt.overlap-check", "qcow2.corrupt.mark")
def test_data_cluster_on_metadata_is_never_written() -> None:
    raw = _written()
    l1 = _l1_entry_pos(raw)
    l2 = struct.unpack_from(">Q", raw, l1)[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">Q", raw, l2, (1 << 63) | l2)  # guest cluster 0 -> its own L2 table
    store = MemoryStorage(raw)
    with fast.open_image(store, writable=True, backing=None) as img:
        before = img.read(0, 1024)
        with pytest.raises(CorruptImageError, match=f"0x{l2:x} would overwrite the active L2"):
            img.write(b"\xa5" * 512, 0)
        # qcow2.corrupt.mark: later writes are refused, reads keep working.
        with pytest.raises(CorruptImageError, match="marked corrupt"):
            img.discard_to_zero(0, 512)
        assert img.read(0, 1024) == before
    # Nothing was written but the corrupt bit (incompatible bit 1).
    assert store.snapshot()[72:80] == (2).to_bytes(8, "big")
    assert store.snapshot()[:72] + store.snapshot()[80:] == bytes(raw[:72] + raw[80:])


@pytest.mark.clause("qcow2.extensions.feature-names", "errors.feature-named")
def test_refused_bits_are_named_from_the_feature_table() -> None:
    from pyimago.fast._header import EXT_FEATURE_TABLE, feature_names

    table = struct.pack(">BB46s", 0, 9, b"time travel")
    names = feature_names([Extension(EXT_FEATURE_TABLE, table)])
    hdr = parse_header(_image().snapshot()[:65536])
    odd = replace(hdr, features=replace(hdr.features, incompatible=1 << 9))
    with pytest.raises(UnsupportedFeatureError, match=r"incompatible bit 9 \(time travel\)"):
        check_features(odd, names, writable=False)


@pytest.mark.clause("create.preallocation")
def test_preallocation_with_a_backing_file_is_refused() -> None:
    for mode in ("metadata", "falloc", "full"):
        with pytest.raises(InvalidRequestError, match="backing"):
            fast.create_image(
                MemoryStorage(), MiB, backing_file="/b.raw", backing_fmt="raw", preallocation=mode
            )


def test_zlib_serves_when_isal_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``isal`` is missing, zlib inflates the same clusters."""
    import importlib
    import sys
    import zlib

    from pyimago.fast import _inflate

    cluster = bytes(range(256)) * 16
    comp = zlib.compressobj(6, zlib.DEFLATED, -12)
    raw = comp.compress(cluster) + comp.flush()
    monkeypatch.setitem(sys.modules, "isal", None)  # "import isal" now fails
    try:
        importlib.reload(_inflate)
        assert not _inflate.HAVE_ISAL
        assert _inflate.inflate_cluster(raw, len(cluster), 0) == cluster
    finally:
        monkeypatch.undo()
        importlib.reload(_inflate)


class _CountingStorage(MemoryStorage):
    """Counts the bytes ``write`` stores (write_zeroes past the end only extends)."""

    written = 0

    def write(self, data: object, offset: int) -> None:  # type: ignore[override]
        self.written += len(memoryview(data).cast("B"))  # type: ignore[arg-type]
        super().write(data, offset)  # type: ignore[arg-type]


@pytest.mark.clause("access.cow.partial-cluster")
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_small_writes_into_fresh_clusters_store_only_their_bytes(compat: str) -> None:
    """A cluster past the end of the file reads zero already: a 4 KiB write into a fresh
    64 KiB cluster stores 4 KiB of data, not 60 KiB of zeroes besides (issue 16), and the
    rest of the cluster reads zero; over a backing image the old content is still copied."""
    store = _CountingStorage()
    fast.create_image(store, 8 * MiB, compat=compat)
    with fast.open_image(store, writable=True) as img:
        before = store.written
        for k in range(8):
            img.write(b"d" * 4 * KiB, k * MiB + 12 * KiB + 100)
        assert store.written - before == 8 * 4 * KiB
        for k in range(8):
            got = img.read(k * MiB, 64 * KiB)
            assert got == bytes(12 * KiB + 100) + b"d" * 4 * KiB + bytes(48 * KiB - 100)
        # ensure_data_mapping without overwrite: the cluster is mapped, nothing is stored.
        before = store.written
        _, host, n = img.ensure_data_mapping(5 * MiB + 64 * KiB, 64 * KiB, False)
        assert store.written == before and store.size() >= host + n
        assert img.read(5 * MiB + 64 * KiB, 64 * KiB) == bytes(64 * KiB)
    assert fast.check(store).clean
    # Over a backing image the head and tail come from the backing, so they are written.
    base = MemoryStorage()
    fast.create_image(base, 8 * MiB, compat=compat)
    with fast.open_image(base, writable=True) as img:
        img.write(b"b" * MiB, 0)
    top = _CountingStorage()
    fast.create_image(top, 8 * MiB, compat=compat)
    with fast.open_image(top, writable=True) as img:
        img.driver.set_backing(fast.open_image(base))
        before = top.written
        img.write(b"t" * 4 * KiB, 8 * KiB)
        assert top.written - before == 64 * KiB
        assert img.read(0, 64 * KiB) == b"b" * 8 * KiB + b"t" * 4 * KiB + b"b" * 52 * KiB
