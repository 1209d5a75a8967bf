"""Aligned plain-text tables: one helper for every table gradguard prints or logs."""

from __future__ import annotations

from typing import Sequence


def text_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, a dashed rule under the header, trailing spaces stripped.

    Example:
        >>> print(text_table(("a", "bb"), [("1", "2")]))
        a  bb
        -  --
        1  2
    """
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table (TensorBoard's Text tab renders it); ``|`` in cells is escaped.

    Example:
        >>> print(markdown_table(("a", "b"), [("1", "x|y")]))
        | a | b |
        |---|---|
        | 1 | x\\|y |
    """

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(head), "|" + "---|" * len(head), *(line(r) for r in rows)])


def parse_markdown_table(text: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in ``text`` as dicts keyed by the header (inverse of
    :func:`markdown_table`).

    Example:
        >>> parse_markdown_table("| a | b |\\n|---|---|\\n| 1 | x\\\\|y |")
        [{'a': '1', 'b': 'x|y'}]
    """
    import re

    lines = [l.strip() for l in text.splitlines() if l.strip().startswith("|")]
    if len(lines) < 2:
        return []

    def cells(line: str) -> list[str]:
        parts = re.split(r"(?<!\\)\|", line.strip()[1:-1])
        return [p.strip().replace("\\|", "|") for p in parts]

    head = cells(lines[0])
    return [dict(zip(head, cells(l))) for l in lines[2:]]
