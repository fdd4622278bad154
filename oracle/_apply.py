"""Applying operations for a session: each op run on the implementation and the model
side by side (reads compared as they return), and the path counters it feeds."""

from __future__ import annotations

import io
import itertools

from pyimago.reference import InvalidRequestError

from ._chain import Access
from ._check import OracleFailure, check_small_mapping, content_failure
from ._feature_run import (
    FEATURE_KINDS,
    open_snapshot,
    resize_v2_with_snapshots,
    run_feature_op,
    v2_resize_refused,
)
from ._op_table import PAST_END_OPS, LogEntry
from ._verify import Checker
from .model import FlatModel, first_mismatch
from .ops import RANGED, Op, OpKind, pattern

__all__ = ["Applier"]

#: What readinto and readv buffers hold before the call (a byte no zero run has).
_UNREAD = b"\xa5"


#: Operations the implementation and the flat model both take as ``name(offset, length)``.
_CLEARS: dict[OpKind, str] = {
    OpKind.WRITE_ZEROES: "write_zeroes",
    OpKind.DISCARD_TO_ZERO: "discard_to_zero",
    OpKind.DISCARD_TO_ANY: "discard_to_any",
    OpKind.DISCARD_TO_BACKING: "discard_to_backing",
}


class Applier(Checker):
    """The operations part of a :class:`~pyimago.oracle.session.Session`."""

    def _count(self, op: Op) -> None:
        """The path counters of one applied operation (see ``RunStats``)."""
        if op.kind not in RANGED or op.kind is OpKind.WRITE_PAST_END or op.length <= 0:
            return
        g = self.model.granularity
        start, end = op.offset, op.offset + op.length
        if self.chain.top.format == "qcow2" and op.kind is not OpKind.GET_MAPPING:
            span = self.chain.top.l2_span
            if start // span != (end - 1) // span:
                self.stats.l2_crossings += 1
        reads = op.kind in (OpKind.READ, OpKind.READINTO, OpKind.READV)
        if reads or op.kind in (OpKind.WRITE, OpKind.WRITEV, OpKind.ENSURE_DATA_MAPPING):
            for a, b in self._compressed:
                if a < end and start < b:
                    # Reads go through them; writes copy-on-write from the partial clusters.
                    over = min(b, end) - max(a, start)
                    self.stats.compressed_reads += max(1, -(-over // g)) if reads else 1
        n = self.read_parallelization if reads else self.write_parallelization
        if n > 1 and op.kind is not OpKind.GET_MAPPING and (end - 1) // g > start // g:
            self.stats.parallel_jobs += 1

    def _touch(self, op: Op, size: int) -> None:
        if op.kind is OpKind.SWEEP:
            stride = max(op.value, 1)
            spans = [(pos, op.length) for pos in range(op.offset, size, stride)]
        elif op.kind in RANGED and op.kind is not OpKind.WRITE_PAST_END:
            spans = [(op.offset, op.length)]
        else:
            return
        g = self.model.granularity
        for offset, length in spans:
            end = min(offset + length, size)
            if end > offset:
                self._touched.update(range(offset // g, (end - 1) // g + 1))

    def unsupported_reason(self, op: Op, layer: int, model: FlatModel) -> str | None:
        """What of ``op`` the target does not claim to support (None: it is claimed)."""
        caps = self.capabilities
        if caps is None or self.chain.layers[layer].format not in caps.formats:
            return None
        kind = op.kind
        if kind.value.startswith("discard_to_") and not caps.supports_discard(kind.value):
            return kind.value
        if kind is OpKind.RESIZE:
            if op.value > model.size and not caps.supports_grow(op.prealloc):
                return f"grow with {op.prealloc.value}" if caps.resize_grow else "grow"
            if op.value < model.size and not caps.resize_shrink:
                return "shrink"
        return None

    def _expect_unsupported(self, access: Access, op: Op, reason: str) -> None:
        try:
            if op.kind is OpKind.RESIZE:
                access.resize(op.value, op.prealloc)
            else:
                getattr(access, op.kind.value)(op.offset, op.length)
        except io.UnsupportedOperation:
            self.stats.unsupported_checked += 1
            return
        except Exception as exc:
            raise OracleFailure(
                f"{op.describe()}: the target does not claim '{reason}', so it must raise "
                f"UnsupportedError; it raised {type(exc).__name__}: {exc}",
                offset=op.offset if op.kind in RANGED else None,
                clauses=("access.unsupported",),
            ) from exc
        raise OracleFailure(
            f"{op.describe()}: the target does not claim '{reason}', but the request did not "
            "raise UnsupportedError",
            offset=op.offset if op.kind in RANGED else None,
            clauses=("access.unsupported",),
        )

    def _run(self, access: Access, model: FlatModel, op: Op, layer: int) -> None:
        self.step += 1
        step = self.step
        self.log.append(LogEntry(step, layer, op))
        kind = op.kind
        off, length = op.offset, op.length
        reason = self.unsupported_reason(op, layer, model)
        if reason is not None:
            self._expect_unsupported(access, op, reason)
        elif kind is OpKind.READ:
            self._compare_read(model, off, length, access.read(off, length), "read")
        elif kind is OpKind.WRITE:
            data = pattern(step, off, length)
            access.write(data, off)
            model.write(off, data)
        elif kind in _CLEARS:
            # The implementation and the model take the same call (write_zeroes, discards).
            getattr(access, _CLEARS[kind])(off, length)
            getattr(model, _CLEARS[kind])(off, length)
        elif kind is OpKind.WRITE_PAST_END:
            self._past_end(access, model, op, step)
        elif kind is OpKind.RESIZE and v2_resize_refused(self.chain.layers[layer], model,
                                                         op.value) is not False:
            resize_v2_with_snapshots(access, model, op)
        elif kind is OpKind.RESIZE:
            access.resize(op.value, op.prealloc)
            model.resize(op.value, op.prealloc)
        elif kind is OpKind.FLUSH:
            access.flush()
        elif kind is OpKind.INVALIDATE:
            access.flush()
            access.invalidate_cache()
        elif kind is OpKind.REOPEN:
            self._reopen()
        elif kind is OpKind.SWEEP:
            stride = max(op.value, 1)
            for pos in range(off, model.size, stride):
                n = min(length, model.size - pos)
                data = pattern(step, pos, n)
                access.write(data, pos)
                model.write(pos, data)
                if self.power is not None and self._recording:
                    # Each write of the sweep is a state a cut may show.
                    self.power.point(model, f"{op.describe()}: write at 0x{pos:x}")
        elif kind is OpKind.READ_PARALLEL:
            access.set_read_parallelization(op.value)
            self.read_parallelization = op.value
        elif kind is OpKind.WRITE_PARALLEL:
            access.set_write_parallelization(op.value)
            self.write_parallelization = op.value
        elif kind in (OpKind.READINTO, OpKind.READV):
            # Filled with junk, not zeroes: a read that leaves part of the caller's buffer
            # untouched (where zeroes are due: past a shorter backing, a hole) must show.
            buffers = [bytearray(_UNREAD * n) for n in op.buffers]
            if kind is OpKind.READINTO:
                access.readinto(buffers[0], off)
            else:
                access.readv(buffers, off)
            self._compare_read(model, off, length, b"".join(buffers), kind.value)
        elif kind is OpKind.WRITEV:
            data = pattern(step, off, length)
            view = memoryview(data)
            cuts = [0]
            for n in op.buffers:
                cuts.append(cuts[-1] + n)
            access.writev([view[a:b] for a, b in itertools.pairwise(cuts)], off)
            model.write(off, data)
        elif kind is OpKind.ENSURE_DATA_MAPPING:
            self._ensure_and_write(access, model, op, step)
        elif kind is OpKind.GET_MAPPING:
            check_small_mapping(access, model, off, length)
        elif kind is OpKind.SYNC:
            access.flush()
            access.sync()
        elif kind is OpKind.POWER_CUT:
            self.check_power_cuts()
        elif kind in FEATURE_KINDS:
            self.stats.bytes_compared += run_feature_op(
                access, model, op, step, lambda key: open_snapshot(self, key),
                self.chain.layers[layer])
        else:  # pragma: no cover - every kind is handled above
            raise AssertionError(f"unhandled operation {kind}")

    def _compare_read(
        self, model: FlatModel, off: int, length: int, actual: bytes, call: str
    ) -> None:
        if len(actual) != length:
            raise OracleFailure(
                f"{call} of 0x{length:x} bytes at 0x{off:x} returned 0x{len(actual):x}",
                offset=off,
            )
        expected, known = model.read(off, length)
        bad = first_mismatch(actual, expected, known)
        if bad is not None:
            raise OracleFailure(
                content_failure(call, off, bad, actual, expected), offset=off + bad
            )
        self.stats.bytes_compared += length

    def _ensure_and_write(self, access: Access, model: FlatModel, op: Op, step: int) -> None:
        """``ensure_data_mapping``, then the guest data written straight to the storage it
        returned: what a caller doing its own I/O (a block job, an NBD server) does."""
        overwrite = op.mode != "keep"
        # Keeping: what the range reads now must still read so where we do not write.
        before = b"" if overwrite else bytes(access.read(op.offset, op.length))
        if before:
            self._compare_read(model, op.offset, op.length, before, "read before ensure")
        storage, host, mapped = access.ensure_data_mapping(op.offset, op.length, overwrite)
        if not 0 < mapped <= op.length:
            raise OracleFailure(
                f"ensure_data_mapping(0x{op.offset:x}, 0x{op.length:x}) mapped 0x{mapped:x} "
                "bytes: it maps 1..length bytes",
                offset=op.offset,
                clauses=("access.mapping.tiling",),
            )
        # Keeping: write only the first half, so the rest must still read what it did.
        n = mapped if overwrite else max(1, mapped // 2)
        data = pattern(step, op.offset, n)
        storage.write(data, host)
        # The whole mapped range is now this layer's data: ours, then what it read before.
        model.write(op.offset, data + before[n:mapped])

    def _past_end(self, access: Access, model: FlatModel, op: Op, step: int) -> None:
        name = op.mode or "write"
        if name not in PAST_END_OPS:
            raise ValueError(f"write_past_end: unknown operation {name!r}")
        if model.in_range(op.offset, op.length):
            raise ValueError(f"write_past_end: {op.describe()} lies inside the disk")
        try:
            if name == "write":
                access.write(pattern(step, op.offset, op.length), op.offset)
            else:
                getattr(access, name)(op.offset, op.length)
        except InvalidRequestError:
            return
        except io.UnsupportedOperation:
            # A discard the target does not implement may say so before checking the range.
            if self.capabilities is None or self.capabilities.supports_discard(name):
                raise
            return
        raise OracleFailure(
            f"{name} of 0x{op.length:x} bytes at 0x{op.offset:x} runs past the disk end "
            f"0x{model.size:x} but was not rejected with InvalidRequestError",
            offset=max(op.offset, model.size),
        )

    def _reopen(self) -> None:
        self.access.flush()
        self._close_all()
        if self._differential:
            self.reference_check("after close")
        self.access = self._open_layer(self.top_index, writable=True)
        if self.read_parallelization != 1:
            self.access.set_read_parallelization(self.read_parallelization)
        if self.write_parallelization != 1:
            self.access.set_write_parallelization(self.write_parallelization)
