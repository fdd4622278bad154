"""Loading the implementation under test (capabilities), and the command's argument errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyimago.oracle.conformance import Capabilities, ImplError, load_impl
from pyimago.oracle.report import MachineRun, conformance_main

THIRD_PARTY = '''
from types import SimpleNamespace
from pyimago import reference
from pyimago.reference import UnsupportedError


def create_raw_only(target, size, *, format="raw", **options):
    if format != "raw":
        raise UnsupportedError(f"format {format} not supported")
    reference.create_image(target, size, format="raw", **options)


# A module-like target that declares what it supports (as the oracle's targets may).
declared = SimpleNamespace(
    name="declared-raw",
    open_image=reference.open_image,
    create_image=reference.create_image,
    capabilities=SimpleNamespace(formats=("raw",), backing=False),
)
# One whose formats are probed: only an UnsupportedError means "not supported".
probed = SimpleNamespace(open_image=reference.open_image, create_image=create_raw_only)


def factory():
    return declared
'''


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "pyimago_third_party.py").write_text(THIRD_PARTY, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "pyimago_third_party"


def test_builtin_implementations_are_full_qcow2() -> None:
    for name in ("reference", "fast"):
        impl = load_impl(name)
        assert impl.capabilities == Capabilities()
        assert impl.format_access is not None and impl.format_access.__name__ == "FormatAccess"


def test_declared_capabilities_are_honoured(third_party: str) -> None:
    impl = load_impl(f"{third_party}:declared")
    assert impl.name == "declared-raw"
    caps = impl.capabilities
    assert (caps.qcow2, caps.raw, caps.backing, caps.resize) == (False, True, False, True)
    assert caps.missing(["raw", "qcow2", "backing"]) == ["qcow2", "backing"]
    assert load_impl(f"{third_party}:factory").name == "declared-raw"  # a callable target


def test_undeclared_formats_are_probed(third_party: str) -> None:
    caps = load_impl(f"{third_party}:probed").capabilities
    assert (caps.qcow2, caps.raw, caps.format_access) == (False, True, False)


def test_unknown_capability_and_implementation() -> None:
    with pytest.raises(ValueError, match="unknown capability"):
        Capabilities().missing(["teleport"])
    with pytest.raises(ImplError):
        load_impl("pyimago_no_such_module_anywhere")
    with pytest.raises(ImplError):
        load_impl("pyimago.reference:no_such_attribute")


@pytest.mark.parametrize("argv", [
    ["--impl", "pyimago_no_such_module_anywhere"],
    ["--examples", "0"],
    ["--format", "pdf"],
])
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        conformance_main(argv)
    assert info.value.code == 2
    assert "pyimago conformance" in capsys.readouterr().err


def test_help_documents_outputs_and_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        conformance_main(["--help"])
    text = capsys.readouterr().out
    for needle in ("--impl", "--format", "--no-machines", "--profile", "--examples",
                   "pyimago-conformance.html", "standard output", "exit status"):
        assert needle in text, needle


def test_machine_failures_are_attributed_to_cited_clauses() -> None:
    from pyimago_tests_report_synthetic import RECORDS, make_report

    run = MachineRun("failed", "ci", 5, runs=3, steps=9, message="OracleFailure: boom",
                     replay_files=("r.json",), clauses=("access.passes", "unknown.clause"))
    report = make_report(records=RECORDS, machines=run)
    (clause,) = [c for c in report.clauses if c.id == "access.passes"]
    assert clause.status == "fail"
    assert clause.failures[0].replay == "pyimago replay r.json"
    assert [c.id for c in report.clauses if c.id == "oracle.machines"] == ["oracle.machines"]
