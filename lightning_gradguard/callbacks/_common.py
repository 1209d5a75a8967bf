"""Helpers shared by the callbacks: when to act on a module, and a sample batch."""

from __future__ import annotations

from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_gradguard.callbacks._lightning_internals import after_configure_model, fit_dataloader
from lightning_gradguard.graph import is_weighted


def has_weighted_layers(module: nn.Module) -> bool:
    return any(is_weighted(m) for m in module.modules())


def run_when_model_exists(pl_module: "pl.LightningModule", action: Callable[[], None]) -> None:
    """Run ``action`` now if the module has layers, else right after its ``configure_model``.

    Lightning calls ``configure_model`` after the callbacks' ``setup`` and before a checkpoint restore and
    ``configure_optimizers``; no callback hook lies in between (see :mod:`._lightning_internals`).
    """
    if has_weighted_layers(pl_module):
        action()
    else:
        after_configure_model(pl_module, action)


def train_dataloader(trainer: "pl.Trainer") -> Optional[Any]:
    """The fit's training dataloader during ``setup``: the datamodule's, else the one given to ``fit``."""
    if trainer.datamodule is not None:
        return trainer.datamodule.train_dataloader()
    return fit_dataloader(trainer)


def sample_batch_provider(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Callable[[], Any]:
    """A zero-argument callable returning one model input: ``example_input_array`` if set, else the
    first element of the first training batch (read only when the callable is called)."""

    def provide() -> Any:
        example = getattr(pl_module, "example_input_array", None)
        if example is not None:
            return example
        loader = train_dataloader(trainer)
        if loader is None:
            return None
        batch = next(iter(loader))
        if isinstance(batch, (list, tuple)):
            batch = batch[0]
        elif isinstance(batch, dict):
            batch = next(v for v in batch.values() if isinstance(v, torch.Tensor))
        return batch

    return provide
