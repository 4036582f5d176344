"""Shared fixtures: fwdecomp enabled per test, and the slow-sweep switch."""

from __future__ import annotations

import os

import pytest
import torch

import fwdecomp


def pytest_report_header(config: pytest.Config) -> str:
    """Which router the suite's kernels use (FWDECOMP_ROUTER; tests/test_router.py checks both)."""
    from fwdecomp import router

    return f"fwdecomp: {router.status()}"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run the full (slow) sweeps too")


def _graph_sweep_only(item: pytest.Item) -> bool:
    """Graph-backend runs of tests/test_decompositions.py left to --run-slow: the float32 samples and
    the gradchecks. In CI the graph backend's bitwise equivalence with the eager backend on every
    sample (tests/test_graph_backend.py) stands for them; its float64 samples run every JVP method
    (forward AD, jvp, jacfwd, reverse) against finite differences."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return (
        item.module.__name__ == "test_decompositions"
        and params.get("backend") == "graph"
        and (params.get("dtype") == torch.float32 or item.name.startswith("test_gradcheck"))
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow") or os.environ.get("FWDECOMP_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow sweep: run with --run-slow or FWDECOMP_SLOW=1")
    for item in items:
        if "slow" in item.keywords or _graph_sweep_only(item):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolation():
    """Every test starts and ends disabled, with the built-in decompositions, no JVP rules, the same backend."""
    saved = fwdecomp.registry.snapshot()
    saved_rules = fwdecomp.jvp_rules.snapshot()
    impl = fwdecomp.get_impl()
    torch.manual_seed(0)
    yield
    left_enabled = fwdecomp.is_enabled()
    fwdecomp.disable()
    fwdecomp.registry.restore(saved)
    fwdecomp.jvp_rules.restore(saved_rules)
    fwdecomp.set_impl(impl)
    assert not left_enabled, "the test left fwdecomp enabled"


@pytest.fixture(params=["eager", "graph"])
def backend(request):
    """The test runs once per decomposition backend (``fwdecomp.use_backend``)."""
    fwdecomp.use_backend(request.param)
    return request.param


@pytest.fixture
def enabled():
    """fwdecomp enabled for the duration of the test."""
    fwdecomp.enable()
    yield
    fwdecomp.disable()
