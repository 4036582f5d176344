"""The README's "Your own operators" examples run, in order, and print what they say."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _section_code() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Your own operators\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_section_has_an_example_of_each_way():
    code = "\n".join(_section_code())
    for name in ("fwdecomp.enable()", "register_decomposition", "register_jvp", "jvp_from_forward", "strict=False"):
        assert name in code


def test_examples_run():
    program = "\n".join(_section_code())
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("tensor([0., 0., 0., 0., 0.]")  # PyTorch alone: zeros
    assert "the custom operator mylib::softclip was called with forward-AD tangents" in result.stdout
    assert "@fwdecomp.register_jvp('mylib::softclip')" in result.stdout
