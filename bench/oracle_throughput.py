"""Checked operations per second of the oracle's machines (``pyimago run``'s figure).

Runs the state machine against a target on memory chains with a fixed seed, the way
``pyimago run --target pyimago.fast --storage memory`` does, and prints the steps, the
wall time and the rate (steps over the time spent in sessions, as the run summary shows it),
plus what the power-cut checks did.  ``--no-crash`` runs the same with the target's
``crash_safe`` turned off, to show what the power-cut checks cost.

    .venv/bin/python bench/oracle_throughput.py                     # pyimago.fast, 60 examples
    .venv/bin/python bench/oracle_throughput.py --target reference --examples 30

The machine is shared: check ``uptime`` before trusting a figure, and compare runs made
back to back.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from hypothesis import seed as hypothesis_seed
from hypothesis.stateful import run_state_machine_as_test
from pyimago.oracle.machines import make_machine
from pyimago.oracle.profiles import oracle_settings, register_profiles
from pyimago.oracle.session import RunStats
from pyimago.oracle.strategies import chain_specs
from pyimago.oracle.targets import resolve_target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="pyimago.fast")
    parser.add_argument("--examples", type=int, default=60)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-crash", action="store_true",
                        help="turn the target's crash_safe off (no power-cut checks)")
    parser.add_argument("--no-bursts", action="store_true",
                        help="no burst rules (the machine as the test suite runs it)")
    args = parser.parse_args()
    register_profiles()
    from hypothesis import settings

    target = resolve_target(args.target)
    if args.no_crash:
        target = dataclasses.replace(target, crash_safe=False)
    stats = RunStats()
    machine = make_machine(target, chains=chain_specs(storages=("memory",)), stats=stats,
                           failures_dir=None, qemu_img="auto", bursts=not args.no_bursts)
    machine = hypothesis_seed(args.seed)(machine)
    run_settings = oracle_settings(settings.get_profile("dev"), max_examples=args.examples,
                                   stateful_step_count=args.steps, database=None)
    start, cpu = time.monotonic(), time.process_time()
    error = None
    try:
        run_state_machine_as_test(machine, settings=run_settings)
    except Exception as exc:  # a failure still leaves a rate worth printing
        error = exc
    wall, cpu = time.monotonic() - start, time.process_time() - cpu
    seconds = stats.storage_seconds.get("memory", wall)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    modes = [m for m, on in (("no power cuts", args.no_crash), ("no bursts", args.no_bursts)) if on]
    suffix = f" ({', '.join(modes)})" if modes else ""
    print(f"target {target.name}{suffix}, load {load:.1f}")
    print(f"{stats.examples} examples, {stats.steps} steps in {wall:.1f} s wall, "
          f"{seconds:.1f} s in sessions")
    print(f"checked ops/s: {stats.steps / seconds:,.0f} (sessions), "
          f"{stats.steps / wall:,.0f} (wall), {stats.steps / cpu:,.0f} (CPU time of this "
          "process: the figure to compare on a loaded machine; qemu-img runs not counted)")
    print(f"distinct chains: {len(stats.chains)} of {stats.examples} examples")
    print(f"power cuts: {stats.crash_checks} checks, {stats.crash_states} cut states, "
          f"{stats.crash_judged} judged, of {stats.crash_mutations} mutations "
          f"({stats.crash_states / max(stats.crash_mutations, 1):.1%} of them cut)")
    if error is not None:
        print(f"run failed: {type(error).__name__}: {str(error)[:300]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
