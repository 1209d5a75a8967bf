"""What every surgery shares: the :class:`Change` row, its table, and the record kept on the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from torch import nn

from lightning_gradguard._text import text_table
from lightning_gradguard.activations import make_activation

SURGERY_ATTR = "_gradguard_surgery"


@dataclass
class Change:
    """One row of the surgery table."""

    path: str
    before: str
    after: str
    params_delta: int
    note: str = ""


def format_changes(changes: Sequence[Change]) -> str:
    """The rows as a text table (``"no changes"`` when empty)."""
    head = ("path", "before", "after", "params Δ", "note")
    rows = [(c.path, c.before, c.after, f"{c.params_delta:+d}", c.note) for c in changes]
    if not rows:
        return "no changes"
    return text_table(head, rows)


def set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def record(model: nn.Module, op: dict[str, Any]) -> None:
    """Append ``op`` to the model's surgery record (once)."""
    ops = list(getattr(model, SURGERY_ATTR, []))
    if op not in ops:
        ops.append(op)
    model.__dict__[SURGERY_ATTR] = ops  # a plain attribute, not a submodule or buffer


def build_activation(spec: dict[str, Any], num_features: Optional[int]) -> nn.Module:
    """The activation module for a checked target spec (``{"name": ..., **params}``)."""
    params = {k: v for k, v in spec.items() if k != "name"}
    return make_activation(spec["name"], num_features=num_features, **params)


def layer_width(layer: nn.Module) -> Optional[int]:
    """Output units of a layer (``out_features``, ``out_channels`` or ``hidden_size``), else None."""
    for attr in ("out_features", "out_channels", "hidden_size"):
        if hasattr(layer, attr):
            return int(getattr(layer, attr))
    return None
