"""Calls without tangents are PyTorch's own: bit-identical outputs and reverse-mode gradients."""

from __future__ import annotations

import pytest
import torch

import fwdecomp
from fwdecomp.checks import differentiable_positions, sample_function


def _cases():
    for op in fwdecomp.registry.operators():
        entry = fwdecomp.registry.lookup(op)
        for index, sample in enumerate(entry.samples("cpu", torch.float64)):
            if index < 3:
                yield pytest.param(op, index, id=f"{op}-{index}-{sample.note}")


def _run(op, index):
    sample = list(fwdecomp.registry.lookup(op).samples("cpu", torch.float64))[index]
    primals = [sample.args[i].detach().clone().requires_grad_() for i in differentiable_positions(sample)]
    outputs = sample_function(op, sample)(*primals)
    differentiable = [o for o in outputs if o.requires_grad]
    grads = ()
    if differentiable:
        total = sum(
            (o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape)).sum() for o in differentiable
        )
        grads = torch.autograd.grad(total, primals, allow_unused=True)
    return outputs, grads, [o.grad_fn.name() if o.grad_fn else None for o in outputs]


def _identical(a, b):
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


@pytest.mark.parametrize("op, index", list(_cases()))
def test_without_tangents_results_are_bit_identical(op, index):
    try:
        native = _run(op, index)
    except Exception as error:  # PyTorch itself cannot differentiate it: then neither path may
        with fwdecomp.enabled(), pytest.raises(type(error)):
            _run(op, index)
        return
    with fwdecomp.enabled():
        routed = _run(op, index)
    assert all(torch.equal(a, b) for a, b in zip(native[0], routed[0]))
    assert all(_identical(a, b) for a, b in zip(native[1], routed[1]))
    assert native[2] == routed[2]  # the same autograd nodes: PyTorch's own backward
