"""Fast ZeroTensor kernels for the arithmetic forward AD does on absent tangents.

When an operation mixes a tensor that carries a tangent with one that does not
(``dual * plain``), PyTorch's forward formula stands a ``ZeroTensor`` in for the
missing tangent and computes, e.g., ``self_t * other + other_t * self``. The
``ZeroTensor`` kernels of ``mul``, ``add``, ``sub`` and ``div`` (torch 2.11,
2.13) find the result's shape and dtype by running the operator's meta kernel,
which is written in Python: ~130-300 µs per operation whatever the size,
against ~5 µs for ``dual * dual``. A decomposition runs dozens of such
operations (its intermediate constants carry no tangent), and so does any
forward-AD code.

While fwdecomp is enabled, these four operators' ``ZeroTensor`` kernels are
replaced by ones that compute the same results (same shape, dtype, device,
values, ``ZeroTensor``-ness) from ``torch.broadcast_shapes`` and
``torch.result_type``: ``dual * plain`` ~260 -> ~45 µs. Only calls with a
``ZeroTensor`` operand reach them. ``tests/test_zero_tensors.py`` compares them
with PyTorch's over dtypes, broadcasting, wrapped numbers and ``alpha``;
``disable()`` restores PyTorch's kernels.

Example:
    >>> import torch, fwdecomp
    >>> from torch.autograd import forward_ad
    >>> with fwdecomp.enabled(), forward_ad.dual_level():
    ...     x = forward_ad.make_dual(torch.ones(2), torch.ones(2))
    ...     forward_ad.unpack_dual(x * torch.full((2,), 3.0)).tangent
    tensor([3., 3.])
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Callable

import torch

from fwdecomp import _torch

__all__ = ["KERNELS", "install", "is_installed", "uninstall"]

_aten = torch.ops.aten


# An operand may arrive as a Python number: a wrapped number (``dual * 2.0``), which
# PyTorch's boxing hands to a Python kernel unwrapped. It counts as a 0-d CPU tensor
# for the shape and device, and as a number for type promotion (``torch.result_type``).


def _is_zero(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value._is_zerotensor()


def _shape(value: Any) -> torch.Size:
    return value.shape if isinstance(value, torch.Tensor) else torch.Size()


def _device(value: Any) -> torch.device:
    return value.device if isinstance(value, torch.Tensor) else torch.device("cpu")


def _result(self: Any, other: Any, true_division: bool = False) -> dict[str, Any]:
    """Shape, dtype and device of the elementwise result (what the meta kernel would say)."""
    left, right = _shape(self), _shape(other)
    shape = left if left == right else torch.broadcast_shapes(left, right)
    dtype = torch.result_type(self, other)
    if true_division and not (dtype.is_floating_point or dtype.is_complex):
        dtype = torch.get_default_dtype()
    # PyTorch's rule: the first operand's device unless it is the CPU
    device = _device(other) if _device(self).type == "cpu" else _device(self)
    return {"size": shape, "dtype": dtype, "device": device}


def _zeros(result: dict[str, Any]) -> torch.Tensor:
    return torch._efficientzerotensor(result["size"], dtype=result["dtype"], device=result["device"])


def _copy_like(value: Any, result: dict[str, Any]) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        return torch.full(result["size"], value, dtype=result["dtype"], device=result["device"])
    return value.expand(result["size"]).to(dtype=result["dtype"], device=result["device"], copy=True)


def _mul(self: Any, other: Any) -> torch.Tensor:
    return _zeros(_result(self, other))


def _add(self: Any, other: Any, *, alpha: Any = 1) -> torch.Tensor:
    result = _result(self, other)
    if not _is_zero(self):
        return _copy_like(self, result)
    if _is_zero(other):
        return _zeros(result)
    out = _copy_like(other, result)
    return out if alpha == 1 else _aten.mul.Scalar(out, alpha)


def _sub(self: Any, other: Any, *, alpha: Any = 1) -> torch.Tensor:
    return _add(self, other, alpha=-alpha)


def _div(self: Any, other: Any) -> torch.Tensor:
    result = _result(self, other, true_division=True)
    if _is_zero(self) and not _is_zero(other):
        return _zeros(result)
    # 0 / 0 is NaN, x / 0 infinity (PyTorch's kernel: not signed)
    fill = float("nan") if _is_zero(self) else float("inf")
    return torch.full(result["size"], fill, dtype=result["dtype"], device=result["device"])


#: Operator overload name -> its ZeroTensor kernel.
KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "mul.Tensor": _mul,
    "add.Tensor": _add,
    "sub.Tensor": _sub,
    "div.Tensor": _div,
}

_lock = threading.Lock()
_library: Any = None


def install() -> None:
    """Register the kernels (idempotent)."""
    global _library
    with _lock:
        if _library is not None:
            return
        library = _torch.new_library("aten")
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
                for name, kernel in KERNELS.items():
                    library.impl(name, kernel, "ZeroTensor")
        except BaseException:
            _torch.destroy_library(library)
            raise
        _library = library


def uninstall() -> None:
    """Give the four operators PyTorch's ZeroTensor kernels back (idempotent)."""
    global _library
    with _lock:
        if _library is None:
            return
        _torch.destroy_library(_library)  # (the kernels are module functions: nothing to keep alive)
        _library = None


def is_installed() -> bool:
    """Whether fwdecomp's ZeroTensor kernels are registered."""
    return _library is not None
