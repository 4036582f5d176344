"""Linear algebra: ``cholesky``, ``ormqr``.

``aten::cholesky`` (deprecated in favour of ``torch.linalg.cholesky``, still
reached by old code) has no forward formula; ``linalg_cholesky_ex`` has one.
Both read only the triangle they factor, so the decomposition computes the
same function.

``aten::ormqr`` multiplies a matrix by the ``Q`` of a QR factorisation given
as Householder reflectors (what ``torch.geqrf`` returns); it has no forward
formula. The decomposition differentiates the compact WY form of the same
product, ``Q = I - V T V^H`` (``V`` the unit lower-trapezoidal reflectors,
``T`` triangular, from ``V^H V`` and ``tau`` by one triangular solve), applied
to the other matrix without forming ``Q``: matrix products, O(m k n) like the
kernel. (``linalg_householder_product``'s own forward formula, the route before,
took 380x the primal at 16 x 128x64 reflectors.) Both read only the strictly
lower part of the first ``len(tau)`` columns, so the derivatives agree
everywhere, also for complex inputs (``transpose`` means ``Q^H``).

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
from fwdecomp.tangent_rules import add, with_tangent_rule

aten = torch.ops.aten

__all__ = ["cholesky", "ormqr"]


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


def _cholesky_rule(primals: list, tangents: list):
    """``dL = L Phi(L^-1 dA L^-H)`` (``Phi``: the lower triangle, half the diagonal), as PyTorch's
    ``linalg_cholesky`` forward formula, with the factor from ``aten::cholesky`` itself (its checks
    cost less than ``linalg.cholesky``'s) and both solves taken from the right (``L^-1 dA`` as
    ``(dA^H L^-H)^H``), which LAPACK runs about twice as fast here."""
    self, upper = primals
    factor = aten.cholesky(self, upper)
    d_self = tangents[0]
    if d_self is None:
        return factor, None
    lower = factor.mH if upper else factor
    solved = torch.linalg.solve_triangular(lower.mH, d_self.mH, upper=True, left=False).mH  # L^-1 dA
    phi = torch.linalg.solve_triangular(lower.mH, solved, upper=True, left=False).tril_()  # ... L^-H
    phi.diagonal(dim1=-2, dim2=-1).mul_(0.5)
    d_lower = lower @ phi
    return factor, d_lower.mH if upper else d_lower


@builtin(aten.cholesky.default, samples=_cholesky_samples)
@with_tangent_rule(_cholesky_rule)
def cholesky(self: torch.Tensor, upper: bool = False) -> torch.Tensor:
    """The Cholesky factor, lower (``A = L L^H``) or upper (``A = U^H U``)."""
    return torch.linalg.cholesky(self, upper=upper)


def _ormqr_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, dtype=dtype, device=device, generator=gen)

    for (rows, cols), left, transpose in (
        ((5, 3), True, False),
        ((5, 3), True, True),
        ((5, 3), False, False),
        ((5, 3), False, True),
        ((3, 5), True, False),
        ((4, 4), False, True),
    ):
        reflectors, tau = torch.geqrf(randn(rows, cols))
        other = randn(rows, 2) if left else randn(2, rows)
        note = f"{rows}x{cols}, left={left}, transpose={transpose}"
        yield Sample((reflectors, tau, other, left, transpose), note=note)
    reflectors, tau = torch.geqrf(randn(2, 3, 4, 3))
    yield Sample((reflectors, tau, randn(2, 3, 4, 2), True, True), note="batched")
    reflectors, tau = torch.geqrf(randn(3, 5).mT)
    yield Sample((reflectors, tau, randn(3, 5).mT, True, False), note="non-contiguous")
    reflectors, tau = torch.geqrf(randn(0, 4, 2))
    yield Sample((reflectors, tau, randn(0, 4, 3), True, False), note="empty batch")
    reflectors, tau = torch.geqrf(randn(4, 0))
    yield Sample((reflectors, tau, randn(2, 4), False, False), note="no reflectors")


def _adjoint(x: torch.Tensor) -> torch.Tensor:
    # Not .mH: a lazy conjugate view breaks batched forward AD (torch 2.13, INTERNAL ASSERT).
    return x.mT.conj_physical() if x.is_complex() else x.mT


def _strictly_lower(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """The ``rows x cols`` mask below the diagonal (``where`` with it is several times faster than
    a batched ``tril`` on CPU)."""
    return torch.ones(rows, cols, dtype=torch.bool, device=device).tril_(-1)


def _compact_wy(
    reflectors: torch.Tensor, tau: torch.Tensor, below: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(V, T, U, G)`` with ``H_1 ... H_k = I - V T V^H`` (the compact WY form LAPACK's ``larft`` builds).

    ``V``: the unit lower-trapezoidal reflectors (``rows x k``); ``T``: upper triangular
    with ``T^-1 = diag(1 / tau) + striu(V^H V)``, computed as ``U^-1 diag(tau)`` with
    ``U = I + diag(tau) G``, ``G = striu(V^H V)``, so that ``tau_i = 0`` (an identity reflector)
    needs no division. Matrix products and a triangular solve, all with forward formulas:
    O(rows k^2), not one pass per reflector. ``below``: the ``rows x k`` strictly-lower mask,
    if the caller has it.
    """
    rows, count = reflectors.shape[-2], tau.shape[-1]
    eye = torch.eye(rows, count, dtype=reflectors.dtype, device=reflectors.device)
    if below is None:
        below = _strictly_lower(rows, count, reflectors.device)
    v = torch.where(below, reflectors[..., :, :count], eye)
    gram = (_adjoint(v) @ v).triu(1)
    unit_upper = torch.eye(count, dtype=v.dtype, device=v.device) + tau.unsqueeze(-1) * gram
    t = torch.linalg.solve_triangular(unit_upper, torch.diag_embed(tau), upper=True, unitriangular=True)
    return v, t, unit_upper, gram


def _ormqr_rule(primals: list, tangents: list):
    """The kernel's product; its tangent from the compact WY form ``Q = I - V T V^H``, never forming ``Q``:
    ``d(Q C) = dC - dV T V^H C - V (T (V^H dC + dV^H C) + dT V^H C)`` with
    ``dT = U^-1 (diag(d tau) - dU T)``, ``dU = diag(d tau) G + diag(tau) striu(dV^H V + V^H dV)``
    (``Q^H``: ``T^H``, ``dT^H``; ``C Q`` alike from the right). Small batched products and one
    triangular solve: a fraction of a second kernel call."""
    reflectors, tau, other, left, transpose = primals
    d_reflectors, d_tau, d_other = tangents[:3]
    out = aten.ormqr(reflectors, tau, other, left, transpose)
    if tau.numel() == 0 or other.numel() == 0:  # nothing reflected: the output is the other matrix
        return out, d_other
    if d_reflectors is None and d_tau is None and d_other is None:
        return out, None
    count = tau.shape[-1]
    below = _strictly_lower(reflectors.shape[-2], count, reflectors.device)  # V's pattern, and dV's
    v, t, unit_upper, gram = _compact_wy(reflectors, tau, below)
    dv = None if d_reflectors is None else torch.where(below, d_reflectors[..., :, :count], 0)
    dt = None
    if dv is not None or d_tau is not None:
        d_unit = None
        if dv is not None:
            cross = _adjoint(dv) @ v
            d_unit = tau.unsqueeze(-1) * (cross + _adjoint(cross)).triu(1)
        if d_tau is not None:
            d_unit = add(d_unit, d_tau.unsqueeze(-1) * gram)
        rhs = -(d_unit @ t)
        if d_tau is not None:
            rhs = rhs + torch.diag_embed(d_tau)
        dt = torch.linalg.solve_triangular(unit_upper, rhs, upper=True, unitriangular=True)
    if transpose:
        t, dt = _adjoint(t), None if dt is None else _adjoint(dt)
    if left:
        projected = _adjoint(v) @ other
        mixed = add(None if d_other is None else _adjoint(v) @ d_other, None if dv is None else _adjoint(dv) @ other)
        inner = add(None if mixed is None else t @ mixed, None if dt is None else dt @ projected)
        reflected = add(None if inner is None else v @ inner, None if dv is None else dv @ (t @ projected))
    else:
        projected = other @ v
        mixed = add(None if d_other is None else d_other @ v, None if dv is None else other @ dv)
        inner = add(None if mixed is None else mixed @ t, None if dt is None else projected @ dt)
        reflected = add(
            None if inner is None else inner @ _adjoint(v), None if dv is None else (projected @ t) @ _adjoint(dv)
        )
    if reflected is None:
        return out, d_other
    return out, -reflected if d_other is None else d_other - reflected


# Complex inputs work as well; tests/test_loss_backward.py checks them (jacfwd and jacrev, two of the
# registry-wide checks, take real inputs only).
@builtin(aten.ormqr.default, samples=_ormqr_samples)
@with_tangent_rule(_ormqr_rule)
def ormqr(
    self: torch.Tensor, input2: torch.Tensor, input3: torch.Tensor, left: bool = True, transpose: bool = False
) -> torch.Tensor:
    """``Q @ C``, ``Q^H @ C``, ``C @ Q`` or ``C @ Q^H`` with ``Q`` given by Householder reflectors.

    The value is the kernel's; the derivative is that of ``Q = I - V T V^H`` (compact WY form)
    applied without ever forming ``Q``.
    """
    value = aten.ormqr(self.detach(), input2.detach(), input3.detach(), left, transpose)
    if input2.numel() == 0 or input3.numel() == 0:  # nothing to reflect: as in PyTorch, no dependence on them
        return value + (input3 - input3.detach())
    v, t, _, _ = _compact_wy(self, input2)
    if transpose:
        t = _adjoint(t)
    if left:
        product = input3 - v @ (t @ (_adjoint(v) @ input3))
    else:
        product = input3 - ((input3 @ v) @ t) @ _adjoint(v)
    return value + (product - product.detach())
