"""PyTorch's own operator database under forward AD: what works natively, what fwdecomp fixes, what fails.

PyTorch describes its differentiable operators in the OpInfo database
(``torch.testing._internal.common_methods_invocations.op_db``), with sample
inputs for each. This module calls every differentiable entry on its samples
the way PyTorch's own gradient tests do (``TestGradients``: the tensors that
require grad are the inputs, ``gradcheck_wrapper`` and
``output_process_fn_grad`` applied) and asks two questions, with fwdecomp
disabled and enabled:

- **forward AD**: do tangents go through (``torch.autograd.forward_ad``)?
- **forward-over-reverse**: does the tangent of a vector-Jacobian product go
  through (what ``torch.func.hessian`` and ``jvp(grad(f))`` do)?

Each question is asked twice per sample: with a tangent on every input, and
with a tangent on the first input only (the others then have zero tangents,
which PyTorch represents by ``ZeroTensor`` s: this is how
``hessian(lambda x: F.mse_loss(f(x), y))`` found the broken formula of
``mse_loss_backward``). An entry *passes* a question when no sample raises.
Whether the tangents are also *right* is what ``tests/test_opinfo.py`` checks
(gradcheck with forward AD, and forward-over-reverse against finite
differences) for every entry that reaches an operator fwdecomp routes.

``python -m fwdecomp audit --database`` prints the result (this module
registers that view). ``torch.testing._internal`` is imported only when the
database is used: it is slow to import and not part of PyTorch's public API.

Example:
    >>> from fwdecomp import database
    >>> [report] = database.sweep(names=["nn.functional.hardsigmoid"], limit=1)
    >>> report.status("forward_ad"), report.status("forward_over_reverse")
    ('native', 'fixed')
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch.autograd import forward_ad

from fwdecomp import api, registry
from fwdecomp._torch import OpOverload
from fwdecomp.cli import audit_view

__all__ = [
    "MODES",
    "NOT_FIXED",
    "EntryReport",
    "differentiable_entries",
    "entry_dtypes",
    "entry_name",
    "op_db",
    "probe",
    "probe_entry",
    "reached_operators",
    "routed_operators",
    "sample_function",
    "samples",
    "summarize",
    "sweep",
]

#: The two questions asked of every entry.
MODES = ("forward_ad", "forward_over_reverse")

#: Entries that still fail with fwdecomp, and why (tests/test_opinfo.py checks they still do).
NOT_FIXED: dict[str, str] = {
    "to_sparse": (
        "its output is a sparse tensor, and PyTorch's forward AD cannot attach a tangent to a sparse "
        "tensor (make_dual and every formula's set_fw_grad read strides/storage, which sparse tensors "
        "lack); no composition of operators with formulas can produce one"
    ),
    "sparse.sampled_addmm": (
        "its input and output are sparse CSR tensors, which cannot carry forward-AD tangents in PyTorch"
    ),
    "sparse.mm.reduce": (
        "its first input is a sparse CSR tensor that requires grad, and sparse tensors cannot carry "
        "forward-AD tangents in PyTorch (make_dual raises)"
    ),
    "normal": (
        "a PyTorch bug in a native formula: normal(mean, std)'s tangent is zeros shaped like mean, not "
        "like the broadcast output. The derivative is zero by definition (the draw is not "
        "reparameterised), so finite differences cannot check a decomposition; not decomposed"
    ),
}


def op_db() -> list[Any]:
    """PyTorch's OpInfo database (imported on first use)."""
    from torch.testing._internal.common_methods_invocations import op_db as database

    return database


def entry_name(info: Any) -> str:
    """``name`` or ``name.variant``, as PyTorch's test ids spell an entry."""
    return f"{info.name}.{info.variant_test_name}" if info.variant_test_name else info.name


def differentiable_entries(names: Iterable[str] | None = None) -> list[Any]:
    """Every entry PyTorch marks differentiable (reverse or forward), optionally only ``names``."""
    wanted = None if names is None else set(names)
    found = [
        info
        for info in op_db()
        if (info.supports_autograd or info.supports_forward_ad) and (wanted is None or entry_name(info) in wanted)
    ]
    if wanted is not None:
        missing = wanted - {entry_name(info) for info in found}
        if missing:
            raise ValueError(f"fwdecomp: no differentiable OpInfo entry named {sorted(missing)}")
    return found


def entry_dtypes(info: Any, device: str = "cpu") -> list[torch.dtype]:
    """float64 and complex128 where the entry supports autograd in them; else its widest float type."""
    supported = info.supported_backward_dtypes(device)
    chosen = [dtype for dtype in (torch.float64, torch.complex128) if dtype in supported]
    if not chosen:
        chosen = [dtype for dtype in (torch.float32, torch.complex64) if dtype in supported][:1]
    return chosen


def samples(
    info: Any, dtype: torch.dtype, limit: int | None = None, device: str = "cpu", spread: bool = True
) -> list[Any]:
    """The entry's sample inputs (requiring grad): all, or ``limit`` of them, spread evenly over
    all of them (``spread``, which generates all first) or the first ``limit``."""
    generated = info.sample_inputs(device, dtype, requires_grad=True)
    if limit is None:
        return list(generated)
    if not spread:
        return list(itertools.islice(generated, limit))
    every = list(generated)
    if len(every) <= limit:
        return every
    step = len(every) / limit
    return [every[int(i * step)] for i in range(limit)]


def _is_tensor_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, torch.Tensor) for v in value)


def sample_function(info: Any, sample: Any) -> tuple[Callable[..., Any], list[torch.Tensor]]:
    """``(f, inputs)``: ``f(*inputs)`` calls the entry on ``sample`` with ``inputs`` (the tensors that
    require grad) in their places, as PyTorch's ``TestGradients`` does."""
    parts = [sample.input, *sample.args, *sample.kwargs.values()]
    inputs: list[torch.Tensor] = []
    for part in parts:
        values = part if _is_tensor_list(part) else [part]
        inputs += [v for v in values if isinstance(v, torch.Tensor) and v.requires_grad]

    def place(values: Iterator[torch.Tensor], part: Any) -> Any:
        if _is_tensor_list(part):
            return [next(values) if t.requires_grad else t for t in part]
        if isinstance(part, torch.Tensor) and part.requires_grad:
            return next(values)
        return part

    def f(*tensors: torch.Tensor) -> Any:
        values = iter(tensors)
        first = place(values, sample.input)
        args = [place(values, a) for a in sample.args]
        kwargs = {k: place(values, v) for k, v in sample.kwargs.items()}
        out = info.gradcheck_wrapper(info.get_op(), first, *args, **kwargs)
        if sample.output_process_fn_grad is not None:
            out = sample.output_process_fn_grad(out)
        return out

    return f, inputs


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors in ``out`` (nested lists, tuples included)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in output_tensors(o)]
    return []


def _tangent_like(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if t.layout is not torch.strided:
        return torch.randn_like(t)
    return torch.randn(t.shape, dtype=t.dtype, device=t.device, generator=gen)


def _differentiable(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def probe(f: Callable[..., Any], inputs: Sequence[torch.Tensor], mode: str, first_only: bool = False) -> None:
    """Run ``mode`` ("forward_ad" or "forward_over_reverse") once; raises what PyTorch raises.

    ``first_only`` puts a tangent on the first input only (the others get ``ZeroTensor`` tangents).
    """
    gen = torch.Generator().manual_seed(0)
    with forward_ad.dual_level():
        if mode == "forward_ad":
            primals = [x.detach() for x in inputs]
        else:
            primals = [x.detach().requires_grad_() for x in inputs]
        duals = [
            forward_ad.make_dual(p, _tangent_like(p, gen)) if (i == 0 or not first_only) else p
            for i, p in enumerate(primals)
        ]
        with torch.enable_grad():
            outs = output_tensors(f(*duals))
        if mode == "forward_ad":
            for out in outs:
                forward_ad.unpack_dual(out)
            return
        outs = [o for o in outs if o.requires_grad and _differentiable(o)]
        if not outs:
            return
        cotangents = []
        for o in outs:
            cotangent = _tangent_like(o.detach(), gen)
            cotangents.append(cotangent if first_only else forward_ad.make_dual(cotangent, _tangent_like(o, gen)))
        grads = torch.autograd.grad(outs, duals, cotangents, create_graph=True, allow_unused=True)
        for g in grads:
            if g is not None:
                forward_ad.unpack_dual(g)


def describe_error(error: BaseException) -> str:
    """``Type: first line`` of an error, shortened."""
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:240]}"


@dataclass
class EntryReport:
    """One OpInfo entry: per mode, the first error without and with fwdecomp (``None``: passed)."""

    name: str
    dtype: str
    samples: int
    native: dict[str, str | None] = field(default_factory=dict)
    fwdecomp: dict[str, str | None] = field(default_factory=dict)
    skipped: str = ""
    seconds: float = 0.0

    def status(self, mode: str) -> str:
        """``native`` (works without fwdecomp), ``fixed`` (only with it), ``failing`` or ``skipped``.

        ``failing`` means it fails with fwdecomp enabled, whether or not it works without.
        """
        if self.skipped:
            return "skipped"
        if self.fwdecomp.get(mode) is not None:
            return "failing"
        return "native" if self.native.get(mode) is None else "fixed"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = {mode: self.status(mode) for mode in MODES}
        if self.name in NOT_FIXED:
            data["not_fixed"] = NOT_FIXED[self.name]
        return data


def _first_failure(calls: list[tuple[Callable[..., Any], list[torch.Tensor]]], mode: str) -> str | None:
    for f, inputs in calls:
        for first_only in (False, True):
            if first_only and len(inputs) < 2:
                continue
            try:
                probe(f, inputs, mode, first_only)
            except Exception as error:  # the report records it; nothing is raised
                return describe_error(error) + (" [tangent on the first input only]" if first_only else "")
    return None


def probe_entry(
    info: Any,
    limit: int | None = None,
    modes: Sequence[str] = MODES,
    with_fwdecomp: bool = True,
    native_limit: int | None | str = "same",
) -> EntryReport:
    """Probe one entry on its first ``limit`` samples (all if ``None``), in its first dtype of
    :func:`entry_dtypes` (float64 where supported): without fwdecomp (on ``native_limit``
    samples, by default as many) and, if ``with_fwdecomp``, with it (whether or not it works
    without: fwdecomp must not break what works natively). Leaves fwdecomp disabled."""
    start = time.perf_counter()
    dtypes = entry_dtypes(info)
    report = EntryReport(entry_name(info), str(dtypes[0]).removeprefix("torch.") if dtypes else "", 0)
    if not dtypes:
        report.skipped = "no dtype with autograd support on CPU (a CUDA-only entry)"
        return report
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # samples exercise deprecated operators on purpose
        wide = limit if native_limit == "same" else native_limit
        if wide is not None and limit is not None:
            wide = max(wide, limit)
        every = [sample_function(info, s) for s in samples(info, dtypes[0], wide, spread=False)]
        every = [(f, inputs) for f, inputs in every if inputs]
        calls = every if limit is None else every[:limit]
        report.samples = len(every)
        try:
            for mode in modes:
                api.disable()
                report.native[mode] = _first_failure(every, mode)
                if with_fwdecomp:
                    api.enable()
                    report.fwdecomp[mode] = _first_failure(calls, mode)
        finally:
            api.disable()
    report.seconds = time.perf_counter() - start
    return report


def sweep(
    names: Iterable[str] | None = None,
    limit: int | None = None,
    modes: Sequence[str] = MODES,
    with_fwdecomp: bool = True,
    progress: Callable[[EntryReport], None] | None = None,
) -> list[EntryReport]:
    """:func:`probe_entry` for every differentiable entry (or those in ``names``).

    fwdecomp's enabled state is restored afterwards.
    """
    was_enabled = api.is_enabled()
    reports = []
    try:
        for info in differentiable_entries(names):
            reports.append(probe_entry(info, limit, modes, with_fwdecomp))
            if progress is not None:
                progress(reports[-1])
    finally:
        (api.enable if was_enabled else api.disable)()
    return reports


def summarize(reports: Sequence[EntryReport], modes: Sequence[str] = MODES) -> dict[str, dict[str, int]]:
    """Counts per mode: entries native / fixed / failing / skipped, and probed in all."""
    counts: dict[str, dict[str, int]] = {}
    for mode in modes:
        tally = {"native": 0, "fixed": 0, "failing": 0, "skipped": 0}
        for report in reports:
            tally[report.status(mode)] += 1
        tally["entries"] = len(reports)
        counts[mode] = tally
    return counts


# --- which operators an entry reaches ---------------------------------------------


def routed_operators() -> set[OpOverload]:
    """The operators fwdecomp routes when enabled (registered, and no working native formula)."""
    return {op for op in registry.operators() if api.needs_override(op)}


def reached_operators(info: Any, dtype: torch.dtype, limit: int | None = None) -> set[OpOverload]:
    """The operator overloads the entry's forward and backward (``create_graph=True``) reach on its
    first ``limit`` samples (all if ``None``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[OpOverload] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func)
            return func(*args, **(kwargs or {}))

    recorder = Record()
    for sample in samples(info, dtype, limit, spread=False):
        f, inputs = sample_function(info, sample)
        leaves = [x.detach().requires_grad_() for x in inputs]
        try:
            with recorder, torch.enable_grad():
                outs = [o for o in output_tensors(f(*leaves)) if o.requires_grad]
                if outs and leaves:
                    cotangents = [torch.ones_like(o) for o in outs]
                    torch.autograd.grad(outs, leaves, cotangents, create_graph=True, allow_unused=True)
        except Exception:  # a sample the recorder cannot run says nothing about the others
            continue
    return {op for op in recorder.seen if isinstance(op, OpOverload)}


# --- python -m fwdecomp audit --database -----------------------------------------------


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--samples",
        type=int,
        default=0,
        metavar="N",
        help="with --database: probe the first N samples of each entry (0: every sample)",
    )
    parser.add_argument(
        "--entries", default=None, metavar="A,B", help="with --database: only these OpInfo entries (names)"
    )


def render(reports: Sequence[EntryReport]) -> str:
    """The text report: counts per mode, then every entry that is not native in some mode."""
    counts = summarize(reports)
    lines = ["mode                  entries  native  fixed by fwdecomp  still failing  skipped"]
    for mode in MODES:
        c = counts[mode]
        lines.append(f"{mode:<22}{c['entries']:>7}{c['native']:>8}{c['fixed']:>19}{c['failing']:>15}{c['skipped']:>9}")
    lines.append("")
    for report in reports:
        for mode in MODES:
            status = report.status(mode)
            if status == "fixed":
                lines.append(f"fixed    {mode:<21} {report.name}  (native: {report.native[mode]})")
            elif status == "failing":
                why = NOT_FIXED.get(report.name, report.fwdecomp.get(mode))
                lines.append(f"FAILING  {mode:<21} {report.name}  ({why})")
    for report in reports:
        if report.skipped:
            lines.append(f"skipped  {report.name}  ({report.skipped})")
    return "\n".join(lines)


@audit_view(
    "database",
    help="probe every differentiable entry of PyTorch's OpInfo database, without and with fwdecomp",
    configure=_configure,
)
def _database_view(args: argparse.Namespace) -> int:
    names = args.entries.split(",") if args.entries else None
    reports = sweep(names=names, limit=args.samples or None)
    if args.format == "json":
        payload = {
            "torch": torch.__version__,
            "samples_per_entry": args.samples or "all",
            "counts": summarize(reports),
            "native_failures": {
                mode: sorted(r.name for r in reports if r.native.get(mode) is not None) for mode in MODES
            },
            "entries": [report.to_json() for report in reports],
        }
        print(json.dumps(payload, indent=2))
    else:
        print(render(reports))
    unexplained = [r for r in reports if r.name not in NOT_FIXED and any(r.status(m) == "failing" for m in MODES)]
    return 1 if unexplained else 0
