"""The autograd side: per-operator kernels that route tangent-carrying calls to a backend.

For each operator it is asked to cover, this module registers one Python
kernel per autograd dispatch key (``AutogradCPU``, ``AutogradCUDA``,
``AutogradMeta``, ...). The kernel does what PyTorch's generated
``VariableType`` code does for the few operators that use its forward-AD
decomposition mechanism:

- no input carries a forward tangent: call PyTorch's original kernel for that
  key, unchanged (so plain calls and reverse mode behave exactly as before);
- some input does: ask :func:`fwdecomp.interface.get_impl` for the backend and
  run the operator's decomposition there as a boxed call, so tangents flow
  through operators that have formulas (and reverse mode, if needed, records
  the decomposed graph). When the backend has none, raise where a tangent
  would be lost: a call that writes into a floating-point tensor raises before
  it runs; otherwise PyTorch's kernel runs, and a floating-point result without
  a tangent raises (integer results need none; an operator whose own autograd
  kernel differentiates it keeps working).

Where the compiled router is available (:mod:`fwdecomp.router`), a C++ kernel
registered in front of each Python kernel takes the first case itself: a call
without tangents never enters Python.

This module depends on :mod:`fwdecomp.interface` only, never on a backend.
Uninstalling destroys the registrations, which restores the dispatcher
entries exactly.

Example:
    >>> import torch
    >>> from fwdecomp import autograd
    >>> op = torch.ops.aten._pdist_forward.default
    >>> autograd.install(op)
    >>> autograd.is_installed(op)
    True
    >>> autograd.uninstall(op)
    >>> autograd.is_installed(op)
    False
"""

from __future__ import annotations

import collections
import re
import threading
import time
import warnings
from typing import Any, Callable

import torch

from fwdecomp import _torch, router
from fwdecomp._torch import (
    OpOverload,
    dual_level_active,
    forward_ad_level,
    namespace,
    primal_of,
    qualified_name,
    schema_of,
    tangent_of,
)
from fwdecomp.interface import get_impl
from fwdecomp.stack import arguments_to_stack, stack_to_results

__all__ = [
    "AUTOGRAD_KEYS",
    "carries_tangent",
    "install",
    "installed",
    "is_installed",
    "tangent_free_calls",
    "uninstall",
    "uninstall_all",
]

#: The per-backend autograd dispatch keys fwdecomp registers its kernels for.
#: The alias key "Autograd" cannot be read back, so each backend key is named.
#: "AutogradOther" serves backends without a key of their own, and is the key
#: functorch's wrappers of meta tensors dispatch to.
AUTOGRAD_KEYS: tuple[str, ...] = (
    "AutogradCPU",
    "AutogradCUDA",
    "AutogradMeta",
    "AutogradOther",
    "AutogradXPU",
    "AutogradMPS",
    "AutogradPrivateUse1",
)

_BACKEND_HINT = (
    "No fwdecomp backend is installed. `import fwdecomp` installs the eager backend; "
    "or install one yourself with fwdecomp.interface.set_impl(...) / Registerer(...)."
)


def carries_tangent(values: Any) -> bool:
    """Whether any tensor in ``values`` (nested lists/tuples included) has a forward tangent."""
    for value in values:
        if isinstance(value, torch.Tensor):
            if tangent_of(value) is not None:
                return True
        elif isinstance(value, (list, tuple)) and carries_tangent(value):
            return True
    return False


def _not_implemented_message(op: OpOverload) -> str:
    qualname = qualified_name(op)
    custom = namespace(op) != "aten"
    if custom:
        head = (
            f"fwdecomp: the custom operator {qualname} was called with forward-AD tangents, but nothing "
            "defines its forward-mode derivative, so PyTorch alone would silently drop them (None under "
            "torch.autograd.forward_ad, zeros under torch.func.jvp)."
        )
    else:
        name = schema_of(op).name.split("::", 1)[1]
        head = f"Trying to use forward AD with {name} that does not support it because it has not been implemented yet."
    return (
        f"{head}\nfwdecomp: the installed backend ({type(get_impl()).__name__}) has neither a decomposition "
        f"nor a JVP rule for {qualname}. Register one of them:\n"
        f"  @fwdecomp.register_decomposition({qualname!r}): {qualname} written with PyTorch operators "
        "that have forward-AD formulas, or\n"
        f"  @fwdecomp.register_jvp({qualname!r}): a rule (primals, tangents) -> (outputs, output_tangents)."
        + ("\nfwdecomp.enable(strict=False) keeps PyTorch's behaviour for custom operators instead." if custom else "")
    )


def _differentiable(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() or value.is_complex()
    return isinstance(value, (list, tuple)) and any(_differentiable(v) for v in value)


def _lost_tangent(value: Any) -> bool:
    """Whether a floating-point or complex tensor in ``value`` came back without a tangent."""
    if isinstance(value, torch.Tensor):
        return _differentiable(value) and tangent_of(value) is None
    return isinstance(value, (list, tuple)) and any(_lost_tangent(v) for v in value)


def _strip(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return primal_of(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_strip(v) for v in value)
    return value


#: How PyTorch says an operator (VariableType) or an autograd.Function has no forward-mode formula.
_FORWARD_AD_MISSING = re.compile(r"forward[ -](mode )?AD")


def _without_decomposition(
    op: OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any], original: Callable[..., Any] | None
) -> Any:
    """No decomposition: raise where a tangent would be lost, as ``VariableType`` does.

    A call that writes into a floating-point or complex argument raises before
    it runs, so nothing is modified. Otherwise PyTorch's kernel runs with the
    tangents (an operator may differentiate itself: a Python autograd kernel
    made of PyTorch operations, say); a floating-point or complex result that
    comes back without a tangent raises. When PyTorch refuses the tangents, the
    kernel runs on the primals: integer or boolean results need no tangent, so
    they are returned; others raise.
    """
    schema = schema_of(op)
    stack = arguments_to_stack(schema, args, kwargs)
    writes = any(
        a.alias_info is not None and a.alias_info.is_write and _differentiable(value)
        for a, value in zip(schema.arguments, stack)
    )
    if original is None or writes:
        raise NotImplementedError(_not_implemented_message(op))
    try:
        results = original(args, kwargs)
    except NotImplementedError as error:
        if not _FORWARD_AD_MISSING.search(str(error)):
            raise
        results = original(_strip(args), {k: _strip(v) for k, v in kwargs.items()})
        if _differentiable(results if isinstance(results, (list, tuple)) else [results]):
            raise NotImplementedError(_not_implemented_message(op)) from error
        return results
    if _lost_tangent(results if isinstance(results, (list, tuple)) else [results]):
        raise NotImplementedError(_not_implemented_message(op))
    return results


class _Recursion(threading.local):
    def __init__(self) -> None:
        self.active: dict[OpOverload, int] = {}


_recursion = _Recursion()


def decompose(
    op: OpOverload,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    original: Callable[[tuple[Any, ...], dict[str, Any]], Any] | None = None,
) -> Any:
    """Run ``op``'s decomposition through the installed backend (boxed), return its results.

    ``original(args, kwargs)`` calls PyTorch's kernel: used when the backend
    has no decomposition, to see whether the call loses a tangent.
    """
    impl = get_impl()
    if impl is None:
        raise NotImplementedError(
            f"fwdecomp: {qualified_name(op)} was called with forward-AD tangents and has no "
            f"native forward formula. {_BACKEND_HINT}"
        )
    schema = schema_of(op)
    if not impl.has_decomposition(schema):
        return _without_decomposition(op, args, kwargs, original)
    depth = _recursion.active.get(op, 0)
    if depth >= 8:
        raise RecursionError(
            f"fwdecomp: the decomposition of {qualified_name(op)} calls {qualified_name(op)} "
            "itself with tangents (8 levels deep); a decomposition must be written in other "
            "operators."
        )
    stack = arguments_to_stack(schema, args, kwargs)
    _recursion.active[op] = depth + 1
    try:
        impl.run_decomposition(op, stack)
    finally:
        _recursion.active[op] = depth
    return stack_to_results(schema, stack)


class _PlainScope(threading.local):
    def __init__(self) -> None:
        self.level: tuple[int, int | None] | None = None


_plain_scope = _PlainScope()


def _level() -> tuple[int, int | None]:
    return forward_ad_level(), _torch.functorch_level()


class tangent_free_calls:  # lower case: used like a function, ``with tangent_free_calls(): ...``
    """Within this block, calls at the current forward-AD (and ``torch.func``) level carry no tangent.

    What a JVP rule promises for the operators it calls on primals: the kernels then skip
    the per-tensor tangent checks. Calls at another level (an outer ``torch.func.jvp``
    around the rule's own level) are checked as always. (A class, not a generator-based
    context manager: it is entered on every rule call, and costs a third as much.)
    """

    __slots__ = ("_previous",)

    def __enter__(self) -> None:
        self._previous, _plain_scope.level = _plain_scope.level, _level()

    def __exit__(self, *exc_info: object) -> None:
        _plain_scope.level = self._previous


def _make_kernel(op: OpOverload, original: Any) -> Callable[..., Any]:
    call_original = original.call_boxed

    def kernel(keyset: Any, *args: Any, **kwargs: Any) -> Any:
        # No forward-AD level open (torch.func.jvp opens one too): no input can carry a
        # tangent, and the per-tensor checks are skipped (most of the routing's cost).
        if _plain_scope.level is not None and _plain_scope.level == _level():
            return call_original(keyset, *args, **kwargs)
        if dual_level_active() and (carries_tangent(args) or carries_tangent(kwargs.values())):
            return decompose(op, args, kwargs, lambda a, k: call_original(keyset, *a, **k))
        return call_original(keyset, *args, **kwargs)

    kernel.__name__ = f"fwdecomp_{qualified_name(op).replace('::', '_').replace('.', '_')}"
    kernel.__qualname__ = kernel.__name__
    return kernel


#: Seconds a removed kernel is kept alive. Another thread may have looked the kernel up and be
#: waiting for the GIL inside it when it is removed (the dispatcher hands out a reference, not
#: ownership): freeing it then crashes that thread. Holding it a while makes removal safe.
RETIRE_SECONDS = 30.0
_retired: collections.deque[tuple[float, list[Any]]] = collections.deque()


def _retire(handles: list[Any]) -> None:
    now = time.monotonic()
    _retired.append((now, handles))
    while _retired and now - _retired[0][0] > RETIRE_SECONDS:
        _retired.popleft()


class _Override:
    """The registrations that route one operator: one library, one kernel per key.

    With the compiled router (:mod:`fwdecomp.router`), each key also gets a route: a C++
    kernel in front of the Python one that sends calls without tangents straight to
    PyTorch's kernel.
    """

    def __init__(self, op: OpOverload) -> None:
        self.op = op
        name = schema_of(op).name.split("::", 1)[1]
        overload = schema_of(op).overload_name
        self.library = _torch.new_library(_torch.namespace(op))
        self.handles: list[Any] = []  # our kernels, owned here too (see RETIRE_SECONDS)
        self.routes: list[int] = []
        self.router = router.native()
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
                for key in AUTOGRAD_KEYS:
                    original = _torch.original_kernel(op, key)
                    route = None
                    if self.router is not None:
                        route = router.begin(self.router, op, key)
                        self.routes.append(route)
                    self.library.impl(
                        f"{name}.{overload}" if overload else name,
                        _make_kernel(op, original),
                        key,
                        with_keyset=True,
                    )
                    if route is not None:
                        self.router.finish(route)
                    self.handles.append(_torch.original_kernel(op, key))
        except BaseException:
            self._unregister()
            raise

    def _unregister(self) -> None:
        for route in self.routes:  # the routers first: they call the Python kernels
            self.router.end(route)
        _torch.destroy_library(self.library)

    def remove(self) -> None:
        self._unregister()
        _retire(self.handles)


_lock = threading.RLock()
_overrides: dict[OpOverload, _Override] = {}


def install(op: OpOverload) -> None:
    """Route ``op``'s tangent-carrying calls to the backend (idempotent)."""
    with _lock:
        if op not in _overrides:
            _overrides[op] = _Override(op)


def uninstall(op: OpOverload) -> None:
    """Restore ``op``'s original autograd kernels (idempotent)."""
    with _lock:
        override = _overrides.pop(op, None)
        if override is not None:
            override.remove()


def uninstall_all() -> None:
    """Restore every operator this module overrode."""
    with _lock:
        for op in list(_overrides):
            uninstall(op)


def is_installed(op: OpOverload) -> bool:
    """Whether ``op`` currently routes tangent-carrying calls to the backend."""
    return op in _overrides


def installed() -> list[OpOverload]:
    """The operators currently routed, sorted by name."""
    with _lock:
        return sorted(_overrides, key=qualified_name)
