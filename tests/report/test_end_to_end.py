"""``pyimago conformance`` end to end: the reference, and a deliberately broken implementation."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from pyimago.oracle.report import conformance_main
from pyimago.specs import load_clauses

#: A third-party implementation whose writes lose their last byte (wraps the reference).
BROKEN_IMPL = '''
from __future__ import annotations
from typing import Any
from pyimago import reference


class _Broken:
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __enter__(self) -> "_Broken":
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.close()

    def __str__(self) -> str:
        return str(self._inner)

    def write(self, data: Any, offset: int) -> None:
        data = bytes(data)
        if len(data) > 1:
            data = data[:-1] + b"\\0"
        self._inner.write(data, offset)


def open_image(*args: Any, **kwargs: Any) -> Any:
    if isinstance(kwargs.get("backing"), _Broken):
        kwargs["backing"] = kwargs["backing"]._inner
    return _Broken(reference.open_image(*args, **kwargs))


create_image = reference.create_image
'''


def _clauses(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["id"]: c for a in data["areas"] for c in a["clauses"]}


@pytest.mark.slow(cost=30)
def test_reference_meets_the_contract(tmp_path: Path) -> None:
    out = tmp_path / "reference.json"
    rc = conformance_main(["--impl", "reference", "--no-machines", "--format", "json", "-o",
                           str(out), "-q"])
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["schema_version"] == 1
    assert data["errors"] == []
    clauses = _clauses(data)
    assert set(clauses) == set(load_clauses()), "the report must list every registry clause"
    failing = {
        cid: [f"{e['id']}: {e['message']}" for e in c["evidence"] if e["outcome"] == "failed"]
        for cid, c in clauses.items()
        if c["status"] == "fail"
    }
    assert not failing, f"the reference fails clauses: {json.dumps(failing, indent=1)}"
    totals = data["summary"]["totals"]
    # The tools area (specs/tools.toml) is the image tools' contract, checked against
    # qemu-img by tests/tools, not by the implementation's conformance suite.
    implementation_clauses = [cid for cid in clauses if not cid.startswith("tools.")]
    assert totals["pass"] >= 0.9 * len(implementation_clauses), totals
    assert rc == 0 and data["exit_code"] == 0
    assert data["machines"] is None


@pytest.mark.slow(cost=20)
def test_broken_implementation_fails_with_replays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pyimago_broken_impl.py").write_text(BROKEN_IMPL, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))  # the machines run in this process
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    )
    out = tmp_path / "broken.xml"
    failures = tmp_path / "failures"
    rc = conformance_main(["--impl", "pyimago_broken_impl", "--examples", "5", "--failures-dir",
                           str(failures), "-o", str(out), "-q"])
    assert rc == 1
    root = ET.fromstring(out.read_bytes())  # -o *.xml means JUnit
    cases = {c.get("name"): c for c in root.iter("testcase")}
    lost = cases["access.write.no-short"].find("failure")
    assert lost is not None and lost.get("type") == "must"
    assert "Replay: PYIMAGO_CONFORMANCE_IMPL=pyimago_broken_impl python -m pytest" in (
        lost.text or ""
    )
    machines = cases["oracle.machines"].find("failure")
    assert machines is not None, "the machines did not catch writes losing their last byte"
    replay = [line for line in (machines.text or "").splitlines() if "pyimago replay" in line]
    assert replay, machines.text
    path = Path(replay[0].split("pyimago replay ", 1)[1].strip())
    assert path.is_file() and path.parent == failures
    # Capability probing: the broken module exposes no FormatAccess class.
    na = cases["access.driver.protocol"].find("skipped")
    assert na is not None and (na.get("message") or "").startswith("not-applicable: ")
