"""Run by test_fsdp.py: one short fit per clipping algorithm, under FSDP2 (Lightning's ModelParallelStrategy,
2 CPU processes, gloo) or in one process on the same global batches; each rank writes what it saw to
OUT/rank{R}.json (full weights after setup and after the fit, event-file directories, collective checks).

    python tests/integration/fsdp_fit.py OUT {fsdp|single}
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for tests.integration
from tests.integration.rank_data import rank_split_loader  # noqa: E402

from lightning_gradguard import (
    ActivationReplacement, GradGuard, GradientClipping, GradientMonitor, WeightInitialization,
)
from lightning_gradguard import distributed
from lightning_gradguard.callbacks.gradient_clipping import ALGORITHMS

CLIPPING = tuple(a for a in ALGORITHMS if a != "none")  # every algorithm that clips
GLOBAL_BATCH = 32
STEPS = 5
CLIP_ARGS = {  # thresholds that really clip this model's gradients within 5 steps
    "value": dict(threshold=0.05), "norm": dict(threshold=1.0), "agc": dict(threshold=0.02, agc_clip_output_layer=True),
    "percentile": dict(percentile=50.0, warmup_steps=2, warmup_threshold=1.0),
}


def make_net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 6))


class Model(pl.LightningModule):
    """Layers built in ``__init__`` (init and surgery run before ``fully_shard``) or, with ``build_late``,
    in ``configure_model`` together with the sharding (init runs on the DTensor shards)."""

    def __init__(self, build_late: bool = False, inject_nan: bool = False):
        super().__init__()
        self.net = None if build_late else make_net()
        self.inject_nan = inject_nan

    def on_after_backward(self):
        if not self.inject_nan or self.global_step != 2:
            return
        grad = self.net[-1].weight.grad  # (6, 32): under FSDP2 rank 0 holds rows 0-2, rank 1 rows 3-5
        if distributed.is_dtensor(grad):
            if self.global_rank == 1:
                distributed.local(grad)[2, 0] = float("nan")  # row 5, on rank 1 only
        else:
            grad[5, 0] = float("nan")

    def configure_model(self):
        if self.net is None:
            self.net = make_net()
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        for m in self.net:
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=self.device_mesh["data_parallel"])
        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y) * 20  # large gradients: clipping really clips

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        return rank_split_loader(self.trainer.world_size, self.trainer.global_rank, classes=6, global_batch=GLOBAL_BATCH)


def full_state(module: nn.Module) -> dict[str, list]:
    """Every parameter as a full tensor (DTensor shards gathered: a collective on every rank)."""
    return {k: distributed.full_tensor(v.detach()).tolist() for k, v in module.state_dict().items()}


class Report(pl.Callback):
    def __init__(self):
        self.data: dict = {}

    def on_fit_start(self, trainer, pl_module):
        self.data["after_setup"] = full_state(pl_module)
        self.data["dtensor"] = distributed.any_dtensor(list(pl_module.parameters()))

    def on_fit_end(self, trainer, pl_module):
        self.data["final"] = full_state(pl_module)
        self.data["log_dir"] = trainer.logger.log_dir if trainer.is_global_zero and trainer.logger else None


def fit(out: Path, mode: str, algorithm: str, build_late: bool, surgery: bool, inject_nan: bool) -> dict:
    pl.seed_everything(0, verbose=False)
    report = Report()
    callbacks = [WeightInitialization("auto", seed=0, verbose=False), GradientMonitor(log_every_n_steps=1, warn=False),
                 GradientClipping(algorithm, on_nonfinite="skip", **CLIP_ARGS.get(algorithm, {})), report]
    if surgery:
        callbacks.insert(0, ActivationReplacement({"tanh": "elu"}, verbose=False))
    kwargs = (dict(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), devices=2,
                   use_distributed_sampler=False) if mode == "fsdp" else dict(devices=1))
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=STEPS, logger=TensorBoardLogger(out, name=algorithm), callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
        **kwargs,
    )
    trainer.fit(Model(build_late=build_late, inject_nan=inject_nan))
    report.data["rank"] = trainer.global_rank
    return report.data


def main() -> None:
    warnings.filterwarnings("ignore")
    out, mode = Path(sys.argv[1]), sys.argv[2]
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for k, algorithm in enumerate(CLIPPING):
        # the first run builds its layers inside configure_model (init after fully_shard); the second
        # replaces activations (surgery before fully_shard); the others init before fully_shard. The third
        # puts a NaN into one gradient element at step 2, on rank 1's shard only: every rank must skip it
        runs[algorithm] = fit(out, mode, algorithm, build_late=k == 0, surgery=k == 1, inject_nan=k == 2)
    rank = runs[CLIPPING[0]]["rank"]
    if mode == "fsdp":  # GradGuard decides on rank 0 (each rank has its own batches), every rank applies it
        pl.seed_everything(0, verbose=False)
        guard = GradGuard(init="force", activation="force", probe_batches=2, trial_steps=4, budget_seconds=30, seed=0,
                         verbose=False)
        report = Report()
        trainer = pl.Trainer(
            accelerator="cpu", max_steps=3, logger=TensorBoardLogger(out, name="gradguard"), callbacks=[guard, report],
            strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), devices=2,
            use_distributed_sampler=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.fit(Model())
        runs["gradguard"] = {"remedies": guard.remedies, "decisions": [d.__dict__ for d in guard.decisions],
                             "subs": sorted(guard.subs), "dtensor": report.data["dtensor"],
                             "keys": sorted(report.data["final"])}
        # LSUV rescales on a batch: every rank must use the same one (rank 0's), or the shards disagree
        pl.seed_everything(0, verbose=False)
        report = Report()
        trainer = pl.Trainer(
            accelerator="cpu", max_steps=1, logger=False, callbacks=[WeightInitialization("lsuv", seed=0, verbose=False),
                                                                      report],
            strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), devices=2,
            use_distributed_sampler=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.fit(Model())
        runs["lsuv"] = {"after_setup": report.data["after_setup"], "dtensor": report.data["dtensor"]}
    # the shared collectives, once the process group exists: rank 0's decision reaches every rank; sums and
    # maxima of every rank in one gather
    decision = distributed.broadcast_object({"remedies": ["init", "clip"], "from": rank})
    sums, maxes = distributed.reduce_sum_max(torch.tensor([1.0, float(rank)]), torch.tensor([float(rank)]))
    result = {"rank": rank, "runs": runs, "decision": decision, "sums": sums.tolist(), "maxes": maxes.tolist(),
              "multi": distributed.is_multi_process()}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
