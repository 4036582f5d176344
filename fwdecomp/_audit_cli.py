"""``python -m fwdecomp audit --model MODULE:CALLABLE``: :func:`fwdecomp.audit` from the shell.

``MODULE`` is an importable module (``package.module``, the current
directory is on the path) or a file (``path/to/file.py``). ``CALLABLE`` is
called with no arguments and returns either the model (a function or an
``nn.Module``; then ``--input-shape`` gives the shapes of random inputs, one
flag per positional input) or ``(model, args)`` / ``(model, args, kwargs)``.

The exit code is 0 when the audit's measured verdict is that forward AD
works, 1 when an operator is missing or a measurement fails, and 2 when the
model cannot be loaded or built. Progress goes to stderr when it is a
terminal, or always with ``--progress``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import sys
import time
from typing import Any, Callable, TextIO

import torch

from fwdecomp.cli import audit_view

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


class UsageError(Exception):
    """The command line names something that cannot be loaded or used."""


def _configure(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("auditing a model (--model)")
    group.add_argument(
        "--input-shape",
        action="append",
        metavar="SHAPE",
        help="shape of one random float input, e.g. 8,16 or 8x16; repeat for more inputs (when CALLABLE returns "
        "only the model)",
    )
    group.add_argument("--dtype", choices=sorted(_DTYPES), help="cast the model and its floating-point inputs")
    group.add_argument("--device", default=None, help="move the model and its inputs, e.g. cuda")
    group.add_argument("--wrt", choices=("inputs", "params", "both"), help="which tensors get tangents")
    group.add_argument("--seed", type=int, default=0, help="seed of the random tangents (default 0)")
    group.add_argument("--no-hvp", action="store_true", help="skip forward-over-reverse (the backward pass, the HVP)")
    group.add_argument("--no-baseline", action="store_true", help="do not try PyTorch alone")
    group.add_argument("--progress", action="store_true", help="show progress on stderr even if not a terminal")


def load_callable(spec: str) -> Callable[..., Any]:
    """``package.module:name`` or ``path/to/file.py:name`` (``name`` may be dotted) -> the object."""
    location, sep, name = spec.rpartition(":")
    if not sep or not location or not name:
        raise UsageError(f"--model expects MODULE:CALLABLE or FILE.py:CALLABLE, got {spec!r}")
    if location.endswith(".py") or "/" in location or os.sep in location:
        path = os.path.abspath(location)
        if not os.path.isfile(path):
            raise UsageError(f"--model: no such file {location!r}")
        module_name = "_fwdecomp_audit_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise UsageError(f"--model: cannot import {location!r}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        sys.path.insert(0, os.path.dirname(path))  # so the file can import its neighbours
        loader_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(location)
        except ImportError as error:
            raise UsageError(f"--model: cannot import {location!r}: {error}") from error
    value: Any = module
    for part in name.split("."):
        if not hasattr(value, part):
            raise UsageError(f"--model: {location!r} has no attribute {name!r}")
        value = getattr(value, part)
    if not callable(value):
        raise UsageError(f"--model: {spec!r} is not callable")
    return value


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8,16"``, ``"8x16"`` or ``"8 16"`` -> ``(8, 16)``; ``""`` is a 0-dimensional input."""
    parts = [p for p in re.split(r"[,x\s]+", text.strip().strip("()[]")) if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError as error:
        raise UsageError(f"--input-shape: {text!r} is not a shape like 8,16") from error
    if any(size < 0 for size in shape):
        raise UsageError(f"--input-shape: {text!r} has a negative size")
    return shape


def build(args: argparse.Namespace) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """The model and its example inputs, from ``--model``, ``--input-shape``, ``--dtype`` and ``--device``."""
    factory = load_callable(args.model)
    built = factory()
    if isinstance(built, (tuple, list)) and len(built) in (2, 3) and callable(built[0]):
        if args.input_shape:
            raise UsageError(f"{args.model} returns the model and its inputs: drop --input-shape")
        model, inputs = built[0], built[1]
        kwargs = dict(built[2]) if len(built) == 3 else {}
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    elif callable(built):
        if not args.input_shape:
            raise UsageError(f"{args.model} returns only the model: give --input-shape for each input")
        model, kwargs = built, {}
        generator = torch.Generator().manual_seed(args.seed)
        inputs = tuple(torch.randn(parse_shape(text), generator=generator) for text in args.input_shape)
    else:
        raise UsageError(
            f"{args.model} returned {type(built).__name__}; it must return a model (a function or an nn.Module) "
            "or (model, args) or (model, args, kwargs)"
        )
    dtype = _DTYPES[args.dtype] if args.dtype else None
    if isinstance(model, torch.nn.Module):
        model = model.to(device=args.device, dtype=dtype) if (args.device or dtype) else model

    def move(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        return value.to(args.device) if args.device else value

    return model, tuple(move(v) for v in inputs), {k: move(v) for k, v in kwargs.items()}


class Progress:
    """One status line on ``stream``, rewritten in place on a terminal, one line per stage otherwise."""

    def __init__(self, stream: TextIO, live: bool) -> None:
        self.stream, self.live, self.start = stream, live, time.perf_counter()

    def __call__(self, message: str) -> None:
        line = f"fwdecomp audit [{time.perf_counter() - self.start:5.1f}s] {message}"
        self.stream.write(f"\r\033[K{line}" if self.live else f"{line}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()


@audit_view(
    "model",
    help="audit forward AD through a model: CALLABLE returns the model, or (model, args[, kwargs])",
    configure=_configure,
    metavar="MODULE:CALLABLE",
)
def run(args: argparse.Namespace) -> int:
    from fwdecomp.model_audit import audit

    try:
        model, inputs, kwargs = build(args)
    except UsageError as error:
        print(f"fwdecomp audit: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        print(f"fwdecomp audit: building {args.model} raised {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    terminal = sys.stderr.isatty()
    progress = Progress(sys.stderr, live=terminal) if (terminal or args.progress) else None
    try:
        report = audit(
            model,
            *inputs,
            wrt=args.wrt,
            hvp=not args.no_hvp,
            check=not args.no_check,
            baseline=not args.no_baseline,
            seed=args.seed,
            progress=progress,
            example_kwargs=kwargs,
        )
    except ValueError as error:  # nothing to differentiate, a wrong --wrt
        print(error, file=sys.stderr)
        return 2
    finally:
        if progress is not None:
            progress.close()
    if args.format == "json":
        print(json.dumps(report.to_json(), indent=2))
    elif args.format == "markdown":
        print(report.to_markdown())
    else:
        print(report)
    return 0 if report.ok else 1
