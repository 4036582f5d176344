"""Losses: the backward operators of ``huber_loss``, ``soft_margin_loss`` and ``mse_loss``.

The losses themselves have forward formulas, but forward-over-reverse
(``torch.func.hessian``, ``jvp(grad(f))``) differentiates their backward
operators, and ``huber_loss_backward`` and ``soft_margin_loss_backward`` have
no forward formula. ``mse_loss_backward`` has one, but it fails with
"ZeroTensors are immutable" when ``reduction='mean'`` and the target (or the
input) carries no tangent, which is exactly ``hessian(lambda x: F.mse_loss(f(x),
y))``: it is listed in :data:`fwdecomp.formulas.BROKEN_FORWARD_FORMULAS`, so
fwdecomp routes it to the decomposition here, which is plain elementwise
arithmetic and has no such problem.

Each decomposition is the kernel's formula: ``norm`` is ``1 / self.numel()``
(``2 / self.numel()`` for MSE) with ``reduction='mean'``, else 1 (2); inputs
broadcast as the kernels broadcast them. Derivatives are those of PyTorch's
double-backward formulas: Huber's second derivative is 1 strictly inside
``|self - target| < delta`` and 0 elsewhere; ``soft_margin_loss`` does not
differentiate its target (PyTorch defines no derivative for it), nor does
``hardsigmoid_backward`` its input (see :mod:`~fwdecomp.decompositions.activation`).

Example:
    >>> import torch, torch.nn.functional as F, fwdecomp
    >>> x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    >>> with fwdecomp.enabled():
    ...     H = torch.func.hessian(lambda a: F.huber_loss(a, y, delta=0.5))(x)
    >>> H.shape
    torch.Size([4, 3, 4, 3])
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from fwdecomp.decompositions import builtin
from fwdecomp.registry import Sample
from fwdecomp.tangent_rules import in_place, with_tangent_rule

aten = torch.ops.aten

__all__ = ["huber_loss_backward", "mse_loss_backward", "soft_margin_loss_backward"]

_NONE, _MEAN, _SUM = 0, 1, 2


def _norm(self: torch.Tensor, reduction: int, scale: float = 1.0) -> float:
    return scale / self.numel() if reduction == _MEAN and self.numel() else scale


def held(*constants: torch.Tensor | None) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """``Sample.prepare`` that keeps the inputs given here fixed (``None``: the input varies).

    The fixed inputs are cast to the precision of the check, so a float32 sample can still be
    compared with finite differences taken in float64.
    """

    def prepare(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        dtype = tensors[0].dtype
        return [t if c is None else c.to(dtype) for t, c in zip(tensors, constants)]

    return prepare


def _loss_samples(device: str, dtype: torch.dtype, seed: int) -> Iterator[tuple[tuple, str]]:
    """``(grad_output, self, target, reduction)`` calls: every reduction, broadcasting, layouts."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, dtype=dtype, device=device, generator=gen)

    yield (randn(), randn(4, 3), randn(4, 3), _MEAN), "mean"
    yield (randn(), randn(2, 3, 4), randn(2, 3, 4), _SUM), "sum, 3-d"
    yield (randn(4, 3), randn(4, 3), randn(4, 3), _NONE), "none"
    yield (randn(), randn(4, 3), randn(3), _MEAN), "mean, broadcast target"
    yield (randn(3, 4).mT, randn(3, 4).mT, randn(4, 3), _NONE), "none, non-contiguous"
    yield (randn(), randn(5), randn(5), _MEAN), "mean, 1-d"
    yield (randn(0, 3), randn(0, 3), randn(0, 3), _NONE), "none, zero-size"


# --- mse_loss_backward -----------------------------------------------------------


def _mixes_dtypes(grad: torch.Tensor, self: torch.Tensor, target: torch.Tensor, reduction: int) -> bool:
    try:
        torch.ops.aten.mse_loss_backward(grad.double(), self.double(), target, reduction)
    except RuntimeError:
        return False
    return True


def _mse_loss_backward_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    samples = list(_loss_samples(device, dtype, 0))
    (grad, self, target, reduction), note = samples[0]
    # First: the call PyTorch's own formula fails on (target without tangent, reduction='mean').
    # Its finite differences widen only grad and self to float64; torch 2.11's kernel refuses the
    # float32 target beside them, so in other dtypes the sample needs a kernel that mixes them.
    if dtype == torch.float64 or _mixes_dtypes(grad, self, target, reduction):
        yield Sample((grad, self, target, reduction), note=f"{note}, target without tangent", tangents=(0, 1))
    for args, note in samples:
        # PyTorch's reverse mode of mse_loss_backward normalises the target's derivative by
        # target.numel(), wrong when the target broadcasts (F.mse_loss never passes one that does,
        # it broadcasts first); this decomposition matches finite differences, the reference does not.
        if "broadcast target" not in note:
            yield Sample(args, note=note)


def _step(d_self: torch.Tensor | None, d_target: torch.Tensor | None) -> torch.Tensor | None:
    """The tangent of ``self - target``."""
    if d_target is None:
        return d_self
    return -d_target if d_self is None else d_self - d_target


def _plus_scaled_product(tangent: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``tangent + scale * a * b`` in one fused pass (these operators are bound by memory traffic)."""
    if tangent is None:
        return a * b * scale
    return torch.addcmul(tangent, a, b, value=scale)


def _mse_loss_backward_rule(primals: list, tangents: list):
    """``norm * (self - target) * grad_output``: the kernel on ``grad_output``'s tangent, plus
    ``norm * grad_output * d(self - target)`` fused into the same pass."""
    grad_output, self, target, reduction = primals
    d_grad, d_self, d_target = tangents[:3]
    out = aten.mse_loss_backward(*primals)
    tangent = None if d_grad is None else aten.mse_loss_backward(d_grad, self, target, reduction)
    step = _step(d_self, d_target)
    if step is not None:
        tangent = _plus_scaled_product(tangent, grad_output, step, _norm(self, reduction, 2.0))
    return out, None if tangent is None else tangent.expand(out.shape).to(out.dtype)


@builtin(aten.mse_loss_backward.default, samples=_mse_loss_backward_samples)
@with_tangent_rule(_mse_loss_backward_rule)
def mse_loss_backward(
    grad_output: torch.Tensor, self: torch.Tensor, target: torch.Tensor, reduction: int
) -> torch.Tensor:
    """``norm * (self - target) * grad_output`` with ``norm = 2`` (``2 / numel`` for the mean)."""
    return _norm(self, reduction, 2.0) * (self - target) * grad_output


# --- huber_loss_backward ---------------------------------------------------------


def _huber_loss_backward_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    for index, (args, note) in enumerate(_loss_samples(device, dtype, 1)):
        delta = (1.0, 0.5, 2.0)[index % 3]
        yield Sample((*args, delta), note=f"{note}, delta={delta}")


def _huber_loss_backward_rule(primals: list, tangents: list):
    """Linear in ``grad_output``; in ``self - target`` the slope is 1 inside ``delta``, 0 beyond."""
    grad_output, self, target, reduction, delta = primals
    d_grad, d_self, d_target = tangents[:3]
    out = aten.huber_loss_backward(*primals)
    tangent = None if d_grad is None else aten.huber_loss_backward(d_grad, *primals[1:])
    step = _step(d_self, d_target)
    if step is not None:
        # grad_output where |self - target| < delta, else 0: one fused kernel
        inside = aten.hardtanh_backward(grad_output, self - target, -delta, delta)
        tangent = _plus_scaled_product(tangent, inside, step, _norm(self, reduction))
    return out, None if tangent is None else tangent.expand(out.shape).to(out.dtype)


@builtin(aten.huber_loss_backward.default, samples=_huber_loss_backward_samples)
@with_tangent_rule(_huber_loss_backward_rule)
def huber_loss_backward(
    grad_output: torch.Tensor, self: torch.Tensor, target: torch.Tensor, reduction: int, delta: float
) -> torch.Tensor:
    """``norm * grad_output * clamp(self - target, -delta, delta)``, flat beyond ``delta``."""
    difference = self - target
    inside = difference.detach().abs() < delta
    clipped = torch.where(inside, difference, delta * difference.detach().sign())
    return _norm(self, reduction) * clipped * grad_output


# --- soft_margin_loss_backward ---------------------------------------------------


def _soft_margin_loss_backward_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    for args, note in _loss_samples(device, dtype, 2):
        grad, self, target, reduction = args
        labels = torch.where(target > 0, 1.0, -1.0).to(dtype)
        # The target is not differentiated (PyTorch defines no derivative for it): hold it fixed.
        yield Sample((grad, self, labels, reduction), note=f"{note}, +-1 labels", prepare=held(None, None, labels))
    gen = torch.Generator(device=device).manual_seed(3)
    grad, self, target = (torch.randn(3, 2, dtype=dtype, device=device, generator=gen) for _ in range(3))
    yield Sample((grad, self, target, _NONE), note="real-valued target", prepare=held(None, None, target))


def _soft_margin_loss_backward_rule(primals: list, tangents: list):
    """From one pass of the kernel with a unit cotangent, ``a = -norm * target * s`` with
    ``s = sigmoid(-target * self)``: the output is ``a * grad_output`` (the kernel's last step, so
    the same bits), and since ``d s / d self = -target * s * (1 - s)`` and
    ``target * (1 - s) = target + a / norm``, the tangent is
    ``a * d_grad - a * (target + a / norm) * grad_output * d_self``: no second exponential (the
    kernel is bound by its ``exp``). The target is not differentiated, as in the decomposition."""
    grad_output, self, target, reduction = primals
    d_grad, d_self = tangents[:2]
    if d_self is None or self.numel() == 0:
        out = aten.soft_margin_loss_backward(*primals)
        tangent = None if d_grad is None else aten.soft_margin_loss_backward(d_grad, *primals[1:])
        return out, None if tangent is None else tangent.expand(out.shape).to(out.dtype)
    a = aten.soft_margin_loss_backward(grad_output.new_ones(()), self, target, reduction)
    out = a * grad_output
    slope = in_place(in_place(torch.add(target, a, alpha=1.0 / _norm(self, reduction)), "mul", a), "mul", grad_output)
    if d_grad is None:
        tangent = in_place(in_place(slope, "mul", d_self), "neg")
    else:
        tangent = in_place(a * d_grad, "addcmul", slope, d_self, value=-1.0)
    return out, tangent.expand(out.shape).to(out.dtype)


@builtin(aten.soft_margin_loss_backward.default, samples=_soft_margin_loss_backward_samples)
@with_tangent_rule(_soft_margin_loss_backward_rule)
def soft_margin_loss_backward(
    grad_output: torch.Tensor, self: torch.Tensor, target: torch.Tensor, reduction: int
) -> torch.Tensor:
    """``-norm * target * sigmoid(-target * self) * grad_output`` (the kernel's ``z / (1 + z)``)."""
    target = target.detach()
    return -_norm(self, reduction) * target * torch.sigmoid(-target * self) * grad_output
