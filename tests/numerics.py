"""Reference numerics shared by the transform tests: central differences and a scaled closeness check."""

from __future__ import annotations

import torch
from torch.autograd import forward_ad
from torch.func import jvp

from fwdecomp.checks import differentiable_positions, sample_function


def fd(fn, x, v, eps=1e-6):
    """Central finite difference of ``fn`` at ``x`` along ``v``."""
    with torch.no_grad():
        return (fn(x + eps * v) - fn(x - eps * v)) / (2 * eps)


def close(a, b, tol=1e-6):
    """Same shape, and ``max |a - b| <= tol * (1 + max |b|)``."""
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.numel():
        assert (a - b).abs().max().item() <= tol * (1 + b.abs().max().item())


def assert_forward_ad_and_jvp(f, x, v):
    """``forward_ad`` and ``torch.func.jvp`` give the finite-difference tangent, and jvp the primal output."""
    expected = fd(f, x, v)
    with forward_ad.dual_level():
        tangent = forward_ad.unpack_dual(f(forward_ad.make_dual(x, v))).tangent
    close(tangent, expected)
    out, tangent = jvp(f, (x,), (v,))
    close(tangent, expected)
    close(out, f(x), 1e-12)


def sample_forward_ad(op, sample, first_only=False):
    """``(outputs, output tangents)`` of a registry sample under ``forward_ad``, seeded random tangents
    on its differentiable inputs (``first_only``: on the first, the others plain)."""
    positions = differentiable_positions(sample)
    f = sample_function(op, sample, positions)
    primals = [sample.args[i] for i in positions]
    gen = torch.Generator().manual_seed(0)
    tangents = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in primals]
    with forward_ad.dual_level():
        inputs = [
            forward_ad.make_dual(p, t) if (i == 0 or not first_only) else p
            for i, (p, t) in enumerate(zip(primals, tangents))
        ]
        outs = f(*inputs)
        return [o.clone() for o in outs], [forward_ad.unpack_dual(o).tangent for o in outs]
