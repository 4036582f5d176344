"""The seed's contract: an abstract interface, a setter, a getter and a registerer."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import fwdecomp
from fwdecomp.backends.eager import EagerBackend
from fwdecomp.interface import DecompositionInterface, Registerer, get_impl, set_impl


class Recording(DecompositionInterface):
    def __init__(self):
        self.calls = []

    def has_decomposition(self, schema):
        return schema.name == "aten::_pdist_forward"

    def run_decomposition(self, op, stack):
        self.calls.append((op, list(stack)))
        x, _ = stack
        # a deliberately recognisable decomposition: 7 + sum(x) for every pair
        pairs = x.shape[0] * (x.shape[0] - 1) // 2
        stack[:] = [x.sum().expand(pairs) + 7]


@pytest.fixture
def restore_impl():
    previous = get_impl()
    yield
    set_impl(previous)


def test_interface_is_abstract():
    with pytest.raises(TypeError):
        DecompositionInterface()


def test_reexported_from_package():
    assert fwdecomp.DecompositionInterface is DecompositionInterface
    assert fwdecomp.Registerer is Registerer
    assert fwdecomp.get_impl is get_impl and fwdecomp.set_impl is set_impl


def test_import_installs_eager_backend():
    assert isinstance(get_impl(), EagerBackend)


def test_registerer_sets_impl(restore_impl):
    impl = Recording()
    registerer = Registerer(impl)
    assert get_impl() is impl and registerer.impl is impl


def test_set_impl_rejects_non_interface(restore_impl):
    with pytest.raises(TypeError, match="DecompositionInterface"):
        set_impl(object())
    assert isinstance(get_impl(), EagerBackend)


def test_custom_impl_gets_boxed_stack_in_schema_order(restore_impl, enabled):
    impl = Recording()
    set_impl(impl)
    x = torch.randn(4, 3, dtype=torch.float64)
    _, tangent = torch.func.jvp(lambda a: torch.pdist(a, p=3.0), (x,), (torch.ones_like(x),))
    op, stack = impl.calls[0]
    assert op is torch.ops.aten._pdist_forward.default
    assert stack[1] == 3.0 and isinstance(stack[0], torch.Tensor)
    assert torch.equal(tangent, torch.full((6,), 12.0, dtype=torch.float64))  # d(sum x) along ones


def test_impl_without_decomposition_gives_pytorch_error_plus_hint(restore_impl, enabled):
    set_impl(Recording())  # knows _pdist_forward only
    A = torch.eye(3, dtype=torch.float64) * 2
    with pytest.raises(NotImplementedError) as info:
        torch.func.jvp(torch.cholesky, (A,), (A,))
    message = str(info.value)
    assert "Trying to use forward AD with cholesky that does not support it" in message
    assert "aten::cholesky" in message and "register_decomposition" in message


def test_no_impl_error_names_operator_and_fix(restore_impl, enabled):
    set_impl(None)
    x, y = torch.randn(5, 3), torch.randn(4, 3)
    with pytest.raises(NotImplementedError) as info:
        torch.func.jvp(lambda a: torch.cdist(a, y), (x,), (x,))
    message = str(info.value)
    assert "aten::_cdist_forward" in message and "No fwdecomp backend is installed" in message
    # calls without tangents still work with no backend at all
    assert torch.equal(torch.cdist(x, y), torch.cdist(x, y))


def test_autograd_side_alone_errors_gracefully():
    """A build without backends (like PyTorch's lite builds without TorchScript).

    The backends and the decomposition library are made unimportable; the
    autograd side and the interface still import, and a tangent-carrying call
    gets a clear error, not an ImportError or a crash.
    """
    code = textwrap.dedent(
        """
        import importlib.abc, sys, torch

        class NoBackends(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.startswith(("fwdecomp.backends", "fwdecomp.decompositions")):
                    raise ImportError(f"{name} is not in this build")
                return None

        sys.meta_path.insert(0, NoBackends())
        from fwdecomp import autograd, interface
        assert interface.get_impl() is None
        assert not any(m.startswith("fwdecomp.backends") for m in sys.modules)
        op = torch.ops.aten._cdist_forward.default
        autograd.install(op)
        x, y = torch.randn(5, 3), torch.randn(4, 3)
        plain = torch.cdist(x, y)
        try:
            torch.func.jvp(lambda a: torch.cdist(a, y), (x,), (x,))
        except NotImplementedError as e:
            assert "No fwdecomp backend is installed" in str(e), e
            print("graceful")
        autograd.uninstall_all()
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "graceful"


def test_autograd_module_imports_no_backend():
    """Data flows one way: the autograd side knows the interface, never a backend or the registry."""
    import ast
    import inspect

    from fwdecomp import autograd

    tree = ast.parse(inspect.getsource(autograd))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module} | {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    ours = {name for name in imported if name.startswith("fwdecomp")}
    assert ours <= {"fwdecomp", "fwdecomp._torch", "fwdecomp.interface", "fwdecomp.stack"}, ours
