"""Implementations of :class:`fwdecomp.interface.DecompositionInterface`, and choosing one.

- :mod:`fwdecomp.backends.eager` runs the registered Python decomposition on
  every call; importing it installs it (``import fwdecomp`` does).
- :mod:`fwdecomp.backends.graph` traces each decomposition once per input
  signature, checks its closure under forward AD, and runs the cached graph;
  importing it installs nothing.

:func:`use_backend` installs one by name (with :func:`~fwdecomp.interface.set_impl`).
"""

from __future__ import annotations

import importlib

from fwdecomp.interface import get_impl, set_impl

__all__ = ["BACKENDS", "current_backend", "use_backend"]

#: Backend name -> (module, function returning the instance to install).
BACKENDS: dict[str, tuple[str, str]] = {
    "eager": ("fwdecomp.backends.eager", "EagerBackend"),
    "graph": ("fwdecomp.backends.graph", "default_backend"),
}

_eager = None


def _instance(name: str):
    global _eager
    module_name, attribute = BACKENDS[name]
    factory = getattr(importlib.import_module(module_name), attribute)
    if name == "eager":  # stateless: one instance is enough
        _eager = _eager if _eager is not None else factory()
        return _eager
    return factory()


def use_backend(name: str) -> None:
    """Install the backend called ``name`` (``"eager"`` or ``"graph"``) for the whole process.

    Example:
        >>> import fwdecomp
        >>> fwdecomp.use_backend("graph")
        >>> fwdecomp.current_backend()
        'graph'
        >>> fwdecomp.use_backend("eager")
    """
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(
            f"fwdecomp: unknown backend {name!r}; choose one of {', '.join(map(repr, BACKENDS))} "
            "(or install your own DecompositionInterface with fwdecomp.set_impl)"
        )
    set_impl(_instance(name))


def current_backend() -> str | None:
    """The name of the installed backend; ``None`` if none is, or it is not one of :data:`BACKENDS`."""
    impl = get_impl()
    if impl is None:
        return None
    for name, (module_name, _) in BACKENDS.items():
        if type(impl).__module__ == module_name:
            return name
    return None
