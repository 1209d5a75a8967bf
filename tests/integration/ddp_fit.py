"""Run by test_ddp.py: one fit with every gradguard callback, under DDP (2 CPU processes, gloo) or in one
process on the same global batches; each rank writes what it saw to OUT/rank{R}.json.

    python tests/integration/ddp_fit.py OUT {ddp|ddp_spawn|single} [nan]
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
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for tests.integration
from tests.integration.rank_data import rank_split_loader  # noqa: E402

from lightning_gradguard import ActivationReplacement, GradientClipping, GradientMonitor, WeightInitialization

GLOBAL_BATCH = 32


class Model(pl.LightningModule):
    def __init__(self, inject_nan: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
        self.inject_nan = inject_nan

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y) * 20  # large gradients: clipping really clips

    def on_after_backward(self):
        if self.inject_nan and self.global_step == 2 and self.global_rank == 1:
            self.net[-1].weight.grad[0, 0] = float("nan")  # one rank only; DDP's all-reduce spreads it

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        return rank_split_loader(self.trainer.world_size, self.trainer.global_rank, classes=4, global_batch=GLOBAL_BATCH)


def digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


class Report(pl.Callback):
    def __init__(self, out: Path):
        self.out = out
        self.data: dict = {"norm_before": []}

    def on_fit_start(self, trainer, pl_module):
        self.data["after_setup"] = digest(pl_module)
        self.data["keys"] = list(pl_module.state_dict())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.data["norm_before"].append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))))

    def on_fit_end(self, trainer, pl_module):
        self.data["final"] = {k: v.tolist() for k, v in pl_module.state_dict().items()}
        self.data["rank"] = trainer.global_rank
        self.data["log_dir"] = trainer.logger.log_dir if trainer.is_global_zero else None
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.data))


def main() -> None:
    warnings.filterwarnings("ignore")
    out, mode = Path(sys.argv[1]), sys.argv[2]
    inject = len(sys.argv) > 3 and sys.argv[3] == "nan"
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0, verbose=False)
    clip = GradientClipping("norm", threshold=1.0, on_nonfinite="skip")
    callbacks = [
        # BatchNorm is left out here: per-rank batch statistics differ from one process's unless
        # Trainer(sync_batchnorm=True); activation replacement is the surgery under test
        ActivationReplacement({"tanh": "elu"}, verbose=False), WeightInitialization("auto", seed=0, verbose=False),
        GradientMonitor(log_every_n_steps=1, warn=False), Report(out), clip,
    ]
    kwargs = dict(strategy=mode, devices=2, use_distributed_sampler=False) if mode != "single" else dict(devices=1)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=4, logger=TensorBoardLogger(out, name="tb"), callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
        **kwargs,
    )
    trainer.fit(Model(inject_nan=inject))


if __name__ == "__main__":
    main()
