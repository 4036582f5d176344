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

from typing import Any, NamedTuple

import torch

from fwdecomp.custom_ops import is_tensor_type

__all__ = [
    "Layout",
    "arguments_to_stack",
    "layout",
    "results_to_stack",
    "stack_to_arguments",
    "stack_to_results",
]


def _qualname(schema: torch.FunctionSchema) -> str:
    return f"{schema.name}.{schema.overload_name}" if schema.overload_name else schema.name


class Layout(NamedTuple):
    """What the calling convention needs of a schema's arguments, read once.

    ``torch.FunctionSchema.arguments`` builds new Python objects on every
    access (about 1 µs per call of an operator with a few arguments), so the
    per-call conversions read this instead.
    """

    names: tuple[str, ...]
    defaults: tuple[tuple[bool, Any], ...]  # (has a default, the default) per argument
    positional: int  # arguments before the first keyword-only one
    kwarg_only: tuple[str, ...]  # names of the keyword-only arguments, in order
    returns: int  # how many values the operator returns
    return_types: tuple[str, ...]  # each return's type as the schema writes it ("Tensor", "List[Tensor]", ...)
    return_names: tuple[str, ...]  # each return's name ("" if unnamed)
    holds_tensors: tuple[bool, ...]  # per argument: Tensor, Tensor?, Tensor[] or Tensor?[]


_layouts: dict[int, tuple[torch.FunctionSchema, Layout]] = {}


def layout(schema: torch.FunctionSchema) -> Layout:
    """The schema's :class:`Layout` (cached: an operator keeps its schema object)."""
    cached = _layouts.get(id(schema))
    if cached is None or cached[0] is not schema:
        arguments = schema.arguments
        kwarg_only = [a.kwarg_only for a in arguments]
        positional = kwarg_only.index(True) if True in kwarg_only else len(arguments)
        if any(not k for k in kwarg_only[positional:]):  # not a schema PyTorch writes; keep every argument positional
            positional = len(arguments)
        cached = _layouts[id(schema)] = (
            schema,
            Layout(
                names=tuple(a.name for a in arguments),
                defaults=tuple((True, a.default_value) if a.has_default_value() else (False, None) for a in arguments),
                positional=positional,
                kwarg_only=tuple(a.name for a in arguments[positional:]),
                returns=len(schema.returns),
                return_types=tuple(str(ret.type) for ret in schema.returns),
                return_names=tuple(ret.name or "" for ret in schema.returns),
                holds_tensors=tuple(is_tensor_type(a.type) for a in arguments),
            ),
        )
    return cached[1]


def arguments_to_stack(schema: torch.FunctionSchema, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """Order ``args``/``kwargs`` as the schema's arguments, filling in defaults."""
    shape = layout(schema)
    names, defaults = shape.names, shape.defaults
    if len(args) > len(names):
        raise TypeError(f"{_qualname(schema)} takes {len(names)} arguments but {len(args)} were given")
    stack = list(args)
    if len(args) == len(names) and not kwargs:
        return stack
    unused = dict(kwargs)
    for name, (has_default, default) in zip(names[len(args) :], defaults[len(args) :]):
        if name in unused:
            stack.append(unused.pop(name))
        elif has_default:
            stack.append(list(default) if isinstance(default, list) else default)  # callers may mutate it
        else:
            raise TypeError(f"{_qualname(schema)} is missing argument {name!r}")
    if unused:
        raise TypeError(f"{_qualname(schema)} got unexpected arguments {sorted(unused)}")
    return stack


def stack_to_arguments(schema: torch.FunctionSchema, stack: list[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Split a stack of arguments into positional arguments and keyword-only arguments."""
    shape = layout(schema)
    return tuple(stack[: shape.positional]), dict(zip(shape.kwarg_only, stack[shape.positional :]))


def results_to_stack(schema: torch.FunctionSchema, results: Any) -> list[Any]:
    """A function's return value as a list with one entry per schema return."""
    count = layout(schema).returns
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
    count = layout(schema).returns
    if count == 0:
        return None
    if count == 1:
        return stack[0]
    return tuple(stack)
