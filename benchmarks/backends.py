"""Per-call time of a JVP through each decomposed operator: eager backend vs graph backend.

For every registered decomposition (so new ones are included automatically)
and two sizes, it times ``torch.func.jvp`` of the operator on one sample,
with fwdecomp enabled, under each backend, and prints a Markdown table.

Sizes: *small* is the operator's first sample; *realistic* comes from
``REALISTIC`` below (an entry per operator, written for the shapes that
operator sees in practice) or, for an operator without an entry, is its
largest sample (most input elements), marked ``(largest sample)`` in the
table. Dtype: float32 where the decomposition supports it.

Method: each measurement is ``number`` back-to-back calls (chosen so that
one measurement takes about ``--target`` seconds), repeated ``--repeats``
times with the two backends interleaved in every repeat; the per-call time
is the median over repeats. On CPU the clock is the process's CPU time
(``time.process_time``) with ``--threads`` intra-op threads (default 1), so
that other processes sharing the machine do not distort the figures; on
CUDA it is wall-clock time between device synchronisations. The graph
backend is warmed up first (its first call traces; that time is reported
separately, wall-clock, as "first call"). The ratio is eager time / graph
time: above 1 the graph backend is faster. "ops" is the number of aten
calls in the traced graph.

    .venv/bin/python benchmarks/backends.py                 # all operators, CPU
    .venv/bin/python benchmarks/backends.py --ops pdist --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch

import fwdecomp
from fwdecomp.backends import graph
from fwdecomp.checks import differentiable_positions, sample_function
from fwdecomp.registry import Sample

aten = torch.ops.aten


def _randn(gen: torch.Generator, device: str, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, device=device, generator=gen)


def _cdist(device: str, dtype: torch.dtype) -> Sample:
    gen = torch.Generator(device=device).manual_seed(0)
    return Sample((_randn(gen, device, dtype, 256, 32), _randn(gen, device, dtype, 256, 32), 3.5, None), note="256x32")


def _euclidean(device: str, dtype: torch.dtype) -> Sample:
    gen = torch.Generator(device=device).manual_seed(0)
    return Sample((_randn(gen, device, dtype, 1024, 64), _randn(gen, device, dtype, 1024, 64)), note="1024x64")


def _cdist_backward(device: str, dtype: torch.dtype) -> Sample:
    x1, x2, p, mode = _cdist(device, dtype).args
    dist = aten._cdist_forward(x1, x2, p, mode)
    gen = torch.Generator(device=device).manual_seed(1)
    return Sample((_randn(gen, device, dtype, *dist.shape), x1, x2, p, dist), note="256x32")


def _pdist(device: str, dtype: torch.dtype) -> Sample:
    gen = torch.Generator(device=device).manual_seed(0)
    return Sample((_randn(gen, device, dtype, 384, 32), 2.0), note="384x32")


def _pdist_backward(device: str, dtype: torch.dtype) -> Sample:
    x, p = _pdist(device, dtype).args
    dist = aten._pdist_forward(x, p)
    gen = torch.Generator(device=device).manual_seed(1)
    return Sample((_randn(gen, device, dtype, *dist.shape), x, p, dist), note="384x32")


def _cholesky(device: str, dtype: torch.dtype) -> Sample:
    gen = torch.Generator(device=device).manual_seed(0)
    a = _randn(gen, device, dtype, 32, 64, 64)
    return Sample((a @ a.mT + 64 * torch.eye(64, dtype=dtype, device=device), False), note="32x64x64")


def _attention(device: str, dtype: torch.dtype) -> Sample:
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (_randn(gen, device, dtype, 4, 8, 256, 64) for _ in range(3))
    return Sample((q, k, v, 0.0, True), note="4x8x256x64 causal")


def _attention_backward(device: str, dtype: torch.dtype) -> Sample:
    q, k, v, dropout_p, causal = _attention(device, dtype).args
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, causal)
    gen = torch.Generator(device=device).manual_seed(1)
    grad = _randn(gen, device, dtype, *out.shape)
    return Sample((grad, q, k, v, out, lse, dropout_p, causal), note="4x8x256x64 causal")


def _embedding_bag(device: str, dtype: torch.dtype) -> Sample:
    gen = torch.Generator(device=device).manual_seed(0)
    weight = _randn(gen, device, dtype, 10000, 64)
    indices = torch.randint(0, 10000, (4096,), device=device, generator=gen)
    offsets = torch.arange(0, 4096, 16, device=device)
    return Sample((weight, indices, offsets, False, 0), note="10000x64, 256 bags of 16")


def _ctc(device: str, dtype: torch.dtype, tensor_lengths: bool = False) -> Sample:
    gen = torch.Generator(device=device).manual_seed(0)
    log_probs = _randn(gen, device, dtype, 50, 16, 20).log_softmax(-1)
    targets = torch.randint(1, 20, (16, 10), device=device, generator=gen)
    inputs = [50] * 16
    lengths = torch.randint(5, 11, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    if tensor_lengths:
        inputs, lengths = torch.tensor(inputs, device=device), torch.tensor(lengths, device=device)
    return Sample((log_probs, targets, inputs, lengths), note="T=50, B=16, C=20, S<=10")


def _grid_2d(device: str, dtype: torch.dtype) -> Sample:
    gen = torch.Generator(device=device).manual_seed(0)
    grid = torch.rand((4, 64, 64, 2), dtype=dtype, device=device, generator=gen) * 2 - 1
    return Sample((_randn(gen, device, dtype, 4, 8, 64, 64), grid, 0, 0, False), note="4x8x64x64, bilinear")


def _grid_3d(device: str, dtype: torch.dtype) -> Sample:
    gen = torch.Generator(device=device).manual_seed(0)
    grid = torch.rand((2, 16, 16, 16, 3), dtype=dtype, device=device, generator=gen) * 2 - 1
    return Sample((_randn(gen, device, dtype, 2, 4, 16, 16, 16), grid, 0, 0, False), note="2x4x16^3, trilinear")


def _multi_margin(device: str, dtype: torch.dtype) -> Sample:
    gen = torch.Generator(device=device).manual_seed(0)
    target = torch.randint(0, 100, (256,), device=device, generator=gen)
    return Sample((_randn(gen, device, dtype, 256, 100), target), note="256x100")


def _multilabel_margin(device: str, dtype: torch.dtype) -> Sample:
    gen = torch.Generator(device=device).manual_seed(0)
    target = torch.randint(0, 100, (256, 100), device=device, generator=gen)
    target[:, 5:] = -1  # five labels per row
    return Sample((_randn(gen, device, dtype, 256, 100), target, 1), note="256x100, 5 labels")


#: Realistic sizes, per operator. An operator without an entry uses its largest sample.
REALISTIC: dict[str, Callable[[str, torch.dtype], Sample]] = {
    "aten::_cdist_forward": _cdist,
    "aten::_euclidean_dist": _euclidean,
    "aten::_cdist_backward": _cdist_backward,
    "aten::_pdist_forward": _pdist,
    "aten::_pdist_backward": _pdist_backward,
    "aten::cholesky": _cholesky,
    "aten::_scaled_dot_product_flash_attention_for_cpu": _attention,
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward": _attention_backward,
    "aten::_embedding_bag": _embedding_bag,
    "aten::_embedding_bag_forward_only": _embedding_bag,
    "aten::_ctc_loss": _ctc,
    "aten::_ctc_loss.Tensor": lambda device, dtype: _ctc(device, dtype, tensor_lengths=True),
    "aten::grid_sampler_2d": _grid_2d,
    "aten::grid_sampler_3d": _grid_3d,
    "aten::multi_margin_loss": _multi_margin,
    "aten::multilabel_margin_loss_forward": _multilabel_margin,
}


def _size(sample: Sample) -> int:
    return sum(a.numel() for a in sample.args if isinstance(a, torch.Tensor))


def _shapes(sample: Sample) -> str:
    return " ".join("x".join(map(str, a.shape)) for a in sample.args if isinstance(a, torch.Tensor))


def _cases(op, device: str, dtype: torch.dtype) -> list[tuple[str, Sample]]:
    entry = fwdecomp.registry.lookup(op)
    samples = [s for s in entry.samples(device, dtype) if _size(s) > 0 and differentiable_positions(s)]
    name = fwdecomp.registry.lookup(op).name
    if not samples:  # e.g. the CUDA-only attention kernels on CPU
        return []
    realistic = REALISTIC[name](device, dtype) if name in REALISTIC else max(samples, key=_size)
    label = "realistic" if name in REALISTIC else "realistic (largest sample)"
    return [("small", samples[0]), (label, realistic)]


def _jvp_call(op, sample: Sample) -> Callable[[], object]:
    positions = differentiable_positions(sample)
    f = sample_function(op, sample, positions)
    primals = tuple(sample.args[i] for i in positions)
    gen = torch.Generator(device=primals[0].device).manual_seed(0)
    tangents = tuple(torch.randn(p.shape, dtype=p.dtype, device=p.device, generator=gen) for p in primals)
    return lambda: torch.func.jvp(f, primals, tangents)


def _per_call(call: Callable[[], object], number: int, sync: Callable[[], None], clock: Callable[[], float]) -> float:
    sync()
    start = clock()
    for _ in range(number):
        call()
    sync()
    return (clock() - start) / number


def measure(
    op, sample: Sample, repeats: int, target: float, sync: Callable[[], None], clock: Callable[[], float]
) -> dict[str, object]:
    """Median per-call seconds under each backend, and the graph backend's first (tracing) call."""
    call = _jvp_call(op, sample)
    fwdecomp.use_backend("graph")
    graph.cache_clear()
    start = time.perf_counter()
    call()
    sync()
    trace = time.perf_counter() - start
    entry = next((e for e in graph.default_backend().entries() if e.op == op), None)
    kind = entry.kind if entry is not None else "?"
    ops = sum(n.op == "call_function" for n in entry.graph.graph.nodes) if entry is not None and entry.graph else 0
    for backend in ("eager", "graph"):  # warm-up
        fwdecomp.use_backend(backend)
        for _ in range(2):
            call()
    fwdecomp.use_backend("eager")
    once = _per_call(call, 3, sync, time.perf_counter)
    number = max(1, int(target / max(once, 1e-7)))
    times: dict[str, list[float]] = {"eager": [], "graph": []}
    for _ in range(repeats):
        for backend in ("eager", "graph"):
            fwdecomp.use_backend(backend)
            times[backend].append(_per_call(call, number, sync, clock))
    fwdecomp.use_backend("eager")
    return {
        "eager": statistics.median(times["eager"]),
        "graph": statistics.median(times["graph"]),
        "trace": trace,
        "kind": kind,
        "ops": ops,
    }


def _format_time(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs" if seconds < 1e-2 else f"{seconds * 1e3:,.1f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--target", type=float, default=0.1, help="seconds per measurement (default 0.1)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads on CPU (default 1)")
    parser.add_argument("--ops", default="", help="only operators whose name contains this")
    args = parser.parse_args(argv)
    device = args.device
    if device.startswith("cuda"):
        sync, clock, timer = torch.cuda.synchronize, time.perf_counter, "wall-clock"
    else:
        torch.set_num_threads(args.threads)
        sync, clock, timer = (lambda: None), time.process_time, f"CPU time, {args.threads} thread(s)"
    start = time.perf_counter()
    graph.explain("aten::_pdist_forward", torch.zeros(3, 2, device=device))  # the first trace imports torch._dynamo
    warm_up = time.perf_counter() - start
    print(f"torch {torch.__version__}, {device}, {timer}, median of {args.repeats}")
    print(f"(the first trace in a process also imports torch._dynamo for fake tensors: {warm_up:.1f} s here)\n")
    print("| operator | size | shapes | eager | graph | eager / graph | ops | first call |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    with fwdecomp.enabled():
        for op in fwdecomp.registry.operators():
            entry = fwdecomp.registry.lookup(op)
            if args.ops not in entry.name:
                continue
            dtype = torch.float32 if torch.float32 in entry.dtypes else entry.dtypes[0]
            for size, sample in _cases(op, device, dtype):
                result = measure(op, sample, args.repeats, args.target, sync, clock)
                ratio = result["eager"] / result["graph"]
                note = "" if result["kind"] == "graph" else f" ({result['kind']})"
                print(
                    f"| `{entry.name}` | {size} | {_shapes(sample)} | {_format_time(result['eager'])} | "
                    f"{_format_time(result['graph'])}{note} | {ratio:.2f} | {result['ops']} | "
                    f"{_format_time(result['trace'])} |",
                    flush=True,
                )
    fwdecomp.use_backend("eager")
    return 0


if __name__ == "__main__":
    sys.exit(main())
