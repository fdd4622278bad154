"""``snapshot`` and ``convert -l``: naming an internal snapshot as qemu-img does, and
creating, applying and deleting snapshots through the FormatAccess snapshot calls.

qemu-img takes a snapshot either as one word (an ID or a name: QEMU looks up the ID first,
then the name, ``bdrv_snapshot_load_tmp_by_id_or_name``) or, for ``convert -l``, as
``snapshot.id=ID[,snapshot.name=NAME]`` options (both given: one snapshot must match both,
``find_snapshot_by_id_and_name``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyimago.reference import SnapshotInfo

from ._common import Impl, ToolError, open_chain

__all__ = ["SnapshotKey", "apply_snapshot", "create_snapshot", "delete_snapshot",
           "find_snapshot", "parse_snapshot_key"]

#: qemu-img.c SNAPSHOT_OPT_BASE: a -l value starting so is a list of snapshot options.
_OPT_BASE = "snapshot."
_OPT_NAMES = ("id", "name")


@dataclass(frozen=True, slots=True)
class SnapshotKey:
    """How a snapshot was named: ``either`` (one word: ID, else name), or ``id`` and/or
    ``name`` (``snapshot.id=``/``snapshot.name=``: every one given must match)."""

    either: str | None = None
    id: str | None = None
    name: str | None = None

    def __str__(self) -> str:
        if self.either is not None:
            return self.either
        parts = [f"snapshot.{k}={v}" for k, v in (("id", self.id), ("name", self.name))
                 if v is not None]
        return ",".join(parts)


def parse_snapshot_key(text: str) -> SnapshotKey:
    """A ``-l`` value: ``snapshot.id=..,snapshot.name=..`` options or one ID-or-name word."""
    if not text:
        raise ToolError("the snapshot name (-l) must not be empty")
    if not text.startswith(_OPT_BASE):
        return SnapshotKey(either=text)
    given: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        field = key[len(_OPT_BASE):] if key.startswith(_OPT_BASE) else None
        if not sep or field not in _OPT_NAMES:
            raise ToolError(f"invalid snapshot parameter {item!r} in {text!r} "
                            "(use snapshot.id=ID and/or snapshot.name=NAME)")
        given[field] = value
    return SnapshotKey(id=given.get("id"), name=given.get("name"))


def find_snapshot(snapshots: Sequence[SnapshotInfo], key: SnapshotKey, path: str,
                  label: str | None = None) -> SnapshotInfo:
    """The snapshot ``key`` names, found in QEMU's order (first match in table order)."""
    if key.either is not None:
        found = next((s for s in snapshots if s.id == key.either), None) or next(
            (s for s in snapshots if s.name == key.either), None)
    else:
        found = next((s for s in snapshots
                      if (key.id is None or s.id == key.id)
                      and (key.name is None or s.name == key.name)), None)
    if found is None:
        raise ToolError(f"{path}: can't find snapshot {label or str(key)!r}")
    return found


def create_snapshot(path: str, name: str, *, impl: Impl = "fast", fmt: str | None = None
                    ) -> SnapshotInfo:
    """``qemu-img snapshot -c NAME``: a new internal snapshot of the image's current state."""
    if not name:
        raise ToolError("the snapshot name (-c) must not be empty")
    with open_chain(path, impl=impl, fmt=fmt, writable=True) as image:
        # pyimago's snapshot API keeps names unique (QEMU allows duplicates): refused here,
        # before the implementation is asked to write anything.
        if any(s.name == name for s in _listed(image, path)):
            raise ToolError(f"{path}: a snapshot named {name!r} exists already")
        _require_writes(image, path)
        info: SnapshotInfo = image.create_snapshot(name)
        image.flush()
        image.sync()
        return info


def apply_snapshot(path: str, key: str, *, impl: Impl = "fast", fmt: str | None = None) -> None:
    """``qemu-img snapshot -a``: revert the disk to the snapshot (ID first, then name)."""
    with open_chain(path, impl=impl, fmt=fmt, writable=True) as image:
        found = find_snapshot(_listed(image, path), SnapshotKey(either=key), path)
        _require_writes(image, path)
        image.apply_snapshot(found.id)
        image.flush()
        image.sync()


def delete_snapshot(path: str, key: str, *, impl: Impl = "fast", fmt: str | None = None
                    ) -> None:
    """``qemu-img snapshot -d``: remove the snapshot named ``key``.

    By name only, as qemu-img: img_snapshot finds it with ``bdrv_snapshot_find``, which
    compares names (``-a`` looks up the ID first)."""
    with open_chain(path, impl=impl, fmt=fmt, writable=True) as image:
        found = find_snapshot(_listed(image, path), SnapshotKey(name=key), path, key)
        _require_writes(image, path)
        image.delete_snapshot(found.id)
        image.flush()
        image.sync()


def _listed(image: Any, path: str) -> tuple[SnapshotInfo, ...]:
    """The image's snapshots (refusing a raw image: it has none to change)."""
    info = image.info()
    if info.format != "qcow2":
        raise ToolError(f"{path}: only qcow2 images have internal snapshots, not {info.format}")
    snapshots: tuple[SnapshotInfo, ...] = info.snapshots
    return snapshots


def _require_writes(image: Any, path: str) -> None:
    for call in ("create_snapshot", "apply_snapshot", "delete_snapshot"):
        if not hasattr(image, call):
            raise ToolError(f"{path}: this implementation cannot write internal snapshots yet "
                            f"(FormatAccess.{call} is missing)")
