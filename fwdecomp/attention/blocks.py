"""Block sizes of the blockwise attention JVP: chosen from the shapes, overridable.

The kernel walks the ``L x S`` score matrix of every head in blocks of
``query`` rows by ``key`` columns; one block of scores (and of its tangent)
for all heads at once is the largest thing it holds. By default the blocks
are sized so that one block holds at most ``budget`` elements over all
heads (by default ``2**19``, 2 MiB in float32, on CPU, where blocks that stay
in cache are fastest, and ``2**24``, 64 MiB, on GPUs and other accelerators,
where fewer, larger blocks save kernel launches): ``key`` is the key length up to 1024,
``query`` fills the rest of the budget (at least 16 rows); causal and windowed
attention use square blocks (so that blocks outside the band are skipped). Peak extra memory
is then a few blocks plus a few tensors of the inputs' size: O(N·d), not
O(N²).

Override them for a region of code, or for the whole process:

Example:
    >>> from fwdecomp.attention import blocks
    >>> blocks.choose(batch_heads=4, query_len=4096, key_len=4096)
    (128, 1024)
    >>> with blocks.block_sizes(query=128, key=512):
    ...     blocks.choose(batch_heads=4, query_len=4096, key_len=4096)
    (128, 512)
    >>> with blocks.block_sizes(budget=2**18):
    ...     blocks.choose(batch_heads=4, query_len=4096, key_len=4096)
    (64, 1024)
    >>> blocks.choose(batch_heads=4, query_len=4096, key_len=4096, banded=True)  # causal: skip hidden blocks
    (256, 256)
    >>> blocks.choose(batch_heads=4, query_len=4096, key_len=4096, device="cuda")  # larger blocks on a GPU
    (4096, 1024)
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, replace
from typing import Iterator

import torch

__all__ = ["BlockConfig", "block_sizes", "choose", "default_budget", "get_config", "set_block_sizes"]

DEFAULT_BUDGET = 2**19  # CPU
ACCELERATOR_BUDGET = 2**24  # CUDA and other accelerators
MAX_KEY_BLOCK = 1024
MIN_QUERY_BLOCK = 16
MIN_KEY_BLOCK = 128


@dataclass(frozen=True)
class BlockConfig:
    """``query`` / ``key``: fixed block sizes; ``budget``: score elements per block (``None``: automatic)."""

    query: int | None = None
    key: int | None = None
    budget: int | None = None


class _State(threading.local):
    def __init__(self) -> None:
        self.config = _global


_global = BlockConfig()
_state = _State()


def _validate(query: int | None, key: int | None, budget: int | None) -> None:
    for name, value in (("query", query), ("key", key), ("budget", budget)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"fwdecomp attention block sizes: {name} must be a positive int or None, got {value!r}")


def get_config() -> BlockConfig:
    """The block configuration in force in this thread."""
    return _state.config


def set_block_sizes(query: int | None = None, key: int | None = None, budget: int | None = None) -> BlockConfig:
    """Set the process-wide block configuration (``None`` fields: automatic / default); returns the old one."""
    global _global
    _validate(query, key, budget)
    previous = _global
    _global = BlockConfig(query, key, budget)
    _state.config = _global
    return previous


@contextlib.contextmanager
def block_sizes(query: int | None = None, key: int | None = None, budget: int | None = None) -> Iterator[BlockConfig]:
    """Use these block sizes inside a ``with`` block (this thread only); unset fields keep the current ones."""
    _validate(query, key, budget)
    previous = _state.config
    config = replace(
        previous,
        query=previous.query if query is None else query,
        key=previous.key if key is None else key,
        budget=previous.budget if budget is None else budget,
    )
    _state.config = config
    try:
        yield config
    finally:
        _state.config = previous


def default_budget(device: torch.device | str | None = None) -> int:
    """Score elements per block when none is set: :data:`DEFAULT_BUDGET` on CPU, else :data:`ACCELERATOR_BUDGET`."""
    kind = "cpu" if device is None else torch.device(device).type
    return DEFAULT_BUDGET if kind in ("cpu", "meta") else ACCELERATOR_BUDGET


def choose(
    batch_heads: int,
    query_len: int,
    key_len: int,
    config: BlockConfig | None = None,
    banded: bool = False,
    device: torch.device | str | None = None,
) -> tuple[int, int]:
    """``(query_block, key_block)`` for ``batch_heads`` heads of ``query_len x key_len`` scores on ``device``.

    ``banded`` (causal or windowed attention): square blocks holding half the
    budget, so that whole blocks outside the band are skipped.
    """
    config = get_config() if config is None else config
    budget = config.budget or default_budget(device)
    batch_heads = max(batch_heads, 1)
    if banded and config.query is None and config.key is None:
        side = math.isqrt(budget // (2 * batch_heads))
        side = max(64, min(MAX_KEY_BLOCK, side - side % MIN_QUERY_BLOCK))
        return max(1, min(side, query_len)), max(1, min(side, key_len))
    key = config.key or min(key_len, MAX_KEY_BLOCK)
    if config.key is None and batch_heads * MIN_QUERY_BLOCK * key > budget:
        key = max(MIN_KEY_BLOCK, budget // (batch_heads * MIN_QUERY_BLOCK))
    key = max(1, min(key, key_len))
    query = config.query
    if query is None:
        query = max(MIN_QUERY_BLOCK, budget // (batch_heads * key))
        if query < query_len:
            query = max(MIN_QUERY_BLOCK, query - query % MIN_QUERY_BLOCK)
    return max(1, min(query, query_len)), key
