"""The boxed calling convention: arguments and results as a stack in schema order.

A boxed call passes an operator's arguments as one list ordered by its
``torch.FunctionSchema`` (defaults filled in) and gets the results back in
the same list, ordered by the schema's returns. These helpers convert
between that stack and Python's ``(args, kwargs)`` / return values.

Example:
    >>> import torch
    >>> from fwdecomp.stack import arguments_to_stack, stack_to_arguments
    >>> schema = torch.ops.aten._pdist_forward.default._schema
    >>> x = torch.zeros(3, 2)
    >>> stack = arguments_to_stack(schema, (x,), {})
    >>> stack[1]
    2.0
    >>> args, kwargs = stack_to_arguments(schema, stack)
    >>> len(args), kwargs
    (2, {})
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "arguments_to_stack",
    "results_to_stack",
    "stack_to_arguments",
    "stack_to_results",
]


def _qualname(schema: torch.FunctionSchema) -> str:
    return f"{schema.name}.{schema.overload_name}" if schema.overload_name else schema.name


def arguments_to_stack(schema: torch.FunctionSchema, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """Order ``args``/``kwargs`` as the schema's arguments, filling in defaults."""
    arguments = schema.arguments
    if len(args) > len(arguments):
        raise TypeError(f"{_qualname(schema)} takes {len(arguments)} arguments but {len(args)} were given")
    stack = list(args)
    unused = dict(kwargs)
    for argument in arguments[len(args) :]:
        if argument.name in unused:
            stack.append(unused.pop(argument.name))
        elif argument.has_default_value():
            stack.append(argument.default_value)
        else:
            raise TypeError(f"{_qualname(schema)} is missing argument {argument.name!r}")
    if unused:
        raise TypeError(f"{_qualname(schema)} got unexpected arguments {sorted(unused)}")
    return stack


def stack_to_arguments(schema: torch.FunctionSchema, stack: list[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Split a stack of arguments into positional arguments and keyword-only arguments."""
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for argument, value in zip(schema.arguments, stack):
        if argument.kwarg_only:
            kwargs[argument.name] = value
        else:
            args.append(value)
    return tuple(args), kwargs


def results_to_stack(schema: torch.FunctionSchema, results: Any) -> list[Any]:
    """A function's return value as a list with one entry per schema return."""
    count = len(schema.returns)
    if count == 0:
        return []
    if count == 1:
        return [results]
    if not isinstance(results, (tuple, list)) or len(results) != count:
        got = f"{len(results)} values" if isinstance(results, (tuple, list)) else type(results).__name__
        raise TypeError(f"{_qualname(schema)} returns {count} values, got {got}")
    return list(results)


def stack_to_results(schema: torch.FunctionSchema, stack: list[Any]) -> Any:
    """The Python return value for a stack of results: ``None``, one value, or a tuple."""
    count = len(schema.returns)
    if count == 0:
        return None
    if count == 1:
        return stack[0]
    return tuple(stack)
