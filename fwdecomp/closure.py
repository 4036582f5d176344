"""Closure: does forward AD reach only operators it can differentiate?

A decomposition is *closed* when every operator it runs on a tangent-carrying
value either has a forward-AD formula in the running PyTorch or is itself
routed by fwdecomp to a registered decomposition (which is then checked the
same way, recursively). :func:`forward_route` says what PyTorch's autograd
does with one operator under forward AD; :class:`ClosureMode` applies it to
every operator a decomposition runs while it is being traced, inlines the
decompositions of routed operators, and raises :class:`ClosureError`, naming
the path, at the first operator forward AD could not get through.

What PyTorch does with an operator that receives a tangent (its autograd
code generator, ``torchgen/packaged/autograd/gen_variable_type.py``, decides):

- ``formula``: derivatives.yaml gives it a forward formula (or an
  ``auto_*`` rule), or it is CompositeImplicitAutograd (its parts are
  checked instead), or it is differentiated by hand (``copy_``);
- ``no tangent``: its outputs are not differentiable, so the tangent stops
  there without error: integer or boolean results, the operators the code
  generator lists as not requiring a derivative (``zeros_like``, ``argmax``,
  ``searchsorted``, ...), ``detach``, operators returning no tensor;
- ``rule``: no formula, but fwdecomp runs a registered JVP rule
  (:mod:`fwdecomp.jvp_rules`) for it: it stays in the graph as it is, and
  the rule runs when the graph calls it;
- ``decomposition``: no formula, but fwdecomp routes it to a registered
  decomposition, which is inlined (and checked, recursively);
- ``open``: no formula and no decomposition: PyTorch raises "Trying to use
  forward AD with ... that does not support it", or, for a custom operator,
  the tangent silently comes back wrong.

Only values that can carry a tangent matter: operators that see none
(index bookkeeping, masks, constants) need no formula. Which values carry
one is followed through the trace: an input given with a tangent does, and
so does every floating-point or complex output of an operator that receives
one (and every tensor written in place with such a value).

Example:
    >>> import torch
    >>> from fwdecomp.closure import forward_route
    >>> forward_route(torch.ops.aten.mul.Tensor).kind
    'formula'
    >>> forward_route(torch.ops.aten.argmax.default).kind
    'no tangent'
    >>> forward_route(torch.ops.aten._cdist_forward.default).kind  # fwdecomp decomposes it
    'decomposition'
"""

from __future__ import annotations

import ast
import functools
import os
import traceback
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fwdecomp import _torch, jvp_rules, registry
from fwdecomp._torch import OpOverload, namespace, qualified_name, schema_of
from fwdecomp.contract import DecompositionError, check_results
from fwdecomp.formulas import derivative_entries, native_forward_formula
from fwdecomp.stack import arguments_to_stack, results_to_stack, stack_to_arguments, stack_to_results

__all__ = ["ClosureError", "ClosureMode", "Route", "forward_route"]

RouteKind = Literal["formula", "no tangent", "rule", "decomposition", "open"]

#: Operators autograd differentiates by hand (torch/csrc/autograd/VariableTypeManual.cpp).
_MANUAL = {"copy_": "formula", "detach": "no tangent", "detach_": "no tangent", "_fw_primal": "no tangent"}


@dataclass(frozen=True)
class Route:
    """What forward AD does with an operator that receives a tangent, and the evidence."""

    kind: RouteKind
    reason: str


class ClosureError(DecompositionError):
    """A decomposition reaches an operator that forward AD cannot differentiate."""

    def __init__(self, path: tuple[str, ...], reason: str, location: str = "") -> None:
        self.path = path
        self.reason = reason
        self.location = location
        root, culprit = path[0], path[-1]
        where = f" (called at {location})" if location else ""
        super().__init__(
            f"fwdecomp: the decomposition of {root} is not closed under forward AD: "
            f"{' -> '.join(path)}{where}. {culprit} receives a tangent but {reason}, and fwdecomp has no "
            f"decomposition for it. Register one with @fwdecomp.register_decomposition({culprit!r}), "
            f"or write the decomposition of {path[-2]} without {culprit}."
        )

    def __reduce__(self) -> Any:
        return (type(self), (self.path, self.reason, self.location))


@functools.lru_cache(maxsize=1)
def _not_requiring_derivative() -> frozenset[str] | None:
    """``DONT_REQUIRE_DERIVATIVE`` of the code generator that built the running PyTorch."""
    path = _torch.autograd_codegen_path()
    if path is None:
        return None
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "DONT_REQUIRE_DERIVATIVE" for t in node.targets
        ):
            return frozenset(ast.literal_eval(node.value))
    return None


def _returns_tensor(op: OpOverload) -> bool:
    return any("Tensor" in str(ret.type) for ret in schema_of(op).returns)


def _native_route(op: OpOverload) -> Route:
    """PyTorch's own behaviour, ignoring fwdecomp."""
    if not _returns_tensor(op):
        return Route("no tangent", "it returns no tensor")
    try:
        formula = native_forward_formula(op)
    except RuntimeError as error:  # not a dispatcher operator (TorchScript-only)
        return Route("open", f"PyTorch's dispatcher does not know it ({error})")
    if formula.status == "native":
        return Route("formula", formula.reason)
    if namespace(op) != "aten":
        return Route("open", "custom operators have no forward-AD formula")
    if formula.status == "missing":
        return Route("open", "derivatives.yaml gives it no forward formula")
    if derivative_entries() is None:
        return Route("formula", "unverified: this PyTorch build ships no derivatives.yaml")
    name = schema_of(op).name.split("::", 1)[1]
    if name in _MANUAL:
        return Route(_MANUAL[name], "differentiated by hand in PyTorch's VariableTypeManual.cpp")  # type: ignore[arg-type]
    base = name[:-1] if name.endswith("_") and not name.endswith("__") else name
    exempt = _not_requiring_derivative()
    if exempt is not None and (name in exempt or base in exempt):
        return Route("no tangent", "PyTorch treats its outputs as not differentiable")
    return Route("open", "it is not in derivatives.yaml, so PyTorch's autograd raises under forward AD")


def forward_route(op: OpOverload) -> Route:
    """What forward AD does with ``op`` when an input carries a tangent (fwdecomp's routing included).

    Operators that fwdecomp routes (no native formula, and a JVP rule or a
    registered decomposition, as :mod:`fwdecomp.api` decides) are ``"rule"``
    or ``"decomposition"``; the rule wins, as in the eager backend.
    """
    route = _cached_native_route(op)
    if route.kind == "formula":
        return route
    if jvp_rules.find(op) is not None:
        return Route("rule", "fwdecomp runs its registered JVP rule")
    if registry.lookup(op) is not None:
        return Route("decomposition", "fwdecomp routes it to its registered decomposition")
    return route


@functools.lru_cache(maxsize=4096)
def _cached_native_route(op: OpOverload) -> Route:
    return _native_route(op)


def _tensors(values: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(_tensors(value))
    return found


_OUR_FILES = (os.path.dirname(os.path.abspath(__file__)) + os.sep + "closure.py",)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _caller() -> str:
    """``file:line`` of the innermost frame outside PyTorch and this module (the decomposition's code)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = os.path.abspath(frame.filename)
        if path.startswith(_TORCH_DIR) or path in _OUR_FILES:
            continue
        return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return ""


class ClosureMode(_torch.TorchDispatchMode):
    """Checks closure while a decomposition is traced, inlining the decompositions of routed operators.

    It runs above the tracer's own modes and sees each operator as it is
    called below autograd: CompositeImplicitAutograd operators that receive a
    tangent are decomposed here (as autograd would) so that their parts are
    checked; operators routed by fwdecomp to a decomposition are replaced by
    it, so the tracer records its parts (their results are checked against
    the operator's contract, as the eager backend checks a nested call, when
    ``check_contracts``); operators with a JVP rule stay as they are; an
    ``open`` operator raises :class:`ClosureError`. :meth:`mark` declares
    which inputs carry tangents; ``inlined`` counts the decompositions
    inlined.
    """

    MAX_DEPTH = 8

    def __init__(self, root: OpOverload, check_contracts: bool = True) -> None:
        super().__init__()
        self.check_contracts = check_contracts
        self.path: list[str] = [qualified_name(root)]
        self.inlined: dict[str, int] = {}
        self._carrying: dict[int, torch.Tensor] = {}
        self._written: set[int] = set()

    def mark(self, tensor: torch.Tensor) -> None:
        """``tensor`` carries a tangent from now on."""
        self._carrying[id(tensor)] = tensor

    def carries(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` can carry a tangent at this point of the trace."""
        if id(tensor) in self._carrying:
            return True
        return bool(self._written) and _torch.storage_key(tensor) in self._written

    def __torch_dispatch__(self, func: OpOverload, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        inputs = _tensors(args) + _tensors(kwargs.values())
        if not any(self.carries(t) for t in inputs):
            return func(*args, **kwargs)
        if _torch.autograd_would_decompose(func, inputs):
            with self:
                result = func.decompose(*args, **kwargs)
            if result is not NotImplemented:
                return result
        route = forward_route(func)
        if route.kind == "decomposition":
            return self._inline(func, args, kwargs)
        if route.kind == "open":
            raise ClosureError((*self.path, qualified_name(func)), route.reason, _caller())
        result = func(*args, **kwargs)  # recorded as it is: at run time PyTorch or fwdecomp's rule differentiates it
        if route.kind in ("formula", "rule"):
            self._mark_results(func, args, kwargs, result)
        return result

    def _mark_results(self, func: OpOverload, args: Any, kwargs: Any, result: Any) -> None:
        values = result if isinstance(result, (tuple, list)) else (result,)
        for value in _tensors(values):
            if value.is_floating_point() or value.is_complex():
                self.mark(value)
        schema = schema_of(func)
        for index, argument in enumerate(schema.arguments):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            value = args[index] if index < len(args) else kwargs.get(argument.name)
            for tensor in _tensors([value]):
                self.mark(tensor)
                self._written.add(_torch.storage_key(tensor))

    def _inline(self, func: OpOverload, args: Any, kwargs: Any) -> Any:
        name = qualified_name(func)
        if self.path.count(name) >= self.MAX_DEPTH:
            raise RecursionError(
                f"fwdecomp: the decomposition of {name} calls {name} itself with tangents "
                f"({self.MAX_DEPTH} levels deep); a decomposition must be written in other operators."
            )
        entry = registry.lookup(func)
        assert entry is not None  # forward_route said so
        schema = schema_of(func)
        call_args, call_kwargs = stack_to_arguments(schema, arguments_to_stack(schema, tuple(args), dict(kwargs)))
        self.path.append(name)
        self.inlined[name] = self.inlined.get(name, 0) + 1
        try:
            with self:
                results = entry.fn(*call_args, **call_kwargs)
        finally:
            self.path.pop()
        outputs = results_to_stack(schema, results)
        if self.check_contracts:  # as the eager backend checks a nested call; not traced
            with _torch.without_dispatch_modes():
                check_results(func, call_args, call_kwargs, outputs)
        return stack_to_results(schema, outputs)
