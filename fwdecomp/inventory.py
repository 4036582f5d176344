"""The operator inventory: for every operator fwdecomp knows, what PyTorch and fwdecomp do.

For each registered operator: whether the running PyTorch has a native
forward-AD formula (and the evidence), whether fwdecomp routes it, and
whether a quick numerical check of the decomposition's tangent passes
(forward AD against central finite differences, float64, on its samples).
``python -m fwdecomp audit`` prints this.

Example:
    >>> import fwdecomp
    >>> from fwdecomp.inventory import inventory
    >>> rows = inventory(check=False)
    >>> any(row.name == "aten::cholesky" and row.covered for row in rows)
    True
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from fwdecomp import api, registry
from fwdecomp._torch import qualified_name
from fwdecomp.checks import check_sample
from fwdecomp.formulas import native_forward_formula

__all__ = ["OperatorRow", "inventory", "render_table"]


@dataclass
class OperatorRow:
    """One operator's line in the inventory."""

    name: str
    native: str
    evidence: str
    covered: bool
    check: str = "not run"
    samples: int = 0
    worst_error: float | None = None
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _check(row: OperatorRow, entry: registry.Decomposition, dtype: torch.dtype, limit: int | None) -> None:
    if entry.samples is None:
        row.check = "no samples"
        return
    start = time.perf_counter()
    worst = 0.0
    for index, sample in enumerate(entry.samples("cpu", dtype)):
        if limit is not None and index >= limit:
            break
        report = check_sample(entry.op, sample, methods=("forward_ad",))
        row.samples += 1
        worst = max([worst, *report.errors.values()])
        row.failures += [f"[{sample.note}] {m}: {why}" for m, why in report.failures.items()]
    row.worst_error = worst
    row.check = "fail" if row.failures else "pass"
    if row.samples == 0:
        row.check, row.worst_error = "no CPU samples", None  # CUDA-only kernels: samples run on CUDA
    row.seconds = time.perf_counter() - start


def inventory(check: bool = True, limit: int | None = None) -> list[OperatorRow]:
    """One :class:`OperatorRow` per registered operator, checked numerically if ``check``."""
    rows = []
    with api.enabled():
        for op in registry.operators():
            entry = registry.lookup(op)
            formula = native_forward_formula(op)
            row = OperatorRow(
                name=qualified_name(op),
                native=formula.status,
                evidence=formula.reason,
                covered=api.needs_override(op),
            )
            if check and entry is not None:
                _check(row, entry, torch.float64, limit)
            rows.append(row)
    return rows


def render_table(rows: list[OperatorRow]) -> str:
    """A plain-text table for the terminal."""
    header = ("operator", "native forward AD", "fwdecomp", "check", "samples", "max error")
    lines = [header]
    for row in rows:
        error = "" if row.worst_error is None else f"{row.worst_error:.1e}"
        lines.append(
            (row.name, row.native, "routes" if row.covered else "steps aside", row.check, str(row.samples), error)
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    for row in rows:
        text += [f"FAIL {row.name} {failure}" for failure in row.failures]
    return "\n".join(text)
