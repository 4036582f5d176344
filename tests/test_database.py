"""fwdecomp.database and ``python -m fwdecomp audit --database``."""

from __future__ import annotations

import json

import torch

import fwdecomp
from fwdecomp import database
from fwdecomp.cli import main


def test_probe_sees_a_missing_formula_and_fwdecomp_fixing_it():
    [report] = database.sweep(names=["nn.functional.huber_loss"], limit=2)
    assert report.status("forward_ad") == "native"
    assert report.status("forward_over_reverse") == "fixed"
    assert "huber_loss_backward" in report.native["forward_over_reverse"]


def test_probe_reports_an_entry_that_still_fails():
    fwdecomp.unregister_decomposition("aten::huber_loss_backward")
    [report] = database.sweep(names=["nn.functional.huber_loss"], limit=1)
    assert report.status("forward_over_reverse") == "failing"
    assert "huber_loss_backward" in report.fwdecomp["forward_over_reverse"]


def test_probe_puts_a_tangent_on_the_first_input_alone_too():
    """mse_loss only fails natively when the target has no tangent (a ZeroTensor tangent)."""
    [report] = database.sweep(names=["nn.functional.mse_loss"], limit=1)
    assert "first input only" in report.native["forward_over_reverse"]
    assert report.status("forward_over_reverse") == "fixed"


def test_reached_operators_include_backward_operators():
    [info] = database.differentiable_entries(["nn.functional.hardsigmoid"])
    reached = database.reached_operators(info, torch.float64, limit=1)
    assert torch.ops.aten.hardsigmoid_backward.default in reached
    assert torch.ops.aten.hardsigmoid_backward.default in database.routed_operators()


def test_sweep_restores_the_enabled_state():
    fwdecomp.enable()
    database.sweep(names=["nn.functional.hardsigmoid"], limit=1)
    assert fwdecomp.is_enabled()
    fwdecomp.disable()


def test_audit_database_json(capsys):
    code = main(
        [
            "audit",
            "--database",
            "--entries",
            "nn.functional.hardsigmoid,to_sparse",
            "--samples",
            "1",
            "--format",
            "json",
        ]
    )
    payload = json.loads(capsys.readouterr().out)
    assert code == 0  # to_sparse fails, but for a documented reason (database.NOT_FIXED)
    assert payload["counts"]["forward_over_reverse"] == {
        "native": 0,
        "fixed": 1,
        "failing": 1,
        "skipped": 0,
        "entries": 2,
    }
    assert payload["native_failures"]["forward_ad"] == ["to_sparse"]
    [sparse] = [e for e in payload["entries"] if e["name"] == "to_sparse"]
    assert "sparse" in sparse["not_fixed"]


def test_audit_database_text_exits_1_on_an_unexplained_failure(capsys):
    fwdecomp.unregister_decomposition("aten::hardsigmoid_backward")
    assert main(["audit", "--database", "--entries", "nn.functional.hardsigmoid", "--samples", "1"]) == 1
    text = capsys.readouterr().out
    assert "FAILING  forward_over_reverse  nn.functional.hardsigmoid" in text
    assert "forward_over_reverse" in text.splitlines()[2]
