"""What the result contract and the numerical checks accept at their edges.

Undefined (``None``) tensor results where the kernel returns them too, operators
whose meta kernel disagrees with their eager kernels, and infinite outputs
(whose finite differences are NaN).
"""

from __future__ import annotations

import pytest
import torch

from fwdecomp import checks, contract
from fwdecomp.contract import DecompositionError, check_results

aten = torch.ops.aten


def _grid_backward_args(mask):
    grad = torch.randn(1, 2, 3, 2)
    return (grad, torch.randn(1, 2, 4, 5), torch.rand(1, 3, 2, 2) * 2 - 1, 0, 0, False, mask), {}


def test_none_accepted_where_the_kernel_returns_an_undefined_tensor():
    op = aten.grid_sampler_2d_backward.default
    args, kwargs = _grid_backward_args([False, True])
    check_results(op, args, kwargs, [None, torch.zeros(1, 3, 2, 2)])


def test_none_rejected_where_the_kernel_returns_a_tensor():
    op = aten.grid_sampler_2d_backward.default
    args, kwargs = _grid_backward_args([True, True])
    with pytest.raises(DecompositionError, match=r"returned None for output 0, but .* returns a tensor"):
        check_results(op, args, kwargs, [None, torch.zeros(1, 3, 2, 2)])


def test_meta_shapes_unreliable_skips_only_the_shape_check(monkeypatch):
    monkeypatch.setattr(contract, "_unreliable_meta", {})
    op = aten.multi_margin_loss.default
    args = (torch.randn(3, 4), torch.tensor([0, 1, 2]), 1, 1.0, None, 0)
    with pytest.raises(DecompositionError, match=r"\(shape, dtype\)"):
        check_results(op, args, {}, [torch.zeros(5)])
    contract.meta_shapes_unreliable(op, "a test")
    check_results(op, args, {}, [torch.zeros(5)])
    with pytest.raises(DecompositionError, match="returned int"):
        check_results(op, args, {}, [3])


@torch.library.custom_op("fwdecomp_contract_test::longer", mutates_args=())
def _longer(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_longer.register_fake
def _(x):
    return x.new_empty(x.shape[0] + 1)  # a wrong meta kernel


def test_meta_agrees_spots_a_meta_kernel_that_disagrees():
    x = torch.randn(4, 3)
    assert contract.meta_agrees(aten._pdist_forward.default, x, 2.0)
    assert not contract.meta_agrees(torch.ops.fwdecomp_contract_test.longer.default, torch.randn(4))


def test_error_ignores_entries_whose_reference_is_not_finite():
    want = torch.tensor([1.0, float("nan"), 2.0], dtype=torch.float64)
    assert checks._error(torch.tensor([1.0, 123.0, 2.0], dtype=torch.float64), want) == 0.0
    assert checks._error(torch.tensor([1.0, 0.0, 2.5], dtype=torch.float64), want) == pytest.approx(0.5 / 3)
    nan_at_finite = checks._error(torch.tensor([float("nan"), 0.0, 2.0], dtype=torch.float64), want)
    assert nan_at_finite != nan_at_finite  # NaN: check_sample reports it as a failure


def _register_forward_only(scale: float):
    """A sum-mode ``_embedding_bag_forward_only`` decomposition, off by ``scale`` in its tangent."""
    import fwdecomp

    @fwdecomp.register_decomposition("aten::_embedding_bag_forward_only", replace=True)
    def forward_only(
        weight,
        indices,
        offsets,
        scale_grad_by_freq=False,
        mode=0,
        sparse=False,
        per_sample_weights=None,
        include_last_offset=False,
        padding_idx=-1,
    ):
        out, *integers = aten._embedding_bag_forward_only(weight.detach(), indices, offsets)
        bags = torch.searchsorted(offsets, torch.arange(indices.numel()), right=True) - 1
        rows = weight[indices] * per_sample_weights.unsqueeze(1)
        bagged = torch.zeros_like(out).index_add(0, bags, rows)
        return (bagged * scale - bagged.detach() * (scale - 1), *integers)


@pytest.mark.parametrize("scale, passes", [(1.0, True), (1.01, False)])
def test_operator_without_any_reverse_mode_is_checked_forward_only(enabled, scale, passes):
    """PyTorch refuses to run _embedding_bag_forward_only on inputs that require grad."""
    from torch.autograd.gradcheck import GradcheckError

    from fwdecomp.registry import Sample

    _register_forward_only(scale)
    op = aten._embedding_bag_forward_only.default
    weight, psw = torch.randn(6, 3, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    indices, offsets = torch.tensor([1, 2, 4, 5, 3]), torch.tensor([0, 2])
    sample = Sample((weight, indices, offsets, False, 0, False, psw), tangents=(0, 6))
    report = checks.check_sample(op, sample)
    assert "reverse" in report.skipped and report.passed == passes, str(report)
    if passes:
        assert checks.gradcheck_sample(op, sample, fast_mode=False)
    else:
        with pytest.raises(GradcheckError):
            checks.gradcheck_sample(op, sample, fast_mode=True)


def test_check_arguments_raises_like_the_kernel_and_remembers_what_passed(monkeypatch):
    """A refused signature raises every time; an accepted one (shapes, strides, dtypes, values) is not
    run on meta again; a different stride is a different signature."""
    from fwdecomp import contract

    runs = []
    to_meta = contract._to_meta
    monkeypatch.setattr(contract, "_to_meta", lambda value: runs.append(1) or to_meta(value))
    op = torch.ops.aten.mm.default
    bad = (torch.ones(2, 3), torch.ones(2, 4))
    for _ in range(2):
        with pytest.raises(RuntimeError, match="must have same reduction dim"):
            contract.check_arguments(op, bad, {})
    good = (torch.ones(5, 3), torch.ones(3, 4))
    contract.check_arguments(op, good, {})
    counted = len(runs)
    contract.check_arguments(op, (torch.zeros(5, 3), torch.zeros(3, 4)), {})  # same signature, other values
    assert len(runs) == counted
    contract.check_arguments(op, (torch.ones(3, 5).t(), torch.ones(3, 4)), {})  # transposed: another stride
    assert len(runs) > counted
