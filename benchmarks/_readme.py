"""Write measured tables into README.md between markers, so a README number always comes from the script that
measures it (``--write-readme`` in ``examples/zoo.py``, ``examples/demo_numbers.py``,
``benchmarks/monitor_overhead.py``, ``benchmarks/architectures.py`` and the other benchmarks).

A block in README.md looks like::

    <!-- NAME:start -->
    ...written by the script, replaced as a whole...
    <!-- NAME:end -->

Example:
    >>> text = "a\\n<!-- x:start -->\\nold\\n<!-- x:end -->\\nb"
    >>> print(replace_block_in(text, "x", "new"))
    a
    <!-- x:start -->
    new
    <!-- x:end -->
    b
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

README = Path(__file__).resolve().parents[1] / "README.md"


def _pattern(name: str) -> re.Pattern[str]:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"block name {name!r} must be letters, digits, '_', '.', '-'")
    return re.compile(rf"(<!-- {re.escape(name)}:start -->\n)(.*?)(<!-- {re.escape(name)}:end -->)", re.S)


def read_block_in(text: str, name: str) -> str:
    """The text between the markers of block ``name`` (without the marker lines)."""
    m = _pattern(name).search(text)
    if m is None:
        raise KeyError(f"README has no block <!-- {name}:start --> ... <!-- {name}:end -->")
    return m.group(2).rstrip("\n")


def replace_block_in(text: str, name: str, body: str) -> str:
    """``text`` with block ``name``'s content replaced by ``body``; KeyError when the markers are missing."""
    read_block_in(text, name)  # raises when missing
    return _pattern(name).sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(3), text, count=1)


def read_block(name: str, readme: Optional[Path] = None) -> str:
    """The content of block ``name`` in README.md."""
    return read_block_in((readme or README).read_text(encoding="utf-8"), name)


def write_block(name: str, body: str, readme: Optional[Path] = None) -> None:
    """Replace block ``name`` in README.md with ``body`` and say so on stdout."""
    path = readme or README
    path.write_text(replace_block_in(path.read_text(encoding="utf-8"), name, body), encoding="utf-8")
    print(f"wrote block '{name}' into {path}")
