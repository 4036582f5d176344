"""python -m fwdecomp audit."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

import fwdecomp
from fwdecomp.cli import main


def test_audit_text(capsys):
    assert main(["audit", "--limit", "2"]) == 0
    text = capsys.readouterr().out
    assert "aten::_cdist_forward" in text and "routes" in text and "pass" in text
    assert "0 failing" in text


def test_audit_json(capsys):
    assert main(["audit", "--format", "json", "--limit", "1"]) == 0
    rows = json.loads(capsys.readouterr().out)["operators"]
    names = {row["name"] for row in rows}
    assert {"aten::_cdist_forward", "aten::cholesky", "aten::_euclidean_dist"} <= names
    assert all(row["check"] in ("pass", "no CPU samples") and row["native"] != "native" for row in rows)
    assert sum(row["check"] == "pass" for row in rows) >= 8


def test_audit_fails_on_a_broken_decomposition(capsys):
    def samples(device, dtype):
        yield fwdecomp.Sample((torch.randn(4, 3, dtype=dtype), 2.0))

    @fwdecomp.register_decomposition("aten::_pdist_forward", replace=True, samples=samples)
    def pdist(self, p=2.0):
        return fwdecomp.decompositions.distance.pdist_forward(self, p) * 1.5

    assert main(["audit", "--limit", "1"]) == 1
    assert "FAIL aten::_pdist_forward" in capsys.readouterr().out
    assert not fwdecomp.is_enabled()


def test_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "fwdecomp", "audit", "--no-check"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "aten::cholesky" in result.stdout
