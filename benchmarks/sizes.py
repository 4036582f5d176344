"""Benchmark sizes per operator: a small and a realistic call of each.

``SIZES`` maps an operator's qualified name to ``make(size, dtype) -> Sample``
for ``size`` in ``("small", "realistic")``; ``REALISTIC`` maps more operators
to ``make(device, dtype) -> Sample`` for the realistic size only (their small
size is their largest registered sample). An operator without an entry is
benchmarked on its largest registered sample (the one its tests use), and the
table says so: nothing fwdecomp covers is skipped silently. Add an entry here
when adding a decomposition. ``benchmarks.ops`` and ``benchmarks.backends``
both take their calls from :func:`benchmark_sample`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from fwdecomp import _torch
from fwdecomp.checks import differentiable_positions, sample_function
from fwdecomp.registry import Sample, symmetrize

aten = torch.ops.aten

__all__ = ["REALISTIC", "SIZES", "SIZE_NAMES", "benchmark_sample"]

SIZE_NAMES = ("small", "realistic")


def _randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(sum(shape)))


def _cdist(size: str, dtype: torch.dtype) -> Sample:
    n, d = (5, 3) if size == "small" else (512, 32)
    return Sample((_randn(n, d, dtype=dtype), _randn(n - 1, d, dtype=dtype), 3.0, None), note=f"{n}x{d}, p=3")


def _euclidean(size: str, dtype: torch.dtype) -> Sample:
    n, d = (30, 3) if size == "small" else (2048, 64)
    return Sample((_randn(n, d, dtype=dtype), _randn(n - 3, d, dtype=dtype)), note=f"{n}x{d}")


def _cdist_backward(size: str, dtype: torch.dtype) -> Sample:
    x1, x2, p, mode = _cdist(size, dtype).args
    dist = aten._cdist_forward(x1, x2, p, mode)
    return Sample((torch.randn_like(dist), x1, x2, p, dist), note=f"{tuple(x1.shape)}, p=3")


def _pdist(size: str, dtype: torch.dtype) -> Sample:
    n, d = (6, 3) if size == "small" else (512, 32)
    return Sample((_randn(n, d, dtype=dtype), 2.0), note=f"{n}x{d}")


def _pdist_backward(size: str, dtype: torch.dtype) -> Sample:
    x, p = _pdist(size, dtype).args
    dist = aten._pdist_forward(x, p)
    return Sample((torch.randn_like(dist), x, p, dist), note=f"{tuple(x.shape)}")


def _cholesky(size: str, dtype: torch.dtype) -> Sample:
    batch, n = (1, 4) if size == "small" else (16, 128)
    a = _randn(batch, n, n, dtype=dtype)
    spd = a @ a.mT + n * torch.eye(n, dtype=dtype)
    return Sample((spd, False), note=f"{batch}x{n}x{n}", prepare=symmetrize)


def _attention_shape(size: str) -> tuple[int, int, int, int]:
    return (1, 2, 16, 8) if size == "small" else (1, 4, 1024, 64)


def _attention(size: str, dtype: torch.dtype) -> Sample:
    b, h, n, d = _attention_shape(size)
    q, k, v = (_randn(b, h, n, d, dtype=dtype) + i for i in range(3))
    return Sample((q, k, v, 0.0, True), note=f"{b}x{h}x{n}x{d}, causal")


def _attention_backward(size: str, dtype: torch.dtype) -> Sample:
    q, k, v, dropout_p, causal = _attention(size, dtype).args
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, causal)
    return Sample((torch.randn_like(out), q, k, v, out, lse, dropout_p, causal), note=_attention(size, dtype).note)


SIZES: dict[str, Callable[[str, torch.dtype], Sample]] = {
    "aten::_cdist_forward": _cdist,
    "aten::_euclidean_dist": _euclidean,
    "aten::_cdist_backward": _cdist_backward,
    "aten::_pdist_forward": _pdist,
    "aten::_pdist_backward": _pdist_backward,
    "aten::cholesky": _cholesky,
    "aten::_scaled_dot_product_flash_attention_for_cpu": _attention,
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward": _attention_backward,
}


def _randn_on(gen: torch.Generator, device: str, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, device=device, generator=gen)


def _embedding_bag(device: str, dtype: torch.dtype) -> Sample:
    gen = torch.Generator(device=device).manual_seed(0)
    weight = _randn_on(gen, device, dtype, 10000, 64)
    indices = torch.randint(0, 10000, (4096,), device=device, generator=gen)
    offsets = torch.arange(0, 4096, 16, device=device)
    return Sample((weight, indices, offsets, False, 0), note="10000x64, 256 bags of 16")


def _ctc(device: str, dtype: torch.dtype, tensor_lengths: bool = False) -> Sample:
    gen = torch.Generator(device=device).manual_seed(0)
    log_probs = _randn_on(gen, device, dtype, 50, 16, 20).log_softmax(-1)
    targets = torch.randint(1, 20, (16, 10), device=device, generator=gen)
    inputs = [50] * 16
    lengths = torch.randint(5, 11, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    if tensor_lengths:
        inputs, lengths = torch.tensor(inputs, device=device), torch.tensor(lengths, device=device)
    return Sample((log_probs, targets, inputs, lengths), note="T=50, B=16, C=20, S<=10")


def _grid_2d(device: str, dtype: torch.dtype) -> Sample:
    gen = torch.Generator(device=device).manual_seed(0)
    grid = torch.rand((4, 64, 64, 2), dtype=dtype, device=device, generator=gen) * 2 - 1
    return Sample((_randn_on(gen, device, dtype, 4, 8, 64, 64), grid, 0, 0, False), note="4x8x64x64, bilinear")


def _grid_3d(device: str, dtype: torch.dtype) -> Sample:
    gen = torch.Generator(device=device).manual_seed(0)
    grid = torch.rand((2, 16, 16, 16, 3), dtype=dtype, device=device, generator=gen) * 2 - 1
    return Sample((_randn_on(gen, device, dtype, 2, 4, 16, 16, 16), grid, 0, 0, False), note="2x4x16^3, trilinear")


def _multi_margin(device: str, dtype: torch.dtype) -> Sample:
    gen = torch.Generator(device=device).manual_seed(0)
    target = torch.randint(0, 100, (256,), device=device, generator=gen)
    return Sample((_randn_on(gen, device, dtype, 256, 100), target), note="256x100")


def _multilabel_margin(device: str, dtype: torch.dtype) -> Sample:
    gen = torch.Generator(device=device).manual_seed(0)
    target = torch.randint(0, 100, (256, 100), device=device, generator=gen)
    target[:, 5:] = -1  # five labels per row
    return Sample((_randn_on(gen, device, dtype, 256, 100), target, 1), note="256x100, 5 labels")


def _grid_backward(forward: Callable[[str, torch.dtype], Sample]) -> Callable[[str, torch.dtype], Sample]:
    def make(device: str, dtype: torch.dtype) -> Sample:
        image, grid, mode, padding, align = forward(device, dtype).args
        op = aten.grid_sampler_2d if image.dim() == 4 else aten.grid_sampler_3d
        gen = torch.Generator(device=device).manual_seed(1)
        grad = _randn_on(gen, device, dtype, *op(image, grid, mode, padding, align).shape)
        return Sample((grad, image, grid, mode, padding, align, [True, True]), note=forward(device, dtype).note)

    return make


def _elementwise(*arguments: object, rows: int = 256, cols: int = 1024) -> Callable[[str, torch.dtype], Sample]:
    """``(grad, self[, target], *arguments)`` of ``rows x cols`` for the elementwise loss backward operators."""

    def make(device: str, dtype: torch.dtype, with_target: bool = True) -> Sample:
        gen = torch.Generator(device=device).manual_seed(0)
        grad, x = _randn_on(gen, device, dtype, rows, cols), _randn_on(gen, device, dtype, rows, cols)
        target = torch.randint(0, 2, (rows, cols), device=device, generator=gen).to(dtype) * 2 - 1
        tensors = (grad, x, target) if with_target else (grad, x)
        return Sample((*tensors, *arguments), note=f"{rows}x{cols}", tangents=(0, 1))

    return make


def _dropout_backward(device: str, dtype: torch.dtype) -> Sample:
    gen = torch.Generator(device=device).manual_seed(0)
    mask = torch.rand((256, 1024), device=device, generator=gen) > 0.1
    return Sample((_randn_on(gen, device, dtype, 256, 1024), mask, 1 / 0.9), note="256x1024, p=0.1")


def _index_reduce(device: str, dtype: torch.dtype) -> Sample:
    gen = torch.Generator(device=device).manual_seed(0)
    index = torch.randint(0, 1024, (4096,), device=device, generator=gen)
    source = _randn_on(gen, device, dtype, 4096, 64)
    return Sample((_randn_on(gen, device, dtype, 1024, 64), 0, index, source, "mean"), note="1024x64 <- 4096, mean")


def _segment_reduce(device: str, dtype: torch.dtype) -> Sample:
    gen = torch.Generator(device=device).manual_seed(0)
    lengths = torch.full((256,), 16, device=device)
    return Sample((_randn_on(gen, device, dtype, 4096, 64), "sum"), {"lengths": lengths}, note="4096x64, 256 segments")


def _segment_reduce_backward(device: str, dtype: torch.dtype) -> Sample:
    forward = _segment_reduce(device, dtype)
    output = aten.segment_reduce(*forward.args, **forward.kwargs)
    gen = torch.Generator(device=device).manual_seed(1)
    args = (_randn_on(gen, device, dtype, *output.shape), output, forward.args[0], "sum")
    return Sample(args, dict(forward.kwargs), note=forward.note, tangents=(0, 2))


def _ormqr(device: str, dtype: torch.dtype) -> Sample:
    gen = torch.Generator(device=device).manual_seed(0)
    a, tau = torch.geqrf(_randn_on(gen, device, dtype, 16, 128, 64))
    return Sample((a, tau, _randn_on(gen, device, dtype, 16, 128, 32)), note="16 x (128x64 reflectors, 128x32)")


def _multi_margin_backward(device: str, dtype: torch.dtype) -> Sample:
    x, target = _multi_margin(device, dtype).args
    gen = torch.Generator(device=device).manual_seed(1)
    return Sample((_randn_on(gen, device, dtype), x, target, 1, 1.0, None, 1), note="256x100", tangents=(0, 1))


def _multilabel_margin_backward(device: str, dtype: torch.dtype) -> Sample:
    x, target, reduction = _multilabel_margin(device, dtype).args
    _, is_target = aten.multilabel_margin_loss_forward(x, target, reduction)
    gen = torch.Generator(device=device).manual_seed(1)
    grad = _randn_on(gen, device, dtype)
    return Sample((grad, x, target, reduction, is_target), note="256x100, 5 labels", tangents=(0, 1))


def _bag_outputs(device: str, dtype: torch.dtype, per_sample_weights: bool = False):
    """The realistic ``_embedding_bag`` call's inputs and outputs, and a gradient for its backward operators."""
    weight, indices, offsets, scale, mode = _embedding_bag(device, dtype).args
    gen = torch.Generator(device=device).manual_seed(2)
    psw = torch.rand(indices.shape, dtype=dtype, device=device, generator=gen) if per_sample_weights else None
    out, offset2bag, bag_size, max_indices = aten._embedding_bag(weight, indices, offsets, scale, mode, False, psw)
    if offset2bag.numel() != indices.numel():  # the CPU kernel's fast path leaves it empty
        offset2bag = torch.zeros_like(indices).index_add_(0, offsets[1:], torch.ones_like(offsets[1:])).cumsum(0)
    gen = torch.Generator(device=device).manual_seed(1)
    grad = _randn_on(gen, device, dtype, *out.shape)
    return grad, weight, indices, offsets, offset2bag, bag_size, max_indices, mode, psw


def _embedding_bag_dense_backward(device: str, dtype: torch.dtype) -> Sample:
    grad, weight, indices, _, offset2bag, bag_size, max_indices, mode, _ = _bag_outputs(device, dtype)
    args = (grad, indices, offset2bag, bag_size, max_indices, weight.shape[0], False, mode, None)
    return Sample(args, note="10000x64, 256 bags of 16")


def _embedding_bag_backward(device: str, dtype: torch.dtype) -> Sample:
    grad, weight, indices, offsets, offset2bag, bag_size, max_indices, mode, psw = _bag_outputs(device, dtype, True)
    args = (grad, indices, offsets, offset2bag, bag_size, max_indices, weight.shape[0], False, mode, False, psw)
    return Sample(args, note="10000x64, 256 bags of 16, per_sample_weights")


def _per_sample_weights_backward(device: str, dtype: torch.dtype) -> Sample:
    grad, weight, indices, offsets, offset2bag, *_ = _bag_outputs(device, dtype, True)
    return Sample((grad, weight, indices, offsets, offset2bag, 0), note="10000x64, 256 bags of 16")


def _ctc_backward(device: str, dtype: torch.dtype, tensor_lengths: bool = False) -> Sample:
    forward = _ctc(device, dtype, tensor_lengths)
    log_probs, targets, inputs, lengths = forward.args
    nll, log_alpha = aten._ctc_loss(*forward.args)
    grad = torch.ones_like(nll)
    return Sample((grad, log_probs, targets, inputs, lengths, nll, log_alpha, 0), note=forward.note, tangents=(1,))


def _linear_cross_entropy(device: str, dtype: torch.dtype, reduction: bool = True) -> Sample:
    """A language-model head: 1024 tokens, hidden 128, vocabulary 4096, chunks of 256 tokens."""
    gen = torch.Generator(device=device).manual_seed(0)
    x, w = _randn_on(gen, device, dtype, 1024, 128), _randn_on(gen, device, dtype, 4096, 128) / 8
    target = torch.randint(0, 4096, (1024,), device=device, generator=gen)
    note = "1024 tokens, hidden 128, vocabulary 4096, chunks of 256"
    if reduction:
        # no gradient outputs: what F.linear_cross_entropy passes where nothing requires grad (a JVP)
        args = (x, w, target, None, None, "mean", -100, 0.0, 256, "compact", dtype, True, False, False, False)
        return Sample(args, note=note + ", mean, no gradient outputs", tangents=(0, 1))
    return Sample((x, w, target, None, None, -100, 256, "compact", dtype), note=note, tangents=(0, 1))


#: Realistic calls of the operators without a ``SIZES`` entry: ``make(device, dtype)``.
REALISTIC: dict[str, Callable[[str, torch.dtype], Sample]] = {
    "aten::_embedding_bag": _embedding_bag,
    "aten::_embedding_bag_forward_only": _embedding_bag,
    "aten::_ctc_loss": _ctc,
    "aten::_ctc_loss.Tensor": lambda device, dtype: _ctc(device, dtype, tensor_lengths=True),
    "aten::grid_sampler_2d": _grid_2d,
    "aten::grid_sampler_3d": _grid_3d,
    "aten::multi_margin_loss": _multi_margin,
    "aten::multilabel_margin_loss_forward": _multilabel_margin,
    "aten::grid_sampler_2d_backward": _grid_backward(_grid_2d),
    "aten::grid_sampler_3d_backward": _grid_backward(_grid_3d),
    "aten::hardsigmoid_backward": lambda device, dtype: _elementwise()(device, dtype, with_target=False),
    "aten::huber_loss_backward": _elementwise(1, 0.5),
    "aten::mse_loss_backward": _elementwise(1),
    "aten::soft_margin_loss_backward": _elementwise(1),
    "aten::native_dropout_backward": _dropout_backward,
    "aten::index_reduce": _index_reduce,
    "aten::segment_reduce": _segment_reduce,
    "aten::_segment_reduce_backward": _segment_reduce_backward,
    "aten::ormqr": _ormqr,
    "aten::multi_margin_loss_backward": _multi_margin_backward,
    "aten::multilabel_margin_loss_backward": _multilabel_margin_backward,
    "aten::_embedding_bag_dense_backward": _embedding_bag_dense_backward,
    "aten::_embedding_bag_backward": _embedding_bag_backward,
    "aten::_embedding_bag_per_sample_weights_backward": _per_sample_weights_backward,
    "aten::_ctc_loss_backward": _ctc_backward,
    "aten::_ctc_loss_backward.Tensor": lambda device, dtype: _ctc_backward(device, dtype, tensor_lengths=True),
    "torch_nn::_linear_cross_entropy_batch_chunked": _linear_cross_entropy,
    "torch_nn::_linear_cross_entropy_batch_chunked_no_reduction": lambda device, dtype: _linear_cross_entropy(
        device, dtype, reduction=False
    ),
}


def _numel(sample: Sample) -> int:
    return sum(a.numel() for a in sample.args if isinstance(a, torch.Tensor))


def _to(sample: Sample, device: str) -> Sample:
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in sample.args)
    return dataclasses.replace(sample, args=args)


def benchmark_sample(
    name: str,
    samples: Callable[[str, torch.dtype], object] | None,
    size: str,
    dtype: torch.dtype,
    device: str = "cpu",
):
    """``(sample, how)``: the size-table call, else the largest registered sample (``how`` says which)."""
    if name in SIZES:
        return _to(SIZES[name](size, dtype), device), "size table"
    if size == "realistic" and name in REALISTIC:
        return REALISTIC[name](device, dtype), "size table"
    registered = list(samples(device, dtype)) if samples is not None else []
    registered = [s for s in registered if all(not isinstance(a, torch.Tensor) or a.numel() for a in s.args)]
    if not registered:
        return None, "no size entry and no CPU sample"
    return max(registered, key=_numel), "no size entry: largest registered sample"


def prepared(op: Any, sample: Sample) -> tuple[Callable[..., Any], list[torch.Tensor], list[torch.Tensor]]:
    """``(f, primals, tangents)``: ``op`` on ``sample`` as a function of its differentiable arguments.

    The tangents are seeded random. A sample's ``prepare`` (linear, e.g. symmetrize) is applied
    here once, to primals and tangents, so timings measure the operator, not the preparation.
    """
    positions = differentiable_positions(sample)
    primals = [sample.args[i] for i in positions]
    gen = torch.Generator().manual_seed(0)
    tangents = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in primals]
    if sample.prepare is not None:
        primals, tangents = sample.prepare(primals), sample.prepare(tangents)
        sample = dataclasses.replace(sample, prepare=None)
    return sample_function(op, sample, positions), primals, tangents


def runs_on_cpu(op: Any) -> bool:
    """Whether ``op`` has a kernel that runs on CPU tensors (some are CUDA-only)."""
    keys = ("CPU", "CompositeExplicitAutograd", "CompositeImplicitAutograd")
    return any(_torch.has_kernel_for_key(op, key) for key in keys)
