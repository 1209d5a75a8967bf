"""``gradguard report``: read the TensorBoard event files GradientMonitor wrote and print the diagnosis.

    gradguard report RUN_DIR [RUN_DIR ...] [--step N] [--json] [--png FILE]

A RUN_DIR is any folder with event files below it (a single run, a Hydra run directory, or a multirun
sweep directory: every folder holding event files is one run). Nothing but the event files is read.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from lightning_gradguard._text import text_table


class ReportError(Exception):
    """A folder that holds no gradguard data, or another input problem; the message says which."""


@dataclass
class LayerSummary:
    name: str
    type: str
    activation: Optional[str]
    grad_norm_first: Optional[float]
    grad_norm_last: Optional[float]
    grad_norm_median: Optional[float]
    update_ratio: Optional[float]
    dead_frac: Optional[float]
    saturated_frac: Optional[float]
    findings: list[str] = field(default_factory=list)


@dataclass
class RunSummary:
    run: str
    step: Optional[int]
    layers: list[LayerSummary]
    findings: list[str]
    remedies: list[str]
    metrics: dict[str, float]
    series: dict[str, list[list[float]]] = field(default_factory=dict)  # layer -> [[step, grad norm], ...]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_runs(paths: Sequence[str]) -> list[Path]:
    """Every folder holding TensorBoard event files below the given paths, sorted."""
    runs: list[Path] = []
    for p in paths:
        root = Path(p)
        if not root.exists():
            raise ReportError(f"{p}: no such file or directory")
        if root.is_file():
            root = root.parent
        found = sorted({f.parent for f in root.rglob("events.out.tfevents.*")})
        if not found:
            raise ReportError(f"{p}: no TensorBoard event files below it")
        runs += found
    return runs


def _texts(acc: Any, prefix: str) -> list[tuple[int, str]]:
    out = []
    for tag in acc.Tags().get("tensors", []):
        if tag.startswith(prefix):
            for e in acc.Tensors(tag):
                out.append((e.step, "\n".join(line.strip() for line in e.tensor_proto.string_val[0].decode().splitlines())))
    return sorted(out)


def _at(events: list[Any], step: Optional[int]) -> Optional[float]:
    chosen = [e for e in events if step is None or e.step <= step]
    return chosen[-1].value if chosen else None


def summarize_run(run_dir: Path, step: Optional[int] = None, label: Optional[str] = None) -> RunSummary:
    """Read one run's event files (all of them in ``run_dir``) into a :class:`RunSummary`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0, "histograms": 1, "images": 1})
    acc.Reload()
    scalars = acc.Tags().get("scalars", [])
    norm_tags = [t for t in scalars if t.startswith("grad_norm/")]
    if not norm_tags:
        raise ReportError(
            f"{run_dir}: no gradguard data (no grad_norm/* scalars in its event files); was GradientMonitor on "
            "the Trainer, with a TensorBoardLogger?"
        )
    layer_info = _texts(acc, "gradguard/layers")
    if layer_info:
        layers_meta = json.loads(layer_info[-1][1])
    else:  # older logs: tag order
        layers_meta = [{"name": t.split("/", 1)[1], "type": "?", "activation": None} for t in norm_tags]
    findings = [text for _, text in _texts(acc, "gradguard/findings")]
    layers: list[LayerSummary] = []
    series: dict[str, list[list[float]]] = {}
    for meta in layers_meta:
        name = meta["name"]
        if f"grad_norm/{name}" not in scalars:
            continue
        ev = [e for e in acc.Scalars(f"grad_norm/{name}") if step is None or e.step <= step]
        vals = [e.value for e in ev]
        series[name] = [[e.step, e.value] for e in ev]

        def last(tag: str) -> Optional[float]:
            return _at(acc.Scalars(tag), step) if tag in scalars else None

        finite = [v for v in vals if math.isfinite(v)]
        layers.append(LayerSummary(
            name, meta.get("type", "?"), meta.get("activation"),
            vals[0] if vals else None, vals[-1] if vals else None, statistics.median(finite) if finite else None,
            last(f"update_ratio/{name}"), last(f"act_dead_frac/{name}") if meta.get("activation") in ("relu", "relu6") else None,
            last(f"act_saturated_frac/{name}") if meta.get("activation") in ("sigmoid", "tanh") else None,
            [f for f in findings if f"`{name}`" in f],
        ))
    remedies = []
    if _texts(acc, "gradguard/init"):
        remedies.append("WeightInitialization")
    for tag in acc.Tags().get("tensors", []):
        if tag.startswith("gradguard/surgery/"):
            remedies.append(tag.split("/")[2])
        if tag.startswith("gradguard/decisions"):
            remedies.append("GradGuard")
    if any(t.startswith("gradguard/clip/") for t in scalars):
        remedies.append("GradientClipping")
    metrics: dict[str, float] = {}
    for tag in ("val/acc", "test/acc", "val/loss", "test/loss", "gradguard/flow_ratio", "gradguard/grad_norm_total"):
        if tag in scalars:
            v = _at(acc.Scalars(tag), step)
            if v is not None:
                metrics[tag] = v
    names = _texts(acc, "gradguard/run")
    if names:  # written by the demo app: the run's Hydra overrides
        label = f"{label or run_dir} [{names[-1][1]}]"
    return RunSummary(label or str(run_dir), step, layers, findings, sorted(set(remedies)), metrics, series)


# ------------------------------------------------------------------------------------------ output
def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.3g}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"


def format_run(run: RunSummary, color: bool = False) -> str:
    red, bold, reset = ("\033[31m", "\033[1m", "\033[0m") if color else ("", "", "")
    head = ("layer", "type", "activation", "grad norm first", "last", "median", "update ratio", "dead", "saturated", "findings")
    rows = [
        (l.name, l.type, l.activation or "-", _fmt(l.grad_norm_first), _fmt(l.grad_norm_last), _fmt(l.grad_norm_median),
         _fmt(l.update_ratio), _fmt(l.dead_frac), _fmt(l.saturated_frac), ", ".join(sorted({f.split("]")[0].lstrip("[") for f in l.findings})) or "-")
        for l in run.layers
    ]
    where = f" (at step {run.step})" if run.step is not None else ""
    parts = [f"{bold}run: {run.run}{where}{reset}", text_table(head, rows)]
    metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in run.metrics.items())
    if metrics:
        parts.append(f"metrics: {metrics}")
    parts.append(f"remedies applied: {', '.join(run.remedies) or 'none'}")
    if run.findings:
        parts.append(f"{red}findings ({len(run.findings)}):{reset}")
        parts += [f"  - {f}" for f in run.findings]
    else:
        parts.append("findings: none — gradients look healthy")
    return "\n".join(parts)


def format_comparison(runs: Sequence[RunSummary]) -> str:
    head = ("run", "remedies", "first-layer grad norm (last)", "flow ratio", "findings", "val/acc", "test/acc")
    rows = [
        (r.run, ", ".join(r.remedies) or "none", _fmt(r.layers[0].grad_norm_last if r.layers else None),
         _fmt(r.metrics.get("gradguard/flow_ratio")), str(len(r.findings)), _fmt(r.metrics.get("val/acc")),
         _fmt(r.metrics.get("test/acc")))
        for r in runs
    ]
    return "comparison\n" + text_table(head, rows)


def write_png(runs: Sequence[RunSummary], path: str) -> int:
    """Gradient norm over training, one line per layer (log scale), one panel per run; returns line count."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2 * len(runs)), dpi=100)
    canvas = FigureCanvasAgg(fig)
    lines = 0
    for k, run in enumerate(runs):
        ax = fig.add_subplot(len(runs), 1, k + 1)
        for name, pts in run.series.items():
            if pts:
                ax.plot([p[0] for p in pts], [max(p[1], 1e-30) if math.isfinite(p[1]) else float("nan") for p in pts],
                        label=name, linewidth=1)
                lines += 1
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("gradient L2 norm")
        ax.set_title(run.run, fontsize=8)
        if len(run.series) <= 12:
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    canvas.print_png(path)
    return lines


def _short_labels(runs: list[Path]) -> list[str]:
    if len(runs) == 1:
        return [str(runs[0])]
    common = os.path.commonpath([str(r) for r in runs])
    return [os.path.relpath(r, common) if str(r) != common else str(r) for r in runs]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``gradguard`` console command."""
    parser = argparse.ArgumentParser(prog="gradguard", description="lightning_gradguard tools")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="per-layer gradient report from GradientMonitor's TensorBoard logs")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rep.add_argument("--step", type=int, default=None, help="report values at this step (default: the last)")
    rep.add_argument("--json", action="store_true", help="print JSON instead of tables")
    rep.add_argument("--png", metavar="FILE", default=None, help="write a gradient-flow figure (norms over training)")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.run_dirs)
        labels = _short_labels(runs)
        progress = sys.stderr.isatty() and not args.json
        summaries = []
        for i, (run, label) in enumerate(zip(runs, labels)):
            if progress:
                print(f"reading {label} ({i + 1}/{len(runs)})...", file=sys.stderr, flush=True)
            summaries.append(summarize_run(run, args.step, label))
    except ReportError as err:
        print(f"gradguard report: error: {err}", file=sys.stderr)
        return 2
    if args.png:
        n = write_png(summaries, args.png)
        if not args.json:
            print(f"wrote {args.png} ({n} lines, one per layer and run)")
    if args.json:
        print(json.dumps([s.as_dict() for s in summaries], indent=2))
        return 0
    color = sys.stdout.isatty() and os.environ.get("NO_COLOR") is None
    for s in summaries:
        print(format_run(s, color))
        print()
    if len(summaries) > 1:
        print(format_comparison(summaries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
