"""Plain-text and Markdown tables for the reports (``fwdecomp audit`` and its views, ``fwdecomp.audit``).

Example:
    >>> print("\\n".join(text_table(["operator", "check"], [["aten::cholesky", "pass"]])))
    operator        check
    --------------  -----
    aten::cholesky  pass
    >>> print("\\n".join(markdown_table(["operator", "check"], [["aten::cholesky", "pass"]])))
    | operator | check |
    | --- | --- |
    | aten::cholesky | pass |
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["markdown_cell", "markdown_table", "text_table"]


def text_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart, a rule of dashes under the header."""
    widths = [max(len(row[i]) for row in [columns, *rows]) for i in range(len(columns))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()

    return [line(columns), line(["-" * w for w in widths]), *[line(row) for row in rows]]


def markdown_cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell (pipes escaped, one line)."""
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A GitHub-flavoured Markdown table."""

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(markdown_cell(cell) for cell in row) + " |"

    return [line(columns), "|" + "|".join(" --- " for _ in columns) + "|", *[line(row) for row in rows]]
