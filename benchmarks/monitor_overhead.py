"""Step-time and memory overhead of GradientMonitor, measured side by side in one run.

Models: a deep MLP of many small layers (50 × 32, batch 32), a small transformer encoder (4 layers, d=64,
batch 32) and a deep wide MLP (48 × 256, batch 128). For each, the same training runs with: no monitoring;
GradientMonitor at the default cadence (every 50 steps, ``nonfinite_check="auto"``); Lightning's own
``grad_norm`` logged from ``on_before_optimizer_step`` every 50 steps; GradientMonitor every step (all
statistics: gradients, weights, update ratios, activations; histograms off); Lightning's ``grad_norm`` every
step. Variants are interleaved and repeated. From the start of step 20 on (fixed costs of fit start are outside
it), each run's steps are cut into windows of 50 consecutive steps, each holding exactly one logging step of the
default cadence (steps 20–69 hold step 50, and so on); a variant's time per step is the median, over the windows
of all its runs, of the window's mean step time (robust to bursts of load from other processes on a shared
machine, which a best-of-runs mean is not; every window still pays one whole logging step and what it leaves to
the next steps), and each is divided by that of "none".

Per model it also prints:

- the physical reference: one ``torch._foreach_norm`` pass over the model's gradients, in ms and as a
  share of a plain step (what any per-step look at the gradients costs at least);
- the statistics kernels alone (``GradStatsPlan.moments()``: every per-layer gradient statistic) against that
  one pass, timed the same way (best of 5 × 50 calls);
- the extra peak memory of a logging step: the peak of new allocations during step 50 (a logging step) with
  the monitor minus the same without it, both measured by a ``TorchDispatchMode`` that follows every
  tensor storage created during the step until it is freed, plus the monitor's persistent tensors (the packed
  buffer, and the per-row results and indices of its statistics plan); as a share of the parameters' memory,
  with the packed buffer's share and the rest per layer.

    python benchmarks/monitor_overhead.py [--steps 400] [--repeats 3] [--threads 1] [--accelerator cpu|gpu]
        [--write-readme] [--block monitor-overhead]

``--write-readme`` puts the table (markdown, with the command that made it) into README.md, block ``--block``
(``monitor-overhead``; the GPU run writes ``monitor-overhead-gpu``). ``--accelerator gpu`` trains on the first
CUDA GPU (data loaded on the CPU and moved by Lightning, as in most users' runs) and names the card; the
kernel timings then synchronize the device around each timed batch of calls. Issue #13's targets are CPU
targets; on a GPU the verdicts are printed for comparison.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
import weakref

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import grad_norm
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))  # this checkout's package
from benchmarks._readme import write_block  # noqa: E402
from lightning_gradguard import GradientMonitor  # noqa: E402
from lightning_gradguard.stats import MIN_CHUNK, GradStatsPlan, layer_groups  # noqa: E402

CADENCE = 50
VARIANTS = ["none", "monitor_default", "lightning_grad_norm_default", "monitor_every_step", "lightning_grad_norm_every_step"]
LABELS = {
    "none": "none",
    "monitor_default": "GradientMonitor, every 50 steps (default)",
    "lightning_grad_norm_default": "Lightning's `grad_norm`, every 50 steps",
    "monitor_every_step": "GradientMonitor, every step, all statistics",
    "lightning_grad_norm_every_step": "Lightning's `grad_norm`, every step",
}
#: issue #13's targets for the every-step ratio, per model
EVERY_STEP_TARGET = {"mlp-50x32": 1.5, "transformer": 1.2, "mlp-48x256": 1.3}
MODELS = {  # name: (title, batch size)
    "mlp-50x32": ("MLP, 50 layers × 32, batch 32", 32),
    "transformer": ("small transformer (4 layers, d=64), batch 32", 32),
    "mlp-48x256": ("MLP, 48 layers × 256, batch 128", 128),
}


class Task(pl.LightningModule):
    def __init__(self, net: nn.Module, lightning_every: int = 0):
        super().__init__()
        self.net, self.lightning_every = net, lightning_every

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def on_before_optimizer_step(self, optimizer):
        if self.lightning_every and self.global_step % self.lightning_every == 0:
            self.log_dict(grad_norm(self, norm_type=2))

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


def _mlp(depth: int, width: int, classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(width, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


def make(kind: str, n: int = 4096):
    g = torch.Generator().manual_seed(0)
    if kind == "mlp-50x32":
        net, x = _mlp(50, 32), torch.randn(n, 32, generator=g)
    elif kind == "mlp-48x256":
        net, x = _mlp(48, 256), torch.randn(n, 256, generator=g)
    else:
        net, x = Transformer(), torch.randn(n, 16, 16, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return net, DataLoader(TensorDataset(x, y), batch_size=MODELS[kind][1], shuffle=False)


class StepTimer(pl.Callback):
    """Wall time per step between the start of step 20 and the start of the last step."""

    def __init__(self, skip: int = 20):
        self.skip, self.starts = skip, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())

    def per_step(self) -> float:
        s = self.starts[self.skip :] if len(self.starts) >= self.skip + 2 else self.starts
        return (s[-1] - s[0]) / max(1, len(s) - 1)

    def windows(self, width: int = CADENCE) -> list[float]:
        """Mean step time of each window of ``width`` consecutive steps from step ``skip`` on (a run too short for
        one window: its mean step time)."""
        s = self.starts[self.skip :]
        return [(s[k + width] - s[k]) / width for k in range(0, len(s) - width, width)] or [self.per_step()]


class PeakMemory(TorchDispatchMode):
    """Bytes of tensor storages created while active and still alive; ``peak`` is their maximum. Outputs
    that alias an input (views, in-place results: the schema's ``alias_info``) are not new memory."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        fresh = out if len(returns) != 1 else [out]
        if isinstance(out, (tuple, list)) and len(returns) == len(out):
            fresh = [o for o, r in zip(out, returns) if r.alias_info is None]  # views and in-place results: no
        elif len(returns) == 1 and returns[0].alias_info is not None:           # new memory
            fresh = []
        for t in tree_leaves(fresh):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self._seen:
                    self._seen.add(key)
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key, st.nbytes())
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes


class PeakAt(pl.Callback):
    """The peak of new allocations during one step (forward, backward, optimizer step, every callback)."""

    def __init__(self, step: int):
        self.step, self.mode, self.peak = step, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.mode = PeakMemory()
            self.mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.peak, self.mode = self.mode.peak, None


def _callbacks(variant: str) -> list[pl.Callback]:
    if variant == "monitor_every_step":
        return [GradientMonitor(log_every_n_steps=1, histogram_every_n_steps=0, warn=False)]
    if variant == "monitor_default":
        return [GradientMonitor(log_every_n_steps=CADENCE, warn=False)]
    return []


ACCELERATOR = "cpu"  # set by --accelerator


def _device() -> torch.device:
    return torch.device("cuda" if ACCELERATOR == "gpu" else "cpu")


def _sync() -> None:
    if ACCELERATOR == "gpu":
        torch.cuda.synchronize()


def fit(kind: str, variant: str, steps: int, extra: list[pl.Callback] = ()) -> tuple[list[float], list[pl.Callback]]:
    torch.manual_seed(0)
    net, loader = make(kind)
    timer = StepTimer()
    callbacks = [timer, *_callbacks(variant), *extra]
    every = {"lightning_grad_norm_default": CADENCE, "lightning_grad_norm_every_step": 1}.get(variant, 0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            max_steps=steps, accelerator=ACCELERATOR, devices=1, logger=TensorBoardLogger(tmp, name="b"), callbacks=callbacks,
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
            log_every_n_steps=CADENCE, num_sanity_val_steps=0,
        )
        trainer.fit(Task(net, every), train_dataloaders=loader)
    return timer.windows(), callbacks


def _best_call(fn, calls: int = 50, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def kernels(kind: str) -> tuple[float, float, int]:
    """(one _foreach_norm pass, GradStatsPlan.moments(), parameter bytes) on the model's real gradients."""
    torch.manual_seed(0)
    net, loader = make(kind)
    net = net.to(_device())
    x, y = (t.to(_device()) for t in next(iter(loader)))
    F.cross_entropy(net(x), y).backward()
    grads = [p.grad for p in net.parameters()]
    plan = GradStatsPlan(layer_groups(net, sample_input=x))
    norm = _best_call(lambda: torch._foreach_norm(grads, 2))
    stats = _best_call(plan.moments)
    return norm, stats, sum(p.numel() * p.element_size() for p in net.parameters())


def memory(kind: str) -> tuple[int, int, int, int]:
    """(extra peak bytes of logging step 50 with the default monitor vs without, its packed buffers, its other
    persistent tensors (per-row results, indices), layers)."""
    peaks = {}
    persistent = kept = layers = 0
    for variant in ("none", "monitor_default"):
        probe = PeakAt(CADENCE)
        _, callbacks = fit(kind, variant, CADENCE + 2, [probe])
        peaks[variant] = probe.peak or 0
        for cb in callbacks:
            if isinstance(cb, GradientMonitor):
                sizes = [plan.memory() for plan in cb._plans.values()]
                persistent, kept = sum(p for p, _ in sizes), sum(k for _, k in sizes)
                layers = len(cb.groups)
    return peaks["monitor_default"] - peaks["none"], persistent, kept, layers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--write-readme", action="store_true", help="write the table into README.md")
    parser.add_argument("--block", default=None,
                        help="README block to write (default: monitor-overhead, or monitor-overhead-gpu on a GPU)")
    args = parser.parse_args()
    global ACCELERATOR
    ACCELERATOR = args.accelerator
    if ACCELERATOR == "gpu" and not torch.cuda.is_available():
        parser.error("--accelerator gpu: no CUDA GPU is visible")
    torch.set_num_threads(args.threads)
    where = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}" if ACCELERATOR == "gpu"
             else f"CPU, torch threads={torch.get_num_threads()}")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    rows, notes = [], []
    verdicts: dict[str, list[str]] = {"default": [], "every": [], "kernels": [], "lightning": [], "memory": []}
    print(f"{args.steps} steps, {args.repeats} interleaved runs, median of 50-step windows, "
          f"{where}")
    print(f"{'model':<12} {'variant':<32} {'ms/step':>8} {'ratio':>7}")
    for kind in args.models.split(","):
        fit(kind, "none", 30)  # warm-up
        windows: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(args.repeats):
            for v in VARIANTS:
                windows[v] += fit(kind, v, args.steps)[0]
        best = {v: statistics.median(w) for v, w in windows.items()}
        base = best["none"]
        for v in VARIANTS:
            print(f"{kind:<12} {v:<32} {1000 * best[v]:>8.3f} {best[v] / base:>7.3f}", flush=True)
            rows.append(f"| {MODELS[kind][0] if v == 'none' else ''} | {LABELS[v]} | {1000 * best[v]:.3f} | {best[v] / base:.3f} |")
        ok = lambda good: "met" if good else "not met"  # noqa: E731
        d, e, lt = best["monitor_default"] / base, best["monitor_every_step"] / base, best["lightning_grad_norm_default"] / base
        verdicts["default"].append(f"{kind} {d:.3f}× ({ok(d <= 1.02)})")
        verdicts["every"].append(f"{kind} {e:.3f}× ≤ {EVERY_STEP_TARGET[kind]}× ({ok(e <= EVERY_STEP_TARGET[kind])})")
        verdicts["lightning"].append(f"{kind} {d:.3f}× vs {lt:.3f}× ({'cheaper' if d < lt else 'not cheaper'})")
        norm, stats, param_bytes = kernels(kind)
        verdicts["kernels"].append(f"{kind} {stats / norm:.2f}× ({ok(stats / norm <= 3.0)})")
        extra, persistent, kept, layers = memory(kind)
        extra += kept
        note = (
            f"{kind}: one `_foreach_norm` pass over the gradients {1000 * norm:.3f} ms = {100 * norm / base:.1f}% of a "
            f"plain step; all gradient statistics (`GradStatsPlan.moments`) {1000 * stats:.3f} ms = "
            f"{stats / norm:.2f}× that pass; extra peak memory of a logging step {(extra + persistent) / 1024:.1f} KiB "
            f"= {100 * (extra + persistent) / param_bytes:.1f}% of the parameters' {param_bytes / 1024:.0f} KiB "
            f"({persistent / 1024:.1f} KiB packed buffer = {100 * persistent / param_bytes:.1f}% + {extra / 1024:.1f} KiB "
            f"of per-layer and per-row values and indices, kept or made during the step = {extra / max(layers, 1):.0f} "
            f"bytes per layer of {layers})"
        )
        print(note, flush=True)
        notes.append(f"- {note}")
        verdicts["memory"].append(f"{kind} packed buffer {100 * persistent / param_bytes:.1f}% "
                                  f"({ok(persistent <= max(0.1 * param_bytes, MIN_CHUNK * 4))}) + {extra / max(layers, 1):.0f} "
                                  f"bytes per layer")
    targets = [
        "Issue #13's targets, from the numbers above:",
        "- default cadence ≤ 1.02×: " + "; ".join(verdicts["default"]),
        "- every step, all statistics: " + "; ".join(verdicts["every"]),
        "- statistics kernels ≤ 3× one `_foreach_norm` pass: " + "; ".join(verdicts["kernels"]),
        "- cheaper than Lightning's `grad_norm` at the same cadence: " + "; ".join(verdicts["lightning"]),
        "- extra peak memory ≤ 10% of the parameters (packed buffer, at least 16 KiB) plus O(layers): "
        + "; ".join(verdicts["memory"]),
    ]
    print("\n".join(targets), flush=True)
    if args.write_readme:
        cmd = (f"python benchmarks/monitor_overhead.py --steps {args.steps} --repeats {args.repeats} "
               f"--threads {args.threads}" + (" --accelerator gpu" if ACCELERATOR == "gpu" else ""))
        head = "| model | variant | ms/step | ratio |\n|---|---|---|---|"
        block = args.block or ("monitor-overhead-gpu" if ACCELERATOR == "gpu" else "monitor-overhead")
        write_block(block, f"`{cmd}` ({where}; ms/step: median over "
                    f"50-step windows, each holding one logging step of the default cadence, of {args.repeats} "
                    f"interleaved runs):\n\n{head}\n"
                    + "\n".join(rows) + "\n\n" + "\n".join(notes) + "\n\n" + "\n".join(targets))


if __name__ == "__main__":
    main()
