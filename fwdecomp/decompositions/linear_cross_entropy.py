"""The chunked linear cross-entropy operators of ``F.linear_cross_entropy`` (torch >= 2.13).

``F.linear_cross_entropy(input, linear_weight, target, ...)`` computes
``cross_entropy(input @ linear_weight.T + linear_bias, target)`` without
materialising all the logits at once, through two custom operators:

- ``torch_nn::_linear_cross_entropy_batch_chunked`` (``reduction`` ``'mean'`` or
  ``'sum'``) returns ``(loss, grad_input, grad_linear_weight, grad_linear_bias)``:
  its forward already computes the gradients, and its registered backward
  only rescales them by the upstream gradient.
- ``torch_nn::_linear_cross_entropy_batch_chunked_no_reduction`` returns the
  per-sample losses; its backward recomputes the gradients chunk by chunk.

Forward AD reaches neither backward: forward-over-reverse (``torch.func.hessian``,
``jvp(grad(f))``) failed on both. The decompositions here compute the same
values with operators that have formulas (not by calling the operator on the
tangent-free inputs: under ``torch.func`` transforms its autograd cannot run,
pytorch#168393), the textbook formulas, whose derivatives of every order
PyTorch then knows::

    logits = input @ linear_weight.T + linear_bias
    w_n    = weight[target_n] (1 without class weights; 0 where target_n == ignore_index)
    loss_n = w_n * (logsumexp(logits_n) - logits_n[target_n])
    loss   = sum_n loss_n / (sum_n w_n if reduction == 'mean' else 1)
    G      = (w / norm)[:, None] * (softmax(logits) - onehot(target))
    grad_input = G @ linear_weight,  grad_linear_weight = G.T @ input,  grad_linear_bias = G.sum(0)

So reverse mode through the decomposition differentiates the loss directly
(the operator's precomputed-gradient backward is not used when tangents are
present), and the gradient outputs' tangents are second derivatives. The
logits are whole here (N x C): the chunking saves memory for the primal, not
for its derivatives. ``label_smoothing != 0`` with tangents raises (the chunked
path is not taken for it by ``F.linear_cross_entropy`` on torch 2.13).

Example (a Hessian-vector product: forward AD over reverse mode):
    >>> import torch, torch.nn.functional as F, fwdecomp
    >>> from torch.autograd import forward_ad
    >>> if AVAILABLE:
    ...     from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions
    ...     x, w = torch.randn(8, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    ...     y, v = torch.randint(0, 4, (8,)), torch.randn(8, 3, dtype=torch.float64)
    ...     chunked = LinearCrossEntropyOptions(batch_chunk_size=2)
    ...     with fwdecomp.enabled(), forward_ad.dual_level():
    ...         a = forward_ad.make_dual(x.clone().requires_grad_(), v)
    ...         (g,) = torch.autograd.grad(F.linear_cross_entropy(a, w, y, options=chunked), a, create_graph=True)
    ...         hvp = forward_ad.unpack_dual(g).tangent
    ...     reference = torch.autograd.functional.hvp(lambda a: F.cross_entropy(a @ w.T, y), x, v)[1]
    ...     print(torch.allclose(hvp, reference))
    ... else:
    ...     print(True)
    True

``torch.func.hessian`` cannot run through these operators on torch 2.13 with
or without fwdecomp: ``torch.func.grad`` of a custom operator whose autograd
is registered with ``register_autograd`` fails before any tangent exists
(pytorch#168393).
"""

from __future__ import annotations

import importlib.util
from typing import Iterator

import torch

from fwdecomp.decompositions import builtin
from fwdecomp.registry import Sample
from fwdecomp.tangent_rules import in_place, with_tangent_rule

__all__ = ["AVAILABLE"]

#: Whether this torch defines the chunked operators (torch >= 2.13).
AVAILABLE = importlib.util.find_spec("torch.nn.modules.linear_cross_entropy") is not None

_SCALAR = "torch_nn::_linear_cross_entropy_batch_chunked"
_NO_REDUCTION = "torch_nn::_linear_cross_entropy_batch_chunked_no_reduction"


def _sample_weights(
    target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(target with ignored entries as class 0, per-sample weight w)``: ``weight[target]``, 0 where ignored."""
    kept = target != ignore_index
    safe_target = torch.where(kept, target, 0)
    w = kept.to(dtype)
    if weight is not None:
        w = w * weight.to(dtype)[safe_target]
    return safe_target, w


def _parts(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: torch.Tensor | None,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    name: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits, per-sample class weights w, per-sample loss / w)`` in the input's dtype."""
    if label_smoothing != 0.0:
        raise NotImplementedError(
            f"fwdecomp: forward AD through {name} with label_smoothing={label_smoothing} is not supported; "
            "use label_smoothing=0.0, or F.cross_entropy on explicit logits."
        )
    logits = input @ linear_weight.mT
    if linear_bias is not None:
        logits = logits + linear_bias
    safe_target, w = _sample_weights(target, weight, ignore_index, logits.dtype)
    picked = logits.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    return logits, w, logits.logsumexp(1) - picked


#: PyTorch's backward of the scalar operator treats its gradient outputs as constants (it
#: supports no double backward), so reverse mode through the kernel is no reference for them.
_NATIVE_REVERSE = {"reverse": "the kernel's backward treats its gradient outputs as constants"}


def _scalar_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, dtype=dtype, device=device, generator=gen)

    target = torch.tensor([0, 3, 1, 1, 2, 3, 0, 2], device=device)
    common = ("compact", dtype, True, True, True, False)
    for reduction in ("mean", "sum"):
        yield Sample(
            (randn(8, 3), randn(4, 3), target, None, None, reduction, -100, 0.0, 2, *common),
            note=reduction,
            unreliable=_NATIVE_REVERSE,
        )
        yield Sample(
            (randn(8, 3), randn(4, 3), target, None, randn(4).abs(), reduction, 1, 0.0, 3, *common),
            note=f"{reduction}, class weights, ignore_index",
            tangents=(0, 1),
            unreliable=_NATIVE_REVERSE,
        )
    for reduction in ("mean", "sum"):  # what F.linear_cross_entropy passes when nothing requires grad
        tail = ("compact", dtype, True, False, False, False)
        yield Sample(
            (randn(8, 3), randn(4, 3), target, randn(4), None, reduction, 1, 0.0, 3, *tail),
            note=f"{reduction}, linear bias, no gradient outputs",
            unreliable={"reverse": "asked for no gradient outputs, the kernel's backward returns no gradient"},
        )
    yield Sample(
        (
            randn(8, 3),
            randn(4, 3),
            target,
            randn(4),
            None,
            "mean",
            -100,
            0.0,
            2,
            "compact",
            dtype,
            True,
            True,
            True,
            True,
        ),
        note="mean, linear bias",
        unreliable=_NATIVE_REVERSE,
    )


def _no_reduction_samples(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    gen = torch.Generator(device=device).manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, dtype=dtype, device=device, generator=gen)

    target = torch.tensor([0, 3, 1, 1, 2, 3, 0, 2], device=device)
    yield Sample((randn(8, 3), randn(4, 3), target, None, None, -100, 2, "compact", dtype), note="plain")
    yield Sample(
        (randn(8, 3), randn(4, 3), target, randn(4), randn(4).abs(), 1, 3, "compact", dtype),
        note="bias, class weights, ignore_index",
        tangents=(0, 1, 3),
    )


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.reshape(-1) @ b.reshape(-1).to(a.dtype)


def _scalar_rule(primals: list, tangents: list):
    """The loss's tangent from the gradients the operator itself computes: ``<grad, tangent>`` summed.

    Only for calls that ask for no gradient outputs (what ``F.linear_cross_entropy`` passes
    where nothing requires grad): a gradient output's tangent is a second derivative, which
    the decomposition gives. Class-weight tangents decline too (not differentiated).
    """
    input, linear_weight = primals[0], primals[1]
    d_input, d_weight, d_bias = tangents[0], tangents[1], tangents[3]
    if any(primals[12:15]) or tangents[4] is not None:
        return NotImplemented
    op = torch.ops.torch_nn._linear_cross_entropy_batch_chunked.default
    need = (d_input is not None, d_weight is not None, d_bias is not None)
    loss, *grads = op(*primals[:12], *need)
    tangent = None
    for gradient, direction, needed in zip(grads, (d_input, d_weight, d_bias), need):
        if needed:
            term = _dot(gradient, direction)
            tangent = term if tangent is None else tangent + term
    empties = (  # the gradient outputs not asked for, as the kernel returns them
        input.new_empty((0, 0)),
        torch.empty((0, 0), dtype=input.dtype, device=linear_weight.device),
        input.new_empty((0,)),
    )
    return (loss, *empties), (None if tangent is None else tangent.to(loss.dtype), None, None, None)


def _logits(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, buffer: torch.Tensor | bool | None, rows: int
) -> tuple[torch.Tensor, torch.Tensor | bool]:
    """A chunk's logits, written into ``buffer`` (made on the first chunk, ``rows x classes``) so that
    every chunk reuses its pages: a new multi-MB block each chunk costs page faults, more than the
    softmax pass over it. ``False``: ``out=`` was refused (``vmap`` over the inputs), allocate."""
    if buffer is not False:
        if buffer is None:
            buffer = x.new_empty(rows, weight.shape[0])
        try:
            if bias is None:
                return torch.mm(x, weight.mT, out=buffer[: x.shape[0]]), buffer
            return torch.addmm(bias, x, weight.mT, out=buffer[: x.shape[0]]), buffer
        except RuntimeError:  # no batching rule for out= variants
            buffer = False
    return (x @ weight.mT if bias is None else torch.addmm(bias, x, weight.mT)), buffer


def _no_reduction_rule(primals: list, tangents: list):
    """Per-sample losses and their tangents, chunk by chunk like the kernel (the logits never whole).

    ``loss_n = w_n (logsumexp(l_n) - l_n[t_n])`` with ``l = input W^T + b``; its tangent is
    ``w_n (<p_n, dl_n> - dl_n[t_n])``, ``p = softmax(l)``, ``dl = d_input W^T + input d_W^T + d_b``.
    ``<p_n, dl_n>`` is taken as ``<(p [W, d_W])_n, [d_input, input]_n>``: one product of the
    probabilities with the weights and their tangent, no ``dl`` the size of the logits. The
    values are computed like the decomposition's (in the input's dtype). Class-weight
    tangents decline (not differentiated).
    """
    input, linear_weight, target, linear_bias, weight, ignore_index, chunk = primals[:7]
    d_input, d_weight, d_bias = tangents[0], tangents[1], tangents[3]
    if tangents[4] is not None or (d_input is None and d_weight is None and d_bias is None):
        return NotImplemented
    safe_target, w = _sample_weights(target, weight, ignore_index, input.dtype)
    # (matrix, partner): <p W, d_input> and <p d_W, input>, for the tangents present
    pairs = [(m, x) for m, x in ((linear_weight, d_input), (d_weight, input)) if m is not None and x is not None]
    stacked = torch.cat([m for m, _ in pairs], 1) if pairs else None
    width = linear_weight.shape[1]
    losses, parts = [], []
    step = max(int(chunk), 1)
    buffer: torch.Tensor | bool | None = None
    for start in range(0, input.shape[0], step):
        rows = slice(start, start + step)
        x, t = input[rows], safe_target[rows]
        logits, buffer = _logits(x, linear_weight, linear_bias, buffer, min(step, input.shape[0]))
        picked = logits.gather(1, t.unsqueeze(1)).squeeze(1)
        # log-sum-exp and softmax from one exponential pass, in place over the chunk's logits: the
        # shift by the row's largest logit, then exp (a row with an infinite logit gives NaN either
        # way); the softmax's division is left to the products' rows (chunk x width, not x classes)
        peak = logits.amax(1, keepdim=True)
        e = in_place(in_place(logits, "sub", peak), "exp")
        total = e.sum(1)
        losses.append(peak.squeeze(1) + total.log() - picked)
        tangent = torch.zeros_like(losses[-1])
        if stacked is not None:
            weighted = in_place(e @ stacked, "div", total.unsqueeze(1))
            for k, (m, partner) in enumerate(pairs):
                seen = (weighted[:, k * width : (k + 1) * width] * partner[rows]).sum(1)
                tangent = tangent + seen - (m[t] * partner[rows]).sum(1)
        if d_bias is not None:
            tangent = tangent + (e @ d_bias) / total - d_bias[t]
        parts.append(tangent)
    if not parts:
        empty = input.new_zeros((0,))
        return empty, empty
    return (w * torch.cat(losses)).to(input.dtype), (w * torch.cat(parts)).to(input.dtype)


if AVAILABLE:
    import torch.nn.modules.linear_cross_entropy  # defines the operators

    # float64 samples only: the checks' finite differences run in float64, and the operator refuses
    # an acc_dtype (an argument, so not widened with the inputs) below its inputs' precision
    @builtin(_SCALAR, samples=_scalar_samples, dtypes=(torch.float64,))
    @with_tangent_rule(_scalar_rule)
    def linear_cross_entropy_batch_chunked(
        input: torch.Tensor,
        linear_weight: torch.Tensor,
        target: torch.Tensor,
        linear_bias: torch.Tensor | None,
        weight: torch.Tensor | None,
        reduction: str,
        ignore_index: int,
        label_smoothing: float,
        batch_chunk_size: int,
        acc_policy: str,
        acc_dtype: torch.dtype,
        allow_retain_graph: bool,
        compute_input_grad: bool,
        compute_linear_weight_grad: bool,
        compute_linear_bias_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean or summed cross-entropy of a linear layer's logits, and its gradients."""
        logits, w, nll = _parts(
            input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing, _SCALAR
        )
        norm = w.sum() if reduction == "mean" else torch.ones((), dtype=w.dtype, device=w.device)
        loss = (w * nll).sum() / norm
        onehot = torch.nn.functional.one_hot(torch.where(target != ignore_index, target, 0), logits.shape[1])
        grad_logits = (w / norm).unsqueeze(1) * (logits.softmax(1) - onehot.to(logits.dtype))
        # a gradient the call does not ask for is an empty tensor, as the kernel returns it
        return (
            loss.to(input.dtype),
            grad_logits @ linear_weight if compute_input_grad else input.new_empty(0, 0),
            grad_logits.mT @ input if compute_linear_weight_grad else linear_weight.new_empty(0, 0),
            grad_logits.sum(0) if compute_linear_bias_grad else linear_weight.new_empty(0),
        )

    @builtin(_NO_REDUCTION, samples=_no_reduction_samples, dtypes=(torch.float64,))
    @with_tangent_rule(_no_reduction_rule)
    def linear_cross_entropy_batch_chunked_no_reduction(
        input: torch.Tensor,
        linear_weight: torch.Tensor,
        target: torch.Tensor,
        linear_bias: torch.Tensor | None,
        weight: torch.Tensor | None,
        ignore_index: int,
        batch_chunk_size: int,
        acc_policy: str,
        acc_dtype: torch.dtype,
    ) -> torch.Tensor:
        """Per-sample cross-entropy of a linear layer's logits."""
        _, w, nll = _parts(input, linear_weight, target, linear_bias, weight, ignore_index, 0.0, _NO_REDUCTION)
        return (w * nll).to(input.dtype)

    __all__ += ["linear_cross_entropy_batch_chunked", "linear_cross_entropy_batch_chunked_no_reduction"]
