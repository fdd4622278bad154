"""Backing chains and the implicit-open gate (specs/backing.toml)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyimago.oracle.conformance._qcow2 import EXT_BACKING_FORMAT
from pyimago.oracle.conformance._support import (
    ImageKit,
    KiB,
    chdir_elsewhere,
    expect_error,
    file_bytes,
    pattern,
)
from pyimago.reference import (
    CorruptImageError,
    EofMapping,
    GateDeniedError,
    UnsupportedFeatureError,
    ZeroMapping,
)

pytestmark = pytest.mark.needs("qcow2", "backing")


class RecordingGate:
    """A gate that records what it is asked, and refuses when told to."""

    def __init__(self, refuse: bool = False) -> None:
        self.asked: list[str] = []
        self.refuse = refuse

    def check(self, path: str, *, format: str | None, writable: bool, referrer: str) -> None:
        self.asked.append(path)
        if writable:
            raise AssertionError(f"backing {path} requested writable")
        if self.refuse:
            raise GateDeniedError(f"test gate refuses {path}")


def _base_file(img: ImageKit, folder: Path, name: str = "base.raw", seed: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(pattern(seed, 64 * KiB))
    return path


@pytest.mark.clause("backing.resolve-relative", "create.backing")
def test_relative_backing_names_resolve_against_the_overlay(
    img: ImageKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = img.tmp / "vm"
    _base_file(img, folder)
    top = folder / "top.qcow2"
    img.create(top, 64 * KiB, "qcow2", backing_file="base.raw", backing_fmt="raw")
    assert file_bytes(top).backing_name() == b"base.raw", "the relative name was not kept as given"
    chdir_elsewhere(monkeypatch, img.tmp)
    # A decoy in the working folder must not be picked up.
    Path("base.raw").write_bytes(pattern(99, 64 * KiB))
    with img.open(top, writable=False) as disk:
        assert disk.read(0, 64 * KiB) == pattern(1, 64 * KiB), (
            "the backing was not resolved against the overlay's folder"
        )
    absolute = folder / "abs.qcow2"
    img.create(absolute, 64 * KiB, "qcow2", backing_file=str(folder / "base.raw"),
               backing_fmt="raw")
    with img.open(absolute, writable=False) as disk:
        assert disk.read(0, 64 * KiB) == pattern(1, 64 * KiB), "absolute backing name mishandled"


@pytest.mark.clause("backing.format-extension", "qcow2.extensions.backing-format")
def test_backing_format_extension_is_honoured(img: ImageKit) -> None:
    inner = img.file("inner.qcow2", 64 * KiB, "qcow2")
    with img.open(inner) as d:
        d.write(pattern(2, 64 * KiB), 0)
    raw_view = img.file("as-raw.qcow2", 64 * KiB, "qcow2", backing_file="inner.qcow2",
                        backing_fmt="raw")
    with img.open(raw_view, writable=False) as disk:
        assert disk.read(0, 4) == b"QFI\xfb", (
            "backing_fmt=raw: the qcow2 backing was probed instead of read as raw"
        )
    ext = file_bytes(raw_view).extension(EXT_BACKING_FORMAT)
    assert ext is not None and ext.data == b"raw", f"backing format extension is {ext}"
    # An unknown backing format name is refused, naming it.
    image = file_bytes(raw_view)
    exts = [(e.type, e.data) for e in image.extensions() if e.type != EXT_BACKING_FORMAT]
    image.set_extensions([(EXT_BACKING_FORMAT, b"vmdk"), *exts])
    bad = img.write_file("bad-fmt.qcow2", image)
    error = expect_error(UnsupportedFeatureError, "open with a vmdk backing",
                         lambda: img.open(bad, writable=False))
    assert "vmdk" in str(error), f"the error does not name the format: {error}"


@pytest.mark.clause("backing.probe")
def test_backing_without_format_is_probed(img: ImageKit) -> None:
    inner = img.file("inner.qcow2", 64 * KiB, "qcow2")
    with img.open(inner) as d:
        d.write(pattern(3, 64 * KiB), 0)
    _base_file(img, img.tmp, "plain.raw", seed=4)
    for backing, expected in [("inner.qcow2", pattern(3, 64 * KiB)),
                              ("plain.raw", pattern(4, 64 * KiB))]:
        top = img.file(f"over-{backing}.qcow2", 64 * KiB, "qcow2", backing_file=backing)
        assert file_bytes(top).extension(EXT_BACKING_FORMAT) is None
        with img.open(top, writable=False) as disk:
            assert disk.read(0, 64 * KiB) == expected, f"probing {backing} gave the wrong format"


@pytest.mark.clause("backing.gate")
def test_implicit_opens_go_through_the_gate(img: ImageKit) -> None:
    _base_file(img, img.tmp)
    top = img.file("top.qcow2", 64 * KiB, "qcow2", backing_file="base.raw", backing_fmt="raw")
    mid = img.file("mid.qcow2", 64 * KiB, "qcow2", backing_file="top.qcow2", backing_fmt="qcow2")
    gate = RecordingGate()
    with img.open(mid, writable=False, gate=gate) as disk:
        assert disk.read(0, 16) == pattern(1, 16)
    asked = sorted(Path(p).name for p in gate.asked)
    assert asked == ["base.raw", "top.qcow2"], f"the gate was asked about {gate.asked}"
    refusing = RecordingGate(refuse=True)
    error = expect_error(GateDeniedError, "open through a refusing gate",
                         lambda: img.open(top, gate=refusing))
    assert isinstance(error, PermissionError)
    # What the caller passes explicitly bypasses the gate.
    explicit = RecordingGate(refuse=True)
    with img.open(img.tmp / "base.raw", writable=False, format="raw", gate=explicit) as base, \
            img.open(top, gate=explicit, backing=base) as disk:
        assert disk.read(0, 16) == pattern(1, 16)
    assert explicit.asked == [], f"explicit opens consulted the gate: {explicit.asked}"


@pytest.mark.clause("backing.explicit")
def test_explicit_backing_replaces_the_headers(img: ImageKit) -> None:
    _base_file(img, img.tmp, "named.raw", seed=5)
    _base_file(img, img.tmp, "other.raw", seed=6)
    top = img.file("top.qcow2", 64 * KiB, "qcow2", backing_file="named.raw", backing_fmt="raw")
    gate = RecordingGate(refuse=True)
    with img.open(top, writable=False, backing=None, gate=gate) as disk:
        assert disk.read(0, 64 * KiB) == bytes(64 * KiB), "backing=None still reads a backing"
    with img.open(img.tmp / "other.raw", writable=False, format="raw") as other, \
            img.open(top, writable=False, backing=other, gate=gate) as disk:
        assert disk.read(0, 64 * KiB) == pattern(6, 64 * KiB), "the given backing is not used"
    assert gate.asked == [], f"explicit backings consulted the gate: {gate.asked}"


@pytest.mark.clause("backing.read-only")
def test_backing_files_are_never_written(img: ImageKit) -> None:
    base = img.file("base.qcow2", 256 * KiB, "qcow2", cluster_size=4 * KiB)
    with img.open(base) as d:
        d.write(pattern(7, 256 * KiB), 0)
        d.write_zeroes(64 * KiB, 8 * KiB)
    before = base.read_bytes()
    top = img.file("top.qcow2", 256 * KiB, "qcow2", cluster_size=4 * KiB,
                   backing_file="base.qcow2", backing_fmt="qcow2")
    with img.open(top) as disk:
        disk.write(b"x" * 100, 1000)
        disk.write_zeroes(8 * KiB, 8 * KiB)
        disk.discard_to_zero(20 * KiB, 8 * KiB)
        disk.discard_to_any(40 * KiB, 8 * KiB)
        disk.discard_to_backing(0, 64 * KiB)
        disk.resize(128 * KiB)
        disk.resize(512 * KiB)
        disk.flush()
        disk.sync()
    assert base.read_bytes() == before, "an operation on the overlay modified its backing file"


@pytest.mark.clause("backing.loop", "errors.corrupt-not-stdlib")
def test_backing_loops_are_refused(img: ImageKit) -> None:
    selfref = img.file("self.qcow2", 64 * KiB, "qcow2", unsafe=True, backing_file="self.qcow2",
                       backing_fmt="qcow2")
    error = expect_error(CorruptImageError, "open an image backed by itself",
                         lambda: img.open(selfref, writable=False))
    assert "self.qcow2" in str(error), f"the error does not name the file: {error}"
    img.file("a.qcow2", 64 * KiB, "qcow2", unsafe=True, backing_file="b.qcow2", backing_fmt="qcow2")
    img.file("b.qcow2", 64 * KiB, "qcow2", backing_file="a.qcow2", backing_fmt="qcow2")
    expect_error(CorruptImageError, "open a backing loop",
                 lambda: img.open(img.tmp / "a.qcow2", writable=False))


@pytest.mark.clause("backing.shorter")
def test_shorter_backing_reads_zero_past_its_end(img: ImageKit) -> None:
    (img.tmp / "short.raw").write_bytes(pattern(8, 10 * KiB + 7))
    top = img.file("top.qcow2", 64 * KiB, "qcow2", cluster_size=4 * KiB,
                   backing_file="short.raw", backing_fmt="raw")
    with img.open(top) as disk:
        got = disk.read(0, 64 * KiB)
        assert got[: 10 * KiB + 7] == pattern(8, 10 * KiB + 7)
        assert got[10 * KiB + 7 :] == bytes(64 * KiB - 10 * KiB - 7), "past the backing end"
        m, _ = disk.get_mapping(12 * KiB, 4 * KiB)
        assert isinstance(m, ZeroMapping) and not m.explicit, f"past the backing end: {m}"
        disk.write(b"y", 10 * KiB + 100)  # copy-on-write across the backing's end
        assert disk.read(8 * KiB, 4 * KiB) == (
            pattern(8, 10 * KiB + 7)[8 * KiB :] + bytes(93) + b"y" + bytes(4 * KiB - 2 * KiB - 101)
        )


@pytest.mark.clause("backing.longer")
def test_longer_backing_is_cut_at_the_overlay_size(img: ImageKit) -> None:
    (img.tmp / "long.raw").write_bytes(pattern(9, 256 * KiB))
    top = img.file("top.qcow2", 64 * KiB, "qcow2", backing_file="long.raw", backing_fmt="raw")
    with img.open(top, writable=False) as disk:
        assert disk.size == 64 * KiB
        assert disk.read(0, 64 * KiB) == pattern(9, 64 * KiB)
        assert disk.read(64 * KiB, 4 * KiB) == bytes(4 * KiB), "the longer backing shows"
        m, n = disk.get_mapping(64 * KiB, 4 * KiB)
        assert isinstance(m, EofMapping) and n == 0, f"at the overlay's end: {m}, {n}"
