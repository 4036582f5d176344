"""The compiled router (fwdecomp/csrc/router.cpp): same answers as the Python kernels, less cost without tangents.

Most of the suite runs with whatever router ``FWDECOMP_ROUTER`` picks (``auto``: the compiled one where it
builds). Here each behaviour is checked with both, side by side: the results must be the same bits, and
only the compiled router may skip the Python kernel on calls without tangents.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.autograd import forward_ad
from torch.func import hessian, jacfwd, jvp, vmap

import fwdecomp
from fwdecomp import _torch, autograd, router

aten = torch.ops.aten

_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None and shutil.which("ninja") is not None
needs_compiler = pytest.mark.skipif(not _COMPILER, reason="no C++ compiler or ninja on this machine")


@pytest.fixture(params=["native", "python"])
def kind(request):
    """fwdecomp's kernels installed with the compiled router, then with the Python kernels alone."""
    if request.param == "native" and not _COMPILER:
        pytest.skip("no C++ compiler or ninja on this machine")
    with router.using(request.param):
        assert (router.native() is not None) == (request.param == "native")
        yield request.param


def _dumps() -> dict[str, str]:
    return {name: _torch.dispatch_dump(name) for name in ("aten::_cdist_forward", "aten::cholesky")}


@needs_compiler
def test_the_router_builds_and_loads_where_a_compiler_exists():
    path = router.build()
    assert path.is_file() and path == router.library_path()
    assert torch.__version__.replace("+", "_") in str(path.parent)
    assert torch.ops.fwdecomp_router.open_routes() >= 0


@pytest.mark.parametrize("value", ["auto", "native", "python", " Python "])
def test_mode_reads_the_environment(value, monkeypatch):
    monkeypatch.setenv("FWDECOMP_ROUTER", value)
    assert router.mode() == value.strip().lower()


def test_an_unknown_mode_is_refused_with_the_choices(monkeypatch):
    monkeypatch.setenv("FWDECOMP_ROUTER", "fast")
    with pytest.raises(ValueError, match="FWDECOMP_ROUTER='fast': use one of auto, native, python"):
        router.mode()
    with pytest.raises(ValueError, match=r"router.using\('fast'\): use 'native' or 'python'"):
        with router.using("fast"):
            pass


def test_every_autograd_key_gets_a_route_and_disable_removes_them(kind):
    before = _dumps()
    fwdecomp.enable()
    try:
        dump = _torch.dispatch_dump("aten::_cdist_forward")
        for key in autograd.AUTOGRAD_KEYS:
            line = next(line for line in dump.splitlines() if line.startswith(f"{key}:"))
            assert ("router.cpp" in line) == (kind == "native"), line
        if kind == "native":
            assert torch.ops.fwdecomp_router.open_routes() == len(autograd.AUTOGRAD_KEYS) * len(
                fwdecomp.covered_operators()
            )
    finally:
        fwdecomp.disable()
    assert _dumps() == before
    if kind == "native":
        assert torch.ops.fwdecomp_router.open_routes() == 0


def test_a_failed_install_leaves_no_route_behind(kind, monkeypatch):
    before = _dumps()
    op = aten._cdist_forward.default
    registered = []

    def failing_impl(self, name, fn, key, **kwargs):
        if len(registered) == 3:
            raise RuntimeError("registration refused")
        registered.append(key)
        return real_impl(self, name, fn, key, **kwargs)

    real_impl = torch.library.Library.impl
    monkeypatch.setattr(torch.library.Library, "impl", failing_impl)
    with pytest.raises(RuntimeError, match="registration refused"):
        autograd.install(op)
    assert not autograd.is_installed(op)
    assert _dumps() == before
    if kind == "native":
        assert torch.ops.fwdecomp_router.open_routes() == 0


def _counting_kernels(monkeypatch) -> list[str]:
    """Record each call of fwdecomp's Python kernels (installed from now on)."""
    calls: list[str] = []
    make = autograd._make_kernel

    def counting(op, original):
        kernel = make(op, original)

        def counted(keyset, *args, **kwargs):
            calls.append(_torch.qualified_name(op))
            return kernel(keyset, *args, **kwargs)

        return counted

    monkeypatch.setattr(autograd, "_make_kernel", counting)
    return calls


def test_only_calls_with_tangents_reach_the_python_kernel_through_the_router(kind, monkeypatch):
    calls = _counting_kernels(monkeypatch)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 3, dtype=torch.float64)
    with fwdecomp.enabled():
        out = torch.cdist(x, y, p=1.5)  # no tangent: reverse mode as PyTorch does it
        torch.autograd.grad(out.sum(), x)
        plain = len(calls)
        with forward_ad.dual_level():
            torch.cdist(x, y, p=1.5)  # a level is open, still no tangent
            level_open = len(calls)
            torch.cdist(forward_ad.make_dual(x.detach(), torch.ones_like(x)), y, p=1.5)
    if kind == "native":
        assert plain == level_open == 0
    else:
        assert plain >= 1 and level_open > plain
    assert calls[level_open:] and calls[level_open] == "aten::_cdist_forward"


def _cdist(a, b):
    return torch.cdist(a, b, p=1.5)


def _results() -> list[torch.Tensor]:
    torch.manual_seed(1)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    v = torch.randn_like(x)
    A = torch.randn(4, 4, dtype=torch.float64)
    A = A @ A.mT + 4 * torch.eye(4, dtype=torch.float64)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, v)
        fw = forward_ad.unpack_dual(_cdist(dual, y)).tangent
    xg = x.clone().requires_grad_()
    with forward_ad.dual_level():
        out = _cdist(forward_ad.make_dual(xg, v), y)
        (through,) = torch.autograd.grad(forward_ad.unpack_dual(out).tangent.sum(), xg)
    return [
        fw,
        jvp(lambda a: _cdist(a, y), (x,), (v,))[1],
        jacfwd(lambda a: _cdist(a, y))(x),
        hessian(lambda a: _cdist(a, y).pow(2).sum())(x),
        vmap(lambda t: jvp(lambda a: _cdist(a, y), (x,), (t,))[1])(torch.stack([v, 2 * v])),
        jvp(lambda a: jvp(lambda b: _cdist(b, y), (a,), (v,))[1], (x,), (v,))[1],  # nested levels
        through,  # reverse mode through the decomposed path
        jvp(torch.linalg.cholesky, (A,), (torch.eye(4, dtype=torch.float64),))[1],
    ]


@needs_compiler
def test_the_router_gives_the_python_kernels_bits_under_every_transform():
    outputs = {}
    for kind in ("python", "native"):
        with router.using(kind), fwdecomp.enabled():
            assert (router.native() is not None) == (kind == "native")
            outputs[kind] = _results()
    for native, python in zip(outputs["native"], outputs["python"]):
        assert torch.equal(native, python)


@torch.library.custom_op("fwdtest_router::weighted_sum", mutates_args=())
def weighted_sum(xs: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    return torch.stack(xs).mul(w).sum(0)


@torch.library.custom_op("fwdtest_router::first_present", mutates_args=())
def first_present(xs: list[torch.Tensor | None]) -> torch.Tensor:
    return next(x for x in xs if x is not None).exp()


def test_tangents_inside_tensor_lists_are_seen(kind):
    fwdecomp.register_decomposition("fwdtest_router::weighted_sum")(lambda xs, w: sum(x * w for x in xs))
    fwdecomp.register_decomposition("fwdtest_router::first_present")(
        lambda xs: next(x for x in xs if x is not None).exp()
    )
    a, b, w = torch.randn(3), torch.randn(3), torch.randn(3)
    with fwdecomp.enabled():
        _, tangent = jvp(lambda t: weighted_sum([a, t], w), (b,), (torch.ones(3),))
        _, present = jvp(lambda t: first_present([None, t]), (b,), (torch.ones(3),))
    torch.testing.assert_close(tangent, w)
    torch.testing.assert_close(present, b.exp())


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


_STATUS = textwrap.dedent("""
    import torch, fwdecomp
    from fwdecomp import router
    print(router.status())
    x, y = torch.randn(5, 3), torch.randn(4, 3)
    with fwdecomp.enabled():
        print(torch.func.jvp(lambda a: torch.cdist(a, y), (x,), (x,))[1].shape)
""")


def test_without_a_compiler_auto_mode_falls_back_and_says_why(tmp_path):
    result = _run(_STATUS, FWDECOMP_ROUTER="auto", FWDECOMP_CACHE=str(tmp_path), CXX="/nonexistent/c++")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("python router: the compiled router could not be built or loaded (")
    assert "torch.Size([5, 4])" in result.stdout


def test_without_a_compiler_native_mode_raises_and_says_what_to_do(tmp_path):
    result = _run(_STATUS, FWDECOMP_ROUTER="native", FWDECOMP_CACHE=str(tmp_path), CXX="/nonexistent/c++")
    assert result.returncode != 0
    assert "RouterUnavailableError: fwdecomp: FWDECOMP_ROUTER=native, but the compiled router" in result.stderr
    assert "unset FWDECOMP_ROUTER" in result.stderr


def test_python_mode_builds_and_loads_nothing(tmp_path):
    result = _run(
        _STATUS + "print(hasattr(torch.ops.fwdecomp_router, 'begin'))\n",
        FWDECOMP_ROUTER="python",
        FWDECOMP_CACHE=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "python router: FWDECOMP_ROUTER=python"
    assert result.stdout.splitlines()[-1] == "False" and not any(tmp_path.iterdir())


@needs_compiler
def test_a_built_router_is_loaded_from_the_cache_by_the_next_process():
    cache = os.environ.get("FWDECOMP_CACHE")
    router.build()
    env = {"FWDECOMP_ROUTER": "native"} | ({"FWDECOMP_CACHE": cache} if cache else {})
    result = _run(_STATUS, **env, CXX="/nonexistent/c++")  # no compiler needed any more
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"native router ({router.library_path()}): loaded from the cache")


@needs_compiler
def test_building_does_not_override_python_mode(monkeypatch):
    monkeypatch.setenv("FWDECOMP_ROUTER", "python")
    monkeypatch.setattr(router, "_status", None)
    router.build()
    assert router.status().kind == "python" and router.native() is None
    with router.using("native"):
        assert router.native() is not None


@needs_compiler
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_calls_take_the_same_routes(monkeypatch):
    """AutogradCUDA: plain calls skip Python with the router; tangents give the Python kernels' bits."""
    x = torch.randn(6, 3, dtype=torch.float64, device="cuda")
    y = torch.randn(5, 3, dtype=torch.float64, device="cuda")
    v = torch.randn_like(x)
    tangents = {}
    for kind in ("python", "native"):
        calls = _counting_kernels(monkeypatch)
        with router.using(kind), fwdecomp.enabled():
            plain = torch.cdist(x, y, p=1.5)
            plain_calls = len(calls)
            tangents[kind] = jvp(lambda a: torch.cdist(a, y, p=1.5), (x,), (v,))[1]
        assert torch.equal(plain, torch.cdist(x, y, p=1.5))
        assert (plain_calls == 0) == (kind == "native") and len(calls) > plain_calls
        monkeypatch.undo()
    assert torch.equal(tangents["native"], tangents["python"])
