"""Evidence of whether the running PyTorch has a forward-AD formula for an operator.

PyTorch generates its autograd kernels from ``derivatives.yaml`` and ships
that file with every build (``torchgen/packaged/autograd/derivatives.yaml``).
An operator has a native forward formula when its entry defines one for its
outputs (``result: ...``, or a named output), or when one of its formulas is
``auto_element_wise`` / ``auto_linear`` (the code generator derives the
forward formula from those). Operators that are CompositeImplicitAutograd
need none: autograd sees the operators they call. A few more (layer and batch
norm backward) PyTorch decomposes for forward AD itself, with its C++ "JIT
decomposition" mechanism; its table is read too.

This is read from the file, never by calling the operator: an in-place
operator mutates its input before PyTorch raises "not implemented".

Example:
    >>> import torch
    >>> from fwdecomp.formulas import native_forward_formula
    >>> native_forward_formula(torch.ops.aten.cholesky.default).status
    'missing'
    >>> native_forward_formula(torch.ops.aten.mul.Tensor).status
    'native'
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal

from fwdecomp._torch import (
    OpOverload,
    derivatives_yaml_path,
    is_composite_implicit,
    jvp_decomposed_operators,
    namespace,
    schema_of,
)

__all__ = ["FormulaStatus", "NativeFormula", "native_forward_formula", "derivative_entries"]

FormulaStatus = Literal["native", "missing", "unknown"]

_AUTO_FORWARD = ("auto_element_wise", "auto_linear")
_ENTRY = re.compile(r"^- name: ([A-Za-z0-9_]+)(?:\.([A-Za-z0-9_]+))?\((.*)$")
_KEY = re.compile(r"^( {2}| {6})([A-Za-z_][A-Za-z_0-9]*(?:, *[A-Za-z_][A-Za-z_0-9]*)*): ?(.*)$")
_SECTION = re.compile(r"^ {4}([A-Za-z]+):\s*$")


@dataclass(frozen=True)
class NativeFormula:
    """Whether PyTorch differentiates ``op`` in forward mode on its own, and why we think so."""

    status: FormulaStatus
    reason: str


@dataclass
class _Entry:
    name: str
    overload: str
    signature: str
    formulas: dict[str, str]
    output_differentiability: str | None


def _parse(text: str) -> dict[tuple[str, str], _Entry]:
    entries: dict[tuple[str, str], _Entry] = {}
    entry: _Entry | None = None
    section = "Default"
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _ENTRY.match(line)
        if match:
            entry = _Entry(match[1], match[2] or "", match[3], {}, None)
            entries[(entry.name, entry.overload)] = entry
            section = "Default"
            continue
        if entry is None:
            continue
        section_match = _SECTION.match(line)
        if section_match:
            section = section_match[1]
            continue
        key_match = _KEY.match(line)
        if not key_match:
            continue  # continuation of a multi-line formula
        indent, key, value = key_match[1], key_match[2], key_match[3].strip()
        if len(indent) == 2:
            section = "Default"
            if key == "output_differentiability":
                entry.output_differentiability = value
                continue
            if key == "dispatch":
                continue
        if section != "Default":
            continue
        entry.formulas[key] = value
    return entries


@functools.lru_cache(maxsize=1)
def _jvp_decomposed() -> frozenset[OpOverload]:
    return jvp_decomposed_operators()


@functools.lru_cache(maxsize=1)
def derivative_entries() -> dict[tuple[str, str], _Entry] | None:
    """The parsed ``derivatives.yaml`` of the running PyTorch, or ``None`` if not shipped."""
    path = derivatives_yaml_path()
    if path is None:
        return None
    with open(path, encoding="utf-8") as handle:
        return _parse(handle.read())


def _find(entries: dict[tuple[str, str], _Entry], name: str, overload: str) -> _Entry | None:
    entry = entries.get((name, overload))
    if entry is None and name.endswith("_") and not name.endswith("__"):
        entry = entries.get((name[:-1], overload))  # in-place shares the functional formula
    return entry


def _judge(entry: _Entry, return_names: set[str]) -> NativeFormula:
    differentiability = entry.output_differentiability
    if differentiability and "False" in differentiability and "True" not in differentiability:
        return NativeFormula("native", "no output is differentiable")
    outputs = return_names | {"result"} | {f"result{i}" for i in range(8)}
    backward_args: list[str] = []
    for key, formula in entry.formulas.items():
        names = [n.strip() for n in key.split(",")]
        if all(n in outputs for n in names):
            return NativeFormula("native", f"derivatives.yaml defines '{key}: ...'")
        if formula in _AUTO_FORWARD:
            return NativeFormula("native", f"derivatives.yaml uses {formula}")
        if formula != "non_differentiable":
            backward_args.extend(names)
    if not backward_args:
        return NativeFormula("native", "no argument is differentiable")
    return NativeFormula("missing", "derivatives.yaml has a backward formula but no forward formula")


def native_forward_formula(op: OpOverload) -> NativeFormula:
    """Whether the running PyTorch has a forward-AD formula for ``op``.

    ``status`` is ``"native"``, ``"missing"`` or ``"unknown"`` (no evidence
    either way: derivatives.yaml not shipped, or the operator is not in it).
    Operators outside the ``aten`` namespace never have one (unless they are
    CompositeImplicitAutograd: autograd then sees the operators they call).
    """
    if is_composite_implicit(op):
        return NativeFormula("native", "CompositeImplicitAutograd: autograd sees its parts")
    if namespace(op) != "aten":
        return NativeFormula("missing", "custom operators have no forward-AD formula")
    if op in _jvp_decomposed():
        return NativeFormula("native", "PyTorch decomposes it for forward AD itself (JIT decomposition)")
    entries = derivative_entries()
    if entries is None:
        return NativeFormula("unknown", "this PyTorch build ships no derivatives.yaml")
    schema = schema_of(op)
    name = schema.name.split("::", 1)[1]
    entry = _find(entries, name, schema.overload_name)
    if entry is None:
        return NativeFormula("unknown", "not in derivatives.yaml")
    return _judge(entry, {r.name for r in schema.returns if r.name})
