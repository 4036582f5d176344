"""Custom operators for the tests, made the ways users make them, and numerical helpers.

Each kernel computes in NumPy, so PyTorch cannot see through it: forward AD
reaches these operators only through fwdecomp. Each registers a backward
(``register_autograd``), as a library author would. Importing this module
defines them once per process (namespace ``fwdtest``).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch.autograd import forward_ad

f64 = torch.float64
ops = torch.ops.fwdtest


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _torch(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(like.device)


# --- one output, a float argument ----------------------------------------

CALLS = {"softplus": 0}


@torch.library.custom_op("fwdtest::softplus", mutates_args=())
def softplus(x: torch.Tensor, beta: float) -> torch.Tensor:
    CALLS["softplus"] += 1
    return _torch(np.logaddexp(0.0, beta * _np(x)) / beta, x)


@softplus.register_fake
def _(x, beta):
    return torch.empty_like(x)


def _softplus_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.beta = inputs[1]


def _softplus_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return grad * torch.sigmoid(ctx.beta * x), None


softplus.register_autograd(_softplus_backward, setup_context=_softplus_setup)


def softplus_decomposition(x, beta):
    return torch.logaddexp(torch.zeros_like(x), beta * x) / beta


def softplus_rule(primals, tangents):
    (x, beta), (dx, _) = primals, tangents
    return ops.softplus(x, beta), dx * torch.sigmoid(beta * x)


# --- two outputs ----------------------------------------------------------


@torch.library.custom_op("fwdtest::polar", mutates_args=())
def polar(r: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r_, t_ = _np(r), _np(theta)
    return _torch(r_ * np.cos(t_), r), _torch(r_ * np.sin(t_), r)


@polar.register_fake
def _(r, theta):
    return torch.empty_like(r), torch.empty_like(r)


def _polar_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _polar_backward(ctx, gx, gy):
    r, theta = ctx.saved_tensors
    c, s = torch.cos(theta), torch.sin(theta)
    return gx * c + gy * s, r * (gy * c - gx * s)


polar.register_autograd(_polar_backward, setup_context=_polar_setup)


def polar_decomposition(r, theta):
    return r * torch.cos(theta), r * torch.sin(theta)


def polar_rule(primals, tangents):
    (r, theta), (dr, dtheta) = primals, tangents
    x, y = ops.polar(r, theta)
    dr = torch.zeros_like(r) if dr is None else dr
    dtheta = torch.zeros_like(theta) if dtheta is None else dtheta
    return (x, y), (dr * torch.cos(theta) - y * dtheta, dr * torch.sin(theta) + x * dtheta)


# --- a list argument and an optional argument -----------------------------


@torch.library.custom_op("fwdtest::weighted_sines", mutates_args=())
def weighted_sines(xs: list[torch.Tensor], weights: torch.Tensor | None, scale: float) -> torch.Tensor:
    w = np.ones(len(xs)) if weights is None else _np(weights)
    return _torch(scale * sum(w[i] * np.sin(_np(x)) for i, x in enumerate(xs)), xs[0])


@weighted_sines.register_fake
def _(xs, weights, scale):
    return torch.empty_like(xs[0])


def _weighted_setup(ctx, inputs, output):
    xs, weights, scale = inputs
    ctx.save_for_backward(*xs, *(() if weights is None else (weights,)))
    ctx.count, ctx.has_weights, ctx.scale = len(xs), weights is not None, scale


def _weighted_backward(ctx, grad):
    saved = ctx.saved_tensors
    xs, weights = saved[: ctx.count], (saved[ctx.count] if ctx.has_weights else None)
    w = [1.0] * ctx.count if weights is None else list(weights.unbind())
    grads_x = [ctx.scale * w[i] * torch.cos(x) * grad for i, x in enumerate(xs)]
    grad_w = None
    if weights is not None:
        grad_w = torch.stack([ctx.scale * (torch.sin(x) * grad).sum() for x in xs])
    return grads_x, grad_w, None


weighted_sines.register_autograd(_weighted_backward, setup_context=_weighted_setup)


@weighted_sines.register_vmap
def _(info, in_dims, xs, weights, scale):
    # PyTorch's vmap fallback cannot batch Tensor[] arguments: library authors register a rule.
    xs_dims, weights_dim, _ = in_dims
    xs = [x.movedim(d, 0) if d is not None else x.expand(info.batch_size, *x.shape) for x, d in zip(xs, xs_dims)]
    if weights is None or weights_dim is None:
        return ops.weighted_sines(xs, weights, scale), 0
    weights = weights.movedim(weights_dim, 0)
    rows = [ops.weighted_sines([x[b] for x in xs], weights[b], scale) for b in range(info.batch_size)]
    return torch.stack(rows), 0


def weighted_sines_decomposition(xs, weights, scale):
    w = [1.0] * len(xs) if weights is None else list(weights.unbind())
    return scale * sum(w[i] * torch.sin(x) for i, x in enumerate(xs))


def weighted_sines_rule(primals, tangents):
    (xs, weights, scale), (dxs, dweights, _) = primals, tangents
    out = ops.weighted_sines(xs, weights, scale)
    w = [1.0] * len(xs) if weights is None else list(weights.unbind())
    dw = None if dweights is None else list(dweights.unbind())
    tangent = torch.zeros_like(out)
    for i, x in enumerate(xs):
        if dxs[i] is not None:
            tangent = tangent + scale * w[i] * torch.cos(x) * dxs[i]
        if dw is not None:
            tangent = tangent + scale * dw[i] * torch.sin(x)
    return out, tangent


# --- writes into its arguments (mutates_args) -----------------------------


@torch.library.custom_op("fwdtest::scale_", mutates_args={"x"})
def scale_(x: torch.Tensor, s: float) -> None:
    x.copy_(_torch(_np(x) * s, x))


@torch.library.custom_op("fwdtest::sin_into", mutates_args={"out"})
def sin_into(x: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_torch(np.sin(_np(x)), x))


def scale_decomposition(x, s):
    x.mul_(s)


def sin_into_decomposition(x, out):
    out.copy_(torch.sin(x))


# --- integer results ------------------------------------------------------


@torch.library.custom_op("fwdtest::bucketize", mutates_args=())
def bucketize(x: torch.Tensor) -> torch.Tensor:
    return _torch(np.floor(_np(x)).astype(np.int64), x)


@bucketize.register_fake
def _(x):
    return torch.empty_like(x, dtype=torch.int64)


# --- defined with Library.define, an optional output, no autograd kernel ---

_lib = torch.library.Library("fwdtest", "FRAGMENT")
_lib.define("expm1_and_grad(Tensor x, bool with_grad) -> (Tensor, Tensor?)")


def _expm1_and_grad(x, with_grad):
    value = _torch(np.expm1(_np(x)), x)
    return value, (_torch(np.exp(_np(x)), x) if with_grad else None)


_lib.impl("expm1_and_grad", _expm1_and_grad, "CPU")


def _expm1_and_grad_vmap(info, in_dims, x, with_grad):
    value, grad = ops.expm1_and_grad(x.movedim(in_dims[0], 0), with_grad)
    return (value, grad), (0, 0 if with_grad else None)


torch.library.register_vmap("fwdtest::expm1_and_grad", _expm1_and_grad_vmap, lib=_lib)


def expm1_and_grad_rule(primals, tangents):
    (x, with_grad), (dx, _) = primals, tangents
    value, grad = ops.expm1_and_grad(x, with_grad)
    exp = torch.exp(x)
    return (value, grad), (exp * dx, exp * dx if with_grad else None)


# --- helpers --------------------------------------------------------------

_names = itertools.count()


def fresh_namespace(prefix: str = "fwdtest_new") -> str:
    """A namespace no operator has used in this process (for operators defined inside a test)."""
    return f"{prefix}{next(_names)}"


def fd(fn, xs, vs, eps=1e-6):
    """Central finite difference of ``fn(*xs)`` (a tensor or tuple of tensors) along ``vs``."""
    with torch.no_grad():
        plus = fn(*[x + eps * v for x, v in zip(xs, vs)])
        minus = fn(*[x - eps * v for x, v in zip(xs, vs)])
    if isinstance(plus, tuple):
        return tuple((a - b) / (2 * eps) for a, b in zip(plus, minus))
    return (plus - minus) / (2 * eps)


def close(a, b, tol=1e-6):
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for x, y in zip(a, b):
            close(x, y, tol)
        return
    assert a is not None, "no tangent"
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = 1 + (b.abs().max().item() if b.numel() else 0)
    assert (a - b).abs().max().item() <= tol * scale, ((a - b).abs().max().item(), tol * scale)


def forward_ad_jvp(fn, xs, vs):
    """The output tangents of ``fn`` along ``vs`` with ``torch.autograd.forward_ad``."""
    with forward_ad.dual_level():
        out = fn(*[forward_ad.make_dual(x, v) for x, v in zip(xs, vs)])
        if isinstance(out, tuple):
            return tuple(forward_ad.unpack_dual(o).tangent for o in out)
        return forward_ad.unpack_dual(out).tangent


def randn(*shape, dtype=f64):
    return torch.randn(shape, dtype=dtype)
