"""The eager backend: run the registered JVP rule or Python decomposition on every call.

Precedence: an operator's JVP rule (:mod:`fwdecomp.jvp_rules`, the fast
path its author wrote) wins over its decomposition; unregistering the rule
brings the decomposition back.

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

from fwdecomp import jvp_rules, registry
from fwdecomp._torch import OpOverload, qualified_name, schema_of
from fwdecomp.contract import DecompositionError, check_results, describe_function
from fwdecomp.interface import DecompositionInterface, Registerer
from fwdecomp.stack import results_to_stack, stack_to_arguments

__all__ = ["EagerBackend", "run_registered"]


def run_registered(op: OpOverload, stack: list[Any]) -> None:
    """Call ``op``'s registered decomposition on a boxed stack, checking what it returns."""
    entry = registry.lookup(op) or registry.lookup_schema(schema_of(op))
    if entry is None:
        raise NotImplementedError(f"fwdecomp: no decomposition is registered for {qualified_name(op)}")
    schema = schema_of(op)
    args, kwargs = stack_to_arguments(schema, stack)
    try:
        results = entry.fn(*args, **kwargs)
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
    stack[:] = outputs


class EagerBackend(DecompositionInterface):
    """Runs the JVP rule or, failing that, the Python decomposition registered for the operator."""

    def has_decomposition(self, schema: torch.FunctionSchema) -> bool:
        return jvp_rules.lookup_schema(schema) is not None or registry.lookup_schema(schema) is not None

    def run_decomposition(self, op: OpOverload, stack: list[Any]) -> None:
        rule = jvp_rules.lookup(op) or jvp_rules.lookup_schema(schema_of(op))
        if rule is not None:
            jvp_rules.run_rule(op, stack, rule)
        else:
            run_registered(op, stack)


_registerer = Registerer(EagerBackend())
