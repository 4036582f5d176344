"""Timing and reporting helpers shared by the benchmarks (medians of interleaved repeats)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

__all__ = ["Variant", "format_seconds", "markdown_table", "measure"]


class Variant:
    """One way of computing something: ``fn`` timed, ``setup`` run (untimed) before each batch of calls."""

    def __init__(self, fn: Callable[[], Any], setup: Callable[[], None] | None = None) -> None:
        self.fn = fn
        self.setup = setup


def measure(variants: dict[str, Variant], repeats: int = 7, min_batch_seconds: float = 0.01) -> dict[str, float | str]:
    """Median seconds per call of each variant.

    The variants are timed in interleaved rounds (one batch of each per round),
    so a change of machine load during the run affects them all alike. A batch
    repeats a call until it lasts ``min_batch_seconds`` (microsecond resolution
    for small calls). A variant that raises is reported as ``"n/a: <error>"``.
    """
    loops: dict[str, int] = {}
    results: dict[str, float | str] = {}
    for name, variant in variants.items():
        try:
            if variant.setup:
                variant.setup()
            variant.fn()  # warm-up (caches, first-call costs)
            start = time.perf_counter()
            variant.fn()
            once = time.perf_counter() - start
            loops[name] = max(1, min(10_000, int(min_batch_seconds / max(once, 1e-7))))
        except Exception as error:  # a benchmark reports, it does not stop
            results[name] = f"n/a: {type(error).__name__}: {str(error).splitlines()[0][:60]}"
    samples: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(repeats):
        for name, count in loops.items():
            variant = variants[name]
            if variant.setup:
                variant.setup()
            start = time.perf_counter()
            for _ in range(count):
                variant.fn()
            samples[name].append((time.perf_counter() - start) / count)
    for name, values in samples.items():
        results[name] = statistics.median(values)
    return {name: results[name] for name in variants}


def format_seconds(value: float | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if value < 1e-3:
        return f"{value * 1e6:.1f} µs"
    if value < 1:
        return f"{value * 1e3:.2f} ms"
    return f"{value:.2f} s"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
