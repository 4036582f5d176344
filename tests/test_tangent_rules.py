"""Tangent rules (fwdecomp.tangent_rules): the fused-kernel fast paths of built-in decompositions.

Every rule must give the decomposition's tangents on every sample, must run
where nothing records reverse mode (and only there), and must leave
forward-over-reverse, nested levels and vmap correct.
"""

from __future__ import annotations

import collections
import threading

import pytest
import torch
import torch.nn.functional as F
from numerics import close, fd, sample_forward_ad
from torch.autograd import forward_ad

import fwdecomp
from fwdecomp import jvp_rules, tangent_rules
from fwdecomp.checks import differentiable_positions, sample_function

aten = torch.ops.aten


def _ops_with_rules() -> list:
    return [op for op in fwdecomp.registry.operators() if tangent_rules.rule_of(fwdecomp.registry.lookup(op).fn)]


def _cases():
    for op in _ops_with_rules():
        for index, sample in enumerate(fwdecomp.registry.lookup(op).samples("cpu", torch.float64)):
            yield pytest.param(op, index, id=f"{op}-{index}-{sample.note}")


@pytest.fixture
def rule_calls(monkeypatch):
    """Counts, per operator, the calls a tangent rule answered (True) or declined (False)."""
    calls: collections.Counter = collections.Counter()
    run_rule = jvp_rules.run_rule

    def spy(op, stack, rule=None, **options):
        answered = run_rule(op, stack, rule, **options)
        calls[(op, answered)] += 1
        return answered

    monkeypatch.setattr(jvp_rules, "run_rule", spy)
    return calls


def test_some_builtin_decompositions_have_rules():
    names = {str(op) for op in _ops_with_rules()}
    assert {"aten.grid_sampler_2d.default", "aten._embedding_bag.default", "aten.mse_loss_backward.default"} <= names


@pytest.mark.parametrize("op, index", list(_cases()))
def test_rule_equals_decomposition(enabled, rule_calls, op, index):
    """Same outputs, same tangents with the rule and with the decomposition alone (float64; 1e-6 relative,
    since some kernels compute with float32 constants, hardsigmoid_backward's 1/6 say, that the
    decompositions do not)."""
    sample = list(fwdecomp.registry.lookup(op).samples("cpu", torch.float64))[index]
    fast = sample_forward_ad(op, sample)
    answered = rule_calls[(op, True)]
    with tangent_rules.disabled():
        slow = sample_forward_ad(op, sample)
    assert rule_calls[(op, True)] == answered  # disabled: the rule did not run
    for value, tangent, ref_value, ref_tangent in zip(*fast, *slow):
        torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=1e-9, equal_nan=True)
        if ref_tangent is None or (tangent is None and not ref_tangent.any()):
            continue  # no tangent, or an all-zero one where the rule gives none
        assert tangent is not None, "the rule dropped a tangent the decomposition gives"
        torch.testing.assert_close(tangent, ref_tangent, rtol=1e-6, atol=1e-9, equal_nan=True)


#: Rules that compute the values themselves, chunk by chunk beside the tangents (calling the
#: kernel as well would cost another primal): equal to the kernel's up to rounding, not bit for bit.
_VALUES_RECOMPUTED = {"torch_nn._linear_cross_entropy_batch_chunked_no_reduction.default"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_rule_outputs_are_the_kernels_bits(enabled, rule_calls, dtype):
    """A rule's outputs are PyTorch's own kernel's, bit for bit, on every sample it answers: fwdecomp changes
    tangents, never values (some rules rebuild the output from a unit-cotangent kernel pass,
    which relies on the kernel's last step being that product: a PyTorch change fails here)."""
    for op in _ops_with_rules():
        for sample in fwdecomp.registry.lookup(op).samples("cpu", dtype):
            answered = rule_calls[(op, True)]
            values, _ = sample_forward_ad(op, sample)
            if rule_calls[(op, True)] == answered:
                continue  # declined: the decomposition ran (its values are checked elsewhere)
            with torch.no_grad():
                plain = sample_function(op, sample)(*[sample.args[i] for i in differentiable_positions(sample)])
            for value, reference in zip(values, plain):
                if str(op) in _VALUES_RECOMPUTED:
                    torch.testing.assert_close(value, reference)
                    continue
                assert torch.equal(value, reference) or (
                    value.isnan().any() and torch.equal(value.nan_to_num(), reference.nan_to_num())
                ), f"{op} ({sample.note}): the output differs from the kernel's"


@pytest.mark.parametrize("threshold", [0, 1 << 40], ids=["loss tangent from the alphas", "from the kernel"])
def test_ctc_loss_rule_both_ways_equals_the_decomposition(enabled, rule_calls, monkeypatch, threshold):
    """The CTC rule takes the loss's tangent from the backward kernel on small problems and from the
    alphas' tangent on large ones: each way, on every sample, the decomposition's."""
    from fwdecomp.decompositions import ctc

    monkeypatch.setattr(ctc, "KERNEL_LOSS_TANGENT_MAX_NUMEL", threshold)
    for op in (aten._ctc_loss.default, aten._ctc_loss.Tensor):
        for sample in fwdecomp.registry.lookup(op).samples("cpu", torch.float64):
            answered = rule_calls[(op, True)]
            values, tangents = sample_forward_ad(op, sample)
            assert rule_calls[(op, True)] == answered + 1
            with tangent_rules.disabled():
                ref_values, ref_tangents = sample_forward_ad(op, sample)
            for got, want in zip([*values, *tangents], [*ref_values, *ref_tangents]):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9, equal_nan=True)


def test_each_rule_answers_some_sample(enabled, rule_calls):
    for op in _ops_with_rules():
        for sample in fwdecomp.registry.lookup(op).samples("cpu", torch.float64):
            sample_forward_ad(op, sample)
    silent = [str(op) for op in _ops_with_rules() if not rule_calls[(op, True)]]
    assert not silent, f"rules that never answered: {silent}"


def _grid_call():
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=gen)
    grid = torch.rand(2, 3, 2, 2, dtype=torch.float64, generator=gen) * 2.2 - 1.1
    return image, grid


def _grid_sample(image, grid):
    return F.grid_sample(image, grid, align_corners=False, padding_mode="border")


def test_rule_runs_only_where_reverse_mode_cannot_see(enabled, rule_calls):
    image, grid = _grid_call()
    op = aten.grid_sampler_2d.default

    def run(image, grid):
        with forward_ad.dual_level():
            _grid_sample(image, forward_ad.make_dual(grid, torch.ones_like(grid)))

    run(image, grid)
    assert rule_calls[(op, True)] == 1
    run(image.requires_grad_(), grid)  # recorded for reverse mode: the decomposition
    assert rule_calls[(op, True)] == 1
    with torch.no_grad():
        run(image, grid)  # nothing recorded
    assert rule_calls[(op, True)] == 2
    image = image.detach()
    torch.func.grad(lambda g: torch.func.jvp(lambda h: _grid_sample(image, h), (g,), (g,))[1].sum())(grid)
    assert rule_calls[(op, True)] == 2  # torch.func reverse mode around it
    torch.func.jvp(lambda g: _grid_sample(image, g), (grid,), (grid,))
    assert rule_calls[(op, True)] == 3


def test_forward_over_reverse_in_one_level(enabled):
    """Hessian-vector product inside one forward_ad level: the decomposition runs, tangents are right."""
    image, grid = _grid_call()
    v = torch.randn_like(grid)

    def gradient(g):
        with torch.enable_grad():
            g = g.detach().requires_grad_()
            return torch.autograd.grad(_grid_sample(image, g).pow(2).sum(), g)[0]

    with forward_ad.dual_level():
        dual = forward_ad.make_dual(grid, v).requires_grad_()
        (grad,) = torch.autograd.grad(_grid_sample(image, dual).pow(2).sum(), dual, create_graph=True)
        hvp = forward_ad.unpack_dual(grad).tangent
    close(hvp, fd(gradient, grid, v))


def test_jacfwd_and_nested_jvp_through_a_rule(enabled, rule_calls):
    image, grid = _grid_call()
    f = lambda g: _grid_sample(image, g)  # noqa: E731
    # reference: plain reverse mode (torch.func.jacrev of grid_sample w.r.t. the grid alone fails in torch 2.11)
    torch.testing.assert_close(torch.func.jacfwd(f)(grid), torch.autograd.functional.jacobian(f, grid))
    assert rule_calls[(aten.grid_sampler_2d.default, True)] >= 1
    v, w = torch.randn_like(grid), torch.randn_like(grid)
    # second directional derivative, forward over forward: the rule at the inner level,
    # and at the outer one the rule's own kernels differentiated
    second = torch.func.jvp(lambda g: torch.func.jvp(f, (g,), (v,))[1], (grid,), (w,))[1]
    close(second, fd(lambda g: torch.func.jvp(f, (g,), (v,))[1], grid, w))


def test_reverse_mode_through_the_jvp(enabled):
    """A loss of the JVP's tangent, backpropagated (consistency training): the decomposition runs."""
    image, grid = _grid_call()
    image.requires_grad_()
    _, tangent = torch.func.jvp(lambda g: _grid_sample(image, g), (grid,), (torch.ones_like(grid),))
    (got,) = torch.autograd.grad(tangent.pow(2).sum(), image)
    with tangent_rules.disabled():
        _, tangent = torch.func.jvp(lambda g: _grid_sample(image, g), (grid,), (torch.ones_like(grid),))
        (want,) = torch.autograd.grad(tangent.pow(2).sum(), image)
    close(got, want)


def test_disabled_is_per_thread_and_restores():
    assert tangent_rules.is_enabled()
    with tangent_rules.disabled():
        assert not tangent_rules.is_enabled()
        seen = []
        thread = threading.Thread(target=lambda: seen.append(tangent_rules.is_enabled()))
        thread.start()
        thread.join()
        assert seen == [True]
    assert tangent_rules.is_enabled()


def test_multilinear_names_the_operator_for_an_unknown_argument():
    with pytest.raises(ValueError, match=r"mse_loss_backward.*no argument.*'weight'"):
        tangent_rules.multilinear(aten.mse_loss_backward.default, (("weight",),))


def test_declined_case_runs_the_decomposition(enabled, rule_calls):
    x = torch.randn(4, 3, dtype=torch.float64)
    index = torch.tensor([0, 1, 1, 3])
    src = torch.randn(4, 3, dtype=torch.float64)
    src[1, 2] = 0.0  # prod with a zero factor: the rule's ratio formula does not apply
    with forward_ad.dual_level():
        out = torch.index_reduce(forward_ad.make_dual(x, torch.ones_like(x)), 0, index, src, "prod")
        assert forward_ad.unpack_dual(out).tangent is not None
    assert rule_calls[(aten.index_reduce.default, False)] == 1
    assert rule_calls[(aten.index_reduce.default, True)] == 0


def test_user_registration_replaces_the_rule(enabled, rule_calls):
    """A user's decomposition replaces the built-in entry, tangent rule included."""
    seen = []

    @fwdecomp.register_decomposition("aten::hardsigmoid_backward", replace=True)
    def mine(grad_output, self):
        seen.append(True)
        return torch.where((self > -3) & (self < 3), grad_output / 6, 0)

    g, x = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    torch.func.jvp(lambda g: aten.hardsigmoid_backward(g, x), (g,), (g,))
    assert seen and not rule_calls


def test_tangent_free_calls_skip_checks_at_their_level_only(enabled):
    """Inside a rule, calls at the rule's level skip the tangent checks; a call that does carry a
    tangent at another level (an outer torch.func.jvp) is still differentiated."""
    x = torch.randn(5, 3, dtype=torch.float64)
    with fwdecomp.autograd.tangent_free_calls():
        assert torch.equal(torch.pdist(x), aten._pdist_forward(x, 2.0))  # outside any level: plain
    v = torch.randn_like(x)
    with fwdecomp.autograd.tangent_free_calls():  # entered outside the level torch.func.jvp opens
        _, tangent = torch.func.jvp(lambda a: torch.pdist(a, p=1.0), (x,), (v,))
    close(tangent, fd(lambda a: torch.pdist(a, p=1.0), x, v))


def test_vmap_over_primals_through_rules(enabled):
    """vmap over primals and tangents of a JVP through rules (pdist and its backward, cholesky, soft margin,
    CTC, grid_sample) equals a loop,
    also when the rule's cached index tensors are first made inside the transforms."""
    from fwdecomp.decompositions import distance

    distance._cached_flat_pairs.cache_clear()
    gen = torch.Generator().manual_seed(0)
    x, v = (torch.randn(3, 7, 4, dtype=torch.float64, generator=gen) for _ in range(2))
    log_probs = torch.randn(3, 8, 2, 5, dtype=torch.float64, generator=gen).log_softmax(-1)
    targets = torch.tensor([[1, 2, 2], [3, 1, 0]])
    image = torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=gen)
    grids = torch.rand(3, 2, 3, 2, 2, dtype=torch.float64, generator=gen) * 2 - 1
    spd = torch.randn(3, 4, 4, dtype=torch.float64, generator=gen)
    spd = spd @ spd.mT + 4 * torch.eye(4, dtype=torch.float64)
    sym = torch.randn(3, 4, 4, dtype=torch.float64, generator=gen)
    pair_grad = torch.randn(21, dtype=torch.float64, generator=gen)
    grad_out, labels = torch.randn(7, 4, dtype=torch.float64, generator=gen), torch.sign(x[0])
    grid_out = torch.randn(2, 3, 3, 2, dtype=torch.float64, generator=gen)
    v_grids = torch.randn(grids.shape, dtype=torch.float64, generator=gen)
    cases = [
        (torch.pdist, x, v),
        (lambda a: aten.cholesky(a), spd, sym + sym.mT),
        (lambda a: aten._pdist_backward(pair_grad, a, 2.0, aten._pdist_forward(a, 2.0)), x, v),
        (lambda a: aten.soft_margin_loss_backward(grad_out, a, labels, 1), x, v),
        (lambda lp: aten._ctc_loss(lp, targets, [8, 7], [3, 2])[0], log_probs, torch.randn_like(log_probs)),
        (lambda g: _grid_sample(image, g), grids, torch.randn_like(grids)),
        (lambda g: aten.grid_sampler_2d_backward(grid_out, image, g, 0, 0, False, [True, True])[0], grids, v_grids),
        (lambda g: aten.grid_sampler_2d_backward(grid_out, image, g, 0, 1, True, [True, True])[1], grids, v_grids),
    ]
    for f, primals, tangents in cases:
        batched = torch.func.vmap(lambda p, t, f=f: torch.func.jvp(f, (p,), (t,))[1])(primals, tangents)
        for i in range(primals.shape[0]):
            close(batched[i], torch.func.jvp(f, (primals[i],), (tangents[i],))[1], 1e-12)


def test_rules_under_autocast_give_tangents_in_the_outputs_dtype(enabled):
    """Under CPU autocast a rule's matrix products run in bfloat16; its tangents still take their
    output's dtype (pdist's output stays float32), and stay close to the float32 JVP."""
    x, v = torch.randn(30, 3), torch.randn(30, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, tangent = torch.func.jvp(torch.pdist, (x,), (v,))
    assert out.dtype == tangent.dtype == torch.float32
    reference = torch.func.jvp(torch.pdist, (x,), (v,))[1]
    assert (tangent - reference).abs().max() <= 0.05 * reference.abs().max()


def test_grid_sampler_3d_backward_rule_answers_small_grids_only(enabled, rule_calls, monkeypatch):
    """The 3-D backward rule declines above GRID_3D_BACKWARD_RULE_MAX_LOCATIONS grid locations (the
    decomposition is as fast there); either way the tangents are the decomposition's."""
    from fwdecomp.decompositions import sampling

    op = aten.grid_sampler_3d_backward.default
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(1, 2, 3, 4, 3, dtype=torch.float64, generator=gen)
    grid = torch.rand(1, 2, 3, 2, 3, dtype=torch.float64, generator=gen) * 2.2 - 1.1  # 12 locations
    grad = torch.randn(1, 2, 2, 3, 2, dtype=torch.float64, generator=gen)
    primals = (grad, image, grid)
    directions = tuple(torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in primals)

    def f(*p):
        return op(*p, 0, 1, False, [True, True])

    results = {}
    for limit, answers in ((12, True), (11, False)):
        monkeypatch.setattr(sampling, "GRID_3D_BACKWARD_RULE_MAX_LOCATIONS", limit)
        before = rule_calls[(op, True)], rule_calls[(op, False)]
        results[limit] = torch.func.jvp(f, primals, directions)[1]
        assert (rule_calls[(op, True)] - before[0], rule_calls[(op, False)] - before[1]) == (
            (1, 0) if answers else (0, 1)
        )
    for ruled, decomposed in zip(results[12], results[11]):
        close(ruled, decomposed, 1e-12)


def test_grid_backward_kernel_asks_for_both_gradients_where_vmap_refuses_one():
    """torch 2.11's vmap batch rule of the grid-sampler backward fails on a left-out grad_input: the rule
    then asks for both (on torch 2.11 the jacfwd checks of tests/test_decompositions.py take this path)."""
    from fwdecomp.decompositions import sampling

    asked = []

    def kernel(*args):
        asked.append(args[-1])
        if args[-1] == [False, True]:
            raise RuntimeError("Expected a proper Tensor but got None")
        return "grad_input", "grad_grid"

    assert sampling._backward_kernel(kernel, 1, 2, input_mask=False) == ("grad_input", "grad_grid")
    assert asked == [[False, True], [True, True]]
    with pytest.raises(RuntimeError):  # a refusal with both asked for is the caller's error
        sampling._backward_kernel(lambda *args: (_ for _ in ()).throw(RuntimeError("bad")), 1, input_mask=True)


def _stacks():
    """(name, op, make_stack) where make_stack builds the stack inside the open forward-AD level."""
    x, t = torch.randn(3), torch.randn(3)
    leaf = torch.randn(3, requires_grad=True)
    cat = aten.cat.default
    hard = aten.hardsigmoid_backward.default
    yield "duals", hard, lambda: [forward_ad.make_dual(x, t), forward_ad.make_dual(x, t)]
    yield "one plain", hard, lambda: [forward_ad.make_dual(x, t), x]
    yield "primal requires grad", hard, lambda: [forward_ad.make_dual(leaf, t), x]
    yield "tangent requires grad", hard, lambda: [forward_ad.make_dual(x, leaf), x]
    yield "plain requires grad", hard, lambda: [forward_ad.make_dual(x, t), leaf]
    yield "list of tensors", cat, lambda: [[forward_ad.make_dual(x, t), x], 0]
    yield "list requiring grad", cat, lambda: [[forward_ad.make_dual(x, t), leaf], 0]


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("name, op, make_stack", list(_stacks()), ids=[s[0] for s in _stacks()])
def test_one_pass_split_agrees_with_the_general_checks(name, op, make_stack, grad_mode):
    """try_rule's one-pass split and checks give what split_tangents, reverse_mode_can_see and the
    legacy-vmap check give together."""
    with forward_ad.dual_level(), torch.set_grad_enabled(grad_mode):
        stack = make_stack()
        primals, tangents = jvp_rules.split_tangents(op._schema, stack)
        expected = None if tangent_rules.reverse_mode_can_see(primals, tangents) else (primals, tangents)
        got = tangent_rules._split_if_unseen(op._schema, stack)
        assert (got is None) == (expected is None)
        if got is not None:
            for ours, theirs in zip(got, expected):
                assert len(ours) == len(theirs)
                for a, b in zip(ours, theirs):
                    if isinstance(a, torch.Tensor):
                        assert torch.equal(a, b) and forward_ad.unpack_dual(a).tangent is None
                    else:
                        assert type(a) is type(b)
