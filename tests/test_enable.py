"""enable / disable: idempotent, thread-safe, and leaving PyTorch exactly as it was."""

from __future__ import annotations

import threading

import pytest
import torch

import fwdecomp
from fwdecomp import _torch, autograd

aten = torch.ops.aten


def _dumps() -> dict[str, str]:
    names = {_torch.qualified_name(op) for op in fwdecomp.registry.operators()}
    names |= {"aten::mul.Tensor", "aten::cdist"}
    return {name: _torch.dispatch_dump(name) for name in names}


def test_disable_restores_dispatcher_exactly():
    before = _dumps()
    fwdecomp.enable()
    during = _dumps()
    fwdecomp.disable()
    after = _dumps()
    assert after == before
    assert all(before.values())  # (an overload's dump needs its full name)
    assert during["aten::_cdist_forward"] != before["aten::_cdist_forward"]
    # mul's native formula is never touched; its ZeroTensor kernel is fwdecomp's fast one
    changed = set(during["aten::mul.Tensor"].splitlines()) ^ set(before["aten::mul.Tensor"].splitlines())
    assert changed and all(line.startswith("ZeroTensor") for line in changed), changed


def test_enable_disable_idempotent():
    before = _dumps()
    fwdecomp.enable()
    fwdecomp.enable()
    assert fwdecomp.is_enabled()
    once = _dumps()
    fwdecomp.enable()
    assert _dumps() == once
    fwdecomp.disable()
    fwdecomp.disable()
    assert not fwdecomp.is_enabled()
    assert _dumps() == before


def test_only_operators_without_native_formula_are_routed():
    fwdecomp.enable()
    routed = set(fwdecomp.covered_operators())
    fwdecomp.disable()
    assert aten._cdist_forward.default in routed
    for op in routed:
        assert fwdecomp.native_forward_formula(op).status != "native"


def test_operator_with_native_formula_is_not_routed_even_if_registered():
    @fwdecomp.register_decomposition(aten.sin.default)
    def sin(self):
        raise AssertionError("must not run: sin has a native forward formula")

    with fwdecomp.enabled():
        assert not autograd.is_installed(aten.sin.default)
        x = torch.randn(3, dtype=torch.float64)
        _, t = torch.func.jvp(torch.sin, (x,), (torch.ones_like(x),))
    assert torch.allclose(t, x.cos())


def test_enabled_context_restores_previous_state():
    before = _dumps()
    with fwdecomp.enabled():
        assert fwdecomp.is_enabled()
        with fwdecomp.enabled():
            assert fwdecomp.is_enabled()
        assert fwdecomp.is_enabled()  # inner block keeps the outer state
    assert not fwdecomp.is_enabled()
    assert _dumps() == before
    fwdecomp.enable()
    with fwdecomp.enabled():
        pass
    assert fwdecomp.is_enabled()
    fwdecomp.disable()


def test_enabled_context_disables_on_error():
    with pytest.raises(ValueError):
        with fwdecomp.enabled():
            raise ValueError("boom")
    assert not fwdecomp.is_enabled()


def test_concurrent_enable_disable_is_consistent():
    before = _dumps()
    errors = []

    def worker(index: int) -> None:
        try:
            for _ in range(20):
                (fwdecomp.enable if index % 2 else fwdecomp.disable)()
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    fwdecomp.disable()
    assert _dumps() == before
    fwdecomp.enable()
    assert set(fwdecomp.covered_operators()) >= {aten._cdist_forward.default, aten.cholesky.default}
    fwdecomp.disable()


def test_plain_calls_in_other_threads_while_enabled():
    """Other threads keep getting PyTorch's results while fwdecomp is enabled.

    Not tested, and documented in the README: switching fwdecomp on or off
    *while* other threads run PyTorch operators. PyTorch frees a deregistered
    kernel even while another thread is about to execute it (we reproduced a
    segfault about once in ten runs), so enable()/disable() must not race with
    dispatch on other threads; they are safe against each other (test above).
    Likewise, PyTorch's forward-AD levels are process-global, so JVPs
    themselves cannot run concurrently in threads, with or without fwdecomp.
    """
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 3, dtype=torch.float64)
    expected = torch.cdist(x, y, p=1.5)
    expected_grad = torch.autograd.grad(expected.sum(), x)[0]
    failures = []

    def worker() -> None:
        for _ in range(50):
            out = torch.cdist(x, y, p=1.5)
            grad = torch.autograd.grad(out.sum(), x)[0]
            if not (torch.equal(out, expected) and torch.equal(grad, expected_grad)):
                failures.append("mismatch")

    with fwdecomp.enabled():
        threads = [threading.Thread(target=worker) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not failures


def test_register_while_enabled_takes_effect_at_once(enabled):
    op = aten._pdist_forward.default
    fwdecomp.unregister_decomposition(op)
    assert not autograd.is_installed(op)  # nothing to run: PyTorch's own behaviour
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="_pdist_forward"):
        torch.func.jvp(torch.pdist, (x,), (x,))

    @fwdecomp.register_decomposition(op)
    def pdist(self, p=2.0):
        return fwdecomp.decompositions.distance.pdist_forward(self, p)

    assert autograd.is_installed(op)
    _, tangent = torch.func.jvp(torch.pdist, (x,), (x,))
    assert torch.allclose(tangent, torch.pdist(x))  # distance is 1-homogeneous


def test_calls_without_tangents_are_bit_identical(enabled):
    torch.manual_seed(1)
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    with_fwdecomp = torch.cdist(x, y, p=3.5)
    grads_with = torch.autograd.grad(with_fwdecomp.sum(), (x, y))
    fwdecomp.disable()
    without = torch.cdist(x, y, p=3.5)
    grads_without = torch.autograd.grad(without.sum(), (x, y))
    fwdecomp.enable()
    assert torch.equal(with_fwdecomp, without)
    assert with_fwdecomp.grad_fn.name() == without.grad_fn.name() == "CdistBackward0"
    assert all(torch.equal(a, b) for a, b in zip(grads_with, grads_without))


@pytest.mark.parametrize("key", autograd.AUTOGRAD_KEYS)
def test_every_autograd_key_is_routed(key, enabled):
    """CUDA, Meta, ... keys get the same kernel (no GPU needed to see it registered)."""
    dump = _torch.dispatch_dump("aten::_cdist_forward")
    line = next(line for line in dump.splitlines() if line.startswith(f"{key}:"))
    assert "autograd.py" in line or "fwdecomp" in line, line


def test_meta_tensors_with_tangents_run_the_decomposition(enabled):
    x = torch.empty(5, 3, device="meta")
    y = torch.empty(4, 3, device="meta")
    out, tangent = torch.func.jvp(lambda a: torch.cdist(a, y, p=1.5), (x,), (x,))
    assert out.device.type == "meta" and tangent.shape == (5, 4)
