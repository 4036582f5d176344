"""The compiled router: the tangent check of fwdecomp's kernels, in C++.

Every call of an operator fwdecomp covers passes through its autograd kernel,
tangents or not. Written in Python, that kernel costs 2-5 µs per call even
when no input carries a tangent (the dispatcher turns the arguments into
Python objects and back). The router (``fwdecomp/csrc/router.cpp``, a boxed
C++ kernel registered in front of the Python one) reads the arguments where
they are: a call without tangents goes straight to PyTorch's own kernel
(~0.1 µs added; ``python -m benchmarks.overhead``), any other call to fwdecomp's Python kernel, which decides
as it always does. Results are the same either way; only the cost of
tangent-free calls changes.

The router is compiled from source with ``torch.utils.cpp_extension`` (a C++
compiler, ninja and PyTorch's headers, which every PyTorch wheel ships), once
per PyTorch version and router source, into a cache directory
(``$FWDECOMP_CACHE``, else ``$XDG_CACHE_HOME/fwdecomp``, else
``~/.cache/fwdecomp``); about 8 s on two cores, then loading it takes
milliseconds. ``python -m fwdecomp router --build`` builds it ahead of time.

``FWDECOMP_ROUTER`` chooses, when fwdecomp first installs a kernel:

- ``auto`` (default): the compiled router, built if need be; where it cannot
  be built, the Python kernels alone, and :func:`status` says why;
- ``native``: the compiled router, or an error saying why it cannot be built;
- ``python``: the Python kernels alone (nothing is built or loaded).

Example:
    >>> from fwdecomp import router
    >>> router.status().kind in ("native", "python")
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from fwdecomp._torch import OpOverload, schema_of

__all__ = [
    "MODES",
    "RouterUnavailableError",
    "Status",
    "begin",
    "build",
    "library_path",
    "mode",
    "native",
    "status",
    "using",
]

MODES = ("auto", "native", "python")
SOURCE = Path(__file__).with_name("csrc") / "router.cpp"
_NAME = "fwdecomp_router"
_log = logging.getLogger(__name__)
_NEEDS = "It needs a C++ compiler, ninja and PyTorch's headers"


class RouterUnavailableError(RuntimeError):
    """``FWDECOMP_ROUTER=native`` (or :func:`build`) and the router cannot be built or loaded."""


@dataclass(frozen=True)
class Status:
    """Which router fwdecomp's kernels use: ``kind`` is ``"native"`` or ``"python"``, ``reason`` says why."""

    kind: str
    reason: str
    library: str | None = None

    def __str__(self) -> str:
        where = f" ({self.library})" if self.library else ""
        return f"{self.kind} router{where}: {self.reason}"


def mode() -> str:
    """The mode ``FWDECOMP_ROUTER`` asks for (``auto`` when unset); a value outside :data:`MODES` raises."""
    value = os.environ.get("FWDECOMP_ROUTER", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"FWDECOMP_ROUTER={value!r}: use one of {', '.join(MODES)}")
    return value


def _cache_root() -> Path:
    if os.environ.get("FWDECOMP_CACHE"):
        return Path(os.environ["FWDECOMP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fwdecomp"


def library_path() -> Path:
    """Where the router built for this PyTorch and this source lives (it may not exist yet)."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    versions = (torch.__version__, torch.version.git_version, str(torch.compiled_with_cxx11_abi()), sys.version)
    for part in (*versions, platform.machine(), platform.system()):  # a home directory may be shared across machines
        key.update(part.encode())
    return _cache_root() / f"router-{torch.__version__.replace('+', '_')}-{key.hexdigest()[:16]}" / f"{_NAME}.so"


_lock = threading.Lock()
_status: Status | None = None


def _compile(target: Path, verbose: bool) -> None:
    """Compile the router into ``target`` (atomically: a half-written library is never seen there)."""
    from torch.utils import cpp_extension  # imported only to build: it costs ~0.3 s

    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="build-", dir=target.parent))
    try:
        # Loading happens here too: cpp_extension.load loads what it builds.
        cpp_extension.load(
            name=_NAME,
            sources=[str(SOURCE)],
            extra_cflags=["-O2"],
            build_directory=str(scratch),
            is_python_module=False,
            verbose=verbose,
        )
        os.replace(scratch / f"{_NAME}.so", target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        with contextlib.suppress(OSError):
            target.parent.rmdir()  # only if empty: a failed build leaves nothing behind


def _load(verbose: bool = False) -> Status:
    target = library_path()
    if hasattr(torch.ops, _NAME) and hasattr(getattr(torch.ops, _NAME), "begin"):
        return Status("native", "loaded", str(target))
    if target.is_file():
        torch.ops.load_library(str(target))
        return Status("native", "loaded from the cache", str(target))
    _log.info("fwdecomp: building the compiled router into %s (once per PyTorch version)", target.parent)
    _compile(target, verbose)
    return Status("native", "built", str(target))


def _reason(error: BaseException) -> str:
    """The telling line of a failed build: the compiler's first error, else the exception's last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line.lower()]
    return f"{type(error).__name__}: {(errors or lines or [''])[0 if errors else -1]}"


def status() -> Status:
    """The router in use, loading (and in ``auto`` / ``native`` mode building) it on first call.

    Raises :class:`RouterUnavailableError` in ``native`` mode when it cannot be built.
    """
    global _status
    with _lock:
        if _status is not None:
            return _status
        chosen = mode()
        if chosen == "python":
            _status = Status("python", "FWDECOMP_ROUTER=python")
            return _status
        try:
            _status = _load()
        except Exception as error:
            reason = f"the compiled router could not be built or loaded ({_reason(error)})"
            if chosen == "native":
                raise RouterUnavailableError(
                    f"fwdecomp: FWDECOMP_ROUTER=native, but {reason}. {_NEEDS}; see "
                    "`python -m fwdecomp router --build --verbose`, or unset "
                    "FWDECOMP_ROUTER to fall back to the Python kernels."
                ) from error
            _status = Status("python", reason)
        return _status


def build(verbose: bool = False) -> Path:
    """Build (or find) the router for the running PyTorch and load it; return its path.

    From then on kernels use it, unless ``FWDECOMP_ROUTER=python``.

    Raises :class:`RouterUnavailableError` with the compiler's last words when it cannot.
    """
    global _status
    with _lock:
        try:
            loaded = _load(verbose=verbose)
        except Exception as error:
            raise RouterUnavailableError(
                f"fwdecomp: the compiled router could not be built ({_reason(error)}). {_NEEDS}; rerun "
                "with verbose=True (--verbose) for the compiler's output."
            ) from error
        if mode() != "python":  # FWDECOMP_ROUTER=python keeps the Python kernels (router.using can still pick it)
            _status = loaded
        return library_path()


_forced = threading.local()


@contextlib.contextmanager
def using(kind: str) -> Iterator[None]:
    """Install kernels with the ``"native"`` or ``"python"`` router inside this block (this thread).

    For side-by-side measurements and tests; kernels installed inside keep their router after it.
    ``"native"`` builds the router if need be (:func:`build`).

    Example:
        >>> import torch
        >>> from fwdecomp import autograd, router
        >>> with router.using("python"):
        ...     autograd.install(torch.ops.aten._pdist_forward.default)
        >>> autograd.uninstall(torch.ops.aten._pdist_forward.default)
    """
    if kind not in ("native", "python"):
        raise ValueError(f"router.using({kind!r}): use 'native' or 'python'")
    if kind == "native":
        build()
    previous = getattr(_forced, "kind", None)
    _forced.kind = kind
    try:
        yield
    finally:
        _forced.kind = previous


def native() -> Any | None:
    """The router's operators (``torch.ops.fwdecomp_router``) where the native router is in use, else ``None``."""
    kind = getattr(_forced, "kind", None) or status().kind
    return getattr(torch.ops, _NAME) if kind == "native" else None


def begin(ops: Any, op: OpOverload, key: str) -> int:
    """Open a route: remember ``op``'s kernel for ``key`` (PyTorch's).

    Register fwdecomp's kernel for the key next, then ``ops.finish(route)`` puts the router in
    front of both; ``ops.end(route)`` removes the router again (before fwdecomp's kernel goes).
    """
    schema = schema_of(op)
    return ops.begin(schema.name, schema.overload_name, key)
