"""A removed fwdecomp kernel stays alive for a while: threads may already be inside it.

The dispatcher hands a calling thread a reference to the kernel, not ownership. A thread that has
looked up fwdecomp's (Python) kernel and waits for the GIL inside it crashed the process when
``disable()`` freed the kernel meanwhile (tests/test_enable.py's thread test, ~10% of runs on main,
most runs once more operators were registered). ``autograd`` now keeps removed kernels alive for
``RETIRE_SECONDS``.
"""

from __future__ import annotations

import pytest
import torch

from fwdecomp import autograd

aten = torch.ops.aten


def test_removed_kernels_are_retired_not_freed():
    op = aten._pdist_forward.default
    autograd.install(op)
    handles = autograd._overrides[op].handles
    assert len(handles) == len(autograd.AUTOGRAD_KEYS)
    autograd.uninstall(op)
    assert any(retired is handles for _, retired in autograd._retired)
    # Each handle owns a copy of the kernel (so its memory outlives the registration); PyTorch
    # refuses new calls through it, which is right: only calls already inside it may finish.
    keyset = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    cpu = autograd.AUTOGRAD_KEYS.index("AutogradCPU")
    with pytest.raises(RuntimeError, match="invalidated"):
        handles[cpu].call_boxed(keyset, torch.randn(4, 3), 2.0)
    assert not autograd.is_installed(op)


def test_retired_kernels_are_released_after_the_grace_period(monkeypatch):
    monkeypatch.setattr(autograd, "RETIRE_SECONDS", 0.0)
    op = aten._pdist_forward.default
    autograd.install(op)
    first = autograd._overrides[op].handles
    autograd.uninstall(op)
    autograd.install(op)
    autograd.uninstall(op)
    assert all(retired is not first for _, retired in autograd._retired)
