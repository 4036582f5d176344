"""Sampling: ``grid_sampler_2d`` / ``grid_sampler_3d`` (``F.grid_sample``) and their backward operators.

``F.grid_sample`` reaches ``aten::grid_sampler_2d`` (4-D input) or
``aten::grid_sampler_3d`` (5-D input); neither has a forward formula, nor have
their backward operators (needed by forward-over-reverse: ``torch.func.hessian``,
``jvp(grad(f))``). The decomposition reads like the kernel: map each grid
coordinate to a pixel coordinate, pick the taps around it (2 per dimension for
bilinear, 1 for nearest, 4 for bicubic), gather the input at every tap with one
``gather`` and sum the taps with their weights.

Conventions (those of PyTorch's kernels and their backward):

- ``x`` of the grid's last dimension indexes width, ``y`` height, ``z`` depth;
  ``align_corners`` maps -1 and 1 to the centres (True) or the outer edges
  (False) of the corner pixels.
- Padding ``border`` clips the pixel coordinate to ``[0, size - 1]`` and
  ``reflection`` reflects it at the borders first; the grid gradient is zero
  where the coordinate is clipped, *borders included* (PyTorch's backward
  counts a coordinate exactly on the border as outside), and changes sign
  where it was reflected an odd number of times.
- Taps outside the input contribute zero (``zeros`` padding). ``nearest``
  rounds half to even and has a zero grid gradient; ``bicubic`` (2-D only)
  applies the padding to each of its 4 x 4 integer taps, so its grid
  gradient never vanishes at the borders.

Example:
    >>> import torch, torch.nn.functional as F, fwdecomp
    >>> image = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    >>> grid = torch.rand(1, 3, 4, 2, dtype=torch.float64) * 2 - 1
    >>> with fwdecomp.enabled():
    ...     out, tangent = torch.func.jvp(
    ...         lambda g: F.grid_sample(image, g, align_corners=False), (grid,), (torch.ones_like(grid),))
    >>> torch.allclose(out, F.grid_sample(image, grid, align_corners=False))
    True
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from fwdecomp._torch import OpOverload
from fwdecomp.decompositions import builtin
from fwdecomp.registry import Sample
from fwdecomp.tangent_rules import TangentRule, add, with_tangent_rule

aten = torch.ops.aten

__all__ = [
    "grid_sampler_2d",
    "grid_sampler_2d_backward",
    "grid_sampler_3d",
    "grid_sampler_3d_backward",
]

BILINEAR, NEAREST, BICUBIC = 0, 1, 2
ZEROS, BORDER, REFLECTION = 0, 1, 2
_CUBIC_A = -0.75  # PyTorch's bicubic convolution constant
_REDUCED = (torch.float16, torch.bfloat16)


def _grid_partials(backward: OpOverload, *args: object) -> torch.Tensor:
    """The grid gradient of ``backward(*args, output_mask)``, the input's not asked for.

    torch 2.11's vmap rule of the backward kernels fails when the input's gradient is not asked
    for ("Expected a proper Tensor but got None"); there, both are computed.
    """
    try:
        return backward(*args, [False, True])[1]
    except RuntimeError as error:
        if "Expected a proper Tensor" not in str(error):
            raise
        return backward(*args, [True, True])[1]


# --- coordinates ---------------------------------------------------------
#
# Arithmetic with Python numbers uses the ``.Scalar`` overloads: ``x * 2.0`` on a
# tensor with a tangent goes through ``mul.Tensor`` and a zero tangent for the
# number, which costs about ten times more in PyTorch 2.13.


def _unnormalize(coord: torch.Tensor, size: int, align_corners: bool) -> tuple[torch.Tensor, float]:
    """Grid coordinate in [-1, 1] -> pixel coordinate (PyTorch's arithmetic), and its derivative."""
    shifted = aten.add.Scalar(coord, 1)
    if align_corners:
        return aten.mul.Scalar(aten.div.Scalar(shifted, 2), size - 1), (size - 1) / 2
    return aten.div.Scalar(aten.sub.Scalar(aten.mul.Scalar(shifted, size), 1), 2), size / 2


def _clip(x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` clipped to ``[0, size - 1]``; derivative 0 at and beyond the borders (as PyTorch's backward)."""
    inside = (x.detach() > 0) & (x.detach() < size - 1)
    return torch.where(inside, x, x.detach().clamp(0, size - 1)), inside


def _reflect(x: torch.Tensor, twice_low: int, twice_high: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` reflected at ``low`` and ``high`` until it lies between them, and the derivative (+-1)."""
    if twice_low == twice_high:
        return torch.zeros_like(x.detach()), torch.zeros_like(x.detach())
    low, span = twice_low / 2, (twice_high - twice_low) / 2
    offset = aten.sub.Scalar(x, low)
    below = offset.detach() < 0
    distance = torch.where(below, -offset, offset)  # |x - low|, derivative +1 at x == low as in PyTorch
    extra = torch.fmod(distance, span)
    even = torch.remainder(torch.floor(distance.detach() / span), 2) == 0
    reflected = torch.where(even, aten.add.Scalar(extra, low), aten.add.Scalar(aten.rsub.Scalar(extra, span), low))
    side = torch.where(below, -1.0, 1.0).to(x.dtype)
    return reflected, torch.where(even, side, -side)


def _source_coordinate(
    coord: torch.Tensor, size: int, padding_mode: int, align_corners: bool
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Pixel coordinate read by bilinear/nearest sampling, and ``d pixel / d grid`` as PyTorch's backward."""
    x, scale = _unnormalize(coord, size, align_corners)
    if padding_mode == ZEROS:
        return x, scale
    derivative: torch.Tensor | float = scale
    if padding_mode == REFLECTION:
        bounds = (0, 2 * (size - 1)) if align_corners else (-1, 2 * size - 1)
        x, flip = _reflect(x, *bounds)
        derivative = flip * scale
    x, inside = _clip(x, size)
    return x, inside.to(x.dtype) * derivative


def _pad_index(index: torch.Tensor, size: int, padding_mode: int, align_corners: bool) -> torch.Tensor:
    """Where an integer bicubic tap reads, after padding (PyTorch's ``compute_coordinates``)."""
    if padding_mode == ZEROS:
        return index
    x = index.to(torch.float64)
    if padding_mode == REFLECTION:
        x, _ = _reflect(x, *((0, 2 * (size - 1)) if align_corners else (-1, 2 * size - 1)))
    return x.clamp(0, size - 1).to(torch.int64)


# --- taps ----------------------------------------------------------------


@dataclass
class _Taps:
    """The taps along one spatial dimension: ``(K, N, L)`` indices, weights, ``d weight / d grid``."""

    index: torch.Tensor
    weight: torch.Tensor | None  # None: every weight is 1 (nearest)
    slope: torch.Tensor | None  # d weight / d grid coordinate; None: zero (nearest)
    valid: torch.Tensor


def _within(index: torch.Tensor, size: int) -> torch.Tensor:
    return (index >= 0) & (index < size)


def _linear_taps(coord: torch.Tensor, size: int, padding_mode: int, align_corners: bool) -> _Taps:
    x, derivative = _source_coordinate(coord, size, padding_mode, align_corners)
    low = x.detach().floor()
    upper_weight = x - x.floor()  # floor's (zero) tangent keeps this a fast tangent-tangent op
    index = torch.stack([low, low + 1]).to(torch.int64)
    weight = torch.stack([aten.rsub.Scalar(upper_weight, 1), upper_weight])
    slope = torch.stack([-derivative * torch.ones_like(low), derivative * torch.ones_like(low)])
    return _Taps(index, weight, slope, _within(index, size))


def _nearest_taps(coord: torch.Tensor, size: int, padding_mode: int, align_corners: bool) -> _Taps:
    x, _ = _source_coordinate(coord, size, padding_mode, align_corners)
    index = torch.round(x.detach()).to(torch.int64).unsqueeze(0)  # round half to even, as nearbyint
    return _Taps(index, None, None, _within(index, size))


def _polynomial(t: torch.Tensor, coefficients: Sequence[float]) -> torch.Tensor:
    """``c0 t^n + c1 t^(n-1) + ... + cn`` by Horner's rule."""
    value = aten.mul.Scalar(t, coefficients[0])
    for c in coefficients[1:-1]:
        value = aten.add.Scalar(value, c) * t
    return aten.add.Scalar(value, coefficients[-1])


# PyTorch's cubic convolution kernel (A = -0.75) for |t| <= 1 and 1 < |t| < 2, and their slopes
_INNER = (_CUBIC_A + 2, -(_CUBIC_A + 3), 0.0, 1.0)
_OUTER = (_CUBIC_A, -5 * _CUBIC_A, 8 * _CUBIC_A, -4 * _CUBIC_A)
_INNER_SLOPE = (3 * (_CUBIC_A + 2), -2 * (_CUBIC_A + 3), 0.0)
_OUTER_SLOPE = (3 * _CUBIC_A, -10 * _CUBIC_A, 8 * _CUBIC_A)


def _cubic_taps(coord: torch.Tensor, size: int, padding_mode: int, align_corners: bool) -> _Taps:
    x, scale = _unnormalize(coord, size, align_corners)  # bicubic pads each tap, not the coordinate
    low = x.detach().floor()
    t = x - x.floor()
    distances = (aten.add.Scalar(t, 1), t, aten.rsub.Scalar(t, 1), aten.rsub.Scalar(t, 2))
    kernels = (_OUTER, _INNER, _INNER, _OUTER)
    weight = torch.stack([_polynomial(d, k) for d, k in zip(distances, kernels)])
    slopes = [_polynomial(d, k) for d, k in zip(distances, (_OUTER_SLOPE, _INNER_SLOPE, _INNER_SLOPE, _OUTER_SLOPE))]
    slope = aten.mul.Scalar(torch.stack([slopes[0], slopes[1], -slopes[2], -slopes[3]]), scale)
    offsets = torch.arange(-1, 3, device=x.device).view(4, *([1] * x.dim()))
    index = _pad_index(low.to(torch.int64) + offsets, size, padding_mode, align_corners)
    return _Taps(index, weight, slope, _within(index, size))


_TAPS = {BILINEAR: _linear_taps, NEAREST: _nearest_taps, BICUBIC: _cubic_taps}


def _along(tensor: torch.Tensor, dim: int, dims: int) -> torch.Tensor:
    """View a ``(K, N, L)`` tensor with its tap axis at position ``dim`` of ``dims`` tap axes."""
    k = tensor.shape[0]
    return tensor.reshape((1,) * dim + (k,) + (1,) * (dims - 1 - dim) + tuple(tensor.shape[1:]))


def _product(factors: Sequence[torch.Tensor | None], dims: int) -> torch.Tensor | None:
    result = None
    for dim, factor in enumerate(factors):
        if factor is not None:
            factor = _along(factor, dim, dims)
            result = factor if result is None else result * factor
    return result


@dataclass
class _Plan:
    """Every tap of every output location: flat input index, weight, validity, ``(T, N, L)`` each."""

    index: torch.Tensor
    weight: torch.Tensor | None
    slopes: list[torch.Tensor | None]  # d weight / d grid coordinate, per spatial dimension
    valid: torch.Tensor
    # d2 weight / d grid_j d grid_k for j < k (bilinear, asked for: the only nonzero second derivatives)
    curvatures: dict[tuple[int, int], torch.Tensor] | None = None


def _plan(
    input: torch.Tensor,
    grid: torch.Tensor,
    mode: int,
    padding_mode: int,
    align_corners: bool,
    curvatures: bool = False,
) -> _Plan:
    spatial = input.shape[2:]
    dims = len(spatial)
    batch = grid.shape[0]
    coords = grid.reshape(batch, -1, dims).unbind(-1)[::-1]  # grid holds (x, y[, z]): reverse to (.., H, W)
    taps = [_TAPS[mode](coord, size, padding_mode, align_corners) for coord, size in zip(coords, spatial)]
    strides = [1] * dims
    for dim in range(dims - 2, -1, -1):
        strides[dim] = strides[dim + 1] * spatial[dim + 1]
    index = sum(_along(tap.index * stride, dim, dims) for dim, (tap, stride) in enumerate(zip(taps, strides)))
    valid = _product([tap.valid for tap in taps], dims)
    weight = _product([tap.weight for tap in taps], dims)
    slopes: list[torch.Tensor | None] = []
    for dim, tap in enumerate(taps):
        if tap.slope is None:
            slopes.append(None)
            continue
        factors = [tap.slope if other == dim else taps[other].weight for other in range(dims)]
        slopes.append(_product(factors, dims))
    total = 1
    for tap in taps:
        total *= tap.index.shape[0]

    def flat(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.expand(*index.shape).reshape(total, batch, -1)

    mixed = None
    if curvatures:  # bilinear: each weight is a product of factors linear in their own coordinate
        mixed = {}
        for j, k in itertools.combinations(range(dims), 2):
            factors = [tap.slope if other in (j, k) else tap.weight for other, tap in enumerate(taps)]
            mixed[(j, k)] = flat(_product(factors, dims))
    return _Plan(
        flat(torch.where(valid, index, 0)),  # type: ignore[arg-type]
        flat(weight),
        [flat(s) for s in slopes],
        flat(valid),  # type: ignore[arg-type]
        mixed,
    )


def _gather_taps(input: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``input`` at every tap: ``(N, C, T, L)``."""
    batch, channels = input.shape[:2]
    taps, _, locations = index.shape
    flat = input.reshape(batch, channels, -1)
    index = index.permute(1, 0, 2).reshape(batch, 1, taps * locations).expand(batch, channels, -1)
    return flat.gather(2, index).view(batch, channels, taps, locations)


def _tap_weights(plan: _Plan, dtype: torch.dtype, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weights (``plan``'s, or a ``(T, N, L)`` ``weight`` such as their tangent) with out-of-bounds
    taps zeroed, as ``(N, 1, T, L)``."""
    weight = plan.weight if weight is None else weight
    if weight is None:
        weight = plan.valid.to(dtype)
    else:
        weight = torch.where(plan.valid, weight, 0)
    return weight.permute(1, 0, 2).unsqueeze(1)


def _interpolate(input: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """``sum_taps weight * input[tap]`` for every output location: ``(N, C, L)``."""
    return (_gather_taps(input, plan.index) * _tap_weights(plan, input.dtype)).sum(2)


# --- checks --------------------------------------------------------------


def _check(input: torch.Tensor, grid: torch.Tensor, interpolation_mode: int, dims: int) -> None:
    """PyTorch's input rules for the grid samplers (a tangent never makes bad input pass)."""
    if input.dtype != grid.dtype:
        raise RuntimeError(
            "grid_sampler(): expected input and grid to have same dtype, but input has "
            f"{input.dtype} and grid has {grid.dtype}"
        )
    if input.dim() != dims + 2 or grid.dim() != dims + 2:
        raise RuntimeError(
            f"grid_sampler(): expected {dims + 2}D input and grid with same number of dimensions, but got "
            f"input with sizes {list(input.shape)} and grid with sizes {list(grid.shape)}"
        )
    if input.shape[0] != grid.shape[0]:
        raise RuntimeError(
            "grid_sampler(): expected grid and input to have same batch size, but got input with sizes "
            f"{list(input.shape)} and grid with sizes {list(grid.shape)}"
        )
    if grid.shape[-1] != dims:
        raise RuntimeError(
            f"grid_sampler(): expected grid to have size {dims} in last dimension, but got grid with "
            f"sizes {list(grid.shape)}"
        )
    if any(size <= 0 for size in input.shape[2:]):
        raise RuntimeError(
            "grid_sampler(): expected input to have non-empty spatial dimensions, but input has sizes "
            f"{list(input.shape)} with dimension 2 being empty"
        )
    if interpolation_mode not in _TAPS or (dims == 3 and interpolation_mode == BICUBIC):
        raise RuntimeError(
            f"grid_sampler(): interpolation mode {interpolation_mode} is not supported for {dims + 2}D input "
            "(bilinear = 0, nearest = 1, bicubic = 2 for 4D input only)"
        )


def _computation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _REDUCED else dtype


# --- forward -------------------------------------------------------------


def _sample(
    input: torch.Tensor,
    grid: torch.Tensor,
    interpolation_mode: int,
    padding_mode: int,
    align_corners: bool,
    dims: int,
) -> torch.Tensor:
    _check(input, grid, interpolation_mode, dims)
    out_dtype = input.dtype
    work = _computation_dtype(out_dtype)
    input, grid = input.to(work), grid.to(work)
    plan = _plan(input, grid, interpolation_mode, padding_mode, align_corners)
    out = _interpolate(input, plan)
    return out.reshape(*input.shape[:2], *grid.shape[1:-1]).to(out_dtype)


def _grid_samples(device: str, dtype: torch.dtype, dims: int, small: bool = False) -> Iterator[Sample]:
    gen = torch.Generator(device=device).manual_seed(0)

    def uniform(*shape: int, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
        return torch.rand(shape, dtype=dtype, device=device, generator=gen) * (high - low) + low

    # small enough for the Jacobian checks (one reverse pass per output entry)
    batch, channels = (1, 2) if small or dims == 3 else (2, 3)
    spatial = ((3, 4) if small else (4, 5)) if dims == 2 else ((2, 3, 3) if small else (3, 3, 4))
    out = ((2, 2) if small else (3, 2)) if dims == 2 else ((1, 2, 2) if small else (2, 1, 2))
    modes = (BILINEAR, NEAREST, BICUBIC) if dims == 2 else (BILINEAR, NEAREST)
    names = {BILINEAR: "bilinear", NEAREST: "nearest", BICUBIC: "bicubic"}
    paddings = {ZEROS: "zeros", BORDER: "border", REFLECTION: "reflection"}
    for mode, padding, align in itertools.product(modes, paddings, (False, True)):
        image = uniform(batch, channels, *spatial)
        grid = uniform(batch, *out, dims, low=-1.4, high=1.4)  # some coordinates outside: padding matters
        yield Sample((image, grid, mode, padding, align), note=f"{names[mode]}, {paddings[padding]}, align={align}")
    channels_last = uniform(batch, *spatial, channels).movedim(-1, 1)
    transposed_grid = uniform(batch, dims, *out).movedim(1, -1)
    yield Sample((channels_last, transposed_grid, BILINEAR, ZEROS, False), note="non-contiguous input and grid")
    if small:
        return
    yield Sample((uniform(1, 2, *spatial), uniform(1, *([1] * dims), dims), BILINEAR, BORDER, False), note="one point")
    empty = uniform(batch, 0, *out[1:], dims)
    yield Sample((uniform(batch, channels, *spatial), empty, BILINEAR, ZEROS, False), note="empty grid")


def _grid_2d_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    yield from _grid_samples(device, dtype, 2)


def _grid_3d_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    yield from _grid_samples(device, dtype, 3)


def _grid_rule(op: OpOverload, backward: OpOverload) -> TangentRule:
    """The tangent rule of ``grid_sampler_2d`` / ``_3d``: PyTorch's own kernels.

    The output is linear in ``input``: its tangent's share is the kernel applied to
    the input's tangent. The grid's share needs ``d out[n, c, p] / d grid[n, p, k]``
    for every channel, which the backward kernel sums over channels; folding the
    channels into the batch (``(N*C, 1, ...)`` input, the grid repeated per channel)
    and back-propagating ones makes it return exactly those partial derivatives,
    which are contracted with the grid's tangent. So every interpolation and padding
    mode is differentiated as the kernel computes it.
    """

    def rule(primals: list, tangents: list):
        input, grid, mode, padding, align = primals
        d_input, d_grid = tangents[0], tangents[1]
        out = op(*primals)
        if out.dtype in _REDUCED:  # tangents in float32, as the decomposition computes them
            input, grid = input.float(), grid.float()
            d_input = None if d_input is None else d_input.float()
            d_grid = None if d_grid is None else d_grid.float()
        terms = []
        if d_input is not None:
            terms.append(op(d_input, grid, mode, padding, align))
        if d_grid is not None:
            batch, channels = input.shape[:2]
            folded = input.reshape(batch * channels, 1, *input.shape[2:])
            repeated = grid.unsqueeze(1).expand(batch, channels, *grid.shape[1:])
            grids = repeated.reshape(batch * channels, *grid.shape[1:])
            ones = torch.ones((batch * channels, 1, *out.shape[2:]), dtype=input.dtype, device=out.device)
            partials = _grid_partials(backward, ones, folded, grids, mode, padding, align)
            partials = partials.reshape(batch, channels, *grid.shape[1:])
            d_grid = d_grid.unsqueeze(1)
            term = partials[..., 0] * d_grid[..., 0]  # a sum over the coordinate axis, faster unrolled
            for k in range(1, grid.shape[-1]):
                term = torch.addcmul(term, partials[..., k], d_grid[..., k])
            terms.append(term)
        tangent = add(*terms)
        return out, None if tangent is None else tangent.to(out.dtype)

    return rule


@builtin(aten.grid_sampler_2d.default, samples=_grid_2d_samples)
@with_tangent_rule(_grid_rule(aten.grid_sampler_2d.default, aten.grid_sampler_2d_backward.default))
def grid_sampler_2d(
    input: torch.Tensor, grid: torch.Tensor, interpolation_mode: int, padding_mode: int, align_corners: bool
) -> torch.Tensor:
    """``input`` (N, C, H, W) sampled at ``grid`` (N, H_out, W_out, 2), as ``F.grid_sample``."""
    return _sample(input, grid, interpolation_mode, padding_mode, align_corners, 2)


@builtin(aten.grid_sampler_3d.default, samples=_grid_3d_samples)
@with_tangent_rule(_grid_rule(aten.grid_sampler_3d.default, aten.grid_sampler_3d_backward.default))
def grid_sampler_3d(
    input: torch.Tensor, grid: torch.Tensor, interpolation_mode: int, padding_mode: int, align_corners: bool
) -> torch.Tensor:
    """``input`` (N, C, D, H, W) sampled at ``grid`` (N, D_out, H_out, W_out, 3), as ``F.grid_sample``."""
    return _sample(input, grid, interpolation_mode, padding_mode, align_corners, 3)


# --- backward ------------------------------------------------------------


def _sample_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    grid: torch.Tensor,
    interpolation_mode: int,
    padding_mode: int,
    align_corners: bool,
    input_mask: bool,
    dims: int,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Gradients of ``_sample`` with respect to ``input`` (if asked for) and ``grid`` (always)."""
    _check(input, grid, interpolation_mode, dims)
    dtypes = (input.dtype, grid.dtype)
    work = _computation_dtype(input.dtype)
    grad_output, input, grid = grad_output.to(work), input.to(work), grid.to(work)
    plan = _plan(input, grid, interpolation_mode, padding_mode, align_corners)
    batch, channels = input.shape[:2]
    locations = plan.index.shape[2]
    grad_output = grad_output.reshape(batch, channels, 1, locations)

    grad_input = None
    if input_mask:
        grad_input = _scatter_taps(grad_output * _tap_weights(plan, work), plan, input).to(dtypes[0])

    if interpolation_mode == NEAREST:
        return grad_input, torch.zeros_like(grid, dtype=dtypes[1])
    # sum over channels of grad_output * input at each tap, then weigh by d weight / d coordinate
    seen = (grad_output * _gather_taps(input, plan.index)).sum(1)  # (N, T, L)
    columns = [_contract_taps(seen, slope, plan) for slope in plan.slopes]  # type: ignore[arg-type]
    grad_grid = torch.stack(columns[::-1], -1).reshape(grid.shape)
    return grad_input, grad_grid.to(dtypes[1])


def _scatter_taps(spread: torch.Tensor, plan: _Plan, input: torch.Tensor) -> torch.Tensor:
    """``(N, C, T, L)`` values added into a zero tensor shaped like ``input`` at every tap's location."""
    batch, channels = input.shape[:2]
    taps, _, locations = plan.index.shape
    index = plan.index.permute(1, 0, 2).reshape(batch, 1, -1).expand(batch, channels, -1)
    flat = spread.reshape(batch, channels, taps * locations)
    return torch.zeros_like(input).reshape(batch, channels, -1).scatter_add(2, index, flat).reshape(input.shape)


def _contract_taps(seen: torch.Tensor, factor: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """``sum over valid taps of seen * factor``: ``(N, T, L)`` with a ``(T, N, L)`` factor -> ``(N, L)``."""
    return (seen * torch.where(plan.valid.permute(1, 0, 2), factor.permute(1, 0, 2), 0)).sum(1)


def _backward_kernel(op: OpOverload, *args: object, input_mask: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The backward kernel with ``output_mask = [input_mask, True]``; under torch 2.11's ``vmap`` its batch
    rule fails on a left-out ``grad_input`` ("Expected a proper Tensor but got None"): then both are asked for."""
    try:
        return op(*args, [input_mask, True])
    except RuntimeError:
        if input_mask:
            raise
        return op(*args, [True, True])


#: ``grid_sampler_3d_backward``'s rule answers up to this many grid locations (all batches), the
#: decomposition above: its three calls of the 3-D backward kernel (~1 ms each at 2x4x16^3) cost more
#: than the decomposition's vectorised taps on large grids. JVP time rule / decomposition measured on
#: one CPU thread (float32, bilinear): 0.61 at 1x2x2^3 locations 8, 0.74 at 512, 0.91 at 3,456, 0.98-1.06
#: at 8,192, 1.13 at 32,768. The 2-D rule is faster everywhere measured (0.49-0.75, up to 4x8x64x64).
GRID_3D_BACKWARD_RULE_MAX_LOCATIONS = 4096


def _grid_backward_rule(op: OpOverload, dims: int) -> TangentRule:
    """The tangent rule of ``grid_sampler_2d_backward`` / ``_3d`` (bilinear and nearest; bicubic declines).

    The outputs are the kernel's. The operator is linear in ``grad_output`` and its
    ``grad_grid`` is linear in ``input``: those tangent terms are the kernel applied to
    the tangents. The grid's term is written out on plain tensors from one plan of the
    taps; with ``W`` the tap weights, ``S_k = dW / dg_k`` and
    ``seen = sum_c grad_output * input[tap]``::

        d grad_input  += scatter(grad_output sum_k S_k dg_k)
        d grad_grid_k += sum_taps seen sum_(j != k) d2W / dg_j dg_k dg_j

    Bilinear weights are products of factors linear in their own coordinate (and the
    coordinate maps are piecewise linear): ``d2W / dg_k^2 = 0``. Nearest: the weights are
    constant, so neither the grid's nor the input's tangent reaches anything, and
    ``grad_grid`` is zero. Reduced-precision tangents are computed in float32, as the
    decomposition computes them.
    """

    def rule(primals: list, tangents: list):
        grad_output, input, grid, mode, padding, align, mask = primals
        d_output, d_input, d_grid = tangents[:3]
        if mode not in (BILINEAR, NEAREST):
            return NotImplemented
        if dims == 3 and grid.numel() > 3 * GRID_3D_BACKWARD_RULE_MAX_LOCATIONS:
            return NotImplemented
        outputs = op(*primals)
        if mode == NEAREST:
            d_input = d_grid = None
        dtypes = (input.dtype, grid.dtype)
        work = _computation_dtype(input.dtype)
        grad_output, input, grid = grad_output.to(work), input.to(work), grid.to(work)
        wanted = bool(mask[0])
        d_grad_input, d_grad_grid = [], []
        if d_output is not None:
            first, second = _backward_kernel(
                op, d_output.to(work), input, grid, mode, padding, align, input_mask=wanted
            )
            d_grad_input.append(first if wanted else None)
            d_grad_grid.append(second if mode == BILINEAR else None)
        if d_input is not None:
            d_grad_grid.append(
                _backward_kernel(op, grad_output, d_input.to(work), grid, mode, padding, align, input_mask=False)[1]
            )
        if d_grid is not None:
            plan = _plan(input, grid, mode, padding, align, curvatures=True)
            batch, channels = input.shape[:2]
            locations = plan.index.shape[2]
            spread = grad_output.reshape(batch, channels, 1, locations)
            # the grid's tangent per spatial dimension (.., H, W), as (1, N, L) to meet (T, N, L) tap tensors
            d_coords = [c.unsqueeze(0) for c in d_grid.to(work).reshape(batch, -1, dims).unbind(-1)[::-1]]
            if wanted:
                d_weight = add(*(slope * d for slope, d in zip(plan.slopes, d_coords)))  # type: ignore[operator]
                d_grad_input.append(_scatter_taps(spread * _tap_weights(plan, work, d_weight), plan, input))
            seen = (spread * _gather_taps(input, plan.index)).sum(1)  # (N, T, L)
            columns = []
            for k in range(dims):
                bent = add(
                    *(plan.curvatures[(min(j, k), max(j, k))] * d_coords[j] for j in range(dims) if j != k)  # type: ignore[index]
                )
                columns.append(_contract_taps(seen, bent, plan))  # type: ignore[arg-type]
            d_grad_grid.append(torch.stack(columns[::-1], -1).reshape(grid.shape))
        tangent_input = add(*d_grad_input) if wanted else None
        tangent_grid = add(*d_grad_grid)
        return outputs, (
            None if tangent_input is None else tangent_input.to(dtypes[0]),
            None if tangent_grid is None else tangent_grid.to(dtypes[1]),
        )

    return rule


def _grid_backward_samples(device: str, dtype: torch.dtype, dims: int) -> Iterator[Sample]:
    gen = torch.Generator(device=device).manual_seed(1)
    for index, sample in enumerate(_grid_samples(device, dtype, dims, small=True)):
        image, grid, mode, padding, align = sample.args
        if index % 2 == 1 and mode != BICUBIC:
            continue  # align_corners=True for bicubic only: the forward samples cover the rest
        grad = torch.randn((*image.shape[:2], *grid.shape[1:-1]), dtype=dtype, device=device, generator=gen)
        yield Sample((grad, image, grid, mode, padding, align, [True, True]), note=sample.note)
    spatial, out = ((3, 4), (2, 2)) if dims == 2 else ((2, 3, 3), (1, 2, 2))
    for mask in ([False, True], [True, False]):
        image = torch.randn(1, 2, *spatial, dtype=dtype, device=device, generator=gen)
        grid = torch.rand(1, *out, dims, dtype=dtype, device=device, generator=gen) * 2.4 - 1.2
        grad = torch.randn(1, 2, *out, dtype=dtype, device=device, generator=gen)
        yield Sample((grad, image, grid, BILINEAR, REFLECTION, False, mask), note=f"output_mask={mask}")


def _grid_2d_backward_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    yield from _grid_backward_samples(device, dtype, 2)


def _grid_3d_backward_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    yield from _grid_backward_samples(device, dtype, 3)


@builtin(aten.grid_sampler_2d_backward.default, samples=_grid_2d_backward_samples)
@with_tangent_rule(_grid_backward_rule(aten.grid_sampler_2d_backward.default, 2))
def grid_sampler_2d_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    grid: torch.Tensor,
    interpolation_mode: int,
    padding_mode: int,
    align_corners: bool,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Gradients of ``grid_sampler_2d`` for input (None unless ``output_mask[0]``) and grid."""
    return _sample_backward(
        grad_output, input, grid, interpolation_mode, padding_mode, align_corners, bool(output_mask[0]), 2
    )


@builtin(aten.grid_sampler_3d_backward.default, samples=_grid_3d_backward_samples)
@with_tangent_rule(_grid_backward_rule(aten.grid_sampler_3d_backward.default, 3))
def grid_sampler_3d_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    grid: torch.Tensor,
    interpolation_mode: int,
    padding_mode: int,
    align_corners: bool,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Gradients of ``grid_sampler_3d`` for input (None unless ``output_mask[0]``) and grid."""
    return _sample_backward(
        grad_output, input, grid, interpolation_mode, padding_mode, align_corners, bool(output_mask[0]), 3
    )
