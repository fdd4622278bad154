"""check() against ``qemu-img check [-r leaks|all] --output=json``, image by image.

Each implementation's ``check`` must count what qemu-img counts (corruptions, leaks, check
errors, image end offset, cluster statistics) on the QEMU-made corpus, on QEMU's damaged-image
cases (iotests 060/080, ``tests/fixtures/damaged.py``), on power-cut states, and on the peer
images; and ``repair=`` must leave the image as ``qemu-img check -r`` does.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import json
import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyimago_tests_damaged as damaged
import pytest
from pyimago.oracle.crash import RecordingStorage
from pyimago.reference import MemoryStorage, create_image, open_image
from pyimago_tests_qemu import peer_images_folder

from .conftest import QEMU_TIMEOUT, require_qemu

pytestmark = pytest.mark.qemu

IMPLEMENTATIONS = ["pyimago.reference", "pyimago.fast"]

#: qemu-img's JSON fields check() must agree on (absent means 0, as qemu-img leaves zeros out).
FIELDS = (
    "corruptions", "leaks", "check-errors", "corruptions-fixed", "leaks-fixed",
    "image-end-offset", "total-clusters", "allocated-clusters", "fragmented-clusters",
    "compressed-clusters",
)

PEER_IMAGES = peer_images_folder()

#: Images pyimago refuses to open on purpose where QEMU opens them: check() says it cannot
#: check them (exit 1) where qemu-img checks them.  Recorded in specs/ (the clause named).
REFUSED_ON_PURPOSE = {
    "backing-name-nul": "qcow2.header.backing-name: a NUL byte in the backing name is corrupt",
    "invalid-qcow-large-json.img": "qcow2.snapshots.table: a snapshot table over the header",
    "invalid-qcow-large-size.img": "qcow2.header.limits: a disk size past QEMU's limits",
}



@pytest.fixture(params=IMPLEMENTATIONS)
def check(request: pytest.FixtureRequest) -> Callable[..., Any]:
    module = importlib.import_module(request.param)
    fn = getattr(module, "check", None)
    if fn is None:
        pytest.skip(f"{request.param} has no check() yet")
    return fn  # type: ignore[no-any-return]


def qemu_check(path: Path, repair: str | None = None) -> tuple[dict[str, Any] | None, int]:
    """qemu-img check's JSON report (None when it gives none) and exit status; the image's
    backing file is never opened."""
    spec = json.dumps({"driver": "qcow2", "backing": None,
                       "file": {"driver": "file", "filename": str(path)}})
    args = ["qemu-img", "check", "--output=json"]
    if repair:
        args += ["-r", repair]
    proc = subprocess.run([*args, f"json:{spec}"], capture_output=True, text=True,
                          timeout=QEMU_TIMEOUT, check=False)
    try:
        return json.loads(proc.stdout), proc.returncode
    except json.JSONDecodeError:
        return None, proc.returncode


def assert_agrees(check: Callable[..., Any], path: Path, repair: str | None = None) -> None:
    """check(path, repair=repair) on a copy agrees with qemu-img on another copy, and both
    copies end up byte for byte alike after a repair that QEMU could finish."""
    ours_path = path.with_name(path.name + ".ours")
    qemu_path = path.with_name(path.name + ".qemu")
    shutil.copyfile(path, ours_path)
    shutil.copyfile(path, qemu_path)
    theirs, status = qemu_check(qemu_path, repair)
    result = check(ours_path, repair=repair)
    why = "\n".join(str(p) for p in result.problems[:12])
    refused = REFUSED_ON_PURPOSE.get(path.parent.name) or REFUSED_ON_PURPOSE.get(path.name)
    if refused:
        assert result.exit_code == 1 and result.check_errors == 1, (refused, result)
        return
    if theirs is None:
        # qemu-img could not check the image at all (exit 1, "Check failed").
        assert result.exit_code == status == 1, (result, status, why)
        return
    ours = result.to_json()
    diff = {f: (ours.get(f, 0), theirs.get(f, 0)) for f in FIELDS
            if ours.get(f, 0) != theirs.get(f, 0)}
    assert not diff, f"{path.name} repair={repair}: (ours, qemu) {diff}\n{why}"
    assert result.exit_code == status, (result.exit_code, status)
    if repair:
        # The repaired images are now checked alike.
        again, _ = qemu_check(ours_path)
        assert again is not None
        assert (again.get("corruptions", 0), again.get("leaks", 0)) == (
            result.corruptions, result.leaks)


# -- the QEMU-made corpus ------------------------------------------------------------------------


@pytest.mark.clause("qcow2.corrupt.check", "interop.qemu-check")
def test_corpus_image_checks_as_qemu_does(
    check: Callable[..., Any], corpus_image: Any, tmp_path: Path
) -> None:
    if corpus_image.fmt != "qcow2":
        pytest.skip("qemu-img checks qcow2 images only")
    path = tmp_path / "image.qcow2"
    shutil.copyfile(corpus_image.path, path)
    assert_agrees(check, path)


# -- QEMU's damaged-image cases ------------------------------------------------------------------


@pytest.mark.clause("qcow2.corrupt.check", "qcow2.corrupt.repair")
@pytest.mark.parametrize("repair", [None, "leaks", "all"])
@pytest.mark.parametrize("name", damaged.case_names())
def test_damaged_image_checks_and_repairs_as_qemu_does(
    check: Callable[..., Any], tmp_path: Path, name: str, repair: str | None
) -> None:
    require_qemu()
    path = damaged.build_case(name, tmp_path / name)
    assert_agrees(check, path, repair)


@pytest.mark.clause("qcow2.corrupt.check", "qcow2.corrupt.mark")
def test_write_refused_on_metadata_leaves_what_qemu_finds(
    check: Callable[..., Any], tmp_path: Path
) -> None:
    # After the refused write the image carries the corrupt bit; check() still agrees, and
    # repair="all" of a repairable case clears the bit as qemu-img check -r all does.
    require_qemu()
    path = damaged.build_case("060-data-into-refblock", tmp_path)
    with open_image(path, writable=True, backing=None) as img, pytest.raises(ValueError):
        img.write(b"\x2a" * 512, 0)
    assert_agrees(check, path)
    assert_agrees(check, path, "all")


# -- power-cut states ----------------------------------------------------------------------------


def _cut_states(tmp_path: Path, seed: int) -> list[bytes]:
    """Images a power cut leaves in the middle of random writes, discards and a grow."""
    rng = random.Random(seed)
    cs = rng.choice([512, 4096])
    top = MemoryStorage(name="top")
    if rng.random() < 0.3:
        create_image(top, 64 * cs, cluster_size=cs, compat="0.10")
    else:
        create_image(top, 64 * cs, cluster_size=cs, refcount_bits=rng.choice([1, 16, 64]))
    rec = RecordingStorage(top)
    with open_image(rec, writable=True, backing=None) as img:
        for step in range(12):
            at = rng.randrange(0, img.size - 4 * cs)
            if rng.random() < 0.7:
                img.write(bytes([step + 1]) * rng.randint(1, 3 * cs), at)
            else:
                img.discard_to_any(at, rng.randint(1, 4 * cs))
        img.resize(img.size + 20 * cs)
        img.write(b"\xee" * cs, img.size - cs)
    cuts = sorted(rng.sample(range(1, rec.mutations), min(12, rec.mutations - 1)))
    return [bytes(rec.state_after(k)) for k in cuts]


@pytest.mark.clause("qcow2.corrupt.check", "crash.power-cut")
@pytest.mark.parametrize("seed", range(4))
def test_cut_states_check_and_repair_as_qemu_does(
    check: Callable[..., Any], tmp_path: Path, seed: int
) -> None:
    require_qemu()
    for i, state in enumerate(_cut_states(tmp_path, seed)):
        path = tmp_path / f"cut{i}.qcow2"
        path.write_bytes(state)
        assert_agrees(check, path, "leaks" if i % 3 == 2 else None)


# -- peer images ---------------------------------------------------------------------------------


def _peer_images() -> list[Path]:
    if not PEER_IMAGES.is_dir():
        return []
    found = []
    for p in sorted(PEER_IMAGES.rglob("*")):
        name = p.name.removesuffix(".gz")
        if p.is_file() and (name.endswith((".qcow2", ".img"))):
            found.append(p)
    return found


@pytest.mark.clause("qcow2.corrupt.check", "interop.qemu-check")
@pytest.mark.parametrize(
    "peer", _peer_images() or [pytest.param(None, marks=pytest.mark.skip(
        reason=f"no peer images at {PEER_IMAGES}"))],
    ids=lambda p: str(p.relative_to(PEER_IMAGES)) if p else "none",
)
def test_peer_image_checks_as_qemu_does(
    check: Callable[..., Any], tmp_path: Path, peer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_qemu()
    path = tmp_path / peer.name.removesuffix(".gz")
    if peer.name.endswith(".gz"):
        with gzip.open(peer, "rb") as src, path.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    else:
        shutil.copyfile(peer, path)
    if path.read_bytes()[:4] != b"QFI\xfb":
        pytest.skip(f"{peer.name} is not a qcow2 image")
    data = peer.with_name(path.stem + ".bin.gz")
    if data.exists():
        # Its external data file: qemu-img opens it to check (QEMU 7.2 resolves the relative
        # name against the working directory).
        with gzip.open(data, "rb") as src, (tmp_path / data.stem).open("wb") as dst:
            shutil.copyfileobj(src, dst)
        monkeypatch.chdir(tmp_path)
    assert_agrees(check, path)


def _feature_image(folder: Path, options: str) -> tuple[Path, int, int]:
    """A QEMU-made image with ``options`` and some data; returns it, the offset of its first
    L2 table and the cluster size."""
    path = folder / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, str(path), "4M"],
                   check=True, cwd=folder, timeout=QEMU_TIMEOUT)
    cmds = ["write -P 7 0 64k", "write -P 8 100k 3k", "write -z 300k 40k",
            "write -P 9 1M 1M", "discard 1100k 64k"]
    for c in cmds:
        subprocess.run(["qemu-io", "-c", c, str(path)], check=True, cwd=folder,
                       capture_output=True, timeout=QEMU_TIMEOUT)
    head = path.read_bytes()[:64]
    cs = 1 << int.from_bytes(head[20:24], "big")
    l1 = int.from_bytes(head[40:48], "big")
    with path.open("rb") as f:
        f.seek(l1)
        l2 = int.from_bytes(f.read(8), "big") & 0x00FFFFFFFFFFFE00
    return path, l2, cs


#: (name, options, damage: L2 word index -> value, or None for a healthy image)
_FEATURE_CASES = [
    ("extl2", "extended_l2=on", None),
    ("extl2-16k", "extended_l2=on,cluster_size=16k", None),
    ("data-file", "data_file=data.bin,cluster_size=4k", None),
    ("data-file-raw-extl2", "data_file=data.bin,data_file_raw=on,extended_l2=on", None),
    ("extl2-alloc-and-zero", "extended_l2=on", {1: 0x0000000100000001}),
    ("extl2-unallocated-with-bits", "extended_l2=on", {62: 0, 63: 0x3}),
    ("extl2-compressed-bitmap", "extended_l2=on", {62: (1 << 62) | 0x50000, 63: 0x1}),
    ("data-file-no-copied", "data_file=data.bin,cluster_size=4k", {1: 0x1000}),
    ("data-file-compressed", "data_file=data.bin,cluster_size=4k", {40: (1 << 62) | 0x5000}),
]


@pytest.mark.clause("qcow2.check.features", "interop.qemu-check")
@pytest.mark.parametrize(("name", "options", "damage"), _FEATURE_CASES,
                         ids=[c[0] for c in _FEATURE_CASES])
def test_feature_images_check_as_qemu_does(
    check: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    name: str, options: str, damage: dict[int, int] | None,
) -> None:
    """Extended L2 entries and external data files, healthy and damaged, checked and
    repaired as qemu-img does."""
    require_qemu()
    monkeypatch.chdir(tmp_path)
    path, l2, _ = _feature_image(tmp_path, options)
    if damage:
        with path.open("r+b") as f:
            for word, value in damage.items():
                f.seek(l2 + 8 * word)
                f.write(value.to_bytes(8, "big"))
    for repair in (None, "leaks", "all"):
        assert_agrees(check, path, repair)


@pytest.mark.clause("qcow2.check.features", "interop.qemu-check")
@pytest.mark.parametrize("options", [
    {"extended_l2": True}, {"data_file": "d.raw"}, {"data_file": "d.raw", "data_file_raw": True},
    {"data_file": "d.raw", "extended_l2": True},
])
def test_reference_written_feature_images_check_as_qemu_does(
    check: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    options: dict[str, Any],
) -> None:
    """What the reference writes with these features, check() and qemu-img agree on (no
    errors, no leaks, the same cluster statistics)."""
    require_qemu()
    monkeypatch.chdir(tmp_path)  # for qemu-img to find the data file
    path = tmp_path / "img.qcow2"
    create_image(path, 2 * 1024 * 1024, cluster_size=32 * 1024, **options)
    rng = random.Random(3)
    with open_image(path, writable=True) as img:
        for _ in range(40):
            offset = rng.randrange(0, img.size - 70000)
            if rng.random() < 0.7:
                img.write(rng.randbytes(rng.randrange(1, 70000)), offset)
            else:
                img.write_zeroes(offset, rng.randrange(1, 70000))
    assert_agrees(check, path)
