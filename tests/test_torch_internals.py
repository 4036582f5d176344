"""Every private PyTorch API fwdecomp uses, exercised: an upgrade that changes one fails here."""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

from fwdecomp import _torch

aten = torch.ops.aten


def test_schema_and_names():
    op = aten.add.Tensor
    assert isinstance(_torch.schema_of(op), torch.FunctionSchema)
    assert _torch.qualified_name(op) == "aten::add.Tensor"
    assert _torch.qualified_name(aten.cholesky.default) == "aten::cholesky"
    assert _torch.namespace(op) == "aten"


def test_get_kernel_and_call_boxed_from_an_override():
    op = aten._cdist_forward.default
    kernel = _torch.original_kernel(op, "AutogradCPU")
    seen = []

    def override(keyset, *args):
        seen.append(keyset)
        return kernel.call_boxed(keyset, *args)

    x, y = torch.randn(3, 2, requires_grad=True), torch.randn(4, 2)
    expected = op(x, y, 2.0, None)
    lib = _torch.new_library("aten")
    try:
        lib.impl("_cdist_forward", override, "AutogradCPU", with_keyset=True)
        out = op(x, y, 2.0, None)
    finally:
        _torch.destroy_library(lib)
    assert len(seen) == 1 and torch.equal(out, expected)
    assert out.grad_fn.name() == expected.grad_fn.name()


def test_library_destroy_restores_dump():
    before = _torch.dispatch_dump("aten::_pdist_forward")
    lib = _torch.new_library("aten")
    lib.impl("_pdist_forward", lambda keyset, *a: None, "AutogradCPU", with_keyset=True)
    assert _torch.dispatch_dump("aten::_pdist_forward") != before
    _torch.destroy_library(lib)
    assert _torch.dispatch_dump("aten::_pdist_forward") == before


def test_kernel_queries():
    assert _torch.is_composite_implicit(aten.cdist.default)
    assert not _torch.is_composite_implicit(aten._cdist_forward.default)
    assert "aten::cdist" in _torch.all_operator_names()


def test_tangent_queries():
    x = torch.randn(3)
    assert not _torch.dual_level_active() and _torch.tangent_of(x) is None
    with forward_ad.dual_level():
        assert _torch.dual_level_active()
        dual = forward_ad.make_dual(x, torch.ones(3))
        assert torch.equal(_torch.tangent_of(dual), torch.ones(3))
        assert _torch.tangent_of(x) is None


def test_derivatives_yaml_is_shipped():
    path = _torch.derivatives_yaml_path()
    assert path is not None and path.endswith("derivatives.yaml")
    with open(path, encoding="utf-8") as handle:
        assert "- name: _cdist_forward(" in handle.read()


def test_functorch_transforms_active():
    seen = []

    def f(x):
        seen.append(_torch.functorch_transforms_active())
        return x * 2

    f(torch.ones(2))
    torch.func.jvp(f, (torch.ones(2),), (torch.ones(2),))
    torch.func.vmap(f)(torch.ones(3, 2))
    with forward_ad.dual_level():
        f(forward_ad.make_dual(torch.ones(2), torch.ones(2)))
    assert seen == [False, True, True, False]
