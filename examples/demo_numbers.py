"""Run the demo commands README quotes and print (or write into README) their test accuracies.

Each block below is one fenced code block of README.md, between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->`` markers; every command in it is run as written (``python examples/train.py ...``, seed 0,
plus a private ``hydra.run.dir`` and no progress bar), one after another.

    python examples/demo_numbers.py                          # all blocks, printed
    python examples/demo_numbers.py --only demo-init --write-readme
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._readme import write_block  # noqa: E402

# (overrides, how the comment shows the result: None = not measured, "acc", "acc_loss", "test_acc")
Entry = tuple[str, Optional[str], str]
BLOCKS: dict[str, list[Entry]] = {
    "demo-overrides": [
        ("model.depth=20 model.activation=sigmoid", "acc", "stays near chance ({acc})"),
        ("model.depth=20 model.activation=sigmoid gradguard=auto", "acc", "the doctor: {acc}"),
        ("gradguard/clip=norm callbacks.grad_clip.threshold=0.5", None, "one remedy, tweaked"),
        ("-m model.activation=relu,tanh", None, "multirun: one run per activation"),
        ("'~gradguard/monitor' model=cnn", None, "the CNN, monitor off"),
    ],
    "demo-init": [
        ("model.depth=30 model.activation=tanh", "acc", "test accuracy {acc}"),
        ("model.depth=30 model.activation=tanh gradguard/init=auto", "acc", "test accuracy {acc}"),
    ],
    "demo-surgery": [
        ("model.depth=20 model.activation=sigmoid", "acc", "{acc}"),
        ("model.depth=20 model.activation=sigmoid gradguard/batchnorm=before", "acc", "{acc}"),
        ("model.depth=20 model.activation=sigmoid gradguard/batchnorm=after", "acc", "{acc}"),
        ("model.depth=20 model.activation=sigmoid gradguard/batchnorm=input", "acc", "{acc}"),
        ("model.depth=20 model.activation=sigmoid gradguard/activation=elu", "acc", "{acc}"),
    ],
    "demo-clipping": [
        ("data=sequence model=rnn", "acc", "test accuracy {acc}{loss}"),
        ("data=sequence model=rnn gradguard/clip=norm", "acc", "{acc}{loss}"),
        ("data=sequence model=rnn gradguard/clip=value", "acc", "{acc}{loss}"),
        ("data=sequence model=rnn gradguard/clip=agc", "acc", "{acc}{loss}"),
        ("data=sequence model=rnn gradguard/clip=percentile", "acc", "{acc}{loss}"),
    ],
}
QUICKSTART = "demo-quickstart"  # the default demo's last two lines


def measure(overrides: str) -> tuple[float, float]:
    """Run ``python examples/train.py OVERRIDES`` and return (test accuracy, test loss) from its last line."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "examples" / "train.py"), *shlex.split(overrides),
               f"hydra.run.dir={tmp}/run", "trainer.enable_progress_bar=false"]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=1800)
    m = re.findall(r"test accuracy: ([0-9.]+) \(loss ([^)]+)\)", proc.stdout)
    if proc.returncode != 0 or not m:
        raise SystemExit(f"`{' '.join(cmd)}` failed:\n{proc.stderr[-3000:]}")
    return float(m[-1][0]), float(m[-1][1])


def render(name: str, results: dict[str, tuple[float, float]]) -> str:
    """The fenced block ``name`` with the measured numbers in its comments."""
    if name == QUICKSTART:
        acc, loss = results[""]
        where = "outputs/<date>/<time>/tensorboard"
        return (f"```\ntest accuracy: {acc:.4f} (loss {loss:.4g}) | TensorBoard logs: {where}/version_0\n"
                f"view them with: tensorboard --logdir {where}\n```")
    lines = []
    for overrides, kind, comment in BLOCKS[name]:
        text = comment
        if kind is not None:
            acc, loss = results[overrides]
            diverged = not math.isfinite(loss)
            text = comment.format(acc=f"{acc:.4f}", loss=", loss NaN (diverged)" if diverged else f" (loss {loss:.4g})")
        lines.append((f"python examples/train.py {overrides}", text))
    width = max(len(c) for c, _ in lines) + 2
    return "```bash\n" + "\n".join(f"{c:<{width}}# {t}" for c, t in lines) + "\n```"


def commands(name: str) -> list[str]:
    if name == QUICKSTART:
        return [""]
    return [o for o, kind, _ in BLOCKS[name] if kind is not None]


def main(argv: Optional[list[str]] = None) -> None:
    names = [QUICKSTART, *BLOCKS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated blocks: " + ",".join(names))
    parser.add_argument("--write-readme", action="store_true", help="write the blocks into README.md")
    args = parser.parse_args(argv)
    chosen = [n for n in (args.only.split(",") if args.only else names) if n]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise SystemExit(f"--only: unknown {unknown}; choose from {', '.join(names)}")
    cache: dict[str, tuple[float, float]] = {}  # a command quoted in two blocks runs once
    for name in chosen:
        for overrides in commands(name):
            if overrides not in cache:
                cache[overrides] = measure(overrides)
                print(f"{overrides or '(defaults)'}: test accuracy {cache[overrides][0]:.4f}", file=sys.stderr, flush=True)
        body = render(name, cache)
        print(f"<!-- {name} -->\n{body}")
        if args.write_readme:
            write_block(name, body)


if __name__ == "__main__":
    main()
