"""Distances: ``cdist`` (all its routes), ``pdist``, and their backward operators.

``torch.cdist`` reaches ``aten::_cdist_forward`` or, for ``p=2`` with more
than 25 rows (or ``compute_mode`` asking for it), ``aten::_euclidean_dist``;
``torch.pdist`` reaches ``aten::_pdist_forward``. None has a forward formula.
The backward operators are decomposed too, so forward-over-reverse
(``torch.func.hessian``, ``jvp(grad(f))``) works.

Example:
    >>> import torch, fwdecomp
    >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    >>> with fwdecomp.enabled():
    ...     out, tangent = torch.func.jvp(lambda a: torch.cdist(a, y, p=1), (x,), (torch.ones_like(x),))
    >>> torch.allclose(out, torch.cdist(x, y, p=1))
    True
"""

from __future__ import annotations

import functools
import math
from typing import Iterator

import torch

from fwdecomp._torch import dispatch_modes_active, outside_functorch
from fwdecomp.decompositions import builtin
from fwdecomp.decompositions._util import known_on_cpu, p_norm_gradient, p_norm_of_differences, safe_sqrt
from fwdecomp.registry import Sample
from fwdecomp.tangent_rules import with_tangent_rule

aten = torch.ops.aten

__all__ = ["cdist_backward", "cdist_forward", "euclidean_dist", "pdist_backward", "pdist_forward"]


def _uses_matmul(p: float, compute_mode: int | None, rows1: int, rows2: int) -> bool:
    """PyTorch's rule for the matrix-multiply route of the Euclidean distance."""
    mode = 0 if compute_mode is None else compute_mode
    return p == 2 and (mode == 1 or (mode == 0 and (rows1 > 25 or rows2 > 25)))


def _pairwise_differences(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    return x1.unsqueeze(-2) - x2.unsqueeze(-3)


def _norm_of(diff: torch.Tensor, p: float) -> torch.Tensor:
    if diff.shape[-1] == 0:
        return diff.sum(-1)
    return p_norm_of_differences(diff, p)


def _rng(device: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)


def _randn(*shape: int, dtype: torch.dtype, device: str, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, device=device, generator=gen)


def _euclidean_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    gen = _rng(device)

    def randn(*shape: int) -> torch.Tensor:
        return _randn(*shape, dtype=dtype, device=device, gen=gen)

    yield Sample((randn(30, 3), randn(27, 3)), note="plain")
    yield Sample((randn(2, 1, 6, 3), randn(3, 4, 3)), note="broadcast batch")
    yield Sample((randn(3, 30).mT, randn(3, 27).mT), note="non-contiguous")
    yield Sample((randn(0, 3), randn(4, 3)), note="zero rows")


def _gram_sqrt(squared: torch.Tensor) -> torch.Tensor:
    """``sqrt(max(squared, 0))`` with derivative 0 where ``squared <= 0``, in few passes.

    Clamping at the dtype's smallest normal number (instead of 0) keeps the
    square root's derivative finite: forward AD then costs a clamp and a
    square root, where a masked ``where`` chain costs four passes more (the
    JVP of ``_euclidean_dist`` at 2048x64 costs ~40% less). A
    zero distance comes out as ``sqrt(tiny)``: 1e-19 in float32/bfloat16,
    1e-154 in float64; float16, whose ``sqrt(tiny)`` is 8e-3, keeps the mask.
    """
    if squared.dtype == torch.float16:
        return safe_sqrt(squared.clamp_min(0))
    return squared.clamp_min(torch.finfo(squared.dtype).tiny).sqrt()


def _all_positive(distance: torch.Tensor) -> bool:
    """Whether every distance is known to be > 0 (CPU only; ``False`` where the check cannot run:
    inside ``vmap`` over the distances)."""
    return distance.numel() > 0 and known_on_cpu(distance, lambda d: d.min() > 0)


def _divide_where_positive(
    numerator: torch.Tensor, distance: torch.Tensor, fresh: bool = False, positive: bool | None = None
) -> torch.Tensor:
    """``numerator / distance``, 0 where the distance is 0 (the derivative PyTorch gives there).

    On CPU the mask costs as much as the division (a 4M-entry ``where``: ~7 ms); distances
    are rarely 0, so it is applied only when the smallest is (:func:`_all_positive`; a caller
    that divides by the same distances several times passes its answer as ``positive``).
    ``fresh``: ``numerator`` is the caller's own temporary, divided in place (at 4M entries a
    new buffer costs as much as the division).
    """
    if _all_positive(distance) if positive is None else positive:
        return numerator.div_(distance) if fresh else numerator / distance
    return torch.where(distance > 0, numerator / distance, numerator.new_zeros(()))


def _distance_tangent_numerator(
    x1: torch.Tensor, dx1: torch.Tensor | None, x2: torch.Tensor, dx2: torch.Tensor | None
) -> torch.Tensor:
    """``<x1_i - x2_j, dx1_i - dx2_j>`` for every row pair, as one matrix product.

    ``[x1, dx1, <x1, dx1>, 1] @ [-dx2, -x2, 1, <x2, dx2>]^T`` (a missing tangent is zeros).
    """
    dx1 = torch.zeros_like(x1) if dx1 is None else dx1
    dx2 = torch.zeros_like(x2) if dx2 is None else dx2
    ones1, ones2 = x1.new_ones((*x1.shape[:-1], 1)), x2.new_ones((*x2.shape[:-1], 1))
    left = torch.cat([x1, dx1, (x1 * dx1).sum(-1, keepdim=True), ones1], -1)
    right = torch.cat([-dx2, -x2, ones2, (x2 * dx2).sum(-1, keepdim=True)], -1)
    return left @ right.mT


_MATMUL_DTYPES = (torch.float32, torch.float64)


def _euclidean_dist_rule(primals: list, tangents: list):
    """``d(d_ij) = <x1_i - x2_j, dx1_i - dx2_j> / d_ij``: one matrix product twice the primal's width."""
    x1, x2 = primals
    out = aten._euclidean_dist(x1, x2)
    if tangents[0] is None and tangents[1] is None:
        return out, None
    if x1.dtype not in _MATMUL_DTYPES or x2.dtype != x1.dtype:
        return NotImplemented  # reduced precision: the decomposition's float32 accumulation
    numerator = _distance_tangent_numerator(x1, tangents[0], x2, tangents[1])
    return out, _divide_where_positive(numerator, out, fresh=True).to(out.dtype)


@builtin(aten._euclidean_dist.default, samples=_euclidean_samples)
@with_tangent_rule(_euclidean_dist_rule)
def euclidean_dist(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Euclidean distances by the matrix-multiply expansion PyTorch uses."""
    x1_norm = (x1 * x1).sum(-1, keepdim=True)
    x2_norm = (x2 * x2).sum(-1, keepdim=True)
    # add(..., alpha=-2): the scaling fused into the addition (not addmm: under autocast it would
    # return the reduced dtype, where the kernel's result keeps the norms' float32)
    squared = torch.add(x1_norm + x2_norm.mT, x1 @ x2.mT, alpha=-2)
    return _gram_sqrt(squared)


def _cdist_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    gen = _rng(device)

    def randn(*shape: int) -> torch.Tensor:
        return _randn(*shape, dtype=dtype, device=device, gen=gen)

    for p in (0.0, 0.5, 1.0, 2.0, 3.5, math.inf):
        yield Sample((randn(5, 3), randn(4, 3), p, None), note=f"p={p}")
    yield Sample((randn(2, 1, 5, 3), randn(3, 4, 3), 2.0, None), note="broadcast batch")
    yield Sample((randn(2, 1, 5, 3), randn(3, 4, 3), 3.5, None), note="broadcast batch p=3.5")
    yield Sample((randn(3, 5).mT, randn(3, 4).mT, 1.0, None), note="non-contiguous")
    yield Sample((randn(30, 3), randn(27, 3), 2.0, None), note="p=2, >25 rows: matmul route")
    yield Sample((randn(5, 3), randn(4, 3), 2.0, 1), note="compute_mode=1 (matmul)")
    yield Sample((randn(30, 3), randn(27, 3), 2.0, 2), note="compute_mode=2 (direct)")
    yield Sample((randn(0, 3), randn(4, 3), 2.0, None), note="zero rows")
    yield Sample((randn(5, 0), randn(4, 0), math.inf, None), note="zero columns")


@builtin(aten._cdist_forward.default, samples=_cdist_samples)
def cdist_forward(x1: torch.Tensor, x2: torch.Tensor, p: float, compute_mode: int | None) -> torch.Tensor:
    """``||x1_i - x2_j||_p`` for every row pair, batched and broadcast like ``torch.cdist``."""
    if _uses_matmul(p, compute_mode, x1.shape[-2], x2.shape[-2]):
        return euclidean_dist(x1, x2)
    return _norm_of(_pairwise_differences(x1, x2), p)


def _cdist_backward_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    # p=inf is left out: its derivative selects the entries whose |diff| equals the
    # given `cdist`, so perturbing x1 and cdist independently (as finite differences
    # do) leaves the function's domain; forward-over-reverse tests cover it.
    for sample in _cdist_samples(device, dtype):
        x1, x2, p, mode = sample.args
        if p == math.inf:
            continue
        dist = aten._cdist_forward(x1, x2, p, mode)
        grad = torch.randn(dist.shape, dtype=dtype, device=device, generator=_rng(device))
        yield Sample((grad, x1, x2, p, dist), note=sample.note)


@builtin(aten._cdist_backward.default, samples=_cdist_backward_samples)
def cdist_backward(
    grad: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, p: float, cdist: torch.Tensor
) -> torch.Tensor:
    """The vector-Jacobian product of ``_cdist_forward`` with respect to ``x1``.

    Like PyTorch's kernel, ``grad`` is read as having the shape of ``cdist``
    (functorch's batching rule passes it with extra leading unit dimensions).
    """
    diff = _pairwise_differences(x1, x2)
    grad = grad.reshape(cdist.shape)
    return (grad.unsqueeze(-1) * p_norm_gradient(diff, cdist, p)).sum(-2)


def _pairs(rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    first, second = torch.triu_indices(rows, rows, 1, device=device)
    return first, second


def _check_pdist_input(x: torch.Tensor) -> None:
    # The same input rules as PyTorch's kernel, so tangents never make bad input pass.
    if x.dim() != 2:
        raise RuntimeError(f"pdist only supports 2D tensors, got: {x.dim()}D")
    if not x.is_contiguous():
        raise RuntimeError("_pdist_forward requires contiguous input")


def _pdist_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    gen = _rng(device)
    for p in (0.0, 0.5, 1.0, 2.0, 3.5, math.inf):
        yield Sample((_randn(6, 3, dtype=dtype, device=device, gen=gen), p), note=f"p={p}")
    repeated = _randn(4, 3, dtype=dtype, device=device, gen=gen)
    repeated[2] = repeated[0]  # a pair at distance 0: derivative 0, as PyTorch's
    yield Sample((repeated, 2.0), note="p=2, a repeated row")
    yield Sample((_randn(1, 3, dtype=dtype, device=device, gen=gen), 2.0), note="one row")
    yield Sample((_randn(4, 0, dtype=dtype, device=device, gen=gen), 2.0), note="zero columns")


@functools.lru_cache(maxsize=8)
def _cached_flat_pairs(rows: int, device: torch.device) -> torch.Tensor:
    with outside_functorch():  # a plain tensor, tied to no transform level that could end
        first, second = _pairs(rows, device)
        return first * rows + second


def _flat_pairs(rows: int, device: torch.device) -> torch.Tensor:
    """``i * rows + j`` for the pairs ``i < j`` in ``pdist`` order (cached, made outside any
    ``torch.func`` transform; not cached while a dispatch mode, a fake-tensor one say, is active:
    its tensors must not outlive it)."""
    if dispatch_modes_active():
        first, second = _pairs(rows, device)
        return first * rows + second
    return _cached_flat_pairs(rows, torch.device(device))


def _pdist_rule(primals: list, tangents: list):
    """p = 2: the pair entries of :func:`_distance_tangent_numerator` (``x`` with itself) over the distances."""
    x, p = primals
    out = aten._pdist_forward(x, p)
    if tangents[0] is None:
        return out, None
    if p != 2 or x.shape[-1] == 0 or x.dtype not in _MATMUL_DTYPES:
        return NotImplemented
    dx = tangents[0]
    numerator = _distance_tangent_numerator(x, dx, x, dx)
    pairs = numerator.reshape(-1).index_select(0, _flat_pairs(x.shape[0], x.device))
    return out, _divide_where_positive(pairs, out, fresh=True)


@builtin(aten._pdist_forward.default, samples=_pdist_samples)
@with_tangent_rule(_pdist_rule)
def pdist_forward(self: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Distances between all row pairs ``i < j``, in row-major order, like ``torch.pdist``."""
    _check_pdist_input(self)
    first, second = _pairs(self.shape[0], self.device)
    if p == 2 and self.shape[-1] > 0:
        return _euclidean_pdist(self, first, second)
    return _norm_of(self[first] - self[second], p)


def _euclidean_pdist(x: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``pdist`` for p = 2: PyTorch's exact values, derivatives from the Gram-matrix expansion.

    The value is the kernel's own (direct differences, no cancellation); the
    derivatives (every order) are those of ``sqrt(|x_i|^2 + |x_j|^2 - 2 x_i.x_j)``,
    which needs one N x N matrix product instead of an (N^2/2) x D tensor of
    differences and its tangent (127x -> see the README's benchmark table).
    Pairs at distance 0 get derivative 0, as PyTorch's backward gives them.
    """
    exact = aten._pdist_forward(x.detach(), 2.0)
    norms = (x * x).sum(-1)
    gram = x @ x.mT
    squared = norms[first] + norms[second] - 2 * gram[first, second]
    expansion = _gram_sqrt(squared)
    return exact + torch.where(exact > 0, expansion - expansion.detach(), 0)


def _pdist_backward_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    for sample in _pdist_samples(device, dtype):  # p=inf: see _cdist_backward_samples
        x, p = sample.args
        if p == math.inf or "repeated" in sample.note:  # at distance 0 the backward is not differentiable
            continue
        dist = aten._pdist_forward(x, p)
        grad = torch.randn(dist.shape, dtype=dtype, device=device, generator=_rng(device))
        yield Sample((grad, x, p, dist), note=sample.note)


def _pdist_backward_rule(primals: list, tangents: list):
    """p = 2: the kernel is ``sum_j W_ij (x_i - x_j)``, ``W = U + U^T``, ``U`` the upper triangle of
    ``grad / pdist``; the tangent is the same sum with ``U'`` from ``d_grad - grad d_pdist / pdist``
    and ``x``, plus ``U`` with ``d_x``: ``deg(U') x - U' x - U'^T x + ...``. Both triangles are
    scattered into one (2, N, N) tensor and multiplied in one batch (no symmetric matrix is formed)."""
    grad, x, p, pdist = primals
    d_grad, d_x, _, d_pdist = tangents
    if p != 2 or x.shape[-1] == 0 or x.dtype not in _MATMUL_DTYPES or x.dim() != 2:
        return NotImplemented
    out = aten._pdist_backward(grad, x, p, pdist)
    positive = _all_positive(pdist)
    weights = d_grad
    if d_pdist is not None:
        shift = _divide_where_positive(grad * d_pdist, pdist, fresh=True, positive=positive)
        weights = shift.neg_() if weights is None else weights - shift
    pairs = [(w, points) for w, points in ((weights, x), (grad if d_x is not None else None, d_x)) if w is not None]
    if not pairs:
        return out, None
    values = _divide_where_positive(torch.stack([w for w, _ in pairs]), pdist, fresh=True, positive=positive)
    values = values.to(x.dtype)
    rows, count = x.shape[0], len(pairs)
    # in place, into zeros made from ``values`` (batched like it under vmap): no second N x N copy
    upper = values.new_zeros(count, rows * rows).index_copy_(1, _flat_pairs(rows, x.device), values)
    upper = upper.view(count, rows, rows)
    points = torch.stack([points for _, points in pairs])
    # a column of ones beside the points: the products give W points and W's row sums (the degree) at once
    extended = torch.cat([points, points.new_ones((*points.shape[:-1], 1))], -1)
    products = torch.baddbmm(upper.mT @ extended, upper, extended)
    width = points.shape[-1]
    return out, (products[..., width:] * points - products[..., :width]).sum(0)


@builtin(aten._pdist_backward.default, samples=_pdist_backward_samples)
@with_tangent_rule(_pdist_backward_rule)
def pdist_backward(grad: torch.Tensor, self: torch.Tensor, p: float, pdist: torch.Tensor) -> torch.Tensor:
    """The vector-Jacobian product of ``_pdist_forward`` with respect to ``self``."""
    first, second = _pairs(self.shape[0], self.device)
    if p == 2 and self.shape[-1] > 0:
        # sum_j w_ij (x_i - x_j) = x_i sum_j w_ij - (W x)_i with W = squareform(grad / pdist): one
        # N x N matrix product instead of an (N^2/2) x D tensor of differences and its tangent
        w = torch.where(pdist > 0, grad / torch.where(pdist > 0, pdist, 1), 0)
        rows = self.shape[0]
        weights = w.new_zeros(rows, rows).index_put((first, second), w)
        weights = weights + weights.mT
        return weights.sum(1, keepdim=True) * self - weights.to(self.dtype) @ self
    contribution = grad.unsqueeze(-1) * p_norm_gradient(self[first] - self[second], pdist, p)
    return torch.zeros_like(self).index_add(0, first, contribution).index_add(0, second, -contribution)
