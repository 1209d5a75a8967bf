"""The surgery record: what was applied to a model, re-applied to a fresh copy before its weights load.

What was applied is recorded on the model (``model._gradguard_surgery``) as plain dicts; the callbacks save it
in the checkpoint under ``CHECKPOINT_KEY``, and :func:`restore` gives a fresh model the same structure.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, Union

import torch
from torch import nn

from lightning_gradguard.surgery._common import SURGERY_ATTR, Change
from lightning_gradguard.surgery.activations import replace_activations
from lightning_gradguard.surgery.batchnorm import insert_batchnorm

CHECKPOINT_KEY = "gradguard_surgery"


def surgery_spec(model: nn.Module) -> list[dict[str, Any]]:
    """The operations applied to ``model`` so far (plain dicts, checkpoint-safe)."""
    return [dict(op) for op in getattr(model, SURGERY_ATTR, [])]


def apply_spec(model: nn.Module, spec: Sequence[Mapping[str, Any]]) -> list[Change]:
    """Apply recorded operations in order (idempotent: operations already applied change nothing)."""
    changes: list[Change] = []
    for op in spec:
        op = dict(op)
        kind = op.pop("op")
        if kind == "batchnorm":
            changes += insert_batchnorm(model, **op)
        elif kind == "activations":
            changes += replace_activations(model, op["mapping"])
        else:
            raise ValueError(f"apply_spec: unknown surgery op {kind!r} (known: batchnorm, activations)")
    return changes


def restore(model: nn.Module, checkpoint: Union[str, Mapping[str, Any]]) -> list[Change]:
    """Give ``model`` (a fresh instance) the structure recorded in a checkpoint, before its weights load.

    Use it in your LightningModule so ``Model.load_from_checkpoint(path)`` works after surgery::

        def on_load_checkpoint(self, checkpoint):
            lightning_gradguard.restore(self, checkpoint)

    or by hand: ``restore(model, "last.ckpt"); model.load_state_dict(torch.load(...)["state_dict"])``.
    A checkpoint without gradguard surgery changes nothing.
    """
    if isinstance(checkpoint, (str,)) or hasattr(checkpoint, "__fspath__"):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    spec = checkpoint.get(CHECKPOINT_KEY, [])
    return apply_spec(model, spec)
