"""``check``: qemu-img check's verdict on an image, its JSON, and a JUnit file for CI.

The work is the implementation's ``check(image, repair=)`` (``pyimago.fast`` where it has
one, else ``pyimago.reference``); this module only chooses, prints and writes files.
Exit statuses are qemu-img's: 0 clean, 1 the check could not finish, 2 corruptions remain,
3 only leaks remain.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from types import ModuleType
from typing import Any
from xml.etree import ElementTree

from pyimago.reference import CheckResult

from ._common import Impl, ToolError, implementation, open_chain, require_file

__all__ = ["check_engine", "check_json", "render_check", "run_check", "timed_check", "write_junit"]


def check_engine(impl: Impl) -> ModuleType:
    """The module whose ``check`` runs: ``impl``'s, or the reference's when ``impl`` (the
    fast engine, by default) has none yet."""
    module = implementation(impl)
    if hasattr(module, "check"):
        return module
    return implementation("reference")


def run_check(path: str, *, repair: str | None = None, impl: Impl = "fast",
              fmt: str | None = None,
              progress: Callable[[int, int], None] | None = None,
              force_share: bool = False) -> CheckResult:
    """Check (and with ``repair`` "leaks" or "all", repair) the image at ``path``;
    ``progress`` is called with (L1 entries walked, L1 entries in all) as check goes;
    ``force_share`` checks an image another process holds (qemu-img check -U)."""
    require_file(path)
    if repair not in (None, "leaks", "all"):
        raise ToolError(f"-r must be 'leaks' or 'all', not {repair!r}")
    if fmt == "raw":
        raise ToolError(f"{path}: this image format (raw) does not support checks")
    extra = {} if progress is None else {"progress": progress}
    engine = check_engine(impl)
    if force_share:
        if repair is not None:
            # qemu-img: "force-share=on can only be used with read-only images".
            raise ToolError(f"-U (force share) cannot be used with -r {repair}: a repair "
                            "writes to the image")
        # check() takes an open image: opened read-only without the lock checks.
        with open_chain(path, impl=engine, fmt=fmt, force_share=True, no_backing=True) as image:
            shared: CheckResult = engine.check(image, **extra)
        return replace(shared, filename=path)
    result: CheckResult = engine.check(path, repair=repair, **extra)
    return result


#: qemu-img.c collect_image_check: these are reported only when not zero.
_OMITTED_WHEN_ZERO = ("image-end-offset", "total-clusters", "allocated-clusters",
                      "fragmented-clusters", "compressed-clusters")


def check_json(result: CheckResult) -> dict[str, Any]:
    """qemu-img check's JSON: ``CheckResult.to_json()`` without the statistics qemu-img
    leaves out when they are zero (its ``has_*`` flags)."""
    return {k: v for k, v in result.to_json().items()
            if not (k in _OMITTED_WHEN_ZERO and v == 0)}


def render_check(result: CheckResult, *, output: str = "human") -> str:
    """What ``qemu-img check`` prints on stdout (qemu-img.c ``dump_human_image_check``)."""
    if output == "json":
        return json.dumps(check_json(result), indent=4) + "\n"
    out: list[str] = []
    if result.corruptions_fixed or result.leaks_fixed:
        out.append("The following inconsistencies were found and repaired:\n\n"
                   f"    {result.leaks_fixed} leaked clusters\n"
                   f"    {result.corruptions_fixed} corruptions\n\n"
                   "Double checking the fixed image now...")
    if result.clean:
        out.append("No errors were found on the image.")
    else:
        if result.corruptions:
            out.append(f"\n{result.corruptions} errors were found on the image.\n"
                       "Data may be corrupted, or further writes to the image may corrupt it.")
        if result.leaks:
            out.append(f"\n{result.leaks} leaked clusters were found on the image.\n"
                       "This means waste of disk space, but no harm to data.")
        if result.check_errors:
            out.append(f"\n{result.check_errors} internal errors have occurred during the "
                       "check.")
    total, allocated = result.total_clusters or 0, result.allocated_clusters or 0
    if total and allocated:
        out.append(
            f"{allocated}/{total} = {allocated * 100.0 / total:0.2f}% allocated, "
            f"{(result.fragmented_clusters or 0) * 100.0 / allocated:0.2f}% fragmented, "
            f"{(result.compressed_clusters or 0) * 100.0 / allocated:0.2f}% compressed clusters"
        )
    if result.image_end_offset:
        out.append(f"Image end offset: {result.image_end_offset}")
    return "\n".join(out) + "\n"


def write_junit(path: str, result: CheckResult, seconds: float) -> None:
    """A JUnit XML file with one test case for the image: failed when corruptions or leaks
    remain, an error when the check could not finish.  Written next to nothing else, so a
    CI system can show the verdict without parsing qemu-img's output."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ToolError(f"--junit {path!r}: folder {folder!r} does not exist")
    failed = 1 if (result.corruptions or result.leaks) else 0
    errors = 1 if result.check_errors else 0
    suite = ElementTree.Element(
        "testsuite", name="pyimago check", tests="1", failures=str(failed),
        errors=str(errors), skipped="0", time=f"{seconds:.3f}",
    )
    case = ElementTree.SubElement(suite, "testcase", classname="pyimago.check",
                                  name=result.filename, time=f"{seconds:.3f}")
    details = "\n".join(str(p) for p in result.problems)
    summary = json.dumps(check_json(result), sort_keys=True)
    if errors:
        node = ElementTree.SubElement(case, "error", type="check-errors",
                                      message=f"{result.check_errors} check errors")
        node.text = details or summary
    elif failed:
        node = ElementTree.SubElement(
            case, "failure", type="corruptions" if result.corruptions else "leaks",
            message=f"{result.corruptions} corruptions, {result.leaks} leaked clusters",
        )
        node.text = details or summary
    out = ElementTree.SubElement(case, "system-out")
    out.text = summary
    suites = ElementTree.Element("testsuites")
    suites.append(suite)
    tree = ElementTree.ElementTree(suites)
    ElementTree.indent(tree)
    tmp = f"{path}.tmp"
    tree.write(tmp, encoding="utf-8", xml_declaration=True)
    os.replace(tmp, path)


def timed_check(path: str, **kwargs: Any) -> tuple[CheckResult, float]:
    """``run_check`` and the seconds it took (for the JUnit file)."""
    start = time.monotonic()
    result = run_check(path, **kwargs)
    return result, time.monotonic() - start
