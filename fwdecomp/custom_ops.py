"""Custom operators: which ones fwdecomp guards, and noticing the ones defined later.

PyTorch differentiates a custom operator (``torch.library.custom_op``,
``Library.define``, a C++ extension) in forward mode only through what its
author registered. An operator that registered only a backward loses its
tangents without a word: ``None`` under ``torch.autograd.forward_ad``, zeros
under ``torch.func.jvp``. While fwdecomp is enabled in *strict* mode (the
default), such an operator gets fwdecomp's autograd kernel, so a call that
carries tangents into it raises ``NotImplementedError`` naming the operator
and the two fixes (``register_decomposition``, ``register_jvp``) instead.

Which operators count: every operator outside ``aten`` and outside the
namespaces PyTorch uses for its own internals (:data:`PYTORCH_NAMESPACES`:
primitives, quantized kernels, collectives, the compiler's helpers, ...), that
can receive a tangent (it takes a tensor) and can pass one on (it returns a
tensor or writes into one), and that is not CompositeImplicitAutograd (autograd
sees through those). What raises is decided per call, where a tangent would
be lost (see :mod:`fwdecomp.autograd`): integer results need none, and an
operator whose own autograd kernel gives tangents keeps working.

Operators defined after ``enable()`` are noticed by hooks on the Python
entry points that define operators and register their kernels
(``Library.define``, ``Library.impl``, ``torch.ops.load_library``); see
:class:`DefinitionWatcher`. ``disable()`` puts those entry points back exactly.

Example:
    >>> import torch
    >>> from fwdecomp.custom_ops import is_user_operator
    >>> is_user_operator(torch.ops.aten.sin.default), is_user_operator(torch.ops.prims.sin.default)
    (False, False)
    >>> lib = torch.library.Library("fwdecomp_doc", "FRAGMENT")
    >>> lib.define("double(Tensor x) -> Tensor")
    'double'
    >>> is_user_operator(torch.ops.fwdecomp_doc.double.default)
    True
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch

from fwdecomp import _torch
from fwdecomp._torch import OpOverload, namespace, schema_of
from fwdecomp.overloads import UnknownOperatorError, resolve

__all__ = [
    "PYTORCH_NAMESPACES",
    "DefinitionWatcher",
    "can_carry_tangents",
    "is_user_operator",
    "user_operators",
]

#: Namespaces PyTorch itself defines operators in, besides ``aten``: those
#: registered by ``import torch`` (C++ and Python), and those its subpackages
#: define when imported (the compiler, distributed, ONNX export, activation
#: offloading, ...). ``tests/test_custom_ops.py`` imports those subpackages in
#: a fresh process and checks that this list covers every namespace they
#: create, so a PyTorch upgrade that adds one fails there.
PYTORCH_NAMESPACES: frozenset[str] = frozenset(
    {
        "_c10d_functional",
        "_c10d_functional_autograd",
        "_dtensor",
        "_inductor_debug",
        "_inductor_test",
        "_native",
        "_quantized",
        "_test",
        "ao",
        "bucketing",
        "c10d",
        "c10d_functional",
        "cplib",
        "debug_mode_ops",
        "debugprims",
        "device_mesh",
        "export",
        "flex_lib",
        "fsdp",
        "inductor",
        "inductor_prims",
        "mkl",
        "mkldnn",
        "mkldnn_prepacked",
        "onednn",
        "onnx",
        "onnx_symbolic",
        "pippy",
        "prepacked",  # XNNPACK's prepacked linear/conv (torch 2.11 builds)
        "prim",
        "prims",
        "profiler",
        "quantization",
        "quantized",
        "quantized_decomposed",
        "rngprims",
        "semi_structured",
        "sparse",
        "static_runtime",
        "streams",
        "symm_mem",
        "torch_attn",
        "torch_nn",  # F.linear_cross_entropy's chunked operators (torch >= 2.13)
        "triton",
    }
)

_TENSOR_TYPES = ("Tensor", "Optional[Tensor]", "List[Tensor]", "List[Optional[Tensor]]")


def is_tensor_type(type_: Any) -> bool:
    """Whether a schema type holds tensors (``Tensor``, ``Tensor?``, ``Tensor[]``, ``Tensor?[]``)."""
    return str(type_) in _TENSOR_TYPES


def is_user_operator(op: OpOverload) -> bool:
    """Whether ``op`` is a custom operator: outside ``aten`` and PyTorch's own namespaces."""
    ns = namespace(op)
    return ns != "aten" and ns not in PYTORCH_NAMESPACES


def can_carry_tangents(op: OpOverload) -> bool:
    """Whether a call of ``op`` can take a tangent in and pass one on (by its schema)."""
    schema = schema_of(op)
    takes = any(is_tensor_type(a.type) for a in schema.arguments)
    writes = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments if is_tensor_type(a.type))
    gives = any(is_tensor_type(r.type) for r in schema.returns)
    return takes and (gives or writes)


def _overloads_named(qualname: str) -> list[OpOverload]:
    try:
        return resolve(qualname)
    except (UnknownOperatorError, TypeError):  # impls without a definition, odd names
        return []


def user_operators() -> list[OpOverload]:
    """Every custom operator the dispatcher knows right now (see :func:`is_user_operator`)."""
    found = []
    for name in _torch.all_operator_names():
        ns = name.split("::", 1)[0]
        if ns == "aten" or ns in PYTORCH_NAMESPACES:
            continue
        found += [op for op in _overloads_named(name) if is_user_operator(op)]
    return found


_AUTOGRAD_AFFECTING = ("Autograd", "CompositeImplicitAutograd")


class DefinitionWatcher:
    """Hooks on the Python entry points that define operators and register their kernels.

    ``on_define(op)`` runs after ``Library.define`` defines ``op`` (this is how
    ``torch.library.custom_op``, ``torch.library.define`` and ``triton_op``
    define operators too); ``on_kernels_changed(qualname)`` after
    ``Library.impl`` registers an autograd-relevant kernel (``Autograd*`` or
    ``CompositeImplicitAutograd``) for any overload of ``qualname`` (an
    autograd kernel captured earlier would otherwise be stale);
    ``on_library_loaded()`` after ``torch.ops.load_library`` loads a C++
    library (which may define operators in its static initialisers).

    Hooks cannot see operators that a C++ extension imported as a Python
    module defines; ``fwdecomp.enable()`` called again rescans for those.
    """

    def __init__(
        self,
        on_define: Callable[[OpOverload], None],
        on_kernels_changed: Callable[[str], None],
        on_library_loaded: Callable[[], None],
    ) -> None:
        self._on_define = on_define
        self._on_kernels_changed = on_kernels_changed
        self._on_library_loaded = on_library_loaded
        self._restore: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return bool(self._restore)

    def start(self) -> None:
        """Install the hooks (idempotent)."""
        with self._lock:
            if self._restore:
                return
            self._restore = [
                _torch.wrap_attribute(_torch.LIBRARY_CLASS, "define", self._wrap_define),
                _torch.wrap_attribute(_torch.LIBRARY_CLASS, "impl", self._wrap_impl),
                _torch.wrap_attribute(_torch.OPS_CLASS, "load_library", self._wrap_load_library),
            ]

    def stop(self) -> None:
        """Remove the hooks, restoring the entry points exactly (idempotent)."""
        with self._lock:
            for restore in reversed(self._restore):
                restore()
            self._restore = []

    def _wrap_define(self, define: Callable[..., Any]) -> Callable[..., Any]:
        watcher = self

        def define_and_notify(library: torch.library.Library, schema: str, *args: Any, **kwargs: Any) -> Any:
            result = define(library, schema, *args, **kwargs)
            for op in _overloads_named(_torch.library_qualname(library, schema)):
                watcher._on_define(op)
            return result

        define_and_notify.__wrapped__ = define  # type: ignore[attr-defined]
        return define_and_notify

    def _wrap_impl(self, impl: Callable[..., Any]) -> Callable[..., Any]:
        watcher = self

        def impl_and_notify(
            library: torch.library.Library, op_name: Any, fn: Any, dispatch_key: str = "", *args: Any, **kwargs: Any
        ) -> Any:
            result = impl(library, op_name, fn, dispatch_key, *args, **kwargs)
            key = _torch.library_impl_key(library, dispatch_key)
            if key.startswith(_AUTOGRAD_AFFECTING):
                watcher._on_kernels_changed(_torch.library_qualname(library, op_name).split(".", 1)[0])
            return result

        impl_and_notify.__wrapped__ = impl  # type: ignore[attr-defined]
        return impl_and_notify

    def _wrap_load_library(self, load_library: Callable[..., Any]) -> Callable[..., Any]:
        watcher = self

        def load_library_and_notify(ops: Any, path: Any) -> Any:
            result = load_library(ops, path)
            watcher._on_library_loaded()
            return result

        load_library_and_notify.__wrapped__ = load_library  # type: ignore[attr-defined]
        return load_library_and_notify
