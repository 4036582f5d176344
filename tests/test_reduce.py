"""index_reduce and segment_reduce: conventions at ties and zeros, against PyTorch's reverse mode."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

import fwdecomp

aten = torch.ops.aten
f64 = torch.float64


def _forward_jacobian(f, x):
    with fwdecomp.enabled():
        return torch.func.jacfwd(f)(x)


def _t(values):
    return torch.tensor(values, dtype=f64)


@pytest.mark.parametrize("reduce", ["amax", "amin"])
@pytest.mark.parametrize("include_self", [True, False])
def test_index_reduce_ties_follow_reverse_mode(reduce, include_self):
    """Even split among every tie, self counted even when excluded: index_reduce_backward's rule."""
    self = _t([[2.0, 5.0, 1.0], [0.0, 3.0, 3.0]])
    # Column 0 receives 2.0 twice (a three-way tie with self), column 2 a tie with self only.
    source = _t([[2.0, 2.0, 1.0], [0.0, 0.0, 3.0]])
    index = torch.tensor([0, 0, 2])

    def f_self(s):
        return aten.index_reduce(s, 1, index, source, reduce, include_self=include_self)

    def f_source(src):
        return aten.index_reduce(self, 1, index, src, reduce, include_self=include_self)

    for f, x in ((f_self, self), (f_source, source)):
        forward = _forward_jacobian(f, x)
        reverse = jacobian(f, x)  # PyTorch's kernel and index_reduce_backward
        torch.testing.assert_close(forward, reverse)


@pytest.mark.parametrize("position", [0, 1])
@pytest.mark.parametrize("include_self", [True, False])
def test_index_reduce_prod_with_zeros_follows_reverse_mode(include_self, position):
    self = _t([[0.0, 2.0, 3.0], [1.5, 0.0, -1.0]])
    source = _t([[2.0, 0.0, 0.0, 3.0], [-2.0, 0.0, 4.0, 0.5]])
    index = torch.tensor([0, 1, 1, 2])

    def f(x):
        args = [self, source]
        args[position] = x
        return aten.index_reduce(args[0], 1, index, args[1], "prod", include_self=include_self)

    x = (self, source)[position]
    torch.testing.assert_close(_forward_jacobian(f, x), jacobian(f, x))


@pytest.mark.parametrize("reduce", ["prod", "mean", "amax", "amin"])
def test_index_reduce_value_is_the_kernels_bit_for_bit(reduce):
    gen = torch.Generator().manual_seed(0)
    self, source = torch.randn(4, 6, generator=gen), torch.randn(4, 9, generator=gen)
    index = torch.randint(0, 6, (9,), generator=gen)
    want = aten.index_reduce(self, 1, index, source, reduce)
    with fwdecomp.enabled():
        got, _ = torch.func.jvp(lambda s: aten.index_reduce(s, 1, index, source, reduce), (self,), (self,))
    assert torch.equal(got, want)


def test_index_reduce_keeps_the_kernels_input_checks(enabled):
    x = torch.randn(3, 4, dtype=f64)
    with pytest.raises(RuntimeError, match="index_reduce"):
        torch.func.jvp(
            lambda s: aten.index_reduce(s, 1, torch.tensor([0]), torch.ones(3, 1, dtype=f64), "sum"), (x,), (x,)
        )


def test_segment_max_ties_split_evenly_as_reverse_mode_does_for_positive_cotangents():
    data = _t([3.0, 1.0, 3.0, -2.0, 0.5, -2.0])
    lengths = torch.tensor([3, 3])

    def f(d):
        return torch.segment_reduce(d, "max", lengths=lengths)

    forward = _forward_jacobian(f, data)
    torch.testing.assert_close(forward, _t([[0.5, 0, 0.5, 0, 0, 0], [0, 0, 0, 0, 1, 0]]))
    _, vjp = torch.func.vjp(f, data)
    torch.testing.assert_close(vjp(_t([1.0, 2.0]))[0], _t([1.0, 2.0]) @ forward)


def test_segment_max_reverse_mode_quirk_is_still_there():
    """PyTorch's CPU backward divides a tied cotangent only when it is positive (README finding).

    Forward mode cannot copy a rule that is not linear; if this starts failing, PyTorch fixed it
    and the README's note can go.
    """
    data = _t([3.0, 3.0])
    out = torch.segment_reduce(data, "max", lengths=torch.tensor([2]))
    grad = aten._segment_reduce_backward(_t([-1.0]), out, data, "max", lengths=torch.tensor([2]))
    torch.testing.assert_close(grad, _t([-1.0, -1.0]))


@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min", "prod"])
def test_segment_reduce_hessian_matches_finite_differences_of_the_gradient(reduce):
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(2, 5, 3, dtype=f64, generator=gen)
    lengths = torch.tensor([[2, 3], [1, 4]])

    def loss(d):
        return torch.segment_reduce(d, reduce, lengths=lengths, axis=1, initial=0.5).pow(2).sum()

    with fwdecomp.enabled():
        hessian = torch.func.hessian(loss)(data).reshape(data.numel(), data.numel())
    grad = torch.func.grad(loss)  # PyTorch's own backward (no tangents: native kernels)
    eps = 1e-6
    columns = []
    for i in range(data.numel()):
        step = torch.zeros(data.numel(), dtype=f64)
        step[i] = eps
        step = step.reshape(data.shape)
        columns.append(((grad(data + step) - grad(data - step)) / (2 * eps)).reshape(-1))
    torch.testing.assert_close(hessian, torch.stack(columns, 1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min", "prod"])
def test_segment_reduce_backward_value_is_the_kernels_bit_for_bit(reduce):
    gen = torch.Generator().manual_seed(2)
    data = torch.randn(7, 3, dtype=f64, generator=gen)
    lengths = torch.tensor([2, 0, 4, 1])
    out = torch.segment_reduce(data, reduce, lengths=lengths, initial=1.0)
    grad = torch.randn(out.shape, dtype=f64, generator=gen)
    want = aten._segment_reduce_backward(grad, out, data, reduce, lengths=lengths, initial=1.0)
    with fwdecomp.enabled():
        got, _ = torch.func.jvp(
            lambda g: aten._segment_reduce_backward(g, out, data, reduce, lengths=lengths, initial=1.0),
            (grad,),
            (grad,),
        )
    assert torch.equal(got, want)


def test_segment_reduce_backward_tangent_under_vmap_over_lengths(enabled):
    """The rule's repeat_interleave path reads whether the lengths tile the axis; under vmap over the
    lengths it cannot, and the kernel path gives the tangent."""
    data = torch.randn(6, 2, dtype=torch.float64)
    lengths = torch.tensor([[2, 3, 1], [1, 1, 4]])
    grad = torch.randn(3, 2, dtype=torch.float64)

    def tangent(per_call_lengths):
        def f(g):
            out = aten.segment_reduce(data, "mean", lengths=per_call_lengths)
            return aten._segment_reduce_backward(g, out, data, "mean", lengths=per_call_lengths)

        return torch.func.jvp(f, (grad,), (torch.ones_like(grad),))[1]

    got = torch.vmap(tangent)(lengths)
    for row, length in zip(got, lengths):
        expected = (torch.ones_like(grad) / length.unsqueeze(1)).repeat_interleave(length, dim=0)
        torch.testing.assert_close(row, expected)
