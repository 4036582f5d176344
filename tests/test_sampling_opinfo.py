"""PyTorch's own OpInfo samples for the grid samplers, embedding bags, CTC and margin losses.

With fwdecomp enabled, every float64 sample of these database entries passes
``gradcheck`` with forward AD, reverse AD and batched forward AD, and a
forward-over-reverse check: the JVP of the VJP against central finite
differences of the VJP (PyTorch's backward kernels). CI runs, with fast
gradcheck (random projections of the Jacobians), every sample whose
differentiable inputs hold at most ``_CI_LIMIT`` numbers, plus three of the
twelve CTC samples (16,000 numbers each; one per reduction, both
``zero_infinity`` and both length types among them); ``--run-slow`` runs the
rest: the other CTC samples and the large ``grid_sampler_3d`` ones (up to 5
million numbers).
"""

from __future__ import annotations

import pytest
import torch
from torch.testing._internal.common_methods_invocations import op_db

import fwdecomp

ENTRIES = (
    "nn.functional.grid_sample",
    "grid_sampler_2d",
    "grid_sampler_3d",
    "nn.functional.embedding_bag",
    "nn.functional.ctc_loss",
    "nn.functional.multi_margin_loss",
    "nn.functional.multilabel_margin_loss",
)
_CI_LIMIT = 10_000
_CI_CTC = (3, 5, 10)  # (none, no zero_infinity, tensor lengths), (mean, zero_infinity, tensors), (sum, no, lists)
_OPINFOS = {info.name: info for info in op_db if info.name in ENTRIES and not info.variant_test_name}


def _samples(info):
    return list(info.sample_inputs("cpu", torch.float64, requires_grad=True))


def _differentiable(sample):
    """The sample's tensors that require grad, and where they sit."""
    places = [("input", None)] + [("args", i) for i in range(len(sample.args))] + [("kwargs", k) for k in sample.kwargs]
    found = []
    for place in places:
        value = _get(sample, place)
        if isinstance(value, torch.Tensor) and value.requires_grad:
            found.append((place, value.detach()))
    return found


def _get(sample, place):
    kind, key = place
    return sample.input if kind == "input" else sample.args[key] if kind == "args" else sample.kwargs[key]


def _function(info, sample, places):
    """``f(*differentiable tensors) -> floating outputs``, through the entry's gradcheck wrapper."""

    def f(*tensors):
        values = {place: tensor for place, tensor in zip(places, tensors)}
        input_ = values.get(("input", None), sample.input)
        args = [values.get(("args", i), a) for i, a in enumerate(sample.args)]
        kwargs = {k: values.get(("kwargs", k), v) for k, v in sample.kwargs.items()}
        out = info.gradcheck_wrapper(info.get_op(), input_, *args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return tuple(o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point())

    return f


def _cases(large: bool):
    for name in ENTRIES:
        for index, sample in enumerate(_samples(_OPINFOS[name])):
            size = sum(t.numel() for _, t in _differentiable(sample))
            in_ci = size <= _CI_LIMIT or (name == "nn.functional.ctc_loss" and index in _CI_CTC)
            if in_ci != large:
                yield pytest.param(name, index, id=f"{name}-{index}-{size}")


def _check(name, index):
    info = _OPINFOS[name]
    sample = _samples(info)[index]
    found = _differentiable(sample)
    places = [place for place, _ in found]
    primals = tuple(t.clone().requires_grad_() for _, t in found)
    f = _function(info, sample, places)
    assert torch.autograd.gradcheck(
        f,
        primals,
        check_forward_ad=True,
        check_backward_ad=True,
        check_batched_forward_grad=True,
        check_undefined_grad=False,
        fast_mode=True,
    )
    _check_forward_over_reverse(f, tuple(t.detach() for t in primals))


def _check_forward_over_reverse(f, primals):
    """The JVP of the VJP (forward-over-reverse, as torch.func.hessian) against finite differences.

    The VJP is only piecewise smooth (bilinear cells, clipping): entries whose
    finite difference changes with the step have a kink within it and are left
    out; they must be rare (the big grid_sampler_3d samples have a few).
    """
    gen = torch.Generator().manual_seed(0)
    outputs = f(*primals)
    cotangents = tuple(torch.randn(o.shape, dtype=o.dtype, generator=gen) for o in outputs)
    directions = tuple(torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in primals)

    def vjp(*tensors):
        return torch.func.vjp(f, *tensors)[1](cotangents)

    def finite_difference(eps):
        with torch.no_grad():
            plus = vjp(*(p + eps * d for p, d in zip(primals, directions)))
            minus = vjp(*(p - eps * d for p, d in zip(primals, directions)))
        return [(high - low) / (2 * eps) for high, low in zip(plus, minus)]

    _, tangents = torch.func.jvp(vjp, primals, directions)
    for tangent, expected, check in zip(tangents, finite_difference(2.5e-7), finite_difference(6.25e-8)):
        if not expected.numel():
            continue
        # a scale that the few kinks (finite differences of size jump / step) do not inflate
        typical = expected.abs().flatten()[:1_000_000].quantile(0.999).item()
        tolerance = 1e-5 * (1 + typical)
        smooth = (expected - check).abs() <= tolerance
        assert (~smooth).sum().item() <= max(3, 1e-3 * expected.numel()), "too many kinks: not a smooth point"
        assert (tangent - expected)[smooth].abs().max().item() <= tolerance


@pytest.mark.parametrize("name, index", list(_cases(large=False)))
def test_opinfo_samples(enabled, name, index):
    _check(name, index)


@pytest.mark.slow
@pytest.mark.parametrize("name, index", list(_cases(large=True)))
def test_opinfo_large_samples(enabled, name, index):
    _check(name, index)


def test_every_entry_is_decomposed():
    """Without fwdecomp the entries fail under forward AD (else this harness would test PyTorch, not us)."""
    for name in ENTRIES:
        info = _OPINFOS[name]
        assert not info.supports_forward_ad, f"{name} now supports forward AD natively"
    assert not fwdecomp.is_enabled()
