"""Per-call time of a JVP through each decomposed operator: eager backend vs graph backend.

For every registered decomposition (so new ones are included automatically)
and two sizes, it times ``torch.func.jvp`` of the operator on one sample,
with fwdecomp enabled, under each backend, and prints a Markdown table.
Tangent rules are switched off (``--rules`` keeps them): where one applies it
answers before either backend runs, so both columns would time the rule.

Sizes: *small* is the operator's first sample; *realistic* comes from
:mod:`benchmarks.sizes` (the table ``benchmarks.ops`` uses too) or, for an
operator without an entry, is its largest sample (most input elements),
marked ``(largest sample)`` in the table. Dtype: float32 where the decomposition supports it.

Method: each measurement is ``number`` back-to-back calls (chosen so that
one measurement takes about ``--target`` seconds), repeated ``--repeats``
times with the two backends interleaved in every repeat; the per-call time
is the median over repeats. On CPU the clock is the process's CPU time
(``time.process_time``) with ``--threads`` intra-op threads (default 1), so
that other processes sharing the machine do not distort the figures; on
CUDA it is wall-clock time between device synchronisations. The graph
backend is warmed up first (its first call traces; that time is reported
separately, wall-clock, as "first call"). The ratio is eager time / graph
time: above 1 the graph backend is faster. "ops" is the number of aten
calls in the traced graph.

    .venv/bin/python benchmarks/backends.py                 # all operators, CPU
    .venv/bin/python benchmarks/backends.py --ops pdist --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Callable

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fwdecomp
from benchmarks.sizes import benchmark_sample
from fwdecomp import tangent_rules
from fwdecomp.backends import graph
from fwdecomp.checks import differentiable_positions, sample_function
from fwdecomp.registry import Sample

aten = torch.ops.aten


def _size(sample: Sample) -> int:
    return sum(a.numel() for a in sample.args if isinstance(a, torch.Tensor))


def _shapes(sample: Sample) -> str:
    return " ".join("x".join(map(str, a.shape)) for a in sample.args if isinstance(a, torch.Tensor))


def _cases(op, device: str, dtype: torch.dtype) -> list[tuple[str, Sample]]:
    entry = fwdecomp.registry.lookup(op)
    samples = [s for s in entry.samples(device, dtype) if _size(s) > 0 and differentiable_positions(s)]
    name = fwdecomp.registry.lookup(op).name
    if not samples:  # e.g. the CUDA-only attention kernels on CPU
        return []
    realistic, how = benchmark_sample(name, entry.samples, "realistic", dtype, device)
    label = "realistic" if how == "size table" else "realistic (largest sample)"
    return [("small", samples[0]), (label, realistic)]


def _jvp_call(op, sample: Sample) -> Callable[[], object]:
    positions = differentiable_positions(sample)
    f = sample_function(op, sample, positions)
    primals = tuple(sample.args[i] for i in positions)
    gen = torch.Generator(device=primals[0].device).manual_seed(0)
    tangents = tuple(torch.randn(p.shape, dtype=p.dtype, device=p.device, generator=gen) for p in primals)
    return lambda: torch.func.jvp(f, primals, tangents)


def _per_call(call: Callable[[], object], number: int, sync: Callable[[], None], clock: Callable[[], float]) -> float:
    sync()
    start = clock()
    for _ in range(number):
        call()
    sync()
    return (clock() - start) / number


def measure(
    op, sample: Sample, repeats: int, target: float, sync: Callable[[], None], clock: Callable[[], float]
) -> dict[str, object]:
    """Median per-call seconds under each backend, and the graph backend's first (tracing) call."""
    call = _jvp_call(op, sample)
    fwdecomp.use_backend("graph")
    graph.cache_clear()
    start = time.perf_counter()
    call()
    sync()
    trace = time.perf_counter() - start
    entry = next((e for e in graph.default_backend().entries() if e.op == op), None)
    kind = entry.kind if entry is not None else "?"
    ops = sum(n.op == "call_function" for n in entry.graph.graph.nodes) if entry is not None and entry.graph else 0
    for backend in ("eager", "graph"):  # warm-up
        fwdecomp.use_backend(backend)
        for _ in range(2):
            call()
    fwdecomp.use_backend("eager")
    once = _per_call(call, 3, sync, time.perf_counter)
    number = max(1, int(target / max(once, 1e-7)))
    times: dict[str, list[float]] = {"eager": [], "graph": []}
    for _ in range(repeats):
        for backend in ("eager", "graph"):
            fwdecomp.use_backend(backend)
            times[backend].append(_per_call(call, number, sync, clock))
    fwdecomp.use_backend("eager")
    return {
        "eager": statistics.median(times["eager"]),
        "graph": statistics.median(times["graph"]),
        "trace": trace,
        "kind": kind,
        "ops": ops,
    }


def _format_time(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs" if seconds < 1e-2 else f"{seconds * 1e3:,.1f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--target", type=float, default=0.1, help="seconds per measurement (default 0.1)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads on CPU (default 1)")
    parser.add_argument("--ops", default="", help="only operators whose name contains this")
    parser.add_argument(
        "--rules", action="store_true", help="keep tangent rules on (they answer before either backend runs)"
    )
    args = parser.parse_args(argv)
    device = args.device
    if device.startswith("cuda"):
        sync, clock, timer = torch.cuda.synchronize, time.perf_counter, "wall-clock"
    else:
        torch.set_num_threads(args.threads)
        sync, clock, timer = (lambda: None), time.process_time, f"CPU time, {args.threads} thread(s)"
    start = time.perf_counter()
    graph.explain("aten::_pdist_forward", torch.zeros(3, 2, device=device))  # the first trace imports torch._dynamo
    warm_up = time.perf_counter() - start
    rules = "tangent rules on" if args.rules else "tangent rules off (the decompositions themselves)"
    print(f"torch {torch.__version__}, {device}, {timer}, median of {args.repeats}, {rules}")
    print(f"(the first trace in a process also imports torch._dynamo for fake tensors: {warm_up:.1f} s here)\n")
    print("| operator | size | shapes | eager | graph | eager / graph | ops | first call |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    with fwdecomp.enabled(), contextlib.nullcontext() if args.rules else tangent_rules.disabled():
        for op in fwdecomp.registry.operators():
            entry = fwdecomp.registry.lookup(op)
            if args.ops not in entry.name:
                continue
            dtype = torch.float32 if torch.float32 in entry.dtypes else entry.dtypes[0]
            for size, sample in _cases(op, device, dtype):
                result = measure(op, sample, args.repeats, args.target, sync, clock)
                ratio = result["eager"] / result["graph"]
                note = "" if result["kind"] == "graph" else f" ({result['kind']})"
                print(
                    f"| `{entry.name}` | {size} | {_shapes(sample)} | {_format_time(result['eager'])} | "
                    f"{_format_time(result['graph'])}{note} | {ratio:.2f} | {result['ops']} | "
                    f"{_format_time(result['trace'])} |",
                    flush=True,
                )
    fwdecomp.use_backend("eager")
    return 0


if __name__ == "__main__":
    sys.exit(main())
