"""Where results go: the one place that writes to TensorBoard and prints tables.

Scalars go through ``pl_module.log`` (every Lightning logger gets them); text, histograms, images and
the custom-scalar layout go to the ``SummaryWriter`` of every ``TensorBoardLogger`` on the Trainer, from
global rank 0 only, and are skipped (no error) when there is none.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info


def tensorboard_writers(trainer: "pl.Trainer") -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger attached to ``trainer`` (rank 0 only)."""
    if not trainer.is_global_zero:
        return []
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def log_text(trainer: "pl.Trainer", tag: str, text: str, step: int | None = None) -> None:
    """Write ``text`` (shown verbatim, as a code block) to every TensorBoard logger."""
    block = "    " + text.replace("\n", "\n    ")  # markdown code block keeps the columns aligned
    for writer in tensorboard_writers(trainer):
        writer.add_text(tag, block, global_step=trainer.global_step if step is None else step)
        writer.flush()


def print_table(title: str, table: str) -> None:
    """Print a table on rank 0 (through Lightning's rank-zero logger, visible on the console)."""
    rank_zero_info(f"{title}\n{table}")
