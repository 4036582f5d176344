"""Every operator fwdecomp covers: primal vs JVP time, and what the alternatives cost.

Run from the repository root::

    .venv/bin/python -m benchmarks.ops                 # small + realistic sizes, markdown table
    .venv/bin/python -m benchmarks.ops --tiny          # one quick round (the CI smoke test)
    .venv/bin/python -m benchmarks.ops --json out.json --sizes realistic --repeats 9

Per operator and size (see :mod:`benchmarks.sizes`), medians over interleaved
repeats of:

- ``primal``: the operator without tangents, fwdecomp disabled (PyTorch's kernel);
- ``overhead``: what fwdecomp's routing adds to a call *without* tangents
  (goal < 5 µs and < 2 % at the realistic size), measured by
  :mod:`benchmarks.overhead` in fresh processes with fwdecomp enabled once, with the
  router ``enable()`` picks (the header says which; ``python -m benchmarks.overhead``
  compares the Python kernels and the compiled router side by side);
- ``JVP forward_ad`` / ``JVP func.jvp``: the JVP through fwdecomp, and its ratio to the primal;
- ``1st input only``: ``forward_ad`` with a tangent on the first input only (the
  others plain), with the eager backend's materialised zero tangents on and off:
  the share of PyTorch's slow ZeroTensor path for mixed dual/plain inputs;
- ``double backward``: ``torch.autograd.functional.jvp`` (the double-vjp trick,
  PyTorch alone), where PyTorch can differentiate the operator's backward; where
  its tangents disagree with fwdecomp's (which the tests check against finite
  differences) the cell says so and the summary does not count it;
- ``central FD``: two primal calls.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from typing import Any

import torch
from torch.autograd import forward_ad

import fwdecomp
from benchmarks import overhead
from benchmarks._common import Variant, format_seconds, markdown_table, measure
from benchmarks.sizes import SIZE_NAMES, benchmark_sample, prepared, runs_on_cpu
from fwdecomp import _torch, autograd, router, zero_tensors
from fwdecomp.interface import get_impl

COLUMNS = [
    "operator",
    "size",
    "primal",
    "overhead (no tangent)",
    "JVP forward_ad",
    "ratio",
    "JVP func.jvp",
    "ratio",
    "1st input only: zero tangents on / off",
    "double backward",
    "central FD",
]


def _variants(op: Any, sample: Any) -> dict[str, Variant]:
    f, primals, tangents = prepared(op, sample)
    backend = get_impl()

    def routed(on: bool, zero_tangents: bool = True):
        def setup() -> None:
            (autograd.install if on else autograd.uninstall)(op)
            (zero_tensors.install if on else zero_tensors.uninstall)()  # what enable() adds
            backend.zero_tangent_max_numel = None if zero_tangents else 0

        return setup

    def primal() -> Any:
        with torch.no_grad():
            return f(*primals)

    def jvp_forward_ad() -> Any:
        with forward_ad.dual_level():
            outs = f(*[forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)])
            return [forward_ad.unpack_dual(o).tangent for o in outs]

    def jvp_first_input() -> Any:
        # A tangent on the first input only (the others plain): where mixed dual/plain
        # operands reach PyTorch's ZeroTensor path.
        with forward_ad.dual_level():
            duals = [forward_ad.make_dual(primals[0], tangents[0]), *primals[1:]]
            return [forward_ad.unpack_dual(o).tangent for o in f(*duals)]

    def jvp_func() -> Any:
        return torch.func.jvp(f, tuple(primals), tuple(tangents))

    def double_backward() -> Any:
        return torch.autograd.functional.jvp(f, tuple(primals), tuple(tangents))

    def finite_differences() -> Any:
        eps = 1e-3
        with torch.no_grad():
            plus = f(*[p + eps * t for p, t in zip(primals, tangents)])
            minus = f(*[p - eps * t for p, t in zip(primals, tangents)])
            return [(a - b) / (2 * eps) for a, b in zip(plus, minus)]

    return {
        "primal": Variant(primal, routed(False)),
        "forward_ad": Variant(jvp_forward_ad, routed(True)),
        "func.jvp": Variant(jvp_func, routed(True)),
        "1 input, zero tangents": Variant(jvp_first_input, routed(True)),
        "1 input, no zero tangents": Variant(jvp_first_input, routed(True, zero_tangents=False)),
        "double backward": Variant(double_backward, routed(False)),
        "central FD": Variant(finite_differences, routed(False)),
    }


def _cell(value: Any) -> str:
    text = format_seconds(value)
    if text.startswith("n/a") and "derivative for" in text:
        return "n/a (PyTorch: no double backward)"
    return text


def _ratio(value: Any, base: Any) -> str:
    if isinstance(value, float) and isinstance(base, float) and base > 0:
        return f"{value / base:.2f}x"
    return ""


def _tangents(variant: Variant, values: Any) -> list[torch.Tensor | None]:
    if variant.setup:
        variant.setup()
    return list(values(variant.fn()))


def _disagreement(variants: dict[str, Variant]) -> str:
    """Where the double-backward trick's tangents differ from fwdecomp's: which output, how much ('' if none).

    For some operators PyTorch's reverse mode treats outputs as constants, or returns no
    gradient for arguments it was not asked about: the trick then runs, fast and wrong.
    fwdecomp's tangents are checked against finite differences by the tests.
    """
    ours = _tangents(variants["forward_ad"], lambda tangents: tangents)
    theirs = _tangents(variants["double backward"], lambda result: result[1])
    for index, (a, b) in enumerate(zip(ours, theirs)):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        scale = 1 + a.abs().max().item() if a.numel() else 1
        error = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        if not error <= 1e-3 * scale:  # NaN counts as a disagreement
            return f"output {index}: off by {error:.2g}"
    return ""


def benchmark(sizes: tuple[str, ...], repeats: int, min_batch: float, dtype: torch.dtype, only: str | None) -> list:
    rows = []
    fwdecomp.disable()
    saved_limit = get_impl().zero_tangent_max_numel
    try:
        for op in fwdecomp.registry.operators():
            name = _torch.qualified_name(op)
            if only and only not in name:
                continue
            entry = fwdecomp.registry.lookup(op)
            if not runs_on_cpu(op):
                rows.append({"operator": name, "note": "no CPU kernel (CUDA only): see benchmarks/gpu_attention.py"})
                continue
            for size in sizes:
                sample, how = benchmark_sample(name, entry.samples, size, dtype)
                if sample is None:
                    rows.append({"operator": name, "size": size, "note": how})
                    continue
                variants = _variants(op, sample)
                times = measure(variants, repeats=repeats, min_batch_seconds=min_batch)
                if isinstance(times.get("double backward"), float):
                    wrong = _disagreement(variants)
                    if wrong:
                        times["double backward"] = (
                            f"n/a: wrong tangents ({wrong}; {format_seconds(times['double backward'])})"
                        )
                rows.append({"operator": name, "size": size, "shape": sample.note, "how": how, "times": times})
                autograd.uninstall(op)
    finally:
        autograd.uninstall_all()
        get_impl().zero_tangent_max_numel = saved_limit
    return rows


def render(rows: list) -> str:
    table = []
    for row in rows:
        if "times" not in row:
            table.append([f"`{row['operator']}`", row.get("size", ""), row["note"]] + [""] * (len(COLUMNS) - 3))
            continue
        t = row["times"]
        cost = t.get("overhead")
        cost = f"{cost * 1e6:+.2f} µs ({100 * cost / t['primal']:+.1f}%)" if isinstance(cost, float) else ""
        size = f"{row['size']}: {row['shape']}" + ("" if row["how"] == "size table" else f" ({row['how']})")
        table.append(
            [
                f"`{row['operator']}`",
                size,
                format_seconds(t["primal"]),
                cost,
                format_seconds(t["forward_ad"]),
                _ratio(t["forward_ad"], t["primal"]),
                format_seconds(t["func.jvp"]),
                _ratio(t["func.jvp"], t["primal"]),
                f"{format_seconds(t['1 input, zero tangents'])} / {format_seconds(t['1 input, no zero tangents'])}",
                _cell(t["double backward"]),
                format_seconds(t["central FD"]),
            ]
        )
    return markdown_table(COLUMNS, table)


def summary(rows: list) -> str:
    lines = []
    for size in SIZE_NAMES:
        timed = [r["times"] for r in rows if r.get("size") == size and "times" in r]
        ratios = [t["forward_ad"] / t["primal"] for t in timed if isinstance(t["forward_ad"], float)]
        if ratios:
            lines.append(
                f"{size}: median JVP/primal ratio (forward_ad) {statistics.median(ratios):.2f} over {len(ratios)}"
            )
        routed = [(t["overhead"], t["primal"]) for t in timed if isinstance(t.get("overhead"), float)]
        if routed:
            added = [delta for delta, _ in routed]
            lines.append(
                f"{size}: routing overhead without tangents median {1e6 * statistics.median(added):+.1f} µs, "
                f"max {1e6 * max(added):+.1f} µs; {overhead.goals(routed)}"
            )
        both = [t for t in timed if isinstance(t["double backward"], float) and isinstance(t["forward_ad"], float)]
        faster = sum(t["forward_ad"] < t["double backward"] for t in both)
        if both:
            lines.append(f"{size}: fwdecomp JVP faster than the double-backward trick on {faster} of {len(both)}")
        saved = [
            1 - t["1 input, zero tangents"] / t["1 input, no zero tangents"]
            for t in timed
            if isinstance(t["1 input, no zero tangents"], float) and isinstance(t["1 input, zero tangents"], float)
        ]
        if saved:
            lines.append(
                f"{size}: zero tangents save a median {100 * statistics.median(saved):.0f}% of the JVP time "
                "(tangent on the first input only)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ops", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(SIZE_NAMES), help="comma-separated: small,realistic")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--only", default=None, help="only operators whose name contains this")
    parser.add_argument("--tiny", action="store_true", help="one round at the small size (smoke test)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    parser.add_argument("--json", default=None, help="also write the raw figures here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = ("small",) if args.tiny else tuple(s for s in args.sizes.split(",") if s)
    repeats, min_batch = (1, 0.0) if args.tiny else (args.repeats, 0.02)
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, {args.dtype}")
    print(f"fwdecomp: {router.status()}")
    rows = benchmark(sizes, repeats, min_batch, getattr(torch, args.dtype), args.only)
    # In fresh processes, fwdecomp enabled once with the router enable() picks (see benchmarks/overhead.py).
    costs = overhead.measure_in_processes(
        sizes, 1 if args.tiny else 3, args.dtype, args.only, args.threads or 1, 1 if args.tiny else 7
    )
    state = router.status().kind
    for row in rows:
        if "times" in row:
            row["times"]["overhead"] = overhead.added(costs.get(f"{row['operator']}|{row['size']}", {}), state)
    print(render(rows))
    print()
    print(summary(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
