"""Every private PyTorch API fwdecomp uses, exercised: an upgrade that changes one fails here."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import forward_ad

from fwdecomp import _torch

aten = torch.ops.aten


def test_schema_and_names():
    op = aten.add.Tensor
    assert isinstance(_torch.schema_of(op), torch.FunctionSchema)
    assert _torch.qualified_name(op) == "aten::add.Tensor"
    assert _torch.qualified_name(aten.cholesky.default) == "aten::cholesky"
    assert _torch.namespace(op) == "aten"


def test_get_kernel_and_call_boxed_from_an_override():
    op = aten._cdist_forward.default
    kernel = _torch.original_kernel(op, "AutogradCPU")
    seen = []

    def override(keyset, *args):
        seen.append(keyset)
        return kernel.call_boxed(keyset, *args)

    x, y = torch.randn(3, 2, requires_grad=True), torch.randn(4, 2)
    expected = op(x, y, 2.0, None)
    lib = _torch.new_library("aten")
    try:
        lib.impl("_cdist_forward", override, "AutogradCPU", with_keyset=True)
        out = op(x, y, 2.0, None)
    finally:
        _torch.destroy_library(lib)
    assert len(seen) == 1 and torch.equal(out, expected)
    assert out.grad_fn.name() == expected.grad_fn.name()


def test_library_destroy_restores_dump():
    before = _torch.dispatch_dump("aten::_pdist_forward")
    lib = _torch.new_library("aten")
    lib.impl("_pdist_forward", lambda keyset, *a: None, "AutogradCPU", with_keyset=True)
    assert _torch.dispatch_dump("aten::_pdist_forward") != before
    _torch.destroy_library(lib)
    assert _torch.dispatch_dump("aten::_pdist_forward") == before


def test_kernel_queries():
    assert _torch.is_composite_implicit(aten.cdist.default)
    assert not _torch.is_composite_implicit(aten._cdist_forward.default)
    assert "aten::cdist" in _torch.all_operator_names()


def test_tangent_queries():
    x = torch.randn(3)
    assert not _torch.dual_level_active() and _torch.tangent_of(x) is None
    with forward_ad.dual_level():
        assert _torch.dual_level_active()
        dual = forward_ad.make_dual(x, torch.ones(3))
        assert torch.equal(_torch.tangent_of(dual), torch.ones(3))
        assert _torch.tangent_of(x) is None


def test_derivatives_yaml_is_shipped():
    path = _torch.derivatives_yaml_path()
    assert path is not None and path.endswith("derivatives.yaml")
    with open(path, encoding="utf-8") as handle:
        assert "- name: _cdist_forward(" in handle.read()


# --- the graph backend's tracing helpers ---------------------------------------------------


def test_make_fx_on_fake_tensors_and_shape_guards():
    fake = _torch.fake_mode()
    with fake:
        x = torch.empty_strided((4, 3), (3, 1))

    def f(a):
        return (a * 2).sum(0) + torch.ones(3)

    gm = _torch.make_fx(f, "fake")(x)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [
        aten.mul.Tensor,
        aten.sum.dim_IntList,
        aten.ones.default,
        aten.add.Tensor,
    ]
    assert torch.equal(gm(torch.ones(4, 3)), torch.full((3,), 9.0))
    symbolic = _torch.make_fx(lambda a: a.reshape(-1) if a.shape[0] > 2 else a, "symbolic")(torch.empty(4, 3))
    placeholders = [n.meta["val"] for n in symbolic.graph.nodes if n.op == "placeholder"]
    guards = _torch.shape_guards(placeholders)
    check = _torch.compile_shape_guards(guards)
    assert check([torch.empty(5, 3)]) and not check([torch.empty(2, 3)]) and not check([torch.empty(5, 3).mT])


def test_dispatch_below_autograd_outside_functorch_without_modes():
    x = torch.randn(3, requires_grad=True)
    with _torch.below_autograd():
        assert (x * 2).grad_fn is None
    assert (x * 2).grad_fn is not None

    def inside(v):
        with _torch.outside_functorch():
            assert not torch._C._functorch.is_batchedtensor(torch.ones(2) + 1)
            plain = torch._C._functorch.peek_interpreter_stack() is None
        return v * plain

    torch.func.vmap(inside)(torch.ones(2, 3))

    def fake_inside_a_transform(v):
        # fake tensors made inside a transform, outside functorch (torch 2.11 asserted here)
        before = str(torch._C._dispatch_tls_local_exclude_set())
        with _torch.outside_functorch(), _torch.fake_mode():
            made = torch.empty_strided((2, 3), (3, 1))
        assert tuple(made.shape) == (2, 3)
        assert str(torch._C._dispatch_tls_local_exclude_set()) == before  # restored on exit
        return v

    torch.func.jvp(fake_inside_a_transform, (torch.ones(3),), (torch.ones(3),))
    fake = _torch.fake_mode()
    with fake:
        assert _torch.dispatch_modes_active()
        with _torch.without_dispatch_modes():
            assert not _torch.dispatch_modes_active() and type(torch.ones(1)) is torch.Tensor
    assert not _torch.dispatch_modes_active()


def test_storage_key_and_composite_rule():
    x = torch.randn(4, 3)
    assert _torch.storage_key(x) == _torch.storage_key(x.t()) != _torch.storage_key(x.clone())
    assert _torch.autograd_would_decompose(aten.matmul.default, [x])
    assert not _torch.autograd_would_decompose(aten.mm.default, [x])
    assert not _torch.autograd_would_decompose(torch.ops.prim.device.default, [x])  # TorchScript-only


def test_autocast_disabled():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with _torch.autocast_disabled({"cpu", "meta"}):
            assert not torch.is_autocast_enabled("cpu")
        assert torch.is_autocast_enabled("cpu")


def test_autograd_codegen_is_shipped():
    path = _torch.autograd_codegen_path()
    assert path is not None and path.endswith("gen_variable_type.py")
    with open(path, encoding="utf-8") as handle:
        assert "DONT_REQUIRE_DERIVATIVE = {" in handle.read()


def test_dispatch_mode_sees_operators_below_autograd_with_their_grad_flags():
    seen = []

    class Recorder(_torch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append((func, [a.requires_grad for a in args if isinstance(a, torch.Tensor)]))
            return func(*args, **(kwargs or {}))

    x = torch.randn(3, requires_grad=True)
    with Recorder():
        torch.cdist(x.reshape(3, 1), torch.ones(2, 1))  # CompositeImplicitAutograd: seen decomposed
    assert (aten._cdist_forward.default, [True, False]) in seen
    assert aten.cdist.default not in [func for func, _ in seen]


def test_current_autograd_node_and_its_forward_traceback():
    nodes = []

    class Recorder(_torch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            node = _torch.current_autograd_node()
            nodes.append((func, node and node.name(), _torch.forward_traceback(node)))
            return func(*args, **(kwargs or {}))

    x = torch.randn(4, 2, requires_grad=True)
    assert _torch.current_autograd_node() is None
    with torch.autograd.set_detect_anomaly(True, check_nan=False):
        out = torch.cdist(x, torch.ones(3, 2)).sum()  # the line the traceback must name
        with Recorder():
            torch.autograd.grad(out, x)
    _, name, stack = next(entry for entry in nodes if entry[0] == aten._cdist_backward.default)
    assert name == "CdistBackward0"
    assert any(__file__ in line and "torch.cdist(x, torch.ones(3, 2))" in line for line in stack)


def test_jvp_decomposed_operators():
    ops = _torch.jvp_decomposed_operators()
    assert aten.native_layer_norm_backward.default in ops
    assert aten._cdist_forward.default not in ops


# --- custom operators, JVP rules, jvp_from_forward ---------------------------


def test_primal_and_forward_grad_mode():
    x = torch.randn(3)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, torch.ones(3))
        primal = _torch.primal_of(dual)
        assert _torch.tangent_of(primal) is None and torch.equal(primal, x)
        assert primal.data_ptr() == dual.data_ptr()  # a view: the op called on it writes into the argument
        assert _torch.forward_grad_is_enabled()
        with _torch.forward_grad_enabled(False):
            assert not _torch.forward_grad_is_enabled()
            assert _torch.tangent_of(dual) is None
        assert _torch.tangent_of(dual) is not None


def test_function_defaults_tell_overrides():
    class WithJvp(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x

        @staticmethod
        def jvp(ctx, t):
            return t

    assert torch.autograd.Function.jvp is _torch.function_default("jvp")
    assert WithJvp.jvp is not _torch.function_default("jvp")
    assert WithJvp.setup_context is _torch.function_default("setup_context")


def test_wrap_attribute_restores_exactly():
    class Base:
        def inherited(self):
            return "base"

    class Owner(Base):
        def own(self):
            return "own"

    original = vars(Owner)["own"]
    restore_own = _torch.wrap_attribute(Owner, "own", lambda f: lambda self: "wrapped " + f(self))
    restore_inherited = _torch.wrap_attribute(Owner, "inherited", lambda f: lambda self: "wrapped " + f(self))
    assert Owner().own() == "wrapped own" and Owner().inherited() == "wrapped base"
    restore_inherited()
    restore_own()
    assert vars(Owner)["own"] is original and "inherited" not in vars(Owner)


def test_definition_entry_points():
    """Library.define / Library.impl / torch.ops.load_library: the names and arguments the hooks rely on."""
    import inspect

    define = inspect.signature(_torch.LIBRARY_CLASS.define)
    assert list(define.parameters)[:2] == ["self", "schema"]
    impl = inspect.signature(_torch.LIBRARY_CLASS.impl)
    assert list(impl.parameters)[:4] == ["self", "op_name", "fn", "dispatch_key"]
    assert list(inspect.signature(_torch.OPS_CLASS.load_library).parameters) == ["self", "path"]
    assert isinstance(torch.ops, _torch.OPS_CLASS)
    lib = torch.library.Library("fwdecomp_internals", "FRAGMENT")
    lib.define("f.out(Tensor x) -> Tensor")
    assert _torch.library_qualname(lib, "f.out(Tensor x) -> Tensor") == "fwdecomp_internals::f.out"
    assert _torch.library_qualname(lib, "other::g") == "other::g"
    assert _torch.library_qualname(lib, aten.add.Tensor) == "aten::add.Tensor"
    assert _torch.library_impl_key(lib, "") == "CompositeImplicitAutograd"
    assert _torch.library_impl_key(lib, "AutogradCPU") == "AutogradCPU"
    assert _torch.library_impl_key(torch.library.Library("fwdecomp_internals", "IMPL", "CPU"), "") == "CPU"
    lib._destroy()


def test_functorch_transforms_active():
    seen = []

    def f(x):
        seen.append(_torch.functorch_transforms_active())
        return x * 2

    f(torch.ones(2))
    torch.func.jvp(f, (torch.ones(2),), (torch.ones(2),))
    torch.func.vmap(f)(torch.ones(3, 2))
    with forward_ad.dual_level():
        f(forward_ad.make_dual(torch.ones(2), torch.ones(2)))
    assert seen == [False, True, True, False]


def test_operator_callable():
    call = _torch.operator_callable(aten.add.Tensor)
    x = torch.randn(3)
    assert call is not aten.add.Tensor and torch.equal(call(x, x, alpha=2), aten.add.Tensor(x, x, alpha=2))


def test_grad_transform_active():
    seen = []

    def f(x):
        seen.append(_torch.grad_transform_active())
        return x.sin().sum()

    x = torch.ones(2)
    f(x)
    torch.func.jvp(f, (x,), (x,))
    torch.func.vmap(f)(torch.ones(3, 2))
    torch.func.grad(f)(x)
    torch.func.jvp(torch.func.grad(f), (x,), (x,))
    torch.func.grad(lambda x: torch.func.jvp(f, (x,), (x,))[1])(x)
    assert seen == [False, False, False, True, True, True]


def test_requires_grad_below():
    leaf = torch.ones(3, requires_grad=True)
    seen = []

    def f(z):
        seen.append((z.requires_grad, _torch.requires_grad_below(z)))
        return z * 2

    torch.func.jvp(f, (leaf,), (torch.ones(3),))
    torch.func.vmap(f)(torch.ones(2, 3))
    assert seen == [(False, True), (False, False)]
    assert _torch.requires_grad_below(leaf) and not _torch.requires_grad_below(torch.ones(2))


def test_is_legacy_batched():
    from torch._vmap_internals import _vmap

    seen = []

    def f(x):
        seen.append(_torch.is_legacy_batched(x))
        return x * 2

    _vmap(f)(torch.ones(2, 3))
    torch.func.vmap(f)(torch.ones(2, 3))
    f(torch.ones(2))
    assert seen == [True, False, False]


def test_unpack_dual_matches_forward_ad():
    x, t = torch.randn(3), torch.randn(3)
    assert _torch.unpack_dual(x) == (x, None)  # no level open
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, t)
        primal, tangent = _torch.unpack_dual(dual)
        assert torch.equal(primal, x) and torch.equal(tangent, t)
        assert _torch.unpack_dual(x)[1] is None
        assert torch.equal(_torch.primal_of(dual), forward_ad.unpack_dual(dual).primal)


def test_make_dual_matches_forward_ad():
    x, t = torch.randn(3), torch.randn(3)
    with forward_ad.dual_level():
        dual = _torch.make_dual(x, t)
        primal, tangent = forward_ad.unpack_dual(dual)
        assert torch.equal(primal, x) and torch.equal(tangent, t)


def _key_names(keyset: torch._C.DispatchKeySet) -> set[str]:
    text = str(keyset)  # "DispatchKeySet(A, B, ...)"
    inner = text[text.index("(") + 1 : text.rindex(")")]
    return {name.strip() for name in inner.split(",") if name.strip()}


#: Keys functorch's jvp layer excludes that Python cannot name (``_torch.JVP_LAYER_EXCLUDED_KEYS``).
_UNNAMED = {"Tracer", "BatchedNestedTensor", "Batched", "VmapMode", "DeferredInit", "Named"}  # Named: torch 2.11


def test_below_jvp_layer_undoes_what_the_layer_excluded():
    """Probe an autograd kernel under ``torch.func.jvp``: what the jvp layer adds to the excluded
    keys is ``JVP_LAYER_EXCLUDED_KEYS`` plus keys Python cannot name; below the layer (popped) the
    named ones are back and operators run on the unwrapped tensors, whose results wrap back."""
    op = aten.atan2.default
    kernel = _torch.original_kernel(op, "AutogradCPU")
    seen: dict = {}

    def probe(keyset, x, y):
        level = _torch.innermost_jvp_level()
        seen.setdefault("levels", []).append(level)
        if level is not None:  # (the layer hands the call on: it comes back here without one)
            seen["layer"] = _key_names(torch._C._dispatch_tls_local_exclude_set())
            inner = _torch.unwrap_jvp(x, level)
            seen["unwrapped"] = not torch._C._functorch.is_functorch_wrapped_tensor(inner)
            with _torch.below_jvp_layer():
                seen["below"] = _key_names(torch._C._dispatch_tls_local_exclude_set())
                seen["stack"] = torch._C._functorch.peek_interpreter_stack()
                value = inner * 3
            wrapped = _torch.wrap_jvp(value, level)
            seen["wrapped"] = torch._C._functorch.maybe_get_level(wrapped) == level
        return kernel.call_boxed(keyset, x, y)

    caller = _key_names(torch._C._dispatch_tls_local_exclude_set())
    x, y = torch.randn(3), torch.randn(3)
    lib = _torch.new_library("aten")
    try:
        lib.impl("atan2", probe, "AutogradCPU", with_keyset=True)
        _, tangent = torch.func.jvp(lambda x: op(x, y), (x,), (torch.ones(3),))
        assert seen["levels"] == [1, None] and seen["unwrapped"] and seen["wrapped"] and seen["stack"] is None
        added = seen["layer"] - caller
        named = set(_torch.JVP_LAYER_EXCLUDED_KEYS)
        assert named <= added and added - named <= _UNNAMED, (added, named)
        assert seen["below"] == caller | (added & _UNNAMED)
        torch.testing.assert_close(tangent, y / (x * x + y * y))  # the op's own formula still ran
        seen.clear()
        op(x, y)
        assert seen["levels"] == [None]
    finally:
        _torch.destroy_library(lib)


@pytest.mark.filterwarnings("ignore:Named tensors")
def test_may_run_below_jvp_layer():
    assert _torch.may_run_below_jvp_layer((torch.ones(2), None))
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged)
    assert not _torch.may_run_below_jvp_layer((nested,))
    if hasattr(torch.ones(()), "names"):  # named tensors (gone from recent releases)
        assert not _torch.may_run_below_jvp_layer((torch.ones(2, names=("n",)),))
    from torch.utils._python_dispatch import TorchDispatchMode

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert not _torch.may_run_below_jvp_layer((torch.ones(2),))


def test_fake_tensor_logger_is_the_one_quiet_fake_tensor_log_filters():
    """quiet_fake_tensor_log filters the logger by name: the module must still log through it."""
    import torch._subclasses.fake_tensor as fake_tensor

    assert fake_tensor.log.name == _torch._FAKE_TENSOR_LOGGER
    logger = fake_tensor.log
    with _torch.quiet_fake_tensor_log():
        assert _torch._fake_tensor_filter in logger.filters
        with _torch.quiet_fake_tensor_log():  # nested: still quiet after the inner one ends
            pass
        assert _torch._fake_tensor_filter in logger.filters
        assert not _torch._fake_tensor_filter.filter(logger.makeRecord(logger.name, 40, "f", 1, "m", (), None))
    assert _torch._fake_tensor_filter not in logger.filters
