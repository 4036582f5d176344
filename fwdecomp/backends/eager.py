"""The eager backend: run the registered JVP rule or Python decomposition on every call.

Precedence: an operator's JVP rule (:mod:`fwdecomp.jvp_rules`, the fast
path its author wrote) wins over its decomposition; unregistering the rule
brings the decomposition back. A built-in decomposition's tangent rule
(:mod:`fwdecomp.tangent_rules`) runs instead of it where no reverse mode can
record the call.

Importing this module installs an :class:`EagerBackend` as the process-wide
implementation of the decomposition interface (``import fwdecomp`` does it).

Example:
    >>> import torch
    >>> from fwdecomp.backends.eager import EagerBackend
    >>> import fwdecomp.decompositions  # the built-in library
    >>> backend = EagerBackend()
    >>> op = torch.ops.aten._pdist_forward.default
    >>> backend.has_decomposition(op._schema)
    True
    >>> stack = [torch.tensor([[0.0, 0.0], [3.0, 4.0]]), 2.0]
    >>> backend.run_decomposition(op, stack)
    >>> stack
    [tensor([5.])]
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd import forward_ad

from fwdecomp import jvp_rules, registry, tangent_rules
from fwdecomp._torch import OpOverload, dual_level_active, make_dual, qualified_name, schema_of, tangent_of, unpack_dual
from fwdecomp.contract import DecompositionError, check_results, describe_function
from fwdecomp.interface import DecompositionInterface, Registerer
from fwdecomp.stack import results_to_stack, stack_to_arguments

__all__ = [
    "ZERO_TANGENT_MAX_NUMEL",
    "EagerBackend",
    "run_registered",
    "run_tangent_rule",
    "with_zero_tangents",
]

#: In a call whose tensors hold at most this many elements together, tangent-less
#: floating-point inputs get a materialised zero tangent before the decomposition
#: runs. Forward AD of ``dual * plain`` goes through PyTorch's ZeroTensor kernels
#: (~45 us per operation with fwdecomp's, :mod:`fwdecomp.zero_tensors`; 130-300 us
#: with PyTorch's own), against ~5 us for ``dual * dual``. Past the threshold,
#: arithmetic on materialised zeros costs more than that.
#: ``EagerBackend.zero_tangent_max_numel`` overrides it per backend (0 switches
#: it off); a decomposition that handles tangents explicitly (attention) opts
#: out by setting ``fn.fwdecomp_zero_tangents = False``.
ZERO_TANGENT_MAX_NUMEL = 1 << 13


def _needs_zero_tangent(value: Any, limit: int) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and (value.is_floating_point() or value.is_complex())
        and value.layout is torch.strided
        and value.numel() <= limit
        and tangent_of(value) is None
    )


def _small_call_limit(args: tuple[Any, ...], kwargs: dict[str, Any], limit: int) -> int:
    """``limit`` if the call's tensors hold at most ``limit`` elements together, else 0.

    A small input can broadcast into large intermediates, where arithmetic on
    materialised zeros costs more than the ZeroTensor path it avoids (that
    path's cost is per operation, not per element); so the whole call must be small.
    """
    total = sum(v.numel() for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))
    return limit if total <= limit else 0


def with_zero_tangents(args: tuple[Any, ...], kwargs: dict[str, Any], limit: int) -> tuple[tuple[Any, ...], dict]:
    """``args``/``kwargs`` with small tangent-less floating tensors made dual with zero tangents.

    Values are unchanged (and so are the results: the added tangents are zero);
    only PyTorch's slow path for mixed dual/plain operands is avoided. Where
    ``make_dual`` is refused (the legacy ``vmap`` of gradcheck), the input stays as it was.
    """
    if limit <= 0 or not dual_level_active():
        return args, kwargs

    def convert(value: Any) -> Any:
        if not _needs_zero_tangent(value, limit):
            return value
        try:
            return forward_ad.make_dual(value, torch.zeros_like(value))
        except RuntimeError:
            return value

    return tuple(convert(a) for a in args), {k: convert(v) for k, v in kwargs.items()}


def run_registered(op: OpOverload, stack: list[Any], zero_tangent_max_numel: int | None = None) -> None:
    """Call ``op``'s registered decomposition on a boxed stack, checking what it returns."""
    entry = registry.find(op)
    if entry is None:
        raise NotImplementedError(f"fwdecomp: no decomposition is registered for {qualified_name(op)}")
    schema = schema_of(op)
    args, kwargs = stack_to_arguments(schema, stack)
    limit = ZERO_TANGENT_MAX_NUMEL if zero_tangent_max_numel is None else zero_tangent_max_numel
    explicit = not getattr(entry.fn, "fwdecomp_zero_tangents", True)
    if explicit or schema.is_mutable:
        # A mutated argument must stay the caller's own tensor (make_dual returns a
        # new view, and a tangent written into it would not reach the caller).
        limit = 0
    call_args, call_kwargs = with_zero_tangents(args, kwargs, _small_call_limit(args, kwargs, limit))
    try:
        results = entry.fn(*call_args, **call_kwargs)
    except Exception as error:
        raise DecompositionError(
            f"fwdecomp: the decomposition of {qualified_name(op)} "
            f"({describe_function(entry.fn)}) raised {type(error).__name__}: {error}"
        ) from error
    try:
        outputs = results_to_stack(schema, results)
    except TypeError as error:
        raise DecompositionError(
            f"fwdecomp: the decomposition of {qualified_name(op)} "
            f"({describe_function(entry.fn)}) returned the wrong number of results: {error}"
        ) from error
    check_results(op, args, kwargs, outputs)
    stack[:] = [_tangent_in_own_dtype(value) for value in outputs]


def _tangent_in_own_dtype(value: Any) -> Any:
    """``value`` with its tangent in its own dtype.

    Under ``torch.func.jvp``, PyTorch (2.11, 2.13) computes ``x * 2.0`` for a 0-d
    float32 ``x`` with a float64 tangent: the number's zero tangent is a float64
    tensor no longer marked as a wrapped number, so it wins the type promotion
    (``torch.func.jvp(lambda a: a * 2.0, (x,), (t,))`` shows it without fwdecomp).
    A forward-mode tangent has its primal's dtype.
    """
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return value
    primal, tangent = unpack_dual(value)
    if tangent is None or tangent.dtype == primal.dtype:
        return value
    return make_dual(primal, tangent.to(primal.dtype))


class EagerBackend(DecompositionInterface):
    """Runs the JVP rule or, failing that, the Python decomposition registered for the operator.

    ``zero_tangent_max_numel`` (default :data:`ZERO_TANGENT_MAX_NUMEL`; 0 = off):
    see :func:`with_zero_tangents`.
    """

    def __init__(self, zero_tangent_max_numel: int | None = None) -> None:
        self.zero_tangent_max_numel = zero_tangent_max_numel

    def has_decomposition(self, schema: torch.FunctionSchema) -> bool:
        return jvp_rules.lookup_schema(schema) is not None or registry.lookup_schema(schema) is not None

    def run_decomposition(self, op: OpOverload, stack: list[Any]) -> None:
        rule = jvp_rules.find(op)
        if rule is not None:
            jvp_rules.run_rule(op, stack, rule)
        elif not run_tangent_rule(op, stack):
            run_registered(op, stack, self.zero_tangent_max_numel)


def run_tangent_rule(op: OpOverload, stack: list[Any]) -> bool:
    """Run the tangent rule of ``op``'s registered decomposition if it has one that applies
    (:mod:`fwdecomp.tangent_rules`); ``False`` leaves ``stack`` as it was."""
    entry = registry.find(op)
    return entry is not None and tangent_rules.try_rule(op, stack, entry.fn)


_registerer = Registerer(EagerBackend())
