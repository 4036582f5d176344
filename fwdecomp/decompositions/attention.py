"""Attention: every fused scaled-dot-product attention kernel, at flash-attention memory.

``F.scaled_dot_product_attention`` runs a fused kernel: on CPU
``aten::_scaled_dot_product_flash_attention_for_cpu`` (float32/64, bfloat16,
float16), on CUDA the flash, memory-efficient or cuDNN kernels
(``_scaled_dot_product_flash_attention``, ``_scaled_dot_product_efficient_attention``,
``_scaled_dot_product_cudnn_attention``, and the lower-level
``_flash_attention_forward`` / ``_efficient_attention_forward``). None has a
forward formula. Each decomposition here computes *all* the operator's
outputs together with their tangents with :func:`fwdecomp.attention.attention_jvp`:
blockwise over queries and keys with an online softmax, so neither the score
matrix nor its tangent is ever whole (extra memory O(N·d), like the fused
kernels), and attaches the tangents to the outputs. Reverse mode through that
JVP recomputes blocks too (O(N·d)). The CPU backward operator is decomposed
blockwise for forward-over-reverse (Hessians).

Conventions, those of each kernel: ``is_causal`` is aligned to the top-left
corner for the CPU, efficient and cuDNN kernels and to the bottom-right
corner for the flash kernels (FlashAttention's rule; ``_efficient_attention_forward``
chooses with ``custom_mask_type`` 1 or 2); an additive ``attn_mask`` /
``attn_bias`` is differentiated (the CPU kernel's too: a mask carrying a
forward tangent reaches it, since only a mask that requires grad sends
``F.scaled_dot_product_attention`` to its math path); grouped-query attention shares each key/value head
among ``Hq / Hkv`` consecutive query heads; reduced precision is computed in
float32 and the log-sum-exp stays float32. A query that sees no key gets
output 0 and log-sum-exp 0 on CPU (as the kernel), +inf on CUDA (as
FlashAttention). ``dropout_p > 0`` with tangents: the CPU kernel rejects
dropout and so does its decomposition; on CUDA fwdecomp draws its own keep
mask (the kernels' Philox streams cannot be reproduced outside them), uses it
for the output, its tangent and reverse mode alike, and returns zero RNG
state (which the fused backward kernels cannot use).

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
from typing import Any, Iterator

import torch
from torch.autograd import forward_ad

from fwdecomp import _torch
from fwdecomp._torch import dual_level_active, has_kernel_for_key
from fwdecomp.attention import attention_jvp, blocks, kernel
from fwdecomp.contract import check_arguments, meta_agrees, meta_shapes_unreliable
from fwdecomp.decompositions import builtin
from fwdecomp.registry import Sample

aten = torch.ops.aten

__all__ = [
    "cudnn_attention",
    "efficient_attention",
    "efficient_attention_forward",
    "flash_attention",
    "flash_attention_for_cpu",
    "flash_attention_for_cpu_backward",
    "flash_attention_forward",
]

_REDUCED = (torch.float16, torch.bfloat16)
#: log-sum-exp of a query that sees no key, per family (CPU kernel: 0; FlashAttention: +inf).
_DEAD_LSE_CPU = 0.0
_DEAD_LSE_CUDA = math.inf
#: The memory-efficient kernels pad their log-sum-exp rows to a multiple of this.
_EFFICIENT_LSE_ALIGN = 32


# --- dual tensors ---------------------------------------------------------------


def _split(x: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(primal, tangent)`` of a possibly dual tensor (``tangent`` is ``None`` when it has none)."""
    if x is None:
        return None, None
    if not dual_level_active():
        return x, None
    primal, tangent = forward_ad.unpack_dual(x)
    return primal, tangent


def _attach(primal: torch.Tensor, tangent: torch.Tensor | None) -> torch.Tensor:
    """``primal`` carrying ``tangent`` at the current forward-AD level (unchanged outside one)."""
    if tangent is None or not dual_level_active():
        return primal
    return forward_ad.make_dual(primal, tangent)


def _check_like_kernel(op: torch._ops.OpOverload, *args: Any, **kwargs: Any) -> None:
    """Raise what PyTorch raises for bad input, by running the operator's meta kernel (shape checks;
    once per argument signature that passes)."""
    check_arguments(op, args, kwargs)


def _jvp(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    mask_differentiable: bool = False,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and log-sum-exp in ``(B, H, L, e)`` / ``(B, H, L)`` layout, carrying their tangents."""
    (q, dq), (k, dk), (v, dv) = _split(query), _split(key), _split(value)
    m, dm = _split(mask)
    if m is not None and not mask_differentiable:
        m, dm = m.detach(), None
    out, lse, dout, dlse = _below_jvp_layer(q, k, v, m, dq, dk, dv, dm, options=options)
    if dq is None and dk is None and dv is None and dm is None:
        return out, lse
    try:
        return _attach(out, dout), _attach(lse, dlse)
    except RuntimeError:
        # make_dual has no rule under the legacy vmap (gradcheck's batched forward check)
        # for outputs that require grad: let the tangents flow through the kernel's
        # operators instead.
        if not mask_differentiable and mask is not None:
            mask = mask.detach()
        (out, lse), _ = attention_jvp((query, key, value), (), attn_mask=mask, through_operators=True, **options)
        return out, lse


def _below_jvp_layer(*tensors: torch.Tensor | None, options: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """``attention_jvp`` of ``(q, k, v, mask, dq, dk, dv, dmask)``: ``(out, lse, dout, dlse)``.

    Under ``torch.func.jvp`` it runs below the jvp layer, on the tensors the layer's
    wrappers hold (the layer needs none of the blocks' operators: the tangents are
    computed here): each of the few thousand operators skips the layer (at seq 4096,
    4.2x -> 3.8x the primal), and where no transform is left below, the O(N·d)
    recomputing backward serves reverse mode through the JVP (849 -> 68 MB).
    """
    q, k, v, m, dq, dk, dv, dm = tensors
    level = _torch.innermost_jvp_level()
    if level is None or not _torch.may_run_below_jvp_layer(tensors):
        (out, lse), (dout, dlse) = attention_jvp((q, k, v), (dq, dk, dv), attn_mask=m, attn_mask_tangent=dm, **options)
        return out, lse, dout, dlse
    q, k, v, m, dq, dk, dv, dm = (None if x is None else _torch.unwrap_jvp(x, level) for x in tensors)
    with _torch.below_jvp_layer():
        (out, lse), (dout, dlse) = attention_jvp((q, k, v), (dq, dk, dv), attn_mask=m, attn_mask_tangent=dm, **options)
    return tuple(_torch.wrap_jvp(x, level) for x in (out, lse, dout, dlse))


def _check_dropout_supported(dropout_p: float, name: str) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name}: dropout_p must be in [0, 1), got {dropout_p}")


def _reject(name: str, what: str, value: Any) -> None:
    if value is not None:
        raise NotImplementedError(
            f"fwdecomp: forward AD through {name} with {what} is not supported (got {what}="
            f"{'a tensor' if isinstance(value, torch.Tensor) else repr(value)}); "
            "use dense (padded) batches with an attention mask, or PyTorch's math attention backend."
        )


def _no_debug_mask(name: str, return_debug_mask: bool) -> None:
    if return_debug_mask:
        raise NotImplementedError(
            f"fwdecomp: forward AD through {name} with return_debug_mask=True is not supported (the debug "
            "mask is an O(N^2) dropout pattern of the fused kernel); call it with return_debug_mask=False."
        )


def _empty(dtype: torch.dtype, device: torch.device, *shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)


def _explicit_tangents(fn: Any) -> Any:
    """Mark a decomposition that splits primals from tangents itself: the eager backend's zero
    tangents for tangent-less inputs would only add work (``fwdecomp.backends.eager``)."""
    fn.fwdecomp_zero_tangents = False
    return fn


# --- samples --------------------------------------------------------------------


def _generator(device: str, seed: int) -> tuple[torch.Generator, str]:
    # Sample tensors are drawn on CPU and moved, so "meta" (shapes only) works too.
    return torch.Generator(device="cpu").manual_seed(seed), device


def _dispatch_key(device: str) -> str:
    return {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}.get(torch.device(device).type, "CPU")


def _runs_on(op: torch._ops.OpOverload, device: str) -> bool:
    return has_kernel_for_key(op, _dispatch_key(device))


def _attention_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    if not _runs_on(aten._scaled_dot_product_flash_attention_for_cpu.default, device):
        return  # a CPU kernel: none on CUDA (whose fused kernels have their own samples)
    gen, device = _generator(device, 0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, dtype=dtype, generator=gen).to(device)

    q, k, v = randn(2, 3, 5, 4), randn(2, 3, 7, 4), randn(2, 3, 7, 4)
    yield Sample((q, k, v, 0.0, False), note="plain")
    yield Sample((q, k, v, 0.0, True), note="causal")
    yield Sample((randn(1, 2, 9, 4), randn(1, 2, 6, 4), randn(1, 2, 6, 4), 0.0, True), note="causal, L > S")
    yield Sample((q, k, v, 0.0, False), {"attn_mask": randn(5, 7)}, note="additive mask")
    yield Sample((q, k, v, 0.0, False), {"attn_mask": randn(2, 1, 5, 7), "scale": 0.3}, note="broadcast mask, scale")
    blocked = torch.zeros(5, 7, dtype=dtype)
    blocked[1] = float("-inf")
    yield Sample((q, k, v, 0.0, False), {"attn_mask": blocked.to(device)}, note="a fully masked row")
    yield Sample((randn(1, 4, 5, 8), randn(1, 2, 7, 8), randn(1, 2, 7, 8), 0.0, False), note="grouped-query heads")
    layout = randn(2, 5, 3, 4).transpose(1, 2)
    yield Sample((layout, k, v, 0.0, False), note="non-contiguous query")
    # Longer sequences: several blocks where tests shrink the block sizes.
    long_q, long_k, long_v = randn(1, 2, 40, 4), randn(1, 2, 37, 4), randn(1, 2, 37, 4)
    yield Sample((long_q, long_k, long_v, 0.0, True), note="longer, causal")
    # No zero-length samples: PyTorch's CPU flash kernel dies with SIGFPE on them (2.13).


@builtin(
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    samples=_attention_samples,
    dtypes=(torch.float64, torch.float32),
)
@_explicit_tangents
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
    if dropout_p > 0:  # the kernel's own rule
        raise RuntimeError("scaled_dot_product_attention_flash_attention: Currently do not support dropout > 0")
    _check_like_kernel(
        aten._scaled_dot_product_flash_attention_for_cpu.default,
        query,
        key,
        value,
        dropout_p,
        is_causal,
        attn_mask=attn_mask,
        scale=scale,
    )
    # The mask is differentiated: PyTorch's reverse mode never sees this kernel with a mask that
    # requires grad (F.scaled_dot_product_attention takes its math path then), but a mask carrying
    # only a forward tangent does reach it, and a zero tangent would be silently wrong.
    return _jvp(
        query,
        key,
        value,
        mask=attn_mask,
        mask_differentiable=True,
        is_causal=is_causal,
        scale=scale,
        dead_lse=_DEAD_LSE_CPU,
    )


_PROBE = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
if not meta_agrees(aten._scaled_dot_product_flash_attention_for_cpu.default, _PROBE, _PROBE, _PROBE):
    meta_shapes_unreliable(  # torch 2.11
        aten._scaled_dot_product_flash_attention_for_cpu.default,
        "on this torch the meta kernel gives a float32 logsumexp for float64 inputs, the CPU kernel float64",
    )


def _attention_backward_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    gen = torch.Generator(device="cpu").manual_seed(1)
    for sample in _attention_samples(device, dtype):
        q, k, v, dropout_p, is_causal = sample.args
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, **sample.kwargs)
        grad = torch.randn(out.shape, dtype=dtype, generator=gen).to(device)
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
    """Gradients of the CPU flash kernel's output with respect to query, key and value, blockwise.

    The FlashAttention backward (scores recomputed block by block from the
    saved log-sum-exp), in operators with forward formulas: forward-over-reverse
    through attention costs O(N·d) memory too.
    """
    if dropout_p > 0:
        raise RuntimeError("scaled_dot_product_attention_flash_attention: Currently do not support dropout > 0")
    return _attention_vjp(grad_out, query, key, value, out, logsumexp, is_causal=is_causal, mask=attn_mask, scale=scale)


def _attention_vjp(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    logsumexp: torch.Tensor,
    *,
    is_causal: bool,
    mask: torch.Tensor | None,
    scale: float | None,
    causal_from: str = "top_left",
    want_mask_grad: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """``(grad_query, grad_key, grad_value[, grad_mask])`` in ``(B, H, n, d)`` layout, blockwise."""
    from fwdecomp.attention.function import canonical_mask

    dtypes = (query.dtype, key.dtype, value.dtype)
    dtype = torch.float32 if query.dtype in _REDUCED else query.dtype
    batch, query_heads, length, features = query.shape
    kv_heads, key_length = key.shape[1], key.shape[2]
    groups = query_heads // kv_heads
    q = query.to(dtype).reshape(batch, kv_heads, groups, length, features)
    o = out.to(dtype).reshape(batch, kv_heads, groups, length, out.shape[-1])
    go = grad_out.to(dtype).reshape(batch, kv_heads, groups, length, grad_out.shape[-1])
    lse = logsumexp.to(dtype).reshape(batch, kv_heads, groups, length)
    m = None
    if mask is not None:
        m = canonical_mask(mask if mask.dtype == torch.bool else mask.to(dtype), query_heads, kv_heads)
    offset = 0 if causal_from == "top_left" else key_length - length
    block_query, block_key = blocks.choose(
        batch * query_heads, length, key_length, banded=is_causal, device=query.device
    )
    spec = kernel.Spec(
        scale=1.0 / math.sqrt(features) if scale is None else float(scale),
        band=(None, offset if is_causal else None),
        block_query=block_query,
        block_key=block_key,
    )
    needs = (True, True, True, want_mask_grad and m is not None, False, False, False, False)
    gq, gk, gv, gm, *_ = kernel.backward(
        q,
        key.to(dtype),
        value.to(dtype),
        m,
        None,
        None,
        None,
        None,
        o,
        lse,
        None,
        None,
        go,
        None,
        None,
        None,
        spec,
        needs=needs,
    )
    grads = (
        gq.reshape(query.shape).to(dtypes[0]),
        gk.to(dtypes[1]),
        gv.to(dtypes[2]),
    )
    if want_mask_grad:
        return (*grads, None if gm is None else gm.reshape(mask.shape).to(mask.dtype))
    return grads


# --- CUDA kernels -------------------------------------------------------------------
#
# Their schemas exist in every build; on a CPU-only build they have only meta
# kernels, so their samples exist for CUDA (and meta) devices only. fwdecomp's
# kernel for their autograd keys routes CPU tensors carrying tangents here too,
# which is how the tests exercise them without a GPU.


_HALF = (torch.float16, torch.bfloat16)  # what the flash and cuDNN kernels take
_SINGLE_OR_HALF = (torch.float32, torch.float16, torch.bfloat16)  # what the memory-efficient kernels take


def _cuda_samples(op: torch._ops.OpOverload, layout: str, kind: str, kernel_dtypes: tuple[torch.dtype, ...]) -> Any:
    """Samples on devices where ``op`` has a kernel, in the dtypes that kernel takes.

    The checks call the kernel itself (finite differences, reverse mode), so a
    dtype it refuses (float64 on CUDA) has no samples: ``benchmarks/gpu_attention.py``
    checks those kernels' JVP in float64 against the math backend instead.
    """

    def samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
        if not _runs_on(op, device) or (torch.device(device).type != "meta" and dtype not in kernel_dtypes):
            return
        gen, device = _generator(device, 0)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(shape, dtype=dtype, generator=gen).to(device)

        def qkv(b: int, hq: int, hkv: int, length: int, key_length: int, d: int) -> tuple[torch.Tensor, ...]:
            q, k, v = randn(b, hq, length, d), randn(b, hkv, key_length, d), randn(b, hkv, key_length, d)
            if layout == "BLHd":
                return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            return q, k, v

        for note, shape, causal in (
            ("plain", (2, 3, 3, 5, 7, 8), False),
            ("causal, L == S", (1, 2, 2, 6, 6, 8), True),
            ("grouped-query heads, causal", (1, 4, 2, 6, 6, 8), True),
            ("many blocks, causal", (1, 2, 2, 40, 40, 8), True),
        ):
            q, k, v = qkv(*shape)
            yield from _cuda_call_samples(kind, q, k, v, causal, note, randn)

    return samples


def _cuda_call_samples(kind: str, q, k, v, causal: bool, note: str, randn) -> Iterator[Sample]:
    length, key_length = (q.shape[2], k.shape[2]) if kind.startswith("sdpa") else (q.shape[1], k.shape[1])
    if kind == "sdpa_flash":
        yield Sample((q, k, v, 0.0, causal), note=note, tangents=(0, 1, 2))
    elif kind == "sdpa_efficient":
        yield Sample((q, k, v, None, True, 0.0, causal), note=note, tangents=(0, 1, 2))
        if not causal:
            bias = randn(q.shape[0], q.shape[1], length, key_length)
            yield Sample((q, k, v, bias, True, 0.0, False), note=note + ", bias", tangents=(0, 1, 2, 3))
    elif kind == "sdpa_cudnn":
        yield Sample((q, k, v, None, True, 0.0, causal), note=note, tangents=(0, 1, 2))
    elif kind == "flash_forward":
        yield Sample((q, k, v, None, None, length, key_length, 0.0, causal, False), note=note, tangents=(0, 1, 2))
    elif kind == "efficient_forward":
        mask_type = 1 if causal else 0
        yield Sample(
            (q, k, v, None, None, None, length, key_length, 0.0, mask_type, True), note=note, tangents=(0, 1, 2)
        )


def _rng_pair(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return _empty(torch.uint64, device, 2), _empty(torch.uint64, device)


def _philox(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return _empty(torch.int64, device), _empty(torch.int64, device)


def _padded_lse(lse: torch.Tensor, compute: bool) -> torch.Tensor:
    """The memory-efficient kernels' log-sum-exp: rows padded to a multiple of 32 (+inf), or empty."""
    if not compute:
        return lse[..., :0]
    length = lse.shape[-1]
    padded = -(-length // _EFFICIENT_LSE_ALIGN) * _EFFICIENT_LSE_ALIGN
    if padded == length:
        return lse
    pad = lse.new_full((*lse.shape[:-1], padded - length), math.inf).detach()
    return torch.cat([lse, pad], dim=-1)


@builtin(
    aten._scaled_dot_product_flash_attention.default,
    samples=_cuda_samples(aten._scaled_dot_product_flash_attention.default, "BHLd", "sdpa_flash", _HALF),
    dtypes=_HALF,
)
@_explicit_tangents
def flash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    return_debug_mask: bool = False,
    *,
    scale: float | None = None,
) -> tuple[Any, ...]:
    """The CUDA flash kernel behind SDPA: output, log-sum-exp, and its bookkeeping outputs."""
    name = "_scaled_dot_product_flash_attention"
    _check_dropout_supported(dropout_p, name)
    _no_debug_mask(name, return_debug_mask)
    _check_like_kernel(aten._scaled_dot_product_flash_attention.default, query, key, value, dropout_p, is_causal)
    out, lse = _jvp(
        query,
        key,
        value,
        is_causal=is_causal,
        causal_from="bottom_right",
        scale=scale,
        dropout_p=dropout_p,
        dead_lse=_DEAD_LSE_CUDA,
    )
    device = query.device
    rng_state, unused = _rng_pair(device)
    empty_seq = _empty(torch.int32, device, 0)
    return (
        out,
        lse.float(),
        empty_seq,
        empty_seq,
        query.shape[2],
        key.shape[2],
        rng_state,
        unused,
        _empty(query.dtype, device, 0),
    )


@builtin(
    aten._scaled_dot_product_efficient_attention.default,
    samples=_cuda_samples(
        aten._scaled_dot_product_efficient_attention.default, "BHLd", "sdpa_efficient", _SINGLE_OR_HALF
    ),
    dtypes=_SINGLE_OR_HALF,
)
@_explicit_tangents
def efficient_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_bias: torch.Tensor | None,
    compute_log_sumexp: bool,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, ...]:
    """The CUDA memory-efficient kernel behind SDPA; ``attn_bias`` is differentiated, as in reverse mode."""
    _check_dropout_supported(dropout_p, "_scaled_dot_product_efficient_attention")
    _check_like_kernel(
        aten._scaled_dot_product_efficient_attention.default,
        query,
        key,
        value,
        attn_bias,
        compute_log_sumexp,
        dropout_p,
        is_causal,
    )
    out, lse = _jvp(
        query,
        key,
        value,
        mask=attn_bias,
        mask_differentiable=True,
        is_causal=is_causal,
        scale=scale,
        dropout_p=dropout_p,
        dead_lse=_DEAD_LSE_CUDA,
    )
    seed, offset = _philox(query.device)
    return out, _padded_lse(lse.float(), compute_log_sumexp), seed, offset


@builtin(
    aten._scaled_dot_product_cudnn_attention.default,
    samples=_cuda_samples(aten._scaled_dot_product_cudnn_attention.default, "BHLd", "sdpa_cudnn", _HALF),
    dtypes=_HALF,
)
@_explicit_tangents
def cudnn_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_bias: torch.Tensor | None,
    compute_log_sumexp: bool,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    return_debug_mask: bool = False,
    *,
    scale: float | None = None,
) -> tuple[Any, ...]:
    """The cuDNN kernel behind SDPA (``attn_bias`` not differentiated, as in its reverse mode)."""
    name = "_scaled_dot_product_cudnn_attention"
    _check_dropout_supported(dropout_p, name)
    _no_debug_mask(name, return_debug_mask)
    _check_like_kernel(
        aten._scaled_dot_product_cudnn_attention.default,
        query,
        key,
        value,
        attn_bias,
        compute_log_sumexp,
        dropout_p,
        is_causal,
    )
    out, lse = _jvp(
        query,
        key,
        value,
        mask=attn_bias,
        is_causal=is_causal,
        scale=scale,
        dropout_p=dropout_p,
        dead_lse=_DEAD_LSE_CUDA,
    )
    device = query.device
    seed, offset = _philox(device)
    empty_seq = _empty(torch.int32, device, 0)
    return (
        out,
        lse.float().unsqueeze(-1),
        empty_seq,
        empty_seq,
        query.shape[2],
        key.shape[2],
        seed,
        offset,
        _empty(torch.float32, device, 0),
    )


def _flash_window(size: int | None) -> int | None:
    return None if size is None or size < 0 else int(size)


@builtin(
    aten._flash_attention_forward.default,
    samples=_cuda_samples(aten._flash_attention_forward.default, "BLHd", "flash_forward", _HALF),
    dtypes=_HALF,
)
@_explicit_tangents
def flash_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cum_seq_q: torch.Tensor | None,
    cum_seq_k: torch.Tensor | None,
    max_q: int,
    max_k: int,
    dropout_p: float,
    is_causal: bool,
    return_debug_mask: bool,
    *,
    scale: float | None = None,
    window_size_left: int | None = None,
    window_size_right: int | None = None,
    seqused_k: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """FlashAttention's forward, ``(B, L, H, d)`` layout: bottom-right causal mask, sliding windows.

    Variable-length batches (``cum_seq_q``/``cum_seq_k``) run sequence by sequence.
    """
    name = "_flash_attention_forward"
    _check_dropout_supported(dropout_p, name)
    _no_debug_mask(name, return_debug_mask)
    _reject(name, "seqused_k", seqused_k)
    _reject(name, "alibi_slopes", alibi_slopes)
    _reject(name, "block_table", block_table)
    if (cum_seq_q is None) != (cum_seq_k is None):
        raise RuntimeError(f"{name}: cum_seq_q and cum_seq_k must both be given or both be None")
    options = dict(
        is_causal=is_causal,
        causal_from="bottom_right",
        window=(_flash_window(window_size_left), _flash_window(window_size_right)),
        scale=scale,
        dropout_p=dropout_p,
        dead_lse=_DEAD_LSE_CUDA,
    )
    device = query.device
    rng_state, unused = _rng_pair(device)
    debug = _empty(query.dtype, device, 0)
    if cum_seq_q is None:
        out, lse = _jvp(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), **options)
        return out.transpose(1, 2), lse.float(), rng_state, unused, debug
    # Variable length: (total, H, d) tensors, sequence b at rows cum_seq[b]:cum_seq[b + 1].
    starts_q, starts_k = cum_seq_q.tolist(), cum_seq_k.tolist()
    outs, lses = [], []
    for b in range(len(starts_q) - 1):
        q = query[starts_q[b] : starts_q[b + 1]].transpose(0, 1).unsqueeze(0)
        k = key[starts_k[b] : starts_k[b + 1]].transpose(0, 1).unsqueeze(0)
        v = value[starts_k[b] : starts_k[b + 1]].transpose(0, 1).unsqueeze(0)
        out, lse = _jvp(q, k, v, **options)
        outs.append(out.squeeze(0).transpose(0, 1))
        lses.append(lse.squeeze(0))
    return torch.cat(outs, 0), torch.cat(lses, -1).float(), rng_state, unused, debug


@builtin(
    aten._efficient_attention_forward.default,
    samples=_cuda_samples(aten._efficient_attention_forward.default, "BLHd", "efficient_forward", _SINGLE_OR_HALF),
    dtypes=_SINGLE_OR_HALF,
)
@_explicit_tangents
def efficient_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
    dropout_p: float,
    custom_mask_type: int,
    compute_log_sumexp: bool = False,
    *,
    scale: float | None = None,
    seqlen_k: torch.Tensor | None = None,
    window_size: int | None = None,
) -> tuple[Any, ...]:
    """The memory-efficient kernel's forward, ``(B, L, H, d)`` layout; ``custom_mask_type`` 0 none,
    1 causal from the top-left, 2 causal from the bottom-right; ``bias`` is differentiated."""
    name = "_efficient_attention_forward"
    _check_dropout_supported(dropout_p, name)
    _reject(name, "cu_seqlens_q", cu_seqlens_q)
    _reject(name, "cu_seqlens_k", cu_seqlens_k)
    _reject(name, "seqlen_k", seqlen_k)
    if window_size is not None and window_size > 0:
        _reject(name, "window_size", window_size)
    if custom_mask_type not in (0, 1, 2):
        raise RuntimeError(f"{name}: custom_mask_type must be 0, 1 or 2, got {custom_mask_type}")
    out, lse = _jvp(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        mask=bias,
        mask_differentiable=True,
        is_causal=custom_mask_type != 0,
        causal_from="bottom_right" if custom_mask_type == 2 else "top_left",
        scale=scale,
        dropout_p=dropout_p,
        dead_lse=_DEAD_LSE_CUDA,
    )
    seed, offset = _philox(query.device)
    return (
        out.transpose(1, 2),
        _padded_lse(lse.float(), compute_log_sumexp),
        seed,
        offset,
        query.shape[1],
        key.shape[1],
    )
