"""Forward-over-reverse through losses, hardsigmoid and dropout (their backward operators)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fwdecomp
from fwdecomp.checks import check_sample, gradcheck_sample
from fwdecomp.decompositions.linalg import _ormqr_samples

f64 = torch.float64


def _finite_difference_hessian(loss, x, eps=1e-6):
    grad = torch.func.grad(loss)  # PyTorch's own reverse mode: no tangents, native kernels
    columns = []
    for i in range(x.numel()):
        step = torch.zeros(x.numel(), dtype=x.dtype)
        step[i] = eps
        step = step.reshape(x.shape)
        columns.append(((grad(x + step) - grad(x - step)) / (2 * eps)).reshape(-1))
    return torch.stack(columns, 1)


_LOSSES = {
    "mse_mean": lambda a, y: F.mse_loss(a, y),
    "mse_sum": lambda a, y: F.mse_loss(a, y, reduction="sum"),
    "huber": lambda a, y: F.huber_loss(a, y, delta=0.7),
    "huber_sum": lambda a, y: F.huber_loss(a, y, reduction="sum", delta=1.5),
    "soft_margin": lambda a, y: F.soft_margin_loss(a, y.sign()),
    "hardsigmoid": lambda a, y: (F.hardsigmoid(3 * a) * y).pow(2).sum(),
}


@pytest.mark.parametrize("name", sorted(_LOSSES))
def test_hessian_of_a_linear_model_under_each_loss(name):
    """What users write: hessian(lambda w: loss(X @ w, y)) with torch.func (forward-over-reverse)."""
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(6, 4, dtype=f64, generator=gen), torch.randn(6, 3, dtype=f64, generator=gen)
    w = torch.randn(4, 3, dtype=f64, generator=gen)

    def loss(weights):
        return _LOSSES[name](X @ weights, y)

    with fwdecomp.enabled():
        hessian = torch.func.hessian(loss)(w).reshape(w.numel(), w.numel())
        hvp = torch.func.jvp(torch.func.grad(loss), (w,), (torch.ones_like(w),))[1]
    reference = _finite_difference_hessian(loss, w)
    torch.testing.assert_close(hessian, reference, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(hvp.reshape(-1), reference @ torch.ones(w.numel(), dtype=f64), atol=1e-6, rtol=1e-6)


def test_mse_loss_forward_over_reverse_is_fixed_by_routing_its_backward():
    """pytorch/pytorch#123996: the native formula of mse_loss_backward fails; the decomposition does not."""
    w, X, t = torch.randn(4, 3, dtype=f64), torch.randn(5, 4, dtype=f64), torch.randn(5, 3, dtype=f64)

    def loss(p):
        return F.mse_loss(X @ p, t)

    with pytest.raises(RuntimeError, match="ZeroTensors are immutable"):
        torch.func.jvp(torch.func.grad(loss), (w,), (w,))
    with fwdecomp.enabled():
        _, hvp = torch.func.jvp(torch.func.grad(loss), (w,), (w,))
    torch.testing.assert_close(hvp, 2 * X.mT @ (X @ w) / t.numel())
    assert fwdecomp.native_forward_formula(torch.ops.aten.mse_loss_backward.default).status == "broken"


def test_dropout_tangent_uses_the_primal_mask():
    """native_dropout's own formula masks the tangent with the mask it returns: same mask, always."""
    x = torch.rand(1000, dtype=f64) + 1.0  # no zeros, so a zero output means a dropped entry
    v = torch.randn(1000, dtype=f64)
    with fwdecomp.enabled():
        out, tangent = torch.func.jvp(lambda a: F.dropout(a, 0.3, training=True), (x,), (v,))
    kept = out != 0
    assert 0 < kept.sum() < 1000
    torch.testing.assert_close(tangent, torch.where(kept, v / 0.7, 0))


def test_dropout_backward_tangent_through_the_operator():
    g, mask = torch.randn(5, dtype=f64), torch.tensor([True, False, True, True, False])
    with fwdecomp.enabled():
        out, tangent = torch.func.jvp(lambda a: torch.ops.aten.native_dropout_backward(a, mask, 2.0), (g,), (g,))
    torch.testing.assert_close(out, torch.ops.aten.native_dropout_backward(g, mask, 2.0))
    torch.testing.assert_close(tangent, g * mask * 2.0)


@pytest.mark.parametrize("index", range(len(list(_ormqr_samples("cpu", torch.complex128)))))
def test_ormqr_complex(enabled, index):
    """Complex ormqr (transpose means Q^H): forward AD against finite differences, and gradcheck."""
    sample = list(_ormqr_samples("cpu", torch.complex128))[index]
    op = torch.ops.aten.ormqr.default
    report = check_sample(op, sample, methods=("forward_ad", "func.jvp"))
    assert report.passed and "forward_ad" in report.errors, str(report)
    assert gradcheck_sample(op, sample, batched=True, fast_mode=True)
