"""Every subcommand with bad or edge-case arguments: one line on stderr naming the value, exit
status 2, no traceback, nothing run (GUIDE: CLI errors are checked before any work starts).

The calls run in-process through the dispatcher (``pyimago.cli.main``, what the console
script runs), in a folder holding the files the calls name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from pyimago import cli

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

GOOD_REPLAY = {
    "format": "pyimago-replay",
    "version": 1,
    "target": "reference",
    "chain": {"layers": [{"format": "raw", "size": 4096}], "storage": "memory"},
    "ops": [{"op": "read", "offset": 0, "length": 512}],
}

#: name -> content of the files and folders each call may name (a folder: None).
FILES: dict[str, str | bytes | None] = {
    "adir": None,
    "afile": "just a file\n",
    "broken.json": '{"format": "pyimago-replay", "chain": ',
    "foreign.json": json.dumps({"format": "something-else", "version": 1}),
    "partial.json": json.dumps({"format": "pyimago-replay", "version": 1}),
    "badop.json": json.dumps({**GOOD_REPLAY, "ops": [{"op": "teleport"}]}),
    "future.json": json.dumps({**GOOD_REPLAY, "version": 99}),
    "empty.json": "",
    "list.json": "[1, 2]",
    "binary.json": b"\xff\xfe\x00garbage",
    "good.json": json.dumps(GOOD_REPLAY),
    "huge.json": json.dumps({**GOOD_REPLAY, "chain": {
        "layers": [{"format": "raw", "size": 1 << 50}], "storage": "memory"}}),
    "negative.json": json.dumps({**GOOD_REPLAY, "ops": [{"op": "read", "offset": -512,
                                                         "length": 512}]}),
    "cloud.json": json.dumps({**GOOD_REPLAY, "chain": {
        "layers": [{"format": "raw", "size": 4096}], "storage": "cloud"}}),
    "nolayers.json": json.dumps({**GOOD_REPLAY, "chain": {"layers": []}}),
    "pyimago_cli_nottarget.py": "x = 3\n\ndef five():\n    return 5\n",
    "pyimago_cli_syntaxbad.py": "def broken(:\n",
    "pyimago_cli_raising.py": "raise RuntimeError('import-time boom')\n",
}

# (arguments, a text the one line must contain: the offending value).
CALLS: list[tuple[list[str], str]] = [
    # the dispatcher
    ([], "missing command"),
    (["frob"], "'frob'"),
    (["--frob"], "'--frob'"),
    # run
    (["run", "--examples", "0"], "'0'"),
    (["run", "--examples", "-3"], "'-3'"),
    (["run", "--examples", "many"], "'many'"),
    (["run", "--steps", "-1"], "'-1'"),
    (["run", "--steps", "0"], "'0'"),
    (["run", "--seed", "x"], "'x'"),
    (["run", "--profile", "nope"], "'nope'"),
    (["run", "--storage", "cloud"], "'cloud'"),
    (["run", "--target", "pyimago_cli_no_such_module"], "pyimago_cli_no_such_module"),
    (["run", "--target", "pyimago_cli_nottarget:x"], "pyimago_cli_nottarget:x"),
    (["run", "--target", "pyimago_cli_nottarget:five"], "pyimago_cli_nottarget:five"),
    (["run", "--target", "pyimago_cli_nottarget:missing"], "missing"),
    (["run", "--target", "pyimago_cli_nottarget"], "pyimago_cli_nottarget"),
    (["run", "--target", "pyimago_cli_syntaxbad"], "pyimago_cli_syntaxbad"),
    (["run", "--target", "pyimago_cli_raising"], "import-time boom"),
    (["run", "--failures-dir", "afile"], "afile"),
    (["run", "--path", "nowhere"], "nowhere"),
    (["run", "--bogus"], "--bogus"),
    (["run", "stray"], "stray"),
    (["run", "--database", "afile"], "afile"),
    # replay
    (["replay"], "file"),
    (["replay", "missing.json"], "missing.json"),
    (["replay", "adir"], "adir"),
    (["replay", "broken.json"], "broken.json"),
    (["replay", "foreign.json"], "foreign.json"),
    (["replay", "partial.json"], "partial.json"),
    (["replay", "badop.json"], "teleport"),
    (["replay", "future.json"], "99"),
    (["replay", "empty.json"], "empty.json"),
    (["replay", "list.json"], "list.json"),
    (["replay", "binary.json"], "binary.json"),
    (["replay", "huge.json"], str(1 << 50)),
    (["replay", "negative.json"], "-512"),
    (["replay", "cloud.json"], "'cloud'"),
    (["replay", "nolayers.json"], "no layers"),
    (["replay", "good.json", "--target", "pyimago_cli_no_such_module"],
     "pyimago_cli_no_such_module"),
    (["replay", "good.json", "--target", "pyimago_cli_nottarget:x"], "pyimago_cli_nottarget:x"),
    (["replay", "good.json", "--path", "nowhere"], "nowhere"),
    (["replay", "--database", "afile"], "afile"),
    (["replay", "good.json", "--database", "adir"], "one of them"),
    # fuzz
    (["fuzz"], "target"),
    (["fuzz", "chunkmap"], "'chunkmap'"),
    (["fuzz", "pyimago_cli_no_such_module:target"], "pyimago_cli_no_such_module"),
    (["fuzz", "chunkmap:MAGIC"], "MAGIC"),
    (["fuzz", "pyimago_cli_nottarget:x"], "pyimago_cli_nottarget:x"),
    (["fuzz", "pyimago_cli_syntaxbad:target"], "pyimago_cli_syntaxbad"),
    (["fuzz", "chunkmap:target", "--examples", "0"], "'0'"),
    (["fuzz", "chunkmap:target", "--steps", "-1"], "'-1'"),
    (["fuzz", "chunkmap:target", "--junit", "afile/out.xml"], "afile/out.xml"),
    (["fuzz", "chunkmap:target", "--junit", "adir"], "adir"),
    (["fuzz", "chunkmap:target", "--junit", "nodir/out.xml"], "nodir/out.xml"),
    (["fuzz", "chunkmap:target", "--junit", "/proc/pyimago.xml"], "/proc/pyimago.xml"),
    (["fuzz", "chunkmap:target", "--profile", "nope"], "'nope'"),
    (["fuzz", "chunkmap:target", "--failures-dir", "afile"], "afile"),
    (["fuzz", "chunkmap:target", "--path", "nowhere"], "nowhere"),
    (["fuzz", "chunkmap:target", "--workers", "0"], "'0'"),
    (["fuzz", "chunkmap:target", "--workers", "2", "--duration", "-1"], "'-1'"),
    (["fuzz", "chunkmap:target", "--database", "afile"], "afile"),
    (["fuzz", "chunkmap:target", "--database", "ftp://x"], "ftp://x"),
    (["fuzz", "chunkmap:target", "--workers", "2", "--json", "nodir/s.json"], "nodir/s.json"),
    (["fuzz", "chunkmap:target", "--workers", "2", "--junit", "j.xml"], "--junit"),
    # conformance
    (["conformance", "--impl", "pyimago_cli_no_such_module"], "pyimago_cli_no_such_module"),
    (["conformance", "--impl", "pyimago_cli_nottarget"], "pyimago_cli_nottarget"),
    (["conformance", "--impl", "pyimago.reference:nope"], "nope"),
    (["conformance", "--impl", "pyimago_cli_syntaxbad"], "pyimago_cli_syntaxbad"),
    (["conformance", "--impl", "pyimago_cli_raising"], "import-time boom"),
    (["conformance", "--examples", "0"], "'0'"),
    (["conformance", "--format", "pdf"], "'pdf'"),
    (["conformance", "--profile", "nope"], "'nope'"),
    (["conformance", "-o", "afile/r.md"], "afile/r.md"),
    (["conformance", "-o", "adir"], "adir"),
    (["conformance", "-o", "nodir/r.json"], "nodir/r.json"),
    (["conformance", "--also", "r.pdf"], "r.pdf"),
    (["conformance", "--also", "nodir/r.md"], "nodir/r.md"),
    (["conformance", "--suite-timeout", "0"], "'0'"),
    (["conformance", "--suite-timeout", "soon"], "'soon'"),
    (["conformance", "--failures-dir", "afile"], "afile"),
    (["conformance", "--path", "nowhere"], "nowhere"),
    # the image tools
    (["info", "missing.qcow2"], "missing.qcow2"),
    (["info", "-f", "vmdk", "afile"], "'vmdk'"),
    (["info", "-f", "qcow2", "afile"], "afile"),
    (["info", "adir"], "adir"),
    (["map", "--start-offset", "x", "afile"], "'x'"),
    (["map", "--output", "xml", "afile"], "'xml'"),
    (["map", "missing.img"], "missing.img"),
    (["compare", "afile", "missing.img"], "missing.img"),
    (["compare", "-F", "vmdk", "afile", "afile"], "'vmdk'"),
    (["convert", "-c", "afile", "out.qcow2"], "-c"),
    (["convert", "-O", "vdi", "afile", "out.vdi"], "'vdi'"),
    (["convert", "-O", "qcow2", "-o", "nope=1", "afile", "out.qcow2"], "'nope'"),
    (["convert", "missing.img", "out.raw"], "missing.img"),
    (["convert", "-c", "-O", "raw", "afile", "out.raw"], "-c"),
    (["convert", "-c", "-O", "qcow2", "-o", "data_file=d.bin", "afile", "o.qcow2"], "data_file"),
    (["convert", "-l", "snapshot.bogus=1", "afile", "out.raw"], "snapshot.bogus=1"),
    (["convert", "-l", "s1", "afile", "out.raw"], "afile"),
    (["convert", "-O", "qcow2", "-B", "afile", "afile", "o.qcow2"], "-F"),
    (["convert", "-l", "s1", "afile", "afile", "out.raw"], "-l 's1'"),
    (["convert", "-O", "qcow2", "-B", "afile", "-F", "raw", "afile", "afile", "o.qcow2"],
     "(-B) 'afile'"),
    (["convert", "afile", "missing.img", "out.raw"], "missing.img"),
    (["convert", "afile", "adir", "out.raw"], "adir"),
    (["convert", "afile", "afile"], "also a source"),
    (["create", "-f", "qcow2", "-b", "afile", "-F", "raw", "afile"], "same filename"),
    (["create", "-f", "qcow2", "-u", "-b", "./new.qcow2", "-F", "qcow2", "new.qcow2", "1M"],
     "same filename"),
    (["rebase", "-u", "-b", "afile", "-F", "raw", "afile"], "the image itself"),
    (["check", "-U", "-r", "leaks", "afile"], "-U"),
    (["snapshot", "-U", "-c", "s1", "afile"], "-U"),
    (["create", "-f", "raw", "-o", "preallocation=full", "big.raw", "4E"], "preallocation=full"),
    (["create", "-f", "qcow2", "-o", "preallocation=falloc", "big.qcow2", "4E"], "big.qcow2"),
    (["resize", "--preallocation", "falloc", "afile", "+4E"], "afile"),
    (["commit", "-b", "nope.qcow2", "afile"], "afile"),
    (["rebase", "-p", "-b", "", "missing.img"], "missing.img"),
    (["check", "-p", "missing.img"], "missing.img"),
    (["commit", "-p", "-b", "afile", "missing.img"], "missing.img"),
    (["create", "-f", "qcow2", "-o", "extended_l2=maybe", "new.qcow2", "1M"], "'maybe'"),
    (["create", "-f", "qcow2", "-o", "lazy_refcounts", "new.qcow2", "1M"], "lazy_refcounts"),
    (["create", "-f", "raw", "-o", "data_file=x.bin", "new.raw", "1M"], "'data_file'"),
    (["snapshot", "-l", "-c", "s1", "afile"], "-c"),
    (["snapshot", "-a", "", "afile"], "-a"),
    (["measure", "--size", "lots"], "'lots'"),
    (["create", "-f", "qcow2", "new.qcow2", "1Q"], "1Q"),
    (["create", "-f", "qcow2", "-o", "cluster_size=1000", "new.qcow2", "1M"], "1000"),
    (["create", "-f", "qcow2", "-b", "afile", "new.qcow2"], "afile"),
    (["resize", "missing.img", "1M"], "missing.img"),
    (["check", "missing.img"], "missing.img"),
    (["commit", "missing.img"], "missing.img"),
    (["rebase", "-b", "base.qcow2", "missing.img"], "missing.img"),
    (["snapshot", "-c", "s1", "afile"], "afile"),
    (["snapshot", "-c", "", "afile"], "-c"),
    (["snapshot", "-a", "s1", "-d", "s1", "afile"], "-d"),
    (["snapshot", "-d", "s1", "missing.qcow2"], "missing.qcow2"),
    (["check", "-r", "some", "afile"], "'some'"),
    (["check", "--junit", "nodir/out.xml", "afile"], "nodir/out.xml"),
    (["resize", "afile", "+lots"], "lots"),
    (["measure", "-O", "qcow2", "-o", "cluster_size=3k", "--size", "1M"], "3072"),
]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name, content in FILES.items():
        path = tmp_path / name
        if content is None:
            path.mkdir()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    # The commands put the current folder (and --path) on sys.path: undo it after the test,
    # and forget the test's modules, so each call imports them as a user's run would.
    monkeypatch.setattr(sys, "path", [str(EXAMPLES), *sys.path])
    for module in [m for m in sys.modules if m.startswith("pyimago_cli_")]:
        monkeypatch.delitem(sys.modules, module)
    return tmp_path


def test_the_table_covers_every_subcommand() -> None:
    assert len(CALLS) >= 44
    assert {argv[0] for argv, _ in CALLS if argv} >= {c.name for c in cli.COMMANDS}


@pytest.mark.parametrize(("argv", "needle"), CALLS, ids=[" ".join(a) or "-" for a, _ in CALLS])
def test_bad_call_is_one_line_exit_2(
    argv: list[str], needle: str, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(p.name for p in workdir.iterdir())
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert needle in lines[0], lines[0]
    command = argv[0] if argv and not argv[0].startswith("-") and argv[0] != "frob" else None
    assert lines[0].startswith(f"pyimago {command}: " if command else "pyimago: ")
    assert out == ""
    # Checked before any work: no output file, failures folder or report was left behind.
    assert sorted(p.name for p in workdir.iterdir()) == before
