"""Will forward AD work through my model? ``fwdecomp.audit`` answers, operator by operator, and measures it.

``audit(fn, *example_args)`` does four things:

1. **Records** every operator ``fn`` reaches, with call counts and the first
   call's line in *your* code (frames inside ``torch/``, ``fwdecomp/`` and the
   standard library are skipped). Then it differentiates ``fn`` once in reverse
   mode and records the operators of the backward pass too (each with the
   autograd node that ran it and the line of the forward call that created it):
   forward-over-reverse (``torch.func.hessian``, ``jvp(grad(f))``) pushes
   tangents through those as well.
2. **Classifies** each operator a tangent reaches: ``native`` (PyTorch
   differentiates it forward on its own), ``fwdecomp`` (PyTorch cannot,
   fwdecomp's decomposition does), ``missing`` (neither), or ``no tangent``
   (no tangent reaches it here: integer outputs, constants). Evidence first
   comes from PyTorch's ``derivatives.yaml``
   (:func:`fwdecomp.formulas.native_forward_formula`); every operator without a
   formula there is then *probed*: called again on its recorded arguments with
   random tangents, by PyTorch alone and with fwdecomp, and the outcome decides.
3. **Measures**: a real JVP through ``fn`` with random tangents, fwdecomp
   enabled (the previous state is restored after), against central finite
   differences; likewise a Hessian-vector product (forward-over-reverse)
   against finite differences of the reverse-mode gradient. The same two
   computations are tried with PyTorch alone, to show what fwdecomp changes.
4. **Reports**: :class:`AuditReport` renders as a terminal table
   (``str(report)``), as Markdown (``report.to_markdown()``) and as JSON-ready
   data (``report.to_json()``); ``report.ok`` is the measured verdict.

Why this level. Forward AD happens in the kernels of PyTorch's *Autograd*
dispatch keys: that is where a forward formula runs, where fwdecomp's routing
kernels sit, and where PyTorch raises "not implemented". An operator that is
``CompositeImplicitAutograd`` (``torch.cdist``, ``F.linear``,
``F.scaled_dot_product_attention``) has no formula of its own: at the Autograd
key it runs its decomposition, and autograd sees the parts. The recorder is a
``TorchDispatchMode``, which sits at the ``Python`` key just below Autograd:
every operator an Autograd kernel handles and passes on arrives there once,
already decomposed exactly the way autograd decomposed it, and what a backend
kernel calls internally does not. So it sees precisely the operators whose
Autograd kernels need a forward formula. (A ``TorchFunctionMode`` sits above
autograd and sees ``torch.cdist`` itself, not the ``_cdist_forward`` or
``_euclidean_dist`` kernel that needs the formula.)

The recording is a plain forward and backward pass, with ``requires_grad`` on
the differentiated tensors marking where tangents flow, not a JVP: PyTorch
stops at the first operator it cannot differentiate, fwdecomp replaces the
operators it decomposes, and under a transform the mode would also see the
tangent arithmetic of every forward formula. A few composite operators choose their parts by whether
an input requires grad (``embedding_bag``: ``_embedding_bag`` or
``_embedding_bag_forward_only``); the recording takes the training path, and
the measured JVP shows whether the path taken under ``jvp`` works.

Finite differences. The reference is computed in float64 whenever possible:
for an ``nn.Module`` the parameters and buffers are passed as float64 copies
(``torch.func.functional_call``; the module itself is never modified), and
floating-point inputs are cast (exactly) to float64; the tangent directions
are the float32 tangents cast exactly, so both sides differentiate along the
same direction at the same point. The float64 evaluation is accepted only if
it agrees with ``fn``'s own output; otherwise (float32 tensors captured in a
closure, say) the reference falls back to a fourth-order central difference in
``fn``'s own dtype, with a larger tolerance, and the report says so. Every
evaluation runs with the same random seed, so dropout masks and other random
draws are identical across the JVP and the finite differences.

Example:
    >>> import torch, fwdecomp
    >>> y = torch.randn(4, 3, dtype=torch.float64)
    >>> report = fwdecomp.audit(lambda x: torch.cdist(x, y), torch.randn(5, 3, dtype=torch.float64))
    >>> [(use.name, use.status) for use in report.forward if use.name.endswith("cdist_forward")]
    [('aten::_cdist_forward', 'fwdecomp')]
    >>> report.ok, report.checks["jvp"].status, report.checks["jvp_alone"].status
    (True, 'pass', 'error')
    >>> report.checks["jvp_alone"].failure.op
    'aten::_cdist_forward'
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from fwdecomp import api
from fwdecomp._measuring import (
    Check,
    Failure,
    Measurement,
    Target,
    Wrt,
    choose_reference,
    describe_failure,
    dtype_name,
    functional_weights,
    measure_hvp,
    measure_jvp,
    random_like,
    same_randomness,
    to_scalar,
    tolerance,
)
from fwdecomp._recording import (
    OperatorUse,
    Recorder,
    Recording,
    Site,
    classify,
    differentiable_outputs,
    needs_probe,
    routing,
)
from fwdecomp._tables import markdown_cell, markdown_table, text_table
from fwdecomp._torch import qualified_name

__all__ = ["AuditReport", "Check", "Failure", "OperatorUse", "Site", "audit"]


@dataclass
class AuditReport:
    """What :func:`audit` found. ``ok`` is the measured verdict; render with ``str``, ``to_markdown``, ``to_json``."""

    target: str
    wrt: str
    differentiated: list[str]
    dtype: str
    device: str
    forward: list[OperatorUse] = field(default_factory=list)
    backward: list[OperatorUse] | None = None
    error: Failure | None = None
    backward_error: Failure | None = None
    checks: dict[str, Check] = field(default_factory=dict)
    seed: int = 0
    seconds: float = 0.0

    # -- the verdict ------------------------------------------------------------------

    @property
    def missing(self) -> list[OperatorUse]:
        """Operators a tangent reaches that neither PyTorch nor fwdecomp differentiates forward."""
        uses = list(self.forward) + list(self.backward or ())
        return [use for use in uses if use.status == "missing"]

    @property
    def measured(self) -> bool:
        return "jvp" in self.checks

    @property
    def ok(self) -> bool:
        """No operator missing, ``fn`` ran, and every measurement requested passed."""
        if self.error is not None or self.missing:
            return False
        wanted = [c for name, c in self.checks.items() if not name.endswith("_alone")]
        return all(check.passed or check.status == "skipped" for check in wanted)

    @property
    def verdict(self) -> str:
        """One sentence: works (with fwdecomp, or PyTorch alone too), or what does not, and where."""
        if self.error is not None:
            return f"fn raised on the example inputs: {self.error}"
        problems = []
        for use in self.missing:
            part = "backward pass" if any(use is other for other in self.backward or ()) else "forward pass"
            where = f"{part}, {use.site}" if use.site else part
            problems.append(f"{use.name} ({where}) has no forward formula and no fwdecomp decomposition")
        for name, check in self.checks.items():
            if name.endswith("_alone") or check.status not in ("fail", "error"):
                continue
            if check.failure is not None:
                problems.append(f"the {check.name} raised {check.failure.short()}")
            else:
                problems.append(f"the {check.name} is wrong: relative error {check.error:.1e} > {check.tolerance:.0e}")
        if problems:
            return "does not work: " + "; ".join(problems)
        if not self.measured:
            return "every operator a tangent reaches is covered (not measured: check=False)"
        done = " and the ".join(c.name for n, c in self.checks.items() if not n.endswith("_alone") and c.passed)
        alone = [c for n, c in self.checks.items() if n.endswith("_alone") and c.status != "skipped"]
        if not alone:
            tail = "PyTorch alone not tried"
        elif all(c.passed for c in alone):
            tail = "PyTorch alone works too"
        else:
            failed = next(c for c in alone if not c.passed)
            tail = "PyTorch alone " + (f"raises {failed.failure.short()}" if failed.failure else "is wrong")
        return f"works with fwdecomp: the {done} match finite differences; {tail}"

    # -- rendering ----------------------------------------------------------------------

    def _header(self) -> str:
        what = " and ".join(self.differentiated)
        return f"fwdecomp audit of {self.target}: tangents on {what}; {self.dtype}, {self.device}"

    def _sections(self) -> Iterator[tuple[str, list[OperatorUse], bool]]:
        yield f"Forward pass: what jvp / jacfwd differentiate ({_count(self.forward)})", self.forward, False
        if self.backward is not None:
            title = "Backward pass: what forward-over-reverse (hessian, jvp of grad) differentiates too"
            yield f"{title} ({_count(self.backward)})", self.backward, True

    @staticmethod
    def _row(use: OperatorUse, backward: bool) -> list[str]:
        status = use.status + (f" (ran {use.decomposed}x)" if use.decomposed else "")
        row = [use.name, str(use.calls), status]
        if backward:
            row.append(use.node or "")
        row.append(str(use.site) if use.site else "")
        return row

    @staticmethod
    def _columns(backward: bool) -> list[str]:
        if backward:
            return ["operator", "calls", "forward AD", "autograd node", "forward call in user code"]
        return ["operator", "calls", "forward AD", "first call in user code"]

    def _notes(self) -> list[str]:
        notes = []
        for use in self.missing:
            notes.append(f"missing {use.name}: {use.evidence}")
        measured_ok = self.measured and not any(c.status == "error" for c in self.checks.values() if c.failure)
        for use in list(self.forward) + list(self.backward or ()):
            if use.status == "fwdecomp" and use.decomposed == 0 and measured_ok:
                notes.append(f"{use.name}: fwdecomp decomposes it (probed), but the measured runs did not reach it")
        if any(use.site is None for use in self.backward or ()):
            notes.append(
                "Backward rows without a user line come from the audit's reduction of the outputs to a scalar, "
                "sum(w * out) with fixed random w, and its gradient seed."
            )
        return notes

    def _check_lines(self) -> list[tuple[str, str, str]]:
        labels = {
            "jvp": "JVP with fwdecomp",
            "hvp": "HVP with fwdecomp",
            "jvp_alone": "JVP, PyTorch alone",
            "hvp_alone": "HVP, PyTorch alone",
        }
        return [(labels.get(name, name), check.status, check.describe()) for name, check in self.checks.items()]

    def __str__(self) -> str:
        lines = [self._header()]
        if self.error is not None:
            lines += ["", f"fn raised: {self.error}"]
        for title, uses, backward in self._sections():
            lines += ["", title]
            lines += [
                "  " + line for line in text_table(self._columns(backward), [self._row(u, backward) for u in uses])
            ]
        if self.backward_error is not None:
            lines.append(f"  reverse mode failed: {self.backward_error}")
        notes = self._notes()
        if notes:
            lines += ["", *notes]
        if self.checks:
            lines += ["", f"Measured (random tangents, seed {self.seed}):"]
            width = max(len(label) for label, _, _ in self._check_lines())
            for label, status, text in self._check_lines():
                lines.append(f"  {label.ljust(width)}  {status.ljust(7)}  {text}")
        lines += ["", f"Verdict: {self.verdict}"]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """The report as Markdown: a heading, one table per pass, the measurements and the verdict."""
        lines = [f"### {self._header()}"]
        if self.error is not None:
            lines += ["", f"**fn raised:** {markdown_cell(str(self.error))}"]
        for title, uses, backward in self._sections():
            lines += ["", f"**{title}**", ""]
            lines += markdown_table(self._columns(backward), [self._row(u, backward) for u in uses])
        if self.backward_error is not None:
            lines += ["", f"Reverse mode failed: {markdown_cell(str(self.backward_error))}"]
        notes = self._notes()
        if notes:
            lines += ["", *[f"- {markdown_cell(note)}" for note in notes]]
        if self.checks:
            lines += ["", f"**Measured** (random tangents, seed {self.seed})", ""]
            lines += markdown_table(["computation", "result", "detail"], [list(row) for row in self._check_lines()])
        lines += ["", f"**Verdict:** {markdown_cell(self.verdict)}"]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """Plain data (str, int, float, bool, None, list, dict) for ``json.dumps``."""
        return {
            "target": self.target,
            "wrt": self.wrt,
            "differentiated": list(self.differentiated),
            "dtype": self.dtype,
            "device": self.device,
            "forward": [use.to_json() for use in self.forward],
            "backward": None if self.backward is None else [use.to_json() for use in self.backward],
            "error": self.error.to_json() if self.error else None,
            "backward_error": self.backward_error.to_json() if self.backward_error else None,
            "checks": {name: check.to_json() for name, check in self.checks.items()},
            "missing": [use.name for use in self.missing],
            "ok": self.ok,
            "verdict": self.verdict,
            "seed": self.seed,
            "seconds": round(self.seconds, 3),
        }


def _count(uses: list[OperatorUse]) -> str:
    operators, calls = len(uses), sum(use.calls for use in uses)
    return f"{operators} operator{'s' * (operators != 1)}, {calls} call{'s' * (calls != 1)}"


# --- audit -------------------------------------------------------------------------------------


def audit(
    fn: Callable[..., Any],
    *example_args: Any,
    wrt: Wrt | None = None,
    hvp: bool = True,
    check: bool = True,
    baseline: bool = True,
    reduce: Callable[[Any], torch.Tensor] | None = None,
    seed: int = 0,
    rtol: float | None = None,
    progress: Callable[[str], None] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> AuditReport:
    """Audit forward AD through ``fn(*example_args, **kwargs)``: which operators, which work, and a measurement.

    Args:
        fn: a function of tensors, or an ``nn.Module`` (called through
            ``torch.func.functional_call``; its parameters and buffers are
            never modified).
        example_args, kwargs: example inputs; every keyword argument not listed
            here goes to ``fn`` (or put them in ``example_kwargs``).
        wrt: which tensors get tangents: ``"inputs"`` (the floating-point
            tensors among the arguments), ``"params"`` (the module's trainable
            parameters) or ``"both"``. Default: ``"both"`` for a module,
            ``"inputs"`` otherwise.
        hvp: also audit forward-over-reverse: record the backward pass and
            measure a Hessian-vector product.
        check: run the measurements (without them the verdict is not measured).
        baseline: also try the JVP and the HVP with fwdecomp disabled.
        reduce: ``outputs -> scalar`` for the HVP; default: the output itself
            if it is a single number, else a fixed random linear functional
            ``sum(w * out)`` (a plain sum would hide terms: softmax sums to 1).
        seed: seeds the tangents, the functional and every evaluation's RNG.
        rtol: the tolerance on the relative error (default: by dtype).
        progress: called with a short message at each stage.

    Returns an :class:`AuditReport`. Nothing ``fn`` raises escapes: it is
    reported with the operator and the line where it happened. fwdecomp's
    enabled state is the same afterwards as before.
    """
    start = time.perf_counter()
    say = progress or (lambda message: None)
    target = _target(fn, example_args, {**(example_kwargs or {}), **kwargs}, wrt)
    devices = ",".join(sorted({str(v.device) for v in target.values}))
    report = AuditReport(_name_of(fn), target.wrt, target.summary(), dtype_name(target.values), devices, seed=seed)
    run = _record(report, target, hvp, reduce, seed, say)
    _classify(run, say)
    if report.error is None and check:
        _measure(report, target, run, baseline, reduce, seed, rtol, say)
    report.seconds = time.perf_counter() - start
    return report


def _name_of(fn: Callable[..., Any]) -> str:
    if isinstance(fn, torch.nn.Module):
        return type(fn).__name__
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def _target(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], wrt: Wrt | None) -> Target:
    if not callable(fn):
        raise TypeError(f"fwdecomp.audit: fn must be callable (a function or an nn.Module), got {type(fn).__name__}")
    is_module = isinstance(fn, torch.nn.Module)
    wrt = wrt or ("both" if is_module else "inputs")
    if wrt not in ("inputs", "params", "both"):
        raise ValueError(f"fwdecomp.audit: wrt must be 'inputs', 'params' or 'both', got {wrt!r}")
    if wrt != "inputs" and not is_module:
        raise ValueError(
            f"fwdecomp.audit: wrt={wrt!r} needs an nn.Module, whose parameters get tangents; "
            f"{_name_of(fn)} is a plain function. Pass the module itself, or wrt='inputs'."
        )
    target = Target(fn, tuple(args), kwargs, wrt)
    if not target.values:
        what = "floating-point tensor among its inputs" if wrt == "inputs" else "trainable floating-point parameter"
        hint = " Pass wrt='params' to differentiate its parameters." if is_module else ""
        raise ValueError(f"fwdecomp.audit: {_name_of(fn)} has no {what} to put tangents on.{hint}")
    return target


@dataclass
class _Run:
    """What the recording passes produced."""

    forward: Recording
    backward: Recording | None
    result: Any = None
    outputs: tuple[torch.Tensor, ...] = ()
    weights: list[torch.Tensor] = field(default_factory=list)


def _record(report: AuditReport, target: Target, hvp: bool, reduce, seed: int, say) -> _Run:
    """Run ``fn`` forward, then backward, under the recorder; fill the report's operator tables."""
    run = _Run(Recording(), Recording() if hvp else None)
    leaves = [v.detach().requires_grad_() for v in target.values]  # requires_grad marks where tangents flow
    say("recording the forward pass")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")
        warnings.filterwarnings("ignore", message="Error detected in")  # reported as backward_error instead
        # Anomaly mode stores each autograd node's forward stack, which the backward recorder reads.
        with torch.autograd.set_detect_anomaly(hvp, check_nan=False), same_randomness(seed, target.values):
            try:
                with torch.enable_grad(), Recorder(run.forward):
                    run.result = target.call(leaves)
                run.outputs = differentiable_outputs(run.result)
                if not run.outputs:
                    raise TypeError(f"{report.target} returned no floating-point tensor to differentiate")
            except Exception as error:
                report.error = _raised(error, run.forward)
            report.forward = list(run.forward.uses.values())
            if run.backward is None or report.error is not None:
                return run
            say("recording the backward pass")
            run.weights = functional_weights(run.outputs, seed + 2)
            try:
                scalar = to_scalar(run.result, run.weights, reduce)
                with Recorder(run.backward, backward=True):
                    torch.autograd.grad(scalar, leaves, create_graph=True, allow_unused=True)
            except Exception as error:
                report.backward_error = _raised(error, run.backward)
            report.backward = list(run.backward.uses.values())
    return run


def _raised(error: BaseException, recording: Recording) -> Failure:
    op = qualified_name(recording.raised[0]) if recording.raised else None
    failure = describe_failure(error, list(recording.uses.values()), op)
    if failure.site is None and recording.raised:
        failure.site = recording.raised[1]
    return failure


def _classify(run: _Run, say) -> None:
    with routing(True):
        routed = set(api.covered_operators())
    for recording in (run.forward, run.backward):
        for op, use in (recording.uses if recording else {}).items():
            if use.tangent and needs_probe(op):
                say(f"probing {use.name}")
            classify(use, op, recording.arguments.get(op), routed)


def _measure(report: AuditReport, target: Target, run: _Run, baseline: bool, reduce, seed, rtol, say) -> None:
    own = [t.detach() for t in run.outputs]
    say("evaluating fn in float64 for the finite differences")
    reference = choose_reference(target, seed, own)
    measurement = Measurement(
        target=target,
        tangents=random_like(target.values, seed + 1),
        reference=reference,
        seed=seed,
        tolerance=rtol or tolerance(target.values[0].dtype, reference),
        known=report.forward + (report.backward or []),
        baseline=baseline,
        say=say,
    )
    report.checks.update(measure_jvp(measurement, own))
    if run.backward is None:
        return
    if report.backward_error is not None:
        report.checks["hvp"] = Check("HVP", "error", failure=report.backward_error, note="reverse mode fails")
        return
    report.checks.update(measure_hvp(measurement, run.weights, reduce))
