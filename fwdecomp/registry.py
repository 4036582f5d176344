"""Which decomposition serves which operator overload.

The table is plain data: ``{OpOverload: Decomposition}``. Registration
validates the function against the operator's schema first and changes
nothing when that fails. Listeners (the public API uses one) hear of every
change, so a registration made while fwdecomp is enabled takes effect at once.

Example:
    >>> import torch
    >>> import fwdecomp
    >>> @fwdecomp.register_decomposition("aten::_pdist_forward", replace=True)
    ... def pdist(self, p=2.0):
    ...     return fwdecomp.decompositions.distance.pdist_forward(self, p)
    >>> fwdecomp.registry.lookup(torch.ops.aten._pdist_forward.default).fn is pdist
    True
    >>> fwdecomp.registry.restore_builtin("aten::_pdist_forward")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar

import torch

from fwdecomp._operator_table import Listener, OperatorTable
from fwdecomp._torch import OpOverload, qualified_name
from fwdecomp.contract import check_signature, describe_function
from fwdecomp.overloads import OperatorLike, resolve

__all__ = [
    "Decomposition",
    "DuplicateDecompositionError",
    "Sample",
    "find",
    "lookup",
    "lookup_schema",
    "operators",
    "register_decomposition",
    "restore",
    "restore_builtin",
    "snapshot",
    "subscribe",
    "symmetrize",
    "unregister_decomposition",
]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Sample:
    """One example call of an operator: used by ``fwdecomp audit`` and the tests.

    ``tangents`` says which tensor arguments carry tangents, by position in the
    schema's arguments; ``None`` means every floating-point or complex tensor.
    ``prepare``, if given, maps those tensors to the values actually passed,
    inside every differentiated function (``symmetrize`` for operators that
    read one triangle of a Hermitian matrix, as PyTorch's own OpInfo tests do).
    ``unreliable`` names JVP methods (see :data:`fwdecomp.checks.ALL_METHODS`)
    that cannot serve as a reference for this call, each with the reason; the
    checks skip them (and say why) instead of failing.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    tangents: tuple[int, ...] | None = None
    prepare: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
    unreliable: dict[str, str] = field(default_factory=dict)


def symmetrize(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``(A + A^H) / 2`` for each tensor: a ``Sample.prepare`` for Hermitian inputs."""
    return [(t + t.mH) / 2 for t in tensors]


SampleFn = Callable[[str, torch.dtype], Iterable[Sample]]


@dataclass(frozen=True)
class Decomposition:
    """A function that computes ``op`` from operators that have forward-AD formulas."""

    op: OpOverload
    fn: Callable[..., Any]
    samples: SampleFn | None = None
    dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32)
    builtin: bool = False

    @property
    def name(self) -> str:
        return qualified_name(self.op)


class DuplicateDecompositionError(ValueError):
    """The operator already has a decomposition and ``replace=True`` was not given."""


_table: OperatorTable[Decomposition] = OperatorTable()
_builtins: dict[OpOverload, Decomposition] = {}


def register_decomposition(
    op: OperatorLike,
    *,
    samples: SampleFn | None = None,
    dtypes: Iterable[torch.dtype] = (torch.float64, torch.float32),
    replace: bool = False,
    _builtin: bool = False,
) -> Callable[[F], F]:
    """Register the decorated function as the decomposition of ``op``.

    ``op`` is an ``OpOverload``, an ``OpOverloadPacket`` (every overload) or a
    string ``"ns::name"`` (the default overload) / ``"ns::name.overload"``. The function takes the
    operator's arguments as its schema names them (keyword-only ones by
    keyword) and returns what the operator returns, computed with operators
    that have forward-AD formulas. ``samples(device, dtype)`` optionally yields
    :class:`Sample` calls for ``fwdecomp audit`` to check it numerically.

    Raises ``UnknownOperatorError`` for an unknown operator,
    ``SignatureMismatchError`` when the parameters do not match the schema, and
    ``DuplicateDecompositionError`` when one exists and ``replace`` is false.
    Nothing is registered when any overload fails.

    Example:
        >>> import torch, fwdecomp
        >>> @fwdecomp.register_decomposition("aten::cholesky", replace=True)
        ... def cholesky(self, upper=False):
        ...     lower = torch.linalg.cholesky(self)
        ...     return lower.mH if upper else lower
        >>> fwdecomp.registry.restore_builtin("aten::cholesky")
    """
    overloads = resolve(op)
    dtype_tuple = tuple(dtypes)

    def decorator(fn: F) -> F:
        with _table.lock:
            for overload in overloads:
                check_signature(overload, fn)
                existing = _table.get(overload)
                if existing is not None and not replace and not _builtin:
                    raise DuplicateDecompositionError(
                        f"fwdecomp: {qualified_name(overload)} already has a decomposition "
                        f"({describe_function(existing.fn)}); pass replace=True to "
                        "register_decomposition to replace it."
                    )
            entries = {overload: Decomposition(overload, fn, samples, dtype_tuple, _builtin) for overload in overloads}
            if _builtin:
                _builtins.update(entries)
            _table.put(entries)
        return fn

    return decorator


def unregister_decomposition(op: OperatorLike) -> None:
    """Remove the decompositions of ``op`` (built-in ones included)."""
    with _table.lock:
        for overload in resolve(op):
            _table.remove(overload)


def restore_builtin(op: OperatorLike) -> None:
    """Put back fwdecomp's own decomposition of ``op`` (or none, if it has none)."""
    with _table.lock:
        for overload in resolve(op):
            builtin = _builtins.get(overload)
            if builtin is None:
                _table.remove(overload)
            else:
                _table.put({overload: builtin})


def snapshot() -> dict[OpOverload, Decomposition]:
    """A copy of the whole table, for :func:`restore` (tests, temporary overrides)."""
    return _table.snapshot()


def restore(saved: dict[OpOverload, Decomposition]) -> None:
    """Make the table exactly ``saved`` again; listeners hear of every operator that changed."""
    _table.restore(saved)


def lookup(op: OpOverload) -> Decomposition | None:
    """The decomposition registered for ``op``, or ``None``."""
    return _table.get(op)


def lookup_schema(schema: torch.FunctionSchema) -> Decomposition | None:
    """The decomposition registered for the operator with this schema, or ``None``."""
    return _table.get_schema(schema)


def find(op: OpOverload) -> Decomposition | None:
    """The decomposition a call of ``op`` runs: ``op``'s own, else the one registered for its schema."""
    return _table.find(op)


def operators() -> list[OpOverload]:
    """Every operator overload that has a decomposition, sorted by name."""
    return _table.operators()


def subscribe(listener: Listener) -> None:
    """Call ``listener(event, op)`` with event ``"register"`` or ``"unregister"``."""
    _table.subscribe(listener)
