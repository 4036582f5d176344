"""The eager backend's materialised zero tangents: faster, and no result changes."""

from __future__ import annotations

import pytest
import torch
from numerics import sample_forward_ad
from torch.autograd import forward_ad

import fwdecomp
from fwdecomp.backends import eager
from fwdecomp.interface import get_impl


def _cases():
    for op in fwdecomp.registry.operators():
        entry = fwdecomp.registry.lookup(op)
        for index, sample in enumerate(entry.samples("cpu", torch.float64)):
            yield pytest.param(op, index, id=f"{op}-{index}-{sample.note}")


@pytest.mark.parametrize("op, index", list(_cases()))
def test_zero_tangents_change_no_result(enabled, op, index):
    sample = list(fwdecomp.registry.lookup(op).samples("cpu", torch.float64))[index]
    backend = get_impl()
    saved = backend.zero_tangent_max_numel
    try:
        backend.zero_tangent_max_numel = 0
        plain_out, plain_tangents = sample_forward_ad(op, sample, first_only=True)
        backend.zero_tangent_max_numel = None  # the default: on
        out, tangents = sample_forward_ad(op, sample, first_only=True)
    finally:
        backend.zero_tangent_max_numel = saved
    for a, b in zip(out, plain_out):
        assert torch.equal(a, b)
    for a, b in zip(tangents, plain_tangents):
        if b is None:  # no tangent before; a zero tangent now
            assert a is None or not a.any()
            continue
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13, equal_nan=True)


def test_with_zero_tangents_converts_only_small_plain_floating_inputs():
    small, big, ints = torch.randn(3), torch.randn(10), torch.arange(3)
    assert eager.with_zero_tangents((small,), {}, 4) == ((small,), {})  # no dual level: unchanged
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(torch.randn(3), torch.ones(3))
        args, kwargs = eager.with_zero_tangents((small, big, ints, dual, 2.0), {"w": small}, 4)
        assert torch.equal(forward_ad.unpack_dual(args[0]).tangent, torch.zeros(3))
        assert forward_ad.unpack_dual(args[1]).tangent is None  # above the threshold
        assert args[2] is ints and args[3] is dual and args[4] == 2.0
        assert torch.equal(forward_ad.unpack_dual(kwargs["w"]).tangent, torch.zeros(3))
        assert eager.with_zero_tangents((small,), {}, 0)[0][0] is small  # switched off
