"""``torch.autograd.Function`` in forward mode: a ``jvp`` derived from the function's own ``forward``.

An ``autograd.Function`` without a ``jvp`` staticmethod fails under
``torch.autograd.forward_ad`` and ``torch.func.jvp``. When its ``forward``
is made of differentiable PyTorch operations (it was written as a Function
for a hand-made ``backward``: memory, speed, numerical care),
:func:`jvp_from_forward` gives it a ``jvp`` that re-runs that ``forward`` on
the inputs with their tangents attached, so PyTorch's own forward formulas
compute the output tangents. The hand-made ``backward`` still serves reverse
mode.

Costs and limits: the ``jvp`` runs ``forward`` a second time (with tangents),
and keeps the inputs on ``ctx`` until the graph is freed. A forward that
leaves PyTorch (``.numpy()``, ``.item()``, a C extension), detaches, or
modifies its inputs in place (``ctx.mark_dirty``) cannot be differentiated
this way: :class:`NotForwardDifferentiableError` says so, and which output.

Example:
    >>> import torch, fwdecomp
    >>> @fwdecomp.jvp_from_forward
    ... class SoftClip(torch.autograd.Function):
    ...     @staticmethod
    ...     def forward(x, limit):
    ...         return limit * torch.tanh(x / limit)
    ...     @staticmethod
    ...     def setup_context(ctx, inputs, output):
    ...         ctx.save_for_backward(inputs[0])
    ...         ctx.limit = inputs[1]
    ...     @staticmethod
    ...     def backward(ctx, grad):
    ...         (x,) = ctx.saved_tensors
    ...         return grad / torch.cosh(x / ctx.limit) ** 2, None
    >>> x = torch.tensor([0.0, 1.0])
    >>> torch.func.jvp(lambda x: SoftClip.apply(x, 2.0), (x,), (torch.ones(2),))[1]
    tensor([1.0000, 0.7864])
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch
from torch.autograd import forward_ad

from fwdecomp._torch import forward_grad_enabled, function_default, primal_of, tangent_of

__all__ = ["NotForwardDifferentiableError", "jvp_from_forward"]

FunctionType = TypeVar("FunctionType", bound=type)

_INPUTS = "_fwdecomp_inputs"
_NOT_DIFFERENTIABLE = "_fwdecomp_not_differentiable"


class NotForwardDifferentiableError(RuntimeError):
    """An ``autograd.Function``'s ``forward`` cannot be differentiated in forward mode by re-running it."""


class _ReplayContext:
    """A stand-in ``ctx`` for re-running an old-style ``forward(ctx, ...)``: it remembers nothing."""

    needs_input_grad: tuple[bool, ...] = ()
    materialize_grads = True

    def save_for_backward(self, *tensors: Any) -> None:
        pass

    save_for_forward = save_for_backward
    mark_non_differentiable = save_for_backward

    def mark_dirty(self, *tensors: Any) -> None:
        raise NotForwardDifferentiableError("modifies its inputs in place (ctx.mark_dirty)")

    def set_materialize_grads(self, value: bool) -> None:
        pass


def _outputs(result: Any) -> tuple[Any, ...]:
    return result if isinstance(result, tuple) else (result,)


def _differentiable(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())


def _remember(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    setattr(ctx, _INPUTS, tuple(inputs))
    marked = getattr(ctx, "non_differentiable", ()) or ()
    setattr(
        ctx,
        _NOT_DIFFERENTIABLE,
        {i for i, out in enumerate(_outputs(output)) if any(out is m for m in marked)},
    )


def _replay(name: str, forward: Callable[..., Any], old_style: bool, ctx: Any, tangents: tuple[Any, ...]) -> Any:
    """The output tangents of ``forward`` at the inputs ``ctx`` remembers, along ``tangents``."""
    if getattr(ctx, "dirty_tensors", None):
        raise NotForwardDifferentiableError(
            f"fwdecomp.jvp_from_forward: {name}.forward modifies its inputs in place (ctx.mark_dirty); "
            "running it again to differentiate it would modify them again. Write a jvp staticmethod by hand."
        )
    inputs = getattr(ctx, _INPUTS)
    with forward_grad_enabled(True):
        duals = []
        for value, tangent in zip(inputs, tangents):
            if _differentiable(value):
                # Every floating-point input gets a tangent (zero where none came), so an output
                # without one depends on no input through PyTorch operations: it left PyTorch.
                primal = primal_of(value)
                duals.append(forward_ad.make_dual(primal, torch.zeros_like(primal) if tangent is None else tangent))
            else:
                duals.append(value)
        try:
            result = forward(_ReplayContext(), *duals) if old_style else forward(*duals)
        except NotForwardDifferentiableError as error:
            raise NotForwardDifferentiableError(
                f"fwdecomp.jvp_from_forward: {name}.forward {error}; write a jvp staticmethod by hand."
            ) from None
        except Exception as error:
            raise NotForwardDifferentiableError(
                f"fwdecomp.jvp_from_forward: running {name}.forward again with forward-AD tangents on its "
                f"inputs raised {type(error).__name__}: {error}. Its forward must be made of differentiable "
                "PyTorch operations; otherwise write a jvp staticmethod by hand."
            ) from error
        output_tangents = []
        for index, out in enumerate(_outputs(result)):
            tangent = tangent_of(out) if _differentiable(out) else None
            if tangent is None and _differentiable(out) and index not in getattr(ctx, _NOT_DIFFERENTIABLE):
                raise NotForwardDifferentiableError(
                    f"fwdecomp.jvp_from_forward: output {index} of {name}.forward does not depend on its inputs "
                    "through differentiable PyTorch operations (it leaves PyTorch, e.g. .numpy() or .item(), or "
                    "detaches), so forward mode cannot differentiate it. Write a jvp staticmethod by hand, or mark "
                    "the output with ctx.mark_non_differentiable if it is constant."
                )
            output_tangents.append(tangent)
    return output_tangents[0] if not isinstance(result, tuple) else tuple(output_tangents)


def jvp_from_forward(cls: FunctionType) -> FunctionType:
    """Give the ``torch.autograd.Function`` subclass ``cls`` a ``jvp`` that differentiates its ``forward``.

    Works for both styles of Function: ``forward(ctx, *args)``, and
    ``forward(*args)`` with ``setup_context`` (the style ``torch.func``
    transforms require). ``cls`` is modified and returned, so it is used as a
    class decorator. Raises ``TypeError`` for anything but a Function subclass,
    and for one that already has a ``jvp``.

    Example:
        >>> import torch, fwdecomp
        >>> from torch.autograd import forward_ad
        >>> @fwdecomp.jvp_from_forward
        ... class Square(torch.autograd.Function):
        ...     @staticmethod
        ...     def forward(ctx, x):
        ...         ctx.save_for_backward(x)
        ...         return x * x
        ...     @staticmethod
        ...     def backward(ctx, grad):
        ...         (x,) = ctx.saved_tensors
        ...         return 2 * x * grad
        >>> with forward_ad.dual_level():
        ...     y = Square.apply(forward_ad.make_dual(torch.tensor([3.0]), torch.tensor([1.0])))
        ...     forward_ad.unpack_dual(y).tangent
        tensor([6.])
    """
    if not (isinstance(cls, type) and issubclass(cls, torch.autograd.Function)):
        raise TypeError(
            f"fwdecomp.jvp_from_forward decorates a torch.autograd.Function subclass, got {cls!r}; "
            "for an operator, use @fwdecomp.register_decomposition or @fwdecomp.register_jvp"
        )
    if cls.jvp is not function_default("jvp"):
        raise TypeError(f"fwdecomp.jvp_from_forward: {cls.__name__} already defines jvp; remove one of the two")
    name = cls.__name__
    forward = cls.forward
    old_style = cls.setup_context is function_default("setup_context")
    if old_style:

        @functools.wraps(forward)
        def remembering_forward(ctx: Any, *args: Any) -> Any:
            output = forward(ctx, *args)
            _remember(ctx, args, output)
            return output

        cls.forward = staticmethod(remembering_forward)
    else:
        setup_context = cls.setup_context

        @functools.wraps(setup_context)
        def remembering_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> Any:
            result = setup_context(ctx, inputs, output)
            _remember(ctx, inputs, output)
            return result

        cls.setup_context = staticmethod(remembering_setup_context)

    def jvp(ctx: Any, *tangents: Any) -> Any:
        return _replay(name, forward, old_style, ctx, tangents)

    jvp.__qualname__ = f"{cls.__qualname__}.jvp"
    cls.jvp = staticmethod(jvp)
    return cls
