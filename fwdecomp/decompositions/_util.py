"""Small numerical helpers shared by decompositions.

Each keeps the value PyTorch computes and picks, at non-smooth points, the
one-sided derivative PyTorch's reverse mode uses, so forward and reverse
mode agree.
"""

from __future__ import annotations

from typing import Callable

import torch


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` for ``x >= 0`` whose derivative is 0 (not inf or nan) where ``x == 0``."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1).sqrt(), 0)


def safe_pow(x: torch.Tensor, exponent: float) -> torch.Tensor:
    """``x ** exponent`` for ``x >= 0`` with derivative 0 where ``x == 0`` (any exponent)."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1).pow(exponent), 0)


def max_all_ties(values: torch.Tensor, dim: int) -> torch.Tensor:
    """``values.amax(dim)`` whose derivative is the sum over all maximal entries.

    ``amax`` splits the derivative evenly among ties; PyTorch's distance
    kernels (``cdist``/``pdist`` with ``p=inf``) give each tied entry the full
    derivative. The value is exact: the second term is identically zero.
    """
    peak = values.detach().amax(dim, keepdim=True)
    ties = values.detach() == peak
    return peak.squeeze(dim) + (ties * (values - values.detach())).sum(dim)


def p_norm_of_differences(diff: torch.Tensor, p: float) -> torch.Tensor:
    """``||diff||_p`` over the last dimension, as PyTorch's distance kernels define it.

    ``p = 0`` counts the non-zero entries (zero derivative); ``p = inf`` is the
    largest magnitude (every tie gets the full derivative); otherwise
    ``(sum |d|^p)^(1/p)`` with zero derivative where the norm is zero and, for
    ``p < 1``, where an entry is zero.
    """
    if p == 0:
        return (diff != 0).sum(-1).to(diff.dtype)
    magnitude = diff.abs()
    if p == float("inf"):
        return max_all_ties(magnitude, -1)
    if p == 1:
        return magnitude.sum(-1)
    if p == 2:
        return safe_sqrt((diff * diff).sum(-1))
    return safe_pow(safe_pow(magnitude, p).sum(-1), 1.0 / p)


def p_norm_gradient(diff: torch.Tensor, dist: torch.Tensor, p: float) -> torch.Tensor:
    """``d ||diff||_p / d diff`` (last dimension), with ``dist`` the norm, as PyTorch's backward.

    Zero where ``dist == 0``; for ``p = inf`` each tied entry gets ``sign``;
    for ``p < 1`` zero where an entry is zero.
    """
    dist = dist.unsqueeze(-1)
    positive = dist > 0
    if p == 0:
        return torch.zeros_like(diff)
    if p == 1:
        return diff.sign()
    if p == float("inf"):
        return diff.sign() * (diff.abs() == dist)
    safe_dist = torch.where(positive, dist, 1)
    if p == 2:
        return torch.where(positive, diff / safe_dist, 0)
    scale = safe_pow(diff.abs(), p - 1) / safe_dist.pow(p - 1)
    return torch.where(positive, diff.sign() * scale, 0)


def known_on_cpu(tensor: torch.Tensor, test: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """``bool(test(tensor))`` where reading it costs nothing much: ``False`` for a tensor off the CPU
    (the read would make the call wait for the device) and where it cannot be read (``vmap`` over
    ``tensor``: data-dependent control flow). For a rule's fast path that holds only when ``test``
    says so."""
    if tensor.device.type != "cpu":
        return False
    try:
        return bool(test(tensor))
    except RuntimeError:  # data-dependent control flow under vmap
        return False
