"""``run_driver_conformance``: the whole oracle run against one driver, from one call.

Shaped like Hypothesis's ``run_conformance_test``: the state machine is built inside the
function around the target, so a driver's test suite needs one plain test function::

    def test_my_driver_conforms():
        run_driver_conformance(my_driver.target())
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from hypothesis import seed as hypothesis_seed
from hypothesis import settings as Settings
from hypothesis.database import ExampleDatabase
from hypothesis.errors import InvalidArgument
from hypothesis.stateful import run_state_machine_as_test
from pyimago.reference import MemoryStorage

from ..machines import make_machine
from ..profiles import oracle_settings, register_profiles
from ..replay import DEFAULT_FAILURES_DIR
from ..session import OracleFailure, RunStats
from ..targets import ImplementationTarget
from ._stats import ConformanceStats
from ._strategies import driver_chain_specs
from ._target import CREATE_PREALLOCATION, DriverCapabilities, DriverTarget, load_target

__all__ = ["TargetLike", "conformance_settings", "resolve_driver_target", "run_driver_conformance"]

TargetLike = DriverTarget | ImplementationTarget | str
"""What ``run_driver_conformance`` accepts: a target, or its ``module:attribute`` name."""


def _infer_module(target: DriverTarget) -> str | None:
    """``module:attribute`` re-creating ``target``, when its driver's module has a factory
    for it under a usual name (so that replay files can name it for ``pyimago replay``)."""
    module = sys.modules.get(getattr(target.create_image, "__module__", "") or "")
    if module is None:
        return None
    for attr in ("target", "driver_target", "TARGET"):
        candidate = getattr(module, attr, None)
        with contextlib.suppress(Exception):
            if callable(candidate) and not isinstance(candidate, DriverTarget):
                candidate = candidate()
            if (
                isinstance(candidate, DriverTarget)
                and (candidate.name, candidate.format) == (target.name, target.format)
                and candidate.open_image is target.open_image
            ):
                return f"{module.__name__}:{attr}"
    return None


def resolve_driver_target(target: TargetLike) -> DriverTarget | ImplementationTarget:
    """A target object from a target or a ``module:attribute`` name."""
    if isinstance(target, str):
        return load_target(target)
    if not isinstance(target, (DriverTarget, ImplementationTarget)):
        raise TypeError(f"not a DriverTarget: {target!r}")
    if isinstance(target, DriverTarget) and target.module is None:
        spec = _infer_module(target)
        if spec is not None:
            target = dataclasses.replace(target, module=spec)
    return target


def conformance_settings(
    settings: Settings | None = None,
    *,
    profile: str | None = None,
    max_examples: int | None = None,
    steps: int | None = None,
    seed: int | None = None,
    database: str | ExampleDatabase | None = None,
) -> Settings:
    """The Hypothesis settings a conformance run uses.

    ``settings`` when given, else the ``profile`` named (``ci``, ``dev``, ``deep``), else the
    loaded profile unless that is Hypothesis's ``default`` (then ``$HYPOTHESIS_PROFILE``, or
    ``ci`` on CI, else ``dev``).  Always: no deadline (a step builds disk images), the health
    checks a disk-image machine trips by design off, and the run stops at the first failure.
    ``seed`` makes a run random but reproducible (it turns derandomisation off).
    ``database``: an example database, or the ``--database`` URL of one (see
    :func:`~pyimago.oracle.database.open_database`), used whatever the profile says.
    """
    register_profiles()
    if settings is not None:
        base = settings
    elif profile is not None:
        base = Settings.get_profile(profile)
    elif Settings.get_current_profile_name() != "default":
        base = Settings()
    else:
        name = os.environ.get("HYPOTHESIS_PROFILE") or (
            "ci" if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")
            else "dev"
        )
        try:
            base = Settings.get_profile(name)
        except InvalidArgument:
            base = Settings.get_profile("dev")
    overrides: dict[str, Any] = {"deadline": None, "report_multiple_bugs": False}
    if max_examples is not None:
        overrides["max_examples"] = max_examples
    if steps is not None:
        overrides["stateful_step_count"] = steps
    if seed is not None:
        overrides["derandomize"] = False
    if database is not None:
        overrides["database"] = _database(database)
    return oracle_settings(base, **overrides)


def _database(database: str | ExampleDatabase) -> ExampleDatabase:
    if isinstance(database, str):
        from ..database import open_database

        return open_database(database)
    return database


def _expect_unsupported(what: str, call: Callable[[], object]) -> None:
    try:
        call()
    except io.UnsupportedOperation:
        return
    except Exception as exc:
        raise OracleFailure(
            f"{what}: the target does not claim it, so it must raise UnsupportedError; it "
            f"raised {type(exc).__name__}: {exc}",
            clauses=("access.unsupported",),
        ) from exc
    raise OracleFailure(
        f"{what}: the target does not claim it, but it did not raise UnsupportedError",
        clauses=("access.unsupported",),
    )


def _preflight(impl: ImplementationTarget, caps: DriverCapabilities) -> int:
    """Check, once, that what only ``create_image`` could do but is not claimed is refused."""
    layout = caps.layouts[0]
    size = max(4 * layout.granularity, 65536)
    base: dict[str, Any] = {
        "format": caps.format,
        "cluster_size": layout.granularity,
        "compat": layout.compat,
    }
    requests: list[tuple[str, dict[str, Any]]] = []
    if not caps.backing:
        requests.append(
            ("create_image with a backing file", {"backing_file": "base.raw", "backing_fmt": "raw"})
        )
    for mode in sorted(CREATE_PREALLOCATION - caps.create_preallocation):
        requests.append((f"create_image(preallocation={mode!r})", {"preallocation": mode}))
    if not requests:
        return 0
    folder = tempfile.mkdtemp(prefix="pyimago-preflight-")
    try:
        for index, (what, extra) in enumerate(requests):
            location: Any
            if "memory" in caps.storages:
                location = MemoryStorage(name=f"preflight{index}")
            else:
                location = os.path.join(folder, f"preflight{index}.img")

            def create(location: Any = location, extra: dict[str, Any] = extra) -> None:
                impl.create_image(location, size, **base, **extra)

            _expect_unsupported(what, create)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return len(requests)


def run_driver_conformance(
    target: TargetLike,
    *,
    settings: Settings | None = None,
    profile: str | None = None,
    max_examples: int | None = None,
    steps: int | None = None,
    seed: int | None = None,
    failures_dir: str | None = DEFAULT_FAILURES_DIR,
    qemu_img: str | None = "auto",
    echo_failures: bool = False,
    progress: Callable[[ConformanceStats], None] | None = None,
    database: str | ExampleDatabase | None = None,
    worker: str | None = None,
) -> ConformanceStats:
    """Run the oracle's state machine against a driver; return what it exercised.

    ``target``: a :class:`DriverTarget` (or an ``ImplementationTarget``, or the
    ``module:attribute`` naming either).  The machine builds chains the target can handle,
    drives them with the operations it claims, checks every step against the flat model
    (for qcow2 targets also against the reference, on the same sequence), checks that what
    it does not claim raises ``UnsupportedError``, and at teardown of file chains runs
    ``qemu-img check`` when qemu-img is installed.

    Settings: see :func:`conformance_settings` (``max_examples`` / ``steps`` override the
    profile's budget).  The run stops at the first failure; the exception propagates with
    Hypothesis's shrunk program, the oracle's fsx-style log and the replay file (written into
    ``failures_dir``, None for none; ``pyimago replay FILE`` runs it again) attached as notes.
    ``progress`` is called with the counters so far after each example, and once at the end.
    ``database``: an example database or its ``--database`` URL, shared by every run of a
    campaign: its saved failures are replayed first, and a failure found here is saved there,
    as Hypothesis's entry and as a replay record (``pyimago replay --database URL``) naming
    ``worker``.
    """
    resolved = resolve_driver_target(target)
    impl = resolved.implementation() if isinstance(resolved, DriverTarget) else resolved
    caps = impl.capabilities
    run_settings = conformance_settings(
        settings, profile=profile, max_examples=max_examples, steps=steps, seed=seed
    )
    shared = None if database is None else _database(database)
    if shared is not None:
        run_settings = Settings(run_settings, database=shared)
    scratch = None
    if shared is not None and failures_dir is None:
        # The replay record goes to the database by way of a replay file.
        failures_dir = scratch = tempfile.mkdtemp(prefix="pyimago-failures-")
    stats = RunStats()
    start = time.monotonic()
    preflight = 0

    def snapshot() -> ConformanceStats:
        return ConformanceStats.from_run(
            impl.name, stats, time.monotonic() - start, preflight_checks=preflight
        )

    if progress is not None:
        stats.on_example = lambda _: progress(snapshot())
    try:
        if caps is not None:
            preflight = _preflight(impl, caps)
        # An implementation (no capabilities): the machines' own chains, layer features
        # (extended L2, zstd, data files, lazy refcounts) included as probed.
        chains = driver_chain_specs(caps) if caps is not None else None
        machine = make_machine(
            impl,
            chains=chains,
            failures_dir=failures_dir,
            stats=stats,
            qemu_img=qemu_img,
            echo_failures=echo_failures,
            capabilities=caps,
            locality=True,
        )
        if seed is not None:
            machine = hypothesis_seed(seed)(machine)
        run_state_machine_as_test(machine, settings=run_settings)
    except BaseException as exc:
        if isinstance(exc, Exception):
            if shared is not None:
                from ..database import save_replay_files

                save_replay_files(shared, stats.replay_files, worker=worker)
            exc.add_note(snapshot().summary())
        raise
    finally:
        if scratch is not None:
            stats.replay_files.clear()
            shutil.rmtree(scratch, ignore_errors=True)
        if progress is not None:
            progress(snapshot())
    return snapshot()

