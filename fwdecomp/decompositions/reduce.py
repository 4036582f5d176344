"""Grouped reductions: ``index_reduce`` and ``segment_reduce`` (and its backward operator).

``aten::index_reduce`` (prod, mean, amax, amin; ``include_self`` both ways)
and ``aten::segment_reduce`` (lengths or offsets; sum, mean, max, min, prod;
``axis``, ``unsafe``, ``initial``) have no forward formula;
``aten::_segment_reduce_backward`` has none either, so forward-over-reverse
(``torch.func.hessian``) needs it decomposed too.

Every decomposition here takes its *value* from PyTorch's own kernel, called
on detached inputs (so inputs are validated exactly as the kernel validates
them and the output is bit-for-bit the kernel's), and adds a zero-valued term
that carries the derivative. Where the derivative is a fixed linear map of the
inputs (sum, mean, the tie masks of max/min) that term is the map applied to
``x - x.detach()``; where it is not (prod, and the backward of prod) it is
``f(x) - f(x).detach()`` for a differentiable ``f``, so second derivatives are
right too. Everything is vectorised: groups are laid out with ``argsort``,
``bincount`` and ``searchsorted``; products of groups of different sizes are
taken over a ones-padded ``(groups, widest group, ...)`` tensor.

Conventions at non-smooth points (PyTorch's reverse mode, so the two agree):

- ``index_reduce`` amax/amin: the derivative is split evenly among every
  entry equal to the result, ``self`` included in the count whenever it equals
  the result, even with ``include_self=False`` (where ``self``'s own share is
  then dropped), as ``index_reduce_backward`` does. ``prod`` has the exact
  derivative also where entries are zero.
- ``segment_reduce`` max/min: the derivative is split evenly among the entries
  of a segment equal to its result; an ``initial`` value that wins has zero
  derivative. (PyTorch's CPU backward kernel divides a tied cotangent by the
  number of ties only when the cotangent is positive, which is not linear in
  the cotangent; forward mode cannot copy that, so it uses the even split.
  ``_segment_reduce_backward``'s decomposition reproduces the kernel's value,
  quirk included.)

Example:
    >>> import torch, fwdecomp
    >>> x = torch.tensor([1.0, 5.0, 2.0, 7.0], dtype=torch.float64)
    >>> lengths = torch.tensor([2, 2])
    >>> with fwdecomp.enabled():
    ...     out, tangent = torch.func.jvp(
    ...         lambda d: torch.segment_reduce(d, "max", lengths=lengths), (x,), (torch.ones_like(x),))
    >>> out
    tensor([5., 7.], dtype=torch.float64)
    >>> tangent
    tensor([1., 1.], dtype=torch.float64)
"""

from __future__ import annotations

from typing import Iterator

import torch

from fwdecomp.contract import meta_agrees, meta_shapes_unreliable
from fwdecomp.decompositions import builtin
from fwdecomp.decompositions._util import known_on_cpu
from fwdecomp.jvp_rules import call
from fwdecomp.registry import Sample
from fwdecomp.tangent_rules import multilinear, with_tangent_rule

aten = torch.ops.aten

__all__ = [
    "grouped_exclusive_product",
    "grouped_product",
    "index_reduce",
    "segment_reduce",
    "segment_reduce_backward",
]


# --- groups ------------------------------------------------------------------


def _layout(groups: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Sort ``groups`` (stably); each entry's group and rank within it, in that order, and the widest group."""
    order = torch.argsort(groups, stable=True)
    sorted_groups = groups[order]
    counts = torch.bincount(groups, minlength=num_groups)
    starts = counts.cumsum(0) - counts
    ranks = torch.arange(groups.numel(), device=groups.device) - starts[sorted_groups]
    width = int(counts.max()) if groups.numel() else 0
    return order, sorted_groups, ranks, width


def _padded(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, tuple]:
    """``values`` (N, ...) laid out as (num_groups, widest group, ...), padded with ones."""
    order, sorted_groups, ranks, width = _layout(groups, num_groups)
    padded = values.new_ones((num_groups, width, *values.shape[1:]))
    padded = padded.index_put((sorted_groups, ranks), values[order])
    return padded, (order, sorted_groups, ranks)


def grouped_product(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Product of the rows of ``values`` (N, ...) in each group: (num_groups, ...); 1 for an empty group.

    The derivative is exact, also where entries are zero (``torch.prod``'s).
    """
    padded, _ = _padded(values, groups.long(), num_groups)
    return padded.prod(1)


def grouped_exclusive_product(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """For each row of ``values`` (N, ...), the product of the *other* rows of its group; zero-safe."""
    padded, (order, sorted_groups, ranks) = _padded(values, groups.long(), num_groups)
    ones = padded.new_ones((num_groups, 1, *values.shape[1:]))
    before = torch.cat([ones, padded[:, :-1]], 1).cumprod(1)
    after = torch.cat([ones, padded.flip(1)[:, :-1]], 1).cumprod(1).flip(1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return (before * after)[sorted_groups[inverse], ranks[inverse]]


def _carrier(x: torch.Tensor) -> torch.Tensor:
    """Zero in value, ``x``'s tangent in derivative."""
    return x - x.detach()


# --- index_reduce --------------------------------------------------------------


def _spread(index: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * like.dim()
    shape[dim] = -1
    return index.view(shape).expand_as(like)


def _index_reduce_prod(self, dim, index, source, include_self):
    moved_self = self.movedim(dim, 0)
    moved_source = source.movedim(dim, 0)
    groups = index.long()
    product = grouped_product(moved_source, groups, moved_self.shape[0])
    if include_self:
        product = moved_self * product
    else:
        hit = torch.bincount(groups, minlength=moved_self.shape[0]) > 0
        hit = hit.view(-1, *([1] * (moved_self.dim() - 1)))
        product = torch.where(hit, product, moved_self)
    return product.movedim(0, dim)


def _not_linear(reduce: int, initial: int):
    """``declines`` for a segment reduction's tangent rule: ``sum`` (an ``initial`` value only shifts
    it) and ``mean`` without ``initial`` are linear in the data."""

    def declines(primals: list, tangents: list) -> bool:
        kind = primals[reduce]
        return kind not in ("sum", "mean") or (kind == "mean" and primals[initial] is not None)

    return declines


def _segment_reduce_rule(primals: list, tangents: list):
    """The kernel on the data's tangent, without ``initial`` (a constant shift of a sum)."""
    if any(t is not None for t in tangents[1:]) or _not_linear(1, 7)(primals, tangents):
        return NotImplemented
    out = call(aten.segment_reduce.default, primals)
    if tangents[0] is None:
        return out, None
    shifted = list(primals)
    shifted[0], shifted[7] = tangents[0], None
    return out, call(aten.segment_reduce.default, shifted)


def _tie_split(
    self: torch.Tensor,
    dim: int,
    index: torch.Tensor,
    source: torch.Tensor,
    include_self: bool,
    result: torch.Tensor,
    d_self: torch.Tensor,
    d_source: torch.Tensor,
) -> torch.Tensor:
    """amax / amin: the tangents of the entries equal to the result, split evenly among them, as
    ``index_reduce_backward`` does (``self``, ``source``: values; ``d_*``: tangents or carriers)."""
    self_ties = self == result
    source_ties = source == result.index_select(dim, index)
    ties = self_ties.to(d_self.dtype).index_add(dim, index, source_ties.to(d_self.dtype))
    self_share = torch.where(self_ties, d_self, 0)
    if not include_self:
        self_share = self_share.index_fill(dim, index, 0)
    return self_share.index_add(dim, index, torch.where(source_ties, d_source, 0)) / ties


_index_reduce_mean_rule = multilinear(  # the mean is linear in self and source together
    aten.index_reduce.default, (("self", "source"),), declines=lambda primals, tangents: primals[4] != "mean"
)


def _index_reduce_rule(primals: list, tangents: list):
    """mean: the kernel on the tangents (linear). prod: ``out * (d_self / self + sum d_source / source)``
    over each slot's group, where no factor is 0 (else the zero-safe decomposition runs). amax/amin:
    the even split among ties, as the decomposition, on plain tensors."""
    self, dim, index, source, reduce, include_self = primals
    if reduce == "mean":
        return _index_reduce_mean_rule(primals, tangents)
    d_self, d_source = tangents[0], tangents[3]
    if any(t is not None for i, t in enumerate(tangents) if i not in (0, 3)):
        return NotImplemented
    out = call(aten.index_reduce.default, primals)
    if d_self is None and d_source is None:
        return out, None
    shape = out.shape
    if self.dim() == 0:  # the kernel treats a 0-d self (and source) as 1-element vectors
        self, source, out = self.reshape(1), source.reshape(1), out.reshape(1)
    dim = dim % self.dim()
    d_self = torch.zeros_like(self) if d_self is None else d_self.reshape(self.shape)
    d_source = torch.zeros_like(source) if d_source is None else d_source.reshape(source.shape)
    if reduce != "prod":
        return out.reshape(shape), _tie_split(self, dim, index, source, include_self, out, d_self, d_source).reshape(
            shape
        )
    try:
        if bool((source == 0).any()) or (include_self and bool((self == 0).any())):
            return NotImplemented
    except RuntimeError:  # data-dependent control flow under vmap
        return NotImplemented
    sums = torch.zeros_like(out).index_add(dim, index, d_source / source)
    if include_self:
        tangent = out * (sums + d_self / self)
    else:
        hit = torch.zeros(out.shape[dim], dtype=torch.bool, device=out.device).index_fill(0, index, True)
        hit = hit.view(-1, *([1] * (out.dim() - dim - 1)))
        tangent = torch.where(hit, out * sums, d_self)
    return out.reshape(shape), tangent.reshape(shape)


@builtin(aten.index_reduce.default, samples=lambda device, dtype: _index_reduce_samples(device, dtype))
@with_tangent_rule(_index_reduce_rule)
def index_reduce(
    self: torch.Tensor,
    dim: int,
    index: torch.Tensor,
    source: torch.Tensor,
    reduce: str,
    *,
    include_self: bool = True,
) -> torch.Tensor:
    """``self`` with the slices of ``source`` reduced into the slices ``index`` names along ``dim``."""
    value = aten.index_reduce(self.detach(), dim, index, source.detach(), reduce, include_self=include_self)
    scalar = self.dim() == 0
    if scalar:  # the kernel treats a 0-d self (and source) as 1-element vectors
        self, source = self.reshape(1), source.reshape(1)
    dim = dim % self.dim()
    if reduce == "prod":
        ours = _index_reduce_prod(self, dim, index, source, include_self)
        tangent = ours - ours.detach()
    else:
        d_self, d_source = _carrier(self), _carrier(source)
        if reduce == "mean":
            counts = torch.ones_like(self.detach()) if include_self else torch.zeros_like(self.detach())
            if not include_self:
                unhit = counts.index_fill(dim, index, 1) == 0
                counts = counts + unhit
                d_self = d_self.index_fill(dim, index, 0)
            counts = counts.index_add(dim, index, torch.ones_like(source.detach()))
            tangent = d_self.index_add(dim, index, d_source) / counts
        else:  # amax / amin
            result = value.reshape(self.shape)
            tangent = _tie_split(self.detach(), dim, index, source.detach(), include_self, result, d_self, d_source)
    return value + tangent.reshape(value.shape)


def _rng(device: str, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _index_reduce_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    gen = _rng(device)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, dtype=dtype, device=device, generator=gen)

    def index(*values: int) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    for reduce in ("prod", "mean", "amax", "amin"):
        for include_self in (True, False):
            kw = {"include_self": include_self}
            note = f"{reduce}, include_self={include_self}"
            yield Sample((randn(5, 4), 1, index(0, 3, 0, 1, 0), randn(5, 5), reduce), kw, note=f"{note}, repeats")
            yield Sample((randn(2, 3, 4), -1, index(3, 3), randn(2, 3, 2), reduce), kw, note=f"{note}, batched, dim=-1")
        kw = {"include_self": True}
        yield Sample((randn(6), 0, index(2, 5, 2), randn(3), reduce), kw, note=f"{reduce}, 1-d")
        yield Sample((randn(), 0, index(0), randn(), reduce), kw, note=f"{reduce}, 0-d")
        yield Sample(
            (randn(4, 3).mT, 0, index(1, 0, 1, 1), randn(4, 4).mT, reduce),
            {"include_self": False},
            note=f"{reduce}, non-contiguous",
        )
        yield Sample((randn(3, 4), 1, index(), randn(3, 0), reduce), kw, note=f"{reduce}, empty index")
        yield Sample((randn(0, 4), 1, index(1, 2), randn(0, 2), reduce), kw, note=f"{reduce}, zero rows")
    # Ties between two entries: the even split is also what central differences see.
    tied = torch.tensor([[1.0, 4.0, 2.0], [3.0, 0.5, 2.0]], dtype=dtype, device=device)
    for reduce in ("amax", "amin"):
        source = torch.tensor([[4.0, 0.0], [5.0, 0.5]], dtype=dtype, device=device)
        yield Sample((tied, 1, index(1, 0), source, reduce), {"include_self": True}, note=f"{reduce}, two-way ties")
    # Zeros for prod: one zero (from source / from self), two zeros in a group, a zero alone.
    zeros_self = torch.tensor([[0.0, 2.0, 3.0], [1.5, 0.0, -1.0]], dtype=dtype, device=device)
    zeros_source = torch.tensor([[2.0, 0.0, 0.0, 3.0], [-2.0, 0.0, 4.0, 0.5]], dtype=dtype, device=device)
    for include_self in (True, False):
        yield Sample(
            (zeros_self, 1, index(0, 1, 1, 2), zeros_source, "prod"),
            {"include_self": include_self},
            note=f"prod with zeros, include_self={include_self}",
        )


# --- segment_reduce -----------------------------------------------------------


def _segments(
    data: torch.Tensor, lengths: torch.Tensor | None, offsets: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """The segment of each position along the reduced axis (``S``, the segment count, where none).

    The axis is the last dimension of ``lengths``/``offsets`` (the kernel checks that it is the
    ``axis`` argument). Returns ``(segment ids (B, D), segment lengths (B, S), valid (B, D),
    (B, D, I))`` with ``B`` the product of the dimensions before the axis, ``D`` its size and
    ``I`` the product of those after it.
    """
    bounds = lengths if lengths is not None else offsets
    axis = bounds.dim() - 1
    outer = inner = 1
    for size in data.shape[:axis]:
        outer *= size
    for size in data.shape[axis + 1 :]:
        inner *= size
    size = data.shape[axis]
    bounds = bounds.reshape(outer, bounds.shape[-1]).long()
    if lengths is not None:
        ends = bounds.cumsum(-1)
        starts = ends - bounds
    else:
        starts, ends = bounds[:, :-1], bounds[:, 1:]
    count = ends.shape[-1]
    positions = torch.arange(size, device=data.device).expand(outer, size)
    # segment id = how many segment ends lie at or before the position (searchsorted(ends, positions,
    # right=True), as a count: one scatter of the ends and a cumulative sum, ~2x faster on CPU)
    rows = torch.arange(outer, device=data.device).unsqueeze(1) * (size + 1)
    marks = (ends.clamp(0, size) + rows).reshape(-1)
    counts = torch.zeros(outer * (size + 1), dtype=marks.dtype, device=data.device)
    counts = counts.index_add_(0, marks, torch.ones_like(marks))
    ids = counts.view(outer, size + 1)[:, :size].cumsum(1)
    inside = ids < count
    first = starts.gather(1, ids.clamp_max(max(count - 1, 0))) if count else torch.zeros_like(ids)
    valid = inside & (positions >= first)
    ids = torch.where(valid, ids, count)
    return ids, ends - starts, valid, (outer, size, inner)


def _segment_sum(values3: torch.Tensor, ids: torch.Tensor, count: int) -> torch.Tensor:
    """Sum ``values3`` (B, D, I) over each segment: (B, count, I)."""
    outer, _, inner = values3.shape
    total = values3.new_zeros((outer, count + 1, inner))
    total = total.scatter_add(1, ids.unsqueeze(-1).expand_as(values3), values3)
    return total[:, :count]


def _gather_segments(per_segment: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, S, I) per segment -> (B, D, I) per position (0 where a position is in no segment)."""
    outer, _, inner = per_segment.shape
    padded = torch.cat([per_segment, per_segment.new_zeros((outer, 1, inner))], 1)
    if outer == 1:  # one row of segments: whole rows copied, 3-4x faster than an elementwise gather
        return padded[0].index_select(0, ids[0]).unsqueeze(0)
    return padded.gather(1, ids.unsqueeze(-1).expand(outer, ids.shape[1], inner))


def _segment_products(values3: torch.Tensor, ids: torch.Tensor, count: int, exclusive: bool) -> torch.Tensor:
    outer, size, inner = values3.shape
    groups = (ids + torch.arange(outer, device=ids.device).unsqueeze(1) * (count + 1)).reshape(-1)
    flat = values3.reshape(outer * size, inner)
    if exclusive:
        return grouped_exclusive_product(flat, groups, outer * (count + 1)).reshape(outer, size, inner)
    return grouped_product(flat, groups, outer * (count + 1)).reshape(outer, count + 1, inner)[:, :count]


def _initial_value(initial, reduce: str) -> float:
    if initial is not None:
        return initial
    return 1.0 if reduce == "prod" else 0.0


def _declare_meta_bugs() -> None:
    """torch 2.11's meta kernels of segment_reduce do not normalise a negative ``axis``."""
    data, offsets = torch.ones(2, 6, dtype=torch.float64), torch.tensor([[0, 3, 6], [0, 2, 6]])
    forward = aten.segment_reduce.default
    if not meta_agrees(forward, data, "sum", offsets=offsets, axis=-1, unsafe=True):
        meta_shapes_unreliable(forward, "on this torch the meta kernel ignores a negative axis's normalisation")
    output = forward(data, "sum", offsets=offsets, axis=-1, unsafe=True)
    backward = aten._segment_reduce_backward.default
    if not meta_agrees(backward, torch.ones_like(output), output, data, "sum", offsets=offsets, axis=-1):
        meta_shapes_unreliable(backward, "on this torch the meta kernel ignores a negative axis's normalisation")


_declare_meta_bugs()


@builtin(aten.segment_reduce.default, samples=lambda device, dtype: _segment_reduce_samples(device, dtype))
@with_tangent_rule(_segment_reduce_rule)
def segment_reduce(
    data: torch.Tensor,
    reduce: str,
    *,
    lengths: torch.Tensor | None = None,
    indices: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
    axis: int = 0,
    unsafe: bool = False,
    initial=None,
) -> torch.Tensor:
    """Reduce each segment of ``data`` along ``axis`` (segments given by ``lengths`` or ``offsets``)."""
    value = aten.segment_reduce(
        data.detach(),
        reduce,
        lengths=lengths,
        indices=indices,
        offsets=offsets,
        axis=axis,
        unsafe=unsafe,
        initial=initial,
    )
    ids, seg_lengths, valid, (outer, size, inner) = _segments(data, lengths, offsets)
    count = seg_lengths.shape[-1]
    shape3 = (outer, count, inner)
    if reduce in ("sum", "mean"):
        tangent = _segment_sum(_carrier(data).reshape(outer, size, inner), ids, count)
        if reduce == "mean":
            tangent = tangent / seg_lengths.clamp_min(1).unsqueeze(-1).to(data.dtype)
    elif reduce in ("max", "min"):
        data3 = data.reshape(outer, size, inner)
        result = value.detach().reshape(shape3)
        ties = (data3.detach() == _gather_segments(result, ids)) & valid.unsqueeze(-1)
        tied = _segment_sum(ties.to(data.dtype), ids, count).clamp_min(1)
        tangent = _segment_sum(torch.where(ties, _carrier(data3), 0), ids, count) / tied
    else:  # prod
        product = _segment_products(data.reshape(outer, size, inner), ids, count, exclusive=False)
        product = product * _initial_value(initial, reduce)
        tangent = product - product.detach()
    return value + tangent.reshape(value.shape)


def _segment_samples(device: str, dtype: torch.dtype):
    gen = _rng(device, 1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, dtype=dtype, device=device, generator=gen)

    def long(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    # Empty segments come with an initial value: without one, max/min/mean give -inf/inf/nan there,
    # which finite differences cannot check (the decomposition's tangent there is 0).
    for reduce in ("sum", "mean", "max", "min", "prod"):
        yield (randn(6), reduce, {"lengths": long([2, 3, 1])}, f"{reduce}, lengths")
        yield (randn(6), reduce, {"lengths": long([2, 0, 3, 1]), "initial": -0.5}, f"{reduce}, an empty segment")
        yield (
            randn(6),
            reduce,
            {"offsets": long([0, 2, 2, 5, 6]), "initial": 1.5},
            f"{reduce}, offsets, initial",
        )
        yield (randn(5, 3), reduce, {"lengths": long([1, 4]), "axis": 0}, f"{reduce}, 2-d, axis 0")
        yield (
            randn(2, 5, 3),
            reduce,
            {"lengths": long([[2, 3], [0, 5]]), "axis": 1, "initial": 0.25},
            f"{reduce}, 3-d, per-row lengths, axis 1",
        )
        yield (
            randn(2, 6),
            reduce,
            {"offsets": long([[1, 3, 4], [0, 0, 6]]), "axis": -1, "unsafe": True, "initial": 1.0},
            f"{reduce}, per-row offsets, axis -1, unsafe",
        )
        yield (randn(7), reduce, {"lengths": long([2, 3]), "unsafe": True}, f"{reduce}, unsafe, lengths short")
        yield (randn(4, 5).mT, reduce, {"lengths": long([3, 2]), "initial": 2.0}, f"{reduce}, non-contiguous")
    # Ties (two-way: what central differences see) and zeros.
    tied = torch.tensor([3.0, 1.0, 3.0, -2.0, 0.5, -2.0], dtype=dtype, device=device)
    for reduce in ("max", "min"):
        yield (tied, reduce, {"lengths": long([3, 3])}, f"{reduce}, two-way ties")
    zeros = torch.tensor([0.0, 2.0, -1.0, 0.0, 0.0, 3.0, 0.0], dtype=dtype, device=device)
    yield (zeros, "prod", {"lengths": long([3, 3, 1]), "initial": 2.0}, "prod with zeros")


def _segment_reduce_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    for data, reduce, kwargs, note in _segment_samples(device, dtype):
        yield Sample((data, reduce), kwargs, note=note)


def _with_output_of(reduce: str, kwargs: dict):
    """``Sample.prepare``: pass ``segment_reduce(data)`` as ``output``, so the two stay consistent."""

    def prepare(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        grad, _, data = tensors
        return [grad, aten.segment_reduce(data, reduce, **kwargs), data]

    return prepare


def _only_grad_varies(output: torch.Tensor, data: torch.Tensor):
    """``Sample.prepare``: keep ``output`` and ``data`` fixed (at the precision of the check)."""

    def prepare(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [tensors[0], output.to(tensors[0].dtype), data.to(tensors[0].dtype)]

    return prepare


def _segment_reduce_backward_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    gen = _rng(device, 2)
    for data, reduce, kwargs, note in _segment_samples(device, dtype):
        if "ties" in note:
            continue  # the backward jumps where a tie breaks: covered below with fixed data
        output = aten.segment_reduce(data, reduce, **kwargs)
        grad = torch.randn(output.shape, dtype=dtype, device=device, generator=gen)
        args = (grad, output, data, reduce)
        backward_kwargs = {k: v for k, v in kwargs.items() if k != "unsafe"}
        yield Sample(args, backward_kwargs, note=note, tangents=(0, 1, 2), prepare=_with_output_of(reduce, kwargs))
        if reduce == "prod" and "zeros" not in note:  # smooth in output away from zeros: vary it alone
            yield Sample(args, backward_kwargs, note=f"{note}, independent output")
    tied = torch.tensor([3.0, 1.0, 3.0, -2.0, 0.5, -2.0], dtype=dtype, device=device)
    lengths = torch.tensor([3, 3], device=device)
    for reduce in ("max", "min"):
        output = aten.segment_reduce(tied, reduce, lengths=lengths)
        grad = torch.tensor([1.5, -0.5], dtype=dtype, device=device)
        yield Sample(
            (grad, output, tied, reduce),
            {"lengths": lengths},
            note=f"{reduce}, ties, cotangents of both signs",
            tangents=(0, 1, 2),
            prepare=_only_grad_varies(output, tied),
        )


_backward_linear = multilinear(
    aten._segment_reduce_backward.default, (("grad",),), constant=("output", "data"), declines=_not_linear(3, 7)
)


def _segment_reduce_backward_rule(primals: list, tangents: list):
    """sum / mean (linear in ``grad``, constant in ``output`` and ``data``): the kernel for the output;
    where 1-D ``lengths`` tile the whole axis, the tangent is ``grad``'s repeated over each segment
    (divided by its length for the mean): one ``repeat_interleave``, a quarter of a kernel call on the
    CPU. Otherwise the kernel on ``grad``'s tangent."""
    grad, _, data, reduce, lengths, offsets = primals[:6]
    d_grad = tangents[0]
    tiled = (
        d_grad is not None
        and reduce in ("sum", "mean")
        and (reduce == "sum" or primals[7] is None)
        and offsets is None
        and lengths is not None
        and lengths.dim() == 1
        and data.dim() > 0
        and grad.shape[0] == lengths.shape[0]
        and known_on_cpu(lengths, lambda n: n.sum() == data.shape[0])  # the kernel checks the rest (axis, unsafe)
    )
    if not tiled:
        return _backward_linear(primals, tangents)
    out = call(aten._segment_reduce_backward.default, primals)
    if reduce == "mean":
        d_grad = d_grad / lengths.clamp_min(1).reshape(-1, *[1] * (d_grad.dim() - 1)).to(d_grad.dtype)
    return out, d_grad.repeat_interleave(lengths, dim=0).reshape(out.shape)


@builtin(
    aten._segment_reduce_backward.default,
    samples=lambda device, dtype: _segment_reduce_backward_samples(device, dtype),
)
@with_tangent_rule(_segment_reduce_backward_rule)
def segment_reduce_backward(
    grad: torch.Tensor,
    output: torch.Tensor,
    data: torch.Tensor,
    reduce: str,
    *,
    lengths: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
    axis: int = 0,
    initial=None,
) -> torch.Tensor:
    """The vector-Jacobian product of ``segment_reduce`` with respect to ``data``, as the kernel computes it."""
    value = aten._segment_reduce_backward(
        grad.detach(),
        output.detach(),
        data.detach(),
        reduce,
        lengths=lengths,
        offsets=offsets,
        axis=axis,
        initial=initial,
    )
    ids, seg_lengths, valid, (outer, size, inner) = _segments(data, lengths, offsets)
    count = seg_lengths.shape[-1]
    shape3 = (outer, count, inner)
    grad3 = grad.reshape(shape3)
    valid3 = valid.unsqueeze(-1)
    if reduce in ("sum", "mean"):
        scale = grad3 - grad3.detach()
        if reduce == "mean":
            scale = scale / seg_lengths.clamp_min(1).unsqueeze(-1).to(grad.dtype)
        tangent = _gather_segments(scale, ids)
    elif reduce in ("max", "min"):
        data3 = data.detach().reshape(outer, size, inner)
        picked = (data3 == _gather_segments(output.detach().reshape(shape3), ids)) | data3.isnan()
        picked = picked & valid3
        ties = _gather_segments(_segment_sum(picked.to(grad.dtype), ids, count), ids)
        per_position = _gather_segments(grad3, ids)
        # The kernel divides by the number of ties only where the cotangent is positive.
        divide = (ties >= 2) & (per_position.detach() > 0)
        share = torch.where(divide, _carrier(per_position) / ties.clamp_min(1), _carrier(per_position))
        tangent = torch.where(picked, share, 0)
    else:  # prod: grad * output / x where x != 0, else grad * (product of the others) * initial
        data3 = data.reshape(outer, size, inner)
        per_grad = _gather_segments(grad3, ids)
        per_output = _gather_segments(output.reshape(shape3), ids)
        regular = (data3 != 0) & ~data3.isnan()
        safe = torch.where(regular, data3, 1)
        others = _segment_products(data3, ids, count, exclusive=True) * _initial_value(initial, reduce)
        ours = torch.where(regular, per_grad * per_output / safe, per_grad * others)
        ours = torch.where(valid3, ours, 0)
        tangent = ours - ours.detach()
    return value + tangent.reshape(value.shape)
