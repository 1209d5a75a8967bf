"""Run by test_ddp_skip.py: spike skipping on the loss under DDP (2 CPU processes, gloo). Rank 1 alone
sees a ×1000 loss at step 12; each rank writes its skipped steps and final weights to OUT/rank{R}.json.

    python tests/integration/ddp_skip_fit.py OUT
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_gradguard import GradientClipping

SPIKE_STEP = 12


class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        return loss * (1000.0 if self.global_step == SPIKE_STEP and self.global_rank == 1 else 1.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(512, 16, generator=g), torch.randint(0, 4, (512,), generator=g))
        sampler = DistributedSampler(data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(data, batch_size=16, sampler=sampler)


class Report(pl.Callback):
    def __init__(self, out: Path, clip: GradientClipping):
        self.out, self.clip, self.skipped_at, self.last = out, clip, [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = int(self.clip._skipper.skipped)
        if now > self.last:
            self.skipped_at.append(trainer.global_step - 1)
        self.last = now

    def on_fit_end(self, trainer, pl_module):
        data = {"rank": trainer.global_rank, "skipped_at": self.skipped_at,
                "final": {k: v.tolist() for k, v in pl_module.state_dict().items()}}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(data))


def main() -> None:
    warnings.filterwarnings("ignore")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0, verbose=False)
    clip = GradientClipping("none", skip_spikes="loss", skip_window=8, skip_min_samples=5)
    trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_steps=16, logger=False,
                         callbacks=[clip, Report(out, clip)], use_distributed_sampler=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(Model())
    # tear the gloo process group down before the interpreter exits (left to shutdown, its threads can be
    # destroyed while joinable: "terminate called without an active exception", exit code -6)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
