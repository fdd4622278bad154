"""L1/L2 tables, COPIED, copy-on-write and metadata placement (specs/qcow2-tables.toml), and
zero clusters (specs/qcow2-zero.toml)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pyimago.oracle.conformance._qcow2 import (
    L1_OFFSET_MASK,
    L2_COMPRESSED,
    L2_COPIED,
    L2_OFFSET_MASK,
    L2_ZERO,
    Qcow2Bytes,
)
from pyimago.oracle.conformance._support import ImageKit, KiB, MiB, pattern
from pyimago.reference import CorruptImageError, MemoryStorage, PyimagoError, ZeroMapping

pytestmark = pytest.mark.needs("qcow2")


@pytest.mark.clause("qcow2.l1.index", "qcow2.l2.index", "qcow2.l1.entry-layout",
                    "qcow2.l2.entry-layout")
def test_guest_offsets_map_through_l1_and_l2_as_specified(img: ImageKit) -> None:
    # 512-byte clusters: an L2 table has 64 entries, one L1 entry maps 32 KiB.
    offsets = [0, 512 * 63, 512 * 64, 32 * KiB * 5 + 512 * 7, 1 * MiB - 512]
    writes = [(o, pattern(i, 512)) for i, o in enumerate(offsets)]
    image = img.crafted(1 * MiB, writes=writes)
    l1 = image.get("l1_table_offset")
    for i, o in enumerate(offsets):
        l1e = image.u64(l1 + 8 * ((o // 512) // 64))
        assert l1e & ~(L1_OFFSET_MASK | L2_COPIED) == 0, f"L1 entry {l1e:#x}: reserved bits set"
        assert l1e & L2_COPIED, f"L1 entry {l1e:#x} of a private L2 table lacks COPIED"
        l2 = l1e & L1_OFFSET_MASK
        entry = image.u64(l2 + 8 * ((o // 512) % 64))
        assert entry & ~(L2_OFFSET_MASK | L2_COPIED) == 0, f"L2 entry {entry:#x}: reserved bits"
        assert entry & L2_COPIED and not entry & L2_COMPRESSED, f"L2 entry {entry:#x}"
        host = entry & L2_OFFSET_MASK
        assert host % 512 == 0 and bytes(image.data[host : host + 512]) == pattern(i, 512), (
            f"guest offset {o:#x}: the L2 entry at the specified index does not point to the data"
        )


@pytest.mark.needs("resize")
@pytest.mark.clause("qcow2.l1.growth")
def test_l1_table_grows_contiguously(img: ImageKit) -> None:
    store = img.mem(64 * KiB, "qcow2", cluster_size=512)
    old = img.bytes_of(store)
    old_l1 = (old.get("l1_table_offset"), old.get("l1_size"))
    with img.open(store) as disk:
        disk.write(pattern(1, 64 * KiB), 0)
        disk.resize(4 * MiB)  # 128 L1 entries: more than one 512-byte cluster holds
        disk.write(pattern(2, 5000), 4 * MiB - 5000)
        assert disk.read(0, 64 * KiB) == pattern(1, 64 * KiB)
    image = img.bytes_of(store)
    assert image.get("l1_size") * 32 * KiB >= 4 * MiB, f"l1_size {image.get('l1_size')}"
    assert (image.get("l1_table_offset"), image.get("l1_size")) != old_l1
    assert image.get("l1_table_offset") % 512 == 0
    assert not image.problems(), image.problems()
    with img.open(store, writable=False) as disk:
        assert disk.read(4 * MiB - 5000, 5000) == pattern(2, 5000)


@pytest.mark.clause("qcow2.l2.reserved-bits")
def test_reserved_entry_bits_are_corrupt(img: ImageKit) -> None:
    base = img.crafted(64 * KiB, writes=[(0, pattern(3, 1024))])
    cases: dict[str, Callable[[Qcow2Bytes], None]] = {
        "L2 reserved bit 1": lambda im: im.set_l2_entry(0, im.l2_entry(0) | 1 << 1),
        "L2 reserved bit 57": lambda im: im.set_l2_entry(0, im.l2_entry(0) | 1 << 57),
        "unaligned host offset": lambda im: im.set_l2_entry(0, im.l2_entry(0) + 0x100),
        "L1 reserved bit 60": lambda im: im.put_u64(im.l1_entry_pos(0), im.l1_entry(0) | 1 << 60),
    }
    images = {}
    for what, patch in cases.items():
        images[what] = Qcow2Bytes(base.data)
        patch(images[what])
    img.refuses_all(images, CorruptImageError)


@pytest.mark.clause("qcow2.l2.copied-flag", "qcow2.refcount.no-leaks")
def test_copied_is_exact_after_every_kind_of_operation(img: ImageKit) -> None:
    store = img.mem(256 * KiB, "qcow2", cluster_size=1024)
    with img.open(store) as disk:
        disk.write(pattern(4, 100 * KiB), 1000)
        disk.write_zeroes(10 * KiB, 20 * KiB)
        disk.discard_to_zero(40 * KiB, 10 * KiB)
        disk.discard_to_backing(60 * KiB, 3 * KiB)
        disk.discard_to_any(70 * KiB, 5 * KiB)
        disk.flush()
        assert not img.bytes_of(store).problems(), img.bytes_of(store).problems()
        disk.resize(64 * KiB)
        disk.resize(512 * KiB)
        disk.write(pattern(5, 10 * KiB), 300 * KiB)
    assert not img.bytes_of(store).problems(), img.bytes_of(store).problems()


def _shared(img: ImageKit) -> Qcow2Bytes:
    """An image whose guest clusters 0 and 4 share one host cluster (refcount 2, no COPIED)."""
    image = img.crafted(64 * KiB, cluster_size=512, writes=[(0, pattern(6, 512)),
                                                             (2048, pattern(7, 512))])
    host0, host4 = image.host_offset(0), image.host_offset(2048)
    image.set_l2_entry(0, host0)
    image.set_l2_entry(2048, host0)
    image.set_refcount(host0 // 512, 2)
    image.set_refcount(host4 // 512, 0)
    assert not image.errors(), image.errors()
    return image


@pytest.mark.clause("qcow2.l2.cow-shared", "access.cow.partial-cluster")
def test_shared_clusters_are_copied_on_write(img: ImageKit) -> None:
    image = _shared(img)
    host0 = image.host_offset(0)
    store = MemoryStorage(bytes(image.data))
    with img.open(store) as disk:
        disk.write(b"\xee" * 10, 2048 + 100)
        assert disk.read(0, 512) == pattern(6, 512), "the other user of the cluster changed"
        assert disk.read(2048, 512) == (
            pattern(6, 512)[:100] + b"\xee" * 10 + pattern(6, 512)[110:]
        ), "the write into a shared cluster did not copy its old contents"
    after = img.bytes_of(store)
    assert bytes(after.data[host0 : host0 + 512]) == pattern(6, 512), "shared cluster modified"
    assert after.host_offset(2048) != host0, "the write went into the shared cluster"
    assert after.refcount(host0 // 512) == 1, "the shared cluster's refcount did not drop"
    # COPIED of the remaining user may stay clear (qemu-img check would flag it, but it was
    # crafted that way); every refcount must be exact.
    assert not [p for p in after.problems() if p.kind != "copied"], after.problems()


@pytest.mark.clause("qcow2.metadata.alignment")
def test_unaligned_metadata_is_corrupt(img: ImageKit) -> None:
    base = img.crafted(64 * KiB, writes=[(0, pattern(8, 512))])
    cases: dict[str, Qcow2Bytes] = {}
    for field in ("l1_table_offset", "refcount_table_offset"):
        cases[f"{field} not cluster-aligned"] = image = Qcow2Bytes(base.data)
        image.set(**{field: base.get(field) + 256})
    # Offsets aligned to 512 bytes but not to the 4 KiB cluster (bits 9-11 are offset bits).
    big = img.crafted(64 * KiB, cluster_size=4096, writes=[(0, pattern(8, 512))])
    cases["an L2 table not cluster-aligned"] = l2 = Qcow2Bytes(big.data)
    l2.put_u64(l2.l1_entry_pos(0), l2.l1_entry(0) + 512)
    cases["a data cluster not cluster-aligned"] = data = Qcow2Bytes(big.data)
    data.set_l2_entry(0, data.l2_entry(0) + 512)
    img.refuses_all(cases, CorruptImageError)


@pytest.mark.clause("qcow2.metadata.overlap")
def test_overlapping_metadata_is_corrupt(img: ImageKit) -> None:
    base = img.crafted(64 * KiB, writes=[(0, pattern(9, 512))])
    fields: dict[str, dict[str, int]] = {
        "L1 table on the header": {"l1_table_offset": 0},
        "refcount table on the L1 table": {"refcount_table_offset": base.get("l1_table_offset")},
    }
    cases: dict[str, Qcow2Bytes] = {}
    for what, values in fields.items():
        cases[what] = image = Qcow2Bytes(base.data)
        image.set(**values)
    # A data cluster that is also the L2 table mapping it, written through.
    cases["a data cluster that is also its own L2 table"] = image = Qcow2Bytes(base.data)
    image.set_l2_entry(0, L2_COPIED | (image.l1_entry(0) & L1_OFFSET_MASK))
    img.refuses_all(cases, CorruptImageError, writable=True)


@pytest.mark.clause("qcow2.metadata.outside-file")
def test_tables_wholly_outside_the_file_are_corrupt(img: ImageKit) -> None:
    base = img.crafted(64 * KiB, writes=[(0, pattern(10, 512))])
    end = (len(base.data) + 511) // 512 * 512
    cases: dict[str, Callable[[Qcow2Bytes], None]] = {
        "L1 table": lambda im: im.set(l1_table_offset=end + 64 * KiB),
        "refcount table": lambda im: im.set(refcount_table_offset=end + 64 * KiB),
        "L2 table": lambda im: im.put_u64(im.l1_entry_pos(0), L2_COPIED | (end + 64 * KiB)),
    }
    images = {}
    for what, patch in cases.items():
        images[f"{what} wholly past the end of the file"] = image = Qcow2Bytes(base.data)
        patch(image)
    img.refuses_all(images, CorruptImageError)


# -- zero clusters -------------------------------------------------------------------------------


@pytest.mark.needs("backing")
@pytest.mark.clause("qcow2.zero.flag")
def test_zero_flag_reads_zero_whatever_it_points_to(img: ImageKit) -> None:
    (img.tmp / "base.raw").write_bytes(pattern(11, 64 * KiB))
    path = img.file("top.qcow2", 64 * KiB, "qcow2", cluster_size=512, backing_file="base.raw",
                    backing_fmt="raw")
    with img.open(path) as disk:
        disk.write(pattern(12, 2048), 0)
    image = Qcow2Bytes(path.read_bytes())
    image.set_l2_entry(0, image.l2_entry(0) | L2_ZERO)  # data cluster with the zero flag
    image.set_l2_entry(5 * 512, L2_ZERO)  # a plain zero cluster over backing data
    crafted = img.write_file("crafted.qcow2", image)
    with img.open(crafted, writable=False) as disk:
        assert disk.read(0, 512) == bytes(512), "a zero-flagged data cluster reads its data"
        assert disk.read(5 * 512, 512) == bytes(512), "a zero cluster shows the backing"
        for guest in (0, 5 * 512):
            m, _ = disk.get_mapping(guest, 512)
            assert isinstance(m, ZeroMapping) and m.explicit, f"zero cluster maps as {m}"
        assert disk.read(512, 512) == pattern(12, 2048)[512:1024]


@pytest.mark.clause("qcow2.zero.preallocated")
def test_preallocated_zero_clusters_keep_their_host_cluster(img: ImageKit) -> None:
    store = img.mem(64 * KiB, "qcow2", cluster_size=512)
    with img.open(store) as disk:
        disk.write(pattern(13, 4096), 0)
        disk.write_zeroes(0, 2048)
    image = img.bytes_of(store)
    hosts = [image.host_offset(g) for g in range(0, 2048, 512)]
    assert all(hosts), "write_zeroes dropped host clusters"
    assert all(image.refcount(h // 512) == 1 for h in hosts), "host clusters lost refcounts"
    with img.open(store) as disk:
        assert disk.read(0, 2048) == bytes(2048)
        disk.write(b"z" * 512, 512)
        assert disk.read(0, 2048) == bytes(512) + b"z" * 512 + bytes(1024)
    assert not img.bytes_of(store).problems(), img.bytes_of(store).problems()


@pytest.mark.clause("qcow2.zero.v2-none")
def test_version_2_never_gets_the_zero_flag(img: ImageKit) -> None:
    store = img.mem(64 * KiB, "qcow2", cluster_size=512, compat="0.10")
    with img.open(store) as disk:
        disk.write(pattern(14, 64 * KiB), 0)
        disk.write_zeroes(0, 8 * KiB)
        disk.discard_to_zero(16 * KiB, 8 * KiB)
        disk.discard_to_any(32 * KiB, 8 * KiB)
        assert disk.read(0, 8 * KiB) == bytes(8 * KiB)
        assert disk.read(16 * KiB, 8 * KiB) == bytes(8 * KiB)
    image = img.bytes_of(store)
    for g in range(0, 64 * KiB, 512):
        assert not image.l2_entry(g) & L2_ZERO, f"v2 image: zero flag set at {g:#x}"
    assert not image.problems(), image.problems()
    # A v2 image with bit 0 set is not valid: it must not read as zero silently or crash.
    image.set_l2_entry(40 * KiB, image.l2_entry(40 * KiB) | L2_ZERO)
    try:
        with img.open_bytes(image) as disk:
            disk.read(40 * KiB, 512)
    except PyimagoError:
        pass
