"""Every built-in decomposition, on every one of its samples and dtypes.

Tangents from forward_ad, torch.func.jvp, jacfwd and reverse mode (``J v``)
are compared with central finite differences; ``gradcheck`` with forward and
reverse AD and batched forward grad runs in float64.
"""

from __future__ import annotations

import pytest
import torch
from registry_cases import sample_cases
from torch.autograd.gradcheck import GradcheckError

import fwdecomp
from fwdecomp import _torch
from fwdecomp.checks import ALL_METHODS, check_sample, gradcheck_sample

pytestmark = pytest.mark.usefixtures("backend")  # every test once per backend (tests/conftest.py)


def _sample(op, dtype, index):
    entry = fwdecomp.registry.lookup(op)
    return list(entry.samples("cpu", dtype))[index]


@pytest.mark.parametrize("op, dtype, index", list(sample_cases()))
def test_tangents_match_finite_differences_and_reverse_mode(enabled, op, dtype, index):
    sample = _sample(op, dtype, index)
    report = check_sample(op, sample, methods=ALL_METHODS)
    assert report.passed, str(report)
    assert "forward_ad" in report.errors  # the check really compared something


_FLOAT64 = [c for c in sample_cases() if c.values[1] == torch.float64]


@pytest.mark.parametrize("op, dtype, index", _FLOAT64)
def test_gradcheck_forward_and_reverse(enabled, op, dtype, index):
    """Fast gradcheck (random projections of the Jacobians) on every float64 sample."""
    assert gradcheck_sample(op, _sample(op, dtype, index), batched=True, fast_mode=True)


@pytest.mark.slow
@pytest.mark.parametrize("op, dtype, index", _FLOAT64)
def test_gradcheck_forward_and_reverse_every_entry(enabled, op, dtype, index):
    """Full gradcheck: every Jacobian entry (slow sweep)."""
    assert gradcheck_sample(op, _sample(op, dtype, index), batched=True, fast_mode=False)


def test_every_builtin_has_samples():
    """On CPU; an operator with no CPU kernel (the CUDA attention kernels) on its meta kernel."""
    for op in fwdecomp.registry.operators():
        entry = fwdecomp.registry.lookup(op)
        keys = ("CPU", "CompositeExplicitAutograd", "CompositeImplicitAutograd")
        runs_on_cpu = any(_torch.has_kernel_for_key(op, key) for key in keys)
        device = "cpu" if runs_on_cpu else "meta"
        dtype = torch.float64 if device == "cpu" else entry.dtypes[0]
        assert entry.samples is not None and list(entry.samples(device, dtype)), op


def test_check_catches_a_wrong_decomposition(enabled):
    """The harness can fail: a decomposition with a wrong derivative is reported."""
    op = torch.ops.aten.cholesky.default
    sample = _sample(op, torch.float64, 0)

    @fwdecomp.register_decomposition("aten::cholesky", replace=True)
    def wrong(self, upper=False):
        lower = torch.linalg.cholesky(self)
        return (lower * 1.01 - lower.detach() * 0.01).mH if upper else lower * 1.01 - lower.detach() * 0.01

    report = check_sample(op, sample)
    assert not report.passed and "forward_ad" in report.failures
    assert "reverse" in report.errors  # reverse mode uses PyTorch's kernel: still right
    with pytest.raises(GradcheckError, match="forward mode mismatch"):
        gradcheck_sample(op, sample, fast_mode=True)
