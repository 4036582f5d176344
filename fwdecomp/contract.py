"""What a decomposition must honour, checked where it can go wrong.

At registration: its parameters match the operator's schema (same names, in
the same order, keyword-only where the schema says so). At run time: it
returns what the operator returns (count, kinds, and each tensor's shape
and dtype as PyTorch's own kernel would produce them, computed once
per input signature on the ``meta`` device). A decomposition that raises is
reported with the operator's name. A ``Tensor`` result may be ``None`` (an
undefined tensor) where the kernel returns one too, e.g. the gradients a
``*_backward`` operator's ``output_mask`` leaves out. Operators whose meta
kernel disagrees with their eager kernels are declared with
:func:`meta_shapes_unreliable`; only the count and kind of their results are
checked.

Example:
    >>> import torch
    >>> from fwdecomp.contract import check_signature
    >>> def pdist(self, p=2.0):
    ...     return self
    >>> check_signature(torch.ops.aten._pdist_forward.default, pdist)
    >>> def wrong(x):
    ...     return x
    >>> check_signature(torch.ops.aten._pdist_forward.default, wrong)
    Traceback (most recent call last):
    ...
    fwdecomp.contract.SignatureMismatchError: fwdecomp: decomposition 'wrong' does not match ...
"""

from __future__ import annotations

import inspect
import threading
from collections import OrderedDict
from typing import Any, Callable

import torch

from fwdecomp._torch import OpOverload, qualified_name, schema_of
from fwdecomp.stack import layout

__all__ = [
    "DecompositionError",
    "SignatureMismatchError",
    "check_results",
    "check_signature",
    "describe_function",
    "meta_agrees",
    "meta_shapes_unreliable",
    "signature_hint",
]


class SignatureMismatchError(TypeError):
    """A decomposition's parameters do not match its operator's schema."""


class DecompositionError(RuntimeError):
    """A decomposition raised, or returned something its operator cannot return."""


def describe_function(fn: Callable[..., Any]) -> str:
    """``name (file:line)`` for error messages."""
    name = getattr(fn, "__qualname__", None) or repr(fn)
    code = getattr(fn, "__code__", None)
    return f"{name} ({code.co_filename}:{code.co_firstlineno})" if code else name


def signature_hint(op: OpOverload) -> str:
    """A Python ``def`` line that matches ``op``'s schema."""
    parts: list[str] = []
    star = False
    for argument in schema_of(op).arguments:
        if argument.kwarg_only and not star:
            parts.append("*")
            star = True
        text = argument.name
        if argument.has_default_value():
            text += f"={argument.default_value!r}"
        parts.append(text)
    return f"def {schema_of(op).name.split('::')[-1]}({', '.join(parts)}): ..."


def _signature_problem(op: OpOverload, fn: Callable[..., Any]) -> str | None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # builtins and C functions: nothing to check
    parameters = list(signature.parameters.values())
    positional = [
        p for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    has_var_args = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)
    has_var_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    by_name = {p.name: p for p in parameters}
    arguments = schema_of(op).arguments
    schema_positional = [a for a in arguments if not a.kwarg_only]
    schema_keyword = [a for a in arguments if a.kwarg_only]

    for index, argument in enumerate(schema_positional):
        if index >= len(positional):
            if has_var_args:
                break
            return f"it takes {len(positional)} positional parameters, the schema has {len(schema_positional)}"
        parameter = positional[index]
        if parameter.kind is not inspect.Parameter.POSITIONAL_ONLY and parameter.name != argument.name:
            return f"parameter {index} is named {parameter.name!r}, the schema calls it {argument.name!r}"
    extra = positional[len(schema_positional) :]
    for parameter in extra:
        if parameter.default is inspect.Parameter.empty and parameter.name not in {a.name for a in schema_keyword}:
            return f"it requires parameter {parameter.name!r}, which the schema does not have"
    for argument in schema_keyword:
        parameter = by_name.get(argument.name)
        if parameter is None and not has_var_kwargs:
            return f"it does not accept the keyword-only argument {argument.name!r}"
        if parameter is not None and parameter.kind is inspect.Parameter.POSITIONAL_ONLY:
            return f"{argument.name!r} must be accepted by keyword"
    schema_names = {a.name for a in arguments}
    for parameter in parameters:
        if (
            parameter.kind is inspect.Parameter.KEYWORD_ONLY
            and parameter.name not in schema_names
            and parameter.default is inspect.Parameter.empty
        ):
            return f"it requires keyword {parameter.name!r}, which the schema does not have"
    return None


def check_signature(op: OpOverload, fn: Callable[..., Any]) -> None:
    """Raise :class:`SignatureMismatchError` unless ``fn`` can be called as ``op``'s schema says."""
    if not callable(fn):
        raise SignatureMismatchError(
            f"fwdecomp: the decomposition for {qualified_name(op)} must be callable, got {type(fn).__name__}"
        )
    problem = _signature_problem(op, fn)
    if problem is not None:
        name = getattr(fn, "__qualname__", repr(fn))
        raise SignatureMismatchError(
            f"fwdecomp: decomposition {name!r} does not match the schema of "
            f"{qualified_name(op)}: {problem}.\n  schema:   {schema_of(op)}\n"
            f"  expected: {signature_hint(op)}"
        )


# --- results -------------------------------------------------------------

_unreliable_meta: dict[OpOverload, str] = {}


def meta_shapes_unreliable(op: OpOverload, reason: str) -> None:
    """Declare that ``op``'s meta kernel gives other output shapes than its eager kernels.

    :func:`check_results` then checks only the count and kind of ``op``'s
    results, so the decomposition's own tests must compare its outputs with
    the kernel's. ``reason`` says which outputs and inputs disagree.
    """
    _unreliable_meta[op] = reason


def meta_agrees(op: OpOverload, *args: Any, **kwargs: Any) -> bool:
    """Whether ``op``'s meta kernel gives the shapes and dtypes its eager kernel gives for these inputs.

    For probing, at import, a meta kernel known to be wrong on some PyTorch
    versions (then declare it with :func:`meta_shapes_unreliable`).
    """
    with torch.no_grad():
        eager = op(*args, **kwargs)
    meta = _on_meta(op, args, kwargs)
    many = len(schema_of(op).returns) != 1
    return [_describe(o) for o in (eager if many else [eager])] == [_describe(o) for o in (meta if many else [meta])]


class _Recent:
    """A thread-safe map of the ``size`` most recently used keys (a cache of per-signature answers)."""

    def __init__(self, size: int) -> None:
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def lookup(self, key: Any) -> tuple[bool, Any]:
        """``(True, value)`` if ``key`` is cached (it becomes the most recent), else ``(False, None)``."""
        with self._lock:
            if key not in self._items:
                return False, None
            self._items.move_to_end(key)
            return True, self._items[key]

    def store(self, key: Any, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self._size:
                self._items.popitem(last=False)


_CACHE_SIZE = 4096
_expected_cache = _Recent(_CACHE_SIZE)  # call signature -> the outputs' (shape, dtype), or None
_accepted = _Recent(_CACHE_SIZE)  # argument signatures (strides included) the meta kernel accepted


def _key_part(value: Any, strided: bool = False) -> Any:
    if isinstance(value, torch.Tensor):
        layout = (tuple(value.stride()),) if strided else ()
        return ("T", tuple(value.shape), *layout, value.dtype, value.device.type, value.layout)
    if isinstance(value, (list, tuple)):
        return tuple(_key_part(v, strided) for v in value)
    return value


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.layout is not torch.strided:
            raise NotImplementedError("non-strided tensor")
        return torch.empty_strided(tuple(value.shape), tuple(value.stride()), dtype=value.dtype, device="meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_to_meta(v) for v in value)
    return value


def _on_meta(op: OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``op`` run on meta tensors standing in for ``args`` and ``kwargs`` (shapes, no data)."""
    with torch.no_grad():
        return op(*_to_meta(args), **{k: _to_meta(v) for k, v in kwargs.items()})


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    return None


def _call_key(op: OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any], strided: bool = False) -> Any:
    """A cache key for a call (strides included if ``strided``), or ``None`` if it is not hashable."""
    try:
        key = (op, _key_part(args, strided), _key_part(tuple(sorted(kwargs.items())), strided))
        hash(key)
    except TypeError:
        return None
    return key


def _expected(op: OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any] | None:
    """Shapes and dtypes the native kernel would return, from a run on ``meta``."""
    key = _call_key(op, args, kwargs)
    if key is not None:
        found, expected = _expected_cache.lookup(key)
        if found:
            return expected
    try:
        out = _on_meta(op, args, kwargs)
        outs = [out] if len(schema_of(op).returns) == 1 else list(out or ())
        expected = [_describe(o) for o in outs]
    except Exception:  # no meta kernel, data-dependent shapes: shape checks are skipped
        expected = None
    if key is not None:
        _expected_cache.store(key, expected)
    return expected


def check_arguments(op: OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise what ``op``'s kernel raises for bad input, by running its meta kernel on ``args``.

    For a decomposition that must refuse exactly what the kernel refuses (shapes, dtypes,
    devices): what a meta kernel checks depends only on the arguments' metadata (shapes,
    strides, dtypes, devices, layouts) and non-tensor values, so a signature it accepted
    once is not checked again (a bounded cache; a refused one is checked, and raises, every
    time).

    Example:
        >>> import torch
        >>> from fwdecomp.contract import check_arguments
        >>> op = torch.ops.aten.mm.default
        >>> check_arguments(op, (torch.ones(2, 3), torch.ones(3, 4)), {})
        >>> check_arguments(op, (torch.ones(2, 3), torch.ones(2, 4)), {})
        Traceback (most recent call last):
        ...
        RuntimeError: a and b must have same reduction dim, but got [2, 3] X [2, 4].
    """
    key = _call_key(op, args, kwargs, strided=True)
    if key is not None and _accepted.lookup(key)[0]:
        return
    _on_meta(op, args, kwargs)
    if key is not None:
        _accepted.store(key, None)


def _label(names: tuple[str, ...], index: int) -> str:
    """How a message names output ``index`` (with its schema name, if it has one)."""
    return f"output {index}" + (f" ({names[index]!r})" if names[index] else "")


def check_results(op: OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any], results: list[Any]) -> None:
    """Raise :class:`DecompositionError` unless ``results`` is what ``op`` would return."""
    shape = layout(schema_of(op))  # the return types, read once per schema
    names = shape.return_names
    for index, (kind, value) in enumerate(zip(shape.return_types, results)):
        if kind in ("Tensor", "Optional[Tensor]"):
            # None is an undefined tensor, which kernels return for outputs an output_mask leaves out.
            if not isinstance(value, torch.Tensor) and value is not None:
                raise DecompositionError(
                    f"fwdecomp: the decomposition of {qualified_name(op)} returned {type(value).__name__} for "
                    f"{_label(names, index)}; the schema says {kind}. Fix the registered decomposition."
                )
        elif kind.startswith("List[") and "Tensor" in kind:
            if not isinstance(value, (list, tuple)):
                raise DecompositionError(
                    f"fwdecomp: the decomposition of {qualified_name(op)} returned {type(value).__name__} for "
                    f"{_label(names, index)}; the schema says {kind}. Fix the registered decomposition."
                )
    if op in _unreliable_meta:
        return
    expected = _expected(op, args, kwargs)
    if expected is None:
        return
    for index, (want, value) in enumerate(zip(expected, results)):
        if want is None:
            continue
        if value is None:
            name = qualified_name(op)
            raise DecompositionError(
                f"fwdecomp: the decomposition of {name} returned None for {_label(names, index)}, but {name} "
                f"returns a tensor {want} for these inputs. Fix the registered decomposition."
            )
        got = _describe(value)
        if got is not None and got != want:
            name = qualified_name(op)
            raise DecompositionError(
                f"fwdecomp: the decomposition of {name} returned {_label(names, index)} with "
                f"(shape, dtype) = {got}, but {name} returns {want} for these inputs. "
                "Fix the registered decomposition so it matches PyTorch's kernel."
            )
