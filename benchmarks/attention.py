"""Attention JVP on CPU: fused primal vs fwdecomp's blockwise JVP vs the math backend's JVP.

Run from the repository root::

    .venv/bin/python -m benchmarks.attention                      # seq 512..8192, markdown tables
    .venv/bin/python -m benchmarks.attention --seqs 512,1024 --tiny  # quick (CI smoke test)

Shape: float32, batch 1, 4 heads, head dim 64 (``--heads``, ``--dim``, ``--causal``).

Methods:

- ``primal``: ``F.scaled_dot_product_attention`` (the fused CPU flash kernel);
- ``fwdecomp JVP``: ``torch.func.jvp`` of it with fwdecomp enabled (tangents on q, k, v);
- ``math JVP``: the same under ``sdpa_kernel(SDPBackend.MATH)`` without fwdecomp
  (PyTorch's only native route: the N x N scores and their tangent materialised);
- ``... + grad``: a loss of the JVP's tangent backpropagated to q, k, v (consistency
  training), through fwdecomp with ``torch.autograd.forward_ad`` (the recomputing
  ``autograd.Function``: O(N·d)) or ``torch.func.jvp`` (autograd keeps the blocks'
  intermediates), and through the math route.

Time: medians of interleaved repeats in this process (all methods side by side
at each length). Peak memory: each (length, method) runs in a *fresh*
subprocess that allocates the inputs, resets the kernel's peak-RSS counter
(``echo 5 > /proc/self/clear_refs``), runs the call once and reports
``VmHWM - VmRSS(before)`` from ``/proc/self/status``: the extra resident memory
the call needed, outputs included. The subprocess runs with a fixed glibc mmap
threshold (``MALLOC_MMAP_THRESHOLD_=131072``), so large tensors are mapped and
unmapped as they live and die and resident memory follows them (tracemalloc
does not see PyTorch's allocations; PyTorch keeps no CPU allocator statistics).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.nn.attention import SDPBackend, sdpa_kernel

import fwdecomp
from benchmarks._common import Variant, format_seconds, markdown_table, measure

METHODS = (
    "primal",
    "fwdecomp JVP",
    "math JVP",
    "fwdecomp JVP + grad (forward_ad)",
    "fwdecomp JVP + grad (func.jvp)",
    "math JVP + grad",
)
DEFAULT_SEQS = (512, 1024, 2048, 4096, 8192)


def inputs(seq: int, heads: int, dim: int, dtype: torch.dtype = torch.float32, grad: bool = False):
    gen = torch.Generator().manual_seed(seq)
    primals = [torch.randn(1, heads, seq, dim, generator=gen, dtype=dtype) for _ in range(3)]
    tangents = [torch.randn(1, heads, seq, dim, generator=gen, dtype=dtype) for _ in range(3)]
    if grad:
        primals = [p.requires_grad_() for p in primals]
    return primals, tangents


def method(name: str, causal: bool) -> Callable[[list, list], Any]:
    """``call(primals, tangents)`` for one method; fwdecomp is switched as the method needs."""

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def primal(primals, tangents):
        with torch.no_grad():
            return attend(*primals)

    def fwdecomp_jvp(primals, tangents):
        return torch.func.jvp(attend, tuple(primals), tuple(tangents))[1]

    def math_jvp(primals, tangents):
        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(attend, tuple(primals), tuple(tangents))[1]

    def forward_ad_grad(primals, tangents):
        with forward_ad.dual_level():
            out = attend(*[forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)])
            tangent = forward_ad.unpack_dual(out).tangent
        return torch.autograd.grad(tangent.square().sum(), primals)

    def func_jvp_grad(primals, tangents):
        tangent = torch.func.jvp(attend, tuple(primals), tuple(tangents))[1]
        return torch.autograd.grad(tangent.square().sum(), primals)

    def math_grad(primals, tangents):
        with sdpa_kernel(SDPBackend.MATH):
            tangent = torch.func.jvp(attend, tuple(primals), tuple(tangents))[1]
        return torch.autograd.grad(tangent.square().sum(), primals)

    return {
        "primal": primal,
        "fwdecomp JVP": fwdecomp_jvp,
        "math JVP": math_jvp,
        "fwdecomp JVP + grad (forward_ad)": forward_ad_grad,
        "fwdecomp JVP + grad (func.jvp)": func_jvp_grad,
        "math JVP + grad": math_grad,
    }[name]


def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(seq: int, name: str, heads: int, dim: int, causal: bool, threads: int | None = None) -> int:
    """Run inside a fresh process: extra resident memory of one call (see the module docstring)."""
    if threads:
        torch.set_num_threads(threads)
    fwdecomp.enable()
    warm_p, warm_t = inputs(64, heads, dim, grad="grad" in name)
    warm_p = [p.detach().requires_grad_(p.requires_grad) for p in warm_p]
    method(name, causal)(warm_p, warm_t)  # load libraries, start thread pools
    primals, tangents = inputs(seq, heads, dim, grad="grad" in name)
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")
    before = _status("VmRSS")
    result = method(name, causal)(primals, tangents)
    peak = _status("VmHWM")
    del result
    return peak - before


def measure_memory(seq: int, name: str, heads: int, dim: int, causal: bool, threads: int | None = None) -> int | str:
    code = (
        "import json, sys; from benchmarks.attention import peak_extra_bytes; "
        f"print(json.dumps(peak_extra_bytes({seq}, {name!r}, {heads}, {dim}, {causal}, {threads})))"
    )
    # A fixed mmap threshold: glibc then maps every large block and unmaps it when freed, so
    # resident memory follows the live tensors (its default, adaptive threshold keeps freed
    # blocks of up to 32 MB in the heap, which adds allocator noise to the peak).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=3600)
    if result.returncode != 0:
        return "n/a: " + (result.stderr.strip().splitlines() or ["failed"])[-1][:80]
    return int(result.stdout.strip().splitlines()[-1])


def accuracy(seq: int, heads: int, dim: int, causal: bool) -> dict[str, float]:
    """Relative error of fwdecomp's float32 tangents (output and log-sum-exp) against float64 math."""
    primals, tangents = inputs(seq, heads, dim)
    aten = torch.ops.aten

    def op(q, k, v):
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)

    def math64(q, k, v):
        scores = (q @ k.mT) / dim**0.5
        if causal:
            scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
        return scores.softmax(-1) @ v, scores.logsumexp(-1)

    _, (dout, dlse) = torch.func.jvp(op, tuple(primals), tuple(tangents))
    wide = tuple(p.double() for p in primals), tuple(t.double() for t in tangents)
    _, (want, want_lse) = torch.func.jvp(math64, *wide)
    return {
        "output tangent": ((dout.double() - want).norm() / want.norm()).item(),
        "lse tangent": ((dlse.double() - want_lse).norm() / want_lse.norm()).item(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attention", description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", default=",".join(map(str, DEFAULT_SEQS)))
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--grad-max-seq", type=int, default=4096, help="longest sequence for the '+ grad' methods")
    parser.add_argument("--accuracy-max-seq", type=int, default=4096)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="one repeat (smoke test)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seqs = [int(s) for s in args.seqs.split(",")]
    names = [m for m in args.methods.split(",") if m]
    repeats = 1 if args.tiny else args.repeats
    # fwdecomp stays enabled throughout: the primal and math routes never reach a routed
    # operator with tangents, so it adds only its no-tangent check (~3 µs) to them.
    fwdecomp.enable()
    try:
        records = _run(args, seqs, names, repeats)
    finally:
        fwdecomp.disable()
    print(
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads; float32, batch 1, "
        f"{args.heads} heads, head dim {args.dim}{', causal' if args.causal else ''}"
    )
    print(render(records, names, seqs))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(records, handle, indent=1)
    return 0


def _run(args: argparse.Namespace, seqs: list[int], names: list[str], repeats: int) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for seq in seqs:
        active = [n for n in names if "grad" not in n or seq <= args.grad_max_seq]
        primals, tangents = inputs(seq, args.heads, args.dim)
        grad_primals = [p.detach().clone().requires_grad_() for p in primals]
        variants = {
            n: Variant(
                lambda n=n, p=primals, g=grad_primals, t=tangents: method(n, args.causal)(g if "grad" in n else p, t)
            )
            for n in active
        }
        times = measure(variants, repeats=repeats, min_batch_seconds=0.0)
        for n in active:
            memory = None if args.no_memory else measure_memory(seq, n, args.heads, args.dim, args.causal, args.threads)
            records.append({"seq": seq, "method": n, "seconds": times[n], "peak_extra_bytes": memory})
        if seq <= args.accuracy_max_seq:
            records.append({"seq": seq, "accuracy": accuracy(seq, args.heads, args.dim, args.causal)})
        print(f"# seq {seq} done", file=sys.stderr, flush=True)
    return records


def _mb(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return f"{value / 2**20:.0f} MB"


def render(records: list[dict[str, Any]], names: list[str], seqs: list[int]) -> str:
    by = {(r["seq"], r["method"]): r for r in records if "method" in r}
    header = ["seq", *[f"{n}" for n in names]]
    rows = []
    for seq in seqs:
        primal = by.get((seq, "primal"), {}).get("seconds")
        cells = [str(seq)]
        for n in names:
            r = by.get((seq, n))
            if r is None:
                cells.append("")
                continue
            ratio = ""
            if isinstance(primal, float) and isinstance(r["seconds"], float) and n != "primal":
                ratio = f" ({r['seconds'] / primal:.1f}x)"
            cells.append(f"{format_seconds(r['seconds'])}{ratio}; {_mb(r['peak_extra_bytes'])}")
        rows.append(cells)
    text = "time (ratio to primal); peak extra memory\n\n" + markdown_table(header, rows)
    accuracy_rows = [
        [str(r["seq"]), f"{r['accuracy']['output tangent']:.1e}", f"{r['accuracy']['lse tangent']:.1e}"]
        for r in records
        if "accuracy" in r
    ]
    if accuracy_rows:
        text += "\n\nfloat32 tangent error relative to float64 math (norm of difference / norm)\n\n"
        text += markdown_table(["seq", "output tangent", "lse tangent"], accuracy_rows)
    return text


if __name__ == "__main__":
    sys.exit(main())
