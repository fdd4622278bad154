"""FormatAccess.stream(): the image as an io.RawIOBase, in both implementations."""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
from pyimago.tools import implementation

from .conftest import IMPLS, qemu_img

pytestmark = [pytest.mark.qemu, pytest.mark.clause("tools.stream.file-object")]


@pytest.mark.parametrize("impl", IMPLS)
def test_stream_copies_what_qemu_reads(qemu_corpus: list[Any], impl: str, tmp_path: Path
                                       ) -> None:
    module = implementation(impl)
    for spec in qemu_corpus[::4]:
        expected = tmp_path / "qemu.raw"
        qemu_img("convert", "-O", "raw", spec.path, expected)
        with module.open_image(spec.path) as image, image.stream() as stream:
            assert isinstance(stream, io.RawIOBase)
            out = io.BytesIO()
            shutil.copyfileobj(stream, out, 100_003)  # odd size: reads straddle clusters
            assert out.getvalue() == expected.read_bytes(), spec.name
            assert stream.read(10) == b"" and stream.tell() == image.size
            assert not image.closed


@pytest.mark.parametrize("impl", IMPLS)
def test_stream_in_tarfile_and_hashlib(qemu_corpus: list[Any], impl: str, tmp_path: Path
                                       ) -> None:
    spec = next(s for s in qemu_corpus if s.name == "chain-depth3")
    module = implementation(impl)
    raw = tmp_path / "q.raw"
    qemu_img("convert", "-O", "raw", spec.path, raw)
    with module.open_image(spec.path) as image:
        with image.stream() as stream:
            assert hashlib.file_digest(stream, "sha256").hexdigest() == hashlib.sha256(
                raw.read_bytes()).hexdigest()
        archive = tmp_path / "disk.tar"
        with tarfile.open(archive, "w") as tar, image.stream() as stream:
            info = tarfile.TarInfo("disk.raw")
            info.size = image.size
            tar.addfile(info, io.BufferedReader(stream))
    with tarfile.open(archive) as tar:
        member = tar.extractfile("disk.raw")
        assert member is not None and member.read() == raw.read_bytes()


@pytest.mark.parametrize("impl", IMPLS)
def test_stream_seek_write_and_limits(impl: str, tmp_path: Path) -> None:
    module = implementation(impl)
    path = tmp_path / "w.qcow2"
    module.create_image(str(path), 1 << 20, format="qcow2")
    with module.open_image(str(path), writable=True) as image, image.stream() as stream:
        assert stream.writable() and stream.seekable() and stream.readable()
        assert stream.seek(-10, io.SEEK_END) == (1 << 20) - 10
        assert stream.write(b"x" * 100) == 10  # short write at the disk end
        with pytest.raises(OSError, match="past the disk end"):
            stream.write(b"y")
        stream.seek(70000)
        stream.write(b"hello")
        assert stream.seek(-5, io.SEEK_CUR) == 70000
        assert stream.read(5) == b"hello"
        with pytest.raises(ValueError, match="negative"):
            stream.seek(-1)
        with pytest.raises(ValueError, match="whence"):
            stream.seek(0, 7)
        with pytest.raises(io.UnsupportedOperation):
            stream.truncate(10)
    assert qemu_img("check", path).returncode == 0
    with module.open_image(str(path)) as image:
        assert image.read(70000, 5) == b"hello"
        assert image.read((1 << 20) - 10, 10) == b"x" * 10
        stream = image.stream()
        assert not stream.writable()
        with pytest.raises(io.UnsupportedOperation):
            stream.write(b"no")
        stream.close()
        with pytest.raises(ValueError, match="closed"):
            stream.read(1)
