"""Naming operators: turn what a user writes into the operator overloads it means.

A user may name an operator as an ``OpOverload`` (``torch.ops.aten.cdist.default``),
an ``OpOverloadPacket`` (``torch.ops.aten.cdist``, meaning all its overloads)
or a string, ``"ns::name"`` (the default overload, as in ``torch.library``) or
``"ns::name.overload"``.

Example:
    >>> from fwdecomp.overloads import resolve
    >>> [str(op) for op in resolve("aten::_cdist_forward")]
    ['aten._cdist_forward.default']
"""

from __future__ import annotations

import difflib

import torch

from fwdecomp._torch import OpOverload, OpOverloadPacket, all_operator_names

OperatorLike = OpOverload | OpOverloadPacket | str

__all__ = ["OperatorLike", "UnknownOperatorError", "resolve", "resolve_one"]


class UnknownOperatorError(LookupError):
    """The named operator does not exist in the dispatcher."""


def _suggest(qualname: str) -> str:
    base = qualname.split(".", 1)[0]
    close = difflib.get_close_matches(base, all_operator_names(), n=3, cutoff=0.75)
    return f" Did you mean {', '.join(close)}?" if close else ""


def _unknown(text: str, why: str = "") -> UnknownOperatorError:
    return UnknownOperatorError(
        f"fwdecomp: unknown operator {text!r}{why}.{_suggest(text)} Name operators as "
        "'ns::name' or 'ns::name.overload' (the parts of torch.ops.<ns>.<name>.<overload>), "
        "or pass the OpOverload itself; a custom operator must be defined "
        "(torch.library.custom_op / Library.define) before it is named here."
    )


def _from_string(text: str) -> list[OpOverload]:
    if "::" not in text:
        raise _unknown(text, " (no namespace: write 'aten::name')")
    ns, rest = text.split("::", 1)
    name, _, overload = rest.partition(".")
    if not ns or not name:
        raise _unknown(text)
    try:
        packet = getattr(getattr(torch.ops, ns), name)
    except (AttributeError, RuntimeError) as error:
        raise _unknown(text) from error
    if not isinstance(packet, OpOverloadPacket):
        raise _unknown(text, " (not an operator)")
    overload = overload or "default"
    try:
        return [getattr(packet, overload)]
    except (AttributeError, RuntimeError) as error:
        known = ", ".join(packet.overloads())
        raise UnknownOperatorError(
            f"fwdecomp: operator {ns}::{name} has no overload {overload!r}; its overloads are: {known}."
        ) from error


def _from_packet(packet: OpOverloadPacket) -> list[OpOverload]:
    return [getattr(packet, name) for name in packet.overloads()]


def resolve(op: OperatorLike) -> list[OpOverload]:
    """All operator overloads that ``op`` names (one for an overload, all for a packet)."""
    if isinstance(op, OpOverload):
        return [op]
    if isinstance(op, OpOverloadPacket):
        return _from_packet(op)
    if isinstance(op, str):
        return _from_string(op)
    raise TypeError(
        f"fwdecomp: expected an operator (OpOverload, OpOverloadPacket or 'ns::name[.overload]'), "
        f"got {type(op).__name__}: {op!r}. A Python function such as torch.cdist is not an "
        "operator: name the aten operator it calls, e.g. torch.ops.aten._cdist_forward."
    )


def resolve_one(op: OperatorLike) -> OpOverload:
    """The single overload ``op`` names; a packet or bare name must have exactly one."""
    overloads = resolve(op)
    if len(overloads) != 1:
        names = ", ".join(str(o) for o in overloads)
        raise ValueError(f"fwdecomp: {op!r} names {len(overloads)} overloads ({names}); name one.")
    return overloads[0]
