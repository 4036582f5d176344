"""Activations: ``hardsigmoid_backward``.

``hardsigmoid`` has a forward formula, but its backward operator has none
(it is not even in ``derivatives.yaml``), so forward-over-reverse
(``torch.func.hessian``, ``jvp(grad(f))``) through ``F.hardsigmoid`` fails.
The backward is ``grad_output / 6`` strictly inside ``-3 < self < 3`` and 0
elsewhere, as the kernel computes it: linear in ``grad_output``, with zero
derivative in ``self`` (the second derivative of hardsigmoid is 0 wherever it
exists). So its tangent rule is the kernel applied to ``grad_output``'s tangent.

Example:
    >>> import torch, torch.nn.functional as F, fwdecomp
    >>> x = torch.tensor([-4.0, 0.5, 2.0], dtype=torch.float64)
    >>> with fwdecomp.enabled():
    ...     H = torch.func.hessian(lambda a: F.hardsigmoid(a).pow(2).sum())(x)
    >>> H.diagonal()
    tensor([0.0000, 0.0556, 0.0556], dtype=torch.float64)
"""

from __future__ import annotations

from typing import Iterator

import torch

from fwdecomp.decompositions import builtin
from fwdecomp.registry import Sample
from fwdecomp.tangent_rules import multilinear, with_tangent_rule

aten = torch.ops.aten

__all__ = ["hardsigmoid_backward"]


def _hardsigmoid_backward_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(shape, dtype=dtype, device=device, generator=gen) * scale

    yield Sample((randn(4, 5), randn(4, 5, scale=3.0)), note="both sides of the kinks")
    yield Sample((randn(2, 3, 4), randn(3, 4, scale=3.0)), note="broadcast self")
    yield Sample((randn(5, 3).mT, randn(3, 5, scale=3.0)), note="non-contiguous")
    yield Sample((randn(), randn()), note="0-d")
    yield Sample((randn(0, 4), randn(0, 4)), note="zero-size")


@builtin(aten.hardsigmoid_backward.default, samples=_hardsigmoid_backward_samples)
@with_tangent_rule(multilinear(aten.hardsigmoid_backward.default, (("grad_output",),), constant=("self",)))
def hardsigmoid_backward(grad_output: torch.Tensor, self: torch.Tensor) -> torch.Tensor:
    """``grad_output / 6`` where ``-3 < self < 3``, else 0."""
    inside = (self.detach() > -3) & (self.detach() < 3)
    return torch.where(inside, grad_output / 6, 0).expand(torch.broadcast_shapes(grad_output.shape, self.shape))
