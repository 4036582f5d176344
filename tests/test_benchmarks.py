"""The benchmark commands run (tiny sizes; no timings are asserted)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import fwdecomp
from fwdecomp.decompositions import linear_cross_entropy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import attention, gpu_attention, ops, overhead, sizes  # noqa: E402


def test_ops_benchmark_covers_every_registered_operator(capsys):
    assert ops.main(["--tiny"]) == 0
    text = capsys.readouterr().out
    for op in fwdecomp.registry.operators():
        assert f"`{fwdecomp._torch.qualified_name(op)}`" in text  # listed, even when not timed
    assert "median JVP/primal ratio" in text
    assert not fwdecomp.is_enabled()


def test_overhead_benchmark_times_each_router_in_its_own_processes(capsys):
    assert overhead.main(["--only", "_pdist_forward", "--sizes", "small", "--rounds", "1", "--batches", "1"]) == 0
    text = capsys.readouterr().out
    assert "| `aten::_pdist_forward` | small |" in text
    assert "small, Python kernel: median" in text and "small, control: primal again: median" in text
    if fwdecomp.router.status().kind == "native":
        assert "small, compiled router: median" in text
    assert not fwdecomp.is_enabled()  # the measuring happened in the workers


def test_operators_without_size_entry_fall_back_to_their_samples():
    entry = fwdecomp.registry.lookup(torch.ops.aten.cholesky.default)
    sample, how = sizes.benchmark_sample("aten::not_in_table", entry.samples, "realistic", torch.float64)
    assert sample is not None and "no size entry" in how
    assert sizes.benchmark_sample("aten::not_in_table", None, "small", torch.float64) == (
        None,
        "no size entry and no CPU sample",
    )


def test_attention_benchmark_runs(capsys):
    assert attention.main(["--seqs", "32", "--heads", "2", "--dim", "8", "--tiny", "--no-memory"]) == 0
    text = capsys.readouterr().out
    assert "fwdecomp JVP" in text and "lse tangent" in text
    assert not fwdecomp.is_enabled()


def test_attention_memory_is_measured_in_a_fresh_process():
    extra = attention.measure_memory(128, "fwdecomp JVP", 2, 16, False)
    assert isinstance(extra, int) and extra >= 0


def test_gpu_script_skips_cleanly_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script would run for real")
    assert gpu_attention.main(["--out", str(tmp_path)]) == 0
    assert "no CUDA device" in capsys.readouterr().out


@pytest.mark.parametrize("name", list(gpu_attention.OPERATORS))
def test_gpu_script_checks_run_on_cpu(name):
    """Its correctness part, on CPU tensors (fwdecomp's routing; no fused kernel to compare with)."""
    record = gpu_attention.check_operator(name, torch.float64, "cpu", causal=True, seq=24)
    for key in ("output vs math", "output tangent vs math", "lse tangent vs math"):
        assert record[key] < 1e-6, record
    assert record["lse vs math"] < 1e-6  # float32 log-sum-exp, as the CUDA kernels return it
    text = gpu_attention.render(
        [record], [{"seq": 1024, "method": "primal", "seconds": 0.001, "peak_extra_bytes": 2**20}], "cpu"
    )
    assert name in text and "1024" in text


@pytest.mark.parametrize("route", ["func.jvp", "forward_ad"])
def test_gpu_script_gradient_check_runs_on_cpu(route):
    """Its reverse-through-the-JVP part, on CPU tensors (the CPU flash kernel's decomposition)."""
    record = gpu_attention.check_gradients(route, torch.float32, True, seq=40, device="cpu")
    assert record["max relative error"] < 1e-4, record
    times = [{"seq": 64, "method": "fwdecomp JVP + grad", "seconds": 0.002, "peak_extra_bytes": 3 * 2**20}]
    text = gpu_attention.render([record], times, "cpu")
    assert f"| grad of JVP | {route} | float32 | True |" in text and "| 64 | 2.00 ms; 3 MB | n/a |" in text


def test_gpu_audit_runs_one_operator_per_process_on_cpu():
    from benchmarks import gpu_audit

    row = gpu_audit.audit_operator("aten::cholesky", device="cpu", timeout=300)
    assert row["name"] == "aten::cholesky" and row["check"] == "pass" and row["samples"] > 0
    text = gpu_audit.render([row, {"name": "aten::x", "check": "crashed", "failures": ["exit -6: boom"]}], "cpu")
    assert "| `aten::cholesky` | pass |" in text and "- `aten::x` exit -6: boom" in text


@pytest.mark.parametrize("name", sorted(sizes.REALISTIC))
def test_realistic_sizes_are_valid_calls(name):
    """Every realistic-size entry names a registered operator and is a call the kernel accepts."""
    by_name = {fwdecomp._torch.qualified_name(op): op for op in fwdecomp.registry.operators()}
    if name.startswith("torch_nn::") and not linear_cross_entropy.AVAILABLE:
        pytest.skip(f"{name} exists from torch 2.13 on")
    entry = fwdecomp.registry.lookup(by_name[name])
    sample, how = sizes.benchmark_sample(name, entry.samples, "realistic", torch.float32)
    assert how == "size table"
    entry.op(*sample.args, **sample.kwargs)  # PyTorch's own kernel: no tangents, fwdecomp off


def test_backends_benchmark_times_the_decompositions_not_the_rules(capsys):
    """hardsigmoid_backward has a tangent rule: with it on, neither backend would run (no graph, 0 ops)."""
    from benchmarks import backends

    assert backends.main(["--ops", "hardsigmoid_backward", "--repeats", "1", "--target", "0.001"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `aten::hardsigmoid")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert "(" not in cells[4] and int(cells[6]) > 0, row  # traced: a graph with operators
    assert not fwdecomp.is_enabled() and fwdecomp.tangent_rules.is_enabled()
