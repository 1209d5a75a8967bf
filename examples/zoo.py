"""The GradGuard zoo: models that do not train, each fitted without remedies and with ``GradGuard()``.

Same seed, same data, same budget (20 epochs) for both; prints a table of test accuracies and what
GradGuard decided. Data: the bundled digits (MLPs, CNN) and a synthetic 100-step sequence task (RNN).

    python examples/zoo.py [--epochs 20] [--only sigmoid20,rnn] [--write-readme]

``--write-readme`` puts the table into README.md (block ``zoo``); only a full run (all models, 20 epochs,
seed 0) may do that.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import warnings
from typing import Any, Callable

import lightning.pytorch as pl
import torch

from lightning_gradguard import GradGuard
from lightning_gradguard.demo import DeepMLP, DigitsDataModule, SequenceDataModule, SmallCNN, VanillaRNN

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from benchmarks._readme import write_block  # noqa: E402

ZOO: dict[str, tuple[str, Callable[[], pl.LightningModule], Callable[[], pl.LightningDataModule]]] = {
    "sigmoid20": ("20-layer sigmoid MLP", lambda: DeepMLP(depth=20, activation="sigmoid"), DigitsDataModule),
    "tanh30": ("30-layer tanh MLP", lambda: DeepMLP(depth=30, activation="tanh"), DigitsDataModule),
    "relu30_bad_init": ("30-layer ReLU MLP, N(0,1) init", lambda: DeepMLP(depth=30, activation="relu", init_std=1.0), DigitsDataModule),
    "selu50": ("50-layer SELU MLP, default init", lambda: DeepMLP(depth=50, activation="selu"), DigitsDataModule),
    "rnn": ("vanilla ReLU RNN, 100 steps", lambda: VanillaRNN(), SequenceDataModule),
    "healthy_mlp": ("healthy: 2-layer ReLU MLP", lambda: DeepMLP(), DigitsDataModule),
    "healthy_cnn": ("healthy: small CNN", lambda: SmallCNN(), DigitsDataModule),
}


def fit(make_model: Callable, make_data: Callable, epochs: int, guard: bool, seed: int) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    model, data = make_model(), make_data()
    gg = GradGuard(monitor=False, verbose=False) if guard else None
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, callbacks=[gg] if gg else [],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    result = trainer.test(model, datamodule=data, verbose=False)[0]
    applied = [d.remedy for d in gg.decisions if d.status in ("applied", "forced")] if gg else []
    return {"acc": result["test/acc"], "loss": result["test/loss"], "seconds": seconds, "applied": applied,
            "cost": gg.cost_seconds / seconds if gg else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="comma-separated zoo keys: " + ",".join(ZOO))
    parser.add_argument("--write-readme", action="store_true", help="write the table into README.md (block 'zoo')")
    args = parser.parse_args()
    if args.write_readme and (args.only or args.epochs != 20 or args.seed != 0):
        raise SystemExit("--write-readme: only the full zoo (no --only, --epochs 20, --seed 0) goes into README")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # one thread: on a shared 2-core machine two threads per process oversubscribe
    keys = [k for k in (args.only.split(",") if args.only else ZOO) if k]
    unknown = [k for k in keys if k not in ZOO]
    if unknown:
        raise SystemExit(f"--only: unknown {unknown}; choose from {', '.join(ZOO)}")
    lines = [f"{'model':<34} {'baseline':>9} {'GradGuard':>10} {'probe cost':>11}  remedies applied"]
    print(lines[0])
    for key in keys:
        title, make_model, make_data = ZOO[key]
        base = fit(make_model, make_data, args.epochs, False, args.seed)
        guarded = fit(make_model, make_data, args.epochs, True, args.seed)
        b = f"{base['acc']:.4f}" + ("*" if not math.isfinite(base["loss"]) else "")
        lines.append(f"{title:<34} {b:>9} {guarded['acc']:>10.4f} {guarded['cost']:>10.0%}  {', '.join(guarded['applied'])}")
        print(lines[-1], flush=True)
    lines.append("* loss NaN (diverged). Test accuracy on the held-out split; chance is 0.10 (digits), 0.25 (sequences).")
    print(lines[-1])
    if args.write_readme:
        write_block("zoo", "```\n" + "\n".join(lines) + "\n```")


if __name__ == "__main__":
    main()
