"""jvp_from_forward: an autograd.Function's jvp by differentiating its own forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from custom_op_zoo import close, f64, fd, forward_ad_jvp, randn
from torch.autograd import forward_ad
from torch.func import jacfwd, jvp, vmap

import fwdecomp
from fwdecomp import NotForwardDifferentiableError, jvp_from_forward

BACKWARD_CALLS = []


@jvp_from_forward
class LogCosh(torch.autograd.Function):
    """New style (forward without ctx, setup_context): works with torch.func."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, scale):
        return scale * (torch.logaddexp(x, -x) - np.log(2.0))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.scale = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        BACKWARD_CALLS.append("LogCosh")
        (x,) = ctx.saved_tensors
        return grad * ctx.scale * torch.tanh(x), None


@jvp_from_forward
class RotateAndCount(torch.autograd.Function):
    """Two tensor inputs, three outputs: two differentiable, one integer, one marked non-differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(r, theta):
        return r * torch.cos(theta), r * torch.sin(theta), (r > 1).sum(), torch.ones_like(r)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.mark_non_differentiable(output[2], output[3])

    @staticmethod
    def backward(ctx, gx, gy, _count, _ones):
        r, theta = ctx.saved_tensors
        c, s = torch.cos(theta), torch.sin(theta)
        return gx * c + gy * s, r * (gy * c - gx * s)


@jvp_from_forward
class OldStyleCube(torch.autograd.Function):
    """Old style: forward(ctx, ...). Plain forward_ad only (torch.func needs setup_context)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        ctx.note = "kept"
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


def _logcosh(x):
    return LogCosh.apply(x, 0.7)


def _rotate(r, theta):
    x, y, _, _ = RotateAndCount.apply(r, theta)
    return x, y


def test_forward_ad_and_jvp():
    x, v = randn(5), randn(5)
    expected = fd(_logcosh, [x], [v])
    close(forward_ad_jvp(_logcosh, [x], [v]), expected)
    close(jvp(_logcosh, (x,), (v,))[1], expected)


def test_several_outputs_and_non_differentiable_ones():
    r, theta = torch.rand(4, dtype=f64) + 0.5, randn(4)
    vr, vt = randn(4), randn(4)
    close(jvp(_rotate, (r, theta), (vr, vt))[1], fd(_rotate, [r, theta], [vr, vt]))
    with forward_ad.dual_level():
        x, _, count, ones = RotateAndCount.apply(forward_ad.make_dual(r, vr), theta)  # tangent on r only
        assert forward_ad.unpack_dual(count).tangent is None
        assert forward_ad.unpack_dual(ones).tangent is None
        close(forward_ad.unpack_dual(x).tangent, vr * torch.cos(theta))


def test_jacfwd_vmap_and_nested():
    x = randn(4)
    close(jacfwd(_logcosh)(x), torch.autograd.functional.jacobian(_logcosh, x))
    vs = randn(3, 4)
    batched = vmap(lambda v: jvp(_logcosh, (x,), (v,))[1])(vs)
    for i in range(3):
        close(batched[i], fd(_logcosh, [x], [vs[i]]))
    u, w = randn(4), randn(4)

    def directional(z):
        return jvp(_logcosh, (z,), (u,))[1]

    close(jvp(directional, (x,), (w,))[1], fd(directional, [x], [w], eps=1e-5), 1e-5)


def test_old_style_function():
    x, v = randn(4), randn(4)
    close(forward_ad_jvp(OldStyleCube.apply, [x], [v]), 3 * x**2 * v)


def test_backward_is_still_the_authors():
    x = randn(4).requires_grad_()
    BACKWARD_CALLS.clear()
    (grad,) = torch.autograd.grad(_logcosh(x).sum(), x)
    assert BACKWARD_CALLS == ["LogCosh"]
    close(grad, 0.7 * torch.tanh(x.detach()))


def test_reverse_mode_through_the_jvp():
    v = randn(4)

    def loss(z):
        return (jvp(_logcosh, (z,), (v,))[1] ** 2).sum()

    x = randn(4)
    leaf = x.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(loss(leaf), leaf)
    expected = torch.stack([fd(loss, [x], [e], eps=1e-5) for e in torch.eye(4, dtype=f64)])
    close(gradient, expected, 1e-5)


def test_independent_of_enable():
    x, v = randn(3), randn(3)
    with fwdecomp.enabled():
        close(jvp(_logcosh, (x,), (v,))[1], fd(_logcosh, [x], [v]))


def test_forward_that_leaves_pytorch_raises_clearly():
    @jvp_from_forward
    class ViaNumpy(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return torch.from_numpy(np.sin(x.detach().numpy()))

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, grad):
            return grad * torch.cos(ctx.saved_tensors[0])

    x, v = randn(3), randn(3)
    with pytest.raises(NotForwardDifferentiableError, match=r"output 0 of ViaNumpy.forward does not depend"):
        forward_ad_jvp(ViaNumpy.apply, [x], [v])
    # under torch.func the inputs are functorch wrappers, which NumPy cannot read at all
    with pytest.raises(NotForwardDifferentiableError, match=r"ViaNumpy.forward .*raised RuntimeError"):
        jvp(ViaNumpy.apply, (x,), (v,))


@jvp_from_forward
class CholeskyOfGram(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return torch.cholesky(x @ x.mT + torch.eye(x.shape[-1], dtype=x.dtype))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            out = torch.cholesky(leaf @ leaf.mT + torch.eye(x.shape[-1], dtype=x.dtype))
            return torch.autograd.grad(out, leaf, grad)[0]


def test_forward_using_an_operator_without_forward_ad():
    """The error names the Function and PyTorch's reason; with fwdecomp enabled the forward is differentiable."""
    x, v = randn(3, 3), randn(3, 3)
    with pytest.raises(NotForwardDifferentiableError, match=r"CholeskyOfGram\.forward .*Trying to use forward AD"):
        jvp(CholeskyOfGram.apply, (x,), (v,))
    with fwdecomp.enabled():
        close(jvp(CholeskyOfGram.apply, (x,), (v,))[1], fd(CholeskyOfGram.apply, [x], [v]))


def test_in_place_forward_is_refused():
    @jvp_from_forward
    class DoubleInPlace(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.mark_dirty(x)
            return x.mul_(2)

        @staticmethod
        def backward(ctx, grad):
            return grad * 2

    x = randn(3)
    with forward_ad.dual_level():
        with pytest.raises(NotForwardDifferentiableError, match="modifies its inputs in place"):
            DoubleInPlace.apply(forward_ad.make_dual(x.clone(), randn(3)))


def test_decorator_misuse():
    with pytest.raises(TypeError, match=r"torch\.autograd\.Function subclass"):
        jvp_from_forward(torch.sin)
    with pytest.raises(TypeError, match="already defines jvp"):

        @jvp_from_forward
        class HasJvp(torch.autograd.Function):
            @staticmethod
            def forward(x):
                return x

            @staticmethod
            def setup_context(ctx, inputs, output):
                pass

            @staticmethod
            def jvp(ctx, t):
                return t
