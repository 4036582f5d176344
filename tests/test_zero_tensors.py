"""fwdecomp's ZeroTensor kernels compute what PyTorch's do (shape, dtype, device, values, zero-ness)."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from torch.autograd import forward_ad

import fwdecomp
from fwdecomp import _torch, zero_tensors

aten = torch.ops.aten


@contextlib.contextmanager
def kernels(installed: bool):
    was = zero_tensors.is_installed()
    (zero_tensors.install if installed else zero_tensors.uninstall)()
    try:
        yield
    finally:
        (zero_tensors.install if was else zero_tensors.uninstall)()


def _plain(t: torch.Tensor) -> tuple:
    """Everything observable about a result, as plain values."""
    zero = t._is_zerotensor()
    values = torch.zeros(t.shape, dtype=t.dtype) if zero else t.cpu()
    stride = None if zero else t.stride()
    return zero, tuple(t.shape), t.dtype, t.device, stride, values


def _same(a: tuple, b: tuple) -> None:
    assert a[:5] == b[:5], (a[:5], b[:5])
    torch.testing.assert_close(a[5], b[5], rtol=0, atol=0, equal_nan=True)


def _operand(kind: str, shape: tuple, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    if kind == "zero":
        return torch._efficientzerotensor(shape, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(hash((shape, str(dtype))) % 1000)
    transposed = kind == "transposed" and len(shape) >= 2
    stored = (*shape[:-2], shape[-1], shape[-2]) if transposed else shape
    if dtype.is_floating_point or dtype.is_complex:
        value = torch.randn(stored, dtype=torch.float64, generator=gen).to(dtype)
    else:
        value = torch.randint(-3, 4, stored, generator=gen).to(dtype)
    return (value.mT if transposed else value).to(device)


#: CPU always; CUDA where there is one (``benchmarks/gpu.sh`` runs this file on a GPU machine).
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
SHAPES = [((2, 3), (2, 3)), ((2, 3), (3,)), ((1, 3), (2, 1)), ((), (2, 2)), ((0, 3), (3,)), ((3, 3), ())]
DTYPES = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float32),
    (torch.float32, torch.int64),
    (torch.int64, torch.int64),
    (torch.complex64, torch.float64),
    (torch.bfloat16, torch.float16),
]
KINDS = [("zero", "dense"), ("dense", "zero"), ("zero", "zero"), ("zero", "transposed"), ("transposed", "zero")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(zero_tensors.KERNELS))
def test_kernels_equal_pytorchs(name, device):
    op = getattr(aten, name.split(".")[0]).Tensor
    alphas = [{}] if name in ("mul.Tensor", "div.Tensor") else [{}, {"alpha": 2}, {"alpha": -0.5}]
    checked = 0
    for (left, right), (left_dtype, right_dtype), (left_kind, right_kind), kwargs in itertools.product(
        SHAPES, DTYPES, KINDS, alphas
    ):
        if (
            "alpha" in kwargs
            and not isinstance(kwargs["alpha"], int)
            and not (left_dtype.is_floating_point or right_dtype.is_floating_point or left_dtype.is_complex)
        ):
            continue  # a float alpha with an integral result: PyTorch refuses it either way
        a, b = _operand(left_kind, left, left_dtype, device), _operand(right_kind, right, right_dtype, device)
        with kernels(False):
            want = _plain(op(a, b, **kwargs))
        with kernels(True):
            got = _plain(op(a, b, **kwargs))
        _same(got, want)
        checked += 1
    assert checked > 100


def _outcome(op, a, b):
    try:
        return _plain(op(a, b))
    except RuntimeError as error:
        return ("raises", type(error))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(zero_tensors.KERNELS))
def test_mixed_devices_behave_as_pytorchs(name):
    """A CPU operand beside a CUDA one (0-d CPU tensors are allowed there): same device, or same refusal."""
    op = getattr(aten, name.split(".")[0]).Tensor
    checked = 0
    for (left, right), (left_kind, right_kind), (left_device, right_device) in itertools.product(
        [((), (2, 3)), ((2, 3), ()), ((2, 3), (2, 3))], KINDS, [("cpu", "cuda"), ("cuda", "cpu")]
    ):
        a = _operand(left_kind, left, torch.float32, left_device)
        b = _operand(right_kind, right, torch.float32, right_device)
        with kernels(False):
            want = _outcome(op, a, b)
        with kernels(True):
            got = _outcome(op, a, b)
        if want[0] == "raises" or got[0] == "raises":
            assert got == want, (left_kind, left, left_device, right_kind, right, right_device)
        else:
            _same(got, want)
        checked += 1
    assert checked == 30


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_ad_on_device_is_the_same_bits(device, dtype):
    """Forward AD of mixed expressions with the operands on ``device`` (CUDA: through AutogradCUDA)."""
    gen = torch.Generator().manual_seed(0)
    primal = torch.randn(2, 3, generator=gen, dtype=dtype).to(device)
    tangent = torch.randn(2, 3, generator=gen, dtype=dtype).to(device)
    plain = (torch.rand(3, generator=gen, dtype=dtype) + 0.5).to(device)
    scalar = torch.tensor(1.5, dtype=dtype)  # a CPU 0-d tensor beside device tensors
    expressions = {**EXPRESSIONS, "d * cpu scalar": lambda d, p: d * scalar, "cpu scalar / d": lambda d, p: scalar / d}
    expressions.pop("int / d")  # a CPU arange
    for name, expression in expressions.items():
        _same_bits_both_ways(name, expression, primal, tangent, plain)


def test_bad_shapes_raise_both_ways():
    a, b = torch._efficientzerotensor((2, 3)), torch.ones(4)
    for installed in (False, True):
        with kernels(installed), pytest.raises(RuntimeError):
            aten.mul.Tensor(a, b)


EXPRESSIONS = {
    "d * p": lambda d, p: d * p,
    "p * d": lambda d, p: p * d,
    "d * 2.0": lambda d, p: d * 2.0,
    "d + p": lambda d, p: d + p,
    "p - d": lambda d, p: p - d,
    "d - 2 * p": lambda d, p: torch.sub(d, p, alpha=2),
    "d / p": lambda d, p: d / p,
    "p / d": lambda d, p: p / d,
    "1 / d": lambda d, p: 1 / d,
    "addcmul": lambda d, p: torch.addcmul(p, d, p, value=0.5),
    "maximum": lambda d, p: torch.maximum(d, p),
    "pow": lambda d, p: d.abs() ** p,
    "atan2": lambda d, p: torch.atan2(p, d),
    "int / d": lambda d, p: torch.arange(1, 4) / d,
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex128])
def test_forward_ad_tangents_are_the_same_bits(dtype):
    """End to end: forward AD of mixed dual/plain expressions, PyTorch's kernels against fwdecomp's."""
    gen = torch.Generator().manual_seed(0)
    primal = torch.randn(2, 3, generator=gen, dtype=torch.float64).to(dtype)
    tangent = torch.randn(2, 3, generator=gen, dtype=torch.float64).to(dtype)
    plain = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    for name, expression in EXPRESSIONS.items():
        if dtype.is_complex and name in ("maximum", "atan2"):
            continue
        _same_bits_both_ways(name, expression, primal, tangent, plain)


def _same_bits_both_ways(name, expression, primal, tangent, plain):
    """``expression(dual, plain)``'s value and tangent with PyTorch's kernels and with fwdecomp's: the same bits."""
    results = []
    for installed in (False, True):
        with kernels(installed), forward_ad.dual_level():
            out = expression(forward_ad.make_dual(primal, tangent), plain)
            results.append(forward_ad.unpack_dual(out))
    (want, want_t), (got, got_t) = results
    assert got.device == want.device and got_t.device == want_t.device, name
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=name)
    torch.testing.assert_close(got_t, want_t, rtol=0, atol=0, equal_nan=True, msg=name)


def test_enable_installs_and_disable_restores():
    before = _torch.dispatch_dump("aten::mul.Tensor")
    assert not zero_tensors.is_installed()
    with fwdecomp.enabled():
        assert zero_tensors.is_installed()
        assert _torch.dispatch_dump("aten::mul.Tensor") != before
    assert not zero_tensors.is_installed()
    assert _torch.dispatch_dump("aten::mul.Tensor") == before


def test_decomposition_tangent_keeps_its_dtype_under_func_jvp(enabled):
    """PyTorch's func.jvp of ``x * 2.0`` for a 0-d float32 ``x`` gives a float64 tangent; the eager
    backend hands out tangents in their outputs' dtype (the decomposition multiplies by ``scale``)."""
    from fwdecomp import tangent_rules

    op = aten.native_dropout_backward.default
    x, t = torch.randn(()), torch.randn(())
    assert torch.func.jvp(lambda a: a * 2.0, (x,), (t,))[1].dtype == torch.float64  # PyTorch's own
    with tangent_rules.disabled():
        _, tangent = torch.func.jvp(lambda a: op(a, torch.tensor(True), 2.0), (x,), (t,))
    assert tangent.dtype == torch.float32
    torch.testing.assert_close(tangent, 2 * t)
