"""Block 0 of probed raw images (specs/raw.toml, raw.probed.block0).

The sectors below are the first 512 bytes of images of QEMU's other formats; each is made by
qemu-img where it can make that format, and written by hand (after QEMU's probe functions)
otherwise.  qemu-io is the judge of what must be refused: the same sector written with
``qemu-io -c 'write -s sector 0 512'`` to a probed raw image fails or succeeds alike.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from pyimago.oracle.conformance._support import (
    ImageKit,
    KiB,
    expect_error,
    pattern,
    qemu_img,
    require_qemu,
)
from pyimago.reference import ProbedRawWriteError, ReadOnlyError, UnsupportedFeatureError

from ._sectors import HAND_MADE, HARMLESS

pytestmark = pytest.mark.needs("raw")


def _qemu_sectors(tmp: Path) -> dict[str, bytes]:
    """First sectors of images qemu-img makes (qcow2 with a backing file name, and more)."""
    host = tmp / "host-secret.raw"
    host.write_bytes(b"secret")
    made: dict[str, bytes] = {}
    for fmt, opts in (("qcow2", ["-b", str(host), "-F", "raw"]), ("qcow2-plain", []),
                      ("qed", []), ("vdi", []), ("vpc", []), ("vhdx", []), ("vmdk", [])):
        path = tmp / f"made.{fmt}"
        proc = qemu_img("create", "-q", "-f", fmt.split("-")[0], *opts, path, "1M", ok=(0, 1))
        if proc.returncode == 0:
            made[f"qemu-img {fmt}"] = path.read_bytes()[:512].ljust(512, b"\0")
    return made


def _raw_file(img: ImageKit, name: str, first: bytes = b"") -> Path:
    path = img.tmp / name
    path.write_bytes(first + pattern(40, 64 * KiB - len(first)))
    return path


def _qemu_refuses(path: Path, sector: bytes, tmp: Path) -> bool:
    """Whether qemu-io (format probed) refuses to write ``sector`` at offset 0 of ``path``."""
    require_qemu()
    exe = shutil.which("qemu-io")
    if exe is None:
        pytest.skip("qemu-io not installed")
    src = tmp / "sector.bin"
    src.write_bytes(sector)
    proc = subprocess.run([exe, "-c", f"write -s {src} 0 512", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    return "Operation not permitted" in proc.stdout + proc.stderr


@pytest.mark.clause("raw.probed.block0")
def test_a_qcow2_header_naming_a_host_file_is_refused(img: ImageKit) -> None:
    sector = _qemu_sectors(img.tmp).get("qemu-img qcow2")
    if sector is None:
        pytest.skip("qemu-img could not make a qcow2 image")
    path = _raw_file(img, "guest.raw")
    before = path.read_bytes()
    with img.open(path) as disk:
        exc = expect_error(ProbedRawWriteError, "qcow2 header into a probed raw image",
                           lambda: disk.write(sector + pattern(41, 512), 0))
        assert isinstance(exc, ReadOnlyError) and "qcow2" in str(exc), exc
        assert getattr(exc, "probed_as", None) == "qcow2", exc
        # The rest of the disk is still writable.
        disk.write(pattern(42, 4 * KiB), 8 * KiB)
    after = path.read_bytes()
    assert after[: 8 * KiB] == before[: 8 * KiB], "the refused write changed the file"
    with img.open(path, writable=False) as disk:
        assert disk.read(0, 512) == before[:512]
    # format="raw" lifts the guard: the guest may write what it wants; the next probed open
    # then sees a qcow2 image backed by a host file, the danger the guard prevents.
    whole = (img.tmp / "made.qcow2").read_bytes()
    with open(path, "r+b") as f:
        f.truncate(len(whole) + 8 * KiB)
    with img.open(path, format="raw") as disk:
        disk.write(whole, 0)
    info = qemu_img("info", path)
    assert "file format: qcow2" in info.stdout and "host-secret.raw" in info.stdout, info.stdout


@pytest.mark.clause("raw.probed.block0")
def test_every_format_qemu_probes_is_refused_as_qemu_refuses_it(img: ImageKit) -> None:
    cases = {**HAND_MADE, **_qemu_sectors(img.tmp)}
    wrong: list[str] = []
    for name, sector in {**cases, **HARMLESS}.items():
        refuse = name not in HARMLESS
        qpath = _raw_file(img, "q.raw")
        assert _qemu_refuses(qpath, sector, img.tmp) == refuse, (
            f"{name}: the test's expectation disagrees with qemu-io ({refuse=})"
        )
        path = _raw_file(img, "p.raw")
        with img.open(path) as disk:
            try:
                disk.write(sector, 0)
            except ProbedRawWriteError:
                refused = True
            else:
                refused = False
        if refused != refuse:
            wrong.append(f"{name}: {'refused' if refused else 'written'}")
        if refused and path.read_bytes()[:512] == sector:
            wrong.append(f"{name}: refused but written anyway")
    assert not wrong, f"probed raw block 0 disagrees with QEMU: {wrong}"


@pytest.mark.clause("raw.probed.block0")
def test_partial_writes_zeroing_and_discards_are_judged_on_the_whole_sector(
    img: ImageKit,
) -> None:
    path = _raw_file(img, "partial.raw", b"QEDX")
    with img.open(path) as disk:
        # Zeroing byte 3 completes "QED\0": refused, as qemu-io refuses "write -z 3 1".
        for what, call in (
            ("write_zeroes", lambda: disk.write_zeroes(3, 1)),
            ("discard_to_zero", lambda: disk.discard_to_zero(3, 1)),
            ("discard_to_backing", lambda: disk.discard_to_backing(3, 5)),
            ("discard_to_any", lambda: disk.discard_to_any(3, 1)),
            ("one byte write", lambda: disk.write(b"\0", 3)),
            ("writev", lambda: disk.writev([b"QE", b"D\0"], 0)),
        ):
            expect_error(ProbedRawWriteError, what, call)
        assert disk.read(0, 4) == b"QEDX"
        # Harmless block-0 changes go through, whole-sector zeroing included.
        disk.write(b"QEDY", 0)
        disk.write_zeroes(0, 512)
        assert disk.read(0, 512) == bytes(512)
        disk.write(pattern(43, 1000), 100)
        assert disk.read(100, 1000) == pattern(43, 1000)


@pytest.mark.clause("raw.probed.block0")
def test_mapped_and_parallel_writes_cannot_bypass_the_guard(img: ImageKit) -> None:
    path = _raw_file(img, "mapped.raw")
    with open(path, "r+b") as f:
        f.truncate(20 << 20)
    with img.open(path) as disk:
        storage, host, _ = disk.ensure_data_mapping(0, 512, True)
        expect_error(ProbedRawWriteError, "write through ensure_data_mapping",
                     lambda: storage.write(HAND_MADE["vpc"], host))
        disk.set_write_parallelization(4)
        big = HAND_MADE["vhdx"] + bytes(17 << 20)
        expect_error(ProbedRawWriteError, "parallel write", lambda: disk.write(big, 0))
    assert path.read_bytes()[:8] != b"conectix"
    assert path.read_bytes()[:8] != b"vhdxfile"


@pytest.mark.clause("raw.probed.block0")
def test_explicit_raw_and_memory_images_are_not_restricted(img: ImageKit) -> None:
    path = _raw_file(img, "explicit.raw")
    with img.open(path, format="raw") as disk:
        disk.write(HAND_MADE["qed"], 0)
    store = img.mem(64 * KiB, "raw")
    with img.open(store, format="raw") as disk:
        disk.write(HAND_MADE["qed"], 0)
    probed = img.mem(64 * KiB, "raw")
    with img.open(probed) as disk:
        expect_error(ProbedRawWriteError, "probed raw in memory",
                     lambda: disk.write(HAND_MADE["qed"], 0))


@pytest.mark.clause("raw.probe.other-formats", "errors.feature-named")
def test_other_formats_are_not_opened_as_raw(img: ImageKit) -> None:
    cases = {**HAND_MADE, **_qemu_sectors(img.tmp)}
    wrong: list[str] = []
    for name, sector in cases.items():
        path = _raw_file(img, "other.img", sector)
        fmt = name.removeprefix("qemu-img ").split("-")[0]
        for writable in (False, True):
            try:
                img.open(path, writable=writable).close()
            except UnsupportedFeatureError as exc:
                # (qcow, version 1 of the qcow2 magic, goes to the qcow2 driver, which names
                # the version it does not support.)
                named = "version 1" if fmt == "qcow" else fmt
                if named not in str(exc) or named not in exc.feature:
                    wrong.append(f"{name}: {exc} (feature {exc.feature!r})")
            except Exception as exc:
                if fmt != "qcow2":
                    wrong.append(f"{name}: {type(exc).__name__}: {exc}")
            else:
                if fmt != "qcow2":
                    wrong.append(f"{name}: opened as raw")
        with img.open(path, format="raw", writable=False) as disk:
            assert disk.read(0, 512) == sector
    assert not wrong, f"images QEMU probes as other formats: {wrong}"
