"""Embedding bags: ``_embedding_bag`` (``F.embedding_bag``, ``nn.EmbeddingBag``) and its backward operators.

``F.embedding_bag`` reaches ``aten::_embedding_bag`` when the weight carries a
tangent and ``aten::_embedding_bag_forward_only`` when only the
``per_sample_weights`` do; neither has a forward formula, nor have the backward
operators that forward-over-reverse differentiates (``_embedding_bag_backward``,
``_embedding_bag_dense_backward``, ``_embedding_bag_per_sample_weights_backward``).

The differentiable output is written with ``index_select`` / ``index_add`` /
``gather``. The three integer outputs (``offset2bag``, ``bag_size``,
``max_indices``) are not differentiated; their values depend on the device and
on the kernel's path (its CPU fast path leaves ``offset2bag`` empty, ``sum`` mode
zeroes ``bag_size``, ...), so they come from PyTorch's own kernel, called on
the tangent-free inputs. That call also checks the inputs exactly as PyTorch
does, and in ``max`` mode it gives the position of each maximum.

Conventions (those of PyTorch's kernels):

- ``max`` mode: each output entry has the derivative of the entry its
  ``max_indices`` names, the *first* maximal one in the bag; empty bags (and
  bags holding only ``padding_idx``) give 0 with derivative 0.
- ``mean`` divides by the number of entries that are not ``padding_idx``
  (at least 1); ``padding_idx`` entries contribute nothing.
- ``scale_grad_by_freq`` and ``sparse`` change only what reverse mode
  returns, not the function: forward mode gives the true derivative for them
  (as ``F.embedding``'s forward formula does). The backward operators
  reproduce their kernels, including the CPU kernel's frequency scaling,
  which divides each index's gradient by the count of the index at the same
  rank in the *sorted* indices (a PyTorch bug, kept so that
  forward-over-reverse differentiates what reverse mode computes).

Example:
    >>> import torch, torch.nn.functional as F, fwdecomp
    >>> weight = torch.randn(10, 3, dtype=torch.float64)
    >>> indices, offsets = torch.tensor([1, 2, 4, 5, 4, 3]), torch.tensor([0, 2])
    >>> with fwdecomp.enabled():
    ...     out, tangent = torch.func.jvp(
    ...         lambda w: F.embedding_bag(indices, w, offsets, mode="mean"), (weight,), (torch.ones_like(weight),))
    >>> tangent
    tensor([[1., 1., 1.],
            [1., 1., 1.]], dtype=torch.float64)
"""

from __future__ import annotations

from typing import Iterator

import torch

from fwdecomp._torch import OpOverload
from fwdecomp.contract import meta_shapes_unreliable
from fwdecomp.decompositions import builtin
from fwdecomp.registry import Sample
from fwdecomp.tangent_rules import TangentRule, in_place, multilinear, with_tangent_rule

aten = torch.ops.aten

__all__ = [
    "embedding_bag",
    "embedding_bag_backward",
    "embedding_bag_dense_backward",
    "embedding_bag_forward_only",
    "embedding_bag_per_sample_weights_backward",
]

SUM, MEAN, MAX = 0, 1, 2

_CPU_INTEGER_OUTPUTS = (
    "on CPU the kernel's integer outputs depend on its path (offset2bag is empty on the float32 fast "
    "path, bag_size has one entry per bag, max_indices copies bag_size in sum and mean mode); the meta "
    "kernel answers for CUDA when given meta tensors"
)
meta_shapes_unreliable(aten._embedding_bag.default, _CPU_INTEGER_OUTPUTS)
meta_shapes_unreliable(aten._embedding_bag_forward_only.default, _CPU_INTEGER_OUTPUTS)


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()


def _promote(indices: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and offsets in their common integer type, as the kernel promotes them."""
    common = torch.promote_types(indices.dtype, offsets.dtype)
    return indices.to(common), offsets.to(common)


def _offset2bag(indices: torch.Tensor, offsets: torch.Tensor, computed: torch.Tensor) -> torch.Tensor:
    """The bag of every index: the kernel's ``offset2bag``, or computed where its fast path left it empty."""
    if computed.numel() == indices.numel() or indices.numel() == 0:
        return computed
    starts = torch.zeros(indices.numel() + 1, dtype=offsets.dtype, device=offsets.device)
    starts.index_add_(0, offsets, torch.ones_like(offsets))
    starts[0] -= 1
    return starts.cumsum(0, dtype=offsets.dtype)[:-1]


def _bags(indices: torch.Tensor, offsets: torch.Tensor, offset2bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, bag of each index)`` for the backward operators: promoted as the kernel promotes them."""
    indices, offsets = _promote(indices, offsets)
    return indices, _offset2bag(indices, offsets, offset2bag)


def _chosen_maxima(bag_size: torch.Tensor, max_indices: torch.Tensor, num_bags: int) -> torch.Tensor:
    """Where ``max_indices`` names a row: not in empty bags (CPU: any value there; CUDA: -1)."""
    return (bag_size[:num_bags] > 0).unsqueeze(1) & (max_indices >= 0)


def _bag_reduce(
    weight: torch.Tensor,
    indices: torch.Tensor,
    bags: torch.Tensor,
    num_bags: int,
    mode: int,
    per_sample_weights: torch.Tensor | None,
    padding_idx: int,
    bag_size: torch.Tensor,
) -> torch.Tensor:
    """Sum (or mean) of the embedding rows in each bag, ``padding_idx`` rows left out."""
    if padding_idx >= 0:
        keep = indices != padding_idx
        indices, bags = indices[keep], bags[keep]
        per_sample_weights = None if per_sample_weights is None else per_sample_weights[keep]
    rows = weight.index_select(0, indices)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.unsqueeze(1)
    out = rows.new_zeros(num_bags, weight.shape[1]).index_add(0, bags, rows)
    if mode == MEAN:
        out = out / bag_size.clamp(min=1).to(out.dtype).unsqueeze(1)
    return out


def _embedding_bag(
    op: OpOverload,
    weight: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    scale_grad_by_freq: bool,
    mode: int,
    sparse: bool,
    per_sample_weights: torch.Tensor | None,
    include_last_offset: bool,
    padding_idx: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # PyTorch's kernel on the tangent-free inputs: its input checks and its integer outputs
    primal, offset2bag, bag_size, max_indices = op(
        weight.detach(),
        indices,
        offsets,
        scale_grad_by_freq,
        mode,
        sparse,
        _detached(per_sample_weights),
        include_last_offset,
        padding_idx,
    )
    num_bags = primal.shape[0]
    if mode == MAX:
        chosen = _chosen_maxima(bag_size, max_indices, num_bags)
        out = torch.where(chosen, weight.gather(0, torch.where(chosen, max_indices.to(torch.int64), 0)), 0)
    else:
        indices, offsets = _promote(indices, offsets)
        bags = _offset2bag(indices, offsets[:num_bags], offset2bag)
        sizes = bag_size[:num_bags]  # CUDA's bag_size keeps an entry for include_last_offset's last offset
        out = _bag_reduce(weight, indices, bags, num_bags, mode, per_sample_weights, padding_idx, sizes)
    return out.to(primal.dtype), offset2bag, bag_size, max_indices


def _bag_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, dtype=dtype, device=device, generator=gen)

    def longs(*values: int) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    indices = longs(1, 2, 4, 5, 4, 3, 2, 9, 0, 7)
    offsets = longs(0, 3, 3, 6)  # bag 1 is empty
    names = {SUM: "sum", MEAN: "mean", MAX: "max"}
    for mode in (SUM, MEAN, MAX):
        weight = randn(10, 3)
        yield Sample((weight, indices, offsets, False, mode, False, None, False, -1), note=f"{names[mode]}")
        yield Sample((weight, indices, offsets, False, mode, False, None, False, 4), note=f"{names[mode]}, padding_idx")
        last = torch.cat([offsets, longs(indices.numel())])
        yield Sample((weight, indices, last, False, mode, False, None, True, -1), note=f"{names[mode]}, include_last")
    weight, psw = randn(10, 3), randn(indices.numel())
    yield Sample((weight, indices, offsets, False, SUM, False, psw, False, -1), note="per_sample_weights")
    yield Sample((weight, indices, offsets, False, SUM, False, psw, False, 2), note="per_sample_weights, padding")
    int32 = (indices.to(torch.int32), offsets.to(torch.int32))
    yield Sample((randn(3, 10).mT, *int32, False, MEAN, False, None, False, -1), note="int32, non-contiguous weight")
    bags_of_two = torch.arange(0, indices.numel(), 2, device=device)
    yield Sample((randn(10, 3), indices, bags_of_two, False, MAX, False, None, False, 9), note="2-D input form")
    yield Sample((randn(10, 3), longs(), longs(0, 0), False, MEAN, False, None, False, -1), note="no indices")


def _bag_rule(op: OpOverload) -> TangentRule:
    """The tangent rule of ``_embedding_bag`` (and its forward-only twin): the kernel itself.

    ``sum`` and ``mean`` are linear in ``weight`` and in ``per_sample_weights``: the
    tangent is the kernel applied to each tangent in turn. ``max`` picks one row per bag
    and column: the weight's tangent at the ``max_indices`` the kernel returns (0 for an
    empty bag).
    """
    linear = multilinear(op, (("weight",), ("per_sample_weights",)))

    def rule(primals: list, tangents: list):
        if primals[4] != MAX:
            return linear(primals, tangents)
        if any(t is not None for t in tangents[1:]):
            return NotImplemented
        outputs = op(*primals)
        out, _, bag_size, max_indices = outputs
        if tangents[0] is None:
            return outputs, None
        picked = tangents[0].gather(0, max_indices.clamp(min=0).long())
        empty = (bag_size[: out.shape[0]] == 0).unsqueeze(1) | (max_indices < 0)
        return outputs, (picked.masked_fill(empty, 0), None, None, None)

    return rule


@builtin(aten._embedding_bag.default, samples=_bag_samples)
@with_tangent_rule(_bag_rule(aten._embedding_bag.default))
def embedding_bag(
    weight: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    scale_grad_by_freq: bool = False,
    mode: int = 0,
    sparse: bool = False,
    per_sample_weights: torch.Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduce the embedding rows ``weight[indices]`` per bag: sum, mean or max, as ``F.embedding_bag``."""
    return _embedding_bag(
        aten._embedding_bag.default,
        weight,
        indices,
        offsets,
        scale_grad_by_freq,
        mode,
        sparse,
        per_sample_weights,
        include_last_offset,
        padding_idx,
    )


def _forward_only_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    for index, sample in enumerate(_bag_samples(device, dtype)):
        if sample.args[6] is not None and dtype == torch.float64:
            # what F.embedding_bag calls when only per_sample_weights carry tangents (finite
            # differences widen only the differentiated inputs to float64: float64 samples only)
            yield Sample(sample.args, note=sample.note + ", per_sample_weights only", tangents=(6,))
        elif index % 3 == 0 or sample.args[6] is not None:
            yield sample


@builtin(aten._embedding_bag_forward_only.default, samples=_forward_only_samples)
@with_tangent_rule(_bag_rule(aten._embedding_bag_forward_only.default))
def embedding_bag_forward_only(
    weight: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    scale_grad_by_freq: bool = False,
    mode: int = 0,
    sparse: bool = False,
    per_sample_weights: torch.Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_embedding_bag`` as called when the weight needs no gradient (``F.embedding_bag`` picks it)."""
    return _embedding_bag(
        aten._embedding_bag_forward_only.default,
        weight,
        indices,
        offsets,
        scale_grad_by_freq,
        mode,
        sparse,
        per_sample_weights,
        include_last_offset,
        padding_idx,
    )


# --- backward ------------------------------------------------------------


def _frequency_counts(indices: torch.Tensor, num_weights: int) -> torch.Tensor:
    """The count ``_embedding_bag_dense_backward`` divides each index's gradient by (``scale_grad_by_freq``).

    PyTorch's CPU kernel takes, for the k-th smallest distinct index, the count
    of the k-th entry of the *sorted* indices; other devices count the index itself.
    """
    counts = torch.bincount(indices, minlength=num_weights)
    if indices.device.type != "cpu":
        return counts[indices]
    ordered = indices.sort().values
    rank = torch.searchsorted(torch.unique(ordered), indices)
    return counts[ordered[rank]]


def _bag_rows(
    indices: torch.Tensor,
    offset2bag: torch.Tensor,
    bag_size: torch.Tensor,
    num_weights: int,
    scale_grad_by_freq: bool,
    mode: int,
    dtype: torch.dtype,
    padding_idx: int,
    per_position: list[torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[torch.Tensor | None]]:
    """Sum / mean: ``(indices, bags, scale, per_position)`` of the rows the weight's gradient adds up:
    row ``k`` is ``grad[bags[k]] * scale[k]`` (times a per-sample weight) added at ``indices[k]``;
    positions at ``padding_idx`` dropped, from ``per_position`` (per-sample weights) too."""
    indices, bags = indices.to(torch.int64), offset2bag.to(torch.int64)
    scale = None
    if scale_grad_by_freq:
        scale = 1 / _frequency_counts(indices, num_weights).to(dtype)
    if mode == MEAN:
        sizes = bag_size.to(dtype)
        per_bag = torch.where(sizes != 0, 1 / torch.where(sizes != 0, sizes, 1), 1)[bags]
        scale = per_bag if scale is None else scale * per_bag
    if padding_idx >= 0:
        keep = indices != padding_idx
        indices, bags = indices[keep], bags[keep]
        scale = None if scale is None else scale[keep]
        per_position = [None if value is None else value[keep] for value in per_position]
    return indices, bags, scale, per_position


def _backward_rule(primals: list, tangents: list):
    """Sum / mean, dense: the kernel for the weight's gradient; its tangent, bilinear in ``grad`` and
    ``per_sample_weights``, from one ``index_add`` of the rows ``d_grad[bag] psw + grad[bag] d_psw``
    (times the mean's and the frequency's scale). Max and ``sparse=True``: the decomposition."""
    grad, indices, _, offset2bag, bag_size, _, num_weights, scale_grad_by_freq, mode, sparse, psw = primals[:11]
    d_grad, d_psw = tangents[0], tangents[10]
    if sparse or mode == MAX or any(t is not None for i, t in enumerate(tangents) if i not in (0, 10)):
        return NotImplemented
    out = aten._embedding_bag_backward(*primals)
    if d_grad is None and d_psw is None:
        return out, None
    indices, bags = _bags(indices, primals[2], offset2bag)
    indices, bags, scale, (psw, d_psw) = _bag_rows(
        indices,
        bags,
        bag_size,
        num_weights,
        scale_grad_by_freq,
        mode,
        grad.dtype,
        primals[11],
        [psw, d_psw],
    )
    rows = None
    if d_grad is not None:
        rows = d_grad.index_select(0, bags)
        if psw is not None:
            rows = in_place(rows, "mul", psw.unsqueeze(1))
    if d_psw is not None:
        weighted = grad.index_select(0, bags)
        weighted = in_place(weighted, "mul", d_psw.unsqueeze(1))
        rows = weighted if rows is None else in_place(rows, "add", weighted)
    if scale is not None:
        rows = in_place(rows, "mul", scale.unsqueeze(1))
    # in place, into zeros made from ``rows`` (batched like them under vmap)
    return out, rows.new_zeros(num_weights, rows.shape[1]).index_add_(0, indices, rows)


def _forward_results(device: str, dtype: torch.dtype) -> Iterator[tuple[Sample, tuple[torch.Tensor, ...]]]:
    for sample in _bag_samples(device, dtype):
        yield sample, aten._embedding_bag(*sample.args)


def _dense_backward_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    gen = torch.Generator(device=device).manual_seed(1)
    for index, (sample, results) in enumerate(_forward_results(device, dtype)):
        weight, indices, _, _, mode, _, psw, _, padding_idx = sample.args
        out, offset2bag, bag_size, max_indices = results
        grad = torch.randn(out.shape, dtype=dtype, device=device, generator=gen)
        scale = mode != MAX and index % 2 == 0  # scale_grad_by_freq on half of them
        if offset2bag.numel() != indices.numel():
            continue  # the fast path's empty offset2bag: _embedding_bag_backward recomputes it
        note = sample.note + (", scale_grad_by_freq" if scale else "")
        args = (grad, indices, offset2bag, bag_size, max_indices, weight.shape[0], scale, mode, psw, padding_idx)
        yield Sample(args, note=note)


@builtin(aten._embedding_bag_dense_backward.default, samples=_dense_backward_samples)
def embedding_bag_dense_backward(
    grad: torch.Tensor,
    indices: torch.Tensor,
    offset2bag: torch.Tensor,
    bag_size: torch.Tensor,
    maximum_indices: torch.Tensor,
    num_weights: int,
    scale_grad_by_freq: bool,
    mode: int,
    per_sample_weights: torch.Tensor | None,
    padding_idx: int = -1,
) -> torch.Tensor:
    """Gradient of the embedding-bag output with respect to the (dense) weight."""
    if mode == MAX:
        chosen = _chosen_maxima(bag_size, maximum_indices, grad.shape[0])
        index = torch.where(chosen, maximum_indices.to(torch.int64), 0)
        return grad.new_zeros(num_weights, grad.shape[1]).scatter_add(0, index, torch.where(chosen, grad, 0))
    indices, bags, scale, (per_sample_weights,) = _bag_rows(
        indices,
        offset2bag,
        bag_size,
        num_weights,
        scale_grad_by_freq,
        mode,
        grad.dtype,
        padding_idx,
        [per_sample_weights],
    )
    rows = grad.index_select(0, bags)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.unsqueeze(1)
    if scale is not None:
        rows = rows * scale.unsqueeze(1)
    return grad.new_zeros(num_weights, grad.shape[1]).index_add(0, indices, rows)


def _backward_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    gen = torch.Generator(device=device).manual_seed(2)
    for index, (sample, results) in enumerate(_forward_results(device, dtype)):
        weight, indices, offsets, _, mode, _, psw, _, padding_idx = sample.args
        out, offset2bag, bag_size, max_indices = results
        grad = torch.randn(out.shape, dtype=dtype, device=device, generator=gen)
        scale = mode != MAX and index % 2 == 1
        note = sample.note + (", scale_grad_by_freq" if scale else "")
        args = (grad, indices, offsets, offset2bag, bag_size, max_indices, weight.shape[0], scale, mode, False, psw)
        yield Sample(args, {"padding_idx": padding_idx}, note=note)
    weight = torch.randn(10, 3, dtype=torch.float32, device=device, generator=gen)
    indices = torch.tensor([1, 2, 4, 5, 4, 3, 2, 9], dtype=torch.int64, device=device)
    offsets = torch.tensor([0, 4, 4], dtype=torch.int64, device=device)
    out, offset2bag, bag_size, max_indices = aten._embedding_bag(weight, indices, offsets)  # the float32 fast path
    grad = torch.randn(out.shape, dtype=dtype, device=device, generator=gen)
    args = (grad, indices, offsets, offset2bag, bag_size, max_indices, 10, False, SUM, False, None)
    yield Sample(args, note=f"empty offset2bag (fast path: {offset2bag.numel() == 0})")


@builtin(aten._embedding_bag_backward.default, samples=_backward_samples)
@with_tangent_rule(_backward_rule)
def embedding_bag_backward(
    grad: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    offset2bag: torch.Tensor,
    bag_size: torch.Tensor,
    maximum_indices: torch.Tensor,
    num_weights: int,
    scale_grad_by_freq: bool,
    mode: int,
    sparse: bool,
    per_sample_weights: torch.Tensor | None,
    padding_idx: int = -1,
) -> torch.Tensor:
    """Gradient of ``_embedding_bag`` with respect to the weight (dense; ``sparse`` raises with tangents)."""
    if sparse:
        raise NotImplementedError(
            "fwdecomp: _embedding_bag_backward with sparse=True and forward-AD tangents: PyTorch cannot "
            "carry tangents on the sparse gradient it builds. Use sparse=False (the default) for "
            "forward-over-reverse (torch.func.hessian, jvp(grad(f)))."
        )
    indices, bags = _bags(indices, offsets, offset2bag)
    return embedding_bag_dense_backward(
        grad,
        indices,
        bags,
        bag_size,
        maximum_indices,
        num_weights,
        scale_grad_by_freq,
        mode,
        per_sample_weights,
        padding_idx,
    )


def _per_sample_weights_backward_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    gen = torch.Generator(device=device).manual_seed(3)
    for sample, results in _forward_results(device, dtype):
        weight, indices, offsets, _, mode, _, psw, _, padding_idx = sample.args
        if mode != SUM or psw is None:
            continue
        out, offset2bag = results[:2]
        grad = torch.randn(out.shape, dtype=dtype, device=device, generator=gen)
        yield Sample((grad, weight, indices, offsets, offset2bag, mode, padding_idx), note=sample.note)
    if torch.device(device).type != "cpu":
        return  # the empty offset2bag of the CPU kernel's fast path; CUDA's kernel reads it unchecked
    weight = torch.randn(10, 3, dtype=dtype, device=device, generator=gen)
    indices = torch.tensor([1, 2, 4, 5, 4, 3, 2, 9], dtype=torch.int64, device=device)
    offsets = torch.tensor([0, 4, 4], dtype=torch.int64, device=device)
    grad = torch.randn(offsets.numel(), 3, dtype=dtype, device=device, generator=gen)
    empty = torch.empty(0, dtype=torch.int64, device=device)
    yield Sample((grad, weight, indices, offsets, empty, SUM, -1), note="empty offset2bag (fast path)")


@builtin(aten._embedding_bag_per_sample_weights_backward.default, samples=_per_sample_weights_backward_samples)
@with_tangent_rule(multilinear(aten._embedding_bag_per_sample_weights_backward.default, (("grad",), ("weight",))))
def embedding_bag_per_sample_weights_backward(
    grad: torch.Tensor,
    weight: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    offset2bag: torch.Tensor,
    mode: int,
    padding_idx: int = -1,
) -> torch.Tensor:
    """Gradient of the ``sum``-mode output with respect to ``per_sample_weights``: ``<grad[bag], weight[index]>``."""
    if mode != SUM:
        raise RuntimeError("embedding_bag_backward: per_sample_weights only supported for mode='sum'")
    indices, offsets = _promote(indices, offsets)
    bags = _offset2bag(indices, offsets, offset2bag)
    dots = (grad.index_select(0, bags) * weight.index_select(0, indices)).sum(1)
    if padding_idx >= 0:
        dots = torch.where(indices != padding_idx, dots, 0)
    return dots
