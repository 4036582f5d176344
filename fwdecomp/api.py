"""Switching fwdecomp on and off.

``enable()`` installs the autograd-side kernels for every operator that has a
decomposition or a JVP rule and lacks a native forward formula on the running
PyTorch and, in strict mode (the default), for every custom operator that has
neither (so a tangent reaching one raises instead of vanishing; see
:mod:`fwdecomp.custom_ops`); ``disable()`` removes them and the hooks that
notice operators defined meanwhile, restoring PyTorch exactly. Both are
idempotent and thread-safe. While enabled, registering or unregistering a
decomposition or rule, defining a custom operator or registering a kernel
for one takes effect at once.

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

from fwdecomp import autograd, custom_ops, jvp_rules, registry, zero_tensors
from fwdecomp._torch import OpOverload, qualified_name, schema_of
from fwdecomp.formulas import native_forward_formula

__all__ = ["covered_operators", "disable", "enable", "enabled", "is_enabled", "is_strict", "needs_override"]

_lock = threading.RLock()
_enabled = False
_strict = True


def needs_override(op: OpOverload) -> bool:
    """Whether fwdecomp should route ``op``: it lacks a native forward formula (or we cannot tell)."""
    return native_forward_formula(op).status != "native"


# Operators defined, or given new kernels, while enabled (custom_ops.DefinitionWatcher).
# The kernels fwdecomp installs call the autograd kernel they found at install time,
# so a kernel registered later means installing afresh. fwdecomp's own registrations
# (made while syncing) are not news.
class _Syncing(threading.local):
    active = False


_syncing = _Syncing()


def _wanted(op: OpOverload) -> bool:
    registered = registry.lookup(op) is not None or jvp_rules.lookup(op) is not None
    if not registered and not (_strict and custom_ops.is_user_operator(op) and custom_ops.can_carry_tangents(op)):
        return False
    return needs_override(op)


def _sync(op: OpOverload) -> None:
    previous, _syncing.active = _syncing.active, True  # our own Library.impl calls are not news
    try:
        if _wanted(op):
            autograd.install(op)
        else:
            autograd.uninstall(op)
    finally:
        _syncing.active = previous


def _on_registry_change(event: str, op: OpOverload) -> None:
    with _lock:
        if _enabled:
            _sync(op)


registry.subscribe(_on_registry_change)
jvp_rules.subscribe(_on_registry_change)


def _on_define(op: OpOverload) -> None:
    with _lock:
        if not _enabled or _syncing.active:
            return
        name = qualified_name(op)
        for stale in autograd.installed():  # an earlier operator of that name, since destroyed
            if stale is not op and qualified_name(stale) == name:
                autograd.uninstall(stale)
        _sync(op)


def _on_kernels_changed(qualname: str) -> None:
    with _lock:
        if not _enabled or _syncing.active:
            return
        for op in autograd.installed():
            if schema_of(op).name == qualname:
                autograd.uninstall(op)  # then install afresh: the new kernel is the one to call
                _sync(op)


def _sync_all() -> None:
    ops = {*registry.operators(), *jvp_rules.operators(), *autograd.installed()}
    if _strict:
        ops.update(custom_ops.user_operators())
    for op in sorted(ops, key=qualified_name):
        _sync(op)


def _on_library_loaded() -> None:
    with _lock:
        if _enabled:
            _sync_all()


_watcher = custom_ops.DefinitionWatcher(_on_define, _on_kernels_changed, _on_library_loaded)


def enable(strict: bool = True) -> None:
    """Route forward AD through decompositions and JVP rules for operators PyTorch cannot differentiate forward.

    Calls without tangents still go to PyTorch's own kernels. With
    ``strict=True`` (the default) a custom operator that has neither a
    decomposition nor a JVP rule raises ``NotImplementedError`` when a call
    carries tangents into it and would lose them, instead of PyTorch's silent
    ``None`` / zero tangents; ``strict=False`` keeps PyTorch's behaviour for
    those. Calling ``enable`` again switches the mode and looks
    for custom operators defined since (C++ extensions imported meanwhile).

    Example:
        >>> import torch, fwdecomp
        >>> fwdecomp.enable()
        >>> A = torch.eye(3, dtype=torch.float64) * 4
        >>> _, t = torch.func.jvp(torch.cholesky, (A,), (torch.eye(3, dtype=torch.float64),))
        >>> t.diagonal()
        tensor([0.2500, 0.2500, 0.2500], dtype=torch.float64)
        >>> fwdecomp.disable()
    """
    global _enabled, _strict
    with _lock:
        previous = _strict
        _strict = bool(strict)
        try:
            _sync_all()
            zero_tensors.install()
            _watcher.start()
        except BaseException:
            _strict = previous
            if not _enabled:
                _watcher.stop()
                zero_tensors.uninstall()
                autograd.uninstall_all()
            raise
        _enabled = True


def disable() -> None:
    """Remove every kernel and hook fwdecomp installed; PyTorch is exactly as before."""
    global _enabled
    with _lock:
        _watcher.stop()
        zero_tensors.uninstall()
        autograd.uninstall_all()
        _enabled = False


def is_enabled() -> bool:
    """Whether fwdecomp is enabled."""
    return _enabled


def is_strict() -> bool:
    """Whether custom operators without a decomposition or rule raise on tangents (see :func:`enable`)."""
    return _enabled and _strict


@contextlib.contextmanager
def enabled(strict: bool = True) -> Iterator[None]:
    """Enable fwdecomp inside a ``with`` block; on exit, restore the previous state (and mode)."""
    with _lock:
        was_enabled, was_strict = _enabled, _strict
        enable(strict)
    try:
        yield
    finally:
        with _lock:
            if not was_enabled:
                disable()
            elif was_strict != strict:
                enable(was_strict)


def covered_operators() -> list[OpOverload]:
    """The operators fwdecomp currently routes (empty while disabled)."""
    return autograd.installed()
