"""Every use of a private PyTorch API in fwdecomp, wrapped in one place.

``tests/test_torch_internals.py`` exercises each wrapper, so a PyTorch
upgrade that changes one of them fails loudly there, not deep inside a JVP.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

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


def tangent_of(tensor: torch.Tensor) -> torch.Tensor | None:
    """The forward-mode tangent ``tensor`` carries at the current level, or ``None``."""
    return forward_ad.unpack_dual(tensor).tangent


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


def functorch_transforms_active() -> bool:
    """Whether a ``torch.func`` transform (jvp, vmap, grad, ...) is running around this call."""
    return bool(torch._C._are_functorch_transforms_active())
