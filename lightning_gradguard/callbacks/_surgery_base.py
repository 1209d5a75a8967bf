"""What the two surgery callbacks share: when to operate, the table, the checkpoint record."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_gradguard.callbacks._common import run_when_model_exists, sample_batch_provider
from lightning_gradguard.distributed import any_dtensor
from lightning_gradguard.reporting import log_text, print_table
from lightning_gradguard.surgery import CHECKPOINT_KEY, Change, format_changes, surgery_spec

_DONE_ATTR = "_gradguard_surgery_done"


class SurgeryCallback(Callback):
    """Base of ``BatchNormInsertion`` and ``ActivationReplacement``.

    Operates once, in ``setup("fit")`` (or right after ``configure_model``), before the optimizer and before
    a checkpoint restore, so new parameters are trained and resumed checkpoints find the same keys. Never on
    ``validate``/``test``/``predict``. ``WeightInitialization`` runs the surgery callbacks first, whatever
    their order in the list, so init sees the final activations. The operations are written into every
    checkpoint (key ``"gradguard_surgery"``) for :func:`lightning_gradguard.restore`.

    Sharded training (FSDP2, ``ModelParallelStrategy``): Lightning calls the callbacks' ``setup`` before
    ``LightningModule.configure_model``, where ``fully_shard`` is applied. A model whose layers exist after
    ``__init__`` is therefore changed before it is sharded, identically on every rank (the surgery is
    deterministic), and every rank shards the same structure. A model that builds *and* shards its layers
    inside ``configure_model`` would be changed after sharding (new parameters outside FSDP): that is
    refused with an error saying how to order it.
    """

    title = "gradguard surgery"
    verbose: bool = True

    def __init__(self) -> None:
        self.changes: list[Change] = []

    def operate(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", sample: Any) -> list[Change]:
        raise NotImplementedError

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        done = pl_module.__dict__.setdefault(_DONE_ATTR, set())
        if id(self) in done:
            return
        done.add(id(self))
        sample = sample_batch_provider(trainer, pl_module)

        def apply() -> None:
            if any_dtensor(list(pl_module.parameters())):
                raise RuntimeError(
                    f"{type(self).__name__}: the model is already sharded (FSDP2 DTensor parameters) when the "
                    "surgery would run, because configure_model built and sharded its layers. Build the layers in "
                    "__init__ and only call fully_shard in configure_model (the surgery then runs before it), or "
                    "call lightning_gradguard's surgery functions yourself in configure_model before fully_shard."
                )
            self.changes = self.operate(trainer, pl_module, sample)
            if self.verbose:
                print_table(self.title, format_changes(self.changes))

        run_when_model_exists(pl_module, apply)

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        log_text(trainer, f"gradguard/surgery/{type(self).__name__}", format_changes(self.changes), step=0)

    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = surgery_spec(pl_module)


def run_surgery_first(trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
    """Apply every surgery callback on the Trainer now (idempotent), e.g. before an init that must see them."""
    for cb in trainer.callbacks:
        if isinstance(cb, SurgeryCallback):
            cb.setup(trainer, pl_module, stage)
