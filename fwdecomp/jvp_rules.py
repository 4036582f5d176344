"""JVP rules: an operator's forward-mode derivative written by hand, JAX style.

A decomposition re-expresses an operator so that PyTorch differentiates it;
a JVP rule says directly what the tangents of the outputs are. That is the
fast path for an operator whose decomposition would be slow (a fused
attention kernel, an FFT, a custom CUDA kernel)::

    rule(primals, tangents) -> (outputs, output_tangents)

- ``primals``: the operator's arguments as a list in schema order (defaults
  filled in, keyword-only ones included), each tensor *without* its tangent
  at the current level (it keeps its storage and its reverse-mode history).
  So calling the operator on them inside the rule runs the operator's own
  kernel and records its own backward for reverse mode. :func:`call` calls an
  operator with such a list (keyword-only arguments by keyword).
- ``tangents``: a list of the same length: each tensor argument's tangent or
  ``None``; a list of tangents (or ``None`` entries) for a ``Tensor[]``
  argument; ``None`` for every other argument.
- ``outputs``: what the operator returns (one value, or a tuple for several).
- ``output_tangents``: the same structure, a tangent (same shape and dtype as
  its output) or ``None`` (no tangent: zero) for each output; ``None`` alone
  for "no output has a tangent".

The rule's tangent computation is itself recorded by PyTorch, so reverse
mode *through* the JVP (a loss of the tangent, backpropagated) and nested
forward levels (``jvp(jvp(f))``) differentiate the rule. Reverse mode of the
outputs is the operator's own backward. Forward-over-reverse (Hessians)
differentiates that backward in forward mode: ``torch.func`` (``hessian``,
``jvp(grad(f))``) does so at its own level, where the backward sees the
tangents; within the one ``torch.autograd.forward_ad`` level whose tangents
the rule stripped it cannot (the backward was recorded on tangent-free
primals, and misses its own dependence on them), so use a decomposition for
that. fwdecomp warns when it sees a gradient through a rule's outputs being
differentiated that way.

Any backend can run rules: :func:`run_rule` is the boxed form
(``run_decomposition(op, stack)``'s contract).

Example:
    >>> import torch, fwdecomp
    >>> @fwdecomp.register_jvp("aten::cholesky", replace=True)
    ... def cholesky_jvp(primals, tangents):
    ...     (A, upper), (dA, _) = primals, tangents
    ...     L = torch.ops.aten.cholesky(A)
    ...     # dL = L Phi(L^-1 dA L^-H), Phi: lower triangle with half the diagonal
    ...     X = torch.linalg.solve_triangular(L, torch.linalg.solve_triangular(L, dA, upper=False).mH, upper=False).mH
    ...     dL = L @ (X.tril(-1) + X.diagonal(dim1=-2, dim2=-1).diag_embed() / 2)
    ...     return (L.mH, dL.mH) if upper else (L, dL)
    >>> A = torch.tensor([[4.0, 2.0], [2.0, 3.0]], dtype=torch.float64)
    >>> with fwdecomp.enabled():
    ...     L, dL = torch.func.jvp(torch.cholesky, (A,), (torch.eye(2, dtype=torch.float64),))
    >>> torch.allclose(dL @ L.mT + L @ dL.mT, torch.eye(2, dtype=torch.float64))
    True
    >>> fwdecomp.unregister_jvp("aten::cholesky")
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

import torch
from torch.autograd import forward_ad

from fwdecomp._operator_table import Listener, OperatorTable
from fwdecomp._torch import (
    OpOverload,
    dual_level_active,
    forward_grad_is_enabled,
    make_dual,
    qualified_name,
    schema_of,
    tangent_of,
    unpack_dual,
)
from fwdecomp.contract import DecompositionError, SignatureMismatchError, check_results, describe_function
from fwdecomp.custom_ops import is_tensor_type
from fwdecomp.overloads import OperatorLike, resolve
from fwdecomp.stack import layout, results_to_stack, stack_to_arguments

__all__ = [
    "DuplicateJvpRuleError",
    "JvpRule",
    "call",
    "find",
    "lookup",
    "lookup_schema",
    "operators",
    "register_jvp",
    "restore",
    "run_rule",
    "snapshot",
    "split_tangents",
    "subscribe",
    "unregister_jvp",
]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class JvpRule:
    """``fn(primals, tangents) -> (outputs, output_tangents)`` for ``op``."""

    op: OpOverload
    fn: Callable[[list[Any], list[Any]], Any]

    @property
    def name(self) -> str:
        return qualified_name(self.op)


class DuplicateJvpRuleError(ValueError):
    """The operator already has a JVP rule and ``replace=True`` was not given."""


_table: OperatorTable[JvpRule] = OperatorTable()


def _schema_problem(op: OpOverload) -> str | None:
    schema = schema_of(op)
    written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    if written:
        return (
            f"it writes into its argument(s) {', '.join(written)} (mutates_args). A rule cannot update "
            "those tangents in place, so register a decomposition instead, written with in-place PyTorch "
            "operations (x.mul_(...), out.copy_(...)): their formulas update the tangents in place"
        )
    if any(r.alias_info is not None for r in schema.returns):
        return (
            "it returns views of its inputs, whose tangents must be the same views of the input tangents; "
            "register a decomposition instead"
        )
    if not any(is_tensor_type(a.type) for a in schema.arguments):
        return "it takes no tensor, so it never receives a tangent"
    if not schema.returns:
        return "it returns nothing, so there is no output tangent to compute"
    return None


def _check_rule(op: OpOverload, fn: Any) -> None:
    name = getattr(fn, "__qualname__", repr(fn))
    if not callable(fn):
        raise SignatureMismatchError(
            f"fwdecomp: the JVP rule for {qualified_name(op)} must be callable, got {type(fn).__name__}"
        )
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        signature = None  # builtins: nothing to check
    if signature is not None:
        try:
            signature.bind(None, None)
        except TypeError as error:
            raise SignatureMismatchError(
                f"fwdecomp: JVP rule {name!r} for {qualified_name(op)} must accept two positional "
                f"arguments, (primals, tangents): {error}.\n  expected: def rule(primals, tangents): ..."
            ) from None
    problem = _schema_problem(op)
    if problem is not None:
        raise ValueError(
            f"fwdecomp: cannot register a JVP rule for {qualified_name(op)}: {problem}.\n  schema: {schema_of(op)}"
        )


def register_jvp(op: OperatorLike, *, replace: bool = False) -> Callable[[F], F]:
    """Register the decorated ``rule(primals, tangents) -> (outputs, output_tangents)`` for ``op``.

    ``op`` is named as for :func:`fwdecomp.register_decomposition`: an
    ``OpOverload``, an ``OpOverloadPacket`` (every overload gets the rule) or
    ``"ns::name[.overload]"``; custom operators and ``aten`` operators alike.
    When an operator has both a rule and a decomposition, the rule is used.
    An operator PyTorch differentiates natively is never routed.

    Checked at registration (nothing is registered when a check fails): the
    rule accepts two positional arguments (``SignatureMismatchError``); the
    operator takes a tensor, returns something, does not write into its
    arguments and returns no views of them (``ValueError``: register a
    decomposition for those); no rule exists unless ``replace=True``
    (``DuplicateJvpRuleError``).

    Example:
        >>> import torch, fwdecomp
        >>> lib = torch.library.Library("fwdecomp_doc_rule", "FRAGMENT")
        >>> lib.define("cube(Tensor x) -> Tensor")
        'cube'
        >>> lib.impl("cube", lambda x: x * x * x, "CompositeExplicitAutograd")
        >>> @fwdecomp.register_jvp("fwdecomp_doc_rule::cube")
        ... def cube_jvp(primals, tangents):
        ...     (x,), (dx,) = primals, tangents
        ...     return torch.ops.fwdecomp_doc_rule.cube(x), 3 * x * x * dx
        >>> with fwdecomp.enabled():
        ...     torch.func.jvp(torch.ops.fwdecomp_doc_rule.cube, (torch.tensor([2.0]),), (torch.tensor([1.0]),))
        (tensor([8.]), tensor([12.]))
        >>> fwdecomp.unregister_jvp("fwdecomp_doc_rule::cube")
    """
    overloads = resolve(op)

    def decorator(fn: F) -> F:
        with _table.lock:
            for overload in overloads:
                _check_rule(overload, fn)
                existing = _table.get(overload)
                if existing is not None and not replace:
                    raise DuplicateJvpRuleError(
                        f"fwdecomp: {qualified_name(overload)} already has a JVP rule "
                        f"({describe_function(existing.fn)}); pass replace=True to register_jvp to replace it."
                    )
            _table.put({overload: JvpRule(overload, fn) for overload in overloads})
        return fn

    return decorator


def unregister_jvp(op: OperatorLike) -> None:
    """Remove the JVP rules of ``op`` (its decomposition, if any, serves again)."""
    with _table.lock:
        for overload in resolve(op):
            _table.remove(overload)


def lookup(op: OpOverload) -> JvpRule | None:
    """The JVP rule registered for ``op``, or ``None``."""
    return _table.get(op)


def lookup_schema(schema: torch.FunctionSchema) -> JvpRule | None:
    """The JVP rule registered for the operator with this schema, or ``None``."""
    return _table.get_schema(schema)


def find(op: OpOverload) -> JvpRule | None:
    """The JVP rule a call of ``op`` runs: ``op``'s own, else the one registered for its schema."""
    return _table.find(op)


def operators() -> list[OpOverload]:
    """Every operator overload that has a JVP rule, sorted by name."""
    return _table.operators()


def snapshot() -> dict[OpOverload, JvpRule]:
    """A copy of the table, for :func:`restore`."""
    return _table.snapshot()


def restore(saved: dict[OpOverload, JvpRule]) -> None:
    """Make the table exactly ``saved`` again; listeners hear of every operator that changed."""
    _table.restore(saved)


def subscribe(listener: Listener) -> None:
    """Call ``listener(event, op)`` with event ``"register"`` or ``"unregister"``."""
    _table.subscribe(listener)


def _split(value: Any) -> tuple[Any, Any]:
    if isinstance(value, torch.Tensor):
        primal, tangent = unpack_dual(value)
        return (value if tangent is None else primal), tangent
    if isinstance(value, (list, tuple)):
        pairs = [_split(v) for v in value]
        return type(value)(p for p, _ in pairs), [t for _, t in pairs]
    return value, None


def split_tangents(schema: torch.FunctionSchema, stack: Iterable[Any]) -> tuple[list[Any], list[Any]]:
    """A boxed stack of arguments as ``(primals, tangents)`` at the current forward-AD level.

    A tensor becomes its primal and its tangent (or ``None``); a ``Tensor[]``
    argument a list of primals and a list of tangents; anything else itself
    and ``None``.
    """
    primals, tangents = [], []
    for holds_tensors, value in zip(layout(schema).holds_tensors, stack):
        if holds_tensors and value is not None:
            primal, tangent = _split(value)
        else:
            primal, tangent = value, None
        primals.append(primal)
        tangents.append(tangent)
    return primals, tangents


def call(op: OpOverload, primals: list[Any]) -> Any:
    """Call ``op`` with a list of arguments in schema order (keyword-only ones passed by keyword).

    Example:
        >>> import torch
        >>> from fwdecomp.jvp_rules import call
        >>> op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
        >>> q = torch.zeros(1, 1, 2, 4)
        >>> out, lse = call(op, [q, q, q, 0.0, False, None, 0.5])
        >>> out.shape
        torch.Size([1, 1, 2, 4])
    """
    schema = schema_of(op)
    if not layout(schema).kwarg_only:  # every argument positional: no conversion
        return op(*primals)
    args, kwargs = stack_to_arguments(schema, list(primals))
    return op(*args, **kwargs)


class _RuleError(DecompositionError):
    pass


def _warn_on_forward_over_reverse(rule: JvpRule) -> Callable[[torch.Tensor], None]:
    """A tensor hook on a rule's output: warn when its gradient is being differentiated in forward mode."""

    def hook(grad: torch.Tensor) -> None:
        if dual_level_active() and forward_grad_is_enabled() and tangent_of(grad) is not None:
            warnings.warn(
                f"fwdecomp: a gradient through {rule.name} is being differentiated in forward mode "
                "(forward-over-reverse, e.g. a Hessian-vector product) inside the forward-AD level where its JVP "
                f"rule stripped the tangents; {rule.name}'s registered backward was recorded without them, so "
                "the resulting tangent misses the backward's own dependence on the inputs. For forward-over-"
                f"reverse, register a decomposition of {rule.name}, or use torch.func.jvp(torch.func.grad(f)); "
                "if you do not use the gradients' tangents, ignore this warning.",
                stacklevel=2,
            )

    return hook


def _attach(rule: JvpRule, index: int, ret: Any, value: Any, tangent: Any) -> Any:
    label = f"output {index}" + (f" ({ret.name!r})" if ret.name else "")

    def fail(why: str) -> _RuleError:
        return _RuleError(
            f"fwdecomp: the JVP rule of {rule.name} ({describe_function(rule.fn)}) returned {why} for {label}. "
            "Fix the rule: output_tangents must follow the schema's returns, each a tensor of its output's "
            "shape and dtype, or None."
        )

    if isinstance(value, torch.Tensor) and tangent_of(value) is not None:
        raise fail("an output that already carries a tangent (compute outputs from the primals only)")
    if tangent is None:
        return value
    if isinstance(value, (list, tuple)):
        if not isinstance(tangent, (list, tuple)) or len(tangent) != len(value):
            raise fail(f"a {type(tangent).__name__} tangent for a list of {len(value)} tensors")
        return [_attach(rule, index, ret, v, t) for v, t in zip(value, tangent)]
    if not isinstance(value, torch.Tensor):
        raise fail(f"a tangent for the non-tensor value {value!r}")
    if not isinstance(tangent, torch.Tensor):
        raise fail(f"a tangent of type {type(tangent).__name__}")
    if not (value.is_floating_point() or value.is_complex()):
        raise fail(f"a tangent for a {value.dtype} output (only floating-point and complex outputs have tangents)")
    if tangent.shape != value.shape or tangent.dtype != value.dtype:
        raise fail(
            f"a tangent of shape {tuple(tangent.shape)} and dtype {tangent.dtype}, but the output has "
            f"shape {tuple(value.shape)} and dtype {value.dtype}"
        )
    return forward_ad.make_dual(value, tangent)


def run_rule(
    op: OpOverload,
    stack: list[Any],
    rule: JvpRule | None = None,
    *,
    may_decline: bool = False,
    split: tuple[list[Any], list[Any]] | None = None,
    trusted: bool = False,
) -> bool:
    """Run ``op``'s JVP rule on a boxed stack of (tangent-carrying) arguments; leave its results there.

    The boxed contract of ``DecompositionInterface.run_decomposition``: on
    entry ``stack`` holds the arguments in schema order, on return the
    results, each floating-point output carrying the rule's tangent at the
    current forward-AD level. Outputs are checked like a decomposition's (count,
    kinds, shapes and dtypes), tangents against their outputs.

    With ``may_decline``, a rule that returns ``NotImplemented`` (a case it
    does not cover) leaves ``stack`` as it was and ``False`` is returned; the
    caller runs something else. Otherwise the result is ``True``. ``split``: the
    stack's ``split_tangents``, if the caller has it. ``trusted`` (fwdecomp's own,
    tested rules): the outputs are not checked against the operator's meta kernel.
    """
    schema = schema_of(op)
    rule = rule or find(op)
    if rule is None:
        raise NotImplementedError(f"fwdecomp: no JVP rule is registered for {qualified_name(op)}")
    primals, tangents = split or split_tangents(schema, stack)
    try:
        result = rule.fn(primals, tangents)
        if may_decline and result is NotImplemented:
            return False
    except Exception as error:
        raise DecompositionError(
            f"fwdecomp: the JVP rule of {rule.name} ({describe_function(rule.fn)}) raised "
            f"{type(error).__name__}: {error}"
        ) from error
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise DecompositionError(
            f"fwdecomp: the JVP rule of {rule.name} ({describe_function(rule.fn)}) must return a pair "
            f"(outputs, output_tangents), got {type(result).__name__}"
        )
    outputs, output_tangents = result
    try:
        outputs = results_to_stack(schema, outputs)
        if output_tangents is None:
            output_tangents = [None] * len(outputs)
        else:
            output_tangents = results_to_stack(schema, output_tangents)
    except TypeError as error:
        raise DecompositionError(
            f"fwdecomp: the JVP rule of {rule.name} ({describe_function(rule.fn)}) returned the wrong number "
            f"of outputs or output tangents: {error}"
        ) from error
    if trusted:
        # a tangent computed under autocast may come back in the autocast dtype: the output's it must be
        stack[:] = [
            v if t is None else make_dual(v, t if t.dtype == v.dtype else t.to(v.dtype))
            for v, t in zip(outputs, output_tangents)
        ]
        return True
    args, kwargs = stack_to_arguments(schema, primals)
    try:
        check_results(op, args, kwargs, outputs)
    except DecompositionError as error:  # the contract's wording is a decomposition's
        why = str(error).replace(f"fwdecomp: the decomposition of {rule.name} ", "")
        raise DecompositionError(
            f"fwdecomp: the JVP rule of {rule.name} ({describe_function(rule.fn)}) returned outputs that "
            f"{rule.name} cannot return: it {why.replace('Fix the registered decomposition', 'Fix the rule')}"
        ) from error
    for value in outputs:
        for tensor in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(tensor, torch.Tensor) and tensor.grad_fn is not None:
                tensor.register_hook(_warn_on_forward_over_reverse(rule))
    stack[:] = [
        _attach(rule, index, ret, value, tangent)
        for index, (ret, value, tangent) in enumerate(zip(schema.returns, outputs, output_tangents))
    ]
    return True
