"""The graph backend: traced once per signature, cached, closed under forward AD, the same results as eager.

(The whole decomposition suite, tests/test_decompositions.py and
tests/test_transforms.py, also runs under both backends.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from registry_cases import sample_cases
from torch.autograd import forward_ad
from torch.utils._python_dispatch import TorchDispatchMode

import fwdecomp
from fwdecomp import tangent_rules
from fwdecomp.backends import graph
from fwdecomp.checks import differentiable_positions, sample_function
from fwdecomp.cli import main
from fwdecomp.closure import ClosureError, forward_route
from fwdecomp.decompositions._util import p_norm_gradient

aten = torch.ops.aten
f64 = torch.float64

OPAQUE_CALLS: list[int] = []


@torch.library.custom_op("fwdecomp_tests::opaque_square", mutates_args=())
def opaque_square(x: torch.Tensor) -> torch.Tensor:
    """A custom operator: no forward-AD formula, and fwdecomp has no decomposition for it."""
    OPAQUE_CALLS.append(1)
    return x * x


@opaque_square.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


OPAQUE = "fwdecomp_tests::opaque_square"


@pytest.fixture
def graph_backend(enabled):
    """fwdecomp enabled with the graph backend, an empty cache, default settings, tangent rules off
    (these tests are about tracing decompositions; test_tangent_rule_runs_instead_of_a_graph is not)."""
    fwdecomp.use_backend("graph")
    graph.cache_clear()
    with tangent_rules.disabled():
        yield graph.default_backend()
    graph.configure(cache_size=256, tracing_mode="fake")
    graph.cache_clear()


def _jvp(op, sample):
    positions = differentiable_positions(sample)
    primals = tuple(sample.args[i] for i in positions)
    gen = torch.Generator().manual_seed(0)
    tangents = tuple(torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in primals)
    return torch.func.jvp(sample_function(op, sample, positions), primals, tangents)


@pytest.mark.parametrize("op, dtype, index", list(sample_cases()))
def test_graph_gives_the_eager_results(enabled, op, dtype, index):
    """Outputs and tangents of every sample agree with the eager backend to rounding (in fact bitwise, today).

    Tangent rules off: both backends run the decomposition (the graph backend traces it);
    tests/test_tangent_rules.py checks the rules against the decompositions."""
    sample = list(fwdecomp.registry.lookup(op).samples("cpu", dtype))[index]
    with tangent_rules.disabled():
        fwdecomp.use_backend("eager")
        eager = _jvp(op, sample)
        fwdecomp.use_backend("graph")
        traced = _jvp(op, sample)
    # a decomposition with data-dependent control flow runs eagerly (audit --closure lists them)
    assert any(e.op == op and e.kind in ("graph", "eager") for e in graph.default_backend().entries())
    eps = torch.finfo(dtype).eps
    for got, want in zip(traced[0] + traced[1], eager[0] + eager[1]):
        torch.testing.assert_close(got, want, rtol=16 * eps, atol=16 * eps)


# --- the cache -----------------------------------------------------------------------


def test_traced_once_per_signature(graph_backend):
    x = torch.randn(6, 3, dtype=f64)
    for _ in range(3):
        torch.func.jvp(torch.pdist, (x,), (x,))
    info = graph.cache_info()
    assert (info.misses, info.hits, info.graphs) == (1, 2, 1)
    torch.func.jvp(torch.pdist, (torch.randn(7, 3, dtype=f64),), (torch.randn(7, 3, dtype=f64),))  # shape
    torch.func.jvp(lambda a: torch.pdist(a, p=1.0), (x,), (x,))  # non-tensor argument
    torch.func.jvp(torch.pdist, (x.float(),), (x.float(),))  # dtype
    y = torch.randn(4, 3, dtype=f64)
    torch.func.jvp(lambda b: torch.cdist(x, b), (y,), (y,))  # tangent on the second input
    torch.func.jvp(lambda a: torch.cdist(a, y), (x,), (x,))  # ... or the first: the same graph
    info = graph.cache_info()
    assert (info.misses, info.hits, info.graphs) == (5, 3, 5)


def test_strides_are_part_of_the_signature(graph_backend):
    y = torch.randn(4, 3, dtype=f64)
    x = torch.randn(5, 3, dtype=f64)
    x_t = torch.randn(3, 5, dtype=f64).mT
    torch.func.jvp(lambda a: torch.cdist(a, y, p=1.5), (x,), (x,))
    _, t2 = torch.func.jvp(lambda a: torch.cdist(a, y, p=1.5), (x_t,), (x_t,))
    assert graph.cache_info().misses == 2
    fwdecomp.use_backend("eager")
    _, e2 = torch.func.jvp(lambda a: torch.cdist(a, y, p=1.5), (x_t,), (x_t,))
    assert torch.equal(t2, e2)


def test_cache_is_a_bounded_lru(graph_backend):
    graph.configure(cache_size=2)
    xs = [torch.randn(n, 3, dtype=f64) for n in (4, 5, 6)]
    for x in xs:
        torch.func.jvp(torch.pdist, (x,), (x,))
    info = graph.cache_info()
    assert info.currsize == 2 and info.maxsize == 2 and info.misses == 3
    torch.func.jvp(torch.pdist, (xs[2],), (xs[2],))  # most recent: kept
    assert graph.cache_info().hits == 1
    torch.func.jvp(torch.pdist, (xs[0],), (xs[0],))  # least recent: evicted
    assert graph.cache_info().misses == 4
    graph.cache_clear()
    assert graph.cache_info() == graph.CacheInfo(0, 0, 2, 0, 0, 0, 0)


def test_stored_constants_have_a_budget(graph_backend, monkeypatch):
    monkeypatch.setattr(graph, "CONSTANT_BUDGET_BYTES", 500)  # pdist's constants: 112 to 352 bytes for 4 to 7 rows
    for n in (4, 5, 6, 7):
        x = torch.randn(n, 3, dtype=f64)
        torch.func.jvp(torch.pdist, (x,), (x,))
    entries = graph.default_backend().entries()
    assert 1 <= len(entries) < 4 and sum(e.constant_bytes for e in entries) <= 500
    assert entries[-1].call.startswith("aten::_pdist_forward(self=float64[7, 3]")  # the newest stays


def test_configure_validates():
    with pytest.raises(ValueError, match="cache_size must be a positive int"):
        graph.configure(cache_size=0)
    with pytest.raises(ValueError, match="'real' is not offered"):
        graph.configure(tracing_mode="real")
    assert graph.cache_info().maxsize == 256


def test_registering_a_decomposition_invalidates_graphs(graph_backend):
    x = torch.randn(5, 3, dtype=f64)
    _, before = torch.func.jvp(torch.pdist, (x,), (x,))
    assert graph.cache_info().currsize == 1

    @fwdecomp.register_decomposition("aten::_pdist_forward", replace=True)
    def doubled(self, p=2.0):
        return 2 * fwdecomp.decompositions.distance.pdist_forward(self, p)

    assert graph.cache_info().currsize == 0
    _, after = torch.func.jvp(torch.pdist, (x,), (x,))
    assert torch.allclose(after, 2 * before)


def test_concurrent_calls_from_threads(graph_backend):
    """Threads trace and hit the cache at once; every result is right and every call is counted."""
    backend = graph.default_backend()
    op = aten._pdist_forward.default
    inputs = [torch.randn(n, 3, dtype=f64) for n in (3, 4, 5, 6)]
    errors = []

    def worker(index: int) -> None:
        try:
            for step in range(12):
                x = inputs[(index + step) % len(inputs)]
                stack = [x, 2.0]
                with tangent_rules.disabled():  # per thread, like the fixture's
                    backend.run_decomposition(op, stack)
                if not torch.allclose(stack[0], torch.pdist(x)):
                    errors.append("wrong result")
        except Exception as error:  # pragma: no cover - reported below
            errors.append(repr(error))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    info = graph.cache_info()
    assert info.hits + info.misses == 48 and info.graphs == 4


# --- closure -------------------------------------------------------------------------


def test_forward_route():
    assert forward_route(aten.mul.Tensor).kind == "formula"
    assert forward_route(aten.copy_.default).kind == "formula"  # differentiated by hand
    assert forward_route(aten.argmax.default).kind == "no tangent"
    assert forward_route(aten.zeros_like.default).kind == "no tangent"
    assert forward_route(aten.detach.default).kind == "no tangent"
    assert forward_route(aten._cdist_forward.default).kind == "decomposition"
    fwdecomp.register_jvp("aten::_cdist_forward")(_cdist_rule([]))
    assert forward_route(aten._cdist_forward.default).kind == "rule"  # the rule wins
    fwdecomp.unregister_jvp("aten::_cdist_forward")
    custom = forward_route(torch.ops.fwdecomp_tests.opaque_square.default)
    assert custom.kind == "open" and "custom operators" in custom.reason
    fwdecomp.unregister_decomposition("aten::_cdist_forward")
    assert forward_route(aten._cdist_forward.default).kind == "open"
    fwdecomp.unregister_decomposition("aten::_scaled_dot_product_flash_attention_for_cpu_backward")
    route = forward_route(aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
    assert route.kind == "open" and "not in derivatives.yaml" in route.reason


def test_open_decomposition_is_refused_before_any_jvp_runs(graph_backend):
    @fwdecomp.register_decomposition("aten::_pdist_forward", replace=True)
    def pdist(self, p=2.0):
        return fwdecomp.decompositions.distance.pdist_forward(opaque_square(self), p)

    x = torch.randn(5, 3, dtype=f64)
    OPAQUE_CALLS.clear()
    for _ in range(2):  # the refusal is cached, and raised again
        with pytest.raises(ClosureError) as info:
            torch.func.jvp(torch.pdist, (x,), (x,))
    error = info.value
    assert error.path == ("aten::_pdist_forward", OPAQUE)
    assert f"aten::_pdist_forward -> {OPAQUE}" in str(error)
    assert "test_graph_backend.py" in error.location  # the line of the decomposition
    assert "register_decomposition" in str(error)
    assert isinstance(error, fwdecomp.DecompositionError)
    assert not OPAQUE_CALLS  # nothing ran: the check happened while tracing
    info = graph.cache_info()
    assert (info.refused, info.misses, info.hits) == (1, 1, 1)


def test_closure_path_through_an_inlined_decomposition(graph_backend):
    @fwdecomp.register_decomposition("aten::_euclidean_dist", replace=True)
    def euclidean(x1, x2):
        return aten._cdist_forward(x1, x2, 2.0, 2)

    @fwdecomp.register_decomposition("aten::_cdist_forward", replace=True)
    def cdist(x1, x2, p, compute_mode):
        return fwdecomp.decompositions.distance.cdist_forward(opaque_square(x1), x2, p, compute_mode)

    x, y = torch.randn(30, 3, dtype=f64), torch.randn(27, 3, dtype=f64)
    with pytest.raises(ClosureError) as info:
        torch.func.jvp(lambda a: torch.cdist(a, y), (x,), (x,))
    assert info.value.path == ("aten::_euclidean_dist", "aten::_cdist_forward", OPAQUE)


def test_routed_operator_inside_a_decomposition_is_inlined(graph_backend):
    @fwdecomp.register_decomposition("aten::_euclidean_dist", replace=True)
    def euclidean(x1, x2):
        return aten._cdist_forward(x1, x2, 2.0, 2)  # fwdecomp routes _cdist_forward too

    x, y, v = torch.randn(30, 3, dtype=f64), torch.randn(27, 3, dtype=f64), torch.randn(30, 3, dtype=f64)
    _, tangent = torch.func.jvp(lambda a: torch.cdist(a, y), (x,), (v,))
    eps = 1e-6
    expected = (torch.cdist(x + eps * v, y) - torch.cdist(x - eps * v, y)) / (2 * eps)
    assert torch.allclose(tangent, expected, atol=1e-6)
    explanation = fwdecomp.explain("aten::_euclidean_dist", x, y)
    assert explanation.inlined == {"aten::_cdist_forward": 1}
    assert "aten::_cdist_forward" not in explanation.operators  # its parts run instead


def test_operator_without_formula_off_the_tangent_path_is_accepted(graph_backend):
    @fwdecomp.register_decomposition("aten::_pdist_forward", replace=True)
    def pdist(self, p=2.0):
        shift = opaque_square(self.detach()).sum() * 0  # no tangent reaches the custom operator
        return fwdecomp.decompositions.distance.pdist_forward(self, p) + shift

    x = torch.randn(5, 3, dtype=f64)
    OPAQUE_CALLS.clear()
    _, tangent = torch.func.jvp(torch.pdist, (x,), (x,))
    assert torch.allclose(tangent, torch.pdist(x))  # distances are 1-homogeneous
    assert OPAQUE_CALLS and graph.cache_info().graphs == 1


def _cdist_rule(calls):
    """A JVP rule for ``_cdist_forward``: the kernel's output, and the derivative of the p-norm."""

    def rule(primals, tangents):
        x1, x2, p, mode = primals
        dx1, dx2 = (t if t is not None else torch.zeros_like(x) for t, x in zip(tangents[:2], (x1, x2)))
        calls.append(1)
        out = aten._cdist_forward(x1, x2, p, mode)
        gradient = p_norm_gradient(x1.unsqueeze(-2) - x2.unsqueeze(-3), out, p)
        return out, (gradient * (dx1.unsqueeze(-2) - dx2.unsqueeze(-3))).sum(-1)

    return rule


def test_an_operator_with_a_jvp_rule_takes_the_eager_path(graph_backend):
    calls = []
    fwdecomp.register_jvp("aten::_cdist_forward")(_cdist_rule(calls))
    x, y = torch.randn(5, 3, dtype=f64), torch.randn(4, 3, dtype=f64)
    _, tangent = torch.func.jvp(lambda a: torch.cdist(a, y, p=1.5), (x,), (x,))
    assert calls and graph.cache_info().misses == 0  # the rule ran; nothing was traced
    fwdecomp.unregister_jvp("aten::_cdist_forward")
    _, traced = torch.func.jvp(lambda a: torch.cdist(a, y, p=1.5), (x,), (x,))
    assert graph.cache_info().graphs == 1 and torch.allclose(tangent, traced)


def test_an_operator_with_a_jvp_rule_stays_a_node_of_the_graph(graph_backend):
    @fwdecomp.register_decomposition("aten::_euclidean_dist", replace=True)
    def euclidean(x1, x2):
        return aten._cdist_forward(x1, x2, 2.0, 2)

    calls = []
    fwdecomp.register_jvp("aten::_cdist_forward")(_cdist_rule(calls))
    x, y, v = torch.randn(30, 3, dtype=f64), torch.randn(27, 3, dtype=f64), torch.randn(30, 3, dtype=f64)
    explanation = fwdecomp.explain("aten::_euclidean_dist", x, y)
    assert explanation.operators == {"aten::_cdist_forward": "rule"} and not explanation.inlined
    _, tangent = torch.func.jvp(lambda a: torch.cdist(a, y), (x,), (v,))
    assert calls and graph.cache_info().graphs == 1  # the graph called the operator; fwdecomp ran the rule
    eps = 1e-6
    expected = (torch.cdist(x + eps * v, y) - torch.cdist(x - eps * v, y)) / (2 * eps)
    assert torch.allclose(tangent, expected, atol=1e-6)


# --- what the graph does not capture ---------------------------------------------------------


def test_data_dependent_decomposition_runs_eagerly(graph_backend):
    @fwdecomp.register_decomposition("aten::_pdist_forward", replace=True)
    def pdist(self, p=2.0):
        if bool((self == 0).all()):  # control flow on values: no graph can hold it
            return self.new_zeros(self.shape[0] * (self.shape[0] - 1) // 2)
        return fwdecomp.decompositions.distance.pdist_forward(self, p)

    x = torch.randn(5, 3, dtype=f64)
    for _ in range(2):
        _, tangent = torch.func.jvp(torch.pdist, (x,), (x,))
    assert torch.allclose(tangent, torch.pdist(x))
    (entry,) = graph.default_backend().entries()
    assert entry.kind == "eager" and "DataDependent" in entry.reason
    assert graph.cache_info().hits == 1  # the verdict is cached
    explanation = fwdecomp.explain("aten::_pdist_forward", x)
    assert explanation.graph is None and "runs the eager decomposition" in str(explanation)


def test_bad_input_raises_as_with_the_eager_backend(enabled):
    x = torch.randn(3, 5, dtype=f64).mT  # _pdist_forward requires contiguous input
    messages = []
    for backend in ("eager", "graph"):
        fwdecomp.use_backend(backend)
        with pytest.raises(fwdecomp.DecompositionError) as info:
            torch.func.jvp(lambda a: aten._pdist_forward(a, 2.0), (x,), (x,))
        messages.append(str(info.value))
    assert messages[0] == messages[1] and "contiguous" in messages[0]


def test_a_graph_that_fails_where_eager_runs_gives_way_to_eager(graph_backend):
    x = torch.randn(5, 3, dtype=f64)
    _, expected = torch.func.jvp(torch.pdist, (x,), (x,))
    (entry,) = graph.default_backend().entries()

    def broken(*tensors):  # stands for a graph a batching rule cannot run
        raise RuntimeError("view size is not compatible with input tensor's size and stride")

    entry.forward = broken
    _, tangent = torch.func.jvp(torch.pdist, (x,), (x,))
    assert torch.equal(tangent, expected)
    assert entry.kind == "eager" and "view size is not compatible" in entry.reason
    _, tangent = torch.func.jvp(torch.pdist, (x,), (x,))  # eager from now on
    assert torch.equal(tangent, expected) and graph.cache_info().eager == 1


def test_contract_is_checked_once_per_signature(graph_backend, monkeypatch):
    checks = []
    real_check = graph.check_results
    monkeypatch.setattr(graph, "check_results", lambda *a: checks.append(1) or real_check(*a))
    x = torch.randn(5, 3, dtype=f64)
    for _ in range(3):
        torch.func.jvp(torch.pdist, (x,), (x,))
    assert len(checks) == 1

    @fwdecomp.register_decomposition("aten::_pdist_forward", replace=True)
    def wrong(self, p=2.0):
        return fwdecomp.decompositions.distance.pdist_forward(self, p)[:-1]

    with pytest.raises(fwdecomp.DecompositionError, match="returned output 0 with"):
        torch.func.jvp(torch.pdist, (x,), (x,))


def test_calls_under_a_user_dispatch_mode_take_the_eager_path(graph_backend):
    class Counting(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counting.calls += 1
            return func(*args, **(kwargs or {}))

    x, y = torch.randn(5, 3), torch.randn(4, 3)
    with Counting():
        _, t1 = torch.func.jvp(lambda a: torch.cdist(a, y, p=1.5), (x,), (x,))
    assert Counting.calls > 0 and graph.cache_info().misses == 0
    _, t2 = torch.func.jvp(lambda a: torch.cdist(a, y, p=1.5), (x,), (x,))
    assert torch.equal(t1, t2) and graph.cache_info().graphs == 1


@pytest.mark.usefixtures("graph_backend")
def test_autocast_treats_the_graph_as_the_eager_decomposition():
    """No cast is traced into the graph; at run time autocast casts its matmul as it does eagerly."""
    x, y, v = torch.randn(30, 3), torch.randn(27, 3), torch.randn(30, 3)
    results = []
    for backend in ("eager", "graph", "graph"):
        fwdecomp.use_backend(backend)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(torch.func.jvp(lambda a: aten._euclidean_dist(a, y), (x,), (v,)))
        results.append(torch.func.jvp(lambda a: aten._euclidean_dist(a, y), (x,), (v,)))
    assert not torch.equal(results[0][0], results[1][0])  # autocast changed the eager result
    for eager, traced in ((results[0], results[2]), (results[1], results[3]), (results[0], results[4])):
        assert all(torch.equal(a, b) for a, b in zip(eager, traced))
    assert graph.cache_info().graphs == 1


def test_meta_tensors(graph_backend):
    x, y = torch.empty(5, 3, device="meta"), torch.empty(4, 3, device="meta")
    out, tangent = torch.func.jvp(lambda a: torch.cdist(a, y, p=1.5), (x,), (x,))
    assert out.device.type == "meta" and tangent.shape == (5, 4) and graph.cache_info().graphs == 1


# --- run-time simplifications --------------------------------------------------------------


def test_input_independent_tensors_are_computed_once(graph_backend):
    explanation = fwdecomp.explain("aten::_pdist_forward", torch.randn(6, 3))
    assert explanation.folded >= 2  # the two index vectors of triu_indices
    assert "aten::triu_indices" not in explanation.operators


def test_a_returned_constant_is_a_fresh_tensor_each_call(graph_backend):
    @fwdecomp.register_decomposition("aten::_pdist_forward", replace=True)
    def zeros(self, p=2.0):
        n = self.shape[0]
        return torch.zeros(n * (n - 1) // 2, dtype=self.dtype)

    x = torch.randn(4, 3, dtype=f64)
    with forward_ad.dual_level():
        first = torch.pdist(forward_ad.make_dual(x, x))
        first.add_(1)  # the caller owns its result
        second = torch.pdist(forward_ad.make_dual(x, x))
    assert torch.equal(second, torch.zeros(6, dtype=f64))


def test_random_operators_run_every_call(graph_backend):
    @fwdecomp.register_decomposition("aten::_pdist_forward", replace=True)
    def noisy(self, p=2.0):
        n = self.shape[0]
        return fwdecomp.decompositions.distance.pdist_forward(self, p) + torch.rand(n * (n - 1) // 2)

    x = torch.randn(4, 3)
    first, _ = torch.func.jvp(torch.pdist, (x,), (x,))
    second, _ = torch.func.jvp(torch.pdist, (x,), (x,))
    assert graph.cache_info().hits == 1 and not torch.equal(first, second)


def test_arithmetic_with_python_numbers_uses_scalar_overloads(graph_backend):
    @fwdecomp.register_decomposition("aten::_pdist_forward", replace=True)
    def scaled(self, p=2.0):
        return (fwdecomp.decompositions.distance.pdist_forward(self, p) * 2.0 + 1) / 4 - 0.5

    x, v = torch.randn(5, 3, dtype=f64), torch.randn(5, 3, dtype=f64)
    explanation = fwdecomp.explain("aten::_pdist_forward", x)
    assert {"aten::mul.Scalar", "aten::add.Scalar", "aten::div.Scalar", "aten::sub.Scalar"} <= set(
        explanation.operators
    )
    for node in explanation.graph.graph.nodes:  # what is left of the .Tensor overloads multiplies tensors
        if node.target in (aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor):
            assert all(isinstance(arg, torch.fx.Node) for arg in node.args), node.format_node()
    traced = torch.func.jvp(torch.pdist, (x,), (v,))
    fwdecomp.use_backend("eager")
    eager = torch.func.jvp(torch.pdist, (x,), (v,))
    assert all(torch.equal(a, b) for a, b in zip(traced, eager))


# --- symbolic shapes -----------------------------------------------------------------------


def test_symbolic_tracing_serves_many_shapes_with_one_graph(graph_backend):
    graph.configure(tracing_mode="symbolic")
    y = torch.randn(4, 3, dtype=f64)
    results = []
    for rows in (5, 7, 9, 30):  # 30 rows takes PyTorch's matrix-multiply route: a guard fails
        x, v = torch.randn(rows, 3, dtype=f64), torch.randn(rows, 3, dtype=f64)
        fwdecomp.use_backend("graph")
        results.append(
            torch.func.jvp(
                lambda a: torch.cdist(a, y, p=2.0, compute_mode="use_mm_for_euclid_dist_if_necessary"), (x,), (v,)
            )
        )
        fwdecomp.use_backend("eager")
        expected = torch.func.jvp(
            lambda a: torch.cdist(a, y, p=2.0, compute_mode="use_mm_for_euclid_dist_if_necessary"), (x,), (v,)
        )
        for got, want in zip(results[-1], expected):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    info = graph.cache_info()
    assert info.graphs < 4 and info.hits >= 2
    entries = graph.default_backend().entries()
    assert all(e.guards for e in entries)


def test_symbolic_tracing_matches_eager_on_attention(graph_backend):
    graph.configure(tracing_mode="symbolic")
    for length in (5, 6, 8):
        q, k, v = (torch.randn(1, 2, length, 4, dtype=f64) for _ in range(3))

        def f(q, k=k, v=v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

        fwdecomp.use_backend("graph")
        got = torch.func.jvp(f, (q,), (k,))
        fwdecomp.use_backend("eager")
        want = torch.func.jvp(f, (q,), (k,))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert graph.cache_info().hits >= 1


# --- choosing a backend, explain, audit ----------------------------------------------------------


def test_use_backend():
    assert fwdecomp.current_backend() == "eager"
    fwdecomp.use_backend("graph")
    assert fwdecomp.current_backend() == "graph" and fwdecomp.get_impl() is graph.default_backend()
    fwdecomp.use_backend("eager")
    assert fwdecomp.current_backend() == "eager"
    with pytest.raises(ValueError, match="unknown backend 'jit'; choose one of 'eager', 'graph'"):
        fwdecomp.use_backend("jit")


def test_import_imports_but_does_not_install_the_graph_backend():
    code = textwrap.dedent(
        """
        import sys, fwdecomp
        assert "fwdecomp.backends.graph" in sys.modules
        assert fwdecomp.current_backend() == "eager", fwdecomp.get_impl()
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_explain():
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    explanation = fwdecomp.explain(aten._scaled_dot_product_flash_attention_for_cpu, q, k, v, is_causal=True)
    text = str(explanation)
    assert text.startswith("aten::_scaled_dot_product_flash_attention_for_cpu(query=float32[1, 2, 5, 4], key=")
    assert "closed under forward AD" in text and "def forward" in text and "aten.bmm" in text
    assert explanation.operators["aten::detach"] == "no tangent"
    assert isinstance(explanation.graph, torch.fx.GraphModule)
    with pytest.raises(NotImplementedError, match=r"no decomposition is registered for aten::mul\.Tensor"):
        fwdecomp.explain(aten.mul.Tensor, q, q)


def test_audit_closure(capsys):
    assert main(["audit", "--closure", "--limit", "2"]) == 0
    text = capsys.readouterr().out
    for op in fwdecomp.registry.operators():
        line = next(line for line in text.splitlines() if line.startswith(str(fwdecomp.registry.lookup(op).name) + " "))
        assert any(f" {verdict} " in line for verdict in ("closed", "mixed", "eager")), line  # none open
    assert " closed " in text and "0 open" in text


def test_audit_closure_reports_the_open_path(capsys):
    samples = fwdecomp.registry.lookup(aten.cholesky.default).samples

    @fwdecomp.register_decomposition("aten::cholesky", replace=True, samples=samples)
    def cholesky(self, upper=False):
        return torch.linalg.cholesky(opaque_square(self), upper=upper)

    assert main(["audit", "--closure", "--limit", "1", "--format", "json"]) == 1
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)["closure"]}
    assert rows["aten::cholesky"]["verdict"] == "open"
    assert rows["aten::cholesky"]["detail"].startswith(f"aten::cholesky -> {OPAQUE}:")
    assert rows["aten::_pdist_forward"]["verdict"] == "closed"


def test_readme_backends_example_prints_what_it_says():
    import contextlib
    import io
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Backends\n", 1)[1].split("\n## ", 1)[0]
    program = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    printed = re.findall(r"```\n(aten::.*?)```", section, flags=re.S)[0]
    program = program.replace("graph.cache_info()", "print(graph.cache_info())", 1)
    graph.cache_clear()
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):
            exec(compile(program, "README.md", "exec"), {})
    finally:
        graph.configure(cache_size=256, tracing_mode="fake")
    cache_line, *explanation = output.getvalue().splitlines()
    assert cache_line == re.search(r"# (CacheInfo\(.*\))", program).group(1)
    assert "\n".join(explanation) == printed.rstrip("\n")


def test_tangent_rule_runs_instead_of_a_graph(enabled):
    """Where a tangent rule applies, the graph backend runs it (nothing is traced); elsewhere it traces."""
    fwdecomp.use_backend("graph")
    graph.cache_clear()
    x = torch.randn(6, 3, dtype=f64)
    with tangent_rules.disabled():
        _, traced = torch.func.jvp(torch.pdist, (x,), (x,))
    assert graph.cache_info().graphs == 1
    _, fast = torch.func.jvp(torch.pdist, (x,), (x,))  # p = 2: the rule, no new graph, no cache hit
    info = graph.cache_info()
    assert (info.graphs, info.hits) == (1, 0)
    torch.testing.assert_close(fast, traced)


def test_a_failed_trace_logs_nothing_and_leaves_the_logger_as_it_was(enabled):
    """Fake tensors log an error with a traceback when a kernel fails while tracing (here attention's
    ``_fw_primal`` split, which runs eagerly): the graph backend expects such failures, so that log
    is silenced in the tracing thread while it traces, and PyTorch's logger is given back unchanged."""
    import logging

    class Records(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    logger = logging.getLogger("torch._subclasses.fake_tensor")  # torch's loggers do not propagate
    filters = list(logger.filters)
    records = Records()
    logger.addHandler(records)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    q = torch.randn(1, 2, 3, 4)
    fwdecomp.use_backend("graph")
    try:
        graph.cache_clear()
        with forward_ad.dual_level():
            out = op(forward_ad.make_dual(q, torch.ones_like(q)), q, q)[0]
            assert forward_ad.unpack_dual(out).tangent is not None
        entry = next(e for e in graph.default_backend().entries() if e.op == op)
        assert entry.kind == "eager" and "_fw_primal" in entry.reason
        assert records.messages == []
        assert logger.filters == filters
        logger.error("after tracing: logged as before")
        assert records.messages == ["after tracing: logged as before"]
    finally:
        fwdecomp.use_backend("eager")
        logger.removeHandler(records)
