"""Recording the operators a function reaches, and probing whether tangents get through each.

Part of :mod:`fwdecomp.model_audit` (read its docstring for why the recorder
is a ``TorchDispatchMode``). This module knows:

- where a call came from in *user* code (not PyTorch's, not fwdecomp's, not
  the standard library's), from the live Python stack or from the forward
  stack that anomaly mode stores on each autograd node;
- the recorder itself, which counts calls per operator overload and keeps a
  detached copy of the arguments of the first tangent-carrying call of each
  operator that ``derivatives.yaml`` does not settle;
- the probe, which calls such an operator again on those arguments with
  random tangents, with fwdecomp off and on, and the classification that
  follows from the outcomes.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import sysconfig
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch.autograd import forward_ad

from fwdecomp import _torch, api
from fwdecomp._torch import OpOverload, qualified_name
from fwdecomp.formulas import native_forward_formula

Status = Literal["native", "fwdecomp", "missing", "no tangent"]

# --- where in the user's code -------------------------------------------------------

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_FWDECOMP_DIR = os.path.dirname(os.path.abspath(__file__))
_STDLIB_DIR = os.path.abspath(sysconfig.get_paths()["stdlib"])


def _inside(path: str, directory: str) -> bool:
    return path.startswith(directory + os.sep)


def is_user_file(filename: str) -> bool:
    """Not PyTorch (functorch included), not fwdecomp, not the standard library."""
    if filename.startswith("<frozen"):
        return False
    path = os.path.abspath(filename)
    if _inside(path, _TORCH_DIR) or _inside(path, _FWDECOMP_DIR) or f"{os.sep}functorch{os.sep}" in path:
        return False
    third_party = "site-packages" in path or "dist-packages" in path
    return third_party or not _inside(path, _STDLIB_DIR)


def _show_path(filename: str) -> str:
    path = os.path.abspath(filename)
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path
    return path if relative.startswith("..") else relative


@dataclass(frozen=True)
class Site:
    """A line of user code: where an operator was first called, or where something raised."""

    file: str
    line: int
    function: str
    code: str = ""

    def __str__(self) -> str:
        return f"{_show_path(self.file)}:{self.line} in {self.function}"

    def to_json(self) -> dict[str, Any]:
        return {"file": _show_path(self.file), "line": self.line, "function": self.function, "code": self.code}


def _user_frame(frames: Sequence[tuple[str, int, str]]) -> tuple[str, int, str] | None:
    """The innermost user frame of ``frames`` (innermost first), if the call came from user code.

    PyTorch's frames are skipped; reaching one of fwdecomp's first means
    fwdecomp made the call itself (the audit's reduction to a scalar): ``None``.
    """
    for file, line, function in frames:
        if _inside(os.path.abspath(file), _FWDECOMP_DIR):
            return None
        if is_user_file(file):
            return file, line, function
    return None


def live_site() -> Site | None:
    """Where in user code the running operator call came from (the recorder's own frames skipped)."""
    frame = inspect.currentframe()
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    frames = []
    while frame is not None:
        frames.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
        frame = frame.f_back
    found = _user_frame(frames)
    if found is None:
        return None
    code = traceback.FrameSummary(*found).line or ""
    return Site(*found, code.strip())


_FORMATTED_FRAME = re.compile(r'File "(?P<file>.+)", line (?P<line>\d+), in (?P<function>[^\n]+)\n?(?P<code>.*)', re.S)


def formatted_site(lines: Sequence[str] | None) -> Site | None:
    """As :func:`live_site`, from ``traceback.format_stack()`` lines (outermost first)."""
    frames, code = [], {}
    for text in reversed(list(lines or ())):
        match = _FORMATTED_FRAME.search(text)
        if match:
            key = (match["file"], int(match["line"]), match["function"].strip())
            frames.append(key)
            code[key] = match["code"].strip()
    found = _user_frame(frames)
    return None if found is None else Site(*found, code[found])


def traceback_site(error: BaseException) -> Site | None:
    """The innermost user frame in ``error``'s traceback: the line of user code that raised."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if is_user_file(frame.filename):
            return Site(frame.filename, frame.lineno or 0, frame.name, (frame.line or "").strip())
    return None


# --- nested arguments ----------------------------------------------------------------


def is_differentiable(value: Any) -> bool:
    """A floating-point or complex tensor (what can carry a tangent)."""
    return isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())


def map_leaves(value: Any, fn: Callable[[Any], Any], is_leaf: Callable[[Any], bool]) -> Any:
    """Rebuild tuples, lists and dicts (namedtuples included) with ``fn`` applied to each leaf."""
    if is_leaf(value):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(map_leaves(v, fn, is_leaf) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(map_leaves(v, fn, is_leaf) for v in value)
    if isinstance(value, dict):
        rebuilt = {k: map_leaves(v, fn, is_leaf) for k, v in value.items()}
        try:
            return type(value)(rebuilt)
        except TypeError:
            return rebuilt
    return value


def is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in a nest of tuples, lists and dicts, in order."""
    found: list[torch.Tensor] = []
    map_leaves(value, found.append, is_tensor)
    return found


def differentiable_outputs(value: Any) -> tuple[torch.Tensor, ...]:
    return tuple(t for t in tensors(value) if is_differentiable(t))


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:300]


# --- the recorder ----------------------------------------------------------------------


@dataclass
class OperatorUse:
    """One operator that ``fn`` (or its backward pass) reached, and whether tangents get through it."""

    name: str
    calls: int = 0
    site: Site | None = None
    node: str | None = None
    tangent: bool = False
    status: Status = "no tangent"
    evidence: str = ""
    decomposed: int = 0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["site"] = self.site.to_json() if self.site else None
        return data


@dataclass
class _Leaf:
    """A recorded tensor argument: a detached copy, and whether a tangent reached it."""

    tensor: torch.Tensor
    tangent: bool


def _keep(value: torch.Tensor) -> _Leaf:
    copy = value.detach()
    with contextlib.suppress(Exception):  # sparse, nested, ...: keep the detached tensor itself
        copy = copy.clone()
    return _Leaf(copy, bool(value.requires_grad) and is_differentiable(value))


def _takes_tangent(arguments: Any) -> bool:
    return any(t.requires_grad and is_differentiable(t) for t in tensors(arguments))


def needs_probe(op: OpOverload) -> bool:
    """``derivatives.yaml`` does not show a native forward formula for ``op``."""
    return native_forward_formula(op).status != "native"


@dataclass
class Recording:
    """What one pass under :class:`Recorder` saw."""

    uses: dict[OpOverload, OperatorUse] = field(default_factory=dict)
    arguments: dict[OpOverload, Any] = field(default_factory=dict)
    raised: tuple[OpOverload, Site | None] | None = None
    probe_needed: dict[OpOverload, bool] = field(default_factory=dict)

    def needs_probe(self, op: OpOverload) -> bool:
        if op not in self.probe_needed:
            self.probe_needed[op] = needs_probe(op)
        return self.probe_needed[op]


class Recorder(_torch.TorchDispatchMode):
    """Counts operator calls just below autograd, where a tangent would have needed a formula.

    A tangent reaches a call when one of its floating-point tensor arguments
    requires grad (the recording pass marks the differentiated tensors so)
    and it returns a floating-point tensor. In a backward pass (``backward``),
    each operator is attributed to the autograd node running it and to the
    user line of that node's forward call.
    """

    def __init__(self, recording: Recording, backward: bool = False) -> None:
        super().__init__()
        self.recording = recording
        self.backward = backward

    def _where(self) -> tuple[Site | None, str | None]:
        if not self.backward:
            return live_site(), None
        node = _torch.current_autograd_node()
        return formatted_site(_torch.forward_traceback(node)), (node.name() if node is not None else None)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        recording = self.recording
        use = recording.uses.get(func)
        if use is None:
            site, node = self._where()
            use = recording.uses[func] = OperatorUse(qualified_name(func), site=site, node=node)
        elif use.site is None:  # reached first by fwdecomp's own code (the audit's reduction): look again
            use.site, use.node = self._where()
        use.calls += 1
        takes = _takes_tangent((args, kwargs))
        kept = None
        if takes and func not in recording.arguments and recording.needs_probe(func):
            kept = map_leaves((args, kwargs), _keep, is_tensor)  # before the call: in-place ops mutate
        try:
            out = func(*args, **kwargs)
        except BaseException:
            recording.raised = (func, self._where()[0])
            raise
        if takes and differentiable_outputs(out):
            use.tangent = True
            if kept is not None:
                recording.arguments[func] = kept
        return out


# --- probing -------------------------------------------------------------------------------


@contextlib.contextmanager
def routing(on: bool) -> Iterator[None]:
    """fwdecomp enabled (``on``) or disabled inside the block, the previous state restored after."""
    was = api.is_enabled()
    (api.enable if on else api.disable)()
    try:
        yield
    finally:
        (api.enable if was else api.disable)()


def probe(op: OpOverload, kept: Any, fwdecomp: bool, seed: int = 0) -> tuple[str, str]:
    """Call ``op`` on a fresh copy of its recorded arguments, random tangents where tangents reached them.

    Returns ``("tangent", "")``, ``("none", "")`` (no output carries a
    tangent) or ``("raised", "<error>")``.
    """
    generator = torch.Generator().manual_seed(seed)

    def materialise(leaf: _Leaf) -> torch.Tensor:
        value = leaf.tensor.clone() if leaf.tensor.layout == torch.strided else leaf.tensor
        if not leaf.tangent:
            return value
        tangent = torch.randn(value.shape, dtype=value.dtype, generator=generator).to(value.device)
        return forward_ad.make_dual(value, tangent)

    with routing(fwdecomp), forward_ad.dual_level():
        args, kwargs = map_leaves(kept, materialise, lambda v: isinstance(v, _Leaf))
        try:
            out = op(*args, **kwargs)
        except Exception as error:
            return "raised", f"{type(error).__name__}: {first_line(error)}"
        carried = any(_torch.tangent_of(t) is not None for t in differentiable_outputs(out))
    return ("tangent", "") if carried else ("none", "")


def classify(use: OperatorUse, op: OpOverload, kept: Any, routed: set[OpOverload]) -> None:
    """Set ``use.status`` and ``use.evidence`` from derivatives.yaml and, where it does not settle it, probes."""
    if not use.tangent:
        use.status, use.evidence = "no tangent", "no tangent reaches it here (constants, integer outputs)"
        return
    formula = native_forward_formula(op)
    if formula.status == "native":
        use.status, use.evidence = "native", formula.reason
        return
    custom = _torch.namespace(op) != "aten"
    # A custom operator is never probed alone: PyTorch returns no tangent or zeros, without an error.
    alone, why = ("none", "") if custom or kept is None else probe(op, kept, fwdecomp=False)
    if alone == "tangent":
        use.status = "native"
        use.evidence = f"PyTorch differentiates it forward (probed; derivatives.yaml: {formula.reason})"
        return
    if op in routed and kept is not None:
        outcome, why_fwdecomp = probe(op, kept, fwdecomp=True)
        if outcome == "tangent":
            use.status, use.evidence = "fwdecomp", "PyTorch alone cannot; fwdecomp's decomposition does (probed)"
            return
        if outcome == "raised":
            use.status, use.evidence = "missing", f"with fwdecomp it raises {why_fwdecomp} (probed)"
            return
    use.status = "missing"
    if custom:
        use.evidence = (
            "a custom operator without a forward rule: PyTorch silently gives no (or a zero) tangent, a wrong "
            f"answer. Register a decomposition: @fwdecomp.register_decomposition({use.name!r})"
        )
    elif alone == "none":
        use.status = "native"
        use.evidence = "PyTorch treats it as non-differentiable: no tangent comes out (probed)"
    elif kept is None:
        use.evidence = f"{formula.reason} (not probed)"
    else:
        use.evidence = f"{why} (probed). Register a decomposition: @fwdecomp.register_decomposition({use.name!r})"
