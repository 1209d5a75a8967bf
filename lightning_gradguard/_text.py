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
