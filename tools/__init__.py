"""pyimago.tools: qemu-img's image tools (info, map, measure, compare, convert, create,
resize...) over either implementation.

Every tool takes ``impl``: ``"fast"`` (the default engine), ``"reference"`` (to cross-check),
or an implementation module with ``open_image``/``create_image``.  The tools use only the
public ``FormatAccess`` API of that implementation.  Their JSON uses qemu-img's field names.
"""

from __future__ import annotations

from ._chain import commit
from ._check import check_json, render_check, run_check, write_junit
from ._common import ToolError, implementation
from ._compare import CompareResult, compare
from ._convert import ConvertOptions, convert
from ._create import create, resize
from ._info import image_info, render_info
from ._map import MapEntry, map_image, render_map
from ._measure import measure, render_measure
from ._rebase import rebase
from ._snapshot import apply_snapshot, create_snapshot, delete_snapshot

__all__ = [
    "CompareResult",
    "ConvertOptions",
    "MapEntry",
    "ToolError",
    "apply_snapshot",
    "check_json",
    "commit",
    "compare",
    "convert",
    "create",
    "create_snapshot",
    "delete_snapshot",
    "image_info",
    "implementation",
    "map_image",
    "measure",
    "rebase",
    "render_check",
    "render_info",
    "render_map",
    "render_measure",
    "resize",
    "run_check",
    "write_junit",
]
