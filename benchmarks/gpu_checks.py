"""Host syncs on a CUDA GPU: every sync while training, counted and attributed to the code that made it.

Each configuration trains a small classifier (a 12-layer MLP whose hidden layers all share one ``nn.ReLU``,
then a ``Tanh``; data already on the GPU, so Lightning's batch transfer is no copy) with a real
``lightning.Trainer`` for ``--steps`` steps. From the second step on (the first moves the clippers' state to the
GPU and creates the optimizer state), CUDA's sync debug mode is ``"warn"`` for the rest of fit: every
synchronizing CUDA operation (``.item()``, a blocking copy, ``synchronize``) raises a warning, which is counted
with the Python stack that made it, and with its phase: during the steps, or at the end of fit (from
``on_train_end`` on: the writers' flush, the final report, Lightning moving the model and optimizer state back to
the CPU), where waiting for the device is expected.

A sync is gradguard's when any frame of that stack is in ``lightning_gradguard/`` (the training thread's hooks,
the forward hooks and the background writer thread alike). That errs on the side of blaming gradguard: under
step skipping, ``StepSkipper`` wraps ``optimizer.step``, so Lightning's closure (forward, backward, the other
callbacks' hooks) runs below a gradguard frame and its syncs would count as gradguard's. Otherwise a sync is
Lightning's or torch's own, e.g. Lightning reading the values logged with ``self.log`` every
``Trainer(log_every_n_steps)`` steps (50 by default), or the GradScaler's check under 16-mixed. Some of those are
caused by gradguard: ``GradientClipping`` logs its scalars with ``self.log``, and Lightning reads each one with
``.item()`` on its own logging steps (the 40-step configurations end before Lightning's first one, at step 50).
The same model without any gradguard callback is the baseline of those.

Configurations: ``GradientMonitor`` logging every step (all statistics, activations included) with
``GradientClipping("percentile", on_nonfinite="skip")`` (issue #13's check), the monitor at its default cadence
alone, every clipping algorithm under ``on_nonfinite="skip"`` and ``"warn"``, step skipping on spikes
(``skip_mode="auto"`` and ``"restore"``), ``on_nonfinite="raise"`` (documented to read one flag per step) and
16-mixed with the GradScaler.

    python benchmarks/gpu_checks.py [--steps 200] [--short-steps 40] [--write-readme] [--dry-run]

``--write-readme`` writes the table, with the card's name and the versions, into README.md, block
``gpu-checks``. Needs a CUDA GPU (it says so and exits 2 without one); ``--dry-run`` trains every configuration
on the CPU without the check (what can be tried before a GPU is at hand). Exit status 1 when gradguard code
synced anywhere but under ``on_nonfinite="raise"``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package
from benchmarks._readme import write_block  # noqa: E402
from benchmarks.monitor_overhead import Task  # noqa: E402
from lightning_gradguard import GradientClipping, GradientMonitor  # noqa: E402

ARM_AT = 1  # after the first step (it moves clipping state to the GPU and builds the optimizer state)
PACKAGE = str(ROOT / "lightning_gradguard")


class SharedActMLP(nn.Module):
    """12 Linear layers, the hidden ones all followed by the same ``nn.ReLU`` module, then Tanh before the head.
    Trained by ``monitor_overhead.py``'s ``Task`` (cross-entropy, SGD with momentum: tensor optimizer state)."""

    def __init__(self, width: int = 64, depth: int = 12):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(32 if k == 0 else width, width) for k in range(depth - 1)])
        self.act, self.last_act = nn.ReLU(), nn.Tanh()
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        for k, layer in enumerate(self.layers):
            x = (self.last_act if k == len(self.layers) - 1 else self.act)(layer(x))
        return self.head(x)


class SyncCounter(pl.Callback):
    """Turns sync debug mode to ``warn`` from step ``ARM_AT`` to the end of fit and records every sync warning
    with the stack that raised it (first in the callback list, so it is armed before the others' hooks). It stays
    armed after fit's last hook (the writers' flush at the end of fit and at teardown included) until
    :meth:`disarm`."""

    def _show(self, message, category, filename, lineno, file=None, line=None):
        if "synchronizing CUDA operation" not in str(message):
            return
        stack = traceback.extract_stack()[:-1]
        mine = [f for f in stack if f.filename.startswith(PACKAGE)]
        if mine:
            f = mine[-1]
            self.ours[self.phase][f"{Path(f.filename).relative_to(ROOT)}:{f.lineno} ({f.name})"] += 1
        else:
            outer = [f for f in stack if "warnings.py" not in f.filename and f.filename != __file__]
            f = outer[-1] if outer else stack[-1]
            where = f.filename.split("site-packages/")[-1]
            self.other[self.phase][f"{where}:{f.lineno} ({f.name})"] += 1

    def __init__(self, dry_run: bool = False):
        self.dry_run = dry_run
        self.armed_steps = 0
        self.phase = "steps"
        self.ours: dict[str, Counter[str]] = {"steps": Counter(), "end": Counter()}
        self.other: dict[str, Counter[str]] = {"steps": Counter(), "end": Counter()}
        self._catch = None

    def on_train_end(self, trainer, pl_module):
        self.phase = "end"  # first in the callback list: every other callback's end-of-fit work comes after

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.dry_run:
            return
        if trainer.global_step == ARM_AT and self._catch is None:
            torch.cuda.synchronize()
            self._catch = warnings.catch_warnings()
            self._catch.__enter__()
            warnings.simplefilter("always")
            warnings.showwarning = self._show
            torch.cuda.set_sync_debug_mode("warn")
        if self._catch is not None:
            self.armed_steps += 1

    def disarm(self):
        if self._catch is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._catch.__exit__(None, None, None)
            self._catch = None


def configurations(steps: int, short: int) -> list[tuple[str, int, dict, list]]:
    """(label, steps, Trainer kwargs, callback factories)."""
    every = lambda: GradientMonitor(log_every_n_steps=1, histogram_every_n_steps=0, warn=False)  # noqa: E731
    out = [
        ("no gradguard callback (baseline)", steps, {}, []),
        ("monitor every step + percentile clipping, on_nonfinite=skip (issue #13)", steps, {},
         [every, lambda: GradientClipping("percentile", warmup_steps=3, on_nonfinite="skip")]),
        ("monitor at its default cadence (every 50 steps) alone", steps, {}, [lambda: GradientMonitor()]),
    ]
    for algorithm in ("value", "norm", "agc", "percentile", "zscore", "none"):
        for mode in ("skip", "warn"):
            if algorithm == "percentile" and mode == "skip":
                continue  # the run above
            kw = {"threshold": 0.5} if algorithm in ("value", "norm") else {}
            out.append((f"monitor every step + {algorithm} clipping, on_nonfinite={mode}", short, {},
                        [every, lambda a=algorithm, m=mode, kw=kw: GradientClipping(a, on_nonfinite=m, **kw)]))
    for skip_mode in ("auto", "restore"):
        out.append((f"monitor every step + norm clipping, skip_spikes=both, skip_mode={skip_mode}", short, {},
                    [every, lambda s=skip_mode: GradientClipping("norm", skip_spikes="both", skip_window=8,
                                                                 skip_mode=s, on_nonfinite="skip")]))
    out.append(("monitor every step + norm clipping, on_nonfinite=raise (reads a flag every step, documented)",
                short, {}, [every, lambda: GradientClipping("norm", on_nonfinite="raise")]))
    out.append(("no gradguard callback, 16-mixed (baseline)", short, {"precision": "16-mixed"}, []))
    out.append(("monitor every step + norm clipping, on_nonfinite=skip, 16-mixed", short, {"precision": "16-mixed"},
                [every, lambda: GradientClipping("norm", on_nonfinite="skip")]))
    return out


def run(steps: int, trainer_kwargs: dict, factories: list, dry_run: bool = False) -> tuple[SyncCounter, float, int]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n = 32 * steps
    device = "cpu" if dry_run else "cuda"
    x = torch.randn(n, 32, generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    counter = SyncCounter(dry_run)
    if dry_run:
        trainer_kwargs = {k: ("bf16-mixed" if v == "16-mixed" else v) for k, v in trainer_kwargs.items()}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(max_steps=steps, accelerator="cpu" if dry_run else "gpu", devices=1, logger=TensorBoardLogger(tmp, name="g"),
                             callbacks=[counter, *(f() for f in factories)], enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                             **trainer_kwargs)
        start = time.perf_counter()
        try:
            trainer.fit(Task(SharedActMLP()), train_dataloaders=loader)
        finally:
            counter.disarm()
        seconds = time.perf_counter() - start
    return counter, seconds, trainer.global_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200, help="steps of the issue's run and the baselines")
    parser.add_argument("--short-steps", type=int, default=40, help="steps of every other configuration")
    parser.add_argument("--write-readme", action="store_true", help="write the table into README.md")
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU, no sync check (16-mixed as bf16-mixed): only that every configuration trains")
    args = parser.parse_args()
    if args.dry_run:
        for label, steps, kwargs, factories in configurations(args.steps, args.short_steps):
            _, seconds, done = run(steps, kwargs, factories, dry_run=True)
            print(f"{label}: {done} steps, {seconds:.1f} s (dry run: no sync check)", flush=True)
        return
    if not torch.cuda.is_available():
        print("gpu_checks.py needs a CUDA GPU; none is visible")
        raise SystemExit(2)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    card = torch.cuda.get_device_name()
    head = (f"{card}, torch {torch.__version__}, lightning {lightning.__version__}; sync debug mode `warn` from step "
            f"{ARM_AT} to the end of fit (teardown included)")
    print(head)
    rows, failures = [], []
    def cell(c: Counter, top: int) -> str:
        return f"{sum(c.values())}" + (" (" + "; ".join(f"`{k}` ×{v}" for k, v in c.most_common(top)) + ")" if c else "")

    for label, steps, kwargs, factories in configurations(args.steps, args.short_steps):
        counter, seconds, done = run(steps, kwargs, factories)
        cells = [cell(counter.ours["steps"], 3), cell(counter.ours["end"], 2), cell(counter.other["steps"], 2),
                 cell(counter.other["end"], 2)]
        print(f"{label}: {done} steps, {counter.armed_steps} checked; gradguard syncs during steps {cells[0]}, at the "
              f"end of fit {cells[1]}; other syncs during steps {cells[2]}, at the end of fit {cells[3]}; {seconds:.1f} s",
              flush=True)
        rows.append(f"| {label} | {counter.armed_steps} | " + " | ".join(cells) + " |")
        if counter.ours["steps"] and "raise" not in label:
            failures.append(label)
    verdict = ("no gradguard code synced during the steps of any configuration except `on_nonfinite=\"raise\"`"
               if not failures else "gradguard code synced during the steps of: " + "; ".join(failures))
    print(verdict)
    if args.write_readme:
        cmd = f"python benchmarks/gpu_checks.py --steps {args.steps} --short-steps {args.short_steps}"
        table = ("| configuration | steps checked | gradguard syncs, during the steps | gradguard syncs, end of fit | "
                 "other syncs, during the steps | other syncs, end of fit |\n|---|---|---|---|---|---|\n" + "\n".join(rows))
        write_block("gpu-checks", f"`{cmd}` on {head}:\n\n{table}\n\nVerdict: {verdict}.")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
