"""python -m fwdecomp audit --model MODULE:CALLABLE."""

from __future__ import annotations

import io
import json
import os
import textwrap

import pytest

import fwdecomp
from fwdecomp._audit_cli import Progress, parse_shape
from fwdecomp.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "consistency_training.py")


@pytest.fixture
def tiny_examples(monkeypatch):
    monkeypatch.setenv("FWDECOMP_EXAMPLES_TINY", "1")


def _model_file(tmp_path, body: str) -> str:
    path = tmp_path / "audited_model.py"
    path.write_text("import torch\n\n" + textwrap.dedent(body))
    return str(path)


def test_example_model_from_a_file_works_and_exits_0(tiny_examples, capsys):
    assert main(["audit", "--model", f"{EXAMPLE}:audit_target", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["target"] == "FlowMap" and data["wrt"] == "both"
    statuses = {row["name"]: row["status"] for row in data["forward"]}
    assert statuses["aten::_scaled_dot_product_flash_attention_for_cpu"] == "fwdecomp"
    assert data["checks"]["jvp"]["status"] == "pass" and data["checks"]["jvp_alone"]["status"] == "error"


def test_package_module_callable_with_input_shapes(capsys):
    shapes = ["--input-shape", "2,3", "--input-shape", "1x3"]
    assert main(["audit", "--model", "torch.nn:PairwiseDistance", *shapes, "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert "fwdecomp audit of PairwiseDistance: tangents on 2 inputs; float64, cpu" in out
    assert "Verdict: works with fwdecomp" in out and "PyTorch alone works too" in out


def test_markdown_and_options(tmp_path, capsys):
    path = _model_file(
        tmp_path,
        """
        def build():
            y = torch.randn(4, 3, dtype=torch.float64)
            return (lambda x: torch.cdist(x, y)), (torch.randn(5, 3, dtype=torch.float64),)
        """,
    )
    code = main(["audit", "--model", f"{path}:build", "--format", "markdown", "--no-hvp", "--seed", "4"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("### fwdecomp audit of build.<locals>.<lambda>: tangents on 1 input; float64, cpu")
    assert "| aten::_cdist_forward | 1 | fwdecomp" in out and "Backward pass" not in out


def test_missing_operator_exits_1(tmp_path, capsys):
    fwdecomp.unregister_decomposition("aten::_pdist_forward")  # conftest restores the table
    path = _model_file(
        tmp_path,
        """
        def build():
            return torch.pdist, (torch.randn(4, 3),)
        """,
    )
    assert main(["audit", "--model", f"{path}:build", "--no-baseline"]) == 1
    out = capsys.readouterr().out
    assert "missing aten::_pdist_forward" in out and "Verdict: does not work" in out
    assert "JVP, PyTorch alone  skipped" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "no_colon_here"], "MODULE:CALLABLE"),
        (["--model", "no/such/file.py:build"], "no such file"),
        (["--model", "fwdecomp_no_such_module:build"], "cannot import"),
        (["--model", "torch.nn:NoSuchThing"], "no attribute"),
        (["--model", "torch.nn:Tanh"], "--input-shape"),
        (["--model", "torch.nn:Tanh", "--input-shape", "2,a"], "not a shape"),
        (["--model", "torch.nn:Linear"], "raised TypeError"),
        (["--model", "torch.nn:Tanh", "--input-shape", "3", "--wrt", "params"], "parameters"),
    ],
)
def test_usage_errors_exit_2(argv, message, capsys):
    assert main(["audit", *argv]) == 2
    assert message in capsys.readouterr().err


def test_progress_goes_to_stderr_only_when_asked_or_on_a_terminal(capsys):
    assert main(["audit", "--model", "torch.nn:Tanh", "--input-shape", "3", "--progress"]) == 0
    err = capsys.readouterr().err
    assert "fwdecomp audit [" in err and "recording the forward pass" in err and "HVP with fwdecomp" in err
    assert main(["audit", "--model", "torch.nn:Tanh", "--input-shape", "3"]) == 0
    assert capsys.readouterr().err == ""  # captured stderr is not a terminal


def test_parse_shape():
    assert parse_shape("2,3") == (2, 3) and parse_shape("2x3x4") == (2, 3, 4) and parse_shape("(5,)") == (5,)
    assert parse_shape("") == ()


def test_inventory_markdown(capsys):
    assert main(["audit", "--no-check", "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| operator | native forward AD | fwdecomp | check | samples |")
    assert "| `aten::cholesky` | missing | routes | not run | 0 |" in out


def test_progress_line_is_rewritten_in_place_on_a_terminal():
    stream = io.StringIO()
    progress = Progress(stream, live=True)
    progress("recording the forward pass")
    progress("probing aten::_cdist_forward")
    progress.close()
    text = stream.getvalue()
    assert text.count("\r\x1b[K") == 3 and "\n" not in text and "probing aten::_cdist_forward" in text
