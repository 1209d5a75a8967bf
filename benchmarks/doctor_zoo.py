"""GradGuard on a generated zoo of deep nets, against the baselines a sceptic would propose.

Each net (digits, SGD lr 0.01 momentum 0.9, batch 64, 20 epochs, seed 0; the recurrent net on the synthetic
100-step sequence task) is trained with:

- ``none``: no remedy;
- ``gradguard``: ``GradGuard()`` with its defaults (its probe and trials included in its fit);
- ``everything``: the fixed recipe, ELU everywhere + BatchNorm before each activation + auto init + norm
  clipping at 1 (the individual callbacks);
- ``random``: a remedy subset drawn uniformly from the 16 subsets of {init, BatchNorm, ELU, clipping}, mean
  over 3 draws (seeds 0, 1, 2). The draws reuse the oracle's fits of the same subsets (same seed, same data,
  so a refit would give the same number);
- ``oracle``: the best of all 16 subsets, for reference.

Test accuracy on the held-out split. GradGuard's cost share = its measured probe + trial seconds / its whole
fit's seconds. The fits skip validation (``limit_val_batches=0``) to keep the run short; the share is
therefore of a fit without validation (stricter than with it).

    python benchmarks/doctor_zoo.py --nets 0-9          # fit nets 0-9, cache results in benchmarks/doctor_zoo.json
    python benchmarks/doctor_zoo.py --write-readme      # summarise the cache into README (block doctor_zoo)
    python benchmarks/doctor_zoo.py --quick             # 3 nets, 2 epochs, nothing cached (a smoke run, used by a test)

Long runs on the shared machine go under the CPU lock in pieces:
``flock /work/cpu.lock timeout 1800 python benchmarks/doctor_zoo.py --nets 0-11``. ``--write-readme`` refuses
rows whose GradGuard fit was made by other code (a digest of the package and this script). The 16 remedy-subset fits
of a net are cached under their own digest (the remedy code, not the doctor), so a change to the doctor re-runs only
the GradGuard fits. A digest is taken of each file's syntax tree without its docstrings, so an edit to
documentation or comments alone keeps every cached fit. Several ``--nets`` runs may fill the cache at once (it is
written under a file lock).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import fcntl
import hashlib
import inspect
import itertools
import json
import logging
import random
import statistics
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._readme import write_block  # noqa: E402
from lightning_gradguard import (  # noqa: E402
    ActivationReplacement, BatchNormInsertion, GradGuard, GradientClipping, WeightInitialization,
)
from lightning_gradguard.activations import make_activation  # noqa: E402
from lightning_gradguard.demo import DigitsDataModule, SequenceDataModule, VanillaRNN  # noqa: E402
from lightning_gradguard.demo.models import ClassifierModule  # noqa: E402

CACHE = ROOT / "benchmarks" / "doctor_zoo.json"


def cache_path(seed: int) -> Path:
    """The cache of a zoo: ``doctor_zoo.json`` for the development zoo, ``doctor_zoo_seed<N>.json`` for another."""
    return CACHE.with_name("doctor_zoo.json" if not seed else f"doctor_zoo_seed{seed}.json")
EPOCHS, SEED, LR = 20, 0, 0.01
ACTS = ("sigmoid", "tanh", "relu", "leaky_relu", "elu", "selu", "gelu", "silu")
INITS = ("default", "normal0.01", "normal0.1", "normal1", "uniform")
REMEDIES = ("init", "batchnorm", "elu", "clip")
SUBSETS = [tuple(r for r, on in zip(REMEDIES, bits) if on) for bits in itertools.product((0, 1), repeat=4)]
FUNCS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": F.relu, "leaky_relu": F.leaky_relu, "elu": F.elu,
         "selu": F.selu, "gelu": F.gelu, "silu": F.silu}


class FunctionalBlock(nn.Module):
    """A layer followed by its activation as a function call (``F.relu(self.layer(x))``)."""

    def __init__(self, layer: nn.Module, activation: str) -> None:
        super().__init__()
        self.layer, self.activation = layer, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FUNCS[self.activation](self.layer(x))


class ZooNet(ClassifierModule):
    """A plain deep MLP or CNN of the zoo on 8×8 digits."""

    def __init__(self, family: str = "mlp", depth: int = 10, width: int = 64, activation: str = "relu",
                 functional: bool = False, init: str = "default") -> None:
        super().__init__(LR, "sgd", 0.9, 0.0)
        self.save_hyperparameters()
        layers: list[nn.Module] = [] if family == "cnn" else [nn.Flatten()]
        fan = 1 if family == "cnn" else 64
        for _ in range(depth):
            layer = nn.Conv2d(fan, width, 3, padding=1) if family == "cnn" else nn.Linear(fan, width)
            layers.extend([FunctionalBlock(layer, activation)] if functional else [layer, make_activation(activation)])
            fan = width
        if family == "cnn":
            layers.extend([nn.AdaptiveAvgPool2d(1), nn.Flatten()])
        layers.append(nn.Linear(fan, 10))
        self.net = nn.Sequential(*layers)
        with torch.no_grad():
            for m in self.net.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)) and init != "default":
                    if init == "uniform":
                        m.weight.uniform_(-0.5, 0.5)
                    else:
                        m.weight.normal_(0.0, float(init[len("normal"):]))
                    m.bias.zero_()


def zoo(seed: int = 0) -> list[dict[str, Any]]:
    """The generated nets. Seed 0, the development zoo: 40 sick candidates drawn from the issue's ranges (every
    activation and init covered, functional and module activations), one recurrent net, 5 healthy nets. Any
    other seed, a held-out zoo drawn after the doctor was built: 24 nets with family, depth, width, activation,
    init and functional/module drawn at random from the same ranges, and 4 healthy ones (depth 2-4, default
    init)."""
    if seed:
        return heldout_zoo(seed)
    rng = random.Random(0)
    nets = []
    for i in range(40):
        family = "cnn" if i % 5 == 4 else "mlp"
        act = ACTS[i % len(ACTS)]
        init = INITS[(i // 2) % len(INITS)]
        # depths weighted to the small end and narrow deep nets, so the whole run fits ~40 min of one core
        depth = rng.choice((6, 8, 10, 12, 16)) if family == "cnn" else rng.choice((10, 10, 15, 20, 20, 30, 40, 60))
        width = rng.choice((8, 16)) if family == "cnn" else rng.choice((32, 64) if depth >= 30 else (32, 64, 128, 256))
        nets.append({"family": family, "depth": depth, "width": width, "activation": act,
                     "functional": bool(i % 3 == 1), "init": init})
    nets.append({"family": "rnn"})
    healthy = [("mlp", 2, 128, "relu", False), ("mlp", 3, 64, "elu", True), ("mlp", 4, 64, "tanh", False),
               ("mlp", 3, 128, "gelu", False), ("cnn", 2, 16, "relu", False)]
    for family, depth, width, act, functional in healthy:
        nets.append({"family": family, "depth": depth, "width": width, "activation": act, "functional": functional,
                     "init": "default", "healthy": True})
    return nets


def heldout_zoo(seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    nets: list[dict[str, Any]] = []
    for _ in range(24):
        family = rng.choice(("mlp", "mlp", "mlp", "cnn"))
        depth = rng.choice((6, 8, 10, 12, 16)) if family == "cnn" else rng.choice((10, 15, 20, 30, 40, 60))
        width = rng.choice((8, 16)) if family == "cnn" else rng.choice((32, 64) if depth >= 30 else (32, 64, 128, 256))
        nets.append({"family": family, "depth": depth, "width": width, "activation": rng.choice(ACTS),
                     "functional": rng.random() < 1 / 3, "init": rng.choice(INITS)})
    for _ in range(4):
        family = rng.choice(("mlp", "mlp", "cnn"))
        nets.append({"family": family, "depth": rng.choice((2, 3, 4)), "width": rng.choice((16,)) if family == "cnn"
                     else rng.choice((64, 128)), "activation": rng.choice(ACTS), "functional": rng.random() < 1 / 3,
                     "init": "default", "healthy": True})
    return nets


def title(net: dict[str, Any]) -> str:
    if net["family"] == "rnn":
        return "ReLU RNN, 100 steps"
    fn = " fn" if net["functional"] else ""
    return (("healthy " if net.get("healthy") else "") +
            f"{net['family']} {net['depth']}x{net['width']} {net['activation']}{fn} {net['init']}")


def build(net: dict[str, Any]) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    if net["family"] == "rnn":
        return VanillaRNN(), SequenceDataModule()
    spec = {k: v for k, v in net.items() if k != "healthy"}
    return ZooNet(**spec), DigitsDataModule(batch_size=64)


def recipe(subset: tuple[str, ...], net: dict[str, Any]) -> list[pl.Callback]:
    """The individual callbacks of a remedy subset (ELU replaces every other activation)."""
    cbs: list[pl.Callback] = []
    if "elu" in subset and net["family"] != "rnn":
        cbs.append(ActivationReplacement({a: "elu" for a in ACTS if a != "elu"}, verbose=False))
    if "batchnorm" in subset:
        cbs.append(BatchNormInsertion(verbose=False))
    if "init" in subset:
        cbs.append(WeightInitialization("auto", verbose=False))
    if "clip" in subset:
        cbs.append(GradientClipping("norm", threshold=1.0))
    return cbs


def fit(net: dict[str, Any], callbacks: list[pl.Callback], epochs: int = EPOCHS) -> tuple[float, float]:
    """Test accuracy and fit seconds."""
    pl.seed_everything(SEED, verbose=False)
    model, data = build(net)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    acc = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]
    return float(acc), seconds


def run_net(net: dict[str, Any], epochs: int = EPOCHS, subsets: Optional[dict[str, float]] = None) -> dict[str, Any]:
    """Fit one net with every remedy subset (unless ``subsets`` are given from the cache) and with GradGuard."""
    if subsets is None:
        subsets = {"+".join(s) or "none": fit(net, recipe(s, net), epochs)[0] for s in SUBSETS}
    gg = GradGuard(verbose=False, monitor=False)
    acc, seconds = fit(net, [gg], epochs)
    applied = [d.remedy for d in gg.decisions if d.status in ("applied", "forced")]
    return {"net": net, "title": title(net), "subsets": subsets, "gradguard": acc, "gg_seconds": seconds,
            "gg_cost": gg.cost_seconds, "gg_share": gg.cost_seconds / seconds, "gg_passes": gg.cost_steps,
            "gg_applied": applied}


def methods(row: dict[str, Any]) -> dict[str, float]:
    subs = row["subsets"]
    draws = [random.Random(seed).choice(SUBSETS) for seed in range(3)]
    return {"none": subs["none"], "gradguard": row["gradguard"], "everything": subs["init+batchnorm+elu+clip"],
            "random": statistics.mean(subs["+".join(d) or "none"] for d in draws), "oracle": max(subs.values())}


def line(row: dict[str, Any]) -> str:
    m = methods(row)
    return (f"{row['title']:<34} " + " ".join(f"{m[k]:>6.3f}" for k in ("none", "gradguard", "everything", "random", "oracle"))
            + f" {row['gg_share']:>6.1%}  {','.join(row['gg_applied']) or '-'}")


HEADER = f"{'net':<34} {'none':>6} {'GG':>6} {'every':>6} {'random':>6} {'oracle':>6} {'GGcost':>6}  GradGuard applied"


def summary(rows: list[dict[str, Any]]) -> list[str]:
    ms = [methods(r) for r in rows]
    out = [f"{len(rows)} nets; nets at >= 0.85 / mean accuracy per method:"]
    for k in ("none", "gradguard", "everything", "random", "oracle"):
        out.append(f"  {k:<10} {sum(m[k] >= 0.85 for m in ms):>3}/{len(ms)}  mean {statistics.mean(m[k] for m in ms):.3f}")
    trainable = [(r, m) for r, m in zip(rows, ms) if m["oracle"] >= 0.90]
    missed = [r["title"] for r, m in trainable if m["gradguard"] < 0.85]
    out.append(f"nets some subset trains to >= 0.90: {len(trainable)}; GradGuard >= 0.85 on "
               f"{len(trainable) - len(missed)} of them" + (f"; missed: {', '.join(missed)}" if missed else ""))
    healthy = [(r, m) for r, m in zip(rows, ms) if r["net"].get("healthy")]
    if healthy:
        worst = min(m["gradguard"] - m["none"] for _, m in healthy)
        out.append(f"healthy nets: GradGuard - no remedy, worst {worst:+.3f} (" +
                   ", ".join(f"{m['gradguard'] - m['none']:+.3f}" for _, m in healthy) + ")")
    shares = sorted(r["gg_share"] for r in rows)
    out.append(f"GradGuard probe + trials share of its fit time: min {shares[0]:.1%}, median "
               f"{statistics.median(shares):.1%}, max {shares[-1]:.1%}")
    return out


#: the code a remedy-subset fit runs (everything but the doctor); its digest keys the cached subset fits, so a
#: change to the doctor re-runs only the GradGuard fits
REMEDY_CODE = ("activations.py", "graph.py", "init.py", "lsuv.py", "pretrained.py", "clipping.py", "step_skip.py",
               "distributed.py", "_validation.py", "surgery", "demo", "callbacks/weight_init.py",
               "callbacks/batchnorm_insertion.py", "callbacks/activation_replacement.py",
               "callbacks/gradient_clipping.py", "callbacks/_common.py", "callbacks/_surgery_base.py",
               "callbacks/_lightning_internals.py")


def _code(path: Path) -> bytes:
    """What a module does, without what it says: its syntax tree with docstrings dropped (comments, blank lines
    and line numbers are not in the tree), so an edit to documentation alone keeps the cached fits. The dump's
    format belongs to the Python version: another interpreter re-runs the fits (a miss, never a wrong hit)."""
    return _tree(path.read_text(encoding="utf-8"))


def _tree(source: str) -> bytes:
    tree = ast.parse(textwrap.dedent(source))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False).encode()


def _hash(paths: list[Path], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        h.update(_code(p))
    return h.hexdigest()[:16]


def remedy_digest() -> str:
    """Digest of what the remedy-subset fits depend on: the remedy code and this script's nets, recipes and fit."""
    pkg = ROOT / "lightning_gradguard"
    paths = sorted(q for name in REMEDY_CODE for q in ([pkg / name] if name.endswith(".py") else (pkg / name).rglob("*.py")))
    src = b"".join(_tree(inspect.getsource(o)) for o in (FunctionalBlock, ZooNet, zoo, heldout_zoo, build, recipe, fit))
    return _hash(paths, src.decode() + repr((EPOCHS, SEED, LR, SUBSETS)))


def digest() -> str:
    """Digest of what a GradGuard fit depends on: the whole package and this script."""
    return _hash(sorted((ROOT / "lightning_gradguard").rglob("*.py")) + [ROOT / "benchmarks" / "doctor_zoo.py"])


@contextlib.contextmanager
def locked_cache() -> Any:
    """Read-modify-write of the cache under a file lock, so several ``--nets`` runs can fill it at once."""
    with open(CACHE.with_suffix(".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}
        yield cache
        CACHE.write_text(json.dumps(cache, indent=1, sort_keys=True))


def parse_nets(text: str, n: int) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise SystemExit(f"--nets: {bad} out of range 0-{n - 1}")
    return out


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", default="", help="indices, e.g. 0-9,12 (default: all)")
    parser.add_argument("--quick", action="store_true", help="3 small nets (sick MLP, sick CNN, healthy MLP), 2 epochs, no cache")
    parser.add_argument("--write-readme", action="store_true", help="summarise the cache into README (block doctor_zoo)")
    parser.add_argument("--zoo-seed", type=int, default=0,
                        help="0: the development zoo (46 nets); another seed: a held-out zoo of 28 nets drawn with it "
                             "(cache benchmarks/doctor_zoo_seed<N>.json, README block doctor_zoo_seed<N>)")
    args = parser.parse_args(argv)
    if args.zoo_seed < 0:
        parser.error(f"--zoo-seed={args.zoo_seed}: must be 0 (the development zoo) or a positive seed")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    global CACHE
    CACHE = cache_path(args.zoo_seed)
    block = "doctor_zoo" if not args.zoo_seed else f"doctor_zoo_seed{args.zoo_seed}"
    nets = zoo(args.zoo_seed)
    cache = json.loads(CACHE.read_text()) if CACHE.exists() and not args.quick else {}
    version = digest()  # GradGuard fits: any package change re-runs them; subset fits are keyed by remedy_digest()
    if args.write_readme:
        rows = [cache[str(i)] for i in range(len(nets)) if str(i) in cache and cache[str(i)].get("version") == version]
        if len(rows) != len(nets):
            raise SystemExit(f"--write-readme: {len(rows)} of {len(nets)} nets cached for this code ({version}); run the rest")
        lines = [HEADER, *map(line, rows), "", *summary(rows)]
        print("\n".join(lines))
        seed_arg = f" --zoo-seed {args.zoo_seed}" if args.zoo_seed else ""
        write_block(block, f"Measured by `python benchmarks/doctor_zoo.py{seed_arg} --nets ...` then "
                    f"`python benchmarks/doctor_zoo.py{seed_arg} --write-readme`:\n\n```\n" + "\n".join(lines) + "\n```")
        return rows
    picks = [15, 4, 41] if args.quick else (parse_nets(args.nets, len(nets)) if args.nets else list(range(len(nets))))
    print(HEADER, flush=True)
    rows = []
    remedy_version = remedy_digest()
    for i in picks:
        old = cache.get(str(i), {})
        if old.get("version") == version:
            row = old  # already fitted by this code
        else:
            reuse = old.get("subsets") if old.get("remedy_version") == remedy_version and not args.quick else None
            row = run_net(nets[i], 2 if args.quick else EPOCHS, reuse)
            row["version"], row["remedy_version"] = version, remedy_version
            if not args.quick:
                with locked_cache() as cache:
                    cache[str(i)] = row
        rows.append(row)
        print(line(row), flush=True)
    print("\n".join(summary(rows)))
    return rows


if __name__ == "__main__":
    main()
