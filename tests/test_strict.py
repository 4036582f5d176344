"""No silent zeros: custom operators without a decomposition or rule raise on tangents (strict mode).

Also: what PyTorch alone does (the behaviour strict=False keeps), operators
defined or given kernels after enable(), which namespaces count, and
disable() restoring the dispatcher and torch.library exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from custom_op_zoo import CALLS, close, f64, forward_ad_jvp, fresh_namespace, ops, randn, softplus_rule
from torch.autograd import forward_ad
from torch.func import jvp

import fwdecomp
from fwdecomp import _torch, autograd
from fwdecomp.custom_ops import PYTORCH_NAMESPACES, can_carry_tangents, is_user_operator, user_operators


def _softplus(x):
    return ops.softplus(x, 1.5)


def test_pytorch_alone_drops_tangents_silently():
    """The behaviour strict mode replaces (and strict=False keeps): None under forward_ad, zeros under jvp."""
    x, v = randn(4), randn(4)
    assert forward_ad_jvp(_softplus, [x], [v]) is None
    _, tangent = jvp(_softplus, (x,), (v,))
    assert torch.equal(tangent, torch.zeros_like(x))


@pytest.mark.parametrize("how", ["forward_ad", "func.jvp", "jacfwd"])
def test_strict_raises_naming_the_operator_and_both_fixes(enabled, how):
    x, v = randn(4), randn(4)
    with pytest.raises(NotImplementedError) as info:
        if how == "forward_ad":
            forward_ad_jvp(_softplus, [x], [v])
        elif how == "func.jvp":
            jvp(_softplus, (x,), (v,))
        else:
            torch.func.jacfwd(_softplus)(x)
    message = str(info.value)
    assert "custom operator fwdtest::softplus" in message
    assert "silently drop" in message
    assert "@fwdecomp.register_decomposition('fwdtest::softplus')" in message
    assert "@fwdecomp.register_jvp('fwdtest::softplus')" in message
    assert "fwdecomp.enable(strict=False)" in message


def test_strict_raises_for_a_tangent_on_any_differentiable_input(enabled):
    r, theta = randn(3).abs() + 0.5, randn(3)
    with pytest.raises(NotImplementedError, match="fwdtest::polar"):
        jvp(lambda t: ops.polar(r, t), (theta,), (torch.ones_like(theta),))


def test_strict_checks_operators_that_write_before_they_run(enabled):
    x, v = randn(4), randn(4)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x.clone(), v)
        with pytest.raises(NotImplementedError, match="fwdtest::scale_"):
            ops.scale_(dual, 3.0)
        assert torch.equal(forward_ad.unpack_dual(dual).primal, x)  # nothing was written


def test_integer_results_need_no_tangent(enabled):
    """A call whose results are all integer has nothing to lose: it runs, and gets no tangent."""
    x, v = randn(5) * 3, randn(5)
    with forward_ad.dual_level():
        out = ops.bucketize(forward_ad.make_dual(x, v))
        assert forward_ad.unpack_dual(out).tangent is None
    assert torch.equal(out, torch.floor(x).long())
    assert torch.equal(jvp(ops.bucketize, (x,), (v,))[0], torch.floor(x).long())


def test_integer_results_with_inputs_that_require_grad(enabled):
    """PyTorch refuses the tangents (custom_op's autograd.Function has no jvp): still nothing to lose."""
    x, v = (randn(5) * 3).requires_grad_(), randn(5)
    with forward_ad.dual_level():
        out = ops.bucketize(forward_ad.make_dual(x, v))
    assert torch.equal(out, torch.floor(x.detach()).long())


def test_library_operator_without_autograd_kernel(enabled):
    x, v = randn(3), randn(3)
    with pytest.raises(NotImplementedError, match="fwdtest::expm1_and_grad"):
        forward_ad_jvp(lambda z: ops.expm1_and_grad(z, True), [x], [v])


def test_operator_that_differentiates_itself_keeps_working(enabled):
    """An autograd kernel made of PyTorch operations gives tangents on its own: strict mode lets it be."""
    ns = fresh_namespace()
    lib = torch.library.Library(ns, "FRAGMENT")
    lib.define("sin_cos(Tensor x) -> (Tensor, Tensor)")
    lib.impl("sin_cos", lambda x: (torch.sin(x), torch.cos(x)), "Autograd")
    lib.impl("sin_cos", lambda x: (torch.sin(x), torch.cos(x)), "CompositeExplicitAutograd")
    op = getattr(torch.ops, ns).sin_cos.default
    assert autograd.is_installed(op)
    x, v = randn(3), randn(3)
    close(forward_ad_jvp(op, [x], [v]), (torch.cos(x) * v, -torch.sin(x) * v))
    close(jvp(op, (x,), (v,))[1], (torch.cos(x) * v, -torch.sin(x) * v))
    lib._destroy()


def test_calls_without_tangents_are_unchanged_in_strict_mode(enabled):
    assert autograd.is_installed(ops.softplus.default)
    x = randn(4).requires_grad_()
    before = CALLS["softplus"]
    out = _softplus(x)
    assert CALLS["softplus"] == before + 1
    (grad,) = torch.autograd.grad(out.sum(), x)
    close(grad, torch.sigmoid(1.5 * x.detach()))


def test_strict_false_keeps_pytorchs_behaviour():
    x, v = randn(4), randn(4)
    with fwdecomp.enabled(strict=False):
        assert fwdecomp.is_enabled() and not fwdecomp.is_strict()
        assert not autograd.is_installed(ops.softplus.default)
        assert forward_ad_jvp(_softplus, [x], [v]) is None
        assert torch.equal(jvp(_softplus, (x,), (v,))[1], torch.zeros(4, dtype=f64))
        # registered custom operators are still routed
        fwdecomp.register_jvp("fwdtest::softplus")(softplus_rule)
        close(jvp(_softplus, (x,), (v,))[1], v * torch.sigmoid(1.5 * x))
    assert not fwdecomp.is_enabled()


def test_switching_modes_while_enabled():
    fwdecomp.enable()
    assert fwdecomp.is_strict() and autograd.is_installed(ops.softplus.default)
    fwdecomp.enable(strict=False)
    assert not fwdecomp.is_strict() and not autograd.is_installed(ops.softplus.default)
    with fwdecomp.enabled():  # strict inside, back to non-strict after
        assert autograd.is_installed(ops.softplus.default)
    assert not fwdecomp.is_strict() and not autograd.is_installed(ops.softplus.default)
    fwdecomp.disable()
    assert not fwdecomp.is_strict()


def test_a_registration_while_enabled_replaces_the_guard(enabled):
    x, v = randn(4), randn(4)
    with pytest.raises(NotImplementedError):
        jvp(_softplus, (x,), (v,))
    fwdecomp.register_jvp("fwdtest::softplus")(softplus_rule)
    close(jvp(_softplus, (x,), (v,))[1], v * torch.sigmoid(1.5 * x))
    fwdecomp.unregister_jvp("fwdtest::softplus")
    with pytest.raises(NotImplementedError):
        jvp(_softplus, (x,), (v,))


# --- which operators count -------------------------------------------------


def test_which_operators_are_guarded(enabled):
    installed = set(autograd.installed())
    assert {ops.softplus.default, ops.polar.default, ops.weighted_sines.default, ops.scale_.default} <= installed
    assert ops.bucketize.default in installed  # decided per call: integer results pass
    for op in installed:
        if fwdecomp.registry.lookup(op) is None:  # guarded, not decomposed: only user operators
            assert is_user_operator(op), op
            assert _torch.namespace(op) not in PYTORCH_NAMESPACES
    assert not autograd.is_installed(torch.ops.prims.sin.default)
    assert not autograd.is_installed(torch.ops.aten.sin.default)


def test_composite_implicit_custom_operators_need_no_guard(enabled):
    ns = fresh_namespace()
    lib = torch.library.Library(ns, "FRAGMENT")
    lib.define("twice_sin(Tensor x) -> Tensor")
    lib.impl("twice_sin", lambda x: 2 * torch.sin(x), "CompositeImplicitAutograd")
    op = getattr(torch.ops, ns).twice_sin.default
    assert is_user_operator(op) and not autograd.is_installed(op)
    x, v = randn(3), randn(3)
    close(jvp(op, (x,), (v,))[1], 2 * torch.cos(x) * v)  # autograd sees sin: PyTorch differentiates it
    lib._destroy()


def test_operators_that_cannot_carry_tangents():
    ns = fresh_namespace()
    lib = torch.library.Library(ns, "FRAGMENT")
    lib.define("make(int n) -> Tensor")
    lib.define("log(Tensor x) -> ()")
    lib.define("fill_(Tensor(a!) x) -> ()")
    packet = getattr(torch.ops, ns)
    assert not can_carry_tangents(packet.make.default)  # takes no tensor
    assert not can_carry_tangents(packet.log.default)  # passes nothing on
    assert can_carry_tangents(packet.fill_.default)  # writes into a tensor
    lib._destroy()


def test_pytorch_namespaces_cover_what_pytorch_defines():
    """Import the PyTorch subpackages that define operators on import; every non-aten namespace must be listed."""
    code = textwrap.dedent(
        """
        import importlib, torch
        for name in [
            "torch._inductor", "torch._inductor.fx_passes.bucketing", "torch._dynamo", "torch.export",
            "torch.onnx", "torch._prims", "torch.ao.quantization.fx._decomposed", "torch.nn.attention.varlen",
            "torch.nn.attention.flex_attention", "torch._functorch._activation_offloading.offload_ops",
            "torch.sparse.semi_structured", "torch.distributed", "torch.distributed.tensor",
            "torch.distributed.fsdp", "torch.distributed.pipelining",
            "torch.distributed.tensor.experimental._context_parallel._cp_custom_ops",
            "torch.distributed._ops.device_mesh", "torch._inductor.runtime.debug_utils",
            "torch.nn.modules.linear_cross_entropy",
        ]:
            try:
                importlib.import_module(name)
            except Exception:
                pass  # not in this build (e.g. no distributed)
        print(sorted({n.split("::")[0] for n in torch._C._dispatch_get_all_op_names()} - {"aten"}))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    namespaces = set(eval(result.stdout.strip().splitlines()[-1]))
    assert namespaces - PYTORCH_NAMESPACES == set()


# --- operators defined after enable() ------------------------------------


def _define_with_custom_op(ns):
    @torch.library.custom_op(f"{ns}::sinh", mutates_args=())
    def sinh(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.sinh(x.detach().numpy()))

    sinh.register_fake(lambda x: torch.empty_like(x))
    sinh.register_autograd(
        lambda ctx, grad: grad * torch.cosh(ctx.saved_tensors[0]),
        setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[0]),
    )
    return getattr(torch.ops, ns).sinh.default, None


def _define_with_library(ns):
    lib = torch.library.Library(ns, "FRAGMENT")
    lib.define("sinh(Tensor x) -> Tensor")
    lib.impl("sinh", lambda x: torch.from_numpy(np.sinh(x.detach().numpy())), "CPU")
    torch.library.register_autograd(
        f"{ns}::sinh",
        lambda ctx, grad: grad * torch.cosh(ctx.saved_tensors[0]),
        setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[0]),
        lib=lib,
    )
    return getattr(torch.ops, ns).sinh.default, lib


def _define_with_torch_library_define(ns):
    lib = torch.library.Library(ns, "FRAGMENT")
    torch.library.define(f"{ns}::sinh", "(Tensor x) -> Tensor", lib=lib)
    torch.library.impl(f"{ns}::sinh", "cpu", lib=lib)(lambda x: torch.from_numpy(np.sinh(x.detach().numpy())))
    torch.library.register_autograd(
        f"{ns}::sinh",
        lambda ctx, grad: grad * torch.cosh(ctx.saved_tensors[0]),
        setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[0]),
        lib=lib,
    )
    return getattr(torch.ops, ns).sinh.default, lib


DEFINERS = pytest.mark.parametrize(
    "define",
    [_define_with_custom_op, _define_with_library, _define_with_torch_library_define],
    ids=lambda f: f.__name__,
)


@DEFINERS
def test_operator_defined_after_enable_is_guarded(define, enabled):
    op, lib = define(fresh_namespace())
    assert autograd.is_installed(op)
    x, v = randn(4), randn(4)
    with pytest.raises(NotImplementedError, match=_torch.qualified_name(op)):
        jvp(op, (x,), (v,))
    # without tangents: the user's kernel and the backward registered after the definition
    leaf = x.clone().requires_grad_()
    out = op(leaf)
    close(out, torch.sinh(x))
    (grad,) = torch.autograd.grad(out.sum(), leaf)
    close(grad, torch.cosh(x))
    # and a rule registered now takes effect at once
    fwdecomp.register_jvp(op)(lambda primals, tangents: (op(primals[0]), torch.cosh(primals[0]) * tangents[0]))
    close(jvp(op, (x,), (v,))[1], torch.cosh(x) * v)
    if lib is not None:
        lib._destroy()


@DEFINERS
def test_operator_defined_before_enable_is_guarded(define):
    op, lib = define(fresh_namespace())
    with fwdecomp.enabled():
        assert autograd.is_installed(op)
        with pytest.raises(NotImplementedError, match=_torch.qualified_name(op)):
            jvp(op, (randn(3),), (randn(3),))
    if lib is not None:
        lib._destroy()


def test_kernels_registered_after_enable_are_the_ones_called(enabled):
    """fwdecomp's kernel calls the autograd kernel it found; a later registration must replace it."""
    ns = fresh_namespace()
    lib = torch.library.Library(ns, "FRAGMENT")
    lib.define("triple(Tensor x) -> Tensor")
    op = getattr(torch.ops, ns).triple.default
    assert autograd.is_installed(op)
    lib.impl("triple", lambda x: x * 3, "CPU")
    torch.library.register_autograd(f"{ns}::triple", lambda ctx, grad: grad * 3, lib=lib)
    x = randn(2).requires_grad_()
    out = op(x)
    assert "GeneratedBackwardFor" in out.grad_fn.name()
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, torch.full((2,), 3.0, dtype=f64))
    lib._destroy()


def test_redefined_operator_gets_no_stale_kernel(enabled):
    ns = fresh_namespace()
    first = torch.library.Library(ns, "FRAGMENT")
    first.define("f(Tensor x) -> Tensor")
    first.impl("f", lambda x: x + 1, "CPU")
    first._destroy()
    second = torch.library.Library(ns, "FRAGMENT")
    second.define("f(Tensor x) -> Tensor")
    second.impl("f", lambda x: x + 2, "CPU")
    op = getattr(torch.ops, ns).f.default
    assert torch.equal(op(torch.zeros(1)), torch.full((1,), 2.0))
    assert [o for o in autograd.installed() if _torch.qualified_name(o) == f"{ns}::f"] == [op]
    second._destroy()


def _define_unseen(ns):
    """Define an operator the way a C++ library does: without passing through the hooked Library.define."""
    lib = torch.library.Library(ns, "FRAGMENT")
    torch.library.Library.define.__wrapped__(lib, "g(Tensor x) -> Tensor")
    lib.impl("g", lambda x: x * 2, "CompositeExplicitAutograd")
    return getattr(torch.ops, ns).g.default, lib


def test_loading_a_cpp_library_rescans(enabled):
    op, lib = _define_unseen(fresh_namespace())
    assert not autograd.is_installed(op)
    library = os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")
    if not os.path.exists(library):
        pytest.skip("no libc10.so in this build")
    torch.ops.load_library(library)  # already loaded: registers nothing, but notifies
    assert autograd.is_installed(op)
    lib._destroy()


def test_enable_again_rescans(enabled):
    op, lib = _define_unseen(fresh_namespace())
    assert not autograd.is_installed(op)
    fwdecomp.enable()
    assert autograd.is_installed(op)
    lib._destroy()


def test_user_operators_lists_the_zoo():
    found = set(user_operators())
    assert {ops.softplus.default, ops.polar.default, ops.expm1_and_grad.default} <= found
    assert all(is_user_operator(op) for op in found)


# --- disable() restores everything ----------------------------------------

_ZOO = ["fwdtest::softplus", "fwdtest::polar", "fwdtest::weighted_sines", "fwdtest::scale_", "fwdtest::expm1_and_grad"]


def _entry_points():
    return (
        vars(torch.library.Library)["define"],
        vars(torch.library.Library)["impl"],
        "load_library" in vars(type(torch.ops)),
        type(torch.ops).load_library,
    )


def test_disable_restores_custom_operators_and_torch_library_exactly():
    dumps = {name: _torch.dispatch_dump(name) for name in _ZOO}
    entry_points = _entry_points()
    fwdecomp.enable()
    assert all(_torch.dispatch_dump(name) != dumps[name] for name in _ZOO)
    assert vars(torch.library.Library)["define"] is not entry_points[0]
    fwdecomp.register_jvp("fwdtest::softplus")(softplus_rule)
    ns = fresh_namespace()
    lib = torch.library.Library(ns, "FRAGMENT")
    lib.define("late(Tensor x) -> Tensor")
    assert "fwdecomp" in _torch.dispatch_dump(f"{ns}::late")
    fwdecomp.disable()
    assert {name: _torch.dispatch_dump(name) for name in _ZOO} == dumps
    assert _entry_points() == entry_points
    assert "fwdecomp" not in _torch.dispatch_dump(f"{ns}::late")
    lib._destroy()
