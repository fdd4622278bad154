"""Run the oracle's Hypothesis state machines against an implementation, for a bounded budget.

The machines (:func:`pyimago.oracle.machines.make_machine`) drive random operation sequences
on backing chains and compare every step with the flat model.  A failure is shrunk by
Hypothesis; its final run writes a replay file (``pyimago replay FILE``).  The oracle's
failures name no spec clause yet, so unless the exception carries ``clauses`` (a sequence of
clause IDs), the result is reported under the synthetic clause ``oracle.machines``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pyimago.oracle.conformance import load_impl

from ._model import MachineRun

__all__ = ["machine_target", "run_machines"]

#: Seconds between progress lines.
_PROGRESS_EVERY = 3.0


def machine_target(impl: str) -> Any:
    """The oracle's ImplementationTarget for an implementation named as ``--impl`` names it."""
    from pyimago.oracle.targets import ImplementationTarget, module_target, reference_target

    if impl in ("", "reference"):
        return reference_target()
    if impl == "fast":
        return module_target("pyimago.fast", name="fast")
    loaded = load_impl(impl)
    obj = loaded.obj
    if isinstance(obj, ImplementationTarget):
        return obj
    module = getattr(obj, "__name__", None)
    if isinstance(module, str) and ":" not in impl:
        return module_target(impl)
    return ImplementationTarget(
        name=loaded.name,
        open_image=loaded.open_image,
        create_image=loaded.create_image,
        module=None,
    )


def _clauses_of(error: BaseException) -> tuple[str, ...]:
    cited = getattr(error, "clauses", None) or getattr(error, "clause", None)
    if isinstance(cited, str):
        return (cited,)
    if isinstance(cited, (list, tuple)):
        return tuple(str(c) for c in cited)
    return ()


def _run_driver(
    target: Any,
    profile: str,
    budget: int,
    failures_dir: str,
    progress: Callable[[str], None] | None,
) -> MachineRun:
    # A DriverTarget: the driver machines (pyimago fuzz), which build the chains it claims
    # to handle, rather than the generic ones it may not.
    from pyimago.oracle.fuzz import ConformanceStats, run_driver_conformance

    started = time.monotonic()
    last: list[ConformanceStats] = []
    shown = [started]

    def tick(stats: ConformanceStats) -> None:
        last[:] = [stats]
        now = time.monotonic()
        if progress is not None and now - shown[0] >= _PROGRESS_EVERY:
            shown[0] = now
            progress(f"machines: {stats.examples} runs, {stats.steps} steps so far")

    try:
        stats = run_driver_conformance(target, profile=profile, max_examples=budget,
                                       failures_dir=failures_dir, progress=tick)
    except Exception as exc:
        got = last[0] if last else None
        return MachineRun(
            "failed",
            profile,
            budget,
            runs=got.examples if got else 0,
            steps=got.steps if got else 0,
            duration=time.monotonic() - started,
            message=f"{type(exc).__name__}: {exc}".strip(),
            details="\n".join(getattr(exc, "__notes__", ())),
            replay_files=got.replay_files if got else (),
            clauses=_clauses_of(exc),
            ops=dict(got.ops) if got else {},
        )
    return MachineRun("passed", profile, budget, runs=stats.examples, steps=stats.steps,
                      duration=time.monotonic() - started, ops=dict(stats.ops))


def run_machines(
    impl: str,
    *,
    profile: str = "ci",
    examples: int | None = None,
    failures_dir: str = ".pyimago-failures",
    progress: Callable[[str], None] | None = None,
) -> MachineRun:
    """Run the machines against ``impl``; failures come back in the result, never raised."""
    started = time.monotonic()
    try:
        from hypothesis import settings
        from hypothesis.reporting import with_reporter
        from hypothesis.stateful import run_state_machine_as_test
        from pyimago.oracle.machines import make_machine
        from pyimago.oracle.profiles import register_profiles
        from pyimago.oracle.session import RunStats
    except ImportError as exc:
        return MachineRun("skipped", profile, examples or 0,
                          message=f"the oracle's machines cannot run here: {exc}")

    register_profiles()
    base = settings.get_profile(profile)
    budget = examples if examples is not None else base.max_examples
    loaded = load_impl(impl)
    from pyimago.oracle.fuzz import DriverTarget

    if isinstance(loaded.obj, DriverTarget):
        return _run_driver(loaded.obj, profile, budget, failures_dir, progress)
    caps = loaded.capabilities
    if not (caps.qcow2 and caps.raw and caps.backing):
        return MachineRun(
            "not-applicable",
            profile,
            budget,
            message="the machines build qcow2 and raw backing chains, which "
            f"{impl} does not claim to support",
        )
    stats = RunStats()
    if progress is not None:
        report_progress = progress
        last = [time.monotonic()]

        def on_example(s: RunStats) -> None:
            # Hypothesis runs many short cases while shrinking: a line every few seconds.
            now = time.monotonic()
            if now - last[0] >= _PROGRESS_EVERY:
                last[0] = now
                report_progress(f"machines: {s.examples} runs, {s.steps} steps so far")

        stats.on_example = on_example
    captured: list[str] = []
    try:
        target = machine_target(impl)
        machine = make_machine(target, stats=stats, failures_dir=failures_dir)
        with with_reporter(lambda value: captured.append(str(value))):
            run_state_machine_as_test(machine, settings=settings(base, max_examples=budget))
    except Exception as exc:
        return MachineRun(
            "failed",
            profile,
            budget,
            runs=stats.examples,
            steps=stats.steps,
            duration=time.monotonic() - started,
            message=f"{type(exc).__name__}: {exc}".strip(),
            # Hypothesis attaches the falsifying program and the oracle's log as notes.
            details="\n".join([*captured, *getattr(exc, "__notes__", ())]),
            replay_files=tuple(stats.replay_files),
            clauses=_clauses_of(exc),
            ops=dict(stats.ops),
        )
    return MachineRun(
        "passed",
        profile,
        budget,
        runs=stats.examples,
        steps=stats.steps,
        duration=time.monotonic() - started,
        ops=dict(stats.ops),
    )
