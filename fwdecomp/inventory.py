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
from typing import Any, Sequence

import torch

from fwdecomp import api, registry
from fwdecomp._tables import text_table
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


def _check(
    row: OperatorRow,
    entry: registry.Decomposition,
    dtype: torch.dtype,
    limit: int | None,
    device: str,
    methods: tuple[str, ...],
) -> None:
    if entry.samples is None:
        row.check = "no samples"
        return
    start = time.perf_counter()
    worst = 0.0
    try:
        for index, sample in enumerate(entry.samples(device, dtype)):
            if limit is not None and index >= limit:
                break
            report = check_sample(entry.op, sample, methods=methods)
            row.samples += 1
            worst = max([worst, *report.errors.values()])
            row.failures += [f"[{sample.note}] {m}: {why}" for m, why in report.failures.items()]
    except Exception as error:  # a sample that cannot be built or run on this device: report it, audit the rest
        first_line = (str(error).splitlines() or [""])[0][:200]
        row.failures.append(f"[sample {row.samples}] raised {type(error).__name__}: {first_line}")
    row.worst_error = worst
    row.check = "fail" if row.failures else "pass"
    if row.samples == 0 and not row.failures:
        # e.g. CUDA-only kernels audited on CPU: their samples come only for a CUDA device
        row.check, row.worst_error = f"no {torch.device(device).type.upper()} samples", None
    row.seconds = time.perf_counter() - start


def inventory(
    check: bool = True,
    limit: int | None = None,
    device: str = "cpu",
    methods: tuple[str, ...] = ("forward_ad",),
    operators: Sequence[str] | None = None,
) -> list[OperatorRow]:
    """One :class:`OperatorRow` per registered operator, checked numerically if ``check``.

    The checks run each decomposition's samples for ``device`` in float64 and
    compare the tangents of every JVP method in ``methods`` (see
    :data:`fwdecomp.checks.ALL_METHODS`) against central finite differences.
    ``operators`` (qualified names such as ``"aten::_pdist_forward"``) limits
    the rows to those operators; a name with no registered decomposition raises
    ``ValueError``.
    """
    selected = registry.operators()
    if operators is not None:
        by_name = {qualified_name(op): op for op in selected}
        unknown = [name for name in operators if name not in by_name]
        if unknown:
            raise ValueError(
                f"fwdecomp audit: no registered decomposition for {', '.join(unknown)}; "
                "`python -m fwdecomp audit --no-check` lists the operators that have one"
            )
        selected = [by_name[name] for name in operators]
    rows = []
    with api.enabled():
        for op in selected:
            entry = registry.lookup(op)
            formula = native_forward_formula(op)
            row = OperatorRow(
                name=qualified_name(op),
                native=formula.status,
                evidence=formula.reason,
                covered=api.needs_override(op),
            )
            if check and entry is not None:
                _check(row, entry, torch.float64, limit, device, methods)
            rows.append(row)
    return rows


def render_table(rows: list[OperatorRow]) -> str:
    """A plain-text table for the terminal."""
    header = ("operator", "native forward AD", "fwdecomp", "check", "samples", "max error")
    cells = []
    for row in rows:
        error = "" if row.worst_error is None else f"{row.worst_error:.1e}"
        cells.append(
            (row.name, row.native, "routes" if row.covered else "steps aside", row.check, str(row.samples), error)
        )
    text = text_table(header, cells)
    for row in rows:
        text += [f"FAIL {row.name} {failure}" for failure in row.failures]
    return "\n".join(text)
