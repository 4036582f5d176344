"""Attention: the fused scaled-dot-product attention kernels.

``F.scaled_dot_product_attention`` on CPU runs
``aten::_scaled_dot_product_flash_attention_for_cpu`` for float32 (and
float64, bfloat16, float16) inputs; it has no forward formula. Its
decomposition computes the same two outputs, the attention output and the
log-sum-exp of the scaled, masked scores, from operators that have formulas.
The backward operator is decomposed too, for forward-over-reverse.

Conventions (those of PyTorch's kernel): ``is_causal`` masks with a top-left
aligned lower triangle; ``attn_mask`` is additive and differentiated (a mask
that requires grad makes ``F.scaled_dot_product_attention`` take its math path,
which differentiates it; a mask carrying a forward tangent reaches this kernel,
so the decomposition must too); a query row that sees no key
gives output 0 and log-sum-exp 0; grouped-query attention repeats each key and
value head for ``Hq / Hkv`` consecutive query heads; reduced-precision inputs are
computed in float32 and the log-sum-exp stays float32.

Example:
    >>> import torch, torch.nn.functional as F, fwdecomp
    >>> q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    >>> with fwdecomp.enabled():
    ...     out, tangent = torch.func.jvp(
    ...         lambda q: F.scaled_dot_product_attention(q, k, v, is_causal=True), (q,), (torch.ones_like(q),))
    >>> tangent.shape
    torch.Size([1, 2, 8, 4])
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from fwdecomp.decompositions import builtin
from fwdecomp.registry import Sample

aten = torch.ops.aten

__all__ = ["flash_attention_for_cpu", "flash_attention_for_cpu_backward", "masked_scores"]

_REDUCED = (torch.float16, torch.bfloat16)


def _check_no_dropout(dropout_p: float, name: str) -> None:
    if dropout_p > 0:
        raise NotImplementedError(
            f"{name} with dropout_p={dropout_p} and forward-AD tangents: the kernel's random "
            "dropout mask cannot be reproduced, so no tangent would match its output. Use "
            "dropout_p=0 (e.g. model.eval()) for JVPs, or apply dropout outside attention."
        )


def _repeat_heads(tensor: torch.Tensor, query_heads: int) -> torch.Tensor:
    heads = tensor.shape[-3]
    if heads == query_heads or heads == 1:
        return tensor
    return tensor.repeat_interleave(query_heads // heads, dim=-3)


def _fold_heads(grad: torch.Tensor, heads: int) -> torch.Tensor:
    """Sum a gradient over the query heads that shared each key/value head."""
    query_heads = grad.shape[-3]
    if heads == query_heads:
        return grad
    if heads == 1:
        return grad.sum(-3, keepdim=True)
    shape = (*grad.shape[:-3], heads, query_heads // heads, *grad.shape[-2:])
    return grad.reshape(shape).sum(-3)


def masked_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    is_causal: bool,
    attn_mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """``query @ key^T * scale`` plus the additive mask, causal positions set to ``-inf``."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query @ _repeat_heads(key, query.shape[-3]).mT) * scale
    if is_causal:
        rows, cols = scores.shape[-2:]
        visible = torch.ones(rows, cols, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    if attn_mask is not None:
        scores = scores + attn_mask.to(scores.dtype)
    return scores


def _log_sum_exp(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise log-sum-exp, 0 (with no NaN anywhere) for rows whose scores are all ``-inf``."""
    dead = (scores.detach() == float("-inf")).all(-1, keepdim=True)
    lse = torch.logsumexp(torch.where(dead, 0, scores), -1, keepdim=True)
    return torch.where(dead, 0, lse), dead


def _attention_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, dtype=dtype, device=device, generator=gen)

    q, k, v = randn(2, 3, 5, 4), randn(2, 3, 7, 4), randn(2, 3, 7, 4)
    yield Sample((q, k, v, 0.0, False), note="plain")
    yield Sample((q, k, v, 0.0, True), note="causal")
    yield Sample((randn(1, 2, 9, 4), randn(1, 2, 6, 4), randn(1, 2, 6, 4), 0.0, True), note="causal, L > S")
    yield Sample((q, k, v, 0.0, False), {"attn_mask": randn(5, 7)}, note="additive mask")
    yield Sample((q, k, v, 0.0, False), {"attn_mask": randn(2, 1, 5, 7), "scale": 0.3}, note="broadcast mask, scale")
    blocked = torch.zeros(5, 7, dtype=dtype, device=device)
    blocked[1] = float("-inf")
    yield Sample((q, k, v, 0.0, False), {"attn_mask": blocked}, note="a fully masked row")
    yield Sample((randn(1, 4, 5, 8), randn(1, 2, 7, 8), randn(1, 2, 7, 8), 0.0, False), note="grouped-query heads")
    layout = randn(2, 5, 3, 4).transpose(1, 2)
    yield Sample((layout, k, v, 0.0, False), note="non-contiguous query")
    # No zero-length samples: PyTorch's CPU flash kernel dies with SIGFPE on them (2.13).


@builtin(
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    samples=_attention_samples,
    dtypes=(torch.float64, torch.float32),
)
def flash_attention_for_cpu(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and the log-sum-exp of its scores, as the CPU flash kernel returns them."""
    _check_no_dropout(dropout_p, "_scaled_dot_product_flash_attention_for_cpu")
    out_dtype = query.dtype
    if out_dtype in _REDUCED:
        query, key, value = query.float(), key.float(), value.float()
    scores = masked_scores(query, key, is_causal, attn_mask, scale)
    lse, _ = _log_sum_exp(scores)
    probs = torch.exp(scores - lse)
    out = probs @ _repeat_heads(value, query.shape[-3])
    return out.to(out_dtype), lse.squeeze(-1)


def _attention_backward_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    gen = torch.Generator(device=device).manual_seed(1)
    for sample in _attention_samples(device, dtype):
        q, k, v, dropout_p, is_causal = sample.args
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, **sample.kwargs)
        grad = torch.randn(out.shape, dtype=dtype, device=device, generator=gen)
        yield Sample((grad, q, k, v, out, lse, dropout_p, is_causal), dict(sample.kwargs), note=sample.note)


@builtin(
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
    samples=_attention_backward_samples,
)
def flash_attention_for_cpu_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    logsumexp: torch.Tensor,
    dropout_p: float,
    is_causal: bool,
    *,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the CPU flash kernel's output with respect to query, key and value."""
    _check_no_dropout(dropout_p, "_scaled_dot_product_flash_attention_for_cpu_backward")
    dtypes = (query.dtype, key.dtype, value.dtype)
    if query.dtype in _REDUCED:
        grad_out, query, key, value, out = (t.float() for t in (grad_out, query, key, value, out))
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = masked_scores(query, key, is_causal, attn_mask, scale)
    probs = torch.exp(scores - logsumexp.unsqueeze(-1).to(scores.dtype))
    heads = query.shape[-3]
    grad_value = probs.mT @ grad_out
    grad_probs = grad_out @ _repeat_heads(value, heads).mT
    row_dot = (grad_out * out).sum(-1, keepdim=True)
    grad_scores = probs * (grad_probs - row_dot)
    grad_query = (grad_scores @ _repeat_heads(key, heads)) * scale
    grad_key = (grad_scores.mT @ query) * scale
    return (
        grad_query.to(dtypes[0]),
        _fold_heads(grad_key, key.shape[-3]).to(dtypes[1]),
        _fold_heads(grad_value, value.shape[-3]).to(dtypes[2]),
    )
