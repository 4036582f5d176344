"""Dropout: ``native_dropout_backward``.

A tangent of dropout must be masked by the *same* random mask as the primal
output, or it is the tangent of a different function. ``aten::native_dropout``
already has a native forward formula that does exactly that (it multiplies
the input's tangent by the mask it returns as its second output, and the
scale), so fwdecomp does not decompose it, and must not: a decomposition
would have to draw the mask itself, and nothing guarantees it would consume
the random generator as the kernel does (so the primal output would change
depending on whether tangents are present).

Its backward operator, ``aten::native_dropout_backward(grad_output, mask,
scale)``, takes the mask as an argument, so it is deterministic:
``grad_output * mask * scale``. It has no forward formula, which broke
forward mode through the operator itself and forward-over-reverse where it is
reached (PyTorch's reverse mode of dropout calls it when no graph is built).
Its tangent rule is the kernel applied to ``grad_output``'s tangent.

Example:
    >>> import torch, fwdecomp
    >>> g = torch.ones(4, dtype=torch.float64)
    >>> mask = torch.tensor([True, False, True, True])
    >>> with fwdecomp.enabled():
    ...     out, tangent = torch.func.jvp(
    ...         lambda a: torch.ops.aten.native_dropout_backward(a, mask, 2.0), (g,), (torch.ones_like(g),))
    >>> tangent
    tensor([2., 0., 2., 2.], dtype=torch.float64)
"""

from __future__ import annotations

from typing import Iterator

import torch

from fwdecomp.decompositions import builtin
from fwdecomp.registry import Sample
from fwdecomp.tangent_rules import multilinear, with_tangent_rule

aten = torch.ops.aten

__all__ = ["native_dropout_backward"]


def _native_dropout_backward_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, dtype=dtype, device=device, generator=gen)

    def mask(*shape: int) -> torch.Tensor:
        return torch.rand(shape, device=device, generator=gen) > 0.4

    for scale in (0.0, 1.0, 1.0 / 0.6):
        yield Sample((randn(3, 4, 5), mask(3, 4, 5), scale), note=f"scale={scale:.3g}")
    yield Sample((randn(4, 3).mT, mask(4, 3).mT, 2.0), note="non-contiguous")
    yield Sample((randn(), mask(), 2.0), note="0-d")
    yield Sample((randn(0, 2), mask(0, 2), 2.0), note="zero-size")
    if torch.device(device).type == "cpu":  # the CUDA kernel takes only boolean masks
        yield Sample((randn(5), mask(5).to(dtype), 2.0), note="floating-point mask (not differentiated)", tangents=(0,))


@builtin(aten.native_dropout_backward.default, samples=_native_dropout_backward_samples)
@with_tangent_rule(multilinear(aten.native_dropout_backward.default, (("grad_output",),), constant=("mask",)))
def native_dropout_backward(grad_output: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """``grad_output * mask * scale``: the cotangent through the kept entries, rescaled."""
    return grad_output * mask.detach().to(grad_output.dtype) * scale
