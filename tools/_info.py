"""``info``: what ``qemu-img info`` says about an image (and, optionally, its chain)."""

from __future__ import annotations

import json
import time
from typing import Any

from pyimago.reference import ImageInfo, SnapshotInfo

from ._bitmaps import read_bitmaps
from ._common import Impl, allocated_size, backing_path, open_chain, size_to_str

__all__ = ["image_info", "info_record", "render_info", "render_snapshots"]


def _snapshot_record(sn: SnapshotInfo) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if sn.icount is not None:
        out["icount"] = sn.icount
    out.update({
        "vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000,
        "name": sn.name,
        "date-sec": sn.date_sec,
        "date-nsec": sn.date_nsec,
        "vm-clock-sec": sn.vm_clock_nsec // 1_000_000_000,
        "id": sn.id,
        "vm-state-size": sn.vm_state_size,
    })
    return out


def info_record(info: ImageInfo, filename: str) -> dict[str, Any]:
    """One layer's record with qemu-img's JSON names (QAPI ``ImageInfo``)."""
    out: dict[str, Any] = {}
    if info.snapshots:
        out["snapshots"] = [_snapshot_record(s) for s in info.snapshots]
    if info.backing_format is not None:
        out["backing-filename-format"] = info.backing_format
    out["virtual-size"] = info.virtual_size
    out["filename"] = filename
    if info.cluster_size is not None:
        out["cluster-size"] = info.cluster_size
    out["format"] = info.format
    out["actual-size"] = allocated_size(filename)
    if info.qcow2 is not None:
        q = info.qcow2
        data: dict[str, Any] = {"compat": q.compat, "compression-type": q.compression_type}
        if q.compat != "0.10":
            data["lazy-refcounts"] = q.lazy_refcounts
            bitmaps = read_bitmaps(filename)
            if bitmaps:
                data["bitmaps"] = bitmaps
        data["refcount-bits"] = q.refcount_bits
        if q.data_file is not None:
            data["data-file"] = q.data_file
        if q.data_file_raw is not None:
            data["data-file-raw"] = q.data_file_raw
        if q.compat != "0.10":
            data["corrupt"] = q.corrupt
            data["extended-l2"] = q.extended_l2
        out["format-specific"] = {"type": "qcow2", "data": data}
    if info.backing_file is not None:
        out["full-backing-filename"] = backing_path(filename, info.backing_file)
        out["backing-filename"] = info.backing_file
    out["dirty-flag"] = info.dirty
    return out


def image_info(
    path: str, *, impl: Impl = "fast", fmt: str | None = None, backing_chain: bool = False,
    force_share: bool = False,
) -> list[dict[str, Any]]:
    """``qemu-img info --output=json`` records: the image's, then (with ``backing_chain``)
    each backing layer's, top first."""
    records: list[dict[str, Any]] = []
    with open_chain(path, impl=impl, fmt=fmt, force_share=force_share) as image:
        layer: Any = image
        name = path
        while layer is not None:
            info = layer.info()
            records.append(info_record(info, name))
            if not backing_chain or info.backing_file is None:
                break
            name = backing_path(name, info.backing_file)
            layer = layer.driver.backing
    return records


_FORMAT_SPECIFIC_LABELS = {
    "compat": "compat",
    "compression-type": "compression type",
    "lazy-refcounts": "lazy refcounts",
    "refcount-bits": "refcount bits",
    "data-file": "data file",
    "data-file-raw": "data file raw",
    "corrupt": "corrupt",
    "extended-l2": "extended l2",
}


def _human_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _human_field(label: str, value: object, indent: int) -> list[str]:
    """One field as QEMU's human QAPI dump prints it (qapi/qmp-dispatch: lists as ``[i]:``
    items, objects as nested fields, each level four spaces deeper)."""
    pad = " " * indent
    if isinstance(value, list):
        lines = [f"{pad}{label}:"]
        for index, item in enumerate(value):
            lines.extend(_human_field(f"[{index}]", item, indent + 4))
        return lines
    if isinstance(value, dict):
        lines = [f"{pad}{label}:"]
        for key, item in value.items():
            lines.extend(_human_field(key, item, indent + 4))
        return lines
    return [f"{pad}{label}: {_human_value(value)}"]


def _snapshot_line(sn: dict[str, Any]) -> str:
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn["date-sec"]))
    secs = sn["vm-clock-sec"]
    clock = (f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}."
             f"{sn['vm-clock-nsec'] // 1_000_000 % 1000:03d}")
    icount = str(sn["icount"]) if "icount" in sn else ""
    return (f"{sn['id']:<9} {sn['name']:<16} {size_to_str(sn['vm-state-size']):>8}"
            f"{date:>20}{clock:>13}{icount:>11}")


def _snapshot_table(snapshots: list[dict[str, Any]]) -> list[str]:
    header = (f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}"
              f"{'ICOUNT':>11}")
    return [header, *(_snapshot_line(sn) for sn in snapshots)]


def render_snapshots(record: dict[str, Any]) -> str:
    """``qemu-img snapshot -l``: the snapshot table (nothing when there is none)."""
    if not record.get("snapshots"):
        return ""
    return "\n".join(["Snapshot list:", *_snapshot_table(record["snapshots"])]) + "\n"


def _human_one(rec: dict[str, Any]) -> str:
    lines = [
        f"image: {rec['filename']}",
        f"file format: {rec['format']}",
        f"virtual size: {size_to_str(rec['virtual-size'])} ({rec['virtual-size']} bytes)",
        f"disk size: {size_to_str(rec['actual-size'])}",
    ]
    if "cluster-size" in rec:
        lines.append(f"cluster_size: {rec['cluster-size']}")
    if rec.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in rec:
        line = f"backing file: {rec['backing-filename']}"
        if rec["full-backing-filename"] != rec["backing-filename"]:
            line += f" (actual path: {rec['full-backing-filename']})"
        lines.append(line)
    if "backing-filename-format" in rec:
        lines.append(f"backing file format: {rec['backing-filename-format']}")
    if rec.get("snapshots"):
        lines.append("Snapshot list:")
        lines.extend(_snapshot_table(rec["snapshots"]))
    if "format-specific" in rec:
        lines.append("Format specific information:")
        for key, value in rec["format-specific"]["data"].items():
            lines.extend(_human_field(_FORMAT_SPECIFIC_LABELS.get(key, key), value, 4))
    return "\n".join(lines) + "\n"


def render_info(records: list[dict[str, Any]], *, output: str = "human",
                backing_chain: bool = False) -> str:
    """The text ``qemu-img info`` prints for ``records`` (``output``: human or json)."""
    if output == "json":
        doc: Any = records if backing_chain else records[0]
        return json.dumps(doc, indent=4) + "\n"
    return "\n".join(_human_one(r) for r in records)
