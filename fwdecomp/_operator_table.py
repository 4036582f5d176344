"""A table of entries keyed by operator overload, shared by the decomposition and JVP-rule registries.

Each entry is found by its ``OpOverload`` and by its schema (name, overload
name), the key the dispatcher hands the interface. Listeners hear of every
operator whose entry appears or goes (the autograd side installs and removes
its kernels that way); :meth:`OperatorTable.snapshot` / :meth:`OperatorTable.restore`
let tests and temporary overrides put a table back exactly.

Example:
    >>> import torch
    >>> from fwdecomp._operator_table import OperatorTable
    >>> table = OperatorTable()
    >>> table.subscribe(lambda event, op: print(event, op))
    >>> table.put({torch.ops.aten.cholesky.default: "entry"})
    register aten.cholesky.default
    >>> table.get_schema(torch.ops.aten.cholesky.default._schema)
    'entry'
    >>> table.remove(torch.ops.aten.cholesky.default)
    unregister aten.cholesky.default
    True
"""

from __future__ import annotations

import threading
from typing import Callable, Generic, TypeVar

import torch

from fwdecomp._torch import OpOverload, qualified_name, schema_of

__all__ = ["Listener", "OperatorTable"]

E = TypeVar("E")
Listener = Callable[[str, OpOverload], None]


_keys: dict[int, tuple[torch.FunctionSchema, tuple[str, str]]] = {}


def _schema_key(schema: torch.FunctionSchema) -> tuple[str, str]:
    """``(name, overload name)``, remembered per schema object (each read goes through pybind)."""
    cached = _keys.get(id(schema))
    if cached is None or cached[0] is not schema:
        cached = _keys[id(schema)] = (schema, (schema.name, schema.overload_name))
    return cached[1]


class OperatorTable(Generic[E]):
    """Entries by operator overload and by schema, thread-safe, with change listeners.

    ``lock`` is reentrant; hold it around a check-then-:meth:`put` that must be atomic.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._entries: dict[OpOverload, E] = {}
        self._by_schema: dict[tuple[str, str], E] = {}
        self._listeners: list[Listener] = []
        self._version = 0  # bumped by every change: invalidates find()'s cache
        self._found: dict[OpOverload, tuple[int, E | None]] = {}

    def _notify(self, event: str, op: OpOverload) -> None:
        for listener in list(self._listeners):
            listener(event, op)

    def _store(self, op: OpOverload, entry: E) -> None:
        self._version += 1
        self._entries[op] = entry
        self._by_schema[_schema_key(schema_of(op))] = entry

    def get(self, op: OpOverload) -> E | None:
        """The entry of ``op``, or ``None``."""
        return self._entries.get(op)

    def get_schema(self, schema: torch.FunctionSchema) -> E | None:
        """The entry of the operator with this schema, or ``None``."""
        return self._by_schema.get(_schema_key(schema))

    def find(self, op: OpOverload) -> E | None:
        """The entry a call of ``op`` uses: ``op``'s own, else the one of its schema, else ``None``.

        Remembered per operator until the table changes (the lookup by schema reads the
        schema's name through pybind: it costs more than the call's other bookkeeping).
        """
        version = self._version
        cached = self._found.get(op)
        if cached is not None and cached[0] == version:
            return cached[1]
        entry = self._entries.get(op)
        if entry is None:
            entry = self.get_schema(schema_of(op))
        self._found[op] = (version, entry)
        return entry

    def operators(self) -> list[OpOverload]:
        """Every operator overload with an entry, sorted by name."""
        with self.lock:
            return sorted(self._entries, key=qualified_name)

    def put(self, entries: dict[OpOverload, E]) -> None:
        """Store every entry, then tell the listeners of each (``"register"``)."""
        with self.lock:
            for op, entry in entries.items():
                self._store(op, entry)
            for op in entries:
                self._notify("register", op)

    def remove(self, op: OpOverload) -> bool:
        """Drop the entry of ``op`` and tell the listeners (``"unregister"``); ``False`` if it had none."""
        with self.lock:
            if self._entries.pop(op, None) is None:
                return False
            self._version += 1
            self._by_schema.pop(_schema_key(schema_of(op)), None)
            self._notify("unregister", op)
            return True

    def snapshot(self) -> dict[OpOverload, E]:
        """A copy of the whole table, for :meth:`restore`."""
        with self.lock:
            return dict(self._entries)

    def restore(self, saved: dict[OpOverload, E]) -> None:
        """Make the table exactly ``saved`` again; listeners hear of every operator that changed."""
        with self.lock:
            changed = [op for op in set(self._entries) | set(saved) if self._entries.get(op) is not saved.get(op)]
            self._version += 1
            self._entries.clear()
            self._by_schema.clear()
            for op, entry in saved.items():
                self._store(op, entry)
            for op in changed:
                self._notify("register" if op in saved else "unregister", op)

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(event, op)`` with event ``"register"`` or ``"unregister"``."""
        self._listeners.append(listener)
