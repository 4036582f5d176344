"""register_jvp: validation at registration, what a rule receives and must return, precedence,
a rule on an aten operator (cholesky) under every transform, and running rules from another backend."""

from __future__ import annotations

import pytest
import torch
from custom_op_zoo import (
    close,
    expm1_and_grad_rule,
    f64,
    fd,
    forward_ad_jvp,
    fresh_namespace,
    ops,
    polar_decomposition,
    polar_rule,
    randn,
    softplus_decomposition,
    softplus_rule,
)
from torch.autograd import forward_ad
from torch.func import hessian, jacfwd, jvp, vmap

import fwdecomp
from fwdecomp import _torch, jvp_rules
from fwdecomp.contract import DecompositionError, SignatureMismatchError
from fwdecomp.interface import DecompositionInterface, get_impl, set_impl
from fwdecomp.overloads import UnknownOperatorError

aten = torch.ops.aten


# --- registration -----------------------------------------------------------


@pytest.mark.parametrize(
    "rule, fragment",
    [
        (lambda primals: None, "must accept two positional arguments"),
        (lambda primals, tangents, extra: None, "must accept two positional arguments"),
        ("not callable", "must be callable"),
    ],
)
def test_rule_signature_is_checked(rule, fragment):
    with pytest.raises(SignatureMismatchError, match=fragment):
        fwdecomp.register_jvp("fwdtest::softplus")(rule)
    assert jvp_rules.lookup(ops.softplus.default) is None


def test_flexible_rule_signatures_are_accepted():
    fwdecomp.register_jvp("fwdtest::softplus")(lambda *pair: None)
    fwdecomp.register_jvp("fwdtest::softplus", replace=True)(lambda primals, tangents, scale=1.0: None)


def test_unsupported_schemas_are_refused():
    ns = fresh_namespace()
    lib = torch.library.Library(ns, "FRAGMENT")
    lib.define("alias(Tensor(a) x) -> Tensor(a)")
    lib.define("make(int n) -> Tensor")
    lib.define("log(Tensor x) -> ()")
    packet = getattr(torch.ops, ns)

    def rule(primals, tangents):
        return None

    with pytest.raises(ValueError, match="returns views of its inputs"):
        fwdecomp.register_jvp(packet.alias.default)(rule)
    with pytest.raises(ValueError, match="takes no tensor"):
        fwdecomp.register_jvp(packet.make.default)(rule)
    with pytest.raises(ValueError, match="returns nothing"):
        fwdecomp.register_jvp(packet.log.default)(rule)
    with pytest.raises(ValueError, match=r"writes into its argument\(s\) x"):
        fwdecomp.register_jvp("fwdtest::scale_")(rule)
    assert jvp_rules.operators() == []
    lib._destroy()


def test_duplicate_needs_replace():
    fwdecomp.register_jvp("fwdtest::softplus")(softplus_rule)
    with pytest.raises(fwdecomp.DuplicateJvpRuleError, match="replace=True"):
        fwdecomp.register_jvp("fwdtest::softplus")(softplus_rule)
    fwdecomp.register_jvp("fwdtest::softplus", replace=True)(softplus_rule)


def test_unknown_operator():
    with pytest.raises(UnknownOperatorError, match="fwdtest::no_such_op"):
        fwdecomp.register_jvp("fwdtest::no_such_op")


def test_snapshot_restore_and_listeners():
    events = []
    jvp_rules.subscribe(lambda event, op: events.append((event, op)))
    saved = jvp_rules.snapshot()
    fwdecomp.register_jvp("fwdtest::softplus")(softplus_rule)
    jvp_rules.restore(saved)
    assert jvp_rules.snapshot() == saved
    assert events[-2:] == [("register", ops.softplus.default), ("unregister", ops.softplus.default)]


# --- what a rule receives --------------------------------------------------


def test_primals_and_tangents_in_schema_order(enabled):
    seen = {}

    def rule(primals, tangents):
        seen["primals"], seen["tangents"] = primals, tangents
        return ops.weighted_sines(*primals), None

    fwdecomp.register_jvp("fwdtest::weighted_sines")(rule)
    a, b, w = randn(3).requires_grad_(), randn(3), randn(2)
    va = randn(3)
    with forward_ad.dual_level():
        ops.weighted_sines([forward_ad.make_dual(a, va), b], w, 0.5)
    primals, tangents = seen["primals"], seen["tangents"]
    assert len(primals) == len(tangents) == 3
    assert primals[2] == 0.5 and tangents[2] is None
    assert primals[1] is w and tangents[1] is None  # no tangent: passed as it is
    assert isinstance(primals[0], list) and len(primals[0]) == 2
    assert torch.equal(primals[0][0], a) and primals[0][1] is b
    assert all(_torch.tangent_of(p) is None for p in primals[0])  # stripped at this level
    assert primals[0][0].requires_grad  # but still on a's reverse-mode graph
    assert torch.equal(tangents[0][0], va) and tangents[0][1] is None


def test_defaults_and_keyword_only_arguments_and_call():
    op = aten._scaled_dot_product_flash_attention_for_cpu.default
    seen = {}

    def rule(primals, tangents):
        seen["primals"] = primals
        return jvp_rules.call(op, primals), None

    fwdecomp.register_jvp(op)(rule)
    q = randn(1, 1, 3, 4)
    with fwdecomp.enabled():
        jvp(lambda q: op(q, q, q, scale=0.5), (q,), (q,))
    assert seen["primals"][3:] == [0.0, False, None, 0.5]


# --- what a rule returns -------------------------------------------------


def _jvp_softplus():
    x = randn(3)
    return jvp(lambda z: ops.softplus(z, 1.0), (x,), (torch.ones_like(x),))


@pytest.mark.parametrize(
    "result, fragment",
    [
        (lambda x, dx: x, "must return a pair"),
        (lambda x, dx: ((x, x), dx), "returned tuple for output 0; the schema says Tensor. Fix the rule"),
        (lambda x, dx: (ops.softplus(x, 1.0), dx[:2]), r"tangent of shape \(2,\)"),
        (lambda x, dx: (ops.softplus(x, 1.0), dx.float()), "dtype torch.float32"),
        (lambda x, dx: (ops.softplus(x, 1.0), "dx"), "tangent of type str"),
        (lambda x, dx: (ops.softplus(x, 1.0)[:2], dx[:2]), r"cannot return: it returned output 0 with \(shape"),
    ],
)
def test_rule_returning_wrong_things(enabled, result, fragment):
    @fwdecomp.register_jvp("fwdtest::softplus")
    def wrong(primals, tangents):
        return result(primals[0], tangents[0])

    with pytest.raises(DecompositionError, match=fragment) as info:
        _jvp_softplus()
    assert "JVP rule of fwdtest::softplus" in str(info.value) and "wrong" in str(info.value)


def test_rule_that_raises_names_the_rule(enabled):
    @fwdecomp.register_jvp("fwdtest::softplus")
    def broken(primals, tangents):
        raise ValueError("inside the rule")

    with pytest.raises(DecompositionError, match="inside the rule") as info:
        _jvp_softplus()
    assert "broken" in str(info.value) and "test_jvp_rules.py" in str(info.value)


def test_outputs_must_not_carry_tangents_already(enabled):
    x, v = randn(3), randn(3)

    @fwdecomp.register_jvp("fwdtest::softplus")
    def leaky(primals, tangents):
        return torch.logaddexp(torch.zeros_like(dual), dual), tangents[0]

    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, v)
        with pytest.raises(DecompositionError, match="already carries a tangent"):
            ops.softplus(dual, 1.0)


def test_integer_outputs_take_no_tangent(enabled):
    ns = fresh_namespace()
    lib = torch.library.Library(ns, "FRAGMENT")
    lib.define("floor_and_frac(Tensor x) -> (Tensor, Tensor)")
    lib.impl("floor_and_frac", lambda x: (x.floor().long(), x - x.floor()), "CompositeExplicitAutograd")
    op = getattr(torch.ops, ns).floor_and_frac.default

    @fwdecomp.register_jvp(op)
    def rule(primals, tangents):
        (x,), (dx,) = primals, tangents
        return op(x), (dx, dx)

    with pytest.raises(DecompositionError, match=r"tangent for a torch\.int64 output"):
        jvp(op, (randn(3),), (randn(3),))
    fwdecomp.register_jvp(op, replace=True)(lambda p, t: (op(p[0]), (None, t[0])))
    x, v = randn(3), randn(3)
    (whole, _), (_, dfrac) = jvp(op, (x,), (v,))
    assert whole.dtype == torch.int64 and torch.equal(dfrac, v)
    lib._destroy()


def test_none_tangent_means_zero(enabled):
    fwdecomp.register_jvp("fwdtest::softplus")(lambda p, t: (ops.softplus(*p), None))
    x, v = randn(3), randn(3)
    assert forward_ad_jvp(lambda z: ops.softplus(z, 1.0), [x], [v]) is None
    assert torch.equal(jvp(lambda z: ops.softplus(z, 1.0), (x,), (v,))[1], torch.zeros(3, dtype=f64))


def test_optional_output_that_is_none(enabled):
    fwdecomp.register_jvp("fwdtest::expm1_and_grad")(expm1_and_grad_rule)
    x, v = randn(3), randn(3)
    with forward_ad.dual_level():
        value, grad = ops.expm1_and_grad(forward_ad.make_dual(x, v), False)
        assert grad is None
        close(forward_ad.unpack_dual(value).tangent, torch.exp(x) * v)
    close(jvp(lambda z: ops.expm1_and_grad(z, False)[0], (x,), (v,))[1], torch.exp(x) * v)


# --- precedence ----------------------------------------------------------


def test_rule_wins_over_decomposition(enabled):
    used = []

    @fwdecomp.register_decomposition("fwdtest::softplus")
    def decomposition(x, beta):
        used.append("decomposition")
        return softplus_decomposition(x, beta)

    @fwdecomp.register_jvp("fwdtest::softplus")
    def rule(primals, tangents):
        used.append("rule")
        return softplus_rule(primals, tangents)

    x, v = randn(3), randn(3)
    expected = fd(lambda z: ops.softplus(z, 2.0), [x], [v])
    close(jvp(lambda z: ops.softplus(z, 2.0), (x,), (v,))[1], expected)
    fwdecomp.unregister_jvp("fwdtest::softplus")
    close(jvp(lambda z: ops.softplus(z, 2.0), (x,), (v,))[1], expected)
    assert used == ["rule", "decomposition"]


# --- a rule on an aten operator -----------------------------------------

CHOLESKY_CALLS = []


def cholesky_rule(primals, tangents):
    """dL = L Phi(L^-1 dA L^-H), Phi = strictly lower triangle plus half the diagonal."""
    CHOLESKY_CALLS.append(1)
    (A, upper), (dA, _) = primals, tangents
    L = aten.cholesky(A)
    X = torch.linalg.solve_triangular(L, torch.linalg.solve_triangular(L, dA, upper=False).mH, upper=False).mH
    dL = L @ (X.tril(-1) + X.diagonal(dim1=-2, dim2=-1).diag_embed() / 2)
    return (L.mH, dL.mH) if upper else (L, dL)


def _spd(x):
    S = (x + x.mT) / 2
    root = torch.linalg.matrix_exp(S * 0.1)
    return root @ root.mT + torch.eye(x.shape[-1], dtype=x.dtype)


@pytest.fixture
def cholesky_by_rule(enabled):
    assert fwdecomp.registry.lookup(aten.cholesky.default) is not None  # the built-in decomposition
    fwdecomp.register_jvp("aten::cholesky")(cholesky_rule)
    CHOLESKY_CALLS.clear()
    yield
    assert CHOLESKY_CALLS, "the rule, not the decomposition, served"


@pytest.mark.parametrize("upper", [False, True])
def test_cholesky_rule_under_transforms(cholesky_by_rule, upper):
    def f(x):
        return torch.cholesky(_spd(x), upper=upper)

    x, v, w = randn(3, 3), randn(3, 3), randn(3, 3)
    expected = fd(f, [x], [v])
    close(forward_ad_jvp(f, [x], [v]), expected)
    close(jvp(f, (x,), (v,))[1], expected)
    close(jacfwd(f)(x), torch.autograd.functional.jacobian(f, x))
    close(vmap(lambda t: jvp(f, (x,), (t,))[1])(torch.stack([v, w]))[1], fd(f, [x], [w]))

    def directional(z):
        return jvp(f, (z,), (v,))[1]

    close(jvp(directional, (x,), (w,))[1], fd(directional, [x], [w], eps=1e-5), 1e-5)


def test_cholesky_rule_hessian(cholesky_by_rule):
    """torch.func.hessian = forward over reverse: the backward runs at an inner level and sees the tangents."""

    def scalar(x):
        return (torch.cholesky(_spd(x)) ** 3).sum()

    x = randn(3, 3)
    H = hessian(scalar)(x).reshape(9, 9)
    gradient = torch.func.grad(scalar)
    columns = [fd(gradient, [x], [e.reshape(3, 3)], eps=1e-5).reshape(9) for e in torch.eye(9, dtype=f64)]
    close(H, torch.stack(columns, 1), 1e-5)


def test_cholesky_rule_reverse_through_the_jvp(cholesky_by_rule):
    v = randn(3, 3)

    def loss(z):
        return (jvp(lambda a: torch.cholesky(_spd(a)), (z,), (v,))[1] ** 2).sum()

    x = randn(3, 3)
    leaf = x.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(loss(leaf), leaf)
    expected = torch.stack([fd(loss, [x], [e.reshape(3, 3)], eps=1e-5) for e in torch.eye(9, dtype=f64)])
    close(gradient, expected.reshape(3, 3), 1e-5)


def test_cholesky_rule_leaves_plain_calls_alone(cholesky_by_rule):
    A = _spd(randn(3, 3)).requires_grad_()
    out = torch.cholesky(A)
    assert out.grad_fn.name() == "CholeskyBackward0"
    CHOLESKY_CALLS.append(1)  # no tangent: the rule is not called (the fixture wants one call)


# --- any backend can run rules -------------------------------------------


class RulesOnly(DecompositionInterface):
    """What another backend (e.g. the graph backend) does: run_rule for operators that have a rule."""

    def __init__(self):
        self.ran = []

    def has_decomposition(self, schema):
        return jvp_rules.lookup_schema(schema) is not None

    def run_decomposition(self, op, stack):
        self.ran.append(op)
        jvp_rules.run_rule(op, stack)


def test_another_backend_runs_rules(enabled):
    previous = get_impl()
    backend = RulesOnly()
    set_impl(backend)
    try:
        fwdecomp.register_jvp("fwdtest::polar")(polar_rule)
        r, t = torch.rand(3, dtype=f64) + 0.5, randn(3)
        vr, vt = randn(3), randn(3)
        close(jvp(ops.polar, (r, t), (vr, vt))[1], fd(ops.polar, [r, t], [vr, vt]))
        assert backend.ran == [ops.polar.default]
    finally:
        set_impl(previous)


def test_rule_returning_too_many_outputs(enabled):
    @fwdecomp.register_jvp("fwdtest::polar")
    def three(primals, tangents):
        x, y = ops.polar(*primals)
        return (x, y, x), None

    r = torch.rand(3, dtype=f64) + 0.5
    with pytest.raises(DecompositionError, match=r"wrong number of outputs.*returns 2 values, got 3 values"):
        jvp(ops.polar, (r, r), (r, r))


# --- forward-over-reverse within one forward-AD level ----------------------


def _polar_scalar(z):
    x, y = ops.polar(z[:3].abs() + 0.5, z[3:])
    return (x**3 + x * y).sum()


def _polar_scalar_reference(z):
    r, theta = z[:3].abs() + 0.5, z[3:]
    x, y = r * torch.cos(theta), r * torch.sin(theta)
    return (x**3 + x * y).sum()


def test_forward_over_reverse_in_one_level_warns_with_a_rule(enabled):
    """torch.autograd.functional.hessian(forward-mode) differentiates the op's backward inside the level whose
    tangents the rule stripped: the result is wrong, and fwdecomp says so. A decomposition gets it right."""
    z = randn(6)
    reference = torch.autograd.functional.hessian(_polar_scalar_reference, z)
    fwdecomp.register_jvp("fwdtest::polar")(polar_rule)
    with pytest.warns(UserWarning, match="fwdtest::polar is being differentiated in forward mode"):
        torch.autograd.functional.hessian(_polar_scalar, z, outer_jacobian_strategy="forward-mode", vectorize=True)
    fwdecomp.unregister_jvp("fwdtest::polar")
    fwdecomp.register_decomposition("fwdtest::polar")(polar_decomposition)
    H = torch.autograd.functional.hessian(_polar_scalar, z, outer_jacobian_strategy="forward-mode", vectorize=True)
    close(H, reference, 1e-10)


def test_reverse_through_the_jvp_outside_the_level_does_not_warn(enabled, recwarn):
    fwdecomp.register_jvp("fwdtest::polar")(polar_rule)
    r, theta = (torch.rand(3, dtype=f64) + 0.5).requires_grad_(), randn(3)
    with forward_ad.dual_level():
        x, _ = ops.polar(forward_ad.make_dual(r, torch.ones(3, dtype=f64)), theta)
        x, dx = forward_ad.unpack_dual(x)
    ((x**2).sum() + (dx**2).sum()).backward()
    assert not [w for w in recwarn if "fwdecomp" in str(w.message)]
    close(r.grad, 2 * x.detach() * torch.cos(theta))  # dx = cos(theta) does not depend on r


def test_list_output(enabled):
    ns = fresh_namespace()
    lib = torch.library.Library(ns, "FRAGMENT")
    lib.define("powers(Tensor x, int n) -> Tensor[]")
    lib.impl("powers", lambda x, n: [x**k for k in range(1, n + 1)], "CompositeExplicitAutograd")
    op = getattr(torch.ops, ns).powers.default

    @fwdecomp.register_jvp(op)
    def powers_jvp(primals, tangents):
        (x, n), (dx, _) = primals, tangents
        return op(x, n), [k * x ** (k - 1) * dx for k in range(1, n + 1)]

    x, v = randn(3), randn(3)
    with forward_ad.dual_level():
        outs = op(forward_ad.make_dual(x, v), 3)
        got = tuple(forward_ad.unpack_dual(o).tangent for o in outs)
    close(got, tuple(fd(lambda z: tuple(op(z, 3)), [x], [v])))
    fwdecomp.register_jvp(op, replace=True)(lambda p, t: (op(*p), [t[0]]))
    with forward_ad.dual_level():
        with pytest.raises(DecompositionError, match="a list tangent for a list of 3 tensors"):
            op(forward_ad.make_dual(x, v), 3)
    lib._destroy()
