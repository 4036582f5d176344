"""Numerical checks of a decomposition's tangents, shared by ``fwdecomp audit`` and the tests.

Each check calls the *operator* (through the dispatcher, so fwdecomp's
routing is what gets tested) on a :class:`~fwdecomp.registry.Sample` and
compares the output tangents against references computed without fwdecomp's
forward path: central finite differences in float64, and ``J v`` assembled
from reverse mode.

Example:
    >>> import torch, fwdecomp
    >>> from fwdecomp.checks import check_sample
    >>> from fwdecomp.registry import Sample
    >>> op = torch.ops.aten._pdist_forward.default
    >>> sample = Sample((torch.randn(4, 3, dtype=torch.float64), 2.0))
    >>> with fwdecomp.enabled():
    ...     report = check_sample(op, sample, methods=("forward_ad",))
    >>> report.passed
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.autograd import forward_ad

from fwdecomp._torch import OpOverload, qualified_name
from fwdecomp.registry import Sample

__all__ = [
    "ALL_METHODS",
    "CheckReport",
    "check_sample",
    "differentiable_positions",
    "finite_difference_jvp",
    "gradcheck_sample",
    "sample_function",
]

#: Ways of computing a JVP that the checks compare against finite differences.
ALL_METHODS = ("forward_ad", "func.jvp", "jacfwd", "reverse")


def _is_missing_reverse(error: BaseException) -> bool:
    """PyTorch's error for an operator with no reverse-mode formula (most ``*_backward``)."""
    message = str(error)
    return (
        isinstance(error, (NotImplementedError, RuntimeError))
        and "derivative for" in message
        and "not implemented" in message
        and "forward AD" not in message
    )


@dataclass
class CheckReport:
    """The largest error of each JVP method against central finite differences."""

    op: str
    note: str
    errors: dict[str, float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        parts = [f"{k}={v:.1e}" for k, v in self.errors.items()]
        parts += [f"{k}: {v}" for k, v in self.failures.items()]
        return f"{self.op} [{self.note}] " + ", ".join(parts)


def differentiable_positions(sample: Sample) -> list[int]:
    """Positions (in ``sample.args``) of the tensors that get tangents."""
    if sample.tangents is not None:
        return list(sample.tangents)
    return [
        i
        for i, a in enumerate(sample.args)
        if isinstance(a, torch.Tensor) and (a.is_floating_point() or a.is_complex())
    ]


def _outputs(result: Any) -> tuple[torch.Tensor, ...]:
    values = result if isinstance(result, (tuple, list)) else (result,)
    return tuple(v for v in values if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()))


def sample_function(
    op: Callable[..., Any], sample: Sample, positions: Sequence[int] | None = None
) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``f(*differentiable_tensors) -> floating outputs`` for one sample of ``op``."""
    positions = list(differentiable_positions(sample) if positions is None else positions)

    def f(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values = list(tensors)
        if sample.prepare is not None:
            values = sample.prepare(values)
        args = list(sample.args)
        for position, value in zip(positions, values):
            args[position] = value
        return _outputs(op(*args, **sample.kwargs))

    return f


def finite_difference_jvp(
    f: Callable[..., tuple[torch.Tensor, ...]],
    primals: Sequence[torch.Tensor],
    tangents: Sequence[torch.Tensor],
    eps: float = 1e-6,
) -> tuple[torch.Tensor, ...]:
    """Central difference ``(f(x + eps v) - f(x - eps v)) / 2 eps``, computed in float64/complex128."""

    def wide(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.complex128 if t.is_complex() else torch.float64)

    primals = [wide(p) for p in primals]
    tangents = [wide(t) for t in tangents]
    with torch.no_grad():
        plus = f(*[p + eps * t for p, t in zip(primals, tangents)])
        minus = f(*[p - eps * t for p, t in zip(primals, tangents)])
    return tuple((a - b) / (2 * eps) for a, b in zip(plus, minus))


def _jvp_forward_ad(f, primals, tangents):
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)]
        outs = f(*duals)
        result = []
        for out in outs:
            tangent = forward_ad.unpack_dual(out).tangent
            result.append(torch.zeros_like(out) if tangent is None else tangent)
        return tuple(result)


def _jvp_func(f, primals, tangents):
    return torch.func.jvp(f, tuple(primals), tuple(tangents))[1]


def _contract(jacobians, outs, tangents):
    """``J v`` from per-(output, input) Jacobian blocks."""
    result = []
    for out, row in zip(outs, jacobians):
        total = torch.zeros(out.numel(), dtype=out.dtype, device=out.device)
        for block, tangent in zip(row, tangents):
            matrix = block.reshape(out.numel(), tangent.numel())
            total = total + matrix @ tangent.reshape(-1).to(matrix.dtype)
        result.append(total.reshape(out.shape))
    return tuple(result)


def _jvp_jacfwd(f, primals, tangents):
    argnums = tuple(range(len(primals)))
    jacobians = torch.func.jacfwd(f, argnums=argnums)(*primals)
    return _contract(jacobians, f(*primals), tangents)


def _jvp_reverse(f, primals, tangents):
    # chunk_size=1: torch 2.13's vmap rule for _cdist_backward gives a wrong
    # Jacobian for unbatched inputs (see README), so the reference avoids vmap.
    argnums = tuple(range(len(primals)))
    try:
        jacobians = torch.func.jacrev(f, argnums=argnums, chunk_size=1)(*primals)
    except RuntimeError as error:
        if "autograd.Function with functorch transforms" not in str(error):
            raise
        # custom operators whose autograd is registered with torch.library.register_autograd
        # cannot run under torch.func in torch 2.13 (pytorch#168393): plain reverse mode instead
        jacobians = torch.autograd.functional.jacobian(f, tuple(primals))
        jacobians = tuple(tuple(row) for row in jacobians)
    return _contract(jacobians, f(*primals), tangents)


_METHODS: dict[str, Callable[..., tuple[torch.Tensor, ...]]] = {
    "forward_ad": _jvp_forward_ad,
    "func.jvp": _jvp_func,
    "jacfwd": _jvp_jacfwd,
    "reverse": _jvp_reverse,
}


def _refuses_grad(error: BaseException) -> bool:
    """PyTorch's error for an operator it cannot even run on inputs that require grad.

    Operators without any derivative formula whose outputs include integer
    tensors (e.g. ``_embedding_bag_forward_only``) fail that way.
    """
    return isinstance(error, RuntimeError) and "Autograd not support dtype" in str(error)


def _reverse_differentiable(f, primals) -> list[bool] | None:
    """Which outputs reverse mode differentiates (PyTorch marks some, e.g. logsumexp, as not).

    ``None`` where PyTorch refuses to run the operator on inputs that require grad.
    """
    leaves = [p.detach().requires_grad_() for p in primals]
    with torch.enable_grad():
        try:
            return [out.requires_grad for out in f(*leaves)]
        except RuntimeError as error:
            if _refuses_grad(error):
                return None
            raise


def _tolerance(dtype: torch.dtype) -> tuple[float, float]:
    if dtype in (torch.float64, torch.complex128):
        return 1e-6, 1e-6
    if dtype in (torch.float32, torch.complex64):
        return 2e-3, 2e-3
    return 5e-2, 5e-2


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error relative to ``1 + max |want|``, over the entries where ``want`` is finite.

    Finite differences are NaN where the output itself is infinite (e.g. a
    log-probability of an impossible event): no tangent can be compared there.
    """
    finite = torch.isfinite(want)
    if not bool(finite.all()):
        got, want = got[finite], want[finite]
    if got.numel() == 0:
        return 0.0
    got = got.to(want.dtype)
    scale = 1.0 + want.abs().max().item()
    return ((got - want).abs().max().item()) / scale


def check_sample(
    op: OpOverload | Callable[..., Any],
    sample: Sample,
    methods: Sequence[str] = ALL_METHODS,
    seed: int = 0,
) -> CheckReport:
    """Compare every ``method``'s JVP of ``op`` on ``sample`` with central finite differences."""
    name = qualified_name(op) if isinstance(op, OpOverload) else getattr(op, "__name__", str(op))
    report = CheckReport(name, sample.note)
    positions = differentiable_positions(sample)
    primals = [sample.args[i] for i in positions]
    gen = torch.Generator(device=primals[0].device if primals else "cpu").manual_seed(seed)
    tangents = [torch.randn(p.shape, dtype=p.dtype, device=p.device, generator=gen) for p in primals]
    f = sample_function(op, sample, positions)
    reference = finite_difference_jvp(f, primals, tangents)
    rtol, _ = _tolerance(primals[0].dtype if primals else torch.float64)
    empty = any(t.numel() == 0 for t in list(primals) + list(reference))
    for method in methods:
        if method in ("jacfwd", "reverse") and empty:
            continue  # no basis vectors to batch over; forward_ad and func.jvp cover these
        if method in sample.unreliable:
            report.skipped[method] = sample.unreliable[method]
            continue
        compare: list[bool] | None = [True] * len(reference)
        if method == "reverse":
            compare = _reverse_differentiable(f, primals)
            if compare is None:
                report.skipped[method] = "PyTorch cannot run this operator on inputs that require grad"
                continue
        try:
            got = _METHODS[method](f, primals, tangents)
        except Exception as error:  # a check reports, it does not stop the audit
            if method == "reverse" and _is_missing_reverse(error):
                report.skipped[method] = "PyTorch has no reverse-mode formula for this operator"
                continue
            report.failures[method] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            continue
        if len(got) != len(reference):
            report.failures[method] = f"{len(got)} output tangents, expected {len(reference)}"
            continue
        worst = 0.0
        for keep, g, want in zip(compare, got, reference):
            if not keep:
                continue
            if tuple(g.shape) != tuple(want.shape):
                report.failures[method] = f"tangent shape {tuple(g.shape)}, expected {tuple(want.shape)}"
                break
            if g.is_floating_point() and not torch.isfinite(g).all() and torch.isfinite(want).all():
                report.failures[method] = "non-finite tangent"
                break
            worst = max(worst, _error(g, want))
        else:
            report.errors[method] = worst
            if not math.isfinite(worst) or worst > rtol:
                report.failures[method] = f"max error {worst:.2e} > {rtol:.0e}"
    return report


def gradcheck_sample(op: Callable[..., Any], sample: Sample, batched: bool = True, fast_mode: bool = False) -> bool:
    """``torch.autograd.gradcheck`` with forward and reverse AD on the reverse-differentiable outputs.

    ``fast_mode`` checks random projections of the Jacobians instead of every
    entry (PyTorch's own fast gradcheck): the same failures, far fewer calls.
    """
    positions = differentiable_positions(sample)
    primals = [sample.args[i].detach().clone().requires_grad_() for i in positions]
    f = sample_function(op, sample, positions)
    keep = _reverse_differentiable(f, primals)

    def g(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(out for out, k in zip(f(*tensors), keep) if k)

    def forward_only(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # The operator runs on inputs that do not require grad (forward-AD duals pass through);
        # a zero anchor makes its outputs require grad, as gradcheck expects.
        plain = [t.detach() if t.requires_grad else t for t in tensors]
        anchor = sum(t.sum() * 0 for t in tensors if t.requires_grad)
        return tuple(out + anchor for out in f(*plain))

    def run(backward: bool) -> bool:
        return torch.autograd.gradcheck(
            g if keep is not None else forward_only,
            tuple(primals),
            check_forward_ad=True,
            check_backward_ad=backward,
            check_batched_forward_grad=batched,
            check_undefined_grad=False,
            fast_mode=fast_mode,
        )

    if keep is None or "reverse" in sample.unreliable:  # no (trustworthy) reverse mode in PyTorch
        return run(backward=False)
    try:
        return run(backward=True)
    except Exception as error:
        if not _is_missing_reverse(error):
            raise
        return run(backward=False)  # PyTorch cannot differentiate it in reverse mode
