"""PyTorch's own operator database (OpInfo ``op_db``) with fwdecomp enabled: issue 3's verification harness.

1. ``test_tangents_are_right``: every differentiable entry that reaches an operator fwdecomp
   routes (found by recording the overloads its forward and backward reach; nothing is listed by
   hand) is checked in float64 and complex128 (where the entry supports it) with
   ``gradcheck(check_forward_ad=True, check_batched_forward_grad=<the entry's flag>)`` and with
   ``gradgradcheck(check_fwd_over_rev=True)`` (the tangent of the vector-Jacobian product against
   finite differences of it), with the entry's ``gradcheck_wrapper`` and
   ``output_process_fn_grad``, exactly as PyTorch's ``TestGradients`` builds the function.
2. ``test_database_entry``: *every* differentiable entry is probed under forward AD and
   forward-over-reverse (:mod:`fwdecomp.database`), with fwdecomp enabled: none may fail (except
   :data:`fwdecomp.database.NOT_FIXED`, each with its reason, which must still fail), and without
   it: the entries that fail must be exactly those in the expected list of the running torch
   version, so an upgrade that adds native formulas is noticed (fwdecomp then steps aside by itself).

CI runs a subset: part 1 checks ``CI_SAMPLES`` samples per entry, spread over all of them, with
fast gradcheck; part 2 probes the first ``CI_PROBES`` samples. ``--run-slow`` (or
``FWDECOMP_SLOW=1``) checks every sample, forward AD with full gradcheck (see _gradcheck_entry).

"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import warnings

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import fwdecomp
from fwdecomp import database
from fwdecomp._torch import qualified_name

#: Samples per entry (spread over all of them) that part 1 checks in CI; all with --run-slow.
CI_SAMPLES = 4
#: Samples per entry (the first ones) that part 2 probes in CI; all with --run-slow.
CI_PROBES = 3
#: Samples on which part 1 looks for the operators an entry reaches (in CI).
DETECT_SAMPLES = 2

#: Part 1 does not gradcheck these (entry -> reason); part 2 still probes them.
GRADCHECK_SKIPS: dict[str, str] = {
    "nn.functional.linear_cross_entropy.chunked_none": (
        "gradgradcheck's reference runs PyTorch's backward of the no-reduction chunked operator with "
        "create_graph=True, which raises (out= arguments); forward-over-reverse is probed by "
        "test_database_entry and checked against F.cross_entropy in tests/test_linear_cross_entropy.py"
    ),
    "to_sparse": "sparse output: forward AD cannot carry its tangent (see fwdecomp.database.NOT_FIXED)",
    "sparse.sampled_addmm": "sparse input and output: no forward-AD tangents on sparse tensors",
    "sparse.mm.reduce": "sparse input requiring grad: no forward-AD tangents on sparse tensors",
    "normal": "random, and its derivative is zero by definition: finite differences of a seeded draw disagree",
}


def _sample_is_random(entry: str, sample) -> str | None:
    """Samples that draw random numbers (the reason), which finite differences cannot check."""
    if entry == "nn.functional.scaled_dot_product_attention" and sample.kwargs.get("dropout_p", 0.0) > 0:
        return "dropout_p > 0: a random mask (fwdecomp's attention raises for dropout with tangents)"
    return None


def _slow(config) -> bool:
    return bool(config.getoption("--run-slow")) or os.environ.get("FWDECOMP_SLOW") == "1"


@functools.lru_cache(maxsize=1)
def _entries() -> dict[str, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {database.entry_name(info): info for info in database.differentiable_entries()}


def _reached(info, dtype, limit) -> set[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {qualified_name(op) for op in database.reached_operators(info, dtype, limit)}


# --- part 1: the tangents are right ---------------------------------------------------------


def _gradcheck_entry(info, sample, slow: bool) -> None:
    """Forward AD against finite differences (gradcheck), then forward-over-reverse (gradgradcheck).

    CI: fast (random-projection) mode for both. Slow: every Jacobian entry for forward AD (unless
    the entry asks for fast mode), and both contiguous and non-contiguous cotangents for
    forward-over-reverse, still projected: full second-order Jacobians of attention-sized samples
    take hours.
    """
    f, inputs = database.sample_function(info, sample)
    if not inputs:
        return
    gradcheck(
        f,
        tuple(inputs),
        check_forward_ad=True,
        check_backward_ad=False,
        check_batched_forward_grad=info.check_batched_forward_grad,
        check_undefined_grad=False,
        nondet_tol=info.gradcheck_nondet_tol,
        fast_mode=bool(info.gradcheck_fast_mode) or not slow,
    )
    for non_contiguous in (False, True) if slow else (False,):
        gradgradcheck(
            f,
            tuple(inputs),
            gen_non_contig_grad_outputs=non_contiguous,
            check_fwd_over_rev=True,
            check_rev_over_rev=False,
            check_batched_grad=False,
            check_undefined_grad=False,
            nondet_tol=info.gradcheck_nondet_tol,
            fast_mode=True,
        )


@pytest.mark.parametrize("entry", sorted(_entries()))
def test_tangents_are_right(request, entry):
    info = _entries()[entry]
    if entry in GRADCHECK_SKIPS:
        pytest.skip(f"{entry}: {GRADCHECK_SKIPS[entry]}")
    dtypes = database.entry_dtypes(info)
    if not dtypes or dtypes[0] not in (torch.float64, torch.complex128):
        pytest.skip(f"{entry}: no float64/complex128 autograd support on CPU")
    slow = _slow(request.config)
    reached = _reached(info, dtypes[0], None if slow else DETECT_SAMPLES)
    routed = {qualified_name(op) for op in database.routed_operators()}
    if not reached & routed:
        pytest.skip("reaches no operator fwdecomp routes")
    checked = 0
    with fwdecomp.enabled(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dtype in dtypes:
            for sample in database.samples(info, dtype, None if slow else CI_SAMPLES):
                if _sample_is_random(entry, sample):
                    continue
                _gradcheck_entry(info, sample, slow)
                checked += 1
    assert checked, f"{entry}: every sample was skipped"


# --- part 2: nothing raises, and the native failures are the expected ones ------------------

_EXPECTED_DIR = pathlib.Path(__file__).parent / "expected"


def _torch_minor() -> str:
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


@functools.lru_cache(maxsize=1)
def _expected_native_failures() -> dict[str, list[str]] | None:
    path = _EXPECTED_DIR / f"opinfo_native_failures_torch{_torch_minor()}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


@pytest.mark.parametrize("entry", sorted(_entries()))
def test_database_entry(request, entry):
    info = _entries()[entry]
    expected = _expected_native_failures()
    known_native_failure = expected is not None and any(entry in expected[mode] for mode in database.MODES)
    # Entries expected to fail natively are probed natively on every sample (it stops at the first
    # failure), so "now works natively" is exact in CI too.
    # NOT_FIXED entries are probed on every sample too: some fail only on later samples (normal).
    limit = None if (_slow(request.config) or entry in database.NOT_FIXED) else CI_PROBES
    report = database.probe_entry(info, limit, native_limit=None if known_native_failure else limit)
    if report.skipped:
        pytest.skip(f"{entry}: {report.skipped}")
    failing = {mode: report.fwdecomp[mode] for mode in database.MODES if report.fwdecomp[mode]}
    if entry in database.NOT_FIXED:
        assert failing, f"{entry} no longer fails: remove it from fwdecomp.database.NOT_FIXED"
    elif failing:
        raise AssertionError(f"{entry} fails with fwdecomp enabled: {failing}")
    if expected is None:
        pytest.skip(f"no expected native failures for torch {_torch_minor()}; see tests/expected/README.md")
    for mode in database.MODES:
        fails = report.native[mode] is not None
        if fails != (entry in expected[mode]):
            raise AssertionError(
                f"{entry} {'now fails' if fails else 'now works'} natively under {mode} on torch "
                f"{torch.__version__} ({report.native[mode]}); update "
                f"tests/expected/opinfo_native_failures_torch{_torch_minor()}.json (tests/expected/README.md)"
            )


def test_expected_list_names_real_entries():
    expected = _expected_native_failures()
    if expected is None:
        pytest.skip(f"no expected native failures for torch {_torch_minor()}")
    for mode in database.MODES:
        assert set(expected[mode]) <= set(_entries()), set(expected[mode]) - set(_entries())


def test_not_fixed_and_skips_name_real_entries():
    missing = (set(database.NOT_FIXED) | set(GRADCHECK_SKIPS)) - set(_entries())
    if missing and _expected_native_failures() is None:
        pytest.skip(f"torch {_torch_minor()}'s OpInfo database lacks {sorted(missing)} (newer entries)")
    assert not missing, missing
