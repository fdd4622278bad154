"""Checking for a session: the incremental check after each operation, the power-cut
states, the reference read-back of a differential target, and qemu-img at teardown."""

from __future__ import annotations

import contextlib
import os
import subprocess
from typing import Any

from pyimago.reference import MemoryStorage

from ._chain import Access, ChainBuilder
from ._check import OracleFailure, check_image, check_small_mapping, content_failure
from ._journal import PairedRecording
from ._op_table import BURST_SLICE_FRACTION, FULL_CHECK, PASSIVE, SLICE_FRACTION
from ._power import PowerCutFailure
from .model import first_mismatch
from .ops import RANGED, Op
from .targets import reference_target

__all__ = ["Checker"]

SECTOR = 512
#: Up to this many bytes of whole units are checked after a burst operation even when the
#: operation touched much less of them.
_WHOLE_UNITS = 64 << 10


class Checker(ChainBuilder):
    """The checking part of a :class:`~pyimago.oracle.session.Session`."""

    def _check_after(self, op: Op, old_size: int, *, burst: bool = False) -> None:
        """The incremental check: the whole disk after a resize, reopen, cache drop or
        sweep (or when ``full_checks`` is set); else the units the operation touched, one
        unit either side, plus a slice of the disk that rotates from step to step.

        ``burst``: an operation of a burst (see ``_burst``), many of which run per step: only
        what a modifying one touched (a read compared what it returned already), and a
        thinner slice (see :meth:`_burst_check`)."""
        model = self.model
        size = model.size
        if self.full_checks or op.kind in FULL_CHECK or size != old_size or size == 0:
            self.stats.bytes_compared += check_image(self.access, model, what="top")
            return
        if burst:
            self._burst_check(op)
            return
        g = model.granularity
        if op.kind in RANGED and op.offset < size:
            start = max(op.offset - g, 0)
            end = min(op.offset + max(op.length, 1) + g, size)
            self.stats.bytes_compared += check_image(self.access, model, what="top",
                                                     start=start, end=end)
        piece = max(-(-size // SLICE_FRACTION), g)
        at = self._slice % size
        self._slice = at + piece
        self.stats.bytes_compared += check_image(self.access, model, what="top",
                                                 start=at, end=at + piece)

    def _burst_check(self, op: Op) -> None:
        """After an operation of a burst: the units it touched (content, shallow and full
        mappings), or, where units are much larger than the range (2 MiB clusters), the
        range a sector either side and the mappings at both its ends; then the rotating
        slice, a ``BURST_SLICE_FRACTION``-th of the disk per operation on average (a whole
        unit every few operations when a unit is larger than that)."""
        model = self.model
        size, g = model.size, model.granularity
        if op.kind not in PASSIVE and op.offset < size:
            lo = max(op.offset - SECTOR, 0)
            hi = min(op.offset + max(op.length, 1) + SECTOR, size)
            units = min(-(-hi // g) * g, size) - lo // g * g
            if units <= max(4 * (hi - lo), _WHOLE_UNITS):
                self.stats.bytes_compared += check_image(self.access, model, what="top",
                                                         start=lo, end=hi)
            else:
                actual = self.access.read(lo, hi - lo)
                expected, known = model.read(lo, hi - lo)
                bad = first_mismatch(actual, expected, known)
                if bad is not None:
                    raise OracleFailure(content_failure("top: content", lo, bad, actual,
                                                        expected), offset=lo + bad)
                self.stats.bytes_compared += hi - lo
                check_small_mapping(self.access, model, op.offset, op.length)
                check_small_mapping(self.access, model, hi - 1, 1)
        self._slice_credit += -(-size // BURST_SLICE_FRACTION)
        piece = max(-(-size // BURST_SLICE_FRACTION), g)
        if self._slice_credit >= piece:
            self._slice_credit -= piece
            at = self._slice % size
            self._slice = at + piece
            self.stats.bytes_compared += check_image(self.access, model, what="top",
                                                     start=at, end=at + piece)

    def check_power_cuts(self, *, final: bool = False) -> int:
        """Check the cut states since the last check (see :class:`PowerCuts`); ``final``:
        the teardown check (more cuts judged, the lower layers compared)."""
        power = self.power
        if power is None or power.rec is None:
            return 0
        opened: list[Access] = []
        try:
            below = self._open_below_for_cuts(opened)
            spec = self.chain.top
            cache = self.chain.l2_cache_tables if spec.format == "qcow2" else None

            def open_cut(storage: MemoryStorage) -> Any:
                rec = power.rec
                data = rec.data_state if isinstance(rec, PairedRecording) else None
                return self.target.open(storage, writable=False, format=spec.format,
                                        backing=below, explicit_backing=spec.format != "raw",
                                        l2_cache_tables=cache,
                                        data_file=None if data is None else
                                        MemoryStorage(bytes(data), name="cut data file"))

            before = (power.stats.states, power.stats.judged, power.stats.leaks,
                      power.stats.mutations)
            checked = power.check(open_cut, step=self.step, final=final)
        except PowerCutFailure as failure:
            raise OracleFailure(str(failure), clauses=failure.clauses) from failure
        finally:
            for access in reversed(opened):
                with contextlib.suppress(Exception):
                    access.close()
        self.stats.crash_checks += 1
        self.stats.crash_states += power.stats.states - before[0]
        self.stats.crash_judged += power.stats.judged - before[1]
        self.stats.crash_leaks += power.stats.leaks - before[2]
        self.stats.crash_mutations += power.stats.mutations - before[3]
        return checked

    def _open_below_for_cuts(self, opened: list[Access]) -> Access:
        """The chain below the top, opened read-only, for opening cut states over."""
        if self.top_index == 0:
            return None
        if self.workdir is not None:
            below = self.target.open(self.layer_location(self.top_index - 1), writable=False,
                                     format=self.chain.layers[self.top_index - 1].format)
            opened.append(below)
            return below
        below = None
        for index in range(self.top_index):
            spec = self.chain.layers[index]
            below = self.target.open(self.layer_location(index), writable=False,
                                     format=spec.format, backing=below,
                                     explicit_backing=spec.format != "raw")
            opened.append(below)
        return below

    def _count_refcounts(self) -> None:
        before, after = self._refcounts_at_start, self._top_refcounts()
        if before is None or after is None:
            return
        self.stats.refcount_blocks_added += max(after.blocks - before.blocks, 0)
        self.stats.refcount_tables_moved += after.table_offset != before.table_offset

    def reference_check(self, when: str) -> None:
        """Read the (closed) chain back with ``pyimago.reference``; check it against the model.

        This is how a symmetric on-disk bug is caught: one the target's own reads undo (an
        entry written to the wrong place and read from the same wrong place).
        """
        ref = reference_target()
        opened: list[Access] = []
        try:
            if self.workdir is not None:
                top = ref.open(self.layer_location(self.top_index), writable=False,
                               format=self.chain.top.format)
                opened.append(top)
            else:
                top = None
                for index, spec in enumerate(self.chain.layers):
                    top = ref.open(self.layer_location(index), writable=False,
                                   format=spec.format, backing=top,
                                   explicit_backing=spec.format != "raw")
                    opened.append(top)
            self.stats.bytes_compared += check_image(
                top, self.model, what=f"top {when}, read back by the reference"
            )
            self.stats.reference_reads += 1
        except OracleFailure:
            raise
        except Exception as exc:
            raise OracleFailure(
                f"differential: the reference cannot read the image the target wrote "
                f"({when}): {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            for access in reversed(opened):
                with contextlib.suppress(Exception):
                    access.close()

    def _memory_verify(self) -> None:
        """Memory chains, which ``qemu-img check`` never sees: the reference's ``check()``
        judges every qcow2 layer once the chain is closed, as QEMU judges file chains.

        interop.qemu-check: images pyimago writes pass the check "with no errors and no
        leaks" -- leaks are allowed only in the states a power cut leaves, not after a
        close.  (Without this, a bug that only leaks, or only miscounts a refcount the
        image's own reads never consult, passes every memory chain.)
        """
        from pyimago.reference import check

        for index, spec in enumerate(self.chain.layers):
            if spec.format != "qcow2" or spec.maker == "qemu" or spec.data_file:
                continue
            storage = self._memory[index]
            image = MemoryStorage(storage.read(0, storage.size()), name=f"layer{index}")
            try:
                result = check(image)
            except Exception as exc:
                raise OracleFailure(
                    f"the reference's check() cannot check layer {index} after close: "
                    f"{type(exc).__name__}: {exc}",
                    clauses=("interop.qemu-check",),
                ) from exc
            self.stats.reference_checks += 1
            if not result.clean:
                found = "; ".join(str(p) for p in result.problems[:5])
                raise OracleFailure(
                    f"check() of layer {index} after close finds {result.corruptions} "
                    f"corruption(s), {result.leaks} leak(s), {result.check_errors} "
                    f"error(s): {found}",
                    clauses=("interop.qemu-check", "qcow2.refcount.no-leaks"),
                )

    def _qemu_verify(self, qemu_img: str) -> None:
        for index, spec in enumerate(self.chain.layers):
            if spec.format != "qcow2":
                continue
            path = self.layer_location(index)
            proc = subprocess.run(
                [qemu_img, "check", "-f", "qcow2", path],
                capture_output=True,
                text=True,
                check=False,
                cwd=self.workdir,  # QEMU 7 finds a relative data file name from there
            )
            self.stats.qemu_checks += 1
            if proc.returncode != 0:
                raise OracleFailure(
                    f"qemu-img check of layer {index} failed (exit {proc.returncode}):\n"
                    f"{proc.stdout}{proc.stderr}",
                    clauses=("interop.qemu-check", "qcow2.refcount.no-leaks"),
                )
        top = self.chain.top
        top_path = self.layer_location(self.top_index)
        if top.format not in ("qcow2", "raw"):
            return  # a driver target's own format: QEMU cannot read it
        if top.format == "qcow2":
            assert self.workdir is not None
            out = os.path.join(self.workdir, "converted.raw")
            proc = subprocess.run(
                [qemu_img, "convert", "-f", "qcow2", "-O", "raw", top_path, out],
                capture_output=True,
                text=True,
                check=False,
                cwd=self.workdir,
            )
            if proc.returncode != 0:
                raise OracleFailure(
                    f"qemu-img convert of the top layer failed (exit {proc.returncode}):\n"
                    f"{proc.stdout}{proc.stderr}",
                    clauses=("interop.qemu-read",),
                )
        else:
            out = top_path
        with open(out, "rb") as f:
            data = f.read()
        if len(data) != self.model.size:
            raise OracleFailure(
                f"qemu-img sees a disk of 0x{len(data):x} bytes, the model 0x{self.model.size:x}",
                clauses=("interop.qemu-read",),
            )
        expected, known = self.model.read(0, self.model.size)
        bad = first_mismatch(data, expected, known)
        if bad is not None:
            raise OracleFailure(
                content_failure("qemu-img convert", 0, bad, data, expected),
                offset=bad,
                clauses=("interop.qemu-read",),
            )
