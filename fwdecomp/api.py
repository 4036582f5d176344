"""Switching fwdecomp on and off.

``enable()`` installs the autograd-side kernels for every registered
operator that lacks a native forward formula on the running PyTorch;
``disable()`` removes them, restoring the dispatcher exactly. Both are
idempotent and thread-safe. While enabled, registering or unregistering a
decomposition takes effect at once.

Example:
    >>> import torch, fwdecomp
    >>> x, y, v = torch.randn(5, 3), torch.randn(4, 3), torch.randn(5, 3)
    >>> with fwdecomp.enabled():
    ...     out, tangent = torch.func.jvp(lambda a: torch.cdist(a, y), (x,), (v,))
    >>> tangent.shape
    torch.Size([5, 4])
    >>> fwdecomp.is_enabled()
    False
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from fwdecomp import autograd, registry
from fwdecomp._torch import OpOverload
from fwdecomp.formulas import native_forward_formula

__all__ = ["covered_operators", "disable", "enable", "enabled", "is_enabled", "needs_override"]

_lock = threading.RLock()
_enabled = False


def needs_override(op: OpOverload) -> bool:
    """Whether fwdecomp should route ``op``: it lacks a native forward formula (or we cannot tell)."""
    return native_forward_formula(op).status != "native"


def _sync(op: OpOverload) -> None:
    if registry.lookup(op) is not None and needs_override(op):
        autograd.install(op)
    else:
        autograd.uninstall(op)


def _on_registry_change(event: str, op: OpOverload) -> None:
    with _lock:
        if _enabled:
            _sync(op)


registry.subscribe(_on_registry_change)


def enable() -> None:
    """Route forward AD through decompositions for operators PyTorch cannot differentiate forward.

    Calls without tangents still go to PyTorch's own kernels.

    Example:
        >>> import torch, fwdecomp
        >>> fwdecomp.enable()
        >>> A = torch.eye(3, dtype=torch.float64) * 4
        >>> _, t = torch.func.jvp(torch.cholesky, (A,), (torch.eye(3, dtype=torch.float64),))
        >>> t.diagonal()
        tensor([0.2500, 0.2500, 0.2500], dtype=torch.float64)
        >>> fwdecomp.disable()
    """
    global _enabled
    with _lock:
        if _enabled:
            return
        try:
            for op in registry.operators():
                _sync(op)
        except BaseException:
            autograd.uninstall_all()
            raise
        _enabled = True


def disable() -> None:
    """Remove every kernel fwdecomp installed; PyTorch's dispatcher is exactly as before."""
    global _enabled
    with _lock:
        autograd.uninstall_all()
        _enabled = False


def is_enabled() -> bool:
    """Whether fwdecomp is enabled."""
    return _enabled


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """Enable fwdecomp inside a ``with`` block; on exit, restore the previous state."""
    with _lock:
        was_enabled = _enabled
        enable()
    try:
        yield
    finally:
        if not was_enabled:
            disable()


def covered_operators() -> list[OpOverload]:
    """The operators fwdecomp currently routes (empty while disabled)."""
    return autograd.installed()
