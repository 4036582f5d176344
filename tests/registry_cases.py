"""Parameters for the tests that run every registered decomposition on every CPU sample."""

from __future__ import annotations

from typing import Iterator

import pytest

import fwdecomp


def sample_cases() -> Iterator[pytest.param]:
    """``(op, dtype, index)`` for every registered operator, dtype and CPU sample, with readable ids."""
    for op in fwdecomp.registry.operators():
        entry = fwdecomp.registry.lookup(op)
        for dtype in entry.dtypes:
            for index, sample in enumerate(entry.samples("cpu", dtype)):
                yield pytest.param(op, dtype, index, id=f"{op}-{str(dtype)[6:]}-{index}-{sample.note}")
