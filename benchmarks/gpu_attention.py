"""The CUDA attention kernels under fwdecomp: correctness against the math backend, then time and memory.

One prepared run for a machine with a GPU (torch >= 2.9 with CUDA)::

    python benchmarks/gpu_attention.py --out "$OUT"          # JSON + markdown table in $OUT
    python benchmarks/gpu_attention.py --out "$OUT" --quick  # fewer lengths and repeats

Without CUDA it prints why and exits 0. Part 1, correctness: every fused
operator (``_scaled_dot_product_flash_attention``, ``_scaled_dot_product_efficient_attention``,
``_scaled_dot_product_cudnn_attention``, ``_flash_attention_forward``,
``_efficient_attention_forward``), in float64 / float32 / bfloat16 / float16 where the
kernel takes the dtype: (a) its primal outputs from fwdecomp's decomposition
against the fused kernel itself (output, log-sum-exp: checks the masking and
log-sum-exp conventions), (b) its output and log-sum-exp tangents under
``torch.func.jvp`` against the math backend's JVP in float64. Part 2,
``F.scaled_dot_product_attention`` at seq 1024..16384: time (CUDA-synchronised
medians) and peak memory above the inputs (``torch.cuda.max_memory_allocated``)
for the fused primal, fwdecomp's JVP and the math backend's JVP. Part 3, reverse
mode through the JVP (what consistency training does: a loss of the output and
its tangent, backpropagated to the primals and tangents): gradients under
``torch.func.jvp`` and ``forward_ad`` against the math backend's in float64, and
time and peak memory of JVP + backward at a few lengths.

Only APIs of torch 2.9 are used (the supported minimum), so it also runs on 2.11.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
import traceback
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fwdecomp

aten = torch.ops.aten

__all__ = ["OPERATORS", "check_operator", "main", "render", "timing"]


def _bhld(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.transpose(1, 2) for t in tensors)


def _from_bhld(outputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return (outputs[0].transpose(1, 2), *outputs[1:])


# name -> (call(q, k, v) with (B, H, L, d) tensors -> outputs with output 0 in (B, H, L, d),
#          dtypes the kernel takes, reference options: causal alignment)
OPERATORS: dict[str, tuple[Callable[..., Any], tuple[torch.dtype, ...], dict[str, Any]]] = {
    "_scaled_dot_product_flash_attention": (
        lambda q, k, v, causal: aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal),
        (torch.float16, torch.bfloat16),
        {"causal_from": "bottom_right"},
    ),
    "_scaled_dot_product_efficient_attention": (
        lambda q, k, v, causal: aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal),
        (torch.float32, torch.float16, torch.bfloat16),
        {"causal_from": "top_left"},
    ),
    "_scaled_dot_product_cudnn_attention": (
        lambda q, k, v, causal: aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal),
        (torch.float16, torch.bfloat16),
        {"causal_from": "top_left"},
    ),
    "_flash_attention_forward": (
        lambda q, k, v, causal: _from_bhld(
            aten._flash_attention_forward(*_bhld(q, k, v), None, None, q.shape[2], k.shape[2], 0.0, causal, False)
        ),
        (torch.float16, torch.bfloat16),
        {"causal_from": "bottom_right"},
    ),
    "_efficient_attention_forward": (
        lambda q, k, v, causal: _from_bhld(
            aten._efficient_attention_forward(
                *_bhld(q, k, v), None, None, None, q.shape[2], k.shape[2], 0.0, 1 if causal else 0, True
            )
        ),
        (torch.float32, torch.float16, torch.bfloat16),
        {"causal_from": "top_left"},
    ),
}


def _reference(q, k, v, causal: bool, causal_from: str):
    """Math attention in the inputs' dtype: ``(out, lse)``."""
    scores = (q @ k.mT) / math.sqrt(q.shape[-1])
    if causal:
        length, key_length = scores.shape[-2:]
        offset = 0 if causal_from == "top_left" else key_length - length
        hidden = torch.ones(length, key_length, dtype=torch.bool, device=q.device).triu(1 + offset)
        scores = scores.masked_fill(hidden, float("-inf"))
    return scores.softmax(-1) @ v, scores.logsumexp(-1)


def _lse(outputs: tuple[Any, ...], length: int) -> torch.Tensor:
    lse = outputs[1]
    return (lse.squeeze(-1) if lse.dim() == 4 else lse)[..., :length].float()


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    finite = torch.isfinite(want)
    if not torch.equal(finite, torch.isfinite(got)):
        return float("inf")
    return ((got[finite] - want[finite]).norm() / want[finite].norm().clamp_min(1e-30)).item()


def check_operator(name: str, dtype: torch.dtype, device: str, causal: bool = True, seq: int = 128) -> dict[str, Any]:
    """Relative errors of one operator in one dtype (``device`` may be CPU: no fused kernel to compare)."""
    call, _, options = OPERATORS[name]
    primals, tangents = _inputs((2, 4, seq, 64), 0, device, dtype)
    record: dict[str, Any] = {"operator": name, "dtype": str(dtype).replace("torch.", ""), "causal": causal}
    wide = [p.double() for p in primals], [t.double() for t in tangents]
    (want, want_lse), (dwant, dwant_lse) = torch.func.jvp(
        lambda q, k, v: _reference(q, k, v, causal, options["causal_from"]), tuple(wide[0]), tuple(wide[1])
    )
    with fwdecomp.enabled():
        outputs, douts = torch.func.jvp(
            lambda q, k, v: tuple(o for o in call(q, k, v, causal) if isinstance(o, torch.Tensor))[:2],
            tuple(primals),
            tuple(tangents),
        )
    record["output vs math"] = _relative(outputs[0], want)
    record["lse vs math"] = _relative(_lse(outputs, seq), want_lse)
    record["output tangent vs math"] = _relative(douts[0], dwant)
    record["lse tangent vs math"] = _relative(_lse(douts, seq), dwant_lse)
    if torch.device(device).type == "cuda" and dtype in OPERATORS[name][1]:
        fused = call(*primals, causal)  # no tangents: the fused kernel itself
        record["output vs fused kernel"] = _relative(outputs[0], fused[0])
        record["lse vs fused kernel"] = _relative(_lse(outputs, seq), _lse(fused, seq))
        if fused[1].shape != outputs[1].shape:
            record["lse shape"] = f"fused {tuple(fused[1].shape)} vs fwdecomp {tuple(outputs[1].shape)}"
    return record


def _cuda_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _cuda_peak(fn: Callable[[], Any]) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak


def timing(seq: int, dtype: torch.dtype, heads: int, dim: int, repeats: int, device: str = "cuda") -> list[dict]:
    """Primal, fwdecomp JVP and math JVP of ``F.scaled_dot_product_attention`` at one length."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    primals, tangents = _inputs((1, heads, seq, dim), seq, device, dtype)

    def primal():
        with torch.no_grad():
            return F.scaled_dot_product_attention(*primals)

    def jvp():
        return torch.func.jvp(F.scaled_dot_product_attention, tuple(primals), tuple(tangents))

    def math_jvp():
        with sdpa_kernel(SDPBackend.MATH):
            return jvp()

    methods = (("primal", primal, False), ("fwdecomp JVP", jvp, True), ("math JVP", math_jvp, False))
    return _measured(seq, methods, repeats)


def _inputs(shape: tuple[int, ...], seed: int, device: str, dtype: torch.dtype) -> tuple[list, list]:
    """Three primals (query, key, value) and three tangents of ``shape``, drawn on CPU from ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    primals = [torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3)]
    tangents = [torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3)]
    return primals, tangents


def _measured(seq: int, methods: Any, repeats: int) -> list[dict]:
    """Peak memory and time of each ``(name, fn, routed)``; fwdecomp is enabled once around a routed
    one's timings (enable() registers kernels: ~20 ms, not part of a JVP)."""
    records = []
    for name, fn, routed in methods:
        record: dict[str, Any] = {"seq": seq, "method": name}
        try:
            with fwdecomp.enabled() if routed else contextlib.nullcontext():
                record["peak_extra_bytes"] = _cuda_peak(fn)
                record["seconds"] = _cuda_time(fn, repeats)
        except Exception as error:  # e.g. out of memory for the math route at 16k
            record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"
            torch.cuda.empty_cache()
        records.append(record)
    return records


def _table(rows: list[dict[str, Any]], first: tuple[str, ...]) -> list[str]:
    keys = [k for k in rows[0] if k not in first]
    keys += sorted({k for r in rows for k in r} - set(keys) - set(first))
    lines = ["| " + " | ".join((*first, *keys)) + " |", "|" + " --- |" * (len(first) + len(keys))]
    for r in rows:
        cells = [r.get(k, "") for k in (*first, *keys)]
        lines.append("| " + " | ".join(f"{v:.1e}" if isinstance(v, float) else str(v) for v in cells) + " |")
    return [*lines, ""]


def render(checks: list[dict[str, Any]], times: list[dict[str, Any]], device_name: str) -> str:
    lines = [f"GPU: {device_name}, torch {torch.__version__}", ""]
    operators = [c for c in checks if "operator" in c]
    gradients = [c for c in checks if "operator" not in c]
    if operators:
        lines += _table(operators, ("operator", "dtype", "causal"))
    if gradients:
        lines += _table(gradients, ("check", "route", "dtype", "causal"))
    for methods in (("primal", "fwdecomp JVP", "math JVP"), ("fwdecomp JVP + grad", "math JVP + grad")):
        rows = [t for t in times if t["method"] in methods]
        if not rows:
            continue
        lines.append("| seq | " + " | ".join(methods) + " |")
        lines.append("| --- | " + " | ".join("---" for _ in methods) + " |")
        for seq in sorted({t["seq"] for t in rows}):
            cells = []
            for m in methods:
                t = next((t for t in rows if t["seq"] == seq and t["method"] == m), None)
                if t is None or "error" in t:
                    cells.append("n/a" if t is None else t["error"][:40])
                else:
                    cells.append(f"{t['seconds'] * 1e3:.2f} ms; {t['peak_extra_bytes'] / 2**20:.0f} MB")
            lines.append(f"| {seq} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _write(out: str, device_name: str, checks: list[dict[str, Any]], times: list[dict[str, Any]]) -> None:
    with open(os.path.join(out, "gpu_attention.json"), "w", encoding="utf-8") as handle:
        json.dump(
            {"device": device_name, "torch": torch.__version__, "checks": checks, "times": times}, handle, indent=1
        )
    with open(os.path.join(out, "gpu_attention.md"), "w", encoding="utf-8") as handle:
        handle.write(render(checks, times, device_name) + "\n")


def _loss(out: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    return (out.float() * 2 + tangent.float() ** 2).sum()


def _jvp_then_grad(route: str, primals, tangents, causal: bool):
    """Gradients of ``_loss`` over the JVP of ``F.scaled_dot_product_attention`` w.r.t. primals and tangents."""
    leaves = [x.detach().clone().requires_grad_() for x in (*primals, *tangents)]
    if route == "func.jvp":
        out, tangent = torch.func.jvp(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            tuple(leaves[:3]),
            tuple(leaves[3:]),
        )
    else:
        with forward_ad.dual_level():
            duals = [forward_ad.make_dual(p, t) for p, t in zip(leaves[:3], leaves[3:])]
            out, tangent = forward_ad.unpack_dual(F.scaled_dot_product_attention(*duals, is_causal=causal))
    return torch.autograd.grad(_loss(out, tangent), leaves)


def check_gradients(
    route: str, dtype: torch.dtype, causal: bool, seq: int = 256, device: str = "cuda"
) -> dict[str, Any]:
    """Largest relative error of the six gradients (primals, tangents) against the math backend in float64."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    primals, tangents = _inputs((2, 4, seq, 64), 1, device, dtype)
    with sdpa_kernel(SDPBackend.MATH):
        want = _jvp_then_grad("func.jvp", [p.double() for p in primals], [t.double() for t in tangents], causal)
    with fwdecomp.enabled():
        got = _jvp_then_grad(route, primals, tangents, causal)
    errors = [_relative(g, w) for g, w in zip(got, want)]
    return {
        "check": "grad of JVP",
        "route": route,
        "dtype": str(dtype).replace("torch.", ""),
        "causal": causal,
        "max relative error": max(errors),
    }


def grad_timing(seq: int, dtype: torch.dtype, heads: int, dim: int, repeats: int) -> list[dict]:
    """func.jvp + backward of ``F.scaled_dot_product_attention``: fwdecomp against the math backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    primals, tangents = _inputs((1, heads, seq, dim), seq, "cuda", dtype)

    def fwdecomp_route():
        return _jvp_then_grad("func.jvp", primals, tangents, False)

    def math_route():
        with sdpa_kernel(SDPBackend.MATH):
            return _jvp_then_grad("func.jvp", primals, tangents, False)

    methods = (("fwdecomp JVP + grad", fwdecomp_route, True), ("math JVP + grad", math_route, False))
    return _measured(seq, methods, repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for the JSON and markdown")
    parser.add_argument("--seqs", default="1024,2048,4096,8192,16384")
    parser.add_argument("--dtype", default="bfloat16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--grad-seqs", default="1024,2048,4096,8192,16384", help="lengths for JVP + backward")
    parser.add_argument("--quick", action="store_true", help="seq 1024..4096, 3 repeats")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_attention: no CUDA device here; nothing to measure (exit 0).")
        return 0
    os.makedirs(args.out, exist_ok=True)
    device_name = torch.cuda.get_device_name()
    checks = []
    for name in OPERATORS:
        for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
            for causal in (False, True):
                try:
                    checks.append(check_operator(name, dtype, "cuda", causal))
                except Exception as error:
                    checks.append(
                        {
                            "operator": name,
                            "dtype": str(dtype).replace("torch.", ""),
                            "causal": causal,
                            "error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}",
                        }
                    )
                    traceback.print_exc()
    seqs = [1024, 2048, 4096] if args.quick else [int(s) for s in args.seqs.split(",")]
    repeats = 3 if args.quick else args.repeats
    times: list[dict[str, Any]] = []
    _write(args.out, device_name, checks, times)  # written after every step: a run cut short keeps its figures
    for seq in seqs:
        times += timing(seq, getattr(torch, args.dtype), args.heads, args.dim, repeats)
        _write(args.out, device_name, checks, times)
        print(f"seq {seq} done", flush=True)
    for route in ("func.jvp", "forward_ad"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for causal in (False, True):
                try:
                    checks.append(check_gradients(route, dtype, causal))
                except Exception as error:
                    checks.append(
                        {
                            "check": "grad of JVP",
                            "route": route,
                            "dtype": str(dtype).replace("torch.", ""),
                            "causal": causal,
                            "error": f"{type(error).__name__}: {str(error)[:120]}",
                        }
                    )
                    traceback.print_exc()
    _write(args.out, device_name, checks, times)
    for seq in [] if args.quick else [int(s) for s in args.grad_seqs.split(",") if s]:
        times += grad_timing(seq, getattr(torch, args.dtype), args.heads, args.dim, repeats)
        _write(args.out, device_name, checks, times)
        print(f"grad seq {seq} done", flush=True)
    print(render(checks, times, device_name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
