"""The chunked operators of ``F.linear_cross_entropy``: Hessian-vector products (forward over reverse).

Reference: the same loss written with ``F.cross_entropy`` on explicit logits, whose double backward
PyTorch has; ``torch.autograd.functional.hvp`` computes it without fwdecomp.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

import fwdecomp
from fwdecomp.decompositions.linear_cross_entropy import AVAILABLE

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="F.linear_cross_entropy needs torch >= 2.13")
f64 = torch.float64


def _options():
    from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions

    return LinearCrossEntropyOptions(batch_chunk_size=3)


def _hvp_through_fwdecomp(loss_of, primals, tangents):
    with fwdecomp.enabled(), forward_ad.dual_level():
        duals = [forward_ad.make_dual(p.clone().requires_grad_(), t) for p, t in zip(primals, tangents)]
        grads = torch.autograd.grad(loss_of(*duals), duals, create_graph=True)
        return [forward_ad.unpack_dual(g).tangent for g in grads]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("class_weights", [False, True])
def test_hessian_vector_products_match_cross_entropy(reduction, bias, class_weights):
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 5, dtype=f64, generator=gen), torch.randn(4, 5, dtype=f64, generator=gen)
    b = torch.randn(4, dtype=f64, generator=gen)
    y = torch.tensor([0, 3, 1, 1, 2, 3, 0, 2])
    weight = torch.rand(4, dtype=f64, generator=gen) + 0.5 if class_weights else None
    ignore = 1 if class_weights else -100
    primals = [x, w, b] if bias else [x, w]
    tangents = [torch.randn(p.shape, dtype=f64, generator=gen) for p in primals]

    def chunked(x, w, b=None):
        loss = F.linear_cross_entropy(
            x, w, y, linear_bias=b, weight=weight, reduction=reduction, ignore_index=ignore, options=_options()
        )
        return loss.sum()

    def plain(x, w, b=None):
        logits = x @ w.T + (0 if b is None else b)
        return F.cross_entropy(logits, y, weight=weight, reduction=reduction, ignore_index=ignore).sum()

    got = _hvp_through_fwdecomp(chunked, primals, tangents)
    _, want = torch.autograd.functional.hvp(plain, tuple(primals), tuple(tangents))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_without_fwdecomp_forward_over_reverse_fails():
    """What fwdecomp fixes: the operators' autograd has no jvp."""
    x, w, y = torch.randn(6, 3, dtype=f64), torch.randn(4, 3, dtype=f64), torch.randint(0, 4, (6,))
    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match="jvp"):
        a = forward_ad.make_dual(x.clone().requires_grad_(), torch.ones_like(x))
        torch.autograd.grad(F.linear_cross_entropy(a, w, y, options=_options()), a, create_graph=True)


def test_label_smoothing_with_tangents_raises_clearly(enabled):
    op = torch.ops.torch_nn._linear_cross_entropy_batch_chunked.default
    x, w, y = torch.randn(6, 3, dtype=f64), torch.randn(4, 3, dtype=f64), torch.randint(0, 4, (6,))

    def call(a):
        return op(a, w, y, None, None, "mean", -100, 0.1, 2, "compact", f64, True, True, True, False)[0]

    with pytest.raises(Exception, match=r"label_smoothing=0\.1 is not supported"):
        torch.func.jvp(call, (x,), (torch.ones_like(x),))


@pytest.mark.parametrize("bias", [False, True])
def test_no_reduction_rule_under_vmap_over_the_inputs(enabled, bias):
    """The no-reduction rule writes each chunk's logits into one buffer (``out=``); vmap over the inputs
    (no batching rule for ``out=``) falls back to new tensors: per-sample losses and tangents as the
    decomposition gives them, and as F.cross_entropy on explicit logits does."""
    from fwdecomp import tangent_rules

    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(3, 8, 5, dtype=f64, generator=gen)
    w, b = torch.randn(4, 5, dtype=f64, generator=gen), torch.randn(4, dtype=f64, generator=gen)
    dx = torch.randn(8, 5, dtype=f64, generator=gen)
    y = torch.tensor([0, 3, 1, 1, 2, 3, 0, 2])
    bias_or_none = b if bias else None

    def loss(x):
        return F.linear_cross_entropy(x, w, y, linear_bias=bias_or_none, reduction="none", options=_options())

    def batched():
        return torch.func.vmap(lambda x: torch.func.jvp(loss, (x,), (dx,)))(xs)

    values, tangents = batched()
    with tangent_rules.disabled():
        ref_values, ref_tangents = batched()
    torch.testing.assert_close(values, ref_values)
    torch.testing.assert_close(tangents, ref_tangents)
    explicit = torch.func.vmap(
        lambda x: torch.func.jvp(
            lambda a: F.cross_entropy(F.linear(a, w, bias_or_none), y, reduction="none"), (x,), (dx,)
        )
    )(xs)
    torch.testing.assert_close(tangents, explicit[1])
