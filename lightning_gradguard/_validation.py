"""Argument checks shared by every public constructor.

Each check raises :class:`ValueError` (or :class:`TypeError`) with a message that names the owner, the
field, the bad value and what is allowed, e.g.
``WeightInitialization: scheme='he_normall' is not one of: auto, glorot_uniform, ...``.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Iterable, Optional, Sequence


def _hint(value: Any, allowed: Sequence[str]) -> str:
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(owner: str, field: str, value: Any, allowed: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise naming the field and the choices."""
    allowed = list(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(
            f"{owner}: {field}={value!r} is not one of: {', '.join(allowed)}{_hint(value, allowed)}"
        )
    return value


def check_number(
    owner: str,
    field: str,
    value: Any,
    *,
    min_value: Optional[float] = None,
    max_value: Optional[float] = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
    integer: bool = False,
    allow_none: bool = False,
) -> Any:
    """Return ``value`` if it is a finite number inside the given bounds, else raise a clear error."""
    if value is None and allow_none:
        return None
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
        raise TypeError(f"{owner}: {field}={value!r} must be {kind}{_range_text(min_value, max_value, min_inclusive, max_inclusive)}")
    too_low = min_value is not None and (value < min_value if min_inclusive else value <= min_value)
    too_high = max_value is not None and (value > max_value if max_inclusive else value >= max_value)
    if too_low or too_high:
        raise ValueError(f"{owner}: {field}={value!r} must be {kind}{_range_text(min_value, max_value, min_inclusive, max_inclusive)}")
    return value


def _range_text(lo: Optional[float], hi: Optional[float], lo_inc: bool, hi_inc: bool) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>=' if lo_inc else '>'} {lo}")
    if hi is not None:
        parts.append(f"{'<=' if hi_inc else '<'} {hi}")
    return (" " + " and ".join(parts)) if parts else ""


def check_bool(owner: str, field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {field}={value!r} must be true or false")
    return value


def check_patterns(owner: str, field: str, value: Any) -> list[str]:
    """Accept a string or a sequence of strings (lists from Hydra arrive as ListConfig)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    try:
        items = list(value)
    except TypeError:
        raise TypeError(f"{owner}: {field}={value!r} must be a list of module-name patterns (strings)") from None
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{owner}: {field} contains {item!r}; every entry must be a module-name pattern (string)")
    return items
