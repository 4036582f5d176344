"""The scripts in examples/, run as a user runs them (subprocesses), at the tiny size."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def run_example(name: str) -> subprocess.CompletedProcess:
    """Run ``examples/<name>.py --tiny`` once per test process."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", f"{name}.py"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text}"
    return float(match[1])


def test_consistency_training():
    result = run_example("consistency_training")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    alone = out.split("With fwdecomp:")[0]
    assert "NotImplementedError: Trying to use forward AD with _scaled_dot_product_flash_attention_for_cpu" in alone
    assert _number(r"relative error ([0-9.e+-]+)", out) < 1e-3
    losses = [float(value) for value in re.findall(r"loss ([0-9.]+)", out)]
    assert len(losses) == 2 and "training steps ran" in out


def test_hessian_vector_products_cdist():
    out = run_example("hessian_vector_products").stdout
    assert "[cdist] PyTorch alone:  NotImplementedError: Trying to use forward AD with _cdist_forward" in out
    assert _number(r"\[cdist\] with fwdecomp:  HVP matches .*relative error ([0-9.e+-]+)", out) < 1e-6
    assert "[cdist] with fwdecomp:  dominant Hessian eigenvalue" in out


def test_hessian_vector_products_grid_sample_without_fwdecomp():
    out = run_example("hessian_vector_products").stdout
    assert "[grid_sample] PyTorch alone:  NotImplementedError: Trying to use forward AD with grid_sampler_2d" in out


def test_hessian_vector_products_grid_sample_with_fwdecomp():
    result = run_example("hessian_vector_products")
    assert _number(r"\[grid_sample\] with fwdecomp:  HVP matches .*relative error ([0-9.e+-]+)", result.stdout) < 1e-6
    assert "Newton step" in result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


def test_ntk_embedding_bag_without_fwdecomp():
    out = run_example("ntk_embedding_bag").stdout
    assert "[ntk] PyTorch alone:  NotImplementedError: Trying to use forward AD with _embedding_bag" in out


def test_ntk_embedding_bag_with_fwdecomp():
    result = run_example("ntk_embedding_bag")
    assert _number(r"NTK from jacfwd matches the NTK from jacrev \(relative error ([0-9.e+-]+)", result.stdout) < 1e-10
    assert result.returncode == 0, result.stdout + result.stderr
