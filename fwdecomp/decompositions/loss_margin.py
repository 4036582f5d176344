"""Margin losses: ``multi_margin_loss`` and ``multilabel_margin_loss_forward``, and their backward operators.

``F.multi_margin_loss`` and ``F.multilabel_margin_loss`` reach these
operators; neither has a forward formula, nor have their backward operators
(needed by forward-over-reverse, ``torch.func.hessian``). Both losses are sums
of hinges ``max(0, z)`` over pairs of a target class and another class:

- ``multi_margin_loss``: ``z = margin - x[y] + x[d]`` for every class ``d != y``,
  ``max(0, z) ** p`` (``p`` 1 or 2), times ``weight[y]``, divided by the number of classes;
- ``multilabel_margin_loss``: ``z = 1 - x[j] + x[d]`` for every target ``j`` (the
  entries of ``target`` before the first negative one) and every class ``d``
  that is not a target, divided by the number of classes.

Conventions (PyTorch's kernels): a hinge exactly at its kink (``z == 0``) has
derivative 0, as in reverse mode; ``weight`` is not differentiated (PyTorch
declares the loss not differentiable with respect to it, and ``F.nll_loss``'s
forward mode ignores its tangent likewise); ``is_target`` is not
differentiable, and the multilabel backward operator reads the ``is_target`` it
is given.

Example:
    >>> import torch, torch.nn.functional as F, fwdecomp
    >>> x, y = torch.randn(3, 5, dtype=torch.float64), torch.tensor([0, 4, 2])
    >>> with fwdecomp.enabled():
    ...     loss, tangent = torch.func.jvp(lambda x: F.multi_margin_loss(x, y, p=2), (x,), (torch.ones_like(x),))
    >>> tangent.abs().item() < 1e-12  # moving every score by the same amount changes no margin
    True
"""

from __future__ import annotations

from typing import Iterator

import torch

from fwdecomp.contract import meta_shapes_unreliable
from fwdecomp.decompositions import builtin
from fwdecomp.registry import Sample
from fwdecomp.tangent_rules import multilinear, with_tangent_rule

aten = torch.ops.aten

__all__ = [
    "multi_margin_loss",
    "multi_margin_loss_backward",
    "multilabel_margin_loss_backward",
    "multilabel_margin_loss_forward",
]

NONE, MEAN, SUM = 0, 1, 2

meta_shapes_unreliable(
    aten.multi_margin_loss.default,
    "0-D target with reduction='none': the meta kernel returns shape (1,), the CPU kernel ()",
)
meta_shapes_unreliable(
    aten.multilabel_margin_loss_forward.default,
    "1-D input with reduction='none': the meta kernel returns shape (1,), the CPU kernel ()",
)


def _frames(input: torch.Tensor, what: str) -> torch.Tensor:
    """The input as ``(frames, classes)``, with PyTorch's shape rule for these losses."""
    dims = input.dim()
    if not (dims == 0 or (dims == 1 and input.shape[0] != 0) or (dims == 2 and input.shape[1] != 0)):
        raise RuntimeError(
            f"{what}: Expected non-empty vector or matrix with optional 0-dim batch size, but got: {list(input.shape)}"
        )
    return input.reshape(1, -1) if dims <= 1 else input


def _reduce(per_frame: torch.Tensor, reduction: int, shape: tuple[int, ...]) -> torch.Tensor:
    if reduction == MEAN:
        return per_frame.mean()
    if reduction == SUM:
        return per_frame.sum()
    return per_frame.reshape(shape)


def _frame_grad(grad_output: torch.Tensor, reduction: int, frames: int) -> torch.Tensor:
    """``d loss / d per-frame loss`` times ``grad_output``, as a ``(frames, 1)`` column."""
    if reduction == NONE:
        return grad_output.reshape(frames, 1)
    grad = grad_output.reshape(1, 1).expand(frames, 1)
    return grad / frames if reduction == MEAN else grad


# --- multi_margin_loss ---------------------------------------------------


def _check_multi_margin(
    x: torch.Tensor, input: torch.Tensor, target: torch.Tensor, p: float, weight: torch.Tensor | None
) -> None:
    frames, classes = x.shape
    if p not in (1, 2):
        raise RuntimeError("only p == 1 and p == 2 supported")
    if target.dim() > 1 or target.numel() != frames:
        raise RuntimeError(
            "multi_margin_loss: target tensor should be 1-D with size equal to the number of input samples "
            f"(batch size). Expected target size [{frames}], but got {list(target.shape)}. Input has shape "
            f"{list(input.shape)}."
        )
    if weight is not None and (weight.dim() > 1 or weight.numel() != classes):
        raise RuntimeError(f"inconsistent weight size, expected {classes} but got {list(weight.shape)}")
    if target.numel():
        lowest, highest = torch.aminmax(target)
        if int(lowest) < 0 or int(highest) >= classes:
            raise RuntimeError("target out of range")


def _margins(x: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """``margin - x[y] + x[d]`` for every frame and class ``d``."""
    return aten.rsub.Scalar(x.gather(1, target.reshape(-1, 1)), margin) + x


def _multi_margin_output_shape(input: torch.Tensor, target: torch.Tensor) -> tuple[int, ...]:
    return (_frames(input, "multi_margin_loss").shape[0],) if target.dim() > 0 else ()


def _multi_margin_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, dtype=dtype, device=device, generator=gen)

    target = torch.tensor([1, 0, 4, 2], device=device)
    weight = torch.rand(5, dtype=dtype, device=device, generator=gen) + 0.5
    for p, margin, reduction in ((1, 1.0, MEAN), (2, 1.0, MEAN), (1, 0.5, NONE), (2, 1.5, SUM)):
        yield Sample((randn(4, 5), target, p, margin, None, reduction), note=f"p={p}, margin={margin}", tangents=(0,))
    yield Sample((randn(5, 4).mT, target, 1, 1.0, None, SUM), note="non-contiguous", tangents=(0,))
    yield Sample((randn(5), target[:1], 2, 1.0, None, NONE), note="1-D input", tangents=(0,))
    if dtype != torch.float64:
        return  # finite differences widen only the differentiated input: weight samples in float64
    yield Sample((randn(4, 5), target, 1, 1.0, weight, NONE), note="weight, p=1", tangents=(0,))
    yield Sample((randn(4, 5), target, 2, 1.0, weight, MEAN), note="weight, p=2", tangents=(0,))
    yield Sample((randn(5), target[0], 1, 1.0, weight, NONE), note="1-D input, 0-D target", tangents=(0,))


def _multilabel_forward_rule(primals: list, tangents: list):
    """The loss's tangent: its gradient kernel (unit ``grad_output``, the ``is_target`` the forward
    returns) contracted with ``self``'s tangent, per frame for ``reduction='none'``."""
    loss, is_target = aten.multilabel_margin_loss_forward(*primals)
    if tangents[0] is None:
        return (loss, is_target), None
    product = aten.multilabel_margin_loss_backward(torch.ones_like(loss), *primals, is_target) * tangents[0]
    tangent = (product.sum(-1) if loss.dim() else product.sum()).reshape(loss.shape)
    return (loss, is_target), (tangent, None)


@builtin(aten.multi_margin_loss.default, samples=_multi_margin_samples)
def multi_margin_loss(
    self: torch.Tensor,
    target: torch.Tensor,
    p: float = 1,
    margin: float = 1,
    weight: torch.Tensor | None = None,
    reduction: int = MEAN,
) -> torch.Tensor:
    """Multi-class hinge loss, as ``F.multi_margin_loss``."""
    x = _frames(self, "multi_margin_loss")
    _check_multi_margin(x, self, target, p, weight)
    hinge = torch.relu(_margins(x, target, margin))  # derivative 0 at the kink, as PyTorch's
    if p == 2:
        hinge = hinge * hinge
    hinge = hinge.scatter(1, target.reshape(-1, 1), 0)  # d == y is no margin
    per_frame = hinge.mean(1)  # the sum over the classes, divided by their number
    if weight is not None:
        per_frame = per_frame * weight.detach()[target.reshape(-1)]
    return _reduce(per_frame, reduction, _multi_margin_output_shape(self, target))


def _multi_margin_backward_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    gen = torch.Generator(device=device).manual_seed(1)
    for sample in _multi_margin_samples(device, dtype):
        out = aten.multi_margin_loss(*sample.args)
        grad = torch.randn(out.shape, dtype=dtype, device=device, generator=gen)
        yield Sample((grad, *sample.args), note=sample.note, tangents=(0, 1))


@builtin(aten.multi_margin_loss_backward.default, samples=_multi_margin_backward_samples)
@with_tangent_rule(
    multilinear(
        aten.multi_margin_loss_backward.default,
        (("grad_output",),),
        constant=("self", "weight"),  # piecewise constant in self for p = 1; weight is not differentiated
        declines=lambda primals, tangents: primals[3] != 1 and tangents[1] is not None,
    )
)
def multi_margin_loss_backward(
    grad_output: torch.Tensor,
    self: torch.Tensor,
    target: torch.Tensor,
    p: float,
    margin: float,
    weight: torch.Tensor | None = None,
    reduction: int = MEAN,
) -> torch.Tensor:
    """Gradient of ``multi_margin_loss`` with respect to ``self``."""
    x = _frames(self, "multi_margin_loss_backward")
    _check_multi_margin(x, self, target, p, weight)
    frames, classes = x.shape
    target = target.reshape(-1, 1)
    z = _margins(x, target, margin)
    active = (z.detach() > 0).scatter(1, target, False).to(x.dtype)
    slope = active if p == 1 else 2 * z * active
    scale = _frame_grad(grad_output, reduction, frames) / classes
    if weight is not None:
        scale = scale * weight.detach()[target]
    others = slope * scale
    grad = others - torch.zeros_like(others).scatter_add(1, target, others.sum(1, keepdim=True))
    return grad.reshape(self.shape)


# --- multilabel_margin_loss ----------------------------------------------


def _check_multilabel(input: torch.Tensor, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The targets as ``(frames, classes)``, with PyTorch's rules."""
    frames, classes = x.shape
    if input.dim() <= 1:
        consistent = target.dim() <= 1 and target.numel() == classes
    else:
        consistent = target.dim() == 2 and tuple(target.shape) == (frames, classes)
    if not consistent:
        raise RuntimeError(f"inconsistent target size: {list(target.shape)} for input of size: {list(input.shape)}")
    target = target.reshape(frames, classes)
    if bool((target >= classes).any()):
        raise RuntimeError("target index is out of bounds")
    return target


def _targets(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Target class per position (0 where unused), and which positions come before the first negative."""
    listed = torch.cumprod((target >= 0).to(torch.int64), 1).bool()
    return torch.where(listed, target, 0).to(torch.int64), listed


def _is_target(classes: torch.Tensor, listed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    hits = torch.zeros(classes.shape, dtype=torch.int64, device=classes.device).scatter_add(1, classes, listed.long())
    return (hits > 0).to(dtype)


def _multilabel_margins(x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``1 - x[j] + x[d]`` for every frame, target position ``j`` and class ``d``: ``(frames, J, D)``."""
    return aten.rsub.Scalar(x.gather(1, classes).unsqueeze(2), 1) + x.unsqueeze(1)


def _pairs(listed: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
    """Which (target position, class) pairs count: a listed target and a class that is not a target."""
    return listed.unsqueeze(2) & (is_target == 0).unsqueeze(1)


def _multilabel_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, dtype=dtype, device=device, generator=gen)

    target = torch.tensor(
        [[3, 0, -1, 1, 2], [1, 1, 4, -1, -1], [0, 1, 2, 3, 4], [-1, 2, 3, 0, 0]], device=device
    )  # targets before the first -1; a repeated target; every class a target; none
    for reduction in (NONE, MEAN, SUM):
        yield Sample((randn(4, 5), target, reduction), note=f"reduction={reduction}", tangents=(0,))
    yield Sample((randn(5, 4).mT, target, MEAN), note="non-contiguous", tangents=(0,))
    yield Sample((randn(5), target[0], NONE), note="1-D input", tangents=(0,))
    yield Sample((randn(5), target[1], SUM), note="1-D input, sum", tangents=(0,))


@builtin(aten.multilabel_margin_loss_forward.default, samples=_multilabel_samples)
@with_tangent_rule(_multilabel_forward_rule)
def multilabel_margin_loss_forward(
    self: torch.Tensor, target: torch.Tensor, reduction: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-label hinge loss and the ``is_target`` mask, as ``F.multilabel_margin_loss`` computes them."""
    x = _frames(self, "multilabel_margin_loss")
    shape = target.shape
    classes, listed = _targets(_check_multilabel(self, x, target))
    is_target = _is_target(classes, listed, x.dtype)
    hinge = torch.relu(_multilabel_margins(x, classes))  # derivative 0 at the kink, as PyTorch's
    per_frame = aten.div.Scalar((hinge * _pairs(listed, is_target).to(x.dtype)).sum((1, 2)), x.shape[1])
    loss = _reduce(per_frame, reduction, (x.shape[0],) if self.dim() == 2 else ())
    return loss, is_target.reshape(shape)


def _multilabel_backward_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    gen = torch.Generator(device=device).manual_seed(1)
    for sample in _multilabel_samples(device, dtype):
        out, is_target = aten.multilabel_margin_loss_forward(*sample.args)
        grad = torch.randn(out.shape, dtype=dtype, device=device, generator=gen)
        yield Sample((grad, *sample.args, is_target), note=sample.note, tangents=(0, 1))


# float64 only: finite differences widen only the differentiated inputs, and is_target (input dtype) is not one
@builtin(aten.multilabel_margin_loss_backward.default, samples=_multilabel_backward_samples, dtypes=(torch.float64,))
@with_tangent_rule(
    multilinear(aten.multilabel_margin_loss_backward.default, (("grad_output",),), constant=("self", "is_target"))
)
def multilabel_margin_loss_backward(
    grad_output: torch.Tensor, self: torch.Tensor, target: torch.Tensor, reduction: int, is_target: torch.Tensor
) -> torch.Tensor:
    """Gradient of ``multilabel_margin_loss`` with respect to ``self`` (reads the given ``is_target``)."""
    x = _frames(self, "multilabel_margin_loss_backward")
    target = _check_multilabel(self, x, target)
    frames, count = x.shape
    classes, listed = _targets(target)
    pairs = _pairs(listed, is_target.detach().reshape(frames, count))
    active = ((_multilabel_margins(x.detach(), classes) > 0) & pairs).to(x.dtype)
    scale = _frame_grad(grad_output, reduction, frames) / count
    towards = active.sum(1) * scale  # + for each non-target class d
    away = torch.zeros_like(x).scatter_add(1, classes, active.sum(2) * scale)  # - for each target j
    return (towards - away).reshape(self.shape)
