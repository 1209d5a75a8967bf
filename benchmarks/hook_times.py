"""Where a GradientMonitor's time goes: host time inside each of its hooks, on logging and other steps.

A diagnostic, not a ratio: ``monitor_overhead.py`` measures what the monitor costs; this says in which hook.
Trains ``monitor_overhead.py``'s models (the same data, optimizer and Lightning settings) with
``GradientMonitor`` at the default cadence (every 50 steps), wraps each of its Lightning hooks in a timer, and
prints the mean host time per step of each hook, separately for logging steps and for the others, next to the
mean time of a whole step of each kind. On a GPU a hook's host time is mostly the time to launch its kernels
(none of them waits for the device, but a full launch queue can make a launch wait); the writer thread's work is
not in any hook.

    python benchmarks/hook_times.py [--models mlp-50x32] [--steps 300] [--accelerator cpu|gpu] [--threads 1]

The same model is first trained without the monitor: a plain step's mean time, from step 20 on, is the base
that each kind of step is compared with (one run of each, one after the other: a diagnostic, noisy on a shared
machine).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package
from benchmarks.monitor_overhead import CADENCE, MODELS, Task, make  # noqa: E402
from lightning_gradguard import GradientMonitor  # noqa: E402

SKIP = 20
HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_zero_grad",
         "on_before_optimizer_step", "on_train_batch_end")


class Timed(GradientMonitor):
    """``GradientMonitor`` whose hooks add their host time to ``times[(kind, hook)]``; kind is ``logging`` for a
    step whose number is a multiple of the cadence, ``other`` otherwise."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.times: dict[tuple[str, str], float] = defaultdict(float)
        self.starts: list[float] = []
        self.kinds: list[str] = []
        self.step = 0

    def _kind(self, trainer) -> str:
        return "logging" if trainer.global_step % self.log_every_n_steps == 0 else "other"


class Starts(pl.Callback):
    """The start time of every step (the plain run's step times)."""

    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())


def _wrap(name: str):
    def hook(self, trainer, *args, **kwargs):
        if name == "on_train_batch_start":  # the step's number and kind, kept for its later hooks (global_step
            self.starts.append(time.perf_counter())  # moves on at the optimizer step)
            self.kinds.append(self._kind(trainer))
            self.step = trainer.global_step
        kind = self.kinds[-1] if self.kinds else self._kind(trainer)
        start = time.perf_counter()
        try:
            return getattr(GradientMonitor, name)(self, trainer, *args, **kwargs)
        finally:
            if self.step >= SKIP:  # fit start's fixed costs (first plans, buffers) left out
                self.times[(kind, name)] += time.perf_counter() - start
    return hook


for _name in HOOKS:
    setattr(Timed, _name, _wrap(_name))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="mlp-50x32", help="comma-separated subset of: " + ", ".join(MODELS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        parser.error("--accelerator gpu: no CUDA GPU is visible")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    where = torch.cuda.get_device_name() if args.accelerator == "gpu" else f"CPU, torch threads={torch.get_num_threads()}"
    print(f"{where}; GradientMonitor every {CADENCE} steps; steps from 20 on; ms per step of each kind")
    for kind in args.models.split(","):
        monitor, plain = Timed(log_every_n_steps=CADENCE, warn=False), Starts()
        for callback in (plain, monitor):
            torch.manual_seed(0)
            net, loader = make(kind)
            with tempfile.TemporaryDirectory() as tmp:
                trainer = pl.Trainer(max_steps=args.steps, accelerator=args.accelerator, devices=1,
                                     logger=TensorBoardLogger(tmp, name="h"), callbacks=[callback],
                                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                                     log_every_n_steps=CADENCE, num_sanity_val_steps=0)
                trainer.fit(Task(net), train_dataloaders=loader)
        s = plain.starts[SKIP:]
        base = 1000 * (s[-1] - s[0]) / max(len(s) - 1, 1)
        # whole steps: from one step's start to the next, from step 20 on (fit start's fixed costs left out)
        spans = defaultdict(list)
        for k in range(SKIP, len(monitor.starts) - 1):  # the last step has no next start: left out
            spans[monitor.kinds[k]].append(monitor.starts[k + 1] - monitor.starts[k])
        counts = {k: sum(1 for s in monitor.kinds[SKIP:] if s == k) for k in ("logging", "other")}
        print(f"\n{kind}: {counts['logging']} logging steps, {counts['other']} others (from step {SKIP} on); "
              f"a step without the monitor {base:.3f} ms")
        for step_kind in ("logging", "other"):
            whole = 1000 * sum(spans[step_kind]) / max(len(spans[step_kind]), 1)
            parts = {h: 1000 * monitor.times[(step_kind, h)] / max(counts[step_kind], 1) for h in HOOKS}
            inside = sum(parts.values())
            print(f"  {step_kind:<8} whole step {whole:8.3f} ms (+{whole - base:.3f}); in the monitor's hooks "
                  f"{inside:7.3f} ms: " + ", ".join(f"{h.replace('on_', '')} {v:.3f}" for h, v in parts.items() if v >= 0.0005)
                  + f"; elsewhere (forward hooks, writer thread, Lightning) {whole - base - inside:+.3f} ms")


if __name__ == "__main__":
    main()
