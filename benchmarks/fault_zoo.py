"""Fault-injection zoo: does ``GradientMonitor`` name the cause (recall), and stay quiet on healthy runs?

Each case trains a small network on scikit-learn's digits (bundled, no download) for ``--steps`` optimizer
steps with a ``GradientMonitor`` at ``log_every_n_steps=10`` and its default thresholds. Faults are injected
on purpose; each has an expected finding kind and, where one layer is at fault, the layer. A fault counts
as found when a finding of that kind (at that layer) appears; the step of that finding is the step of first
detection. Healthy runs count a false alarm for any finding at all.

    python benchmarks/fault_zoo.py                 # all 21 cases × seeds 0 1 2, 200 steps each (a few minutes)
    python benchmarks/fault_zoo.py --quick         # 4 cases, seed 0, 60 steps (used by the test suite)
    python benchmarks/fault_zoo.py --write-readme  # also writes the table into README.md between the
                                                   # <!-- fault_zoo:start --> / <!-- fault_zoo:end --> markers
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_gradguard import GradientMonitor
from lightning_gradguard.demo import DigitsDataModule

CADENCE = 10
README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- fault_zoo:start -->", "<!-- fault_zoo:end -->"


# ------------------------------------------------------------------------------------------------ faults
class LogOfInput(nn.Module):
    """``log(x)`` of a ReLU output: log of 0 gives -inf, the next layer turns it into NaN (a forward fault)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


class _NaNBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, on: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.on = on
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return (g * float("nan") if ctx.on else g), None


class NaNInBackward(nn.Module):
    """Identity in forward; from training step ``start`` on, its backward returns NaN (a backward fault,
    e.g. the derivative of sqrt at 0): the layer before it is the one nearest the loss with NaN gradients."""

    def __init__(self, start: int) -> None:
        super().__init__()
        self.start, self.calls = start, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
        return _NaNBackward.apply(x, self.training and self.calls > self.start)


def mlp(depth: int, width: int = 64, act: str = "relu", bn: bool = False, init_std: Optional[float] = None,
        insert: Optional[dict[int, nn.Module]] = None) -> nn.Sequential:
    """``Flatten, (Linear, [BN], act) × depth, Linear``; ``insert[i]`` goes right before the i-th Linear (0-based)."""
    acts = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "gelu": nn.GELU, "elu": nn.ELU}
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = 64
    for i in range(depth + 1):
        if insert and i in insert:
            layers.append(insert[i])
        out = width if i < depth else 10
        layers.append(nn.Linear(fan_in, out))
        if i < depth:
            if bn:
                layers.append(nn.BatchNorm1d(width))
            layers.append(acts[act]())
        fan_in = out
    net = nn.Sequential(*layers)
    if init_std is not None:
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, init_std)
                    m.bias.zero_()
    return net


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4, 10),
    )


def linear_names(net: nn.Sequential) -> list[str]:
    return [f"net.{i}" for i, m in enumerate(net) if isinstance(m, (nn.Linear, nn.Conv2d))]


class ZooModule(pl.LightningModule):
    """Cross-entropy on digits with knobs for the faults: optimizer, input scale, a wrong loss, frozen or
    forgotten layers."""

    def __init__(self, net: nn.Module, lr: float, optimizer: str = "sgd", momentum: float = 0.9,
                 input_scale: float = 1.0, loss: str = "ce", leave_out: Optional[str] = None) -> None:
        super().__init__()
        self.net, self.lr, self.opt, self.momentum = net, lr, optimizer, momentum
        self.input_scale, self.loss_kind, self.leave_out = input_scale, loss, leave_out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.net(x * self.input_scale)
        if self.loss_kind == "softmax_twice":  # cross_entropy applies log-softmax again on probabilities
            logits = torch.softmax(logits, dim=1)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for n, p in self.named_parameters()
                  if p.requires_grad and not (self.leave_out and n.startswith(self.leave_out + "."))]
        if self.opt == "adam":
            return torch.optim.Adam(params, lr=self.lr)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)


@dataclass
class Case:
    name: str
    description: str
    build: Callable[[], ZooModule]
    kind: Optional[str] = None  # None: a healthy run
    layer: Optional[str] = None
    quick: bool = False


def _frozen(net: nn.Sequential, name: str) -> nn.Sequential:
    for p in net.get_submodule(name.split(".", 1)[1]).parameters():
        p.requires_grad_(False)
    return net


def _scaled(net: nn.Sequential, index: int, factor: float) -> nn.Sequential:
    with torch.no_grad():
        net[index].weight.mul_(factor)
    return net


def _bias(net: nn.Sequential, index: int, value: float) -> nn.Sequential:
    with torch.no_grad():
        net[index].bias.fill_(value)
    return net


CASES: list[Case] = [
    # healthy runs: any finding is a false alarm
    Case("healthy_relu_mlp", "2×64 ReLU MLP, SGD 0.05 momentum", lambda: ZooModule(mlp(2), 0.05), quick=True),
    Case("healthy_tanh_adam", "4×64 tanh MLP, Adam 1e-3", lambda: ZooModule(mlp(4, act="tanh"), 1e-3, "adam")),
    Case("healthy_bn_relu", "8×64 ReLU MLP with BatchNorm, SGD 0.05", lambda: ZooModule(mlp(8, bn=True), 0.05)),
    Case("healthy_cnn", "2-conv CNN with BatchNorm, SGD 0.05", lambda: ZooModule(cnn(), 0.05)),
    Case("healthy_gelu_adam", "3×128 GELU MLP, Adam 3e-4", lambda: ZooModule(mlp(3, 128, "gelu"), 3e-4, "adam")),
    Case("healthy_elu_sgd", "6×64 ELU MLP, SGD 0.02", lambda: ZooModule(mlp(6, act="elu"), 0.02)),
    Case("healthy_wide_sgd", "2×256 ReLU MLP, plain SGD 0.1", lambda: ZooModule(mlp(2, 256), 0.1, momentum=0.0)),
    Case("healthy_tanh_sgd", "3×64 tanh MLP, SGD 0.05 momentum", lambda: ZooModule(mlp(3, act="tanh"), 0.05)),
    # faults
    Case("vanishing_sigmoid", "20×64 sigmoid MLP (vanishing by depth)", lambda: ZooModule(mlp(20, act="sigmoid"), 0.02),
         "vanishing"),
    Case("exploding_init", "16×64 ReLU MLP, weights N(0, 1), SGD 0.05", lambda: ZooModule(mlp(16, init_std=1.0), 0.05),
         "exploding", quick=True),
    Case("exploding_lr", "4×64 ReLU MLP, SGD lr 3 (exploding by learning rate)", lambda: ZooModule(mlp(4), 3.0),
         "exploding"),
    Case("nan_forward", "log of 0 on the input of the 3rd Linear (forward)",
         lambda: ZooModule(mlp(4, insert={2: LogOfInput()}), 0.05), "nonfinite", "net.6"),
    Case("nan_backward", "NaN from the backward of an op after the 3rd Linear, from step 43",
         lambda: ZooModule(mlp(4, insert={3: NaNInBackward(43)}), 0.05), "nonfinite", "net.5", quick=True),
    Case("dead_relu_bias", "bias −20 on the 2nd Linear: its ReLUs are dead",
         lambda: ZooModule(_bias(mlp(4), 3, -20.0), 0.05), "dead_relu", "net.3"),
    Case("saturation", "6×64 tanh MLP, 3rd Linear's weights ×30",
         lambda: ZooModule(_scaled(mlp(6, act="tanh"), 5, 30.0), 0.02), "saturation", "net.5"),
    Case("lr_oscillation", "2×64 ReLU MLP, SGD lr 0.5 momentum 0.9 (learning rate too high)",
         lambda: ZooModule(mlp(2), 0.5), "oscillation"),
    Case("lr_too_low", "2×64 ReLU MLP, SGD lr 1e-5, no momentum", lambda: ZooModule(mlp(2), 1e-5, momentum=0.0),
         "not_converging"),
    Case("unnormalized_inputs", "2×64 ReLU MLP, inputs ×255 (unnormalized)", lambda: ZooModule(mlp(2), 0.05, input_scale=255.0),
         "unnormalized_input", "net.1"),
    Case("frozen_by_mistake", "4×64 ReLU MLP, 3rd Linear requires_grad=False",
         lambda: ZooModule(_frozen(mlp(4), "net.5"), 0.05), "frozen", "net.5", quick=True),
    Case("not_in_optimizer", "4×64 ReLU MLP, configure_optimizers leaves out the 2nd Linear",
         lambda: ZooModule(mlp(4), 0.05, leave_out="net.3"), "frozen", "net.3"),
    Case("softmax_twice", "2×64 ReLU MLP, cross-entropy on softmax outputs (wrong logits)",
         lambda: ZooModule(mlp(2), 0.05, loss="softmax_twice"), "plateau"),
]


# ------------------------------------------------------------------------------------------------ running
@dataclass
class Result:
    case: Case
    findings: list[Any] = field(default_factory=list)
    hit: Optional[Any] = None
    seconds: float = 0.0
    seed: int = 0

    @property
    def ok(self) -> bool:
        return not self.findings if self.case.kind is None else self.hit is not None


def run_case(case: Case, steps: int, seed: int = 0) -> Result:
    pl.seed_everything(seed, verbose=False)
    model = case.build()
    monitor = GradientMonitor(warn=False, histogram_every_n_steps=0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            max_steps=steps, accelerator="cpu", log_every_n_steps=CADENCE, logger=TensorBoardLogger(tmp, name="zoo"),
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            callbacks=[monitor],
        )
        start = time.perf_counter()
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))
        seconds = time.perf_counter() - start
    findings = list(monitor.detector.findings)
    hit = None
    if case.kind is not None:
        hit = next((f for f in findings if f.kind == case.kind and (case.layer is None or f.layer == case.layer)), None)
    return Result(case, findings, hit, seconds, seed)


def table(results: list[Result], steps: int, seeds: list[int]) -> str:
    """One row per case (the first seed's findings shown), then recall / false alarms over every (case, seed)."""
    lines = [
        "| case | injected | expected | found (first finding of each kind, seed " + str(seeds[0]) + ") | ok (seeds) "
        "| first detection (step, per seed) |",
        "|---|---|---|---|---|---|",
    ]
    by_case: dict[str, list[Result]] = {}
    for r in results:
        by_case.setdefault(r.case.name, []).append(r)
    for runs in by_case.values():
        c, r = runs[0].case, runs[0]
        expected = "nothing" if c.kind is None else (f"{c.kind} at `{c.layer}`" if c.layer else c.kind)
        kinds: dict[str, Any] = {}
        for f in r.findings:
            kinds.setdefault(f.kind, f)
        found = ", ".join(f"{k}{' at `' + f.layer + '`' if f.layer else ''} (step {f.step})" for k, f in kinds.items())
        first = "—" if c.kind is None else " / ".join("missed" if x.hit is None else str(x.hit.step) for x in runs)
        ok = sum(x.ok for x in runs)
        lines.append(f"| {c.name} | {c.description} | {expected} | {found or 'nothing'} | "
                     f"{'yes' if ok == len(runs) else 'NO'} ({ok}/{len(runs)}) | {first} |")
    faults = [r for r in results if r.case.kind is not None]
    healthy = [r for r in results if r.case.kind is None]
    hits = sum(r.ok for r in faults)
    alarms = sum(not r.ok for r in healthy)
    lines += [
        "",
        f"recall: {hits}/{len(faults)} = {hits / max(1, len(faults)):.0%} (right kind, and right layer where one is "
        f"at fault); false alarms: {alarms}/{len(healthy)} healthy runs with any finding; "
        f"{len(by_case)} cases × seeds {', '.join(map(str, seeds))}, {steps} steps per run, monitor every {CADENCE} "
        f"steps, default thresholds; {sum(r.seconds for r in results):.0f}s of training in all.",
    ]
    return "\n".join(lines)


def write_readme(text: str, command: str) -> None:
    readme = README.read_text()
    block = f"{START}\nMeasured by `{command}` (written there by the script):\n\n{text}\n{END}"
    if START in readme and END in readme:
        readme = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, readme, flags=re.S)
    else:
        readme = readme.rstrip("\n") + "\n\n" + block + "\n"
    README.write_text(readme)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 200; 60 with --quick)")
    parser.add_argument("--quick", action="store_true", help="4 cases, 60 steps: a smoke test")
    parser.add_argument("--only", nargs="*", default=None, help="case names to run")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds per case (default 0 1 2; 0 with --quick)")
    parser.add_argument("--write-readme", action="store_true", help="write the table into README.md")
    args = parser.parse_args(argv)
    steps = args.steps or (60 if args.quick else 200)
    cases = [c for c in CASES if (not args.quick or c.quick) and (not args.only or c.name in args.only)]
    if not cases:
        parser.error(f"--only {args.only}: no such case; cases: {', '.join(c.name for c in CASES)}")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    results = []
    for case in cases:
        for seed in seeds:
            results.append(run_case(case, steps, seed))
            verdict = "ok" if results[-1].ok else "MISSED" if case.kind else "FALSE ALARM"
            print(f"{case.name} (seed {seed}): {verdict}", file=sys.stderr)
    text = table(results, steps, seeds)
    print(text)
    if args.write_readme:
        cmd = ("python benchmarks/fault_zoo.py" + (" --quick" if args.quick else "")
               + (f" --steps {args.steps}" if args.steps else "") + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds else ""))
        write_readme(text, cmd + " --write-readme")
    faults = [r for r in results if r.case.kind is not None]
    healthy = [r for r in results if r.case.kind is None]
    recall = sum(r.ok for r in faults) / max(1, len(faults))
    return 0 if recall >= 0.9 and all(r.ok for r in healthy) else 1


if __name__ == "__main__":
    sys.exit(main())
