"""Custom operators made forward-differentiable, by a decomposition or by a JVP rule.

Each operator of ``custom_op_zoo`` (one and several outputs, a ``Tensor[]``
and an optional argument, an optional output) gets a decomposition or a JVP
rule; its tangents under every transform are compared with central finite
differences in float64, and reverse mode with the operator's own backward.
"""

from __future__ import annotations

import pytest
import torch
from custom_op_zoo import (
    CALLS,
    close,
    expm1_and_grad_rule,
    f64,
    fd,
    forward_ad_jvp,
    ops,
    polar_decomposition,
    polar_rule,
    randn,
    scale_decomposition,
    sin_into_decomposition,
    softplus_decomposition,
    softplus_rule,
    weighted_sines_decomposition,
    weighted_sines_rule,
)
from torch.autograd import forward_ad
from torch.func import jacfwd, jvp, vmap

import fwdecomp


def _expm1_and_grad_decomposition(x, with_grad):
    return torch.expm1(x), (torch.exp(x) if with_grad else None)


REGISTRATIONS = {
    "decomposition": {
        "fwdtest::softplus": softplus_decomposition,
        "fwdtest::polar": polar_decomposition,
        "fwdtest::weighted_sines": weighted_sines_decomposition,
        "fwdtest::expm1_and_grad": _expm1_and_grad_decomposition,
    },
    "rule": {
        "fwdtest::softplus": softplus_rule,
        "fwdtest::polar": polar_rule,
        "fwdtest::weighted_sines": weighted_sines_rule,
        "fwdtest::expm1_and_grad": expm1_and_grad_rule,
    },
}


@pytest.fixture(params=list(REGISTRATIONS))
def registered(request, enabled):
    register = fwdecomp.register_decomposition if request.param == "decomposition" else fwdecomp.register_jvp
    for name, fn in REGISTRATIONS[request.param].items():
        register(name)(fn)
    return request.param


def _positive(*shape):
    return torch.rand(shape, dtype=f64) + 0.5


# name -> (function of tensors, input factory, whether the operator has a backward)
CASES = {
    "one output": (lambda x: ops.softplus(x, 1.5), lambda: [randn(2, 3)], True),
    "two outputs": (lambda r, t: ops.polar(r, t), lambda: [_positive(4), randn(4)], True),
    "Tensor[] and optional tensor": (
        lambda a, b, w: ops.weighted_sines([a, b], w, 0.7),
        lambda: [randn(3), randn(3), randn(2)],
        True,
    ),
    "optional tensor is None": (lambda a, b: ops.weighted_sines([a, b], None, 0.7), lambda: [randn(3), randn(3)], True),
    "optional output present": (lambda x: ops.expm1_and_grad(x, True), lambda: [randn(3)], False),
    "optional output None": (lambda x: ops.expm1_and_grad(x, False)[0], lambda: [randn(3)], False),
}
NAMES = pytest.mark.parametrize("name", list(CASES))


def _case(name):
    f, make, _ = CASES[name]
    xs = make()
    return f, xs, [torch.randn_like(x) for x in xs]


def _columns(f, xs):
    """The Jacobian of ``f`` by finite differences: per output, a (numel_out, total numel_in) matrix."""
    columns = []
    for index, x in enumerate(xs):
        for k in range(x.numel()):
            basis = [torch.zeros_like(z) for z in xs]
            basis[index].view(-1)[k] = 1
            column = fd(f, xs, basis)
            columns.append([c.reshape(-1) for c in (column if isinstance(column, tuple) else (column,))])
    return [torch.stack([col[o] for col in columns], 1) for o in range(len(columns[0]))]


def _flatten(blocks, f, xs):
    """jacfwd/jacobian blocks (per output, per input) as (numel_out, total numel_in) matrices."""
    outs = f(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    rows = blocks if isinstance(blocks[0], tuple) else (blocks,)
    return [torch.cat([b.reshape(out.numel(), x.numel()) for b, x in zip(row, xs)], 1) for out, row in zip(outs, rows)]


@NAMES
def test_forward_ad_and_jvp(registered, name):
    f, xs, vs = _case(name)
    expected = fd(f, xs, vs)
    close(forward_ad_jvp(f, xs, vs), expected)
    out, tangent = jvp(f, tuple(xs), tuple(vs))
    close(tangent, expected)
    close(out, f(*xs), 1e-15)


@NAMES
def test_jacfwd_matches_finite_differences_and_reverse_mode(registered, name):
    f, xs, _ = _case(name)
    argnums = tuple(range(len(xs)))
    forward = _flatten(jacfwd(f, argnums=argnums)(*xs), f, xs)
    close(tuple(forward), tuple(_columns(f, xs)))
    if CASES[name][2]:  # the operator's own backward agrees
        reverse = _flatten(torch.autograd.functional.jacobian(f, tuple(xs)), f, xs)
        close(tuple(forward), tuple(reverse))


@NAMES
def test_nested_jvp(registered, name):
    f, xs, us = _case(name)
    ws = [torch.randn_like(x) for x in xs]

    def directional(*zs):
        return jvp(f, zs, tuple(us))[1]

    _, second = jvp(directional, tuple(xs), tuple(ws))
    close(second, fd(directional, xs, ws, eps=1e-5), 1e-5)


@NAMES
def test_vmap_of_jvp(registered, name):
    f, xs, _ = _case(name)
    batches = [torch.randn(3, *x.shape, dtype=f64) for x in xs]
    got = vmap(lambda *vs: jvp(f, tuple(xs), vs)[1])(*batches)
    for i in range(3):
        expected = fd(f, xs, [b[i] for b in batches])
        close(tuple(g[i] for g in got) if isinstance(got, tuple) else got[i], expected)


@NAMES
def test_jvp_of_vmap(registered, name):
    f, xs, _ = _case(name)
    batched = [torch.randn(2, *x.shape, dtype=f64) for x in xs]
    tangents = [torch.randn_like(b) for b in batched]
    _, got = jvp(vmap(f), tuple(batched), tuple(tangents))
    for i in range(2):
        expected = fd(f, [b[i] for b in batched], [t[i] for t in tangents])
        close(tuple(g[i] for g in got) if isinstance(got, tuple) else got[i], expected)


@NAMES
def test_reverse_mode_through_the_jvp(registered, name):
    """A loss of the tangent, backpropagated (what consistency training does)."""
    f, xs, vs = _case(name)

    def loss(*zs):
        tangent = jvp(f, zs, tuple(vs))[1]
        return sum((t**2).sum() for t in (tangent if isinstance(tangent, tuple) else (tangent,)))

    leaves = [x.clone().requires_grad_() for x in xs]
    grads = torch.autograd.grad(loss(*leaves), leaves)
    for index, (x, g) in enumerate(zip(xs, grads)):
        directions = torch.eye(x.numel(), dtype=f64).reshape(x.numel(), *x.shape)
        expected = []
        for d in directions:
            shifted = [torch.zeros_like(z) for z in xs]
            shifted[index] = d
            expected.append(fd(loss, xs, shifted, eps=1e-5))
        close(g, torch.stack(expected).reshape(x.shape), 1e-5)


def test_forward_over_reverse_with_a_decomposition(enabled):
    """Hessian-vector products through a custom operator: forward AD over the decomposed backward graph."""
    fwdecomp.register_decomposition("fwdtest::polar")(polar_decomposition)

    def scalar(r, theta):
        x, y = ops.polar(r, theta)
        return (x**3 + x * y).sum()

    r, theta = _positive(4), randn(4)
    vr, vt = torch.randn_like(r), torch.randn_like(theta)

    def gradient(r, theta):
        with torch.enable_grad():
            leaves = [r.detach().requires_grad_(), theta.detach().requires_grad_()]
            return torch.autograd.grad(scalar(*leaves), leaves)

    leaves = [r.clone().requires_grad_(), theta.clone().requires_grad_()]
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(leaves[0], vr), forward_ad.make_dual(leaves[1], vt)]
        grads = torch.autograd.grad(scalar(*duals), duals, create_graph=True)
        hvp = tuple(forward_ad.unpack_dual(g).tangent for g in grads)
    close(hvp, fd(gradient, [r, theta], [vr, vt], eps=1e-5), 1e-5)


def test_torch_func_reverse_transforms_fail_on_custom_op_in_pytorch_itself():
    """PyTorch 2.13's custom_op/register_autograd does not work under torch.func.grad/jacrev/hessian
    (pytorch/pytorch#168393), with or without fwdecomp. When this starts failing, PyTorch fixed it:
    add torch.func.hessian through custom operators to the tests above and to the README."""
    x = randn(3)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda z: ops.softplus(z, 1.0).sum())(x)
    with fwdecomp.enabled():
        fwdecomp.register_decomposition("fwdtest::softplus")(softplus_decomposition)
        with pytest.raises(RuntimeError, match="setup_context"):
            torch.func.hessian(lambda z: ops.softplus(z, 1.0).sum())(x)


@pytest.mark.parametrize("kind", ["decomposition", "rule"])
def test_calls_without_tangents_run_the_users_kernel_and_backward(kind):
    x = randn(5).requires_grad_()
    reference = ops.softplus(x, 2.0)
    (reference_grad,) = torch.autograd.grad(reference.sum(), x)
    register = fwdecomp.register_decomposition if kind == "decomposition" else fwdecomp.register_jvp
    register("fwdtest::softplus")(softplus_decomposition if kind == "decomposition" else softplus_rule)
    with fwdecomp.enabled():
        before = CALLS["softplus"]
        out = ops.softplus(x, 2.0)
        assert CALLS["softplus"] == before + 1  # the user's kernel ran
        assert "GeneratedBackwardFor_fwdtest_softplus" in out.grad_fn.name()
        (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(out, reference) and torch.equal(grad, reference_grad)


def test_a_rule_runs_the_users_kernel_for_its_outputs(enabled):
    fwdecomp.register_jvp("fwdtest::softplus")(softplus_rule)
    x, v = randn(4), randn(4)
    before = CALLS["softplus"]
    out, _ = jvp(lambda z: ops.softplus(z, 1.0), (x,), (v,))
    assert CALLS["softplus"] == before + 1
    assert torch.equal(out, ops.softplus(x, 1.0))


def test_a_rule_keeps_the_users_backward_for_reverse_mode(enabled):
    fwdecomp.register_jvp("fwdtest::softplus")(softplus_rule)
    x, v = randn(4).requires_grad_(), randn(4)
    with forward_ad.dual_level():
        out = ops.softplus(forward_ad.make_dual(x, v), 1.0)
        assert "GeneratedBackwardFor_fwdtest_softplus" in str(out.grad_fn.next_functions)
        (grad,) = torch.autograd.grad(out.sum(), x)
    close(grad, torch.sigmoid(x.detach()))


# --- operators that write into their arguments ---------------------------


def test_mutated_argument_gets_its_tangent_updated(enabled):
    """A decomposition written with in-place operations updates the tangent with the value."""
    fwdecomp.register_decomposition("fwdtest::scale_")(scale_decomposition)
    x, v = randn(4), randn(4)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x.clone(), v.clone())  # the tangent is updated in place too
        ops.scale_(dual, 3.0)
        value, tangent = forward_ad.unpack_dual(dual)
    close(value, 3 * x)
    close(tangent, 3 * v)

    def scaled(z):
        y = z.clone()
        ops.scale_(y, 3.0)
        return y

    close(jvp(scaled, (x,), (v,))[1], fd(scaled, [x], [v]))


def test_written_output_argument_gains_a_tangent(enabled):
    fwdecomp.register_decomposition("fwdtest::sin_into")(sin_into_decomposition)
    x, v = randn(4), randn(4)
    out = torch.zeros(4, dtype=f64)
    with forward_ad.dual_level():
        ops.sin_into(forward_ad.make_dual(x, v), out)
        tangent = forward_ad.unpack_dual(out).tangent
    close(out, torch.sin(x))
    close(tangent, torch.cos(x) * v)

    def into(z):
        target = torch.zeros_like(z)
        ops.sin_into(z, target)
        return target

    close(jvp(into, (x,), (v,))[1], fd(into, [x], [v]))


def test_register_jvp_refuses_operators_that_write_into_arguments():
    with pytest.raises(ValueError, match=r"writes into its argument\(s\) x .*register a decomposition"):
        fwdecomp.register_jvp("fwdtest::scale_")(lambda primals, tangents: None)
    assert fwdecomp.jvp_rules.lookup(ops.scale_.default) is None
