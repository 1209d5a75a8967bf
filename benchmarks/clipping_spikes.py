"""Clipping and step skipping under gradient spikes and a too-high learning rate, side by side in one run.

A 4-layer ReLU MLP (width 128) on scikit-learn's bundled digits (no download) is trained for ``--epochs``
epochs with ``GradientClipping`` variants, in two scenarios:

- ``spikes``: SGD (lr 0.05, momentum 0.9); on a random 3% of the optimizer steps (after step 150, when every adaptive rule has warmed up) the loss,
  hence the gradient, is multiplied by ``--spike`` (a corrupt batch, a numerically bad step).
- ``high lr``: the same model and SGD at lr 0.5 (10× the lr above), no injected spikes.

Variants: ``none``; ``norm`` (threshold 1); ``agc`` (λ 0.01); ``percentile`` (AutoClip, p10, warm-up at norm 1);
``zscore`` (ZClip's defaults); ``skip`` (no clipping, OLMo-core's rule: skip a step whose loss or gradient
norm is 6σ above its last-128-step mean, and steps with non-finite gradients); ``zscore+skip``.
For each: the final training loss (mean over the last epoch's steps that were finite, without the injected
factor) and the test accuracy, each the mean over the ``--seeds`` seeds whose weights stayed finite
(``diverged`` counts the others; ``-``: all diverged); ``skipped`` is the mean number of skipped steps.

    python benchmarks/clipping_spikes.py [--epochs 8] [--seeds 2] [--spike 1000] [--write-readme]

``--write-readme`` puts the printed table into README.md between the ``clipping_spikes`` markers.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import re
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_gradguard import GradientClipping
from lightning_gradguard.demo import DeepMLP, DigitsDataModule

VARIANTS = {
    "none": None,
    "norm": dict(algorithm="norm", threshold=1.0),
    "agc": dict(algorithm="agc", threshold=0.01),
    "percentile": dict(algorithm="percentile", warmup_threshold=1.0),
    "zscore": dict(algorithm="zscore"),
    "skip": dict(algorithm="none", skip_spikes="both", on_nonfinite="skip"),
    "zscore+skip": dict(algorithm="zscore", skip_spikes="both", on_nonfinite="skip"),
}
SCENARIOS = {"spikes": dict(lr=0.05, spikes=True), "high lr": dict(lr=0.5, spikes=False)}


class SpikyMLP(DeepMLP):
    """DeepMLP whose loss is multiplied by ``factor`` on the given optimizer steps; records the loss."""

    def __init__(self, spike_steps: frozenset, factor: float, **kwargs):
        super().__init__(**kwargs)
        self.spike_steps, self.factor, self.losses = spike_steps, factor, []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.losses.append(loss.detach())
        return loss * (self.factor if self.global_step in self.spike_steps else 1.0)


def run(variant: str, scenario: str, seed: int, epochs: int, factor: float) -> dict:
    pl.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(batch_size=32, seed=0)
    dm.setup("fit")
    steps = epochs * len(dm.train_dataloader())
    rng = random.Random(seed)
    spikes = frozenset(s for s in range(150, steps) if rng.random() < 0.03) if SCENARIOS[scenario]["spikes"] else frozenset()
    model = SpikyMLP(spikes, factor, input_shape=[1, 8, 8], num_classes=10, depth=4, width=128,
                     lr=SCENARIOS[scenario]["lr"], optimizer="sgd", momentum=0.9)
    options = VARIANTS[variant]
    clip = GradientClipping(**options) if options is not None else None
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, callbacks=[clip] if clip else [])
    trainer.fit(model, datamodule=dm)
    per_epoch = len(dm.train_dataloader())
    last = [float(v) for v in model.losses[-per_epoch:]]
    finite = [v for v in last if math.isfinite(v)]
    diverged = not all(torch.isfinite(p).all() for p in model.parameters())
    acc = 0.0 if diverged else trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]
    skipped = int(clip._skipper.skipped) if clip is not None and clip._skipper is not None else 0
    loss = sum(finite) / len(finite) if finite and not diverged else float("nan")
    return dict(loss=loss, acc=acc, skipped=skipped, diverged=diverged, spikes=len(spikes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--spike", type=float, default=1000.0)
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    rows = []
    for scenario in SCENARIOS:
        for variant in VARIANTS:
            results = [run(variant, scenario, seed, args.epochs, args.spike) for seed in range(args.seeds)]
            mean = lambda k: sum(r[k] for r in results) / len(results)  # noqa: E731
            alive = [r for r in results if not r["diverged"]]  # loss and accuracy over the seeds that did not diverge
            loss = sum(r["loss"] for r in alive) / len(alive) if alive else float("nan")
            acc = sum(r["acc"] for r in alive) / len(alive) if alive else float("nan")
            rows.append((scenario, variant, loss, acc, mean("skipped"), len(results) - len(alive), mean("spikes")))
    lines = [
        f"digits, 4x128 ReLU MLP, SGD momentum 0.9, {args.epochs} epochs, mean of {args.seeds} seeds; spikes: "
        f"loss x{args.spike:g} on ~3% of steps (lr 0.05); high lr: lr 0.5, no spikes",
        f"{'scenario':<9} {'variant':<12} {'final loss':>10} {'test acc':>9} {'skipped':>8} {'diverged':>9}",
    ]
    for scenario, variant, loss, acc, skipped, diverged, _ in rows:
        acc_text = f"{acc:.3f}" if math.isfinite(acc) else "-"
        lines.append(f"{scenario:<9} {variant:<12} {loss:>10.4g} {acc_text:>9} {skipped:>8.1f} {diverged:>6d}/{args.seeds}")
    spikes = [r[6] for r in rows if r[0] == "spikes"]
    lines.append(f"injected spikes per run: {spikes[0]:.1f} (mean); total time {time.perf_counter() - start:.0f} s")
    table = "\n".join(lines)
    print(table)
    if args.write_readme:
        readme = Path(__file__).resolve().parents[1] / "README.md"
        text = readme.read_text()
        command = "python benchmarks/clipping_spikes.py " + " ".join(
            f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
            for k, v in vars(args).items() if k != "write_readme") + " --write-readme"
        block = f"<!-- clipping_spikes:start -->\n```\n$ {command}\n{table}\n```\n<!-- clipping_spikes:end -->"
        new, n = re.subn(r"<!-- clipping_spikes:start -->.*?<!-- clipping_spikes:end -->", lambda _: block, text, flags=re.S)
        if n != 1:
            raise SystemExit("README.md has no <!-- clipping_spikes:start --> ... <!-- clipping_spikes:end --> markers")
        readme.write_text(new)


if __name__ == "__main__":
    main()
