"""python -m fwdecomp audit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import fwdecomp
import fwdecomp.inventory as inventory_module
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


def test_audit_checks_the_methods_asked_for(monkeypatch, capsys):
    seen = []
    real = inventory_module.check_sample

    def spy(op, sample, methods):
        seen.append(methods)
        return real(op, sample, methods=methods)

    monkeypatch.setattr(inventory_module, "check_sample", spy)
    assert main(["audit", "--limit", "1", "--methods", "forward_ad,reverse", "--device", "cpu"]) == 0
    assert seen and all(methods == ("forward_ad", "reverse") for methods in seen)
    assert "0 failing" in capsys.readouterr().out


def test_audit_rejects_an_unknown_method(capsys):
    with pytest.raises(SystemExit):
        main(["audit", "--methods", "forward_ad,sideways"])
    assert "unknown method(s) sideways" in capsys.readouterr().err


def test_audit_reports_a_sample_that_raises_and_goes_on(capsys):
    def samples(device, dtype):
        yield fwdecomp.Sample((torch.randn(4, 3, dtype=dtype, device=device), 2.0))
        raise RuntimeError("this device cannot build the second sample")

    @fwdecomp.register_decomposition("aten::_pdist_forward", replace=True, samples=samples)
    def pdist(self, p=2.0):
        return fwdecomp.decompositions.distance.pdist_forward(self, p)

    assert main(["audit"]) == 1
    out = capsys.readouterr().out
    assert "FAIL aten::_pdist_forward [sample 1] raised RuntimeError: this device cannot build" in out
    assert "aten::cholesky" in out  # the operators after it were still audited


def test_audit_of_chosen_operators(capsys):
    assert (
        main(["audit", "--format", "json", "--operator", "aten::cholesky", "--operator", "aten::_pdist_forward"]) == 0
    )
    rows = json.loads(capsys.readouterr().out)["operators"]
    assert [row["name"] for row in rows] == ["aten::cholesky", "aten::_pdist_forward"]
    assert all(row["check"] == "pass" for row in rows)


def test_audit_of_an_operator_without_decomposition(capsys):
    assert main(["audit", "--operator", "aten::add.Tensor", "--no-check"]) == 2
    assert "no registered decomposition for aten::add.Tensor" in capsys.readouterr().err


def test_router_command_says_which_router_is_in_use(capsys):
    assert main(["router"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(fwdecomp.router.status())
    assert out.startswith(("native router (", "python router: "))


def test_router_command_refuses_an_unknown_mode(capsys, monkeypatch):
    monkeypatch.setenv("FWDECOMP_ROUTER", "fast")
    monkeypatch.setattr(fwdecomp.router, "_status", None)
    assert main(["router"]) == 1
    assert "FWDECOMP_ROUTER='fast': use one of auto, native, python" in capsys.readouterr().err
