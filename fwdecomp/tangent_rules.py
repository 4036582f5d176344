"""Tangent rules: fused-kernel JVPs that speed up built-in decompositions where reverse mode cannot see them.

A decomposition re-expresses an operator in operators with forward formulas,
so it is right under every transform, forward-over-reverse included; but where
PyTorch's fused kernel meets a gather/scatter or step-by-step decomposition
(``grid_sample``, ``embedding_bag``, CTC, the margin losses) the JVP costs tens
of primals. A *tangent rule* computes the tangents with PyTorch's own fused
kernels instead — ``grid_sample`` of the image tangent, ``embedding_bag`` of
the weight tangent, a loss's gradient kernel contracted with the tangent —
JAX style, like a :mod:`JVP rule <fwdecomp.jvp_rules>`::

    rule(primals, tangents) -> (outputs, output_tangents)  or  NotImplemented

``NotImplemented`` declines a case the rule does not cover (a tangent on an
argument it does not handle, a mode it does not know): the decomposition runs.

When a rule runs: a forward-AD level is open and **nothing can record the
call for reverse mode**: grad mode is off or no argument (primal or tangent,
or a tensor under its ``torch.func`` wrappers) requires grad, and no
``torch.func`` reverse transform (``grad``, ``vjp``, ``jacrev``, ``hessian``)
is on the stack (nor gradcheck's legacy ``vmap``, whose batching rules
are fewer). Then the rule's result is the
decomposition's, computed faster. Otherwise the decomposition runs: a rule's
outputs record the fused kernels' own backward on tangent-free primals, which
forward-over-reverse within one forward-AD level would differentiate wrongly,
and its tangent computation may use kernels without a double backward.

A rule belongs to one built-in decomposition (the decorator below stores it
on the function); :func:`disabled` switches every rule off, so the
decompositions alone run (the tests check both ways). A user's
``register_jvp`` or ``register_decomposition`` replaces the built-in entry,
rule included.

Example:
    >>> import torch, fwdecomp
    >>> from fwdecomp import tangent_rules
    >>> image, grid = torch.randn(1, 2, 4, 4), torch.rand(1, 3, 3, 2) * 2 - 1
    >>> f = lambda image: torch.nn.functional.grid_sample(image, grid, align_corners=False)
    >>> with fwdecomp.enabled():
    ...     _, fast = torch.func.jvp(f, (image,), (torch.ones_like(image),))
    ...     with tangent_rules.disabled():
    ...         _, decomposed = torch.func.jvp(f, (image,), (torch.ones_like(image),))
    >>> torch.allclose(fast, decomposed, atol=1e-6)
    True
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Iterator, TypeVar

import torch

from fwdecomp import jvp_rules
from fwdecomp._torch import (
    OpOverload,
    below_autograd,
    forward_ad_level,
    functorch_level,
    grad_transform_active,
    is_legacy_batched,
    requires_grad_below,
    schema_of,
    unpack_dual,
)
from fwdecomp.autograd import tangent_free_calls
from fwdecomp.stack import layout

__all__ = [
    "RULE_ATTRIBUTE",
    "TangentRule",
    "add",
    "disabled",
    "in_place",
    "is_enabled",
    "multilinear",
    "reverse_mode_can_see",
    "rule_of",
    "try_rule",
    "with_tangent_rule",
]

TangentRule = Callable[[list[Any], list[Any]], Any]
F = TypeVar("F", bound=Callable[..., Any])

#: The attribute of a decomposition function that holds its tangent rule.
RULE_ATTRIBUTE = "fwdecomp_tangent_rule"


class _State(threading.local):
    def __init__(self) -> None:
        self.enabled = True


_state = _State()


def with_tangent_rule(rule: TangentRule) -> Callable[[F], F]:
    """Give the decorated (built-in) decomposition ``rule`` as its fast path; apply below ``@builtin``."""

    def decorator(fn: F) -> F:
        setattr(fn, RULE_ATTRIBUTE, rule)
        return fn

    return decorator


def rule_of(fn: Callable[..., Any]) -> TangentRule | None:
    """The tangent rule stored on a decomposition function, or ``None``."""
    return getattr(fn, RULE_ATTRIBUTE, None)


def is_enabled() -> bool:
    """Whether tangent rules run where they apply (this thread)."""
    return _state.enabled


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the decompositions alone in this block (this thread), never a tangent rule."""
    previous, _state.enabled = _state.enabled, False
    try:
        yield
    finally:
        _state.enabled = previous


def _requires_grad(values: list[Any]) -> bool:
    for value in values:
        if isinstance(value, torch.Tensor):
            if requires_grad_below(value):
                return True
        elif isinstance(value, (list, tuple)) and _requires_grad([v for v in value if v is not None]):
            return True
    return False


def reverse_mode_can_see(primals: list[Any], tangents: list[Any]) -> bool:
    """Whether a call with these (split) arguments may be recorded for reverse mode (autograd or ``torch.func``)."""
    if grad_transform_active():
        return True
    return torch.is_grad_enabled() and (_requires_grad(primals) or _requires_grad(tangents))


def _legacy_vmap(tangents: list[Any]) -> bool:
    """gradcheck's batched forward check (the legacy ``vmap``, with fewer batching rules): decompositions only."""
    return any(isinstance(t, torch.Tensor) and is_legacy_batched(t) for t in tangents)


def _split_if_unseen(schema: torch.FunctionSchema, stack: list[Any]) -> tuple[list[Any], list[Any]] | None:
    """``split_tangents(schema, stack)``, or ``None`` where :func:`reverse_mode_can_see` the call or a
    tangent is the legacy ``vmap``'s (:func:`_legacy_vmap`).

    One pass over the arguments where they are tensors (it runs on every rule call, where the three
    passes cost more than a small operator); the general functions where a list holds tensors.
    """
    if grad_transform_active():
        return None
    grad = torch.is_grad_enabled()
    primals, tangents = list(stack), [None] * len(stack)
    for i, (holds_tensors, value) in enumerate(zip(layout(schema).holds_tensors, stack)):
        if not holds_tensors or value is None:
            continue
        if not isinstance(value, torch.Tensor):
            primals, tangents = jvp_rules.split_tangents(schema, stack)
            return None if reverse_mode_can_see(primals, tangents) or _legacy_vmap(tangents) else (primals, tangents)
        primal, tangent = unpack_dual(value)
        if tangent is not None:
            if is_legacy_batched(tangent) or (grad and requires_grad_below(tangent)):
                return None
            primals[i], tangents[i] = primal, tangent
        if grad and requires_grad_below(primal):
            return None
    return primals, tangents


def try_rule(op: OpOverload, stack: list[Any], fn: Callable[..., Any]) -> bool:
    """Run the tangent rule of decomposition ``fn`` on ``stack`` if one applies (``False``: ``stack`` unchanged)."""
    rule = rule_of(fn)
    if rule is None or not _state.enabled:
        return False
    split = _split_if_unseen(schema_of(op), stack)
    if split is None:
        return False
    # One forward-AD level and no torch.func transform: the primals carry no tangent of another
    # level, so the rule's operators need no autograd kernel at all (see _below_autograd), and
    # fwdecomp's kernels, which sit at the autograd keys, are not reached.
    alone = forward_ad_level() == 0 and functorch_level() is None
    key = (op, rule, alone)
    bound = _bound.get(key)
    if bound is None:
        bound = _bound[key] = jvp_rules.JvpRule(op, _below_autograd(rule) if alone else rule)
    if alone:
        return jvp_rules.run_rule(op, stack, bound, may_decline=True, split=split, trusted=True)
    with tangent_free_calls():  # the rule calls operators on primals: no tangent checks needed
        return jvp_rules.run_rule(op, stack, bound, may_decline=True, split=split, trusted=True)


_bound: dict[tuple[OpOverload, TangentRule, bool], jvp_rules.JvpRule] = {}  # (op, rule, alone) -> JvpRule


def _below_autograd(rule: TangentRule) -> TangentRule:
    """``rule`` with its operators dispatched below the autograd keys.

    Where a rule runs nothing records for reverse mode, and with a single forward-AD
    level the primals it computes on carry no tangent (of an outer level) either: the
    autograd kernels have nothing to do. Skipping them saves their per-operator cost
    and, for operators fwdecomp routes (a rule calls its own operator's kernel),
    fwdecomp's Python kernel (~5 us a call).
    """

    def below(primals: list[Any], tangents: list[Any]) -> Any:
        with below_autograd():
            return rule(primals, tangents)

    return below


# --- helpers for writing rules -------------------------------------------------------


def add(*terms: torch.Tensor | None) -> torch.Tensor | None:
    """The sum of the tangent terms that are not ``None`` (``None`` if all are)."""
    present = [t for t in terms if t is not None]
    if not present:
        return None
    total = present[0]
    for term in present[1:]:
        total = total + term
    return total


def in_place(fresh: torch.Tensor, method: str, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``fresh.method_(*args)`` on a rule's own intermediate ``fresh``; out of place where that
    cannot be done: ``args`` broadcast ``fresh`` to a larger shape, or ``vmap`` refuses it
    (``fresh`` not batched, an argument batched). Saves a pass and an allocation on
    memory-bound tangents; nothing records a rule's operations, so the old value is never needed."""
    try:
        return getattr(fresh, method + "_")(*args, **kwargs)
    except RuntimeError:
        return getattr(fresh, method)(*args, **kwargs)


def _differentiable(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())


def _add_outputs(left: Any, right: Any) -> Any:
    if left is None:
        return right
    if isinstance(left, tuple):
        return tuple(add(a, b) for a, b in zip(left, right))
    return left + right


def multilinear(
    op: OpOverload,
    groups: tuple[tuple[str, ...], ...],
    *,
    constant: tuple[str, ...] = (),
    declines: Callable[[list[Any], list[Any]], bool] | None = None,
) -> TangentRule:
    """A rule for an operator that is linear in each *group* of arguments (named as in its schema).

    The tangent is ``sum over groups of op(primals with the group replaced by its tangents)``
    (a missing tangent in a group is zeros): exact when ``op`` is linear in each group
    jointly and in each group separately (``index_reduce(self, ..., source, "mean")``: one
    group ``("self", "source")``). Arguments named in ``constant``
    have zero derivative almost everywhere (a mask, the input of a piecewise-constant
    backward): their tangents are ignored. A tangent anywhere else, or
    ``declines(primals, tangents)`` true, declines (the decomposition runs). Outputs that are
    not floating point get no tangent.
    """
    names = [argument.name for argument in schema_of(op).arguments]
    unknown = [n for group in (*groups, constant) for n in group if n not in names]
    if unknown:
        raise ValueError(f"fwdecomp: {op} has no argument(s) {unknown}; its schema names {names}")
    positions = tuple(tuple(names.index(n) for n in group) for group in groups)
    covered = {i for group in positions for i in group} | {names.index(n) for n in constant}
    uncovered = tuple(i for i in range(len(names)) if i not in covered)
    call = functools.partial(jvp_rules.call, op)

    def rule(primals: list[Any], tangents: list[Any]) -> Any:
        if any(tangents[i] is not None for i in uncovered):
            return NotImplemented
        if declines is not None and declines(primals, tangents):
            return NotImplemented
        outputs = call(primals)
        total = None
        for group in positions:
            if all(tangents[i] is None for i in group):
                continue
            arguments = list(primals)
            for i in group:
                arguments[i] = tangents[i] if tangents[i] is not None else torch.zeros_like(primals[i])
            total = _add_outputs(total, call(arguments))
        if isinstance(outputs, tuple):
            if total is None:
                return outputs, None
            return outputs, tuple(t if _differentiable(o) else None for o, t in zip(outputs, total))
        return outputs, total

    return rule
