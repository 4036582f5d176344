"""The decomposition interface: the contract between the autograd side and a backend.

This is the Python form of PyTorch's C++ ``JitDecompInterface``
(``torch/csrc/autograd/jit_decomp_interface.h``). The autograd side
(:mod:`fwdecomp.autograd`) must run decompositions without depending on
whatever prepares them (an eager Python table, a graph tracer, a compiler).
So it only ever asks :func:`get_impl` at run time: a registered
implementation is used; ``None`` means a clear error. Backends register
themselves when imported, with :class:`Registerer` (the PImpl pattern: the
dependency is dynamic, not static).

This module imports nothing from fwdecomp.

Example:
    >>> import torch
    >>> from fwdecomp.interface import DecompositionInterface, Registerer, get_impl, set_impl
    >>> class Nothing(DecompositionInterface):
    ...     def has_decomposition(self, schema):
    ...         return False
    ...     def run_decomposition(self, op, stack):
    ...         raise AssertionError("never called")
    >>> previous = get_impl()
    >>> _ = Registerer(Nothing())
    >>> get_impl().has_decomposition(torch.ops.aten.cholesky.default._schema)
    False
    >>> set_impl(previous)
"""

from __future__ import annotations

import abc
import threading
from typing import Any

import torch

__all__ = ["DecompositionInterface", "Registerer", "get_impl", "set_impl"]


class DecompositionInterface(abc.ABC):
    """What the autograd side needs from a backend: two methods, nothing more."""

    @abc.abstractmethod
    def has_decomposition(self, schema: torch.FunctionSchema) -> bool:
        """Whether this backend can decompose the operator with this schema."""

    @abc.abstractmethod
    def run_decomposition(self, op: torch._ops.OpOverload, stack: list[Any]) -> None:
        """Run the decomposition of ``op`` as a boxed call.

        On entry ``stack`` holds the operator's arguments in schema order
        (defaults filled in). On return it holds the operator's results, in
        the order of the schema's returns, and nothing else.
        """


_lock = threading.Lock()
_impl: DecompositionInterface | None = None


def set_impl(impl: DecompositionInterface | None) -> None:
    """Install ``impl`` as the process-wide decomposition backend (``None`` removes it)."""
    global _impl
    if impl is not None and not isinstance(impl, DecompositionInterface):
        raise TypeError(
            f"set_impl expects a DecompositionInterface or None, got {type(impl).__name__}; "
            "subclass fwdecomp.interface.DecompositionInterface and implement "
            "has_decomposition and run_decomposition"
        )
    with _lock:
        _impl = impl


def get_impl() -> DecompositionInterface | None:
    """The installed backend, or ``None`` when no backend has been installed."""
    return _impl


class Registerer:
    """Installs a backend when constructed, so a backend module registers itself on import.

    Example:
        >>> from fwdecomp.interface import Registerer, get_impl
        >>> from fwdecomp.backends.eager import EagerBackend
        >>> _registerer = Registerer(EagerBackend())
        >>> type(get_impl()).__name__
        'EagerBackend'
    """

    __slots__ = ("impl",)

    def __init__(self, impl: DecompositionInterface) -> None:
        set_impl(impl)
        self.impl = impl
