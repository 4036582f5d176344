"""Linear algebra: ``cholesky``.

``aten::cholesky`` (deprecated in favour of ``torch.linalg.cholesky``, still
reached by old code) has no forward formula; ``linalg_cholesky_ex`` has one.
Both read only the triangle they factor, so the decomposition computes the
same function.

Example:
    >>> import torch, fwdecomp
    >>> A = torch.tensor([[4.0, 2.0], [2.0, 3.0]], dtype=torch.float64)
    >>> with fwdecomp.enabled():
    ...     L, dL = torch.func.jvp(torch.cholesky, (A,), (torch.eye(2, dtype=torch.float64),))
    >>> torch.allclose(L @ L.mT, A)
    True
"""

from __future__ import annotations

from typing import Iterator

import torch

from fwdecomp.decompositions import builtin
from fwdecomp.registry import Sample, symmetrize

aten = torch.ops.aten

__all__ = ["cholesky"]


def _spd(*shape: int, dtype: torch.dtype, device: str, gen: torch.Generator) -> torch.Tensor:
    n = shape[-1]
    a = torch.randn(shape, dtype=dtype, device=device, generator=gen)
    return a @ a.mT + n * torch.eye(n, dtype=dtype, device=device)


def _cholesky_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    gen = torch.Generator(device=device).manual_seed(0)

    def spd(*shape: int) -> torch.Tensor:
        return _spd(*shape, dtype=dtype, device=device, gen=gen)

    for upper in (False, True):
        yield Sample((spd(4, 4), upper), note=f"upper={upper}", prepare=symmetrize)
        yield Sample((spd(2, 3, 3), upper), note=f"batched, upper={upper}", prepare=symmetrize)
    yield Sample((spd(3, 5, 5).mT, False), note="non-contiguous", prepare=symmetrize)
    yield Sample((spd(0, 3, 3), False), note="empty batch", prepare=symmetrize)
    yield Sample((spd(0, 0), True), note="0x0", prepare=symmetrize)


@builtin(aten.cholesky.default, samples=_cholesky_samples)
def cholesky(self: torch.Tensor, upper: bool = False) -> torch.Tensor:
    """The Cholesky factor, lower (``A = L L^H``) or upper (``A = U^H U``)."""
    return torch.linalg.cholesky(self, upper=upper)
