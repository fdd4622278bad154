"""Power cuts inside the machines: the top layer's storage recorded, cut states judged.

A :class:`PowerCuts` belongs to one :class:`~pyimago.oracle.session.Session` whose target
promises crash safety (``crash_safe``).  The session opens its top layer through
:meth:`PowerCuts.recorder` (a :class:`~pyimago.oracle.crash.RecordingStorage` kept across
reopens), adds a :class:`~pyimago.oracle.crash.TimelinePoint` after every operation
(:meth:`PowerCuts.point`, built from the flat model: no extra read of the image), and at
chosen steps and at teardown calls :meth:`PowerCuts.check`, which rebuilds the states a cut
after each mutation since the last check would leave (a sample when there are many) and
holds each to ``crash.power-cut``.  The lower layers are fingerprinted when the chain is
built: ``crash.readonly-open`` says no read-only open may change a byte of them.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyimago.reference import MemoryStorage

from ._journal import PairedRecording
from .crash import (
    CHUNK,
    SECTOR,
    ChunkedContent,
    CrashTimeline,
    CutJudge,
    CutVerdict,
    RecordingStorage,
    TimelinePoint,
    check_cut,
    start_judge,
    unknown_ranges,
)
from .model import FlatModel

__all__ = ["PowerCutFailure", "PowerCutStats", "PowerCuts"]

#: Cut states rebuilt per check (all of them when there are no more mutations than this).
MAX_CUTS = 12
#: Of those, how many the judge (``qemu-img check``, or the reference's ``check()``) sees:
#: a qemu-img run costs tens of milliseconds, the content rule well under one.
MAX_JUDGED = 2


class PowerCutFailure(Exception):
    """A cut state broke the crash rule; ``clauses`` names the clause it breaks."""

    def __init__(self, message: str, clauses: tuple[str, ...]) -> None:
        super().__init__(message)
        self.clauses = clauses


@dataclass(slots=True)
class PowerCutStats:
    """What the power-cut checks did in one session."""

    checks: int = 0
    states: int = 0
    judged: int = 0
    leaks: int = 0
    mutations: int = 0
    """Storage mutations the checks covered (one cut state after each could be checked)."""


class PowerCuts:
    """Records a session's top layer and checks what a power cut can leave of it."""

    def __init__(self, judge: CutJudge | None, *, max_cuts: int = MAX_CUTS,
                 max_judged: int = MAX_JUDGED) -> None:
        self.judge = judge
        self.max_cuts = max_cuts
        self.max_judged = max_judged
        self.stats = PowerCutStats()
        self.rec: RecordingStorage | None = None
        #: What records the top (a PairedRecording for a top with an external data file).
        self.recording: Callable[[Any], RecordingStorage] = RecordingStorage
        self.timeline: CrashTimeline | None = None
        self._checked: int | None = None
        self._lower: list[tuple[str, Callable[[], bytes], bytes]] = []
        # The last point's content and unknown ranges, chunk by chunk, and what they were
        # taken from: the next point copies only the chunks the model marks changed.
        self._chunks: list[bytes] = []
        self._loose: list[tuple[tuple[int, int], ...]] = []
        self._source: tuple[int, int] = (0, 0)
        #: The buffer each cut state's content is read into.
        self._scratch = bytearray()

    # -- recording ----------------------------------------------------------------------------

    def watch_lower(self, name: str, read: Callable[[], bytes]) -> None:
        """Fingerprint a lower (read-only) layer now; :meth:`check` compares it again."""
        self._lower.append((name, read, bytes(read())))

    def recorder(self, inner: Any, model: FlatModel) -> RecordingStorage:
        """The recorded top storage: a new one over ``inner`` the first time, else the same
        log continued over ``inner`` (a reopened file); ``model`` gives the initial point."""
        if self.rec is None:
            self.rec = self.recording(inner)
            self.timeline = CrashTimeline(self._point(model, durable=True, label="open"))
        else:
            self.rec.inner = inner
        return self.rec

    def _point(self, model: FlatModel, *, durable: bool, label: str,
               extra: tuple[tuple[int, int], ...] = ()) -> TimelinePoint:
        assert self.rec is not None
        content, loose = self._content(model)
        # Sector-widened: the rule judges whole sectors.
        wide = tuple((a - a % SECTOR, -(-(a + n) // SECTOR) * SECTOR - (a - a % SECTOR))
                     for a, n in extra)
        return TimelinePoint(self.rec.mutations, content, durable, loose + wide, label)

    def _content(self, model: FlatModel) -> tuple[ChunkedContent, tuple[tuple[int, int], ...]]:
        """The model's content now, sharing the chunks no operation changed since the last
        point (those the model marks changed are copied), and its unknown ranges."""
        lo, hi = model.take_dirty()
        size = model.size
        chunks, loose = self._chunks, self._loose
        source = (id(model), id(model.data))
        if source != self._source or len(chunks) != -(-size // CHUNK) \
                or (chunks and sum(map(len, chunks[-1:])) != size - (len(chunks) - 1) * CHUNK):
            # Another model, a new disk (a snapshot applied) or a new size: all of it.
            self._source = source
            lo, hi = 0, size
            chunks[:] = [b""] * -(-size // CHUNK)
            loose[:] = [()] * len(chunks)
        data, known = memoryview(model.data), memoryview(model.known)
        for i in range(lo // CHUNK, min(-(-hi // CHUNK), len(chunks))):
            a, b = i * CHUNK, min((i + 1) * CHUNK, size)
            chunks[i] = bytes(data[a:b])
            # Chunks are whole sectors, so each chunk's sector-widened runs stay inside it.
            loose[i] = tuple((a + x, n) for x, n in unknown_ranges(bytes(known[a:b])))
        return ChunkedContent(tuple(chunks)), tuple(itertools.chain.from_iterable(loose))

    def point(self, model: FlatModel, label: str, *, durable: bool = False,
              unspecified: tuple[tuple[int, int], ...] = ()) -> None:
        """The image after one operation, as the model says it is."""
        if self.timeline is None:
            return
        self.timeline.add(self._point(model, durable=durable, label=label, extra=unspecified))

    # -- checking -----------------------------------------------------------------------------

    def check(self, open_cut: Callable[[MemoryStorage], Any], *, step: int,
              final: bool = False) -> int:
        """Check the cut states since the last check; return how many were checked.

        Raises :class:`PowerCutFailure` on the first broken one.  The sample (when there are
        more than ``max_cuts``) depends only on ``step`` and the mutation count, so a replay
        checks the same cuts.
        """
        if final:
            self._check_lower()
        rec, timeline = self.rec, self.timeline
        if rec is None or timeline is None:
            return 0
        self.stats.checks += 1
        self.stats.mutations += rec.mutations - (self._checked or 0)
        rng = random.Random(step * 1_000_003 + rec.mutations)
        # The cut at the last check's end was checked then (as that check's last state).
        since = 0 if self._checked is None else self._checked + 1
        cuts = rec.sample_cuts(since, self.max_cuts, rng) if since <= rec.mutations else []
        # The judge is the costly part: at teardown ``max_judged`` cuts, else one.
        budget = self.max_judged if final else min(self.max_judged, 1)
        stride = max(1, -(-len(cuts) // budget)) if budget else 0
        judged = set(cuts[::-1][::stride][:budget]) if stride else set()
        # The judge also looks at up to two of the cuts around the latest metadata writes
        # (see RecordingStorage.pointer_cuts): a refcount written after the entry that uses
        # it, or dropped before the entry stops using it, shows only to the judge, and only
        # in the few states between those two writes.
        pointer = [k for k in rec.pointer_cuts(since) if k in cuts]
        if budget and pointer:
            judged |= set(rng.sample(pointer, min(len(pointer), self.max_judged)))
        # And every cut right after a new pointer in the L1 or the refcount table (the few
        # newest: see RecordingStorage.new_pointer_cuts), not a sample: a structure written
        # after its pointer breaks in those states alone, and only the judge sees it.
        fresh = rec.new_pointer_cuts(since) if budget and since <= rec.mutations else []
        if fresh:
            cuts = sorted({*cuts, *fresh})
            judged |= set(fresh)
        pending: dict[int, Callable[[], tuple[int, int, list[str]]]] = {}
        last = rec.mutations
        final_state: bytearray | None = None
        if self.judge is not None and last in judged:
            # The last cut state first: its judge (qemu-img) runs while the states before it
            # are rebuilt and checked (then it is checked itself, not rebuilt again).
            final_state = rec.state_after(last)
            pending[last] = start_judge(self.judge, final_state)
        failed: CutVerdict | None = None
        state = bytearray()
        try:
            # (A paired recording rebuilds its data file's state alongside: it replays all.)
            reuse = not isinstance(rec, PairedRecording)
            states = rec.cut_states(cuts[:-1] if final_state is not None and reuse else cuts)
            if final_state is not None and reuse:
                states = itertools.chain(states, [(last, final_state)])
            for k, state in states:
                if self.judge is not None and k in judged and k not in pending:
                    pending[k] = start_judge(self.judge, state)
                verdict = check_cut(k, state, timeline, open_cut, scratch=self._scratch)
                self.stats.states += 1
                if verdict.problems:
                    failed = verdict
                    break
        finally:
            # Every judge started is waited for (its temporary file goes): the first cut in
            # order that breaks the rule, by content or by the judge, is the one reported.
            for k in sorted(pending):
                corrupt, leaks, msgs = pending[k]()
                self.stats.judged += 1
                self.stats.leaks += leaks
                if not corrupt or (failed is not None and k > failed.cut):
                    continue
                found = [f"cut after mutation {k}: check finds {corrupt} corruption(s)", *msgs]
                if failed is not None and k == failed.cut:
                    failed.problems[:0] = found
                else:
                    failed = CutVerdict(k, judged=True, corruptions=corrupt, leaks=leaks,
                                        problems=found)
        if failed is not None:
            clause = "crash.readonly-open" if failed.readonly_write else "crash.power-cut"
            raise PowerCutFailure(
                f"power cut after storage mutation {failed.cut} "
                f"({rec.describe_mutation(failed.cut)}; {rec.synced} synced): "
                + "\n  ".join(failed.problems),
                (clause,),
            )
        # Later cuts lie after this point: forget the log, and the timeline before the last
        # durable point (every later window starts there or later).
        # (The last state rebuilt is the storage now: the new base, with no second replay.)
        rec.checkpoint(state if cuts and cuts[-1] == rec.mutations else None)
        self._checked = rec.mutations
        points = timeline.points
        last = max(i for i, p in enumerate(points) if p.durable or i == 0)
        del points[:last]
        return len(cuts)

    def _check_lower(self) -> None:
        for name, read, before in self._lower:  # a memcmp: cheaper than any hash
            if read() != before:
                raise PowerCutFailure(
                    f"{name}, only ever opened read-only, changed", ("crash.readonly-open",)
                )

