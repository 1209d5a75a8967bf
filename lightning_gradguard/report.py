"""``gradguard report``: read the TensorBoard event files GradientMonitor wrote and print the diagnosis.

    gradguard report RUN_DIR [RUN_DIR ...] [--step N] [--json] [--png FILE]

A RUN_DIR is any folder with event files below it (a single run, a Hydra run directory, or a multirun
sweep directory: every folder holding event files is one run), or one event file. Nothing but the event
files is read. Runs without gradguard data (GradientMonitor off) inside a folder of several runs are
skipped with a note on stderr; a folder where no run has any is an error.

Per layer, the ``findings`` column holds the kinds the monitor reported for that layer plus what the values
at the reported step show by themselves with the monitor's default thresholds (``vanishing``: norm < 1e-7
or < 1e-3 × the output layer's; ``exploding``: norm > 1e3): the monitor's detector names only the worst
layer, the table flags every one.
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

from lightning_gradguard._text import parse_markdown_table, text_table
from lightning_gradguard.health import HealthDetector

_DEFAULTS = HealthDetector()


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
    init: Optional[str] = None
    frozen: bool = False
    flags: list[str] = field(default_factory=list)  # what the values at the step show (default thresholds)


@dataclass
class RunSummary:
    run: str
    step: Optional[int]
    layers: list[LayerSummary]
    findings: list[str]
    remedies: list[str]
    metrics: dict[str, float]
    series: dict[str, list[list[float]]] = field(default_factory=dict)  # layer -> [[step, grad norm], ...]
    ratio_series: dict[str, list[list[float]]] = field(default_factory=dict)  # layer -> [[step, update ratio], ...]
    overrides: list[str] = field(default_factory=list)  # the Hydra overrides of a demo-app run

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
            if not root.name.startswith("events.out.tfevents."):
                raise ReportError(f"{p}: is a file, not a run folder or a TensorBoard event file "
                                  "(events.out.tfevents.*); pass the folder that holds the event files")
            runs.append(root.parent)
            continue
        found = sorted({f.parent for f in root.rglob("events.out.tfevents.*")})
        if not found:
            raise ReportError(f"{p}: no TensorBoard event files below it")
        runs += found
    return list(dict.fromkeys(runs))


class NoGradguardData(ReportError):
    """A run whose event files hold no ``grad_norm/*`` scalars (GradientMonitor was off)."""


def _texts(acc: Any, prefix: str) -> list[tuple[int, str]]:
    out = []
    for tag in acc.Tags().get("tensors", []):
        if tag.startswith(prefix):
            for e in acc.Tensors(tag):
                out.append((e.step, e.tensor_proto.string_val[0].decode()))
    return sorted(out)


def _at(events: list[Any], step: Optional[int]) -> Optional[float]:
    chosen = [e for e in events if step is None or e.step <= step]
    return chosen[-1].value if chosen else None


def _plain(text: str) -> str:
    """A text entry written by ``log_text`` (indented code block) back to its plain lines."""
    return "\n".join(line.strip() for line in text.splitlines())


def _layers_meta(text: str) -> list[dict[str, Any]]:
    """``gradguard/layers``: a markdown table (current) or JSON (logs written before it)."""
    rows = parse_markdown_table(text)
    if rows:
        return [{"name": r["layer"], "type": r.get("type", "?"), "activation": None if r.get("activation") in (None, "-") else r["activation"],
                 "init": None if r.get("init") in (None, "-") else r["init"], "frozen": r.get("frozen") == "yes"} for r in rows]
    return json.loads(_plain(text))


def finding_lines(texts: Sequence[str]) -> list[str]:
    """``gradguard/findings`` text entries as ``[kind] step N: finding; what to do`` lines (markdown rows or
    old plain text)."""
    out = []
    for text in texts:
        rows = parse_markdown_table(text)
        if not rows:
            out.append(_plain(text))
        for r in rows:
            remedy = r.get("what to do", "-")
            out.append(f"[{r['kind']}] step {r['step']}: {r['finding']}" + (f"; {remedy}" if remedy != "-" else ""))
    return out


def _finding_step(line: str) -> int:
    import re

    m = re.search(r"step (\d+):", line)
    return int(m.group(1)) if m else -1


def _overrides(text: str) -> list[str]:
    """The Hydra overrides listed in ``gradguard/run`` (markdown list of `key=value` items, or one plain line)."""
    import re

    if "### overrides" in text:
        part = text.split("### overrides", 1)[1].split("###", 1)[0]
        return re.findall(r"^- `([^`]*)`", part, re.M)
    plain = _plain(text)
    return [] if plain == "(defaults)" else plain.split()


def _layer_flags(layers: list["LayerSummary"], output_norm: Optional[float]) -> None:
    """Add ``vanishing``/``exploding`` to each layer whose value at the reported step shows it (default thresholds)."""
    for l in layers:
        v = l.grad_norm_last
        if v is None or not math.isfinite(v):
            continue
        flags = set()
        if v < _DEFAULTS.vanishing_norm or (output_norm and output_norm > 0 and l is not layers[-1]
                                            and v / output_norm < _DEFAULTS.vanishing_ratio):
            flags.add("vanishing")
        if v > _DEFAULTS.exploding_norm:
            flags.add("exploding")
        l.flags = sorted(flags)


def summarize_run(run_dir: Path, step: Optional[int] = None, label: Optional[str] = None) -> RunSummary:
    """Read one run's event files (all of them in ``run_dir``) into a :class:`RunSummary`.

    Raises :class:`ReportError` when ``step`` lies outside the logged steps, :class:`NoGradguardData` when
    the run has no gradguard data.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0, "histograms": 1, "images": 1})
    acc.Reload()
    scalars = acc.Tags().get("scalars", [])
    norm_tags = [t for t in scalars if t.startswith("grad_norm/")]
    if not norm_tags:
        raise NoGradguardData(
            f"{run_dir}: no gradguard data (no grad_norm/* scalars in its event files); was GradientMonitor on "
            "the Trainer, with a TensorBoardLogger?"
        )
    if step is not None:
        logged = sorted({e.step for t in norm_tags for e in acc.Scalars(t)})
        if step < logged[0] or step > logged[-1]:
            raise ReportError(f"{run_dir}: --step {step} is outside the logged steps {logged[0]}..{logged[-1]} "
                              f"({len(logged)} logging steps)")
    layer_info = _texts(acc, "gradguard/layers")
    if layer_info:
        layers_meta = _layers_meta(layer_info[-1][1])
    else:  # older logs: tag order
        layers_meta = [{"name": t.split("/", 1)[1], "type": "?", "activation": None} for t in norm_tags]
    findings = [f for f in finding_lines([t for _, t in _texts(acc, "gradguard/findings")])
                if step is None or _finding_step(f) <= step]
    layers: list[LayerSummary] = []
    series: dict[str, list[list[float]]] = {}
    ratio_series: dict[str, list[list[float]]] = {}
    for meta in layers_meta:
        name = meta["name"]
        if f"grad_norm/{name}" not in scalars:
            continue
        ev = [e for e in acc.Scalars(f"grad_norm/{name}") if step is None or e.step <= step]
        vals = [e.value for e in ev]
        series[name] = [[e.step, e.value] for e in ev]
        if f"update_ratio/{name}" in scalars:
            ratio_series[name] = [[e.step, e.value] for e in acc.Scalars(f"update_ratio/{name}") if step is None or e.step <= step]

        def last(tag: str) -> Optional[float]:
            return _at(acc.Scalars(tag), step) if tag in scalars else None

        finite = [v for v in vals if math.isfinite(v)]
        layers.append(LayerSummary(
            name, meta.get("type", "?"), meta.get("activation"),
            vals[0] if vals else None, vals[-1] if vals else None, statistics.median(finite) if finite else None,
            last(f"update_ratio/{name}"), last(f"act_dead_frac/{name}") if meta.get("activation") in ("relu", "relu6") else None,
            last(f"act_saturated_frac/{name}") if meta.get("activation") in ("sigmoid", "tanh") else None,
            [f for f in findings if f"`{name}`" in f], init=meta.get("init"), frozen=bool(meta.get("frozen")),
        ))
    weighted = [l for l in layers if l.type.split(" ")[0] not in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm")]
    _layer_flags(weighted, weighted[-1].grad_norm_last if weighted else None)
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
    overrides = _overrides(names[-1][1]) if names else []
    if names:  # written by the demo app: the run's Hydra overrides
        label = f"{label or run_dir} [{' '.join(overrides) or 'no overrides'}]"
    return RunSummary(label or str(run_dir), step, layers, findings, sorted(set(remedies)), metrics, series,
                      ratio_series, overrides)


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
         _fmt(l.update_ratio), _fmt(l.dead_frac), _fmt(l.saturated_frac),
         ", ".join(sorted({f.split("]")[0].lstrip("[") for f in l.findings} | set(l.flags))) or "-")
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
    """The layer × step heatmap (log10 gradient norm and update ratio, layers in forward order) of each run,
    stacked top to bottom in one PNG; returns the number of layer rows drawn."""
    import numpy as np
    from matplotlib.image import imsave

    from lightning_gradguard.figures import figure_to_image, gradient_heatmap_figure

    images, rows = [], 0
    for run in runs:
        names = [l.name for l in run.layers if run.series.get(l.name)]
        steps = sorted({int(p[0]) for n in names for p in run.series[n]})
        def table(series: dict[str, list[list[float]]]) -> list[list[Optional[float]]]:
            return [[dict((int(p[0]), p[1]) for p in series.get(n, [])).get(s) for s in steps] for n in names]
        fig = gradient_heatmap_figure(names, steps, table(run.series), table(run.ratio_series) if run.ratio_series else None,
                                      title=run.run)
        images.append(figure_to_image(fig))
        rows += len(names)
    width = max(img.shape[1] for img in images)
    padded = [np.pad(img, ((0, 0), (0, width - img.shape[1]), (0, 0)), constant_values=255) for img in images]
    imsave(path, np.concatenate(padded, axis=0))
    return rows


def _short_labels(runs: list[Path]) -> list[str]:
    if len(runs) == 1:
        return [str(runs[0])]
    common = os.path.commonpath([str(r) for r in runs])
    return [os.path.relpath(r, common) if str(r) != common else str(r) for r in runs]


def _step(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--step {text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"--step {value} must be >= 0 (a global step)")
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``gradguard`` console command."""
    parser = argparse.ArgumentParser(prog="gradguard", description="lightning_gradguard tools")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="per-layer gradient report from GradientMonitor's TensorBoard logs")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rep.add_argument("--step", type=_step, default=None, help="report values at this step (default: the last)")
    rep.add_argument("--json", action="store_true", help="print JSON instead of tables")
    rep.add_argument("--png", metavar="FILE", default=None, help="write a gradient-flow figure (norms over training)")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.run_dirs)
        labels = _short_labels(runs)
        from tqdm.auto import tqdm

        summaries, skipped = [], []
        # a progress bar on a terminal (large logs take a while to read), nothing when piped
        bar = tqdm(list(zip(runs, labels)), desc="reading runs", unit="run", file=sys.stderr,
                   disable=not sys.stderr.isatty(), leave=False)
        for run, label in bar:
            bar.set_postfix_str(label[-40:])
            try:
                summaries.append(summarize_run(run, args.step, label))
            except NoGradguardData as err:
                if len(runs) == 1:
                    raise
                skipped.append(f"{label}: {err.args[0].split(': ', 1)[1]}")
        for note in skipped:
            print(f"gradguard report: skipped {note}", file=sys.stderr)
        if not summaries:
            raise ReportError(f"none of the {len(runs)} runs below {', '.join(args.run_dirs)} has gradguard data "
                              "(no grad_norm/* scalars); was GradientMonitor on the Trainer, with a TensorBoardLogger?")
    except ReportError as err:
        print(f"gradguard report: error: {err}", file=sys.stderr)
        return 2
    if args.png:
        n = write_png(summaries, args.png)
        if not args.json:
            print(f"wrote {args.png} (heatmap of {n} layers, one row per layer, a panel per run)")
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
