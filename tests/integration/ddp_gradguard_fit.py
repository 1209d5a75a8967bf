"""Run by test_ddp_gradguard.py: ``GradGuard()`` under DDP (2 CPU processes, gloo), each rank reading different
data through a ``DistributedSampler``; each rank writes its decisions and final weights to OUT/rank{R}.json.

    python tests/integration/ddp_gradguard_fit.py OUT
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for tests.integration
from tests.integration.rank_data import rank_split_loader  # noqa: E402

from lightning_gradguard import GradGuard  # noqa: E402


class DeepTanh(pl.LightningModule):
    """A 12-layer tanh MLP: GradGuard has something to decide (init, BatchNorm, activation)."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(12):
            layers += [nn.Linear(16 if i == 0 else 32, 32), nn.Tanh()]
        self.net = nn.Sequential(*layers, nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        # rank r reads samples r, r + 2, ...: the ranks' probe and trial batches differ
        return rank_split_loader(self.trainer.world_size, self.trainer.global_rank, classes=4, global_batch=32)


def digest(model: nn.Module) -> str:
    """Of the parameters (BatchNorm running statistics are per-rank buffers: DDP re-broadcasts rank 0's at the
    start of each forward, so after the last forward each rank holds its own)."""
    h = hashlib.sha256()
    for k, v in sorted(model.named_parameters()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    warnings.filterwarnings("ignore")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0, verbose=False)
    # BatchNorm and activation replacement forced (the data are random labels, nothing beats no remedy there), so
    # the ranks must agree on a changed architecture; init and clipping are raced / decided on rank 0's batches
    guard = GradGuard(batchnorm="force", activation="force", monitor=False, verbose=False, budget_steps=40,
                      probe_batches=2, trial_steps=4)
    trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, use_distributed_sampler=False, max_steps=6,
                         logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.callbacks.append(guard)
    model = DeepTanh()
    first_batch = next(iter(rank_split_loader(2, trainer.global_rank, classes=4, global_batch=32)))[0]
    trainer.fit(model)
    report = {
        "rank": trainer.global_rank,
        "first_batch": first_batch.sum().item(),
        "decisions": [[d.remedy, d.status, d.measurement] for d in guard.decisions],
        "remedies": guard.remedies,
        "keys": list(model.state_dict()),
        "final": digest(model),
        "decided_here": guard.diagnosis is not None,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))
    # tear the gloo process group down before the interpreter exits: left to interpreter shutdown, its threads
    # were once destroyed while joinable ("terminate called without an active exception", exit code -6 in CI)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
