"""fwdecomp: forward-mode automatic differentiation through every PyTorch operator.

Forward AD (``torch.autograd.forward_ad``, ``torch.func.jvp``, ``jacfwd``,
``hessian``) fails on operators without a forward formula. With fwdecomp
enabled, a call that carries tangents into such an operator runs a
registered decomposition of it into operators that have formulas; every
other call runs PyTorch's own kernel.

Example:
    >>> import torch, fwdecomp
    >>> fwdecomp.enable()
    >>> x, y, v = torch.randn(5, 3), torch.randn(4, 3), torch.randn(5, 3)
    >>> out, tangent = torch.func.jvp(lambda a: torch.cdist(a, y), (x,), (v,))
    >>> fwdecomp.disable()
"""

from __future__ import annotations

import fwdecomp._audit_cli  # noqa: F401  (registers `python -m fwdecomp audit --model MODULE:CALLABLE`)
from fwdecomp import jvp_rules, registry
from fwdecomp.api import covered_operators, disable, enable, enabled, is_enabled, is_strict
from fwdecomp.autograd_function import NotForwardDifferentiableError, jvp_from_forward
from fwdecomp.contract import DecompositionError, SignatureMismatchError
from fwdecomp.formulas import native_forward_formula
from fwdecomp.interface import DecompositionInterface, Registerer, get_impl, set_impl
from fwdecomp.jvp_rules import DuplicateJvpRuleError, register_jvp, unregister_jvp
from fwdecomp.model_audit import AuditReport, audit
from fwdecomp.overloads import UnknownOperatorError
from fwdecomp.registry import (
    DuplicateDecompositionError,
    Sample,
    register_decomposition,
    unregister_decomposition,
)

# Like PyTorch's JitDecompRegisterer: the backend and the decomposition library
# register themselves when present. A build without them (see
# tests/test_interface.py) still imports, and the autograd side then raises a
# clear error instead of failing at import time.
try:
    from fwdecomp.backends import current_backend, use_backend
    from fwdecomp.backends import eager as _eager_backend
except ImportError:  # pragma: no cover - exercised in a subprocess test
    _eager_backend = None
# The graph backend is imported (for explain() and `audit --closure`), not
# installed: fwdecomp.use_backend("graph") installs it.
try:
    from fwdecomp.backends.graph import explain
except ImportError:  # pragma: no cover - exercised in a subprocess test
    pass
try:
    from fwdecomp import decompositions
except ImportError:  # pragma: no cover - exercised in a subprocess test
    decompositions = None

__version__ = "0.1.0"

__all__ = [
    "AuditReport",
    "DecompositionError",
    "DecompositionInterface",
    "DuplicateDecompositionError",
    "DuplicateJvpRuleError",
    "NotForwardDifferentiableError",
    "Registerer",
    "Sample",
    "SignatureMismatchError",
    "UnknownOperatorError",
    "audit",
    "covered_operators",
    "current_backend",
    "decompositions",
    "disable",
    "enable",
    "enabled",
    "explain",
    "get_impl",
    "is_enabled",
    "is_strict",
    "jvp_from_forward",
    "jvp_rules",
    "native_forward_formula",
    "register_decomposition",
    "register_jvp",
    "registry",
    "set_impl",
    "unregister_decomposition",
    "unregister_jvp",
    "use_backend",
]
