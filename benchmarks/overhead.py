"""What fwdecomp adds to calls *without* tangents, as a user meets it: enabled once, in its own process.

Run from the repository root::

    .venv/bin/python -m benchmarks.overhead                  # every covered operator, both sizes (~4 min)
    .venv/bin/python -m benchmarks.overhead --only cdist --rounds 5

Each state runs in fresh processes, rotated over ``--rounds`` rounds:

- ``primal``: fwdecomp not enabled (PyTorch's kernel alone);
- ``Python kernel``: ``fwdecomp.enable()`` with ``FWDECOMP_ROUTER=python``;
- ``compiled router``: ``fwdecomp.enable()`` with ``FWDECOMP_ROUTER=native`` (:mod:`fwdecomp.router`);
- ``control``: fwdecomp not enabled, a second time: its difference from ``primal``
  is the measurement's own noise.

Each process times every operator (median of batches of back-to-back calls); a
cell is the median over rounds, minus ``primal``'s. Why processes: toggling
fwdecomp inside one process (registering and removing kernels between batches)
moves glibc's heap, after which a memory-bound kernel's 1-16 MB results may be
page-faulted afresh on every call: +5 to +2,300 µs that neither router causes
and a process that enables fwdecomp once never sees.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

import torch

import fwdecomp
from benchmarks._common import Variant, format_seconds, markdown_table, measure
from benchmarks.sizes import SIZE_NAMES, benchmark_sample, prepared, runs_on_cpu
from fwdecomp import _torch

__all__ = ["STATES", "added", "goals", "measure_in_processes", "render", "time_calls"]

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: state -> FWDECOMP_ROUTER for an enabled process, or None for PyTorch alone.
STATES: dict[str, str | None] = {"primal": None, "python": "python", "native": "native", "control": None}
LABELS = {"python": "Python kernel", "native": "compiled router", "control": "control: primal again"}


def time_calls(sizes: tuple[str, ...], dtype: torch.dtype, only: str | None, batches: int) -> dict[str, float]:
    """Seconds per call of every CPU operator at each size (this process, as it is now); keys ``name|size``."""
    seconds = {}
    for op in fwdecomp.registry.operators():
        name = _torch.qualified_name(op)
        if (only and only not in name) or not runs_on_cpu(op):
            continue
        for size in sizes:
            sample, _ = benchmark_sample(name, fwdecomp.registry.lookup(op).samples, size, dtype)
            if sample is None:
                continue
            f, primals, _ = prepared(op, sample)

            def call(f=f, primals=primals) -> None:
                with torch.no_grad():
                    f(*primals)

            per_call = measure({name: Variant(call)}, repeats=batches, min_batch_seconds=0.02)[name]
            if isinstance(per_call, str):  # measure reports a call that raises
                raise RuntimeError(f"{name} ({size}): {per_call}")
            seconds[f"{name}|{size}"] = per_call
    return seconds


def _worker(state: str, options: list[str]) -> dict[str, float]:
    env = {**os.environ}
    if STATES[state] is not None:
        env["FWDECOMP_ROUTER"] = STATES[state]
    command = [sys.executable, "-m", "benchmarks.overhead", "--worker", state, *options]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False, cwd=_ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"the {state} worker failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_in_processes(
    sizes: tuple[str, ...],
    rounds: int = 3,
    dtype: str = "float32",
    only: str | None = None,
    threads: int = 1,
    batches: int = 7,
) -> dict[str, dict[str, float]]:
    """``{"name|size": {state: median seconds per call over rounds}}``, each state in fresh processes."""
    options = ["--sizes", ",".join(sizes), "--dtype", dtype, "--threads", str(threads), "--batches", str(batches)]
    options += ["--only", only] if only else []
    # Without a compiled router (status() says why) its column stays empty.
    states = [s for s in STATES if s != "native" or fwdecomp.router.status().kind == "native"]
    runs: dict[str, dict[str, list[float]]] = {}
    for _ in range(rounds):
        for state in states:
            for key, seconds in _worker(state, options).items():
                runs.setdefault(key, {}).setdefault(state, []).append(seconds)
    return {key: {state: statistics.median(v) for state, v in by_state.items()} for key, by_state in runs.items()}


def added(times: dict[str, float], state: str) -> float | None:
    """Seconds ``state`` adds to ``primal`` (None where either is missing)."""
    if state not in times or "primal" not in times:
        return None
    return times[state] - times["primal"]


def goals(pairs: list[tuple[float, float]]) -> str:
    """How many ``(seconds added, primal seconds)`` pairs meet the goals: under 5 µs, under 2%."""
    return (
        f"under 5 µs on {sum(d < 5e-6 for d, _ in pairs)} of {len(pairs)}, "
        f"under 2% on {sum(d < 0.02 * p for d, p in pairs)} of {len(pairs)}"
    )


def _cell(times: dict[str, float], state: str) -> str:
    delta = added(times, state)
    return "" if delta is None else f"{delta * 1e6:+.2f} µs ({100 * delta / times['primal']:+.1f}%)"


def render(costs: dict[str, dict[str, float]]) -> str:
    """The side-by-side table and, per size, how many calls meet the goals (< 5 µs, < 2%)."""
    rows = []
    for key, times in costs.items():
        name, size = key.split("|")
        rows.append([f"`{name}`", size, format_seconds(times.get("primal"))] + [_cell(times, s) for s in LABELS])
    lines = [markdown_table(["operator", "size", "primal", *LABELS.values()], rows), ""]
    for size in SIZE_NAMES:
        for state, label in LABELS.items():
            pairs = [(added(t, state), t["primal"]) for key, t in costs.items() if key.endswith(f"|{size}")]
            pairs = [(d, p) for d, p in pairs if d is not None]
            if pairs:
                lines.append(
                    f"{size}, {label}: median {1e6 * statistics.median(d for d, _ in pairs):+.2f} µs; {goals(pairs)}"
                )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(SIZE_NAMES), type=lambda s: tuple(x for x in s.split(",") if x))
    parser.add_argument("--rounds", type=int, default=3, help="processes per state (default 3)")
    parser.add_argument("--batches", type=int, default=7, help="timed batches per operator and process")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--only", default=None, help="only operators whose name contains this")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in each process (default 1)")
    parser.add_argument("--json", default=None, help="also write the raw figures here")
    parser.add_argument("--worker", choices=tuple(STATES), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        if STATES[args.worker] is not None:
            fwdecomp.enable()
        seconds = time_calls(args.sizes, getattr(torch, args.dtype), args.only, args.batches)
        print(json.dumps(seconds))
        return 0
    costs = measure_in_processes(args.sizes, args.rounds, args.dtype, args.only, args.threads, args.batches)
    print(
        f"torch {torch.__version__}, {platform.machine()}, {args.threads} thread(s), {args.dtype}, {args.rounds} rounds"
    )
    print(f"fwdecomp: {fwdecomp.router.status()}")
    print(render(costs))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(costs, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
