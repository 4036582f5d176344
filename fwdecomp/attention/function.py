"""The attention JVP as a function of primals and tangents, with an O(N·d) reverse mode.

:func:`attention_jvp` takes the primals ``(query, key, value)`` and their
tangents explicitly (JAX style) and returns the outputs ``(out, lse)`` and
their tangents, computed together block by block (see
:mod:`fwdecomp.attention.kernel`). It runs through :class:`BlockwiseAttentionJVP`,
a ``torch.autograd.Function`` whose backward recomputes the blocks, so a loss
of the JVP's outputs (consistency / flow-map training) backpropagates in
O(N·d) memory too. The Function composes with ``torch.func``: ``vmap`` through
a generated rule, forward AD over it (its ``jvp`` runs ``torch.func.jvp`` over
the differentiable kernel), reverse mode over its backward.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from fwdecomp.attention import attention_jvp
    >>> q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.float64) for _ in range(3))
    >>> dq = torch.randn_like(q)
    >>> (out, lse), (dout, dlse) = attention_jvp((q, k, v), (dq, None, None), is_causal=True)
    >>> with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # PyTorch's O(N^2) route
    ...     ref, ref_t = torch.func.jvp(lambda q: F.scaled_dot_product_attention(q, k, v, is_causal=True), (q,), (dq,))
    >>> torch.allclose(out, ref) and torch.allclose(dout, ref_t)
    True
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Sequence

import torch

from fwdecomp._torch import (
    forward_ad_level,
    forward_grad_is_enabled,
    functorch_transforms_active,
    make_dual,
    tangent_of,
)
from fwdecomp.attention import blocks, kernel
from fwdecomp.attention.kernel import Spec

__all__ = ["BlockwiseAttentionJVP", "attention_jvp", "canonical_mask"]

Tensor = torch.Tensor
_REDUCED = (torch.float16, torch.bfloat16)


class BlockwiseAttentionJVP(torch.autograd.Function):
    """``(q, k, v, mask, dq, dk, dv, dmask) -> (o, lse, do, dl)`` in the kernel's layout.

    Forward: :func:`fwdecomp.attention.kernel.forward`. Backward:
    :func:`fwdecomp.attention.kernel.backward` (block recomputation, O(N·d)).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, mask, dq, dk, dv, dmask, spec):  # type: ignore[override]
        return kernel.forward(q, k, v, mask, dq, dk, dv, dmask, spec)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        q, k, v, mask, dq, dk, dv, dmask, spec = inputs
        o, lse, do, dl = output
        ctx.spec = spec
        ctx.level = forward_ad_level()  # the forward-AD level whose tangents dq, dk, dv are
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, mask, dq, dk, dv, dmask, o, lse, do, dl)
        ctx.save_for_forward(q, k, v, mask, dq, dk, dv, dmask)

    @staticmethod
    def backward(ctx: Any, go, gl, gdo, gdl):  # type: ignore[override]
        q, k, v, mask, dq, dk, dv, dmask, o, lse, do, dl = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:8])
        if not any(needs) or (go is None and gl is None and gdo is None and gdl is None):
            return (None,) * 9
        if _differentiated_in_forward_mode(ctx.level):
            # Forward-over-reverse in the forward-AD level that split the tangents off (a Hessian-
            # vector product with forward_ad, gradgradcheck): the gradient's tangent is the
            # backward differentiated along those tangents, so the backward runs on the saved
            # values carrying them again (q with dq, the outputs with theirs); every operator of
            # the blockwise backward has a forward formula.
            q, k, v, mask, o, lse = (
                _with_tangent(x, t) for x, t in ((q, dq), (k, dk), (v, dv), (mask, dmask), (o, do), (lse, dl))
            )
        grads = kernel.backward(
            q, k, v, mask, dq, dk, dv, dmask, o, lse, do, dl, go, gl, gdo, gdl, ctx.spec, needs=needs
        )
        return (*grads, None)

    @staticmethod
    def jvp(ctx: Any, tq, tk, tv, tmask, tdq, tdk, tdv, tdmask, tspec):  # type: ignore[override]
        # Forward AD over the JVP (e.g. an outer torch.func.jvp): differentiate the
        # kernel itself, whose operators all have forward formulas (memory O(N·d)).
        primals = list(ctx.saved_tensors)
        tangents = [tq, tk, tv, tmask, tdq, tdk, tdv, tdmask]
        spec = ctx.spec
        positions = [
            i
            for i, (p, t) in enumerate(zip(primals, tangents))
            if p is not None and t is not None and p.is_floating_point()
        ]

        def f(*values: Tensor) -> tuple[Tensor, ...]:
            args = list(primals)
            for i, value in zip(positions, values):
                args[i] = value
            return kernel.forward(*args, spec)

        _, out_tangents = torch.func.jvp(f, tuple(primals[i] for i in positions), tuple(tangents[i] for i in positions))
        return out_tangents


def _differentiated_in_forward_mode(level: int) -> bool:
    """Whether a backward running now is itself differentiated in forward mode at ``level``:
    that level is still open, forward grad is on and the backward builds a graph
    (``create_graph=True``: a plain ``.backward()`` inside the level skips the extra work)."""
    return level >= 0 and forward_ad_level() == level and forward_grad_is_enabled() and torch.is_grad_enabled()


# ``torch.autograd.Function.apply`` binds the arguments to ``forward``'s signature on every call
# when ``setup_context`` is defined, through ``inspect.signature`` (~20 µs a call, a tenth of a small
# attention JVP). ``inspect.signature`` returns a function's ``__signature__`` when it has one: the
# signature is computed once here.
BlockwiseAttentionJVP.forward.__signature__ = inspect.signature(BlockwiseAttentionJVP.forward)  # type: ignore[attr-defined]


def _with_tangent(value: Tensor | None, tangent: Tensor | None) -> Tensor | None:
    if value is None or tangent is None or not value.is_floating_point() or tangent_of(value) is not None:
        return value
    return make_dual(value, tangent)


def canonical_mask(mask: Tensor, query_heads: int, kv_heads: int) -> Tensor:
    """A mask broadcastable to ``(B, Hq, L, S)`` as a 5-d view broadcastable to ``(B, Hkv, G, L, S)``."""
    if mask.dim() > 4:
        raise ValueError(f"attn_mask must have at most 4 dimensions (B, H, L, S), got shape {tuple(mask.shape)}")
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    groups = query_heads // kv_heads
    if mask.shape[1] == 1:
        return mask.unsqueeze(2)
    if mask.shape[1] != query_heads:
        raise ValueError(
            f"attn_mask's head dimension ({mask.shape[1]}) must be 1 or the number of query heads ({query_heads})"
        )
    return mask.reshape(mask.shape[0], kv_heads, groups, *mask.shape[2:])


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _REDUCED else dtype


def _draw_seed() -> int:
    return int(torch.randint(0, 2**62, (1,)).item())


def attention_jvp(
    primals: Sequence[Tensor],
    tangents: Sequence[Tensor | None],
    *,
    attn_mask: Tensor | None = None,
    attn_mask_tangent: Tensor | None = None,
    is_causal: bool = False,
    causal_from: str = "top_left",
    window: tuple[int | None, int | None] = (None, None),
    scale: float | None = None,
    dropout_p: float = 0.0,
    dead_lse: float = 0.0,
    block_query: int | None = None,
    block_key: int | None = None,
    through_operators: bool = False,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Softmax attention and its JVP: ``((out, lse), (out_tangent, lse_tangent))``.

    ``primals = (query, key, value)`` with shapes ``(B, Hq, L, d)``,
    ``(B, Hkv, S, d)``, ``(B, Hkv, S, e)`` (``Hq`` a multiple of ``Hkv``:
    grouped-query attention); ``tangents`` the same, ``None`` for zero.
    ``attn_mask`` broadcasts to ``(B, Hq, L, S)``: boolean (``True`` = attend)
    or additive, with an optional tangent ``attn_mask_tangent``. ``is_causal``
    masks keys after the query, aligned to the ``"top_left"`` corner (PyTorch's
    SDPA) or the ``"bottom_right"`` one (FlashAttention); ``window = (left,
    right)`` keeps keys ``j`` with ``-left <= j - i - offset <= right``.
    ``dropout_p > 0`` drops attention weights with a keep mask fwdecomp draws
    (from the global generator) and regenerates in backward; the output and
    its tangent use the same mask. Reduced precision (float16, bfloat16) is
    computed in float32; ``lse`` is float32 then (float64 for float64 inputs).
    A query that sees no key gets output 0 and ``lse = dead_lse``.

    Block sizes: ``block_query`` / ``block_key``, else
    :func:`fwdecomp.attention.blocks.choose` (settable with
    :func:`fwdecomp.attention.block_sizes`).

    ``through_operators=True`` skips the ``autograd.Function`` and runs the
    kernel's differentiable operators directly (what happens anyway inside
    ``torch.func`` transforms); then tangents already carried by the primals
    flow through those operators by their own formulas.
    """
    query, key, value = primals
    dquery, dkey, dvalue = ((*tuple(tangents), None, None, None))[:3]
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            "fwdecomp attention_jvp: query, key and value must be 4-d (batch, heads, sequence, features); got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    batch, query_heads, length, features = query.shape
    kv_heads, key_length = key.shape[1], key.shape[2]
    if kv_heads == 0 or query_heads % kv_heads != 0 or value.shape[1] != kv_heads:
        raise ValueError(
            f"fwdecomp attention_jvp: the number of query heads ({query_heads}) must be a multiple of the "
            f"number of key/value heads ({kv_heads}, {value.shape[1]})"
        )
    groups = query_heads // kv_heads
    out_dtype = query.dtype
    dtype = _compute_dtype(out_dtype)

    def prepare(x: Tensor | None, grouped: bool) -> Tensor | None:
        if x is None:
            return None
        x = x.to(dtype)
        return x.reshape(batch, kv_heads, groups, length, x.shape[-1]) if grouped else x

    q, dq = prepare(query, True), prepare(dquery, True)
    k, dk, v, dv = prepare(key, False), prepare(dkey, False), prepare(value, False), prepare(dvalue, False)
    mask = dmask = None
    if attn_mask is not None:
        raw = attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(dtype)
        mask = canonical_mask(raw, query_heads, kv_heads)
        if attn_mask_tangent is not None and attn_mask.dtype != torch.bool:
            dmask = canonical_mask(attn_mask_tangent.to(dtype), query_heads, kv_heads)
    low, high = window
    if is_causal:
        offset = 0 if causal_from == "top_left" else key_length - length
        if causal_from not in ("top_left", "bottom_right"):
            raise ValueError(f"causal_from must be 'top_left' or 'bottom_right', got {causal_from!r}")
        high = offset if high is None else min(high + offset, offset)
        low = None if low is None else offset - low
    elif window != (None, None):
        offset = 0 if causal_from == "top_left" else key_length - length
        low = None if low is None else offset - low
        high = None if high is None else offset + high
    chosen_query, chosen_key = blocks.choose(
        batch * query_heads, length, key_length, banded=low is not None or high is not None, device=query.device
    )
    spec = Spec(
        scale=1.0 / math.sqrt(features) if scale is None else float(scale),
        band=(low, high),
        dropout_p=float(dropout_p),
        seed=_draw_seed() if dropout_p > 0 else 0,
        dead_lse=float(dead_lse),
        block_query=max(1, block_query or chosen_query),
        block_key=max(1, block_key or chosen_key),
    )
    if through_operators or functorch_transforms_active():
        # Inside a torch.func transform the Function cannot be applied from an autograd
        # kernel (functorch has excluded its own dispatch there): run the kernel's
        # differentiable operators directly. Forward mode stays O(N·d); a reverse pass
        # through it (torch.func.jvp + backward) keeps the blocks' intermediates.
        o, lse, do, dl = kernel.forward(q, k, v, mask, dq, dk, dv, dmask, spec)
    else:
        o, lse, do, dl = BlockwiseAttentionJVP.apply(q, k, v, mask, dq, dk, dv, dmask, spec)
    e = value.shape[-1]
    out = o.reshape(batch, query_heads, length, e).to(out_dtype)
    dout = do.reshape(batch, query_heads, length, e).to(out_dtype)
    return (out, lse.reshape(batch, query_heads, length)), (dout, dl.reshape(batch, query_heads, length))
