"""Write ordering of pyimago.reference's qcow2 driver: a cut after any storage write.

Each test is a shrunk reproduction of a power-cut campaign failure (issue 10): it records
every storage mutation of a short scenario, then judges the image after a cut at *every*
mutation with ``qemu-img check`` (no corruption allowed; leaks are) and by what the guest
reads.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pyimago.oracle.crash import RecordingStorage
from pyimago.reference import (
    FormatAccess,
    MemoryStorage,
    PreallocateMode,
    check,
    create_image,
    open_image,
)
from pyimago_tests_reference_helpers import (
    KiB,
    every_cut,
    header_of,
    qemu_check_bytes,
    qemu_img,
    require_qemu,
)

pytestmark = pytest.mark.qemu


def recorded(image: bytes) -> RecordingStorage:
    return RecordingStorage(MemoryStorage(image, name="top"))


def reads(image: bytes, backing: FormatAccess | None = None) -> tuple[int, bytes]:
    with open_image(MemoryStorage(image, name="cut"), backing=backing) as img:
        return img.size, img.read(0, img.size)


def qemu_made(tmp_path: Path, data: bytes, cs: int, *, how: str) -> bytes:
    """An image qemu-img made from ``data``: compressed (``convert -c``) or with every
    cluster shared with an internal snapshot."""
    raw = tmp_path / "src.raw"
    raw.write_bytes(data)
    out = tmp_path / "t.qcow2"
    opts = f"cluster_size={cs}"
    if how == "compressed":
        qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, raw, out)
    else:
        qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", "-o", opts, raw, out)
        qemu_img("snapshot", "-q", "-c", "s1", out)
    return out.read_bytes()


@pytest.mark.clause("crash.order.grow-size-last", "crash.power-cut")
@pytest.mark.parametrize("prealloc", [m for m in PreallocateMode if m is not PreallocateMode.NONE])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_grow_writes_the_new_size_last(prealloc: PreallocateMode, compat: str) -> None:
    # Campaign seed 14: v2 over a raw backing, grow +2048 ZERO; a cut after the size write
    # showed the backing through the grown area.
    require_qemu()
    base = MemoryStorage(name="base")
    create_image(base, 8 * KiB, format="raw")
    with open_image(base, writable=True) as b:
        b.write(b"\xaa" * 8 * KiB, 0)
    top = MemoryStorage(name="top")
    create_image(top, 4 * KiB, cluster_size=512, compat=compat, backing_file="base",
                 backing_fmt="raw")
    rec = recorded(top.snapshot())
    with open_image(base) as backing:
        with open_image(rec, writable=True, backing=backing) as img:
            img.resize(8 * KiB, prealloc)
        for k, image in every_cut(rec):
            size, content = reads(image, backing)
            assert size in (4 * KiB, 8 * KiB), k
            assert content[:4 * KiB] == b"\xaa" * 4 * KiB, k
            assert content[4 * KiB:] == bytes(size - 4 * KiB), f"cut after mutation {k}"


@pytest.mark.clause("crash.order.data-before-entry", "crash.order.unref-after-entry")
@pytest.mark.parametrize("how", ["compressed", "snapshot"])
@pytest.mark.parametrize("parallel", [1, 2])
def test_first_write_into_compressed_or_shared_cluster(
    tmp_path: Path, how: str, parallel: int
) -> None:
    # Campaign seeds 6, 27, 28: the new L2 entry reached storage before the guest data did,
    # so a cut in between read zeroes where the old (durable) data had been.
    require_qemu()
    cs = 4096
    old = bytes(range(256)) * (6 * cs // 256)
    rec = recorded(qemu_made(tmp_path, old, cs, how=how))
    new = b"\x5a" * (3 * cs)
    with open_image(rec, writable=True, backing=None, l2_cache_tables=1) as img:
        img.set_write_parallelization(parallel)
        img.write(new, cs + 100)
    expected_after = old[: cs + 100] + new + old[4 * cs + 100 :]
    for k, image in every_cut(rec):
        _, content = reads(image)
        for sector in range(0, len(old), 512):
            got = content[sector : sector + 512]
            assert got in (old[sector : sector + 512], expected_after[sector : sector + 512]), (
                f"cut after mutation {k}: sector {sector} lost"
            )
    assert reads(bytes(rec.state_after(rec.mutations)))[1] == expected_after


@pytest.mark.clause("crash.power-cut")
@pytest.mark.parametrize("cs", [512, 4096])
def test_write_into_a_zeroed_cluster_splits_no_sector(cs: int) -> None:
    # Campaign seeds 10197 and 10279: write_zeroes over a synced data cluster keeps its host
    # cluster (zero flag in the cache, old data still mapped on storage); an unaligned write
    # reuses it in place, and zeroing what it does not cover range by range split a 512-byte
    # sector between two storage writes: a cut in between read half old data, half zeroes.
    require_qemu()
    top = MemoryStorage(name="top")
    create_image(top, 4 * cs, cluster_size=cs)
    rec = recorded(top.snapshot())
    at, n = (cs + 1100, cs - 2300) if cs > 512 else (cs + 100, 200)
    with open_image(rec, writable=True, backing=None) as img:
        img.write(b"\x0c" * cs, cs)
        img.flush()
        img.sync()
        since = rec.mutations
        img.write_zeroes(0, 4 * cs)
        img.write(b"\x11" * n, at)
    old = bytes(cs) + b"\x0c" * cs + bytes(2 * cs)
    new = bytearray(4 * cs)
    new[at : at + n] = b"\x11" * n
    for k, image in every_cut(rec, since):
        _, content = reads(image)
        for s in range(0, 4 * cs, 512):
            got = content[s : s + 512]
            assert got in (old[s : s + 512], bytes(512), new[s : s + 512]), (
                f"cut after mutation {k}: sector 0x{s:x} reads {got.hex()[:16]}..")
    assert reads(bytes(rec.state_after(rec.mutations)))[1] == new


@pytest.mark.clause("crash.order.new-structure-before-pointer", "crash.power-cut")
@pytest.mark.parametrize("refcount_bits", [1, 16, 64])
def test_new_refcount_block_counts_itself_before_it_is_linked(refcount_bits: int) -> None:
    # A new refcount block was linked into the refcount table while its own refcount was 0.
    require_qemu()
    cs = 512
    top = MemoryStorage(name="top")
    size = 4 * 1024 * KiB
    create_image(top, size, cluster_size=cs, refcount_bits=refcount_bits)
    entries = cs * 8 // refcount_bits
    # Clusters written far apart (one L2 table each, so two host clusters per write) until
    # the first refcount block is nearly full; then a cut after every write of the next few.
    at = [(i * 67 * cs) % size for i in range(entries // 2 + 8)]
    with open_image(top, writable=True, backing=None) as img:
        for offset in at[: entries // 2 - 4]:
            img.write(b"\x01" * 8, offset)
    rec = recorded(top.snapshot())
    with open_image(rec, writable=True, backing=None) as img:
        for offset in at[entries // 2 - 4 :]:
            img.write(b"\x01" * 8, offset)
            img.flush()
    for _ in every_cut(rec):
        pass


@pytest.mark.clause("crash.order.refcount-before-reference", "crash.power-cut")
def test_grown_refcount_table_is_counted_before_the_header_switches() -> None:
    # Clusters of a new refcount table covered by an existing block were counted only after
    # the header pointed at the table.
    require_qemu()
    cs = 512
    top = MemoryStorage(name="top")
    create_image(top, 4 * 1024 * KiB, cluster_size=cs, refcount_bits=64)
    with open_image(top, writable=True, backing=None) as img:
        img.write(b"\x02" * (1900 * KiB), 0)
    table_at = header_of(top.snapshot()).refcount_table_offset
    rec = recorded(top.snapshot())
    # Cluster by cluster, until the refcount table has moved (and a little more).
    with open_image(rec, writable=True, backing=None) as img:
        offset, after = 1900 * KiB, 0
        while after < 3:
            img.write(b"\x03" * cs, offset)
            img.flush()
            offset += cs
            after += header_of(rec.read(0, cs)).refcount_table_offset != table_at
            assert offset < 2400 * KiB, "the refcount table never grew"
    first = max(0, rec.mutations - 60)
    for _ in every_cut(rec, since=first):
        pass




@pytest.mark.clause("qcow2.corrupt.repair", "crash.power-cut")
@pytest.mark.parametrize("repair", ["leaks", "all"])
def test_repair_cut_anywhere_leaves_no_corruption(repair: str) -> None:
    # A power cut in the middle of check(repair=...) on an image with leaks (a cut state of
    # writes, discards and a refcount-block creation) leaves leaks at most.
    require_qemu()
    top = MemoryStorage(name="top")
    create_image(top, 512 * KiB, cluster_size=512, refcount_bits=4)
    rec = recorded(top.snapshot())
    with open_image(rec, writable=True, backing=None) as img:
        for i in range(40):
            img.write(bytes([i + 1]) * 700, (i * 7919) % (500 * KiB))
            if i % 3 == 0:
                img.discard_to_any((i * 3571) % (500 * KiB), 2048)
    # The first cut state with leaks to repair.
    leaky = next(bytes(s) for k, s in rec.cut_states(range(rec.mutations, 0, -1))
                 if qemu_check_bytes(bytes(s)).get("leaks"))
    repaired = recorded(leaky)
    result = check(repaired, repair=repair)
    assert result.leaks_fixed and not result.corruptions, result
    assert not qemu_check_bytes(bytes(repaired.state_after(repaired.mutations))).get("leaks")
    cuts = 0
    for _ in every_cut(repaired):
        cuts += 1
    assert cuts == repaired.mutations + 1


@pytest.mark.clause("crash.power-cut", "crash.order.data-before-entry")
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cs", [512, 4096])
@pytest.mark.parametrize("parallel", [1, 2])
def test_sweep_over_backing_after_cow_write_zeroes(compat: str, cs: int, parallel: int) -> None:
    # Oracle report (raw-base-memory family): after a write_zeroes that copies a partial
    # cluster from the raw backing, a sweep of writes over backing data read sector 0x400 as
    # zeroes after a cut.  Every sector of every cut must read a value some state since the
    # sync gave it: the backing's, the zeroed one, or one of the sweep's writes.
    require_qemu()
    size = 8 * cs
    base = MemoryStorage(name="base")
    create_image(base, size, format="raw")
    with open_image(base, writable=True) as b:
        b.write(bytes((i * 7 + 1) % 251 or 1 for i in range(size)), 0)
    top = MemoryStorage(name="top")
    create_image(top, size, cluster_size=cs, compat=compat, backing_file="base",
                 backing_fmt="raw")
    rec = recorded(top.snapshot())
    with open_image(base) as backing:
        state = bytearray(backing.read(0, size))
        states = [bytes(state)]
        with open_image(rec, writable=True, backing=backing) as img:
            img.set_write_parallelization(parallel)
            img.write_zeroes(0x300, 0x300)
            state[0x300:0x600] = bytes(0x300)
            states.append(bytes(state))
            for pos in range(0x100, size, cs + 0x180):
                n = min(0x500, size - pos)
                data = bytes([0x40 + len(states)]) * n
                img.write(data, pos)
                state[pos : pos + n] = data
                states.append(bytes(state))
        for k, image in every_cut(rec):
            _, content = reads(image, backing)
            for s in range(0, size, 512):
                got = content[s : s + 512]
                assert any(got == st[s : s + 512] for st in states), (
                    f"cut after mutation {k}: sector 0x{s:x} reads {got.hex()[:16]}..")
        assert reads(bytes(rec.state_after(rec.mutations)), backing)[1] == states[-1]


@pytest.mark.clause("crash.snapshot.copied-conservative", "qcow2.snapshots.apply-revert")
@pytest.mark.parametrize("change", ["grow", "shrink"])
def test_apply_snapshot_switches_the_l1_table_and_the_size_at_once(change: str) -> None:
    # apply_snapshot of a snapshot whose disk size differs: the reference wrote the
    # snapshot's L1 table over the active one, then a grown size (a cut between showed the
    # new disk at the old size), or shrank the disk first (a cut showed the old disk cut
    # short).  Now a fresh L1 table and one header write: every cut reads the old disk or
    # the new one, each at its own size.
    require_qemu()
    store = MemoryStorage(name="top")
    create_image(store, 64 * KiB, cluster_size=4096)
    with open_image(store, writable=True) as img:
        img.write(b"\x11" * 64 * KiB, 0)
        img.create_snapshot("s")
        img.write(b"\x22" * 4 * KiB, 4 * KiB)
        if change == "grow":
            img.resize(8 * KiB)
        else:
            img.resize(96 * KiB)
            img.write(b"\x33" * 8 * KiB, 80 * KiB)
    rec = recorded(store.snapshot())
    old = reads(store.snapshot())
    with open_image(rec, writable=True) as img:
        img.apply_snapshot("s")
    new = reads(rec.read(0, rec.size()))
    assert new == (64 * KiB, b"\x11" * 64 * KiB)
    for k, image in every_cut(rec):
        assert reads(image) in (old, new), f"cut after mutation {k}: {rec.describe_mutation(k)}"
