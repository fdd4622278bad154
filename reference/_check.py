"""What an image consistency check reports: the contract type of ``check()``.

Both implementations' ``check(image, *, repair=None)`` return a :class:`CheckResult`; its
counts and exit code mean what ``qemu-img check`` means by them (QEMU's ``BdrvCheckResult``
and ``qemu-img check --output=json``), so a CI pipeline can gate on either tool alike.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "CHECK_EXIT_CODES",
    "CheckProblem",
    "CheckResult",
    "ProblemKind",
    "RepairMode",
]

#: ``repair=`` values, as ``qemu-img check -r`` names them.
RepairMode = Literal["leaks", "all"]

#: qemu-img check's exit codes (docs/tools/qemu-img.rst, "check").
CHECK_EXIT_CODES = {
    "clean": 0,
    "check-failed": 1,
    "corruptions": 2,
    "leaks": 3,
}


class ProblemKind(enum.Enum):
    """How bad one finding is, as qemu-img check counts it."""

    #: A cluster with a refcount that nothing references (or a refcount higher than its
    #: references): space is lost, no data is at risk.  Counted in ``leaks``.
    LEAK = "leak"
    #: Metadata that can lose data or make us overwrite it: a refcount lower than the
    #: references, overlapping metadata, a wrong COPIED flag, an entry outside the file, a
    #: malformed entry.  Counted in ``corruptions``.
    CORRUPTION = "corruption"
    #: The check itself could not finish a part of its work (I/O error, unreadable table).
    #: Counted in ``check_errors``.
    CHECK_ERROR = "check-error"


@dataclass(frozen=True, slots=True)
class CheckProblem:
    """One finding: its kind, the host offset it is about (when there is one), and what."""

    kind: ProblemKind
    offset: int | None
    message: str
    repaired: bool = False

    def __str__(self) -> str:
        where = f" at 0x{self.offset:x}" if self.offset is not None else ""
        fixed = " (repaired)" if self.repaired else ""
        return f"{self.kind.value}{where}: {self.message}{fixed}"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of checking (and possibly repairing) one image file.

    ``corruptions``, ``leaks`` and ``check_errors`` count what is *still* wrong after any
    repair, as qemu-img reports them; ``corruptions_fixed`` and ``leaks_fixed`` what the
    repair fixed.  The cluster statistics are those of qemu-img's JSON (None where the
    format has no such notion, e.g. raw).  ``problems`` lists every finding, repaired ones
    included.
    """

    filename: str
    format: str
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int | None = None
    total_clusters: int | None = None
    allocated_clusters: int | None = None
    fragmented_clusters: int | None = None
    compressed_clusters: int | None = None
    problems: tuple[CheckProblem, ...] = field(default=())

    @property
    def clean(self) -> bool:
        """No corruption, no leak, no check error left."""
        return not (self.corruptions or self.leaks or self.check_errors)

    @property
    def exit_code(self) -> int:
        """qemu-img check's exit code for this result: 0 clean, 1 the check failed, 2
        corruptions remain, 3 only leaks remain."""
        if self.check_errors:
            return CHECK_EXIT_CODES["check-failed"]
        if self.corruptions:
            return CHECK_EXIT_CODES["corruptions"]
        if self.leaks:
            return CHECK_EXIT_CODES["leaks"]
        return CHECK_EXIT_CODES["clean"]

    def to_json(self) -> dict[str, Any]:
        """The result with qemu-img check's JSON field names (``--output=json``)."""
        out: dict[str, Any] = {
            "filename": self.filename,
            "format": self.format,
            "check-errors": self.check_errors,
        }
        if self.image_end_offset is not None:
            out["image-end-offset"] = self.image_end_offset
        for key, value in (
            ("total-clusters", self.total_clusters),
            ("allocated-clusters", self.allocated_clusters),
            ("fragmented-clusters", self.fragmented_clusters),
            ("compressed-clusters", self.compressed_clusters),
        ):
            if value is not None:
                out[key] = value
        if self.leaks:
            out["leaks"] = self.leaks
        if self.corruptions:
            out["corruptions"] = self.corruptions
        if self.leaks_fixed:
            out["leaks-fixed"] = self.leaks_fixed
        if self.corruptions_fixed:
            out["corruptions-fixed"] = self.corruptions_fixed
        return out
