"""Cost of a JVP through fwdecomp's grouped reductions, against PyTorch's kernel and a native-AD route.

    python benchmarks/bench_reductions.py

For each case: the kernel alone (no tangent), the JVP with fwdecomp, and, where PyTorch has an
equivalent operator with a native forward formula (``scatter_reduce``), that operator's JVP.
Median of repeated runs, CPU, float32; numbers depend on the machine and its load.
"""

from __future__ import annotations

import functools
import statistics
import time

import torch

import fwdecomp


def _median_ms(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    rows, groups, width = 100_000, 1_000, 16
    source = torch.randn(rows, width)
    self = torch.randn(groups, width)
    index = torch.randint(0, groups, (rows,))
    spread = index.unsqueeze(1).expand(rows, width)
    lengths = torch.bincount(index, minlength=groups)
    data = source[torch.argsort(index, stable=True)]
    tangent = torch.randn_like(source)
    cases = []
    for reduce in ("mean", "amax", "prod"):
        cases.append(
            (
                f"index_reduce {reduce}",
                source,
                lambda s, r=reduce: self.index_reduce(0, index, s, r),
                lambda s, r=reduce: self.scatter_reduce(0, spread, s, r),
            )
        )
    for reduce in ("sum", "max", "prod"):
        cases.append((f"segment_reduce {reduce}", data, _segment(reduce, lengths), None))
    print(f"{rows} rows x {width} into {groups} groups, float32, median ms")
    print(f"{'case':<22}{'kernel':>10}{'jvp fwdecomp':>14}{'jvp scatter_reduce':>20}")
    with fwdecomp.enabled():
        for name, x, fn, native in cases:
            kernel = _median_ms(functools.partial(fn, x))
            jvp = _median_ms(functools.partial(torch.func.jvp, fn, (x,), (tangent,)))
            ref = _median_ms(functools.partial(torch.func.jvp, native, (x,), (tangent,))) if native else float("nan")
            print(f"{name:<22}{kernel:>10.2f}{jvp:>14.2f}{ref:>20.2f}")


def _segment(reduce, lengths):
    return lambda d: torch.segment_reduce(d, reduce, lengths=lengths)


if __name__ == "__main__":
    main()
