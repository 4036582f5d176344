"""examples/custom_operator.py runs (tiny size) and shows PyTorch's silent loss, the error, and correct tangents."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "examples" / "custom_operator.py"


def test_example_runs():
    result = subprocess.run([sys.executable, str(SCRIPT), "--size", "7"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "torch.autograd.forward_ad tangent: None" in out
    assert "all zeros = True" in out
    assert "NotImplementedError: fwdecomp: the custom operator example::gelu_tanh" in out
    errors = [float(e) for e in re.findall(r"finite differences\| = (\S+)", out)]
    assert len(errors) == 2 and all(e < 1e-6 for e in errors)
