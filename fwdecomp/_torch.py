"""Every use of a private PyTorch API in fwdecomp, wrapped in one place.

``tests/test_torch_internals.py`` exercises each wrapper, so a PyTorch
upgrade that changes one of them fails loudly there, not deep inside a JVP.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import threading
from typing import Any, Iterator

import torch
from torch.autograd import forward_ad

OpOverload = torch._ops.OpOverload
OpOverloadPacket = torch._ops.OpOverloadPacket


def schema_of(op: OpOverload) -> torch.FunctionSchema:
    """The operator's ``torch.FunctionSchema``."""
    return op._schema


def qualified_name(op: OpOverload) -> str:
    """``ns::name`` or ``ns::name.overload``, the way error messages name an operator."""
    schema = op._schema
    return f"{schema.name}.{schema.overload_name}" if schema.overload_name else schema.name


def namespace(op: OpOverload) -> str:
    return op._schema.name.split("::", 1)[0]


def original_kernel(op: OpOverload, dispatch_key: str) -> Any:
    """The kernel the dispatcher computes for ``op`` at ``dispatch_key`` (public since 2.9)."""
    return torch.library.get_kernel(op, dispatch_key)


def new_library(ns: str) -> torch.library.Library:
    """A fresh IMPL library: its registrations vanish together when destroyed."""
    return torch.library.Library(ns, "IMPL")


def destroy_library(lib: torch.library.Library) -> None:
    """Remove every registration ``lib`` made, restoring the dispatcher entries."""
    lib._destroy()


def dispatch_dump(qualname: str) -> str:
    """The dispatcher's textual dump of one operator's registrations."""
    return torch._C._dispatch_dump(qualname)


def has_kernel_for_key(op: OpOverload, dispatch_key: str) -> bool:
    """Whether ``op`` has a kernel registered directly for ``dispatch_key`` (aliases included)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualified_name(op), dispatch_key)


def is_composite_implicit(op: OpOverload) -> bool:
    """Whether ``op`` decomposes itself above autograd (CompositeImplicitAutograd)."""
    return has_kernel_for_key(op, "CompositeImplicitAutograd")


# Bound once: ``torch._VF.name`` is a module ``__getattr__`` costing ~2 µs per call, more than the call.
_unpack_dual_cpp = torch._C._VariableFunctions._unpack_dual
_make_dual_cpp = torch._C._VariableFunctions._make_dual


def unpack_dual(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``forward_ad.unpack_dual`` at the current level, without its Python layers where none is needed.

    The public function looks for an export tracing mode on every call (several µs);
    the C++ function it ends in is called directly unless a torch-function mode is active.
    """
    level = forward_ad._current_level
    if level < 0:
        return tensor, None
    if torch._C._is_torch_function_mode_enabled():
        primal, tangent = forward_ad.unpack_dual(tensor)
        return primal, tangent
    primal, tangent = _unpack_dual_cpp(tensor, level)
    return primal, tangent


def make_dual(tensor: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """``forward_ad.make_dual`` at the current level, without its Python layers where none is needed.

    For outputs fwdecomp computed itself (floating point, a level open): the public
    function's checks and export-mode lookup cost more than the C++ call it ends in.
    """
    if torch._C._is_torch_function_mode_enabled():
        return forward_ad.make_dual(tensor, tangent)
    return _make_dual_cpp(tensor, tangent, forward_ad._current_level)


def tangent_of(tensor: torch.Tensor) -> torch.Tensor | None:
    """The forward-mode tangent ``tensor`` carries at the current level, or ``None``."""
    return unpack_dual(tensor)[1]


def forward_ad_level() -> int:
    """The innermost open forward-AD level (-1 if none)."""
    return forward_ad._current_level


def functorch_level() -> int | None:
    """The innermost ``torch.func`` transform level, or ``None`` outside transforms."""
    return torch._C._functorch.maybe_current_level()


def dual_level_active() -> bool:
    """Whether some forward-AD level is open (torch.func.jvp opens one too)."""
    return forward_ad._current_level >= 0


def derivatives_yaml_path() -> str | None:
    """Path of the ``derivatives.yaml`` the running PyTorch was generated from, if shipped."""
    spec = importlib.util.find_spec("torchgen")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "packaged", "autograd", "derivatives.yaml")
        if os.path.isfile(path):
            return path
    return None


def all_operator_names() -> list[str]:
    """Qualified names of every operator the dispatcher knows."""
    return list(torch._C._dispatch_get_all_op_names())


# --- tracing (the graph backend) ---------------------------------------------


def make_fx(fn: Any, tracing_mode: str) -> Any:
    """``torch.fx.experimental.proxy_tensor.make_fx``; real tensors captured by the function become constants."""
    from torch.fx.experimental.proxy_tensor import make_fx as _make_fx

    return _make_fx(fn, tracing_mode=tracing_mode, _allow_non_fake_inputs=True)


class _ThisThreadOnly(logging.Filter):
    """Drops the records of the threads that are inside :func:`quiet_fake_tensor_log`."""

    def __init__(self) -> None:
        super().__init__()
        self.quiet = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.quiet, "depth", 0)


_FAKE_TENSOR_LOGGER = "torch._subclasses.fake_tensor"
_fake_tensor_filter = _ThisThreadOnly()
_quiet_lock = threading.Lock()
_quiet_threads = 0


@contextlib.contextmanager
def quiet_fake_tensor_log() -> Iterator[None]:
    """Silence, in this thread, the error log fake tensors write when a kernel fails while tracing.

    ``FakeTensorMode`` logs ``failed while attempting to run meta for ...`` with a traceback
    before it raises; the graph backend catches the error and runs the decomposition eagerly
    (an expected outcome: data-dependent code, ``_fw_primal``'s inference-mode stub), so the
    log is noise. Other threads, and this one afterwards, log as before.
    """
    global _quiet_threads
    logger = logging.getLogger(_FAKE_TENSOR_LOGGER)
    quiet = _fake_tensor_filter.quiet
    outermost = not getattr(quiet, "depth", 0)
    if outermost:
        with _quiet_lock:  # the filter is on the logger only while some thread is quiet
            if _quiet_threads == 0:
                logger.addFilter(_fake_tensor_filter)
            _quiet_threads += 1
    quiet.depth = getattr(quiet, "depth", 0) + 1
    try:
        yield
    finally:
        quiet.depth -= 1
        if outermost:
            with _quiet_lock:
                _quiet_threads -= 1
                if _quiet_threads == 0:
                    logger.removeFilter(_fake_tensor_filter)


def fake_mode() -> Any:
    """A fresh ``FakeTensorMode`` without a shape environment: any data-dependent operation raises.

    Tensors created inside it have metadata and no data; ``make_fx(tracing_mode="fake")``
    uses the mode of the fake tensors it is given. Real tensors an operation meets
    (module-level constants) are converted. (Creating the first one imports ``torch._dynamo``.)
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def below_autograd() -> Any:
    """Dispatch below the autograd keys, as a kernel's redispatch does (no autograd kernel runs)."""
    return torch._C._AutoDispatchBelowAutograd()


@contextlib.contextmanager
def outside_functorch() -> Iterator[None]:
    """Run with functorch's transform stack (vmap, jvp, grad levels) set aside, restored on exit.

    Inside a transform the dispatcher also excludes ``PythonTLSSnapshot``; a
    Python dispatch mode (fake tensors, ``make_fx``) entered here then trips
    an internal assert on torch 2.11 (``tls_on_entry.has_value()``), so the
    key is re-enabled for the duration too.
    """
    from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

    with temporarily_clear_interpreter_stack():
        include = torch._C._dispatch_tls_local_include_set()
        exclude = torch._C._dispatch_tls_local_exclude_set().remove(torch._C.DispatchKey.PythonTLSSnapshot)
        with torch._C._ForceDispatchKeyGuard(include, exclude):
            yield


#: Keys functorch adds to the excluded dispatch keys while a ``jvp`` layer processes an
#: operator (its own layers' keys, and those of the wrappers it handles above autograd),
#: which the layer below expects back. functorch also excludes keys Python cannot name
#: (``Tracer``, ``Batched``, ``VmapMode``, ``BatchedNestedTensor``, ``DeferredInit``, and on
#: torch 2.11 ``Named``): they stay excluded, harmless where :func:`below_jvp_layer` is used
#: (no JIT tracing, legacy ``vmap``, nested or named tensors there).
#: ``tests/test_torch_internals.py`` probes the real set.
JVP_LAYER_EXCLUDED_KEYS: tuple[str, ...] = (
    "Functionalize",
    "Conjugate",
    "Negative",
    "ZeroTensor",
    "FuncTorchBatched",
    "FuncTorchGradWrapper",
    "PythonTLSSnapshot",
    "FuncTorchDynamicLayerFrontMode",
)


def innermost_jvp_level() -> int | None:
    """The level of the innermost ``torch.func`` transform if it is a ``jvp``, else ``None``."""
    top = torch._C._functorch.peek_interpreter_stack()
    if top is None or top.key() != torch._C._functorch.TransformType.Jvp:
        return None
    return top.level()


def unwrap_jvp(tensor: torch.Tensor, level: int) -> torch.Tensor:
    """The tensor a ``jvp`` layer's wrapper at ``level`` holds (``tensor`` itself if not wrapped there)."""
    return torch._C._functorch._unwrap_for_grad(tensor, level)


def wrap_jvp(tensor: torch.Tensor, level: int) -> torch.Tensor:
    """``tensor``, computed below the ``jvp`` layer at ``level``, as a value of that layer (no tangent)."""
    return torch._C._functorch._wrap_for_grad(tensor, level)


def may_run_below_jvp_layer(tensors: Any) -> bool:
    """Whether :func:`below_jvp_layer` suits a computation on these tensors (``None`` entries allowed).

    Not under a dispatch mode or the JIT tracer, nor for nested or named tensors: their keys
    are among those the layer leaves excluded (see :data:`JVP_LAYER_EXCLUDED_KEYS`).
    """
    if dispatch_modes_active() or torch.jit.is_tracing():
        return False
    return not any(isinstance(t, torch.Tensor) and (t.is_nested or _named(t)) for t in tensors)


def _named(tensor: torch.Tensor) -> bool:
    names = getattr(tensor, "names", ())  # named tensors are gone from recent releases
    return any(name is not None for name in names)


@contextlib.contextmanager
def below_jvp_layer() -> Iterator[None]:
    """Run operators below the innermost ``torch.func.jvp`` layer, as that layer sends them on.

    Inside a layer every operator on its wrapped tensors passes the layer (an
    autograd kernel, unwrapping, re-wrapping). Code that computes the tangents
    the layer attaches (the attention JVP) runs on the unwrapped tensors
    (:func:`unwrap_jvp`) here: the layer is popped as functorch's own
    ``autograd.Function`` support does, and the dispatch keys the layer
    excluded are given back (what the layer does when it hands an operator to
    the next one down). Layers further down see every operator.
    """
    from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter

    with retrieve_current_functorch_interpreter().lower():
        include = torch._C._dispatch_tls_local_include_set()
        exclude = torch._C._dispatch_tls_local_exclude_set()
        for key in JVP_LAYER_EXCLUDED_KEYS:
            exclude = exclude.remove(getattr(torch._C.DispatchKey, key))
        with torch._C._ForceDispatchKeyGuard(include, exclude):
            yield


def without_dispatch_modes() -> Any:
    """Run with every active ``TorchDispatchMode`` (fake and proxy tracing modes included) set aside."""
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


def dispatch_modes_active() -> bool:
    """Whether any ``TorchDispatchMode`` is active (a user's mode, or a tracer such as make_fx)."""
    return torch._C._len_torch_dispatch_stack() > 0


def autocast_disabled(device_types: Any) -> Any:
    """A context with autocast off for these device types (``meta`` has none)."""
    stack = contextlib.ExitStack()
    for device_type in sorted(set(device_types) - {"meta"}):
        stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def operator_callable(op: OpOverload) -> Any:
    """The C++ callable behind ``op(...)``: the same call without ``OpOverload.__call__``'s Python frame."""
    return getattr(op, "_op", op)


def storage_key(tensor: torch.Tensor) -> int:
    """An identity shared by all tensors viewing the same storage (fake tensors included)."""
    return tensor.untyped_storage()._cdata


def autograd_would_decompose(op: OpOverload, tensors: Any) -> bool:
    """Whether autograd runs ``op``'s CompositeImplicitAutograd kernel for inputs on these devices.

    It does unless the op also has a kernel for an input's backend key; this is
    the rule PyTorch's own tracer applies below autograd.
    """
    name = qualified_name(op)
    if not torch._C._dispatch_has_kernel(name):  # TorchScript-only operators such as prim::device
        return False
    if not is_composite_implicit(op):
        return False
    for tensor in tensors:
        key = torch._C._dispatch_key_for_device(tensor.device.type)
        if torch._C._dispatch_has_kernel_for_dispatch_key(name, key):
            return False
    return True


def shape_guards(placeholders: list[Any]) -> str | None:
    """Every assumption a symbolic trace made about its inputs' sizes and strides, as an expression."""
    fake = next((p for p in placeholders if isinstance(p, torch.Tensor)), None)
    if fake is None:
        return None
    return fake.fake_mode.shape_env.produce_guards_expression(placeholders, ignore_static=False)


def compile_shape_guards(expression: str) -> Any:
    """``check(tensors) -> bool`` for an expression from :func:`shape_guards`."""
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

    code = compile(expression, "<fwdecomp shape guards>", "eval")
    names = SYMPY_INTERP

    def check(tensors: list[Any]) -> bool:
        return bool(eval(code, names, {"L": {f"t{i}": t for i, t in enumerate(tensors)}}))

    return check


def autograd_codegen_path() -> str | None:
    """Path of the ``gen_variable_type.py`` that generated the running PyTorch's autograd kernels."""
    path = derivatives_yaml_path()
    if path is None:
        return None
    candidate = os.path.join(os.path.dirname(path), "gen_variable_type.py")
    return candidate if os.path.isfile(candidate) else None


# --- used by fwdecomp.model_audit ---------------------------------------------

#: Base class of modes that see every operator call that reaches the ``Python``
#: dispatch key, just below autograd (imported by ``torch`` itself).
TorchDispatchMode = torch.utils._python_dispatch.TorchDispatchMode


def current_autograd_node() -> Any:
    """The autograd graph node whose backward is running now, or ``None`` outside a backward pass."""
    return torch._C._current_autograd_node()


def forward_traceback(node: Any) -> list[str] | None:
    """The Python stack (``traceback.format_stack`` lines) that created ``node``.

    Recorded only while anomaly detection is on (``torch.autograd.set_detect_anomaly``).
    """
    if node is None:
        return None
    return node.metadata.get("traceback_")


def jvp_decomposed_operators() -> frozenset[OpOverload]:
    """Operators PyTorch itself decomposes for forward AD (its C++ "JIT decomposition" mechanism).

    They have no formula in derivatives.yaml yet support forward AD. The table
    lives in ``torch._decomp.decompositions_for_jvp`` (``torch.func.jvp``
    imports it too; about 0.5 s the first time).
    """
    from torch._decomp.decompositions_for_jvp import decomposition_table_for_jvp

    return frozenset(op for op in decomposition_table_for_jvp if isinstance(op, OpOverload))


# --- forward-AD internals (JVP rules, jvp_from_forward) ---------------------


def primal_of(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` without its tangent at the current level (a view sharing its storage and reverse-mode history)."""
    return unpack_dual(tensor)[0]


def forward_grad_enabled(enabled: bool) -> Any:
    """A context manager that switches forward-mode AD on or off in this thread (private in 2.13)."""
    return forward_ad._set_fwd_grad_enabled(enabled)


def forward_grad_is_enabled() -> bool:
    """Whether forward-mode AD is switched on in this thread."""
    return torch._C._is_fwd_grad_enabled()


def function_default(name: str) -> Any:
    """``torch.autograd.Function``'s own ``jvp`` / ``setup_context`` / ..., to tell whether a subclass overrides it."""
    return getattr(torch.autograd.function._SingleLevelFunction, name)


# --- operator-definition entry points (custom operators defined after enable) -


def wrap_attribute(owner: Any, name: str, make_wrapper: Any) -> Any:
    """Replace ``owner.name`` by ``make_wrapper(current)``; return a function that undoes it exactly.

    If ``owner`` defined ``name`` itself, the very same object is put back;
    if it inherited it, the override is deleted, so lookup inherits again.
    """
    own = vars(owner)
    had_own, original = name in own, own.get(name)
    setattr(owner, name, make_wrapper(getattr(owner, name)))

    def restore() -> None:
        if had_own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)

    return restore


#: The Python entry points through which operators are defined or given
#: kernels after import: ``torch.library.custom_op``, ``torch.library.define``,
#: ``triton_op`` and ``Library(...).define`` all end in ``Library.define``;
#: every kernel registered from Python ends in ``Library.impl``; C++
#: libraries are loaded with ``torch.ops.load_library``.
LIBRARY_CLASS = torch.library.Library
OPS_CLASS = type(torch.ops)


def library_qualname(library: torch.library.Library, op_name: Any) -> str:
    """``ns::name[.overload]`` of the operator a ``Library.define``/``impl`` call names."""
    if isinstance(op_name, OpOverload):
        return qualified_name(op_name)
    text = str(op_name).split("(", 1)[0]
    return text if "::" in text else f"{library.ns}::{text}"


def library_impl_key(library: torch.library.Library, dispatch_key: str) -> str:
    """The dispatch key a ``Library.impl`` call registers to (its defaults resolved)."""
    return dispatch_key or library.dispatch_key or "CompositeImplicitAutograd"


def functorch_transforms_active() -> bool:
    """Whether a ``torch.func`` transform (jvp, vmap, grad, ...) is running around this call."""
    return bool(torch._C._are_functorch_transforms_active())


def grad_transform_active() -> bool:
    """Whether a ``torch.func`` reverse-mode transform (grad, vjp, jacrev, hessian) runs around this call."""
    stack = torch._C._functorch.get_interpreter_stack() or ()
    return any(interpreter.key() == torch._C._functorch.TransformType.Grad for interpreter in stack)


def requires_grad_below(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``, or a tensor under its ``torch.func`` wrappers, requires grad.

    Inside a transform (``jvp``, ``vmap``) a wrapper does not report that the
    tensor it wraps is recorded by reverse mode outside the transform.
    """
    while True:
        if tensor.requires_grad:
            return True
        if not torch._C._functorch.is_functorch_wrapped_tensor(tensor):
            return False
        tensor = torch._C._functorch.get_unwrapped(tensor)


def is_legacy_batched(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a batched tensor of the legacy ``vmap`` (what gradcheck's batched checks use)."""
    return bool(torch._C._functorch.is_legacy_batchedtensor(tensor))
