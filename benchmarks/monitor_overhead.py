"""Step-time overhead of GradientMonitor, measured side by side in one run.

For each model (a deep MLP with many small layers, a small transformer encoder) the same training is run
with: no monitoring; GradientMonitor logging every step; GradientMonitor at the default cadence (every
50 steps); Lightning's own ``grad_norm`` logged from ``on_before_optimizer_step`` every 50 steps; and a
naive per-parameter ``SummaryWriter.add_histogram`` loop every 50 steps. Variants are interleaved and
repeated. The time per step is measured from the start of step 20 to the start of the last step (so the
fixed costs of fit start and end, such as the end-of-fit gradient-flow picture, are not in it; they are
printed separately), the best of the repeats is kept, and each is divided by the best of "none".

    python benchmarks/monitor_overhead.py [--steps 400] [--repeats 3] [--write-readme]

``--write-readme`` puts the table (markdown, with the command that made it) into README.md, block
``monitor-overhead``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import grad_norm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradientMonitor

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from benchmarks._readme import write_block  # noqa: E402

LABELS = {
    "none": "none", "monitor_every_step": "GradientMonitor, every step",
    "monitor_default": "GradientMonitor, every 50 steps (default)",
    "monitor_default_no_step_check": 'same, `nonfinite_check="logging_steps"`',
    "lightning_grad_norm": "Lightning's `grad_norm`, every 50 steps",
    "naive_histograms": "naive per-parameter `add_histogram`, every 50 steps",
}
TITLES = {"mlp": "MLP, 50 layers × 32", "transformer": "small transformer (4 layers, d=64)"}

CADENCE = 50


class Task(pl.LightningModule):
    def __init__(self, net: nn.Module, extra: str = "none"):
        super().__init__()
        self.net, self.extra = net, extra

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def on_before_optimizer_step(self, optimizer):
        if self.global_step % CADENCE:
            return
        if self.extra == "lightning_grad_norm":
            self.log_dict(grad_norm(self, norm_type=2))
        elif self.extra == "naive_histograms":
            writer = self.logger.experiment
            for name, p in self.named_parameters():
                if p.grad is not None:
                    writer.add_histogram(f"naive/{name}", p.grad, self.global_step)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class Transformer(nn.Module):
    def __init__(self, d=64, layers=4, classes=10):
        super().__init__()
        self.inp = nn.Linear(16, d)
        enc = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(enc, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.enc(self.inp(x)).mean(dim=1))


def make(kind: str):
    g = torch.Generator().manual_seed(0)
    if kind == "mlp":
        layers: list[nn.Module] = [nn.Linear(32, 32), nn.ReLU()]
        for _ in range(48):
            layers += [nn.Linear(32, 32), nn.ReLU()]
        net = nn.Sequential(*layers, nn.Linear(32, 10))
        x = torch.randn(4096, 32, generator=g)
    else:
        net = Transformer()
        x = torch.randn(4096, 16, 16, generator=g)
    y = torch.randint(0, 10, (4096,), generator=g)
    return net, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)


class StepTimer(pl.Callback):
    """Wall time per step between the start of step 20 and the start of the last step."""

    def __init__(self, skip: int = 20):
        self.skip, self.starts = skip, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())

    def per_step(self) -> float:
        s = self.starts[self.skip :] if len(self.starts) >= self.skip + 2 else self.starts  # short runs: all
        return (s[-1] - s[0]) / max(1, len(s) - 1)


def fit(kind: str, variant: str, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    net, loader = make(kind)
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    if variant == "monitor_every_step":
        callbacks.append(GradientMonitor(log_every_n_steps=1, histogram_every_n_steps=0, warn=False))
    elif variant == "monitor_default":
        callbacks.append(GradientMonitor(log_every_n_steps=CADENCE, warn=False))
    elif variant == "monitor_default_no_step_check":
        callbacks.append(GradientMonitor(log_every_n_steps=CADENCE, nonfinite_check="logging_steps", warn=False))
    extra = variant if variant in ("lightning_grad_norm", "naive_histograms") else "none"
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            max_steps=steps, accelerator="cpu", logger=TensorBoardLogger(tmp, name="b"), callbacks=callbacks,
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
            log_every_n_steps=CADENCE, num_sanity_val_steps=0,
        )
        start = time.perf_counter()
        trainer.fit(Task(net, extra), train_dataloaders=loader)
        total = time.perf_counter() - start
    return timer.per_step(), total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write-readme", action="store_true", help="write the table into README.md")
    args = parser.parse_args()
    rows = []
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    variants = ["none", "monitor_every_step", "monitor_default", "monitor_default_no_step_check",
                "lightning_grad_norm", "naive_histograms"]
    print(f"{args.steps} steps, best of {args.repeats} interleaved runs, torch threads={torch.get_num_threads()}")
    print(f"{'model':<12} {'variant':<30} {'ms/step':>8} {'ratio':>7} {'fit s':>7}")
    for kind in ("mlp", "transformer"):
        fit(kind, "none", 30)  # warm-up
        best = {v: (float("inf"), float("inf")) for v in variants}
        for _ in range(args.repeats):
            for v in variants:
                step, total = fit(kind, v, args.steps)
                best[v] = (min(best[v][0], step), min(best[v][1], total))
        name = "mlp-50x32" if kind == "mlp" else "transformer"
        for v in variants:
            step, total = best[v]
            print(f"{name:<12} {v:<30} {1000 * step:>8.3f} {step / best['none'][0]:>7.3f} {total:>7.2f}", flush=True)
            rows.append(f"| {TITLES[kind] if v == 'none' else ''} | {LABELS[v]} | {1000 * step:.3f} | {step / best['none'][0]:.3f} |")
    if args.write_readme:
        cmd = f"python benchmarks/monitor_overhead.py --steps {args.steps} --repeats {args.repeats}"
        head = "| model | variant | ms/step | ratio |\n|---|---|---|---|"
        write_block("monitor-overhead", f"`{cmd}`, torch threads={torch.get_num_threads()}:\n\n{head}\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
