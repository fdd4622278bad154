"""Helpers of the image-locking tests: /proc/locks and qemu-io holding an image."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._support import not_applicable, require_qemu

__all__ = ["held_lock_bytes", "qemu_holding", "qemu_io_run"]

#: How long qemu-io gets to open an image and take its locks.
_START_TIMEOUT = 20.0


def _lock_ranges(path: Path) -> Counter[tuple[int, int]]:
    """The OFD lock ranges held on ``path``, one count per lock (from /proc/locks)."""
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        not_applicable("/proc/locks is not readable")
    st = os.stat(path)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    found: Counter[tuple[int, int]] = Counter()
    for line in text.splitlines():
        fields = line.split()
        if "->" in fields or len(fields) < 8 or fields[1] != "OFDLCK" or fields[5] != ident:
            continue
        found[(int(fields[6]), int(fields[7]))] += 1
    return found


def _bytes_of(ranges: Counter[tuple[int, int]]) -> set[int]:
    return {b for (start, end), n in ranges.items() if n > 0 for b in range(start, end + 1)}


def held_lock_bytes(path: Path) -> set[int]:
    """Every byte of ``path`` any process holds an OFD lock on."""
    return _bytes_of(_lock_ranges(path))


def _qemu_io() -> str:
    require_qemu()
    exe = shutil.which("qemu-io")
    if exe is None:
        not_applicable("qemu-io not installed")
    return exe


@contextlib.contextmanager
def qemu_holding(path: Path, *flags: str, fmt: str = "qcow2") -> Iterator[set[int]]:
    """qemu-io holds ``path`` open (``flags``: e.g. "-r", "-U") until the block ends.

    Yields the bytes it locked (waited for in /proc/locks).
    """
    before = _lock_ranges(path)
    proc = subprocess.Popen([_qemu_io(), *flags, "-f", fmt, "-c", "sleep 600000", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + _START_TIMEOUT
        while not _lock_ranges(path) - before:
            if proc.poll() is not None:
                out = proc.stdout.read() if proc.stdout else ""
                pytest.fail(f"qemu-io {flags} {path.name} exited {proc.returncode}: {out}")
            if time.monotonic() > deadline:
                pytest.fail(f"qemu-io {flags} took no lock on {path.name} in {_START_TIMEOUT}s")
            time.sleep(0.02)
        # The last lock may come a moment after the first: let the set settle.
        time.sleep(0.2)
        yield _bytes_of(_lock_ranges(path) - before)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def qemu_io_run(path: Path, *args: str, fmt: str = "qcow2") -> subprocess.CompletedProcess[str]:
    """Run qemu-io once (``args``: flags and -c commands); the result, whatever it is."""
    return subprocess.run([_qemu_io(), *args, "-f", fmt, str(path)], capture_output=True,
                          text=True, timeout=60, check=False)
