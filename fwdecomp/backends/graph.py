"""The graph backend: each decomposition traced once per input signature, checked for closure, cached.

The role TorchScript plays for PyTorch's C++ forward-AD decompositions: the
first call of an operator with a given input *signature* traces its
registered decomposition with PyTorch's tracer
(``torch.fx.experimental.proxy_tensor.make_fx``) into a graph of aten
operators, verifies the graph's closure under forward AD
(:mod:`fwdecomp.closure`), and caches it; later calls with that signature run
the cached graph on the actual inputs, so tangents flow through its aten
operators one by one, exactly as through the eager decomposition.

``fwdecomp.use_backend("graph")`` installs it (``"eager"`` goes back);
importing this module installs nothing.

Example:
    >>> import torch, fwdecomp
    >>> from fwdecomp.backends import graph
    >>> fwdecomp.use_backend("graph")
    >>> graph.cache_clear()
    >>> x = torch.randn(6, 3, dtype=torch.float64)
    >>> pdist = lambda a: torch.pdist(a, p=1.0)
    >>> with fwdecomp.enabled():
    ...     out, tangent = torch.func.jvp(pdist, (x,), (torch.ones_like(x),))
    ...     out, tangent = torch.func.jvp(pdist, (x,), (torch.ones_like(x),))
    >>> info = graph.cache_info()
    >>> info.misses, info.hits, info.graphs
    (1, 1, 1)
    >>> fwdecomp.use_backend("eager")

Design decisions (what is traced, and when the graph is not used):

- **What is traced.** The decomposition is traced on tangent-free stand-ins,
  never on the dual tensors: fake tensors with the inputs' dtypes, devices,
  shapes and strides (``tracing_mode="fake"``, the default), or real
  uninitialised tensors whose sizes the tracer makes symbolic
  (``"symbolic"``). Tracing runs below autograd and with functorch's
  transform stack (vmap, jvp, grad levels) set aside, so the graph holds the
  aten operators the decomposition reaches once PyTorch's
  CompositeImplicitAutograd operators are decomposed, as autograd does. The
  graph is then called on the actual (dual, possibly functorch-wrapped)
  inputs: forward AD, vmap batching rules and nested levels see ordinary aten
  calls. ``"real"`` tracing is refused: it would run data-dependent operators
  (``nonzero``, ``repeat_interleave``) on the stand-ins and bake their
  results' shapes into the graph.
- **Closure** (:mod:`fwdecomp.closure`) is checked while tracing, on the
  values that can carry a tangent, taking every floating-point or complex
  input to carry one: a cached graph is then valid whichever inputs carry
  tangents in a later call, and at every nesting level of forward AD (an
  outer ``jvp``'s tangent may sit on an input the inner one leaves alone);
  and the signature need not ask each input for its tangent (about as costly
  as the rest of the key). An operator that fwdecomp routes to a registered
  decomposition is inlined by tracing that decomposition, recursively; one
  with a JVP rule stays a node; an operator forward AD cannot get through
  raises :class:`~fwdecomp.closure.ClosureError` naming the path
  (``aten::_ctc_loss -> aten::foo``) before any JVP runs. The verdict is
  cached with the signature.
- **The signature** (the cache key) is the operator and, per tensor
  argument, its dtype, device, shape and strides (``"fake"``) or rank
  (``"symbolic"``, where the shape guards the tracer recorded decide which
  cached graph fits); non-tensor arguments by type and value (they are
  constants of the graph); the default dtype (factory calls without a dtype
  bake it in). Strides are part of it because a traced ``reshape`` becomes a
  ``view`` or a copy depending on them. The cache is a bounded LRU
  (:func:`configure`), thread-safe; :func:`cache_info`, :func:`cache_clear`.
  Registering or removing any decomposition or JVP rule clears it.
- **Data-dependent control flow** (``if (x > 0).any():``, ``.item()``,
  ``.tolist()``, operators whose output shape depends on values) cannot be
  captured in a graph that must serve every input with the same signature.
  Tracing fails on it (fake tensors have no values); the backend then runs
  the eager decomposition for that signature and remembers why
  (:func:`explain` shows the reason). Errors of the decomposition itself
  (bad input) surface exactly as with the eager backend, which re-runs it.
  A graph that raises where the eager decomposition does not (a batching
  rule that cannot ``view`` some layout, say) gives way to the eager path for
  its signature, unless it writes into tensors (then its error is raised).
- **Autocast** is off while tracing, so no cast is baked into a graph; at
  run time autocast treats the graph's operators as it treats the eager
  decomposition's.
- **Contract checks** (shapes and dtypes against PyTorch's kernel,
  :mod:`fwdecomp.contract`) run once per graph, on its first call (with
  symbolic shapes, later calls with other shapes are not checked).
- **Run-time simplifications**: dead code is dropped, and subgraphs that do
  not depend on the inputs (index tables such as ``triu_indices``, masks,
  scalar constants) are computed once when the graph is built and stored
  with it (up to 16 MiB per tensor and 512 MiB for the whole cache, beyond
  which the least recently used graphs are dropped; not in graphs that
  mutate tensors, and never a value the graph returns). Random operators are
  kept and re-run. Binary arithmetic with a Python number calls the operator's ``.Scalar``
  overload (same kernel, same values): under forward AD the ``.Tensor``
  overload gives the number a zero tangent whose arithmetic is 40-70x slower
  in PyTorch 2.13 (README, "Backends").
- **Not traced**: an operator with a JVP rule (the rule is a function of
  tangents, not of traceable operators, and wins over a decomposition as in
  the eager backend; inside a traced graph such an operator stays a node and
  its rule runs when the graph calls it); an operator without a registered
  decomposition; calls under an active ``TorchDispatchMode`` (a user's
  tracer); tensor subclasses, non-strided tensors, and non-tensor arguments
  other than numbers, strings, dtypes, devices, layouts, memory formats and
  lists of these. All go to the eager backend, unchanged. A decomposition
  must not branch on ``requires_grad`` or grad mode (the stand-ins never
  require grad), nor use ``torch.autograd.Function`` (its ``jvp`` would be
  lost in the trace); the library's decompositions do neither.
"""

from __future__ import annotations

import argparse
import json
import operator
import re
import textwrap
import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
import torch.fx

from fwdecomp import _torch, jvp_rules, registry
from fwdecomp._tables import text_table
from fwdecomp._torch import OpOverload, qualified_name, schema_of
from fwdecomp.backends.eager import EagerBackend, run_tangent_rule
from fwdecomp.cli import audit_view
from fwdecomp.closure import ClosureError, ClosureMode, forward_route
from fwdecomp.contract import DecompositionError, check_results
from fwdecomp.interface import DecompositionInterface
from fwdecomp.overloads import OperatorLike, resolve_one
from fwdecomp.stack import arguments_to_stack, results_to_stack, stack_to_arguments

__all__ = [
    "CacheInfo",
    "ClosureRow",
    "Explanation",
    "GraphBackend",
    "TRACING_MODES",
    "cache_clear",
    "cache_info",
    "check_closure",
    "configure",
    "default_backend",
    "explain",
]

TRACING_MODES = ("fake", "symbolic")

#: Largest input-independent tensor stored with a graph instead of recomputed per call.
FOLD_LIMIT_BYTES = 16 * 2**20
#: Most bytes of such tensors a backend's cache keeps; beyond, the least recently used graphs go.
CONSTANT_BUDGET_BYTES = 512 * 2**20

_SCALARS = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.layout, torch.memory_format)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)

# make_fx keeps module-level state while tracing: one trace at a time per process.
_TRACE_LOCK = threading.RLock()
# Bumped on every registry change; a trace that started before one is not cached.
_generation = 0


def _graph_can_run(op: OpOverload) -> bool:
    """Whether the graph backend serves ``op`` itself: it has a registered *decomposition* to trace.

    Anything else fwdecomp does for an operator stays on the eager path; a JVP
    rule (which wins over a decomposition, as in the eager backend) is a
    function of tangents, not a traceable decomposition. (Memoised until the
    next registry change.)
    """
    known = _can_run.get(op)
    if known is None:
        has_rule = jvp_rules.find(op) is not None
        known = _can_run[op] = not has_rule and registry.lookup(op) is not None
    return known


_can_run: dict[OpOverload, bool] = {}


# --- signatures ---------------------------------------------------------------


class _Untraceable(Exception):
    """An argument the graph backend does not key on; the call goes to the eager path."""


def _signature_part(value: Any, leaves: list[torch.Tensor], symbolic: bool) -> Any:
    if isinstance(value, torch.Tensor):
        if type(value) not in _PLAIN_TENSORS or value.layout is not torch.strided:
            raise _Untraceable(type(value).__name__)
        leaves.append(value)
        if symbolic:
            return (value.dtype, value.device, value.dim())
        return (value.dtype, value.device, value.shape, value.stride())
    if isinstance(value, float):
        return (float, value.hex())  # -0.0 and nan are keys too
    if type(value) in _SCALARS:
        return (type(value), value)
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(_signature_part(v, leaves, symbolic) for v in value))
    raise _Untraceable(type(value).__name__)


def _signature(op: OpOverload, stack: list[Any], symbolic: bool) -> tuple[Any, list[torch.Tensor]]:
    """The cache key of a call, and its tensors in order.

    The default dtype is part of it: factory calls without a dtype bake it into the graph.
    """
    leaves: list[torch.Tensor] = []
    parts: list[Any] = [op, torch.get_default_dtype()]
    for value in stack:  # the common cases inline: this runs on every call
        kind = type(value)
        if kind is torch.Tensor and not symbolic and value.layout is torch.strided:
            leaves.append(value)
            parts.append((value.dtype, value.device, value.shape, value.stride()))
        elif kind is bool or kind is int or value is None:
            parts.append((kind, value))
        else:
            parts.append(_signature_part(value, leaves, symbolic))
    return tuple(parts), leaves


def _differentiable(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` can carry a tangent (closure is checked as if every such input did)."""
    return tensor.is_floating_point() or tensor.is_complex()


def _leaves(values: Any) -> list[torch.Tensor]:
    """The tensors in ``values`` (nested lists included), in order."""
    found: list[torch.Tensor] = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(_leaves(value))
    return found


def _rebuild(values: list[Any], leaves: Any) -> list[Any]:
    """``values`` with its tensors replaced, in order, by ``leaves``."""
    iterator = iter(leaves)

    def swap(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return next(iterator)
        if isinstance(value, (list, tuple)):
            return type(value)(swap(v) for v in value)
        return value

    return [swap(v) for v in values]


def _describe_call(op: OpOverload, stack: list[Any]) -> str:
    def show(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            text = f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
            return text if value.device.type == "cpu" else f"{text}@{value.device}"
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(show(v) for v in value) + "]"
        return repr(value)

    parts = [f"{argument.name}={show(value)}" for argument, value in zip(schema_of(op).arguments, stack)]
    return f"{qualified_name(op)}({', '.join(parts)})"


class _Shape:
    """What shape guards read of a tensor: its sizes and strides (stand-ins start at offset 0)."""

    __slots__ = ("_size", "_stride")

    def __init__(self, tensor: torch.Tensor) -> None:
        self._size = tuple(tensor.shape)
        self._stride = tensor.stride()

    def size(self) -> tuple[int, ...]:
        return self._size

    def stride(self) -> tuple[int, ...]:
        return self._stride

    def storage_offset(self) -> int:
        return 0

    def dim(self) -> int:
        return len(self._size)


def _guard_holds(guard: Callable[[list[Any]], bool], leaves: list[torch.Tensor]) -> bool:
    try:
        return guard([_Shape(t) for t in leaves])
    except Exception:  # a guard reading something _Shape does not offer: trace again rather than guess
        return False


# --- tracing --------------------------------------------------------------------


@dataclass
class _Traced:
    """One cache entry: a graph to run, the eager path (and why), or a refusal."""

    op: OpOverload
    call: str
    kind: str  # "graph" | "eager" | "refused"
    reason: str = ""
    graph: torch.fx.GraphModule | None = None
    forward: Callable[..., Any] | None = None
    guards: str | None = None
    guard: Callable[[list[Any]], bool] | None = None
    inlined: dict[str, int] = field(default_factory=dict)
    folded: int = 0
    constant_bytes: int = 0
    error: ClosureError | None = None
    checked: bool = False
    mutates: bool = False


def _standins(leaves: list[torch.Tensor], tracing_mode: str) -> list[torch.Tensor]:
    """Tangent-free tensors with the leaves' metadata: fake ones, or uninitialised real ones for symbolic."""

    def make(t: torch.Tensor) -> torch.Tensor:
        return torch.empty_strided(tuple(t.shape), t.stride(), dtype=t.dtype, device=t.device)

    if tracing_mode == "fake":
        with _torch.fake_mode():
            return [make(t) for t in leaves]
    return [make(t) for t in leaves]


def _mutates(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, OpOverload) and schema_of(node.target).is_mutable


def _pure(target: Any) -> bool:
    if target is operator.getitem:
        return True
    if not isinstance(target, OpOverload):
        return False
    return not schema_of(target).is_mutable and torch.Tag.nondeterministic_seeded not in target.tags


def _aliases_input(node: torch.fx.Node) -> bool:
    if node.target is operator.getitem:
        return True
    return isinstance(node.target, OpOverload) and any(r.alias_info is not None for r in schema_of(node.target).returns)


def _escaping(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Nodes whose value (or a view of it) the graph returns."""
    escaping: set[torch.fx.Node] = set()
    for node in reversed(graph.nodes):
        if node.op == "output":
            escaping.update(node.all_input_nodes)
        elif node in escaping and node.op == "call_function" and _aliases_input(node):
            escaping.update(node.all_input_nodes)
    return escaping


def _eliminate_dead_code(graph: torch.fx.Graph) -> None:
    for node in reversed(graph.nodes):
        if node.op in ("placeholder", "output") or node.users:
            continue
        if node.op == "call_function" and not _pure(node.target):
            continue  # in-place and random operators run as in the decomposition
        graph.erase_node(node)


_aten = torch.ops.aten
#: Binary operators whose ``.Tensor`` overload, given a Python number, has a ``.Scalar`` twin.
_SCALAR_TWINS = {
    _aten.add.Tensor: _aten.add.Scalar,
    _aten.sub.Tensor: _aten.sub.Scalar,
    _aten.mul.Tensor: _aten.mul.Scalar,
    _aten.div.Tensor: _aten.div.Scalar,
    _aten.div.Tensor_mode: _aten.div.Scalar_mode,
}


def _use_scalar_overloads(graph: torch.fx.Graph) -> int:
    """Call the ``.Scalar`` overload where a binary operator's second operand is a Python number.

    The same kernel computes the same values, but under forward AD the
    ``.Tensor`` overload gives the number a zero tangent (an "efficient zero
    tensor"), whose arithmetic costs 100-500 µs a call in PyTorch 2.13 on CPU
    (its shapes come from a Python meta kernel); the ``.Scalar`` formula is
    ``self_t * other`` and costs a few µs (README, "Backends").
    """
    count = 0
    for node in graph.nodes:
        twin = _SCALAR_TWINS.get(node.target) if node.op == "call_function" else None
        if twin is not None and len(node.args) >= 2 and type(node.args[1]) in (bool, int, float, complex):
            node.target = twin
            count += 1
    return count


def _fold_constants(module: torch.fx.GraphModule) -> tuple[int, int]:
    """Compute the input-independent parts of the graph once; returns how many tensors, and bytes, are stored."""
    graph = module.graph
    if any(_mutates(node) for node in graph.nodes):
        return 0, 0
    values: dict[torch.fx.Node, Any] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            values[node] = getattr(module, node.target)
        elif node.op == "call_function" and _pure(node.target):
            if all(n in values for n in node.all_input_nodes):
                args = torch.fx.node.map_arg(node.args, values.__getitem__)
                kwargs = torch.fx.node.map_arg(node.kwargs, values.__getitem__)
                with torch.no_grad():
                    values[node] = node.target(*args, **kwargs)
    escaping = _escaping(graph)
    count = 0
    storages: dict[int, int] = {}
    for node, value in values.items():
        if node.op == "get_attr" or node in escaping or not isinstance(value, torch.Tensor):
            continue
        if value.untyped_storage().nbytes() > FOLD_LIMIT_BYTES or all(user in values for user in node.users):
            continue
        name = f"_constant_{count}"
        setattr(module, name, value)  # a plain attribute: the fastest read in the generated code
        with graph.inserting_before(node), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*get_attr Node with no underlying reference")
            constant = graph.get_attr(name)
        constant.meta["val"] = value
        node.replace_all_uses_with(constant)
        storages[_torch.storage_key(value)] = value.untyped_storage().nbytes()
        count += 1
    return count, sum(storages.values())


def _compile(module: torch.fx.GraphModule) -> Callable[..., Any]:
    """A Python function that runs ``module``'s graph, for the hot path.

    ``module.forward`` (fx's code) reaches each operator through
    ``torch.ops.aten.<name>.<overload>`` and ``OpOverload.__call__``; this
    function calls the operators' C++ callables bound as globals, releasing
    each intermediate value after its last use as fx's code does. It runs the
    same operators with the same arguments.
    """
    names: dict[torch.fx.Node, str] = {}
    bound: dict[str, Any] = {}

    def bind(value: Any) -> str:
        name = f"_g{len(bound)}"
        bound[name] = value
        return name

    def render(arg: Any) -> str:
        if isinstance(arg, torch.fx.Node):
            return names[arg]
        if isinstance(arg, list):
            return "[" + "".join(f"{render(a)}, " for a in arg) + "]"
        if isinstance(arg, tuple):
            return "(" + "".join(f"{render(a)}, " for a in arg) + ")"
        if arg is None or type(arg) in (bool, int, str):
            return repr(arg)
        return bind(arg)  # floats (inf, nan), dtypes, devices, layouts, ...

    last_use: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in module.graph.nodes:
        for used in node.all_input_nodes:
            last_use[used] = node
    releases: dict[torch.fx.Node, list[str]] = {}
    parameters, lines = [], []
    for node in module.graph.nodes:
        name = names[node] = f"v{len(names)}"
        if node.op == "placeholder":
            parameters.append(name)
        elif node.op == "get_attr":
            lines.append(f"{name} = {bind(getattr(module, node.target))}")
        elif node.op == "call_function":
            target = _torch.operator_callable(node.target) if isinstance(node.target, OpOverload) else node.target
            arguments = [render(a) for a in node.args] + [f"{k}={render(v)}" for k, v in node.kwargs.items()]
            lines.append(f"{name} = {bind(target)}({', '.join(arguments)})")
        elif node.op == "output":
            lines.append(f"return {render(node.args[0])}")
            continue
        else:  # pragma: no cover - make_fx emits no call_module / call_method
            raise NotImplementedError(f"fwdecomp: cannot compile graph node {node.format_node()}")
        for used in node.all_input_nodes:
            if last_use[used] is node:
                releases.setdefault(node, []).append(names[used])
        if not node.users:
            lines.append(f"{name} = None")
        lines += [f"{released} = None" for released in releases.get(node, [])]
    source = f"def run({', '.join(parameters)}):\n" + "".join(f"    {line}\n" for line in lines)
    namespace = dict(bound)
    exec(compile(source, f"<fwdecomp graph of {module.__class__.__name__}>", "exec"), namespace)
    return namespace["run"]


def _trace(op: OpOverload, stack: list[Any], leaves: list[torch.Tensor], mode: str) -> _Traced:
    """Trace ``op``'s decomposition for this call; raises ClosureError, or whatever tracing hit."""
    schema = schema_of(op)
    entry = registry.find(op)
    if entry is None:
        raise NotImplementedError(f"fwdecomp: no decomposition is registered for {qualified_name(op)}")
    seen: dict[str, Any] = {}

    def decomposition(*placeholders: torch.Tensor) -> list[Any]:
        closure = ClosureMode(op, check_contracts=mode == "fake")
        seen["closure"] = closure
        for placeholder in placeholders:
            if _differentiable(placeholder):
                closure.mark(placeholder)
        args, kwargs = stack_to_arguments(schema, _rebuild(stack, placeholders))
        with _torch.below_autograd(), closure:
            results = entry.fn(*args, **kwargs)
        return results_to_stack(schema, results)

    # (fake tensors log a kernel's failure with a traceback before raising it; a failed trace is
    # an expected outcome here, answered by running eagerly)
    with (
        _TRACE_LOCK,
        _torch.outside_functorch(),
        _torch.autocast_disabled({t.device.type for t in leaves}),
        _torch.quiet_fake_tensor_log(),
    ):
        module = _torch.make_fx(decomposition, mode)(*_standins(leaves, mode))
        placeholders = [n.meta.get("val") for n in module.graph.nodes if n.op == "placeholder"]
        guards = _torch.shape_guards(placeholders) if mode == "symbolic" else None
        folded, constant_bytes = _fold_constants(module)
        _eliminate_dead_code(module.graph)
        _use_scalar_overloads(module.graph)
        module.graph.lint()
        module.recompile()
        module.__class__.__name__ = schema.name.split("::", 1)[1]  # the class is the module's own
    return _Traced(
        op,
        _describe_call(op, stack),
        "graph",
        graph=module,
        forward=_compile(module),
        guards=guards,
        guard=_torch.compile_shape_guards(guards) if guards else None,
        inlined=dict(seen["closure"].inlined),
        folded=folded,
        constant_bytes=constant_bytes,
        mutates=any(_mutates(node) for node in module.graph.nodes),
    )


# --- the backend -------------------------------------------------------------------


class CacheInfo(NamedTuple):
    """Counters of a :class:`GraphBackend`'s cache (like ``functools.lru_cache``'s)."""

    hits: int
    misses: int
    maxsize: int
    currsize: int
    graphs: int
    eager: int
    refused: int


_instances: weakref.WeakSet[GraphBackend] = weakref.WeakSet()


class GraphBackend(DecompositionInterface):
    """Runs a cached, closure-checked graph of each decomposition, traced once per input signature."""

    def __init__(self, cache_size: int = 256, tracing_mode: str = "fake") -> None:
        self._eager = EagerBackend()
        self._lock = threading.Lock()
        self._cache: OrderedDict[Any, list[_Traced]] = OrderedDict()
        self._size = 0
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self.configure(cache_size=cache_size, tracing_mode=tracing_mode)
        _instances.add(self)

    # the interface --------------------------------------------------------------

    def has_decomposition(self, schema: torch.FunctionSchema) -> bool:
        return self._eager.has_decomposition(schema)

    def run_decomposition(self, op: OpOverload, stack: list[Any]) -> None:
        if not _graph_can_run(op) or _torch.dispatch_modes_active():
            self._eager.run_decomposition(op, stack)
            return
        if run_tangent_rule(op, stack):  # a fused-kernel JVP: nothing to trace
            return
        try:
            key, leaves = _signature(op, stack, self.tracing_mode == "symbolic")
        except _Untraceable:
            self._eager.run_decomposition(op, stack)
            return
        traced = self._lookup(key, leaves)
        if traced is None:
            traced = self._trace(op, stack, key, leaves)
            if traced is None:
                return  # the eager path ran this call
        self._run(traced, op, stack, leaves)

    # configuration and cache ----------------------------------------------------------

    def configure(self, *, cache_size: int | None = None, tracing_mode: str | None = None) -> None:
        """Set the cache bound (graphs kept) and/or the tracing mode; changing the mode clears the cache."""
        if cache_size is not None:
            if not isinstance(cache_size, int) or isinstance(cache_size, bool) or cache_size < 1:
                raise ValueError(f"fwdecomp: cache_size must be a positive int, got {cache_size!r}")
        if tracing_mode is not None and tracing_mode not in TRACING_MODES:
            raise ValueError(
                f"fwdecomp: unknown tracing_mode {tracing_mode!r}; choose one of {', '.join(TRACING_MODES)} "
                "('real' is not offered: it bakes data-dependent shapes into the graph)"
            )
        with self._lock:
            if cache_size is not None:
                self.cache_size = cache_size
                self._evict()
            if tracing_mode is not None and tracing_mode != getattr(self, "tracing_mode", None):
                self.tracing_mode = tracing_mode
                self._clear()

    def cache_info(self) -> CacheInfo:
        with self._lock:
            entries = [t for group in self._cache.values() for t in group]
            return CacheInfo(
                self._hits,
                self._misses,
                self.cache_size,
                len(entries),
                sum(t.kind == "graph" for t in entries),
                sum(t.kind == "eager" for t in entries),
                sum(t.kind == "refused" for t in entries),
            )

    def cache_clear(self) -> None:
        """Drop every cached graph and reset the counters."""
        with self._lock:
            self._clear()
            self._hits = self._misses = 0

    def invalidate(self) -> None:
        """Drop every cached graph, keeping the counters (the registry changed)."""
        with self._lock:
            self._clear()

    def entries(self) -> list[_Traced]:
        """The cached entries, least recently used first."""
        with self._lock:
            return [t for group in self._cache.values() for t in group]

    def _clear(self) -> None:
        self._cache.clear()
        self._size = 0
        self._bytes = 0

    def _evict(self) -> None:
        """Least recently used first, down to the bound and the constants' budget (never the newest)."""
        while self._cache and (
            self._size > self.cache_size or (self._bytes > CONSTANT_BUDGET_BYTES and len(self._cache) > 1)
        ):
            _, group = self._cache.popitem(last=False)
            self._size -= len(group)
            self._bytes -= sum(t.constant_bytes for t in group)

    def _find(self, key: Any, leaves: list[torch.Tensor]) -> _Traced | None:
        group = self._cache.get(key)
        if group is not None:
            for traced in group:
                if traced.guard is None or _guard_holds(traced.guard, leaves):
                    self._cache.move_to_end(key)
                    return traced
        return None

    def _lookup(self, key: Any, leaves: list[torch.Tensor]) -> _Traced | None:
        with self._lock:
            group = self._cache.get(key)
            if group is not None and len(group) == 1 and group[0].guard is None:  # the usual case
                self._cache.move_to_end(key)
                self._hits += 1
                return group[0]
            traced = self._find(key, leaves)
            if traced is None:
                self._misses += 1
            else:
                self._hits += 1
            return traced

    def _store(self, key: Any, traced: _Traced, generation: int) -> None:
        with self._lock:
            if generation != _generation:
                return  # the registry changed while tracing: this graph may be stale
            group = self._cache.setdefault(key, [])
            if traced.guard is None:  # serves every call with this key: replaces what is there
                self._size -= len(group)
                self._bytes -= sum(t.constant_bytes for t in group)
                group.clear()
            group.insert(0, traced)
            self._cache.move_to_end(key)
            self._size += 1
            self._bytes += traced.constant_bytes
            self._evict()

    # tracing and running ------------------------------------------------------------------

    def _trace(self, op: OpOverload, stack: list[Any], key: Any, leaves: list[torch.Tensor]) -> _Traced | None:
        """Trace (once: a thread that waited for the lock finds the other's graph), or run eagerly."""
        generation = _generation
        call = _describe_call(op, stack)
        with _TRACE_LOCK:
            with self._lock:
                traced = self._find(key, leaves)
            if traced is not None:
                return traced
            try:
                traced = _trace(op, stack, leaves, self.tracing_mode)
            except ClosureError as error:
                self._store(key, _Traced(op, call, "refused", str(error), error=error), generation)
                raise
            except Exception as error:  # not capturable: data-dependent, no fake kernel, or bad input
                failure = error
            else:
                self._store(key, traced, generation)
                return traced
        self._eager.run_decomposition(op, stack)  # raises exactly as the eager backend would
        reason = f"tracing failed, so it runs eagerly: {type(failure).__name__}: {str(failure).splitlines()[0]}"
        self._store(key, _Traced(op, call, "eager", reason), generation)
        return None

    def _run(self, traced: _Traced, op: OpOverload, stack: list[Any], leaves: list[torch.Tensor]) -> None:
        if traced.kind == "eager":
            self._eager.run_decomposition(op, stack)
            return
        if traced.kind == "refused":
            assert traced.error is not None
            raise ClosureError(traced.error.path, traced.error.reason, traced.error.location)
        assert traced.forward is not None
        try:
            outputs = traced.forward(*leaves)
        except Exception as error:
            if traced.mutates:  # it may have written before failing: running again is not safe
                raise DecompositionError(
                    f"fwdecomp: the traced decomposition of {qualified_name(op)} raised {type(error).__name__}: "
                    f"{error}\n(use fwdecomp.use_backend('eager') to run the Python decomposition instead)"
                ) from error
            self._eager.run_decomposition(op, stack)  # raises as the eager backend does, if it fails too
            with self._lock:  # the eager decomposition ran where the graph could not: use it from now on
                traced.kind = "eager"
                traced.reason = f"its traced graph raised {type(error).__name__}: {str(error).splitlines()[0]}"
            return
        if not traced.checked:  # the contract, once per signature
            args, kwargs = stack_to_arguments(schema_of(op), stack)
            check_results(op, args, kwargs, outputs)
            traced.checked = True
        stack[:] = outputs


_default = GraphBackend()


def default_backend() -> GraphBackend:
    """The instance ``fwdecomp.use_backend("graph")`` installs."""
    return _default


def configure(*, cache_size: int | None = None, tracing_mode: str | None = None) -> None:
    """Configure the default graph backend: ``cache_size`` graphs kept (LRU), ``tracing_mode`` fake/symbolic."""
    _default.configure(cache_size=cache_size, tracing_mode=tracing_mode)


def cache_info() -> CacheInfo:
    """Hits, misses (traces), bound, size, and how many entries are graphs / eager / refused."""
    return _default.cache_info()


def cache_clear() -> None:
    """Empty the default graph backend's cache."""
    _default.cache_clear()


def _on_registry_change(event: str, op: OpOverload) -> None:
    # A graph may have inlined any decomposition: a change anywhere invalidates all of them.
    global _generation
    _generation += 1
    _can_run.clear()
    for backend in list(_instances):
        backend.invalidate()


registry.subscribe(_on_registry_change)
jvp_rules.subscribe(_on_registry_change)


# --- explain ---------------------------------------------------------------------------


@dataclass
class Explanation:
    """What forward AD runs for one call of an operator under the graph backend.

    ``str()`` is the readable form: the call's signature, the verdict, the
    decompositions inlined, and the graph's code with each value's dtype and
    shape. ``graph`` is the ``torch.fx.GraphModule`` (``None`` when the
    decomposition runs eagerly), ``operators`` the aten operators it calls
    with what forward AD does with each.
    """

    call: str
    kind: str
    reason: str
    graph: torch.fx.GraphModule | None
    inlined: dict[str, int]
    folded: int
    guards: str | None
    operators: dict[str, str]

    def __str__(self) -> str:
        lines = [self.call]
        if self.graph is None:
            lines.append(f"runs the eager decomposition: {self.reason}")
            return "\n".join(lines)
        count = len(self.operators)
        lines.append(f"traced graph: {count} operator{'s' * (count != 1)}, closed under forward AD")
        if self.inlined:
            lines.append("inlined decompositions: " + ", ".join(f"{k} (x{v})" for k, v in self.inlined.items()))
        if self.folded:
            lines.append(f"input-independent tensors computed once: {self.folded}")
        if self.guards:
            lines.append(f"valid while: {self.guards}")
        routes = ", ".join(f"{name} [{route}]" for name, route in self.operators.items())
        lines += textwrap.wrap(f"operators: {routes}", width=100, subsequent_indent="    ")
        code = self.graph.print_readable(print_output=False, include_stride=False, include_device=False)
        for line in code.splitlines():
            if line.strip() and "No stacktrace found" not in line:
                lines.append(_RELEASES.sub("", line))  # drop the generated `;  x = None` bookkeeping
        return "\n".join(lines)

    __repr__ = __str__


_RELEASES = re.compile(r";  [\w =,]* = None$")


def _operators(module: torch.fx.GraphModule) -> dict[str, str]:
    found: dict[str, str] = {}
    for node in module.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, OpOverload):
            found.setdefault(qualified_name(node.target), forward_route(node.target).kind)
    return found


def explain(op: OperatorLike, *args: Any, **kwargs: Any) -> Explanation:
    """The graph the graph backend runs for ``op(*args, **kwargs)`` under forward AD, in readable form.

    Tensor arguments are read for their metadata only; each floating-point or
    complex one is taken to carry a tangent, as the backend does. Raises :class:`~fwdecomp.closure.ClosureError` if the
    decomposition is not closed under forward AD.

    Example:
        >>> import torch, fwdecomp
        >>> print(fwdecomp.explain("aten::_pdist_forward", torch.randn(4, 3), 1.0))
        aten::_pdist_forward(self=float32[4, 3], p=1.0)
        traced graph: 4 operators, closed under forward AD
        input-independent tensors computed once: 2
        operators: aten::index.Tensor [formula], aten::sub.Tensor [formula], aten::abs [formula],
            aten::sum.dim_IntList [formula]
        class _pdist_forward(torch.nn.Module):
            def forward(self, arg0_1: "f32[4, 3]"):
                _constant_0: "i64[6]" = self._constant_0
                _constant_1: "i64[6]" = self._constant_1
                index: "f32[6, 3]" = torch.ops.aten.index.Tensor(arg0_1, [_constant_0])
                index_1: "f32[6, 3]" = torch.ops.aten.index.Tensor(arg0_1, [_constant_1])
                sub: "f32[6, 3]" = torch.ops.aten.sub.Tensor(index, index_1)
                abs_1: "f32[6, 3]" = torch.ops.aten.abs.default(sub)
                sum_1: "f32[6]" = torch.ops.aten.sum.dim_IntList(abs_1, [-1])
                return [sum_1]
    """
    overload = resolve_one(op)
    if registry.lookup(overload) is None:
        raise NotImplementedError(f"fwdecomp: no decomposition is registered for {qualified_name(overload)}")
    stack = arguments_to_stack(schema_of(overload), args, kwargs)
    leaves = _leaves(stack)
    try:
        traced = _trace(overload, stack, leaves, _default.tracing_mode)
    except ClosureError:
        raise
    except Exception as error:
        reason = f"tracing failed: {type(error).__name__}: {str(error).splitlines()[0]}"
        return Explanation(_describe_call(overload, stack), "eager", reason, None, {}, 0, None, {})
    assert traced.graph is not None
    return Explanation(
        traced.call,
        "graph",
        "",
        traced.graph,
        traced.inlined,
        traced.folded,
        traced.guards,
        _operators(traced.graph),
    )


# --- python -m fwdecomp audit --closure -------------------------------------------------


@dataclass
class ClosureRow:
    """One operator's closure verdict over its samples."""

    name: str
    verdict: str  # "closed" | "mixed" (eager on some samples) | "eager" | "open" | "no samples"
    samples: int = 0
    nodes: int = 0
    inlined: list[str] = field(default_factory=list)
    detail: str = ""


def check_closure(op: OpOverload, limit: int | None = None) -> ClosureRow:
    """Trace ``op``'s decomposition on its float64 samples and report whether it is closed.

    Operators with no CPU samples (the CUDA-only attention kernels) are traced on their meta samples.
    """
    row = ClosureRow(qualified_name(op), "no samples")
    entry = registry.lookup(op)
    if entry is None or entry.samples is None:
        return row
    schema = schema_of(op)
    eager_reasons = []
    samples = list(entry.samples("cpu", torch.float64))
    if not samples and entry.dtypes:  # CUDA-only kernels: their meta samples, in a dtype they take
        samples = list(entry.samples("meta", entry.dtypes[0]))
    for index, sample in enumerate(samples):
        if limit is not None and index >= limit:
            break
        stack = arguments_to_stack(schema, sample.args, sample.kwargs)
        row.samples += 1
        try:
            traced = _trace(op, stack, _leaves(stack), _default.tracing_mode)
        except ClosureError as error:
            row.verdict, row.detail = "open", " -> ".join(error.path) + f": {error.reason}"
            return row
        except Exception as error:
            eager_reasons.append(f"[{sample.note}] {type(error).__name__}: {str(error).splitlines()[0][:160]}")
            continue
        assert traced.graph is not None
        row.nodes = max(row.nodes, sum(n.op == "call_function" for n in traced.graph.graph.nodes))
        row.inlined = sorted(set(row.inlined) | set(traced.inlined))
    if eager_reasons:
        row.verdict = "mixed" if len(eager_reasons) < row.samples else "eager"
        row.detail = "; ".join(eager_reasons)
    elif row.samples:
        row.verdict = "closed"
    return row


def _closure_view(args: argparse.Namespace) -> int:
    rows = [check_closure(op, args.limit) for op in registry.operators()]
    if args.format == "json":
        print(json.dumps({"closure": [row.__dict__ for row in rows]}, indent=2))
    else:
        header = ("operator", "closure", "samples", "graph nodes", "inlined")
        cells = [(r.name, r.verdict, str(r.samples), str(r.nodes), ", ".join(r.inlined) or "-") for r in rows]
        text = text_table(header, cells)
        text += [f"{r.verdict.upper()} {r.name}: {r.detail}" for r in rows if r.detail]
        print("\n".join(text))
        counts = {v: sum(r.verdict == v for r in rows) for v in ("closed", "mixed", "eager", "open", "no samples")}
        print(
            f"\n{len(rows)} decompositions: {counts['closed']} closed, {counts['open']} open; "
            f"{counts['mixed']} traced on some samples and run eagerly on others (data-dependent), "
            f"{counts['eager']} run eagerly on all; {counts['no samples']} without samples"
        )
    return 1 if any(r.verdict == "open" for r in rows) else 0


audit_view(
    "closure",
    "trace every registered decomposition on its samples and check that forward AD reaches only "
    "operators with formulas or decompositions (exit 1 if one does not)",
)(_closure_view)
