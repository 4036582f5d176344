"""The evidence for "no native forward formula", and a live check of it."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import forward_ad

import fwdecomp
from fwdecomp import _torch
from fwdecomp.checks import differentiable_positions
from fwdecomp.formulas import native_forward_formula

aten = torch.ops.aten


@pytest.mark.parametrize(
    "op, status",
    [
        (aten.mul.Tensor, "native"),
        (aten.add_.Tensor, "native"),  # in-place shares the functional entry
        (aten.linalg_cholesky_ex.default, "native"),  # named output L
        (aten.hardsigmoid.default, "native"),  # auto_element_wise
        (aten.cdist.default, "native"),  # CompositeImplicitAutograd
        (aten.cholesky.default, "missing"),
        (aten._cdist_forward.default, "missing"),
        (aten._euclidean_dist.default, "missing"),
        (aten._scaled_dot_product_flash_attention_for_cpu.default, "missing"),
        (aten.hardsigmoid_backward.default, "unknown"),  # not in derivatives.yaml
        (aten.native_layer_norm_backward.default, "native"),  # PyTorch's own JIT decomposition
        (aten.mse_loss_backward.default, "broken"),  # BROKEN_FORWARD_FORMULAS
    ],
)
def test_verdicts(op, status):
    assert native_forward_formula(op).status == status


def _native_forward_ad_raises(op, sample) -> bool:
    """Whether PyTorch alone fails forward AD on ``op``: it raises, or (custom operators, whose
    autograd has no jvp) silently returns outputs without tangents."""
    positions = differentiable_positions(sample)
    args = list(sample.args)
    with forward_ad.dual_level():
        for i in positions:
            args[i] = forward_ad.make_dual(args[i], torch.randn_like(args[i]))
        try:
            result = op(*args, **sample.kwargs)
        except (NotImplementedError, RuntimeError) as error:
            if "forward AD" in str(error) or "derivative for" in str(error) or "jvp" in str(error):
                return True
            raise
        if _torch.namespace(op) != "aten":
            outputs = result if isinstance(result, (tuple, list)) else (result,)
            tensors = [o for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point()]
            return all(forward_ad.unpack_dual(o).tangent is None for o in tensors)
    return False


@pytest.mark.parametrize("op", fwdecomp.registry.operators(), ids=str)
def test_routed_operators_really_lack_native_forward_ad(op):
    """If a PyTorch upgrade adds a formula, this fails, and fwdecomp must step aside for it."""
    entry = fwdecomp.registry.lookup(op)
    # CUDA-only kernels have no CPU samples; their meta samples reach the same autograd check.
    sample = next(iter(entry.samples("cpu", torch.float64)), None) or next(iter(entry.samples("meta", entry.dtypes[0])))
    assert fwdecomp.api.needs_override(op)
    if native_forward_formula(op).status == "broken":  # the first sample must show the bug
        with pytest.raises(RuntimeError):
            _native_forward_ad_raises(op, sample)
        return
    assert _native_forward_ad_raises(op, sample), f"{op} now has native forward AD"


def test_pytorch_jit_decomposed_operator_really_has_forward_ad():
    """native_layer_norm_backward: no formula in derivatives.yaml, yet PyTorch differentiates it forward."""
    x = torch.randn(3, 4, dtype=torch.float64)
    w = torch.randn(4, dtype=torch.float64)

    def gradient(z):
        return torch.func.grad(lambda a: torch.nn.functional.layer_norm(a, (4,), w).pow(3).sum())(z)

    _, tangent = torch.func.jvp(gradient, (x,), (torch.ones_like(x),))
    assert torch.isfinite(tangent).all()
