"""Measuring a JVP and a Hessian-vector product through a function against finite differences.

Part of :mod:`fwdecomp.model_audit` (its docstring explains the choice of
reference). This module knows:

- :class:`Target`: the audited function as a function of the tensors that get
  tangents (inputs and/or an ``nn.Module``'s parameters, through
  ``torch.func.functional_call``), optionally evaluated with every
  floating-point tensor cast to float64;
- the finite-difference references (2-point in float64, or a 4-point stencil
  in the function's own precision when it cannot run in float64);
- the measurements themselves, each made with fwdecomp enabled and with
  PyTorch alone, and what raised (operator and user line) when one fails.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Literal, Sequence

import torch

from fwdecomp import interface
from fwdecomp._recording import (
    OperatorUse,
    Site,
    differentiable_outputs,
    first_line,
    is_differentiable,
    is_tensor,
    map_leaves,
    routing,
    tensors,
    traceback_site,
)
from fwdecomp._torch import OpOverload, qualified_name

Wrt = Literal["inputs", "params", "both"]

# --- the audited function ---------------------------------------------------------------


class Target:
    """``fn`` as a function of the tensors that get tangents (inputs and/or parameters), in that order."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], wrt: Wrt) -> None:
        self.fn = fn
        self.module = fn if isinstance(fn, torch.nn.Module) else None
        self.args, self.kwargs, self.wrt = args, kwargs, wrt
        self.values: list[torch.Tensor] = []
        if wrt in ("inputs", "both"):
            self.values += [t.detach() for t in tensors((args, kwargs)) if is_differentiable(t)]
        self.inputs = len(self.values)
        self.param_names: list[str] = []
        self.fixed: dict[str, torch.Tensor] = {}
        if self.module is not None:
            for name, param in self.module.named_parameters():
                if wrt in ("params", "both") and param.requires_grad and is_differentiable(param):
                    self.param_names.append(name)
                    self.values.append(param.detach())
                else:
                    self.fixed[name] = param.detach()
            # Buffers are passed as copies, so running statistics updated in place change the copies only.
            for name, buffer in self.module.named_buffers():
                self.fixed[name] = buffer.detach().clone()

    def summary(self) -> list[str]:
        """What gets tangents, in words."""
        parts = []
        if self.inputs:
            parts.append(f"{self.inputs} input{'s' * (self.inputs != 1)}")
        params = len(self.values) - self.inputs
        if params:
            numbers = sum(v.numel() for v in self.values[self.inputs :])
            parts.append(f"{params} parameter tensor{'s' * (params != 1)} ({numbers} numbers)")
        return parts

    def call(self, values: Sequence[torch.Tensor], cast: torch.dtype | None = None) -> Any:
        """``fn`` with ``values`` in place of the differentiated tensors, other floating tensors cast to ``cast``."""

        def convert(t: torch.Tensor) -> torch.Tensor:
            return t.to(cast) if cast is not None and t.is_floating_point() else t

        replacements = iter(values[: self.inputs])
        differentiated = self.wrt in ("inputs", "both")

        def substitute(t: torch.Tensor) -> torch.Tensor:
            return next(replacements) if differentiated and is_differentiable(t) else convert(t)

        args, kwargs = map_leaves((self.args, self.kwargs), substitute, is_tensor)
        if self.module is None:
            return self.fn(*args, **kwargs)
        state = {name: convert(t) for name, t in self.fixed.items()}
        state.update(zip(self.param_names, values[self.inputs :]))
        return torch.func.functional_call(self.module, state, tuple(args), kwargs)

    def outputs(self, values: Sequence[torch.Tensor], cast: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
        return differentiable_outputs(self.call(values, cast))


@contextlib.contextmanager
def same_randomness(seed: int, values: Sequence[torch.Tensor]) -> Iterator[None]:
    """Every evaluation draws the same random numbers (dropout masks, ...); the caller's RNG state is kept."""
    cuda = sorted({t.device.index or 0 for t in values if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def random_like(values: Sequence[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Standard normal tensors drawn in double precision on the CPU (the same on any device), cast to each dtype."""
    generator = torch.Generator().manual_seed(seed)
    drawn = []
    for v in values:
        wide = torch.randn(v.shape, dtype=_wide(v.dtype), generator=generator)
        drawn.append(wide.to(v.device, v.dtype))
    return drawn


def functional_weights(outputs: Sequence[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """The weights ``w`` of the default scalar ``sum(w * out)``: real, in each output's real dtype."""
    return [w.real if w.is_complex() else w for w in random_like(outputs, seed)]


def to_scalar(
    result: Any, weights: Sequence[torch.Tensor], reduce: Callable[[Any], torch.Tensor] | None
) -> torch.Tensor:
    """The scalar whose Hessian the HVP measures: ``reduce(result)``, the output itself, or ``sum(w * out)``."""
    outputs = differentiable_outputs(result)
    if reduce is not None:
        value = reduce(result)
    elif len(outputs) == 1 and outputs[0].numel() == 1:
        value = outputs[0].real if outputs[0].is_complex() else outputs[0]
    else:
        value = sum(((o.real if o.is_complex() else o) * w.to(o.real.dtype)).sum() for o, w in zip(outputs, weights))
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise TypeError("fwdecomp.audit: reduce must return a tensor holding a single number")
    return value.reshape(())


# --- failures and checks -------------------------------------------------------------------


@dataclass
class Failure:
    """What raised, in which operator (when one can be named) and at which line of user code."""

    error_type: str
    message: str
    op: str | None = None
    site: Site | None = None

    def __str__(self) -> str:
        return f"{self.short()}: {self.message}"

    def short(self) -> str:
        """The error type, the operator and the line, without the message."""
        where = f" in {self.op}" if self.op else ""
        at = f" at {self.site}" if self.site else ""
        return f"{self.error_type}{where}{at}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["site"] = self.site.to_json() if self.site else None
        return data


_OP_IN_MESSAGE = (
    re.compile(r"Trying to use forward AD with (?:[a-z_]+::)?([A-Za-z0-9_.]+) that does not support it"),
    re.compile(r"fwdecomp: the decomposition of [a-z_]+::([A-Za-z0-9_.]+)"),
    re.compile(r"fwdecomp: [a-z_]+::([A-Za-z0-9_.]+) was called with forward-AD tangents"),
    re.compile(r"derivative for (?:[a-z_]+::)?([A-Za-z0-9_.]+) is not implemented"),
)


def describe_failure(error: BaseException, known: Sequence[OperatorUse], op: str | None = None) -> Failure:
    """``error`` as a :class:`Failure`: the operator its message names (matched to a recorded one), the user line."""
    if op is None:
        for pattern in _OP_IN_MESSAGE:
            match = pattern.search(str(error))
            if match:
                base = match[1].split(".")[0]
                names = [u.name for u in known if u.name.split("::")[-1].split(".")[0] == base]
                op = names[0] if names else f"aten::{match[1]}"
                break
    return Failure(type(error).__name__, first_line(error), op, traceback_site(error))


@dataclass
class Check:
    """One measured computation: its relative error against finite differences, or what raised."""

    name: str
    status: Literal["pass", "fail", "error", "skipped"]
    error: float | None = None
    tolerance: float | None = None
    reference: str = ""
    failure: Failure | None = None
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def describe(self) -> str:
        if self.status in ("pass", "fail"):
            relation = "<=" if self.status == "pass" else ">"
            return f"relative error {self.error:.1e} {relation} {self.tolerance:.0e}, against {self.reference}"
        if self.status == "error":
            return str(self.failure)
        return self.note

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.error is not None and not math.isfinite(self.error):
            data["error"] = str(self.error)
        data["failure"] = self.failure.to_json() if self.failure else None
        return data


# --- finite differences -----------------------------------------------------------------------


@dataclass
class Reference:
    """How the finite differences evaluate ``fn``."""

    cast: torch.dtype | None  # floating-point tensors are cast to this dtype (None: as they are)
    float64: bool  # the evaluation is in float64
    description: str


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype.is_complex else torch.float64


def dtype_name(values: Sequence[torch.Tensor]) -> str:
    names = sorted({str(t.dtype).replace("torch.", "") for t in values})
    return "/".join(names) if names else "none"


def tolerance(dtype: torch.dtype, reference: Reference) -> float:
    """The largest relative error (2-norm over all outputs) a correct JVP or HVP shows, by dtype."""
    if dtype in (torch.float64, torch.complex128):
        return 1e-5
    if dtype in (torch.float32, torch.complex64):
        return 1e-3 if reference.float64 else 2e-2
    return 5e-2 if reference.float64 else 1e-1


def _norm(values: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.detach().double().abs().pow(2).sum()) for t in values)) if values else 0.0


def relative_error(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], floor: float) -> float:
    """``||got - want|| / max(||want||, floor)``, all tensors together (inf if the shapes differ)."""
    if len(got) != len(want):
        return math.inf
    diffs = []
    for g, w in zip(got, want):
        if tuple(g.shape) != tuple(w.shape):
            return math.inf
        diffs.append(g.detach().to(w.dtype) - w)
    return _norm(diffs) / max(_norm(want), floor)


def choose_reference(target: Target, seed: int, own: Sequence[torch.Tensor]) -> Reference:
    """Float64 finite differences if ``fn`` evaluates in float64 to its own output; else in its own dtype."""
    if all(v.dtype in (torch.float64, torch.complex128) for v in target.values):
        return Reference(None, True, "central differences in float64")
    name = dtype_name(target.values)
    try:
        with torch.no_grad(), same_randomness(seed, target.values):
            wide = target.outputs([v.to(_wide(v.dtype)) for v in target.values], cast=torch.float64)
        if [t.dtype for t in wide] != [_wide(t.dtype) for t in own]:
            raise TypeError("its outputs are not all float64")
        mismatch = relative_error(own, wide, 1e-30)
        if not mismatch <= 10 * tolerance(own[0].dtype, Reference(None, True, "")):
            raise ValueError(f"its float64 output differs from its own by {mismatch:.1e}")
    except Exception as error:
        why = f"{type(error).__name__}: {first_line(error)[:160]}"
        return Reference(None, False, f"4-point central differences in {name} (fn cannot run in float64: {why})")
    what = "parameters, buffers and inputs" if target.module is not None else "inputs"
    return Reference(torch.float64, True, f"central differences in float64 ({what} cast from {name})")


def _difference(
    fn: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]],
    primals: Sequence[torch.Tensor],
    directions: Sequence[torch.Tensor],
    step: float,
    fourth_order: bool,
) -> list[torch.Tensor]:
    """Central difference of ``fn`` along ``directions``: 2-point, or the 4-point fourth-order stencil."""

    def at(multiple: float) -> Sequence[torch.Tensor]:
        return fn([p + (multiple * step) * d for p, d in zip(primals, directions)])

    if not fourth_order:
        return [(a - b) / (2 * step) for a, b in zip(at(1), at(-1))]
    plus2, plus1, minus1, minus2 = at(2), at(1), at(-1), at(-2)
    return [(-a + 8 * b - 8 * c + d) / (12 * step) for a, b, c, d in zip(plus2, plus1, minus1, minus2)]


# --- the measurements --------------------------------------------------------------------------


class _DecompositionCounter(interface.DecompositionInterface):
    """Wraps the installed backend and counts the decompositions it runs."""

    def __init__(self, inner: interface.DecompositionInterface) -> None:
        self.inner = inner
        self.counts: dict[str, int] = {}

    def has_decomposition(self, schema: torch.FunctionSchema) -> bool:
        return self.inner.has_decomposition(schema)

    def run_decomposition(self, op: OpOverload, stack: list[Any]) -> None:
        name = qualified_name(op)
        self.counts[name] = self.counts.get(name, 0) + 1
        self.inner.run_decomposition(op, stack)


@contextlib.contextmanager
def _counting_decompositions() -> Iterator[dict[str, int]]:
    inner = interface.get_impl()
    if inner is None:
        yield {}
        return
    counter = _DecompositionCounter(inner)
    interface.set_impl(counter)
    try:
        yield counter.counts
    finally:
        interface.set_impl(inner)


@dataclass
class Measurement:
    """What the JVP and HVP checks share; each check is made with fwdecomp, then with PyTorch alone."""

    target: Target
    tangents: list[torch.Tensor]
    reference: Reference
    seed: int
    tolerance: float
    known: list[OperatorUse]
    baseline: bool
    say: Callable[[str], None]

    def _run(self, compute: Callable[[], Sequence[torch.Tensor]], fwdecomp: bool):
        with routing(fwdecomp), _counting_decompositions() as ran, same_randomness(self.seed, self.target.values):
            try:
                got, failure = [t.detach() for t in compute()], None
            except Exception as error:
                got, failure = None, describe_failure(error, self.known)
        if fwdecomp:
            for use in self.known:
                use.decomposed += ran.get(use.name, 0)
        return got, failure

    def judge(self, name: str, compute, expected, floor: float, reference: str) -> dict[str, Check]:
        """``{"<name>": check with fwdecomp, "<name>_alone": check with PyTorch alone}``."""
        checks = {}
        for fwdecomp, key in ((True, name.lower()), (False, f"{name.lower()}_alone")):
            if not fwdecomp and not self.baseline:
                checks[key] = Check(name, "skipped", note="not tried (baseline=False)")
                continue
            self.say(f"{name} {'with fwdecomp' if fwdecomp else 'with PyTorch alone'}")
            got, failure = self._run(compute, fwdecomp)
            if failure is not None:
                checks[key] = Check(name, "error", tolerance=self.tolerance, reference=reference, failure=failure)
                continue
            error = relative_error(got, expected, floor)
            status = "pass" if error <= self.tolerance else "fail"
            checks[key] = Check(name, status, error=error, tolerance=self.tolerance, reference=reference)
        return checks

    def points(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The primal values and tangent directions, in the reference's precision (cast exactly)."""
        if self.reference.cast is None:
            return list(self.target.values), list(self.tangents)
        return [v.to(_wide(v.dtype)) for v in self.target.values], [t.to(_wide(t.dtype)) for t in self.tangents]

    def step(self, values: Sequence[torch.Tensor], directions: Sequence[torch.Tensor], float64_step: float) -> float:
        """The step along ``directions``: ``float64_step``, or ``eps ** (1/5)`` (4-point), scaled to ``values``."""
        if self.reference.float64:
            return float64_step * max(_rms(values), 1.0) / max(_rms(directions), 1e-30)
        eps = float(torch.finfo(values[0].real.dtype).eps)
        return eps**0.2 * max(_rms(values), 1e-3) / max(_rms(directions), 1e-30)

    def floor(self, size: float) -> float:
        """Below this 2-norm a reference counts as zero: finite differences do not resolve it."""
        return (1e-6 if self.reference.float64 else 1e-3) * (1 + size)


def _rms(values: Sequence[torch.Tensor]) -> float:
    count = sum(t.numel() for t in values)
    return _norm(values) / math.sqrt(count) if count else 0.0


def measure_jvp(m: Measurement, own: Sequence[torch.Tensor]) -> dict[str, Check]:
    """``J v`` by ``torch.func.jvp`` against central differences of ``fn`` along ``v``."""
    target, cast = m.target, m.reference.cast

    def evaluate(points: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        with torch.no_grad(), same_randomness(m.seed, target.values):
            return target.outputs(points, cast=cast)

    def jvp() -> tuple[torch.Tensor, ...]:
        return torch.func.jvp(lambda *v: target.outputs(v), tuple(target.values), tuple(m.tangents))[1]

    m.say("finite differences of fn")
    values, directions = m.points()
    expected = _difference(evaluate, values, directions, m.step(values, directions, 1e-6), not m.reference.float64)
    return m.judge("JVP", jvp, expected, m.floor(_norm(own)), m.reference.description)


def measure_hvp(m: Measurement, weights: Sequence[torch.Tensor], reduce) -> dict[str, Check]:
    """``H v`` by ``jvp(grad(s))`` (forward-over-reverse) against central differences of reverse-mode gradients."""
    target, cast = m.target, m.reference.cast
    wide_weights = [w.to(torch.float64) for w in weights] if cast is not None else list(weights)

    def scalar(*values: torch.Tensor) -> torch.Tensor:
        return to_scalar(target.call(values), weights, reduce)

    def hvp() -> tuple[torch.Tensor, ...]:
        gradient = torch.func.grad(scalar, argnums=tuple(range(len(target.values))))
        return torch.func.jvp(gradient, tuple(target.values), tuple(m.tangents))[1]

    def gradient(points: list[torch.Tensor]) -> list[torch.Tensor]:
        leaves = [p.detach().requires_grad_() for p in points]
        with torch.enable_grad(), same_randomness(m.seed, target.values):
            value = to_scalar(target.call(leaves, cast=cast), wide_weights, reduce)
            grads = torch.autograd.grad(value, leaves, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, points)]

    m.say("finite differences of the gradient")
    values, directions = m.points()
    try:
        step = m.step(values, directions, 1e-5)
        expected = _difference(gradient, values, directions, step, not m.reference.float64)
        floor = m.floor(_norm(gradient(values)))
    except Exception as error:
        failure = describe_failure(error, m.known)
        return {"hvp": Check("HVP", "error", failure=failure, note="reverse mode fails")}
    return m.judge("HVP", hvp, expected, floor, m.reference.description + ", of reverse-mode gradients")
